//! IPv6 egress end to end, inside a network namespace this test creates (needs root and iproute2, as
//! in CI; the test FAILS, never skips, when it cannot create the namespace).
//!
//! `cfr_testkit::netns::run_in_netns` creates the namespace, brings `lo` up; this test sets its MTU
//! to 1280 and routes 2001:db8:cf::/64 locally (`ip -6 route add local 2001:db8:cf::/64 dev lo`, the
//! setup an operator does), then the test binary is re-executed inside it. The child draws 1000
//! sources for UDP and 1000 for TCP tunnels to servers on [::1] and checks what the servers see.
//! Only ::1 and the documentation prefix are used; no other network is touched. The namespace is
//! deleted by a drop guard.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use cfr_egress::{bind_udp, check, connect_tcp, EgressConfig, EgressPool, Fallback};
use cfr_testkit::netns::run_in_netns;
use ipnet::IpNet;
use tokio::time::timeout;

const PREFIX: &str = "2001:db8:cf::/64";
const TUNNELS: usize = 1000;
const WAIT: Duration = Duration::from_secs(5);

#[test]
fn ipv6_tunnels_leave_from_distinct_prefix_addresses_in_netns() {
    run_in_netns(
        "ipv6_tunnels_leave_from_distinct_prefix_addresses_in_netns",
        &[
            // A small MTU lets the child prove that oversize datagrams fail instead of being
            // fragmented.
            &["link", "set", "lo", "mtu", "1280"],
            &["-6", "route", "add", "local", PREFIX, "dev", "lo"],
        ],
        || async {
            let net: IpNet = PREFIX.parse().unwrap();
            let cfg = EgressConfig {
                prefixes: vec![net],
                fallback: Fallback::Refuse,
                ..EgressConfig::default()
            };
            let report = check::diagnose(&cfg);
            println!("{report}");
            assert!(report.ok(), "egress check failed inside the namespace");

            let pool = EgressPool::new(&cfg).unwrap();
            udp_sources(&pool, net).await;
            tcp_sources(&pool, net).await;
            oversize_datagrams_fail_instead_of_fragmenting(&pool).await;
        },
    );
}

fn check_sources(proto: &str, net: IpNet, seen: &HashSet<IpAddr>) {
    // 1000 draws from a /64: a collision has probability ≈ C(1000, 2) / 2^64 ≈ 3e-14.
    assert_eq!(
        seen.len(),
        TUNNELS,
        "expected {TUNNELS} distinct {proto} source addresses, the server saw {}",
        seen.len()
    );
    for a in seen {
        assert!(net.contains(a), "{proto} source {a} outside {net}");
        let IpAddr::V6(v6) = a else {
            panic!("{proto} source {a} is not IPv6")
        };
        assert_ne!(
            u128::from(*v6) as u64,
            0,
            "subnet-router anycast address issued"
        );
    }
}

async fn udp_sources(pool: &EgressPool, net: IpNet) {
    let server = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let conn = pool.connection();
    let mut seen = HashSet::new();
    let mut buf = [0u8; 64];
    for i in 0..TUNNELS as u32 {
        let source = conn.source_for(server_addr.ip()).unwrap().unwrap();
        let tunnel = bind_udp(Some(source), server_addr).unwrap();
        tunnel.send(&i.to_be_bytes()).await.unwrap();
        let (n, from) = timeout(WAIT, server.recv_from(&mut buf))
            .await
            .expect("UDP server received no datagram")
            .unwrap();
        assert_eq!(&buf[..n], &i.to_be_bytes());
        assert_eq!(
            from.ip(),
            source,
            "datagram did not leave from the drawn source"
        );
        // The answer reaches the tunnel: the local route delivers replies to a drawn address.
        server.send_to(b"pong", from).await.unwrap();
        let n = timeout(WAIT, tunnel.recv(&mut buf))
            .await
            .expect("UDP tunnel received no reply at its drawn source")
            .unwrap();
        assert_eq!(&buf[..n], b"pong");
        seen.insert(from.ip());
    }
    check_sources("UDP", net, &seen);
}

async fn tcp_sources(pool: &EgressPool, net: IpNet) {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let conn = pool.connection();
    let mut seen = HashSet::new();
    for _ in 0..TUNNELS {
        let source = conn.source_for(server_addr.ip()).unwrap().unwrap();
        let tunnel = timeout(WAIT, connect_tcp(Some(source), server_addr))
            .await
            .expect("TCP connect timed out")
            .unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(
            peer.ip(),
            source,
            "connection did not come from the drawn source"
        );
        assert_eq!(tunnel.local_addr().unwrap(), peer);
        seen.insert(peer.ip());
    }
    check_sources("TCP", net, &seen);
}

/// RFC 9298 §5: the proxy must not fragment. With lo's MTU at 1280, a 1400-byte payload must fail
/// with EMSGSIZE (then the relay drops it), for IPv6 with a pool source and for IPv4 without one.
async fn oversize_datagrams_fail_instead_of_fragmenting(pool: &EgressPool) {
    const EMSGSIZE: i32 = 90;
    let v6_server = std::net::UdpSocket::bind("[::1]:0").unwrap();
    let v4_server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let source = pool
        .connection()
        .source_for(Ipv6Addr::LOCALHOST.into())
        .unwrap();
    let cases: [(Option<IpAddr>, SocketAddr); 2] = [
        (source, v6_server.local_addr().unwrap()),
        (None, v4_server.local_addr().unwrap()),
    ];
    for (source, dest) in cases {
        let tunnel = bind_udp(source, dest).unwrap();
        let err = tunnel
            .send(&[0u8; 1400])
            .await
            .expect_err("a datagram over the path MTU was sent (fragmented) instead of refused");
        assert_eq!(err.raw_os_error(), Some(EMSGSIZE), "to {dest}: {err}");
        tunnel
            .send(&[0u8; 1000])
            .await
            .expect("a datagram that fits must be sent");
    }
}
