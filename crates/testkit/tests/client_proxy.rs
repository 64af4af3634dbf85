//! End-to-end: the client library's local SOCKS5 / HTTP CONNECT listeners and relay selection,
//! through real relays on loopback to real origins (and Debian curl as the local client).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cfr_client::select::{Policy, RelaySet};
use cfr_client::{ClientConfig, DatagramMode, TunnelOpener};
use cfr_testkit::browser::{curl, origin_bind, resolve_localhost_to_origin_ip};
use cfr_testkit::origins::{HttpsOrigin, TcpEcho, UdpEcho, ROOT_BODY};
use cfr_testkit::relay::{named, target, TestRelay, ORIGIN_NAME};
use cfr_testkit::tunnels::{assert_echo, lo, retry_until, udp_echo, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Local SOCKS5 and HTTP CONNECT listeners on loopback over `opener`; stopped on drop.
struct Proxies {
    socks: SocketAddr,
    http: SocketAddr,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl Proxies {
    async fn start<O: TunnelOpener + Clone>(opener: O, auth: Option<(&str, &str)>) -> Proxies {
        let s = TcpListener::bind(lo()).await.unwrap();
        let h = TcpListener::bind(lo()).await.unwrap();
        let (socks, http) = (s.local_addr().unwrap(), h.local_addr().unwrap());
        let auth = auth.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let tasks = vec![
            tokio::spawn(cfr_client::local::socks5::serve(s, opener.clone(), auth)),
            tokio::spawn(cfr_client::local::http_proxy::serve(h, opener)),
        ];
        Proxies { socks, http, tasks }
    }

    fn assert_running(&self) {
        for t in &self.tasks {
            assert!(!t.is_finished(), "a local listener task ended");
        }
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// SOCKS5 "no auth" greeting + request; returns the stream and the reply code.
async fn socks_request(proxy: SocketAddr, request: &[u8]) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    assert_eq!(sel, [5, 0], "method selection: no authentication");
    s.write_all(request).await.unwrap();
    let code = read_socks_reply(&mut s).await;
    (s, code)
}

/// Reads a whole SOCKS5 reply (RFC 1928 §6) and returns REP.
async fn read_socks_reply(s: &mut TcpStream) -> u8 {
    let mut head = [0u8; 4];
    tokio::time::timeout(LIMIT, s.read_exact(&mut head))
        .await
        .expect("SOCKS5 reply within the limit")
        .expect("a SOCKS5 reply, not a closed connection");
    assert_eq!(head[0], 5, "reply version");
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await.unwrap();
            l[0] as usize + 2
        }
        other => panic!("reply with address type {other}"),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).await.unwrap();
    head[1]
}

fn connect_request(host: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 3, host.len() as u8];
    r.extend_from_slice(host.as_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r
}

async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut back))
        .await
        .expect("echo within the limit")
        .unwrap();
    assert_eq!(back, msg, "echo through the proxy must be byte-exact");
}

/// Everything the peer sends until it closes (bounded).
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out))
        .await
        .expect("peer closes within the limit");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_https_origin_via_socks5h_and_http_connect() {
    let origin = HttpsOrigin::start(origin_bind()).await;
    let relay = TestRelay::start_with(resolve_localhost_to_origin_ip).await;
    let proxies = Proxies::start(relay.client().await, None).await;
    let url = origin.localhost_url("/");
    let ca = origin.ca_pem_path().to_str().unwrap().to_owned();

    let socks = format!("127.0.0.1:{}", proxies.socks.port());
    let (ok, body, err) = curl(&["--socks5-hostname", &socks, "--cacert", &ca, &url]).await;
    assert!(ok, "curl --socks5-hostname failed: {err}");
    assert_eq!(body.as_bytes(), ROOT_BODY, "origin body via SOCKS5");

    let http = format!("http://127.0.0.1:{}", proxies.http.port());
    let (ok, body, err) = curl(&["-x", &http, "--cacert", &ca, &url]).await;
    assert!(ok, "curl -x http:// (CONNECT) failed: {err}");
    assert_eq!(body.as_bytes(), ROOT_BODY, "origin body via HTTP CONNECT");

    // Plain http:// through the HTTP proxy is refused by design: the relay only tunnels.
    let (_, body, _) = curl(&[
        "-x",
        &http,
        "-w",
        "\n%{http_code}",
        &format!("http://localhost:{}/", origin.addr().port()),
    ])
    .await;
    assert!(
        body.ends_with("\n501"),
        "plain GET must get 501, got {body:?}"
    );
    assert_eq!(
        origin.requests().len(),
        2,
        "exactly the two HTTPS fetches reached the origin"
    );
    proxies.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associate_echoes_datagrams_through_relay() {
    let echo = UdpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    for mode in [DatagramMode::Auto, DatagramMode::Capsules] {
        let mut cfg = relay.client_config();
        cfg.datagrams = mode;
        let client = cfr_client::RelayClient::connect(cfg).await.unwrap();
        let proxies = Proxies::start(client, None).await;

        // RFC 1928 §7: UDP ASSOCIATE with the address the client will send from.
        let udp = UdpSocket::bind(lo()).await.unwrap();
        let me = udp.local_addr().unwrap();
        let mut req = vec![5, 3, 0, 1, 127, 0, 0, 1];
        req.extend_from_slice(&me.port().to_be_bytes());
        let mut control = TcpStream::connect(proxies.socks).await.unwrap();
        control.write_all(&[5, 1, 0]).await.unwrap();
        let mut sel = [0u8; 2];
        control.read_exact(&mut sel).await.unwrap();
        control.write_all(&req).await.unwrap();
        let mut reply = [0u8; 10];
        control.read_exact(&mut reply).await.unwrap();
        assert_eq!(
            reply[..4],
            [5, 0, 0, 1],
            "UDP ASSOCIATE succeeded with an IPv4 BND"
        );
        let bnd = SocketAddr::from((
            [reply[4], reply[5], reply[6], reply[7]],
            u16::from_be_bytes([reply[8], reply[9]]),
        ));

        // By IP and by name (resolved at the relay); sizes incl. empty and 1200 bytes.
        let by_ip = {
            let mut h = vec![0, 0, 0, 1, 127, 0, 0, 1];
            h.extend_from_slice(&echo.addr().port().to_be_bytes());
            h
        };
        let by_name = {
            let mut h = vec![0, 0, 0, 3, ORIGIN_NAME.len() as u8];
            h.extend_from_slice(ORIGIN_NAME.as_bytes());
            h.extend_from_slice(&echo.addr().port().to_be_bytes());
            h
        };
        for (header, payload) in [
            (&by_ip, b"udp via socks5".to_vec()),
            (&by_ip, Vec::new()),
            (&by_name, vec![0xabu8; 1200]),
        ] {
            let mut pkt = header.clone();
            pkt.extend_from_slice(&payload);
            let mut got = None;
            let mut buf = vec![0u8; 65_535];
            for _ in 0..10 {
                udp.send_to(&pkt, bnd).await.unwrap();
                if let Ok(Ok((n, from))) =
                    tokio::time::timeout(Duration::from_secs(1), udp.recv_from(&mut buf)).await
                {
                    assert_eq!(from, bnd, "replies come from the relay port");
                    got = Some(buf[..n].to_vec());
                    break;
                }
            }
            let got = got.unwrap_or_else(|| {
                panic!("{mode:?}: no echo of a {}-byte datagram", payload.len())
            });
            assert_eq!(
                &got[..header.len()],
                &header[..],
                "{mode:?}: reply header names the destination as the client did"
            );
            assert_eq!(
                &got[header.len()..],
                &payload[..],
                "{mode:?}: echoed payload"
            );
        }
        drop(control);
        proxies.assert_running();
    }
    assert!(echo.count() >= 6);
}

/// Two relays that both resolve `which.test` — relay A to 127.0.0.2, relay B to 127.0.0.3 — and
/// an echo server on each of those addresses (same port), so the echo that answers names the relay.
struct TwoRelays {
    a: TestRelay,
    b: TestRelay,
    echo_a: TcpEcho,
    echo_b: TcpEcho,
    port: u16,
}

impl TwoRelays {
    async fn start() -> TwoRelays {
        let (echo_a, echo_b) = loop {
            let a = TcpEcho::start("127.0.0.2:0".parse().unwrap()).await;
            let b_addr = SocketAddr::from(([127, 0, 0, 3], a.addr().port()));
            // The port may be taken on 127.0.0.3; TcpEcho panics on bind failure, so probe first.
            if std::net::TcpListener::bind(b_addr).is_ok() {
                break (a, TcpEcho::start(b_addr).await);
            }
        };
        let port = echo_a.addr().port();
        let relay = |ip: &'static str| {
            TestRelay::start_with(move |cfg| {
                cfg.resolver
                    .hosts
                    .insert("which.test".into(), vec![ip.parse().unwrap()]);
                cfg.drain_secs = 2;
            })
        };
        let a = relay("127.0.0.2").await;
        let b = relay("127.0.0.3").await;
        TwoRelays {
            a,
            b,
            echo_a,
            echo_b,
            port,
        }
    }

    fn configs(&self) -> Vec<ClientConfig> {
        [&self.a, &self.b]
            .iter()
            .map(|r| {
                let mut c = r.client_config();
                c.connect_timeout = Duration::from_secs(3);
                c
            })
            .collect()
    }
}

/// Opens a tunnel to `which.test` and returns it after one echo round trip.
async fn which_tunnel(set: &RelaySet, port: u16) -> cfr_client::TcpTunnel {
    let mut t = tokio::time::timeout(LIMIT, set.connect_tcp(&named("which.test", port)))
        .await
        .expect("tunnel within the limit")
        .expect("tunnel opens");
    t.write_all(b"which").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(LIMIT, t.read_exact(&mut back))
        .await
        .expect("echo within the limit")
        .unwrap();
    assert_eq!(&back, b"which");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_policy_spreads_tunnels_over_both_relays() {
    let two = TwoRelays::start().await;
    let set = RelaySet::connect(two.configs(), Policy::Random)
        .await
        .unwrap();
    const N: usize = 40;
    for _ in 0..N {
        let mut t = which_tunnel(&set, two.port).await;
        t.shutdown().await.unwrap();
    }
    let (a, b) = (two.echo_a.peers().len(), two.echo_b.peers().len());
    assert_eq!(a + b, N, "every tunnel reached one of the two origins");
    assert!(
        a > 0 && b > 0,
        "random selection must use both relays over {N} tunnels (A got {a}, B got {b})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_policy_fails_over_when_first_relay_stops() {
    let two = TwoRelays::start().await;
    let set = RelaySet::connect(two.configs(), Policy::Ordered)
        .await
        .unwrap();
    for _ in 0..3 {
        let mut t = which_tunnel(&set, two.port).await;
        t.shutdown().await.unwrap();
    }
    assert_eq!(
        (two.echo_a.peers().len(), two.echo_b.peers().len()),
        (3, 0),
        "ordered: all tunnels go to the first relay while it is up"
    );

    let TwoRelays {
        a,
        b: _b,
        echo_a,
        echo_b,
        port,
        ..
    } = two;
    a.stop().await;

    // The first tunnel after the stop may pay for discovering it; within one handshake timeout.
    let started = Instant::now();
    let mut survivor = which_tunnel(&set, port).await;
    let failover = started.elapsed();
    assert!(
        failover < Duration::from_secs(3) + Duration::from_secs(2),
        "failover took {failover:?}, more than one handshake timeout (3 s) plus slack"
    );
    assert_eq!(
        echo_b.peers().len(),
        1,
        "the new tunnel went to the second relay"
    );

    // Later tunnels skip the down relay without waiting for it.
    for _ in 0..3 {
        let started = Instant::now();
        let mut t = which_tunnel(&set, port).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a down relay must not delay new tunnels ({:?})",
            started.elapsed()
        );
        t.shutdown().await.unwrap();
    }
    assert_eq!(
        echo_a.peers().len(),
        3,
        "nothing more reached the stopped relay"
    );
    assert_eq!(echo_b.peers().len(), 4);
    let status = set.status();
    assert!(!status[0].up && status[1].up, "status: {status:?}");

    // The tunnel opened on the survivor keeps working.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_echo(&mut survivor, b"still here").await;
}

/// A UDP forwarder in front of a relay that can be cut: afterwards it swallows every packet both
/// ways, like a relay host that died without closing anything (kill -9, power loss, partition).
struct Blackhole {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Blackhole {
    async fn start(upstream: SocketAddr) -> Blackhole {
        let front = Arc::new(UdpSocket::bind(lo()).await.unwrap());
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut readers = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    continue;
                };
                if flag.load(Ordering::Relaxed) {
                    continue;
                }
                let up = match peers.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let u = Arc::new(UdpSocket::bind(lo()).await.unwrap());
                        u.connect(upstream).await.unwrap();
                        let (u2, front, flag) = (u.clone(), front.clone(), flag.clone());
                        readers.spawn(async move {
                            let mut buf = vec![0u8; 65_535];
                            while let Ok(n) = u2.recv(&mut buf).await {
                                if !flag.load(Ordering::Relaxed) {
                                    let _ = front.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        peers.insert(from, u.clone());
                        u
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
        });
        Blackhole { addr, cut, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_policy_fails_over_when_first_relay_goes_silent() {
    let two = TwoRelays::start().await;
    let hole = Blackhole::start(two.a.addr).await;
    let mut configs = two.configs();
    configs[0].relay = format!("https://localhost:{}", hole.addr.port());
    let set = RelaySet::connect(configs, Policy::Ordered).await.unwrap();
    let mut t = which_tunnel(&set, two.port).await;
    t.shutdown().await.unwrap();
    assert_eq!(
        two.echo_a.peers().len(),
        1,
        "first relay used while it answers"
    );

    hole.cut.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut t = which_tunnel(&set, two.port).await;
    let failover = started.elapsed();
    assert!(
        failover < Duration::from_secs(3) + Duration::from_secs(2),
        "failover from a silent relay took {failover:?}, more than one handshake timeout (3 s) plus slack"
    );
    assert_eq!(
        two.echo_b.peers().len(),
        1,
        "the new tunnel went to the second relay"
    );
    t.shutdown().await.unwrap();
    let started = Instant::now();
    let _t = which_tunnel(&set, two.port).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the silent relay must not delay later tunnels ({:?})",
        started.elapsed()
    );
    assert_eq!((two.echo_a.peers().len(), two.echo_b.peers().len()), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_set_started_while_relay_is_down_serves_tunnels_once_it_is_up() {
    // Start a relay on a free port and stop it: its certificate and port are reused below.
    let dir = tempfile::tempdir().unwrap();
    let first = TestRelay::start().await;
    let addr = first.addr;
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(first.dir.path().join("server.pem"), &cert).unwrap();
    std::fs::copy(first.dir.path().join("server.key"), &key).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&first.ca_pem, &ca).unwrap();
    let mut cfg = first.client_config();
    cfg.trust = cfr_client::Trust::CaFile(ca);
    cfg.connect_timeout = Duration::from_secs(1);
    first.stop().await;

    let set = RelaySet::new(vec![cfg], Policy::Random).unwrap();
    let warm = set.warm_up().await;
    assert!(warm[0].1.is_err(), "nothing listens yet: {warm:?}");
    let echo = TcpEcho::start(lo()).await;
    let Err(err) = set
        .connect_tcp(&cfr_testkit::relay::target(echo.addr()))
        .await
    else {
        panic!("a tunnel opened with no relay listening");
    };
    assert!(matches!(err, cfr_client::ClientError::NoRelay(_)), "{err}");

    let _relay = TestRelay::start_with(|c| {
        c.listen = addr;
        c.cert = cert.clone();
        c.key = key.clone();
    })
    .await;
    let echo_target = target(echo.addr());
    retry_until(
        "tunnels once the relay came up",
        Duration::from_secs(10),
        || set.connect_tcp(&echo_target),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_listener_answers_malformed_input_and_keeps_serving() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let proxies = Proxies::start(relay.client().await, None).await;
    let p = proxies.socks;

    // A client that connects and says nothing must not block anyone else.
    let _idle = TcpStream::connect(p).await.unwrap();

    // Wrong version (SOCKS4): no SOCKS5 reply format applies; closed without a byte.
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    assert_eq!(read_all(&mut s).await, b"", "SOCKS4 greeting");

    // Zero methods, or none acceptable: X'FF' (RFC 1928 §3), then close.
    for greeting in [&[5u8, 0][..], &[5, 2, 0x80, 0x02], &[5, 1, 0x01]] {
        let mut s = TcpStream::connect(p).await.unwrap();
        s.write_all(greeting).await.unwrap();
        assert_eq!(read_all(&mut s).await, [5, 0xff], "greeting {greeting:?}");
    }

    // Truncated greeting, then EOF: closed quietly.
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(&[5, 3, 0]).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_all(&mut s).await, b"", "truncated greeting");

    // 64 KiB of garbage after a valid-looking start.
    let mut s = TcpStream::connect(p).await.unwrap();
    let mut junk = vec![5u8, 255];
    junk.extend((0..65_536u32).map(|i| (i % 251) as u8 | 0x80));
    let _ = s.write_all(&junk).await;
    let got = read_all(&mut s).await;
    assert!(
        got.is_empty() || got == [5, 0xff],
        "garbage greeting: {got:?}"
    );

    let port = echo.addr().port().to_be_bytes();
    // BIND and an unknown command: X'07'.
    for cmd in [2u8, 9] {
        let (_s, code) = socks_request(p, &[5, cmd, 0, 1, 127, 0, 0, 1, port[0], port[1]]).await;
        assert_eq!(code, 0x07, "command {cmd}: command not supported");
    }
    // Unknown address type: X'08'.
    let (_s, code) = socks_request(p, &[5, 1, 0, 0x05, 1, 2, 3, 4, 0, 80]).await;
    assert_eq!(code, 0x08, "address type not supported");
    // Non-zero reserved byte: general failure.
    let (_s, code) = socks_request(p, &[5, 1, 7, 1, 127, 0, 0, 1, port[0], port[1]]).await;
    assert_eq!(code, 0x01, "reserved byte must be zero");
    // A 255-byte "domain" of binary garbage, or port 0: host unreachable, never a tunnel.
    let mut garbage = vec![5, 1, 0, 3, 255];
    garbage.extend(std::iter::repeat_n(0xfeu8, 255));
    garbage.extend_from_slice(&port);
    let (_s, code) = socks_request(p, &garbage).await;
    assert_eq!(code, 0x04, "garbage domain name");
    let (_s, code) = socks_request(p, &connect_request(ORIGIN_NAME, 0)).await;
    assert_eq!(code, 0x04, "port 0");
    // A name the relay cannot resolve: the relay's dns_error maps to host unreachable.
    let (_s, code) = socks_request(p, &connect_request("nowhere.invalid", 80)).await;
    assert_eq!(code, 0x04, "unresolvable name");

    // After all that: a good CONNECT by name still works.
    let (mut s, code) = socks_request(p, &connect_request(ORIGIN_NAME, echo.addr().port())).await;
    assert_eq!(code, 0, "good request after bad ones");
    echo_roundtrip(&mut s, b"still serving").await;
    proxies.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_username_password_is_enforced() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let proxies = Proxies::start(relay.client().await, Some(("alice", "s3cret"))).await;
    let p = proxies.socks;

    // Offering only "no authentication" is not acceptable when credentials are required.
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_all(&mut s).await, [5, 0xff]);

    // Wrong password: status failure, then close (RFC 1929 §2).
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(&[5, 1, 2, 1, 5]).await.unwrap();
    s.write_all(b"alice\x05wrong").await.unwrap();
    assert_eq!(read_all(&mut s).await, [5, 2, 1, 1]);

    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(&[5, 2, 0, 2, 1, 5]).await.unwrap();
    s.write_all(b"alice\x06s3cret").await.unwrap();
    let mut four = [0u8; 4];
    s.read_exact(&mut four).await.unwrap();
    assert_eq!(four, [5, 2, 1, 0], "user/pass chosen and accepted");
    s.write_all(&connect_request(ORIGIN_NAME, echo.addr().port()))
        .await
        .unwrap();
    assert_eq!(read_socks_reply(&mut s).await, 0);
    echo_roundtrip(&mut s, b"authenticated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_answers_garbage_with_4xx_and_keeps_serving() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let proxies = Proxies::start(relay.client().await, None).await;
    let p = proxies.http;

    let status_of = |resp: &[u8]| -> String {
        String::from_utf8_lossy(resp)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    for (input, want) in [
        (
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"[..],
            "HTTP/1.1 400",
        ),
        (b"HELLO\r\n\r\n", "HTTP/1.1 400"),
        (b"CONNECT nonsense HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        (b"CONNECT localhost:99999 HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        (b"CONNECT [::1 HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        (
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            b"CONNECT nowhere.invalid:443 HTTP/1.1\r\n\r\n",
            "HTTP/1.1 502",
        ),
    ] {
        let mut s = TcpStream::connect(p).await.unwrap();
        s.write_all(input).await.unwrap();
        let resp = read_all(&mut s).await;
        assert!(
            status_of(&resp).starts_with(want),
            "{:?} → {:?}, expected {want}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(&resp)
        );
    }
    // Too many header fields, or a head that never ends: 431.
    let mut s = TcpStream::connect(p).await.unwrap();
    let mut big = b"CONNECT localhost:443 HTTP/1.1\r\n".to_vec();
    while big.len() < 40_000 {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let _ = s.write_all(&big).await;
    let resp = read_all(&mut s).await;
    assert!(
        status_of(&resp).starts_with("HTTP/1.1 431"),
        "many fields: {}",
        status_of(&resp)
    );
    let mut s = TcpStream::connect(p).await.unwrap();
    let mut long = b"CONNECT localhost:443 HTTP/1.1\r\nX-Long: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 40_000));
    let _ = s.write_all(&long).await;
    let resp = read_all(&mut s).await;
    assert!(
        status_of(&resp).starts_with("HTTP/1.1 431"),
        "one long field: {}",
        status_of(&resp)
    );
    // Half a head, then EOF: closed without an answer.
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(b"CONNECT localh").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_all(&mut s).await, b"");

    // Still serving: a good CONNECT with pipelined bytes.
    let mut s = TcpStream::connect(p).await.unwrap();
    let head = format!(
        "CONNECT {ORIGIN_NAME}:{} HTTP/1.1\r\nHost: x\r\n\r\nearly",
        echo.addr().port()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let expect = b"HTTP/1.1 200 Connection established\r\n\r\nearly";
    let mut got = vec![0u8; expect.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, expect);
    echo_roundtrip(&mut s, b"more").await;
    proxies.assert_running();
}

#[tokio::test]
async fn relay_set_falls_back_to_tls_tcp_for_tcp_and_udp_tunnels_when_udp_is_blackholed() {
    let echo = TcpEcho::start(lo()).await;
    let uecho = UdpEcho::start(lo()).await;
    // The TLS/TCP front-end on a port of its own; UDP to that port number vanishes into a socket
    // nobody reads (no ICMP error), as on a network that drops UDP.
    let relay = TestRelay::start_with(|c| c.listen_tcp = Some(lo())).await;
    let tcp_port = relay.tcp_addr.expect("TCP front-end").port();
    assert_ne!(tcp_port, relay.addr.port());
    let _blackhole = std::net::UdpSocket::bind(("127.0.0.1", tcp_port)).unwrap();
    let mut cfg = relay.front_config();
    cfg.connect_timeout = Duration::from_secs(1);

    // HTTP/3 only: nothing answers.
    let mut h3_only = cfg.clone();
    h3_only.transport = cfr_client::TransportMode::H3;
    assert!(
        RelaySet::connect(vec![h3_only], Policy::Ordered)
            .await
            .is_err(),
        "without the fallback the relay is unreachable"
    );

    let set = RelaySet::connect(vec![cfg], Policy::Ordered)
        .await
        .expect("the default transport falls back to TLS/TCP");
    assert_eq!(set.status()[0].protocol, Some("h2"), "HTTP/2 by ALPN");

    let mut t = tokio::time::timeout(LIMIT, set.connect_tcp(&target(echo.addr())))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.protocol(), "h2");
    assert_echo(&mut t, b"over the fallback").await;

    let u = tokio::time::timeout(LIMIT, set.connect_udp(&target(uecho.addr())))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u.protocol(), "h2");
    assert!(
        !u.uses_quic_datagrams(),
        "capsules on the TLS/TCP front-end"
    );
    for p in [b"dgram".to_vec(), vec![], vec![7; 1200]] {
        udp_echo(&u, &p, 5, Duration::from_secs(2)).await;
    }
    assert_eq!(
        (
            relay.core().requests_seen("h2"),
            relay.core().requests_seen("h3")
        ),
        (2, 0),
        "both tunnels went over HTTP/2"
    );
}

/// A UDP relay for one client on `port`: drops everything until `open` is set, then forwards
/// datagrams to `to` and the answers back (so the path "stops blocking UDP" mid-test).
async fn udp_gate(port: u16, to: SocketAddr, open: Arc<AtomicBool>) -> JoinHandle<()> {
    let front = UdpSocket::bind(("127.0.0.1", port)).await.unwrap();
    let back = UdpSocket::bind(lo()).await.unwrap();
    back.connect(to).await.unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    if open.load(Ordering::Relaxed) {
                        client = Some(from);
                        let _ = back.send(&a[..n]).await;
                    }
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_set_returns_to_http3_in_the_background_once_udp_gets_through() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.listen_tcp = Some(lo())).await;
    let tcp_port = relay.tcp_addr.expect("TCP front-end").port();
    assert_ne!(tcp_port, relay.addr.port());
    let open = Arc::new(AtomicBool::new(false));
    let gate = udp_gate(tcp_port, relay.addr, open.clone()).await;
    let mut cfg = relay.front_config();
    cfg.connect_timeout = Duration::from_secs(1);
    let set = RelaySet::connect(vec![cfg], Policy::Ordered).await.unwrap();
    assert_eq!(set.status()[0].protocol, Some("h2"), "UDP blocked: TLS/TCP");

    // A tunnel opened on the fallback stays there; new ones move to HTTP/3 once it works.
    let mut on_h2 = set.connect_tcp(&target(echo.addr())).await.unwrap();
    assert_eq!(on_h2.protocol(), "h2");
    open.store(true, Ordering::Relaxed);
    let h3_limit = cfr_client::select::H3_RETRY_MIN + LIMIT;
    let t = retry_until("new tunnels on HTTP/3", h3_limit, || async {
        let t = set
            .connect_tcp(&target(echo.addr()))
            .await
            .map_err(|e| e.to_string())?;
        match t.protocol() {
            "h3" => Ok(t),
            other => Err(format!("still on {other}")),
        }
    })
    .await;
    assert_eq!(set.status()[0].protocol, Some("h3"));
    drop(t);
    assert!(relay.core().requests_seen("h3") >= 1);
    assert_echo(&mut on_h2, b"still on h2").await;
    gate.abort();
}
