//! The HTTP/3 front-end: QUIC endpoint, one task per connection, one per request, and a
//! per-connection QUIC DATAGRAM router keyed by quarter stream ID.
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use h3::error::Code;
use h3::server::RequestStream;
use h3::ConnectionState;
use tokio_util::task::TaskTracker;

use crate::config::RelayConfig;
use crate::front::FrontCtx;
use crate::h3_transport;
use crate::metrics as m;
use crate::tunnel::{
    frame_in, serve_request, Abort, ClientConn, Core, DatagramOut, DatagramSent, Exchange,
    TunnelRecv, TunnelSend, UdpChannels, UdpUplink,
};

type BidiStream = h3_transport::BidiStream<Bytes>;
type SendHalf = RequestStream<h3_transport::SendStream<Bytes>, Bytes>;
type RecvHalf = RequestStream<h3_transport::RecvStream, Bytes>;

/// QUIC transport settings for client connections.
pub fn transport_config(config: &RelayConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let limits = &config.limits;
    // Request streams bound the tunnels a connection can even ask for; the relay's own limit
    // answers 503 below this, so give a little headroom for requests that get refused.
    t.max_concurrent_bidi_streams((limits.tunnels_per_connection + 16).into());
    // Control, QPACK encoder/decoder, plus grease.
    t.max_concurrent_uni_streams(16u32.into());
    t.max_idle_timeout(
        Duration::from_secs(config.timeouts.connection_idle_secs)
            .try_into()
            .ok(),
    );
    t.stream_receive_window((4u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    // Advertises max_datagram_frame_size (RFC 9221), needed for HTTP Datagrams (RFC 9297 §2.1.1).
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    t.initial_mtu(cfr_proto::datagram::TUNNEL_INITIAL_MTU);
    t
}

/// How long a draining connection whose tunnels have all ended stays open (at least; 8 RTTs when
/// longer) so the stream data they wrote last reaches the client before the close.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// Serves one accepted QUIC connection until it closes.
pub(crate) async fn serve_connection(
    ctx: &FrontCtx,
    quic: quinn::Connection,
    client: Arc<ClientConn>,
) {
    let FrontCtx {
        core,
        shutdown,
        tasks,
        ..
    } = ctx;
    // RFC 9220 §3: ENABLE_CONNECT_PROTOCOL=1, so clients may send `:protocol` (connect-udp).
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1.1
    //# It is RECOMMENDED that implementations that support receiving HTTP/3 Datagrams
    //# always send the SETTINGS_H3_DATAGRAM setting with a value of 1,
    //# even if the application does not intend to use HTTP/3 Datagrams.
    let mut h3 = match h3::server::builder()
        .enable_extended_connect(true)
        .enable_datagram(true)
        // The same limit as every front-end; h3 answers 431 on the one stream beyond it.
        .max_field_section_size(core.config.limits.max_request_head_bytes as u64)
        .build::<_, Bytes>(h3_transport::Connection::new(quic.clone()))
        .await
    {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/3 setup failed");
            return;
        }
    };
    let router = Arc::new(DatagramRouter::default());
    let reader = tasks.spawn(route_datagrams(core.clone(), quic.clone(), router.clone()));
    // This connection's requests, so a draining connection closes as soon as its last tunnel ends
    // instead of idling until the client hangs up or the grace period runs out.
    let requests = TaskTracker::new();
    let mut draining = false;
    // A connection with no request for `connection_idle_secs` is closed whatever the client
    // sends: QUIC's own idle timeout is reset by every packet, so a client sending a PING now and
    // then would hold its client-table slot forever (as on HTTP/2 and HTTP/1.1).
    let idle = Duration::from_secs(core.config.timeouts.connection_idle_secs);
    let mut idle_since = tokio::time::Instant::now();
    let mut idle_check = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = idle_check.tick(), if !draining => {
                if !requests.is_empty() {
                    idle_since = tokio::time::Instant::now();
                } else if idle_since.elapsed() >= idle {
                    core.counters
                        .idle_connections_closed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!(m::DROPS, "reason" => "connection_idle").increment(1);
                    // RFC 9114 §5.2: GOAWAY, then close with H3_NO_ERROR.
                    let _ = h3.shutdown(0).await;
                    quic.close(quinn::VarInt::from_u32(0x100), b"idle");
                    break;
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                //= https://www.rfc-editor.org/rfc/rfc9114#section-5.2
                //# Servers SHOULD send a GOAWAY frame when the closing of a connection
                //# is known in advance, even if the advance notice is small, so that the
                //# remote peer can know whether or not a request has been partially
                //# processed.
                //
                // Requests already accepted run to completion.
                let _ = h3.shutdown(0).await;
                requests.close();
            }
            _ = requests.wait(), if draining => {
                // The last tunnels' bytes may still sit in quinn's send buffers (a slow reader's
                // flow-control window): an immediate close would discard them. Give them time to
                // leave, or the client time to close first.
                let linger = DRAIN_LINGER.max(quic.rtt() * 8);
                let _ = tokio::time::timeout(linger, quic.closed()).await;
                //= https://www.rfc-editor.org/rfc/rfc9114#section-5.2
                //# An endpoint that completes a
                //# graceful shutdown SHOULD use the H3_NO_ERROR error code when closing
                //# the connection.
                // Closing discards what is not yet sent, so first give the last FINs and
                // resets a few round trips to go out (the client usually closes first, having no
                // request left).
                let linger = (quic.rtt() * 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
                let _ = tokio::time::timeout(linger, quic.closed()).await;
                quic.close(quinn::VarInt::from_u32(0x100), b"shutdown");
                break;
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    // Boxed for the same reason as a TLS/TCP connection's future (tcp_front.rs):
                    // the request's future is kilobytes, a pointer moves cheaply.
                    tasks.spawn(requests.track_future(Box::pin(serve_request_stream(
                        core.clone(),
                        client.clone(),
                        quic.clone(),
                        router.clone(),
                        resolver,
                    ))));
                }
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(error = %e, "HTTP/3 connection ended");
                    }
                    break;
                }
            }
        }
    }
    reader.abort();
}

/// One request stream from its first frame to the end of its tunnel.
async fn serve_request_stream(
    core: Arc<Core>,
    client: Arc<ClientConn>,
    quic: quinn::Connection,
    router: Arc<DatagramRouter>,
    resolver: h3::server::RequestResolver<h3_transport::Connection, Bytes>,
) {
    // RFC 9114 §10.5: bound how long a request stream may sit without a
    // complete header section (opening stream N implicitly opens all below it).
    let header_wait = core.config.handshake_timeout();
    let mut resolver = resolver;
    let first_frame = {
        let mut next = std::pin::pin!(std::future::poll_fn(|cx| resolver
            .frame_stream
            .poll_next(cx)));
        // The HEADERS frame usually came in the packet that opened the stream: no timer then.
        match next.as_mut().now_or_never() {
            Some(frame) => Some(frame),
            None => tokio::time::timeout(header_wait, next).await.ok(),
        }
    };
    let Some(first_frame) = first_frame else {
        metrics::counter!(m::DROPS, "reason" => "request_header_timeout").increment(1);
        abort_incomplete_request(resolver.frame_stream.into_inner());
        return;
    };
    let resolved = match resolver.accept_with_frame(first_frame) {
        Ok(request) => request.resolve().await,
        Err(e) => Err(e),
    };
    let (req, stream) = match resolved {
        Ok(r) => r,
        Err(e) => {
            // Malformed request heads (including unknown :protocol values) are
            // reset inside h3; the connection and other tunnels carry on.
            tracing::debug!(error = %e, "request rejected by HTTP/3 layer");
            metrics::counter!(m::TUNNELS, "kind" => "unknown", "outcome" => "http_request_error")
                .increment(1);
            return;
        }
    };
    let (head, ()) = req.into_parts();
    let protocol = head
        .extensions
        .get::<h3::ext::Protocol>()
        .map(|p| p.as_str().to_owned());
    if let Some(resp) = crate::pvd::answer(
        core.pvd.as_ref(),
        &head.method,
        protocol.as_deref(),
        &head.uri,
        "h3",
    ) {
        send_whole_response(stream, resp).await;
        return;
    }
    let exchange = H3Exchange {
        stream,
        quic,
        router,
        route: None,
    };
    serve_request(&core, &client, &head, protocol.as_deref(), exchange).await;
}

/// Sends a complete response with its body and ends the stream (the PvD).
async fn send_whole_response(
    mut stream: RequestStream<BidiStream, Bytes>,
    response: http::Response<Bytes>,
) {
    let (head, body) = response.into_parts();
    let sent = async {
        stream
            .send_response(http::Response::from_parts(head, ()))
            .await?;
        stream.send_data(body).await?;
        stream.finish().await
    };
    if let Err(e) = sent.await {
        tracing::debug!(error = %e, "response not delivered");
    }
}

/// Gives up on a request stream whose header section did not arrive in time: both directions
/// end with H3_REQUEST_INCOMPLETE, which tells the client why.
fn abort_incomplete_request<S>(mut stream: S)
where
    S: h3::quic::SendStream<Bytes> + h3::quic::RecvStream,
{
    //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1.1
    //# If a client-initiated stream terminates without enough of the HTTP message to provide a
    //# complete response, the server SHOULD abort its response stream with the error code
    //# H3_REQUEST_INCOMPLETE.
    stream.reset(Code::H3_REQUEST_INCOMPLETE.value());
    // The receive side is stopped with the same code (quinn's drop would say 0, "no error").
    stream.stop_sending(Code::H3_REQUEST_INCOMPLETE.value());
}

/// Routes incoming QUIC DATAGRAM frames to their tunnel by quarter stream ID (RFC 9297 §2.1).
#[derive(Default)]
struct DatagramRouter {
    routes: Mutex<HashMap<u64, Arc<UdpUplink>>>,
}

impl DatagramRouter {
    fn register(&self, qsid: u64, uplink: Arc<UdpUplink>) {
        self.routes
            .lock()
            .expect("router lock")
            .insert(qsid, uplink);
    }
    fn unregister(&self, qsid: u64) {
        self.routes.lock().expect("router lock").remove(&qsid);
    }
    fn get(&self, qsid: u64) -> Option<Arc<UdpUplink>> {
        self.routes.lock().expect("router lock").get(&qsid).cloned()
    }
}

/// Client datagrams taken from the connection in one go before they are sent on.
const DATAGRAM_BATCH: usize = 64;

/// Reads the connection's QUIC DATAGRAM frames in bursts (whatever quinn has buffered, up to
/// [`DATAGRAM_BATCH`]) and hands each tunnel's run of them straight to its destination socket: no
/// task or channel hop per datagram.
async fn route_datagrams(core: Arc<Core>, quic: quinn::Connection, router: Arc<DatagramRouter>) {
    let mut burst: Vec<(u64, Bytes)> = Vec::with_capacity(DATAGRAM_BATCH);
    let mut run: Vec<Bytes> = Vec::with_capacity(DATAGRAM_BATCH);
    while let Ok(first) = quic.read_datagram().await {
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match cfr_proto::datagram::split_quarter_stream_id(&frame) {
                Ok(routed) => burst.push(routed),
                //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
                //# Receipt of a QUIC DATAGRAM frame whose payload is too short to allow
                //# parsing the Quarter Stream ID field MUST be treated as an HTTP/3
                //# connection error of type H3_DATAGRAM_ERROR (0x33).
                //
                // `split_quarter_stream_id` also refuses a value above 2^60-1, the other
                // connection error of that section (quoted there).
                Err(e) => {
                    core.datagram_dropped("malformed_datagram");
                    tracing::debug!(error = %e, "malformed HTTP datagram: closing the connection");
                    quic.close(H3_DATAGRAM_ERROR, b"malformed HTTP datagram");
                    return;
                }
            }
            if burst.len() < DATAGRAM_BATCH {
                next = quic.read_datagram().now_or_never().and_then(Result::ok);
            }
        }
        let mut current = None;
        for (qsid, payload) in burst.drain(..) {
            if current != Some(qsid) {
                send_run(&core, &router, current, &mut run);
                current = Some(qsid);
            }
            run.push(payload);
        }
        send_run(&core, &router, current, &mut run);
    }
}

/// Sends one tunnel's consecutive datagrams of a burst; leaves `run` empty.
fn send_run(core: &Core, router: &DatagramRouter, qsid: Option<u64>, run: &mut Vec<Bytes>) {
    let Some(qsid) = qsid else { return };
    match router.get(qsid) {
        Some(uplink) => uplink.send_datagrams(core, run),
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
        //# If a datagram is received after the corresponding stream's receive side is
        //# closed, the received datagrams MUST be silently dropped.
        //
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
        //# If an HTTP/3 Datagram is received and its Quarter Stream ID field maps to a
        //# stream that has not yet been created, the receiver SHALL either drop that
        //# datagram silently or buffer it temporarily (on the order of a round trip) while
        //# awaiting the creation of the corresponding stream.
        //
        // Dropped (and counted) either way: the router cannot tell the two apart.
        None => {
            for _ in run.drain(..) {
                core.datagram_dropped("datagram_unknown_stream");
            }
        }
    }
}

/// H3_DATAGRAM_ERROR (RFC 9297 §5.2): "Datagram or Capsule Protocol parse error".
const H3_DATAGRAM_ERROR: quinn::VarInt = quinn::VarInt::from_u32(0x33);

struct H3Exchange {
    stream: RequestStream<BidiStream, Bytes>,
    quic: quinn::Connection,
    router: Arc<DatagramRouter>,
    route: Option<RouteGuard>,
}

impl Exchange for H3Exchange {
    type Recv = H3Recv;
    type Send = H3Send;

    async fn respond(self, response: http::Response<()>) -> io::Result<Option<(H3Recv, H3Send)>> {
        let H3Exchange {
            mut stream, route, ..
        } = self;
        let ok = response.status().is_success();
        stream
            .send_response(response)
            .await
            .map_err(io::Error::other)?;
        if !ok {
            // RFC 9114 §4.1: the response is complete; tell the client to stop sending its body.
            stream.stop_sending(Code::H3_NO_ERROR);
            let _ = stream.finish().await;
            return Ok(None);
        }
        let (send, recv) = stream.split();
        Ok(Some((
            H3Recv {
                inner: recv,
                _route: route,
            },
            H3Send { inner: send },
        )))
    }

    fn udp_channels(&mut self, uplink: &Arc<UdpUplink>) -> UdpChannels {
        let qsid = cfr_proto::datagram::quarter_stream_id(self.stream.id().into_inner());
        self.router.register(qsid, uplink.clone());
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1.1
        //# QUIC DATAGRAM frames MUST NOT be sent until the SETTINGS_H3_DATAGRAM setting
        //# has been both sent and received with a value of 1.
        //
        // The relay always sends it; the client's value and its max_datagram_frame_size
        // transport parameter (RFC 9221) decide.
        let negotiated =
            self.stream.settings().enable_datagram() && self.quic.max_datagram_size().is_some();
        let out: Option<Box<dyn DatagramOut>> = negotiated.then(|| {
            Box::new(QuicDatagrams {
                quic: self.quic.clone(),
                qsid,
                arena: BytesMut::new(),
                max_frame: 0,
                room: 0,
            }) as Box<dyn DatagramOut>
        });
        // Unregistered when the receive half is dropped.
        self.route = Some(RouteGuard {
            router: self.router.clone(),
            qsid,
        });
        UdpChannels { datagrams_out: out }
    }

    fn protocol(&self) -> &'static str {
        "h3"
    }
}

struct RouteGuard {
    router: Arc<DatagramRouter>,
    qsid: u64,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.router.unregister(self.qsid);
    }
}

struct QuicDatagrams {
    quic: quinn::Connection,
    qsid: u64,
    /// Frames are cut from this buffer (one allocation per burst, not per datagram).
    arena: BytesMut,
    /// Largest frame the connection takes now, and room left in its datagram send buffer, as read
    /// by the last `begin_batch`.
    max_frame: usize,
    room: usize,
}

impl DatagramOut for QuicDatagrams {
    fn begin_batch(&mut self) {
        self.max_frame = self.quic.max_datagram_size().unwrap_or(0);
        self.room = self.quic.datagram_send_buffer_space();
    }

    fn send(&mut self, context_id: u64, data: &[u8]) -> DatagramSent {
        use cfr_proto::varint;
        let len = varint::encoded_len(self.qsid) + varint::encoded_len(context_id) + data.len();
        if len > self.max_frame {
            return DatagramSent::TooLarge;
        }
        // A full send buffer means the client's path is slower than the destination: drop this
        // datagram (and count it) rather than let quinn silently evict older ones.
        if len > self.room {
            return DatagramSent::Dropped;
        }
        self.room -= len;
        let qsid = self.qsid;
        let frame = frame_in(&mut self.arena, len, |a| {
            varint::encode(qsid, a);
            varint::encode(context_id, a);
            a.put_slice(data);
        });
        match self.quic.send_datagram(frame) {
            Ok(()) => DatagramSent::Sent,
            Err(_) => DatagramSent::Dropped,
        }
    }
}

fn abort_code(why: Abort) -> Code {
    match why {
        Abort::ConnectError => Code::H3_CONNECT_ERROR,
        Abort::DatagramError => Code::H3_DATAGRAM_ERROR,
        Abort::Cancelled => Code::H3_REQUEST_CANCELLED,
    }
}

pub struct H3Recv {
    inner: RecvHalf,
    /// Keeps the tunnel's datagram route registered for as long as the tunnel reads.
    _route: Option<RouteGuard>,
}

impl TunnelRecv for H3Recv {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self.inner.recv_data().await {
            Ok(Some(mut buf)) => Ok(Some(buf.copy_to_bytes(buf.remaining()))),
            Ok(None) => Ok(None),
            Err(e) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                e.to_string(),
            )),
        }
    }

    fn abort(&mut self, why: Abort) {
        // The transport (h3_transport) keeps the QUIC stream between reads, so this works even
        // while h3 has a read pending.
        self.inner.stop_sending(abort_code(why));
    }
}

pub struct H3Send {
    inner: SendHalf,
}

impl TunnelSend for H3Send {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.inner
            .send_data(data)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()))
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.inner
            .finish()
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()))
    }

    fn reset(&mut self, why: Abort) {
        self.inner.stop_stream(abort_code(why));
    }
}
