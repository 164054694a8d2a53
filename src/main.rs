//! The `rolecache` binary: parses the command line and calls into the library.

use std::process::ExitCode;

use rolecache::config::{self, Command, DatabaseError, EXIT_CONFIG};
use rolecache::instance::{self, InstanceOptions};
use rolecache::{bench, telemetry, watch};

fn main() -> ExitCode {
    let cli = config::parse_or_exit();
    telemetry::init(cli.log_format);
    let allow_embedded = matches!(cli.command, Command::Watch);
    let database = match cli.database(allow_embedded) {
        Ok(database) => database,
        Err(e @ DatabaseError::InvalidUrl(_)) => {
            eprintln!("rolecache: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
        Err(e) => {
            eprintln!("rolecache: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pg = database.config.clone();
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
    // Stops the private cluster, if one was started, after everything using it has finished.
    drop(runtime);
    drop(database);
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
