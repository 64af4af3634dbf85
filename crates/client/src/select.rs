//! Relay selection across several relays.
//!
//! - [`Policy::Random`] (default): a uniformly random usable relay per tunnel.
//! - [`Policy::LowestRtt`]: the usable relay with the lowest round-trip time (measured by the
//!   handshake, refreshed from QUIC's RTT estimate every [`PROBE_INTERVAL`]).
//! - [`Policy::Ordered`]: the first usable relay in configuration order (failover).
//!
//! A relay whose connection fails is marked down and skipped until its back-off (1 s doubling to
//! [`MAX_BACKOFF`]) expires. A new tunnel tries the next relay as soon as one fails, so it fails
//! over within about one handshake timeout; an open tunnel never moves (it lives on one QUIC
//! connection).
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cfr_proto::Target;
use rand::seq::SliceRandom;

use crate::{ClientConfig, ClientError, RelayClient, TcpTunnel, TunnelOpener, UdpTunnel};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

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

#[derive(Debug, Clone, Default)]
struct Health {
    down_until: Option<Instant>,
    backoff: Duration,
    rtt: Option<Duration>,
}

struct Relay {
    cfg: ClientConfig,
    client: tokio::sync::Mutex<Option<RelayClient>>,
    health: Mutex<Health>,
}

impl Relay {
    fn is_up(&self, now: Instant) -> bool {
        self.health
            .lock()
            .unwrap()
            .down_until
            .is_none_or(|t| t <= now)
    }

    fn mark_down(&self, why: &ClientError) {
        let mut h = self.health.lock().unwrap();
        h.backoff = (h.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        h.down_until = Some(Instant::now() + h.backoff);
        tracing::info!(relay = %self.cfg.relay, error = %why, backoff = ?h.backoff, "relay marked down");
    }

    fn mark_up(&self, rtt: Option<Duration>) {
        let mut h = self.health.lock().unwrap();
        h.down_until = None;
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
    prober: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for SetInner {
    fn drop(&mut self) {
        if let Some(t) = self.prober.lock().unwrap().take() {
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
    /// Connects to all relays in parallel (each within its own `connect_timeout`). Relays that
    /// fail are marked down; fails only if no relay is reachable or `configs` is empty.
    pub async fn connect(
        configs: Vec<ClientConfig>,
        policy: Policy,
    ) -> Result<RelaySet, ClientError> {
        if configs.is_empty() {
            return Err(ClientError::NoRelay("no relay configured".into()));
        }
        for c in &configs {
            crate::RelayUrl::parse(&c.relay)?;
        }
        let set = RelaySet {
            inner: Arc::new(SetInner {
                relays: configs
                    .into_iter()
                    .map(|cfg| Relay {
                        cfg,
                        client: tokio::sync::Mutex::new(None),
                        health: Mutex::new(Health::default()),
                    })
                    .collect(),
                policy,
                prober: Mutex::new(None),
            }),
        };
        let results = futures_util::future::join_all(set.inner.relays.iter().map(|r| async move {
            match r.client().await {
                Ok(_) => true,
                Err(e) => {
                    r.mark_down(&e);
                    false
                }
            }
        }))
        .await;
        if !results.iter().any(|ok| *ok) {
            return Err(ClientError::NoRelay("no relay reachable".into()));
        }
        if policy == Policy::LowestRtt {
            let weak = Arc::downgrade(&set.inner);
            *set.inner.prober.lock().unwrap() = Some(tokio::spawn(probe_loop(weak)));
        }
        Ok(set)
    }

    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    pub fn status(&self) -> Vec<RelayStatus> {
        let now = Instant::now();
        self.inner
            .relays
            .iter()
            .map(|r| RelayStatus {
                relay: r.cfg.relay.clone(),
                up: r.is_up(now),
                rtt: r.health.lock().unwrap().rtt,
            })
            .collect()
    }

    /// Candidate relays for a new tunnel, best first: usable ones in policy order, then the
    /// ones marked down by earliest retry time (a last resort when all are down).
    fn candidates(&self) -> Vec<&Relay> {
        let now = Instant::now();
        let (mut up, mut down): (Vec<&Relay>, Vec<&Relay>) =
            self.inner.relays.iter().partition(|r| r.is_up(now));
        match self.inner.policy {
            Policy::Random => up.shuffle(&mut rand::thread_rng()),
            Policy::LowestRtt => {
                up.sort_by_key(|r| r.health.lock().unwrap().rtt.unwrap_or(Duration::MAX))
            }
            Policy::Ordered => {}
        }
        down.sort_by_key(|r| r.health.lock().unwrap().down_until);
        if up.is_empty() {
            up.extend(down);
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

/// Refreshes RTTs of usable relays and retries down relays whose back-off expired.
async fn probe_loop(set: Weak<SetInner>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(set) = set.upgrade() else { return };
        let now = Instant::now();
        for r in &set.relays {
            if !r.is_up(now) {
                continue;
            }
            let result = match r.client().await {
                Ok(c) => c.rtt_probe().await,
                Err(e) => Err(e),
            };
            match result {
                Ok(rtt) => r.mark_up(Some(rtt)),
                Err(e) => r.mark_down(&e),
            }
        }
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
    }

    fn relay(url: &str) -> Relay {
        Relay {
            cfg: ClientConfig::new(url, crate::Trust::System),
            client: tokio::sync::Mutex::new(None),
            health: Mutex::new(Health::default()),
        }
    }

    #[test]
    fn down_relay_backs_off_exponentially_and_recovers() {
        let r = relay("https://a");
        let now = Instant::now();
        assert!(r.is_up(now));
        r.mark_down(&ClientError::Timeout);
        assert_eq!(r.health.lock().unwrap().backoff, MIN_BACKOFF);
        assert!(!r.is_up(Instant::now()));
        r.mark_down(&ClientError::Timeout);
        assert_eq!(r.health.lock().unwrap().backoff, 2 * MIN_BACKOFF);
        for _ in 0..20 {
            r.mark_down(&ClientError::Timeout);
        }
        assert_eq!(r.health.lock().unwrap().backoff, MAX_BACKOFF);
        r.mark_up(None);
        assert!(r.is_up(Instant::now()));
    }

    #[test]
    fn ordered_and_lowest_rtt_candidates_skip_down_relays() {
        let set = RelaySet {
            inner: Arc::new(SetInner {
                relays: vec![relay("https://a"), relay("https://b"), relay("https://c")],
                policy: Policy::Ordered,
                prober: Mutex::new(None),
            }),
        };
        set.inner.relays[0].mark_down(&ClientError::Timeout);
        let names: Vec<_> = set
            .candidates()
            .iter()
            .map(|r| r.cfg.relay.clone())
            .collect();
        assert_eq!(names, ["https://b", "https://c"]);

        let set = RelaySet {
            inner: Arc::new(SetInner {
                relays: vec![relay("https://a"), relay("https://b"), relay("https://c")],
                policy: Policy::LowestRtt,
                prober: Mutex::new(None),
            }),
        };
        set.inner.relays[0].mark_up(Some(Duration::from_millis(30)));
        set.inner.relays[1].mark_up(Some(Duration::from_millis(10)));
        let names: Vec<_> = set
            .candidates()
            .iter()
            .map(|r| r.cfg.relay.clone())
            .collect();
        assert_eq!(names, ["https://b", "https://a", "https://c"]);
        for r in &set.inner.relays {
            r.mark_down(&ClientError::Timeout);
        }
        assert_eq!(set.candidates().len(), 3, "all down: still try them");
    }
}
