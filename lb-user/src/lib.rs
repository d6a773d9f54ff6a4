//! lb: an L4 (XDP) and L7 (HTTP/TLS) load balancer in one daemon.
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod health;
pub mod l4;
pub mod l7;
pub mod maglev;
pub mod tls;
pub mod top;
pub mod upgrade;
pub mod upstream;
