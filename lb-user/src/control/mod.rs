//! The control plane: the admin API the daemon serves and the client the CLI uses.
pub mod admin;
pub mod announce;
pub mod client;
pub mod guard;
pub mod metrics;
pub mod reload;
pub mod state;
