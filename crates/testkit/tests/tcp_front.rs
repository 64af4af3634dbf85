//! End-to-end over the TLS/TCP fallback front-end: HTTP/1.1 and HTTP/2 CONNECT and connect-udp
//! (capsules) with the in-repo clients, Debian curl (HTTP/1.1 CONNECT), curl_cffi's libcurl
//! (HTTP/2 CONNECT) and headless Chromium, plus the same refusals the HTTP/3 front-end gives.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cfr_client::front::{self, h2_reason, FrontRequest, FrontStream};
use cfr_client::{FrontClient, FrontVersion};
use cfr_relay::config::RelayConfig;
use cfr_testkit::browser::{chromium_dump_dom, curl, run_group};
use cfr_testkit::origins::{
    pattern_bytes, HttpsOrigin, PeerEnd, ResettingTcp, TcpEcho, TcpEndWatch, UdpEcho, ROOT_BODY,
};
use cfr_testkit::relay::{target, TestRelay};
use cfr_testkit::tunnels::{assert_echo, lo, retry_until, udp_echo, LIMIT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const FRONTS: [FrontVersion; 2] = [FrontVersion::Http11, FrontVersion::H2];

/// A test relay whose resolver also knows `localhost` (the name the HTTPS origin's certificate
/// and the external clients use).
async fn relay_with(adjust: impl FnOnce(&mut RelayConfig)) -> TestRelay {
    TestRelay::start_with(|c| {
        c.resolver
            .hosts
            .insert("localhost".into(), vec!["127.0.0.1".parse().unwrap()]);
        adjust(c)
    })
    .await
}

fn tcp_addr(relay: &TestRelay) -> SocketAddr {
    relay.tcp_addr.expect("the TCP front-end is on by default")
}

async fn client(relay: &TestRelay, front: FrontVersion) -> FrontClient {
    relay.front_client(front).await
}

/// Sends `req` and returns the tunnel; a refusal is an error naming the status.
async fn open(
    c: &FrontClient,
    req: &FrontRequest,
    token: Option<&str>,
) -> Result<FrontStream, String> {
    let (head, tunnel) = c.request(req, token).await.map_err(|e| e.to_string())?;
    tunnel.ok_or_else(|| {
        format!(
            "{} {req:?}: refused with {} ({:?})",
            c.version(),
            head.status,
            head.headers.get("proxy-status")
        )
    })
}

/// An authorized TCP tunnel to `dest`; a refusal fails the test.
async fn open_tcp(c: &FrontClient, relay: &TestRelay, dest: SocketAddr) -> FrontStream {
    open(c, &FrontRequest::tcp(&target(dest)), Some(&relay.token))
        .await
        .unwrap()
}

/// Everything until a clean end of stream, within [`LIMIT`].
async fn read_all(t: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    tokio::time::timeout(LIMIT, t.read_to_end(&mut all))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel did not end"))??;
    Ok(all)
}

fn header<'a>(head: &'a http::response::Parts, name: &str) -> &'a str {
    head.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn tcp_listener_shares_the_quic_port_number_and_can_be_disabled() {
    let relay = relay_with(|_| {}).await;
    assert_eq!(
        tcp_addr(&relay).port(),
        relay.addr.port(),
        "without listen_tcp the TCP listener takes the QUIC port number"
    );
    let off = relay_with(|c| c.tcp_enabled = false).await;
    assert_eq!(
        off.tcp_addr, None,
        "tcp_enabled = false binds no TCP listener"
    );
}

#[tokio::test]
async fn tcp_tunnel_is_byte_exact_with_half_close_on_both_fronts() {
    let echo = TcpEcho::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    for front in FRONTS {
        let c = client(&relay, front).await;
        let before = relay.core().requests_seen(front.alpn());
        let (head, tunnel) = c
            .request(&FrontRequest::tcp(&target(echo.addr())), Some(&relay.token))
            .await
            .unwrap();
        assert_eq!(head.status, 200, "{front:?} CONNECT");
        assert_eq!(
            header(&head, "alt-svc"),
            format!("h3=\":{}\"", relay.addr.port()),
            "{front:?}: responses advertise HTTP/3"
        );
        let mut tunnel = tunnel.unwrap();
        let data = pattern_bytes(7, 0, 200_000);
        tunnel.write_all(&data).await.unwrap();
        // Our FIN reaches the destination; its echo of everything must still come back.
        tunnel.shutdown().await.unwrap();
        let back = read_all(&mut tunnel).await.unwrap();
        assert!(
            back == data,
            "{front:?}: echo of {} bytes differs ({} back)",
            data.len(),
            back.len()
        );
        assert_eq!(
            relay.core().requests_seen(front.alpn()),
            before + 1,
            "{front:?}: the request was counted under protocol={}",
            front.alpn()
        );
    }
}

#[tokio::test]
async fn udp_tunnel_echoes_capsules_on_both_fronts() {
    let echo = UdpEcho::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    for front in FRONTS {
        let c = client(&relay, front).await;
        let tunnel = tokio::time::timeout(LIMIT, c.connect_udp(&target(echo.addr())))
            .await
            .expect("answer within the limit")
            .unwrap_or_else(|e| panic!("{front}: connect-udp opens: {e}"));
        assert!(!tunnel.uses_quic_datagrams());
        assert_eq!(tunnel.protocol(), front.alpn());
        let head = tunnel.response();
        let header = |name: &str| {
            head.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        match front {
            // RFC 9298 §3.3: 101 + Upgrade: connect-udp.
            FrontVersion::Http11 => {
                assert_eq!(head.status(), 101);
                assert!(header("upgrade").eq_ignore_ascii_case("connect-udp"));
            }
            FrontVersion::H2 => assert_eq!(head.status(), 200),
        }
        assert_eq!(header("capsule-protocol"), "?1", "{front:?}");
        // Over TLS/TCP every payload travels in a DATAGRAM capsule (RFC 9297 §3.5).
        for p in [b"cap".to_vec(), vec![], vec![0x5a; 1200], vec![1; 9000]] {
            udp_echo(&tunnel, &p, 5, Duration::from_secs(2)).await;
        }
    }
}

#[tokio::test]
async fn malformed_capsule_stream_aborts_the_stream_and_h2_connection_survives() {
    let uecho = UdpEcho::start(lo()).await;
    let echo = TcpEcho::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    for front in FRONTS {
        let c = client(&relay, front).await;
        let mut t = open(
            &c,
            &FrontRequest::udp(&target(uecho.addr())),
            Some(&relay.token),
        )
        .await
        .unwrap();
        // A DATAGRAM capsule announcing 100 bytes, cut short by the end of the stream.
        t.write_all(&[0x00, 0x40, 0x64, 0x00, 1, 2, 3])
            .await
            .unwrap();
        t.shutdown().await.unwrap();
        let res = read_all(&mut t).await;
        let err = res.expect_err("a truncated capsule must abort the stream, not end it cleanly");
        assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{front}: {err}");
        if front == FrontVersion::H2 {
            // RFC 9297 §3.3 + RFC 9113 §8.1.1: malformed message → stream error PROTOCOL_ERROR.
            assert_eq!(h2_reason(&err), Some(h2::Reason::PROTOCOL_ERROR), "{err}");
        }
        // The same HTTP/2 connection (a fresh one for HTTP/1.1) carries the next tunnel.
        let mut t = open_tcp(&c, &relay, echo.addr()).await;
        assert_echo(&mut t, b"after").await;
    }
}

#[tokio::test]
async fn target_reset_aborts_the_tunnel_with_connect_error() {
    let dest = ResettingTcp::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    for front in FRONTS {
        let c = client(&relay, front).await;
        let mut t = open_tcp(&c, &relay, dest.addr()).await;
        // The destination resets once these bytes arrive, i.e. after the 2xx.
        t.write_all(b"x").await.unwrap();
        let res = tokio::time::timeout(LIMIT, t.read(&mut [0u8; 64]))
            .await
            .unwrap();
        let err = res.expect_err("a destination reset must abort the tunnel, not end it cleanly");
        if front == FrontVersion::H2 {
            // RFC 9113 §8.5: RST_STREAM with CONNECT_ERROR.
            assert_eq!(h2_reason(&err), Some(h2::Reason::CONNECT_ERROR), "{err}");
        }
    }
}

#[tokio::test]
async fn h2_stream_reset_aborts_the_destination_connection() {
    let dest = TcpEndWatch::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    let c = client(&relay, FrontVersion::H2).await;
    let mut t = open_tcp(&c, &relay, dest.addr()).await;
    t.write_all(b"partial").await.unwrap();
    // A reset discards data not yet delivered: reset only once the bytes are at the destination.
    dest.received_at_least(7, LIMIT).await;
    t.as_h2_mut()
        .expect("an HTTP/2 tunnel")
        .reset(h2::Reason::CANCEL);
    let (outcome, _) = dest.end(LIMIT).await;
    assert_eq!(
        outcome,
        PeerEnd::Reset,
        "RST_STREAM from the client must abort the TCP connection with RST"
    );
}

/// Who sends which credentials.
#[derive(Clone, Copy, Debug)]
enum Token {
    Missing,
    Wrong,
    Valid,
}

/// One refusal both TCP front-ends must give exactly like HTTP/3.
struct Refusal {
    name: &'static str,
    token: Token,
    ask: FrontRequest,
    status: u16,
    error: &'static str,
}

fn refusals(echo: SocketAddr, uecho: SocketAddr, closed: SocketAddr) -> Vec<Refusal> {
    let r = |name, token, ask, status, error| Refusal {
        name,
        token,
        ask,
        status,
        error,
    };
    vec![
        r(
            "no token, TCP",
            Token::Missing,
            FrontRequest::tcp(&target(echo)),
            407,
            "http_request_denied",
        ),
        r(
            "no token, UDP",
            Token::Missing,
            FrontRequest::udp(&target(uecho)),
            407,
            "http_request_denied",
        ),
        r(
            "wrong token, TCP",
            Token::Wrong,
            FrontRequest::tcp(&target(echo)),
            407,
            "http_request_denied",
        ),
        r(
            "wrong token, UDP",
            Token::Wrong,
            FrontRequest::udp(&target(uecho)),
            407,
            "http_request_denied",
        ),
        r(
            "private destination",
            Token::Valid,
            FrontRequest::Connect("10.0.0.1:80".into()),
            403,
            "destination_ip_prohibited",
        ),
        r(
            "link-local UDP destination",
            Token::Valid,
            FrontRequest::ConnectUdp("/.well-known/masque/udp/169.254.169.254/53/".into()),
            403,
            "destination_ip_prohibited",
        ),
        r(
            "malformed authority",
            Token::Valid,
            FrontRequest::Connect("localhost:0".into()),
            400,
            "http_request_error",
        ),
        r(
            "path off the URI template",
            Token::Valid,
            FrontRequest::ConnectUdp("/not/the/template".into()),
            400,
            "http_request_error",
        ),
        r(
            "closed port",
            Token::Valid,
            FrontRequest::tcp(&target(closed)),
            502,
            "connection_refused",
        ),
        r(
            "name that does not resolve",
            Token::Valid,
            FrontRequest::Connect("nope.test:80".into()),
            502,
            "dns_error",
        ),
    ]
}

async fn assert_refused(c: &FrontClient, relay: &TestRelay, case: &Refusal) {
    let token = match case.token {
        Token::Missing => None,
        Token::Wrong => Some("wrong"),
        Token::Valid => Some(relay.token.as_str()),
    };
    let who = format!("{:?} {}", c.version(), case.name);
    let (head, tunnel) = c
        .request(&case.ask, token)
        .await
        .unwrap_or_else(|e| panic!("{who}: request failed: {e}"));
    assert!(tunnel.is_none(), "{who}: must be refused");
    assert_eq!(head.status.as_u16(), case.status, "{who}: status");
    let ps = header(&head, "proxy-status");
    assert!(
        ps.starts_with("cfr") && ps.contains(&format!("error={}", case.error)),
        "{who}: Proxy-Status {ps:?} should name {}",
        case.error
    );
    if case.status == 407 {
        assert!(
            header(&head, "proxy-authenticate").starts_with("Bearer"),
            "{who}: 407 carries Proxy-Authenticate"
        );
    }
    assert!(
        !header(&head, "alt-svc").is_empty(),
        "{who}: Alt-Svc on refusals too"
    );
}

#[tokio::test]
async fn refusals_match_http3_on_both_fronts() {
    let echo = TcpEcho::start(lo()).await;
    let uecho = UdpEcho::start(lo()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = relay_with(|_| {}).await;
    for front in FRONTS {
        let c = client(&relay, front).await;
        for case in refusals(echo.addr(), uecho.addr(), closed) {
            assert_refused(&c, &relay, &case).await;
        }
        // After every refusal the connection (HTTP/2) still opens tunnels.
        let mut t = open_tcp(&c, &relay, echo.addr()).await;
        assert_echo(&mut t, b"still alive").await;
    }
    assert_eq!(
        echo.peers().len(),
        2,
        "unauthenticated requests never reach the destination (only the two good tunnels did)"
    );
    assert_eq!(
        uecho.count(),
        0,
        "unauthenticated connect-udp sends nothing"
    );
}

#[tokio::test]
async fn h2_tunnels_per_connection_limit_is_503() {
    let echo = TcpEcho::start(lo()).await;
    let relay = relay_with(|c| c.limits.tunnels_per_connection = 2).await;
    let c = client(&relay, FrontVersion::H2).await;
    let a = open_tcp(&c, &relay, echo.addr()).await;
    let _b = open_tcp(&c, &relay, echo.addr()).await;
    let third = Refusal {
        name: "third tunnel on one connection",
        token: Token::Valid,
        ask: FrontRequest::tcp(&target(echo.addr())),
        status: 503,
        error: "connection_limit_reached",
    };
    assert_refused(&c, &relay, &third).await;
    // A closed tunnel frees its slot (once the relay processed the reset: ask until then).
    drop(a);
    let req = FrontRequest::tcp(&target(echo.addr()));
    let mut t = retry_until("a freed tunnel slot", LIMIT, || {
        open(&c, &req, Some(&relay.token))
    })
    .await;
    assert_echo(&mut t, b"slot freed").await;
}

#[tokio::test]
async fn drain_lets_open_tcp_tunnels_finish_and_refuses_new_connections() {
    let echo = TcpEcho::start(lo()).await;
    let relay = relay_with(|c| c.drain_secs = 10).await;
    let c = client(&relay, FrontVersion::H2).await;
    let mut t = open_tcp(&c, &relay, echo.addr()).await;
    relay.handle().shutdown();
    tokio::time::timeout(LIMIT, relay.handle().draining())
        .await
        .expect("the drain begins within the limit");
    assert!(
        FrontClient::connect_offering(&relay.front_config(), &[FrontVersion::H2])
            .await
            .is_err(),
        "a draining relay accepts no new TCP connections"
    );
    assert_echo(&mut t, b"during drain").await;
}

// ---------------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn debian_curl_fetches_https_through_http1_connect() {
    let origin = HttpsOrigin::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    let (ok, body, err) = curl(&[
        "-x",
        &format!("https://localhost:{}", tcp_addr(&relay).port()),
        "--proxy-cacert",
        &relay.ca_pem.display().to_string(),
        "--proxy-header",
        &format!("Proxy-Authorization: Bearer {}", relay.token),
        "--cacert",
        &origin.ca_pem_path().display().to_string(),
        &origin.url("/"),
    ])
    .await;
    assert!(ok, "curl failed: {err}\nstdout: {body}");
    assert_eq!(body.as_bytes(), ROOT_BODY, "origin body through the relay");
    assert_eq!(
        relay.core().requests_seen("http/1.1"),
        1,
        "curl 7.88 CONNECTs over HTTP/1.1"
    );
    assert_eq!(origin.requests().len(), 1);
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop")
}

#[tokio::test]
async fn libcurl_fetches_https_through_http2_connect() {
    let dir = interop_dir();
    let python = dir.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run interop/setup.sh (curl_cffi venv)",
        python.display()
    );
    let origin = HttpsOrigin::start(lo()).await;
    let relay = relay_with(|_| {}).await;
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(dir.join("curl_h3_proxy.py"))
        .args(["--proxy-type", "h2", "--mode", "tcp", "--timeout", "20"])
        .arg("--proxy")
        .arg(format!("localhost:{}", tcp_addr(&relay).port()))
        .arg("--proxy-ca")
        .arg(&relay.ca_pem)
        .arg("--token")
        .arg(&relay.token)
        .arg("--ca")
        .arg(origin.ca_pem_path())
        .arg("--url")
        .arg(origin.url("/"))
        .arg("--expect-body")
        .arg("cfr-testkit origin: hello\\n");
    let (ok, out, err) = run_group(cmd, Duration::from_secs(40))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ok, "curl_cffi failed:\nstdout: {out}\nstderr: {err}");
    assert_eq!(
        (
            relay.core().requests_seen("h2"),
            relay.core().requests_seen("http/1.1")
        ),
        (1, 0),
        "libcurl's HTTPS2 proxy type must CONNECT over HTTP/2"
    );
    assert_eq!(origin.requests().len(), 1);
}

#[tokio::test]
async fn headless_chromium_loads_a_page_through_the_relay() {
    let origin = HttpsOrigin::start(lo()).await;
    // Chromium cannot send a bearer token to a proxy from its command line, so this relay is
    // open; the destination policy still only allows loopback.
    let relay = relay_with(|c| c.auth.insecure_open_relay = true).await;
    chromium_dump_dom(
        &format!("https://localhost:{}", tcp_addr(&relay).port()),
        &[],
        &[
            ("cfr relay CA", &relay.ca_pem),
            ("cfr origin CA", origin.ca_pem_path()),
        ],
        &origin.url("/page.html"),
        "cfr-testkit origin: hello",
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("Chromium did not render the origin page through the relay: {e}"));
    let seen = relay.core().requests_seen("h2") + relay.core().requests_seen("http/1.1");
    assert!(seen >= 1, "the page came through the relay's TCP front-end");
    eprintln!(
        "chromium: {} request(s) over h2, {} over http/1.1",
        relay.core().requests_seen("h2"),
        relay.core().requests_seen("http/1.1")
    );
}

#[tokio::test]
async fn idle_h2_connection_is_closed_after_connection_idle_secs() {
    let echo = TcpEcho::start(lo()).await;
    let relay = relay_with(|c| c.timeouts.connection_idle_secs = 1).await;
    let cfg = relay.front_config();
    let tls = front::tls_config(&cfg, &[FrontVersion::H2]).unwrap();
    let stream = front::tls_connect(tcp_addr(&relay), "localhost", tls)
        .await
        .unwrap();
    let conn = front::H2Connection::handshake(stream, "localhost")
        .await
        .unwrap();
    let (_, t) = conn
        .request(&FrontRequest::tcp(&target(echo.addr())), Some(&relay.token))
        .await
        .unwrap();
    let mut t = t.expect("tunnel opens");
    // A tunnel that lasts longer than the idle timeout keeps the connection open.
    assert!(
        tokio::time::timeout(Duration::from_millis(1800), conn.closed())
            .await
            .is_err(),
        "a connection with an open tunnel must not be closed as idle"
    );
    assert_echo(&mut t, b"busy").await;
    drop(t);
    // Then nothing: the relay closes the connection (GOAWAY) after the idle timeout.
    tokio::time::timeout(LIMIT, conn.closed())
        .await
        .expect("an idle HTTP/2 connection must be closed after connection_idle_secs");
    let res = conn
        .request(&FrontRequest::tcp(&target(echo.addr())), Some(&relay.token))
        .await;
    assert!(res.is_err(), "a closed connection opens no new streams");
}
