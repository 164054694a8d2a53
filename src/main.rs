//! The `rolecache` binary: parses the command line and calls into the library.

use std::process::ExitCode;

use rolecache::config::{self, Command, EXIT_CONFIG};
use rolecache::instance::{self, InstanceOptions};
use rolecache::{bench, db, telemetry, watch};

fn main() -> ExitCode {
    let cli = config::parse_or_exit();
    telemetry::init(cli.log_format);
    let pg = match db::parse_url(&cli.database_url) {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("rolecache: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rolecache: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = InstanceOptions::from(&cli.cache);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Migrate => {
                let applied = instance::migrate(&pg).await?;
                tracing::info!(?applied, "database is up to date");
                Ok(())
            }
            Command::Watch => watch::run(&pg, &options, cli.http_addr, shutdown_signal()).await,
            Command::Bench(args) => bench::run(&pg, &args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rolecache: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
