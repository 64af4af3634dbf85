//! The sealing key schedule: a master key, a forward-only chain of epoch keys (HKDF-SHA256), and the
//! relay's in-memory keyring that erases keys older than the retention.
//!
//! ```text
//! C_0     = HKDF-Extract(salt = "cfr-seal-v1", IKM = master) expanded with "cfr seal chain"
//! C_{e+1} = HKDF-Expand(C_e, "cfr seal ratchet")          (one-way: C_e cannot be computed from C_{e+1})
//! K_e     = HKDF-Expand(C_e, "cfr seal epoch key")         (the FF1/AES-256 key of epoch e)
//! ```
//!
//! Epoch `e` covers the wall-clock interval `[origin + e·epoch_secs, origin + (e+1)·epoch_secs)`. The
//! master key reaches every epoch; a chain key `C_s` reaches epochs `s, s+1, …` only. A relay keeps a
//! chain key and the epoch keys of the retention window, nothing older: once erased, an epoch key
//! cannot be re-derived from what the relay holds.

use std::collections::VecDeque;
use std::sync::Arc;

use aes::Aes256;
use fpe::ff1::FF1;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::SealError;

const CHAIN_SALT: &[u8] = b"cfr-seal-v1";
const CHAIN_INFO: &[u8] = b"cfr seal chain";
const RATCHET_INFO: &[u8] = b"cfr seal ratchet";
const EPOCH_KEY_INFO: &[u8] = b"cfr seal epoch key";
const KEY_ID_INFO: &[u8] = b"cfr seal key id";

/// How a key's epochs and plaintext are laid out. Stored in every key file, so the relay and the
/// opener agree by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealParams {
    /// Unix time (seconds) at which epoch 0 starts.
    pub origin: u64,
    /// Length of one epoch, in seconds (> 0).
    pub epoch_secs: u64,
    /// Bits of the subscriber handle in the plaintext (handles are `1..2^handle_bits`; 0 = anonymous).
    pub handle_bits: u32,
    /// Zero bits in the plaintext that an opening must find again: a wrong key, epoch or instance, or
    /// an address that was never sealed, matches with probability 2^-check_bits.
    pub check_bits: u32,
}

/// Smallest nonce field: 2^16 tunnels per epoch and instance before nonces repeat.
pub const MIN_NONCE_BITS: u32 = 16;
/// FF1 over radix 2 needs at least 20 numerals (NIST SP 800-38G Rev. 1: radix^minlen ≥ 10^6).
const MIN_FF1_BITS: u32 = 20;

impl SealParams {
    /// Defaults for `cfr egress keygen`: one-hour epochs, 2^20 − 1 subscribers, 2^-20 false matches per
    /// epoch tried; a /64 then keeps 24 nonce bits (16.7 million tunnels per epoch and instance).
    pub const DEFAULT_EPOCH_SECS: u64 = 3600;
    pub const DEFAULT_HANDLE_BITS: u32 = 20;
    pub const DEFAULT_CHECK_BITS: u32 = 20;

    /// Range checks; the error names the key-file field.
    pub fn validate(&self) -> Result<(), SealError> {
        let bad = |field: &'static str, message: String| SealError::KeyFile { field, message };
        if self.epoch_secs == 0 {
            return Err(bad("epoch_secs", "must be greater than 0".into()));
        }
        if !(1..=32).contains(&self.handle_bits) {
            return Err(bad("handle_bits", "must be between 1 and 32".into()));
        }
        if !(8..=64).contains(&self.check_bits) {
            return Err(bad("check_bits", "must be between 8 and 64".into()));
        }
        Ok(())
    }

    /// Plaintext bits a prefix must have as host bits: handle + check + at least 16 nonce bits (and
    /// at least the 20 bits FF1 accepts over radix 2).
    pub fn needed_bits(&self) -> u32 {
        (self.handle_bits + self.check_bits + MIN_NONCE_BITS).max(MIN_FF1_BITS)
    }

    /// The epoch that contains Unix time `at`, or `None` before the origin.
    pub fn epoch_at(&self, at: u64) -> Option<u64> {
        at.checked_sub(self.origin).map(|d| d / self.epoch_secs)
    }

    /// Unix time at which epoch `e` starts (saturating).
    pub fn epoch_start(&self, e: u64) -> u64 {
        self.origin
            .saturating_add(e.saturating_mul(self.epoch_secs))
    }

    /// Largest handle a subscriber may be given.
    pub fn max_handle(&self) -> u32 {
        if self.handle_bits == 32 {
            u32::MAX
        } else {
            (1u32 << self.handle_bits) - 1
        }
    }
}

/// The operator's master key: opens every sealed address from the origin on. Zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        Self(k)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A public 8-byte fingerprint, so shares of different keys are not combined by mistake.
    pub fn key_id(&self) -> [u8; 8] {
        let mut id = [0u8; 8];
        Hkdf::<Sha256>::new(Some(CHAIN_SALT), &self.0)
            .expand(KEY_ID_INFO, &mut id)
            .expect("8 bytes is a valid HKDF-SHA256 output length");
        id
    }

    /// The chain key of epoch `epoch` (`epoch` ratchet steps from `C_0`; ~1 µs per step).
    pub fn chain_at(&self, epoch: u64) -> ChainKey {
        let mut c = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(CHAIN_SALT), &self.0)
            .expand(CHAIN_INFO, c.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut chain = ChainKey { epoch: 0, key: c };
        chain.advance_to(epoch);
        chain
    }
}

/// `C_e`: derives epoch `e`'s key and every later chain key, never an earlier one. Zeroed on drop.
#[derive(Clone)]
pub struct ChainKey {
    epoch: u64,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl ChainKey {
    pub fn from_bytes(epoch: u64, bytes: [u8; 32]) -> Self {
        Self {
            epoch,
            key: Zeroizing::new(bytes),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.key
    }

    fn hkdf(&self) -> Hkdf<Sha256> {
        Hkdf::<Sha256>::from_prk(self.key.as_ref()).expect("32 bytes is a valid SHA-256 PRK")
    }

    /// Ratchets forward to `epoch` (no-op when already there or past it), erasing every chain key
    /// it passes.
    pub fn advance_to(&mut self, epoch: u64) {
        while self.epoch < epoch {
            let mut next = Zeroizing::new([0u8; 32]);
            self.hkdf()
                .expand(RATCHET_INFO, next.as_mut())
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            // The old value is zeroed when the previous `Zeroizing` is dropped here.
            self.key = next;
            self.epoch += 1;
        }
    }

    /// `K_e` for this chain key's epoch.
    pub fn epoch_key(&self) -> EpochKey {
        let mut k = Zeroizing::new([0u8; 32]);
        self.hkdf()
            .expand(EPOCH_KEY_INFO, k.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        EpochKey {
            epoch: self.epoch,
            // radix 2 is always valid; aes' `zeroize` feature erases the key schedule on drop.
            ff1: FF1::<Aes256>::new(k.as_ref(), 2).expect("radix 2 is valid"),
        }
    }
}

/// The FF1-AES-256 key of one epoch.
pub struct EpochKey {
    epoch: u64,
    pub(super) ff1: FF1<Aes256>,
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl EpochKey {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The relay's keys: the chain key of the newest epoch and the epoch keys still inside the
/// retention window. Time is passed in (Unix seconds) so the schedule is testable without clocks.
#[derive(Debug)]
pub struct Keyring {
    params: SealParams,
    retention_secs: u64,
    chain: ChainKey,
    /// Oldest first; the last is the newest epoch's key (`chain.epoch()`).
    keys: VecDeque<Arc<EpochKey>>,
}

impl Keyring {
    /// Starts from a chain key (derived from the master key or read from a relay key file) at Unix
    /// time `now`. Keys of earlier epochs still inside the retention window are derived only when the
    /// chain key reaches them.
    pub fn new(
        params: SealParams,
        mut chain: ChainKey,
        retention_secs: u64,
        now: u64,
    ) -> Result<Self, SealError> {
        let current = params.epoch_at(now).ok_or(SealError::BeforeOrigin)?;
        if chain.epoch() > current {
            return Err(SealError::ChainAfterNow {
                chain_epoch: chain.epoch(),
                current,
            });
        }
        // The oldest epoch whose end + retention is still in the future.
        let oldest = (chain.epoch()..=current)
            .find(|&e| params.epoch_start(e + 1).saturating_add(retention_secs) > now)
            .unwrap_or(current);
        chain.advance_to(oldest);
        let mut ring = Self {
            params,
            retention_secs,
            keys: VecDeque::from([Arc::new(chain.epoch_key())]),
            chain,
        };
        ring.advance(now)?;
        Ok(ring)
    }

    /// Brings the ring to Unix time `now`: ratchets to the current epoch and erases every epoch key
    /// whose epoch ended more than the retention ago. Time going backwards changes nothing.
    pub fn advance(&mut self, now: u64) -> Result<(), SealError> {
        let current = self.params.epoch_at(now).ok_or(SealError::BeforeOrigin)?;
        while self.chain.epoch() < current {
            self.chain.advance_to(self.chain.epoch() + 1);
            self.keys.push_back(Arc::new(self.chain.epoch_key()));
        }
        while self.keys.len() > 1 {
            let oldest = self.keys[0].epoch();
            if self
                .params
                .epoch_start(oldest + 1)
                .saturating_add(self.retention_secs)
                > now
            {
                break;
            }
            // Dropping the last `Arc` zeroes the AES key schedule.
            self.keys.pop_front();
        }
        Ok(())
    }

    /// The key of the newest epoch (call [`Keyring::advance`] first).
    pub fn current(&self) -> &Arc<EpochKey> {
        self.keys
            .back()
            .expect("a keyring always holds its newest key")
    }

    /// Epoch keys still held, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &Arc<EpochKey>> {
        self.keys.iter()
    }

    pub fn params(&self) -> &SealParams {
        &self.params
    }

    pub fn retention_secs(&self) -> u64 {
        self.retention_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SealParams {
        SealParams {
            origin: 1_000_000,
            epoch_secs: 100,
            handle_bits: 20,
            check_bits: 20,
        }
    }

    #[test]
    fn chain_from_master_equals_ratcheting_step_by_step() {
        let m = MasterKey::from_bytes([7; 32]);
        let mut c = m.chain_at(0);
        c.advance_to(5);
        assert_eq!(c.as_bytes(), m.chain_at(5).as_bytes());
        assert_ne!(m.chain_at(4).as_bytes(), m.chain_at(5).as_bytes());
        let mut later = m.chain_at(9);
        later.advance_to(3);
        assert_eq!(later.epoch(), 9, "a chain key never goes back");
    }

    #[test]
    fn keyring_erases_epochs_older_than_the_retention() {
        let p = params();
        let m = MasterKey::from_bytes([1; 32]);
        // Retention 150 s = epoch length 100 s: epoch e is kept until 150 s after it ended.
        let start = p.origin + 5 * 100 + 10; // inside epoch 5
        let mut ring = Keyring::new(p, m.chain_at(0), 150, start).unwrap();
        let held: Vec<u64> = ring.retained().map(|k| k.epoch()).collect();
        // Epoch 4 ended at +500, 10 s ago; epoch 3 ended at +400, 110 s ago: both retained.
        assert_eq!(held, [3, 4, 5]);
        ring.advance(p.origin + 749).unwrap(); // epoch 7; epoch 5 ended 149 s ago
        let held: Vec<u64> = ring.retained().map(|k| k.epoch()).collect();
        assert_eq!(held, [5, 6, 7]);
        ring.advance(p.origin + 750).unwrap();
        let held: Vec<u64> = ring.retained().map(|k| k.epoch()).collect();
        assert_eq!(held, [6, 7], "epochs that ended ≥ 150 s ago are gone");
        assert_eq!(ring.current().epoch(), 7);
        ring.advance(p.origin + 100).unwrap();
        assert_eq!(ring.current().epoch(), 7, "time going back changes nothing");
    }

    #[test]
    fn zero_retention_keeps_only_the_current_epoch() {
        let p = params();
        let ring = Keyring::new(
            p,
            MasterKey::from_bytes([2; 32]).chain_at(0),
            0,
            p.origin + 1234,
        )
        .unwrap();
        let held: Vec<u64> = ring.retained().map(|k| k.epoch()).collect();
        assert_eq!(held, [12]);
    }

    #[test]
    fn keyring_refuses_times_before_the_origin_and_chains_from_the_future() {
        let p = params();
        let m = MasterKey::from_bytes([3; 32]);
        assert!(matches!(
            Keyring::new(p, m.chain_at(0), 0, p.origin - 1),
            Err(SealError::BeforeOrigin)
        ));
        assert!(matches!(
            Keyring::new(p, m.chain_at(50), 0, p.origin + 100),
            Err(SealError::ChainAfterNow { .. })
        ));
    }

    #[test]
    fn key_ids_differ_between_keys_and_do_not_equal_key_bytes() {
        let a = MasterKey::from_bytes([4; 32]);
        let b = MasterKey::from_bytes([5; 32]);
        assert_ne!(a.key_id(), b.key_id());
        assert_eq!(a.key_id(), a.clone().key_id());
        assert_ne!(&a.key_id()[..], &a.as_bytes()[..8]);
    }
}
