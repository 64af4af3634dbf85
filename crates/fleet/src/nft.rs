//! The nftables ruleset that makes a host the fleet's QUIC-LB load balancer (the kernel forwards;
//! cfr only writes the rules).
//!
//! Every UDP packet sent to a service address is classified in a `prerouting` chain at mangle
//! priority and gets the packet mark of one member (`MARK_BASE + id`):
//! - a short-header packet whose CID carries the fleet's config rotation: by the server-ID octets at
//!   UDP payload offset 2 (1 header octet, then the CID's first octet);
//! - a long-header packet whose DCID has the fleet's CID length and config rotation: by the server ID
//!   at offset 7 (1 header octet, 4 version octets, the DCID length octet, the CID's first octet);
//! - anything else long-header (a client's first Initials, whose DCID the client chose at random): by
//!   a hash of the DCID's first 8 octets, over the members that are not draining, so every Initial of
//!   one handshake reaches the same member;
//! - a short-header packet with an unknown server ID or config: by a hash of its first 8 CID octets
//!   (such packets belong to no connection; the member that gets one drops it or sends a stateless
//!   reset);
//! - a packet too short for any of these: dropped.
//!
//! TCP (the TLS front-end) is balanced by a hash of the 5-tuple when the connection starts and then
//! pinned with the conntrack mark, so a ruleset change (drain, a new member) never moves it.
//!
//! The mark then steers: members on this host by DNAT to their listen address (a `nat` chain at
//! dstnat priority), members on other hosts by policy routing (`ip rule fwmark MARK lookup MARK`,
//! [`routes`]): those members receive the packets unchanged and listen on the service address.
//!
//! Only plaintext CIDs can be routed this way: nftables cannot decrypt the encrypted modes.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::invalid;
use crate::{FleetConfig, FleetError, Instance};

/// Packet mark (and policy-routing table) of member `id` is `MARK_BASE + id`.
pub const MARK_BASE: u32 = 0x0cf0_0000;
/// Largest member id a mark can carry.
pub const MAX_MARKED_ID: u32 = 0x000f_ffff;
/// Priority of the `ip rule`s installed for members on other hosts.
pub const RULE_PRIORITY: u32 = 3300;
/// Name of the nftables table (family `inet`).
pub const TABLE: &str = "cfr_fleet";

/// Which host the ruleset is for, and which members take no new connections.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// This host's name in `[fleet.hosts]`; `None`: the members without a `host`.
    pub this_host: Option<String>,
    /// Member ids draining in addition to `fleet.draining`.
    pub drain: Vec<u32>,
}

/// Packet mark of member `id`.
pub fn mark(id: u32) -> u32 {
    MARK_BASE + id
}

fn is_local(inst: &Instance, opts: &Options) -> bool {
    inst.host == opts.this_host
}

/// A `{ k : v, ... }` map literal.
fn map_literal(entries: impl IntoIterator<Item = (String, String)>) -> String {
    let body: Vec<String> = entries
        .into_iter()
        .map(|(k, v)| format!("{k} : {v}"))
        .collect();
    format!("{{ {} }}", body.join(", "))
}

/// The complete ruleset for `nft -f`: it replaces the table atomically (a ruleset load is one
/// transaction), so it can be re-applied at any time, e.g. to drain a member.
pub fn ruleset(cfg: &FleetConfig, opts: &Options) -> Result<String, FleetError> {
    let f = &cfg.fleet;
    let lb = &f.quic_lb;
    if let Some(path) = &lb.key_file {
        return Err(invalid(
            "fleet.quic_lb.key_file",
            format!(
                "{}: encrypted CIDs need a balancer that decrypts them (draft-ietf-quic-load-balancers-21); \
                 nftables routes plaintext CIDs only (see README, Running a fleet)",
                path.display()
            ),
        ));
    }
    if let Some(d) = opts.drain.iter().find(|d| cfg.instance(**d).is_none()) {
        return Err(invalid("--drain", format!("{d} is not an instance id")));
    }
    if let Some(i) = f.instances.iter().find(|i| i.id > MAX_MARKED_ID) {
        return Err(invalid(
            "fleet.instance.id",
            format!(
                "{}: the nftables balancer marks ids up to {MAX_MARKED_ID}",
                i.id
            ),
        ));
    }
    if let Some(h) = &opts.this_host {
        if !f.hosts.contains_key(h) {
            return Err(invalid("--host", format!("{h:?} is not in [fleet.hosts]")));
        }
    }
    for inst in f.instances.iter().filter(|i| !is_local(i, opts)) {
        let same_port = f.service.iter().all(|s| s.port() == inst.listen.port());
        let address_ok = inst.listen.ip().is_unspecified()
            || f.service.iter().any(|s| s.ip() == inst.listen.ip());
        if !same_port || !address_ok {
            return Err(invalid(
                "fleet.instance.listen",
                format!(
                    "instance {} on another host receives the service packets unchanged (policy routing): \
                     it must listen on a service address or the unspecified address, with the service port",
                    inst.id
                ),
            ));
        }
    }

    let draining = |id: u32| f.draining.contains(&id) || opts.drain.contains(&id);
    let active: Vec<u32> = f
        .instances
        .iter()
        .map(|i| i.id)
        .filter(|id| !draining(*id))
        .collect();
    if active.is_empty() {
        return Err(invalid(
            "--drain",
            "every instance would be draining: nobody would take new connections",
        ));
    }
    let sid_bits = 8 * u32::from(lb.server_id_len);
    let sid_digits = 2 * usize::from(lb.server_id_len);
    let by_server_id = map_literal(f.instances.iter().map(|i| {
        (
            format!("0x{:0sid_digits$x}", i.id),
            format!("{:#010x}", mark(i.id)),
        )
    }));
    let by_hash = map_literal(
        active
            .iter()
            .enumerate()
            .map(|(bucket, id)| (bucket.to_string(), format!("{:#010x}", mark(*id)))),
    );
    let n = active.len();
    let rotation = lb.config_rotation;
    let cid_len = lb.cid_len();

    let mut out = String::new();
    let w = &mut out;
    // `writeln!` into a String cannot fail.
    macro_rules! line {
        ($($arg:tt)*) => { let _ = writeln!(w, $($arg)*); };
    }
    line!("# cfr fleet balancer (generated by `cfr fleet nft`; load with `cfr fleet apply` or `nft -f`).");
    line!(
        "# QUIC-LB plaintext CIDs: config rotation {rotation}, {} octet(s) of server ID, {} of nonce.",
        lb.server_id_len,
        lb.nonce_len
    );
    line!(
        "# Members: {}.",
        f.instances
            .iter()
            .map(|i| {
                let place = match &i.host {
                    Some(h) if !is_local(i, opts) => format!("host {h}"),
                    _ => format!("DNAT {}", i.listen),
                };
                let state = if draining(i.id) { ", draining" } else { "" };
                format!("{} (mark {:#010x}, {place}{state})", i.id, mark(i.id))
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    // Creating then deleting makes the load idempotent: the table is replaced in one transaction.
    line!("table inet {TABLE}");
    line!("delete table inet {TABLE}");
    line!("table inet {TABLE} {{");
    line!("    chain prerouting {{");
    line!("        type filter hook prerouting priority mangle; policy accept;");
    for s in &f.service {
        let daddr = match s.ip() {
            IpAddr::V4(a) => format!("ip daddr {a}"),
            IpAddr::V6(a) => format!("ip6 daddr {a}"),
        };
        line!("        {daddr} udp dport {} jump quic", s.port());
        line!("        {daddr} tcp dport {} jump tls", s.port());
    }
    line!("    }}");
    line!();
    line!("    chain quic {{");
    line!("        # Short header (form bit 0) with our config rotation: server ID at UDP payload octet 2.");
    line!(
        "        @th,64,1 0 @th,72,3 {rotation} meta mark set @th,80,{sid_bits} map {by_server_id} counter accept"
    );
    line!("        # Long header whose DCID (length at octet 5) is one of ours: server ID at octet 7.");
    line!(
        "        @th,64,1 1 @th,104,8 {cid_len} @th,112,3 {rotation} meta mark set @th,120,{sid_bits} map {by_server_id} counter accept"
    );
    //= https://www.rfc-editor.org/rfc/rfc9000#section-7.2
    //# When an Initial packet is sent by a client that has not previously
    //# received an Initial or Retry packet from the server, the client
    //# populates the Destination Connection ID field with an unpredictable
    //# value.  This Destination Connection ID MUST be at least 8 bytes in length.
    line!("        # A client's first Initials (random DCID, at least 8 octets): hash of the DCID, members not draining.");
    line!(
        "        @th,64,1 1 @th,104,8 >= 8 meta mark set jhash @th,112,64 mod {n} map {by_hash} counter accept"
    );
    line!("        # Short header with an unknown server ID or config: hashed (no member has such a connection).");
    line!("        @th,64,1 0 meta mark set jhash @th,72,64 mod {n} map {by_hash} counter accept");
    line!("        # Too short to be QUIC.");
    line!("        counter drop");
    line!("    }}");
    line!();
    line!("    chain tls {{");
    line!("        # TLS/TCP front-end: 5-tuple hash at the first packet, then pinned by the conntrack mark.");
    for (nfproto, addr) in [("ipv4", "ip"), ("ipv6", "ip6")] {
        line!(
            "        meta nfproto {nfproto} ct state new meta mark set jhash {addr} saddr . tcp sport . {addr} daddr . tcp dport mod {n} map {by_hash} ct mark set meta mark counter accept"
        );
    }
    line!("        meta mark set ct mark accept");
    line!("    }}");
    line!();
    line!("    chain steer {{");
    line!("        # Members on this host: DNAT to their listen address (TCP and UDP share the port).");
    line!("        type nat hook prerouting priority dstnat; policy accept;");
    for inst in f.instances.iter().filter(|i| is_local(i, opts)) {
        for s in &f.service {
            if let Some(target) = dnat_target(inst.listen, *s) {
                let (nfproto, family) = match s.ip() {
                    IpAddr::V4(_) => ("ipv4", "ip"),
                    IpAddr::V6(_) => ("ipv6", "ip6"),
                };
                line!(
                    "        meta nfproto {nfproto} meta mark {:#010x} meta l4proto {{ tcp, udp }} dnat {family} to {target}",
                    mark(inst.id)
                );
            }
        }
    }
    line!("    }}");
    line!("}}");
    Ok(out)
}

/// Where DNAT sends a packet for `service` to a member listening on `listen`: the listen address if
/// it has the service's family, else the service address itself with the member's port.
fn dnat_target(listen: SocketAddr, service: SocketAddr) -> Option<String> {
    let ip = if listen.ip().is_unspecified() || listen.is_ipv4() != service.is_ipv4() {
        if listen.ip().is_unspecified() || listen.is_ipv6() {
            service.ip()
        } else {
            // An IPv4-only member cannot take IPv6 service packets.
            return None;
        }
    } else {
        listen.ip()
    };
    Some(SocketAddr::new(ip, listen.port()).to_string())
}

/// The `ip` commands (argument lists) that route members on other hosts: one rule per mark, one
/// route per service address of the host address's family. Empty for a single-host fleet.
pub fn routes(cfg: &FleetConfig, opts: &Options) -> Vec<Vec<String>> {
    let f = &cfg.fleet;
    let mut cmds = Vec::new();
    for inst in f.instances.iter().filter(|i| !is_local(i, opts)) {
        let Some(host_addr) = inst.host.as_ref().and_then(|h| f.hosts.get(h)) else {
            continue;
        };
        let m = mark(inst.id).to_string();
        let family = if host_addr.is_ipv4() { "-4" } else { "-6" };
        cmds.push(
            [
                family, "rule", "add", "fwmark", &m, "lookup", &m, "priority",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([RULE_PRIORITY.to_string()])
            .collect(),
        );
        for s in f
            .service
            .iter()
            .filter(|s| s.is_ipv4() == host_addr.is_ipv4())
        {
            cmds.push(
                [
                    family,
                    "route",
                    "replace",
                    &s.ip().to_string(),
                    "via",
                    &host_addr.to_string(),
                    "table",
                    &m,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            );
        }
    }
    cmds
}

/// The fleet marks of the policy-routing rules in `ip -j rule show priority RULE_PRIORITY`
/// output (one family). Rules at that priority with another mark are the operator's, not ours.
pub fn installed_rule_marks(ip_json: &str) -> Result<Vec<u32>, String> {
    #[derive(serde::Deserialize)]
    struct Rule {
        priority: Option<u32>,
        fwmark: Option<String>,
    }
    if ip_json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let rules: Vec<Rule> = serde_json::from_str(ip_json)
        .map_err(|e| format!("unexpected `ip -j rule` output: {e}"))?;
    Ok(rules
        .into_iter()
        .filter(|r| r.priority == Some(RULE_PRIORITY))
        .filter_map(|r| {
            let hex = r.fwmark?;
            u32::from_str_radix(hex.trim_start_matches("0x"), 16).ok()
        })
        .filter(|m| (MARK_BASE..=MARK_BASE + MAX_MARKED_ID).contains(m))
        .collect())
}

/// The marks whose rules `routes` would install for `family` (`-4` or `-6`).
pub fn wanted_rule_marks(routes: &[Vec<String>], family: &str) -> Vec<u32> {
    routes
        .iter()
        .filter(|c| c.first().map(String::as_str) == Some(family))
        .filter(|c| c.get(1).map(String::as_str) == Some("rule"))
        .filter_map(|c| c.get(4).and_then(|m| m.parse().ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::THREE;

    fn three() -> FleetConfig {
        FleetConfig::from_toml(THREE).unwrap()
    }

    #[test]
    fn short_and_long_headers_are_steered_by_the_server_id_octet() {
        let r = ruleset(&three(), &Options::default()).unwrap();
        let sids = "{ 0x01 : 0x0cf00001, 0x02 : 0x0cf00002, 0x03 : 0x0cf00003 }";
        assert!(
            r.contains(&format!(
                "@th,64,1 0 @th,72,3 0 meta mark set @th,80,8 map {sids}"
            )),
            "{r}"
        );
        // CID length 1 + 1 + 8 = 10.
        assert!(
            r.contains(&format!(
                "@th,64,1 1 @th,104,8 10 @th,112,3 0 meta mark set @th,120,8 map {sids}"
            )),
            "{r}"
        );
        assert!(
            r.contains("ip daddr 192.0.2.10 udp dport 443 jump quic"),
            "{r}"
        );
        assert!(
            r.contains("meta mark 0x0cf00002 meta l4proto { tcp, udp } dnat ip to 192.0.2.10:4432"),
            "{r}"
        );
        assert!(routes(&three(), &Options::default()).is_empty());
    }

    #[test]
    fn draining_members_keep_their_server_id_but_get_no_new_initials() {
        let opts = Options {
            drain: vec![2],
            ..Options::default()
        };
        let r = ruleset(&three(), &opts).unwrap();
        assert!(r.contains("map { 0x01 : 0x0cf00001, 0x02 : 0x0cf00002, 0x03 : 0x0cf00003 }"));
        assert!(
            r.contains("jhash @th,112,64 mod 2 map { 0 : 0x0cf00001, 1 : 0x0cf00003 }"),
            "{r}"
        );
        assert!(r.contains("3 (mark 0x0cf00003, DNAT 192.0.2.10:4433)"));
        assert!(r.contains("2 (mark 0x0cf00002, DNAT 192.0.2.10:4432, draining)"));
        let all = Options {
            drain: vec![1, 2, 3],
            ..Options::default()
        };
        assert!(ruleset(&three(), &all).is_err(), "draining everyone");
        let unknown = Options {
            drain: vec![9],
            ..Options::default()
        };
        assert!(ruleset(&three(), &unknown)
            .unwrap_err()
            .to_string()
            .contains("--drain"));
    }

    #[test]
    fn encrypted_cids_are_refused_with_a_pointer_to_a_decrypting_balancer() {
        let f = FleetConfig::from_toml(
            &THREE.replace("nonce_len = 8", "nonce_len = 8\nkey_file = \"lb.key\""),
        )
        .unwrap();
        let e = ruleset(&f, &Options::default()).unwrap_err().to_string();
        assert!(e.contains("key_file") && e.contains("plaintext"), "{e}");
    }

    #[test]
    fn two_octet_server_ids_match_sixteen_bits() {
        let f = FleetConfig::from_toml(&THREE.replace("server_id_len = 1", "server_id_len = 2"))
            .unwrap();
        let r = ruleset(&f, &Options::default()).unwrap();
        assert!(r.contains("@th,80,16 map { 0x0001 : 0x0cf00001"), "{r}");
        assert!(r.contains("@th,104,8 11 "), "CID length 1 + 2 + 8: {r}");
    }

    const MULTI_HOST: &str = r#"
[fleet]
service = ["192.0.2.10:443", "[2001:db8::10]:443"]
[fleet.quic_lb]
[fleet.hosts]
a = "10.1.0.2"
b = "10.2.0.2"
[[fleet.instance]]
id = 1
listen = "0.0.0.0:443"
host = "a"
[[fleet.instance]]
id = 17
listen = "192.0.2.10:443"
host = "b"
"#;

    #[test]
    fn members_on_other_hosts_are_reached_by_policy_routing() {
        let f = FleetConfig::from_toml(MULTI_HOST).unwrap();
        let on_a = Options {
            this_host: Some("a".into()),
            ..Options::default()
        };
        let r = ruleset(&f, &on_a).unwrap();
        assert!(
            r.contains("ip6 daddr 2001:db8::10 udp dport 443 jump quic"),
            "{r}"
        );
        assert!(r.contains("17 (mark 0x0cf00011, host b)"), "{r}");
        // Member 1 is local (DNAT to the service address itself, both families); 17 is not.
        assert!(
            r.contains("meta mark 0x0cf00001 meta l4proto { tcp, udp } dnat ip to 192.0.2.10:443")
        );
        assert!(r.contains("dnat ip6 to [2001:db8::10]:443"));
        assert!(!r.contains("meta mark 0x0cf00011 meta l4proto"));
        let cmds: Vec<String> = routes(&f, &on_a).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "-4 rule add fwmark 217055249 lookup 217055249 priority 3300",
                "-4 route replace 192.0.2.10 via 10.2.0.2 table 217055249",
            ]
        );
        // A remote member must listen where the unchanged packets arrive.
        let bad = FleetConfig::from_toml(&MULTI_HOST.replace(
            "192.0.2.10:443\"\nhost = \"b\"",
            "192.0.2.99:443\"\nhost = \"b\"",
        ))
        .unwrap();
        assert!(ruleset(&bad, &on_a).is_err());
        assert!(ruleset(
            &f,
            &Options {
                this_host: Some("c".into()),
                ..Options::default()
            }
        )
        .is_err());
    }

    /// `nft -c` parses and checks the rendered rules against the kernel (in a scratch netns, so
    /// nothing is loaded). Requires root and nftables, like the other netns tests: it fails, never
    /// skips, without them.
    #[test]
    fn rendered_rulesets_pass_nft_check() {
        let ns = format!("cfr-nftc-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .expect("iproute2 is required");
        assert!(ok.success(), "cannot create netns {ns} (needs root)");
        let multi = FleetConfig::from_toml(MULTI_HOST).unwrap();
        let cases = [
            ruleset(&three(), &Options::default()).unwrap(),
            ruleset(
                &three(),
                &Options {
                    drain: vec![1],
                    ..Options::default()
                },
            )
            .unwrap(),
            ruleset(
                &multi,
                &Options {
                    this_host: Some("a".into()),
                    ..Options::default()
                },
            )
            .unwrap(),
        ];
        let mut failures = Vec::new();
        for rules in &cases {
            let mut child = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "nft", "-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("nft (Debian package nftables) is required; interop/setup.sh installs it");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            if !out.status.success() {
                failures.push(format!("{}\n{rules}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        assert!(failures.is_empty(), "nft -c rejected: {failures:#?}");
    }

    #[test]
    fn installed_rule_marks_keeps_only_fleet_marks_at_our_priority() {
        let json = r#"[{"priority":3300,"src":"all","fwmark":"0xcf00001","table":"217055233"},
            {"priority":3300,"src":"all","fwmark":"0x1","table":"100"},
            {"priority":3300,"src":"all","table":"main"},
            {"priority":3301,"src":"all","fwmark":"0xcf00002","table":"217055234"}]"#;
        assert_eq!(installed_rule_marks(json).unwrap(), vec![mark(1)]);
        assert_eq!(installed_rule_marks("").unwrap(), Vec::<u32>::new());
        assert!(installed_rule_marks("not json").is_err());
    }

    #[test]
    fn wanted_rule_marks_are_the_rules_routes_installs() {
        let f = FleetConfig::from_toml(MULTI_HOST).unwrap();
        let on_a = Options {
            this_host: Some("a".into()),
            ..Options::default()
        };
        let cmds = routes(&f, &on_a);
        assert_eq!(wanted_rule_marks(&cmds, "-4"), vec![mark(17)]);
        assert_eq!(wanted_rule_marks(&cmds, "-6"), Vec::<u32>::new());
    }
}
