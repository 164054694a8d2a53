//! What `rolecache run` is configured with: where updates come from and the webhook's URL and
//! secret. The command line (`crate::config`) builds these; the bot knows nothing of the CLI.

/// A parsed WEBHOOK_URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The URL as given to Telegram.
    pub url: String,
    /// Its path, where each instance serves the webhook.
    pub path: String,
}

/// Webhook mode: where updates arrive and the secret they carry.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    pub secret: String,
}

/// How `rolecache run` receives updates.
#[derive(Debug, Clone)]
pub enum UpdateSource {
    /// Long polling by the elected leader.
    Polling,
    /// Telegram posts them to every instance through the operator's load balancer.
    Webhook(WebhookConfig),
}

/// What `rolecache run` needs, once the token is known to be present.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub token: String,
    pub api_url: Option<String>,
    pub owner_id: Option<i64>,
    pub updates: UpdateSource,
}
