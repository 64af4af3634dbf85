//! Relay discovery through a Provisioning Domain (draft-ietf-intarea-proxy-config-14): from one
//! host name, fetch `https://HOST/.well-known/pvd` (RFC 8801 §4.1), keep the proxies cfr can use
//! (connect-udp templates and https-connect addresses reachable over HTTP/3), and open tunnels
//! through them with the usual [`Policy`] — refreshing the PvD before it expires, keeping the last
//! good relay set while a refresh fails, and dropping it once it has expired.
//!
//! The PvD itself is fetched over TLS/TCP (HTTP/2, else HTTP/1.1) with hyper: a PvD server is any
//! HTTPS server (RFC 8801 names no HTTP version), most of which do not speak HTTP/3. The relays
//! are then used over HTTP/3 as with `--relay`. TCP tunnels go to the PvD's https-connect proxies,
//! UDP tunnels to its connect-udp templates: two relay sets, so a host listed for both gets one
//! QUIC connection per set.
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cfr_proto::pvd::{self, ProvisioningDomain};
use cfr_proto::{Target, UdpTemplate};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;

use crate::select::{Policy, RelaySet};
use crate::{ClientConfig, ClientError, RelayUrl, TcpTunnel, TunnelOpener, UdpTunnel};

/// Redirects followed per fetch (RFC 8801 §4.1: the host "MUST follow the redirection(s)").
pub const MAX_REDIRECTS: usize = 3;
/// First retry after a failed refresh once the PvD has expired; doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// ALPN tokens offered when fetching the PvD.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Where a PvD is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvdLocation {
    /// The proxy host: the PvD's `identifier` must name it.
    pub host: String,
    pub port: u16,
    /// `host:port` (IPv6 in brackets).
    pub authority: String,
    /// Path and query of the PvD URI.
    pub path: String,
}

impl PvdLocation {
    /// `HOST[:PORT]` (the well-known path, port 443 by default) or a full `https://` URI.
    pub fn parse(arg: &str) -> Result<PvdLocation, ClientError> {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-2
        //# The fetch MUST use the "https" scheme.
        if let Some(rest) = arg.strip_prefix("https://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let url = RelayUrl::parse(&format!("https://{authority}"))?;
            let path = match path {
                "" | "/" => pvd::WELL_KNOWN_PATH.to_owned(),
                p => p.to_owned(),
            };
            if path.contains('#') || !path.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ClientError::InvalidUrl(format!("{arg:?}: bad path")));
            }
            return Ok(PvdLocation::new(url, path));
        }
        if arg.contains("://") || arg.contains('/') {
            return Err(ClientError::InvalidUrl(format!(
                "{arg:?}: give HOST[:PORT] or an https:// URL (the PvD is fetched over HTTPS)"
            )));
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-2
        //# When a client is provisioned with the hostname of a proxy for which it wants to look
        //# up PvD Additional Information, the client SHALL use the well-known PvD URI using the
        //# host authority of the proxy.
        let url = RelayUrl::parse(&format!("https://{arg}"))?;
        Ok(PvdLocation::new(url, pvd::WELL_KNOWN_PATH.to_owned()))
    }

    fn new(url: RelayUrl, path: String) -> PvdLocation {
        PvdLocation {
            host: url.host,
            port: url.port,
            authority: url.authority,
            path,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}{}", self.authority, self.path)
    }

    /// Where a `Location` header points, relative to this URI; only https targets.
    fn redirect(&self, location: &str) -> Result<PvdLocation, ClientError> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Ok(PvdLocation {
                path: location.to_owned(),
                ..self.clone()
            });
        }
        if location.starts_with("https://") {
            return PvdLocation::parse(location);
        }
        Err(ClientError::Discovery(format!(
            "{} redirects to {location:?}, which is not an https URL",
            self.url()
        )))
    }
}

/// Fetches the PvD body from `location` (following up to [`MAX_REDIRECTS`] https redirects)
/// with the trust settings of `base`, offering `alpn` (h2 and/or http/1.1).
pub async fn fetch(
    location: &PvdLocation,
    base: &ClientConfig,
    alpn: &[&[u8]],
) -> Result<(http::response::Parts, Bytes), ClientError> {
    let mut at = location.clone();
    for _ in 0..=MAX_REDIRECTS {
        let (head, body) = tokio::time::timeout(base.connect_timeout, fetch_once(&at, base, alpn))
            .await
            .map_err(|_| {
                ClientError::Discovery(format!(
                    "fetching {} timed out after {:?}",
                    at.url(),
                    base.connect_timeout
                ))
            })??;
        //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
        //# If the HTTP status of the answer is between 300 and 399, inclusive, it MUST follow
        //# the redirection(s).
        if head.status.is_redirection() {
            let target = head
                .headers
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ClientError::Discovery(format!(
                        "{} answered {} without a Location",
                        at.url(),
                        head.status
                    ))
                })?;
            at = at.redirect(target)?;
            continue;
        }
        //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
        //# If the HTTP status of the answer is greater than or equal to 400, the host MUST
        //# abandon and consider that there is no additional PvD information.
        if !head.status.is_success() {
            return Err(ClientError::Discovery(format!(
                "{} answered {}: no PvD there",
                at.url(),
                head.status
            )));
        }
        return Ok((head, body));
    }
    Err(ClientError::Discovery(format!(
        "{}: more than {MAX_REDIRECTS} redirects",
        location.url()
    )))
}

async fn fetch_once(
    at: &PvdLocation,
    base: &ClientConfig,
    alpn: &[&[u8]],
) -> Result<(http::response::Parts, Bytes), ClientError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ClientError::Discovery(format!("fetching {}: {what}: {e}", at.url()))
    };
    let mut tls = crate::config::rustls_config_with_cert(&base.trust, base.client_cert.as_ref())?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let server_name = RelayUrl::parse(&format!("https://{}", at.authority))?.server_name()?;
    let tcp = tokio::net::TcpStream::connect((at.host.as_str(), at.port))
        .await
        .map_err(|e| failed("TCP connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| failed("TLS", &e))?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let io = TokioIo::new(tls);
    let request = http::Request::get(if h2 { at.url() } else { at.path.clone() })
        .header(http::header::HOST, at.authority.as_str())
        //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
        //# Clients SHOULD include this media type as an Accept header in their GET requests
        .header(http::header::ACCEPT, pvd::MEDIA_TYPE)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| ClientError::InvalidUrl(e.to_string()))?;
    let response = if h2 {
        let mut h2 = request;
        h2.headers_mut().remove(http::header::HOST);
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| failed("HTTP/2", &e))?;
        tokio::spawn(conn);
        sender
            .send_request(h2)
            .await
            .map_err(|e| failed("HTTP/2", &e))?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| failed("HTTP/1.1", &e))?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(|e| failed("HTTP/1.1", &e))?
    };
    let (head, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, pvd::MAX_LEN)
        .collect()
        .await
        .map_err(|e| failed("body (at most 64 KiB)", &e))?
        .to_bytes();
    Ok((head, body))
}

/// The relays a PvD offers this client, and what it skipped and why.
#[derive(Debug, Clone, Default)]
pub struct RelayPlan {
    /// Relays for TCP tunnels (https-connect proxies).
    pub tcp: Vec<ClientConfig>,
    /// Relays for UDP tunnels (connect-udp templates), each with its template.
    pub udp: Vec<ClientConfig>,
    /// One line per proxy dictionary not used.
    pub skipped: Vec<String>,
}

impl RelayPlan {
    /// What decides whether two plans open the same connections.
    fn key(&self) -> Vec<String> {
        let tcp = self.tcp.iter().map(|c| format!("tcp {}", c.relay));
        let udp = self.udp.iter().map(|c| {
            format!(
                "udp {}",
                c.udp_template.as_ref().map_or("", UdpTemplate::as_str)
            )
        });
        tcp.chain(udp).collect()
    }
}

/// Turns a validated PvD into relay configs that inherit trust, token and timeouts from `base`.
pub fn plan_relays(pvd: &ProvisioningDomain, base: &ClientConfig) -> RelayPlan {
    let mut plan = RelayPlan::default();
    let (usable, skipped) = pvd.usable_proxies();
    for (i, why) in skipped {
        plan.skipped
            .push(format!("proxy #{i} ({}): {why}", pvd.proxies[i].proxy));
    }
    for proxy in usable {
        let skip = |plan: &mut RelayPlan, why: String| {
            plan.skipped
                .push(format!("{} {}: {why}", proxy.protocol, proxy.proxy));
        };
        // cfr's relay client speaks HTTP/3 only; `alpn` is a hint, so absent means "try".
        if !proxy.alpn.is_empty() && !proxy.alpn.iter().any(|a| a == "h3") {
            skip(&mut plan, "no h3 in its alpn list".into());
            continue;
        }
        match proxy.protocol.as_str() {
            "connect-udp" => {
                let template = match UdpTemplate::parse(&proxy.proxy) {
                    Ok(t) => t,
                    Err(e) => {
                        skip(&mut plan, format!("bad URI template: {e}"));
                        continue;
                    }
                };
                let Some(origin) = template.origin() else {
                    skip(
                        &mut plan,
                        "the template is not an absolute https URI".into(),
                    );
                    continue;
                };
                if let Err(e) = RelayUrl::parse(origin) {
                    skip(&mut plan, e.to_string());
                    continue;
                }
                let mut cfg = base.clone();
                cfg.relay = origin.to_owned();
                cfg.udp_template = Some(template);
                if !plan.udp.iter().any(|c| c.udp_template == cfg.udp_template) {
                    plan.udp.push(cfg);
                }
            }
            "https-connect" => {
                if let Err(e) = cfr_proto::target::parse_authority(&proxy.proxy) {
                    skip(&mut plan, format!("not host:port ({e})"));
                    continue;
                }
                let url = format!("https://{}", proxy.proxy);
                if let Err(e) = RelayUrl::parse(&url) {
                    skip(&mut plan, e.to_string());
                    continue;
                }
                let mut cfg = base.clone();
                cfg.relay = url;
                cfg.udp_template = None;
                if !plan.tcp.iter().any(|c| c.relay == cfg.relay) {
                    plan.tcp.push(cfg);
                }
            }
            other => skip(
                &mut plan,
                format!(
                    "protocol {other:?} is not one cfr client uses (connect-udp, https-connect)"
                ),
            ),
        }
    }
    plan
}

/// Fetches, parses and checks the PvD at `location` and plans the relays it lists.
pub async fn discover(
    location: &PvdLocation,
    base: &ClientConfig,
) -> Result<(ProvisioningDomain, RelayPlan), ClientError> {
    let (head, body) = fetch(location, base, &[ALPN_H2, ALPN_HTTP11]).await?;
    let media = head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !media.starts_with(pvd::MEDIA_TYPE) {
        tracing::debug!(url = %location.url(), content_type = media, "PvD served without application/pvd+json");
    }
    let bad = |e: pvd::PvdError| ClientError::Discovery(format!("{}: {e}", location.url()));
    let doc = pvd::parse(&body).map_err(bad)?;
    doc.check(&location.host, SystemTime::now()).map_err(bad)?;
    let plan = plan_relays(&doc, base);
    Ok((doc, plan))
}

/// The relay sets of one accepted PvD.
#[derive(Clone)]
struct Active {
    tcp: Option<RelaySet>,
    udp: Option<RelaySet>,
    key: Vec<String>,
    expires: SystemTime,
}

struct Inner {
    location: PvdLocation,
    base: ClientConfig,
    policy: Policy,
    state: RwLock<Option<Active>>,
    /// When the last accepted PvD expires (kept after the relay sets are dropped, for messages).
    last_expires: Mutex<Option<SystemTime>>,
    refresh_failures: std::sync::atomic::AtomicU64,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.refresher.lock().unwrap().take() {
            t.abort();
        }
    }
}

/// Tunnels through the relays a PvD lists, kept up to date. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

impl Discovery {
    /// Fetches the PvD (it must be valid now) and starts refreshing it in the background. Must
    /// run inside a Tokio runtime.
    pub async fn start(
        location: PvdLocation,
        base: ClientConfig,
        policy: Policy,
    ) -> Result<Discovery, ClientError> {
        let d = Discovery {
            inner: Arc::new(Inner {
                location,
                base,
                policy,
                state: RwLock::new(None),
                last_expires: Mutex::new(None),
                refresh_failures: Default::default(),
                refresher: Mutex::new(None),
            }),
        };
        let fetched = SystemTime::now();
        let expires = d.refresh().await?;
        let task = tokio::spawn(refresh_loop(
            Arc::downgrade(&d.inner),
            refresh_delay(fetched, expires),
        ));
        *d.inner.refresher.lock().unwrap() = Some(task);
        Ok(d)
    }

    /// The PvD URI.
    pub fn url(&self) -> String {
        self.inner.location.url()
    }

    /// `expires` of the PvD in use, if any.
    pub fn expires(&self) -> Option<SystemTime> {
        self.inner.state.read().unwrap().as_ref().map(|a| a.expires)
    }

    /// Refreshes that failed so far.
    pub fn refresh_failures(&self) -> u64 {
        self.inner
            .refresh_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Relay URLs in use: (TCP, UDP).
    pub fn relays(&self) -> (Vec<String>, Vec<String>) {
        let state = self.inner.state.read().unwrap();
        let urls = |s: &Option<RelaySet>| {
            s.as_ref()
                .map(|s| s.status().into_iter().map(|r| r.relay).collect())
                .unwrap_or_default()
        };
        match &*state {
            Some(a) => (urls(&a.tcp), urls(&a.udp)),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Fetches the PvD once and installs its relays (reusing the current sets when the PvD
    /// lists the same relays). Returns the new `expires`.
    pub async fn refresh(&self) -> Result<SystemTime, ClientError> {
        let (doc, plan) = discover(&self.inner.location, &self.inner.base).await?;
        let expires = doc.expires_at();
        for line in &plan.skipped {
            tracing::info!(pvd = %self.url(), "PvD proxy not used: {line}");
        }
        if plan.tcp.is_empty() && plan.udp.is_empty() {
            return Err(ClientError::Discovery(format!(
                "{} lists no proxy this client can use{}",
                self.url(),
                if plan.skipped.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", plan.skipped.join("; "))
                }
            )));
        }
        let key = plan.key();
        let mut state = self.inner.state.write().unwrap();
        match &mut *state {
            Some(active) if active.key == key => active.expires = expires,
            _ => {
                let set = |configs: Vec<ClientConfig>| -> Result<Option<RelaySet>, ClientError> {
                    if configs.is_empty() {
                        return Ok(None);
                    }
                    let set = RelaySet::new(configs, self.inner.policy)?;
                    let warm = set.clone();
                    tokio::spawn(async move {
                        for (relay, result) in warm.warm_up().await {
                            if let Err(e) = result {
                                tracing::warn!(%relay, error = %e, "discovered relay unreachable; retrying in the background");
                            }
                        }
                    });
                    Ok(Some(set))
                };
                let active = Active {
                    tcp: set(plan.tcp)?,
                    udp: set(plan.udp)?,
                    key,
                    expires,
                };
                let (tcp, udp) = (
                    active.tcp.as_ref().map_or(0, |s| s.status().len()),
                    active.udp.as_ref().map_or(0, |s| s.status().len()),
                );
                tracing::info!(pvd = %self.url(), tcp_relays = tcp, udp_relays = udp, "relay set from the PvD");
                *state = Some(active);
            }
        }
        *self.inner.last_expires.lock().unwrap() = Some(expires);
        Ok(expires)
    }

    /// The relay sets in use, unless the PvD has expired.
    fn active(&self) -> Result<Active, ClientError> {
        let now = SystemTime::now();
        {
            let state = self.inner.state.read().unwrap();
            if let Some(a) = &*state {
                if now < a.expires {
                    return Ok(a.clone());
                }
            }
        }
        self.drop_expired(now);
        let when = self
            .inner
            .last_expires
            .lock()
            .unwrap()
            .map(|t| format!(" at {}", time::OffsetDateTime::from(t)))
            .unwrap_or_default();
        Err(ClientError::NoRelay(format!(
            "the PvD from {} expired{when} and could not be refreshed: no usable relay",
            self.url()
        )))
    }

    //= https://datatracker.ietf.org/doc/html/draft-ietf-intarea-proxy-config-14#section-2
    //# A client MAY cache the information it obtained from PvD Additional Information, but it
    //# MUST discard cached information if:
    //#
    //# - The current time is beyond the "expires" value
    fn drop_expired(&self, now: SystemTime) {
        let mut state = self.inner.state.write().unwrap();
        if state.as_ref().is_some_and(|a| now >= a.expires) {
            tracing::error!(pvd = %self.url(), "PvD expired and could not be refreshed: no usable relay until a refresh succeeds");
            *state = None;
        }
    }

    /// Closes every relay connection.
    pub async fn close(&self) {
        let active = self.inner.state.read().unwrap().clone();
        if let Some(a) = active {
            for set in [a.tcp, a.udp].into_iter().flatten() {
                set.close().await;
            }
        }
    }
}

impl TunnelOpener for Discovery {
    async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        let set = self.active()?.tcp.ok_or_else(|| {
            ClientError::NoRelay(format!(
                "the PvD from {} lists no https-connect proxy",
                self.url()
            ))
        })?;
        set.connect_tcp(target).await
    }

    async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        let set = self.active()?.udp.ok_or_else(|| {
            ClientError::NoRelay(format!(
                "the PvD from {} lists no connect-udp proxy",
                self.url()
            ))
        })?;
        set.connect_udp(target).await
    }
}

/// When to refresh a PvD fetched at `fetched` that expires at `expires`.
pub fn refresh_delay(fetched: SystemTime, expires: SystemTime) -> Duration {
    //= https://www.rfc-editor.org/rfc/rfc8801#section-4.1
    //# When a host last retrieved an object at time A including a validity time B, and is
    //# configured to keep the object up to date, it MUST perform the update at a uniformly
    //# random time in the interval [(B-A)/2,B].
    let life = expires.duration_since(fetched).unwrap_or_default();
    let at = rand::thread_rng().gen_range(life / 2..=life);
    at.saturating_sub(fetched.elapsed().unwrap_or_default())
}

/// Refreshes the PvD on the RFC 8801 schedule; after a failure retries within the remaining
/// lifetime, and after expiry with a doubling back-off. Ends when the [`Discovery`] is dropped.
async fn refresh_loop(inner: Weak<Inner>, first: Duration) {
    let mut delay = first;
    let mut backoff = MIN_RETRY;
    loop {
        tokio::time::sleep(delay).await;
        let Some(inner) = inner.upgrade() else { return };
        let d = Discovery { inner };
        let fetched = SystemTime::now();
        match d.refresh().await {
            Ok(expires) => {
                backoff = MIN_RETRY;
                delay = refresh_delay(fetched, expires);
            }
            Err(e) => {
                d.inner
                    .refresh_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let now = SystemTime::now();
                match d.expires().and_then(|t| t.duration_since(now).ok()) {
                    Some(left) => {
                        tracing::warn!(pvd = %d.url(), error = %e, left_secs = left.as_secs(), "PvD refresh failed; keeping the last good relay set until it expires");
                        // Several tries before expiry, none sooner than a second apart.
                        delay = (left / 4)
                            .clamp(Duration::from_millis(250), Duration::from_secs(30))
                            .min(left);
                        if delay.is_zero() {
                            delay = Duration::from_millis(250);
                        }
                    }
                    None => {
                        d.drop_expired(now);
                        tracing::warn!(pvd = %d.url(), error = %e, "PvD refresh failed; no usable relay");
                        delay = backoff;
                        backoff = (backoff * 2).min(MAX_RETRY);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Trust;

    #[test]
    fn location_from_host_port_or_url() {
        let l = PvdLocation::parse("relay.example.net").unwrap();
        assert_eq!(l.url(), "https://relay.example.net:443/.well-known/pvd");
        assert_eq!(l.host, "relay.example.net");
        let l = PvdLocation::parse("relay.example.net:4433").unwrap();
        assert_eq!(l.url(), "https://relay.example.net:4433/.well-known/pvd");
        let l = PvdLocation::parse("https://[::1]:8443/pvd.json").unwrap();
        assert_eq!((l.host.as_str(), l.path.as_str()), ("::1", "/pvd.json"));
        let l = PvdLocation::parse("https://a.example/").unwrap();
        assert_eq!(l.path, "/.well-known/pvd");
        for bad in [
            "http://a.example",
            "a.example/pvd",
            "ftp://a",
            "a.example:0",
        ] {
            assert!(PvdLocation::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            l.redirect("/elsewhere").unwrap().url(),
            "https://a.example:443/elsewhere"
        );
        assert!(l.redirect("http://a.example/x").is_err());
    }

    #[test]
    fn refresh_is_scheduled_between_half_life_and_expiry() {
        let now = SystemTime::now();
        for _ in 0..200 {
            let d = refresh_delay(now, now + Duration::from_secs(100));
            assert!(
                d <= Duration::from_secs(100) && d >= Duration::from_secs(49),
                "{d:?}"
            );
        }
    }

    #[test]
    fn plan_keeps_h3_connect_udp_and_https_connect_and_names_the_rest() {
        let doc = pvd::parse(
            br#"{"identifier":"a.example","expires":"2099-01-01T00:00:00Z","prefixes":[],
            "proxies":[
              {"protocol":"connect-udp","proxy":"https://a.example:4433/m/{target_host}/{target_port}","alpn":["h3","h2"]},
              {"protocol":"https-connect","proxy":"a.example:4433"},
              {"protocol":"https-connect","proxy":"b.example:443","alpn":["h2"]},
              {"protocol":"socks5","proxy":"a.example:1080"},
              {"protocol":"connect-udp","proxy":"https://c.example/u/{target_host}/{target_port}","mandatory":["example_x"],"example_x":1}
            ]}"#,
        )
        .unwrap();
        let base = ClientConfig::new("https://unused", Trust::System);
        let plan = plan_relays(&doc, &base);
        assert_eq!(plan.udp.len(), 1);
        assert_eq!(plan.udp[0].relay, "https://a.example:4433");
        let target = Target::new("192.0.2.1", 53).unwrap();
        assert_eq!(
            plan.udp[0].udp_template.as_ref().unwrap().expand(&target),
            "/m/192.0.2.1/53"
        );
        assert_eq!(plan.tcp.len(), 1);
        assert_eq!(plan.tcp[0].relay, "https://a.example:4433");
        assert_eq!(plan.skipped.len(), 3, "{:?}", plan.skipped);
        let all = plan.skipped.join("\n");
        assert!(
            all.contains("no h3") && all.contains("socks5") && all.contains("example_x"),
            "{all}"
        );
    }
}
