//! QUIC inside CONNECT-UDP, what a browser does most through a MASQUE proxy (HTTP/3 to a site over
//! a CONNECT-UDP tunnel): a quinn client opens a QUIC connection to a quinn server through the
//! tunnel, and the same connection is made directly, for handshake time and bulk throughput.
//!
//! The inner client's UDP socket talks to a loopback bridge that moves each UDP payload into the
//! tunnel and back, as `cfr client`'s local proxy would. The inner connection's path MTU discovery
//! is capped at what one outer QUIC DATAGRAM frame carries, so the inner packets never ride the
//! capsule fallback on the reliable request stream; the row "effective inner MTU" says what that
//! cap came to.
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::env::{self, Dir, Env, Tasks};
use crate::report::Row;
use crate::setup::{latencies, pct_rows};
use crate::tcp::timed_bulk;
use crate::Plan;

pub const SECTION: &str = "inner QUIC";
pub const TUNNELLED: &str = "QUIC inside CONNECT-UDP";
pub const DIRECT: &str = "QUIC direct, same inner config";
pub const MTU: &str = "QUIC inside CONNECT-UDP: effective inner MTU";

pub fn bulk_name(path: &str, dir: Dir) -> String {
    format!("{path}, 1 stream, {}", dir.as_str())
}

pub fn handshake_name(path: &str) -> String {
    format!("{path}: handshake")
}

/// A loopback UDP socket whose datagrams go into `tunnel` and whose replies go back to the last
/// sender. Returns its address; the bridge lives in `tasks`.
async fn bridge(tunnel: cfr_client::UdpTunnel, tasks: &Tasks) -> io::Result<SocketAddr> {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let _ = env::socket_buffers(&sock, 4 << 20);
    let addr = sock.local_addr()?;
    let tunnel = Arc::new(tunnel);
    let peer = Arc::new(Mutex::new(None::<SocketAddr>));
    let (s, t, p) = (sock.clone(), tunnel.clone(), peer.clone());
    tasks.spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            *p.lock().unwrap() = Some(from);
            if t.send(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    tasks.spawn(async move {
        while let Ok(payload) = tunnel.recv().await {
            let to = *peer.lock().unwrap();
            if let Some(to) = to {
                let _ = sock.try_send_to(&payload, to);
            }
        }
    });
    Ok(addr)
}

/// The inner client's transport: the bench's, with path MTU discovery capped at `max_udp`.
fn inner_transport(env: &Env, max_udp: Option<u16>) -> Arc<quinn::TransportConfig> {
    let mut t = cfr_relay::http3::transport_config(&env.core.config);
    if let Some(max) = max_udp {
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(max.max(1200));
        t.mtu_discovery_config(Some(mtu));
    }
    Arc::new(t)
}

/// The largest UDP payload the tunnel carries as one QUIC DATAGRAM once the outer path MTU
/// discovery settled (bounded wait).
async fn settled_room(tunnel: &cfr_client::UdpTunnel) -> Option<usize> {
    let mut last = None;
    for _ in 0..100 {
        let now = tunnel.max_datagram_payload();
        if now.is_some() && now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let server = match env::quic_server(env) {
        Ok(a) => a,
        Err(e) => {
            rows.push(Row::unavailable(SECTION, MTU, "bytes", e));
            return;
        }
    };
    let bytes = (plan.bytes / 4).max(1 << 20);
    let samples = if plan.quick { 5 } else { 100 };
    let limit = plan.setup_time;

    let tunnel = async {
        let client = env.client().await?;
        let t = client
            .connect_udp(&env::target(server))
            .await
            .map_err(|e| format!("CONNECT-UDP: {e}"))?;
        if !t.uses_quic_datagrams() {
            return Err("relay did not negotiate QUIC datagrams".to_string());
        }
        let room = settled_room(&t).await.ok_or("no QUIC datagram room")?;
        let addr = bridge(t, &env.tasks).await.map_err(|e| e.to_string())?;
        Ok((client, addr, room))
    }
    .await;
    let (mtu_cap, via) = match &tunnel {
        Ok((_, addr, room)) => (Some(u16::try_from(*room).unwrap_or(u16::MAX)), Ok(*addr)),
        Err(e) => (None, Err(e.clone())),
    };

    for (path, to) in [(DIRECT, Ok(server)), (TUNNELLED, via.clone())] {
        let transport = inner_transport(env, mtu_cap);
        let r = match &to {
            Ok(addr) => {
                let addr = *addr;
                let transport = transport.clone();
                latencies(samples, limit, move || {
                    let transport = transport.clone();
                    async move {
                        let t = Instant::now();
                        let (ep, conn) = env::quic_client_with(env, addr, transport).await?;
                        let d = t.elapsed();
                        conn.close(0u32.into(), b"done");
                        ep.wait_idle().await;
                        Ok(d)
                    }
                })
                .await
            }
            Err(e) => Err(e.clone()),
        };
        pct_rows(SECTION, &handshake_name(path), r, rows);

        let conn = match &to {
            Ok(addr) => env::quic_client_with(env, *addr, transport).await,
            Err(e) => Err(e.clone()),
        };
        for dir in [Dir::Up, Dir::Down] {
            let r = match &conn {
                Ok((_, conn)) => {
                    timed_bulk(1, bytes, dir, || async {
                        let (w, r) = conn.open_bi().await.map_err(io::Error::other)?;
                        Ok(env::Duplex { r, w })
                    })
                    .await
                }
                Err(e) => Err(e.clone()),
            };
            rows.push(Row::from_result(SECTION, bulk_name(path, dir), "Gbit/s", r));
        }
        if path == TUNNELLED {
            let row = match (&conn, mtu_cap) {
                (Ok((_, c)), Some(cap)) => {
                    Row::new(SECTION, MTU, f64::from(c.stats().path.current_mtu), "bytes").note(
                        format!(
                            "UDP payload of the inner connection after its path MTU discovery; \
                             one outer QUIC DATAGRAM carries {cap} bytes of UDP payload"
                        ),
                    )
                }
                (Err(e), _) => Row::unavailable(SECTION, MTU, "bytes", e.clone()),
                (_, None) => Row::unavailable(SECTION, MTU, "bytes", "no tunnel"),
            };
            rows.push(row);
        }
        if let Ok((ep, conn)) = conn {
            conn.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
    }
    if let Ok((client, _, _)) = tunnel {
        client.close();
    }
}

/// Tunnelled rows relative to the same inner connection made directly.
pub fn derive(r: &mut crate::Report) {
    for dir in [Dir::Up, Dir::Down] {
        r.ratio(&bulk_name(TUNNELLED, dir), &bulk_name(DIRECT, dir));
    }
    for p in [50, 99] {
        r.ratio(
            &format!("{}: p{p}", handshake_name(TUNNELLED)),
            &format!("{}: p{p}", handshake_name(DIRECT)),
        );
    }
}
