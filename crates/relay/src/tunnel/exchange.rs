//! The seam between a front-end and the tunnel core: one request/response exchange and the two
//! halves of an open tunnel, abstracted over HTTP/3, HTTP/2 and HTTP/1.1.
use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::udp_pump::UdpUplink;

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
    /// QUIC datagram plumbing for a UDP tunnel (HTTP/3 only; `None` elsewhere). A front-end that
    /// receives the client's QUIC datagrams hands them to `uplink` directly.
    fn udp_channels(&mut self, uplink: &Arc<UdpUplink>) -> UdpChannels;
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

/// What became of one HTTP datagram handed to [`DatagramOut::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramSent {
    Sent,
    /// No room in the connection's datagram send buffer (or the connection is gone).
    Dropped,
    /// Larger than a QUIC DATAGRAM frame can be on this connection now (or datagrams are off).
    TooLarge,
}

/// QUIC DATAGRAM frames towards the client, when the front-end has them (HTTP/3 only).
pub trait DatagramOut: Send {
    /// Reads the connection's datagram limits once for the burst of sends that follows.
    fn begin_batch(&mut self);
    /// Sends one HTTP datagram (context ID + data) in one QUIC DATAGRAM frame, within the limits
    /// read by the last [`DatagramOut::begin_batch`]; never blocks.
    fn send(&mut self, context_id: u64, data: &[u8]) -> DatagramSent;
}

/// Front-end specific plumbing of a UDP tunnel besides the request stream.
pub struct UdpChannels {
    /// QUIC DATAGRAM output, if the client negotiated it (RFC 9297 §2.1.1).
    pub datagrams_out: Option<Box<dyn DatagramOut>>,
}
