//! Refusals: the one error type a tunnel request can end in, and how it maps onto the HTTP status
//! and Proxy-Status (RFC 9209) the client sees.
use std::io;

use cfr_proto::{ProxyError, ProxyStatus};

/// Name this relay uses in Proxy-Status.
pub const PROXY_NAME: &str = "cfr";

/// A refusal the client sees as an HTTP status plus Proxy-Status (RFC 9209).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelError {
    pub error: ProxyError,
    pub details: &'static str,
    /// Overrides the status `error` maps to (407 for missing credentials).
    pub status: Option<u16>,
}

impl TunnelError {
    pub fn new(error: ProxyError, details: &'static str) -> Self {
        Self {
            error,
            details,
            status: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.error.status())
    }

    /// The Proxy-Status header value. Details never echo client-supplied data.
    pub fn proxy_status(&self) -> String {
        ProxyStatus {
            proxy: PROXY_NAME.to_owned(),
            error: self.error,
            details: Some(self.details.to_owned()),
        }
        .to_header_value()
    }
}

impl std::fmt::Display for TunnelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.status(),
            self.error.token(),
            self.details
        )
    }
}

/// Builds the response for a refused tunnel.
pub fn error_response(err: &TunnelError) -> http::Response<()> {
    let mut b = http::Response::builder()
        .status(err.status())
        .header("proxy-status", err.proxy_status());
    if err.status() == 407 {
        b = b.header(http::header::PROXY_AUTHENTICATE, "Bearer realm=\"cfr\"");
    }
    if err.status() == 405 {
        b = b.header(http::header::ALLOW, "CONNECT");
    }
    b.body(()).expect("static response parts")
}

pub(super) fn connect_error(e: &io::Error) -> TunnelError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            TunnelError::new(ProxyError::ConnectionRefused, "connection refused")
        }
        io::ErrorKind::TimedOut => {
            TunnelError::new(ProxyError::ConnectionTimeout, "connect timed out")
        }
        _ => match e.raw_os_error() {
            // ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL (egress address not routable here)
            Some(101) | Some(113) | Some(99) => TunnelError::new(
                ProxyError::DestinationIpUnroutable,
                "destination unreachable",
            ),
            _ => TunnelError::new(ProxyError::DestinationUnavailable, "connect failed"),
        },
    }
}
