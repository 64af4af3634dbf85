//! A fleet behind the nftables balancer (`cfr fleet apply`): aggregate HTTP/3 CONNECT throughput of
//! two members vs one, same run, same path. One host namespace runs the ruleset (DNAT to the
//! members, as on a single host with one member per core) and `cfr relay --fleet … --instance N`
//! processes; a client namespace opens eight connections (hashed over the members by their DCIDs),
//! one upload tunnel each, to a bulk origin on the host's loopback. Needs root, iproute2, nftables
//! and the `cfr` binary; otherwise the rows say why they are missing.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cfr_client::{ClientConfig, RelayClient, Trust};

use crate::env::{serve_bulk, Dir};
use crate::process::CfrProcess;
use crate::report::Row;
use crate::{scale, tcp, Plan};

pub const SECTION: &str = "fleet";
const CONNECTIONS: usize = 8;
const HOST_IP: &str = "10.77.0.1";
const CLIENT_IP: &str = "10.77.0.2";

/// Row name for `members` members.
pub fn name(members: u32) -> String {
    format!("h3 CONNECT via nftables balancer, {members} member(s), {CONNECTIONS} connections, up")
}

/// Moves the calling thread into the network namespace `ns` (threads it starts later inherit it).
pub fn enter_netns(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {path}: {e}"))
}

/// Runs `body` to completion on a fresh thread inside namespace `ns` (every socket it creates
/// lives there), with its own two-thread runtime. A panic in `body` resumes in the caller.
pub fn in_netns<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    ns: &str,
    body: impl FnOnce() -> F + Send + 'static,
) -> Result<T, String> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(rt.block_on(body()))
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A namespace deleted on drop.
struct Ns(String);

impl Ns {
    fn create(tag: &str) -> Result<Ns, String> {
        let name = format!("cfr-bench-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Ns(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e} (iproute2 and root are needed)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub async fn run(plan: &Plan, rows: &mut Vec<Row>) {
    let Some(bin) = scale::relay_binary(plan.relay_bin.as_deref()) else {
        for n in [1, 2] {
            rows.push(Row::unavailable(
                SECTION,
                name(n),
                "Gbit/s",
                "needs the cfr binary (run as `cfr bench` or pass --relay-bin)",
            ));
        }
        return;
    };
    for n in [1, 2] {
        let bytes = plan.bytes;
        let bin = bin.clone();
        let r = tokio::task::spawn_blocking(move || measure(&bin, n, bytes))
            .await
            .unwrap_or_else(|e| Err(format!("bench task: {e}")));
        rows.push(Row::from_result(SECTION, name(n), "Gbit/s", r));
    }
}

/// Builds the two namespaces, starts `members` members behind the ruleset, and times one upload
/// of `bytes` spread over the connections.
fn measure(bin: &Path, members: u32, bytes: u64) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let host = Ns::create(&format!("host{members}"))?;
    let client = Ns::create(&format!("client{members}"))?;
    host.ip(&[
        "link", "add", "h0", "type", "veth", "peer", "name", "c0", "netns", &client.0,
    ])?;
    host.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "h0"])?;
    host.ip(&["link", "set", "h0", "up"])?;
    client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"])?;
    client.ip(&["link", "set", "c0", "up"])?;

    // The bulk origin on the host's loopback, on a thread of its own inside the host namespace;
    // it ends when `_stop_origin` is dropped.
    let (tx, rx) = std::sync::mpsc::channel();
    let (_stop_origin, mut stop) = tokio::sync::oneshot::channel::<()>();
    let host_name = host.0.clone();
    std::thread::spawn(move || {
        let _ = in_netns(&host_name, move || async move {
            let l = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    accepted = l.accept() => match accepted {
                        Ok((s, _)) => {
                            tokio::spawn(serve_bulk(s));
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    });
    let origin: SocketAddr = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "origin did not start".to_string())??;

    let pki = cfr_relay::tls::generate_dev_pki(&dir.path().join("certs"), &[HOST_IP.to_owned()])
        .map_err(|e| e.to_string())?;
    let fleet_file = write_fleet_file(dir.path(), members, &pki.server_cert, &pki.server_key)?;
    run_cmd(
        Command::new("ip")
            .args(["netns", "exec", &host.0])
            .arg(bin)
            .args(["fleet", "apply", "--fleet"])
            .arg(&fleet_file),
    )?;
    let mut children = Vec::new();
    for id in 1..=members {
        children.push(spawn_member(bin, &host.0, &fleet_file, id, None, "warn")?);
    }

    let ca = pki.ca_cert.clone();
    let result = in_netns(&client.0, move || async move {
        let mut clients = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            let mut cfg =
                ClientConfig::new(format!("https://{HOST_IP}:443"), Trust::CaFile(ca.clone()));
            cfg.local_bind = Some(SocketAddr::new(
                CLIENT_IP.parse::<IpAddr>().expect("static"),
                0,
            ));
            cfg.connect_timeout = Duration::from_secs(10);
            clients.push(
                RelayClient::connect(cfg)
                    .await
                    .map_err(|e| format!("connecting through the balancer: {e}"))?,
            );
        }
        let clients = Arc::new(clients);
        let next = AtomicUsize::new(0);
        let target = crate::env::target(origin);
        tcp::timed_bulk(CONNECTIONS, bytes, Dir::Up, || {
            let client = clients[next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS].clone();
            let target = target.clone();
            async move {
                client
                    .connect_tcp(&target)
                    .await
                    .map_err(std::io::Error::other)
            }
        })
        .await
    })?;
    drop(children);
    result
}

fn write_fleet_file(dir: &Path, members: u32, cert: &Path, key: &Path) -> Result<PathBuf, String> {
    let mut text = format!("[fleet]\nservice = [\"{HOST_IP}:443\"]\n[fleet.quic_lb]\n");
    for id in 1..=members {
        text += &format!(
            "[[fleet.instance]]\nid = {id}\nlisten = \"{HOST_IP}:{}\"\n",
            4430 + id
        );
    }
    text += &format!(
        "[relay]\ncert = {:?}\nkey = {:?}\nstate_dir = {:?}\ndrain_secs = 1\n\
         [relay.auth]\ninsecure_open_relay = true\n[relay.policy]\nallow = [\"127.0.0.0/8\"]\n",
        cert.display().to_string(),
        key.display().to_string(),
        dir.display().to_string(),
    );
    let file = dir.join("fleet.toml");
    std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(file)
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Starts member `id` (`cfr relay --fleet FILE --instance ID --print-ready`) in namespace `ns`,
/// its log (at `log_level`) to the file `log` or discarded, and waits at most 20 s for its ready
/// line.
pub fn spawn_member(
    bin: &Path,
    ns: &str,
    fleet_file: &Path,
    id: u32,
    log: Option<&Path>,
    log_level: &str,
) -> Result<CfrProcess, String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(bin)
        .args(["relay", "--print-ready", "--fleet"])
        .arg(fleet_file)
        .args(["--instance", &id.to_string()])
        .env("RUST_LOG", log_level);
    CfrProcess::spawn_ready(cmd, log, Duration::from_secs(20))
        .map(|(member, _ready)| member)
        .map_err(|e| format!("member {id}: {e}"))
}
