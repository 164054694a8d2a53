//! The `rolecache` binary: parses the command line and calls into the library.

use std::process::ExitCode;

use rolecache::config::{self, Command, DatabaseError, RunConfig, WebhookConfig, EXIT_CONFIG};
use rolecache::instance::{self, InstanceOptions};
use rolecache::{bot, telemetry, watch};

/// A subcommand with the settings it needs.
enum Job {
    Run(RunConfig),
    Migrate,
    Watch,
    Healthcheck(String, std::time::Duration),
    SetWebhook(String, WebhookConfig),
    DeleteWebhook(String, bool),
}

fn main() -> ExitCode {
    let cli = config::parse_or_exit();
    telemetry::init(cli.log_format);
    // Settings that only `run` needs are checked before anything starts.
    let job = match cli.subcommand() {
        Command::Run => cli.telegram.run_config().map(Job::Run),
        Command::Migrate => Ok(Job::Migrate),
        Command::Watch => Ok(Job::Watch),
        Command::Healthcheck { url, timeout } => {
            let url = url.unwrap_or_else(|| rolecache::http::health::default_url(cli.http_addr));
            Ok(Job::Healthcheck(url, timeout))
        }
        Command::SetWebhook => cli.telegram.token().and_then(|token| {
            let hook = cli.telegram.webhook_config()?;
            Ok(Job::SetWebhook(token, hook))
        }),
        Command::DeleteWebhook {
            drop_pending_updates,
        } => cli
            .telegram
            .token()
            .map(|token| Job::DeleteWebhook(token, drop_pending_updates)),
    };
    let job = match job {
        Ok(job) => job,
        Err(line) => {
            eprintln!("rolecache: {line}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if let Job::Healthcheck(url, timeout) = &job {
        return match rolecache::http::health::probe(url, *timeout) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(line) => {
                eprintln!("rolecache: not healthy: {line}");
                ExitCode::FAILURE
            }
        };
    }
    // The webhook commands only talk to Telegram.
    if let Job::SetWebhook(..) | Job::DeleteWebhook(..) = job {
        return finish(telegram_only(job, cli.telegram.api_url.as_deref()));
    }
    let allow_embedded = matches!(job, Job::Watch | Job::Run(_));
    let database = match cli.database(allow_embedded) {
        Ok(database) => database,
        Err(e @ (DatabaseError::InvalidUrl(_) | DatabaseError::Setting(_))) => {
            eprintln!("rolecache: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
        Err(e) => {
            eprintln!("rolecache: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pg = database.endpoints.clone();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rolecache: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = InstanceOptions::from(&cli.cache);
    let result = runtime.block_on(async {
        match job {
            Job::Run(run) => bot::run(&pg, &options, &run, cli.http_addr, shutdown_signal()).await,
            Job::Migrate => {
                let applied = instance::migrate(&pg.direct).await?;
                tracing::info!(?applied, "database is up to date");
                Ok(())
            }
            Job::Watch => watch::run(&pg, &options, cli.http_addr, shutdown_signal()).await,
            Job::SetWebhook(..) | Job::DeleteWebhook(..) | Job::Healthcheck(..) => Ok(()),
        }
    });
    // Stops the private cluster, if one was started, after everything using it has finished.
    drop(runtime);
    drop(database);
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rolecache: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `set-webhook` and `delete-webhook`: one request to Telegram each.
fn telegram_only(job: Job, api_url: Option<&str>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match job {
            Job::SetWebhook(token, hook) => {
                bot::webhook::set(&bot::build_bot(&token, api_url)?, &hook).await
            }
            Job::DeleteWebhook(token, drop_pending) => {
                bot::webhook::delete(&bot::build_bot(&token, api_url)?, drop_pending).await
            }
            _ => Ok(()),
        }
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
