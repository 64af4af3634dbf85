//! The fleet-wide epoch schedule of the `epoch` egress policy.
//!
//! Epoch `e` is `floor(unix_time / epoch_secs)` on every instance, so relays whose clocks agree rotate
//! in lockstep without talking to each other. A connection's address for epoch `e` is drawn from a
//! ChaCha20 stream seeded with `HMAC-SHA256(fleet secret, label ‖ e ‖ family ‖ connection salt)`: the
//! fleet secret keys every epoch's choice, and the salt (drawn from the OS CSPRNG when the connection
//! is accepted, never stored anywhere else) makes two connections' choices independent, as with the
//! `per-connection` policy. Without the secret nobody can predict or link the addresses; with it,
//! nobody can either unless they also hold the connection's salt, which never leaves the process.
//!
//! draft-scalone-cfr-source-privacy §8 R4: addresses change only at safe flow boundaries. An open
//! tunnel keeps the address its socket was bound with; a new epoch only affects tunnels opened after
//! it starts.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;

use crate::EgressError;

/// Domain separation of the per-epoch seed derivation (bump on any change of the derivation).
const SEED_LABEL: &[u8] = b"cfr egress epoch v1";

/// Shortest fleet secret accepted: 256 bits, the HMAC-SHA256 key size.
pub const MIN_SECRET_LEN: usize = 32;

/// Where "now" comes from. Production uses [`SystemClock`]; tests inject their own to prove the
/// lockstep without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since the Unix epoch.
    fn unix_time(&self) -> Duration;
}

/// The host's wall clock (keep it NTP-synchronised across the fleet: rotation is as close to
/// lockstep as the clocks are).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_time(&self) -> Duration {
        // A clock before 1970 is a broken host; epoch 0 is then as good as any.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A random per-connection value that separates connections' draws within one epoch.
#[derive(Clone, Copy)]
pub(crate) struct ConnectionSalt([u8; 16]);

impl ConnectionSalt {
    pub(crate) fn fresh() -> Self {
        let mut s = [0u8; 16];
        OsRng.fill_bytes(&mut s);
        ConnectionSalt(s)
    }
}

impl fmt::Debug for ConnectionSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectionSalt(..)")
    }
}

/// The fleet secret. Its `Debug` never shows the bytes, so it cannot leak through a log line.
#[derive(Clone)]
struct FleetSecret(Arc<[u8]>);

impl fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetSecret(..)")
    }
}

/// Epoch boundaries and the keyed per-epoch choice.
#[derive(Debug, Clone)]
pub struct EpochSchedule {
    epoch_secs: u64,
    secret: FleetSecret,
    clock: Arc<dyn Clock>,
}

impl EpochSchedule {
    /// A schedule keyed by `secret` (at least [`MIN_SECRET_LEN`] bytes) on `clock`.
    pub fn new(epoch_secs: u64, secret: &[u8], clock: Arc<dyn Clock>) -> Result<Self, EgressError> {
        if epoch_secs == 0 {
            return Err(EgressError::InvalidConfig(
                "epoch_secs must be greater than 0".into(),
            ));
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(EgressError::InvalidConfig(format!(
                "the epoch secret must be at least {MIN_SECRET_LEN} bytes"
            )));
        }
        Ok(EpochSchedule {
            epoch_secs,
            secret: FleetSecret(secret.into()),
            clock,
        })
    }

    /// A schedule keyed by a fresh random secret: a single relay whose choices no other process
    /// needs to share.
    pub fn random(epoch_secs: u64, clock: Arc<dyn Clock>) -> Result<Self, EgressError> {
        let mut secret = [0u8; MIN_SECRET_LEN];
        OsRng.fill_bytes(&mut secret);
        Self::new(epoch_secs, &secret, clock)
    }

    /// A schedule keyed by the contents of `path` (trailing whitespace removed, so a hex or base64
    /// line written by `openssl rand -hex 32 >FILE` works). Errors never contain the secret.
    pub fn from_secret_file(
        epoch_secs: u64,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, EgressError> {
        let bytes = std::fs::read(path).map_err(|e| {
            EgressError::InvalidConfig(format!(
                "cannot read epoch_secret_file {}: {e}",
                path.display()
            ))
        })?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        Self::new(epoch_secs, &bytes[..end], clock).map_err(|e| match e {
            EgressError::InvalidConfig(m) => {
                EgressError::InvalidConfig(format!("epoch_secret_file {}: {m}", path.display()))
            }
            other => other,
        })
    }

    /// Length of one epoch.
    pub fn epoch_secs(&self) -> u64 {
        self.epoch_secs
    }

    /// The current epoch number: `floor(unix_time / epoch_secs)`, the same on every instance.
    pub fn current(&self) -> u64 {
        self.clock.unix_time().as_secs() / self.epoch_secs
    }

    /// Time left until the next epoch starts.
    pub fn until_next(&self) -> Duration {
        let now = self.clock.unix_time();
        let next = Duration::from_secs((now.as_secs() / self.epoch_secs + 1) * self.epoch_secs);
        next.saturating_sub(now)
    }

    /// The random stream from which a connection draws its address of one family in `epoch`.
    pub(crate) fn stream(&self, epoch: u64, v6: bool, salt: &ConnectionSalt) -> ChaCha20Rng {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret.0)
            .expect("HMAC accepts keys of any length");
        mac.update(SEED_LABEL);
        mac.update(&epoch.to_be_bytes());
        mac.update(&[u8::from(v6)]);
        mac.update(&salt.0);
        ChaCha20Rng::from_seed(mac.finalize().into_bytes().into())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock the test moves by hand (milliseconds since the Unix epoch).
    #[derive(Debug, Default)]
    pub(crate) struct ManualClock(AtomicU64);

    impl ManualClock {
        pub(crate) fn at(unix: Duration) -> Arc<Self> {
            Arc::new(ManualClock(AtomicU64::new(unix.as_millis() as u64)))
        }
        pub(crate) fn set(&self, unix: Duration) {
            self.0.store(unix.as_millis() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn unix_time(&self) -> Duration {
            Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
    }

    const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn epochs_are_unix_time_divided_by_the_epoch_length() {
        let clock = ManualClock::at(Duration::from_secs(1_800_000_000));
        let s = EpochSchedule::new(600, SECRET, clock.clone()).unwrap();
        assert_eq!(s.current(), 3_000_000);
        assert_eq!(s.until_next(), Duration::from_secs(600));
        clock.set(Duration::from_millis(1_800_000_599_999));
        assert_eq!(s.current(), 3_000_000);
        assert_eq!(s.until_next(), Duration::from_millis(1));
        clock.set(Duration::from_secs(1_800_000_600));
        assert_eq!(s.current(), 3_000_001);
    }

    #[test]
    fn short_secrets_and_zero_epochs_are_refused() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        assert!(EpochSchedule::new(600, &SECRET[..31], clock.clone()).is_err());
        assert!(EpochSchedule::new(0, SECRET, clock.clone()).is_err());
        assert!(EpochSchedule::new(1, SECRET, clock).is_ok());
    }

    #[test]
    fn secret_file_is_read_without_its_trailing_newline_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.secret");
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        std::fs::write(&path, [SECRET.as_slice(), b"\n"].concat()).unwrap();
        let from_file = EpochSchedule::from_secret_file(60, &path, clock.clone()).unwrap();
        let direct = EpochSchedule::new(60, SECRET, clock.clone()).unwrap();
        let salt = ConnectionSalt([7; 16]);
        assert_eq!(
            from_file.stream(5, true, &salt).next_u64(),
            direct.stream(5, true, &salt).next_u64()
        );
        assert!(!format!("{from_file:?}").contains("0123"));
        std::fs::write(&path, "short-secret\n").unwrap();
        let err = EpochSchedule::from_secret_file(60, &path, clock.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 32 bytes"), "{err}");
        assert!(!err.contains("short-secret"), "secret echoed: {err}");
        let missing = EpochSchedule::from_secret_file(60, &dir.path().join("nope"), clock);
        assert!(missing.unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn streams_differ_by_epoch_family_salt_and_secret() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let s = EpochSchedule::new(60, SECRET, clock.clone()).unwrap();
        let other = EpochSchedule::new(60, b"another secret of thirty-two b..", clock).unwrap();
        let a = ConnectionSalt([1; 16]);
        let b = ConnectionSalt([2; 16]);
        let first =
            |s: &EpochSchedule, e, v6, salt: &ConnectionSalt| s.stream(e, v6, salt).next_u64();
        let base = first(&s, 10, true, &a);
        assert_eq!(base, first(&s, 10, true, &a), "deterministic");
        assert_ne!(base, first(&s, 11, true, &a), "epoch");
        assert_ne!(base, first(&s, 10, false, &a), "family");
        assert_ne!(base, first(&s, 10, true, &b), "salt");
        assert_ne!(base, first(&other, 10, true, &a), "secret");
    }
}
