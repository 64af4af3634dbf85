//! Sealed egress addresses through the real relay, in a network namespace with a routed /64:
//! every address a destination saw opens with the operator's key to the subscriber who opened the
//! tunnel (and nobody else), random and wrong-key openings give "no match" at the stated rate,
//! sealed addresses look as uniform as drawn ones, and the relay forgets old epochs.
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfr_egress::seal::{
    open_iid, unix_now, write_key_file, EpochKey, KeyFile, MasterKey, SealLayout, SealParams,
    Subscriber,
};
use cfr_egress::{EgressConfig, EgressPool};
use cfr_relay::config::{RelayConfig, TokenHash};
use cfr_testkit::relay::{target, TestRelay};
use cfr_testkit::tunnels::{udp_echo, LIMIT};
use ipnet::IpNet;
use rand::Rng;
use tokio::net::UdpSocket;

const POOL: &str = "2001:db8:5ea1::/64";
/// Three subscribers: (token, operator-assigned handle).
const SUBSCRIBERS: [(&str, u32); 3] = [
    ("alice-token", 101),
    ("bob-token", 202),
    ("carol-token", 303),
];

/// (source address, payload) of each datagram a destination received.
type Received = Arc<Mutex<Vec<(IpAddr, Vec<u8>)>>>;

/// A UDP echo that records (source address, payload) of every datagram.
struct RecordingUdp {
    addr: SocketAddr,
    seen: Received,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUdp {
    async fn start() -> Self {
        let sock = UdpSocket::bind("[::1]:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let seen: Received = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                log.lock().unwrap().push((from.ip(), buf[..n].to_vec()));
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        Self { addr, seen, task }
    }

    /// Source address per payload (a retried datagram is recorded once per distinct source).
    fn sources_by_payload(&self) -> HashMap<Vec<u8>, HashSet<IpAddr>> {
        let mut m: HashMap<Vec<u8>, HashSet<IpAddr>> = HashMap::new();
        for (ip, p) in self.seen.lock().unwrap().iter() {
            m.entry(p.clone()).or_default().insert(*ip);
        }
        m
    }
}

impl Drop for RecordingUdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write_master(dir: &Path, params: SealParams, key: &MasterKey) -> std::path::PathBuf {
    let path = dir.join("seal.key");
    write_key_file(
        &path,
        &KeyFile::Master {
            params,
            key: key.clone(),
        },
    )
    .unwrap();
    path
}

/// A schedule whose origin lies 24 epochs back, so openings ratchet and try a full window.
fn params_now(epoch_secs: u64) -> SealParams {
    let now = unix_now();
    SealParams {
        origin: now - now % epoch_secs - 24 * epoch_secs,
        epoch_secs,
        handle_bits: SealParams::DEFAULT_HANDLE_BITS,
        check_bits: SealParams::DEFAULT_CHECK_BITS,
    }
}

fn sealing_config(c: &mut RelayConfig, pool: IpNet, key: &Path, retention_secs: u64) {
    c.egress.prefixes = vec![pool];
    c.egress.fallback = cfr_egress::Fallback::Refuse;
    c.egress.sealing = true;
    c.egress.sealing_key = Some(key.to_owned());
    c.egress.sealing_retention_secs = retention_secs;
    c.limits.tunnels_per_connection = 1024;
    for (token, handle) in SUBSCRIBERS {
        c.auth.token_sha256.push(TokenHash::of(token));
        c.auth
            .subscribers
            .tokens
            .insert(TokenHash::of(token), handle);
    }
}

fn iid(a: IpAddr) -> u64 {
    match a {
        IpAddr::V6(a) => u128::from(a) as u64,
        IpAddr::V4(_) => panic!("expected IPv6, got {a}"),
    }
}

/// Uniformity without the key: no repeats, and each of the 64 IID bits set in 50 % ± 6σ of the
/// addresses (binomial, σ = √n / 2). A correct permutation or CSPRNG fails one bit with probability
/// ≈ 2·10^-9, all 64 with < 1.3·10^-7.
fn check_uniform_iids(iids: &[u64]) -> Result<(), String> {
    let distinct: HashSet<u64> = iids.iter().copied().collect();
    if distinct.len() != iids.len() {
        return Err(format!(
            "{} repeated IIDs among {}",
            iids.len() - distinct.len(),
            iids.len()
        ));
    }
    let n = iids.len() as f64;
    let sigma = n.sqrt() / 2.0;
    for bit in 0..64 {
        let ones = iids.iter().filter(|&&i| i >> bit & 1 == 1).count() as f64;
        if (ones - n / 2.0).abs() > 6.0 * sigma {
            return Err(format!(
                "IID bit {bit} set in {ones} of {n} addresses (expected {} ± {:.0})",
                n / 2.0,
                6.0 * sigma
            ));
        }
    }
    Ok(())
}

/// Opens `iid` under each key; returns the openings.
fn open_all(keys: &[EpochKey], layout: &SealLayout, iid: u64) -> Vec<(Subscriber, u64)> {
    keys.iter()
        .filter_map(|k| open_iid(k, 0, layout, u128::from(iid)))
        .map(|o| (o.subscriber, o.epoch))
        .collect()
}

/// What the master key opens `addr` to in epoch `epoch` (when the tunnel opened) or the next one
/// (the epoch may have turned while it opened).
fn master_opens(
    master: &MasterKey,
    layout: &SealLayout,
    epoch: u64,
    addr: IpAddr,
) -> Vec<(Subscriber, u64)> {
    let keys = [epoch, epoch + 1].map(|e| master.chain_at(e).epoch_key());
    open_all(&keys, layout, iid(addr))
}

/// False matches allowed for `tries` openings at 2^-check_bits each: the expectation is
/// tries·2^-20 ≈ 0.03 for 30 000 tries; P(Poisson(0.03) ≥ 5) ≈ 2·10^-10.
const FALSE_MATCH_BOUND: usize = 4;

#[test]
fn ten_thousand_sealed_udp_tunnels_open_to_their_subscriber_and_nothing_else() {
    cfr_testkit::netns::run_in_netns(
        "ten_thousand_sealed_udp_tunnels_open_to_their_subscriber_and_nothing_else",
        &[&["-6", "route", "add", "local", POOL, "dev", "lo"]],
        || async {
            const PER_SUBSCRIBER: usize = 3334;
            let pool: IpNet = POOL.parse().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let params = params_now(3600);
            let master = MasterKey::generate();
            let key_path = write_master(dir.path(), params, &master);
            let dest = RecordingUdp::start().await;
            let relay = TestRelay::start_with(|c| sealing_config(c, pool, &key_path, 0)).await;
            let started = unix_now();
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for (token, handle) in SUBSCRIBERS {
                let mut cfg = relay.client_config();
                cfg.token = Some(token.to_owned());
                let client = Arc::new(cfr_client::RelayClient::connect(cfg).await.unwrap());
                let sem = Arc::new(tokio::sync::Semaphore::new(48));
                for i in 0..PER_SUBSCRIBER {
                    let permit = sem.clone().acquire_owned().await.unwrap();
                    let client = client.clone();
                    let t = target(dest.addr);
                    tasks.push(tokio::spawn(async move {
                        let tunnel = tokio::time::timeout(LIMIT, client.connect_udp(&t))
                            .await
                            .expect("UDP tunnel answer within the limit")
                            .unwrap_or_else(|e| panic!("sealed UDP tunnel should open: {e}"));
                        let payload = format!("{handle}:{i}");
                        udp_echo(&tunnel, payload.as_bytes(), 5, Duration::from_secs(2)).await;
                        drop(permit);
                    }));
                }
            }
            for t in tasks {
                t.await.expect("tunnel task");
            }
            let finished = unix_now();
            println!(
                "{} sealed CONNECT-UDP tunnels in {:.1} s",
                3 * PER_SUBSCRIBER,
                t0.elapsed().as_secs_f64()
            );

            // Every tunnel's datagram reached the destination from one pool address.
            let seen = dest.sources_by_payload();
            assert_eq!(
                seen.len(),
                3 * PER_SUBSCRIBER,
                "the destination saw every tunnel"
            );
            let layout = SealLayout::for_prefix(pool, &params).unwrap();
            let e_first = params.epoch_at(started).unwrap();
            let e_last = params.epoch_at(finished).unwrap();
            // What `cfr egress open` tries: the epoch of the time and one on each side.
            let keys: Vec<EpochKey> = (e_first.saturating_sub(1)..=e_last + 1)
                .map(|e| master.chain_at(e).epoch_key())
                .collect();
            let tries_per_address = keys.len() - 1;
            let mut extra_matches = 0;
            let mut iids = Vec::new();
            for (payload, sources) in &seen {
                let text = String::from_utf8(payload.clone()).unwrap();
                let handle: u32 = text.split(':').next().unwrap().parse().unwrap();
                assert_eq!(
                    sources.len(),
                    1,
                    "tunnel {text} left from more than one address"
                );
                let a = *sources.iter().next().unwrap();
                assert!(pool.contains(&a), "{a} is outside {pool}");
                iids.push(iid(a));
                let openings = open_all(&keys, &layout, iid(a));
                let right: Vec<_> = openings
                    .iter()
                    .filter(|(s, e)| *s == Subscriber(handle) && (e_first..=e_last).contains(e))
                    .collect();
                assert_eq!(
                    right.len(),
                    1,
                    "tunnel {text}: {a} must open to subscriber {handle} in epoch {e_first}..={e_last}, got {openings:?}"
                );
                extra_matches += openings.len() - 1;
            }
            println!(
                "false matches next to the right one: {extra_matches} in {} tries",
                iids.len() * tries_per_address
            );
            assert!(
                extra_matches <= FALSE_MATCH_BOUND,
                "{extra_matches} false matches next to the right openings; 2^-20 per try bounds this at {FALSE_MATCH_BOUND}"
            );

            // Random addresses of the same prefix, and the sealed ones under a wrong key.
            let wrong: Vec<EpochKey> = (e_first.saturating_sub(1)..=e_last + 1)
                .map(|e| MasterKey::generate().chain_at(e).epoch_key())
                .collect();
            let mut rng = rand::thread_rng();
            let random_matches: usize = (0..iids.len())
                .map(|_| open_all(&keys, &layout, rng.gen()).len())
                .sum();
            let wrong_key_matches: usize = iids
                .iter()
                .map(|&i| open_all(&wrong, &layout, i).len())
                .sum();
            let tries = iids.len() * keys.len();
            println!(
                "random addresses: {random_matches} matches in {tries} tries; wrong key: {wrong_key_matches} in {tries} (expected {:.3} each)",
                tries as f64 / f64::from(1u32 << params.check_bits)
            );
            assert!(
                random_matches <= FALSE_MATCH_BOUND,
                "random addresses opened {random_matches} times"
            );
            assert!(
                wrong_key_matches <= FALSE_MATCH_BOUND,
                "a wrong key opened {wrong_key_matches} addresses"
            );

            // Without the key: as uniform as drawn addresses, and the check does catch a leak.
            check_uniform_iids(&iids).unwrap_or_else(|e| panic!("sealed addresses: {e}"));
            let unsealed = EgressPool::new(&EgressConfig {
                prefixes: vec![pool],
                ..EgressConfig::default()
            })
            .unwrap();
            let conn = unsealed.connection();
            let drawn: Vec<u64> = (0..iids.len())
                .map(|_| {
                    iid(conn
                        .source_for("2001:db8::1".parse().unwrap())
                        .unwrap()
                        .unwrap())
                })
                .collect();
            check_uniform_iids(&drawn).unwrap_or_else(|e| panic!("drawn addresses: {e}"));
            let plaintexts: Vec<u64> = (0..iids.len() as u64).map(|i| (101 << 24) | i).collect();
            assert!(
                check_uniform_iids(&plaintexts).is_err(),
                "the uniformity check must reject unencrypted handle‖counter IIDs"
            );
        },
    );
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

async fn one_sealed_tunnel(
    relay: &TestRelay,
    dest: &RecordingUdp,
    token: &str,
    payload: &str,
) -> IpAddr {
    let mut cfg = relay.client_config();
    cfg.token = Some(token.to_owned());
    let client = cfr_client::RelayClient::connect(cfg).await.unwrap();
    let tunnel = client.connect_udp(&target(dest.addr)).await.unwrap();
    udp_echo(&tunnel, payload.as_bytes(), 5, Duration::from_secs(2)).await;
    let seen = dest.sources_by_payload();
    let sources = &seen[payload.as_bytes()];
    assert_eq!(sources.len(), 1);
    *sources.iter().next().unwrap()
}

#[test]
fn relay_forgets_epochs_after_the_retention_and_a_restart_seals_the_current_epoch() {
    cfr_testkit::netns::run_in_netns(
        "relay_forgets_epochs_after_the_retention_and_a_restart_seals_the_current_epoch",
        &[&["-6", "route", "add", "local", POOL, "dev", "lo"]],
        || async {
            let pool: IpNet = POOL.parse().unwrap();
            let dir = tempfile::tempdir().unwrap();
            // 2-second epochs, 1 second of retention: an epoch key lives at most 3 s.
            let params = params_now(2);
            let master = MasterKey::generate();
            let key_path = write_master(dir.path(), params, &master);
            let layout = SealLayout::for_prefix(pool, &params).unwrap();
            let dest = RecordingUdp::start().await;
            let (alice, alice_handle) = SUBSCRIBERS[0];

            let relay = TestRelay::start_with(|c| sealing_config(c, pool, &key_path, 1)).await;
            let sealer = relay.core().egress.sealer().expect("sealing is on").clone();
            let at_a = unix_now();
            let a = one_sealed_tunnel(&relay, &dest, alice, "first").await;
            let opened = sealer.open_retained(&layout, u128::from(iid(a)));
            assert!(
                opened
                    .iter()
                    .any(|o| o.subscriber == Subscriber(alice_handle)),
                "the relay's own keys open a fresh address: {opened:?}"
            );
            // The relay's erasure timer removes the key on time, with no tunnel opened meanwhile.
            assert!(
                wait_for(Duration::from_secs(10), || sealer
                    .open_retained(&layout, u128::from(iid(a)))
                    .is_empty())
                .await,
                "the epoch key of {a} was still in the relay's memory 10 s later (retention 1 s)"
            );
            // The accountable party's master key still opens it: retention is about the relay.
            let e_a = params.epoch_at(at_a).unwrap();
            let from_master = master_opens(&master, &layout, e_a, a);
            assert!(
                from_master
                    .iter()
                    .any(|(s, _)| *s == Subscriber(alice_handle)),
                "the master key must still open {a}: {from_master:?}"
            );
            drop(sealer);
            relay.stop().await;

            // A restart with the same master key seals in the current epoch, which the key opens.
            let relay = TestRelay::start_with(|c| sealing_config(c, pool, &key_path, 1)).await;
            let at_b = unix_now();
            let b = one_sealed_tunnel(&relay, &dest, alice, "second").await;
            let e_b = params.epoch_at(at_b).unwrap();
            let from_master = master_opens(&master, &layout, e_b, b);
            assert!(
                from_master
                    .iter()
                    .any(|&(s, e)| s == Subscriber(alice_handle) && e >= e_b),
                "after a restart {b} must open to subscriber {alice_handle} in the current epoch: {from_master:?}"
            );
            let sealer = relay.core().egress.sealer().unwrap();
            assert!(
                sealer.open_retained(&layout, u128::from(iid(a))).is_empty(),
                "a restarted relay must not hold the old epoch's key"
            );
            relay.stop().await;
        },
    );
}

#[test]
fn a_client_certificate_seals_to_its_operator_assigned_handle() {
    cfr_testkit::netns::run_in_netns(
        "a_client_certificate_seals_to_its_operator_assigned_handle",
        &[&["-6", "route", "add", "local", POOL, "dev", "lo"]],
        || async {
            use rustls::pki_types::pem::PemObject;
            use sha2::{Digest, Sha256};
            const CERT_HANDLE: u32 = 404;
            let pool: IpNet = POOL.parse().unwrap();
            let keys = tempfile::tempdir().unwrap();
            let params = params_now(3600);
            let master = MasterKey::generate();
            let key_path = write_master(keys.path(), params, &master);
            // The relay's dev CA exists before the relay starts, so the operator can hash the
            // client certificate it issues into `auth.subscribers.client_certs`.
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = cfr_testkit::relay::test_config(dir.path());
            let (cert, cert_key) =
                cfr_relay::tls::generate_client_cert(dir.path(), "dave").unwrap();
            let der = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
            sealing_config(&mut cfg, pool, &key_path, 0);
            cfg.auth.client_ca = Some(dir.path().join("ca.pem"));
            cfg.auth
                .subscribers
                .client_certs
                .insert(TokenHash(Sha256::digest(der.as_ref()).into()), CERT_HANDLE);
            let resolver: Arc<dyn cfr_relay::Resolver> = Arc::new(cfr_relay::HostsThenSystem {
                hosts: cfg.resolver.hosts.clone(),
                hosts_only: true,
            });
            let relay = TestRelay::start_with_resolver(dir, cfg, resolver).await;
            let dest = RecordingUdp::start().await;
            let mut client_cfg = relay.client_config();
            client_cfg.token = None;
            client_cfg.client_cert = Some((cert, cert_key));
            let client = cfr_client::RelayClient::connect(client_cfg).await.unwrap();
            let at = unix_now();
            let tunnel = client.connect_udp(&target(dest.addr)).await.unwrap();
            udp_echo(&tunnel, b"by certificate", 5, Duration::from_secs(2)).await;
            let seen = dest.sources_by_payload();
            let a = *seen[&b"by certificate"[..]].iter().next().unwrap();
            let layout = SealLayout::for_prefix(pool, &params).unwrap();
            let opened = master_opens(&master, &layout, params.epoch_at(at).unwrap(), a);
            assert!(
                opened.iter().any(|(s, _)| *s == Subscriber(CERT_HANDLE)),
                "a tunnel authenticated by certificate must open to handle {CERT_HANDLE}: {opened:?}"
            );
            relay.stop().await;
        },
    );
}

#[tokio::test]
async fn sealing_refuses_to_start_when_the_prefix_is_too_short() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = write_master(dir.path(), params_now(3600), &MasterKey::generate());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = cfr_testkit::relay::test_config(tmp.path());
    sealing_config(&mut cfg, "127.64.0.0/10".parse().unwrap(), &key_path, 0);
    let resolver: Arc<dyn cfr_relay::Resolver> = Arc::new(cfr_relay::HostsThenSystem {
        hosts: cfg.resolver.hosts.clone(),
        hosts_only: true,
    });
    let err = match cfr_relay::Relay::bind(cfg, resolver, &[]).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a /10 has 22 host bits; sealing needs 56 and must refuse to start"),
    };
    assert!(
        err.contains("has 22 host bits") && err.contains("needs at least 56"),
        "the error must say how many bits are needed: {err}"
    );
}
