//! QUIC-LB connection IDs on the wire: a relay with `[quic_lb]` behind a UDP forwarder that reads
//! the Destination Connection ID of every client→relay datagram the way a load balancer does and
//! decodes it with the codec. After the client's first Initial(s) (whose DCID the client chose at
//! random) every packet must carry the relay's server ID, while tunnels work through the path.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cfr_quic_lb::{datagram_dcid, CidEncoder, LbConfig, ServerId};
use cfr_relay::config::QuicLbConfig;
use cfr_relay::RelayConfig;
use cfr_testkit::origins::{TcpEcho, UdpEcho};
use cfr_testkit::relay::{target, TestRelay};
use cfr_testkit::tunnels::{lo, tcp_roundtrip, udp_roundtrip, LIMIT};
use tokio::net::UdpSocket;

/// One client→relay datagram as the forwarder saw it.
#[derive(Debug, Clone)]
struct Seen {
    client: SocketAddr,
    version: Option<u32>,
    initial: bool,
    dcid: Vec<u8>,
}

/// A UDP forwarder on loopback: each client address gets its own upstream socket towards the
/// relay (like a NAT), and every client→relay datagram's DCID is recorded.
struct Forwarder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(relay: SocketAddr, short_header_cid_len: usize) -> Forwarder {
        let front = Arc::new(UdpSocket::bind(lo()).await.unwrap());
        let addr = front.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut backs = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, client) = front.recv_from(&mut buf).await.unwrap();
                let datagram = &buf[..n];
                let packet = datagram_dcid(datagram, short_header_cid_len)
                    .expect("the client sends well-formed QUIC headers");
                record.lock().unwrap().push(Seen {
                    client,
                    version: packet.version,
                    initial: packet.is_initial(),
                    dcid: packet.dcid.to_vec(),
                });
                let up = match upstreams.get(&client) {
                    Some(up) => up.clone(),
                    None => {
                        let up = Arc::new(UdpSocket::bind(lo()).await.unwrap());
                        up.connect(relay).await.unwrap();
                        let (up2, front2) = (up.clone(), front.clone());
                        backs.spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = up2.recv(&mut buf).await {
                                let _ = front2.send_to(&buf[..n], client).await;
                            }
                        });
                        upstreams.insert(client, up.clone());
                        up
                    }
                };
                let _ = up.send(datagram).await;
            }
        });
        Forwarder { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Client addresses in the order they first sent.
fn clients_in_order(seen: &[Seen]) -> Vec<SocketAddr> {
    let mut clients = Vec::new();
    for s in seen {
        if !clients.contains(&s.client) {
            clients.push(s.client);
        }
    }
    clients
}

/// Asserts, per client connection, that only leading Initials carry a DCID other than one that
/// decodes to `server_id`, and that the rest (short headers included) all do. Returns how many
/// datagrams carried the server ID.
fn assert_every_packet_routes(seen: &[Seen], lb: &LbConfig, server_id: ServerId) -> usize {
    let mut routed_total = 0;
    for client in clients_in_order(seen) {
        let packets: Vec<&Seen> = seen.iter().filter(|s| s.client == client).collect();
        let first_routed = packets
            .iter()
            .position(|p| lb.decode_server_id(&p.dcid) == Ok(server_id))
            .unwrap_or_else(|| panic!("no packet from {client} carried server ID {server_id}"));
        for p in &packets[..first_routed] {
            assert!(
                p.initial,
                "before the relay's CID only client Initials may go out, saw {p:?}"
            );
        }
        let routed = &packets[first_routed..];
        for p in routed {
            assert_eq!(
                lb.decode_server_id(&p.dcid),
                Ok(server_id),
                "every packet after the first Initial(s) must route to this relay: {p:?}"
            );
        }
        assert!(
            routed.iter().any(|p| p.version.is_none()),
            "short-header packets must be among those checked"
        );
        assert!(
            routed.len() >= 10,
            "expected a real exchange, saw {} routed packets",
            routed.len()
        );
        routed_total += routed.len();
    }
    routed_total
}

/// Starts a relay with `lb`, runs two client connections with TCP and UDP tunnels through a
/// forwarder (the first one rebinding to a new port mid-way), and checks the DCIDs.
async fn tunnels_through_a_cid_reading_forwarder(lb: QuicLbConfig) {
    let tcp_echo = TcpEcho::start(lo()).await;
    let udp_echo = UdpEcho::start(lo()).await;
    let server_id = lb.server_id;
    let relay = TestRelay::start_with(|cfg: &mut RelayConfig| cfg.quic_lb = Some(lb.clone())).await;
    let codec = lb
        .load()
        .expect("the QUIC-LB config loads")
        .config()
        .clone();
    let fwd = Forwarder::start(relay.addr, codec.cid_len()).await;
    for round in 0..2u8 {
        let mut cfg = relay.client_config();
        cfg.relay = format!("https://localhost:{}", fwd.addr.port());
        let client = tokio::time::timeout(LIMIT, cfr_client::RelayClient::connect(cfg))
            .await
            .expect("client connects through the forwarder within the limit")
            .expect("client connects through the forwarder");
        let payload = vec![round; 200_000];
        tcp_roundtrip(&client, &target(tcp_echo.addr()), &payload).await;
        udp_roundtrip(&client, &target(udp_echo.addr()), &[vec![round; 900]]).await;
        if round == 0 {
            // A NAT rebinding: the connection moves to a new source port and, as quinn does on a
            // new path, to a connection ID the relay issued in NEW_CONNECTION_ID.
            let socket = std::net::UdpSocket::bind(lo()).unwrap();
            client.rebind(socket).await.expect("rebind");
            tcp_roundtrip(&client, &target(tcp_echo.addr()), &payload).await;
        }
        client.close();
    }
    let seen = fwd.seen();
    let clients = clients_in_order(&seen);
    assert_eq!(
        clients.len(),
        3,
        "two connections, the first one rebound once"
    );
    assert_every_packet_routes(&seen, &codec, server_id);
    let dcids_from = |client: SocketAddr| -> std::collections::HashSet<Vec<u8>> {
        seen.iter()
            .filter(|s| s.client == client && !s.initial)
            .map(|s| s.dcid.clone())
            .collect()
    };
    let (before, after) = (dcids_from(clients[0]), dcids_from(clients[1]));
    assert!(
        before.is_disjoint(&after),
        "after rebinding the client must use a NEW_CONNECTION_ID connection ID"
    );
    relay.stop().await;
}

fn key_file(dir: &tempfile::TempDir, hex_key: &str) -> std::path::PathBuf {
    let path = dir.path().join("quic-lb.key");
    std::fs::write(&path, format!("{hex_key}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test]
async fn plaintext_cids_carry_the_server_id_on_every_packet() {
    tunnels_through_a_cid_reading_forwarder(QuicLbConfig {
        config_rotation: 1,
        server_id: "c0de".parse().unwrap(),
        nonce_len: 6,
        key_file: None,
        length_self_encoding: true,
    })
    .await;
}

#[tokio::test]
async fn four_pass_encrypted_cids_carry_the_server_id_on_every_packet() {
    let dir = tempfile::tempdir().unwrap();
    tunnels_through_a_cid_reading_forwarder(QuicLbConfig {
        config_rotation: 2,
        server_id: "0a0b0c".parse().unwrap(),
        nonce_len: 5,
        key_file: Some(key_file(&dir, "8f95f09245765f80256934e50c66207f")),
        length_self_encoding: false,
    })
    .await;
}

#[tokio::test]
async fn single_pass_encrypted_cids_carry_the_server_id_on_every_packet() {
    let dir = tempfile::tempdir().unwrap();
    tunnels_through_a_cid_reading_forwarder(QuicLbConfig {
        config_rotation: 0,
        server_id: "0102030405060708".parse().unwrap(),
        nonce_len: 8,
        key_file: Some(key_file(&dir, "fdf726a9893ec05c0632d3956680baf0")),
        length_self_encoding: true,
    })
    .await;
}

/// A short-header packet for a CID this relay never issued: when the CID routes to this relay it
/// answers with a stateless reset (RFC 9000 §10.3); when it routes to another server ID, or is
/// unroutable, it stays silent rather than reset a connection that lives elsewhere.
#[tokio::test]
async fn only_cids_of_this_server_id_get_a_stateless_reset() {
    let lb = QuicLbConfig {
        config_rotation: 3,
        server_id: "77".parse().unwrap(),
        nonce_len: 7,
        key_file: None,
        length_self_encoding: true,
    };
    let relay = TestRelay::start_with(|cfg: &mut RelayConfig| cfg.quic_lb = Some(lb.clone())).await;
    let codec = lb.load().unwrap().config().clone();
    let short_header = |cid: Vec<u8>| {
        let mut packet = vec![0x40];
        packet.extend_from_slice(&cid);
        packet.resize(1200, 0x5a);
        packet
    };
    let foreign = CidEncoder::new(&codec, &[0x78]).unwrap().encode(&[1; 7]);
    let mut unroutable = foreign.clone();
    unroutable[0] |= 0xe0;
    let own = CidEncoder::new(&codec, &[0x77]).unwrap().encode(&[1; 7]);

    let strangers = UdpSocket::bind(lo()).await.unwrap();
    strangers.connect(relay.addr).await.unwrap();
    strangers.send(&short_header(foreign)).await.unwrap();
    strangers.send(&short_header(unroutable)).await.unwrap();
    // Sent after the others on the same loopback path: once its answer is here, theirs would be.
    let prober = UdpSocket::bind(lo()).await.unwrap();
    prober.connect(relay.addr).await.unwrap();
    prober.send(&short_header(own)).await.unwrap();
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), prober.recv(&mut buf))
        .await
        .expect("a CID of this server ID gets a stateless reset")
        .unwrap();
    assert!(n > 16, "stateless reset ends in a 16-octet token");
    assert_eq!(
        buf[0] & 0xc0,
        0x40,
        "a stateless reset looks like a short header"
    );
    match strangers.try_recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("CIDs of other server IDs must get no answer, got {other:?}"),
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_key_file_others_can_read_or_that_is_not_a_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(&dir, "8f95f09245765f80256934e50c66207f");
    let lb = QuicLbConfig {
        config_rotation: 0,
        server_id: "01".parse().unwrap(),
        nonce_len: 4,
        key_file: Some(path.clone()),
        length_self_encoding: true,
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = lb.load().unwrap_err().to_string();
    assert!(
        err.contains("quic_lb.key_file") && err.contains("chmod"),
        "{err}"
    );
    std::fs::write(&path, "not hex").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = lb.load().unwrap_err().to_string();
    assert!(err.contains("quic_lb.key_file"), "{err}");
    let relay_dir = tempfile::tempdir().unwrap();
    let mut cfg = cfr_testkit::relay::test_config(relay_dir.path());
    cfg.quic_lb = Some(lb);
    let resolver: Arc<dyn cfr_relay::Resolver> = Arc::new(cfr_relay::HostsThenSystem {
        hosts: Default::default(),
        hosts_only: true,
    });
    let err = cfr_relay::Relay::bind(cfg, resolver, &[])
        .await
        .err()
        .expect("a relay with an unusable key file must not start")
        .to_string();
    assert!(err.contains("quic_lb.key_file"), "{err}");
}
