//! The TLS/TCP fallback front-end, for networks where QUIC does not get through: one TCP listener
//! (by default on the QUIC port number), TLS with ALPN `h2` / `http/1.1`, then the HTTP/2
//! (`http2.rs`) or HTTP/1.1 (`http1.rs`) mapping onto the same tunnel core as HTTP/3.
//!
//! Every response carries `Alt-Svc: h3=":PORT"` (RFC 7838) so capable clients move to HTTP/3.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics as m;
use crate::server::ClientSlot;
use crate::tls;
use crate::tunnel::Core;
use crate::{http1, http2};

/// ALPN of HTTP/2 over TLS (RFC 9113 §3.2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// What every TCP connection task shares.
#[derive(Clone)]
pub(crate) struct FrontCtx {
    pub core: Arc<Core>,
    /// Drain started: send GOAWAY / stop keep-alive, let open tunnels finish.
    pub shutdown: CancellationToken,
    /// Grace period over: drop connections and tunnels still open.
    pub closed: CancellationToken,
    pub tasks: TaskTracker,
    /// `h3=":PORT"` for the QUIC listener.
    pub alt_svc: HeaderValue,
}

/// The TLS side of the TCP listener.
pub(crate) struct TcpFront {
    acceptor: TlsAcceptor,
    alt_svc: HeaderValue,
}

impl TcpFront {
    /// TLS with the relay's certificate (and optional client CA), ALPN `h2` then `http/1.1`.
    pub(crate) fn new(core: &Core, quic_port: u16) -> Result<TcpFront, tls::TlsError> {
        let cfg = &core.config;
        let tls = tls::server_config(
            &cfg.cert,
            &cfg.key,
            cfg.auth.client_ca.as_deref(),
            &[ALPN_H2, ALPN_HTTP11],
        )?;
        Ok(TcpFront {
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            alt_svc: HeaderValue::from_str(&format!("h3=\":{quic_port}\""))
                .expect("digits are a valid header value"),
        })
    }

    /// What the connection tasks of one `Relay::run` share.
    pub(crate) fn context(
        &self,
        core: &Arc<Core>,
        shutdown: &CancellationToken,
        closed: &CancellationToken,
        tasks: &TaskTracker,
    ) -> FrontCtx {
        FrontCtx {
            core: core.clone(),
            shutdown: shutdown.clone(),
            closed: closed.clone(),
            tasks: tasks.clone(),
            alt_svc: self.alt_svc.clone(),
        }
    }

    /// Serves one accepted TCP connection in a tracked task; `slot` holds its place in the
    /// per-client connection table until the connection ends.
    pub(crate) fn accept(
        &self,
        ctx: &FrontCtx,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: ClientSlot,
    ) {
        let ctx = ctx.clone();
        let acceptor = self.acceptor.clone();
        ctx.tasks.clone().spawn(async move {
            let _slot = slot;
            let closed = ctx.closed.clone();
            tokio::select! {
                _ = serve_connection(ctx, acceptor, tcp, peer) => {}
                _ = closed.cancelled() => {}
            }
        });
    }
}

async fn serve_connection(ctx: FrontCtx, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let handshake = ctx.core.config.handshake_timeout();
    let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake").increment(1);
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake_timeout").increment(1);
            return;
        }
    };
    let session = tls.get_ref().1;
    // The verifier only lets a certificate through if it chains to `auth.client_ca`.
    let verified = session
        .peer_certificates()
        .is_some_and(|chain| !chain.is_empty());
    // No ALPN at all: an HTTP/1.1 client (RFC 7301 §3.2 leaves the choice to the server).
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let protocol = if h2 { "h2" } else { "http/1.1" };
    metrics::counter!(m::CONNECTIONS, "protocol" => protocol).increment(1);
    let _active = ActiveConnection::new();
    // Connection-level events may name the client, never a destination.
    tracing::info!(client = %peer, mtls = verified, protocol, "connection opened");
    let client = Arc::new(ctx.core.client_conn(verified));
    // The rest of the handshake budget covers the HTTP/2 preface and SETTINGS.
    let left = handshake.saturating_sub(started.elapsed());
    if h2 {
        http2::serve_connection(ctx, tls, client, left).await;
    } else {
        http1::serve_connection(ctx, tls, client).await;
    }
    tracing::info!(client = %peer, protocol, "connection closed");
}

/// Keeps the active-connection gauge right, also when the drain's grace period cuts a
/// connection off mid-flight.
struct ActiveConnection;

impl ActiveConnection {
    fn new() -> Self {
        metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
        Self
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
    }
}
