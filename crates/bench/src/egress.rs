//! Egress cost: a per-tunnel random source address (EgressPool over 127.0.0.0/8, freebind) against
//! a kernel-chosen source, for TCP bind+connect and UDP bind+connect.
use std::time::{Duration, Instant};

use cfr_egress::{EgressConfig, EgressPolicy, EgressPool};

use crate::env::{self, Env};
use crate::report::Row;
use crate::setup::{latencies, pct_rows};
use crate::Plan;

pub const SECTION: &str = "egress";
pub const TCP_RANDOM: &str = "TCP bind+connect, random 127/8 source";
pub const TCP_KERNEL: &str = "TCP bind+connect, kernel source";
pub const UDP_RANDOM: &str = "UDP bind+connect, random 127/8 source";
pub const UDP_KERNEL: &str = "UDP bind+connect, kernel source";

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let Some(origin) = env::origin_or_unavailable(env, rows, SECTION, TCP_RANDOM, "µs").await
    else {
        return;
    };
    let cfg = EgressConfig {
        prefixes: vec!["127.0.0.0/8".parse().expect("static net")],
        policy: EgressPolicy::PerTunnel,
        ..EgressConfig::default()
    };
    let pool = match EgressPool::new(&cfg) {
        Ok(p) => p,
        Err(e) => {
            rows.push(Row::unavailable(SECTION, TCP_RANDOM, "µs", e.to_string()));
            return;
        }
    };
    let conn = pool.connection();
    let (n, limit) = (plan.egress_samples, plan.setup_time);
    let conn = &conn;
    let dest = origin;
    let udp_dest = std::net::SocketAddr::new(origin.ip(), 9);

    // Alternate the two kinds in rounds so drift (other load on the box) hits both alike.
    let mut tcp_r = Vec::new();
    let mut tcp_k = Vec::new();
    let mut udp_r = Vec::new();
    let mut udp_k = Vec::new();
    let rounds = 4;
    let mut err = None;
    for _ in 0..rounds {
        let per = n.div_ceil(rounds);
        let r = latencies(per, limit / rounds as u32, || async move {
            let t = Instant::now();
            let src = conn.source_for(dest.ip()).map_err(|e| e.to_string())?;
            let s = cfr_egress::connect_tcp(src, dest)
                .await
                .map_err(|e| e.to_string())?;
            let d = t.elapsed();
            drop(s);
            Ok(d)
        })
        .await;
        let k = latencies(per, limit / rounds as u32, || async move {
            let t = Instant::now();
            let s = cfr_egress::connect_tcp(None, dest)
                .await
                .map_err(|e| e.to_string())?;
            let d = t.elapsed();
            drop(s);
            Ok(d)
        })
        .await;
        let ur = latencies(per, limit / rounds as u32, || async move {
            let t = Instant::now();
            let src = conn.source_for(udp_dest.ip()).map_err(|e| e.to_string())?;
            let s = cfr_egress::bind_udp(src, udp_dest).map_err(|e| e.to_string())?;
            let d = t.elapsed();
            drop(s);
            Ok(d)
        })
        .await;
        let uk = latencies(per, limit / rounds as u32, || async move {
            let t = Instant::now();
            let s = cfr_egress::bind_udp(None, udp_dest).map_err(|e| e.to_string())?;
            let d = t.elapsed();
            drop(s);
            Ok(d)
        })
        .await;
        for (dst, r) in [
            (&mut tcp_r, r),
            (&mut tcp_k, k),
            (&mut udp_r, ur),
            (&mut udp_k, uk),
        ] {
            match r {
                Ok(v) => dst.extend(v),
                Err(e) => err = Some(e),
            }
        }
        // TIME_WAIT sockets of the previous round are not what we measure.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pick = |v: Vec<f64>| match (&err, v.is_empty()) {
        (Some(e), _) => Err(e.clone()),
        (None, true) => Err("no samples".to_string()),
        (None, false) => Ok(v),
    };
    pct_rows(SECTION, TCP_RANDOM, pick(tcp_r), rows);
    pct_rows(SECTION, TCP_KERNEL, pick(tcp_k), rows);
    pct_rows(SECTION, UDP_RANDOM, pick(udp_r), rows);
    pct_rows(SECTION, UDP_KERNEL, pick(udp_k), rows);
}
