//! The HTTP/2 front-end: h2 request streams mapped onto the tunnel core's traits.
//!
//! The `h2` crate is used directly rather than through hyper: hyper hands a CONNECT stream over as
//! an `Upgraded` byte stream whose only abrupt end is a drop (RST_STREAM CANCEL), while RFC 9113
//! §8.5 wants CONNECT_ERROR for a destination reset and RFC 9297 §3.3 a stream error for a
//! malformed capsule stream. h2's `SendStream::send_reset` expresses both.
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::front::FrontCtx;
use crate::tunnel::{
    serve_request, Abort, ClientConn, Exchange, TunnelRecv, TunnelSend, UdpChannels, UdpUplink,
};

/// Per-stream receive window (flow-control credit) offered to clients.
const STREAM_WINDOW: u32 = 4 << 20;
/// Per-connection receive window offered to clients.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// SETTINGS_MAX_FRAME_SIZE: DATA frames up to 64 KiB (default 16 KiB) reach the tunnel core as one
/// chunk of a TCP buffer, which it writes to the destination without copying it into its buffer.
const MAX_FRAME_SIZE: u32 = 64 << 10;

/// SETTINGS_MAX_HEADER_LIST_SIZE for h2: sixteen times the relay's limit, at least 256 KiB.
fn h2_header_list_bound(limit: usize) -> u32 {
    u32::try_from(limit.saturating_mul(16).max(256 << 10)).unwrap_or(u32::MAX)
}

/// Serves one HTTP/2 connection (TLS done, ALPN `h2`) until it closes or the drain ends it.
pub(crate) async fn serve_connection<IO>(
    ctx: FrontCtx,
    io: IO,
    client: Arc<ClientConn>,
    handshake: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &ctx.core.config.limits;
    // Receive windows as on HTTP/3 (`http3::transport_config`): 4 MiB per stream, 16 MiB per
    // connection, and never below `tcp_buffer_bytes`. A window of one TCP buffer (64 KiB) capped
    // an upload at one window per WINDOW_UPDATE round trip through both event loops: 0.3-0.7x of
    // vproxy on loopback. The window is credit, not an allocation: h2 buffers only what the client
    // actually sent ahead of the tunnel core, which releases capacity chunk by chunk.
    let window = u32::try_from(limits.tcp_buffer_bytes)
        .unwrap_or(u32::MAX)
        .max(STREAM_WINDOW);
    let connection_window = window.max(CONNECTION_WINDOW);
    let mut builder = h2::server::Builder::new();
    builder
        // RFC 8441 §3: SETTINGS_ENABLE_CONNECT_PROTOCOL = 1, so clients may send `:protocol`
        // (connect-udp, RFC 9298 §3.4).
        .enable_connect_protocol()
        // As on HTTP/3: the relay's own limit answers 503 below this; some headroom lets refused
        // requests get that answer instead of REFUSED_STREAM.
        .max_concurrent_streams(limits.tunnels_per_connection.saturating_add(16))
        // Bytes read from the client but not yet written to the destination stay within the
        // stream window: capacity is released only as the tunnel core takes the data.
        .initial_window_size(window)
        .initial_connection_window_size(connection_window)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(limits.tcp_buffer_bytes)
        // The relay's own limit (`limits.max_request_head_bytes`) answers 431 on the one stream
        // (tunnel::serve_request). h2's bound is only the backstop: a field it cannot buffer is a
        // connection error (GOAWAY), so it sits well above ours.
        .max_header_list_size(h2_header_list_bound(limits.max_request_head_bytes));
    let mut conn = match tokio::time::timeout(handshake, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "reason" => "handshake_timeout")
                .increment(1);
            return;
        }
    };
    let mut draining = false;
    // Like the QUIC idle timeout: a connection with no tunnel for `connection_idle_secs` gets a
    // GOAWAY, so idle connections do not hold their client-table slot forever.
    let idle = Duration::from_secs(ctx.core.config.timeouts.connection_idle_secs);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since = tokio::time::Instant::now();
    let mut idle_check = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = idle_check.tick(), if !draining => {
                if open.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    idle_since = tokio::time::Instant::now();
                } else if idle_since.elapsed() >= idle {
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
            _ = ctx.shutdown.cancelled(), if !draining => {
                draining = true;
                // RFC 9113 §6.8: GOAWAY; streams already accepted run to completion. The
                // connection must keep being polled (accept) for them to make progress.
                conn.graceful_shutdown();
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    let ctx2 = ctx.clone();
                    let client = client.clone();
                    let open = OpenStream::new(&open);
                    idle_since = tokio::time::Instant::now();
                    ctx.tasks.spawn(async move {
                        let _open = open;
                        let (head, body) = req.into_parts();
                        let protocol = head
                            .extensions
                            .get::<h2::ext::Protocol>()
                            .map(|p| p.as_str().to_owned());
                        if let Some(resp) = crate::pvd::answer(ctx2.core.pvd.as_ref(), &head.method, protocol.as_deref(), &head.uri, "h2") {
                            send_whole_response(respond, resp);
                            return;
                        }
                        let exchange = H2Exchange {
                            respond,
                            body,
                            alt_svc: ctx2.alt_svc.clone(),
                        };
                        // Biased: once the grace period is over an open tunnel ends itself with a
                        // reset (outcome `drained`); only a request still being dialled is dropped.
                        tokio::select! {
                            biased;
                            _ = serve_request(&ctx2.core, &client, &head, protocol.as_deref(), exchange) => {}
                            _ = ctx2.closed.cancelled() => {}
                        }
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/2 connection ended");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Sends a complete response with its body (the PvD); h2 queues the DATA frame until the
/// client's flow-control window allows it.
fn send_whole_response(mut respond: SendResponse<Bytes>, response: http::Response<Bytes>) {
    let (head, body) = response.into_parts();
    let sent = respond
        .send_response(http::Response::from_parts(head, ()), false)
        .and_then(|mut send| send.send_data(body, true));
    if let Err(e) = sent {
        tracing::debug!(error = %e, "response not delivered");
    }
}

/// Counts a request stream as open while it lives (idle-connection tracking).
struct OpenStream(Arc<std::sync::atomic::AtomicUsize>);

impl OpenStream {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// RFC 9113 §8.5: a destination reset or error is CONNECT_ERROR. RFC 9297 §3.3: a malformed or
/// truncated capsule stream makes the message malformed, which RFC 9113 §8.1.1 answers with a
/// stream error of type PROTOCOL_ERROR.
//= https://www.rfc-editor.org/rfc/rfc9113#section-8.5
//# Correspondingly, a proxy MUST send a TCP segment with the
//# RST bit set if it detects an error with the stream or the HTTP/2 connection.
//
// `tunnel::relay_tcp` sets linger 0 on the destination socket when the client side fails.
fn abort_reason(why: Abort) -> Reason {
    match why {
        Abort::ConnectError => Reason::CONNECT_ERROR,
        Abort::DatagramError => Reason::PROTOCOL_ERROR,
        Abort::Cancelled => Reason::CANCEL,
    }
}

fn reset_error(e: h2::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

struct H2Exchange {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    alt_svc: http::HeaderValue,
}

impl Exchange for H2Exchange {
    type Recv = H2Recv;
    type Send = H2Send;

    async fn respond(
        self,
        mut response: http::Response<()>,
    ) -> io::Result<Option<(H2Recv, H2Send)>> {
        let H2Exchange {
            mut respond,
            body,
            alt_svc,
        } = self;
        response
            .headers_mut()
            .insert(http::header::ALT_SVC, alt_svc);
        let ok = response.status().is_success();
        // A refusal ends the stream with the headers; dropping `body` then answers whatever the
        // client still sends with RST_STREAM(NO_ERROR) (RFC 9113 §8.1).
        let send = respond.send_response(response, !ok).map_err(reset_error)?;
        if !ok {
            return Ok(None);
        }
        Ok(Some((H2Recv { inner: body }, H2Send { inner: send })))
    }

    fn udp_channels(&mut self, _uplink: &Arc<UdpUplink>) -> UdpChannels {
        // No QUIC datagrams on HTTP/2: DATAGRAM capsules only (RFC 9297 §3.5).
        UdpChannels {
            datagrams_out: None,
        }
    }

    fn protocol(&self) -> &'static str {
        "h2"
    }
}

pub(crate) struct H2Recv {
    inner: RecvStream,
}

impl TunnelRecv for H2Recv {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self.inner.data().await {
            Some(Ok(chunk)) => {
                // The tunnel core takes this chunk now; let the client send more.
                let _ = self.inner.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(reset_error(e)),
            // END_STREAM: the client's FIN (RFC 9113 §8.5).
            None => Ok(None),
        }
    }

    fn abort(&mut self, _why: Abort) {
        // HTTP/2 has no STOP_SENDING: the RST_STREAM the send half emits ends both directions.
    }
}

pub(crate) struct H2Send {
    inner: SendStream<Bytes>,
}

impl TunnelSend for H2Send {
    async fn send(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            // Send only what the peer's flow-control window allows; h2 would otherwise buffer
            // without bound.
            self.inner.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| {
                if let Poll::Ready(reset) = self.inner.poll_reset(cx) {
                    return Poll::Ready(Err(match reset {
                        Ok(reason) => io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by client: {reason}"),
                        ),
                        Err(e) => reset_error(e),
                    }));
                }
                match self.inner.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(n))) => Poll::Ready(Ok(n)),
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Err(reset_error(e))),
                    Poll::Ready(None) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "stream closed",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            self.inner.send_data(chunk, false).map_err(reset_error)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        // END_STREAM: the destination's FIN (RFC 9113 §8.5).
        self.inner
            .send_data(Bytes::new(), true)
            .map_err(reset_error)
    }

    fn reset(&mut self, why: Abort) {
        self.inner.send_reset(abort_reason(why));
    }
}
