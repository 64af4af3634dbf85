//! Hardening under hostile load (issue 17), end to end on loopback: raw bytes an attacker would
//! send, checked by the status the relay answers and by what the destination received.
use cfr_testkit::origins::RecordingTcp;
use cfr_testkit::relay::TestRelay;
use cfr_testkit::tcp_client::tls_connect;
use cfr_testkit::tunnels::{lo, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

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
        let addr = relay.tcp_addr.expect("TCP front-end on");
        let tls = tls_connect(addr, &relay.ca_pem, &[b"http/1.1"])
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
