//! Instructions the relay spends per unit of work, counted by callgrind: a figure that does not move
//! with the load of a shared box, unlike wall-clock rates.
//!
//! `cargo run --release -p cfr-bench --example relay_profile -- target/release/cfr udp 20000 OUTDIR`
//! starts `cfr relay` as a child under `valgrind --tool=callgrind`, warms a CONNECT-UDP tunnel up,
//! zeroes the counters, echoes COUNT 1200-byte datagrams through it (one up, one down each), dumps
//! the counters and prints instructions per echoed datagram. `setup` opens COUNT TCP tunnels one
//! after another on a warm connection instead and prints instructions per tunnel; `h1setup` opens
//! COUNT HTTP/1.1 CONNECT tunnels through the TLS/TCP front-end, a new TCP+TLS connection each.
//! `quinn` runs the bench's raw quinn datagram echo server (the udp section's baseline, with the
//! relay's transport config) as the profiled child instead, on the same echo as `udp` and the same
//! multi-threaded runtime as `cfr relay`: the two figures compare instruction for instruction.
//! `quinn1` runs it on one thread with a current-thread runtime, as the cpu section does. `udp` and `quinn` also print the client
//! connection's QUIC counters per echoed datagram (packets, ACK frames, I/O calls each way).
//! `callgrind_annotate OUTDIR/callgrind.out.*` shows where they went.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cfr_bench::env::{self, Env};
use cfr_bench::scale::RelayProcess;
use cfr_bench::udp::{echo_run, Path as EchoPath};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match &args[..] {
        [mode, cert, key] if mode == SERVE_QUINN => return serve_quinn(cert, key).await,
        [mode, cert, key, rt] if mode == SERVE_QUINN && rt == CURRENT_THREAD => {
            // The cpu section's baseline: one thread, a current-thread runtime.
            let (cert, key) = (cert.clone(), key.clone());
            let thread = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?
                    .block_on(serve_quinn(&cert, &key))
            });
            return tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|_| "raw quinn thread panicked".to_string())?;
        }
        _ => {}
    }
    let (bin, workload, count, out, tool) = match &args[..] {
        [b, w, c, o] => (b, w, c, o, Tool::Callgrind),
        [b, w, c, o, s] if s == "strace" => (b, w, c, o, Tool::Strace),
        [b, w, c, o, s] if s == "cpu" => (b, w, c, o, Tool::Cpu),
        [b, w, c, o, s] if s == "perf" => (b, w, c, o, Tool::Perf),
        [b, w, c, o, s] if s == "syscalls" => (b, w, c, o, Tool::Syscalls),
        _ => {
            return Err(
                "usage: relay_profile CFR_BIN udp|quinn|quinn1|setup|h1setup COUNT OUTDIR [strace|cpu|perf|syscalls]"
                    .into(),
            )
        }
    };
    let strace = tool == Tool::Strace;
    let count: u64 = count.parse().map_err(|e| format!("COUNT: {e}"))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let env = Env::start().await?;
    // strace counts system calls (what callgrind cannot see) from start to exit: compare two
    // COUNTs to get the calls per unit.
    let wrapper = match tool {
        Tool::Strace => vec![
            "strace".to_string(),
            "-f".into(),
            "-c".into(),
            "-o".into(),
            format!("{}/strace.txt", out.display()),
        ],
        Tool::Callgrind => vec![
            "valgrind".to_string(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}/callgrind.out.%p", out.display()),
        ],
        Tool::Cpu | Tool::Perf | Tool::Syscalls => vec![],
    };
    let control = |flag: &str, pid: u32| match tool {
        Tool::Callgrind => callgrind_control(flag, pid),
        _ => Ok(()),
    };
    if workload == "quinn" || workload == "quinn1" {
        let server = QuinnChild::spawn(&wrapper, &env, workload == "quinn1").await?;
        let (ep, conn) = env::quic_client(&env, server.addr).await?;
        if !env::wait_datagram_room(&conn, cfr_bench::udp::PAYLOAD).await {
            return Err("path MTU never allowed a 1200-byte QUIC datagram".into());
        }
        let path = Arc::new(EchoPath::Quic(conn.clone()));
        let stats = || Some(conn.stats());
        let done = echo_measured(&path, count, server.pid, tool, stats).await?;
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        return finish(&out, server.pid, workload, done, tool, server.child).await;
    }
    let relay = RelayProcess::spawn_wrapped(&wrapper, Path::new(bin), &env, |_| {}).await?;
    let client = cfr_client::RelayClient::connect(env::client_config(relay.addr, &env.pki))
        .await
        .map_err(|e| format!("client: {e}"))?;
    let done = match workload.as_str() {
        "udp" => {
            let origin = env::udp_echo(&env.tasks).await.map_err(|e| e.to_string())?;
            let t = client
                .connect_udp(&env::target(origin))
                .await
                .map_err(|e| e.to_string())?;
            let path = Arc::new(EchoPath::Tunnel(t));
            let stats = || match &*path {
                EchoPath::Tunnel(t) => t.quic_stats(),
                _ => None,
            };
            echo_measured(&path, count, relay.pid, tool, stats).await?
        }
        "setup" => {
            let origin = env::hold_origin(&env.tasks)
                .await
                .map_err(|e| e.to_string())?;
            for _ in 0..20 {
                let _ = client.connect_tcp(&env::target(origin)).await;
            }
            control("-z", relay.pid)?;
            for _ in 0..count {
                let t = client
                    .connect_tcp(&env::target(origin))
                    .await
                    .map_err(|e| e.to_string())?;
                drop(t);
            }
            count
        }
        "h1setup" => {
            let origin = env::hold_origin(&env.tasks)
                .await
                .map_err(|e| e.to_string())?;
            let tls = cfr_bench::front::tls_config(
                &env.pki.ca_cert,
                &[cfr_client::FrontVersion::Http11],
            )?;
            let one = || async {
                let mut s = cfr_bench::front::tls_connect(relay.addr, tls.clone()).await?;
                cfr_bench::front::h1_connect(&mut s, origin, Some(env::TOKEN)).await
            };
            for _ in 0..20 {
                one().await.map_err(|e| e.to_string())?;
            }
            control("-z", relay.pid)?;
            for _ in 0..count {
                one().await.map_err(|e| e.to_string())?;
            }
            count
        }
        other => return Err(format!("unknown workload {other:?}")),
    };
    if matches!(tool, Tool::Cpu | Tool::Perf | Tool::Syscalls) {
        client.close();
        relay.stop().await;
        env.stop().await;
        return Ok(());
    }
    if strace {
        client.close();
        // SIGTERM: the relay drains and exits, and strace writes its summary.
        relay.terminate().await;
        print_syscalls(&out, workload, done)?;
        env.stop().await;
        return Ok(());
    }
    callgrind_control("-d", relay.pid)?;
    let total = dumped_instructions(&out, relay.pid)?;
    println!(
        "{workload}: {total} instructions for {done} units = {:.0} per unit",
        total as f64 / done.max(1) as f64
    );
    client.close();
    relay.stop().await;
    env.stop().await;
    Ok(())
}

/// Warms the echo path up, zeroes the profiler's counters, echoes `count` datagrams (window 64)
/// and prints the client connection's QUIC counters per echoed datagram.
async fn echo_measured(
    path: &Arc<EchoPath>,
    count: u64,
    pid: u32,
    tool: Tool,
    stats: impl Fn() -> Option<quinn::ConnectionStats>,
) -> Result<u64, String> {
    let _ = echo_run(path.clone(), 2000, 32, Duration::from_secs(60)).await;
    if tool == Tool::Callgrind {
        callgrind_control("-z", pid)?;
    }
    // perf samples the child natively (kernel included) while the echo runs.
    let perf_out = format!("/tmp/relay_profile.{pid}.perf");
    let perf_args: &[&str] = match tool {
        Tool::Perf => &["record", "-g", "-o"],
        Tool::Syscalls => &["stat", "-x", ",", "-e", SYSCALL_EVENTS, "-o"],
        _ => &[],
    };
    let perf = match tool {
        Tool::Perf | Tool::Syscalls => Some(
            tokio::process::Command::new("perf")
                .args(perf_args)
                .arg(&perf_out)
                .arg("-p")
                .arg(pid.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("perf: {e}"))?,
        ),
        _ => None,
    };
    if perf.is_some() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu_before = process_cpu(pid);
    let self_before = process_cpu(std::process::id());
    let before = stats();
    let r = echo_run(path.clone(), count, 64, Duration::from_secs(600)).await;
    eprintln!("{} sent, {} echoed in {:.1} s", r.sent, r.received, r.secs);
    let cpu_after = process_cpu(pid);
    let self_after = process_cpu(std::process::id());
    if let Some(mut perf) = perf {
        if let Some(id) = perf.id() {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(id.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), perf.wait()).await;
        if tool == Tool::Syscalls {
            // perf stat's CSV: count,unit,event,...
            let text = std::fs::read_to_string(&perf_out).map_err(|e| e.to_string())?;
            for l in text.lines().filter(|l| l.contains("syscalls:")) {
                let mut f = l.split(',');
                let n: f64 = f.next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
                let event = f.nth(1).unwrap_or("?");
                println!(
                    "{event}: {:.3} per echoed datagram",
                    n / r.received.max(1) as f64
                );
            }
        } else {
            println!("perf data: {perf_out}");
        }
    }
    let measured = [
        ("the server process", cpu_before, cpu_after),
        (
            "this process (client, and the udp echo origin)",
            self_before,
            self_after,
        ),
    ];
    for (who, a, b) in measured.into_iter().filter(|_| tool != Tool::Callgrind) {
        let (Some(a), Some(b)) = (a, b) else { continue };
        let per = |x: u64, y: u64| (y - x) as f64 / r.received.max(1) as f64;
        println!(
            "per echoed datagram, {who}: {:.2} us user + {:.2} us system CPU, \
             {:.3} voluntary + {:.3} involuntary context switches",
            per(a.user_ticks, b.user_ticks) * 1e6 / USER_HZ,
            per(a.system_ticks, b.system_ticks) * 1e6 / USER_HZ,
            per(a.voluntary, b.voluntary),
            per(a.involuntary, b.involuntary),
        );
    }
    if let (Some(a), Some(b)) = (before, stats()) {
        let per = |x: u64, y: u64| (y - x) as f64 / r.received.max(1) as f64;
        println!(
            "per echoed datagram, seen from the client: to the server {:.3} UDP datagrams in {:.3} \
             sendmsg, {:.3} ACK frames; from the server {:.3} UDP datagrams in {:.3} recv calls, \
             {:.3} ACK frames, {:.3} DATAGRAM frames",
            per(a.udp_tx.datagrams, b.udp_tx.datagrams),
            per(a.udp_tx.ios, b.udp_tx.ios),
            per(a.frame_tx.acks, b.frame_tx.acks),
            per(a.udp_rx.datagrams, b.udp_rx.datagrams),
            per(a.udp_rx.ios, b.udp_rx.ios),
            per(a.frame_rx.acks, b.frame_rx.acks),
            per(a.frame_rx.datagram, b.frame_rx.datagram),
        );
    }
    Ok(r.received)
}

/// Dumps the counters of the profiled child and prints instructions per unit (or, under strace,
/// stops it and prints its system calls).
async fn finish(
    out: &Path,
    pid: u32,
    workload: &str,
    done: u64,
    tool: Tool,
    mut child: tokio::process::Child,
) -> Result<(), String> {
    if matches!(tool, Tool::Cpu | Tool::Perf | Tool::Syscalls) {
        let _ = child.kill().await;
        return Ok(());
    }
    if tool == Tool::Strace {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        print_syscalls(out, workload, done)?;
        return Ok(());
    }
    callgrind_control("-d", pid)?;
    let total = dumped_instructions(out, pid)?;
    println!(
        "{workload}: {total} instructions for {done} units = {:.0} per unit",
        total as f64 / done.max(1) as f64
    );
    let _ = child.kill().await;
    Ok(())
}

fn print_syscalls(out: &Path, workload: &str, done: u64) -> Result<(), String> {
    let text = std::fs::read_to_string(out.join("strace.txt")).map_err(|e| e.to_string())?;
    let calls = text
        .lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .ok_or("no total in the strace summary")?;
    println!("{workload}: {calls} system calls in total for {done} units (includes start-up)");
    Ok(())
}

/// How the child is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// Instructions, under valgrind's callgrind.
    Callgrind,
    /// System calls, under strace.
    Strace,
    /// Native CPU time and context switches, from /proc.
    Cpu,
    /// As `Cpu`, with `perf record -g` attached to the child during the measured echo.
    Perf,
    /// As `Cpu`, with `perf stat` counting the child's network, poll and futex system calls.
    Syscalls,
}

const SYSCALL_EVENTS: &str = "syscalls:sys_enter_recvmmsg,syscalls:sys_enter_recvmsg,\
    syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendmmsg,\
    syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex";

/// `/proc` CPU times are in USER_HZ ticks, 100 per second for userspace on Linux.
const USER_HZ: f64 = 100.0;

/// CPU time and context switches summed over a process's threads.
struct ProcessCpu {
    user_ticks: u64,
    system_ticks: u64,
    voluntary: u64,
    involuntary: u64,
}

fn process_cpu(pid: u32) -> Option<ProcessCpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let user_ticks = f.next()?.parse().ok()?;
    let system_ticks = f.next()?.parse().ok()?;
    let (mut voluntary, mut involuntary) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for line in status.lines() {
            let value = |l: &str| l.split_whitespace().nth(1)?.parse::<u64>().ok();
            if line.starts_with("voluntary_ctxt_switches") {
                voluntary += value(line)?;
            } else if line.starts_with("nonvoluntary_ctxt_switches") {
                involuntary += value(line)?;
            }
        }
    }
    Some(ProcessCpu {
        user_ticks,
        system_ticks,
        voluntary,
        involuntary,
    })
}

/// The child-process mode that serves the raw quinn echo (`relay_profile serve-quinn CERT KEY`).
const SERVE_QUINN: &str = "serve-quinn";
/// Its last argument for a current-thread runtime on one thread (as the cpu section runs it).
const CURRENT_THREAD: &str = "current-thread";

/// The bench's raw quinn server (`env::serve_quic`) with the bench relay's transport config, on
/// the same multi-threaded runtime as `cfr relay`; prints `{"listen":"ADDR"}` once it listens.
async fn serve_quinn(cert: &str, key: &str) -> Result<(), String> {
    let tls = cfr_relay::tls::server_config(Path::new(cert), Path::new(key), None, &[b"bench"])
        .map_err(|e| e.to_string())?;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pki = cfr_relay::tls::DevPki::in_dir(dir.path());
    let config = env::relay_config(&pki, dir.path());
    sc.transport_config(Arc::new(cfr_relay::http3::transport_config(&config)));
    let ep = env::quic_endpoint(Some(sc)).map_err(|e| e.to_string())?;
    let addr = ep.local_addr().map_err(|e| e.to_string())?;
    println!("{{\"listen\":\"{addr}\"}}");
    env::serve_quic(ep).await;
    Ok(())
}

/// This example re-run as [`serve_quinn`] under the profiler.
struct QuinnChild {
    child: tokio::process::Child,
    pid: u32,
    addr: std::net::SocketAddr,
}

impl QuinnChild {
    async fn spawn(
        wrapper: &[String],
        env: &Env,
        current_thread: bool,
    ) -> Result<QuinnChild, String> {
        use tokio::io::AsyncBufReadExt;
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = cfr_bench::scale::wrapped_command(wrapper, &me)
            .arg(SERVE_QUINN)
            .arg(&env.pki.server_cert)
            .arg(&env.pki.server_key)
            .args(current_thread.then_some(CURRENT_THREAD))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the raw quinn server: {e}"))?;
        let pid = child.id().ok_or("exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .map_err(|_| "raw quinn server not ready".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or("raw quinn server exited before it was ready")?;
        let addr = line
            .strip_prefix("{\"listen\":\"")
            .and_then(|l| l.strip_suffix("\"}"))
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no address in {line:?}"))?;
        Ok(QuinnChild { child, pid, addr })
    }
}

fn callgrind_control(flag: &str, pid: u32) -> Result<(), String> {
    let s = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .status()
        .map_err(|e| format!("callgrind_control: {e}"))?;
    s.success()
        .then_some(())
        .ok_or_else(|| format!("callgrind_control {flag} failed"))
}

/// Sum of the `totals:` lines of the dumps callgrind_control -d wrote for `pid` (one per thread).
fn dumped_instructions(out: &Path, pid: u32) -> Result<u64, String> {
    let prefix = format!("callgrind.out.{pid}.");
    let mut total = 0;
    for e in std::fs::read_dir(out).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).map_err(|e| e.to_string())?;
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("totals:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}
