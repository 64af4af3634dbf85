//! What both pumps share: idle tracking, per-tunnel tallies and the typed outcome.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::exchange::{Abort, TunnelRecv, TunnelSend};

/// How a tunnel ended: the `outcome` of its log line, and the abort its client side gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TunnelOutcome {
    /// Both sides ended cleanly.
    #[default]
    Closed,
    /// The client reset its stream (or its connection went away).
    ClientReset,
    /// The destination reset the TCP connection or a write to it failed.
    TargetReset,
    /// The client sent a malformed or truncated capsule stream.
    MalformedCapsule,
    /// Nothing moved either way for the configured idle time.
    IdleTimeout,
    /// Still open when the drain's grace period ended.
    Drained,
}

impl TunnelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelOutcome::Closed => "closed",
            TunnelOutcome::ClientReset => "client_reset",
            TunnelOutcome::TargetReset => "target_reset",
            TunnelOutcome::MalformedCapsule => "malformed_capsule",
            TunnelOutcome::IdleTimeout => "idle_timeout",
            TunnelOutcome::Drained => "drained",
        }
    }

    /// The abort the client side of the tunnel gets; `None` for a clean end.
    pub fn abort(self) -> Option<Abort> {
        match self {
            TunnelOutcome::Closed => None,
            TunnelOutcome::ClientReset | TunnelOutcome::IdleTimeout => Some(Abort::Cancelled),
            TunnelOutcome::TargetReset => Some(Abort::ConnectError),
            TunnelOutcome::MalformedCapsule => Some(Abort::DatagramError),
            // The client must not mistake a cut tunnel for a finished one: reset, never FIN.
            TunnelOutcome::Drained => Some(Abort::ConnectError),
        }
    }
}

impl std::fmt::Display for TunnelOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ends the client side of a tunnel that stopped early: reset towards the client, stop what it
/// still sends. A clean end is left to the pump (it knows whether it still owes a FIN).
pub(super) fn abort_client<R: TunnelRecv, S: TunnelSend>(
    outcome: TunnelOutcome,
    rx: &mut R,
    tx: &mut S,
) {
    if let Some(why) = outcome.abort() {
        tx.reset(why);
        rx.abort(why);
    }
}

/// Resolves with [`TunnelOutcome::Drained`] once the drain's grace period is over.
pub(super) async fn grace_over(token: &tokio_util::sync::CancellationToken) -> TunnelOutcome {
    token.cancelled().await;
    TunnelOutcome::Drained
}

/// What a finished tunnel did, for its log line.
#[derive(Debug, Default)]
pub struct TunnelStats {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub outcome: TunnelOutcome,
}

/// Tracks the last time a tunnel moved data, for idle timeouts (on tokio's clock, which tests can
/// pause).
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    pub(super) fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Resolves once nothing moved for `idle`.
    pub(super) async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let since = self.start.elapsed().saturating_sub(last);
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since + Duration::from_millis(5)).await;
        }
    }
}
