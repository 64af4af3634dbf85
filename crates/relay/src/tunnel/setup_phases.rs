//! Where a tunnel's setup time goes, phase by phase, as relay-wide sums: timing aggregates only,
//! never tied to a client, a destination or an egress address (the privacy contract).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The steps between a parsed request head and the 2xx on the wire, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupPhase {
    /// Credentials checked.
    Auth,
    /// Method, `:protocol` and target validated.
    Parse,
    /// Tunnel slots reserved.
    Admit,
    /// Name looked up (nothing for an IP literal).
    Resolve,
    /// Destination policy applied to every address, dial order chosen.
    Policy,
    /// Egress address drawn, socket created and bound.
    Bind,
    /// TCP handshake with the destination (UDP: connect(2), no packet).
    Connect,
    /// 2xx response sent.
    Respond,
}

impl SetupPhase {
    pub const ALL: [SetupPhase; 8] = [
        SetupPhase::Auth,
        SetupPhase::Parse,
        SetupPhase::Admit,
        SetupPhase::Resolve,
        SetupPhase::Policy,
        SetupPhase::Bind,
        SetupPhase::Connect,
        SetupPhase::Respond,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SetupPhase::Auth => "auth",
            SetupPhase::Parse => "parse",
            SetupPhase::Admit => "admit",
            SetupPhase::Resolve => "resolve",
            SetupPhase::Policy => "policy",
            SetupPhase::Bind => "bind",
            SetupPhase::Connect => "connect",
            SetupPhase::Respond => "respond",
        }
    }
}

/// The clock of one tunnel setup: each [`SetupClock::mark`] charges the time since the previous
/// mark to a phase. Atomics so the dial closures can share it across awaits.
#[derive(Debug)]
pub struct SetupClock {
    start: Instant,
    last_ns: AtomicU64,
    spent_ns: [AtomicU64; SetupPhase::ALL.len()],
}

impl SetupClock {
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
            spent_ns: Default::default(),
        }
    }

    /// Charges the time since the previous mark (or the start) to `phase`.
    pub fn mark(&self, phase: SetupPhase) {
        let now = self.start.elapsed().as_nanos() as u64;
        let last = self.last_ns.swap(now, Ordering::Relaxed);
        self.spent_ns[phase as usize].fetch_add(now.saturating_sub(last), Ordering::Relaxed);
    }
}

/// Relay-wide sums over every tunnel that reached its 2xx.
#[derive(Debug, Default)]
pub struct SetupPhases {
    tunnels: AtomicU64,
    spent_ns: [AtomicU64; SetupPhase::ALL.len()],
}

/// A copy of [`SetupPhases`] at one moment; subtract two to get an interval's breakdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetupSnapshot {
    pub tunnels: u64,
    pub spent_ns: [u64; SetupPhase::ALL.len()],
}

impl SetupPhases {
    pub(super) fn record(&self, clock: &SetupClock) {
        for (sum, spent) in self.spent_ns.iter().zip(&clock.spent_ns) {
            sum.fetch_add(spent.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.tunnels.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SetupSnapshot {
        SetupSnapshot {
            tunnels: self.tunnels.load(Ordering::Relaxed),
            spent_ns: std::array::from_fn(|i| self.spent_ns[i].load(Ordering::Relaxed)),
        }
    }
}

impl SetupSnapshot {
    /// Mean time per tunnel in each phase between `earlier` and `self`, in µs.
    pub fn mean_us_since(&self, earlier: &SetupSnapshot) -> Option<[(SetupPhase, f64); 8]> {
        let n = self
            .tunnels
            .checked_sub(earlier.tunnels)
            .filter(|&n| n > 0)?;
        Some(std::array::from_fn(|i| {
            let spent = self.spent_ns[i].saturating_sub(earlier.spent_ns[i]);
            (SetupPhase::ALL[i], spent as f64 / n as f64 / 1e3)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_charge_the_elapsed_time_to_their_phase() {
        let phases = SetupPhases::default();
        let before = phases.snapshot();
        let clock = SetupClock::start();
        let t = Instant::now();
        while t.elapsed().as_micros() < 200 {
            std::hint::spin_loop();
        }
        clock.mark(SetupPhase::Connect);
        clock.mark(SetupPhase::Respond);
        phases.record(&clock);
        let means = phases.snapshot().mean_us_since(&before).unwrap();
        let connect = means[SetupPhase::Connect as usize];
        assert_eq!(connect.0, SetupPhase::Connect);
        assert!(connect.1 >= 200.0, "connect got {} µs", connect.1);
        assert!(means[SetupPhase::Auth as usize].1 == 0.0);
        assert!(phases
            .snapshot()
            .mean_us_since(&phases.snapshot())
            .is_none());
    }
}
