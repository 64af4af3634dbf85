//! Bounded tunnel round trips through a relay with the in-repo client, shared by the end-to-end
//! tests (crates/testkit/tests, crates/cfr/tests). Every wait is bounded; every failure says what
//! did not happen.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cfr_client::{ClientError, RelayClient, UdpTunnel};
use cfr_proto::{ProxyError, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The bound on any single step of a test (a tunnel opening, an echo coming back).
pub const LIMIT: Duration = Duration::from_secs(20);

/// `127.0.0.1:0`: any free loopback port.
pub fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Opens a TCP tunnel to the echo at `t`, sends `msg`, half-closes, and asserts the echo returns
/// exactly `msg` (each step within [`LIMIT`]).
pub async fn tcp_roundtrip(client: &RelayClient, t: &Target, msg: &[u8]) {
    let mut tunnel = tokio::time::timeout(LIMIT, client.connect_tcp(t))
        .await
        .expect("tunnel answer within the limit")
        .unwrap_or_else(|e| panic!("tunnel to {t} should open, got {e}"));
    assert_echo(&mut tunnel, msg).await;
}

/// Through an open tunnel to a TCP echo (any transport): sends `msg`, half-closes, and asserts
/// the echo returns exactly `msg` and then ends, within [`LIMIT`].
pub async fn assert_echo<S: AsyncRead + AsyncWrite + Unpin>(tunnel: &mut S, msg: &[u8]) {
    tunnel.write_all(msg).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(LIMIT, tunnel.read_to_end(&mut back))
        .await
        .expect("echo within the limit")
        .unwrap();
    assert_eq!(back, msg, "TCP echo through the relay must be byte-exact");
}

/// Opens a UDP tunnel to the echo at `t` (within [`LIMIT`]) and checks each payload with
/// [`udp_echo`] (5 tries, 2 s each). Returns whether the tunnel used QUIC datagrams.
pub async fn udp_roundtrip(client: &RelayClient, t: &Target, payloads: &[Vec<u8>]) -> bool {
    let tunnel = tokio::time::timeout(LIMIT, client.connect_udp(t))
        .await
        .expect("UDP tunnel answer within the limit")
        .unwrap_or_else(|e| panic!("UDP tunnel to {t} should open, got {e}"));
    for p in payloads {
        udp_echo(&tunnel, p, 5, Duration::from_secs(2)).await;
    }
    tunnel.uses_quic_datagrams()
}

/// Sends `payload` up to `tries` times (UDP may drop), waiting `wait` for an answer each time;
/// the first datagram that comes back must be `payload`.
pub async fn udp_echo(tunnel: &UdpTunnel, payload: &[u8], tries: usize, wait: Duration) {
    for _ in 0..tries {
        tunnel.send(payload).await.unwrap();
        if let Ok(Ok(b)) = tokio::time::timeout(wait, tunnel.recv()).await {
            assert_eq!(
                &b[..],
                payload,
                "UDP echo of a {}-byte payload must be byte-exact",
                payload.len()
            );
            return;
        }
    }
    panic!(
        "UDP echo of a {}-byte payload did not come back ({tries} tries, {wait:?} each)",
        payload.len()
    );
}

/// Sends `payload` through a UDP tunnel until it comes back (UDP may drop), within `limit`;
/// other datagrams arriving meanwhile (late echoes of earlier payloads) are skipped.
pub async fn udp_echo_within(tunnel: &UdpTunnel, payload: &[u8], limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        tunnel.send(payload).await.unwrap();
        if let Ok(Ok(b)) = tokio::time::timeout(Duration::from_millis(500), tunnel.recv()).await {
            if b[..] == *payload {
                return;
            }
        }
    }
    panic!(
        "UDP echo of {} bytes did not come back within {limit:?}",
        payload.len()
    );
}

/// Asserts that the relay answers a CONNECT (`udp`: connect-udp) to `t` with an HTTP refusal
/// within [`LIMIT`], and returns it.
pub async fn refused(client: &RelayClient, t: &Target, udp: bool) -> ClientError {
    let res = if udp {
        tokio::time::timeout(LIMIT, client.connect_udp(t))
            .await
            .expect("answer within the limit")
            .map(|_| ())
    } else {
        tokio::time::timeout(LIMIT, client.connect_tcp(t))
            .await
            .expect("answer within the limit")
            .map(|_| ())
    };
    match res {
        Err(e @ ClientError::Refused { .. }) => e,
        Err(other) => panic!("expected an HTTP refusal for {t} (udp={udp}), got {other}"),
        Ok(()) => panic!("expected a refusal for {t} (udp={udp}), the tunnel opened"),
    }
}

/// Retries `attempt` until it succeeds, within `limit`; panics with the last error. For conditions
/// a test can only observe by asking again — e.g. a tunnel slot the relay frees asynchronously
/// after a stream reset — instead of sleeping for a guessed time.
pub async fn retry_until<T, E, F, Fut>(what: &str, limit: Duration, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "{what}: not yet");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{what}: still failing after {limit:?}: {e}"),
        }
    }
}

/// The HTTP status and the Proxy-Status error of a refusal.
pub fn status_and_error(e: &ClientError) -> (Option<u16>, Option<ProxyError>) {
    (e.status().map(|s| s.as_u16()), e.proxy_error())
}
