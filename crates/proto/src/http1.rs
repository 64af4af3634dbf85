//! HTTP/1.1 heads, parsed with httparse.
//!
//! Response heads (client side): the head a relay sends to `CONNECT` or to the connect-udp Upgrade
//! (RFC 9112 §4, RFC 9298 §3.3): *incomplete* until the empty line that ends the head, *malformed*
//! if it can never become a valid head.
//!
//! Request heads (the relay's TLS/TCP front-end), parsed strictly. A relay often sits behind
//! another proxy or load balancer. Every place where two HTTP/1.1 parsers could disagree about
//! where a request ends or where it goes is a request-smuggling or SSRF differential, so anything
//! ambiguous is refused with 400 instead of being interpreted: bare LF or bare CR line endings,
//! content on a CONNECT, absolute-form targets, a Host that is missing, repeated or different from
//! the CONNECT authority, ports with leading zeros, and an `Upgrade` without
//! `Connection: upgrade`. Tokenising is httparse's; this module adds the line-ending scan that
//! finds where the head ends and the semantic checks above. Bytes after the head are never looked
//! at: behind a CONNECT they are already tunnel bytes.
use crate::target::{self, Target};
use crate::DecodeError;

/// Largest response head accepted: a relay's answer is a status line and a few header fields.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 64;

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Field names as sent (HTTP field names are case-insensitive) and raw values.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Parses the response head at the start of `buf`; on success returns it and its length (the
/// tunnel's bytes start right after).
pub fn parse_response_head(buf: &[u8]) -> Result<(ResponseHead, usize), DecodeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let status = resp.code.ok_or(DecodeError::Malformed("no status code"))?;
            let headers = resp
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect();
            Ok((ResponseHead { status, headers }, len))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => {
            Err(DecodeError::Malformed("response head too long"))
        }
        Ok(httparse::Status::Partial) => Err(DecodeError::Incomplete),
        Err(httparse::Error::TooManyHeaders) => {
            Err(DecodeError::Malformed("too many header fields"))
        }
        Err(_) => Err(DecodeError::Malformed("malformed response head")),
    }
}

/// Fuzz property: never panics; a complete head consumes at most the input, parses the same
/// from exactly its own bytes, and every strict prefix of it is incomplete.
pub fn fuzz_response_head(data: &[u8]) {
    if let Ok((head, len)) = parse_response_head(data) {
        assert!(len <= data.len(), "consumed more than given");
        assert_eq!(
            parse_response_head(&data[..len]),
            Ok((head, len)),
            "the head alone parses the same"
        );
        for cut in [0, len / 2, len - 1] {
            if cut < len {
                assert_eq!(
                    parse_response_head(&data[..cut]),
                    Err(DecodeError::Incomplete),
                    "a strict prefix of a complete head is incomplete"
                );
            }
        }
    }
}

#[cfg(test)]
mod response_tests {
    use super::*;

    #[test]
    fn head_is_incomplete_until_the_empty_line_then_complete() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n";
        for cut in 0..head.len() {
            assert_eq!(
                parse_response_head(&head[..cut]),
                Err(DecodeError::Incomplete)
            );
        }
        let mut with_tunnel = head.to_vec();
        with_tunnel.extend_from_slice(&[0x00, 0x01, 0x00]);
        let (parsed, len) = parse_response_head(&with_tunnel).unwrap();
        assert_eq!(
            len,
            head.len(),
            "the tunnel's bytes are not part of the head"
        );
        assert_eq!(parsed.status, 101);
        assert_eq!(
            parsed.headers[1],
            ("Capsule-Protocol".into(), b"?1".to_vec())
        );
    }

    #[test]
    fn garbage_and_endless_heads_are_malformed() {
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(DecodeError::Malformed(_))
        ));
        let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
        while endless.len() < MAX_HEAD_LEN {
            endless.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(
            parse_response_head(&endless),
            Err(DecodeError::Malformed(_))
        ));
    }
}

// ---- request heads (the relay side) ----

/// The upgrade token of connect-udp (RFC 9298 §3.3).
pub const CONNECT_UDP_TOKEN: &str = "connect-udp";

/// One validated request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method token as sent (case-sensitive, RFC 9110 §9.1).
    pub method: String,
    /// The request-target as sent.
    pub target: String,
    /// What the request asks the relay for.
    pub kind: RequestKind,
    /// Header fields in order, names lower-cased, values as sent (without surrounding whitespace).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head including its final empty line; what follows belongs to the tunnel.
    pub len: usize,
}

/// What a request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `CONNECT host:port` (RFC 9110 §9.3.6), the target already parsed.
    Connect(Target),
    /// `GET` with `Upgrade: connect-udp` (RFC 9298 §3.3): `target` is the origin-form path.
    ConnectUdp,
    /// Anything else; the relay refuses it (405) but the head itself is well-formed.
    Other,
}

/// Why no request head could be taken from the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head has not ended yet and is still within the size limit: read more.
    #[error("incomplete request head")]
    Incomplete,
    /// The head section is larger than the limit, or has too many fields (431).
    #[error("request header section too large")]
    TooLarge,
    /// The head can never be accepted (400); the connection must be closed after answering,
    /// since where the next request would start is unknown.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// Takes one request head from the start of `buf`, refusing heads longer than `max_len` bytes.
pub fn parse_request_head(buf: &[u8], max_len: usize) -> Result<RequestHead, HeadError> {
    let len = head_len(buf, max_len)?;
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(&buf[..len]) {
        Ok(httparse::Status::Complete(n)) if n == len => {}
        Ok(_) => return Err(HeadError::Malformed("unparseable request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("unparseable request head")),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    //= https://www.rfc-editor.org/rfc/rfc9112#section-2.3
    //# A server can send a 505 (HTTP Version Not Supported) response if it wishes, for any
    //# reason, to refuse service of the client's major protocol version.
    // httparse only accepts HTTP/1.0 and HTTP/1.1; both are fine for a CONNECT.
    let http11 = req.version == Some(1);
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };

    //= https://www.rfc-editor.org/rfc/rfc9112#section-3.2
    //# A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1 request
    //# message that lacks a Host header field and to any request message that contains more
    //# than one Host header field line or a Host header field with an invalid field value.
    let host = match (values("host").count(), http11) {
        (0, true) => return Err(HeadError::Malformed("missing Host")),
        (0, false) => None,
        (1, _) => Some(
            std::str::from_utf8(values("host").next().unwrap_or_default())
                .map_err(|_| HeadError::Malformed("invalid Host"))?,
        ),
        _ => return Err(HeadError::Malformed("repeated Host")),
    };

    //= https://www.rfc-editor.org/rfc/rfc9110#section-9.3.6
    //# A CONNECT request message does not have content.
    // Nor does any other request the relay serves (an upgrade GET); a body would be read as
    // tunnel bytes by the relay and as a body by a proxy in front of it.
    if values("transfer-encoding").next().is_some() {
        return Err(HeadError::Malformed("request with Transfer-Encoding"));
    }
    if values("content-length").any(|v| v != b"0") {
        return Err(HeadError::Malformed("request with content"));
    }

    let kind = if method == "CONNECT" {
        //= https://www.rfc-editor.org/rfc/rfc9112#section-3.2.3
        //# The "authority-form" of request-target is only used for CONNECT requests
        if target.contains("://") || target.starts_with('/') {
            return Err(HeadError::Malformed(
                "CONNECT target is not in authority-form",
            ));
        }
        let parsed = target::parse_authority(&target)
            .map_err(|_| HeadError::Malformed("malformed CONNECT authority"))?;
        //= https://www.rfc-editor.org/rfc/rfc9112#section-3.2
        //# If the target URI includes an authority component, then a client MUST send a field
        //# value for Host that is identical to that authority component
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(&target)) {
            return Err(HeadError::Malformed(
                "Host differs from the CONNECT authority",
            ));
        }
        RequestKind::Connect(parsed)
    } else if values("upgrade").any(|v| lists_token(v, CONNECT_UDP_TOKEN)) {
        //= https://www.rfc-editor.org/rfc/rfc9110#section-7.8
        //# A sender of Upgrade MUST also send an "Upgrade" connection option in the Connection
        //# header field (Section 7.6.1) to inform intermediaries not to forward this field.
        if !values("connection").any(|v| lists_token(v, "upgrade")) {
            return Err(HeadError::Malformed("Upgrade without Connection: upgrade"));
        }
        //= https://www.rfc-editor.org/rfc/rfc9298#section-3.3
        //# the request SHALL use the "GET" method
        if method != "GET" {
            return Err(HeadError::Malformed(
                "connect-udp upgrade with a method other than GET",
            ));
        }
        if !target.starts_with('/') {
            return Err(HeadError::Malformed(
                "connect-udp target is not in origin-form",
            ));
        }
        RequestKind::ConnectUdp
    } else {
        RequestKind::Other
    };
    Ok(RequestHead {
        method,
        target,
        kind,
        headers,
        len,
    })
}

/// Length of the head at the start of `buf` (through its empty line), checking that every line
/// ends in CRLF.
fn head_len(buf: &[u8], max_len: usize) -> Result<usize, HeadError> {
    //= https://www.rfc-editor.org/rfc/rfc9112#section-2.2
    //# A sender MUST NOT generate a bare CR (a CR character not immediately followed by LF)
    //# within any protocol elements other than the content.
    // RFC 9112 §2.2 lets a recipient accept a bare LF as a line terminator; a relay that does so
    // disagrees about the request with every proxy that does not, so it refuses both.
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'\r' => match buf.get(i + 1) {
                Some(b'\n') | None => {}
                Some(_) => return Err(HeadError::Malformed("bare CR in request head")),
            },
            b'\n' => {
                if i == 0 || buf[i - 1] != b'\r' {
                    return Err(HeadError::Malformed("bare LF in request head"));
                }
                if i >= 3 && buf[i - 3..i] == *b"\r\n\r" {
                    let len = i + 1;
                    return if len > max_len {
                        Err(HeadError::TooLarge)
                    } else {
                        Ok(len)
                    };
                }
            }
            _ => {}
        }
        if i + 1 >= max_len {
            return Err(HeadError::TooLarge);
        }
    }
    Err(HeadError::Incomplete)
}

/// A comma-separated header value lists `token` (case-insensitively, RFC 9110 §5.6.1).
pub fn lists_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod request_tests {
    use super::*;

    const MAX: usize = 16 * 1024;

    fn parse(head: &str) -> Result<RequestHead, HeadError> {
        parse_request_head(head.as_bytes(), MAX)
    }

    fn malformed(head: &str) -> &'static str {
        match parse(head) {
            Err(HeadError::Malformed(why)) => why,
            other => panic!("{head:?} should be malformed, got {other:?}"),
        }
    }

    #[test]
    fn connect_head_ends_at_the_empty_line_and_keeps_what_follows_for_the_tunnel() {
        let bytes = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nTLS";
        let head = parse(bytes).unwrap();
        assert_eq!(head.len, bytes.len() - 3);
        assert_eq!(
            head.kind,
            RequestKind::Connect(Target::new("example.com", 443).unwrap())
        );
        assert_eq!(
            head.headers,
            vec![("host".into(), b"example.com:443".to_vec())]
        );
    }

    #[test]
    fn partial_heads_are_incomplete_until_the_limit() {
        let bytes = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r";
        for end in 0..bytes.len() {
            assert_eq!(
                parse_request_head(&bytes[..end], MAX),
                Err(HeadError::Incomplete),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(parse_request_head(bytes, 20), Err(HeadError::TooLarge));
        let full = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        assert_eq!(
            parse_request_head(full, full.len() - 1),
            Err(HeadError::TooLarge)
        );
        assert!(parse_request_head(full, full.len()).is_ok());
    }

    #[test]
    fn content_on_a_connect_is_refused() {
        malformed("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nContent-Length: 5\r\n\r\n");
        malformed(
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(parse(
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nContent-Length: 0\r\n\r\n"
        )
        .is_ok());
    }

    #[test]
    fn ambiguous_targets_and_hosts_are_refused() {
        malformed("CONNECT http://a.test:443/ HTTP/1.1\r\nHost: a.test:443\r\n\r\n");
        malformed("CONNECT a.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\n");
        malformed("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nHost: a.test:443\r\n\r\n");
        malformed("CONNECT a.test:443 HTTP/1.1\r\n\r\n");
        malformed("CONNECT a.test:0443 HTTP/1.1\r\nHost: a.test:0443\r\n\r\n");
        assert!(parse("CONNECT A.test:443 HTTP/1.1\r\nHost: a.TEST:443\r\n\r\n").is_ok());
        assert!(parse("CONNECT a.test:443 HTTP/1.0\r\n\r\n").is_ok());
    }

    #[test]
    fn bare_line_endings_are_refused() {
        malformed("CONNECT a.test:443 HTTP/1.1\nHost: a.test:443\n\n");
        malformed("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\n\r\n");
        malformed("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\rX: y\r\n\r\n");
    }

    #[test]
    fn connect_udp_upgrade_needs_connection_upgrade_and_origin_form() {
        let ok = "GET /.well-known/masque/udp/a.test/53/ HTTP/1.1\r\nHost: r.test\r\n\
                  Connection: keep-alive, Upgrade\r\nUpgrade: connect-udp\r\n\r\n";
        assert_eq!(parse(ok).unwrap().kind, RequestKind::ConnectUdp);
        malformed(
            "GET /.well-known/masque/udp/a.test/53/ HTTP/1.1\r\nHost: r.test\r\n\
             Upgrade: connect-udp\r\n\r\n",
        );
        malformed(
            "GET https://r.test/.well-known/masque/udp/a.test/53/ HTTP/1.1\r\nHost: r.test\r\n\
             Connection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n",
        );
    }

    #[test]
    fn too_many_fields_is_too_large() {
        let mut head = String::from("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n");
        for i in 0..MAX_HEADERS {
            head.push_str(&format!("X-{i}: 1\r\n"));
        }
        head.push_str("\r\n");
        assert_eq!(parse(&head), Err(HeadError::TooLarge));
    }
}
