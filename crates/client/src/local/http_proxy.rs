//! Local HTTP/1.1 proxy: `CONNECT host:port HTTP/1.1` → `200 Connection established`, then raw
//! bytes through a relay TCP tunnel (RFC 9110 §9.3.6).
//!
//! Only CONNECT is supported. Any other request (e.g. `GET http://...`, plain forward proxying)
//! is answered with `501 Not Implemented` and a short explanation, and the connection closes.
//! Relay refusals pass through: the relay's status code and its `Proxy-Status` (RFC 9209).
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{accept_loop, http_status_for, splice, HANDSHAKE_TIMEOUT};
use crate::{ClientError, TunnelOpener};

/// Largest request head accepted; longer gets 431.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// Body of the 501 answer to non-CONNECT requests.
pub const NOT_IMPLEMENTED_BODY: &str =
    "cfr local HTTP proxy: only CONNECT tunnels are supported; plain http:// requests are not forwarded. Use https:// URLs or a SOCKS5 proxy.\n";

/// Serves the HTTP CONNECT proxy on `listener` forever.
pub async fn serve<O: TunnelOpener + Clone>(
    listener: TcpListener,
    opener: O,
) -> std::io::Result<()> {
    accept_loop(listener, move |stream, peer| {
        let opener = opener.clone();
        async move {
            if let Err(e) = handle(stream, opener).await {
                tracing::debug!(%peer, error = %e, "HTTP proxy client ended");
            }
        }
    })
    .await
}

/// What the request head asked for.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// CONNECT to this authority; `usize` = head length.
    Connect(String, usize),
    /// Any other method.
    Other,
}

/// Parses a request head with httparse. `Ok(None)` = incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(n) => Ok(Some(match req.method {
            Some("CONNECT") => Head::Connect(req.path.unwrap_or_default().to_string(), n),
            _ => Head::Other,
        })),
    }
}

fn response(status: http::StatusCode, extra: &[(&str, String)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

/// The answer to a failed tunnel: relay status + Proxy-Status passed through.
fn refusal(e: &ClientError) -> Vec<u8> {
    let status = http_status_for(e);
    let mut extra = Vec::new();
    if let ClientError::Refused {
        proxy_status: Some(ps),
        ..
    } = e
    {
        extra.push(("Proxy-Status", ps.to_header_value()));
    }
    response(status, &extra, &format!("{e}\n"))
}

async fn handle<O: TunnelOpener>(mut stream: TcpStream, opener: O) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match parse_head(&buf) {
                Ok(Some(h)) => return Ok(Ok(h)),
                Ok(None) => {}
                // RFC 6585 §5: 431 for a header section that is too large.
                Err(httparse::Error::TooManyHeaders) => {
                    return Ok(Err(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
                }
                Err(_) => return Ok(Err(http::StatusCode::BAD_REQUEST)),
            }
            if buf.len() >= MAX_HEAD {
                return Ok(Err(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
            }
            let mut chunk = [0u8; 4096];
            let want = chunk.len().min(MAX_HEAD - buf.len());
            let n = stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;

    let (authority, head_len) = match head {
        Ok(Head::Connect(a, n)) => (a, n),
        Ok(Head::Other) => {
            stream
                .write_all(&response(
                    http::StatusCode::NOT_IMPLEMENTED,
                    &[],
                    NOT_IMPLEMENTED_BODY,
                ))
                .await?;
            return Ok(());
        }
        Err(status) => {
            stream
                .write_all(&response(status, &[], "malformed request\n"))
                .await?;
            return Ok(());
        }
    };
    // RFC 9110 §9.3.6: the CONNECT request-target is authority-form, host:port.
    let target = match cfr_proto::target::parse_authority(&authority) {
        Ok(t) => t,
        Err(e) => {
            stream
                .write_all(&response(
                    http::StatusCode::BAD_REQUEST,
                    &[],
                    &format!("bad CONNECT target: {e}\n"),
                ))
                .await?;
            return Ok(());
        }
    };
    let mut tunnel = match opener.connect_tcp(&target).await {
        Ok(t) => t,
        Err(e) => {
            stream.write_all(&refusal(&e)).await?;
            return Ok(());
        }
    };
    stream
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if buf.len() > head_len {
        // Bytes pipelined after the head (e.g. a TLS ClientHello) belong to the tunnel.
        tunnel.write_all(&buf[head_len..]).await?;
    }
    splice(stream, tunnel).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_proxy_parses_connect_head_and_keeps_pipelined_bytes() {
        let req = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01";
        assert_eq!(
            parse_head(req).unwrap(),
            Some(Head::Connect("example.com:443".into(), req.len() - 3))
        );
        assert_eq!(
            parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHo").unwrap(),
            None
        );
    }

    #[test]
    fn http_proxy_flags_other_methods_and_garbage() {
        assert_eq!(
            parse_head(b"GET http://example.com/ HTTP/1.1\r\n\r\n").unwrap(),
            Some(Head::Other)
        );
        assert!(parse_head(b"\x16\x03\x01\x02\x00 garbage\r\n\r\n").is_err());
    }

    #[test]
    fn http_proxy_501_response_is_well_formed() {
        let r = response(http::StatusCode::NOT_IMPLEMENTED, &[], NOT_IMPLEMENTED_BODY);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 501 Not Implemented\r\n"));
        assert!(text.contains(&format!(
            "Content-Length: {}\r\n",
            NOT_IMPLEMENTED_BODY.len()
        )));
        assert!(text.ends_with(NOT_IMPLEMENTED_BODY));
    }
}
