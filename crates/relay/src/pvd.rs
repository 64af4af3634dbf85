//! The relay's Provisioning Domain (draft-ietf-intarea-proxy-config-14, RFC 8801 §4): `GET
//! /.well-known/pvd` on every front-end answers, without authentication, with the proxies of the
//! operator — this relay's own connect-udp template and https-connect address first, then the
//! configured others. It says nothing about clients.
//!
//! The document is rendered once per half-life and served byte-identical on HTTP/3, HTTP/2 and
//! HTTP/1.1; `cache-control: max-age` counts down to its `expires`. Its `expires` follows the wall
//! clock, not the process: relays with the same configuration (every member of a fleet) serve the
//! same bytes at the same time.
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cfr_proto::pvd::{DestinationRule, ProvisioningDomain, ProxyInfo, MEDIA_TYPE, WELL_KNOWN_PATH};
use cfr_proto::{Target, UdpTemplate};

use crate::config::{ConfigError, PvdConfig, RelayConfig};
use crate::metrics as m;

/// Proxy protocols whose location is a URI template (the draft's proxy protocol registry).
const TEMPLATE_PROTOCOLS: &[&str] = &["connect-udp", "connect-ip", "connect-tcp"];
/// Proxy protocols whose location is `host:port`.
const HOST_PORT_PROTOCOLS: &[&str] = &["https-connect", "http-connect", "socks5"];

/// Checks `[pvd]`; errors name the key.
pub(crate) fn validate(cfg: &PvdConfig) -> Result<(), ConfigError> {
    let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
    if let Some(id) = &cfg.identifier {
        let host = id.strip_suffix('.').unwrap_or(id);
        Target::new(host, 1)
            .map_err(|e| invalid("pvd.identifier", format!("{id:?} is not a host name: {e}")))?;
    }
    if cfg.port == Some(0) {
        return Err(invalid("pvd.port", "must be 1-65535".into()));
    }
    // Clients refresh at a random time in the second half of the lifetime (RFC 8801 §4.1):
    // short lifetimes are for tests, hours are sensible in production.
    if !(1..=30 * 86_400).contains(&cfg.expires_secs) {
        return Err(invalid(
            "pvd.expires_secs",
            "must be between 1 and 2592000 (30 days)".into(),
        ));
    }
    if cfg.proxies.len() + 2 > cfr_proto::pvd::MAX_PROXIES {
        return Err(invalid(
            "pvd.proxies",
            format!(
                "at most {} entries (clients refuse longer lists)",
                cfr_proto::pvd::MAX_PROXIES - 2
            ),
        ));
    }
    for p in &cfg.proxies {
        let key = "pvd.proxies";
        if TEMPLATE_PROTOCOLS.contains(&p.protocol.as_str()) {
            if !p.proxy.starts_with("https://") {
                return Err(invalid(
                    key,
                    format!(
                        "{}: `{}` must be an https:// URI template",
                        p.protocol, p.proxy
                    ),
                ));
            }
            if p.protocol == "connect-udp" {
                UdpTemplate::parse(&p.proxy)
                    .map_err(|e| invalid(key, format!("connect-udp `{}`: {e}", p.proxy)))?;
            }
        } else if HOST_PORT_PROTOCOLS.contains(&p.protocol.as_str()) {
            cfr_proto::target::parse_authority(&p.proxy).map_err(|e| {
                invalid(
                    key,
                    format!("{}: `{}` must be host:port ({e})", p.protocol, p.proxy),
                )
            })?;
        } else {
            return Err(invalid(
                key,
                format!(
                    "unknown protocol {:?} (one of {}, {})",
                    p.protocol,
                    TEMPLATE_PROTOCOLS.join(", "),
                    HOST_PORT_PROTOCOLS.join(", ")
                ),
            ));
        }
        if p.identifier.as_deref() == Some("") {
            return Err(invalid(key, "`identifier` must not be empty".into()));
        }
    }
    Ok(())
}

/// Serves this relay's PvD.
pub struct PvdPublisher {
    /// Everything but `expires`.
    document: ProvisioningDomain,
    lifetime: Duration,
    /// The current rendering and the `expires` it carries.
    rendered: Mutex<Option<(SystemTime, Bytes)>>,
}

impl PvdPublisher {
    /// The publisher for `config`, or `None` when `pvd.identifier` is not set. `quic_port` and
    /// `tcp_port` are the ports the listeners actually bound.
    pub fn new(
        config: &RelayConfig,
        quic_port: u16,
        tcp_port: Option<u16>,
    ) -> Result<Option<PvdPublisher>, ConfigError> {
        let cfg = &config.pvd;
        let Some(identifier) = &cfg.identifier else {
            return Ok(None);
        };
        let host = identifier.strip_suffix('.').unwrap_or(identifier);
        let port = cfg.port.unwrap_or(quic_port);
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        // The TCP front-end answers at the same host:port only when it shares the port number.
        let mut alpn = vec!["h3".to_owned()];
        if tcp_port.is_some_and(|p| p == quic_port) {
            alpn.extend(["h2".to_owned(), "http/1.1".to_owned()]);
        }
        let template = config.udp_template()?.with_origin(&authority);
        let own = [
            ("connect-udp", template.as_str().to_owned()),
            ("https-connect", authority.clone()),
        ];
        let mut proxies: Vec<ProxyInfo> = own
            .into_iter()
            .map(|(protocol, proxy)| ProxyInfo {
                protocol: protocol.to_owned(),
                proxy,
                mandatory: Vec::new(),
                alpn: alpn.clone(),
                identifier: None,
                other: Default::default(),
            })
            .collect();
        for p in &cfg.proxies {
            if proxies
                .iter()
                .any(|q| q.protocol == p.protocol && q.proxy == p.proxy)
            {
                continue;
            }
            proxies.push(ProxyInfo {
                protocol: p.protocol.clone(),
                proxy: p.proxy.clone(),
                mandatory: Vec::new(),
                alpn: p.alpn.clone(),
                identifier: p.identifier.clone(),
                other: Default::default(),
            });
        }
        // A named proxy is usable only where a `proxy-match` rule lists it (draft §3.1): cfr
        // routes every destination alike, so one rule without destination properties.
        let mut named: Vec<String> = Vec::new();
        for id in proxies.iter().filter_map(|p| p.identifier.clone()) {
            if !named.contains(&id) {
                named.push(id);
            }
        }
        let proxy_match = if named.is_empty() {
            Vec::new()
        } else {
            vec![DestinationRule {
                proxies: named,
                properties: Default::default(),
            }]
        };
        let document = ProvisioningDomain {
            identifier: identifier.clone(),
            expires: time::OffsetDateTime::UNIX_EPOCH,
            //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-2
            //# The "prefixes" array MUST be empty for cases when the PvD identifier is not
            //# provided by a Router Advertisement
            prefixes: Vec::new(),
            proxies,
            proxy_match,
        };
        Ok(Some(PvdPublisher {
            document,
            lifetime: Duration::from_secs(cfg.expires_secs),
            rendered: Mutex::new(None),
        }))
    }

    /// The current body and its `expires`; re-rendered when the wall clock enters a new half
    /// lifetime, so a client always gets at least half a lifetime.
    pub fn current(&self, now: SystemTime) -> (Bytes, SystemTime) {
        let expires = self.expires_at(now);
        let mut rendered = self.rendered.lock().expect("pvd lock");
        if let Some((cached, body)) = &*rendered {
            if *cached == expires {
                return (body.clone(), expires);
            }
        }
        let mut doc = self.document.clone();
        doc.expires = time::OffsetDateTime::from(expires);
        let body = Bytes::from(
            doc.to_json()
                .expect("a PvD built from valid config renders"),
        );
        *rendered = Some((expires, body.clone()));
        (body, expires)
    }

    /// The `expires` of the document served at `now`. The wall clock is cut into periods of half
    /// a lifetime (whole seconds, at least one) counted from the Unix epoch; a document served in
    /// the period starting at `start` expires at `start + lifetime`. So it depends on the clock
    /// alone, never on when the process started (fleet members agree within their clocks' skew),
    /// and a client gets more than `lifetime - half` ≥ half a lifetime.
    fn expires_at(&self, now: SystemTime) -> SystemTime {
        let lifetime = self.lifetime.as_secs();
        let half = (lifetime / 2).max(1);
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Whole seconds: RFC 3339 without a fraction.
        SystemTime::UNIX_EPOCH + Duration::from_secs(now / half * half + lifetime)
    }

    /// The complete response: 200, `application/pvd+json`, caching until `expires`.
    pub fn response(&self, now: SystemTime) -> http::Response<Bytes> {
        let (body, expires) = self.current(now);
        let max_age = expires.duration_since(now).unwrap_or_default().as_secs();
        http::Response::builder()
            .status(200)
            //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
            //# servers MUST mark this media type as their Content-Type header in responses.
            .header(http::header::CONTENT_TYPE, MEDIA_TYPE)
            .header(http::header::CACHE_CONTROL, format!("max-age={max_age}"))
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response parts")
    }
}

/// The PvD response if this request asks for it (a plain `GET /.well-known/pvd`) and the relay
/// publishes one; `None` sends the request down the tunnel path as before.
pub(crate) fn answer(
    publisher: Option<&PvdPublisher>,
    method: &http::Method,
    protocol: Option<&str>,
    uri: &http::Uri,
    front: &'static str,
) -> Option<http::Response<Bytes>> {
    let publisher = publisher?;
    if method != http::Method::GET || protocol.is_some() || uri.path() != WELL_KNOWN_PATH {
        return None;
    }
    metrics::counter!(m::REQUESTS, "protocol" => front).increment(1);
    Some(publisher.response(SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PvdProxyConfig;

    fn config(toml_pvd: &str) -> RelayConfig {
        RelayConfig::from_toml(toml_pvd).unwrap()
    }

    #[test]
    fn no_identifier_no_pvd() {
        assert!(PvdPublisher::new(&RelayConfig::default(), 4433, Some(4433))
            .unwrap()
            .is_none());
    }

    #[test]
    fn own_entries_use_the_configured_template_and_bound_port() {
        let cfg = config(
            "connect_udp_template = \"/m/{target_host}/{target_port}\"\n[pvd]\nidentifier = \"relay.example\"\n",
        );
        let p = PvdPublisher::new(&cfg, 4433, Some(4433)).unwrap().unwrap();
        // 100 s into a half-lifetime period of the wall clock.
        let period = SystemTime::UNIX_EPOCH + Duration::from_secs(1800 * 944_445);
        let now = period + Duration::from_secs(100);
        let (body, expires) = p.current(now);
        let doc = cfr_proto::pvd::parse(&body).unwrap();
        doc.check("relay.example", now).unwrap();
        assert_eq!(doc.proxies[0].protocol, "connect-udp");
        assert_eq!(
            doc.proxies[0].proxy,
            "https://relay.example:4433/m/{target_host}/{target_port}"
        );
        assert_eq!(doc.proxies[0].alpn, ["h3", "h2", "http/1.1"]);
        assert_eq!(doc.proxies[1].protocol, "https-connect");
        assert_eq!(doc.proxies[1].proxy, "relay.example:4433");
        assert!(doc.prefixes.is_empty() && doc.proxy_match.is_empty());
        assert_eq!(expires, period + Duration::from_secs(3600));
        // Same rendering until the period ends, a new one after.
        assert_eq!(p.current(period + Duration::from_secs(1799)).0, body);
        let (later, later_exp) = p.current(period + Duration::from_secs(1800));
        assert_ne!(later, body);
        assert_eq!(later_exp, expires + Duration::from_secs(1800));
        let resp = p.response(now + Duration::from_secs(1801));
        assert_eq!(resp.headers()[http::header::CONTENT_TYPE], MEDIA_TYPE);
        assert_eq!(
            resp.headers()[http::header::CACHE_CONTROL],
            format!(
                "max-age={}",
                later_exp
                    .duration_since(now + Duration::from_secs(1801))
                    .unwrap()
                    .as_secs()
            )
            .as_str()
        );
    }

    #[test]
    fn expires_follows_the_wall_clock_not_the_process() {
        let cfg = config("[pvd]\nidentifier = \"relay.example\"\nexpires_secs = 601\n");
        // Two publishers (two fleet members) that first served at different instants.
        let a = PvdPublisher::new(&cfg, 443, Some(443)).unwrap().unwrap();
        let b = PvdPublisher::new(&cfg, 443, Some(443)).unwrap().unwrap();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        a.current(start);
        for s in 0..2000 {
            let now = start + Duration::from_millis(s * 937);
            let (body, expires) = b.current(now);
            assert_eq!(a.current(now), (body, expires), "at +{s}×0.937 s");
            let left = expires.duration_since(now).unwrap();
            // Periods of 300 s: a client gets between 301 and 601 s.
            assert!(
                left > Duration::from_secs(301) && left <= Duration::from_secs(601),
                "{left:?}"
            );
        }
        // A one-second lifetime still advances every second.
        let one = config("[pvd]\nidentifier = \"relay.example\"\nexpires_secs = 1\n");
        let p = PvdPublisher::new(&one, 443, None).unwrap().unwrap();
        assert_eq!(p.current(start).1, start + Duration::from_secs(1));
    }

    #[test]
    fn named_proxies_get_a_catch_all_rule_and_only_h3_when_tcp_port_differs() {
        let mut cfg = config("[pvd]\nidentifier = \"a.example.\"\nport = 443\n");
        cfg.pvd.proxies = vec![
            PvdProxyConfig {
                protocol: "connect-udp".into(),
                proxy: "https://b.example/.well-known/masque/udp/{target_host}/{target_port}/"
                    .into(),
                alpn: vec!["h3".into()],
                identifier: Some("fleet".into()),
            },
            PvdProxyConfig {
                protocol: "https-connect".into(),
                proxy: "b.example:443".into(),
                alpn: vec![],
                identifier: Some("fleet".into()),
            },
        ];
        cfg.validate().unwrap();
        let p = PvdPublisher::new(&cfg, 4433, Some(8443)).unwrap().unwrap();
        let doc = cfr_proto::pvd::parse(&p.current(SystemTime::now()).0).unwrap();
        assert_eq!(doc.proxies.len(), 4);
        assert_eq!(doc.proxies[1].proxy, "a.example:443");
        assert_eq!(doc.proxies[0].alpn, ["h3"]);
        assert_eq!(doc.proxy_match.len(), 1);
        assert_eq!(doc.proxy_match[0].proxies, ["fleet"]);
        assert_eq!(doc.usable_proxies().0.len(), 4);
    }

    #[test]
    fn bad_pvd_config_names_the_key() {
        for (text, key) in [
            ("[pvd]\nidentifier = \"not a host\"\n", "pvd.identifier"),
            ("[pvd]\nexpires_secs = 0\n", "pvd.expires_secs"),
            ("[pvd]\nport = 0\n", "pvd.port"),
            (
                "[[pvd.proxies]]\nprotocol = \"connect-udp\"\nproxy = \"https://a/{target_host}\"\n",
                "pvd.proxies",
            ),
            (
                "[[pvd.proxies]]\nprotocol = \"https-connect\"\nproxy = \"a\"\n",
                "pvd.proxies",
            ),
            (
                "[[pvd.proxies]]\nprotocol = \"gopher\"\nproxy = \"a:1\"\n",
                "pvd.proxies",
            ),
            (
                "connect_udp_template = \"/u/{target_host}\"\n",
                "connect_udp_template",
            ),
            (
                "connect_udp_template = \"https://a/u/{target_host}/{target_port}\"\n",
                "connect_udp_template",
            ),
        ] {
            let err = RelayConfig::from_toml(text).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn only_a_plain_get_of_the_well_known_path_is_answered() {
        let cfg = config("[pvd]\nidentifier = \"a.example\"\n");
        let p = PvdPublisher::new(&cfg, 1, None).unwrap().unwrap();
        let uri: http::Uri = "https://a.example/.well-known/pvd".parse().unwrap();
        let get = http::Method::GET;
        assert!(answer(Some(&p), &get, None, &uri, "h3").is_some());
        assert!(answer(None, &get, None, &uri, "h3").is_none());
        assert!(answer(Some(&p), &http::Method::POST, None, &uri, "h3").is_none());
        assert!(answer(Some(&p), &get, Some("connect-udp"), &uri, "h3").is_none());
        let other: http::Uri = "https://a.example/.well-known/pvdx".parse().unwrap();
        assert!(answer(Some(&p), &get, None, &other, "h3").is_none());
    }
}
