//! The egress address pool and the per-connection policy state.
//!
//! draft-scalone-cfr-source-privacy: each tunnel's source is drawn with a CSPRNG, uniformly over the
//! whole configured pool (every prefix weighted by its size, IPv4 and IPv6 separately). There are no
//! per-client sub-ranges and no sequential or client-derived choice: those would let an observer link
//! tunnels of one client.
//!
//! An open tunnel never changes its source address. That holds by construction: the address is chosen
//! once, when the tunnel's socket is bound ([`crate::connect_tcp`], [`crate::bind_udp`]); a later draw
//! only affects tunnels opened afterwards.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use rand::rngs::OsRng;
use rand::{Rng, RngCore};

use crate::epoch::{Clock, ConnectionSalt, EpochSchedule, SystemClock};
use crate::seal::{unix_now, SealLayout, Sealer, Subscriber};
use crate::{EgressConfig, EgressError, EgressPolicy, Fallback};

/// Interface identifiers (low 64 bits of an IPv6 address) that are never issued, as inclusive ranges.
const RESERVED_IIDS: [(u64, u64); 3] = [
    // RFC 4291 §2.6.1: the all-zero IID is the Subnet-Router anycast address.
    (0, 0),
    // RFC 5453 §3 (RFC 2526): reserved subnet anycast addresses FDFF:FFFF:FFFF:FF80-FDFF:FFFF:FFFF:FFFF.
    (0xfdff_ffff_ffff_ff80, 0xfdff_ffff_ffff_ffff),
    // RFC 5453 §3: IIDs of the IANA Ethernet block, 0200:5EFF:FE00:0000-0200:5EFF:FE00:5212, 5213 (Proxy
    // Mobile IPv6, RFC 6543) and 5214-FFFF: one contiguous range.
    (0x0200_5eff_fe00_0000, 0x0200_5eff_fe00_ffff),
];

/// Redraws allowed before giving up. Every valid prefix has at most half of its addresses reserved
/// (reserved ranges and prefixes are both aligned power-of-two blocks, and a prefix inside a reserved
/// range is refused at configuration), so 128 consecutive rejections have probability ≤ 2^-128.
const MAX_DRAWS: usize = 128;

/// One configured prefix, as integers.
#[derive(Debug)]
struct Block {
    net: IpNet,
    /// Network address (host bits zero).
    base: u128,
    /// Number of host bits: the block holds 2^host_bits addresses (0..=128).
    host_bits: u32,
    /// How sealed host bits are laid out in this block, when sealing is on.
    seal_layout: Option<SealLayout>,
}

impl Block {
    fn new(net: IpNet) -> Self {
        let (base, bits) = match net {
            IpNet::V4(n) => (u128::from(u32::from(n.network())), 32),
            IpNet::V6(n) => (u128::from(n.network()), 128),
        };
        Block {
            net,
            base,
            host_bits: bits - u32::from(net.prefix_len()),
            seal_layout: None,
        }
    }

    fn is_v6(&self) -> bool {
        matches!(self.net, IpNet::V6(_))
    }

    /// Number of addresses, or `None` for 2^128 (`::/0`).
    fn size(&self) -> Option<u128> {
        1u128.checked_shl(self.host_bits)
    }

    /// Whether the address at `offset` inside this block is never issued.
    fn is_reserved(&self, offset: u128) -> bool {
        match self.net {
            IpNet::V4(n) => {
                // A /31 (RFC 3021) and a /32 have no network or broadcast address; shorter prefixes do.
                n.prefix_len() < 31 && (offset == 0 || Some(offset + 1) == self.size())
            }
            IpNet::V6(n) => {
                // A /128 is an address the operator chose on purpose: issue it as it is.
                n.prefix_len() < 128 && {
                    let iid = (self.base | offset) as u64;
                    RESERVED_IIDS
                        .iter()
                        .any(|&(lo, hi)| (lo..=hi).contains(&iid))
                }
            }
        }
    }

    /// Whether the block has at least one address that may be issued.
    fn has_usable_address(&self) -> bool {
        match self.net {
            IpNet::V4(_) => true,
            IpNet::V6(n) if n.prefix_len() == 128 || n.prefix_len() <= 64 => true,
            IpNet::V6(_) => {
                // Prefix is /65../127: its IIDs are one aligned range [lo, hi].
                let lo = self.base as u64;
                let hi = lo + ((1u64 << self.host_bits) - 1);
                let reserved: u64 = RESERVED_IIDS
                    .iter()
                    .map(|&(rlo, rhi)| {
                        let (a, b) = (lo.max(rlo), hi.min(rhi));
                        if a <= b {
                            b - a + 1
                        } else {
                            0
                        }
                    })
                    .sum();
                reserved < hi - lo + 1
            }
        }
    }

    fn addr(&self, offset: u128) -> IpAddr {
        let v = self.base | offset;
        if self.is_v6() {
            IpAddr::V6(Ipv6Addr::from(v))
        } else {
            IpAddr::V4(Ipv4Addr::from(v as u32))
        }
    }

    /// A uniformly drawn, non-reserved address of this block alone.
    fn draw(&self) -> Result<IpAddr, EgressError> {
        for _ in 0..MAX_DRAWS {
            let offset = match self.size() {
                Some(size) => OsRng.gen_range(0..size),
                None => OsRng.gen::<u128>(),
            };
            if !self.is_reserved(offset) {
                return Ok(self.addr(offset));
            }
        }
        Err(EgressError::DrawFailed)
    }
}

/// All prefixes of one address family.
#[derive(Debug)]
struct FamilyPool {
    blocks: Vec<Block>,
    /// Total number of addresses minus one (the blocks do not overlap, so the total is ≤ 2^128).
    last_index: u128,
    label: &'static str,
}

impl FamilyPool {
    fn new(blocks: Vec<Block>, label: &'static str) -> Result<Option<Self>, EgressError> {
        if blocks.is_empty() {
            return Ok(None);
        }
        let mut total: u128 = 0;
        let mut full = false;
        for b in &blocks {
            match b.size() {
                Some(size) => {
                    total = total.checked_add(size).ok_or_else(|| {
                        EgressError::InvalidConfig("egress prefixes overlap".into())
                    })?
                }
                None => full = true,
            }
        }
        let last_index = if full { u128::MAX } else { total - 1 };
        Ok(Some(FamilyPool {
            blocks,
            last_index,
            label,
        }))
    }

    /// A uniformly drawn, non-reserved address of the whole family pool. Reject-and-redraw over the
    /// whole pool keeps the choice exactly uniform over the issuable addresses (no modulo bias, no
    /// weighting error between prefixes).
    ///
    /// With a sealer, the block is still chosen by that draw (weighted by size) but the host bits
    /// are the sealed IID of `subscriber`: FF1 is a permutation of the block's host bits, so the
    /// address is as uniform over the block as a drawn one to anyone without the key. A sealed
    /// IID that is reserved is replaced by the next nonce's.
    fn draw(&self, sealing: Option<(&Sealer, Subscriber)>) -> Result<IpAddr, EgressError> {
        self.draw_from(&mut OsRng, sealing)
    }

    /// [`Self::draw`] from a given cryptographic stream (the epoch policy's keyed stream).
    fn draw_from(
        &self,
        rng: &mut impl RngCore,
        sealing: Option<(&Sealer, Subscriber)>,
    ) -> Result<IpAddr, EgressError> {
        for _ in 0..MAX_DRAWS {
            // draft-scalone-cfr-source-privacy: CSPRNG, uniform over the whole pool.
            let mut index = rng.gen_range(0..=self.last_index);
            for b in &self.blocks {
                match b.size() {
                    Some(size) if index >= size => index -= size,
                    _ => {
                        if let (Some((sealer, subscriber)), Some(layout)) =
                            (sealing, &b.seal_layout)
                        {
                            index = sealer.seal(layout, subscriber, unix_now());
                        }
                        if !b.is_reserved(index) {
                            metrics::counter!("cfr_egress_addresses_issued_total", "family" => self.label)
                                .increment(1);
                            return Ok(b.addr(index));
                        }
                        break;
                    }
                }
            }
        }
        Err(EgressError::DrawFailed)
    }
}

#[derive(Debug)]
struct PoolInner {
    prefixes: Vec<IpNet>,
    v4: Option<FamilyPool>,
    v6: Option<FamilyPool>,
    policy: EgressPolicy,
    /// The fleet-wide epoch schedule; present exactly when the policy is `epoch`.
    schedule: Option<EpochSchedule>,
    fallback: Fallback,
    sealer: Option<Arc<Sealer>>,
}

impl PoolInner {
    fn family(&self, v6: bool) -> Option<&FamilyPool> {
        if v6 {
            self.v6.as_ref()
        } else {
            self.v4.as_ref()
        }
    }
}

impl EgressConfig {
    /// The rules [`EgressPool::new`] enforces, without building a pool (`cfr check-config`).
    pub fn validate(&self) -> Result<(), EgressError> {
        check_config(self)
    }
}

/// Prefixes in canonical form (no host bits set), no two prefixes overlapping, no prefix made only
/// of reserved addresses, no IPv4-mapped IPv6 prefix, and a non-zero epoch.
fn check_config(cfg: &EgressConfig) -> Result<(), EgressError> {
    if cfg.sealing && cfg.sealing_key.is_none() {
        return Err(EgressError::InvalidConfig(
            "egress.sealing_key is required when egress.sealing = true".into(),
        ));
    }
    if cfg.epoch_secs == 0 {
        return Err(EgressError::InvalidConfig(
            "epoch_secs must be greater than 0".into(),
        ));
    }
    if let (EgressPolicy::Epoch, Some(path)) = (cfg.policy, &cfg.epoch_secret_file) {
        // Read and checked here too, so `cfr check-config` reports a missing or short secret.
        EpochSchedule::from_secret_file(cfg.epoch_secs, path, Arc::new(SystemClock))?;
    }
    for (i, p) in cfg.prefixes.iter().enumerate() {
        if p.trunc() != *p {
            return Err(EgressError::InvalidConfig(format!(
                "egress prefix {p} has host bits set; did you mean {}?",
                p.trunc()
            )));
        }
        if let IpNet::V6(n) = p {
            let mapped: ipnet::Ipv6Net = "::ffff:0:0/96".parse().expect("valid literal");
            if mapped.contains(n) {
                return Err(EgressError::InvalidConfig(format!(
                    "egress prefix {p} overlaps IPv4-mapped space ::ffff:0:0/96; configure the IPv4 prefix itself"
                )));
            }
        }
        for q in &cfg.prefixes[..i] {
            if p.contains(q) || q.contains(p) {
                return Err(EgressError::InvalidConfig(format!(
                    "egress prefixes {q} and {p} overlap"
                )));
            }
        }
        if !Block::new(*p).has_usable_address() {
            return Err(EgressError::InvalidConfig(format!(
                "egress prefix {p} holds only reserved interface identifiers (RFC 5453)"
            )));
        }
    }
    Ok(())
}

/// The configured egress prefixes. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct EgressPool {
    inner: Arc<PoolInner>,
}

impl EgressPool {
    /// Validates the configuration: prefixes in canonical form (no host bits set), no two prefixes
    /// overlapping, no prefix made only of reserved addresses, no IPv4-mapped IPv6 prefix, and
    /// `epoch_secs > 0`.
    ///
    /// Under the `epoch` policy it reads `epoch_secret_file` (or, without one, keys the epochs with a
    /// random secret of this process alone).
    pub fn new(cfg: &EgressConfig) -> Result<Self, EgressError> {
        Self::with_clock(cfg, Arc::new(SystemClock))
    }

    /// [`Self::new`] with the epoch schedule on `clock` (tests move time by hand).
    pub fn with_clock(cfg: &EgressConfig, clock: Arc<dyn Clock>) -> Result<Self, EgressError> {
        check_config(cfg)?;
        let schedule = match (cfg.policy, &cfg.epoch_secret_file) {
            (EgressPolicy::Epoch, Some(path)) => Some(EpochSchedule::from_secret_file(
                cfg.epoch_secs,
                path,
                clock,
            )?),
            (EgressPolicy::Epoch, None) => Some(EpochSchedule::random(cfg.epoch_secs, clock)?),
            _ => None,
        };
        let (v6, v4): (Vec<Block>, Vec<Block>) = cfg
            .prefixes
            .iter()
            .map(|p| Block::new(*p))
            .partition(Block::is_v6);
        Ok(EgressPool {
            inner: Arc::new(PoolInner {
                prefixes: cfg.prefixes.clone(),
                v4: FamilyPool::new(v4, "v4")?,
                v6: FamilyPool::new(v6, "v6")?,
                policy: cfg.policy,
                schedule,
                fallback: cfg.fallback,
                sealer: None,
            }),
        })
    }

    /// Like [`EgressPool::new`], sealing every address with `sealer` (built from the same config by
    /// [`Sealer::from_config`]). Fails, saying how many host bits are needed, when a prefix is too
    /// short for the sealed plaintext.
    pub fn with_sealer(cfg: &EgressConfig, sealer: Option<Sealer>) -> Result<Self, EgressError> {
        let mut pool = Self::new(cfg)?;
        if let Some(sealer) = sealer {
            let inner = Arc::get_mut(&mut pool.inner).expect("a new pool is not shared");
            for family in [inner.v4.as_mut(), inner.v6.as_mut()].into_iter().flatten() {
                for b in &mut family.blocks {
                    b.seal_layout = Some(
                        SealLayout::for_prefix(b.net, sealer.params())
                            .map_err(|e| EgressError::InvalidConfig(e.to_string()))?,
                    );
                }
            }
            inner.sealer = Some(Arc::new(sealer));
        }
        Ok(pool)
    }

    /// The sealer, when addresses are sealed.
    pub fn sealer(&self) -> Option<&Arc<Sealer>> {
        self.inner.sealer.as_ref()
    }

    /// No prefixes at all: every tunnel leaves from a kernel-chosen source (no source privacy).
    pub fn is_empty(&self) -> bool {
        self.inner.prefixes.is_empty()
    }

    /// Whether at least one prefix of this family is configured.
    pub fn covers(&self, family_v6: bool) -> bool {
        self.inner.family(family_v6).is_some()
    }

    /// The epoch schedule, under the `epoch` policy.
    pub fn epoch_schedule(&self) -> Option<&EpochSchedule> {
        self.inner.schedule.as_ref()
    }

    /// The configured prefixes, in configuration order.
    pub fn prefixes(&self) -> &[IpNet] {
        &self.inner.prefixes
    }

    /// The policy state for one client connection (QUIC or TCP). Create one per connection and ask it
    /// for the source of each new tunnel.
    pub fn connection(&self) -> ConnectionEgress {
        ConnectionEgress {
            pool: Arc::clone(&self.inner),
            salt: ConnectionSalt::fresh(),
            sticky: Mutex::new([None, None]),
        }
    }

    /// Stable sort: addresses of families the pool covers come first, so a dual-stack name is reached
    /// from a pool address when one family has none. No change when the pool covers both or neither.
    pub fn sort_by_preference(&self, addrs: &mut [SocketAddr]) {
        let (v4, v6) = (self.covers(false), self.covers(true));
        if v4 == v6 {
            return;
        }
        addrs.sort_by_key(|a| !self.covers(is_v6(a.ip())));
    }

    /// A fresh address drawn from the one configured prefix `net` (for diagnostics).
    pub(crate) fn draw_in_prefix(net: IpNet) -> Result<IpAddr, EgressError> {
        Block::new(net).draw()
    }
}

/// Family of a destination, treating IPv4-mapped IPv6 addresses as IPv4 (they leave as IPv4).
pub(crate) fn is_v6(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(_) => false,
        IpAddr::V6(a) => a.to_ipv4_mapped().is_none(),
    }
}

#[derive(Debug, Clone, Copy)]
struct Sticky {
    addr: IpAddr,
    /// Sealed addresses are reused only for tunnels of the subscriber they were sealed for.
    subscriber: Subscriber,
    /// For the epoch policy: the epoch this address was drawn for.
    epoch: Option<u64>,
}

/// Egress policy state of one client connection. `Send + Sync`; share it between the connection's
/// tunnel tasks by reference or `Arc`.
#[derive(Debug)]
pub struct ConnectionEgress {
    pool: Arc<PoolInner>,
    /// Separates this connection's epoch draws from every other connection's.
    salt: ConnectionSalt,
    /// Reused address per family ([0] = IPv4, [1] = IPv6) for the per-connection and epoch policies.
    sticky: Mutex<[Option<Sticky>; 2]>,
}

impl ConnectionEgress {
    /// Source address for a NEW tunnel to `dest`. `Ok(None)`: let the kernel choose (empty pool, or no
    /// prefix of that family and fallback = system). `Err(EgressError::NoAddressForFamily)` when the
    /// family has no prefix and fallback = refuse.
    ///
    /// The returned address is used for the whole life of the tunnel it is bound to; later calls (and
    /// rotation) only affect tunnels opened afterwards.
    pub fn source_for(&self, dest: IpAddr) -> Result<Option<IpAddr>, EgressError> {
        self.source_for_subscriber(dest, Subscriber::ANONYMOUS)
    }

    /// [`ConnectionEgress::source_for`] for a tunnel opened by `subscriber`: when the pool seals,
    /// the address opens to that subscriber (with the key).
    pub fn source_for_subscriber(
        &self,
        dest: IpAddr,
        subscriber: Subscriber,
    ) -> Result<Option<IpAddr>, EgressError> {
        let v6 = is_v6(dest);
        let pool = &self.pool;
        let Some(family) = pool.family(v6) else {
            if pool.prefixes.is_empty() {
                return Ok(None);
            }
            return match pool.fallback {
                Fallback::System => Ok(None),
                Fallback::Refuse => Err(EgressError::NoAddressForFamily { v6 }),
            };
        };
        let sealing = pool.sealer.as_deref().map(|s| (s, subscriber));
        let epoch = match (pool.policy, &pool.schedule) {
            (EgressPolicy::PerTunnel, _) => return family.draw(sealing).map(Some),
            (EgressPolicy::Epoch, Some(schedule)) => Some(schedule.current()),
            _ => None,
        };
        let mut sticky = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut sticky[usize::from(v6)];
        match slot {
            Some(s) if s.epoch == epoch && s.subscriber == subscriber => Ok(Some(s.addr)),
            _ => {
                let addr = match (epoch, &pool.schedule) {
                    (Some(e), Some(schedule)) => {
                        family.draw_from(&mut schedule.stream(e, v6, &self.salt), sealing)?
                    }
                    _ => family.draw(sealing)?,
                };
                *slot = Some(Sticky {
                    addr,
                    subscriber,
                    epoch,
                });
                Ok(Some(addr))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::tests::ManualClock;
    use std::collections::HashSet;
    use std::time::Duration;

    fn pool(prefixes: &[&str], policy: EgressPolicy, fallback: Fallback) -> EgressPool {
        EgressPool::new(&EgressConfig {
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            policy,
            epoch_secs: 600,
            epoch_secret_file: None,
            fallback,
            ..EgressConfig::default()
        })
        .unwrap()
    }

    fn per_tunnel(prefixes: &[&str]) -> EgressPool {
        pool(prefixes, EgressPolicy::PerTunnel, Fallback::System)
    }

    fn iid(a: IpAddr) -> u64 {
        match a {
            IpAddr::V6(a) => u128::from(a) as u64,
            IpAddr::V4(_) => panic!("expected an IPv6 address, got {a}"),
        }
    }

    fn in_reserved_iid(a: IpAddr) -> bool {
        let i = iid(a);
        RESERVED_IIDS.iter().any(|&(lo, hi)| (lo..=hi).contains(&i))
    }

    const V6DEST: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1));
    const V4DEST: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn drawn_addresses_stay_inside_the_pool() {
        let p = per_tunnel(&["2001:db8:cf::/64", "2001:db8:ff::/120", "198.51.100.0/24"]);
        let nets = p.prefixes().to_vec();
        let c = p.connection();
        for _ in 0..5000 {
            for dest in [V6DEST, V4DEST] {
                let a = c.source_for(dest).unwrap().unwrap();
                assert_eq!(a.is_ipv6(), dest.is_ipv6(), "family of {a} for {dest}");
                assert!(nets.iter().any(|n| n.contains(&a)), "{a} outside {nets:?}");
                if let IpAddr::V4(v4) = a {
                    assert_ne!(v4.octets()[3], 0, "network address issued");
                    assert_ne!(v4.octets()[3], 255, "broadcast address issued");
                }
            }
        }
    }

    #[test]
    fn reserved_iids_are_never_issued_from_prefixes_that_contain_them() {
        // Each prefix is half reserved, so thousands of rejections happen in this test.
        for (net, reserved) in [
            ("2001:db8::/127", 1u64),
            ("2001:db8::fdff:ffff:ffff:ff00/120", 128),
            ("2001:db8::0200:5eff:fe00:0/111", 65536),
        ] {
            let p = per_tunnel(&[net]);
            let c = p.connection();
            let mut seen = HashSet::new();
            for _ in 0..4000 {
                let a = c.source_for(V6DEST).unwrap().unwrap();
                assert!(!in_reserved_iid(a), "reserved IID issued: {a} from {net}");
                seen.insert(a);
            }
            if reserved == 1 {
                assert_eq!(
                    seen.len(),
                    1,
                    "a /127 with ::0 has exactly one usable address"
                );
            }
        }
    }

    #[test]
    fn reserved_iid_table_matches_rfc_5453() {
        for iid in [
            0u64,
            0xfdff_ffff_ffff_ff80,
            0xfdff_ffff_ffff_ffff,
            0x0200_5eff_fe00_0000,
            0x0200_5eff_fe00_5212,
            0x0200_5eff_fe00_5213,
            0x0200_5eff_fe00_5214,
            0x0200_5eff_fe00_ffff,
        ] {
            let b = Block::new("2001:db8::/64".parse().unwrap());
            assert!(b.is_reserved(u128::from(iid)), "{iid:#x} must be reserved");
        }
        for iid in [
            1u64,
            0xfdff_ffff_ffff_ff7f,
            0x0200_5eff_fe01_0000,
            0x0200_5eff_fdff_ffff,
        ] {
            let b = Block::new("2001:db8::/64".parse().unwrap());
            assert!(!b.is_reserved(u128::from(iid)), "{iid:#x} must be usable");
        }
    }

    #[test]
    fn single_address_pools_issue_that_address() {
        let p = per_tunnel(&["2001:db8::/128", "192.0.2.7/32"]);
        let c = p.connection();
        for _ in 0..100 {
            // Even the all-zero IID: a /128 is the operator's explicit choice.
            assert_eq!(
                c.source_for(V6DEST).unwrap(),
                Some("2001:db8::".parse().unwrap())
            );
            assert_eq!(
                c.source_for(V4DEST).unwrap(),
                Some("192.0.2.7".parse().unwrap())
            );
        }
        let p = per_tunnel(&["192.0.2.6/31"]);
        let c = p.connection();
        let seen: HashSet<_> = (0..200).map(|_| c.source_for(V4DEST).unwrap()).collect();
        assert_eq!(seen.len(), 2, "a /31 has two usable addresses (RFC 3021)");
    }

    #[test]
    fn wide_prefixes_draw_without_panicking() {
        for nets in [
            &["::/0"][..],
            &["::/1"],
            &["2001:db8::/32", "2001:db9::/48"],
            &["0.0.0.0/0"],
            &["0.0.0.0/1", "128.0.0.0/1"],
        ] {
            let p = per_tunnel(nets);
            let c = p.connection();
            for _ in 0..1000 {
                let dest = if nets[0].contains(':') {
                    V6DEST
                } else {
                    V4DEST
                };
                let a = c.source_for(dest).unwrap().unwrap();
                assert!(
                    p.prefixes().iter().any(|n| n.contains(&a)),
                    "{a} outside {nets:?}"
                );
            }
        }
        // A /48 draws all 80 host bits: the subnet part varies too.
        let p = per_tunnel(&["2001:db8:cf::/48"]);
        let c = p.connection();
        let subnets: HashSet<u16> = (0..100)
            .map(|_| match c.source_for(V6DEST).unwrap().unwrap() {
                IpAddr::V6(a) => a.segments()[3],
                IpAddr::V4(_) => unreachable!(),
            })
            .collect();
        assert!(
            subnets.len() > 90,
            "subnet bits of a /48 not random: {subnets:?}"
        );
    }

    #[test]
    fn prefixes_are_weighted_by_size() {
        // 10.1.0.0/22 has 1022 usable addresses, 10.0.0.0/24 has 254: expect 1022/1276 = 0.801.
        let p = per_tunnel(&["10.0.0.0/24", "10.1.0.0/22"]);
        let c = p.connection();
        let n = 20_000;
        let big: ipnet::IpNet = "10.1.0.0/22".parse().unwrap();
        let hits = (0..n)
            .filter(|_| big.contains(&c.source_for(V4DEST).unwrap().unwrap()))
            .count();
        // σ = sqrt(n p (1-p)) ≈ 56; ±6σ fails a correct draw with probability ~2e-9.
        let expected = n as f64 * 1022.0 / 1276.0;
        assert!(
            (hits as f64 - expected).abs() < 6.0 * 56.5,
            "{hits} of {n} draws in the /22, expected ≈ {expected:.0}"
        );

        // Same for IPv6: a /63 is twice a /64.
        let p = per_tunnel(&["2001:db8:1::/64", "2001:db8:2::/63"]);
        let c = p.connection();
        let big: ipnet::IpNet = "2001:db8:2::/63".parse().unwrap();
        let hits = (0..n)
            .filter(|_| big.contains(&c.source_for(V6DEST).unwrap().unwrap()))
            .count();
        let expected = n as f64 * 2.0 / 3.0;
        assert!(
            (hits as f64 - expected).abs() < 6.0 * 66.7,
            "{hits} of {n} draws in the /63, expected ≈ {expected:.0}"
        );
    }

    /// Per-nibble chi-square over the 16 IID nibbles of 20 000 addresses drawn from a /64.
    ///
    /// Each nibble has 16 equiprobable values: 15 degrees of freedom, expected count 1250 per cell (the
    /// chi-square approximation is excellent at that size). For an overall false-failure probability
    /// below 1e-6 with 16 tests, Bonferroni gives p = 1e-6 / 16 = 6.25e-8 per nibble; the upper quantile
    /// of χ²(15) at 6.25e-8 is 63.50 (computed from the regularized upper incomplete gamma function
    /// Q(7.5, x/2); Q(7.5, 32) = 5.3e-8). The threshold 64 therefore fails a correct CSPRNG with
    /// probability < 16 × 5.3e-8 < 1e-6. A biased generator (e.g. modulo bias, a fixed nibble, or
    /// sequential choice) exceeds it by orders of magnitude.
    #[test]
    fn interface_identifiers_are_uniform_per_nibble() {
        const N: usize = 20_000;
        const THRESHOLD: f64 = 64.0;
        let p = per_tunnel(&["2001:db8:cf::/64"]);
        let c = p.connection();
        let mut counts = [[0u32; 16]; 16];
        for _ in 0..N {
            let i = iid(c.source_for(V6DEST).unwrap().unwrap());
            for (nibble, row) in counts.iter_mut().enumerate() {
                row[((i >> (4 * nibble)) & 0xf) as usize] += 1;
            }
        }
        let expected = N as f64 / 16.0;
        for (nibble, row) in counts.iter().enumerate() {
            let chi2: f64 = row
                .iter()
                .map(|&o| (f64::from(o) - expected).powi(2) / expected)
                .sum();
            assert!(
                chi2 < THRESHOLD,
                "IID nibble {nibble} not uniform: chi2 = {chi2:.1} ≥ {THRESHOLD} (counts {row:?})"
            );
        }
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EgressPool>();
        assert_send_sync::<ConnectionEgress>();
    }

    #[test]
    fn per_tunnel_draws_a_fresh_address_each_time() {
        let p = per_tunnel(&["2001:db8:cf::/64"]);
        let c = p.connection();
        let seen: HashSet<_> = (0..100).map(|_| c.source_for(V6DEST).unwrap()).collect();
        assert_eq!(seen.len(), 100);
    }

    #[test]
    fn per_connection_reuses_one_address_per_family_and_connections_differ() {
        let p = pool(
            &["2001:db8:cf::/64", "10.0.0.0/8"],
            EgressPolicy::PerConnection,
            Fallback::System,
        );
        let c1 = p.connection();
        let c2 = p.connection();
        let a6 = c1.source_for(V6DEST).unwrap().unwrap();
        let a4 = c1.source_for(V4DEST).unwrap().unwrap();
        for _ in 0..50 {
            assert_eq!(c1.source_for(V6DEST).unwrap(), Some(a6));
            assert_eq!(c1.source_for(V4DEST).unwrap(), Some(a4));
        }
        // Two /64 draws collide with probability ~2^-64.
        assert_ne!(c2.source_for(V6DEST).unwrap(), Some(a6));
    }

    #[test]
    fn epoch_keeps_the_address_until_the_unix_aligned_boundary_then_rotates() {
        let clock = ManualClock::at(Duration::from_secs(1_800_000_300));
        let p = EgressPool::with_clock(
            &EgressConfig {
                prefixes: vec!["2001:db8:cf::/64".parse().unwrap()],
                policy: EgressPolicy::Epoch,
                ..EgressConfig::default()
            },
            clock.clone(),
        )
        .unwrap();
        let c = p.connection();
        let first = c.source_for(V6DEST).unwrap().unwrap();
        // The epoch started at 1_800_000_000 (a multiple of 600), not when the connection came.
        clock.set(Duration::from_millis(1_800_000_599_999));
        assert_eq!(c.source_for(V6DEST).unwrap(), Some(first), "rotated early");
        clock.set(Duration::from_secs(1_800_000_600));
        let second = c.source_for(V6DEST).unwrap().unwrap();
        assert_ne!(second, first, "not rotated at the epoch boundary");
        clock.set(Duration::from_secs(1_800_001_199));
        assert_eq!(c.source_for(V6DEST).unwrap(), Some(second));
        // Two connections in one epoch draw independently.
        assert_ne!(p.connection().source_for(V6DEST).unwrap(), Some(second));
    }

    /// Three pools on three clocks that disagree by up to 400 ms (three fleet members) with one
    /// secret: each switches exactly when its own clock crosses the shared boundary.
    #[test]
    fn fleet_members_rotate_in_lockstep_with_a_shared_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("fleet.secret");
        std::fs::write(&secret, "a fleet secret of at least thirty-two bytes\n").unwrap();
        let boundary = Duration::from_secs(1_800_000_060);
        let skews = [
            Duration::ZERO,
            Duration::from_millis(150),
            Duration::from_millis(400),
        ];
        let members: Vec<_> = [
            "2001:db8:cf::/66",
            "2001:db8:cf:0:4000::/66",
            "2001:db8:cf:0:8000::/66",
        ]
        .iter()
        .zip(skews)
        .map(|(net, skew)| {
            let clock = ManualClock::at(boundary - Duration::from_secs(30) - skew);
            let pool = EgressPool::with_clock(
                &EgressConfig {
                    prefixes: vec![net.parse().unwrap()],
                    policy: EgressPolicy::Epoch,
                    epoch_secs: 60,
                    epoch_secret_file: Some(secret.clone()),
                    ..EgressConfig::default()
                },
                clock.clone(),
            )
            .unwrap();
            let conn = pool.connection();
            let before = conn.source_for(V6DEST).unwrap().unwrap();
            (clock, pool, conn, before, skew)
        })
        .collect();
        let epochs = |t: Duration| -> Vec<u64> {
            members
                .iter()
                .map(|(clock, pool, _, _, skew)| {
                    clock.set(t.saturating_sub(*skew));
                    pool.epoch_schedule().unwrap().current()
                })
                .collect()
        };
        assert_eq!(
            epochs(boundary - Duration::from_millis(1)),
            [1_800_000_060 / 60 - 1; 3]
        );
        // Wall time boundary + 400 ms: every member is past the boundary on its own clock.
        assert_eq!(
            epochs(boundary + Duration::from_millis(400)),
            [1_800_000_060 / 60; 3]
        );
        for (_, _, conn, before, _) in &members {
            let after = conn.source_for(V6DEST).unwrap().unwrap();
            assert_ne!(after, *before, "a member did not rotate at the boundary");
        }
    }

    #[test]
    fn sealed_pools_issue_addresses_that_open_to_the_subscriber_and_reuse_them_per_subscriber() {
        use crate::seal::{open_address, MasterKey, OpeningKey, SealParams};
        let now = unix_now();
        let params = SealParams {
            origin: now - now % 3600,
            epoch_secs: 3600,
            handle_bits: 20,
            check_bits: 20,
        };
        let master = MasterKey::from_bytes([6; 32]);
        let cfg = EgressConfig {
            prefixes: vec!["2001:db8:cf::/64".parse().unwrap()],
            policy: EgressPolicy::PerConnection,
            ..EgressConfig::default()
        };
        let sealer = Sealer::new(params, master.chain_at(0), 0, 0, now).unwrap();
        let p = EgressPool::with_sealer(&cfg, Some(sealer)).unwrap();
        let layout = SealLayout::for_prefix(cfg.prefixes[0], &params).unwrap();
        let c = p.connection();
        let a = c
            .source_for_subscriber(V6DEST, Subscriber(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            c.source_for_subscriber(V6DEST, Subscriber(5)).unwrap(),
            Some(a)
        );
        let b = c
            .source_for_subscriber(V6DEST, Subscriber(6))
            .unwrap()
            .unwrap();
        assert_ne!(
            a, b,
            "another subscriber on the connection gets its own sealed address"
        );
        let e = params.epoch_at(unix_now()).unwrap();
        for (addr, handle) in [(a, 5), (b, 6)] {
            let opened = open_address(
                &OpeningKey::Master(master.clone()),
                &layout,
                u128::from(iid(addr)),
                e.saturating_sub(1)..=e + 1,
                0..=0,
            );
            assert!(
                opened.iter().any(|o| o.subscriber == Subscriber(handle)),
                "{addr} must open to {handle}: {opened:?}"
            );
        }
        // A prefix too short for handle + check + nonce bits is refused with the bits needed.
        let short = EgressConfig {
            prefixes: vec!["198.51.100.0/24".parse().unwrap()],
            ..EgressConfig::default()
        };
        let sealer = Sealer::new(params, master.chain_at(0), 0, 0, now).unwrap();
        let err = EgressPool::with_sealer(&short, Some(sealer)).unwrap_err();
        assert!(err.to_string().contains("needs at least 56"), "{err}");
    }

    #[test]
    fn missing_family_follows_the_fallback() {
        let sys = pool(
            &["2001:db8:cf::/64"],
            EgressPolicy::PerTunnel,
            Fallback::System,
        );
        assert_eq!(sys.connection().source_for(V4DEST).unwrap(), None);
        let refuse = pool(
            &["2001:db8:cf::/64"],
            EgressPolicy::PerTunnel,
            Fallback::Refuse,
        );
        assert!(matches!(
            refuse.connection().source_for(V4DEST),
            Err(EgressError::NoAddressForFamily { v6: false })
        ));
        // An IPv4-mapped destination leaves as IPv4.
        let mapped = IpAddr::V6("::ffff:192.0.2.1".parse().unwrap());
        assert!(refuse.connection().source_for(mapped).is_err());
        // An empty pool always lets the kernel choose.
        let empty = pool(&[], EgressPolicy::PerTunnel, Fallback::Refuse);
        assert!(empty.is_empty());
        assert_eq!(empty.connection().source_for(V6DEST).unwrap(), None);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |prefixes: &[&str], epoch_secs| {
            EgressPool::new(&EgressConfig {
                prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
                epoch_secs,
                ..EgressConfig::default()
            })
            .is_err()
        };
        assert!(bad(&["2001:db8::/64"], 0), "epoch_secs = 0");
        assert!(bad(&["2001:db8::/48", "2001:db8:0:1::/64"], 600), "overlap");
        assert!(bad(&["2001:db8::1/64"], 600), "host bits set");
        assert!(bad(&["::ffff:0:0/104"], 600), "IPv4-mapped");
        assert!(
            bad(&["2001:db8::fdff:ffff:ffff:ff80/121"], 600),
            "all reserved"
        );
        assert!(bad(&["2001:db8::/128", "2001:db8::/128"], 600), "duplicate");
        assert!(!bad(
            &["2001:db8::/64", "2001:db8:0:1::/64", "10.0.0.0/8"],
            600
        ));
    }

    #[test]
    fn sort_by_preference_puts_covered_families_first_stably() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let input = vec![
            a("192.0.2.1:443"),
            a("[2001:db8::1]:443"),
            a("192.0.2.2:443"),
            a("[2001:db8::2]:443"),
        ];
        let mut v = input.clone();
        per_tunnel(&["2001:db8:cf::/64"]).sort_by_preference(&mut v);
        assert_eq!(v, [input[1], input[3], input[0], input[2]]);
        let mut v = input.clone();
        per_tunnel(&["10.0.0.0/8"]).sort_by_preference(&mut v);
        assert_eq!(v, [input[0], input[2], input[1], input[3]]);
        let mut v = input.clone();
        per_tunnel(&["10.0.0.0/8", "2001:db8:cf::/64"]).sort_by_preference(&mut v);
        assert_eq!(v, input);
    }
}
