//! Tunnel targets: the CONNECT authority (RFC 9114 §4.4) and the connect-udp URI template
//! variables (RFC 9298 §2).
use std::net::IpAddr;

/// A destination host as the client named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-cased, without trailing dot.
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

/// Host and port of a tunnel destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

/// Why a target was rejected (always a 400 to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("missing or malformed port")]
    BadPort,
    #[error("malformed host")]
    BadHost,
    #[error("IPv6 zone identifiers are not allowed")]
    ZoneId,
    #[error("path does not match the connect-udp URI template")]
    BadTemplate,
    #[error("malformed percent-encoding")]
    BadPercentEncoding,
}

/// Default connect-udp URI template path (RFC 9298 §3).
pub const DEFAULT_UDP_TEMPLATE: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";

/// Parses a CONNECT `:authority`: `host:port`, `1.2.3.4:port`, `[v6]:port`.
pub fn parse_authority(authority: &str) -> Result<Target, TargetError> {
    let _ = authority;
    todo!()
}

/// Parses a connect-udp `:path` against the default template (query string ignored).
pub fn parse_connect_udp_path(path: &str) -> Result<Target, TargetError> {
    let _ = path;
    todo!()
}

/// Client side: the `:path` for a connect-udp request to `target` (IPv6 `:` percent-encoded).
pub fn connect_udp_path(target: &Target) -> String {
    let _ = target;
    todo!()
}

/// Client side: the `:authority` for a classic CONNECT to `target` (`[v6]:port` for IPv6).
pub fn authority(target: &Target) -> String {
    let _ = target;
    todo!()
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&authority(self))
    }
}
