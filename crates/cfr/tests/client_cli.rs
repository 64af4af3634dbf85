//! `cfr client` as a process: flags, errors, and real local clients (Debian curl, headless
//! Chromium) through its SOCKS5 / HTTP proxy listeners and an in-process relay to an HTTPS origin.
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cfr_testkit::browser::{
    chromium_dump_dom, curl, origin_bind, resolve_localhost_to_origin_ip, run_group,
};
use cfr_testkit::origins::{HttpsOrigin, TcpEcho, PAGE_HTML, ROOT_BODY};
use cfr_testkit::relay::TestRelay;
use cfr_testkit::tunnels::{lo, LIMIT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const CFR: &str = env!("CARGO_BIN_EXE_cfr");

/// A running `cfr client`; killed on drop.
struct CfrClient {
    child: Child,
    socks: Option<SocketAddr>,
    http: Option<SocketAddr>,
    /// Everything it printed on stderr so far; a change wakes [`CfrClient::wait_for_stderr`].
    stderr: tokio::sync::watch::Receiver<String>,
}

impl CfrClient {
    /// Starts `cfr client ARGS --print-ready` and waits for its ready line.
    async fn start(args: &[&str]) -> CfrClient {
        let mut child = Command::new(CFR)
            .arg("client")
            .args(args)
            .arg("--print-ready")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cfr client");
        let (log, stderr) = tokio::sync::watch::channel(String::new());
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err_lines.next_line().await {
                log.send_modify(|log| {
                    log.push_str(&l);
                    log.push('\n');
                });
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(LIMIT, out.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no ready line within {LIMIT:?}; stderr:\n{}",
                    *stderr.borrow()
                )
            })
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "cfr client exited before ready; stderr:\n{}",
                    *stderr.borrow()
                )
            });
        assert!(line.starts_with("{\"ready\":true"), "ready line: {line}");
        CfrClient {
            child,
            socks: json_addr(&line, "socks5"),
            http: json_addr(&line, "http"),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.borrow().clone()
    }

    /// Waits (within [`LIMIT`]) until stderr contains `needle`; returns stderr.
    async fn wait_for_stderr(&self, needle: &str) -> String {
        let mut rx = self.stderr.clone();
        let found = tokio::time::timeout(LIMIT, rx.wait_for(|log| log.contains(needle))).await;
        let log = self.stderr();
        assert!(
            matches!(found, Ok(Ok(_))),
            "expected {needle:?} on cfr client's stderr within {LIMIT:?}; stderr:\n{log}"
        );
        log
    }

    /// SIGTERM, then the exit status (bounded).
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("cfr client exits within the limit after SIGTERM")
            .unwrap()
    }
}

/// `"key":"ADDR"` from the ready line (`null` → None).
fn json_addr(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"')?;
    rest[..rest.find('"')?].parse().ok()
}

/// A relay that also resolves `localhost` (what curl and Chromium send) to
/// [`cfr_testkit::browser::ORIGIN_IP`], and the client flags that trust and authenticate to it.
async fn relay_and_flags(dir: &Path) -> (TestRelay, Vec<String>) {
    let relay = TestRelay::start_with(resolve_localhost_to_origin_ip).await;
    let token = dir.join("token");
    std::fs::write(&token, format!("  {}\n", relay.token)).unwrap();
    let flags = vec![
        "--relay".into(),
        relay.url(),
        "--ca".into(),
        relay.ca_pem.display().to_string(),
        "--token-file".into(),
        token.display().to_string(),
    ];
    (relay, flags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_curl_fetches_https_origin_through_socks5_and_http_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let origin = HttpsOrigin::start(origin_bind()).await;
    let (relay, mut flags) = relay_and_flags(dir.path()).await;
    // The relay also comes from a list file (with comments); the duplicate is dropped.
    let list = dir.path().join("relays.txt");
    std::fs::write(
        &list,
        format!("# test relays\n\n{}  # primary\n", relay.url()),
    )
    .unwrap();
    flags.extend(["--relay-list".into(), list.display().to_string()]);
    flags.extend(["--select".into(), "ordered".into()]);
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--socks5", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    let client = CfrClient::start(&args).await;
    let socks = client.socks.expect("SOCKS5 address in the ready line");
    let http = client.http.expect("HTTP proxy address in the ready line");
    // Prints what it listens on.
    client
        .wait_for_stderr(&format!("SOCKS5 proxy on {socks}"))
        .await;

    let url = origin.localhost_url("/");
    let ca = origin.ca_pem_path().to_str().unwrap();
    // Control: without the proxy, `localhost` resolves here and nothing answers.
    let (ok, _, _) = curl(&["--noproxy", "*", "--cacert", ca, &url]).await;
    assert!(!ok, "the origin must be reachable only through the relay");
    let socks_arg = socks.to_string();
    let (ok, body, err) = curl(&["--socks5-hostname", &socks_arg, "--cacert", ca, &url]).await;
    assert!(
        ok,
        "curl --socks5-hostname: {err}\ncfr client stderr:\n{}",
        client.stderr()
    );
    assert_eq!(body.as_bytes(), ROOT_BODY, "body via SOCKS5");

    let proxy = format!("http://{http}");
    let (ok, body, err) = curl(&["-x", &proxy, "--cacert", ca, &url]).await;
    assert!(
        ok,
        "curl -x (CONNECT): {err}\ncfr client stderr:\n{}",
        client.stderr()
    );
    assert_eq!(body.as_bytes(), ROOT_BODY, "body via HTTP CONNECT");
    assert_eq!(origin.requests().len(), 2);

    let status = client.terminate().await;
    assert!(status.success(), "SIGTERM → clean exit, got {status:?}");
}

/// One host name is all the client needs: `--discover localhost:PORT` fetches the relay's PvD
/// and curl browses through the local SOCKS5 port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_discover_learns_the_relays_from_the_pvd_and_curl_browses_through_socks5() {
    let dir = tempfile::tempdir().unwrap();
    let origin = HttpsOrigin::start(origin_bind()).await;
    let relay = TestRelay::start_with(|cfg| {
        resolve_localhost_to_origin_ip(cfg);
        cfg.pvd.identifier = Some("localhost".into());
    })
    .await;
    let token = dir.path().join("token");
    std::fs::write(&token, &relay.token).unwrap();
    let host = format!("localhost:{}", relay.addr.port());
    let (ca, token) = (
        relay.ca_pem.display().to_string(),
        token.display().to_string(),
    );
    let client = CfrClient::start(&[
        "--discover",
        &host,
        "--ca",
        &ca,
        "--token-file",
        &token,
        "--socks5",
        "127.0.0.1:0",
    ])
    .await;
    // stderr is read by a background task: wait (bounded) for the line.
    let deadline = std::time::Instant::now() + LIMIT;
    while !client
        .stderr()
        .contains("lists 1 relay(s) for TCP and 1 for UDP")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "reports the discovered relays: {}",
            client.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let socks = client.socks.expect("SOCKS5 address").to_string();
    let url = origin.localhost_url("/");
    let origin_ca = origin.ca_pem_path().to_str().unwrap();
    let (ok, body, err) = curl(&["--socks5-hostname", &socks, "--cacert", origin_ca, &url]).await;
    assert!(ok, "curl via discovered relay: {err}\n{}", client.stderr());
    assert_eq!(body.as_bytes(), ROOT_BODY);
    assert!(relay.core().requests_seen("h3") >= 1);
    let status = client.terminate().await;
    assert!(status.success(), "SIGTERM → clean exit, got {status:?}");

    // A host without a PvD (nothing listens there) is an error that says what failed.
    let err = cli_error(&["--discover", "localhost:1", "--ca", &ca]).await;
    assert!(
        err.contains("relay discovery") && err.contains("localhost:1"),
        "{err}"
    );
    let err = cli_error(&["--discover", "http://localhost/pvd"]).await;
    assert!(err.contains("https"), "{err}");
    let err = cli_error(&["--discover", &host, "--relay", "https://localhost:1"]).await;
    assert!(err.contains("cannot be used with"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_headless_chromium_loads_https_page_through_socks5() {
    let dir = tempfile::tempdir().unwrap();
    let origin = HttpsOrigin::start(origin_bind()).await;
    let (_relay, flags) = relay_and_flags(dir.path()).await;
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--socks5", "127.0.0.1:0"]);
    let client = CfrClient::start(&args).await;
    let socks = client.socks.unwrap();

    let text = String::from_utf8_lossy(PAGE_HTML);
    let marker = "cfr-testkit origin: hello";
    assert!(text.contains(marker));
    // Chromium trusts only the origin's CA; the SOCKS5 hop has no TLS.
    chromium_dump_dom(
        &format!("socks5://{socks}"),
        &[],
        &[("cfr-test", origin.ca_pem_path())],
        &origin.localhost_url("/page.html"),
        marker,
        Duration::from_secs(90),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ncfr client stderr:\n{}", client.stderr()));
    let reqs = origin.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path == "/page.html" && r.status == 200),
        "the origin served the page: {reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_keeps_serving_when_relay_is_unreachable_at_start() {
    // A UDP port with nothing behind it.
    let port = std::net::UdpSocket::bind(lo())
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    cfr_relay::tls::generate_dev_pki(dir.path(), &[]).unwrap();
    let relay_url = format!("https://127.0.0.1:{port}");
    let client = CfrClient::start(&[
        "--relay",
        &relay_url,
        "--ca",
        ca.to_str().unwrap(),
        "--token",
        "t",
        "--socks5",
        "127.0.0.1:0",
        "--connect-timeout-secs",
        "1",
    ])
    .await;
    let socks = client.socks.unwrap();
    client.wait_for_stderr("unreachable at start").await;

    // A tunnel request fails cleanly (general failure), and the listener keeps serving.
    let echo = TcpEcho::start(lo()).await;
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
        s.write_all(&[5, 1, 0]).await.unwrap();
        let mut sel = [0u8; 2];
        s.read_exact(&mut sel).await.unwrap();
        let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
        req.extend_from_slice(&echo.addr().port().to_be_bytes());
        s.write_all(&req).await.unwrap();
        let mut reply = [0u8; 10];
        tokio::time::timeout(LIMIT, s.read_exact(&mut reply))
            .await
            .expect("reply within the limit")
            .unwrap();
        assert_eq!(reply[1], 0x01, "no relay → general SOCKS server failure");
    }
    let status = client.terminate().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_falls_back_to_http2_over_tls_tcp_when_udp_to_the_relay_is_blackholed() {
    let dir = tempfile::tempdir().unwrap();
    let origin = HttpsOrigin::start(origin_bind()).await;
    // The relay's TLS/TCP front-end on a port of its own; on that port number UDP goes into a
    // socket nobody reads: QUIC packets vanish without an ICMP error, like on a network that drops
    // UDP. (The relay's HTTP/3 listener is on another port the client never hears of.)
    let relay = TestRelay::start_with(|c| {
        resolve_localhost_to_origin_ip(c);
        c.listen_tcp = Some(lo());
    })
    .await;
    let tcp_port = relay.tcp_addr.expect("TCP front-end").port();
    assert_ne!(
        tcp_port,
        relay.addr.port(),
        "HTTP/3 must not be reachable on the client's port"
    );
    let _blackhole = std::net::UdpSocket::bind(("127.0.0.1", tcp_port))
        .expect("bind the UDP blackhole on the TCP front-end's port number");
    let token = dir.path().join("token");
    std::fs::write(&token, &relay.token).unwrap();
    let relay_url = format!("https://localhost:{tcp_port}");
    let client = CfrClient::start(&[
        "--relay",
        &relay_url,
        "--ca",
        relay.ca_pem.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--socks5",
        "127.0.0.1:0",
        "--connect-timeout-secs",
        "2",
    ])
    .await;
    let socks = client.socks.unwrap().to_string();
    // The log names the transport the relay is used over.
    client
        .wait_for_stderr("using its TLS/TCP front-end over HTTP/2")
        .await;
    let log = client.wait_for_stderr("relay connected").await;
    assert!(
        log.lines().any(|l| l.contains("relay connected")
            && l.contains("transport")
            && l.contains("\"h2\"")),
        "the start-up line says the relay is used over h2:\n{log}"
    );

    let url = origin.localhost_url("/");
    let ca = origin.ca_pem_path().to_str().unwrap();
    let (ok, body, err) = curl(&["--socks5-hostname", &socks, "--cacert", ca, &url]).await;
    assert!(
        ok,
        "curl through SOCKS5 over the fallback: {err}\nstderr:\n{}",
        client.stderr()
    );
    assert_eq!(body.as_bytes(), ROOT_BODY, "origin body over the fallback");
    assert_eq!(
        (
            relay.core().requests_seen("h2"),
            relay.core().requests_seen("h3"),
            relay.core().requests_seen("http/1.1")
        ),
        (1, 0, 0),
        "the tunnel went over HTTP/2 on the TLS/TCP front-end"
    );
    let status = client.terminate().await;
    assert!(status.success(), "{status:?}");
}

/// Runs `cfr client ARGS` expecting a quick failure; returns stderr.
async fn cli_error(args: &[&str]) -> String {
    let mut cmd = Command::new(CFR);
    cmd.arg("client").args(args);
    let (ok, _, err) = run_group(cmd, LIMIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!ok, "cfr client {args:?} must fail");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rejects_bad_flags_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty_list = dir.path().join("empty.txt");
    std::fs::write(&empty_list, "# nothing\n").unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let ok_relay = "https://127.0.0.1:4433";
    for (args, expect) in [
        (vec!["--socks5", "127.0.0.1:0"], "no relay"),
        (
            vec!["--relay", "http://relay.example:4433"],
            "scheme must be https",
        ),
        (vec!["--relay", "https://relay.example:99999"], "bad port"),
        (
            vec!["--relay", ok_relay, "--token-file", missing],
            "cannot read token file",
        ),
        (vec!["--relay", ok_relay, "--ca", missing], "reading"),
        (
            vec!["--relay", ok_relay, "--pin-cert", missing],
            "--pin-cert",
        ),
        (
            vec!["--relay-list", empty_list.to_str().unwrap()],
            "has no relay URL",
        ),
        (
            vec!["--relay", ok_relay, "--select", "fastest"],
            "unknown relay selection policy",
        ),
        (
            vec!["--relay", ok_relay, "--socks5", "off"],
            "nothing to listen on",
        ),
        (
            vec!["--relay", ok_relay, "--socks5", "nowhere"],
            "expected ADDR:PORT",
        ),
        (
            vec!["--relay", ok_relay, "--socks-user", "u"],
            "--socks-pass",
        ),
    ] {
        let err = cli_error(&args).await;
        assert!(
            err.contains(expect),
            "cfr client {args:?}: expected {expect:?} in:\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_pin_cert_trusts_exactly_the_relays_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let origin = HttpsOrigin::start(origin_bind()).await;
    let (relay, flags) = relay_and_flags(dir.path()).await;
    let token_file = &flags[5];
    let url = origin.localhost_url("/");
    let ca = origin.ca_pem_path().to_str().unwrap();
    let right = relay.dir.path().join("server.pem");
    let wrong = origin.ca_pem_path().to_path_buf();
    for (pin, should_work) in [(right, true), (wrong, false)] {
        let client = CfrClient::start(&[
            "--relay",
            &relay.url(),
            "--pin-cert",
            pin.to_str().unwrap(),
            "--token-file",
            token_file,
            "--socks5",
            "127.0.0.1:0",
        ])
        .await;
        let socks = client.socks.unwrap().to_string();
        let (ok, body, err) = curl(&["--socks5-hostname", &socks, "--cacert", ca, &url]).await;
        if should_work {
            assert!(ok, "pinned relay certificate: {err}\n{}", client.stderr());
            assert_eq!(body.as_bytes(), ROOT_BODY);
        } else {
            assert!(!ok, "a pin that does not match the relay must not connect");
        }
    }
}
