//! The HTTP/1.1 front-end: `CONNECT host:port` → `200` then raw bytes, and connect-udp by Upgrade
//! (RFC 9298 §3.3) → `101` then capsules.
//!
//! Request heads are read and checked by `cfr_proto::http1` (strict: see there) rather than by
//! hyper, which accepts bare LF line endings, reads a body on a CONNECT and dials the URI host of
//! an absolute-form CONNECT — each a differential a proxy in front of the relay could exploit.
//! A head the relay refuses as malformed ends the connection after the 400/431; a well-formed
//! refused request (407, 403, 503, ...) keeps it alive for the next request.
//!
//! HTTP/1.1 has no stream reset: an aborted tunnel (destination reset, drain, ...) ends the
//! connection with a TCP RST, never with a FIN a client could take for the end of the stream.
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use cfr_proto::http1::{parse_request_head, HeadError, RequestHead, RequestKind};
use cfr_proto::ProxyError;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::front::FrontCtx;
use crate::metrics as m;
use crate::tunnel::{
    error_response, serve_request, Abort, ClientConn, Exchange, TunnelError, TunnelRecv,
    TunnelSend, UdpChannels, UdpUplink,
};

/// The upgrade token of connect-udp (RFC 9298 §3.3, §7.1).
const CONNECT_UDP: &str = cfr_proto::http1::CONNECT_UDP_TOKEN;

const READ_CHUNK: usize = 16 * 1024;

type Tls = TlsStream<TcpStream>;

/// One client connection: the TLS stream and the bytes read from it but not yet used.
struct H1Conn {
    io: Tls,
    buf: BytesMut,
    /// A 2xx/101 went out: the connection now carries a tunnel and no further request.
    upgraded: bool,
}

/// Serves one HTTP/1.1 connection (TLS done) until it closes, carries a tunnel to its end, or the
/// drain ends it. `first_head` bounds the wait for the first request head.
pub(crate) async fn serve_connection(
    ctx: FrontCtx,
    io: Tls,
    client: Arc<ClientConn>,
    first_head: Duration,
) {
    let config = &ctx.core.config;
    let max_head = config.limits.max_request_head_bytes;
    let head_timeout = config.handshake_timeout();
    // Between requests, as on HTTP/2 and HTTP/3: a connection with no tunnel is closed after
    // `connection_idle_secs`, so a keep-alive connection (e.g. after a 407) cannot hold its
    // client-table slot forever.
    let idle = Duration::from_secs(config.timeouts.connection_idle_secs);
    let mut conn = H1Conn {
        io,
        buf: BytesMut::new(),
        upgraded: false,
    };
    let mut wait_first_byte = first_head;
    loop {
        let head = tokio::select! {
            // Drain: no new request on this connection.
            _ = ctx.shutdown.cancelled() => return,
            head = read_head(&mut conn, max_head, wait_first_byte, head_timeout) => head,
        };
        wait_first_byte = idle;
        let head = match head {
            Ok(Some(head)) => head,
            // Closed, timed out or unreadable between requests: nothing to answer.
            Ok(None) => return,
            Err(err) => {
                metrics::counter!(m::REQUESTS_MALFORMED, "protocol" => "http/1.1").increment(1);
                tracing::debug!(error = %err, "HTTP/1.1 request head refused");
                let refusal = head_refusal(&err);
                let _ =
                    write_response(&mut conn.io, &error_response(&refusal), &[], &ctx, true).await;
                let _ = conn.io.shutdown().await;
                return;
            }
        };
        conn.buf.advance(head.len);
        let Some((parts, protocol)) = request_parts(&head) else {
            let refusal = head_refusal(&HeadError::Malformed("invalid header field"));
            let _ = write_response(&mut conn.io, &error_response(&refusal), &[], &ctx, true).await;
            let _ = conn.io.shutdown().await;
            return;
        };
        if protocol.is_none() {
            let pvd = crate::pvd::answer(
                ctx.core.pvd.as_ref(),
                &parts.method,
                None,
                &parts.uri,
                "http/1.1",
            );
            if let Some(resp) = pvd {
                let (resp_head, body) = resp.into_parts();
                let resp_head = http::Response::from_parts(resp_head, ());
                let close = ctx.shutdown.is_cancelled();
                if write_response(&mut conn.io, &resp_head, &body, &ctx, close)
                    .await
                    .is_err()
                    || close
                {
                    return;
                }
                continue;
            }
        }
        let reset = Arc::new(AtomicBool::new(false));
        let exchange = H1Exchange {
            conn: &mut conn,
            ctx: &ctx,
            upgrade_udp: protocol.is_some(),
            reset: reset.clone(),
        };
        // Biased: once the grace period is over an open tunnel ends itself (outcome `drained`,
        // reset below); only a request still being dialled is cut here.
        let cut = tokio::select! {
            biased;
            _ = serve_request(&ctx.core, &client, &parts, protocol, exchange) => false,
            _ = ctx.closed.cancelled() => true,
        };
        if cut || reset.load(Ordering::Relaxed) {
            return abort_connection(conn.io);
        }
        if conn.upgraded || ctx.shutdown.is_cancelled() {
            // The tunnel ended (its pumps already sent close_notify or aborted), or the drain
            // answered this request with `Connection: close`.
            return;
        }
    }
}

/// The 400 or 431 for a head that cannot be served.
fn head_refusal(err: &HeadError) -> TunnelError {
    match err {
        HeadError::TooLarge => TunnelError {
            status: Some(431),
            ..TunnelError::new(
                ProxyError::HttpRequestError,
                "request header section too large",
            )
        },
        HeadError::Malformed(why) => TunnelError::new(ProxyError::HttpRequestError, why),
        HeadError::Incomplete => {
            TunnelError::new(ProxyError::HttpRequestError, "incomplete request head")
        }
    }
}

/// Ends the connection with a TCP RST instead of a FIN, so the client cannot mistake a tunnel cut
/// short for one that ended (HTTP/1.1 has no stream reset; a FIN without TLS close_notify is
/// only a truncation signal clients often ignore).
fn abort_connection(io: Tls) {
    let (tcp, _) = io.into_inner();
    // SO_LINGER 0: close() sends RST and discards unsent data.
    if let Err(e) = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed");
    }
}

/// Reads until one request head is complete: `Ok(None)` when the connection closes or stays
/// silent for `wait_first_byte` before a head starts; the head must then complete within
/// `head_timeout`.
async fn read_head(
    conn: &mut H1Conn,
    max_head: usize,
    wait_first_byte: Duration,
    head_timeout: Duration,
) -> Result<Option<RequestHead>, HeadError> {
    let mut deadline = Instant::now() + wait_first_byte;
    let mut started = !conn.buf.is_empty();
    if started {
        deadline = deadline.min(Instant::now() + head_timeout);
    }
    loop {
        match parse_request_head(&conn.buf, max_head) {
            Err(HeadError::Incomplete) => {}
            verdict => return verdict.map(Some),
        }
        conn.buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout_at(deadline, conn.io.read_buf(&mut conn.buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(_)) => {}
            Err(_) => {
                if started {
                    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "header_timeout")
                        .increment(1);
                }
                return Ok(None);
            }
        }
        if !started {
            started = true;
            deadline = deadline.min(Instant::now() + head_timeout);
        }
    }
}

/// The request as the tunnel core sees it. RFC 9298 §3.3: over HTTP/1.1, connect-udp is a GET
/// with `Upgrade: connect-udp`; the core sees it as the extended CONNECT it is on HTTP/2 and
/// HTTP/3. `None` if a field cannot be represented (never for a head httparse accepted, but not
/// assumed).
fn request_parts(head: &RequestHead) -> Option<(http::request::Parts, Option<&'static str>)> {
    let (method, protocol) = match head.kind {
        RequestKind::Connect(_) => (http::Method::CONNECT, None),
        RequestKind::ConnectUdp => (http::Method::CONNECT, Some(CONNECT_UDP)),
        RequestKind::Other => (http::Method::from_bytes(head.method.as_bytes()).ok()?, None),
    };
    let uri: http::Uri = match head.kind {
        RequestKind::Other => head.target.parse().unwrap_or_default(),
        _ => head.target.parse().ok()?,
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    for (name, value) in &head.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_bytes(value).ok()?;
        b = b.header(name, value);
    }
    let (parts, ()) = b.body(()).ok()?.into_parts();
    Some((parts, protocol))
}

/// Writes a response head and `body` (a PvD document, which carries its own Content-Length). A
/// refusal has no content (`Content-Length: 0`, so the connection can carry the next request); a
/// 2xx to CONNECT carries neither Content-Length nor Transfer-Encoding (RFC 9110 §8.6, §6.4.1).
async fn write_response(
    io: &mut Tls,
    response: &http::Response<()>,
    body: &[u8],
    ctx: &FrontCtx,
    close: bool,
) -> io::Result<()> {
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    let mut field = |name: &str, value: &[u8]| {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    for (name, value) in response.headers() {
        field(name.as_str(), value.as_bytes());
    }
    field(http::header::ALT_SVC.as_str(), ctx.alt_svc.as_bytes());
    let tunnel = status.is_success() || status == http::StatusCode::SWITCHING_PROTOCOLS;
    if !tunnel
        && !response
            .headers()
            .contains_key(http::header::CONTENT_LENGTH)
    {
        field("content-length", b"0");
    }
    if !tunnel && close {
        field("connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);
    io.write_all(&head).await?;
    io.flush().await
}

struct H1Exchange<'a> {
    conn: &'a mut H1Conn,
    ctx: &'a FrontCtx,
    upgrade_udp: bool,
    /// Set when the tunnel is reset: the connection then ends with a TCP RST.
    reset: Arc<AtomicBool>,
}

impl<'a> Exchange for H1Exchange<'a> {
    type Recv = H1Recv<'a>;
    type Send = H1Send<'a>;

    async fn respond(
        self,
        response: http::Response<()>,
    ) -> io::Result<Option<(H1Recv<'a>, H1Send<'a>)>> {
        let (mut parts, ()) = response.into_parts();
        let ok = parts.status.is_success();
        if ok && self.upgrade_udp {
            // RFC 9298 §3.3: `101 Switching Protocols` with `Upgrade: connect-udp` (the core
            // already added `Capsule-Protocol: ?1`).
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
        let response = http::Response::from_parts(parts, ());
        // During the drain a refusal is the connection's last response.
        let close = self.ctx.shutdown.is_cancelled();
        write_response(&mut self.conn.io, &response, &[], self.ctx, close).await?;
        if !ok {
            return Ok(None);
        }
        self.conn.upgraded = true;
        // Bytes the client sent right behind its request head are the tunnel's first bytes.
        let early = self.conn.buf.split();
        let (r, w) = tokio::io::split(&mut self.conn.io);
        Ok(Some((
            H1Recv {
                inner: r,
                buf: early,
            },
            H1Send {
                inner: w,
                reset: self.reset,
            },
        )))
    }

    fn udp_channels(&mut self, _uplink: &Arc<UdpUplink>) -> UdpChannels {
        // Capsules only (RFC 9297 §3.5).
        UdpChannels {
            datagrams_out: None,
        }
    }

    fn protocol(&self) -> &'static str {
        "http/1.1"
    }
}

pub(crate) struct H1Recv<'a> {
    inner: ReadHalf<&'a mut Tls>,
    buf: BytesMut,
}

impl TunnelRecv for H1Recv<'_> {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        if !self.buf.is_empty() {
            return Ok(Some(self.buf.split().freeze()));
        }
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
        // Nothing to send: the connection closes (without close_notify) once the tunnel ends.
    }
}

pub(crate) struct H1Send<'a> {
    inner: WriteHalf<&'a mut Tls>,
    reset: Arc<AtomicBool>,
}

impl TunnelSend for H1Send<'_> {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.inner.write_all(&data).await?;
        self.inner.flush().await
    }

    async fn finish(&mut self) -> io::Result<()> {
        // TLS close_notify, then TCP FIN on the write side; reading goes on (half-close).
        self.inner.shutdown().await
    }

    fn reset(&mut self, _why: Abort) {
        // HTTP/1.1 has no reset code: the connection ends with a TCP RST once the tunnel is
        // over (`abort_connection`), which no client mistakes for a finished stream.
        self.reset.store(true, Ordering::Relaxed);
    }
}
