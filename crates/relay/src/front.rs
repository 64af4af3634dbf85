//! What every front-end (HTTP/3 over QUIC, HTTP/2 and HTTP/1.1 over TLS/TCP) shares: one context
//! for its connection tasks and one guard that keeps the connection gauge and log lines right.
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{ClientPrefix, ClientSlot, ClientTable, HandshakeGate};
use crate::metrics as m;
use crate::tunnel::{ClientConn, Core};

/// What the accept loop and every connection task of one `Relay::run` share.
#[derive(Clone)]
pub(crate) struct FrontCtx {
    pub core: Arc<Core>,
    /// Connections per client prefix and in total.
    pub clients: Arc<ClientTable>,
    /// QUIC handshake rate per client prefix and half-open handshakes (Retry decisions).
    pub handshakes: Arc<HandshakeGate>,
    /// Drain started: stop accepting, send GOAWAY / stop keep-alive, let open tunnels finish.
    pub shutdown: CancellationToken,
    /// Grace period over: drop connections and tunnels still open.
    pub closed: CancellationToken,
    /// Every connection and tunnel task; the drain waits for them.
    pub tasks: TaskTracker,
    /// `h3=":PORT"` of the QUIC listener, which the TLS/TCP front-ends advertise (RFC 7838) so
    /// capable clients move to HTTP/3.
    pub alt_svc: HeaderValue,
}

impl FrontCtx {
    pub(crate) fn new(core: Arc<Core>, quic_port: u16) -> Self {
        let limits = &core.config.limits;
        let prefix = ClientPrefix {
            v4: limits.client_prefix_v4,
            v6: limits.client_prefix_v6,
        };
        let clients = ClientTable::new(
            limits.connections_per_client,
            limits.total_connections,
            prefix,
        );
        let handshakes = HandshakeGate::new(
            limits.handshakes_per_sec_per_client,
            limits.half_open_before_retry as usize,
            prefix,
        );
        Self {
            clients: Arc::new(clients),
            handshakes: Arc::new(handshakes),
            shutdown: CancellationToken::new(),
            closed: core.grace_over.clone(),
            tasks: TaskTracker::new(),
            alt_svc: HeaderValue::from_str(&format!("h3=\":{quic_port}\""))
                .expect("digits are a valid header value"),
            core,
        }
    }

    /// Admission for a new connection from `peer`: its slot, or `None` (counted) at a limit.
    pub(crate) fn admit(&self, peer: SocketAddr) -> Option<ClientSlot> {
        let slot = self.clients.admit(peer.ip());
        if slot.is_none() {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "connection_limit").increment(1);
        }
        slot
    }
}

/// One client connection past its handshake, on any front-end. Counts it in the connection metrics
/// while it lives and logs its opening and closing — also when the drain's grace period cuts it off.
/// Connection-level events may name the client, never a destination.
pub(crate) struct ActiveConnection {
    pub client: Arc<ClientConn>,
    peer: SocketAddr,
    protocol: &'static str,
}

impl ActiveConnection {
    pub(crate) fn open(
        core: &Core,
        peer: SocketAddr,
        protocol: &'static str,
        client_cert: Option<&[u8]>,
    ) -> Self {
        metrics::counter!(m::CONNECTIONS, "protocol" => protocol).increment(1);
        metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
        let mtls = client_cert.is_some();
        tracing::info!(client = %peer, mtls, protocol, "connection opened");
        Self {
            client: Arc::new(core.client_conn(client_cert)),
            peer,
            protocol,
        }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
        tracing::info!(client = %self.peer, protocol = self.protocol, "connection closed");
    }
}
