//! The Capsule Protocol (RFC 9297 §3): Type (varint), Length (varint), Value.
use bytes::Bytes;

use crate::DecodeError;

/// Capsule type of DATAGRAM (RFC 9297 §3.5).
pub const DATAGRAM: u64 = 0x00;

/// One decoded capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    /// A DATAGRAM capsule: an HTTP datagram split into its context ID and data.
    Datagram { context_id: u64, data: Bytes },
    /// A capsule of a type we do not implement; its value was skipped (RFC 9297 §3.2).
    Unknown { capsule_type: u64, length: u64 },
}

/// Appends a DATAGRAM capsule holding `context_id` + `data`.
pub fn encode_datagram(context_id: u64, data: &[u8], out: &mut Vec<u8>) {
    let _ = (context_id, data, out);
    todo!()
}

/// Incremental decoder for a capsule stream (a request body after a 2xx).
///
/// Feed it chunks as they arrive; it yields whole capsules, skips the values of unknown capsule
/// types without buffering them, and never buffers more than `max_capsule_len` + a header.
#[derive(Debug)]
pub struct CapsuleDecoder {
    _todo: (),
}

impl CapsuleDecoder {
    /// `max_datagram_len`: largest DATAGRAM capsule value accepted (context ID + data); larger is Malformed.
    pub fn new(max_datagram_len: usize) -> Self {
        let _ = max_datagram_len;
        todo!()
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        let _ = chunk;
        todo!()
    }

    /// Next whole capsule, `Ok(None)` when more bytes are needed, `Err` if the stream is malformed.
    pub fn next_capsule(&mut self) -> Result<Option<Capsule>, DecodeError> {
        todo!()
    }

    /// Call at end of stream: a partial capsule left over is Malformed (RFC 9297 §3.3).
    pub fn finish(&self) -> Result<(), DecodeError> {
        todo!()
    }
}
