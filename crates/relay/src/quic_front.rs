//! The HTTP/3 front-end's accept path: QUIC connections admitted against the handshake gate
//! (rate per client prefix, Retry under load) and the client table, their handshakes bounded,
//! then served by `http3::serve_connection`.
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::admission::HandshakeVerdict;
use crate::front::{ActiveConnection, FrontCtx};
use crate::http3;
use crate::metrics as m;

/// Accepts QUIC connections until the drain starts (or the endpoint closes).
pub(crate) async fn accept_loop(endpoint: &quinn::Endpoint, ctx: &FrontCtx) {
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => accept(ctx, incoming),
                None => return,
            },
        }
    }
}

fn accept(ctx: &FrontCtx, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let validated = incoming.remote_address_validated();
    let half_open = match ctx.handshakes.verdict(peer.ip(), validated, Instant::now()) {
        HandshakeVerdict::Accept(guard) => guard,
        HandshakeVerdict::Retry => {
            //= https://www.rfc-editor.org/rfc/rfc9000#section-8.1.2
            //# A server can also use a Retry packet to defer the state and processing costs of
            //# connection establishment.
            ctx.core
                .counters
                .quic_retries
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::HANDSHAKES_RETRIED).increment(1);
            // Only fails for an already validated address, which never gets here.
            let _ = incoming.retry();
            return;
        }
        HandshakeVerdict::Refuse => {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake_rate").increment(1);
            incoming.refuse();
            return;
        }
    };
    let Some(slot) = ctx.admit(peer) else {
        incoming.refuse();
        return;
    };
    let ctx = ctx.clone();
    ctx.tasks.clone().spawn(async move {
        let _slot = slot;
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "handshake refused");
                return;
            }
        };
        let handshake = ctx.core.config.handshake_timeout();
        let quic = match tokio::time::timeout(handshake, connecting).await {
            Ok(Ok(c)) => {
                drop(half_open);
                c
            }
            Ok(Err(e)) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake").increment(1);
                tracing::debug!(error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake_timeout")
                    .increment(1);
                return;
            }
        };
        // The verifier only lets a certificate through if it chains to `auth.client_ca`.
        let chain = quic.peer_identity().and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        });
        let leaf = chain.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
        let conn = ActiveConnection::open(&ctx.core, quic.remote_address(), "h3", leaf);
        http3::serve_connection(&ctx, quic, conn.client.clone()).await;
    });
}
