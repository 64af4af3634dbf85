//! Relay selection across several relays.
//!
//! - [`Policy::Random`] (default): a uniformly random usable relay per tunnel.
//! - [`Policy::LowestRtt`]: the usable relay with the lowest round-trip time (measured by the
//!   handshake, refreshed from QUIC's RTT estimate every [`PROBE_INTERVAL`]).
//! - [`Policy::Ordered`]: the first usable relay in configuration order (failover).
//!
//! A relay whose connection fails is marked down and no new tunnel is sent to it while another
//! relay is usable. A background health task retries it in the background once its back-off
//! (1 s doubling to [`MAX_BACKOFF`]) expires, and marks it usable again only when a handshake
//! succeeds, so no tunnel ever waits for a dead relay's handshake timeout while another relay
//! works. A new tunnel tries the next relay as soon as one fails, so it fails over within about
//! one handshake timeout; an open tunnel never moves (it lives on one QUIC connection). When every
//! relay is down, new tunnels still try them all (earliest retry first) rather than fail at once.
//!
//! Transport ([`TransportMode::Auto`], the default): a relay is reached over HTTP/3 first; when
//! its QUIC/HTTP/3 handshake fails or times out (UDP blocked on the path), the relay's TLS/TCP
//! front-end on the same host and port is used instead (HTTP/2 if the relay offers it by ALPN,
//! else HTTP/1.1), for TCP tunnels and for connect-udp with capsules. HTTP/3 is retried in the
//! background (back-off [`H3_RETRY_MIN`] doubling to [`MAX_BACKOFF`]) and takes over for new
//! tunnels once its handshake succeeds. Every change of transport is logged with the relay URL.
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cfr_proto::Target;
use rand::seq::SliceRandom;

use crate::{
    ClientConfig, ClientError, FrontClient, RelayClient, TcpTunnel, TransportMode, TunnelOpener,
    UdpTunnel,
};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// First retry of HTTP/3 after falling back to TLS/TCP; each retry may wait a whole handshake
/// timeout on a path that drops UDP, so they start less eagerly than relay retries.
pub const H3_RETRY_MIN: Duration = Duration::from_secs(5);
/// How often the health task looks for down relays whose back-off expired.
const HEALTH_TICK: Duration = Duration::from_millis(250);

/// How a relay is chosen for each new tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Random,
    LowestRtt,
    Ordered,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Policy::Random),
            "lowest-rtt" => Ok(Policy::LowestRtt),
            "ordered" => Ok(Policy::Ordered),
            other => Err(format!(
                "unknown relay selection policy {other:?} (random, lowest-rtt, ordered)"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Random => "random",
            Policy::LowestRtt => "lowest-rtt",
            Policy::Ordered => "ordered",
        })
    }
}

#[derive(Debug, Clone, Default)]
struct Health {
    down: bool,
    /// When the health task may try a down relay again.
    retry_at: Option<Instant>,
    backoff: Duration,
    rtt: Option<Duration>,
    /// On the TLS/TCP fallback: when the health task tries HTTP/3 again, and the back-off.
    h3_retry_at: Option<Instant>,
    h3_backoff: Duration,
}

/// How new tunnels reach one relay.
#[derive(Clone)]
enum Transport {
    H3(RelayClient),
    TlsTcp(FrontClient),
}

impl Transport {
    /// `h3`, `h2` or `http/1.1`.
    fn protocol(&self) -> &'static str {
        match self {
            Transport::H3(_) => "h3",
            Transport::TlsTcp(f) => f.version().alpn(),
        }
    }

    fn is(&self, other: &Transport) -> bool {
        match (self, other) {
            (Transport::H3(a), Transport::H3(b)) => a.same_as(b),
            (Transport::TlsTcp(a), Transport::TlsTcp(b)) => a.same_as(b),
            _ => false,
        }
    }

    async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        match self {
            Transport::H3(c) => c.connect_tcp(target).await,
            Transport::TlsTcp(c) => c.connect_tcp(target).await,
        }
    }

    async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        match self {
            Transport::H3(c) => c.connect_udp(target).await,
            Transport::TlsTcp(c) => c.connect_udp(target).await,
        }
    }

    async fn rtt_probe(&self) -> Result<Duration, ClientError> {
        match self {
            Transport::H3(c) => c.rtt_probe().await,
            Transport::TlsTcp(c) => c.rtt_probe().await,
        }
    }

    fn close(&self) {
        match self {
            Transport::H3(c) => c.close(),
            // HTTP/2 closes once the client and its last stream are dropped; HTTP/1.1 tunnels
            // own their connections.
            Transport::TlsTcp(_) => {}
        }
    }
}

struct Relay {
    cfg: ClientConfig,
    transport: tokio::sync::Mutex<Option<Transport>>,
    health: Mutex<Health>,
}

impl Relay {
    fn new(cfg: ClientConfig) -> Relay {
        Relay {
            cfg,
            transport: tokio::sync::Mutex::new(None),
            health: Mutex::new(Health::default()),
        }
    }

    /// Connects by the config's [`TransportMode`]: HTTP/3, falling back to TLS/TCP in `Auto`.
    async fn connect_transport(&self) -> Result<Transport, ClientError> {
        match self.cfg.transport {
            TransportMode::H3 => Ok(Transport::H3(RelayClient::connect(self.cfg.clone()).await?)),
            TransportMode::TlsTcp => Ok(Transport::TlsTcp(FrontClient::connect(&self.cfg).await?)),
            TransportMode::Auto => match RelayClient::connect(self.cfg.clone()).await {
                Ok(c) => {
                    self.health.lock().unwrap().h3_retry_at = None;
                    Ok(Transport::H3(c))
                }
                Err(h3) if h3.is_relay_failure() => self.fall_back(&h3).await,
                Err(e) => Err(e),
            },
        }
    }

    /// The TLS/TCP front-end after HTTP/3 failed with `h3`.
    async fn fall_back(&self, h3: &ClientError) -> Result<Transport, ClientError> {
        match FrontClient::connect(&self.cfg).await {
            Ok(f) => {
                tracing::warn!(relay = %self.cfg.relay, http3_error = %h3, transport = f.version().alpn(),
                    "HTTP/3 to the relay failed; using its TLS/TCP front-end over {} (HTTP/3 is retried in the background)", f.version());
                let mut h = self.health.lock().unwrap();
                h.h3_backoff = H3_RETRY_MIN;
                h.h3_retry_at = Some(Instant::now() + H3_RETRY_MIN);
                Ok(Transport::TlsTcp(f))
            }
            Err(tcp) => Err(ClientError::Connect(format!(
                "HTTP/3: {h3}; TLS/TCP front-end: {tcp}"
            ))),
        }
    }

    /// The transport for new tunnels, connecting first if there is none yet.
    async fn transport(&self) -> Result<Transport, ClientError> {
        let mut slot = self.transport.lock().await;
        if let Some(t) = &*slot {
            return Ok(t.clone());
        }
        let started = Instant::now();
        let t = self.connect_transport().await?;
        if let Transport::H3(_) = t {
            tracing::info!(relay = %self.cfg.relay, transport = "h3", "relay reached over HTTP/3");
        }
        self.mark_up(Some(started.elapsed()));
        *slot = Some(t.clone());
        Ok(t)
    }

    /// After `failed` failed with `why`: the TLS/TCP front-end if HTTP/3 failed in `Auto` mode,
    /// or a fresh start with HTTP/3 if the fallback itself failed. `None`: nothing else to try
    /// now (the clients reconnect by themselves on the next tunnel).
    async fn recover(&self, failed: &Transport, why: &ClientError) -> Option<Transport> {
        if self.cfg.transport != TransportMode::Auto {
            return None;
        }
        let mut slot = self.transport.lock().await;
        match &*slot {
            // Someone else already replaced it.
            Some(t) if !t.is(failed) => return Some(t.clone()),
            _ => {}
        }
        let next = match failed {
            Transport::H3(_) => self.fall_back(why).await.ok()?,
            Transport::TlsTcp(_) => {
                *slot = None;
                let t = self.connect_transport().await.ok()?;
                if let Transport::H3(_) = t {
                    tracing::info!(relay = %self.cfg.relay, transport = "h3", "relay reached over HTTP/3 again");
                }
                t
            }
        };
        if let Some(old) = slot.replace(next.clone()) {
            old.close();
        }
        Some(next)
    }

    /// On the TLS/TCP fallback, whether the health task should try HTTP/3 again.
    fn h3_retry_due(&self, now: Instant) -> bool {
        self.cfg.transport == TransportMode::Auto
            && self
                .health
                .lock()
                .unwrap()
                .h3_retry_at
                .is_some_and(|t| t <= now)
    }

    /// One HTTP/3 handshake while on the fallback; on success new tunnels use HTTP/3.
    async fn retry_h3(&self) {
        match RelayClient::connect(self.cfg.clone()).await {
            Ok(c) => {
                let mut slot = self.transport.lock().await;
                if let Some(old) = slot.replace(Transport::H3(c)) {
                    old.close();
                }
                self.health.lock().unwrap().h3_retry_at = None;
                tracing::info!(relay = %self.cfg.relay, transport = "h3", "HTTP/3 to the relay works again; new tunnels use it");
            }
            Err(e) => {
                let mut h = self.health.lock().unwrap();
                h.h3_backoff = (h.h3_backoff * 2).clamp(H3_RETRY_MIN, MAX_BACKOFF);
                h.h3_retry_at = Some(Instant::now() + h.h3_backoff);
                tracing::debug!(relay = %self.cfg.relay, error = %e, backoff = ?h.h3_backoff, "HTTP/3 to the relay still fails; staying on TLS/TCP");
            }
        }
    }

    /// The protocol new tunnels use now, if connected.
    fn protocol(&self) -> Option<&'static str> {
        self.transport
            .try_lock()
            .ok()
            .and_then(|t| t.as_ref().map(Transport::protocol))
    }

    fn is_up(&self) -> bool {
        !self.health.lock().unwrap().down
    }

    fn retry_due(&self, now: Instant) -> bool {
        let h = self.health.lock().unwrap();
        h.down && h.retry_at.is_none_or(|t| t <= now)
    }

    fn mark_down(&self, why: &ClientError) {
        let mut h = self.health.lock().unwrap();
        h.backoff = (h.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        h.retry_at = Some(Instant::now() + h.backoff);
        if !h.down {
            tracing::warn!(relay = %self.cfg.relay, error = %why, "relay unusable; new tunnels go elsewhere until it answers again");
        } else {
            tracing::debug!(relay = %self.cfg.relay, error = %why, backoff = ?h.backoff, "relay still down");
        }
        h.down = true;
    }

    fn mark_up(&self, rtt: Option<Duration>) {
        let mut h = self.health.lock().unwrap();
        if h.down {
            tracing::info!(relay = %self.cfg.relay, "relay usable again");
        }
        h.down = false;
        h.retry_at = None;
        h.backoff = Duration::ZERO;
        if rtt.is_some() {
            h.rtt = rtt;
        }
    }

    /// A live connection (re-established, or switched to the fallback, if needed) and its RTT;
    /// marks the relay up or down.
    async fn probe(&self) -> Result<Duration, ClientError> {
        let result = match self.transport().await {
            Ok(t) => match t.rtt_probe().await {
                Ok(rtt) => Ok(rtt),
                Err(e) if e.is_relay_failure() => match self.recover(&t, &e).await {
                    Some(next) => next.rtt_probe().await,
                    None => Err(e),
                },
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match &result {
            Ok(rtt) => self.mark_up(Some(*rtt)),
            Err(e) => self.mark_down(e),
        }
        result
    }
}

/// The state of one relay, for status displays.
#[derive(Debug, Clone)]
pub struct RelayStatus {
    pub relay: String,
    pub up: bool,
    pub rtt: Option<Duration>,
    /// What new tunnels travel on: `h3`, or on the TLS/TCP fallback `h2` or `http/1.1`;
    /// `None` before the first connection.
    pub protocol: Option<&'static str>,
}

struct SetInner {
    relays: Vec<Relay>,
    policy: Policy,
    health_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for SetInner {
    fn drop(&mut self) {
        if let Some(t) = self.health_task.lock().unwrap().take() {
            t.abort();
        }
    }
}

/// Several relays behind one [`TunnelOpener`]. Cheap to clone.
#[derive(Clone)]
pub struct RelaySet {
    inner: Arc<SetInner>,
}

impl RelaySet {
    /// A set that connects lazily: every config is checked now (URL, trust anchors, token), no
    /// relay is contacted. Call [`RelaySet::warm_up`] to connect ahead of the first tunnel.
    /// Starts the background health task, so it must run inside a Tokio runtime.
    pub fn new(configs: Vec<ClientConfig>, policy: Policy) -> Result<RelaySet, ClientError> {
        if configs.is_empty() {
            return Err(ClientError::NoRelay("no relay configured".into()));
        }
        for c in &configs {
            c.validate()?;
        }
        let set = RelaySet {
            inner: Arc::new(SetInner {
                relays: configs.into_iter().map(Relay::new).collect(),
                policy,
                health_task: Mutex::new(None),
            }),
        };
        let weak = Arc::downgrade(&set.inner);
        *set.inner.health_task.lock().unwrap() = Some(tokio::spawn(health_loop(weak)));
        Ok(set)
    }

    /// Connects to every relay in parallel (each within its own `connect_timeout`) and returns
    /// each relay's outcome in configuration order. Relays that fail are marked down and retried
    /// in the background.
    pub async fn warm_up(&self) -> Vec<(String, Result<Duration, ClientError>)> {
        futures_util::future::join_all(
            self.inner
                .relays
                .iter()
                .map(|r| async move { (r.cfg.relay.clone(), r.probe().await) }),
        )
        .await
    }

    /// [`RelaySet::new`] + [`RelaySet::warm_up`]; fails if no relay is reachable.
    pub async fn connect(
        configs: Vec<ClientConfig>,
        policy: Policy,
    ) -> Result<RelaySet, ClientError> {
        let set = RelaySet::new(configs, policy)?;
        let results = set.warm_up().await;
        if !results.iter().any(|(_, r)| r.is_ok()) {
            let why = results
                .into_iter()
                .map(|(relay, r)| {
                    format!(
                        "{relay}: {}",
                        r.err().map(|e| e.to_string()).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ClientError::NoRelay(format!("no relay reachable ({why})")));
        }
        Ok(set)
    }

    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    pub fn status(&self) -> Vec<RelayStatus> {
        self.inner
            .relays
            .iter()
            .map(|r| RelayStatus {
                relay: r.cfg.relay.clone(),
                up: r.is_up(),
                rtt: r.health.lock().unwrap().rtt,
                protocol: r.protocol(),
            })
            .collect()
    }

    /// Candidate relays for a new tunnel, best first: usable ones in policy order; only when none
    /// is usable, the down ones by earliest retry time (a last resort).
    fn candidates(&self) -> Vec<&Relay> {
        let (mut up, mut down): (Vec<&Relay>, Vec<&Relay>) =
            self.inner.relays.iter().partition(|r| r.is_up());
        match self.inner.policy {
            Policy::Random => up.shuffle(&mut rand::thread_rng()),
            Policy::LowestRtt => {
                up.sort_by_key(|r| r.health.lock().unwrap().rtt.unwrap_or(Duration::MAX))
            }
            Policy::Ordered => {}
        }
        if up.is_empty() {
            down.sort_by_key(|r| r.health.lock().unwrap().retry_at);
            return down;
        }
        up
    }

    async fn open<T, F, Fut>(&self, open: F) -> Result<T, ClientError>
    where
        F: Fn(Transport) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut last = None;
        for relay in self.candidates() {
            let result = match relay.transport().await {
                Ok(t) => match open(t.clone()).await {
                    // HTTP/3 failed (or the fallback did): switch this relay's transport and
                    // retry there before giving up on the relay.
                    Err(e) if e.is_relay_failure() => match relay.recover(&t, &e).await {
                        Some(next) => open(next).await,
                        None => Err(e),
                    },
                    r => r,
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(t) => {
                    relay.mark_up(None);
                    return Ok(t);
                }
                // The relay answered: that is its verdict on this destination, not a relay failure.
                Err(e) if !e.is_relay_failure() => return Err(e),
                Err(e) => {
                    relay.mark_down(&e);
                    last = Some(e);
                }
            }
        }
        Err(ClientError::NoRelay(
            last.map(|e| e.to_string())
                .unwrap_or_else(|| "all relays down".into()),
        ))
    }

    pub async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        self.open(|c| async move { c.connect_tcp(target).await })
            .await
    }

    pub async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        self.open(|c| async move { c.connect_udp(target).await })
            .await
    }

    /// Closes every relay connection.
    pub async fn close(&self) {
        for r in &self.inner.relays {
            if let Some(t) = r.transport.lock().await.take() {
                t.close();
            }
        }
    }
}

impl TunnelOpener for RelaySet {
    async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        RelaySet::connect_tcp(self, target).await
    }
    async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        RelaySet::connect_udp(self, target).await
    }
}

/// Retries down relays whose back-off expired and, for [`Policy::LowestRtt`], refreshes the RTT
/// of usable relays every [`PROBE_INTERVAL`]. Ends when the set is dropped.
async fn health_loop(set: Weak<SetInner>) {
    let mut last_rtt_refresh = Instant::now();
    loop {
        tokio::time::sleep(HEALTH_TICK).await;
        let Some(set) = set.upgrade() else { return };
        let now = Instant::now();
        let refresh_rtt = set.policy == Policy::LowestRtt
            && now.duration_since(last_rtt_refresh) >= PROBE_INTERVAL;
        if refresh_rtt {
            last_rtt_refresh = now;
        }
        let due = set.relays.iter().filter_map(|r| {
            if r.retry_due(now) || (refresh_rtt && r.is_up()) {
                Some(futures_util::future::Either::Left(async move {
                    let _ = r.probe().await;
                }))
            } else if r.is_up() && r.h3_retry_due(now) {
                Some(futures_util::future::Either::Right(r.retry_h3()))
            } else {
                None
            }
        });
        futures_util::future::join_all(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses_cli_names() {
        assert_eq!("random".parse(), Ok(Policy::Random));
        assert_eq!("lowest-rtt".parse(), Ok(Policy::LowestRtt));
        assert_eq!("ordered".parse(), Ok(Policy::Ordered));
        assert!("fastest".parse::<Policy>().is_err());
        for p in [Policy::Random, Policy::LowestRtt, Policy::Ordered] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
    }

    fn relay(url: &str) -> Relay {
        Relay::new(ClientConfig::new(url, crate::Trust::System))
    }

    fn set_of(policy: Policy, urls: &[&str]) -> RelaySet {
        RelaySet {
            inner: Arc::new(SetInner {
                relays: urls.iter().map(|u| relay(u)).collect(),
                policy,
                health_task: Mutex::new(None),
            }),
        }
    }

    fn names(set: &RelaySet) -> Vec<String> {
        set.candidates()
            .iter()
            .map(|r| r.cfg.relay.clone())
            .collect()
    }

    #[test]
    fn down_relay_backs_off_exponentially_and_stays_down_until_it_answers() {
        let r = relay("https://a");
        assert!(r.is_up());
        r.mark_down(&ClientError::Timeout);
        assert_eq!(r.health.lock().unwrap().backoff, MIN_BACKOFF);
        assert!(!r.is_up());
        assert!(!r.retry_due(Instant::now()));
        assert!(r.retry_due(Instant::now() + MIN_BACKOFF));
        // An expired back-off only makes it due for a background retry, not usable.
        assert!(!r.is_up());
        r.mark_down(&ClientError::Timeout);
        assert_eq!(r.health.lock().unwrap().backoff, 2 * MIN_BACKOFF);
        for _ in 0..20 {
            r.mark_down(&ClientError::Timeout);
        }
        assert_eq!(r.health.lock().unwrap().backoff, MAX_BACKOFF);
        r.mark_up(None);
        assert!(r.is_up());
        assert!(!r.retry_due(Instant::now() + MAX_BACKOFF));
    }

    #[test]
    fn ordered_and_lowest_rtt_candidates_skip_down_relays() {
        let set = set_of(Policy::Ordered, &["https://a", "https://b", "https://c"]);
        set.inner.relays[0].mark_down(&ClientError::Timeout);
        assert_eq!(names(&set), ["https://b", "https://c"]);

        let set = set_of(Policy::LowestRtt, &["https://a", "https://b", "https://c"]);
        set.inner.relays[0].mark_up(Some(Duration::from_millis(30)));
        set.inner.relays[1].mark_up(Some(Duration::from_millis(10)));
        assert_eq!(names(&set), ["https://b", "https://a", "https://c"]);
        for r in &set.inner.relays {
            r.mark_down(&ClientError::Timeout);
        }
        assert_eq!(set.candidates().len(), 3, "all down: still try them");
    }

    #[test]
    fn random_candidates_cover_every_usable_relay() {
        let set = set_of(Policy::Random, &["https://a", "https://b", "https://c"]);
        set.inner.relays[2].mark_down(&ClientError::Timeout);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let n = names(&set);
            assert_eq!(n.len(), 2);
            assert!(!n.contains(&"https://c".to_string()));
            firsts.insert(n[0].clone());
        }
        assert_eq!(
            firsts.len(),
            2,
            "both usable relays must come first sometimes"
        );
    }
}
