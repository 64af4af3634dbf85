//! The cfr relay: MASQUE tunnels (RFC 9114 §4.4 CONNECT, RFC 9298 CONNECT-UDP) over HTTP/3, with
//! an HTTP/2 and HTTP/1.1 fallback over TLS/TCP, each tunnel leaving from its own egress address,
//! behind authentication, a destination policy and limits.
#![forbid(unsafe_code)]

mod admission;
pub mod auth;
pub mod config;
mod front;
mod h3_transport;
mod http1;
mod http2;
pub mod http3;
pub mod metrics;
pub mod policy;
pub mod pvd;
mod quic_front;
pub mod quic_lb;
pub mod resolve;
pub mod server;
pub mod tcp_front;
pub mod tls;
pub mod tunnel;

pub use config::RelayConfig;
pub use resolve::{HostsThenSystem, Resolver};
pub use server::{Relay, RelayHandle, StartError};
