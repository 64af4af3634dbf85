//! The Proxy-Status response header (RFC 9209).

/// Proxy error types from the RFC 9209 §2.3 registry that cfr generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyError {
    DnsTimeout,
    DnsError,
    DestinationNotFound,
    DestinationUnavailable,
    DestinationIpProhibited,
    DestinationIpUnroutable,
    ConnectionRefused,
    ConnectionTerminated,
    ConnectionTimeout,
    ConnectionReadTimeout,
    ConnectionLimitReached,
    HttpRequestError,
    HttpRequestDenied,
    ProxyInternalError,
    ProxyConfigurationError,
}

impl ProxyError {
    /// The registered token, e.g. `dns_error`.
    pub fn token(self) -> &'static str {
        todo!()
    }
    /// Parses a token back (client side); unknown tokens give `None`.
    pub fn from_token(token: &str) -> Option<Self> {
        let _ = token;
        todo!()
    }
    /// The HTTP status cfr answers with for this error (see ../shared/SPEC-NOTES.md table).
    pub fn status(self) -> u16 {
        todo!()
    }
}

/// One Proxy-Status member: `<proxy>; error=<token>; details="..."`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    pub proxy: String,
    pub error: ProxyError,
    pub details: Option<String>,
}

impl ProxyStatus {
    /// The header value (Structured Field list member; `details` escaped as an sf-string,
    /// non-printable characters dropped).
    pub fn to_header_value(&self) -> String {
        todo!()
    }
    /// Parses the first member of a header value (client side). `None` if it has no known `error`.
    pub fn parse(value: &str) -> Option<Self> {
        let _ = value;
        todo!()
    }
}
