//! Flood: repeated waves of idle QUIC connections (handshake done, no request), and the relay's
//! RSS after each wave is gone. A leak grows with every wave; allocator retention stays at the
//! level the first wave reached (issue 17: 10 MB before, 124 MB after 2000 connections).
//!
//! Needs the `cfr` binary (the relay runs as a child process, so its `/proc/PID/status` holds
//! nothing but the relay).
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;

use crate::env::Env;
use crate::report::Row;
use crate::scale::{fd_count, relay_binary, rss_bytes, RelayProcess};
use crate::Plan;

pub const SECTION: &str = "flood";

/// How long the relay is left alone after the last wave before its RSS is read once more.
const SETTLE: Duration = Duration::from_secs(15);

/// Client endpoints (source sockets) the connections of a wave are spread over.
const ENDPOINTS: usize = 8;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let name = "RSS after the last wave";
    let Some(bin) = relay_binary(plan.relay_bin.as_deref()) else {
        rows.push(Row::unavailable(
            SECTION,
            name,
            "MiB",
            "needs the cfr binary: run `cfr bench` or pass --relay-bin",
        ));
        return;
    };
    let metrics = match free_port() {
        Ok(a) => a,
        Err(e) => {
            rows.push(Row::unavailable(SECTION, name, "MiB", e));
            return;
        }
    };
    let relay = match RelayProcess::spawn_with(&bin, env, |c| {
        c.metrics = Some(metrics);
        c.limits.connections_per_client = 1_000_000;
        c.limits.total_connections = 1_000_000;
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            rows.push(Row::unavailable(SECTION, name, "MiB", e));
            return;
        }
    };
    if let Err(e) = waves(env, plan, &relay, metrics, rows).await {
        rows.push(Row::unavailable(SECTION, name, "MiB", e));
    }
    relay.stop().await;
}

async fn waves(
    env: &Env,
    plan: &Plan,
    relay: &RelayProcess,
    metrics: SocketAddr,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let pid = relay.pid;
    let rss = || rss_bytes(pid).ok_or("cannot read VmRSS".to_string());
    let client = crate::env::quic_client_config(env, b"h3")?;
    let before = rss()?;
    let n = plan.flood_connections;
    rows.push(
        Row::new(SECTION, "RSS before the first wave", mib(before), "MiB").note(format!(
            "relay child process; {n} idle QUIC connections per wave"
        )),
    );
    let mut after_each = Vec::new();
    for wave in 1..=plan.flood_waves {
        let endpoints = (0..ENDPOINTS)
            .map(|_| {
                let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("static"))
                    .map_err(|e| e.to_string())?;
                ep.set_default_client_config(client.clone());
                Ok(ep)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let conns: Vec<quinn::Connection> = futures_util::stream::iter(0..n)
            .map(|i| {
                let ep = endpoints[i % ENDPOINTS].clone();
                async move {
                    let connecting = ep.connect(relay.addr, "localhost").ok()?;
                    tokio::time::timeout(Duration::from_secs(20), connecting)
                        .await
                        .ok()?
                        .ok()
                }
            })
            .buffer_unordered(64)
            .filter_map(|c| async move { c })
            .collect()
            .await;
        let opened = conns.len();
        let peak = rss()?;
        let fds = fd_count(pid).unwrap_or(0);
        for c in &conns {
            c.close(quinn::VarInt::from_u32(0x100), b"flood over");
        }
        for ep in &endpoints {
            // Bounded: CONNECTION_CLOSE is sent at once; the drain period is only waited here.
            let _ = tokio::time::timeout(Duration::from_secs(3), ep.wait_idle()).await;
        }
        drop(conns);
        drop(endpoints);
        let open = wait_connections_gone(metrics).await?;
        let after = rss()?;
        after_each.push(after);
        rows.push(
            Row::new(
                SECTION,
                format!("wave {wave}: RSS after"),
                mib(after),
                "MiB",
            )
            .note(format!(
                "{opened}/{n} connected; {:.1} MiB at the peak, {fds} fds; {open} still open after",
                mib(peak)
            )),
        );
    }
    // jemalloc returns freed pages after its decay time (10 s); glibc malloc mostly keeps them.
    tokio::time::sleep(SETTLE).await;
    rows.push(Row::new(
        SECTION,
        format!("RSS {} s after the last wave", SETTLE.as_secs()),
        mib(rss()?),
        "MiB",
    ));
    if let (Some(first), Some(last)) = (after_each.first(), after_each.last()) {
        let waves = after_each.len().saturating_sub(1).max(1) as f64;
        rows.push(
            Row::new(
                SECTION,
                "RSS growth per wave after the first",
                (mib(*last) - mib(*first)) / waves,
                "MiB",
            )
            .note("≈ 0: retention (the allocator keeps what the first wave used); > 0: a leak"),
        );
    }
    Ok(())
}

/// A loopback address with a port nobody listens on right now (for the metrics listener).
pub(crate) fn free_port() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

/// `cfr_connections_active` from the relay's Prometheus endpoint.
pub(crate) async fn connections_active(metrics: SocketAddr) -> Result<f64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(metrics)
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    body.lines()
        .find_map(|l| l.strip_prefix("cfr_connections_active "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no cfr_connections_active in the metrics".to_string())
}

/// Waits (bounded, 30 s) until the relay has no client connection left; returns how many are
/// still open at the end.
async fn wait_connections_gone(metrics: SocketAddr) -> Result<f64, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let open = connections_active(metrics).await?;
        if open == 0.0 || tokio::time::Instant::now() >= deadline {
            // Let the last frees happen (quinn keeps a closed connection for 3 PTO).
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(open);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
