//! Hardening under hostile load (issue 17), end to end on loopback: raw bytes an attacker would
//! send, checked by the status the relay answers and by what the destination received.
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cfr_relay::tunnel::RelayCounters;
use cfr_testkit::origins::{ring_provider, RecordingTcp, TcpEcho, UdpEcho};
use cfr_testkit::relay::{target, TestRelay};
use cfr_testkit::tunnels::{lo, tcp_roundtrip, udp_echo, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn count(c: &AtomicU64) -> u64 {
    RelayCounters::get(c)
}

/// TLS to the relay's TCP front-end as `localhost`, trusting its dev CA, offering `alpn`.
async fn tls_connect(relay: &TestRelay, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in cfr_relay::tls::load_certs(&relay.ca_pem).map_err(std::io::Error::other)? {
        roots.add(c).map_err(std::io::Error::other)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(relay.tcp_addr.expect("TCP front-end on")).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("static name");
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
}

/// A raw HTTP/2 connection to the relay, driven by its own task.
async fn h2_connect(relay: &TestRelay) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(relay, b"h2").await.expect("TLS to the relay");
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.expect("HTTP/2 ready")
}

/// A classic CONNECT (RFC 9113 §8.5) on `h2` to `dest` with the test token and `extra` fields.
async fn h2_tunnel(
    h2: &h2::client::SendRequest<Bytes>,
    relay: &TestRelay,
    dest: std::net::SocketAddr,
    extra: http::HeaderMap,
) -> (http::response::Parts, h2::SendStream<Bytes>, h2::RecvStream) {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{}", dest.port()))
        .header("proxy-authorization", format!("Bearer {}", relay.token))
        .body(())
        .unwrap();
    req.headers_mut().extend(extra);
    let mut send = h2.clone().ready().await.expect("HTTP/2 ready");
    let (resp, stream) = send.send_request(req, false).expect("request sent");
    let resp = tokio::time::timeout(LIMIT, resp)
        .await
        .expect("an answer within the limit")
        .expect("an answer on the stream, not a connection error (GOAWAY)");
    let (head, recv) = resp.into_parts();
    (head, stream, recv)
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 CONNECT strictness
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 connection to the relay's TLS/TCP front-end that writes raw bytes.
struct RawH1 {
    tls: TlsStream<TcpStream>,
    /// Bytes read after the last response head.
    rest: Vec<u8>,
}

/// A response head as received.
#[derive(Debug)]
struct Head {
    status: u16,
    text: String,
}

impl Head {
    fn header(&self, name: &str) -> Option<String> {
        self.text.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

impl RawH1 {
    async fn connect(relay: &TestRelay) -> RawH1 {
        let tls = tls_connect(relay, b"http/1.1")
            .await
            .expect("TLS to the relay");
        RawH1 {
            tls,
            rest: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// Reads one response head (bounded); `None` if the connection ends first.
    async fn head(&mut self) -> Option<Head> {
        let deadline = tokio::time::Instant::now() + LIMIT;
        let mut buf = std::mem::take(&mut self.rest);
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                self.rest = buf.split_off(end + 4);
                let text = String::from_utf8(buf).expect("ASCII response head");
                let status = text
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("status line in {text:?}"));
                return Some(Head { status, text });
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.tls.read(&mut chunk))
                .await
                .expect("a response head within the limit")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the relay closes the connection (EOF or error) within the limit.
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(LIMIT, self.tls.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

async fn relay() -> TestRelay {
    TestRelay::start_with(|_| {}).await
}

fn bearer(relay: &TestRelay) -> String {
    format!("Proxy-Authorization: Bearer {}\r\n", relay.token)
}

/// Sends `request` (with `{auth}` replaced by the bearer header) and expects a 400 with
/// Proxy-Status `http_request_error`, no dial, and the connection closed.
async fn assert_refused_400(case: &str, request: &str) {
    let dest = RecordingTcp::start(lo(), "").await;
    let relay = relay().await;
    let port = dest.addr().port();
    let bytes = request
        .replace("{auth}", &bearer(&relay))
        .replace("{port}", &port.to_string());
    let mut c = RawH1::connect(&relay).await;
    c.send(bytes.as_bytes()).await;
    let head = c
        .head()
        .await
        .unwrap_or_else(|| panic!("{case}: the relay answers before closing"));
    assert_eq!(head.status, 400, "{case}: {}", head.text);
    let proxy_status = head.header("proxy-status").unwrap_or_default();
    assert!(
        proxy_status.contains("error=http_request_error"),
        "{case}: Proxy-Status names http_request_error, got {proxy_status:?}"
    );
    assert!(
        c.closed().await,
        "{case}: a malformed head ends the connection"
    );
    assert!(
        dest.recordings().is_empty(),
        "{case}: the relay must not dial for a refused request, destination saw {:?}",
        dest.recordings()
    );
}

#[tokio::test]
async fn h1_connect_with_content_length_is_400_before_dialling() {
    assert_refused_400(
        "Content-Length: 5 + 10 bytes",
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\
         Content-Length: 5\r\n\r\nhelloworld",
    )
    .await;
}

#[tokio::test]
async fn h1_connect_with_transfer_encoding_is_400_before_dialling() {
    assert_refused_400(
        "Transfer-Encoding: chunked",
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\
         Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n",
    )
    .await;
    assert_refused_400(
        "Content-Length and Transfer-Encoding",
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\
         Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n12345678",
    )
    .await;
}

#[tokio::test]
async fn h1_ambiguous_connect_targets_are_400_before_dialling() {
    let cases = [
        (
            "absolute-form target",
            "CONNECT http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n",
        ),
        (
            "Host differs from the authority",
            "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.2:{port}\r\n{auth}\r\n",
        ),
        (
            "Host repeated",
            "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Host: 127.0.0.1:{port}\r\n{auth}\r\n",
        ),
        (
            "Host missing",
            "CONNECT 127.0.0.1:{port} HTTP/1.1\r\n{auth}\r\n",
        ),
        (
            "port with a leading zero",
            "CONNECT 127.0.0.1:0{port} HTTP/1.1\r\nHost: 127.0.0.1:0{port}\r\n{auth}\r\n",
        ),
        (
            "bare LF line endings",
            "CONNECT 127.0.0.1:{port} HTTP/1.1\nHost: 127.0.0.1:{port}\n\n",
        ),
        (
            "Upgrade: connect-udp without Connection: Upgrade",
            "GET /.well-known/masque/udp/127.0.0.1/{port}/ HTTP/1.1\r\nHost: localhost\r\n{auth}\
             Upgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n",
        ),
    ];
    for (case, request) in cases {
        assert_refused_400(case, request).await;
    }
}

#[tokio::test]
async fn h1_connect_bytes_behind_the_head_reach_the_destination_exactly() {
    let dest = RecordingTcp::start(lo(), "").await;
    let relay = relay().await;
    let target = format!("127.0.0.1:{}", dest.addr().port());
    let mut c = RawH1::connect(&relay).await;
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\nhelloworld",
        bearer(&relay)
    );
    c.send(request.as_bytes()).await;
    let head = c.head().await.expect("a response");
    assert_eq!(head.status, 200, "{}", head.text);
    for field in ["connection", "content-length", "transfer-encoding"] {
        assert_eq!(
            head.header(field),
            None,
            "a 2xx to CONNECT carries no {field}: {}",
            head.text
        );
    }
    c.tls.shutdown().await.unwrap();
    let rec = dest
        .wait_recording(0, usize::MAX, LIMIT)
        .await
        .expect("the destination was dialled");
    assert!(rec.closed, "the client's close reached the destination");
    assert_eq!(
        rec.bytes, b"helloworld",
        "every byte after the head, in order"
    );
}

#[tokio::test]
async fn h1_oversized_head_is_431() {
    let dest = RecordingTcp::start(lo(), "").await;
    let relay = relay().await;
    let target = format!("127.0.0.1:{}", dest.addr().port());
    let mut c = RawH1::connect(&relay).await;
    let filler = "a".repeat(64 * 1024);
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}X-Filler: {filler}\r\n\r\n",
        bearer(&relay)
    );
    c.send(request.as_bytes()).await;
    let head = c.head().await.expect("a response");
    assert_eq!(head.status, 431, "{}", head.text);
    assert!(dest.recordings().is_empty(), "no dial for a refused head");
}

#[tokio::test]
async fn h1_keep_alive_after_407_serves_the_next_request_then_idles_out() {
    let dest = RecordingTcp::start(lo(), "").await;
    let relay = TestRelay::start_with(|c| c.timeouts.connection_idle_secs = 1).await;
    let target = format!("127.0.0.1:{}", dest.addr().port());
    let mut c = RawH1::connect(&relay).await;
    c.send(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await;
    let head = c.head().await.expect("a response");
    assert_eq!(head.status, 407, "{}", head.text);
    assert_eq!(head.header("content-length").as_deref(), Some("0"));
    // The same connection carries the authenticated retry.
    c.send(
        format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\nretry",
            bearer(&relay)
        )
        .as_bytes(),
    )
    .await;
    let head = c
        .head()
        .await
        .expect("a second response on the same connection");
    assert_eq!(head.status, 200, "{}", head.text);
    c.tls.shutdown().await.unwrap();
    let rec = dest.wait_recording(0, usize::MAX, LIMIT).await.unwrap();
    assert_eq!(rec.bytes, b"retry");

    // A connection that only got a 407 and then stays silent is closed after
    // connection_idle_secs instead of holding its slot.
    let mut idle = RawH1::connect(&relay).await;
    idle.send(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(idle.head().await.expect("a response").status, 407);
    assert!(
        idle.closed().await,
        "an idle keep-alive connection is closed (within {LIMIT:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// QUIC admission: idle connections, per-prefix limits, handshake rate and Retry, drain refusal
// ---------------------------------------------------------------------------------------------

/// A bare QUIC client (ALPN h3, trusting the relay's CA) bound to `bind`, sending a PING every
/// `keep_alive` if set. It never opens a request stream.
fn quic_endpoint(relay: &TestRelay, bind: &str, keep_alive: Option<Duration>) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in cfr_relay::tls::load_certs(&relay.ca_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(keep_alive);
    // Longer than any bound below: a refusal must come from the relay, not from our timeout.
    transport.max_idle_timeout(Some(Duration::from_secs(120).try_into().unwrap()));
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(format!("{bind}:0").parse().unwrap()).unwrap();
    endpoint.set_default_client_config(cfg);
    endpoint
}

async fn quic_connect(
    endpoint: &quinn::Endpoint,
    relay: &TestRelay,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let connecting = endpoint.connect(relay.addr, "localhost").unwrap();
    tokio::time::timeout(LIMIT, connecting)
        .await
        .expect("the relay answers a handshake within the limit")
}

/// CONNECTION_REFUSED (RFC 9000 §20.1), what quinn's `Incoming::refuse` sends.
fn is_refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// Connects from 127.0.0.1 and 127.0.0.2 (both must succeed), then from 127.0.0.3, which must be
/// refused (`why` names the limit). Returns the first connection and the third endpoint.
async fn two_connect_then_third_refused(
    relay: &TestRelay,
    why: &str,
) -> (quinn::Connection, quinn::Connection, quinn::Endpoint) {
    let a = quic_endpoint(relay, "127.0.0.1", None);
    let b = quic_endpoint(relay, "127.0.0.2", None);
    let c = quic_endpoint(relay, "127.0.0.3", None);
    let first = quic_connect(&a, relay).await.expect("first connection");
    let second = quic_connect(&b, relay).await.expect("second connection");
    let third = quic_connect(&c, relay).await;
    assert!(
        third.as_ref().is_err_and(is_refused),
        "{why}: the third connection is refused, got {:?}",
        third.map(|_| "connected")
    );
    (first, second, c)
}

/// Connects from `endpoint` until the relay accepts (bounded by [`LIMIT`]); a refusal is retried,
/// since what it waits for (a token refill, a freed slot) happens asynchronously.
async fn connect_once_accepted(endpoint: &quinn::Endpoint, relay: &TestRelay) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match quic_connect(endpoint, relay).await {
            Ok(_) => return,
            Err(e) if is_refused(&e) && tokio::time::Instant::now() < deadline => {
                // Polling a condition with a bounded deadline.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the relay accepts again within {LIMIT:?}: {e:?}"),
        }
    }
}

#[tokio::test]
async fn quic_connection_without_tunnels_is_closed_despite_pings() {
    let relay = TestRelay::start_with(|c| c.timeouts.connection_idle_secs = 1).await;
    // PINGs every 200 ms reset QUIC's idle timer (1 s here) on both sides.
    let endpoint = quic_endpoint(&relay, "127.0.0.1", Some(Duration::from_millis(200)));
    let conn = quic_connect(&endpoint, &relay).await.expect("handshake");
    let reason = tokio::time::timeout(LIMIT, conn.closed())
        .await
        .expect("a connection with no tunnel is closed by the relay within the limit");
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(0x100)),
        "closed by the relay with H3_NO_ERROR, got {reason:?}"
    );
    assert_eq!(count(&relay.core().counters.idle_connections_closed), 1);
}

#[tokio::test]
async fn connections_per_client_count_the_source_prefix() {
    let relay = TestRelay::start_with(|c| {
        c.limits.connections_per_client = 2;
        c.limits.client_prefix_v4 = 24;
    })
    .await;
    let _held =
        two_connect_then_third_refused(&relay, "a third address of the same /24 shares its slots")
            .await;
    let other = quic_endpoint(&relay, "127.0.1.1", None);
    quic_connect(&other, &relay)
        .await
        .expect("another /24 is another client");
}

#[tokio::test]
async fn handshake_rate_per_client_asks_for_retry_then_refuses_and_recovers() {
    let relay = TestRelay::start_with(|c| c.limits.handshakes_per_sec_per_client = 1).await;
    let endpoint = quic_endpoint(&relay, "127.0.0.1", None);
    // Six handshakes at once against a bucket of one: however slow the machine, the bucket
    // cannot refill fast enough for all of them.
    let attempts =
        futures_util::future::join_all((0..6).map(|_| quic_connect(&endpoint, &relay))).await;
    let accepted = attempts.iter().filter(|a| a.is_ok()).count();
    let refused = attempts
        .iter()
        .filter(|a| a.as_ref().is_err_and(is_refused))
        .count();
    let errors: Vec<String> = attempts
        .iter()
        .filter_map(|a| a.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        accepted >= 1 && refused >= 1 && accepted + refused == attempts.len(),
        "some handshakes within the rate, the rest refused: {accepted} accepted, errors {errors:?}"
    );
    assert!(
        count(&relay.core().counters.quic_retries) >= refused as u64,
        "every over-rate Initial was first asked to validate its address"
    );
    // The bucket refills at one handshake a second.
    connect_once_accepted(&endpoint, &relay).await;
}

#[tokio::test]
async fn under_handshake_load_unvalidated_initials_get_a_retry_and_real_clients_still_connect() {
    // Every handshake counts as "many half-open": each new address must validate first.
    let relay = TestRelay::start_with(|c| c.limits.half_open_before_retry = 0).await;
    let echo = TcpEcho::start(lo()).await;
    let client = relay.client().await;
    tcp_roundtrip(&client, &target(echo.addr()), b"after a Retry").await;
    assert!(
        count(&relay.core().counters.quic_retries) >= 1,
        "the client's first Initial got a Retry"
    );
}

#[tokio::test]
async fn new_quic_connections_during_a_drain_are_refused_at_once() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.drain_secs = 30).await;
    let client = relay.client().await;
    // An open tunnel keeps the drain in its grace period.
    let _tunnel = client.connect_tcp(&target(echo.addr())).await.unwrap();
    relay.handle().shutdown();
    let endpoint = quic_endpoint(&relay, "127.0.0.1", None);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let attempt = quic_connect(&endpoint, &relay).await;
        match attempt {
            Err(e) if is_refused(&e) => break,
            // The drain may not have started yet when the first attempt arrives.
            Ok(_) if tokio::time::Instant::now() < deadline => {}
            other => panic!(
                "a draining relay refuses with CONNECTION_CLOSE: {:?}",
                other.map(|_| "connected")
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stream credit on HTTP/3 (the stalled request head is in h3_relay.rs)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_request_beyond_the_tunnel_limit_gets_a_prompt_503() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.limits.tunnels_per_connection = 4).await;
    let client = relay.client().await;
    let t = target(echo.addr());
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(client.connect_tcp(&t).await.expect("within the limit"));
    }
    // Far more requests than the stream credit above the limit (limit + 16): each must still be
    // answered, because every refused stream is closed and its credit returned.
    let beyond = futures_util::future::join_all(
        (0..60).map(|_| async { tokio::time::timeout(LIMIT, client.connect_tcp(&t)).await }),
    )
    .await;
    let answers: Vec<String> = beyond
        .iter()
        .map(|r| match r {
            Err(_) => "no answer".to_owned(),
            Ok(Ok(_)) => "opened".to_owned(),
            Ok(Err(e)) => format!("{:?} {:?}", e.status().map(|s| s.as_u16()), e.proxy_error()),
        })
        .collect();
    assert!(
        answers
            .iter()
            .all(|a| a == "Some(503) Some(ConnectionLimitReached)"),
        "every request beyond the limit gets 503 connection_limit_reached: {answers:?}"
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// One header-section limit on every front-end
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_oversized_h2_header_section_is_431_on_that_stream_only() {
    let echo = TcpEcho::start(lo()).await;
    let relay = relay().await;
    let h2 = h2_connect(&relay).await;
    let (head, mut open_send, mut open_recv) =
        h2_tunnel(&h2, &relay, echo.addr(), http::HeaderMap::new()).await;
    assert_eq!(
        head.status.as_u16(),
        200,
        "a tunnel opens before the oversized request"
    );
    // The same 64 KiB field HTTP/1.1 answers with 431 (h1_oversized_head_is_431).
    let mut big = http::HeaderMap::new();
    big.insert("x-filler", "a".repeat(64 * 1024).parse().unwrap());
    let (head, _, _) = h2_tunnel(&h2, &relay, echo.addr(), big).await;
    assert_eq!(head.status.as_u16(), 431);
    let proxy_status = head
        .headers
        .get("proxy-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        proxy_status.contains("error=http_request_error"),
        "{proxy_status:?}"
    );
    // The tunnel next to it and the connection carry on.
    open_send
        .send_data(Bytes::from_static(b"still here"), true)
        .unwrap();
    let mut back = Vec::new();
    while let Some(chunk) = tokio::time::timeout(LIMIT, open_recv.data())
        .await
        .expect("echo within the limit")
    {
        let chunk = chunk.expect("the open tunnel was not reset");
        let _ = open_recv.flow_control().release_capacity(chunk.len());
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, b"still here");
    let (head, _, _) = h2_tunnel(&h2, &relay, echo.addr(), http::HeaderMap::new()).await;
    assert_eq!(
        head.status.as_u16(),
        200,
        "a new request on the same connection"
    );
}

// ---------------------------------------------------------------------------------------------
// Honest drain
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_h1_tunnel_cut_by_the_drain_ends_with_a_tcp_reset() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.drain_secs = 1).await;
    let target = format!("127.0.0.1:{}", echo.addr().port());
    let mut c = RawH1::connect(&relay).await;
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\nping",
        bearer(&relay)
    );
    c.send(request.as_bytes()).await;
    assert_eq!(c.head().await.expect("a response").status, 200);
    relay.handle().shutdown();
    // The tunnel stays open (no FIN from us); the grace period ends after 1 s.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let ending = loop {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout_at(deadline, c.tls.read(&mut buf))
            .await
            .expect("the drain ends the tunnel within the limit")
        {
            Ok(0) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    let err = ending.expect_err("a tunnel cut by the drain must not end like a finished one");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "TCP RST, not a FIN without close_notify: {err}"
    );
    assert_eq!(count(&relay.core().counters.tunnels_drained), 1);
}

#[tokio::test]
async fn an_h3_tunnel_cut_by_the_drain_is_reset_with_h3_connect_error() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.drain_secs = 1).await;
    let client = relay.client().await;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{}", echo.addr().port()))
        .header("proxy-authorization", format!("Bearer {}", relay.token))
        .body(())
        .unwrap();
    let mut raw = client.send_request(req).await.expect("tunnel opens");
    assert_eq!(raw.response.status(), 200);
    relay.handle().shutdown();
    let read = tokio::time::timeout(LIMIT, raw.stream.recv_data())
        .await
        .expect("the drain ends the tunnel within the limit");
    match read {
        Err(h3::error::StreamError::RemoteTerminate { code }) => assert_eq!(
            code,
            h3::error::Code::H3_CONNECT_ERROR,
            "the tunnel stream is reset with H3_CONNECT_ERROR"
        ),
        other => panic!(
            "a tunnel cut by the drain is reset, not closed with the connection: {:?}",
            other.map(|d| d.is_some())
        ),
    }
    assert_eq!(count(&relay.core().counters.tunnels_drained), 1);
}

#[tokio::test]
async fn an_h3_tunnel_finishing_during_the_drain_gets_every_byte_and_its_fin() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.drain_secs = 10).await;
    let client = relay.client().await;
    let mut tunnel = client.connect_tcp(&target(echo.addr())).await.unwrap();
    relay.handle().shutdown();
    let data = vec![7u8; 256 * 1024];
    tunnel.write_all(&data).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(LIMIT, tunnel.read_to_end(&mut back))
        .await
        .expect("echo within the limit")
        .expect("a clean end (FIN), not a reset or a closed connection");
    assert!(
        back == data,
        "every byte comes back ({} of {})",
        back.len(),
        data.len()
    );
    assert_eq!(count(&relay.core().counters.tunnels_drained), 0);
}

#[tokio::test]
async fn an_h2_tunnel_cut_by_the_drain_is_reset_with_connect_error() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.drain_secs = 1).await;
    let h2 = h2_connect(&relay).await;
    let (head, _send, mut recv) = h2_tunnel(&h2, &relay, echo.addr(), http::HeaderMap::new()).await;
    assert_eq!(head.status.as_u16(), 200, "tunnel opens");
    relay.handle().shutdown();
    let read = tokio::time::timeout(LIMIT, recv.data())
        .await
        .expect("the drain ends the tunnel within the limit");
    match read {
        Some(Err(e)) => assert_eq!(
            e.reason(),
            Some(h2::Reason::CONNECT_ERROR),
            "RST_STREAM(CONNECT_ERROR): {e}"
        ),
        other => panic!(
            "a tunnel cut by the drain is reset, not ended: {:?}",
            other.map(|r| r.map(|b| b.len()))
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Probes that found nothing to fix, kept as regression tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_h2_connection_kept_alive_with_pings_but_no_tunnel_is_closed() {
    let relay = TestRelay::start_with(|c| c.timeouts.connection_idle_secs = 1).await;
    let tls = tls_connect(&relay, b"h2").await.unwrap();
    let (_send, mut conn) = h2::client::handshake(tls).await.unwrap();
    let mut ping_pong = conn.ping_pong().expect("ping_pong taken once");
    let pings = tokio::spawn(async move {
        // A PING every 200 ms until the connection is gone.
        while ping_pong.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let ended = tokio::time::timeout(LIMIT, conn).await;
    assert!(
        ended.is_ok(),
        "an HTTP/2 connection with no tunnel is closed despite PINGs (within {LIMIT:?})"
    );
    pings.abort();
}

#[tokio::test]
async fn total_connections_is_a_hard_bound_on_both_fronts_and_frees_up() {
    let relay = TestRelay::start_with(|c| c.limits.total_connections = 2).await;
    let (first, _second, c) =
        two_connect_then_third_refused(&relay, "QUIC beyond total_connections").await;
    // The TCP front-end shares the bound: the TLS handshake is not even started.
    let tcp = tls_connect(&relay, b"h2").await;
    assert!(
        tcp.is_err(),
        "TCP beyond total_connections is closed before TLS"
    );
    first.close(quinn::VarInt::from_u32(0x100), b"done");
    connect_once_accepted(&c, &relay).await;
}

#[tokio::test]
async fn datagram_floods_from_many_udp_tunnels_leave_other_tunnels_working() {
    let echo = UdpEcho::start(lo()).await;
    let tcp_echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.limits.datagram_queue = 64).await;
    let client = relay.client().await;
    let mut udp = Vec::new();
    for _ in 0..16 {
        udp.push(
            client
                .connect_udp(&target(echo.addr()))
                .await
                .expect("UDP tunnel"),
        );
    }
    // Every tunnel sends 2000 datagrams as fast as it can, all at once.
    let payload = vec![0x5a; 1000];
    let floods = futures_util::future::join_all(udp.iter().map(|t| {
        let payload = payload.clone();
        async move {
            for _ in 0..2000 {
                if t.send(&payload).await.is_err() {
                    return false;
                }
            }
            true
        }
    }));
    // Meanwhile a TCP tunnel on the same connection round-trips.
    let tcp_target = target(tcp_echo.addr());
    let (sent, ()) = tokio::join!(
        floods,
        tcp_roundtrip(&client, &tcp_target, b"through the flood")
    );
    assert!(
        sent.iter().all(|ok| *ok),
        "every flood was accepted by the client side"
    );
    // And every flooding tunnel still carries a datagram both ways afterwards, once the echoes
    // of the flood still queued for it are read.
    for t in &udp {
        while let Ok(Ok(b)) = tokio::time::timeout(Duration::from_millis(500), t.recv()).await {
            if b[..] != payload[..] {
                break;
            }
        }
        udp_echo(t, b"after the flood", 10, Duration::from_secs(2)).await;
    }
}
