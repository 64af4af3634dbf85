//! Ephemeral egress addresses for cfr (draft-scalone-cfr-source-privacy).
//!
//! Each tunnel leaves from a source address drawn with a CSPRNG, uniformly over the operator's
//! prefixes ([`EgressPool`], [`ConnectionEgress`]), through a socket bound to it with freebind
//! ([`connect_tcp`], [`bind_udp`]). [`check::diagnose`] tells an operator what is missing on the host.
//! With sealing on ([`seal`]), the host bits are instead an FF1 encryption of the subscriber handle
//! and epoch that only the operator's key opens.
//!
//! Privacy rules this crate keeps: the mapping client ↔ egress address is never disclosed: no address
//! in metrics labels, errors or logs above debug level.

#![forbid(unsafe_code)]

pub mod check;
mod config;
mod epoch;
mod pool;
pub mod seal;
mod socket;

pub use config::{EgressConfig, EgressPolicy, Fallback, ParseNameError};
pub use epoch::{Clock, EpochSchedule, SystemClock, MIN_SECRET_LEN};
pub use pool::{ConnectionEgress, EgressPool};
pub use seal::{Sealer, Subscriber};
pub use socket::{bind_tcp, bind_udp, connect_tcp, BoundTcp};

/// Registers descriptions of this crate's metrics with the installed `metrics` recorder. Labels are
/// `family` (`v4`/`v6`) and `proto` (`tcp`/`udp`) only: never an address.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "cfr_egress_addresses_issued_total",
        "Egress source addresses freshly drawn from the pool (reuse under per-connection/epoch not counted)"
    );
    metrics::describe_counter!(
        "cfr_egress_bind_failures_total",
        "Outgoing sockets that could not bind (or, for TCP, get a port for) their egress source address"
    );
}

/// Why no egress address could be had. Messages never contain an egress address.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum EgressError {
    /// The pool has no prefix of the destination's family and the fallback is `refuse`.
    #[error("no egress prefix for IPv{} destinations (fallback is refuse)", if *v6 { 6 } else { 4 })]
    NoAddressForFamily {
        /// The destination is IPv6.
        v6: bool,
    },
    /// The configuration cannot be used as it is.
    #[error("invalid egress configuration: {0}")]
    InvalidConfig(String),
    /// Every draw hit a reserved address (probability ≤ 2^-128 for a validated pool).
    #[error("could not draw an egress address")]
    DrawFailed,
}
