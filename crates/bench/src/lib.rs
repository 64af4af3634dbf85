//! `cfr bench`: what the relay costs, measured on loopback against baselines taken in the same run.
//!
//! Everything is started here: an in-process relay with a generated dev PKI in a temp dir, the
//! origins, the clients, a raw quinn pair (the QUIC ceiling, same transport config as the relay),
//! and, when installed, the peer proxy vproxy. Every row is a number or an explicit reason why
//! there is none; ratios are to baselines measured in the same run.
#![forbid(unsafe_code)]

pub mod cpu;
pub mod egress;
pub mod env;
pub mod fleet;
pub mod flood;
pub mod front;
pub mod inner;
pub mod peer;
pub mod process;
pub mod report;
pub mod scale;
pub mod setup;
pub mod soak;
pub mod tcp;
pub mod udp;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use report::{Machine, Report, Row};

use env::Dir;

/// `cfr bench` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// A few seconds in total, small sizes (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Bytes per TCP bulk transfer [default: 1 GiB; quick: 8 MiB].
    #[arg(long)]
    pub bytes: Option<u64>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/cfr-bench.json")]
    pub json: PathBuf,
    /// Idle-tunnel counts for the scale run, comma-separated [default: 1000,10000; quick: 200].
    #[arg(long, value_delimiter = ',')]
    pub idle: Option<Vec<usize>>,
    /// UDP datagrams per echo run [default: 2 000 000, bounded by 10 s; quick: 5 000].
    #[arg(long)]
    pub udp_count: Option<u64>,
    /// Datagrams in flight in the UDP echo runs.
    #[arg(long, default_value_t = 256)]
    pub udp_window: u64,
    /// The vproxy binary [default: target/bench/vproxy/bin/vproxy].
    #[arg(long)]
    pub vproxy: Option<PathBuf>,
    /// Do not run the peer proxy.
    #[arg(long)]
    pub no_peer: bool,
    /// `cfr` binary to run the scale run's relay as a child process [default: this executable
    /// when it is `cfr`; otherwise the relay runs in-process].
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// Idle QUIC connections per flood wave [default: 2000; quick: 200].
    #[arg(long)]
    pub flood_connections: Option<usize>,
    /// Flood waves [default: 5; quick: 2].
    #[arg(long)]
    pub flood_waves: Option<usize>,
    /// Seconds of mixed churn in the soak section, which runs only when named in `--only`
    /// [default: 600].
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Only these sections (tcp, udp, setup, peer, cpu, inner, egress, scale, fleet, flood,
    /// soak), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// Runs of the headline sections (tcp, udp, setup, peer); each row reports the median and the
    /// spread [default: 3; quick: 1].
    #[arg(long)]
    pub repeat: Option<usize>,
}

/// Sizes and bounds derived from the arguments.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub bytes: u64,
    pub idle: Vec<usize>,
    pub udp_count: u64,
    pub udp_window: u64,
    pub udp_time: Duration,
    pub setup_samples: usize,
    pub new_conn_samples: usize,
    pub egress_samples: usize,
    pub setup_time: Duration,
    pub rate_clients: usize,
    pub rate_time: Duration,
    pub vproxy: Option<PathBuf>,
    pub peer: bool,
    pub relay_bin: Option<PathBuf>,
    pub only: Option<Vec<String>>,
    pub flood_connections: usize,
    pub flood_waves: usize,
    pub soak_secs: u64,
    pub repeat: usize,
}

impl Plan {
    pub fn new(a: &BenchArgs) -> Plan {
        let q = a.quick;
        Plan {
            quick: q,
            bytes: a.bytes.unwrap_or(if q { 8 << 20 } else { 1 << 30 }),
            idle: a
                .idle
                .clone()
                .unwrap_or(if q { vec![200] } else { vec![1000, 10_000] }),
            udp_count: a.udp_count.unwrap_or(if q { 5_000 } else { 2_000_000 }),
            udp_window: a.udp_window.max(1),
            udp_time: Duration::from_secs(if q { 2 } else { 10 }),
            setup_samples: if q { 50 } else { 2000 },
            new_conn_samples: if q { 10 } else { 200 },
            egress_samples: if q { 100 } else { 4000 },
            setup_time: Duration::from_secs(if q { 2 } else { 20 }),
            rate_clients: 64,
            rate_time: Duration::from_millis(if q { 500 } else { 5000 }),
            vproxy: a.vproxy.clone(),
            peer: !a.no_peer,
            relay_bin: a.relay_bin.clone(),
            only: a.only.clone(),
            flood_connections: a.flood_connections.unwrap_or(if q { 200 } else { 2000 }),
            flood_waves: a.flood_waves.unwrap_or(if q { 2 } else { 5 }).max(1),
            soak_secs: a.soak_secs.unwrap_or(600),
            repeat: a.repeat.unwrap_or(if q { 1 } else { 3 }).max(1),
        }
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s.eq_ignore_ascii_case(section)))
    }
}

/// Runs every section and returns the report (ratios and targets filled in).
pub async fn run(args: &BenchArgs) -> Report {
    let plan = Plan::new(args);
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut report = Report {
        mode: if plan.quick { "quick" } else { "full" },
        machine: Machine::probe(),
        bytes: plan.bytes,
        started_unix,
        duration_secs: 0.0,
        rows: Vec::new(),
    };
    match env::Env::start().await {
        Ok(env) => {
            // The headline sections run `repeat` times so one noisy run does not move a number.
            let mut runs = Vec::with_capacity(plan.repeat);
            for _ in 0..plan.repeat {
                let mut rows = Vec::new();
                if plan.wants("tcp") {
                    tcp::run(&env, &plan, &mut rows).await;
                }
                if plan.wants("udp") {
                    udp::run(&env, &plan, &mut rows).await;
                }
                if plan.wants("setup") {
                    setup::run(&env, &plan, &mut rows).await;
                }
                if plan.wants("peer") {
                    peer::run(&env, &plan, &mut rows).await;
                }
                runs.push(rows);
            }
            report.rows = report::merge_runs(runs);
            let rows = &mut report.rows;
            if plan.wants("cpu") {
                cpu::run(&env, &plan, rows).await;
            }
            if plan.wants("inner") {
                inner::run(&env, &plan, rows).await;
            }
            if plan.wants("egress") {
                egress::run(&env, &plan, rows).await;
            }
            if plan.wants("scale") {
                scale::run(&env, &plan, rows).await;
            }
            if plan.wants("fleet") {
                fleet::run(&plan, rows).await;
            }
            if plan.wants("flood") {
                flood::run(&env, &plan, rows).await;
            }
            // Minutes long: only when asked for by name.
            if plan
                .only
                .as_ref()
                .is_some_and(|o| o.iter().any(|s| s.eq_ignore_ascii_case("soak")))
            {
                soak::run(&env, &plan, rows).await;
            }
            env.stop().await;
        }
        Err(e) => report.rows.push(Row::unavailable(
            "setup",
            "relay",
            "",
            format!("cannot start the relay: {e}"),
        )),
    }
    derive(&mut report);
    report.machine.load_end = report::load_average();
    report.duration_secs = started.elapsed().as_secs_f64();
    report
}

/// Ratios to the same-run baselines, derived rows, and the targets.
fn derive(r: &mut Report) {
    use tcp::name;
    for dir in [Dir::Up, Dir::Down] {
        for n in [1, 8] {
            r.ratio(&name("h3 CONNECT", n, dir), &name("raw quinn", n, dir));
            r.ratio(&name("raw quinn", n, dir), &name("direct TCP", n, dir));
        }
        let vproxy = peer::bulk_name("vproxy https", dir);
        r.ratio(&name("TLS/TCP h1 CONNECT", 1, dir), &vproxy);
        r.ratio(&name("TLS/TCP h2 CONNECT", 1, dir), &vproxy);
        for p in ["vproxy https", "vproxy http", "squid https"] {
            r.ratio(&peer::bulk_name(p, dir), &name("direct TCP", 1, dir));
        }
        r.versus(
            peer::SECTION,
            &name("TLS/TCP h1 CONNECT", 1, dir),
            &peer::bulk_name("squid https", dir),
            1.5,
        );
        let h3 = name("h3 CONNECT", 1, dir);
        r.target(&h3, "≥ 0.6× raw quinn", |row| {
            row.ratio.map(|x| x >= 0.6)
        });
        for p in ["TLS/TCP h1 CONNECT", "TLS/TCP h2 CONNECT"] {
            r.target(&name(p, 1, dir), "≥ 1.0× vproxy https", |row| {
                row.ratio.map(|x| x >= 1.0)
            });
        }
    }

    // UDP: rates relative to raw quinn datagrams, loss target.
    let rate = |p: &str| format!("{p}: datagrams/s");
    r.ratio(&rate(udp::TUNNEL), &rate(udp::QUIC));
    r.ratio(&rate(udp::QUIC), &rate(udp::DIRECT));
    r.target(&rate(udp::TUNNEL), "≥ 0.7× raw quinn", |row| {
        row.ratio.map(|x| x >= 0.7)
    });
    r.target(&format!("{}: loss", udp::TUNNEL), "< 0.1 %", |row| {
        row.value.map(|x| x < 0.1)
    });
    r.ratio(&rate(udp::CAPSULES), &rate(udp::QUIC));

    // Setup: warm p99 ≤ 1 RTT + 200 µs.
    let rtt = r.get(setup::RTT).and_then(|x| x.value);
    for p in [50, 99] {
        r.ratio(
            &format!("{}: p{p}", setup::WARM),
            &format!("{}: p{p}", setup::TCP_CONNECT),
        );
        r.ratio(
            &format!("{}: p{p}", setup::NEW),
            &format!("{}: p{p}", setup::WARM),
        );
    }
    // Warm setup: p50 ≤ RTT + direct connect p50 + 50 µs; p99 ≤ 2 × (RTT + direct connect p99).
    let direct = |p: u32| {
        r.get(&format!("{}: p{p}", setup::TCP_CONNECT))
            .and_then(|x| x.value)
    };
    if let (Some(rtt), Some(d50), Some(d99)) = (rtt, direct(50), direct(99)) {
        let bound = rtt + d50 + 50.0;
        r.target(
            &format!("{}: p50", setup::WARM),
            &format!("≤ RTT + connect p50 + 50 µs = {bound:.0} µs"),
            |row| row.value.map(|v| v <= bound),
        );
        let bound = 2.0 * (rtt + d99);
        r.target(
            &format!("{}: p99", setup::WARM),
            &format!("≤ 2 × (RTT + connect p99) = {bound:.0} µs"),
            |row| row.value.map(|v| v <= bound),
        );
    }
    r.ratio(setup::RATE, &peer::rate_name("vproxy https"));
    let cfr_h1 = peer::rate_name("cfr TLS/TCP h1");
    r.ratio(&cfr_h1, &peer::rate_name("vproxy https"));
    r.target(&cfr_h1, "≥ 1.2× vproxy https", |row| {
        row.ratio.map(|x| x >= 1.2)
    });
    r.versus(peer::SECTION, &cfr_h1, &peer::rate_name("squid https"), 1.5);
    // CPU per setup: below 1× means cfr spends less than the peer on the same setup.
    r.ratio(
        &peer::rate_name(peer::CFR_PROCESS),
        &peer::rate_name("vproxy https"),
    );
    let cfr_cpu = peer::setup_cpu_name(peer::CFR_PROCESS);
    r.ratio(&cfr_cpu, &peer::setup_cpu_name("vproxy https"));

    cpu::derive(r);
    inner::derive(r);

    // Fleet: what a second member behind the nftables balancer adds.
    r.ratio(&fleet::name(2), &fleet::name(1));

    // Scale: 10 000 idle tunnels within 512 MiB.
    r.target("10000 idle TCP tunnels: relay RSS", "≤ 512 MiB", |row| {
        row.value.map(|v| v <= 512.0)
    });

    // Egress: what a random source adds at p99.
    for (random, kernel, label) in [
        (egress::TCP_RANDOM, egress::TCP_KERNEL, "TCP"),
        (egress::UDP_RANDOM, egress::UDP_KERNEL, "UDP"),
    ] {
        let p99 = |n: &str| r.get(&format!("{n}: p99")).and_then(|x| x.value);
        let name = format!("{label} random source adds, p99");
        if r.get(&format!("{random}: p99")).is_none() {
            continue;
        }
        let row = match (p99(random), p99(kernel)) {
            (Some(a), Some(b)) => Row::new(egress::SECTION, name.clone(), a - b, "µs"),
            _ => Row::unavailable(
                egress::SECTION,
                name.clone(),
                "µs",
                "a p99 above is missing",
            ),
        };
        r.rows.push(row);
        r.target(&name, "≤ 20 µs", |row| row.value.map(|v| v <= 20.0));
        r.ratio(&format!("{random}: p99"), &format!("{kernel}: p99"));
    }
    // Sealing: the FF1 address choice against the unsealed egress bind it precedes, same run.
    for p in ["p50", "p99"] {
        r.ratio(
            &format!("{}: {p}", egress::SEALED),
            &format!("{}: {p}", egress::UDP_RANDOM),
        );
    }
}

/// What `cfr bench` does: run, print the table, write the JSON.
pub async fn main(args: BenchArgs) -> Result<std::process::ExitCode, String> {
    let report = run(&args).await;
    println!("{}", report.table());
    if let Some(dir) = args.json.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&args.json, json).map_err(|e| format!("{}: {e}", args.json.display()))?;
    eprintln!("JSON report: {}", args.json.display());
    Ok(std::process::ExitCode::SUCCESS)
}
