//! The tunnel core shared by every front-end: authentication verdicts, target resolution,
//! destination policy, egress binding, limits, and the byte/datagram pumps. A front-end only maps
//! its framing (HTTP/3 streams, HTTP/2 streams, an upgraded HTTP/1.1 connection) onto
//! [`TunnelRecv`] / [`TunnelSend`].

mod core;
mod error;
mod exchange;
mod log;
mod pump;
#[cfg(test)]
mod pump_tests;
mod request;
mod setup_phases;
mod tcp_pump;
mod udp_pump;

pub use self::core::{ClientConn, Core, RelayCounters, TunnelPermit};
pub use error::{error_response, TunnelError, PROXY_NAME};
pub use exchange::{
    Abort, DatagramOut, DatagramSent, Exchange, TunnelRecv, TunnelSend, UdpChannels,
};
pub use log::{log_tunnel_end, log_tunnel_refused, tunnel_id};
pub use pump::{TunnelOutcome, TunnelStats};
pub use request::{classify, serve_request, TunnelRequest};
pub use setup_phases::{SetupClock, SetupPhase, SetupPhases, SetupSnapshot};
pub use tcp_pump::relay_tcp;
pub use udp_pump::{frame_in, relay_udp, UdpUplink};

/// Tunnel kinds, for limits, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Tcp,
    Udp,
}

impl TunnelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelKind::Tcp => "tcp",
            TunnelKind::Udp => "udp",
        }
    }
}
