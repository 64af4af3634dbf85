//! cfr client: MASQUE tunnels through a cfr relay over one HTTP/3 connection.
//!
//! - [`RelayClient::connect_tcp`]: classic CONNECT (RFC 9114 §4.4) → [`TcpTunnel`] (`AsyncRead + AsyncWrite`).
//! - [`RelayClient::connect_udp`]: CONNECT-UDP (RFC 9298) → [`UdpTunnel`], carried in QUIC DATAGRAM
//!   frames (RFC 9297 §2) when the relay negotiated them, else in DATAGRAM capsules (RFC 9297 §3.5).
//! - [`front`]: the same tunnels over the relay's TLS/TCP front-end (HTTP/2, HTTP/1.1), for
//!   networks that block UDP; [`select::RelaySet`] falls back to it by itself.
//! - [`local`]: SOCKS5 and HTTP CONNECT listeners on top of a client; [`select`]: several relays.
//! - [`socks5`]: a sans-IO SOCKS5 codec.
#![forbid(unsafe_code)]

/// `AsyncRead` + `AsyncWrite` for a type by forwarding every call to one of its fields.
macro_rules! forward_async_io {
    ($ty:ty => $field:ident) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_read(cx, buf)
            }
        }

        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
            }
        }
    };
}

mod client;
mod config;
pub mod discover;
pub mod front;
pub mod local;
pub mod select;
/// The SOCKS5 codec lives in the sans-IO protocol crate (fuzzed there); re-exported here.
pub use cfr_proto::socks5;
mod tcp;
mod udp;

pub use client::{H3Stream, RawTunnel, RelayClient, TunnelOpener};
pub use config::{ClientConfig, DatagramMode, RelayUrl, TransportMode, Trust};
pub use front::{FrontClient, FrontVersion};
pub use tcp::TcpTunnel;
pub use udp::UdpTunnel;

use cfr_proto::ProxyStatus;

/// Why a tunnel or connection could not be set up, or stopped working.
#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    /// The relay answered the CONNECT with a non-2xx status.
    #[error("relay refused the tunnel with {status}{}", proxy_status.as_ref().map(|p| format!(" ({})", p.error.token())).unwrap_or_default())]
    Refused {
        status: http::StatusCode,
        proxy_status: Option<ProxyStatus>,
    },
    /// QUIC connection could not be established, or was lost.
    #[error("QUIC connection: {0}")]
    Connect(String),
    /// TLS configuration or certificate verification failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// HTTP/3 layer error (stream or connection).
    #[error("HTTP/3: {0}")]
    H3(String),
    /// HTTP/2 or HTTP/1.1 layer error on the relay's TLS/TCP front-end.
    #[error("HTTP over TLS/TCP: {0}")]
    Http(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The tunnel or client is closed.
    #[error("closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("invalid relay URL: {0}")]
    InvalidUrl(String),
    /// The relay lacks a feature the request needs (e.g. extended CONNECT, RFC 9220 §3).
    #[error("not supported by the relay: {0}")]
    NotSupported(String),
    /// The relay violated the protocol (e.g. a malformed capsule, RFC 9297 §3.3).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Relay discovery failed: the PvD could not be fetched or was rejected (the message names
    /// the problem).
    #[error("relay discovery: {0}")]
    Discovery(String),
    /// No relay of a [`select::RelaySet`] is usable.
    #[error("no relay available: {0}")]
    NoRelay(String),
}

impl ClientError {
    /// The relay's HTTP status, for [`ClientError::Refused`].
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The relay's Proxy-Status error, for [`ClientError::Refused`].
    pub fn proxy_error(&self) -> Option<cfr_proto::ProxyError> {
        match self {
            ClientError::Refused { proxy_status, .. } => proxy_status.as_ref().map(|p| p.error),
            _ => None,
        }
    }

    /// True for failures of the relay connection itself (worth trying another relay), as opposed
    /// to the relay's answer about this tunnel.
    pub fn is_relay_failure(&self) -> bool {
        matches!(
            self,
            ClientError::Connect(_)
                | ClientError::Tls(_)
                | ClientError::H3(_)
                | ClientError::Http(_)
                | ClientError::Io(_)
                | ClientError::Timeout
                | ClientError::NotSupported(_)
                | ClientError::Closed
        )
    }
}
