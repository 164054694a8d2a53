//! The HTTP server (`/metrics`, `/healthz`, `/readyz`) and the operations kit that reads it.

mod endpoints;
mod ops_kit;

pub use endpoints::http_get;
