//! The HTTP/1.1 response head a relay sends to `CONNECT` or to the connect-udp Upgrade
//! (RFC 9112 §4, RFC 9298 §3.3), parsed with httparse: *incomplete* until the empty line that ends
//! the head, *malformed* if it can never become a valid head.
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
mod tests {
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
