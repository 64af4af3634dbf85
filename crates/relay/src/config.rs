//! Relay configuration: one typed struct, deserialised with unknown keys rejected and validated
//! once at start-up. Nothing else in the relay parses configuration strings.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod values;

pub use cfr_egress::{EgressConfig, EgressPolicy, Fallback};
pub use cfr_quic_lb::{CidEncoder, LbConfig, ServerId};
pub use values::{PortRange, TokenHash};

/// Everything `cfr relay` can be told, as read from `--config FILE` (TOML) and flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// UDP address of the HTTP/3 listener.
    pub listen: SocketAddr,
    /// TCP address of the TLS fallback listener (HTTP/2 and HTTP/1.1 CONNECT, connect-udp with
    /// capsules). Absent: the address of `listen` with the port the QUIC socket actually bound
    /// (so `listen = "[::]:0"` gets one port number for both). Ignored when `tcp_enabled = false`.
    pub listen_tcp: Option<SocketAddr>,
    /// Serve the TLS/TCP fallback front-end at all (`false`: HTTP/3 only).
    pub tcp_enabled: bool,
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Directory where `cfr relay` creates a dev CA, certificate and token when they are missing.
    pub state_dir: PathBuf,
    /// Seconds open tunnels get to finish after SIGTERM/SIGINT before the relay closes them.
    pub drain_secs: u64,
    /// Prometheus scrape endpoint (`/metrics`); off when absent.
    pub metrics: Option<SocketAddr>,
    pub auth: AuthConfig,
    pub policy: PolicyConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub resolver: ResolverConfig,
    pub egress: EgressConfig,
    /// QUIC-LB routable connection IDs; absent: random connection IDs.
    pub quic_lb: Option<QuicLbConfig>,
    /// Path URI template (RFC 9298 §2) at which CONNECT-UDP is accepted and which the PvD
    /// publishes.
    pub connect_udp_template: String,
    pub pvd: PvdConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: "[::]:4433".parse().expect("static address"),
            listen_tcp: None,
            tcp_enabled: true,
            cert: PathBuf::from("certs/server.pem"),
            key: PathBuf::from("certs/server.key"),
            state_dir: PathBuf::from("certs"),
            drain_secs: 30,
            metrics: None,
            auth: AuthConfig::default(),
            policy: PolicyConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            resolver: ResolverConfig::default(),
            egress: EgressConfig::default(),
            quic_lb: None,
            connect_udp_template: cfr_proto::target::DEFAULT_UDP_TEMPLATE.to_owned(),
            pvd: PvdConfig::default(),
        }
    }
}

/// Who may open tunnels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// SHA-256 (hex) of accepted bearer tokens.
    pub token_sha256: Vec<TokenHash>,
    /// File with one SHA-256 (hex) token hash per line (`#` comments allowed).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle: a client certificate chaining to it authenticates the connection (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Require both a client certificate and a token (only meaningful with `client_ca`).
    pub require_client_cert: bool,
    /// Accept every request unauthenticated. For tests and labs only.
    pub insecure_open_relay: bool,
    /// Operator-assigned subscriber handles, sealed into egress addresses (`egress.sealing`).
    pub subscribers: SubscribersConfig,
}

/// Subscriber handles per credential: never the credential itself, a number the operator's own
/// records map to a customer. A credential without a handle is sealed as anonymous (handle 0).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscribersConfig {
    /// SHA-256 of a bearer token → handle (≥ 1).
    pub tokens: BTreeMap<TokenHash, u32>,
    /// SHA-256 of a client certificate (DER, the leaf) → handle (≥ 1).
    pub client_certs: BTreeMap<TokenHash, u32>,
}

/// Which destinations may be dialled, on top of the built-in deny list of reserved ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Destinations allowed even if they fall in a reserved range (e.g. `127.0.0.0/8` in tests).
    pub allow: Vec<IpNet>,
    /// Destinations always refused (checked before `allow`).
    pub deny: Vec<IpNet>,
    /// Allowed destination ports: `"443"` or `"1-65535"` entries.
    pub ports: Vec<PortRange>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            ports: vec![PortRange::ALL],
        }
    }
}

/// Resource bounds. Every queue and table in the relay is bounded by one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent tunnels one client connection may hold.
    pub tunnels_per_connection: u32,
    /// Concurrent tunnels across the relay.
    pub total_tunnels: u32,
    /// Concurrent connections from one client IP address.
    pub connections_per_client: u32,
    /// Concurrent client connections across the relay.
    pub total_connections: u32,
    /// Bytes a TCP tunnel reads from one side before the other side has taken them.
    pub tcp_buffer_bytes: usize,
    /// DATAGRAM capsules queued per UDP tunnel towards the client before new ones are dropped.
    /// (Towards the destination nothing is queued beyond the socket's send buffer: client
    /// datagrams are sent as they are read off the connection.)
    pub datagram_queue: usize,
    /// Concurrent DNS lookups.
    pub dns_concurrency: u32,

    // Hostile-load hardening (issue 17).
    /// Largest request header section accepted on every front-end (HTTP/1.1 head bytes, HTTP/2
    /// header list, HTTP/3 field section); larger → 431 on that request only.
    pub max_request_head_bytes: usize,
    /// Leading bits of an IPv4 source address that name one client for
    /// `connections_per_client` and the handshake rate.
    pub client_prefix_v4: u8,
    /// Leading bits of an IPv6 source address that name one client (a host owns a /64).
    pub client_prefix_v6: u8,
    /// QUIC handshakes per second one client prefix may start (also the burst).
    pub handshakes_per_sec_per_client: u32,
    /// QUIC handshakes in progress relay-wide above which new connections from unvalidated
    /// addresses are asked to prove them with a Retry first.
    pub half_open_before_retry: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            tunnels_per_connection: 256,
            total_tunnels: 16_384,
            connections_per_client: 32,
            total_connections: 4_096,
            tcp_buffer_bytes: 64 * 1024,
            datagram_queue: 512,
            dns_concurrency: 64,
            max_request_head_bytes: 16 * 1024,
            client_prefix_v4: 32,
            client_prefix_v6: 64,
            handshakes_per_sec_per_client: 64,
            half_open_before_retry: 128,
        }
    }
}

/// Time bounds, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// QUIC/TLS handshake (for the TCP front-end: TLS plus the HTTP/2 preface).
    pub handshake_secs: u64,
    /// DNS resolution of a target name.
    pub dns_secs: u64,
    /// TCP connect to a destination (per address tried).
    pub connect_secs: u64,
    /// A TCP tunnel with no bytes in either direction for this long is closed.
    pub tcp_idle_secs: u64,
    /// A UDP tunnel with no datagram in either direction for this long is closed (RFC 9298 §3.1
    /// recommends at least two minutes).
    pub udp_idle_secs: u64,
    /// A client connection with no traffic at all for this long is closed (QUIC idle timeout).
    pub connection_idle_secs: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            handshake_secs: 10,
            dns_secs: 5,
            connect_secs: 10,
            tcp_idle_secs: 300,
            udp_idle_secs: 120,
            connection_idle_secs: 60,
        }
    }
}

/// Name resolution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// Static name → addresses entries consulted before the system resolver.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Use only `hosts`; names not listed there fail with `dns_error`.
    pub hosts_only: bool,
}

/// `[quic_lb]`: issue only connection IDs that a QUIC-LB load balancer
/// (draft-ietf-quic-load-balancers-21) with the same parameters routes to this instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicLbConfig {
    /// Config rotation codepoint, 0..=6 (0b111 marks unroutable CIDs).
    pub config_rotation: u8,
    /// This instance's server ID in hex; its length is the configuration's server-ID length.
    pub server_id: ServerId,
    /// Nonce octets (at least 4; server ID + nonce at most 19).
    pub nonce_len: usize,
    /// File holding the 16-octet AES-128 key in hex (mode 0600 or stricter). Absent: plaintext
    /// CIDs, whose server ID any on-path observer can read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Low five bits of the first octet carry the CID length (draft §3.3) rather than random bits.
    #[serde(default = "yes")]
    pub length_self_encoding: bool,
}

fn yes() -> bool {
    true
}

impl QuicLbConfig {
    /// The codec configuration without reading the key file: checks the lengths and codepoint.
    fn shape(&self, key: Option<[u8; 16]>) -> Result<LbConfig, ConfigError> {
        LbConfig::new(
            self.config_rotation,
            self.server_id.len(),
            self.nonce_len,
            key,
        )
        .map(|c| c.with_length_self_encoding(self.length_self_encoding))
        .map_err(|e| ConfigError::Invalid {
            key: "quic_lb",
            message: e.to_string(),
        })
    }

    /// This instance's connection ID encoder, with the key read from `key_file` (its
    /// [`config`](CidEncoder::config) is what a load balancer decodes with).
    pub fn load(&self) -> Result<CidEncoder, ConfigError> {
        let key = match &self.key_file {
            Some(path) => Some(read_lb_key(path)?),
            None => None,
        };
        let config = self.shape(key)?;
        CidEncoder::new(&config, self.server_id.as_bytes()).map_err(|e| ConfigError::Invalid {
            key: "quic_lb.server_id",
            message: e.to_string(),
        })
    }
}

/// Reads a hex AES-128 key from a file only its owner can read.
fn read_lb_key(path: &std::path::Path) -> Result<[u8; 16], ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let invalid = |message: String| ConfigError::Invalid {
        key: "quic_lb.key_file",
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "{} is readable by group or others; chmod 600 it",
            path.display()
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    // The key itself never goes into an error message.
    hex::decode(text.trim())
        .ok()
        .and_then(|k| <[u8; 16]>::try_from(k).ok())
        .ok_or_else(|| invalid(format!("{} must hold 32 hex digits", path.display())))
}

/// The Provisioning Domain this relay serves at `/.well-known/pvd`
/// (draft-ietf-intarea-proxy-config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PvdConfig {
    /// The host name clients use for this relay (the PvD `identifier`). Absent: no PvD is
    /// served and `GET /.well-known/pvd` is refused like any other plain GET.
    pub identifier: Option<String>,
    /// Port published for this relay's own proxies; absent: the port the QUIC listener bound.
    pub port: Option<u16>,
    /// Lifetime of a served PvD: its `expires` lies this far ahead (refreshed at half-life).
    pub expires_secs: u64,
    /// The operator's other proxies, listed after this relay's own connect-udp and
    /// https-connect entries.
    pub proxies: Vec<PvdProxyConfig>,
}

impl Default for PvdConfig {
    fn default() -> Self {
        Self {
            identifier: None,
            port: None,
            expires_secs: 3600,
            proxies: Vec::new(),
        }
    }
}

/// One `[[pvd.proxies]]` entry: a proxy dictionary as the draft defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvdProxyConfig {
    /// `connect-udp`, `https-connect`, `connect-tcp`, `connect-ip`, `http-connect`, `socks5`.
    pub protocol: String,
    /// A full `https://` URI template (connect-*) or `host:port` (the others).
    pub proxy: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Name for `proxy-match`; the relay lists every named proxy in one rule for all
    /// destinations, so clients may use them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("invalid value for `egress`: {0}")]
    Egress(#[source] cfr_egress::EgressError),
    #[error("cannot read `auth.token_file` {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RelayConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let cfg = Self::read_file(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a TOML file into typed values (token hashes, port ranges, CIDRs, addresses) without
    /// the [`validate`](Self::validate) rules, for callers that change it further before
    /// validating once (`cfr relay` applies its flags; `Relay::bind` validates).
    pub fn read_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg = Self::parse_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })
    }

    /// The effective configuration as TOML (what `cfr check-config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Checks ranges and cross-field rules; the error names the offending key. Syntax (token
    /// hashes, port ranges, CIDRs) was checked when the values were parsed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    message: "must be greater than 0".into(),
                });
            }
            Ok(())
        }
        let l = &self.limits;
        positive(
            "limits.tunnels_per_connection",
            l.tunnels_per_connection.into(),
        )?;
        positive("limits.total_tunnels", l.total_tunnels.into())?;
        positive(
            "limits.connections_per_client",
            l.connections_per_client.into(),
        )?;
        positive("limits.total_connections", l.total_connections.into())?;
        positive("limits.datagram_queue", l.datagram_queue as u64)?;
        positive("limits.dns_concurrency", l.dns_concurrency.into())?;
        if !(1024..=16 * 1024 * 1024).contains(&l.tcp_buffer_bytes) {
            return Err(ConfigError::Invalid {
                key: "limits.tcp_buffer_bytes",
                message: "must be between 1024 and 16777216".into(),
            });
        }
        if !(1024..=1024 * 1024).contains(&l.max_request_head_bytes) {
            return Err(ConfigError::Invalid {
                key: "limits.max_request_head_bytes",
                message: "must be between 1024 and 1048576".into(),
            });
        }
        if !(1..=32).contains(&l.client_prefix_v4) {
            return Err(ConfigError::Invalid {
                key: "limits.client_prefix_v4",
                message: "must be between 1 and 32".into(),
            });
        }
        if !(1..=128).contains(&l.client_prefix_v6) {
            return Err(ConfigError::Invalid {
                key: "limits.client_prefix_v6",
                message: "must be between 1 and 128".into(),
            });
        }
        positive(
            "limits.handshakes_per_sec_per_client",
            l.handshakes_per_sec_per_client.into(),
        )?;
        let t = &self.timeouts;
        positive("timeouts.handshake_secs", t.handshake_secs)?;
        positive("timeouts.dns_secs", t.dns_secs)?;
        positive("timeouts.connect_secs", t.connect_secs)?;
        positive("timeouts.tcp_idle_secs", t.tcp_idle_secs)?;
        positive("timeouts.udp_idle_secs", t.udp_idle_secs)?;
        positive("timeouts.connection_idle_secs", t.connection_idle_secs)?;
        for (key, map) in [
            ("auth.subscribers.tokens", &self.auth.subscribers.tokens),
            (
                "auth.subscribers.client_certs",
                &self.auth.subscribers.client_certs,
            ),
        ] {
            if map.values().any(|&handle| handle == 0) {
                return Err(ConfigError::Invalid {
                    key,
                    message: "handle 0 is reserved for anonymous tunnels; use 1 or more".into(),
                });
            }
        }
        if self.auth.require_client_cert && self.auth.client_ca.is_none() {
            return Err(ConfigError::Invalid {
                key: "auth.require_client_cert",
                message: "needs auth.client_ca".into(),
            });
        }
        self.egress.validate().map_err(ConfigError::Egress)?;
        if let Some(lb) = &self.quic_lb {
            lb.shape(None)?;
        }
        self.udp_template()?;
        crate::pvd::validate(&self.pvd)?;
        Ok(())
    }

    /// The parsed `connect_udp_template` (a path: the relay's origin is implied).
    pub fn udp_template(&self) -> Result<cfr_proto::UdpTemplate, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            key: "connect_udp_template",
            message,
        };
        let template = cfr_proto::UdpTemplate::parse(&self.connect_udp_template)
            .map_err(|e| invalid(e.to_string()))?;
        if template.origin().is_some() {
            return Err(invalid(
                "give the path only (e.g. /masque/udp/{target_host}/{target_port}/); the PvD adds https://IDENTIFIER:PORT".into(),
            ));
        }
        Ok(template)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.timeouts.handshake_secs)
    }
}

/// Fuzz property for the config loader (used by `fuzz/fuzz_targets/config_loader.rs` and the
/// corpus replay test): loading arbitrary bytes never panics, and a config that loads renders to
/// TOML that loads back to the same config.
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = RelayConfig::from_toml(text) else {
        return;
    };
    let rendered = cfg.to_toml();
    let again = RelayConfig::from_toml(&rendered).unwrap_or_else(|e| {
        panic!("a valid config must re-load from its rendering: {e}\n{rendered}")
    });
    assert_eq!(cfg, again, "config must survive a TOML round trip");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_and_subscriber_keys_round_trip_and_name_the_key_at_fault() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/config_loader/sealing.toml"
        ))
        .unwrap();
        let cfg = RelayConfig::from_toml(&text).unwrap();
        assert!(cfg.egress.sealing);
        assert_eq!(cfg.egress.instance_id, 2);
        assert_eq!(
            cfg.auth.subscribers.tokens.get(&TokenHash::of("test")),
            Some(&1017)
        );
        assert_eq!(RelayConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        let err = RelayConfig::from_toml(
            "[auth.subscribers.tokens]\n\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" = 0\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("auth.subscribers.tokens"), "{err}");
        let err = RelayConfig::from_toml("[egress]\nsealing = true\n").unwrap_err();
        assert!(err.to_string().contains("egress.sealing_key"), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let cfg = RelayConfig::default();
        cfg.validate().unwrap();
        let again = RelayConfig::from_toml(&cfg.to_toml()).unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = RelayConfig::from_toml("[limits]\ntunnels_per_conection = 3\n").unwrap_err();
        assert!(err.to_string().contains("tunnels_per_conection"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let err = RelayConfig::from_toml("[timeouts]\nudp_idle_secs = 0\n").unwrap_err();
        assert!(err.to_string().contains("timeouts.udp_idle_secs"), "{err}");
        let err = RelayConfig::from_toml("[policy]\nports = [\"0-80\"]\n").unwrap_err();
        assert!(err.to_string().contains("policy.ports"), "{err}");
    }

    #[test]
    fn tcp_listener_keys() {
        let cfg = RelayConfig::default();
        assert!(
            cfg.tcp_enabled && cfg.listen_tcp.is_none(),
            "TCP fallback on by default"
        );
        let cfg = RelayConfig::from_toml("listen_tcp = \"127.0.0.1:8443\"\n").unwrap();
        assert_eq!(cfg.listen_tcp, Some("127.0.0.1:8443".parse().unwrap()));
        let cfg = RelayConfig::from_toml("tcp_enabled = false\n").unwrap();
        assert!(!cfg.tcp_enabled);
        assert_eq!(RelayConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        let err = RelayConfig::from_toml("listen_tcp = \"off\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_tcp"), "{err}");
    }

    #[test]
    fn port_ranges_parse_and_render_back() {
        let cfg = RelayConfig::from_toml("[policy]\nports = [\"443\", \"8000-8999\"]\n").unwrap();
        assert_eq!(
            cfg.policy.ports,
            vec![
                PortRange::single(443).unwrap(),
                "8000-8999".parse::<PortRange>().unwrap()
            ]
        );
        assert!(cfg.policy.ports[1].contains(8500) && !cfg.policy.ports[1].contains(9000));
        assert_eq!(RelayConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        assert_eq!(PortRange::single(0), None, "port 0 is never a destination");
        let r = cfg.policy.ports[1];
        assert!(r.contains(8000) && r.contains(8999) && !r.contains(7999));
        assert_eq!(r.to_string(), "8000-8999");
    }

    #[test]
    fn token_hashes_are_parsed_at_load_and_name_their_key() {
        let hash = String::from(TokenHash::of("s3cret"));
        let cfg =
            RelayConfig::from_toml(&format!("[auth]\ntoken_sha256 = [\"{hash}\"]\n")).unwrap();
        assert_eq!(cfg.auth.token_sha256, vec![TokenHash::of("s3cret")]);
        let err = RelayConfig::from_toml("[auth]\ntoken_sha256 = [\"abc\"]\n").unwrap_err();
        assert!(err.to_string().contains("auth.token_sha256"), "{err}");
    }

    #[test]
    fn quic_lb_section_parses_validates_and_round_trips() {
        let cfg = RelayConfig::from_toml(
            "[quic_lb]\nconfig_rotation = 2\nserver_id = \"0A0b\"\nnonce_len = 6\n",
        )
        .unwrap();
        let lb = cfg.quic_lb.as_ref().unwrap();
        assert_eq!(lb.server_id.as_bytes(), &[0x0a, 0x0b]);
        assert!(lb.key_file.is_none() && lb.length_self_encoding);
        let encoder = lb.load().unwrap();
        let codec = encoder.config();
        assert_eq!(codec.cid_len(), 9);
        assert_eq!(codec.algorithm(), cfr_quic_lb::Algorithm::Plaintext);
        assert_eq!(RelayConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        assert!(RelayConfig::default().quic_lb.is_none());

        for (toml, key) in [
            (
                "config_rotation = 7\nserver_id = \"01\"\nnonce_len = 4",
                "quic_lb",
            ),
            (
                "config_rotation = 0\nserver_id = \"01\"\nnonce_len = 3",
                "quic_lb",
            ),
            (
                "config_rotation = 0\nserver_id = \"00112233445566778899\"\nnonce_len = 10",
                "quic_lb",
            ),
            (
                "config_rotation = 0\nserver_id = \"xyz\"\nnonce_len = 4",
                "server_id",
            ),
            (
                "config_rotation = 0\nserver_id = \"01\"\nnonce_len = 4\nkey = \"00\"",
                "key",
            ),
        ] {
            let err = RelayConfig::from_toml(&format!("[quic_lb]\n{toml}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }
}
