//! QUIC variable-length integers (RFC 9000 §16).
use crate::DecodeError;

/// Largest value a varint can carry: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Decodes one varint from the front of `buf`; returns the value and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let _ = buf;
    todo!()
}

/// Number of bytes `encode(v)` writes (1, 2, 4 or 8). Panics if `v > MAX`.
pub fn encoded_len(v: u64) -> usize {
    let _ = v;
    todo!()
}

/// Appends the shortest encoding of `v`. Panics if `v > MAX` (callers only pass lengths and IDs).
pub fn encode(v: u64, out: &mut Vec<u8>) {
    let _ = (v, out);
    todo!()
}
