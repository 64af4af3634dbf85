//! Admission control for client connections: how many a client, and the relay as a whole, may
//! hold open, and how fast a client may start QUIC handshakes. A leaf module: every front-end asks
//! it before it spends a handshake.
//!
//! A "client" is a source prefix, not an address: one IPv6 host owns a whole /64 (RFC 4291 §2.5.1
//! interface identifiers, RFC 8981 temporary addresses), so counting per address would give it
//! 2^64 times the limit.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How many leading bits of a source address name one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientPrefix {
    pub v4: u8,
    pub v6: u8,
}

impl ClientPrefix {
    /// The client an address belongs to: the address with its host bits cleared. IPv4-mapped
    /// IPv6 addresses count as the IPv4 client they are.
    pub(crate) fn client_of(self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

/// Open connections per client prefix, and in total.
#[derive(Debug)]
pub(crate) struct ClientTable {
    per_client: u32,
    total: u32,
    prefix: ClientPrefix,
    inner: Mutex<(HashMap<IpAddr, u32>, u32)>,
}

/// One admitted connection's place in the [`ClientTable`]; freed on drop.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    table: Arc<ClientTable>,
    ip: IpAddr,
}

impl ClientTable {
    pub(crate) fn new(per_client: u32, total: u32, prefix: ClientPrefix) -> Self {
        Self {
            per_client,
            total,
            prefix,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// A slot for one more connection from `ip`, unless that client or the relay is at its limit.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let ip = self.prefix.client_of(ip);
        let mut g = self.inner.lock().expect("client table");
        let (map, count) = &mut *g;
        if *count >= self.total {
            return None;
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        *count += 1;
        Some(ClientSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut g = self.table.inner.lock().expect("client table");
        let (map, count) = &mut *g;
        *count -= 1;
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What to do with a new QUIC connection attempt (an Initial).
#[derive(Debug)]
pub(crate) enum HandshakeVerdict {
    /// Go ahead; the guard counts the handshake as half-open until it is dropped.
    Accept(HalfOpen),
    /// Answer with a Retry (RFC 9000 §8.1.2): the client must prove it owns its address before
    /// the relay keeps any state for it.
    Retry,
    /// Refuse (CONNECTION_CLOSE): a validated client over its handshake rate.
    Refuse,
}

/// Handshake rate per client prefix (a token bucket each) and the relay-wide count of handshakes
/// in progress. An Initial from an unvalidated address that would exceed either gets a Retry, so
/// a flood from spoofed addresses costs a stateless packet each, never a connection.
#[derive(Debug)]
pub(crate) struct HandshakeGate {
    /// Handshakes per second a client may start; also the bucket size (one second of burst).
    rate: f64,
    /// Handshakes in progress above which unvalidated Initials are asked to Retry.
    half_open_limit: usize,
    prefix: ClientPrefix,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    half_open: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Most client buckets kept; beyond, unvalidated Initials get a Retry until full buckets are
/// pruned, so spoofed sources cannot grow the table without bound.
const MAX_BUCKETS: usize = 1 << 16;

/// One handshake in progress, counted in [`HandshakeGate`] until dropped.
#[derive(Debug)]
pub(crate) struct HalfOpen(Arc<AtomicUsize>);

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HandshakeGate {
    pub(crate) fn new(rate_per_sec: u32, half_open_limit: usize, prefix: ClientPrefix) -> Self {
        Self {
            rate: f64::from(rate_per_sec),
            half_open_limit,
            prefix,
            buckets: Mutex::new(HashMap::new()),
            half_open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Handshakes in progress.
    pub(crate) fn half_open(&self) -> usize {
        self.half_open.load(Ordering::Relaxed)
    }

    /// The verdict for an Initial from `ip`; `validated` when the client already proved its
    /// address (it echoed a Retry token).
    pub(crate) fn verdict(&self, ip: IpAddr, validated: bool, now: Instant) -> HandshakeVerdict {
        let client = self.prefix.client_of(ip);
        let busy = self.half_open() >= self.half_open_limit;
        let mut buckets = self.buckets.lock().expect("handshake buckets");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&client) {
            let rate = self.rate;
            buckets.retain(|_, b| b.refilled(rate, now) < rate);
        }
        let full = buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&client);
        let available = buckets
            .get(&client)
            .map_or(self.rate, |b| b.refilled(self.rate, now));
        if !validated && (busy || full || available < 1.0) {
            return HandshakeVerdict::Retry;
        }
        if available < 1.0 || full {
            return HandshakeVerdict::Refuse;
        }
        buckets.insert(
            client,
            Bucket {
                tokens: available - 1.0,
                at: now,
            },
        );
        self.half_open.fetch_add(1, Ordering::Relaxed);
        HandshakeVerdict::Accept(HalfOpen(self.half_open.clone()))
    }
}

impl Bucket {
    fn refilled(&self, rate: f64, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + secs * rate).min(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_client_and_in_total_and_freed_on_drop() {
        let table = Arc::new(ClientTable::new(2, 3, ClientPrefix { v4: 32, v6: 64 }));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = table.admit(a).expect("first from a");
        let _a2 = table.admit(a).expect("second from a");
        assert!(
            table.admit(a).is_none(),
            "a third from one client is refused"
        );
        let _b1 = table.admit(b).expect("first from b");
        assert!(table.admit(b).is_none(), "the relay-wide total is 3");
        drop(a1);
        assert!(table.admit(b).is_some(), "a freed slot can be taken again");
    }

    #[test]
    fn one_ipv6_slash64_is_one_client() {
        let table = Arc::new(ClientTable::new(2, 100, ClientPrefix { v4: 32, v6: 64 }));
        let _a = table.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _b = table
            .admit("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        assert!(
            table
                .admit("2001:db8:1:2:abcd::1".parse().unwrap())
                .is_none(),
            "a third address of the same /64 shares its two slots"
        );
        assert!(table.admit("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _c = table.admit("192.0.2.1".parse().unwrap()).unwrap();
        let mapped = table.admit("::ffff:192.0.2.1".parse().unwrap());
        assert!(
            mapped.is_some(),
            "IPv4-mapped is the same IPv4 client (second slot)"
        );
        assert!(table.admit("192.0.2.1".parse().unwrap()).is_none());
        assert!(
            table.admit("192.0.2.2".parse().unwrap()).is_some(),
            "/32 for IPv4"
        );
    }

    #[test]
    fn handshake_rate_retries_unvalidated_then_refuses_validated_and_refills() {
        let gate = HandshakeGate::new(2, 100, ClientPrefix { v4: 24, v6: 64 });
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let same_client: IpAddr = "192.0.2.200".parse().unwrap();
        let a = gate.verdict(ip, false, t0);
        let b = gate.verdict(same_client, false, t0);
        assert!(matches!(
            (&a, &b),
            (HandshakeVerdict::Accept(_), HandshakeVerdict::Accept(_))
        ));
        assert_eq!(gate.half_open(), 2);
        assert!(matches!(
            gate.verdict(ip, false, t0),
            HandshakeVerdict::Retry
        ));
        assert!(matches!(
            gate.verdict(ip, true, t0),
            HandshakeVerdict::Refuse
        ));
        assert!(
            matches!(
                gate.verdict("192.0.3.1".parse().unwrap(), false, t0),
                HandshakeVerdict::Accept(_)
            ),
            "another /24 has its own bucket"
        );
        let later = t0 + std::time::Duration::from_millis(600);
        assert!(matches!(
            gate.verdict(ip, true, later),
            HandshakeVerdict::Accept(_)
        ));
        drop((a, b));
        assert_eq!(gate.half_open(), 0, "every guard dropped");
    }

    #[test]
    fn many_half_open_handshakes_make_unvalidated_initials_retry() {
        let gate = HandshakeGate::new(1000, 2, ClientPrefix { v4: 32, v6: 64 });
        let now = Instant::now();
        let held: Vec<_> = (1..=2u8)
            .map(|i| gate.verdict(IpAddr::from([192, 0, 2, i]), false, now))
            .collect();
        let ip = IpAddr::from([198, 51, 100, 1]);
        assert!(matches!(
            gate.verdict(ip, false, now),
            HandshakeVerdict::Retry
        ));
        assert!(
            matches!(gate.verdict(ip, true, now), HandshakeVerdict::Accept(_)),
            "a validated address is served even when busy"
        );
        drop(held);
    }
}
