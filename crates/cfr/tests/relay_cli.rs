//! The `cfr relay` binary as an operator runs it: first start without credentials, the open-relay
//! warning, mTLS with `cfr cert --client`, graceful drain on SIGTERM, private logs, metrics, and
//! config validation. Everything on loopback; every wait bounded.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cfr_bench::process::CfrProcess;
use cfr_client::{ClientConfig, RelayClient, Trust};
use cfr_proto::{ProxyError, Target};
use cfr_testkit::origins::{pattern_fill, TcpEcho, UdpEcho};
use cfr_testkit::relay::{named, target};
use cfr_testkit::tunnels::{lo, refused, status_and_error, tcp_roundtrip, udp_roundtrip};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);

fn cfr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cfr"))
}

/// A `cfr relay` child process, killed on drop if it is still running.
struct RelayProc {
    process: CfrProcess,
    addr: SocketAddr,
    dir: PathBuf,
}

impl RelayProc {
    /// Starts `cfr relay --listen 127.0.0.1:0 --print-ready ARGS` in `dir` and waits for the ready
    /// line on stdout.
    fn start(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> RelayProc {
        let stderr = dir.join(format!("relay-{}.stderr", std::process::id()));
        let mut cmd = cfr();
        cmd.current_dir(dir)
            .args(["relay", "--listen", "127.0.0.1:0", "--print-ready"])
            .args(args)
            .env_remove("RUST_LOG");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let (process, line) =
            CfrProcess::spawn_ready(cmd, Some(&stderr), LIMIT).unwrap_or_else(|e| panic!("{e}"));
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line is not JSON ({e}): {line}"));
        let addr = ready["listen"].as_str().unwrap().parse().unwrap();
        RelayProc {
            process,
            addr,
            dir: dir.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Client settings trusting the relay's generated dev CA, with the generated token if any.
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.url(), Trust::CaFile(self.dir.join("certs/ca.pem")));
        c.token = std::fs::read_to_string(self.dir.join("certs/token"))
            .ok()
            .map(|t| t.trim().to_owned());
        c.connect_timeout = Duration::from_secs(5);
        c
    }

    async fn client(&self) -> RelayClient {
        RelayClient::connect(self.client_config())
            .await
            .expect("client connects to the cfr relay process")
    }

    fn stderr(&self) -> String {
        self.process.log()
    }

    /// Waits (at most `limit`) until the relay's stderr satisfies `done`; returns it. The file is
    /// re-read every 20 ms: a bounded wait on the log, not a guessed sleep.
    async fn wait_for_stderr(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.stderr();
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "expected {what} on the relay's stderr within {limit:?}; stderr:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.process.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits at most `limit` for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.process
            .wait_exit(limit)
            .await
            .unwrap_or_else(|e| panic!("cfr relay: {e}"))
    }
}

async fn refusal(client: &RelayClient, t: &Target, udp: bool) -> (Option<u16>, Option<ProxyError>) {
    status_and_error(&refused(client, t, udp).await)
}

fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// True if `text` contains `addr` as a whole address (not as the prefix of a longer number).
fn contains_addr(text: &str, addr: &str) -> bool {
    text.match_indices(addr).any(|(i, _)| {
        let next = text[i + addr.len()..].chars().next();
        let prev = text[..i].chars().next_back();
        !next.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !prev.is_some_and(|c| c.is_ascii_digit() || c == '.')
    })
}

// ---------------------------------------------------------------------------------------------
// Authentication on first start
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_start_without_auth_creates_a_private_token_and_prints_the_client_command() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let echo = TcpEcho::start(lo()).await;
    let relay = RelayProc::start(dir.path(), &["--allow-destination", "127.0.0.0/8"], &[]);
    let token_path = dir.path().join("certs/token");
    let token = std::fs::read_to_string(&token_path).expect("a token is generated on first start");
    let token = token.trim();
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file must be private");
    let key_mode = std::fs::metadata(dir.path().join("certs/server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the generated key must be private");
    let stderr = relay.stderr();
    assert!(
        stderr.contains(token),
        "the token is printed once:\n{stderr}"
    );
    let command = format!("client --relay {}", relay.url());
    assert!(
        stderr.contains(&command) && stderr.contains("--token-file") && stderr.contains("--ca"),
        "a ready-to-paste client command line is printed:\n{stderr}"
    );

    let client = relay.client().await;
    tcp_roundtrip(&client, &target(echo.addr()), b"with the generated token").await;
    let mut anonymous = relay.client_config();
    anonymous.token = None;
    let anonymous = RelayClient::connect(anonymous).await.unwrap();
    assert_eq!(
        refusal(&anonymous, &target(echo.addr()), false).await,
        (Some(407), Some(ProxyError::HttpRequestDenied))
    );
    assert_eq!(
        echo.peers().len(),
        1,
        "the anonymous request never reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_open_relay_warns_loudly_and_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let echo = TcpEcho::start(lo()).await;
    let relay = RelayProc::start(
        dir.path(),
        &[
            "--insecure-open-relay",
            "--allow-destination",
            "127.0.0.0/8",
        ],
        &[],
    );
    let stderr = relay.stderr();
    assert!(
        stderr.contains("WARN")
            && stderr.contains("insecure-open-relay")
            && stderr.contains("ANYONE"),
        "an open relay must say so loudly:\n{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "logs written to a file carry no ANSI colour codes:\n{stderr:?}"
    );
    assert!(
        !dir.path().join("certs/token").exists(),
        "no token is generated for an open relay"
    );
    let client = relay.client().await;
    tcp_roundtrip(&client, &target(echo.addr()), b"open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_client_issues_a_certificate_the_relay_accepts_for_mtls() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = cfr().args(["cert", "--dir"]).arg(&pki).output().unwrap();
    assert!(out.status.success(), "cfr cert: {out:?}");
    let out = cfr()
        .args(["cert", "--client", "alice", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(out.status.success(), "cfr cert --client: {out:?}");
    let (cert, key) = (pki.join("alice.pem"), pki.join("alice.key"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the client key must be private");

    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "cert = \"{p}/server.pem\"\nkey = \"{p}/server.key\"\nstate_dir = \"{p}\"\n\
             [auth]\nclient_ca = \"{p}/ca.pem\"\n[policy]\nallow = [\"127.0.0.0/8\"]\n",
            p = pki.display()
        ),
    )
    .unwrap();
    let echo = TcpEcho::start(lo()).await;
    let relay = RelayProc::start(dir.path(), &["--config", config.to_str().unwrap()], &[]);
    assert!(
        !pki.join("token").exists(),
        "with mTLS configured no dev token is generated"
    );
    let mut cfg = ClientConfig::new(relay.url(), Trust::CaFile(pki.join("ca.pem")));
    cfg.client_cert = Some((cert, key));
    let client = RelayClient::connect(cfg.clone()).await.unwrap();
    tcp_roundtrip(&client, &target(echo.addr()), b"alice via mTLS").await;
    cfg.client_cert = None;
    let anonymous = RelayClient::connect(cfg).await.unwrap();
    assert_eq!(
        refusal(&anonymous, &target(echo.addr()), false).await,
        (Some(407), Some(ProxyError::HttpRequestDenied))
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful drain
// ---------------------------------------------------------------------------------------------

/// What a sink saw on one connection.
struct SinkReport {
    received_len: u64,
    received_sha256: [u8; 32],
    sent_sha256: [u8; 32],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_loses_no_byte_of_open_tcp_tunnel() {
    const UP: u64 = 50 << 20;
    const DOWN: u64 = 50 << 20;
    const PAUSE_AT: u64 = 8 << 20;
    // A sink that hashes everything it receives and streams DOWN pattern bytes back.
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let sink_addr = listener.local_addr().unwrap();
    let (report_tx, report_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            while off < DOWN {
                let n = (DOWN - off).min(buf.len() as u64) as usize;
                pattern_fill(2, off, &mut buf[..n]);
                wr.write_all(&buf[..n]).await.unwrap();
                h.update(&buf[..n]);
                off += n as u64;
            }
            wr.shutdown().await.unwrap();
            <[u8; 32]>::from(h.finalize())
        });
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            len += n as u64;
        }
        let sent = writer.await.unwrap();
        let _ = report_tx.send(SinkReport {
            received_len: len,
            received_sha256: h.finalize().into(),
            sent_sha256: sent,
        });
    });

    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(
        dir.path(),
        &["--allow-destination", "127.0.0.0/8", "--drain-secs", "20"],
        &[],
    );
    let client = relay.client().await;
    let tunnel = client.connect_tcp(&target(sink_addr)).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let written = Arc::new(AtomicU64::new(0));
    let resume = Arc::new(tokio::sync::Notify::new());
    let writer = {
        let (written, resume) = (written.clone(), resume.clone());
        tokio::spawn(async move {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            let mut paused = false;
            while off < UP {
                if off >= PAUSE_AT && !paused {
                    // Hold the rest until SIGTERM was sent and new attempts were tried.
                    resume.notified().await;
                    paused = true;
                }
                let n = (UP - off).min(buf.len() as u64) as usize;
                pattern_fill(1, off, &mut buf[..n]);
                wr.write_all(&buf[..n]).await.unwrap();
                h.update(&buf[..n]);
                off += n as u64;
                written.store(off, Ordering::Relaxed);
            }
            wr.shutdown().await.unwrap();
            // Handed back so the tunnel outlives the sink's report: a tunnel on a connection the
            // client retired after GOAWAY holds the last reference to that connection.
            (<[u8; 32]>::from(h.finalize()), wr)
        })
    };
    let reader = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = rd.read(&mut buf).await.expect("download must not be cut");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            len += n as u64;
        }
        (len, <[u8; 32]>::from(h.finalize()), rd)
    });

    let deadline = Instant::now() + LIMIT;
    while written.load(Ordering::Relaxed) < PAUSE_AT {
        assert!(Instant::now() < deadline, "upload did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.signal("TERM");
    let sigterm_at = Instant::now();
    // The relay logs the drain once it stopped accepting (no new connection gets accepted after).
    relay
        .wait_for_stderr("the drain", LIMIT, |log| log.contains("draining"))
        .await;

    // Draining: no new connections, no new tunnels (GOAWAY on the open connection).
    let fresh = RelayClient::connect(relay.client_config()).await;
    assert!(
        fresh.is_err(),
        "a new connection during the drain must be refused"
    );
    let echo = TcpEcho::start(lo()).await;
    let new_tunnel = tokio::time::timeout(LIMIT, client.connect_tcp(&target(echo.addr())))
        .await
        .expect("a refused tunnel attempt must fail promptly");
    assert!(
        new_tunnel.is_err(),
        "a new tunnel during the drain must fail"
    );
    assert!(echo.peers().is_empty());

    // The open tunnel finishes, byte for byte, in both directions.
    resume.notify_one();
    let (sent_up, wr) = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("upload finishes during the drain")
        .unwrap();
    let (down_len, down_sha, rd) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("download finishes during the drain")
        .unwrap();
    let sink = tokio::time::timeout(LIMIT, report_rx)
        .await
        .expect("sink report")
        .unwrap_or_else(|_| panic!("the sink failed; relay stderr:\n{}", relay.stderr()));
    assert_eq!(sink.received_len, UP, "the destination received every byte");
    assert_eq!(sink.received_sha256, sent_up, "upload hash");
    assert_eq!(down_len, DOWN, "the client received every byte");
    assert_eq!(down_sha, sink.sent_sha256, "download hash");
    drop((wr, rd));

    let status = relay.wait_exit(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status after drain: {status:?}");
    assert!(
        sigterm_at.elapsed() < Duration::from_secs(20),
        "the relay exits once its tunnels are done, within the 20 s grace period (took {:?})",
        sigterm_at.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_never_link_a_client_address_to_a_destination_or_name_an_egress_address() {
    let echo = TcpEcho::start(lo()).await;
    let uecho = UdpEcho::start(lo()).await;
    let closed = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(
        dir.path(),
        &[
            "--log-format",
            "json",
            "--allow-destination",
            "127.0.0.0/8",
            "--egress-prefix",
            "127.1.0.0/16",
            "--resolve",
            "origin.test=127.0.0.1",
        ],
        &[("RUST_LOG", "debug")],
    );
    let client = relay.client().await;
    tcp_roundtrip(&client, &target(echo.addr()), b"by address").await;
    tcp_roundtrip(
        &client,
        &named("origin.test", echo.addr().port()),
        b"by name",
    )
    .await;
    udp_roundtrip(&client, &target(uecho.addr()), &[b"udp".to_vec()]).await;
    let failures = [
        (target(closed), false, Some(502)),
        (target("10.0.0.1:80".parse().unwrap()), false, Some(403)),
        (target("127.1.0.5:80".parse().unwrap()), true, Some(403)),
    ];
    for (t, udp, want) in &failures {
        assert_eq!(refusal(&client, t, *udp).await.0, *want, "{t}");
    }
    let mut anonymous = relay.client_config();
    anonymous.token = None;
    let anonymous = RelayClient::connect(anonymous).await.unwrap();
    assert_eq!(
        refusal(&anonymous, &target(echo.addr()), false).await.0,
        Some(407)
    );
    client.close();
    anonymous.close();
    drop((client, anonymous));
    // Every tunnel has logged its closing line (with bytes_up) before the relay stops.
    relay
        .wait_for_stderr("three closed-tunnel lines", LIMIT, |log| {
            log.lines().filter(|l| l.contains("bytes_up")).count() >= 3
        })
        .await;
    relay.signal("TERM");
    assert!(relay.wait_exit(LIMIT).await.success());

    let egress: Vec<String> = echo
        .peers()
        .into_iter()
        .chain(uecho.peers())
        .map(|p| p.ip().to_string())
        .collect();
    assert!(
        egress.len() >= 3 && egress.iter().all(|ip| ip.starts_with("127.1.")),
        "tunnels leave from the egress pool: {egress:?}"
    );
    let destinations: Vec<String> = [
        echo.addr().to_string(),
        format!("origin.test:{}", echo.addr().port()),
        uecho.addr().to_string(),
        closed.to_string(),
        "10.0.0.1".into(),
        "127.1.0.5".into(),
    ]
    .into();

    let stderr = relay.stderr();
    let json: Vec<(String, serde_json::Value)> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            (l.to_owned(), v)
        })
        .collect();
    let clients: Vec<String> = json
        .iter()
        .filter_map(|(_, v)| v.get("client").and_then(|c| c.as_str()).map(str::to_owned))
        .collect();
    assert!(
        clients.len() >= 2 && clients.iter().all(|c| c.parse::<SocketAddr>().is_ok()),
        "connection-level lines carry the client address: {clients:?}"
    );
    let tunnel_lines: Vec<&serde_json::Value> = json
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v.get("tunnel").is_some())
        .collect();
    assert!(
        tunnel_lines.len() >= 7,
        "every tunnel (3 ok, 3 failed, 1 unauthenticated) logs a line with its ID; got {}",
        tunnel_lines.len()
    );
    for v in &tunnel_lines {
        let id = v["tunnel"].as_str().unwrap();
        assert!(
            id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "random tunnel ID: {v}"
        );
        assert!(
            v.get("status").is_some(),
            "tunnel lines carry a status: {v}"
        );
    }
    let closed_lines: Vec<&&serde_json::Value> = tunnel_lines
        .iter()
        .filter(|v| v.get("bytes_up").is_some())
        .collect();
    assert!(
        closed_lines.len() >= 3
            && closed_lines
                .iter()
                .all(|v| v.get("destination").is_some() && v.get("duration_ms").is_some()),
        "closed tunnels log destination, bytes and duration: {closed_lines:?}"
    );
    let with_destination = json
        .iter()
        .filter(|(l, _)| destinations.iter().any(|d| l.contains(d.as_str())))
        .count();
    assert!(
        with_destination >= 6,
        "destinations are logged (tunnel lines): {with_destination}"
    );
    for line in stderr.lines() {
        let has_client = clients.iter().any(|c| contains_addr(line, c));
        let has_destination = destinations.iter().any(|d| contains_addr(line, d));
        assert!(
            !(has_client && has_destination),
            "a log line links a client address to a destination: {line}"
        );
        for ip in &egress {
            assert!(
                !contains_addr(line, ip),
                "a log line names an egress address ({ip}): {line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("metrics listener answers")
        .expect("metrics listener accepts");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut out))
        .await
        .expect("scrape within the limit")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "scrape: {text}");
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// Sum of every sample of `name` whose labels include all of `labels`.
fn sample_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn label_values(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = l.split_once('{') else {
            continue;
        };
        let Some((labels, _)) = rest.rsplit_once('}') else {
            continue;
        };
        for pair in labels.split(',') {
            if let Some((_, v)) = pair.split_once('=') {
                out.push(v.trim_matches('"').to_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_tunnels_bytes_refusals_and_drain_without_identifying_labels() {
    let echo = TcpEcho::start(lo()).await;
    let uecho = UdpEcho::start(lo()).await;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(
        dir.path(),
        &[
            "--metrics",
            &metrics.to_string(),
            "--allow-destination",
            "127.0.0.0/8",
            "--egress-prefix",
            "127.1.0.0/16",
            "--resolve",
            "origin.test=127.0.0.1",
        ],
        &[],
    );
    let before = scrape(metrics).await;
    for series in [
        "cfr_policy_refusals_total 0",
        "cfr_auth_failures_total 0",
        "cfr_draining 0",
    ] {
        assert!(
            before.lines().any(|l| l == series),
            "`{series}` is exported before any traffic:\n{before}"
        );
    }
    assert_eq!(sample_sum(&before, "cfr_tunnels_total", &[]), 0.0);

    let client = relay.client().await;
    let payload = vec![0x33u8; 100_000];
    tcp_roundtrip(&client, &named("origin.test", echo.addr().port()), &payload).await;
    udp_roundtrip(&client, &target(uecho.addr()), &[b"datagram".to_vec()]).await;
    // RFC 9298 §4: a datagram with an unknown context ID is dropped (and counted).
    let udp = client.connect_udp(&target(uecho.addr())).await.unwrap();
    udp.send_unknown_context(7, b"not for the destination")
        .await
        .unwrap();
    assert_eq!(
        refusal(&client, &target("10.0.0.1:80".parse().unwrap()), false)
            .await
            .0,
        Some(403)
    );
    assert_eq!(
        refusal(&client, &target(closed_port()), false).await.0,
        Some(502)
    );
    let mut anonymous = relay.client_config();
    anonymous.token = None;
    let anonymous = RelayClient::connect(anonymous).await.unwrap();
    assert_eq!(
        refusal(&anonymous, &target(echo.addr()), true).await.0,
        Some(407)
    );
    drop(anonymous);

    // Byte counters are added when a tunnel ends; the UDP tunnel ended with its drop.
    let deadline = Instant::now() + LIMIT;
    let after = loop {
        let body = scrape(metrics).await;
        if sample_sum(&body, "cfr_datagrams_total", &[("direction", "up")]) >= 1.0
            && sample_sum(
                &body,
                "cfr_bytes_total",
                &[("kind", "tcp"), ("direction", "up")],
            ) >= 100_000.0
            && sample_sum(
                &body,
                "cfr_drops_total",
                &[("reason", "unknown_context_id")],
            ) >= 1.0
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "byte counters never moved:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // (series, labels, at least)
    type Floor<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
    #[rustfmt::skip]
    let at_least: [Floor<'_>; 12] = [
        ("cfr_connections_total", &[], 2.0),
        ("cfr_tunnels_total", &[("kind", "tcp"), ("outcome", "ok")], 1.0),
        ("cfr_tunnels_total", &[("kind", "udp"), ("outcome", "ok")], 1.0),
        ("cfr_tunnels_total", &[("outcome", "destination_ip_prohibited")], 1.0),
        ("cfr_tunnels_total", &[("outcome", "connection_refused")], 1.0),
        ("cfr_tunnels_total", &[("outcome", "http_request_denied")], 1.0),
        ("cfr_bytes_total", &[("kind", "tcp"), ("direction", "down")], 100_000.0),
        ("cfr_bytes_total", &[("kind", "udp"), ("direction", "up")], 8.0),
        ("cfr_datagrams_total", &[("direction", "down")], 1.0),
        ("cfr_policy_refusals_total", &[], 1.0),
        ("cfr_auth_failures_total", &[], 1.0),
        ("cfr_egress_addresses_issued_total", &[], 2.0),
    ];
    for (name, labels, n) in at_least {
        let v = sample_sum(&after, name, labels);
        assert!(
            v >= n,
            "{name}{labels:?} = {v}, expected at least {n}:\n{after}"
        );
    }
    drop(udp);
    assert_eq!(sample_sum(&after, "cfr_draining", &[]), 0.0);

    // No label value identifies anyone or anything.
    let token = std::fs::read_to_string(dir.path().join("certs/token")).unwrap();
    let values = label_values(&after);
    assert!(!values.is_empty());
    for v in &values {
        assert!(
            v.parse::<IpAddr>().is_err()
                && v.parse::<SocketAddr>().is_err()
                && !v.contains("127.")
                && !v.contains("10.0.0.1")
                && !v.contains("origin.test")
                && !v.contains(token.trim()),
            "label value {v:?} identifies a client, destination, egress address or token"
        );
    }

    // Drain state is visible while a tunnel holds the relay open.
    let mut held = client.connect_tcp(&target(echo.addr())).await.unwrap();
    relay.signal("TERM");
    let deadline = Instant::now() + LIMIT;
    loop {
        let body = scrape(metrics).await;
        if sample_sum(&body, "cfr_draining", &[]) == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cfr_draining never became 1:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, held.read_to_end(&mut rest)).await;
    drop(held);
    assert!(relay.wait_exit(LIMIT).await.success());
}

// ---------------------------------------------------------------------------------------------
// Configuration validation
// ---------------------------------------------------------------------------------------------

#[test]
fn check_config_prints_effective_settings_and_rejects_bad_files_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\ntotal_tunnels = 77\n").unwrap();
    let out = cfr().arg("check-config").arg(&good).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "valid config: {out:?}");
    for setting in [
        "total_tunnels = 77",
        "tunnels_per_connection = 256",
        "udp_idle_secs = 120",
        "drain_secs = 30",
    ] {
        assert!(
            stdout.contains(setting),
            "effective settings include {setting}:\n{stdout}"
        );
    }

    // A QUIC-LB key others can read is refused at check time, not only at start.
    let lb_key = dir.path().join("quic-lb.key");
    std::fs::write(&lb_key, "8f95f09245765f80256934e50c66207f\n").unwrap();
    std::fs::set_permissions(&lb_key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let lb_key_toml = format!(
        "[quic_lb]\nconfig_rotation = 0\nserver_id = \"01\"\nnonce_len = 4\nkey_file = \"{}\"\n",
        lb_key.display()
    );
    for (name, text, key) in [
        (
            "quic_lb.toml",
            "[quic_lb]\nconfig_rotation = 7\nserver_id = \"01\"\nnonce_len = 4\n",
            "quic_lb",
        ),
        ("quic_lb_key.toml", lb_key_toml.as_str(), "quic_lb.key_file"),
        (
            "unknown.toml",
            "[limits]\ntunnels_per_conection = 3\n",
            "tunnels_per_conection",
        ),
        (
            "range.toml",
            "[timeouts]\nudp_idle_secs = 0\n",
            "timeouts.udp_idle_secs",
        ),
        (
            "buffer.toml",
            "[limits]\ntcp_buffer_bytes = 10\n",
            "limits.tcp_buffer_bytes",
        ),
        (
            "ports.toml",
            "[policy]\nports = [\"0-80\"]\n",
            "policy.ports",
        ),
        (
            "mtls.toml",
            "[auth]\nrequire_client_cert = true\n",
            "auth.require_client_cert",
        ),
        ("toplevel.toml", "listne = \"[::]:443\"\n", "listne"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = cfr().arg("check-config").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} must be rejected");
        assert!(
            stderr.contains(key),
            "{name}: the error must name `{key}`:\n{stderr}"
        );

        // The relay refuses to start on the same file, naming the same key.
        let started = Instant::now();
        let out = cfr()
            .current_dir(dir.path())
            .args(["relay", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "relay must not start with {name}");
        assert!(
            stderr.contains(key),
            "relay with {name} must name `{key}`:\n{stderr}"
        );
        assert!(
            !stderr.contains("listening"),
            "relay with {name} must not listen:\n{stderr}"
        );
        assert!(started.elapsed() < LIMIT);
    }
}
