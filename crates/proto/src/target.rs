//! Tunnel targets: the CONNECT authority (RFC 9114 §4.4) and the connect-udp URI template
//! variables (RFC 9298 §2).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// The fixed part of [`DEFAULT_UDP_TEMPLATE`] before the variables.
const UDP_TEMPLATE_PREFIX: &str = "/.well-known/masque/udp/";

/// Longest DNS name in text form without the trailing dot (RFC 1035 §2.3.4: 255 octets on the
/// wire, i.e. 253 characters).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Parses a CONNECT `:authority`: `host:port`, `1.2.3.4:port`, `[v6]:port`.
///
/// RFC 9114 §4.4: the `:authority` of a CONNECT "contains the host and port to connect to"
/// (authority-form, RFC 9110 §7.1: `uri-host ":" port`); userinfo, paths and zone IDs are refused.
pub fn parse_authority(authority: &str) -> Result<Target, TargetError> {
    // Nothing outside the authority-form grammar: no userinfo (RFC 9110 §4.2.4 forbids it in
    // http(s) URIs), no path/query/fragment, no whitespace or control characters.
    if authority
        .bytes()
        .any(|b| matches!(b, b'@' | b'/' | b'?' | b'#' | b'\\') || !b.is_ascii_graphic())
    {
        return Err(TargetError::BadHost);
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']').ok_or(TargetError::BadHost)?;
        let port = after.strip_prefix(':').ok_or(TargetError::BadPort)?;
        let ip = parse_ipv6_literal(literal)?;
        return Ok(Target {
            host: Host::Ip(IpAddr::V6(ip)),
            port: parse_port(port)?,
        });
    }
    let (host, port) = authority.rsplit_once(':').ok_or(TargetError::BadPort)?;
    if host.contains(':') {
        // An IPv6 literal must be bracketed in an authority (RFC 3986 §3.2.2).
        return Err(TargetError::BadHost);
    }
    let host = parse_host(host)?;
    Ok(Target {
        host,
        port: parse_port(port)?,
    })
}

/// Parses a connect-udp `:path` against the default template (query string ignored).
///
/// RFC 9298 §3.1: the proxy "extracts the "target_host" and "target_port" variables [...] [and]
/// decodes their percent-encoding".
pub fn parse_connect_udp_path(path: &str) -> Result<Target, TargetError> {
    let path = path.split_once('?').map_or(path, |(p, _query)| p);
    let vars = path
        .strip_prefix(UDP_TEMPLATE_PREFIX)
        .ok_or(TargetError::BadTemplate)?;
    let mut segments = vars.split('/');
    let host = segments.next().ok_or(TargetError::BadTemplate)?;
    let port = segments.next().ok_or(TargetError::BadTemplate)?;
    // The template ends with '/', so one empty segment may follow; we are lenient about its
    // absence (some clients drop it) but not about further segments.
    match (segments.next(), segments.next()) {
        (None, _) | (Some(""), None) => {}
        _ => return Err(TargetError::BadTemplate),
    }

    decode_template_values(host, port)
}

/// The target named by the raw (still percent-encoded) values of a connect-udp template's
/// `target_host` and `target_port` variables.
pub fn decode_template_values(host: &str, port: &str) -> Result<Target, TargetError> {
    let port = percent_decode(port).map_err(|e| match e {
        TargetError::BadHost => TargetError::BadPort,
        e => e,
    })?;
    // RFC 9298 §3: "both the "target_host" and "target_port" variables MUST NOT be empty" and
    // "target_port" MUST represent an integer between 1 and 65535 inclusive".
    let port = parse_port(&port)?;

    let host = percent_decode(host)?;
    // RFC 9298 §3: "IPv6 scoped addressing zone identifiers are not supported".
    if host.contains('%') {
        return Err(if host.contains(':') {
            TargetError::ZoneId
        } else {
            TargetError::BadHost
        });
    }
    // RFC 9298 §3: IPv6 colons "MUST be percent-encoded"; we accept raw colons and a bracketed
    // literal as well (lenient), since the decoded value is the same address.
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let host = if let Some(literal) = bracketed {
        Host::Ip(IpAddr::V6(parse_ipv6_literal(literal)?))
    } else if host.contains(':') {
        Host::Ip(IpAddr::V6(parse_ipv6_literal(&host)?))
    } else {
        parse_host(&host)?
    };
    Ok(Target { host, port })
}

/// Client side: the `:path` for a connect-udp request to `target` (IPv6 `:` percent-encoded).
pub fn connect_udp_path(target: &Target) -> String {
    let host = match &target.host {
        // LDH names and IPv4 literals contain only unreserved characters.
        Host::Name(name) => name.clone(),
        Host::Ip(IpAddr::V4(ip)) => ip.to_string(),
        // RFC 9298 §3: "if "target_host" contains an IPv6 literal, the colons (":") MUST be
        // percent-encoded".
        Host::Ip(IpAddr::V6(ip)) => ip.to_string().replace(':', "%3A"),
    };
    format!("{UDP_TEMPLATE_PREFIX}{host}/{}/", target.port)
}

/// Client side: the `:authority` for a classic CONNECT to `target` (`[v6]:port` for IPv6).
pub fn authority(target: &Target) -> String {
    match &target.host {
        Host::Name(name) => format!("{name}:{}", target.port),
        Host::Ip(IpAddr::V4(ip)) => format!("{ip}:{}", target.port),
        Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{}", target.port),
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&authority(self))
    }
}

impl Target {
    /// Validates and normalises `host` (IPv4 literal or DNS name; IPv6 without brackets).
    pub fn new(host: &str, port: u16) -> Result<Self, TargetError> {
        if port == 0 {
            return Err(TargetError::BadPort);
        }
        let host = if host.contains(':') {
            Host::Ip(IpAddr::V6(parse_ipv6_literal(host)?))
        } else {
            parse_host(host)?
        };
        Ok(Target { host, port })
    }
}

/// A decimal port in 1..=65535: digits only (no sign, no spaces, no leading zeros, although the
/// RFC 3986 `port = *DIGIT` grammar allows them).
fn parse_port(s: &str) -> Result<u16, TargetError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::BadPort);
    }
    // A leading zero is a second spelling of the same port: two parsers (ours and a proxy or
    // filter in front) could disagree about it, so only the canonical decimal form is accepted.
    if s.starts_with('0') || s.len() > 5 {
        return Err(TargetError::BadPort);
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(TargetError::BadPort),
    }
}

/// An IPv6 literal without brackets; a `%` zone ID is refused (RFC 9298 §3, and RFC 6874 zone
/// IDs have no meaning to a proxy).
fn parse_ipv6_literal(s: &str) -> Result<Ipv6Addr, TargetError> {
    if s.contains('%') {
        return Err(TargetError::ZoneId);
    }
    s.parse::<Ipv6Addr>().map_err(|_| TargetError::BadHost)
}

/// An IPv4 literal or a DNS name (no brackets, no colon).
fn parse_host(host: &str) -> Result<Host, TargetError> {
    if host.is_empty() {
        return Err(TargetError::BadHost);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    // A host whose last label is numeric is an attempt at an IPv4 address (WHATWG URL "ends in a
    // number"); anything other than a strict dotted quad is refused rather than resolved, since
    // resolvers disagree on forms like "127.1", "0x7f.1" or "017.0.0.1".
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .or_else(|| last.strip_prefix("0X"))
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    if numeric {
        return match host.parse::<Ipv4Addr>() {
            Ok(ip) => Ok(Host::Ip(IpAddr::V4(ip))),
            Err(_) => Err(TargetError::BadHost),
        };
    }
    validate_dns_name(name)?;
    Ok(Host::Name(name.to_ascii_lowercase()))
}

/// LDH rule (RFC 1123 §2.1, RFC 5890 §2.3.1): labels of letters, digits and hyphens, 1..=63
/// characters, not starting or ending with a hyphen; at most 253 characters in all.
fn validate_dns_name(name: &str) -> Result<(), TargetError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(TargetError::BadHost);
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(TargetError::BadHost);
        }
    }
    Ok(())
}

/// Decodes `%XX` escapes (RFC 3986 §2.1, either hex case). The result must be ASCII: hosts are
/// LDH names or IP literals, so any other byte is refused as a bad host.
fn percent_decode(s: &str) -> Result<String, TargetError> {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(TargetError::BadPercentEncoding)?;
            let hi = hex_val(hex[0]).ok_or(TargetError::BadPercentEncoding)?;
            let lo = hex_val(hex[1]).ok_or(TargetError::BadPercentEncoding)?;
            let decoded = hi << 4 | lo;
            if !decoded.is_ascii() {
                return Err(TargetError::BadHost);
            }
            out.push(char::from(decoded));
            i += 3;
        } else {
            // RFC 9298 §2: template expansions only contain ASCII 0x21-0x7E.
            if !b.is_ascii_graphic() {
                return Err(TargetError::BadHost);
            }
            out.push(char::from(b));
            i += 1;
        }
    }
    Ok(out)
}

fn hex_val(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str, port: u16) -> Target {
        Target {
            host: Host::Name(n.into()),
            port,
        }
    }

    fn ip(addr: &str, port: u16) -> Target {
        Target {
            host: Host::Ip(addr.parse().unwrap()),
            port,
        }
    }

    #[test]
    fn authority_parses_dns_name_ipv4_and_bracketed_ipv6() {
        assert_eq!(
            parse_authority("example.com:443"),
            Ok(name("example.com", 443))
        );
        assert_eq!(parse_authority("192.0.2.6:80"), Ok(ip("192.0.2.6", 80)));
        assert_eq!(
            parse_authority("[2001:db8::42]:8443"),
            Ok(ip("2001:db8::42", 8443))
        );
        assert_eq!(
            parse_authority("[::ffff:192.0.2.1]:1"),
            Ok(ip("::ffff:192.0.2.1", 1))
        );
    }

    #[test]
    fn authority_lowercases_and_strips_one_trailing_dot() {
        assert_eq!(
            parse_authority("ExAmple.COM.:443"),
            Ok(name("example.com", 443))
        );
        assert_eq!(
            parse_authority("example.com..:443"),
            Err(TargetError::BadHost)
        );
    }

    #[test]
    fn authority_rejects_bad_ports() {
        for a in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+443",
            "example.com:-1",
            "example.com:44a",
            "example.com:0x1bb",
            "example.com:99999999999999999999",
            "[2001:db8::1]",
            "[2001:db8::1]443",
        ] {
            assert_eq!(parse_authority(a), Err(TargetError::BadPort), "{a}");
        }
        assert_eq!(parse_authority("example.com:65535").unwrap().port, 65535);
        assert_eq!(
            parse_authority("example.com:00443"),
            Err(TargetError::BadPort),
            "one port, one spelling"
        );
    }

    #[test]
    fn authority_rejects_bad_hosts() {
        for a in [
            ":443",
            "user@example.com:443",
            "user:pw@example.com:443",
            "example.com/path:443",
            "example.com:443/",
            "exa mple.com:443",
            " example.com:443",
            "example.com:443 ",
            "exa\tmple.com:443",
            "2001:db8::1:443",
            "[2001:db8::1:443",
            "[not-an-ip]:443",
            "[192.0.2.1]:443",
            "-example.com:443",
            "example-.com:443",
            "exa_mple.com:443",
            "ex..ample.com:443",
            ".:443",
            "bücher.de:443",
            "example.com?:443",
        ] {
            assert_eq!(parse_authority(a), Err(TargetError::BadHost), "{a}");
        }
    }

    #[test]
    fn authority_rejects_numeric_names_that_are_not_ipv4() {
        for a in [
            "127.1:80",
            "1234:80",
            "256.0.0.1:80",
            "01.2.3.4:80",
            "0x7f.0.0.1:80",
            "0x7f000001:80",
            "1.2.3.4.5:80",
            "1.2.3.4.:80",
            "example.123:80",
        ] {
            assert_eq!(parse_authority(a), Err(TargetError::BadHost), "{a}");
        }
        // A label that merely starts with digits is a name.
        assert_eq!(parse_authority("1e100.net:443"), Ok(name("1e100.net", 443)));
        assert_eq!(
            parse_authority("123.example:443"),
            Ok(name("123.example", 443))
        );
    }

    #[test]
    fn authority_rejects_ipv6_zone_id() {
        assert_eq!(
            parse_authority("[fe80::1%eth0]:443"),
            Err(TargetError::ZoneId)
        );
        assert_eq!(
            parse_authority("[fe80::1%25eth0]:443"),
            Err(TargetError::ZoneId)
        );
    }

    #[test]
    fn authority_enforces_dns_length_limits() {
        let label63 = "a".repeat(63);
        assert!(parse_authority(&format!("{label63}.com:1")).is_ok());
        assert_eq!(
            parse_authority(&format!("{}a.com:1", label63)),
            Err(TargetError::BadHost)
        );
        // 4 * 63 + 3 dots = 255 > 253.
        let long = [label63.as_str(); 4].join(".");
        assert_eq!(
            parse_authority(&format!("{long}:1")),
            Err(TargetError::BadHost)
        );
        let max = format!("{}.{}", "a".repeat(61), [label63.as_str(); 3].join("."));
        assert_eq!(max.len(), 253);
        assert!(parse_authority(&format!("{max}:1")).is_ok());
        assert!(parse_authority(&format!("{max}.:1")).is_ok());
    }

    #[test]
    fn connect_udp_path_parses_rfc9298_examples() {
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/192.0.2.6/443/"),
            Ok(ip("192.0.2.6", 443))
        );
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/"),
            Ok(ip("2001:db8::42", 443))
        );
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/example.com/443/"),
            Ok(name("example.com", 443))
        );
    }

    #[test]
    fn connect_udp_path_is_lenient_on_ipv6_forms_trailing_slash_and_query() {
        let want = ip("2001:db8::1", 53);
        for p in [
            "/.well-known/masque/udp/2001%3adb8%3a%3a1/53/",
            "/.well-known/masque/udp/2001:db8::1/53/",
            "/.well-known/masque/udp/[2001:db8::1]/53/",
            "/.well-known/masque/udp/%5B2001%3Adb8%3A%3A1%5D/53/",
            "/.well-known/masque/udp/2001%3Adb8%3A%3A1/53",
            "/.well-known/masque/udp/2001%3Adb8%3A%3A1/53/?x=1",
            "/.well-known/masque/udp/2001%3Adb8%3A%3A1/53?x=1",
        ] {
            assert_eq!(parse_connect_udp_path(p), Ok(want.clone()), "{p}");
        }
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/Example.COM./443/"),
            Ok(name("example.com", 443))
        );
    }

    #[test]
    fn connect_udp_path_rejects_zone_ids() {
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/fe80%3A%3A1%25eth0/443/"),
            Err(TargetError::ZoneId)
        );
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/[fe80::1%25eth0]/443/"),
            Err(TargetError::ZoneId)
        );
    }

    #[test]
    fn connect_udp_path_rejects_bad_ports() {
        for p in ["0", "65536", "", "+443", "44 3", "abc", "%2B443"] {
            let path = format!("/.well-known/masque/udp/example.com/{p}/");
            assert_eq!(
                parse_connect_udp_path(&path),
                Err(TargetError::BadPort),
                "{path}"
            );
        }
    }

    #[test]
    fn connect_udp_path_rejects_template_mismatch() {
        for p in [
            "/",
            "",
            "/.well-known/masque/udp/",
            "/.well-known/masque/udp/example.com",
            "/.well-known/masque/udp/example.com/443/extra",
            "/.well-known/masque/udp/example.com/443//",
            "/.well-known/masque/ip/example.com/443/",
            "/.WELL-KNOWN/masque/udp/example.com/443/",
            "/prefix/.well-known/masque/udp/example.com/443/",
        ] {
            assert_eq!(
                parse_connect_udp_path(p),
                Err(TargetError::BadTemplate),
                "{p:?}"
            );
        }
    }

    #[test]
    fn connect_udp_path_rejects_bad_hosts_and_percent_encoding() {
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp//443/"),
            Err(TargetError::BadHost)
        );
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/exa%2Fmple.com/443/"),
            Err(TargetError::BadHost)
        );
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/127.1/443/"),
            Err(TargetError::BadHost)
        );
        assert_eq!(
            parse_connect_udp_path("/.well-known/masque/udp/b%C3%BCcher.de/443/"),
            Err(TargetError::BadHost)
        );
        for bad in ["%", "%3", "%zz", "a%g1"] {
            let path = format!("/.well-known/masque/udp/{bad}/443/");
            assert_eq!(
                parse_connect_udp_path(&path),
                Err(TargetError::BadPercentEncoding),
                "{path}"
            );
        }
    }

    #[test]
    fn connect_udp_path_and_authority_round_trip() {
        for t in [
            name("example.com", 443),
            name("a-b.c0", 1),
            ip("192.0.2.6", 65535),
            ip("2001:db8::42", 443),
            ip("::", 9),
            ip("::ffff:192.0.2.1", 53),
        ] {
            let path = connect_udp_path(&t);
            assert_eq!(parse_connect_udp_path(&path), Ok(t.clone()), "{path}");
            let auth = authority(&t);
            assert_eq!(parse_authority(&auth), Ok(t.clone()), "{auth}");
            assert_eq!(t.to_string(), auth);
        }
        assert_eq!(
            connect_udp_path(&ip("2001:db8::42", 443)),
            "/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/"
        );
        assert_eq!(authority(&ip("2001:db8::42", 443)), "[2001:db8::42]:443");
    }

    #[test]
    fn target_new_validates_host_and_port() {
        assert_eq!(
            Target::new("Example.com", 443),
            Ok(name("example.com", 443))
        );
        assert_eq!(Target::new("2001:db8::1", 443), Ok(ip("2001:db8::1", 443)));
        assert_eq!(Target::new("example.com", 0), Err(TargetError::BadPort));
        assert_eq!(Target::new("fe80::1%eth0", 1), Err(TargetError::ZoneId));
    }
}
