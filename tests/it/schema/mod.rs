//! The SQL side: the schema's contract (constraints, versions, which statements notify and with
//! what, migrations) and the threat model of SECURITY.md.

mod contract;
pub(crate) mod security;
