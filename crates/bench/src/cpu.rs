//! CPU per byte: the relay's own CPU seconds (user + system, from its `/proc/PID/stat`) per GiB it
//! relayed, next to a raw quinn server's for the same bytes. Unlike a rate, a CPU-time-per-byte
//! figure barely moves when other processes share the cores.
//!
//! The relay runs as a child process (`cfr relay`), so nothing but the relay is in its numbers.
//! The raw quinn server runs on a thread of its own with a single-threaded runtime, so that
//! thread's `/proc/PID/task/TID/stat` holds exactly the server's work.
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::env::{self, Dir, Env};
use crate::report::Row;
use crate::scale::{relay_binary, RelayProcess};
use crate::tcp::{name, timed_bulk};
use crate::udp::{self, echo_run, Path as EchoPath};
use crate::{front, Plan};
use cfr_client::FrontVersion;

pub const SECTION: &str = "cpu";

/// The relay side of a measured row.
pub fn relay_row(path: &str) -> String {
    format!("{path}: relay CPU")
}

/// The raw quinn server side of a measured row.
pub fn quinn_row(path: &str) -> String {
    format!("{path}: raw quinn server CPU")
}

/// `/proc` reports CPU time in USER_HZ ticks, which Linux fixes at 100 per second for userspace.
const USER_HZ: f64 = 100.0;

/// The `stat` file of process `pid` (CPU time of all its threads).
pub fn process_stat(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/stat"))
}

/// User + system CPU seconds of the task whose `stat` file is `stat`.
pub fn cpu_secs(stat: &Path) -> Result<f64, String> {
    let parse = || -> Option<f64> {
        let s = std::fs::read_to_string(stat).ok()?;
        // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        let rest = &s[s.rfind(')')? + 1..];
        let mut f = rest.split_whitespace().skip(11);
        let user: u64 = f.next()?.parse().ok()?;
        let system: u64 = f.next()?.parse().ok()?;
        Some((user + system) as f64 / USER_HZ)
    };
    parse().ok_or_else(|| format!("cannot read {}", stat.display()))
}

/// A raw quinn server on its own thread and runtime, stopped on drop.
struct QuinnThread {
    addr: SocketAddr,
    stat: PathBuf,
    endpoint: quinn::Endpoint,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QuinnThread {
    fn start(env: &Env) -> Result<QuinnThread, String> {
        let config = env::quic_server_config(env)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let ep = match env::quic_endpoint(Some(config)) {
                    Ok(ep) => ep,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let stat = std::fs::read_link("/proc/thread-self").map(|p| p.join("stat"));
                let started = match (ep.local_addr(), stat) {
                    (Ok(a), Ok(s)) => Ok((a, s, ep.clone())),
                    (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                };
                let _ = tx.send(started);
                env::serve_quic(ep).await;
            });
        });
        let (addr, stat, endpoint) = rx
            .recv()
            .map_err(|_| "raw quinn thread ended at start".to_string())??;
        Ok(QuinnThread {
            addr,
            stat: Path::new("/proc").join(stat.strip_prefix("/proc").unwrap_or(&stat)),
            endpoint,
            thread: Some(thread),
        })
    }

    fn cpu(&self) -> Result<f64, String> {
        cpu_secs(&self.stat)
    }
}

impl Drop for QuinnThread {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU seconds per GiB of `bytes`, from the CPU seconds before and after.
pub fn per_gib(before: f64, after: f64, bytes: u64) -> f64 {
    (after - before) / (bytes as f64 / (1u64 << 30) as f64)
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let tcp_paths = [Dir::Up, Dir::Down].map(|d| name("h3 CONNECT", 1, d));
    let h1_paths = [Dir::Up, Dir::Down].map(|d| name("TLS/TCP h1 CONNECT", 1, d));
    let all_relay: Vec<String> = tcp_paths
        .iter()
        .chain(&h1_paths)
        .map(|p| relay_row(p))
        .chain([relay_row(udp::TUNNEL)])
        .collect();
    let Some(bin) = relay_binary(plan.relay_bin.as_deref()) else {
        for r in all_relay {
            rows.push(Row::unavailable(
                SECTION,
                r,
                "CPU s/GiB",
                "needs the cfr binary to run the relay as a child (--relay-bin)",
            ));
        }
        return;
    };
    let origin = env::bulk_origin(&env.tasks).await;
    let echo = env::udp_echo(&env.tasks).await;
    let relay = RelayProcess::spawn(&bin, env).await;
    let (origin, echo, relay) = match (origin, echo, relay) {
        (Ok(o), Ok(e), Ok(r)) => (o, e, r),
        (o, e, r) => {
            let why = [
                o.err().map(|e| e.to_string()),
                e.err().map(|e| e.to_string()),
                r.err(),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
            for r in all_relay {
                rows.push(Row::unavailable(SECTION, r, "CPU s/GiB", why.clone()));
            }
            return;
        }
    };
    let stat = process_stat(relay.pid);
    let relay_cpu = || cpu_secs(&stat);
    let note = "relay child process, its own /proc/PID/stat";
    let bytes = plan.bytes;

    let client = cfr_client::RelayClient::connect(env::client_config(relay.addr, &env.pki))
        .await
        .map_err(|e| format!("client: {e}"));
    for (dir, path) in [Dir::Up, Dir::Down].into_iter().zip(&tcp_paths) {
        let r = async {
            let c = client.as_ref().map_err(Clone::clone)?;
            let before = relay_cpu()?;
            timed_bulk(1, bytes, dir, || async {
                c.connect_tcp(&env::target(origin))
                    .await
                    .map_err(io::Error::other)
            })
            .await?;
            Ok(per_gib(before, relay_cpu()?, bytes))
        }
        .await;
        rows.push(cpu_row(relay_row(path), r, note));
    }

    let tls = front::tls_config(&env.pki.ca_cert, &[FrontVersion::Http11]);
    for (dir, path) in [Dir::Up, Dir::Down].into_iter().zip(&h1_paths) {
        let r = async {
            let tls = tls.clone()?;
            let before = relay_cpu()?;
            let proxy = relay.addr;
            timed_bulk(1, bytes, dir, || {
                let tls = tls.clone();
                async move {
                    let mut s = front::tls_connect(proxy, tls).await?;
                    front::h1_connect(&mut s, origin, Some(env::TOKEN)).await?;
                    Ok(s)
                }
            })
            .await?;
            Ok(per_gib(before, relay_cpu()?, bytes))
        }
        .await;
        rows.push(cpu_row(relay_row(path), r, note));
    }

    let (count, window, limit) = (plan.udp_count, plan.udp_window, plan.udp_time);
    let r = async {
        let c = client.as_ref().map_err(Clone::clone)?;
        let t = c
            .connect_udp(&env::target(echo))
            .await
            .map_err(|e| format!("CONNECT-UDP: {e}"))?;
        let path = Arc::new(EchoPath::Tunnel(t));
        let _ = echo_run(path.clone(), 256, 32, std::time::Duration::from_millis(300)).await;
        let before = relay_cpu()?;
        let r = echo_run(path, count, window, limit).await;
        // Each echoed datagram crossed the relay twice.
        let relayed = r.received * 2 * udp::PAYLOAD as u64;
        Ok(per_gib(before, relay_cpu()?, relayed.max(1)))
    }
    .await;
    rows.push(cpu_row(relay_row(udp::TUNNEL), r, note));
    if let Ok(c) = &client {
        c.close();
    }
    relay.stop().await;

    quinn_rows(env, plan, rows).await;
}

/// The raw quinn server's CPU per GiB on the same work: one stream each way, datagram echo.
async fn quinn_rows(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let note = "raw quinn server thread, its own /proc/PID/task/TID/stat";
    let server = QuinnThread::start(env);
    let conn = match &server {
        Ok(s) => env::quic_client(env, s.addr).await,
        Err(e) => Err(e.clone()),
    };
    let bytes = plan.bytes;
    for dir in [Dir::Up, Dir::Down] {
        let r = async {
            let (s, (_, conn)) = (server.as_ref()?, conn.as_ref()?);
            let before = s.cpu()?;
            timed_bulk(1, bytes, dir, || async {
                let (w, r) = conn.open_bi().await.map_err(io::Error::other)?;
                Ok(env::Duplex { r, w })
            })
            .await?;
            Ok(per_gib(before, s.cpu()?, bytes))
        }
        .await
        .map_err(|e: String| e);
        rows.push(cpu_row(quinn_row(&name("raw quinn", 1, dir)), r, note));
    }
    let r = async {
        let (s, (_, conn)) = (server.as_ref()?, conn.as_ref()?);
        if !env::wait_datagram_room(conn, udp::PAYLOAD).await {
            return Err("path MTU never allowed a 1200-byte QUIC datagram".to_string());
        }
        let before = s.cpu()?;
        let path = Arc::new(EchoPath::Quic(conn.clone()));
        let r = echo_run(path, plan.udp_count, plan.udp_window, plan.udp_time).await;
        // The server received and sent each echoed datagram once, as the relay does.
        let relayed = r.received * 2 * udp::PAYLOAD as u64;
        Ok(per_gib(before, s.cpu()?, relayed.max(1)))
    }
    .await;
    rows.push(cpu_row(quinn_row(udp::QUIC), r, note));
    if let Ok((ep, conn)) = conn {
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }
}

fn cpu_row(name: String, r: Result<f64, String>, note: &str) -> Row {
    match r {
        Ok(v) => Row::new(SECTION, name, v, "CPU s/GiB").note(note),
        Err(e) => Row::unavailable(SECTION, name, "CPU s/GiB", e),
    }
}

/// Ratios of each relay row to the raw quinn server on the same work.
pub fn derive(r: &mut crate::Report) {
    for dir in [Dir::Up, Dir::Down] {
        let quinn = quinn_row(&name("raw quinn", 1, dir));
        r.ratio(&relay_row(&name("h3 CONNECT", 1, dir)), &quinn);
        r.ratio(&relay_row(&name("TLS/TCP h1 CONNECT", 1, dir)), &quinn);
    }
    r.ratio(&relay_row(udp::TUNNEL), &quinn_row(udp::QUIC));
    // The TLS/TCP front-end's CPU per byte next to squid's: unlike the throughput ratio, it does
    // not depend on how much of the two cores the bench's own TLS client takes.
    for dir in [Dir::Up, Dir::Down] {
        let squid = crate::peer::cpu_name("squid https", dir);
        if r.get(&squid).is_some() {
            r.versus(
                SECTION,
                &squid,
                &relay_row(&name("TLS/TCP h1 CONNECT", 1, dir)),
                1.5,
            );
        }
    }
}
