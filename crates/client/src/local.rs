//! Local proxy listeners on top of a [`crate::TunnelOpener`]: SOCKS5 ([`socks5`]) and HTTP CONNECT
//! ([`http_proxy`]), plus the mapping of relay errors onto each protocol's error codes.
use std::sync::Arc;
use std::time::Duration;

use cfr_proto::ProxyError;
use tokio::sync::Semaphore;

use crate::socks5::Reply;
use crate::ClientError;

pub mod http_proxy;
pub mod socks5;

/// Most local client connections served at once per listener; more wait in the accept queue.
pub const MAX_LOCAL_CONNECTIONS: usize = 1024;
/// Time a local client gets to send its handshake (SOCKS5 greeting/request, HTTP request head).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Copy buffer per direction of a TCP tunnel.
const COPY_BUF: usize = 64 * 1024;

/// The SOCKS5 reply for a failed tunnel (RFC 1928 §6 codes).
pub fn socks5_reply_for(e: &ClientError) -> Reply {
    let ClientError::Refused {
        status,
        proxy_status,
    } = e
    else {
        return Reply::GeneralFailure;
    };
    match proxy_status.as_ref().map(|p| p.error) {
        Some(ProxyError::DestinationIpProhibited | ProxyError::HttpRequestDenied) => {
            return Reply::NotAllowed
        }
        Some(ProxyError::DnsError | ProxyError::DestinationNotFound) => {
            return Reply::HostUnreachable
        }
        Some(ProxyError::DestinationIpUnroutable) => return Reply::NetworkUnreachable,
        Some(ProxyError::ConnectionRefused) => return Reply::ConnectionRefused,
        Some(ProxyError::ConnectionTimeout | ProxyError::DnsTimeout) => return Reply::TtlExpired,
        _ => {}
    }
    match status.as_u16() {
        403 => Reply::NotAllowed,
        504 => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}

/// The HTTP status a local HTTP proxy client gets for a failed tunnel: the relay's own status
/// when it answered, 504 for timeouts, 502 when the relay was unusable.
pub fn http_status_for(e: &ClientError) -> http::StatusCode {
    match e {
        ClientError::Refused { status, .. } => *status,
        ClientError::Timeout => http::StatusCode::GATEWAY_TIMEOUT,
        ClientError::InvalidUrl(_) => http::StatusCode::BAD_REQUEST,
        _ => http::StatusCode::BAD_GATEWAY,
    }
}

/// Accept loop shared by both listeners: bounded concurrency, accept errors (e.g. EMFILE) are
/// logged and retried instead of ending the listener.
async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, handle: F) -> std::io::Result<()>
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_LOCAL_CONNECTIONS));
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let fut = handle(stream, peer);
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
    }
}

/// Splices a local TCP connection and a tunnel until both directions are closed. FIN travels
/// both ways (half-close); an error on either side resets the local connection.
async fn splice(mut local: tokio::net::TcpStream, mut tunnel: crate::TcpTunnel) {
    match tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tunnel, COPY_BUF, COPY_BUF)
        .await
    {
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "tunnel ended with an error; resetting local connection");
            // SO_LINGER 0 turns the close into an RST, mirroring the relay's reset.
            let _ = local.set_zero_linger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfr_proto::ProxyStatus;

    fn refused(status: u16, err: Option<ProxyError>) -> ClientError {
        ClientError::Refused {
            status: http::StatusCode::from_u16(status).unwrap(),
            proxy_status: err.map(|error| ProxyStatus {
                proxy: "cfr".into(),
                error,
                details: None,
            }),
        }
    }

    #[test]
    fn relay_errors_map_to_socks5_replies() {
        assert_eq!(socks5_reply_for(&refused(403, None)), Reply::NotAllowed);
        assert_eq!(
            socks5_reply_for(&refused(403, Some(ProxyError::DestinationIpProhibited))),
            Reply::NotAllowed
        );
        assert_eq!(
            socks5_reply_for(&refused(502, Some(ProxyError::DnsError))),
            Reply::HostUnreachable
        );
        assert_eq!(
            socks5_reply_for(&refused(502, Some(ProxyError::ConnectionRefused))),
            Reply::ConnectionRefused
        );
        assert_eq!(socks5_reply_for(&refused(504, None)), Reply::TtlExpired);
        assert_eq!(
            socks5_reply_for(&refused(503, Some(ProxyError::ConnectionLimitReached))),
            Reply::GeneralFailure
        );
        assert_eq!(socks5_reply_for(&refused(502, None)), Reply::GeneralFailure);
        assert_eq!(
            socks5_reply_for(&ClientError::Timeout),
            Reply::GeneralFailure
        );
    }

    #[test]
    fn relay_errors_map_to_http_statuses() {
        assert_eq!(http_status_for(&refused(403, None)).as_u16(), 403);
        assert_eq!(
            http_status_for(&refused(502, Some(ProxyError::DnsError))).as_u16(),
            502
        );
        assert_eq!(http_status_for(&ClientError::Timeout).as_u16(), 504);
        assert_eq!(http_status_for(&ClientError::Closed).as_u16(), 502);
    }
}
