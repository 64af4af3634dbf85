//! Soak (not a test; run with `cfr bench --only soak [--soak-secs N]`): minutes of mixed churn
//! against a relay child process — TCP tunnels opened and closed, UDP tunnels with datagrams, and
//! waves of idle QUIC connections — with the relay's RSS, descriptors, threads and open
//! connections sampled every 10 s. The rows are the slopes: a leak shows as a steady climb.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::env::{self, Env};
use crate::flood::{connections_active, free_port};
use crate::report::Row;
use crate::scale::{fd_count, relay_binary, rss_bytes, RelayProcess};
use crate::Plan;

pub const SECTION: &str = "soak";

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// One sample of the relay process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_secs: f64,
    rss_mib: f64,
    fds: f64,
    threads: f64,
    connections: f64,
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let name = "RSS slope";
    let Some(bin) = relay_binary(plan.relay_bin.as_deref()) else {
        rows.push(Row::unavailable(
            SECTION,
            name,
            "MiB/min",
            "needs the cfr binary: run `cfr bench` or pass --relay-bin",
        ));
        return;
    };
    let result = async {
        let metrics = free_port()?;
        let relay = RelayProcess::spawn_with(&bin, env, |c| {
            c.metrics = Some(metrics);
            c.limits.connections_per_client = 1_000_000;
            c.limits.total_connections = 1_000_000;
        })
        .await?;
        let samples = churn(env, plan, &relay, metrics).await;
        relay.stop().await;
        samples
    }
    .await;
    match result {
        Ok((samples, failures)) => {
            report(&samples, rows);
            rows.push(Row::new(
                SECTION,
                "failed churn iterations",
                failures as f64,
                "iterations",
            ));
        }
        Err(e) => rows.push(Row::unavailable(SECTION, name, "MiB/min", e)),
    }
}

async fn churn(
    env: &Env,
    plan: &Plan,
    relay: &RelayProcess,
    metrics: std::net::SocketAddr,
) -> Result<(Vec<Sample>, u64), String> {
    let hold = env::hold_origin(&env.tasks)
        .await
        .map_err(|e| e.to_string())?;
    let echo = env::udp_echo(&env.tasks).await.map_err(|e| e.to_string())?;
    let cfg = env::client_config(relay.addr, &env.pki);
    let quic = env::quic_client_config(env, b"h3")?;
    let stop = Instant::now() + Duration::from_secs(plan.soak_secs);
    let failures = Arc::new(AtomicU64::new(0));
    let tunnels = async {
        while Instant::now() < stop {
            let ok = async {
                let client = cfr_client::RelayClient::connect(cfg.clone()).await.ok()?;
                for _ in 0..20 {
                    let mut t = client.connect_tcp(&env::target(hold)).await.ok()?;
                    tokio::io::AsyncWriteExt::write_all(&mut t, b"soak")
                        .await
                        .ok()?;
                }
                let u = client.connect_udp(&env::target(echo)).await.ok()?;
                for _ in 0..50 {
                    u.send(b"soak datagram").await.ok()?;
                    let _ = tokio::time::timeout(Duration::from_millis(100), u.recv()).await;
                }
                client.close();
                Some(())
            }
            .await;
            if ok.is_none() {
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let idle_floods = async {
        while Instant::now() < stop {
            let Ok(mut ep) = quinn::Endpoint::client("127.0.0.1:0".parse().expect("static")) else {
                failures.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            ep.set_default_client_config(quic.clone());
            let mut conns = Vec::new();
            for _ in 0..200 {
                if let Ok(c) = ep.connect(relay.addr, "localhost") {
                    if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(10), c).await {
                        conns.push(c);
                    }
                }
            }
            for c in &conns {
                c.close(quinn::VarInt::from_u32(0x100), b"soak");
            }
            let _ = tokio::time::timeout(Duration::from_secs(3), ep.wait_idle()).await;
        }
    };
    let sampler = async {
        let started = Instant::now();
        let mut samples = Vec::new();
        loop {
            let rss = rss_bytes(relay.pid).ok_or("cannot read VmRSS")?;
            samples.push(Sample {
                at_secs: started.elapsed().as_secs_f64(),
                rss_mib: rss as f64 / (1 << 20) as f64,
                fds: fd_count(relay.pid).unwrap_or(0) as f64,
                threads: threads(relay.pid).unwrap_or(0) as f64,
                connections: connections_active(metrics).await.unwrap_or(f64::NAN),
            });
            if Instant::now() >= stop {
                return Ok::<_, String>(samples);
            }
            tokio::time::sleep(SAMPLE_EVERY.min(stop.saturating_duration_since(Instant::now())))
                .await;
        }
    };
    let ((), (), samples) = tokio::join!(tunnels, idle_floods, sampler);
    Ok((samples?, failures.load(Ordering::Relaxed)))
}

fn report(samples: &[Sample], rows: &mut Vec<Row>) {
    let n = samples.len();
    let note = format!("{n} samples, every {} s", SAMPLE_EVERY.as_secs());
    let per_min = |f: fn(&Sample) -> f64| slope(samples, f) * 60.0;
    rows.push(Row::new(SECTION, "RSS slope", per_min(|s| s.rss_mib), "MiB/min").note(note));
    rows.push(Row::new(SECTION, "fd slope", per_min(|s| s.fds), "fd/min"));
    rows.push(Row::new(
        SECTION,
        "thread slope",
        per_min(|s| s.threads),
        "threads/min",
    ));
    rows.push(Row::new(
        SECTION,
        "open connections slope",
        per_min(|s| s.connections),
        "connections/min",
    ));
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        rows.push(
            Row::new(SECTION, "RSS at the end", last.rss_mib, "MiB").note(format!(
                "{:.1} MiB at the first sample; fds {} → {}; threads {} → {}",
                first.rss_mib, first.fds, last.fds, first.threads, last.threads
            )),
        );
    }
}

/// Least-squares slope of `f` over time (per second); 0 with fewer than two samples.
fn slope(samples: &[Sample], f: fn(&Sample) -> f64) -> f64 {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.at_secs, f(s)))
        .filter(|(_, y)| y.is_finite())
        .collect();
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// Threads of a process (`Threads:` in /proc/PID/status): the relay's tokio workers and blocking
/// threads; tasks are not visible from outside the process.
fn threads(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Threads:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
