//! The seam between a front-end and the tunnel core: one request/response exchange and the two
//! halves of an open tunnel, abstracted over HTTP/3, HTTP/2 and HTTP/1.1.
use std::future::Future;
use std::io;

use bytes::Bytes;
use tokio::sync::mpsc;

/// One front-end request/response exchange, abstracted over HTTP/3, HTTP/2 and HTTP/1.1.
pub trait Exchange: Send {
    type Recv: TunnelRecv;
    type Send: TunnelSend;
    /// Sends the response head. For a 2xx it returns the tunnel's halves; otherwise it ends the
    /// exchange (stopping the request body) and returns `None`.
    fn respond(
        self,
        response: http::Response<()>,
    ) -> impl Future<Output = io::Result<Option<(Self::Recv, Self::Send)>>> + Send;
    /// QUIC datagram plumbing for a UDP tunnel (HTTP/3 only); `None`s elsewhere.
    fn udp_channels(&mut self) -> UdpChannels;
    /// Front-end name for metrics (`h3`, `h2`, `http/1.1`).
    fn protocol(&self) -> &'static str;
}

/// How a front-end aborts a client-side stream. Each front-end maps these onto its own codes
/// (HTTP/3: `http3::abort_code`; HTTP/2: `http2::abort_reason`; HTTP/1.1 can only close the
/// connection abruptly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The destination reset the TCP connection (RFC 9114 §4.4: H3_CONNECT_ERROR; RFC 9113 §8.5:
    /// CONNECT_ERROR).
    ConnectError,
    /// The client sent a malformed capsule stream (RFC 9297 §3.3: H3_DATAGRAM_ERROR on HTTP/3).
    DatagramError,
    /// The relay gave up on the tunnel (idle timeout, shutdown).
    Cancelled,
}

/// Bytes from the client, as a front-end delivers them.
pub trait TunnelRecv: Send {
    /// Next chunk; `Ok(None)` at a clean end of stream (FIN); `Err` if the client reset the stream.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// Tells the client to stop sending (e.g. STOP_SENDING).
    fn abort(&mut self, why: Abort);
}

/// Bytes to the client.
pub trait TunnelSend: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Clean end of stream (FIN).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Abrupt end of stream (RESET_STREAM / RST_STREAM).
    fn reset(&mut self, why: Abort);
}

/// QUIC DATAGRAM frames towards the client, when the front-end has them (HTTP/3 only).
pub trait DatagramOut: Send + Sync {
    /// Largest HTTP datagram payload (context ID + data) that fits a frame now, if any.
    fn max_payload(&self) -> Option<usize>;
    /// Sends one HTTP datagram (context ID + data) in one QUIC DATAGRAM frame, built with a
    /// single allocation; never blocks. False if it was dropped.
    fn send(&self, context_id: u64, data: &[u8]) -> bool;
}

/// Inputs of a UDP tunnel besides the socket and the request stream.
pub struct UdpChannels {
    /// HTTP datagram payloads (context ID + data) that arrived as QUIC DATAGRAM frames.
    pub datagrams_in: Option<mpsc::Receiver<Bytes>>,
    /// QUIC DATAGRAM output, if the client negotiated it (RFC 9297 §2.1.1).
    pub datagrams_out: Option<Box<dyn DatagramOut>>,
}
