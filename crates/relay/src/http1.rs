//! The HTTP/1.1 front-end on hyper: `CONNECT host:port` → `200` then raw bytes, and connect-udp
//! by Upgrade (request RFC 9298 §3.2, response §3.3) → `101` then capsules, both over hyper's
//! upgraded connection.
//!
//! HTTP/1.1 has no stream reset: an aborted tunnel closes the connection without TLS
//! close_notify, which the client sees as a truncated (not cleanly finished) stream.
use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::front::FrontCtx;
use crate::tunnel::{
    serve_request, Abort, ClientConn, Exchange, TunnelRecv, TunnelSend, UdpChannels,
};

/// The upgrade token of connect-udp (RFC 9298 §3, registered in §8.1).
const CONNECT_UDP: &str = "connect-udp";

type Response = http::Response<Full<Bytes>>;

/// Serves one HTTP/1.1 connection (TLS done) until it closes, is upgraded into a tunnel, or the
/// drain ends it.
pub(crate) async fn serve_connection<IO>(ctx: FrontCtx, io: IO, client: Arc<ClientConn>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let ctx = service_ctx.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle(ctx, client, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.core.config.handshake_timeout())
        .max_buf_size(64 * 1024);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled(), if !draining => {
                draining = true;
                // Finish the exchange in flight, then close instead of keeping the connection
                // alive. Upgraded tunnels live in their own tasks and are not affected.
                conn.as_mut().graceful_shutdown();
            }
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "HTTP/1.1 connection ended");
                }
                break;
            }
        }
    }
}

/// One request: runs the tunnel core in its own task (it outlives this response once the
/// connection is upgraded) and answers with the head the core chose.
async fn handle(
    ctx: FrontCtx,
    client: Arc<ClientConn>,
    mut req: http::Request<Incoming>,
) -> Response {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut head, _body) = req.into_parts();
    // RFC 9298 §3.2: over HTTP/1.1, connect-udp is a GET with `Upgrade: connect-udp` (and
    // `Connection: Upgrade`, which hyper checks before it hands over the connection). The core
    // sees it as the extended CONNECT it is on HTTP/2 and HTTP/3, and answers a malformed target
    // with 400.
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.2
    //# A UDP proxying request that does not conform to these restrictions is malformed.
    //# The recipient of such a malformed request MUST respond with an error and SHOULD
    //# use the 400 (Bad Request) status code.
    let upgrade_udp = head.method == http::Method::GET && upgrade_requested(&head.headers);
    if !upgrade_udp {
        let pvd = crate::pvd::answer(
            ctx.core.pvd.as_ref(),
            &head.method,
            None,
            &head.uri,
            "http/1.1",
        );
        if let Some(resp) = pvd {
            return resp.map(Full::new);
        }
    }
    let protocol = upgrade_udp.then(|| {
        head.method = http::Method::CONNECT;
        CONNECT_UDP
    });
    let (reply, answer) = oneshot::channel();
    let exchange = H1Exchange {
        reply,
        on_upgrade,
        upgrade_udp,
        alt_svc: ctx.alt_svc.clone(),
    };
    let closed = ctx.closed.clone();
    let core = ctx.core.clone();
    ctx.tasks.spawn(async move {
        tokio::select! {
            _ = serve_request(&core, &client, &head, protocol, exchange) => {}
            _ = closed.cancelled() => {}
        }
    });
    match answer.await {
        Ok(resp) => resp,
        // The core ended without answering (drain cut it off).
        Err(_) => {
            let mut resp = Response::new(Full::default());
            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            resp
        }
    }
}

/// `Upgrade` lists the connect-udp token (RFC 9110 §7.8: a comma-separated, case-insensitive list).
fn upgrade_requested(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(CONNECT_UDP))
}

struct H1Exchange {
    reply: oneshot::Sender<Response>,
    on_upgrade: OnUpgrade,
    upgrade_udp: bool,
    alt_svc: http::HeaderValue,
}

impl Exchange for H1Exchange {
    type Recv = H1Recv;
    type Send = H1Send;

    async fn respond(self, response: http::Response<()>) -> io::Result<Option<(H1Recv, H1Send)>> {
        let (mut parts, ()) = response.into_parts();
        parts.headers.insert(http::header::ALT_SVC, self.alt_svc);
        let ok = parts.status.is_success();
        if ok && self.upgrade_udp {
            // RFC 9298 §3.3: `101 Switching Protocols` with `Connection: Upgrade` and
            // `Upgrade: connect-udp` (the core already added `Capsule-Protocol: ?1`).
            parts.status = http::StatusCode::SWITCHING_PROTOCOLS;
            parts.headers.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static(CONNECT_UDP),
            );
            parts.headers.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
        }
        self.reply
            .send(http::Response::from_parts(parts, Full::default()))
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionReset, "connection gone"))?;
        if !ok {
            return Ok(None);
        }
        // Resolves once hyper has written the 200/101 and hands over the connection, including
        // any bytes the client sent right behind its request head.
        let upgraded = self
            .on_upgrade
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e))?;
        let (r, w) = tokio::io::split(TokioIo::new(upgraded));
        Ok(Some((
            H1Recv {
                inner: r,
                buf: BytesMut::new(),
            },
            H1Send { inner: w },
        )))
    }

    fn udp_channels(&mut self) -> UdpChannels {
        // Capsules only (RFC 9297 §3.5).
        UdpChannels {
            datagrams_in: None,
            datagrams_out: None,
        }
    }

    fn protocol(&self) -> &'static str {
        "http/1.1"
    }
}

const READ_CHUNK: usize = 16 * 1024;

pub(crate) struct H1Recv {
    inner: ReadHalf<TokioIo<Upgraded>>,
    buf: BytesMut,
}

impl TunnelRecv for H1Recv {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        self.buf.reserve(READ_CHUNK);
        // A close without close_notify surfaces as an error (UnexpectedEof): treated like a
        // stream reset by the core.
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(self.buf.split().freeze()))
    }

    fn abort(&mut self, _why: Abort) {
        // Nothing to send: the connection closes (without close_notify) once both halves drop.
    }
}

pub(crate) struct H1Send {
    inner: WriteHalf<TokioIo<Upgraded>>,
}

impl TunnelSend for H1Send {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.inner.write_all(&data).await?;
        self.inner.flush().await
    }

    async fn finish(&mut self) -> io::Result<()> {
        // TLS close_notify, then TCP FIN on the write side; reading goes on (half-close).
        self.inner.shutdown().await
    }

    fn reset(&mut self, _why: Abort) {
        // HTTP/1.1 has no reset code. Dropping both halves without `finish` closes the TCP
        // connection with no close_notify: the client sees a truncated stream, not a clean end.
    }
}
