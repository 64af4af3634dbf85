//! The HTTP/3 front-end's accept path: QUIC connections admitted against the client table, their
//! handshakes bounded, then served by `http3::serve_connection`.
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
    let Some(slot) = ctx.admit(incoming.remote_address()) else {
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
            Ok(Ok(c)) => c,
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
