//! Scale: N concurrent idle TCP tunnels, and what they cost the relay in memory and descriptors.
//!
//! With a `cfr` binary at hand the relay runs as a child process and its own `/proc/PID/status`
//! VmRSS and `/proc/PID/fd` are read: nothing else is in those numbers. Without one (the test
//! suite) the relay runs in-process and the bench subtracts a baseline of its own process, which
//! then also counts the client and origin side of every tunnel.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;

use crate::env::{self, Env};
use crate::report::Row;
use crate::Plan;

pub const SECTION: &str = "scale";

/// Tunnels per client connection in the scale run.
const PER_CONNECTION: usize = 1000;

/// A command that runs `program` under `wrapper` (a profiler and its arguments), or by itself
/// when `wrapper` is empty.
pub fn wrapped_command(wrapper: &[String], program: &Path) -> tokio::process::Command {
    match wrapper.split_first() {
        Some((profiler, args)) => {
            let mut c = tokio::process::Command::new(profiler);
            c.args(args).arg(program);
            c
        }
        None => tokio::process::Command::new(program),
    }
}

/// A relay started as `cfr relay --config FILE --print-ready`, killed on drop.
pub struct RelayProcess {
    child: tokio::process::Child,
    pub pid: u32,
    pub addr: std::net::SocketAddr,
}

impl RelayProcess {
    pub async fn spawn(bin: &Path, env: &Env) -> Result<RelayProcess, String> {
        Self::spawn_with(bin, env, |_| {}).await
    }

    /// [`RelayProcess::spawn`] with the bench relay configuration adjusted by `adjust`.
    pub async fn spawn_with(
        bin: &Path,
        env: &Env,
        adjust: impl FnOnce(&mut cfr_relay::config::RelayConfig),
    ) -> Result<RelayProcess, String> {
        Self::spawn_wrapped(&[], bin, env, adjust).await
    }

    /// Like [`RelayProcess::spawn_with`], with the relay run under `wrapper` (a profiler such as
    /// `valgrind --tool=callgrind`); the child's pid is then the wrapper's, which for valgrind is
    /// the relay itself.
    pub async fn spawn_wrapped(
        wrapper: &[String],
        bin: &Path,
        env: &Env,
        adjust: impl FnOnce(&mut cfr_relay::config::RelayConfig),
    ) -> Result<RelayProcess, String> {
        let mut cfg = env::relay_config(&env.pki, env.dir.path());
        adjust(&mut cfg);
        let file = env.dir.path().join("bench-relay.toml");
        std::fs::write(&file, cfg.to_toml()).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut child = wrapped_command(wrapper, bin)
            .arg("relay")
            .arg("--config")
            .arg(&file)
            .arg("--print-ready")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let pid = child.id().ok_or("relay exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        // Under a profiler the relay starts an order of magnitude slower.
        let ready = Duration::from_secs(if wrapper.is_empty() { 20 } else { 120 });
        let line = tokio::time::timeout(ready, lines.next_line())
            .await
            .map_err(|_| format!("relay not ready within {ready:?}"))?
            .map_err(|e| e.to_string())?
            .ok_or("relay exited before it was ready")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}"))?;
        let addr = v["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no listen address in {line:?}"))?;
        Ok(RelayProcess { child, pid, addr })
    }

    /// SIGTERM to the relay (the wrapper's child, if it runs under one), which drains and exits
    /// on its own; then waits for the child (bounded).
    pub async fn terminate(mut self) {
        let children = format!("/proc/{0}/task/{0}/children", self.pid);
        let relay = std::fs::read_to_string(children)
            .ok()
            .and_then(|c| c.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| self.pid.to_string());
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(relay)
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// VmRSS of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The `cfr` binary to run the relay from: `--relay-bin`, else this executable when it is `cfr`.
pub fn relay_binary(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    let exe = std::env::current_exe().ok()?;
    (exe.file_name()? == "cfr").then_some(exe)
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let Some(origin) = env::origin_or_unavailable(env, rows, SECTION, "idle tunnels", "").await
    else {
        return;
    };
    let bin = relay_binary(plan.relay_bin.as_deref());
    for &n in &plan.idle {
        let r = one(env, origin, n, bin.as_deref()).await;
        let prefix = format!("{n} idle TCP tunnels");
        match r {
            Ok(m) => {
                let how = m.how;
                rows.push(
                    Row::new(
                        SECTION,
                        format!("{prefix}: relay RSS"),
                        m.rss_after as f64 / (1 << 20) as f64,
                        "MiB",
                    )
                    .note(format!(
                        "{how}; {:.0} MiB before the tunnels",
                        m.rss_before as f64 / (1 << 20) as f64
                    )),
                );
                rows.push(Row::new(
                    SECTION,
                    format!("{prefix}: RSS per tunnel"),
                    (m.rss_after.saturating_sub(m.rss_before)) as f64 / n as f64 / 1024.0,
                    "KiB",
                ));
                rows.push(
                    Row::new(
                        SECTION,
                        format!("{prefix}: fds per tunnel"),
                        (m.fds_after.saturating_sub(m.fds_before)) as f64 / n as f64,
                        "fd",
                    )
                    .note(format!("{} fds open in total", m.fds_after)),
                );
                rows.push(Row::new(
                    SECTION,
                    format!("{prefix}: opened per second"),
                    m.open_rate,
                    "tunnels/s",
                ));
            }
            Err(e) => {
                for (m, u) in [
                    ("relay RSS", "MiB"),
                    ("RSS per tunnel", "KiB"),
                    ("fds per tunnel", "fd"),
                ] {
                    rows.push(Row::unavailable(
                        SECTION,
                        format!("{prefix}: {m}"),
                        u,
                        e.clone(),
                    ));
                }
            }
        }
    }
}

struct Measured {
    how: &'static str,
    rss_before: u64,
    rss_after: u64,
    fds_before: u64,
    fds_after: u64,
    open_rate: f64,
}

async fn one(
    env: &Env,
    origin: std::net::SocketAddr,
    n: usize,
    bin: Option<&Path>,
) -> Result<Measured, String> {
    let (process, pid, cfg, how) = match bin {
        Some(b) => {
            let p = RelayProcess::spawn(b, env).await?;
            let (pid, addr) = (p.pid, p.addr);
            (
                Some(p),
                pid,
                env::client_config(addr, &env.pki),
                "relay child process, its own /proc",
            )
        }
        None => (
            None,
            std::process::id(),
            env.client_config(),
            "in-process relay: bench process minus baseline (includes client and origin side)",
        ),
    };
    let result = async {
        let conns = n.div_ceil(PER_CONNECTION);
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(
                cfr_client::RelayClient::connect(cfg.clone())
                    .await
                    .map_err(|e| format!("client: {e}"))?,
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_before = rss_bytes(pid).ok_or("cannot read VmRSS")?;
        let fds_before = fd_count(pid).ok_or("cannot count fds")?;
        let started = Instant::now();
        let target = env::target(origin);
        let opened: Vec<Result<cfr_client::TcpTunnel, String>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let c = clients[i % conns].clone();
                let target = target.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(30), c.connect_tcp(&target))
                        .await
                        .map_err(|_| "a tunnel took more than 30 s to open".to_string())?
                        .map_err(|e| e.to_string())
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let open_secs = started.elapsed().as_secs_f64();
        let mut tunnels = Vec::with_capacity(n);
        for t in opened {
            tunnels.push(t.map_err(|e| format!("opening {n} tunnels: {e}"))?);
        }
        // Let the relay settle (lazily touched buffers, deferred frees) before reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = rss_bytes(pid).ok_or("cannot read VmRSS")?;
        let fds_after = fd_count(pid).ok_or("cannot count fds")?;
        drop(tunnels);
        for c in &clients {
            c.close();
        }
        Ok(Measured {
            how,
            rss_before,
            rss_after,
            fds_before,
            fds_after,
            open_rate: n as f64 / open_secs,
        })
    }
    .await;
    if let Some(p) = process {
        p.stop().await;
    }
    // Give the in-process relay and the origin time to close the tunnels' sockets.
    tokio::time::sleep(Duration::from_millis(500)).await;
    result
}
