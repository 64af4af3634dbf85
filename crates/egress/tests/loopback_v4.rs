//! Real sockets over IPv4 loopback: tunnels leave from distinct, CSPRNG-drawn addresses of
//! 127.0.0.0/8 (routed locally on every Linux host, so no setup is needed).
//!
//! Soundness of the "≥ 195 distinct of 200" bound: 200 draws from the 2^24 - 2 usable addresses of
//! 127.0.0.0/8 give C(200, 2) / (2^24 - 2) ≈ 0.0012 expected colliding pairs; at least 6 collisions
//! (fewer than 195 distinct) has probability below 0.0012^6 / 6! ≈ 4e-21.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cfr_egress::{bind_udp, connect_tcp, EgressConfig, EgressPool, Fallback};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const TUNNELS: usize = 200;
const MIN_DISTINCT: usize = 195;
const WAIT: Duration = Duration::from_secs(5);

fn loopback_pool() -> (EgressPool, IpNet) {
    let net: IpNet = "127.0.0.0/8".parse().unwrap();
    let pool = EgressPool::new(&EgressConfig {
        prefixes: vec![net],
        fallback: Fallback::Refuse,
        ..EgressConfig::default()
    })
    .unwrap();
    (pool, net)
}

#[tokio::test]
async fn udp_tunnels_leave_from_distinct_pool_addresses() {
    let (pool, net) = loopback_pool();
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let conn = pool.connection();
    let mut seen = HashSet::new();
    let mut buf = [0u8; 64];
    for i in 0..TUNNELS {
        let source = conn.source_for(server_addr.ip()).unwrap().unwrap();
        let tunnel = bind_udp(Some(source), server_addr).unwrap();
        tunnel.send(&(i as u32).to_be_bytes()).await.unwrap();
        let (n, from) = timeout(WAIT, server.recv_from(&mut buf))
            .await
            .expect("server received no datagram")
            .unwrap();
        assert_eq!(&buf[..n], &(i as u32).to_be_bytes());
        assert_eq!(
            from.ip(),
            source,
            "datagram did not leave from the drawn source"
        );
        assert!(net.contains(&from.ip()), "{from} outside {net}");
        // The reply reaches the tunnel's connected socket: the return path to the drawn source works.
        server.send_to(b"pong", from).await.unwrap();
        let n = timeout(WAIT, tunnel.recv(&mut buf))
            .await
            .expect("tunnel received no reply")
            .unwrap();
        assert_eq!(&buf[..n], b"pong");
        seen.insert(from.ip());
    }
    assert!(
        seen.len() >= MIN_DISTINCT,
        "expected ≥ {MIN_DISTINCT} distinct source addresses of {TUNNELS} UDP tunnels, server saw {}",
        seen.len()
    );
}

#[tokio::test]
async fn tcp_tunnels_leave_from_distinct_pool_addresses() {
    let (pool, net) = loopback_pool();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let conn = pool.connection();
    let mut seen: HashSet<IpAddr> = HashSet::new();
    for _ in 0..TUNNELS {
        let source = conn.source_for(server_addr.ip()).unwrap().unwrap();
        let mut tunnel = timeout(WAIT, connect_tcp(Some(source), server_addr))
            .await
            .expect("connect timed out")
            .unwrap();
        let (mut accepted, peer): (_, SocketAddr) = listener.accept().await.unwrap();
        assert_eq!(
            peer.ip(),
            source,
            "connection did not come from the drawn source"
        );
        assert!(net.contains(&peer.ip()), "{peer} outside {net}");
        assert_eq!(tunnel.local_addr().unwrap(), peer);
        tunnel.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).await.unwrap();
        seen.insert(peer.ip());
    }
    assert!(
        seen.len() >= MIN_DISTINCT,
        "expected ≥ {MIN_DISTINCT} distinct source addresses of {TUNNELS} TCP tunnels, server saw {}",
        seen.len()
    );
}
