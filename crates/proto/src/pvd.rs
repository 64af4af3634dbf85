//! Provisioning Domain Additional Information (RFC 8801 §4.3) with the proxy keys of
//! draft-ietf-intarea-proxy-config: the JSON a relay publishes at `/.well-known/pvd` and a client
//! fetches to learn the operator's proxies.
//!
//! One type serves both sides: the relay serialises it, the client parses untrusted bytes into it
//! with [`parse`] (bounded size and array lengths; serde_json bounds nesting at 128) and then
//! checks it against the host it asked with [`ProvisioningDomain::check`].
use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Media type of PvD Additional Information (RFC 8801 §4.1, §8).
pub const MEDIA_TYPE: &str = "application/pvd+json";
/// The well-known PvD URI path (RFC 8801 §4.1).
pub const WELL_KNOWN_PATH: &str = "/.well-known/pvd";
/// Largest PvD document accepted. A PvD listing a fleet of relays is a few KiB.
pub const MAX_LEN: usize = 64 * 1024;
/// Most entries accepted in the `proxies` array.
pub const MAX_PROXIES: usize = 256;
/// Most entries accepted in the `proxy-match` array.
pub const MAX_RULES: usize = 256;

/// Proxy dictionary keys this implementation understands (draft-ietf-intarea-proxy-config §3.1).
pub const KNOWN_PROXY_KEYS: &[&str] = &["protocol", "proxy", "mandatory", "alpn", "identifier"];

/// PvD Additional Information.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisioningDomain {
    /// The PvD ID: for a proxy PvD, the proxy's host name.
    pub identifier: String,
    /// After this instant the information must not be used.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// IPv6 prefixes (empty for a PvD not learnt from a Router Advertisement).
    pub prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<ProxyInfo>,
    #[serde(rename = "proxy-match", default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_match: Vec<DestinationRule>,
}

/// One entry of the `proxies` array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// `connect-udp`, `https-connect`, `connect-tcp`, ... (the draft's proxy protocol registry).
    pub protocol: String,
    /// URI template or `host:port`, as the protocol defines.
    pub proxy: String,
    /// Keys the client must understand to use this proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mandatory: Vec<String>,
    /// ALPN identifiers the proxy offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Name referenced from `proxy-match` rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    /// Every other key (extensions, proprietary `vendor_key`s), kept so `mandatory` can be
    /// checked against what is present.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One entry of the `proxy-match` array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    /// Proxy identifiers, most preferred first; empty: matching traffic uses no proxy.
    pub proxies: Vec<String>,
    /// Destination properties (`domains`, `subnets`, `ports`, proprietary keys). None: the rule
    /// matches every destination.
    #[serde(flatten)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// Why a PvD was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PvdError {
    #[error("PvD is {len} bytes, more than the {max} accepted")]
    TooLarge { len: usize, max: usize },
    #[error("PvD JSON ends early")]
    Incomplete,
    /// Not JSON, not an object, a required key missing or of the wrong type (serde's message
    /// names the key), or nested too deeply.
    #[error("malformed PvD: {0}")]
    Malformed(String),
    #[error("PvD `{key}` has {count} entries, more than the {max} accepted")]
    TooMany {
        key: &'static str,
        count: usize,
        max: usize,
    },
    #[error("PvD `identifier` is empty")]
    EmptyIdentifier,
    #[error(
        "PvD `identifier` {identifier:?} does not match the host {expected:?} it was fetched from"
    )]
    IdentifierMismatch {
        identifier: String,
        expected: String,
    },
    #[error("PvD expired at {expires} (`expires`)")]
    Expired { expires: String },
    #[error("cannot render the PvD: {0}")]
    Render(String),
}

/// Why a proxy dictionary is not usable by this client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxySkip {
    #[error("its `mandatory` list names `{0}`, a key this client does not understand")]
    UnknownMandatoryKey(String),
    #[error("its `mandatory` list names `{0}`, which the dictionary does not contain")]
    MandatoryKeyAbsent(String),
    #[error("its `identifier` {0:?} is not listed by a `proxy-match` rule for all destinations")]
    NotMatched(String),
}

/// Parses PvD Additional Information from untrusted bytes: size, nesting and array lengths are
/// bounded; required keys must be present with the right types.
pub fn parse(body: &[u8]) -> Result<ProvisioningDomain, PvdError> {
    if body.len() > MAX_LEN {
        return Err(PvdError::TooLarge {
            len: body.len(),
            max: MAX_LEN,
        });
    }
    //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
    //# Hosts retrieving a new PvD Additional Information object MUST check for the presence
    //# and validity of the mandatory fields specified in Section 4.3.
    let pvd: ProvisioningDomain = serde_json::from_slice(body).map_err(|e| {
        if e.is_eof() {
            PvdError::Incomplete
        } else {
            PvdError::Malformed(e.to_string())
        }
    })?;
    if pvd.identifier.is_empty() {
        return Err(PvdError::EmptyIdentifier);
    }
    if pvd.proxies.len() > MAX_PROXIES {
        return Err(PvdError::TooMany {
            key: "proxies",
            count: pvd.proxies.len(),
            max: MAX_PROXIES,
        });
    }
    if pvd.proxy_match.len() > MAX_RULES {
        return Err(PvdError::TooMany {
            key: "proxy-match",
            count: pvd.proxy_match.len(),
            max: MAX_RULES,
        });
    }
    Ok(pvd)
}

/// A host name without one trailing dot, lower-cased (PvD IDs are FQDNs, often written with the
/// root dot: `"proxy.example.org."`).
fn normalise_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

impl ProvisioningDomain {
    /// Serialises the PvD (what the relay serves).
    pub fn to_json(&self) -> Result<Vec<u8>, PvdError> {
        serde_json::to_vec_pretty(self).map_err(|e| PvdError::Render(e.to_string()))
    }

    /// `expires` as a system time.
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::from(self.expires)
    }

    /// Checks a parsed PvD against the host it was fetched from and the current time.
    pub fn check(&self, host: &str, now: SystemTime) -> Result<(), PvdError> {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-2
        //# For proxy PvDs as defined in this document, the "identifier" MUST match the hostname
        //# of the HTTP proxy.
        if normalise_host(&self.identifier) != normalise_host(host) {
            return Err(PvdError::IdentifierMismatch {
                identifier: self.identifier.clone(),
                expected: host.to_owned(),
            });
        }
        //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
        //# A retrieved object including an expiration time that is already past or missing a
        //# mandatory element MUST be ignored.
        if self.expires_at() <= now {
            return Err(PvdError::Expired {
                expires: self
                    .expires
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|_| self.expires.to_string()),
            });
        }
        Ok(())
    }

    /// Splits the `proxies` array into the dictionaries this client may use for any destination
    /// and the skipped ones with the reason (index into `proxies`).
    ///
    /// `proxy-match` rules with destination properties are not evaluated by cfr (it routes every
    /// destination the same way); a proxy with an `identifier` is used only if a rule without
    /// properties lists it.
    pub fn usable_proxies(&self) -> (Vec<&ProxyInfo>, Vec<(usize, ProxySkip)>) {
        let catch_all: Vec<&str> = self
            .proxy_match
            .iter()
            .filter(|r| r.properties.is_empty())
            .flat_map(|r| r.proxies.iter().map(String::as_str))
            .collect();
        let mut usable = Vec::new();
        let mut skipped = Vec::new();
        for (i, proxy) in self.proxies.iter().enumerate() {
            match proxy.unusable_because(&catch_all) {
                Some(why) => skipped.push((i, why)),
                None => usable.push(proxy),
            }
        }
        (usable, skipped)
    }
}

impl ProxyInfo {
    fn has_key(&self, key: &str) -> bool {
        match key {
            "protocol" | "proxy" => true,
            "mandatory" => !self.mandatory.is_empty(),
            "alpn" => !self.alpn.is_empty(),
            "identifier" => self.identifier.is_some(),
            other => self.other.contains_key(other),
        }
    }

    fn unusable_because(&self, catch_all: &[&str]) -> Option<ProxySkip> {
        for key in &self.mandatory {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-3.1
            //# A client that does not understand a key from the array or cannot fully process
            //# the value of a key from the array MUST ignore the entire proxy dictionary.
            if !KNOWN_PROXY_KEYS.contains(&key.as_str()) {
                return Some(ProxySkip::UnknownMandatoryKey(key.clone()));
            }
            //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-3.1
            //# The `mandatory` array MUST NOT include any entries that are not present in the
            //# sub-dictionary.
            if !self.has_key(key) {
                return Some(ProxySkip::MandatoryKeyAbsent(key.clone()));
            }
        }
        if let Some(id) = &self.identifier {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-3.1
            //# Proxies with `identifier` keys are expected to accept traffic based on matching
            //# rules in the `proxy-match` array and MUST NOT be used if they are not included in
            //# the `proxy-match` array.
            if !catch_all.contains(&id.as_str()) {
                return Some(ProxySkip::NotMatched(id.clone()));
            }
        }
        None
    }
}

/// Fuzz property (target `pvd`): parsing arbitrary bytes never panics and stays within its
/// bounds; a PvD that parses renders to JSON that parses back to the same value.
pub fn fuzz_pvd(data: &[u8]) {
    let Ok(pvd) = parse(data) else { return };
    assert!(pvd.proxies.len() <= MAX_PROXIES && pvd.proxy_match.len() <= MAX_RULES);
    let _ = pvd.usable_proxies();
    let _ = pvd.check("example.org", SystemTime::UNIX_EPOCH);
    let rendered = pvd.to_json().expect("a parsed PvD renders");
    let again = parse(&rendered).unwrap_or_else(|e| {
        panic!(
            "a rendered PvD must parse again: {e}\n{}",
            String::from_utf8_lossy(&rendered)
        )
    });
    assert_eq!(pvd, again, "PvD must survive a JSON round trip");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const EXAMPLE: &str = r#"{
      "identifier": "proxy.example.org.",
      "expires": "2026-06-23T06:00:00Z",
      "prefixes": [],
      "proxies": [
        { "protocol": "http-connect", "proxy": "proxy.example.org:80" },
        { "protocol": "connect-udp",
          "proxy": "https://proxy.example.org/masque{?target_host,target_port}",
          "alpn": ["h3"] }
      ]
    }"#;

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(
            OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap(),
        )
    }

    #[test]
    fn draft_example_parses_and_checks() {
        let pvd = parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(pvd.proxies.len(), 2);
        assert_eq!(pvd.proxies[1].alpn, ["h3"]);
        pvd.check("Proxy.Example.org", at("2026-06-01T00:00:00Z"))
            .unwrap();
        let (usable, skipped) = pvd.usable_proxies();
        assert_eq!((usable.len(), skipped.len()), (2, 0));
        fuzz_pvd(EXAMPLE.as_bytes());
    }

    #[test]
    fn expired_and_foreign_pvds_are_rejected_with_the_reason() {
        let pvd = parse(EXAMPLE.as_bytes()).unwrap();
        let err = pvd
            .check("proxy.example.org", at("2026-06-23T06:00:00Z"))
            .unwrap_err();
        assert!(matches!(err, PvdError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("2026-06-23T06:00:00Z"), "{err}");
        let err = pvd
            .check("other.example.org", at("2026-01-01T00:00:00Z"))
            .unwrap_err();
        assert!(err.to_string().contains("identifier"), "{err}");
    }

    #[test]
    fn missing_keys_and_wrong_types_are_named() {
        for (doc, key) in [
            (
                r#"{"expires":"2026-06-23T06:00:00Z","prefixes":[]}"#,
                "identifier",
            ),
            (r#"{"identifier":"a","prefixes":[]}"#, "expires"),
            (
                r#"{"identifier":"a","expires":"2026-06-23T06:00:00Z"}"#,
                "prefixes",
            ),
            (
                r#"{"identifier":"a","expires":"tomorrow","prefixes":[]}"#,
                "",
            ),
            (
                r#"{"identifier":"a","expires":"2026-06-23T06:00:00Z","prefixes":[],"proxies":[{"proxy":"a:1"}]}"#,
                "protocol",
            ),
            (
                r#"{"identifier":"a","expires":"2026-06-23T06:00:00Z","prefixes":[],"proxies":{"a":1}}"#,
                "",
            ),
            (r#"[1,2,3]"#, ""),
        ] {
            let err = parse(doc.as_bytes()).unwrap_err();
            assert!(matches!(err, PvdError::Malformed(_)), "{doc}: {err:?}");
            assert!(err.to_string().contains(key), "{doc}: {err}");
        }
        assert_eq!(parse(b"{\"identifier\":"), Err(PvdError::Incomplete));
        assert_eq!(
            parse(br#"{"identifier":"","expires":"2026-06-23T06:00:00Z","prefixes":[]}"#),
            Err(PvdError::EmptyIdentifier)
        );
    }

    #[test]
    fn hostile_pvds_are_bounded() {
        let huge = vec![b' '; MAX_LEN + 1];
        assert!(matches!(parse(&huge), Err(PvdError::TooLarge { .. })));
        // Unknown top-level keys are skipped (RFC 8801 §4.3) without recursion; nested values
        // that are kept (extension keys of a proxy dictionary) hit serde_json's depth limit.
        let deep_unknown = format!(
            r#"{{"identifier":"a","expires":"2026-06-23T06:00:00Z","prefixes":[],"x":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse(deep_unknown.as_bytes()).is_ok());
        let deep = format!(
            r#"{{"identifier":"a","expires":"2026-06-23T06:00:00Z","prefixes":[],"proxies":[{{"protocol":"socks5","proxy":"a:1","x_y":{}{}}}]}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let err = parse(deep.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("recursion"), "{err}");
        let many = format!(
            r#"{{"identifier":"a","expires":"2026-06-23T06:00:00Z","prefixes":[],"proxies":[{}]}}"#,
            vec![r#"{"protocol":"socks5","proxy":"a:1"}"#; MAX_PROXIES + 1].join(",")
        );
        assert_eq!(
            parse(many.as_bytes()),
            Err(PvdError::TooMany {
                key: "proxies",
                count: MAX_PROXIES + 1,
                max: MAX_PROXIES
            })
        );
    }

    #[test]
    fn mandatory_and_identifier_rules_skip_proxies() {
        let doc = r#"{
          "identifier": "p.example", "expires": "2026-06-23T06:00:00Z", "prefixes": [],
          "proxies": [
            { "protocol": "connect-udp", "proxy": "https://a/{target_host}/{target_port}",
              "mandatory": ["example_authmode"], "example_authmode": "magic" },
            { "protocol": "connect-udp", "proxy": "https://b/{target_host}/{target_port}",
              "mandatory": ["alpn"] },
            { "protocol": "connect-udp", "proxy": "https://c/{target_host}/{target_port}",
              "identifier": "internal" },
            { "protocol": "connect-udp", "proxy": "https://d/{target_host}/{target_port}",
              "identifier": "all", "mandatory": ["identifier"], "vendor_x": 1 }
          ],
          "proxy-match": [
            { "domains": ["*.internal.example"], "proxies": ["internal"] },
            { "proxies": ["all"] }
          ]
        }"#;
        let pvd = parse(doc.as_bytes()).unwrap();
        let (usable, skipped) = pvd.usable_proxies();
        assert_eq!(usable.len(), 1);
        assert_eq!(usable[0].proxy, "https://d/{target_host}/{target_port}");
        assert_eq!(
            skipped,
            vec![
                (0, ProxySkip::UnknownMandatoryKey("example_authmode".into())),
                (1, ProxySkip::MandatoryKeyAbsent("alpn".into())),
                (2, ProxySkip::NotMatched("internal".into())),
            ]
        );
        assert!(skipped[0].1.to_string().contains("example_authmode"));
        fuzz_pvd(doc.as_bytes());
    }

    #[test]
    fn rendering_round_trips_and_omits_empty_optional_keys() {
        let pvd = ProvisioningDomain {
            identifier: "relay.example".into(),
            expires: OffsetDateTime::from(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            ),
            prefixes: vec![],
            proxies: vec![ProxyInfo {
                protocol: "https-connect".into(),
                proxy: "relay.example:443".into(),
                mandatory: vec![],
                alpn: vec!["h3".into()],
                identifier: None,
                other: BTreeMap::new(),
            }],
            proxy_match: vec![],
        };
        let json = String::from_utf8(pvd.to_json().unwrap()).unwrap();
        assert!(
            json.contains("\"expires\": \"2027-01-15T08:00:00Z\""),
            "{json}"
        );
        assert!(
            !json.contains("mandatory") && !json.contains("proxy-match"),
            "{json}"
        );
        assert_eq!(parse(json.as_bytes()).unwrap(), pvd);
    }
}
