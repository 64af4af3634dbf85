//! HTTP Datagrams (RFC 9297 §2) carried in QUIC DATAGRAM frames, and the RFC 9298 context ID.
use bytes::Bytes;

use crate::DecodeError;

/// Context ID 0 carries a UDP payload (RFC 9298 §4).
pub const UDP_PAYLOAD_CONTEXT: u64 = 0;

/// Largest UDP payload that fits a DATAGRAM capsule / UDP datagram (RFC 9298 §5: 65527).
pub const MAX_UDP_PAYLOAD: usize = 65527;

/// Splits a QUIC DATAGRAM frame payload into (quarter stream ID, HTTP datagram payload).
pub fn split_quarter_stream_id(frame: &Bytes) -> Result<(u64, Bytes), DecodeError> {
    let _ = frame;
    todo!()
}

/// Splits an HTTP datagram payload into (context ID, data).
pub fn split_context_id(payload: &Bytes) -> Result<(u64, Bytes), DecodeError> {
    let _ = payload;
    todo!()
}

/// Builds a QUIC DATAGRAM frame payload: quarter stream ID, context ID, data.
pub fn encode_quic_datagram(quarter_stream_id: u64, context_id: u64, data: &[u8]) -> Bytes {
    let _ = (quarter_stream_id, context_id, data);
    todo!()
}

/// Quarter stream ID of a client-initiated bidirectional (request) stream (RFC 9297 §2.1).
pub fn quarter_stream_id(stream_id: u64) -> u64 {
    stream_id / 4
}
