//! The Proxy-Status response header (RFC 9209).
//!
//! The header is a Structured Field List (RFC 8941 §3.1); each member names an intermediary
//! (sf-string or sf-token) and carries parameters, of which cfr uses `error` (a token from the
//! RFC 9209 §2.3 registry) and `details` (an sf-string).

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
    /// Every variant, for iteration in tests and metrics labels.
    pub const ALL: [ProxyError; 15] = [
        ProxyError::DnsTimeout,
        ProxyError::DnsError,
        ProxyError::DestinationNotFound,
        ProxyError::DestinationUnavailable,
        ProxyError::DestinationIpProhibited,
        ProxyError::DestinationIpUnroutable,
        ProxyError::ConnectionRefused,
        ProxyError::ConnectionTerminated,
        ProxyError::ConnectionTimeout,
        ProxyError::ConnectionReadTimeout,
        ProxyError::ConnectionLimitReached,
        ProxyError::HttpRequestError,
        ProxyError::HttpRequestDenied,
        ProxyError::ProxyInternalError,
        ProxyError::ProxyConfigurationError,
    ];

    /// The registered token, e.g. `dns_error`.
    pub fn token(self) -> &'static str {
        // RFC 9209 §2.3.1 - §2.3.18 (names as registered).
        match self {
            ProxyError::DnsTimeout => "dns_timeout",
            ProxyError::DnsError => "dns_error",
            ProxyError::DestinationNotFound => "destination_not_found",
            ProxyError::DestinationUnavailable => "destination_unavailable",
            ProxyError::DestinationIpProhibited => "destination_ip_prohibited",
            ProxyError::DestinationIpUnroutable => "destination_ip_unroutable",
            ProxyError::ConnectionRefused => "connection_refused",
            ProxyError::ConnectionTerminated => "connection_terminated",
            ProxyError::ConnectionTimeout => "connection_timeout",
            ProxyError::ConnectionReadTimeout => "connection_read_timeout",
            ProxyError::ConnectionLimitReached => "connection_limit_reached",
            ProxyError::HttpRequestError => "http_request_error",
            ProxyError::HttpRequestDenied => "http_request_denied",
            ProxyError::ProxyInternalError => "proxy_internal_error",
            ProxyError::ProxyConfigurationError => "proxy_configuration_error",
        }
    }

    /// Parses a token back (client side); unknown tokens give `None`.
    pub fn from_token(token: &str) -> Option<Self> {
        ProxyError::ALL.into_iter().find(|e| e.token() == token)
    }

    /// The HTTP status cfr answers with for this error (the table in docs/spec-notes.md).
    pub fn status(self) -> u16 {
        // Recommended status codes from the RFC 9209 §2.3 entries.
        match self {
            ProxyError::DnsTimeout => 504,
            ProxyError::DnsError => 502,
            ProxyError::DestinationNotFound => 502,
            ProxyError::DestinationUnavailable => 503,
            ProxyError::DestinationIpProhibited => 403,
            ProxyError::DestinationIpUnroutable => 502,
            ProxyError::ConnectionRefused => 502,
            ProxyError::ConnectionTerminated => 502,
            ProxyError::ConnectionTimeout => 504,
            ProxyError::ConnectionReadTimeout => 504,
            ProxyError::ConnectionLimitReached => 503,
            ProxyError::HttpRequestError => 400,
            // The relay answers 407 itself when proxy authentication is what failed.
            ProxyError::HttpRequestDenied => 403,
            ProxyError::ProxyInternalError => 500,
            ProxyError::ProxyConfigurationError => 500,
        }
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.token())
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
    /// A member without details.
    pub fn new(proxy: impl Into<String>, error: ProxyError) -> Self {
        ProxyStatus {
            proxy: proxy.into(),
            error,
            details: None,
        }
    }

    /// Adds `details` (RFC 9209 §2.1.5; must not echo client-identifying data).
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The header value (Structured Field list member; `details` escaped as an sf-string,
    /// non-printable characters dropped).
    pub fn to_header_value(&self) -> String {
        let mut out = String::with_capacity(64);
        // RFC 9209 §2: each member "MUST be either a String or a Token" naming the intermediary.
        if is_sf_token(&self.proxy) {
            out.push_str(&self.proxy);
        } else {
            push_sf_string(&self.proxy, &mut out);
        }
        // RFC 9209 §2.1.1: "The value of the error parameter is a Token".
        out.push_str("; error=");
        out.push_str(self.error.token());
        if let Some(details) = &self.details {
            // RFC 9209 §2.1.5: "The value of the details parameter is a String".
            out.push_str("; details=");
            push_sf_string(details, &mut out);
        }
        out
    }

    /// Parses the first member of a header value (client side). `None` if it has no known `error`.
    pub fn parse(value: &str) -> Option<Self> {
        let mut p = Parser {
            s: value.as_bytes(),
            i: 0,
        };
        p.skip_ows();
        let proxy = p.bare_item()?;
        let mut error = None;
        let mut details = None;
        loop {
            p.skip_ows();
            if !p.eat(b';') {
                // End of the first member (',' or end of input, or junk we do not interpret).
                break;
            }
            p.skip_ows();
            let key = p.key();
            let val = if p.eat(b'=') { p.bare_item() } else { None };
            // RFC 8941 §4.2.3.2: with duplicate keys the last one wins.
            if key.eq_ignore_ascii_case("error") {
                error = val.as_deref().map(ProxyError::from_token);
            } else if key.eq_ignore_ascii_case("details") {
                details = val;
            }
            // RFC 9209 §2.1: other parameters (next-hop, received-status, ...) are ignored.
        }
        Some(ProxyStatus {
            proxy,
            error: error??,
            details,
        })
    }
}

impl std::fmt::Display for ProxyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_header_value())
    }
}

/// RFC 8941 §3.3.4: `sf-token = ( ALPHA / "*" ) *( tchar / ":" / "/" )`.
fn is_sf_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'*')
        && bytes.all(is_token_char)
}

fn is_token_char(b: u8) -> bool {
    // tchar (RFC 9110 §5.6.2) plus ":" and "/".
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b)
}

/// RFC 8941 §4.1.6: an sf-string holds only printable ASCII (0x20-0x7E), with `"` and `\`
/// escaped; everything else is dropped rather than failing serialisation.
fn push_sf_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
}

/// A tolerant reader for the first list member of a Structured Field.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// A parameter key; tolerant of case and of characters RFC 8941 would refuse.
    fn key(&mut self) -> String {
        let start = self.i;
        while matches!(self.peek(), Some(b) if !matches!(b, b'=' | b';' | b',' | b' ' | b'\t')) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    /// An sf-string (escapes undone) or any run of other characters up to a delimiter
    /// (tokens, integers, booleans...). `None` if it is empty.
    fn bare_item(&mut self) -> Option<String> {
        if self.eat(b'"') {
            let mut out = Vec::new();
            loop {
                match self.peek() {
                    // Tolerate a missing closing quote at the end of the value.
                    None => break,
                    Some(b'"') => {
                        self.i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        if let Some(b) = self.peek() {
                            out.push(b);
                            self.i += 1;
                        }
                    }
                    Some(b) => {
                        out.push(b);
                        self.i += 1;
                    }
                }
            }
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        let start = self.i;
        while matches!(self.peek(), Some(b) if !matches!(b, b';' | b',' | b' ' | b'\t')) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_error_tokens_round_trip() {
        for e in ProxyError::ALL {
            assert_eq!(ProxyError::from_token(e.token()), Some(e), "{e}");
        }
        assert_eq!(ProxyError::from_token("no_such_error"), None);
        assert_eq!(ProxyError::from_token("DNS_ERROR"), None);
    }

    #[test]
    fn proxy_error_status_matches_spec_notes_table() {
        let table = [
            ("dns_error", 502),
            ("dns_timeout", 504),
            ("destination_ip_prohibited", 403),
            ("destination_ip_unroutable", 502),
            ("destination_not_found", 502),
            ("destination_unavailable", 503),
            ("connection_refused", 502),
            ("connection_terminated", 502),
            ("connection_timeout", 504),
            ("connection_read_timeout", 504),
            ("connection_limit_reached", 503),
            ("http_request_error", 400),
            ("http_request_denied", 403),
            ("proxy_internal_error", 500),
            ("proxy_configuration_error", 500),
        ];
        assert_eq!(table.len(), ProxyError::ALL.len());
        for (token, status) in table {
            let e = ProxyError::from_token(token).unwrap_or_else(|| panic!("unknown {token}"));
            assert_eq!(e.status(), status, "{token}");
        }
    }

    #[test]
    fn proxy_status_header_value_has_expected_form() {
        let ps = ProxyStatus::new("cfr", ProxyError::DnsError).with_details("no such host");
        assert_eq!(
            ps.to_header_value(),
            r#"cfr; error=dns_error; details="no such host""#
        );
        assert_eq!(
            ProxyStatus::new("cfr", ProxyError::ConnectionRefused).to_header_value(),
            "cfr; error=connection_refused"
        );
    }

    #[test]
    fn proxy_status_escapes_details_and_drops_unprintable() {
        let ps = ProxyStatus::new("cfr", ProxyError::ProxyInternalError)
            .with_details("a \"quoted\" \\ back\r\nslash é\u{7f}\0end");
        assert_eq!(
            ps.to_header_value(),
            r#"cfr; error=proxy_internal_error; details="a \"quoted\" \\ backslash end""#
        );
    }

    #[test]
    fn proxy_status_proxy_name_is_token_or_string() {
        let tok = ProxyStatus::new("relay.example:443/x", ProxyError::DnsError);
        assert!(tok.to_header_value().starts_with("relay.example:443/x;"));
        for name in ["my proxy", "1cfr", "", "ünï", "a\"b"] {
            let v = ProxyStatus::new(name, ProxyError::DnsError).to_header_value();
            assert!(v.starts_with('"'), "{name:?} must be an sf-string: {v}");
        }
        assert_eq!(
            ProxyStatus::new("my \"proxy\"", ProxyError::DnsError).to_header_value(),
            r#""my \"proxy\""; error=dns_error"#
        );
    }

    #[test]
    fn proxy_status_round_trips() {
        for ps in [
            ProxyStatus::new("cfr", ProxyError::DnsError).with_details("no such host"),
            ProxyStatus::new("cfr", ProxyError::ConnectionTimeout),
            ProxyStatus::new("my proxy", ProxyError::HttpRequestDenied)
                .with_details(r#"say "hi" \o/"#),
            ProxyStatus::new("", ProxyError::DnsTimeout).with_details(""),
        ] {
            let v = ps.to_header_value();
            assert_eq!(ProxyStatus::parse(&v), Some(ps.clone()), "{v}");
        }
    }

    #[test]
    fn proxy_status_parse_is_tolerant_of_spacing_and_takes_first_member() {
        let want = ProxyStatus::new("cfr", ProxyError::DnsError).with_details("a, b; c");
        for v in [
            r#"cfr;error=dns_error;details="a, b; c""#,
            r#"  cfr ;  error=dns_error ;	details="a, b; c"  "#,
            r#"cfr; details="a, b; c"; error=dns_error, other; error=dns_timeout"#,
            r#"cfr; next-hop=origin.example; error=dns_error; details="a, b; c"; rcode=NXDOMAIN"#,
        ] {
            assert_eq!(ProxyStatus::parse(v), Some(want.clone()), "{v}");
        }
        assert_eq!(
            ProxyStatus::parse(r#""quoted \"name\""; error=connection_refused"#),
            Some(ProxyStatus::new(
                r#"quoted "name""#,
                ProxyError::ConnectionRefused
            ))
        );
    }

    #[test]
    fn proxy_status_parse_without_known_error_is_none() {
        for v in [
            "",
            "cfr",
            "cfr; details=\"x\"",
            "cfr; error=unknown_thing",
            "cfr; error",
            "; error=dns_error",
            "cfr, other; error=dns_error",
        ] {
            assert_eq!(ProxyStatus::parse(v), None, "{v:?}");
        }
    }
}
