//! UDP: 1200-byte datagrams echoed by a loopback origin, directly, through CONNECT-UDP, and as raw
//! QUIC datagrams. A windowed sender keeps at most `window` datagrams in flight, so loss counts
//! what the path dropped, not what an unbounded sender overran.
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cfr_client::DatagramMode;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::env::{self, Env};
use crate::report::Row;
use crate::Plan;

pub const SECTION: &str = "udp";
pub const PAYLOAD: usize = 1200;

/// One way datagrams go out and come back.
pub enum Path {
    Direct(UdpSocket),
    Tunnel(cfr_client::UdpTunnel),
    Quic(quinn::Connection),
}

impl Path {
    async fn send(&self, p: &Bytes) -> io::Result<()> {
        match self {
            Path::Direct(s) => s.send(p).await.map(|_| ()),
            Path::Tunnel(t) => t.send(p).await.map_err(io::Error::other),
            Path::Quic(c) => c
                .send_datagram_wait(p.clone())
                .await
                .map_err(io::Error::other),
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Path::Direct(s) => s.recv(buf).await,
            Path::Tunnel(t) => t.recv().await.map(|b| b.len()).map_err(io::Error::other),
            Path::Quic(c) => c
                .read_datagram()
                .await
                .map(|b| b.len())
                .map_err(io::Error::other),
        }
    }
}

/// What one echo run measured.
#[derive(Debug, Clone, Copy)]
pub struct EchoResult {
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
}

impl EchoResult {
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.secs
    }
    pub fn mbit(&self) -> f64 {
        self.rate() * PAYLOAD as f64 * 8.0 / 1e6
    }
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            return 100.0;
        }
        100.0 * (self.sent - self.received.min(self.sent)) as f64 / self.sent as f64
    }
}

/// Sends up to `count` datagrams (bounded by `limit` in time), never more than `window` awaiting
/// their echo. A window that makes no progress for 50 ms is written off as lost and refilled.
pub async fn echo_run(path: Arc<Path>, count: u64, window: u64, limit: Duration) -> EchoResult {
    let received = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (path, received, progress, done) = (
            path.clone(),
            received.clone(),
            progress.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while !done.load(Ordering::Relaxed) {
                match path.recv(&mut buf).await {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                        progress.notify_one();
                    }
                    Err(_) => {
                        // ICMP errors on a connected socket; a closed tunnel ends the run.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        })
    };
    let payload = env::payload(PAYLOAD);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut written_off = 0u64;
    while sent < count && started.elapsed() < limit {
        // Saturating: datagrams written off as lost may still come back late.
        let in_flight = sent
            .saturating_sub(received.load(Ordering::Relaxed))
            .saturating_sub(written_off);
        if in_flight < window {
            if path.send(&payload).await.is_err() {
                break;
            }
            sent += 1;
            continue;
        }
        let before = received.load(Ordering::Relaxed);
        let waited = tokio::time::timeout(Duration::from_millis(50), progress.notified()).await;
        if waited.is_err() && received.load(Ordering::Relaxed) == before {
            written_off += in_flight;
        }
    }
    // Stragglers: wait until everything came back or nothing moved for 200 ms.
    let mut last = received.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while received.load(Ordering::Relaxed) < sent
        && last_change.elapsed() < Duration::from_millis(200)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let end = if received.load(Ordering::Relaxed) >= sent {
        Instant::now()
    } else {
        // Do not count the straggler wait as sending time.
        last_change.max(started)
    };
    done.store(true, Ordering::Relaxed);
    receiver.abort();
    EchoResult {
        sent,
        received: received.load(Ordering::Relaxed),
        secs: end.duration_since(started).as_secs_f64().max(1e-6),
    }
}

fn rows_for(name: &str, r: Result<EchoResult, String>, rows: &mut Vec<Row>) {
    match r {
        Ok(r) => {
            let note = format!("{} sent, {} echoed", r.sent, r.received);
            rows.push(
                Row::new(SECTION, format!("{name}: datagrams/s"), r.rate(), "dgram/s").note(note),
            );
            rows.push(Row::new(
                SECTION,
                format!("{name}: Mbit/s"),
                r.mbit(),
                "Mbit/s",
            ));
            rows.push(Row::new(
                SECTION,
                format!("{name}: loss"),
                r.loss_pct(),
                "%",
            ));
        }
        Err(e) => {
            for (m, u) in [
                ("datagrams/s", "dgram/s"),
                ("Mbit/s", "Mbit/s"),
                ("loss", "%"),
            ] {
                rows.push(Row::unavailable(
                    SECTION,
                    format!("{name}: {m}"),
                    u,
                    e.clone(),
                ));
            }
        }
    }
}

pub const DIRECT: &str = "direct UDP echo";
pub const TUNNEL: &str = "CONNECT-UDP echo";
pub const QUIC: &str = "raw quinn datagram echo";
pub const CAPSULES: &str = "CONNECT-UDP echo, DATAGRAM capsules";

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let origin = match env::udp_echo(&env.tasks).await {
        Ok(a) => a,
        Err(e) => {
            rows_for(DIRECT, Err(format!("UDP origin: {e}")), rows);
            return;
        }
    };
    let limit = plan.udp_time;
    let (count, window) = (plan.udp_count, plan.udp_window);

    let direct = async {
        let s = UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let _ = env::socket_buffers(&s, 4 << 20);
        s.connect(origin).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(echo_run(Arc::new(Path::Direct(s)), count, window, limit).await)
    };
    rows_for(DIRECT, direct.await, rows);

    let tunnel = tunnel_run(env, origin, count, window, limit, DatagramMode::Auto);
    rows_for(TUNNEL, tunnel.await, rows);

    // The stream encoding (what curl uses): reliable and ordered, so reported on its own.
    let capsules = tunnel_run(env, origin, count, window, limit, DatagramMode::Capsules);
    rows_for(CAPSULES, capsules.await, rows);

    let quic = async {
        let server = env::quic_server(env)?;
        let (ep, conn) = env::quic_client(env, server).await?;
        if !env::wait_datagram_room(&conn, PAYLOAD).await {
            return Err("path MTU never allowed a 1200-byte QUIC datagram".to_string());
        }
        let path = Arc::new(Path::Quic(conn.clone()));
        let r = echo_run(path, count, window, limit).await;
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        Ok(r)
    };
    rows_for(QUIC, quic.await, rows);
}

async fn tunnel_run(
    env: &Env,
    origin: SocketAddr,
    count: u64,
    window: u64,
    limit: Duration,
    mode: DatagramMode,
) -> Result<EchoResult, String> {
    let mut cfg = env.client_config();
    cfg.datagrams = mode;
    let client = cfr_client::RelayClient::connect(cfg)
        .await
        .map_err(|e| format!("client: {e}"))?;
    let t = client
        .connect_udp(&env::target(origin))
        .await
        .map_err(|e| format!("CONNECT-UDP: {e}"))?;
    if t.uses_quic_datagrams() != (mode == DatagramMode::Auto) {
        return Err(format!("the tunnel does not use the {mode:?} encoding"));
    }
    let path = Arc::new(Path::Tunnel(t));
    // Warm-up until 1200-byte payloads travel as QUIC datagrams (path MTU discovery on the client
    // connection; before that they go as capsules) and the echo path is live.
    let _ = echo_run(path.clone(), 256, 32, Duration::from_millis(300)).await;
    let r = echo_run(path, count, window, limit).await;
    client.close();
    Ok(r)
}
