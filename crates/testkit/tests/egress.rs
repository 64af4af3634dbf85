//! Ephemeral egress through the real relay: every tunnel leaves from its own random address of
//! the configured pool; policies per-connection and epoch; an open tunnel never changes source;
//! the destination sees nothing of the client.
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cfr_client::RelayClient;
use cfr_egress::EgressPolicy;
use cfr_testkit::origins::{TcpEcho, UdpEcho};
use cfr_testkit::relay::{target, TestRelay};
use cfr_testkit::tunnels::{lo, tcp_roundtrip, udp_roundtrip, LIMIT};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const V4_POOL: &str = "127.64.0.0/10";
const V6_POOL: &str = "2001:db8:cf::/64";

/// Runs `n` tunnels (`concurrency` at a time) of `kind` and returns nothing; sources are read at
/// the destination.
async fn many_tunnels(client: &Arc<RelayClient>, dest: SocketAddr, n: usize, udp: bool) {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            if udp {
                udp_roundtrip(&client, &target(dest), &[b"ping".to_vec()]).await;
            } else {
                tcp_roundtrip(&client, &target(dest), b"ping").await
            }
            drop(permit);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("tunnel finished")
            .expect("tunnel ok");
    }
}

fn assert_distinct_in_pool(sources: &[IpAddr], pool: IpNet, at_least: usize, what: &str) {
    for s in sources {
        assert!(
            pool.contains(s),
            "{what}: source {s} is outside the pool {pool}"
        );
    }
    let distinct: HashSet<_> = sources.iter().collect();
    assert!(
        distinct.len() >= at_least,
        "{what}: expected at least {at_least} distinct sources among {}, got {}",
        sources.len(),
        distinct.len()
    );
}

#[test]
fn ipv6_pool_gives_each_of_1000_tunnels_its_own_prefix_address() {
    cfr_testkit::netns::run_in_netns(
        "ipv6_pool_gives_each_of_1000_tunnels_its_own_prefix_address",
        &[&["-6", "route", "add", "local", V6_POOL, "dev", "lo"]],
        || async {
            let pool: IpNet = V6_POOL.parse().unwrap();
            let tcp = TcpEcho::start("[::1]:0".parse().unwrap()).await;
            let udp = UdpEcho::start("[::1]:0".parse().unwrap()).await;
            let relay = TestRelay::start_with(|c| {
                c.egress.prefixes = vec![pool];
                c.egress.fallback = cfr_egress::Fallback::Refuse;
                c.limits.tunnels_per_connection = 1024;
            })
            .await;
            let client = Arc::new(relay.client().await);
            many_tunnels(&client, tcp.addr(), 1000, false).await;
            many_tunnels(&client, udp.addr(), 1000, true).await;
            let tcp_sources: Vec<IpAddr> = tcp.peers().iter().map(|p| p.ip()).collect();
            let udp_sources: Vec<IpAddr> = udp.peers().iter().map(|p| p.ip()).collect();
            assert_eq!(
                tcp_sources.len(),
                1000,
                "the TCP destination saw every tunnel"
            );
            assert_eq!(
                udp_sources.len(),
                1000,
                "the UDP destination saw every tunnel from its own address"
            );
            // 1000 draws from 2^64: a collision is practically impossible for a correct CSPRNG.
            assert_distinct_in_pool(&tcp_sources, pool, 1000, "TCP over IPv6");
            assert_distinct_in_pool(&udp_sources, pool, 1000, "UDP over IPv6");
        },
    );
}

/// A fixed local port for the client, so the test can check the destination never sees it.
fn free_udp_port(ip: &str) -> SocketAddr {
    let s = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.local_addr().unwrap()
}

#[tokio::test]
async fn ipv4_pool_gives_each_tunnel_a_distinct_source_and_hides_the_client() {
    let pool: IpNet = V4_POOL.parse().unwrap();
    let tcp = TcpEcho::start(lo()).await;
    let udp = UdpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.egress.prefixes = vec![pool]).await;
    let client_addr = free_udp_port("127.0.0.9");
    let mut cfg = relay.client_config();
    cfg.local_bind = Some(client_addr);
    let client = Arc::new(RelayClient::connect(cfg).await.unwrap());
    many_tunnels(&client, tcp.addr(), 200, false).await;
    many_tunnels(&client, udp.addr(), 200, true).await;
    let tcp_peers = tcp.peers();
    let udp_peers = udp.peers();
    // 200 draws from 2^22 addresses: P(3 or more collisions) is about 2e-8.
    let srcs = |p: &[SocketAddr]| p.iter().map(|a| a.ip()).collect::<Vec<_>>();
    assert_distinct_in_pool(&srcs(&tcp_peers), pool, 198, "TCP over IPv4");
    assert_distinct_in_pool(&srcs(&udp_peers), pool, 198, "UDP over IPv4");
    // The destination sees the egress address, never the client's. (Ports are not compared: each
    // egress address has its own ephemeral port space, so an equal number is a coincidence.)
    for p in tcp_peers.iter().chain(udp_peers.iter()) {
        assert_ne!(
            p.ip(),
            client_addr.ip(),
            "the destination must never see the client's address"
        );
        assert_ne!(
            *p, client_addr,
            "the destination must never see the client's socket address"
        );
    }
}

#[tokio::test]
async fn per_connection_policy_shares_one_address_per_client_connection() {
    let pool: IpNet = V4_POOL.parse().unwrap();
    let tcp = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| {
        c.egress.prefixes = vec![pool];
        c.egress.policy = EgressPolicy::PerConnection;
    })
    .await;
    let mut per_client = Vec::new();
    for _ in 0..3 {
        let client = relay.client().await;
        let before = tcp.peers().len();
        for _ in 0..5 {
            tcp_roundtrip(&client, &target(tcp.addr()), b"ping").await;
        }
        let mine: HashSet<IpAddr> = tcp.peers()[before..].iter().map(|p| p.ip()).collect();
        assert_eq!(
            mine.len(),
            1,
            "all tunnels of one connection share one source, got {mine:?}"
        );
        per_client.push(*mine.iter().next().unwrap());
    }
    let distinct: HashSet<_> = per_client.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "different connections get different sources: {per_client:?}"
    );
}

/// The epoch number on the wall clock, as the relay computes it: `floor(unix_time / secs)`.
fn unix_epoch(secs: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs() / secs
}

/// Waits for the wall clock to cross the next epoch boundary (the condition itself, bounded by one
/// epoch length).
async fn next_epoch(secs: u64) -> u64 {
    let start = unix_epoch(secs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs + 1);
    while unix_epoch(secs) == start {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the wall clock did not advance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unix_epoch(secs)
}

#[tokio::test]
async fn epoch_policy_rotates_for_new_tunnels_and_never_moves_an_open_one() {
    const EPOCH_SECS: u64 = 3;
    let pool: IpNet = V4_POOL.parse().unwrap();
    let tcp = TcpEcho::start(lo()).await;
    let udp = UdpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| {
        c.egress.prefixes = vec![pool];
        c.egress.policy = EgressPolicy::Epoch;
        c.egress.epoch_secs = EPOCH_SECS;
    })
    .await;
    let client = relay.client().await;
    // Epochs are aligned to the wall clock: start right after a boundary so the first phase fits
    // in one epoch (retried if a loaded machine lets it straddle one).
    let mut first_epoch = HashSet::new();
    let mut long = None;
    for _ in 0..3 {
        let epoch = next_epoch(EPOCH_SECS).await;
        let seen = tcp.peers().len();
        // An open UDP tunnel from the first epoch.
        let tunnel = client.connect_udp(&target(udp.addr())).await.unwrap();
        tunnel.send(b"first").await.unwrap();
        tokio::time::timeout(LIMIT, tunnel.recv())
            .await
            .unwrap()
            .unwrap();
        tcp_roundtrip(&client, &target(tcp.addr()), b"ping").await;
        tcp_roundtrip(&client, &target(tcp.addr()), b"ping").await;
        if unix_epoch(EPOCH_SECS) == epoch {
            first_epoch = tcp.peers()[seen..].iter().map(|p| p.ip()).collect();
            long = Some(tunnel);
            break;
        }
    }
    let long = long.expect("three tries to open three tunnels within one 3 s epoch");
    assert_eq!(
        first_epoch.len(),
        1,
        "tunnels within one epoch share a source"
    );
    next_epoch(EPOCH_SECS).await;
    tcp_roundtrip(&client, &target(tcp.addr()), b"ping").await;
    let after = tcp.peers().last().unwrap().ip();
    assert!(
        !first_epoch.contains(&after),
        "a tunnel opened after the epoch gets a new source"
    );
    // The open tunnel still leaves from its original address (the echo logs each new source).
    let udp_sources = udp.peers();
    long.send(b"again").await.unwrap();
    tokio::time::timeout(LIMIT, long.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        udp.peers(),
        udp_sources,
        "an open UDP tunnel never changes its source"
    );
}

#[tokio::test]
async fn long_tunnels_keep_one_source_throughout() {
    let pool: IpNet = V4_POOL.parse().unwrap();
    let tcp = TcpEcho::start(lo()).await;
    let udp = UdpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.egress.prefixes = vec![pool]).await;
    let client = relay.client().await;

    let tunnel = client.connect_udp(&target(udp.addr())).await.unwrap();
    let mut echoed = 0;
    for i in 0..1000u32 {
        tunnel.send(&i.to_be_bytes()).await.unwrap();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), tunnel.recv()).await {
            echoed += 1;
        }
    }
    assert!(
        echoed >= 990,
        "expected nearly all of 1000 datagrams echoed, got {echoed}"
    );
    assert!(udp.count() >= 990);
    let sources: HashSet<SocketAddr> = udp.peers().into_iter().collect();
    assert_eq!(
        sources.len(),
        1,
        "1000 datagrams of one tunnel leave from one 4-tuple"
    );
    assert!(pool.contains(&sources.iter().next().unwrap().ip()));

    let mut t = client.connect_tcp(&target(tcp.addr())).await.unwrap();
    let chunk = vec![42u8; 64 * 1024];
    let mut buf = vec![0u8; chunk.len()];
    for _ in 0..64 {
        t.write_all(&chunk).await.unwrap();
        tokio::time::timeout(LIMIT, t.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        tcp.peers().len(),
        1,
        "one TCP connection (one source) for the whole transfer"
    );
}

#[tokio::test]
async fn dual_stack_names_use_the_family_with_a_pool_and_refuse_mode_answers_502() {
    let pool: IpNet = V4_POOL.parse().unwrap();
    // Listen on both families; only IPv4 has a pool.
    let v4 = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| {
        c.egress.prefixes = vec![pool];
        c.egress.fallback = cfr_egress::Fallback::Refuse;
    })
    .await;
    let client = relay.client().await;
    // `dual.test` resolves to ::1 first, then 127.0.0.1: the IPv4 address (which has a pool) is used.
    let dual = cfr_testkit::relay::named("dual.test", v4.addr().port());
    let mut t = client
        .connect_tcp(&dual)
        .await
        .expect("dual-stack name falls back to the pooled family");
    t.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(LIMIT, t.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert!(
        pool.contains(&v4.peers()[0].ip()),
        "the pooled family's source was used"
    );
    // An IPv6-only name with no IPv6 pool and fallback = refuse: 502 destination_ip_unroutable.
    let v6_only = cfr_testkit::relay::named("origin6.test", 9);
    match client.connect_tcp(&v6_only).await {
        Err(e) => {
            assert_eq!(e.status().map(|s| s.as_u16()), Some(502), "{e}");
            assert_eq!(
                e.proxy_error(),
                Some(cfr_proto::ProxyError::DestinationIpUnroutable)
            );
        }
        Ok(_) => {
            panic!("an IPv6-only destination must be refused without an IPv6 pool in refuse mode")
        }
    }
}
