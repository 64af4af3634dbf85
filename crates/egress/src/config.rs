//! Operator configuration of the egress pool: typed once, validated by [`crate::EgressPool::new`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which addresses tunnels leave from, and how often a client sees a new one.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Prefixes routed to this host (`ip -6 route add local PREFIX dev lo`). IPv4 and IPv6 may be
    /// mixed; each family forms its own pool. Empty: the kernel chooses the source (no source privacy).
    pub prefixes: Vec<ipnet::IpNet>,
    /// When a new source address is drawn.
    pub policy: EgressPolicy,
    /// Length of an epoch for [`EgressPolicy::Epoch`], in seconds. Must be > 0. Epoch `e` is
    /// `floor(unix_time / epoch_secs)`, the same on every relay of a fleet.
    pub epoch_secs: u64,
    /// File holding the fleet secret (≥ 32 bytes, e.g. `openssl rand -hex 32`) that keys each
    /// epoch's address choice, shared by a fleet's members. Absent: a random per-process secret.
    pub epoch_secret_file: Option<PathBuf>,
    /// What to do for a destination whose family has no prefix.
    pub fallback: Fallback,
    /// Seal every address: its host bits encrypt (FF1, [`crate::seal`]) the subscriber handle and
    /// epoch under the key in `sealing_key`, instead of being drawn at random.
    pub sealing: bool,
    /// Key file for sealing (`cfr egress keygen`): a master or relay key, mode 0600.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealing_key: Option<PathBuf>,
    /// Seconds an epoch key stays in the relay's memory after its epoch ended; then it is erased and
    /// cannot be re-derived from what the relay holds.
    pub sealing_retention_secs: u64,
    /// This relay's instance number, part of the sealing tweak (relays sharing a key need distinct ids).
    pub instance_id: u32,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            prefixes: Vec::new(),
            policy: EgressPolicy::default(),
            epoch_secs: 600,
            epoch_secret_file: None,
            fallback: Fallback::default(),
            sealing: false,
            sealing_key: None,
            sealing_retention_secs: 0,
            instance_id: 0,
        }
    }
}

/// When a fresh source address is drawn (draft-scalone-cfr-source-privacy: rotation happens between
/// tunnels, never inside one).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum EgressPolicy {
    /// Every tunnel gets a freshly drawn address.
    #[default]
    PerTunnel,
    /// All tunnels of one client connection share one address per family, drawn at the first tunnel.
    PerConnection,
    /// Like `PerConnection`, but the address is replaced for tunnels opened in a later epoch
    /// (`floor(unix_time / epoch_secs)`, fleet-wide; see [`crate::EpochSchedule`]).
    Epoch,
}

impl EgressPolicy {
    /// The name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerTunnel => "per-tunnel",
            Self::PerConnection => "per-connection",
            Self::Epoch => "epoch",
        }
    }
}

impl fmt::Display for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing an [`EgressPolicy`] or [`Fallback`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?}; expected one of: {expected}")]
pub struct ParseNameError {
    what: &'static str,
    got: String,
    expected: &'static str,
}

impl FromStr for EgressPolicy {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "per-tunnel" => Ok(Self::PerTunnel),
            "per-connection" => Ok(Self::PerConnection),
            "epoch" => Ok(Self::Epoch),
            _ => Err(ParseNameError {
                what: "egress policy",
                got: s.to_owned(),
                expected: "per-tunnel, per-connection, epoch",
            }),
        }
    }
}

/// What happens to a destination whose address family the pool does not cover.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Let the kernel choose the source (the host's own address: no source privacy for that family).
    #[default]
    System,
    /// Refuse the tunnel ([`crate::EgressError::NoAddressForFamily`]).
    Refuse,
}

impl Fallback {
    /// The name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Refuse => "refuse",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fallback {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "system" => Ok(Self::System),
            "refuse" => Ok(Self::Refuse),
            _ => Err(ParseNameError {
                what: "egress fallback",
                got: s.to_owned(),
                expected: "system, refuse",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_and_fallback_names_round_trip() {
        for p in [
            EgressPolicy::PerTunnel,
            EgressPolicy::PerConnection,
            EgressPolicy::Epoch,
        ] {
            assert_eq!(p.to_string().parse::<EgressPolicy>().unwrap(), p);
        }
        for f in [Fallback::System, Fallback::Refuse] {
            assert_eq!(f.to_string().parse::<Fallback>().unwrap(), f);
        }
        assert!("PerTunnel".parse::<EgressPolicy>().is_err());
    }

    #[test]
    fn config_parses_kebab_case_names_and_rejects_unknown_fields() {
        let c: EgressConfig = toml::from_str(
            r#"
            prefixes = ["2001:db8:cf::/64", "198.51.100.0/24"]
            policy = "per-connection"
            fallback = "refuse"
            "#,
        )
        .unwrap();
        assert_eq!(c.prefixes.len(), 2);
        assert_eq!(c.policy, EgressPolicy::PerConnection);
        assert_eq!(c.fallback, Fallback::Refuse);
        assert_eq!(c.epoch_secs, 600, "omitted fields take their defaults");
        let round_trip: EgressConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(round_trip, c);
        assert!(toml::from_str::<EgressConfig>("prefix = []").is_err());
        assert!(toml::from_str::<EgressConfig>(r#"policy = "PerTunnel""#).is_err());
    }

    #[test]
    fn default_config_is_empty_per_tunnel_600s_system() {
        let c = EgressConfig::default();
        assert!(c.prefixes.is_empty());
        assert_eq!(c.policy, EgressPolicy::PerTunnel);
        assert_eq!(c.epoch_secs, 600);
        assert_eq!(c.fallback, Fallback::System);
    }
}
