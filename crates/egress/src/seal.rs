//! Sealed egress addresses: the host bits of each tunnel's source address are an FF1 encryption
//! (NIST SP 800-38G, AES-256, the `fpe` crate) of who opened the tunnel, under the key of the epoch,
//! with the epoch and relay instance as tweak. Without the key the addresses are as uniform and
//! unlinkable as drawn ones (FF1 is a pseudorandom permutation of the host-bit space); with it, one
//! address opens to one subscriber handle, epoch and instance, and nothing is written anywhere per
//! tunnel.
//!
//! Plaintext layout over the `width` host bits of a prefix (most significant first):
//!
//! ```text
//! | check: check_bits zeros | handle: handle_bits | nonce: width − handle_bits − check_bits |
//! ```
//!
//! The nonce is a per-epoch counter that starts at a random value, so (handle, nonce) and hence the
//! address never repeats within an epoch until 2^nonce_bits tunnels were sealed in it. A decryption
//! under a wrong key, epoch or instance, or of an address that was never sealed, is a uniformly
//! random plaintext: its check field is all zeros with probability 2^-check_bits ("no match"
//! otherwise).
//!
//! Everything here is pure except [`Sealer::from_config`], which reads the key file.

mod keyfile;
mod keys;

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fpe::ff1::{BinaryNumeralString, FlexibleNumeralString, NumeralString};
use rand::rngs::OsRng;
use rand::Rng;

pub use keyfile::{combine_shares, fuzz_key_file, split_master, write_key_file, KeyFile};
pub use keys::{ChainKey, EpochKey, Keyring, MasterKey, SealParams, MIN_NONCE_BITS};

use crate::EgressConfig;

/// Why sealing or opening cannot go on. Messages never contain key material, an address or a
/// subscriber handle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("egress prefix {prefix} has {width} host bits; sealing needs at least {needed} ({handle_bits} handle + {check_bits} check + {MIN_NONCE_BITS} nonce bits, from the key file): use a shorter prefix or a key with fewer handle/check bits")]
    PrefixTooShort {
        prefix: ipnet::IpNet,
        width: u32,
        needed: u32,
        handle_bits: u32,
        check_bits: u32,
    },
    #[error("key file field `{field}`: {message}")]
    KeyFile {
        field: &'static str,
        message: String,
    },
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:03o}); run: chmod 600 {path}"
    )]
    Permissions { path: std::path::PathBuf, mode: u32 },
    #[error("the clock is before the key's origin (epoch 0)")]
    BeforeOrigin,
    #[error("the relay key starts at epoch {chain_epoch}, after the current epoch {current}")]
    ChainAfterNow { chain_epoch: u64, current: u64 },
    #[error("shares: {0}")]
    Shares(String),
    #[error("a {0} key cannot seal addresses; give the relay a master or relay key")]
    CannotSeal(&'static str),
}

/// Who opened a tunnel, as the operator numbered them (`auth.subscribers`). Handle 0 is anonymous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Subscriber(pub u32);

impl Subscriber {
    /// No operator-assigned handle (open relay, or a credential without one).
    pub const ANONYMOUS: Subscriber = Subscriber(0);
}

/// The plaintext layout for a prefix with `width` host bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealLayout {
    width: u32,
    handle_bits: u32,
    check_bits: u32,
}

impl SealLayout {
    /// The layout of `prefix` under `params`, or [`SealError::PrefixTooShort`] saying how many
    /// host bits are needed.
    pub fn for_prefix(prefix: ipnet::IpNet, params: &SealParams) -> Result<Self, SealError> {
        let width = u32::from(prefix.max_prefix_len() - prefix.prefix_len());
        let needed = params.needed_bits();
        if width < needed {
            return Err(SealError::PrefixTooShort {
                prefix,
                width,
                needed,
                handle_bits: params.handle_bits,
                check_bits: params.check_bits,
            });
        }
        Ok(Self {
            width,
            handle_bits: params.handle_bits,
            check_bits: params.check_bits,
        })
    }

    /// Host bits of the prefix (the FF1 block size).
    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn nonce_bits(&self) -> u32 {
        self.width - self.handle_bits - self.check_bits
    }

    fn pack(&self, handle: u32, nonce: u128) -> u128 {
        let n = self.nonce_bits();
        (u128::from(handle) << n) | (nonce & low_mask(n))
    }

    /// `(handle, nonce)` when the check field is all zeros.
    fn unpack(&self, plaintext: u128) -> Option<(u32, u128)> {
        let n = self.nonce_bits();
        let payload = n + self.handle_bits;
        if plaintext >> payload != 0 {
            return None;
        }
        let handle = u32::try_from(plaintext >> n).expect("handle_bits ≤ 32");
        Some((handle, plaintext & low_mask(n)))
    }
}

fn low_mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

/// FF1 tweak: the epoch and the relay instance, so the same plaintext seals to unrelated addresses
/// in different epochs and on different relays.
fn tweak(epoch: u64, instance: u32) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(b"cfr1");
    t[4..12].copy_from_slice(&epoch.to_be_bytes());
    t[12..].copy_from_slice(&instance.to_be_bytes());
    t
}

/// FF1 over the low `width` bits of `value` (radix 2). Byte-multiple widths use the crate's packed
/// binary numeral strings (fast); others one numeral per bit.
fn ff1(key: &EpochKey, instance: u32, width: u32, value: u128, encrypt: bool) -> u128 {
    let t = tweak(key.epoch(), instance);
    // Lengths are ≥ 20 numerals (checked by `SealParams::needed_bits`) and radix 2 holds every bit,
    // so the crate's length and radix errors cannot happen.
    if width.is_multiple_of(8) {
        let bytes = &value.to_le_bytes()[..(width / 8) as usize];
        let out = ff1_apply(key, &t, &BinaryNumeralString::from_bytes_le(bytes), encrypt);
        let mut le = [0u8; 16];
        le[..bytes.len()].copy_from_slice(&out.to_bytes_le());
        u128::from_le_bytes(le)
    } else {
        let bits: Vec<u16> = (0..width)
            .rev()
            .map(|i| ((value >> i) & 1) as u16)
            .collect();
        let out = ff1_apply(key, &t, &FlexibleNumeralString::from(bits), encrypt);
        Vec::<u16>::from(out)
            .into_iter()
            .fold(0u128, |acc, b| (acc << 1) | u128::from(b))
    }
}

fn ff1_apply<NS: NumeralString>(key: &EpochKey, tweak: &[u8], ns: &NS, encrypt: bool) -> NS {
    if encrypt {
        key.ff1.encrypt(tweak, ns)
    } else {
        key.ff1.decrypt(tweak, ns)
    }
    .expect("valid FF1 radix-2 input")
}

/// The host bits that seal `(subscriber, nonce)` under `key` for relay `instance`.
pub fn seal_iid(
    key: &EpochKey,
    instance: u32,
    layout: &SealLayout,
    subscriber: Subscriber,
    nonce: u128,
) -> u128 {
    ff1(
        key,
        instance,
        layout.width,
        layout.pack(subscriber.0, nonce),
        true,
    )
}

/// What an address opened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    pub subscriber: Subscriber,
    pub epoch: u64,
    pub instance: u32,
}

/// Opens host bits `iid` under one epoch key and instance: `None` is "no match".
pub fn open_iid(key: &EpochKey, instance: u32, layout: &SealLayout, iid: u128) -> Option<Opening> {
    let plaintext = ff1(
        key,
        instance,
        layout.width,
        iid & low_mask(layout.width),
        false,
    );
    layout.unpack(plaintext).map(|(handle, _)| Opening {
        subscriber: Subscriber(handle),
        epoch: key.epoch(),
        instance,
    })
}

/// A key that can open addresses: the master key (every epoch) or a relay chain key (its epoch
/// and later).
#[derive(Debug)]
pub enum OpeningKey {
    Master(MasterKey),
    Chain(ChainKey),
}

impl OpeningKey {
    fn chain_at(&self, epoch: u64) -> Option<ChainKey> {
        match self {
            OpeningKey::Master(m) => Some(m.chain_at(epoch)),
            OpeningKey::Chain(c) if c.epoch() <= epoch => {
                let mut c = c.clone();
                c.advance_to(epoch);
                Some(c)
            }
            OpeningKey::Chain(_) => None,
        }
    }
}

/// Epochs `cfr egress open` tries around a time: the epoch of `at` and `window` on each side (an
/// abuse report's time is approximate, and a tunnel outlives the epoch it was sealed in).
pub fn epochs_around(params: &SealParams, at: u64, window: u64) -> Option<RangeInclusive<u64>> {
    let e = params.epoch_at(at)?;
    Some(e.saturating_sub(window)..=e.saturating_add(window))
}

/// Opens host bits `iid` under every epoch of `epochs` and every instance of `instances`. Each
/// (epoch, instance) tried is one chance in 2^check_bits of a false match.
pub fn open_address(
    key: &OpeningKey,
    layout: &SealLayout,
    iid: u128,
    epochs: RangeInclusive<u64>,
    instances: RangeInclusive<u32>,
) -> Vec<Opening> {
    let mut found = Vec::new();
    let mut chain: Option<ChainKey> = None;
    for e in epochs {
        let c = match chain.as_mut() {
            Some(c) => {
                c.advance_to(e);
                c
            }
            None => match key.chain_at(e) {
                Some(c) => chain.insert(c),
                None => continue,
            },
        };
        let k = c.epoch_key();
        for i in instances.clone() {
            found.extend(open_iid(&k, i, layout, iid));
        }
    }
    found
}

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The relay side: the keyring plus the per-epoch nonce counter. `Send + Sync`; one per relay.
/// Accountability without a per-tunnel record, and nothing stable in what a destination sees:
//= https://datatracker.ietf.org/doc/html/draft-scalone-cfr-source-privacy-02#section-8
//# should not require the upstream CFS to receive a stable subscriber identifier
#[derive(Debug)]
pub struct Sealer {
    instance: u32,
    params: SealParams,
    state: Mutex<SealerState>,
}

#[derive(Debug)]
struct SealerState {
    ring: Keyring,
    /// Epoch the counter belongs to.
    epoch: u64,
    next_nonce: u64,
}

impl Sealer {
    /// A sealer for relay `instance` from a chain key, at Unix time `now`.
    pub fn new(
        params: SealParams,
        chain: ChainKey,
        instance: u32,
        retention_secs: u64,
        now: u64,
    ) -> Result<Self, SealError> {
        params.validate()?;
        let ring = Keyring::new(params, chain, retention_secs, now)?;
        let epoch = ring.current().epoch();
        Ok(Self {
            instance,
            params,
            state: Mutex::new(SealerState {
                ring,
                epoch,
                next_nonce: OsRng.gen(),
            }),
        })
    }

    /// Reads `egress.sealing_key` (mode 0600 or stricter) and starts the keyring at Unix time
    /// `now`. `Ok(None)` when sealing is off. A master key is used only to derive the chain key and
    /// is erased before this returns.
    pub fn from_config(cfg: &EgressConfig, now: u64) -> Result<Option<Self>, SealError> {
        if !cfg.sealing {
            return Ok(None);
        }
        let path = cfg.sealing_key.as_deref().ok_or(SealError::KeyFile {
            field: "egress.sealing_key",
            message: "required when egress.sealing = true".into(),
        })?;
        let file = read_key_file(path)?;
        let chain = match file {
            KeyFile::Master { ref key, .. } => key.chain_at(0),
            KeyFile::Relay { ref chain, .. } => chain.clone(),
            KeyFile::Share { .. } => return Err(SealError::CannotSeal("share")),
        };
        Sealer::new(
            *file.params(),
            chain,
            cfg.instance_id,
            cfg.sealing_retention_secs,
            now,
        )
        .map(Some)
    }

    pub fn params(&self) -> &SealParams {
        &self.params
    }

    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Host bits for a new tunnel of `subscriber` at Unix time `now`. The FF1 call runs outside
    /// the lock; the lock only covers the epoch key and the counter.
    pub fn seal(&self, layout: &SealLayout, subscriber: Subscriber, now: u64) -> u128 {
        let (key, nonce) = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // A clock before the origin cannot happen after `new` succeeded unless the clock went
            // back; then the current key stays in use.
            let _ = s.ring.advance(now);
            let key = Arc::clone(s.ring.current());
            if key.epoch() != s.epoch {
                // A random start per epoch: after a restart inside an epoch the counters of the two
                // runs overlap only with probability (tunnels sealed) / 2^nonce_bits.
                s.epoch = key.epoch();
                s.next_nonce = OsRng.gen();
            }
            let n = s.next_nonce;
            s.next_nonce = n.wrapping_add(1);
            (key, n)
        };
        // Nonce bits above the 64-bit counter (prefixes wider than handle + check + 64 bits) are
        // random per tunnel.
        let high = if layout.nonce_bits() > 64 {
            u128::from(OsRng.gen::<u64>()) << 64
        } else {
            0
        };
        seal_iid(
            &key,
            self.instance,
            layout,
            subscriber,
            high | u128::from(nonce),
        )
    }

    /// Erases the epoch keys that left the retention window by `now` (also done on every seal; call
    /// this on a timer so an idle relay forgets on time too).
    pub fn erase_expired(&self, now: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.ring.advance(now);
    }

    /// When the next erasure or epoch change is due, in Unix seconds.
    pub fn next_erasure(&self, now: u64) -> u64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let p = &self.params;
        let current = p.epoch_at(now).unwrap_or(0);
        let oldest = s.ring.retained().next().map_or(current, |k| k.epoch());
        let retention = s.ring.retention_secs();
        p.epoch_start(current + 1)
            .min(p.epoch_start(oldest + 1).saturating_add(retention))
            .max(now + 1)
    }

    /// Erases expired epoch keys on time, also while no tunnel is opened (runs until dropped).
    pub async fn erase_on_schedule(&self) {
        loop {
            let now = unix_now();
            let wait = self.next_erasure(now).saturating_sub(now);
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            self.erase_expired(unix_now());
        }
    }

    /// Opens host bits with the keys this relay still holds (the retention window): what a relay's
    /// memory can reveal if it is seized. Addresses older than the retention give "no match".
    pub fn open_retained(&self, layout: &SealLayout, iid: u128) -> Vec<Opening> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.ring
            .retained()
            .filter_map(|k| open_iid(k, self.instance, layout, iid))
            .collect()
    }
}

/// Reads and parses a key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> Result<KeyFile, SealError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| SealError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(read)?);
    KeyFile::parse(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const P: SealParams = SealParams {
        origin: 1_700_000_000,
        epoch_secs: 3600,
        handle_bits: 20,
        check_bits: 20,
    };

    fn layout(prefix: &str) -> SealLayout {
        SealLayout::for_prefix(prefix.parse().unwrap(), &P).unwrap()
    }

    #[test]
    fn sealed_iids_open_to_their_subscriber_epoch_and_instance() {
        let m = MasterKey::from_bytes([9; 32]);
        let key = OpeningKey::Master(m.clone());
        for prefix in ["2001:db8::/64", "2001:db8::/60", "2001:db8::/48", "::/0"] {
            let l = layout(prefix);
            let now = P.origin + 5 * 3600 + 17;
            let sealer = Sealer::new(P, m.chain_at(0), 3, 0, now).unwrap();
            for h in [0u32, 1, 77, P.max_handle()] {
                let iid = sealer.seal(&l, Subscriber(h), now);
                assert!(
                    iid <= low_mask(l.width()),
                    "{prefix}: IID wider than the host bits"
                );
                let got = open_address(&key, &l, iid, 4..=6, 0..=3);
                assert_eq!(
                    got,
                    [Opening {
                        subscriber: Subscriber(h),
                        epoch: 5,
                        instance: 3
                    }],
                    "{prefix}: handle {h}"
                );
            }
        }
    }

    #[test]
    fn consecutive_seals_of_one_subscriber_never_repeat_within_an_epoch() {
        let m = MasterKey::from_bytes([1; 32]);
        let l = layout("2001:db8::/64");
        let now = P.origin + 10;
        let sealer = Sealer::new(P, m.chain_at(0), 0, 0, now).unwrap();
        let seen: HashSet<u128> = (0..5000)
            .map(|_| sealer.seal(&l, Subscriber(5), now))
            .collect();
        assert_eq!(seen.len(), 5000);
    }

    #[test]
    fn wrong_key_or_random_iids_give_no_match_at_the_stated_rate() {
        // With 8 check bits a false match has probability 2^-8 per (epoch, instance) tried: over 20 000
        // random IIDs × 1 epoch expect 78; 6σ (σ ≈ 8.8) fails a correct implementation with ~1e-9.
        let p = SealParams { check_bits: 8, ..P };
        let l = SealLayout::for_prefix("2001:db8::/64".parse().unwrap(), &p).unwrap();
        let key = OpeningKey::Master(MasterKey::from_bytes([2; 32]));
        let n = 20_000u32;
        let matches: usize = (0..n)
            .map(|_| open_address(&key, &l, OsRng.gen::<u64>().into(), 3..=3, 0..=0).len())
            .sum();
        let expected = f64::from(n) / 256.0;
        assert!(
            (matches as f64 - expected).abs() < 6.0 * 8.8,
            "{matches} false matches in {n}, expected ≈ {expected:.0}"
        );
    }

    #[test]
    fn layout_refuses_prefixes_that_are_too_short_and_names_the_bits_needed() {
        let err = SealLayout::for_prefix("198.51.100.0/24".parse().unwrap(), &P).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("needs at least 56"), "{msg}");
        assert!(msg.contains("has 8 host bits"), "{msg}");
        assert!(SealLayout::for_prefix("2001:db8::/72".parse().unwrap(), &P).is_ok());
        assert!(SealLayout::for_prefix("2001:db8::/73".parse().unwrap(), &P).is_err());
    }

    #[test]
    fn a_chain_key_opens_its_epoch_and_later_only() {
        let m = MasterKey::from_bytes([3; 32]);
        let l = layout("2001:db8::/64");
        let old = Sealer::new(P, m.chain_at(0), 0, 0, P.origin + 3600).unwrap();
        let iid_old = old.seal(&l, Subscriber(9), P.origin + 3600);
        let iid_new = old.seal(&l, Subscriber(9), P.origin + 3 * 3600);
        let relay_key = OpeningKey::Chain(m.chain_at(2));
        assert!(open_address(&relay_key, &l, iid_old, 0..=3, 0..=0).is_empty());
        assert_eq!(
            open_address(&relay_key, &l, iid_new, 0..=3, 0..=0)[0].epoch,
            3
        );
    }

    #[test]
    fn sealer_forgets_addresses_after_the_retention() {
        let m = MasterKey::from_bytes([4; 32]);
        let l = layout("2001:db8::/64");
        let t0 = P.origin + 100;
        let sealer = Sealer::new(P, m.chain_at(0), 0, 1800, t0).unwrap();
        let iid = sealer.seal(&l, Subscriber(42), t0);
        assert_eq!(sealer.open_retained(&l, iid)[0].subscriber, Subscriber(42));
        // Epoch 0 ends at +3600; with 1800 s retention its key goes at +5400.
        sealer.erase_expired(P.origin + 5399);
        assert_eq!(sealer.open_retained(&l, iid).len(), 1);
        assert_eq!(sealer.next_erasure(P.origin + 5399), P.origin + 5400);
        sealer.erase_expired(P.origin + 5400);
        assert!(sealer.open_retained(&l, iid).is_empty());
        // The master key, held by the accountable party, still opens it.
        let master = OpeningKey::Master(m);
        assert_eq!(open_address(&master, &l, iid, 0..=1, 0..=0).len(), 1);
    }
}
