//! A private PostgreSQL cluster.
