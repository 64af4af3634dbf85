//! Tunnel log lines. They never carry a client or egress address.
use std::time::Instant;

use cfr_proto::Target;

use super::error::TunnelError;
use super::pump::TunnelStats;
use super::TunnelKind;

/// A random identifier for one tunnel's log lines. It links nothing: connection-level log lines
/// never carry it. Drawn from the thread-local CSPRNG (seeded from the OS, reseeded
/// periodically), not `OsRng`: no getrandom(2) per tunnel for a value that only has to be
/// unpredictable and unique enough to tell log lines apart.
pub fn tunnel_id() -> String {
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    hex::encode(b)
}

/// Helper for logs: never includes client or egress addresses.
pub fn log_tunnel_end(
    id: &str,
    kind: TunnelKind,
    target: &Target,
    status: u16,
    stats: &TunnelStats,
    started: Instant,
) {
    tracing::info!(
        tunnel = id,
        kind = kind.as_str(),
        destination = %target,
        status,
        outcome = stats.outcome.as_str(),
        bytes_up = stats.bytes_up,
        bytes_down = stats.bytes_down,
        datagrams_up = stats.datagrams_up,
        datagrams_down = stats.datagrams_down,
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}

/// Helper for logs of refused tunnels.
pub fn log_tunnel_refused(id: &str, kind: TunnelKind, target: Option<&Target>, err: &TunnelError) {
    match target {
        Some(t) => {
            tracing::info!(tunnel = id, kind = kind.as_str(), destination = %t, status = err.status(), error = err.error.token(), "tunnel refused")
        }
        None => tracing::info!(
            tunnel = id,
            kind = kind.as_str(),
            status = err.status(),
            error = err.error.token(),
            "tunnel refused"
        ),
    }
}
