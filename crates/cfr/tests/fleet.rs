//! Three `cfr relay --fleet FILE --instance N` processes behind the nftables ruleset of
//! `cfr fleet apply`, with real kernel forwarding between network namespaces:
//!
//! ```text
//!   C (clients 10.100.0.x) ── R (router: cfr fleet apply) ──┬── I1 (member 1, 192.0.2.10:443 on lo)
//!                                                           ├── I2 (member 2)
//!                                                           ├── I3 (member 3)
//!                                                           └── D (destinations 2001:db8:d::2)
//! ```
//!
//! The router marks every packet for the service address by the QUIC-LB server ID of its CID (or a
//! DCID hash for a client's first Initials) and routes it to the member's namespace by that mark.
//! Each member counts, with an nftables counter per client address, the QUIC packets it receives,
//! so a test can tell which member a client's packets reached. Destinations record the source
//! address of every tunnel, to check each member's egress sub-prefix. Needs root, iproute2 and
//! nftables (interop/setup.sh installs them); without them the tests fail, never skip.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfr_bench::process::CfrProcess;
use cfr_client::{ClientConfig, RelayClient, Trust};
use cfr_testkit::netns::NetNs;
use cfr_testkit::relay::target;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(20);
const SERVICE: &str = "192.0.2.10:443";
const MEMBERS: [u32; 3] = [1, 2, 3];
const EGRESS_PREFIX: &str = "2001:db8:cf::/64";
const DEST: &str = "2001:db8:d::2";

fn cfr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cfr"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(ns: &NetNs, args: &[&str]) -> String {
    run(Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args))
}

/// Runs `body` on a fresh thread inside namespace `ns` (see `cfr_bench::fleet::in_netns`).
fn in_netns<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    ns: &str,
    body: impl FnOnce() -> F + Send + 'static,
) -> T {
    cfr_bench::fleet::in_netns(ns, body).unwrap_or_else(|e| panic!("namespace {ns}: {e}"))
}

/// What the destinations saw: per TCP port, the source of each accepted connection; for the UDP
/// echo, each datagram's source.
#[derive(Default)]
struct Seen {
    tcp: BTreeMap<u16, Vec<(Instant, IpAddr)>>,
    udp: Vec<(Instant, SocketAddr)>,
}

/// Echo destinations in namespace D: TCP on ports `7000..7000+tcp_ports`, UDP on 9000. They run on
/// their own thread until the test process ends.
fn start_destinations(ns: &NetNs, tcp_ports: u16) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let name = ns.name.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let log = seen.clone();
    std::thread::spawn(move || {
        cfr_bench::fleet::enter_netns(&name).unwrap_or_else(|e| panic!("{e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            for port in 7000..7000 + tcp_ports {
                let l = tokio::net::TcpListener::bind((DEST.parse::<IpAddr>().unwrap(), port))
                    .await
                    .unwrap_or_else(|e| panic!("bind TCP {port} in D: {e}"));
                let log = log.clone();
                tokio::spawn(async move {
                    while let Ok((mut s, peer)) = l.accept().await {
                        log.lock()
                            .unwrap()
                            .tcp
                            .entry(port)
                            .or_default()
                            .push((Instant::now(), peer.ip()));
                        tokio::spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        });
                    }
                });
            }
            let udp = tokio::net::UdpSocket::bind((DEST.parse::<IpAddr>().unwrap(), 9000))
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                log.lock().unwrap().udp.push((Instant::now(), from));
                let _ = udp.send_to(&buf[..n], from).await;
            }
        });
    });
    ready_rx
        .recv_timeout(LIMIT)
        .expect("destinations started in D");
    seen
}

/// A member process, killed on drop.
struct Member {
    id: u32,
    process: CfrProcess,
}

impl Member {
    fn log(&self) -> String {
        self.process.log()
    }

    fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let id = self.id;
        self.process
            .wait_exit(limit)
            .await
            .unwrap_or_else(|e| panic!("member {id}: {e}"))
    }
}

/// The whole topology; namespaces are deleted (and member processes killed) on drop.
struct Fleet {
    dir: tempfile::TempDir,
    router: NetNs,
    clients: NetNs,
    members: Vec<Member>,
    member_ns: Vec<NetNs>,
    /// Kept for its drop: the destinations' namespace lives as long as the fleet.
    _dest_ns: NetNs,
    seen: Arc<Mutex<Seen>>,
    fleet_file: PathBuf,
}

/// Client addresses in C: `10.100.0.10 + i`.
fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, 10 + i as u8)
}
const CLIENT_IPS: usize = 40;

fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

fn sysctl(ns: &NetNs, kv: &str) {
    in_ns(ns, &["sysctl", "-q", "-w", kv]);
}

impl Fleet {
    /// Builds the namespaces, writes the fleet file (`relay_extra` is appended to its `[relay]`
    /// section), applies the balancer ruleset in R and starts the three members.
    fn start(relay_extra: &str, epoch_secs: u64) -> Fleet {
        Self::start_members(relay_extra, epoch_secs, &MEMBERS)
    }

    /// [`Fleet::start`] running only `running`; the others are in the fleet file but not started,
    /// and the balancer treats them as draining (no new connections) until they join.
    fn start_members(relay_extra: &str, epoch_secs: u64, running: &[u32]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let router = NetNs::create();
        let clients = NetNs::create();
        let dest_ns = NetNs::create();
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            sysctl(&router, kv);
        }
        veth(&router, "r-c", &clients, "c0");
        router.ip(&["addr", "add", "10.100.0.1/24", "dev", "r-c"]);
        clients.ip(&["addr", "add", "10.100.0.2/24", "dev", "c0"]);
        for i in 0..CLIENT_IPS {
            clients.ip(&["addr", "add", &format!("{}/24", client_ip(i)), "dev", "c0"]);
        }
        clients.ip(&["route", "add", "default", "via", "10.100.0.1"]);
        veth(&router, "r-d", &dest_ns, "d0");
        router.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:d::1/64",
            "dev",
            "r-d",
            "nodad",
        ]);
        dest_ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{DEST}/64"),
            "dev",
            "d0",
            "nodad",
        ]);
        dest_ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:d::1"]);

        let ca_dir = dir.path().join("certs");
        run(cfr()
            .args(["cert", "--dir"])
            .arg(&ca_dir)
            .args(["--name", "192.0.2.10"]));
        let secret = dir.path().join("fleet.secret");
        std::fs::write(&secret, "fleet secret for the netns test, 32+ bytes\n").unwrap();
        let mut text = format!(
            r#"
[fleet]
service = ["{SERVICE}"]
secret_file = "{secret}"
[fleet.quic_lb]
config_rotation = 0
server_id_len = 1
nonce_len = 8
[[fleet.egress]]
prefix = "{EGRESS_PREFIX}"
instance_prefix_len = 66
[fleet.hosts]
"#,
            secret = secret.display()
        );
        for id in MEMBERS {
            text += &format!("i{id} = \"10.10{id}.0.2\"\n");
        }
        for id in MEMBERS {
            text += &format!(
                "[[fleet.instance]]\nid = {id}\nlisten = \"{SERVICE}\"\nhost = \"i{id}\"\n"
            );
        }
        text += &format!(
            r#"
[relay]
cert = "{cert}"
key = "{key}"
state_dir = "{state}"
drain_secs = 20
[relay.auth]
insecure_open_relay = true
[relay.policy]
allow = ["2001:db8:d::/64"]
[relay.egress]
fallback = "refuse"
epoch_secs = {epoch_secs}
{relay_extra}
"#,
            cert = ca_dir.join("server.pem").display(),
            key = ca_dir.join("server.key").display(),
            state = ca_dir.display(),
        );
        let fleet_file = dir.path().join("fleet.toml");
        std::fs::write(&fleet_file, &text).unwrap();
        let fleet = cfr_fleet::FleetConfig::from_file(&fleet_file)
            .unwrap_or_else(|e| panic!("test fleet file invalid: {e}\n{text}"));

        let mut member_ns = Vec::new();
        for id in MEMBERS {
            let ns = NetNs::create();
            veth(&router, &format!("r-i{id}"), &ns, "i0");
            router.ip(&[
                "addr",
                "add",
                &format!("10.10{id}.0.1/24"),
                "dev",
                &format!("r-i{id}"),
            ]);
            router.ip(&[
                "-6",
                "addr",
                "add",
                &format!("2001:db8:10{id}::1/64"),
                "dev",
                &format!("r-i{id}"),
                "nodad",
            ]);
            ns.ip(&["addr", "add", &format!("10.10{id}.0.2/24"), "dev", "i0"]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("2001:db8:10{id}::2/64"),
                "dev",
                "i0",
                "nodad",
            ]);
            ns.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"]);
            ns.ip(&["route", "add", "default", "via", &format!("10.10{id}.0.1")]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("2001:db8:10{id}::1"),
            ]);
            let share = fleet.egress_shares(id)[0].to_string();
            ns.ip(&["-6", "route", "add", "local", &share, "dev", "lo"]);
            router.ip(&[
                "-6",
                "route",
                "add",
                &share,
                "via",
                &format!("2001:db8:10{id}::2"),
            ]);
            // Per-client-address packet counters for the service port, on the member itself.
            let mut rules = String::from(
                "table inet cfr_count {\n chain input {\n  type filter hook input priority 0; policy accept;\n",
            );
            for i in 0..CLIENT_IPS {
                rules += &format!("  ip saddr {} udp dport 443 counter\n", client_ip(i));
            }
            rules += " }\n}\n";
            let f = dir.path().join(format!("count-{id}.nft"));
            std::fs::write(&f, rules).unwrap();
            in_ns(&ns, &["nft", "-f", f.to_str().unwrap()]);
            member_ns.push(ns);
        }
        let not_running: Vec<u32> = MEMBERS
            .into_iter()
            .filter(|id| !running.contains(id))
            .collect();
        apply(&router.name, &fleet_file, &not_running);
        let seen = start_destinations(&dest_ns, 64);
        let mut f = Fleet {
            dir,
            router,
            clients,
            members: Vec::new(),
            member_ns,
            _dest_ns: dest_ns,
            seen,
            fleet_file,
        };
        for id in running {
            let m = spawn_member(
                &f.member_ns[(id - 1) as usize].name,
                f.dir.path(),
                &f.fleet_file,
                *id,
            );
            f.members.push(m);
        }
        f
    }

    /// Runs `body` in the clients' namespace; if it panics, prints every member's log first.
    fn in_clients<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
        &self,
        body: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        let name = self.clients.name.clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| in_netns(&name, body))) {
            Ok(v) => v,
            Err(e) => {
                for m in &self.members {
                    eprintln!("--- member {} log ---\n{}", m.id, m.log());
                }
                std::panic::resume_unwind(e)
            }
        }
    }

    /// Namespace names of the members, in `MEMBERS` order (for use inside the client thread).
    fn member_ns_names(&self) -> Vec<String> {
        self.member_ns.iter().map(|n| n.name.clone()).collect()
    }

    fn counts(&self) -> Counts {
        counts(&self.member_ns_names())
    }

    /// The member whose sub-prefix holds `addr`.
    fn share_owner(&self, addr: IpAddr) -> Option<u32> {
        let fleet = cfr_fleet::FleetConfig::from_file(&self.fleet_file).unwrap();
        MEMBERS.into_iter().find(|id| {
            fleet
                .egress_shares(*id)
                .iter()
                .any(|n: &IpNet| n.contains(&addr))
        })
    }
}

/// Starts `cfr relay --fleet FILE --instance ID` in namespace `ns` and waits for its ready line.
fn spawn_member(ns: &str, dir: &Path, fleet_file: &Path, id: u32) -> Member {
    let log = dir.join(format!("member-{id}.stderr"));
    let process = cfr_bench::fleet::spawn_member(
        Path::new(env!("CARGO_BIN_EXE_cfr")),
        ns,
        fleet_file,
        id,
        Some(&log),
        "info",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Member { id, process }
}

/// `cfr fleet apply --fleet FILE [--drain ID]...` in the router namespace.
fn apply(router: &str, fleet_file: &Path, drain: &[u32]) {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        router,
        env!("CARGO_BIN_EXE_cfr"),
        "fleet",
        "apply",
        "--fleet",
    ])
    .arg(fleet_file);
    for id in drain {
        cmd.args(["--drain", &id.to_string()]);
    }
    run(&mut cmd);
}

/// Packets from each client address that reached each member: `counts[member][client]`.
type Counts = BTreeMap<u32, Vec<u64>>;

/// Reads every member's per-client counters (`nft list table inet cfr_count` in its namespace).
fn counts(member_ns: &[String]) -> Counts {
    MEMBERS
        .iter()
        .zip(member_ns)
        .map(|(id, ns)| {
            let text = run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "nft",
                "list",
                "table",
                "inet",
                "cfr_count",
            ]));
            let mut per_client = vec![0u64; CLIENT_IPS];
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |w: &str| words.iter().position(|x| *x == w).map(|i| words[i + 1]);
                if let (Some(ip), Some(p)) = (after("saddr"), after("packets")) {
                    let ip: Ipv4Addr = ip.parse().unwrap();
                    per_client[usize::from(ip.octets()[3] - 10)] = p.parse().unwrap();
                }
            }
            (*id, per_client)
        })
        .collect()
}

/// The one member that received packets from client `i` (panics if none or several did).
fn member_of(counts: &Counts, i: usize) -> u32 {
    let on: Vec<u32> = counts
        .iter()
        .filter(|(_, c)| c[i] > 0)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        on.len(),
        1,
        "client {} reached members {on:?} (counts {counts:?}); one connection must live on one member",
        client_ip(i)
    );
    on[0]
}

fn client_config(dir: &Path, i: usize) -> ClientConfig {
    let mut c = ClientConfig::new(
        format!("https://{SERVICE}"),
        Trust::CaFile(dir.join("certs/ca.pem")),
    );
    c.local_bind = Some(SocketAddr::new(IpAddr::V4(client_ip(i)), 0));
    c.connect_timeout = Duration::from_secs(10);
    c
}

fn dest(port: u16) -> cfr_proto::Target {
    target(SocketAddr::new(DEST.parse().unwrap(), port))
}

/// A TCP tunnel to echo port `port` carrying `len` pattern bytes both ways, byte-exact.
async fn tcp_transfer(client: &RelayClient, port: u16, len: usize) {
    let mut t = tokio::time::timeout(LIMIT, client.connect_tcp(&dest(port)))
        .await
        .expect("tunnel answer within the limit")
        .unwrap_or_else(|e| panic!("tunnel to echo {port}: {e}"));
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut t);
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::with_capacity(len);
    let recv = async {
        r.read_to_end(&mut back).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
        .await
        .expect("transfer within 60 s");
    assert!(
        back == data,
        "echo of {len} bytes through the fleet must be byte-exact"
    );
}

#[test]
fn three_members_serve_sixty_tunnels_as_one_relay_each_from_its_own_egress_share() {
    let fleet = Fleet::start("", 600);
    // 30 connections of 2 tunnels each: the DCID hash misses a member with probability
    // 3 * (2/3)^30 ≈ 1.6e-5.
    const CONNS: usize = 30;
    let dir = fleet.dir.path().to_owned();
    fleet.in_clients(move || async move {
        let mut tasks = Vec::new();
        for i in 0..CONNS {
            let cfg = client_config(&dir, i);
            tasks.push(tokio::spawn(async move {
                let client = RelayClient::connect(cfg)
                    .await
                    .unwrap_or_else(|e| panic!("client {i} connects to the fleet: {e}"));
                // Connection i's tunnels all go to echo port 7000 + i.
                for _ in 0..2 {
                    tcp_transfer(&client, 7000 + i as u16, 2000).await;
                }
                client.close();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let counts = fleet.counts();
    let seen = fleet.seen.lock().unwrap();
    let mut used = BTreeSet::new();
    let mut tunnels = 0;
    for i in 0..CONNS {
        let member = member_of(&counts, i);
        used.insert(member);
        let sources = &seen.tcp[&(7000 + i as u16)];
        tunnels += sources.len();
        for (_, src) in sources {
            assert_eq!(
                fleet.share_owner(*src),
                Some(member),
                "connection {i} lives on member {member}, but a tunnel left from {src}"
            );
        }
    }
    assert_eq!(tunnels, 60, "the destinations saw all 60 tunnels");
    assert_eq!(
        used.len(),
        3,
        "connections spread over all members: {used:?}"
    );
}

/// Connects clients `from..` one by one until every member holds one; returns (client index,
/// member, client) per member. Bounded: 30 random DCIDs all missing a member has probability
/// 3 * (2/3)^30 ≈ 1.6e-5.
async fn one_client_per_member(
    dir: &Path,
    member_ns: &[String],
    from: usize,
) -> BTreeMap<u32, (usize, RelayClient)> {
    let mut per_member = BTreeMap::new();
    for i in from..from + 30 {
        let client = RelayClient::connect(client_config(dir, i))
            .await
            .unwrap_or_else(|e| panic!("client {i} connects to the fleet: {e}"));
        let member = member_of(&counts(member_ns), i);
        match per_member.entry(member) {
            std::collections::btree_map::Entry::Occupied(_) => client.close(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((i, client));
            }
        }
        if per_member.len() == MEMBERS.len() {
            return per_member;
        }
    }
    panic!(
        "30 connections did not reach all three members: {:?}",
        per_member.keys()
    );
}

/// Sends `payload` (again every 2 s) until it comes back, skipping older echoes still queued
/// (an earlier payload sent twice comes back twice); bounded by `LIMIT`.
async fn udp_echo_skipping_stale(tunnel: &cfr_client::UdpTunnel, payload: &[u8]) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < deadline {
        tunnel.send(payload).await.unwrap();
        let resend = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(b)) = tokio::time::timeout_at(resend, tunnel.recv()).await {
            if b[..] == payload[..] {
                return;
            }
        }
    }
    panic!("no echo of {payload:?} within {LIMIT:?}");
}

#[test]
fn nat_rebinding_keeps_every_packet_of_a_connection_on_its_member() {
    let fleet = Fleet::start("", 600);
    let dir = fleet.dir.path().to_owned();
    let member_ns = fleet.member_ns_names();
    fleet.in_clients(move || async move {
        let clients = one_client_per_member(&dir, &member_ns, 0).await;
        let before = counts(&member_ns);
        let len = 256 * 1024;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        for (member, (i, client)) in &clients {
            let i = *i;
            let udp = client.connect_udp(&dest(9000)).await.unwrap();
            cfr_testkit::tunnels::udp_echo(&udp, b"before", 5, Duration::from_secs(2)).await;
            // First half, echoed back, then the client's "NAT" gives it a new port.
            let (t, back) = start_transfer(client, 7000 + i as u16, &data[..len / 2]).await;
            let mid = counts(&member_ns);
            let new_socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client_ip(i)), 0)).unwrap();
            let new_port = new_socket.local_addr().unwrap().port();
            client.rebind(new_socket).await.expect("rebind");
            finish_transfer(t, back, &data).await;
            udp_echo_skipping_stale(&udp, b"after").await;
            // New tunnels work too, from the new port.
            tcp_transfer(client, 7000 + i as u16, 1000).await;
            let after = counts(&member_ns);
            assert_eq!(
                member_of(&after, i),
                *member,
                "client {i} (now on port {new_port}) moved to another member"
            );
            // (The counters count what the kernel forwards, GSO batches as one: only "more".)
            assert!(
                after[member][i] > mid[member][i] && mid[member][i] > before[member][i],
                "the packets after the rebinding reached member {member}"
            );
        }
    });
    drop(fleet);
}

/// A QUIC short-header packet whose CID claims `server_id` (config rotation 0), then padding.
fn short_header(server_id: u8, nonce: u64) -> Vec<u8> {
    let mut p = vec![0x40, 0x09, server_id];
    p.extend(nonce.to_be_bytes());
    p.extend([0xa5; 40]);
    p
}

/// A QUIC long-header Initial whose DCID is one of ours for `server_id` (length 10, rotation 0).
fn long_header(server_id: u8) -> Vec<u8> {
    let mut p = vec![0xc0, 0, 0, 0, 1, 10, 0x09, server_id];
    p.extend([0x11; 8]);
    p.push(0); // SCID length
    p.extend([0x5a; 1200 - 17]);
    p
}

#[test]
fn forged_cids_and_garbage_are_dropped_or_hashed_without_harm() {
    let mut fleet = Fleet::start("", 600);
    let dir = fleet.dir.path().to_owned();
    let member_ns = fleet.member_ns_names();
    let service: SocketAddr = SERVICE.parse().unwrap();
    fleet.in_clients(move || async move {
        let from =
            |i: usize| UdpSocket::bind(SocketAddr::new(IpAddr::V4(client_ip(i)), 0)).unwrap();
        // Client 30: 50 short headers naming member 2, client 31: 40 naming member 3 in a long
        // header, client 32: 50 naming an unknown server ID, client 33: garbage.
        let s = from(30);
        for n in 0..50 {
            s.send_to(&short_header(2, n), service).unwrap();
        }
        let s = from(31);
        for _ in 0..40 {
            s.send_to(&long_header(3), service).unwrap();
        }
        let s = from(32);
        for n in 0..50 {
            s.send_to(&short_header(0x77, n * 0x0101_0101), service)
                .unwrap();
        }
        let s = from(33);
        for junk in [
            &[][..],
            &[0x40],
            &[0xc0, 0, 0, 0, 1, 3, 1, 2, 3, 0],
            &[0xff; 5],
        ] {
            for _ in 0..10 {
                s.send_to(junk, service).unwrap();
            }
        }
        // Wait (bounded) for the forged packets to be counted where the rules send them.
        let deadline = Instant::now() + LIMIT;
        let c = loop {
            let c = counts(&member_ns);
            let unknown: u64 = c.values().map(|v| v[32]).sum();
            if c[&2][30] == 50 && c[&3][31] == 40 && unknown == 50 {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "forged packets not delivered as expected: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            (c[&1][30], c[&3][30]),
            (0, 0),
            "server ID 2 reached only member 2: {c:?}"
        );
        assert_eq!(
            (c[&1][31], c[&2][31]),
            (0, 0),
            "server ID 3 reached only member 3: {c:?}"
        );
        assert!(
            c.values().all(|v| v[33] == 0),
            "packets too short to be QUIC are dropped by the balancer: {c:?}"
        );
        // Every member still serves new connections and tunnels.
        let clients = one_client_per_member(&dir, &member_ns, 0).await;
        for (i, client) in clients.values() {
            tcp_transfer(client, 7000 + *i as u16, 5000).await;
        }
    });
    for m in &mut fleet.members {
        assert!(m.is_running(), "member {} crashed:\n{}", m.id, m.log());
    }
}

#[test]
fn members_rotate_egress_epochs_in_lockstep_and_open_tunnels_keep_their_address() {
    const EPOCH: u64 = 3;
    let fleet = Fleet::start("policy = \"epoch\"", EPOCH);
    let dir = fleet.dir.path().to_owned();
    let member_ns = fleet.member_ns_names();
    let clients_used = fleet.in_clients(move || async move {
        let clients = one_client_per_member(&dir, &member_ns, 0).await;
        // One long UDP tunnel per member, opened before the boundaries below.
        let mut long = Vec::new();
        for (_, client) in clients.values() {
            let t = client.connect_udp(&dest(9000)).await.unwrap();
            cfr_testkit::tunnels::udp_echo(&t, b"opened", 5, Duration::from_secs(2)).await;
            long.push(t);
        }
        // Short tunnels every 100 ms from every member for a bit over two epochs.
        let until = Instant::now() + Duration::from_secs(2 * EPOCH + 1);
        while Instant::now() < until {
            let rounds = clients.values().map(|(i, client)| async move {
                let mut t = client.connect_tcp(&dest(7000 + *i as u16)).await.unwrap();
                t.write_all(b"x").await.unwrap();
                t.shutdown().await.unwrap();
                let mut b = Vec::new();
                tokio::time::timeout(LIMIT, t.read_to_end(&mut b))
                    .await
                    .unwrap()
                    .unwrap();
            });
            futures_util::future::join_all(rounds).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in &long {
            udp_echo_skipping_stale(t, b"still here").await;
        }
        clients
            .iter()
            .map(|(m, (i, _))| (*m, *i))
            .collect::<BTreeMap<u32, usize>>()
    });
    let seen = fleet.seen.lock().unwrap();
    // Member m switched at some instant in (last tunnel from its first address, first tunnel from
    // its second]. The members are proven more than 1 s apart only if one still used its old
    // address 1 s after another had already switched: a bound that a slow, loaded machine cannot
    // break (it only widens the intervals) but a member rotating late does.
    let mut last_old = Vec::new();
    let mut first_new = Vec::new();
    for (member, i) in &clients_used {
        let log = &seen.tcp[&(7000 + *i as u16)];
        for (_, src) in log {
            assert_eq!(
                fleet.share_owner(*src),
                Some(*member),
                "member {member} left from {src}"
            );
        }
        let switch = log
            .windows(2)
            .find(|w| w[0].1 != w[1].1)
            .unwrap_or_else(|| panic!("member {member} never rotated in {} s", 2 * EPOCH + 1));
        last_old.push(switch[0].0);
        first_new.push(switch[1].0);
    }
    let (latest_old, earliest_new) = (
        last_old.iter().max().unwrap(),
        first_new.iter().min().unwrap(),
    );
    assert!(
        latest_old.saturating_duration_since(*earliest_new) < Duration::from_secs(1),
        "a member still used its old address {:?} after another had rotated (must be within 1 s)",
        latest_old.saturating_duration_since(*earliest_new)
    );
    // Each long tunnel kept one source from opening to the end: three tunnels, three sources.
    let udp_sources: BTreeSet<SocketAddr> = seen.udp.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        udp_sources.len(),
        3,
        "the long UDP tunnels never changed source across the rotation: {udp_sources:?}"
    );
    let owners: BTreeSet<Option<u32>> = udp_sources
        .iter()
        .map(|s| fleet.share_owner(s.ip()))
        .collect();
    assert_eq!(
        owners,
        MEMBERS.map(Some).into(),
        "one long tunnel per member, from its share"
    );
}

/// Opens a TCP tunnel to echo `port` and sends `first`, waiting for its echo: a transfer half done.
async fn start_transfer(
    client: &RelayClient,
    port: u16,
    first: &[u8],
) -> (cfr_client::TcpTunnel, Vec<u8>) {
    let mut t = tokio::time::timeout(LIMIT, client.connect_tcp(&dest(port)))
        .await
        .expect("tunnel answer within the limit")
        .unwrap_or_else(|e| panic!("tunnel to echo {port}: {e}"));
    t.write_all(first).await.unwrap();
    let mut back = vec![0u8; first.len()];
    tokio::time::timeout(LIMIT, t.read_exact(&mut back))
        .await
        .expect("echo of the first half within the limit")
        .unwrap();
    (t, back)
}

/// Sends the second half of `data` on a tunnel that already echoed the first (`back`) while reading
/// the rest (a client that keeps reading, as a real one does), and checks the whole echo.
async fn finish_transfer(mut t: cfr_client::TcpTunnel, mut back: Vec<u8>, data: &[u8]) {
    let (mut r, mut w) = tokio::io::split(&mut t);
    let send = async {
        w.write_all(&data[back.len()..]).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut rest = Vec::new();
    let recv = async {
        r.read_to_end(&mut rest).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
        .await
        .expect("transfer finishes within 60 s");
    back.extend(rest);
    assert!(back == data, "a half-done transfer completed byte-exact");
}

#[test]
fn a_draining_member_finishes_its_tunnels_byte_exact_and_new_connections_go_elsewhere() {
    let mut fleet = Fleet::start("", 600);
    let dir = fleet.dir.path().to_owned();
    let member_ns = fleet.member_ns_names();
    let router = fleet.router.name.clone();
    let fleet_file = fleet.fleet_file.clone();
    let pids: BTreeMap<u32, u32> = fleet
        .members
        .iter()
        .map(|m| (m.id, m.process.id()))
        .collect();
    let drained = fleet.in_clients(move || async move {
        let clients = one_client_per_member(&dir, &member_ns, 0).await;
        let (&drained, (di, dclient)) = clients.iter().next().unwrap();
        let len = 1 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 241) as u8).collect();
        // Three tunnels on the member to drain, half-way through their transfers.
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(start_transfer(dclient, 7000 + *di as u16, &data[..len / 2]).await);
        }
        // The operator's drain: no new Initials for it, then SIGTERM (GOAWAY + grace period).
        apply(&router, &fleet_file, &[drained]);
        run(Command::new("kill").args(["-TERM", &pids[&drained].to_string()]));
        let finish = open
            .into_iter()
            .map(|(t, back)| finish_transfer(t, back, &data));
        futures_util::future::join_all(finish).await;
        // New connections land on the others only, and work.
        for i in 10..25 {
            let client = RelayClient::connect(client_config(&dir, i))
                .await
                .unwrap_or_else(|e| panic!("new client {i} during the drain: {e}"));
            tcp_transfer(&client, 7000 + i as u16, 1000).await;
            let member = member_of(&counts(&member_ns), i);
            assert_ne!(
                member, drained,
                "new connection {i} landed on the draining member"
            );
            client.close();
        }
        for (_, (_, c)) in clients {
            c.close();
        }
        drained
    });
    let m = fleet.members.iter_mut().find(|m| m.id == drained).unwrap();
    let status = futures_block_on(m.wait_exit(Duration::from_secs(30)));
    assert!(
        status.success(),
        "the drained member exits cleanly: {status}\n{}",
        m.log()
    );
    for m in fleet.members.iter_mut().filter(|m| m.id != drained) {
        assert!(m.is_running(), "member {} kept serving", m.id);
    }
}

fn futures_block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn fleet_cli_checks_the_file_and_prints_the_balancer_ruleset() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("fleet.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/fleet.example.toml"
    ))
    .unwrap()
    .replace("/etc/cfr/fleet.secret", secret.to_str().unwrap());
    let file = dir.path().join("fleet.toml");
    std::fs::write(&file, &example).unwrap();

    let checked = run(cfr().arg("check-config").arg(&file));
    assert!(
        checked.contains(
            "2 listen [::]:4432 server ID 02 egress 2001:db8:cf:0:2000::/68, 198.51.100.32/28"
        ),
        "check-config lists each member's share:\n{checked}"
    );
    let rules = run(cfr()
        .args(["fleet", "nft", "--fleet"])
        .arg(&file)
        .args(["--drain", "4"]));
    assert!(rules.contains("table inet cfr_fleet {"), "{rules}");
    assert!(
        rules.contains("4 (mark 0x0cf00004, DNAT [::]:4434, draining)"),
        "{rules}"
    );
    assert!(
        rules.contains(
            "jhash @th,112,64 mod 3 map { 0 : 0x0cf00001, 1 : 0x0cf00002, 2 : 0x0cf00003 }"
        ),
        "a draining member gets no new Initials:\n{rules}"
    );

    // Errors name the key; overlapping shares are refused.
    let bad = example.replace("instance_prefix_len = 68", "instance_prefix_len = 66");
    std::fs::write(&file, bad).unwrap();
    let out = cfr().arg("check-config").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("fleet.egress.instance_prefix_len") && err.contains("instance 4"),
        "{err}"
    );
    let out = cfr()
        .args(["relay", "--fleet"])
        .arg(dir.path().join("fleet.toml"))
        .args(["--instance", "9"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a member not in the fleet cannot start"
    );
}

#[test]
fn a_member_joins_without_remapping_open_connections() {
    let mut fleet = Fleet::start_members("", 600, &[1, 2]);
    let dir = fleet.dir.path().to_owned();
    let member_ns = fleet.member_ns_names();
    let router = fleet.router.name.clone();
    let fleet_file = fleet.fleet_file.clone();
    let joiner_ns = member_ns[2].clone();
    let joined = fleet.in_clients(move || async move {
        let len = 256 * 1024;
        let data: Vec<u8> = (0..len).map(|i| (i * 11 % 239) as u8).collect();
        // Eight connections on members 1 and 2, each with a transfer half done.
        let mut open = Vec::new();
        for i in 0..8 {
            let client = RelayClient::connect(client_config(&dir, i))
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            let (t, back) = start_transfer(&client, 7000 + i as u16, &data[..len / 2]).await;
            let member = member_of(&counts(&member_ns), i);
            assert_ne!(member, 3, "member 3 is not running yet");
            open.push((i, member, client, t, back));
        }
        // Member 3 starts and the ruleset is re-applied with it taking new connections.
        let joined = spawn_member(&joiner_ns, &dir, &fleet_file, 3);
        apply(&router, &fleet_file, &[]);
        for (i, member, client, t, back) in open {
            finish_transfer(t, back, &data).await;
            tcp_transfer(&client, 7000 + i as u16, 1000).await;
            assert_eq!(
                member_of(&counts(&member_ns), i),
                member,
                "connection {i} stayed on its member after the join"
            );
        }
        // New connections reach the new member: 25 DCIDs all missing it has probability 4e-5.
        let mut reached = false;
        for i in 10..35 {
            let client = RelayClient::connect(client_config(&dir, i))
                .await
                .unwrap_or_else(|e| panic!("new client {i}: {e}"));
            tcp_transfer(&client, 7000 + i as u16, 1000).await;
            client.close();
            if member_of(&counts(&member_ns), i) == 3 {
                reached = true;
                break;
            }
        }
        assert!(reached, "no new connection reached the joined member");
        joined
    });
    fleet.members.push(joined);
    for m in &mut fleet.members {
        assert!(m.is_running(), "member {} kept running", m.id);
    }
}

/// The fleet's PvD (`[relay.pvd]` in the fleet file): every member serves the same bytes, listing
/// the service; `cfr client --discover SERVICE` learns it through the balancer and tunnels through
/// the fleet.
#[test]
fn every_member_serves_the_same_pvd_and_cfr_client_discovers_the_service() {
    let fleet = Fleet::start(
        "[relay.pvd]\nidentifier = \"192.0.2.10\"\nexpires_secs = 3600\n",
        600,
    );
    let ca = fleet.dir.path().join("certs/ca.pem");
    // Each member in its own namespace, where SERVICE (on its lo) is that member alone, each
    // asked in a later wall-clock second than the one before (a PvD whose `expires` counted from
    // its first request would differ). The document changes when the wall clock enters a new
    // half-lifetime period: a round that straddles one is repeated.
    let unix_secs = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let bodies = loop {
        let before = unix_secs();
        let mut asked = before;
        let bodies: Vec<Vec<u8>> = fleet
            .member_ns_names()
            .into_iter()
            .enumerate()
            .map(|(i, ns)| {
                if i > 0 {
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while unix_secs() == asked {
                        assert!(Instant::now() < deadline, "the wall clock stands still");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                asked = unix_secs();
                let ca = ca.clone();
                in_netns(&ns, move || async move {
                    let location = cfr_client::discover::PvdLocation::parse(SERVICE).unwrap();
                    let base = ClientConfig::new(format!("https://{SERVICE}"), Trust::CaFile(ca));
                    let (head, body) = cfr_client::discover::fetch(
                        &location,
                        &base,
                        &[cfr_client::discover::ALPN_H2],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("GET /.well-known/pvd from a member: {e}"));
                    assert_eq!(head.status, 200);
                    body.to_vec()
                })
            })
            .collect();
        if before / 1800 == unix_secs() / 1800 {
            break bodies;
        }
    };
    for (id, body) in MEMBERS.iter().zip(&bodies) {
        assert_eq!(
            body,
            &bodies[0],
            "member {id} serves other bytes than member 1:\n{}\n{}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&bodies[0])
        );
    }
    let doc = cfr_proto::pvd::parse(&bodies[0]).unwrap();
    doc.check("192.0.2.10", std::time::SystemTime::now())
        .unwrap();
    let proxies: Vec<(&str, &str)> = doc
        .proxies
        .iter()
        .map(|p| (p.protocol.as_str(), p.proxy.as_str()))
        .collect();
    assert_eq!(
        proxies,
        [
            (
                "connect-udp",
                "https://192.0.2.10:443/.well-known/masque/udp/{target_host}/{target_port}/"
            ),
            ("https-connect", "192.0.2.10:443"),
        ]
    );

    // The client in C knows the service name only; the PvD fetch (TCP) and the tunnels (QUIC)
    // go through the balancer.
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &fleet.clients.name,
        env!("CARGO_BIN_EXE_cfr"),
    ])
    .args(["client", "--discover", "192.0.2.10", "--ca"])
    .arg(&ca)
    .args(["--http", "127.0.0.1:0", "--print-ready"])
    .env("RUST_LOG", "info");
    let log = fleet.dir.path().join("client.stderr");
    let (client, ready) = CfrProcess::spawn_ready(cmd, Some(&log), LIMIT)
        .unwrap_or_else(|e| panic!("cfr client --discover: {e}"));
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let proxy: SocketAddr = ready["http"].as_str().unwrap().parse().unwrap();
    let echoed = fleet.in_clients(move || async move {
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        s.write_all(
            format!("CONNECT [{DEST}]:7000 HTTP/1.1\r\nHost: [{DEST}]:7000\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(LIMIT, s.read(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 1, "proxy closed during the response head: {head:?}");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"through the discovered fleet").await.unwrap();
        let mut back = [0u8; 28];
        tokio::time::timeout(LIMIT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        back
    });
    assert_eq!(&echoed, b"through the discovered fleet", "{}", client.log());
    let source = fleet.seen.lock().unwrap().tcp[&7000].last().unwrap().1;
    assert!(
        fleet.share_owner(source).is_some(),
        "the tunnel left from {source}, outside every member's egress share"
    );
}

/// `cfr fleet apply` on a host whose fleet file dropped a member on another host removes that
/// member's policy-routing rule (and nobody else's), instead of leaving it to steer packets.
#[test]
fn apply_removes_the_rules_of_members_no_longer_in_the_file() {
    let ns = NetNs::create();
    // The other hosts (10.2.0.2, 10.2.0.3) are on a link of this host.
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["addr", "add", "10.2.0.1/24", "dev", "d0"]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["link", "set", "d1", "up"]);
    // An operator's own rule at the same priority, with a mark outside the fleet's range.
    ns.ip(&[
        "-4", "rule", "add", "fwmark", "7", "lookup", "7", "priority", "3300",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("fleet.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let fleet = |remote: &[u32]| {
        let mut t = format!(
            "[fleet]\nservice = [\"{SERVICE}\"]\nsecret_file = \"{}\"\n\
             [fleet.hosts]\nh2 = \"10.2.0.2\"\nh3 = \"10.2.0.3\"\n\
             [fleet.quic_lb]\nserver_id_len = 1\nnonce_len = 8\n\
             [[fleet.egress]]\nprefix = \"{EGRESS_PREFIX}\"\ninstance_prefix_len = 68\n\
             [[fleet.instance]]\nid = 1\nlisten = \"{SERVICE}\"\n",
            secret.display()
        );
        for id in remote {
            // One member per other host: each listens on the service address itself.
            t += &format!(
                "[[fleet.instance]]\nid = {id}\nlisten = \"{SERVICE}\"\nhost = \"h{id}\"\n"
            );
        }
        let file = dir.path().join("fleet.toml");
        std::fs::write(&file, t).unwrap();
        file
    };
    let rules = || in_ns(&ns, &["ip", "-4", "rule", "show", "priority", "3300"]);
    let fleet_mark = |id: u32| format!("fwmark {:#x} ", 0x0cf0_0000 + id);

    apply(&ns.name, &fleet(&[2, 3]), &[]);
    let before = rules();
    assert!(
        before.contains(&fleet_mark(2)) && before.contains(&fleet_mark(3)),
        "{before}"
    );
    // Applying the same file again changes nothing (no duplicates either).
    apply(&ns.name, &fleet(&[2, 3]), &[]);
    assert_eq!(rules(), before);

    apply(&ns.name, &fleet(&[2]), &[]);
    let after = rules();
    assert!(after.contains(&fleet_mark(2)), "{after}");
    assert!(
        !after.contains(&fleet_mark(3)),
        "member 3 left the file: its rule must go\n{after}"
    );
    assert!(
        after.contains("fwmark 0x7 "),
        "the operator's own rule stays\n{after}"
    );
    let table3 = (0x0cf0_0000u32 + 3).to_string();
    let routes = in_ns(&ns, &["ip", "-4", "route", "show", "table", &table3]);
    assert!(
        routes.trim().is_empty(),
        "member 3's table is flushed: {routes}"
    );
}
