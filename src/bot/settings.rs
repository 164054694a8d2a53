//! What `rolecache run` is configured with: where updates come from and the webhook's URL and
//! secret, and the rules their values follow (Telegram's and ours). The command line
//! (`crate::config`) builds these from its arguments and the environment; the bot knows nothing
//! of the CLI.

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

/// Paths the HTTP server already serves ([`crate::http`]).
const RESERVED_PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

impl WebhookUrl {
    /// An absolute https:// URL (Telegram requires https) without a query or fragment, whose
    /// path is not one of the health and metrics endpoints.
    pub(crate) fn parse(text: &str) -> Result<WebhookUrl, String> {
        let text = text.trim();
        let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
        if url.scheme() != "https" {
            return Err(format!(
                "{text:?} must be an https:// URL (Telegram requires it)"
            ));
        }
        if url.host_str().is_none_or(|h| h.is_empty()) {
            return Err(format!("{text:?} has no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{text:?} must not have a query or a fragment"));
        }
        let path = url.path().to_string();
        if RESERVED_PATHS.contains(&path.trim_end_matches('/')) {
            return Err(format!(
                "{text:?}: the path {path} is taken by the health and metrics endpoints"
            ));
        }
        Ok(WebhookUrl {
            url: url.to_string(),
            path,
        })
    }
}

/// Telegram's rule for `secret_token`: 1-256 characters, A-Z, a-z, 0-9, `_` and `-`.
pub(crate) fn parse_webhook_secret(text: &str) -> Result<String, String> {
    let valid = (1..=256).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err("the webhook secret must be 1-256 characters of A-Z a-z 0-9 _ -".into());
    }
    Ok(text.to_string())
}

/// A bot token: one word without `/` (like `123456:ABC-DEF`).
pub(crate) fn parse_token(text: &str) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err("the bot token must be one word without '/' (like 123456:ABC-DEF)".into());
    }
    Ok(token.to_string())
}

/// An absolute http(s) URL, without the trailing slash (as teloxide's `Bot::from_env` strips it).
pub(crate) fn parse_api_url(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.chars().any(char::is_whitespace) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_and_tokens() {
        assert_eq!(
            parse_api_url("http://127.0.0.1:8081/"),
            Ok("http://127.0.0.1:8081".to_string())
        );
        assert!(parse_api_url("https://example.com/tba").is_ok());
        for bad in [
            "",
            "127.0.0.1:80",
            "ftp://x",
            "http://",
            "http:///x",
            "mailto:me",
        ] {
            assert!(parse_api_url(bad).is_err(), "accepted {bad:?}");
        }
        assert!(parse_token("123:abc").is_ok());
        for bad in ["", "  ", "a b", "a/b"] {
            assert!(parse_token(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn webhook_urls_and_secrets() {
        let hook = WebhookUrl::parse("https://bot.example.com/tg/hook").unwrap();
        assert_eq!(hook.path, "/tg/hook");
        assert_eq!(hook.url, "https://bot.example.com/tg/hook");
        assert_eq!(
            WebhookUrl::parse("https://bot.example.com").unwrap().path,
            "/"
        );
        assert!(WebhookUrl::parse("https://bot.example.com:8443/x").is_ok());
        for bad in [
            "",
            "bot.example.com/hook",
            "http://bot.example.com/hook",
            "https://",
            "https://bot.example.com/hook?a=1",
            "https://bot.example.com/metrics",
            "https://bot.example.com/readyz/",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "accepted {bad:?}");
        }
        assert!(parse_webhook_secret("s3cr3t_-X").is_ok());
        assert!(parse_webhook_secret(&"a".repeat(256)).is_ok());
        for bad in ["", "has space", "semi;colon", "ünï", &"a".repeat(257)] {
            assert!(parse_webhook_secret(bad).is_err(), "accepted {bad:?}");
        }
    }
}
