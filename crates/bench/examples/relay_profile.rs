//! Instructions the relay spends per unit of work, counted by callgrind: a figure that does not move
//! with the load of a shared box, unlike wall-clock rates.
//!
//! `cargo run --release -p cfr-bench --example relay_profile -- target/release/cfr udp 20000 OUTDIR`
//! starts `cfr relay` as a child under `valgrind --tool=callgrind`, warms a CONNECT-UDP tunnel up,
//! zeroes the counters, echoes COUNT 1200-byte datagrams through it (one up, one down each), dumps
//! the counters and prints instructions per echoed datagram. `setup` opens COUNT TCP tunnels one
//! after another on a warm connection instead and prints instructions per tunnel; `h1setup` opens
//! COUNT HTTP/1.1 CONNECT tunnels through the TLS/TCP front-end, a new TCP+TLS connection each.
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
    let (bin, workload, count, out, strace) = match &args[..] {
        [b, w, c, o] => (b, w, c, o, false),
        [b, w, c, o, s] if s == "strace" => (b, w, c, o, true),
        _ => {
            return Err(
                "usage: relay_profile CFR_BIN udp|setup|h1setup COUNT OUTDIR [strace]".into(),
            )
        }
    };
    let count: u64 = count.parse().map_err(|e| format!("COUNT: {e}"))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let env = Env::start().await?;
    // strace counts system calls (what callgrind cannot see) from start to exit: compare two
    // COUNTs to get the calls per unit.
    let wrapper = if strace {
        vec![
            "strace".to_string(),
            "-f".into(),
            "-c".into(),
            "-o".into(),
            format!("{}/strace.txt", out.display()),
        ]
    } else {
        vec![
            "valgrind".to_string(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}/callgrind.out.%p", out.display()),
        ]
    };
    let control = |flag: &str, pid: u32| {
        if strace {
            Ok(())
        } else {
            callgrind_control(flag, pid)
        }
    };
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
            let _ = echo_run(path.clone(), 2000, 32, Duration::from_secs(60)).await;
            control("-z", relay.pid)?;
            let r = echo_run(path, count, 64, Duration::from_secs(600)).await;
            eprintln!("{} sent, {} echoed in {:.1} s", r.sent, r.received, r.secs);
            r.received
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
    if strace {
        client.close();
        // SIGTERM: the relay drains and exits, and strace writes its summary.
        relay.terminate().await;
        let text = std::fs::read_to_string(out.join("strace.txt")).map_err(|e| e.to_string())?;
        let calls = text
            .lines()
            .find(|l| l.trim_end().ends_with("total"))
            .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
            .ok_or("no total in the strace summary")?;
        println!("{workload}: {calls} system calls in total for {done} units (includes start-up)");
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
