//! Egress cost: a per-tunnel random source address (EgressPool over 127.0.0.0/8, freebind) against
//! a kernel-chosen source, for TCP bind+connect and UDP bind+connect; and what sealing the address
//! (FF1 under the epoch key, `egress.sealing`) costs per tunnel next to drawing it.
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
pub const SEALED: &str = "sealed /64 source address (FF1-AES-256)";
pub const DRAWN: &str = "drawn /64 source address (OsRng)";

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
    address_choice_rows(plan.egress_samples, rows);
}

/// Choosing a tunnel's source address alone (no socket): sealed for a subscriber against drawn from
/// the CSPRNG, alternating in rounds like the bind rows. A /64 needs a routed prefix to bind, so only
/// the choice is timed; add it to the bind rows above for a sealed tunnel's egress cost.
fn address_choice_rows(n: usize, rows: &mut Vec<Row>) {
    use cfr_egress::seal::{unix_now, MasterKey, SealParams, Sealer, Subscriber};
    let now = unix_now();
    let params = SealParams {
        origin: now - now % SealParams::DEFAULT_EPOCH_SECS,
        epoch_secs: SealParams::DEFAULT_EPOCH_SECS,
        handle_bits: SealParams::DEFAULT_HANDLE_BITS,
        check_bits: SealParams::DEFAULT_CHECK_BITS,
    };
    let cfg = EgressConfig {
        prefixes: vec!["2001:db8:cf::/64".parse().expect("static net")],
        ..EgressConfig::default()
    };
    let pools = Sealer::new(params, MasterKey::generate().chain_at(0), 0, 0, now)
        .map_err(|e| e.to_string())
        .and_then(|s| EgressPool::with_sealer(&cfg, Some(s)).map_err(|e| e.to_string()))
        .and_then(|sealed| Ok((sealed, EgressPool::new(&cfg).map_err(|e| e.to_string())?)));
    let (sealed, drawn) = match pools {
        Ok(p) => p,
        Err(e) => {
            pct_rows(SECTION, SEALED, Err(e.clone()), rows);
            pct_rows(SECTION, DRAWN, Err(e), rows);
            return;
        }
    };
    let dest: std::net::IpAddr = "2001:db8::1".parse().expect("static address");
    let (sealed, drawn) = (sealed.connection(), drawn.connection());
    let mut s = Vec::with_capacity(n);
    let mut d = Vec::with_capacity(n);
    let time = |f: &dyn Fn() -> bool| {
        let t = Instant::now();
        let ok = f();
        (t.elapsed().as_secs_f64() * 1e6, ok)
    };
    let mut failed = false;
    for i in 0..n {
        let sub = Subscriber(1 + (i as u32 % 1000));
        let (us, ok) = time(&|| matches!(sealed.source_for_subscriber(dest, sub), Ok(Some(_))));
        s.push(us);
        let (us, ok2) = time(&|| matches!(drawn.source_for(dest), Ok(Some(_))));
        d.push(us);
        failed |= !(ok && ok2);
    }
    let result = |v: Vec<f64>| {
        if failed {
            Err("an address choice failed".to_string())
        } else {
            Ok(v)
        }
    };
    pct_rows(SECTION, SEALED, result(s), rows);
    pct_rows(SECTION, DRAWN, result(d), rows);
}
