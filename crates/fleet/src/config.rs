//! The fleet file: typed once, validated once, and turned into each member's relay configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use cfr_relay::config::{EgressPolicy, QuicLbConfig, RelayConfig, ServerId};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::prefix::subprefix;

/// The whole fleet file: the fleet's own settings and the relay settings every member shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub fleet: FleetSection,
    /// Settings shared by every member (certificate, auth, policy, limits, egress policy, ...), with
    /// the keys of `cfr relay --config`. `listen`, `metrics`, `egress.prefixes` and
    /// `egress.epoch_secret_file` come from the `[fleet]` section instead.
    #[serde(default)]
    pub relay: RelayConfig,
}

/// `[fleet]`: what makes the members one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// Addresses clients connect to (UDP for HTTP/3, TCP with the same port for the TLS front-end);
    /// the balancer steers packets sent to them.
    pub service: Vec<SocketAddr>,
    /// File with the fleet secret (≥ 32 bytes, e.g. `openssl rand -hex 32`) keying the egress epochs;
    /// required with `relay.egress.policy = "epoch"`. Never logged.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Member ids that take no new connections (their own connections keep reaching them).
    #[serde(default)]
    pub draining: Vec<u32>,
    pub quic_lb: FleetQuicLb,
    /// The fleet's egress prefixes, each split into one sub-prefix per member id.
    #[serde(default)]
    pub egress: Vec<FleetEgress>,
    /// Other hosts by name → the address the balancer routes their members' packets to.
    #[serde(default)]
    pub hosts: BTreeMap<String, IpAddr>,
    /// The members.
    #[serde(rename = "instance")]
    pub instances: Vec<Instance>,
}

/// `[fleet.quic_lb]`: the QUIC-LB connection-ID configuration every member issues CIDs under
/// (draft-ietf-quic-load-balancers-21 §3). A member's server ID is its id, big-endian in
/// `server_id_len` octets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetQuicLb {
    /// Config rotation codepoint, 0..=6 (7 marks unroutable CIDs).
    pub config_rotation: u8,
    /// Octets of server ID after the first CID octet.
    pub server_id_len: u8,
    /// Octets of nonce after the server ID (≥ 4).
    pub nonce_len: u8,
    /// AES-128 key (32 hex digits) for the encrypted modes. Absent: plaintext CIDs, the only mode an
    /// nftables balancer can route.
    pub key_file: Option<PathBuf>,
}

impl Default for FleetQuicLb {
    fn default() -> Self {
        Self {
            config_rotation: 0,
            server_id_len: 1,
            nonce_len: 8,
            key_file: None,
        }
    }
}

impl FleetQuicLb {
    /// Octets of a whole CID: first octet, server ID, nonce.
    pub fn cid_len(&self) -> usize {
        1 + usize::from(self.server_id_len) + usize::from(self.nonce_len)
    }
}

/// `[[fleet.egress]]`: one fleet prefix and how it is split between members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEgress {
    pub prefix: IpNet,
    /// Length of each member's share: member `id` gets the `id`-th sub-prefix of this length
    /// (e.g. a /64 into /68s: ids 0..=15).
    pub instance_prefix_len: u8,
}

/// `[[fleet.instance]]`: one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// The member's id: its QUIC-LB server ID and the index of its egress sub-prefixes.
    pub id: u32,
    /// Where the member listens (UDP, and TCP for the TLS front-end).
    pub listen: SocketAddr,
    /// Name of the host (a key of `[fleet.hosts]`) running it; absent: the balancer's own host.
    #[serde(default)]
    pub host: Option<String>,
    /// The member's Prometheus endpoint.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// A fleet file problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> FleetError {
    FleetError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// One member's view of the fleet: what `cfr relay --fleet FILE --instance ID` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: u32,
    /// The QUIC-LB server ID this member puts in every CID it issues.
    pub server_id: Vec<u8>,
    /// Its relay configuration: the shared one with this member's listen address, metrics endpoint,
    /// egress sub-prefixes and the fleet secret.
    pub relay: RelayConfig,
}

impl FleetConfig {
    /// Reads and validates a fleet file.
    pub fn from_file(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: FleetConfig = toml::from_str(&text).map_err(|e| FleetError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, FleetError> {
        let cfg: FleetConfig = toml::from_str(text).map_err(|e| FleetError::Parse {
            path: PathBuf::from("<fleet>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Whether `text` looks like a fleet file (has a `[fleet]` table), for `cfr check-config`.
    pub fn is_fleet_toml(text: &str) -> bool {
        toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("fleet"))
    }

    /// Checks every cross-member rule, then each member's derived relay configuration.
    pub fn validate(&self) -> Result<(), FleetError> {
        let f = &self.fleet;
        if f.service.is_empty() {
            return Err(invalid("fleet.service", "at least one service address"));
        }
        if let Some(s) = f.service.iter().find(|s| s.port() == 0) {
            return Err(invalid("fleet.service", format!("{s}: port 0")));
        }
        let lb = &f.quic_lb;
        if lb.config_rotation > 6 {
            return Err(invalid(
                "fleet.quic_lb.config_rotation",
                "must be 0..=6 (7 marks unroutable CIDs)",
            ));
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
        //# The nonce length MUST be at least 4 octets. The server ID length MUST be at
        //# least 1 octet.
        // (At most 4 here: member ids are u32 and the balancer matches them in one nftables key.)
        if lb.server_id_len == 0 || lb.server_id_len > 4 {
            return Err(invalid(
                "fleet.quic_lb.server_id_len",
                "must be 1..=4 octets",
            ));
        }
        if lb.nonce_len < 4 {
            return Err(invalid("fleet.quic_lb.nonce_len", "must be at least 4"));
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
        //# As QUIC version 1 limits connection IDs to 20 octets, the server ID and nonce
        //# lengths MUST sum to 19 octets or less.
        if lb.cid_len() > 20 {
            return Err(invalid(
                "fleet.quic_lb.nonce_len",
                format!(
                    "a CID of 1 + {} + {} octets exceeds QUIC's 20",
                    lb.server_id_len, lb.nonce_len
                ),
            ));
        }
        if f.instances.is_empty() {
            return Err(invalid("fleet.instance", "at least one [[fleet.instance]]"));
        }
        let id_space = 1u64 << (8 * u32::from(lb.server_id_len));
        let mut ids = BTreeSet::new();
        let mut listens = BTreeSet::new();
        for inst in &f.instances {
            if u64::from(inst.id) >= id_space {
                return Err(invalid(
                    "fleet.instance.id",
                    format!(
                        "{} is outside the server-ID space of {} octet(s) (0..={})",
                        inst.id,
                        lb.server_id_len,
                        id_space - 1
                    ),
                ));
            }
            if !ids.insert(inst.id) {
                return Err(invalid(
                    "fleet.instance.id",
                    format!("{} appears twice", inst.id),
                ));
            }
            if let Some(h) = &inst.host {
                if !f.hosts.contains_key(h) {
                    return Err(invalid(
                        "fleet.instance.host",
                        format!("instance {}: host {h:?} is not in [fleet.hosts]", inst.id),
                    ));
                }
            }
            if !listens.insert((inst.host.clone(), inst.listen)) {
                return Err(invalid(
                    "fleet.instance.listen",
                    format!("{} is used by two instances on one host", inst.listen),
                ));
            }
        }
        if let Some(d) = f.draining.iter().find(|d| !ids.contains(d)) {
            return Err(invalid(
                "fleet.draining",
                format!("{d} is not an instance id"),
            ));
        }
        if f.draining.len() >= ids.len() && ids.iter().all(|i| f.draining.contains(i)) {
            return Err(invalid(
                "fleet.draining",
                "every instance is draining: nobody would take new connections",
            ));
        }
        self.validate_egress(&ids)?;
        self.validate_pvd()?;
        if !self.relay.egress.prefixes.is_empty() {
            return Err(invalid(
                "relay.egress.prefixes",
                "a member's egress prefixes are its shares of [[fleet.egress]]; leave this empty",
            ));
        }
        if self.relay.quic_lb.is_some() {
            return Err(invalid(
                "relay.quic_lb",
                "a member's QUIC-LB settings come from [fleet.quic_lb] and its id; leave this out",
            ));
        }
        if self.relay.egress.epoch_secret_file.is_some() {
            return Err(invalid(
                "relay.egress.epoch_secret_file",
                "set fleet.secret_file instead",
            ));
        }
        if self.relay.egress.policy == EgressPolicy::Epoch && f.secret_file.is_none() {
            return Err(invalid(
                "fleet.secret_file",
                "required with relay.egress.policy = \"epoch\": it keys every member's epochs",
            ));
        }
        for inst in &f.instances {
            let member = self.member_unchecked(inst);
            member.relay.validate().map_err(|e| {
                invalid(
                    format!("fleet.instance (id {})", inst.id),
                    format!("its relay configuration: {e}"),
                )
            })?;
        }
        Ok(())
    }

    /// The fleet publishes one PvD for the service (see [`FleetConfig::member`]): its identifier
    /// must lead clients to the service, and its port must be the service's.
    fn validate_pvd(&self) -> Result<(), FleetError> {
        let pvd = &self.relay.pvd;
        let Some(identifier) = &pvd.identifier else {
            return Ok(());
        };
        let host = identifier.strip_suffix('.').unwrap_or(identifier);
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            if !self.fleet.service.iter().any(|s| s.ip() == ip) {
                return Err(invalid(
                    "relay.pvd.identifier",
                    format!(
                        "{ip} is not a fleet.service address: clients must reach the service, not one member"
                    ),
                ));
            }
        }
        if pvd.port.is_none() && self.service_port().is_none() {
            return Err(invalid(
                "relay.pvd.port",
                "the fleet.service addresses use different ports: say which one the PvD publishes",
            ));
        }
        Ok(())
    }

    /// The port every `fleet.service` address uses, if they agree.
    pub fn service_port(&self) -> Option<u16> {
        let first = self.fleet.service.first()?.port();
        self.fleet
            .service
            .iter()
            .all(|s| s.port() == first)
            .then_some(first)
    }

    fn validate_egress(&self, ids: &BTreeSet<u32>) -> Result<(), FleetError> {
        let egress = &self.fleet.egress;
        for (i, e) in egress.iter().enumerate() {
            if e.prefix.trunc() != e.prefix {
                return Err(invalid(
                    "fleet.egress.prefix",
                    format!(
                        "{} has host bits set; did you mean {}?",
                        e.prefix,
                        e.prefix.trunc()
                    ),
                ));
            }
            if let Some(other) = egress[..i]
                .iter()
                .find(|o| o.prefix.contains(&e.prefix) || e.prefix.contains(&o.prefix))
            {
                return Err(invalid(
                    "fleet.egress.prefix",
                    format!("{} and {} overlap", other.prefix, e.prefix),
                ));
            }
            for id in ids {
                subprefix(e.prefix, e.instance_prefix_len, u64::from(*id)).map_err(|m| {
                    invalid(
                        "fleet.egress.instance_prefix_len",
                        format!("{} for instance {id}: {m}", e.prefix),
                    )
                })?;
            }
        }
        // Disjoint by construction; checked anyway because it is the fleet's core promise.
        let shares: Vec<(u32, IpNet)> = ids
            .iter()
            .flat_map(|id| self.egress_shares(*id).into_iter().map(move |n| (*id, n)))
            .collect();
        for (i, (a_id, a)) in shares.iter().enumerate() {
            if let Some((b_id, b)) = shares[i + 1..]
                .iter()
                .find(|(b_id, b)| b_id != a_id && (a.contains(b) || b.contains(a)))
            {
                return Err(invalid(
                    "fleet.egress",
                    format!("instance {a_id}'s {a} overlaps instance {b_id}'s {b}"),
                ));
            }
        }
        Ok(())
    }

    /// Member `id`'s egress sub-prefixes (one per `[[fleet.egress]]`).
    pub fn egress_shares(&self, id: u32) -> Vec<IpNet> {
        self.fleet
            .egress
            .iter()
            .filter_map(|e| subprefix(e.prefix, e.instance_prefix_len, u64::from(id)).ok())
            .collect()
    }

    /// The QUIC-LB server ID of member `id`: the id, big-endian, in `server_id_len` octets.
    pub fn server_id(&self, id: u32) -> Vec<u8> {
        let len = usize::from(self.fleet.quic_lb.server_id_len);
        id.to_be_bytes()[4 - len..].to_vec()
    }

    /// The instance with this id.
    pub fn instance(&self, id: u32) -> Option<&Instance> {
        self.fleet.instances.iter().find(|i| i.id == id)
    }

    /// Member `id`'s view of the fleet. The fleet has been validated, so its relay config is too.
    pub fn member(&self, id: u32) -> Result<Member, FleetError> {
        let inst = self.instance(id).ok_or_else(|| {
            invalid(
                "--instance",
                format!(
                    "{id} is not in the fleet (ids: {:?})",
                    self.fleet
                        .instances
                        .iter()
                        .map(|i| i.id)
                        .collect::<Vec<_>>()
                ),
            )
        })?;
        Ok(self.member_unchecked(inst))
    }

    fn member_unchecked(&self, inst: &Instance) -> Member {
        let mut relay = self.relay.clone();
        relay.listen = inst.listen;
        relay.metrics = inst.metrics;
        relay.egress.prefixes = self.egress_shares(inst.id);
        relay.egress.epoch_secret_file = self.fleet.secret_file.clone();
        // Sealed egress addresses (egress.sealing) name the member that sealed them.
        relay.egress.instance_id = inst.id;
        // Every member publishes the same PvD: the fleet is one service with one name, so its
        // proxies are `relay.pvd.identifier` at the service port the balancer steers — never a
        // member's own listen address (private, and a draining or removed member would stay
        // advertised for a whole PvD lifetime). Same identifier, proxies and wall-clock `expires`
        // schedule: byte-identical documents from every member.
        if relay.pvd.port.is_none() {
            relay.pvd.port = self.service_port();
        }
        let server_id = self.server_id(inst.id);
        let lb = &self.fleet.quic_lb;
        relay.quic_lb = ServerId::new(&server_id)
            .ok()
            .map(|server_id| QuicLbConfig {
                config_rotation: lb.config_rotation,
                server_id,
                nonce_len: usize::from(lb.nonce_len),
                key_file: lb.key_file.clone(),
                // The first octet's low bits carry the length (draft §3.3), which the balancer's
                // long-header rule matches on.
                length_self_encoding: true,
            });
        Member {
            id: inst.id,
            server_id,
            relay,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Three members on one host, a /64 split into /68s.
    pub(crate) const THREE: &str = r#"
[fleet]
service = ["192.0.2.10:443"]
[fleet.quic_lb]
server_id_len = 1
nonce_len = 8
[[fleet.egress]]
prefix = "2001:db8:cf::/64"
instance_prefix_len = 68
[[fleet.instance]]
id = 1
listen = "192.0.2.10:4431"
[[fleet.instance]]
id = 2
listen = "192.0.2.10:4432"
[[fleet.instance]]
id = 3
listen = "192.0.2.10:4433"
"#;

    fn err(text: &str) -> String {
        FleetConfig::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn members_get_their_listen_address_server_id_and_disjoint_share() {
        let f = FleetConfig::from_toml(THREE).unwrap();
        let m2 = f.member(2).unwrap();
        assert_eq!(m2.server_id, [2]);
        let lb = m2
            .relay
            .quic_lb
            .as_ref()
            .expect("members issue QUIC-LB CIDs");
        assert_eq!(lb.server_id.as_bytes(), [2]);
        assert_eq!((lb.config_rotation, lb.nonce_len), (0, 8));
        assert_eq!(m2.relay.listen, "192.0.2.10:4432".parse().unwrap());
        assert_eq!(
            m2.relay.egress.instance_id, 2,
            "the sealing tweak names the member"
        );
        assert_eq!(
            m2.relay.egress.prefixes,
            ["2001:db8:cf:0:2000::/68".parse::<IpNet>().unwrap()]
        );
        let shares: Vec<_> = [1, 2, 3]
            .map(|i| f.member(i).unwrap().relay.egress.prefixes[0])
            .to_vec();
        for (i, a) in shares.iter().enumerate() {
            for b in &shares[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
        assert!(f.member(4).unwrap_err().to_string().contains("--instance"));
        // The fleet round-trips through its rendering.
        assert_eq!(FleetConfig::from_toml(&f.to_toml()).unwrap(), f);
        assert!(FleetConfig::is_fleet_toml(THREE));
        assert!(!FleetConfig::is_fleet_toml("listen = \"[::]:443\"\n"));
    }

    #[test]
    fn two_octet_server_ids_are_big_endian() {
        let f = FleetConfig::from_toml(&THREE.replace("server_id_len = 1", "server_id_len = 2"))
            .unwrap();
        assert_eq!(f.server_id(3), [0, 3]);
    }

    #[test]
    fn ids_out_of_range_name_the_key() {
        let e = err(&THREE.replace("id = 3", "id = 16"));
        assert!(e.contains("fleet.egress.instance_prefix_len"), "{e}");
        let e = err(&THREE
            .replace("id = 3", "id = 256")
            .replace("instance_prefix_len = 68", "instance_prefix_len = 80"));
        assert!(
            e.contains("fleet.instance.id") && e.contains("server-ID space"),
            "{e}"
        );
        let e = err(&THREE.replace("id = 3", "id = 2"));
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn overlapping_egress_prefixes_are_rejected() {
        let overlapping = THREE.replace(
            "[[fleet.instance]]\nid = 1",
            "[[fleet.egress]]\nprefix = \"2001:db8:cf:0:1000::/68\"\ninstance_prefix_len = 70\n[[fleet.instance]]\nid = 1",
        );
        let e = err(&overlapping);
        assert!(
            e.contains("fleet.egress.prefix") && e.contains("overlap"),
            "{e}"
        );
        let e = err(&THREE.replace("2001:db8:cf::/64", "2001:db8:cf::1/64"));
        assert!(e.contains("host bits"), "{e}");
    }

    #[test]
    fn shared_relay_keys_owned_by_the_fleet_are_rejected() {
        let e = err(&format!(
            "{THREE}\n[relay.egress]\nprefixes = [\"2001:db8::/64\"]\n"
        ));
        assert!(e.contains("relay.egress.prefixes"), "{e}");
        let e = err(&format!(
            "{THREE}\n[relay.quic_lb]\nconfig_rotation = 1\nserver_id = \"01\"\nnonce_len = 8\n"
        ));
        assert!(e.contains("relay.quic_lb"), "{e}");
        let e = err(&format!("{THREE}\n[relay.egress]\npolicy = \"epoch\"\n"));
        assert!(e.contains("fleet.secret_file"), "{e}");
        let e = err(&THREE.replace("[fleet.quic_lb]", "[fleet.quic_lb]\nconfig_rotation = 7"));
        assert!(e.contains("config_rotation"), "{e}");
        let e = err(&THREE.replace("nonce_len = 8", "nonce_len = 3"));
        assert!(e.contains("nonce_len"), "{e}");
        let e = err(&THREE.replace("nonce_len = 8", "nonce_len = 19"));
        assert!(e.contains("20"), "{e}");
        let e = err(&THREE.replace("[fleet.quic_lb]", "draining = [1, 2, 3]\n[fleet.quic_lb]"));
        assert!(e.contains("fleet.draining"), "{e}");
        let e = err(&THREE.replace("id = 3\n", "id = 3\nhost = \"b\"\n"));
        assert!(e.contains("fleet.instance.host"), "{e}");
        let e = err(&THREE.replace("service = [", "servic = ["));
        assert!(e.contains("servic"), "{e}");
    }

    #[test]
    fn every_member_publishes_the_same_pvd_listing_the_service() {
        use cfr_relay::pvd::PvdPublisher;
        let text = format!(
            "{THREE}\n[relay.pvd]\nidentifier = \"relay.example.net\"\nexpires_secs = 7200\n"
        );
        let f = FleetConfig::from_toml(&text).unwrap();
        let now = std::time::SystemTime::now();
        let served = |id: u32| {
            let relay = f.member(id).unwrap().relay;
            // What `cfr relay` does with the ports it bound (UDP and TCP share the listen port).
            let port = relay.listen.port();
            let publisher = PvdPublisher::new(&relay, port, Some(port))
                .unwrap()
                .unwrap();
            publisher.current(now)
        };
        let (one, expires) = served(1);
        assert_eq!(served(2), (one.clone(), expires));
        assert_eq!(served(3).0, one);
        let body = std::str::from_utf8(&one).unwrap();
        let compact: String = body.split_whitespace().collect();
        assert!(
            compact.contains(r#""proxy":"relay.example.net:443""#)
                && compact
                    .contains(r#""proxy":"https://relay.example.net:443/.well-known/masque/udp/"#),
            "{body}"
        );
        for member in ["4431", "4432", "4433", "192.0.2.10"] {
            assert!(
                !body.contains(member),
                "a member address is published: {body}"
            );
        }
        // An explicit port (a port mapping in front of the balancer) is kept.
        let mapped = text.replace("expires_secs", "port = 8443\nexpires_secs");
        let f = FleetConfig::from_toml(&mapped).unwrap();
        assert_eq!(f.member(2).unwrap().relay.pvd.port, Some(8443));
    }

    #[test]
    fn a_pvd_that_would_not_lead_to_the_service_is_rejected() {
        let e = err(&format!(
            "{THREE}\n[relay.pvd]\nidentifier = \"192.0.2.11\"\n"
        ));
        assert!(e.contains("relay.pvd.identifier"), "{e}");
        assert!(FleetConfig::from_toml(&format!(
            "{THREE}\n[relay.pvd]\nidentifier = \"192.0.2.10\"\n"
        ))
        .is_ok());
        let two_ports = THREE.replace(
            r#"service = ["192.0.2.10:443"]"#,
            r#"service = ["192.0.2.10:443", "[2001:db8::10]:8443"]"#,
        );
        let e = err(&format!(
            "{two_ports}\n[relay.pvd]\nidentifier = \"relay.example.net\"\n"
        ));
        assert!(e.contains("relay.pvd.port"), "{e}");
        assert!(FleetConfig::from_toml(&format!(
            "{two_ports}\n[relay.pvd]\nidentifier = \"relay.example.net\"\nport = 443\n"
        ))
        .is_ok());
        // Without a PvD the service ports may differ.
        assert!(FleetConfig::from_toml(&two_ports).is_ok());
    }

    #[test]
    fn the_secret_file_reaches_every_member_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("fleet.secret");
        let text = THREE.replace(
            "[fleet.quic_lb]",
            &format!(
                "secret_file = {:?}\n[fleet.quic_lb]",
                secret.display().to_string()
            ),
        ) + "\n[relay.egress]\npolicy = \"epoch\"\n";
        let e = err(&text);
        assert!(
            e.contains("epoch_secret_file"),
            "a missing secret file is an error: {e}"
        );
        std::fs::write(&secret, "x".repeat(64)).unwrap();
        let f = FleetConfig::from_toml(&text).unwrap();
        for id in [1, 2, 3] {
            assert_eq!(
                f.member(id)
                    .unwrap()
                    .relay
                    .egress
                    .epoch_secret_file
                    .as_deref(),
                Some(secret.as_path())
            );
        }
    }
}
