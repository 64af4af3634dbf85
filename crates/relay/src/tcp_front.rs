//! The TLS/TCP fallback front-end's accept path, for networks where QUIC does not get through: one
//! TCP listener (by default on the QUIC port number), TLS with ALPN `h2` / `http/1.1`, then the
//! HTTP/2 (`http2.rs`) or HTTP/1.1 (`http1.rs`) mapping onto the same tunnel core as HTTP/3.
//!
//! Every response carries `Alt-Svc: h3=":PORT"` (RFC 7838) so capable clients move to HTTP/3.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::RelayConfig;
use crate::front::{ActiveConnection, FrontCtx};
use crate::metrics as m;
use crate::tls;
use crate::{http1, http2};

/// ALPN of HTTP/2 over TLS (RFC 9113 §3.2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The TCP listener and the TLS it speaks.
pub(crate) struct TcpFront {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl TcpFront {
    /// TLS with the relay's certificate (and optional client CA), ALPN `h2` then `http/1.1`.
    pub(crate) fn new(
        config: &RelayConfig,
        listener: TcpListener,
    ) -> Result<TcpFront, tls::TlsError> {
        let tls = tls::server_config(
            &config.cert,
            &config.key,
            config.auth.client_ca.as_deref(),
            &[ALPN_H2, ALPN_HTTP11],
        )?;
        Ok(TcpFront {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
        })
    }

    /// Accepts TCP connections until the drain starts; the listener closes when this returns, so
    /// no new connection is taken during the drain.
    pub(crate) async fn accept_loop(self, ctx: &FrontCtx) {
        loop {
            let accepted = tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => self.accept(ctx, stream, peer),
                // EMFILE and the like: keep serving what is open, retry shortly.
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves one accepted TCP connection in a tracked task, holding its place in the client
    /// table until the connection ends.
    fn accept(&self, ctx: &FrontCtx, tcp: TcpStream, peer: SocketAddr) {
        let Some(slot) = ctx.admit(peer) else {
            return;
        };
        let ctx = ctx.clone();
        let acceptor = self.acceptor.clone();
        ctx.tasks.clone().spawn(async move {
            let _slot = slot;
            let closed = ctx.closed.clone();
            // When the grace period ends, the connection's tunnels reset themselves (outcome
            // `drained`); the connection gets a moment to send those resets before it is dropped.
            // Boxed: the connection's future (TLS, HTTP, tunnel, pumps) is kilobytes, and a task's
            // future is moved several times on its way into the scheduler; a pointer moves cheaply.
            tokio::select! {
                biased;
                _ = Box::pin(serve_connection(ctx, acceptor, tcp, peer)) => {}
                _ = async {
                    closed.cancelled().await;
                    tokio::time::sleep(crate::server::CLOSE_LINGER).await;
                } => {}
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
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.as_ref());
    // No ALPN at all: an HTTP/1.1 client (RFC 7301 §3.2 leaves the choice to the server).
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let protocol = if h2 { "h2" } else { "http/1.1" };
    let conn = ActiveConnection::open(&ctx.core, peer, protocol, leaf);
    let client = conn.client.clone();
    // The rest of the handshake budget covers the HTTP/2 preface and SETTINGS, or the first
    // HTTP/1.1 request head.
    let left = handshake.saturating_sub(started.elapsed());
    if h2 {
        http2::serve_connection(ctx, tls, client, left).await;
    } else {
        http1::serve_connection(ctx, tls, client, left).await;
    }
}
