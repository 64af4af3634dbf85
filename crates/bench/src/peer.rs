//! The peers: vproxy 2.5.5 (an HTTP/HTTPS/SOCKS5 proxy in Rust) and Debian's squid (a TLS forward
//! proxy, `https_port`) on the same box, doing the same TCP bulk and setup-rate work through
//! HTTP/1.1 CONNECT; vproxy in `http` mode and in `https` mode (TLS to the proxy, with the bench's
//! dev certificate), squid over TLS. Also the cfr relay's own TLS/TCP front-end on the setup-rate
//! work, which is the like-for-like comparison for a TCP proxy: once in-process (sharing the
//! bench's runtime with the 64 clients) and once as a `cfr relay` child process like the peers, so
//! that it has threads of its own as they do and its CPU time per setup can be read from its own
//! `/proc/PID/stat` next to each peer's — a figure that, unlike setups/s, barely moves when other
//! processes share the cores.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::cpu::{cpu_secs, process_stat};
use crate::env::{self, Dir, Env};
use crate::front;
use crate::report::{percentile, Row};
use crate::scale::{relay_binary, RelayProcess};
use crate::setup::rate;
use crate::tcp::timed_bulk;
use crate::Plan;
use cfr_client::FrontVersion;

pub const SECTION: &str = "peer";

/// Where `cargo install vproxy --version 2.5.5 --locked --root target/bench/vproxy` puts it.
pub const DEFAULT_VPROXY: &str = "target/bench/vproxy/bin/vproxy";

/// Bulk row of a peer proxy, e.g. `bulk_name("vproxy https", Dir::Up)`.
pub fn bulk_name(peer: &str, dir: Dir) -> String {
    format!("{peer} CONNECT, 1 conn, {}", dir.as_str())
}

/// The peer's own CPU seconds per GiB on its single-stream bulk row (what cfr's relay row in the
/// cpu section measures for its TLS/TCP front-end).
pub fn cpu_name(peer: &str, dir: Dir) -> String {
    format!("{}: proxy CPU", bulk_name(peer, dir))
}

pub fn rate_name(who: &str) -> String {
    format!("{who} setups/s, 64 clients, new TCP conn each")
}

/// The proxy process's CPU time (user + system) per setup during [`rate_name`]'s run.
pub fn setup_cpu_name(who: &str) -> String {
    format!("{who} CPU per setup, 64 clients, new TCP conn each")
}

/// Finds the vproxy binary: `--vproxy`, else [`DEFAULT_VPROXY`] from the current directory or the
/// workspace root.
pub fn vproxy_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.exists() {
            Ok(p.to_owned())
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for base in [PathBuf::from("."), workspace] {
        let p = base.join(DEFAULT_VPROXY);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!(
        "vproxy not installed (cargo install vproxy --version 2.5.5 --locked --root target/bench/vproxy; looked for {DEFAULT_VPROXY})"
    ))
}

/// Where Debian's squid package puts the binary.
pub const SQUID: &str = "/usr/sbin/squid";
/// How to get it (Debian 12: squid 5.7; the `-openssl` build has TLS listening ports for sure).
pub const SQUID_INSTALL: &str = "apt-get install squid-openssl";

/// A free loopback port for a peer to listen on.
fn free_port() -> Result<SocketAddr, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A peer proxy child process, killed on drop.
struct PeerProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl PeerProcess {
    /// Starts `cmd` and waits (bounded) until it accepts TCP connections on `addr`.
    async fn start(
        mut cmd: tokio::process::Command,
        addr: SocketAddr,
        who: &str,
    ) -> Result<PeerProcess, String> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {who}: {e}"))?;
        let mut p = PeerProcess { child, addr };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(p);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("{who} exited at start: {status}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.stop().await;
        Err(format!("{who} did not listen within 10 s"))
    }

    async fn vproxy(bin: &Path, https: Option<(&Path, &Path)>) -> Result<PeerProcess, String> {
        let addr = free_port()?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("run")
            .arg("--bind")
            .arg(addr.to_string())
            .arg("--log")
            .arg("error")
            .arg("--concurrent")
            .arg("4096");
        match https {
            Some((cert, key)) => {
                cmd.arg("https")
                    .arg("--tls-cert")
                    .arg(cert)
                    .arg("--tls-key")
                    .arg(key);
            }
            None => {
                cmd.arg("http");
            }
        }
        PeerProcess::start(cmd, addr, "vproxy").await
    }

    /// squid as a TLS forward proxy (`https_port`, what `curl -x https://` and browsers use),
    /// CONNECT to any port allowed, no cache, no logs, in the foreground (`-N`).
    async fn squid(env: &Env) -> Result<PeerProcess, String> {
        if !Path::new(SQUID).exists() {
            return Err(format!("squid not installed ({SQUID_INSTALL})"));
        }
        let addr = free_port()?;
        let dir = env.dir.path().join("squid");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let conf = dir.join("squid.conf");
        let text = format!(
            "https_port {addr} tls-cert={cert} tls-key={key}\n\
             http_access allow all\n\
             cache deny all\n\
             cache_mem 0 MB\n\
             access_log none\n\
             cache_log /dev/null\n\
             cache_store_log none\n\
             pid_filename none\n\
             max_filedescriptors 16384\n\
             shutdown_lifetime 0 seconds\n",
            cert = env.pki.server_cert.display(),
            key = env.pki.server_key.display(),
        );
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut cmd = tokio::process::Command::new(SQUID);
        cmd.arg("-N").arg("-f").arg(&conf);
        PeerProcess::start(cmd, addr, "squid").await
    }

    /// The process's `/proc/PID/stat` (CPU time of all its threads).
    fn stat(&self) -> Option<PathBuf> {
        self.child.id().map(process_stat)
    }

    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let origin = env::bulk_origin(&env.tasks).await;
    let hold = env::hold_origin(&env.tasks).await;
    let (origin, hold) = match (origin, hold) {
        (Ok(o), Ok(h)) => (o, h),
        (Err(e), _) | (_, Err(e)) => {
            rows.push(Row::unavailable(
                SECTION,
                "vproxy",
                "",
                format!("origin: {e}"),
            ));
            return;
        }
    };
    let tls = front::tls_config(&env.pki.ca_cert, &[FrontVersion::Http11]);

    // cfr's own TLS/TCP front-end on the same setup work.
    cfr_rate_rows(env, plan, hold, &tls, rows).await;

    let bin = if plan.peer {
        vproxy_binary(plan.vproxy.as_deref())
    } else {
        Err("skipped (--no-peer)".into())
    };
    for mode in ["https", "http"] {
        let https = mode == "https";
        let started = match &bin {
            Ok(b) => {
                let certs =
                    https.then_some((env.pki.server_cert.as_path(), env.pki.server_key.as_path()));
                PeerProcess::vproxy(b, certs).await
            }
            Err(e) => Err(e.clone()),
        };
        let tls = if https { tls.clone().ok() } else { None };
        peer_rows(
            plan,
            &format!("vproxy {mode}"),
            started,
            origin,
            hold,
            tls,
            rows,
        )
        .await;
    }
    let started = if plan.peer {
        PeerProcess::squid(env).await
    } else {
        Err("skipped (--no-peer)".into())
    };
    peer_rows(plan, "squid https", started, origin, hold, tls.ok(), rows).await;
}

/// The row of cfr's TLS/TCP front-end run as a `cfr relay` child process, like the peers.
pub const CFR_PROCESS: &str = "cfr TLS/TCP h1 (relay process)";

/// Setups/s through cfr's TLS/TCP front-end: against the bench's in-process relay (the row the
/// issue's target is on), and against a `cfr relay` child process, as the peers run, with its CPU
/// per setup (only when the bench runs from the `cfr` binary or `--relay-bin` names one).
async fn cfr_rate_rows(
    env: &Env,
    plan: &Plan,
    hold: SocketAddr,
    tls: &Result<Arc<rustls::ClientConfig>, String>,
    rows: &mut Vec<Row>,
) {
    let who = "cfr TLS/TCP h1";
    let tls = match tls {
        Ok(t) => t.clone(),
        Err(e) => {
            for name in [rate_name(who), rate_name(CFR_PROCESS)] {
                rows.push(Row::unavailable(SECTION, name, "setups/s", e.clone()));
            }
            return;
        }
    };
    match env.tcp_front {
        Some(front) => {
            let r = tcp_rate(plan, front, hold, Some(tls.clone()), Some(env::TOKEN), None).await;
            let note = "in-process relay, sharing the clients' runtime";
            rate_rows(who, r, note, rows);
        }
        None => rows.push(Row::unavailable(
            SECTION,
            rate_name(who),
            "setups/s",
            "the relay has no TLS/TCP front-end",
        )),
    }
    let Some(bin) = relay_binary(plan.relay_bin.as_deref()) else {
        rows.push(Row::unavailable(
            SECTION,
            rate_name(CFR_PROCESS),
            "setups/s",
            "needs the cfr binary to run the relay as a child (--relay-bin)",
        ));
        return;
    };
    match RelayProcess::spawn(&bin, env).await {
        Ok(relay) => {
            let stat = process_stat(relay.pid);
            let (proxy, token) = (relay.addr, Some(env::TOKEN));
            let r = tcp_rate(plan, proxy, hold, Some(tls), token, Some(&stat)).await;
            rate_rows(CFR_PROCESS, r, "cfr relay child process", rows);
            relay.stop().await;
        }
        Err(e) => rows.push(Row::unavailable(
            SECTION,
            rate_name(CFR_PROCESS),
            "setups/s",
            e,
        )),
    }
}

/// Bulk up, bulk down and setups/s through one started peer proxy (or why not), then stops it.
async fn peer_rows(
    plan: &Plan,
    peer: &str,
    started: Result<PeerProcess, String>,
    origin: SocketAddr,
    hold: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    rows: &mut Vec<Row>,
) {
    let mut p = match started {
        Ok(p) => p,
        Err(e) => {
            for dir in [Dir::Up, Dir::Down] {
                rows.push(Row::unavailable(
                    SECTION,
                    bulk_name(peer, dir),
                    "Gbit/s",
                    e.clone(),
                ));
            }
            rows.push(Row::unavailable(SECTION, rate_name(peer), "setups/s", e));
            return;
        }
    };
    let stat = p.stat();
    let peer_cpu = || match stat.as_deref() {
        Some(stat) => cpu_secs(stat),
        None => Err(format!("{peer} has exited: no CPU time to read")),
    };
    for dir in [Dir::Up, Dir::Down] {
        let proxy = p.addr;
        let cpu_before = peer_cpu();
        let r = match &tls {
            Some(tls) => {
                timed_bulk(1, plan.bytes, dir, || {
                    let tls = tls.clone();
                    async move {
                        let mut s = front::tls_connect(proxy, tls).await?;
                        front::h1_connect(&mut s, origin, None).await?;
                        Ok(s)
                    }
                })
                .await
            }
            None => {
                timed_bulk(1, plan.bytes, dir, || async move {
                    let mut s = env::direct_tcp(proxy).await?;
                    front::h1_connect(&mut s, origin, None).await?;
                    Ok(s)
                })
                .await
            }
        };
        let cpu = match (&r, cpu_before, peer_cpu()) {
            (Ok(_), Ok(before), Ok(after)) => Ok(crate::cpu::per_gib(before, after, plan.bytes)),
            (Err(e), _, _) => Err(e.to_string()),
            (_, Err(e), _) | (_, _, Err(e)) => Err(e),
        };
        rows.push(Row::from_result(SECTION, bulk_name(peer, dir), "Gbit/s", r));
        rows.push(match cpu {
            Ok(v) => Row::new(SECTION, cpu_name(peer, dir), v, "CPU s/GiB")
                .note("peer child process, its own /proc/PID/stat"),
            Err(e) => Row::unavailable(SECTION, cpu_name(peer, dir), "CPU s/GiB", e),
        });
    }
    let r = tcp_rate(plan, p.addr, hold, tls, None, stat.as_deref()).await;
    rate_rows(peer, r, &format!("{peer} child process"), rows);
    p.stop().await;
}

/// One setup-rate run: setups/s, the latency samples (µs), and the proxy process's CPU µs per
/// setup when its `/proc/PID/stat` was given.
struct RateRun {
    rate: f64,
    latencies: Vec<f64>,
    cpu_per_setup: Option<Result<f64, String>>,
}

/// The setups/s row (p99 latency in the note) and, when measured, the CPU per setup row.
fn rate_rows(who: &str, r: Result<RateRun, String>, process: &str, rows: &mut Vec<Row>) {
    let name = rate_name(who);
    let run = match r {
        Ok(run) => run,
        Err(e) => {
            rows.push(Row::unavailable(SECTION, name, "setups/s", e));
            return;
        }
    };
    let mut lat = run.latencies;
    let p99 = percentile(&mut lat, 99.0).unwrap_or(f64::NAN);
    rows.push(
        Row::new(SECTION, name, run.rate, "setups/s").note(format!("p99 {p99:.0} µs; {process}")),
    );
    let cpu = setup_cpu_name(who);
    match run.cpu_per_setup {
        Some(Ok(us)) => rows.push(
            Row::new(SECTION, cpu, us, "µs CPU").note(format!("{process}, its /proc/PID/stat")),
        ),
        Some(Err(e)) => rows.push(Row::unavailable(SECTION, cpu, "µs CPU", e)),
        None => {}
    }
}

/// 64 workers, each looping: new TCP connection (+ TLS), CONNECT, 200, close; with the CPU time
/// the process whose `/proc/PID/stat` is `stat` spent meanwhile, per setup.
async fn tcp_rate(
    plan: &Plan,
    proxy: SocketAddr,
    origin: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<&'static str>,
    stat: Option<&Path>,
) -> Result<RateRun, String> {
    let cpu = || stat.map(cpu_secs);
    let before = cpu();
    let (rate, latencies) = rate(plan.rate_clients, plan.rate_time, move |_| {
        let tls = tls.clone();
        async move {
            match tls {
                Some(tls) => {
                    let mut s = front::tls_connect(proxy, tls)
                        .await
                        .map_err(|e| e.to_string())?;
                    front::h1_connect(&mut s, origin, token)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                None => {
                    let mut s = env::direct_tcp(proxy).await.map_err(|e| e.to_string())?;
                    front::h1_connect(&mut s, origin, token)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }
    })
    .await?;
    let cpu_per_setup = match (before, cpu()) {
        (Some(b), Some(a)) => Some(b.and_then(|b| {
            let setups = latencies.len().max(1) as f64;
            Ok((a? - b) / setups * 1e6)
        })),
        _ => None,
    };
    Ok(RateRun {
        rate,
        latencies,
        cpu_per_setup,
    })
}
