//! The `rolecache` binary and the examples as an operator or a bot author runs them: the
//! command line and its configuration, `watch` and `migrate`, the private cluster in a home
//! directory, the programs in `examples/`.

mod config_cli;
mod embedded_home;
mod examples;
mod watch_cli;
