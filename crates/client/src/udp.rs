//! A UDP tunnel (RFC 9298): UDP payloads as HTTP Datagrams with context ID 0, in QUIC DATAGRAM
//! frames (RFC 9297 §2) or DATAGRAM capsules on the request stream (RFC 9297 §3.5).
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use cfr_proto::capsule::{self, Capsule, CapsuleDecoder};
use cfr_proto::datagram;
use h3::error::Code;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{stream_error, Conn, H3Stream, UDP_QUEUE};
use crate::front::{FrontRecv, FrontSend, FrontStream};
use crate::ClientError;

type SendHalf = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvHalf = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// Capsules queued for the request stream; senders wait when it is full (capsules are reliable).
const CAPSULE_QUEUE: usize = 64;

/// Largest DATAGRAM capsule value we accept: context ID varint + the largest UDP payload.
const MAX_CAPSULE_VALUE: usize = datagram::MAX_UDP_PAYLOAD + 8;

enum WriteCmd {
    Data(Bytes),
    /// Abort the stream (the receive side saw a protocol error).
    Abort,
}

/// How the tunnel ended, for `recv` after the queue drained.
#[derive(Debug, Clone)]
enum Ended {
    Closed,
    Protocol(String),
    Error(String),
}

/// A UDP flow through the relay to one destination, over HTTP/3 or over the relay's TLS/TCP
/// front-end ([`crate::front`], capsules only).
///
/// Received payloads from QUIC datagrams and capsules share one bounded queue; when it is full,
/// new payloads are dropped (UDP semantics). Dropping the tunnel finishes the request stream.
pub struct UdpTunnel {
    response: http::Response<()>,
    /// The HTTP/3 connection and request stream; `None` on the TLS/TCP front-end.
    h3: Option<H3Path>,
    protocol: &'static str,
    writer: mpsc::Sender<WriteCmd>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    ended: Arc<Mutex<Option<Ended>>>,
    reader: JoinHandle<()>,
}

struct H3Path {
    conn: Arc<Conn>,
    qsid: u64,
    quic_datagrams: bool,
}

impl UdpTunnel {
    pub(crate) fn new(
        conn: Arc<Conn>,
        stream: H3Stream,
        response: http::Response<()>,
        quic_datagrams: bool,
        queue_tx: mpsc::Sender<Bytes>,
        queue_rx: mpsc::Receiver<Bytes>,
    ) -> Self {
        let qsid = datagram::quarter_stream_id(stream.id().into_inner());
        // Registered only now, after the 2xx: datagrams the relay sent before we saw the response
        // headers are dropped, which RFC 9297 §2.1 allows.
        conn.routes.insert(qsid, queue_tx.clone());
        let (send, recv) = stream.split();
        let dropped = conn.routes.dropped.clone();
        let h3 = H3Path {
            conn,
            qsid,
            quic_datagrams,
        };
        Self::start(
            response,
            Some(h3),
            "h3",
            (recv, send),
            (queue_tx, queue_rx),
            dropped,
        )
    }

    /// A connect-udp tunnel on the TLS/TCP front-end: capsules both ways on `stream`.
    pub(crate) fn over_front(stream: FrontStream, response: http::Response<()>) -> Self {
        let protocol = stream.version().alpn();
        let queue = mpsc::channel(UDP_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        Self::start(response, None, protocol, stream.split(), queue, dropped)
    }

    /// Starts the capsule writer and reader tasks of a request stream.
    fn start(
        response: http::Response<()>,
        h3: Option<H3Path>,
        protocol: &'static str,
        (recv, send): (impl CapsuleRecv, impl CapsuleSend),
        (queue_tx, queue_rx): (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>),
        dropped: Arc<AtomicU64>,
    ) -> Self {
        let (wtx, wrx) = mpsc::channel(CAPSULE_QUEUE);
        tokio::spawn(write_pump(send, wrx));
        let ended = Arc::new(Mutex::new(None));
        let route = h3.as_ref().map(|h| (h.conn.clone(), h.qsid));
        let reader = tokio::spawn(read_capsules(
            recv,
            queue_tx,
            wtx.clone(),
            dropped,
            route,
            ended.clone(),
        ));
        UdpTunnel {
            response,
            h3,
            protocol,
            writer: wtx,
            rx: tokio::sync::Mutex::new(queue_rx),
            ended,
            reader,
        }
    }

    /// The relay's 2xx response.
    pub fn response(&self) -> &http::Response<()> {
        &self.response
    }

    /// True if this tunnel sends QUIC DATAGRAM frames, false if DATAGRAM capsules.
    pub fn uses_quic_datagrams(&self) -> bool {
        self.h3.as_ref().is_some_and(|h| h.quic_datagrams)
    }

    /// The HTTP version the tunnel travels on: `h3`, `h2` or `http/1.1`.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// The request stream's quarter stream ID (RFC 9297 §2.1); `None` off HTTP/3.
    pub fn quarter_stream_id(&self) -> Option<u64> {
        self.h3.as_ref().map(|h| h.qsid)
    }

    /// The largest UDP payload that goes out as one QUIC DATAGRAM frame right now (bigger ones
    /// go as capsules); `None` in capsule mode or off HTTP/3. Grows as path MTU discovery raises
    /// the limit.
    pub fn max_datagram_payload(&self) -> Option<usize> {
        let h3 = self.h3.as_ref().filter(|h| h.quic_datagrams)?;
        let overhead = cfr_proto::varint::encoded_len(h3.qsid)
            + cfr_proto::varint::encoded_len(datagram::UDP_PAYLOAD_CONTEXT);
        h3.conn.quic.max_datagram_size()?.checked_sub(overhead)
    }

    /// Sends one UDP payload (empty is valid, RFC 9298 §5). In QUIC datagram mode a payload too
    /// large for one QUIC DATAGRAM frame goes as a capsule instead (RFC 9297 allows both).
    pub async fn send(&self, payload: &[u8]) -> Result<(), ClientError> {
        self.send_context(datagram::UDP_PAYLOAD_CONTEXT, payload)
            .await
    }

    /// Sends a datagram with another context ID (tests: the relay must drop it, RFC 9298 §4).
    pub async fn send_unknown_context(&self, ctx: u64, data: &[u8]) -> Result<(), ClientError> {
        self.send_context(ctx, data).await
    }

    async fn send_context(&self, ctx: u64, data: &[u8]) -> Result<(), ClientError> {
        if data.len() > datagram::MAX_UDP_PAYLOAD {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("UDP payload of {} bytes exceeds 65527", data.len()),
            )));
        }
        if let Some(e) = self.ended.lock().unwrap().clone() {
            return Err(e.into());
        }
        if let Some(h3) = self.h3.as_ref().filter(|h| h.quic_datagrams) {
            let frame = datagram::encode_quic_datagram(h3.qsid, ctx, data);
            let fits = h3
                .conn
                .quic
                .max_datagram_size()
                .is_some_and(|max| frame.len() <= max);
            if fits {
                return match h3.conn.quic.send_datagram_wait(frame).await {
                    Ok(()) => Ok(()),
                    Err(quinn::SendDatagramError::ConnectionLost(e)) => {
                        Err(ClientError::Connect(e.to_string()))
                    }
                    Err(e) => Err(ClientError::Connect(e.to_string())),
                };
            }
        }
        let mut buf = Vec::with_capacity(data.len() + 16);
        capsule::encode_datagram(ctx, data, &mut buf);
        self.writer
            .send(WriteCmd::Data(Bytes::from(buf)))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Counters of the QUIC connection this tunnel runs on (packets, frames, UDP I/O), for
    /// measurements; `None` on the TLS/TCP front-end.
    pub fn quic_stats(&self) -> Option<quinn::ConnectionStats> {
        self.h3.as_ref().map(|h| h.conn.quic.stats())
    }

    /// Receives one UDP payload (possibly empty). `Err(Closed)` once the relay ended the stream
    /// and everything received was returned.
    pub async fn recv(&self) -> Result<Bytes, ClientError> {
        match self.rx.lock().await.recv().await {
            Some(b) => Ok(b),
            None => Err(self
                .ended
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Ended::Closed)
                .into()),
        }
    }

    /// Ends the tunnel: finishes the request stream (same as dropping it).
    pub fn close(self) {}
}

impl From<Ended> for ClientError {
    fn from(e: Ended) -> Self {
        match e {
            Ended::Closed => ClientError::Closed,
            Ended::Protocol(m) => ClientError::Protocol(m),
            Ended::Error(m) => ClientError::H3(m),
        }
    }
}

impl Drop for UdpTunnel {
    fn drop(&mut self) {
        if let Some(h3) = &self.h3 {
            h3.conn.routes.remove(h3.qsid);
        }
        self.reader.abort();
        // Dropping `writer` lets the write pump finish the stream once the reader's clone is
        // gone too (the reader task is aborted above).
    }
}

/// The receive side of a request stream that carries capsules.
trait CapsuleRecv: Send + 'static {
    /// The next bytes of the stream; `None` at its clean end.
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
    /// Stops receiving after the relay sent a malformed capsule.
    fn stop(&mut self);
}

/// The send side of a request stream that carries capsules.
trait CapsuleSend: Send + 'static {
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), ()>> + Send;
    /// Aborts the stream after the relay sent a malformed capsule.
    fn abort(&mut self);
    /// Our end of the stream (FIN / END_STREAM).
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

impl CapsuleRecv for RecvHalf {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        match self.recv_data().await {
            Ok(Some(mut chunk)) => Ok(Some(chunk.copy_to_bytes(chunk.remaining()))),
            Ok(None) => Ok(None),
            Err(e) => Err(stream_error(e).to_string()),
        }
    }
    fn stop(&mut self) {
        self.stop_sending(Code::H3_DATAGRAM_ERROR);
    }
}

impl CapsuleSend for SendHalf {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        self.send_data(data).await.map_err(|_| ())
    }
    fn abort(&mut self) {
        self.stop_stream(Code::H3_DATAGRAM_ERROR);
    }
    async fn finish(&mut self) {
        let _ = h3::client::RequestStream::finish(self).await;
    }
}

impl CapsuleRecv for FrontRecv {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        match self.read_buf(&mut buf).await {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(buf.freeze())),
            Err(e) => Err(e.to_string()),
        }
    }
    fn stop(&mut self) {}
}

impl CapsuleSend for FrontSend {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        self.write_all(&data).await.map_err(|_| ())?;
        self.flush().await.map_err(|_| ())
    }
    fn abort(&mut self) {
        crate::front::abort(self);
    }
    async fn finish(&mut self) {
        let _ = self.shutdown().await;
    }
}

async fn write_pump(mut send: impl CapsuleSend, mut rx: mpsc::Receiver<WriteCmd>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            WriteCmd::Data(b) => {
                if send.send(b).await.is_err() {
                    return;
                }
            }
            WriteCmd::Abort => {
                send.abort();
                return;
            }
        }
    }
    // All handles gone: the tunnel was closed or dropped.
    send.finish().await;
}

async fn read_capsules(
    mut recv: impl CapsuleRecv,
    queue: mpsc::Sender<Bytes>,
    writer: mpsc::Sender<WriteCmd>,
    dropped: Arc<AtomicU64>,
    route: Option<(Arc<Conn>, u64)>,
    ended: Arc<Mutex<Option<Ended>>>,
) {
    let mut decoder = CapsuleDecoder::new(MAX_CAPSULE_VALUE);
    let outcome = 'outer: loop {
        match recv.next_chunk().await {
            Ok(Some(chunk)) => {
                decoder.push(&chunk);
                loop {
                    match decoder.next_capsule() {
                        Ok(Some(Capsule::Datagram {
                            context_id: datagram::UDP_PAYLOAD_CONTEXT,
                            data,
                        })) => {
                            if queue.try_send(data).is_err() {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // RFC 9298 §4: unknown context IDs are dropped; RFC 9297 §3.2: unknown
                        // capsule types are skipped.
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => break 'outer Ended::Protocol(e.to_string()),
                    }
                }
            }
            Ok(None) => {
                // RFC 9297 §3.3: a capsule cut short by the end of the stream is malformed.
                break match decoder.finish() {
                    Ok(()) => Ended::Closed,
                    Err(e) => Ended::Protocol(e.to_string()),
                };
            }
            Err(e) => break Ended::Error(e),
        }
    };
    if let Ended::Protocol(_) = outcome {
        // RFC 9297 §3.3: a malformed capsule aborts the stream (H3_DATAGRAM_ERROR on HTTP/3,
        // a stream error on HTTP/2, the connection on HTTP/1.1).
        recv.stop();
        let _ = writer.try_send(WriteCmd::Abort);
    }
    *ended.lock().unwrap() = Some(outcome);
    // Dropping the dispatcher's sender and ours closes the queue: `recv` drains, then ends.
    if let Some((conn, qsid)) = route {
        conn.routes.remove(qsid);
    }
}
