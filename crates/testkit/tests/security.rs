//! "Not an open relay", end to end over real loopback sockets: authentication (tokens, mTLS) before
//! any DNS lookup or dial, the destination policy (SSRF table), limits, back-pressure, drops and
//! timeouts. Binary-level checks (drain on SIGTERM, logs, metrics, config) live in crates/cfr/tests.
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cfr_client::{ClientError, RelayClient};
use cfr_proto::{Host, ProxyError, Target};
use cfr_relay::config::PortRange;
use cfr_relay::resolve::{ResolveFuture, Resolver};
use cfr_relay::tunnel::RelayCounters;
use cfr_relay::HostsThenSystem;
use cfr_testkit::origins::{TcpEcho, UdpEcho};
use cfr_testkit::relay::{named, target, test_config, TestRelay, ORIGIN_NAME};
use cfr_testkit::tunnels::{
    lo, refused, retry_until, status_and_error, tcp_roundtrip, udp_echo_within, LIMIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn count(c: &AtomicU64) -> u64 {
    RelayCounters::get(c)
}

fn details(e: &ClientError) -> String {
    match e {
        ClientError::Refused {
            proxy_status: Some(p),
            ..
        } => p.details.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

fn ip_target(ip: &str, port: u16) -> Target {
    Target {
        host: Host::Ip(ip.parse().unwrap()),
        port,
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

/// Counts lookups, to prove unauthenticated requests never reach the resolver.
struct CountingResolver {
    inner: HostsThenSystem,
    lookups: Arc<AtomicUsize>,
}

impl Resolver for CountingResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.resolve(name)
    }
}

#[tokio::test]
async fn unauthenticated_requests_get_407_with_challenge_before_any_dns_lookup() {
    let echo = TcpEcho::start(lo()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let lookups = Arc::new(AtomicUsize::new(0));
    let resolver = Arc::new(CountingResolver {
        inner: HostsThenSystem {
            hosts: cfg.resolver.hosts.clone(),
            hosts_only: true,
        },
        lookups: lookups.clone(),
    });
    let relay = TestRelay::start_with_resolver(dir, cfg, resolver).await;
    let by_name = named(ORIGIN_NAME, echo.addr().port());

    for token in [None, Some("wrong-token")] {
        let mut cfg = relay.client_config();
        cfg.token = token.map(str::to_owned);
        let client = RelayClient::connect(cfg).await.unwrap();
        for udp in [false, true] {
            let e = refused(&client, &by_name, udp).await;
            assert_eq!(
                status_and_error(&e),
                (Some(407), Some(ProxyError::HttpRequestDenied)),
                "token {token:?}, udp={udp}: expected 407 http_request_denied"
            );
        }
        // The raw response carries the challenge (RFC 9110 §11.7.1) and Proxy-Status.
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(cfr_proto::target::authority(&by_name))
            .body(())
            .unwrap();
        let raw = client.send_request(req).await.unwrap();
        assert_eq!(raw.response.status().as_u16(), 407);
        let challenge = raw.response.headers().get("proxy-authenticate");
        assert!(
            challenge.is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")),
            "407 must carry Proxy-Authenticate: Bearer, got {challenge:?}"
        );
        let ps = raw.response.headers().get("proxy-status").unwrap();
        assert!(
            ps.to_str().unwrap().contains("http_request_denied"),
            "Proxy-Status {ps:?}"
        );
    }
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        0,
        "no DNS lookup may happen for an unauthenticated request"
    );
    assert!(
        echo.peers().is_empty(),
        "no dial for unauthenticated requests"
    );
    assert_eq!(count(&relay.core().counters.auth_failures), 6);

    // `Authorization: Bearer` works as well as `Proxy-Authorization`.
    let mut cfg = relay.client_config();
    cfg.token = None;
    let client = RelayClient::connect(cfg).await.unwrap();
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(cfr_proto::target::authority(&by_name))
        .body(())
        .unwrap();
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {}", relay.token).parse().unwrap(),
    );
    let raw = client.send_request(req).await.unwrap();
    assert_eq!(
        raw.response.status().as_u16(),
        200,
        "Authorization: Bearer <token> must be accepted"
    );
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        1,
        "authenticated: one lookup"
    );
}

#[tokio::test]
async fn client_certificate_authenticates_and_require_client_cert_needs_cert_and_token() {
    let echo = TcpEcho::start(lo()).await;
    let t = target(echo.addr());

    // client_ca alone: a certificate is enough, no certificate and no token is 407.
    let relay =
        TestRelay::start_with(|c| c.auth.client_ca = Some(c.state_dir.join("ca.pem"))).await;
    let (cert, key) = cfr_relay::tls::generate_client_cert(relay.dir.path(), "alice").unwrap();
    let mut with_cert = relay.client_config();
    with_cert.token = None;
    with_cert.client_cert = Some((cert.clone(), key.clone()));
    let client = RelayClient::connect(with_cert.clone()).await.unwrap();
    tcp_roundtrip(&client, &t, b"mtls without a token").await;
    let mut neither = relay.client_config();
    neither.token = None;
    let client = RelayClient::connect(neither).await.unwrap();
    let e = refused(&client, &t, false).await;
    assert_eq!(
        status_and_error(&e),
        (Some(407), Some(ProxyError::HttpRequestDenied))
    );
    assert_eq!(
        echo.peers().len(),
        1,
        "only the mTLS tunnel reached the origin"
    );

    // require_client_cert: token alone and certificate alone are 407; both together work.
    let relay = TestRelay::start_with(|c| {
        c.auth.client_ca = Some(c.state_dir.join("ca.pem"));
        c.auth.require_client_cert = true;
    })
    .await;
    let (cert, key) = cfr_relay::tls::generate_client_cert(relay.dir.path(), "bob").unwrap();
    let token_only = RelayClient::connect(relay.client_config()).await.unwrap();
    let e = refused(&token_only, &t, false).await;
    assert_eq!(
        status_and_error(&e),
        (Some(407), Some(ProxyError::HttpRequestDenied)),
        "require_client_cert: a token alone must not do"
    );
    let mut cert_only = relay.client_config();
    cert_only.token = None;
    cert_only.client_cert = Some((cert.clone(), key.clone()));
    let client = RelayClient::connect(cert_only).await.unwrap();
    let e = refused(&client, &t, true).await;
    assert_eq!(e.status().map(|s| s.as_u16()), Some(407));
    let mut both = relay.client_config();
    both.client_cert = Some((cert, key));
    let client = RelayClient::connect(both).await.unwrap();
    tcp_roundtrip(&client, &t, b"certificate and token").await;
    assert_eq!(echo.peers().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Destination policy
// ---------------------------------------------------------------------------------------------

/// Every reserved range, in every spelling: IPv4, IPv6, IPv4-mapped, IPv4-compatible, NAT64
/// (64:ff9b::/96 and the local-use 64:ff9b:1::/48), 6to4.
const RESERVED: &[&str] = &[
    // IPv4
    "0.0.0.0",
    "0.1.2.3",
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "10.255.255.254",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "192.168.255.254",
    "100.64.0.1",
    "100.127.255.254",
    "169.254.169.254",
    "169.254.0.1",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "198.18.0.1",
    "192.0.0.1",
    // IPv6
    "::",
    "::1",
    "fe80::1",
    "febf::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "ff02::1",
    "ff05::1:3",
    "ff0e::1",
    "2001:db8::1",
    "3fff::1",
    "fec0::1",
    "100::1",
    // IPv4-mapped
    "::ffff:0.0.0.0",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:172.16.0.1",
    "::ffff:192.168.1.1",
    "::ffff:100.64.0.1",
    "::ffff:169.254.169.254",
    "::ffff:224.0.0.1",
    "::ffff:255.255.255.255",
    "::ffff:192.0.2.1",
    // IPv4-compatible (deprecated)
    "::127.0.0.1",
    "::10.0.0.1",
    "::8.8.8.8",
    // NAT64
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::c0a8:101",
    "64:ff9b::6440:1",
    "64:ff9b:1::808:808",
    // 6to4
    "2002:7f00:1::1",
    "2002:a00:1::1",
    "2002:a9fe:a9fe::1",
    "2002:c0a8:101::1",
];

#[tokio::test]
async fn every_reserved_range_is_refused_403_literal_and_by_name_for_connect_and_connect_udp() {
    // No allow list at all: the built-in deny list is all that stands between client and network.
    // None of these addresses is ever dialled: the policy answers before a socket exists.
    let relay = TestRelay::start_with(|c| {
        c.policy.allow.clear();
        for (i, ip) in RESERVED.iter().enumerate() {
            c.resolver
                .hosts
                .insert(format!("r{i}.test"), vec![ip.parse::<IpAddr>().unwrap()]);
        }
    })
    .await;
    let client = relay.client().await;
    let counters = &relay.core().counters;
    for (i, ip) in RESERVED.iter().enumerate() {
        let by_name = named(&format!("r{i}.test"), 443);
        for t in [ip_target(ip, 443), by_name] {
            for udp in [false, true] {
                let before = count(&counters.policy_refusals);
                let started = Instant::now();
                let e = refused(&client, &t, udp).await;
                assert_eq!(
                    status_and_error(&e),
                    (Some(403), Some(ProxyError::DestinationIpProhibited)),
                    "{ip} as {t} (udp={udp}) must be refused by policy"
                );
                assert_eq!(
                    count(&counters.policy_refusals),
                    before + 1,
                    "{ip} as {t} (udp={udp}): the policy-refusal counter must move"
                );
                // A dial would take at least a connect attempt (connect_secs = 3 here).
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "{ip} as {t} (udp={udp}): refusal took {:?}",
                    started.elapsed()
                );
            }
        }
    }
}

#[tokio::test]
async fn loopback_origins_see_no_connection_when_loopback_is_not_allowed() {
    let tcp4 = TcpEcho::start(lo()).await;
    let udp4 = UdpEcho::start(lo()).await;
    let tcp6 = TcpEcho::start("[::1]:0".parse().unwrap()).await;
    let udp6 = UdpEcho::start("[::1]:0".parse().unwrap()).await;
    let relay = TestRelay::start_with(|c| {
        c.policy.allow.clear();
        c.resolver.hosts.insert(
            "mapped.test".into(),
            vec!["::ffff:127.0.0.1".parse().unwrap()],
        );
    })
    .await;
    let client = relay.client().await;
    let (p4t, p4u) = (tcp4.addr().port(), udp4.addr().port());
    let (p6t, p6u) = (tcp6.addr().port(), udp6.addr().port());
    let spellings = |p4: u16, p6: u16| {
        vec![
            ip_target("127.0.0.1", p4),
            ip_target("::ffff:127.0.0.1", p4),
            ip_target("::127.0.0.1", p4),
            ip_target("64:ff9b::7f00:1", p4),
            ip_target("2002:7f00:1::1", p4),
            named(ORIGIN_NAME, p4),
            named("mapped.test", p4),
            named("dual.test", p4),
            ip_target("::1", p6),
            named("origin6.test", p6),
        ]
    };
    for (udp, targets) in [(false, spellings(p4t, p6t)), (true, spellings(p4u, p6u))] {
        for t in targets {
            let e = refused(&client, &t, udp).await;
            assert_eq!(
                status_and_error(&e),
                (Some(403), Some(ProxyError::DestinationIpProhibited)),
                "{t} (udp={udp})"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tcp4.peers().is_empty() && tcp6.peers().is_empty(),
        "a refused TCP destination must never see a connection attempt"
    );
    assert_eq!(
        (udp4.count(), udp6.count()),
        (0, 0),
        "a refused UDP destination must never see a datagram"
    );
}

#[tokio::test]
async fn the_relays_own_listener_and_egress_prefix_are_refused_even_inside_an_allowed_range() {
    let echo = TcpEcho::start(lo()).await;
    let uecho = UdpEcho::start(lo()).await;
    // 127.0.0.0/8 is allowed; the egress pool 127.1.0.0/16 is inside it.
    let relay = TestRelay::start_with(|c| {
        c.egress.prefixes = vec!["127.1.0.0/16".parse().unwrap()];
        c.resolver
            .hosts
            .insert("egress.test".into(), vec!["127.1.2.3".parse().unwrap()]);
    })
    .await;
    let client = relay.client().await;
    let mut own = vec![
        target(relay.addr),
        ip_target("::ffff:127.0.0.1", relay.addr.port()),
        named(ORIGIN_NAME, relay.addr.port()),
        ip_target("127.1.0.7", 80),
        ip_target("127.1.255.254", echo.addr().port()),
        ip_target("::ffff:127.1.0.7", 80),
        named("egress.test", 443),
    ];
    if let Some(tcp) = relay.tcp_addr {
        own.push(target(tcp));
    }
    for t in own {
        for udp in [false, true] {
            let e = refused(&client, &t, udp).await;
            assert_eq!(
                status_and_error(&e),
                (Some(403), Some(ProxyError::DestinationIpProhibited)),
                "{t} (udp={udp}) is the relay itself"
            );
        }
    }
    // Ordinary allowed destinations still work, and leave from the egress pool.
    tcp_roundtrip(&client, &target(echo.addr()), b"from the pool").await;
    let tunnel = client.connect_udp(&target(uecho.addr())).await.unwrap();
    udp_echo_within(&tunnel, b"pool", Duration::from_secs(5)).await;
    let pool: ipnet::IpNet = "127.1.0.0/16".parse().unwrap();
    for peer in echo.peers().into_iter().chain(uecho.peers()) {
        assert!(
            pool.contains(&peer.ip()),
            "{peer} should come from the egress pool"
        );
    }
}

#[tokio::test]
async fn operator_deny_beats_allow_and_ports_outside_the_list_are_refused() {
    let allowed = TcpEcho::start(lo()).await;
    let denied = TcpEcho::start("127.0.0.2:0".parse().unwrap()).await;
    let denied_udp = UdpEcho::start("127.0.0.2:0".parse().unwrap()).await;
    let wrong_port = TcpEcho::start(lo()).await;
    let ports = [
        allowed.addr().port(),
        denied.addr().port(),
        denied_udp.addr().port(),
    ];
    let relay = TestRelay::start_with(|c| {
        c.policy.deny = vec!["127.0.0.2/32".parse().unwrap()];
        c.policy.ports = ports
            .iter()
            .map(|&p| PortRange::single(p).expect("a destination port"))
            .collect();
        c.resolver
            .hosts
            .insert("denied.test".into(), vec!["127.0.0.2".parse().unwrap()]);
    })
    .await;
    let client = relay.client().await;
    tcp_roundtrip(&client, &target(allowed.addr()), b"allowed").await;
    for (t, udp) in [
        (target(denied.addr()), false),
        (ip_target("::ffff:127.0.0.2", denied.addr().port()), false),
        (named("denied.test", denied.addr().port()), false),
        (target(denied_udp.addr()), true),
    ] {
        let e = refused(&client, &t, udp).await;
        assert_eq!(
            status_and_error(&e),
            (Some(403), Some(ProxyError::DestinationIpProhibited)),
            "{t}"
        );
        assert!(
            details(&e).contains("operator"),
            "{t}: refused by the deny list, got details {:?}",
            details(&e)
        );
    }
    for udp in [false, true] {
        let e = refused(&client, &target(wrong_port.addr()), udp).await;
        assert_eq!(
            status_and_error(&e),
            (Some(403), Some(ProxyError::DestinationIpProhibited))
        );
        assert!(details(&e).contains("port"), "got {:?}", details(&e));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(denied.peers().is_empty() && wrong_port.peers().is_empty());
    assert_eq!(denied_udp.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn total_tunnel_limit_answers_503_across_connections_and_frees_up() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.limits.total_tunnels = 2).await;
    let a = relay.client().await;
    let b = relay.client().await;
    let first = a.connect_tcp(&target(echo.addr())).await.unwrap();
    let _second = b.connect_tcp(&target(echo.addr())).await.unwrap();
    for (client, udp) in [(&a, false), (&b, true)] {
        let e = refused(client, &target(echo.addr()), udp).await;
        assert_eq!(
            status_and_error(&e),
            (Some(503), Some(ProxyError::ConnectionLimitReached)),
            "relay-wide tunnel limit"
        );
    }
    drop(first);
    let echo_target = target(echo.addr());
    retry_until(
        "a freed tunnel slot must be reusable",
        Duration::from_secs(5),
        || async {
            let r = a.connect_tcp(&echo_target).await;
            // Until the slot is free the answer is the limit's 503, nothing else.
            if let Err(e) = &r {
                assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
            }
            r
        },
    )
    .await;
}

#[tokio::test]
async fn connections_per_client_refuses_the_extra_connection_and_the_first_keeps_working() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.limits.connections_per_client = 1).await;
    let first = relay.client().await;
    tcp_roundtrip(&first, &target(echo.addr()), b"first").await;
    let mut cfg = relay.client_config();
    cfg.connect_timeout = Duration::from_secs(5);
    let second = RelayClient::connect(cfg.clone()).await;
    assert!(
        second.is_err(),
        "a second connection from the same address must be refused"
    );
    tcp_roundtrip(&first, &target(echo.addr()), b"first still works").await;
    first.close();
    drop(first);
    let third = retry_until(
        "after the first connection closed a new one must be accepted",
        Duration::from_secs(10),
        || RelayClient::connect(cfg.clone()),
    )
    .await;
    tcp_roundtrip(&third, &target(echo.addr()), b"after the first closed").await;
}

#[tokio::test]
async fn tcp_tunnel_to_a_destination_that_never_reads_stalls_the_client_within_a_bound() {
    const BOUND: usize = 64 << 20;
    // Accepts and holds connections without ever reading.
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let mut tunnel = client.connect_tcp(&target(addr)).await.unwrap();
    let chunk = vec![0x42u8; 64 * 1024];
    let mut accepted = 0usize;
    let stalled = loop {
        match tokio::time::timeout(Duration::from_secs(2), tunnel.write_all(&chunk)).await {
            Ok(Ok(())) => accepted += chunk.len(),
            Ok(Err(e)) => panic!("write failed instead of stalling after {accepted} bytes: {e}"),
            Err(_) => break true,
        }
        if accepted > BOUND {
            break false;
        }
    };
    assert!(
        stalled,
        "writes into a tunnel whose destination never reads must block; {accepted} bytes were \
         accepted without stalling"
    );
    assert!(
        accepted <= BOUND,
        "at most {BOUND} bytes may be buffered (relay buffer + QUIC windows + socket buffers), \
         {accepted} were accepted"
    );
    holder.abort();
}

#[tokio::test]
async fn udp_flood_towards_a_slow_client_drops_and_counts_without_stalling_other_tunnels() {
    // A destination that answers the first datagram with a 40 MB burst.
    let flooder = tokio::net::UdpSocket::bind(lo()).await.unwrap();
    let flood_addr = flooder.local_addr().unwrap();
    let flood = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let Ok((_, peer)) = flooder.recv_from(&mut buf).await else {
            return;
        };
        let payload = [0x5au8; 1000];
        for i in 0..40_000u32 {
            let _ = flooder.send_to(&payload, peer).await;
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let echo = UdpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.limits.datagram_queue = 8).await;
    let client = relay.client().await;

    // The flooded tunnel: capsules on a request stream this test never reads, so the relay's
    // stream towards the client fills up (flow control) and its capsule queue overflows.
    let t = target(flood_addr);
    let uri = format!("{}{}", relay.url(), cfr_proto::target::connect_udp_path(&t));
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(uri)
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .header("capsule-protocol", "?1")
        .body(())
        .unwrap();
    let mut raw = client.send_request(req).await.unwrap();
    assert_eq!(raw.response.status().as_u16(), 200);
    let mut capsule = Vec::new();
    cfr_proto::capsule::encode_datagram(0, b"go", &mut capsule);
    raw.stream.send_data(Bytes::from(capsule)).await.unwrap();

    // Meanwhile another tunnel on the same connection keeps echoing promptly.
    let other = client.connect_udp(&target(echo.addr())).await.unwrap();
    // udp_echo_within panics unless the echo is back within its limit: that bound is the
    // assertion. The ticks spread the ten checks over the flood instead of bunching them.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..10u8 {
        tick.tick().await;
        udp_echo_within(&other, &[i; 100], Duration::from_secs(3)).await;
    }
    let drops = &relay.core().counters.datagram_drops;
    retry_until(
        "a flood towards a client that does not read must be dropped and counted",
        Duration::from_secs(15),
        || async {
            match count(drops) {
                0 => Err("no drop counted yet"),
                n => Ok(n),
            }
        },
    )
    .await;
    udp_echo_within(&other, b"after the flood", Duration::from_secs(3)).await;
    flood.abort();
    drop(raw);
}

#[tokio::test]
async fn stalled_handshake_is_cut_off_after_handshake_secs() {
    let relay = TestRelay::start_with(|c| c.timeouts.handshake_secs = 1).await;
    let ca = std::fs::read(&relay.ca_pem).unwrap();
    // A client whose certificate check takes `delay` (it stops answering the relay meanwhile).
    let connect = |delay: Duration| {
        let ca = ca.clone();
        let addr = relay.addr;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let outcome = rt.block_on(stalling_client(addr, ca, delay));
            let _ = tx.send(outcome);
        });
        rx
    };
    // Control: no stall, the connection is still up two seconds later.
    let fine = tokio::time::timeout(LIMIT, connect(Duration::ZERO))
        .await
        .expect("control client finished within the limit")
        .unwrap();
    assert_eq!(fine, Ok(false), "an ordinary handshake must not be cut off");
    // A client that stalls 3 s in the middle of the handshake finds the connection closed.
    let stalled = tokio::time::timeout(LIMIT, connect(Duration::from_secs(3)))
        .await
        .expect("stalled client finished within the limit")
        .unwrap();
    assert!(
        matches!(stalled, Err(_) | Ok(true)),
        "the relay must abandon a handshake that exceeds handshake_secs, got {stalled:?}"
    );
}

/// Connects with a verifier that sleeps `delay`; `Ok(closed within 2 s of connecting)` or the
/// handshake error.
async fn stalling_client(
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    delay: Duration,
) -> Result<bool, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&ca_pem) {
        roots.add(c).unwrap();
    }
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SlowVerifier { inner, delay }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client(lo()).unwrap();
    let conn = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let closed = tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .is_ok();
    Ok(closed)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[derive(Debug)]
struct SlowVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    delay: Duration,
}

impl rustls::client::danger::ServerCertVerifier for SlowVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // Blocks this client's (single-threaded) runtime: it stops answering mid-handshake.
        std::thread::sleep(self.delay);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[tokio::test]
async fn idle_tcp_and_udp_tunnels_are_closed_by_the_relay_after_their_timeouts() {
    // A destination that echoes one read, then reports how its connection ended.
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.unwrap();
        s.write_all(&buf[..n]).await.unwrap();
        let r = tokio::time::timeout(LIMIT, s.read(&mut buf)).await;
        let _ = ended_tx.send(matches!(r, Ok(Ok(0)) | Ok(Err(_))));
    });
    let uecho = UdpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| {
        c.timeouts.tcp_idle_secs = 1;
        c.timeouts.udp_idle_secs = 2;
    })
    .await;
    let client = relay.client().await;

    let mut tcp = client.connect_tcp(&target(addr)).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();
    let idle_since = Instant::now();
    let mut rest = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut rest))
        .await
        .expect("an idle TCP tunnel must be closed by the relay within 10 s");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "idle TCP tunnel: expected end of stream or reset, got {r:?}"
    );
    assert!(
        idle_since.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before tcp_idle_secs",
        idle_since.elapsed()
    );
    assert!(
        tokio::time::timeout(LIMIT, ended_rx)
            .await
            .unwrap()
            .unwrap(),
        "the destination side of an idle tunnel must be closed too"
    );

    let udp = client.connect_udp(&target(uecho.addr())).await.unwrap();
    udp_echo_within(&udp, b"ping", Duration::from_secs(5)).await;
    let idle_since = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), udp.recv())
        .await
        .expect("an idle UDP tunnel must be closed by the relay within 10 s");
    assert!(r.is_err(), "idle UDP tunnel: expected the end, got {r:?}");
    assert!(
        idle_since.elapsed() >= Duration::from_millis(1900),
        "closed after {:?}, before udp_idle_secs",
        idle_since.elapsed()
    );
    // The connection itself is fine.
    let echo = TcpEcho::start(lo()).await;
    tcp_roundtrip(&client, &target(echo.addr()), b"connection still up").await;
}

#[tokio::test]
async fn dns_lookups_beyond_the_concurrency_limit_time_out_together_not_one_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.timeouts.dns_secs = 1;
    cfg.limits.dns_concurrency = 1;
    let relay =
        TestRelay::start_with_resolver(dir, cfg, Arc::new(cfr_relay::resolve::NeverResolves)).await;
    let client = Arc::new(relay.client().await);
    let started = Instant::now();
    let mut lookups = Vec::new();
    for i in 0..4 {
        let client = client.clone();
        lookups.push(tokio::spawn(async move {
            refused(&client, &named(&format!("slow{i}.test"), 443), false).await
        }));
    }
    // Literal targets need no lookup slot.
    let echo = TcpEcho::start(lo()).await;
    tcp_roundtrip(&client, &target(echo.addr()), b"literal while DNS hangs").await;
    for l in lookups {
        let e = l.await.unwrap();
        assert_eq!(
            status_and_error(&e),
            (Some(504), Some(ProxyError::DnsTimeout))
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "four lookups queued behind one slot must all time out within ~dns_secs, took {:?}",
        started.elapsed()
    );
}
