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
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cfr_proto::Target;
use rand::seq::SliceRandom;

use crate::{ClientConfig, ClientError, RelayClient, TcpTunnel, TunnelOpener, UdpTunnel};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
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
}

struct Relay {
    cfg: ClientConfig,
    client: tokio::sync::Mutex<Option<RelayClient>>,
    health: Mutex<Health>,
}

impl Relay {
    fn new(cfg: ClientConfig) -> Relay {
        Relay {
            cfg,
            client: tokio::sync::Mutex::new(None),
            health: Mutex::new(Health::default()),
        }
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

    /// The relay's client, connecting first if there is none yet.
    async fn client(&self) -> Result<RelayClient, ClientError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let started = Instant::now();
        let c = RelayClient::connect(self.cfg.clone()).await?;
        self.mark_up(Some(started.elapsed()));
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A live connection (re-established if needed) and its RTT; marks the relay up or down.
    async fn probe(&self) -> Result<Duration, ClientError> {
        let result = match self.client().await {
            Ok(c) => c.rtt_probe().await,
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
        F: Fn(RelayClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut last = None;
        for relay in self.candidates() {
            let result = match relay.client().await {
                Ok(c) => open(c).await,
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
            if let Some(c) = r.client.lock().await.take() {
                c.close();
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
        let due = set
            .relays
            .iter()
            .filter(|r| r.retry_due(now) || (refresh_rtt && r.is_up()));
        futures_util::future::join_all(due.map(|r| async move {
            let _ = r.probe().await;
        }))
        .await;
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
