//! Tunnel setup: latency on a warm connection and on a new one, and setups per second with many
//! concurrent clients.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cfr_client::RelayClient;
use cfr_relay::tunnel::SetupPhase;

use crate::env::{self, Env};
use crate::report::{percentile, Row};
use crate::Plan;

pub const SECTION: &str = "setup";

/// Latency samples (µs) of `n` sequential runs of `f`, bounded by `limit` in time.
pub async fn latencies<F, Fut>(n: usize, limit: Duration, mut f: F) -> Result<Vec<f64>, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    let started = Instant::now();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        if started.elapsed() > limit {
            break;
        }
        let d = tokio::time::timeout(Duration::from_secs(10), f())
            .await
            .map_err(|_| "one setup took more than 10 s".to_string())??;
        v.push(d.as_secs_f64() * 1e6);
    }
    if v.is_empty() {
        return Err("no sample within the time limit".into());
    }
    Ok(v)
}

/// p50 and p99 rows from samples (µs).
pub fn pct_rows(
    section: &'static str,
    name: &str,
    r: Result<Vec<f64>, String>,
    rows: &mut Vec<Row>,
) {
    match r {
        Ok(mut v) => {
            let n = v.len();
            for p in [50.0, 99.0] {
                let x = percentile(&mut v, p).unwrap_or(f64::NAN);
                rows.push(
                    Row::new(section, format!("{name}: p{p:.0}"), x, "µs")
                        .note(format!("{n} samples")),
                );
            }
        }
        Err(e) => {
            for p in [50, 99] {
                rows.push(Row::unavailable(
                    section,
                    format!("{name}: p{p}"),
                    "µs",
                    e.clone(),
                ));
            }
        }
    }
}

/// Runs `workers` loops of `f(worker)` for `secs`; returns setups/s and the latency samples (µs).
pub async fn rate<F, Fut>(workers: usize, secs: Duration, f: F) -> Result<(f64, Vec<f64>), String>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let f = Arc::new(f);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut err = None;
            while started.elapsed() < secs {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), f(w)).await {
                    Ok(Ok(())) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                    Ok(Err(e)) => {
                        err = Some(e);
                        break;
                    }
                    Err(_) => {
                        err = Some("one setup took more than 10 s".to_string());
                        break;
                    }
                }
            }
            (lat, err)
        }));
    }
    let mut all = Vec::new();
    let mut first_err = None;
    for t in tasks {
        let (lat, err) = t.await.map_err(|e| e.to_string())?;
        all.extend(lat);
        first_err = first_err.or(err);
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(e) = first_err {
        return Err(format!("{e} (after {} setups)", all.len()));
    }
    Ok((all.len() as f64 / secs, all))
}

pub const WARM: &str = "h3 tunnel setup, warm connection";
pub const NEW: &str = "h3 tunnel setup, new connection";
pub const TCP_CONNECT: &str = "direct TCP connect";
pub const RATE: &str = "h3 tunnel setups/s, 64 clients";
pub const RTT: &str = "QUIC smoothed RTT (warm)";

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let Some(origin) = env::origin_or_unavailable(env, rows, SECTION, WARM, "µs").await else {
        return;
    };
    let limit = plan.setup_time;

    let r = latencies(plan.setup_samples, limit, || async move {
        let t = Instant::now();
        let s = env::direct_tcp(origin).await.map_err(|e| e.to_string())?;
        let d = t.elapsed();
        drop(s);
        Ok(d)
    })
    .await;
    pct_rows(SECTION, TCP_CONNECT, r, rows);

    match env.client().await {
        Ok(client) => {
            // Warm-up: the first tunnels pay for QPACK and stream credit.
            for _ in 0..20 {
                let _ = client.connect_tcp(&env::target(origin)).await;
            }
            let c = &client;
            let phases_before = env.core.setup.snapshot();
            let r = latencies(plan.setup_samples, limit, || async move {
                let t = Instant::now();
                let tun = c
                    .connect_tcp(&env::target(origin))
                    .await
                    .map_err(|e| e.to_string())?;
                let d = t.elapsed();
                drop(tun);
                Ok(d)
            })
            .await;
            pct_rows(SECTION, WARM, r, rows);
            phase_rows(
                env.core.setup.snapshot().mean_us_since(&phases_before),
                rows,
            );
            let rtt = client.rtt_probe().await.map(|d| d.as_secs_f64() * 1e6);
            rows.push(Row::from_result(
                SECTION,
                RTT,
                "µs",
                rtt.map_err(|e| e.to_string()),
            ));
            client.close();
        }
        Err(e) => pct_rows(SECTION, WARM, Err(e), rows),
    }

    let cfg = env.client_config();
    let r = latencies(plan.new_conn_samples, limit, || {
        let cfg = cfg.clone();
        async move {
            let t = Instant::now();
            let c = RelayClient::connect(cfg).await.map_err(|e| e.to_string())?;
            let tun = c
                .connect_tcp(&env::target(origin))
                .await
                .map_err(|e| e.to_string())?;
            let d = t.elapsed();
            drop(tun);
            c.close();
            Ok(d)
        }
    })
    .await;
    pct_rows(SECTION, NEW, r, rows);

    let r = h3_rate(env, origin, plan).await;
    match r {
        Ok((rate, mut lat)) => {
            let p99 = percentile(&mut lat, 99.0).unwrap_or(f64::NAN);
            rows.push(Row::new(SECTION, RATE, rate, "setups/s").note(format!("p99 {p99:.0} µs")));
        }
        Err(e) => rows.push(Row::unavailable(SECTION, RATE, "setups/s", e)),
    }
}

/// The relay's side of the warm setups, phase by phase (means over the run, from the relay's own
/// timing aggregates): request head parsed → auth → parse → admit → resolve → policy → bind →
/// connect → 2xx sent. What the client saw beyond their sum is QUIC, HTTP/3 and scheduling.
fn phase_rows(means: Option<[(SetupPhase, f64); 8]>, rows: &mut Vec<Row>) {
    let Some(means) = means else {
        rows.push(Row::unavailable(
            SECTION,
            PHASE_TOTAL,
            "µs",
            "the relay recorded no tunnel setup",
        ));
        return;
    };
    for (phase, us) in means {
        rows.push(Row::new(SECTION, phase_name(phase), us, "µs"));
    }
    let total = means.iter().map(|(_, us)| us).sum();
    rows.push(Row::new(SECTION, PHASE_TOTAL, total, "µs").note("mean per tunnel"));
}

pub fn phase_name(phase: SetupPhase) -> String {
    format!("{WARM}: relay {}, mean", phase.as_str())
}

pub const PHASE_TOTAL: &str = "h3 tunnel setup, warm connection: relay head → 2xx sent, mean";

async fn h3_rate(env: &Env, origin: SocketAddr, plan: &Plan) -> Result<(f64, Vec<f64>), String> {
    let mut clients = Vec::with_capacity(plan.rate_clients);
    for _ in 0..plan.rate_clients {
        clients.push(env.client().await?);
    }
    let clients = Arc::new(clients);
    let cs = clients.clone();
    let r = rate(plan.rate_clients, plan.rate_time, move |w| {
        let c = cs[w].clone();
        async move {
            let t = c
                .connect_tcp(&env::target(origin))
                .await
                .map_err(|e| e.to_string())?;
            drop(t);
            Ok(())
        }
    })
    .await;
    for c in clients.iter() {
        c.close();
    }
    r
}
