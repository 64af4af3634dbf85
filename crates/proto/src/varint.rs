//! QUIC variable-length integers (RFC 9000 §16).
use crate::DecodeError;

/// Largest value a varint can carry: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Decodes one varint from the front of `buf`; returns the value and the bytes it used.
///
/// Non-minimal encodings are accepted: RFC 9000 §16 only says values "do not need to be encoded on
/// the minimum number of bytes".
pub fn decode(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let first = *buf.first().ok_or(DecodeError::Incomplete)?;
    // RFC 9000 §16: the two most significant bits of the first byte encode the base-2 logarithm
    // of the integer encoding length in bytes.
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return Err(DecodeError::Incomplete);
    }
    let mut v = u64::from(first & 0x3f);
    for &b in &buf[1..len] {
        v = (v << 8) | u64::from(b);
    }
    Ok((v, len))
}

/// Number of bytes `encode(v)` writes (1, 2, 4 or 8). Panics if `v > MAX`.
pub fn encoded_len(v: u64) -> usize {
    match v {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        0x4000..=0x3fff_ffff => 4,
        0x4000_0000..=MAX => 8,
        _ => panic!("varint value {v} exceeds 2^62-1"),
    }
}

/// Appends the shortest encoding of `v`. Panics if `v > MAX` (callers only pass lengths and IDs).
pub fn encode(v: u64, out: &mut impl bytes::BufMut) {
    match encoded_len(v) {
        1 => out.put_u8(v as u8),
        2 => out.put_u16((v as u16) | 0x4000),
        4 => out.put_u32((v as u32) | 0x8000_0000),
        _ => out.put_u64(v | 0xc000_0000_0000_0000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(v, &mut out);
        out
    }

    // RFC 9000 Appendix A.1 sample encodings.
    const RFC9000_A1: &[(&[u8], u64)] = &[
        (
            &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            151_288_809_941_952_652,
        ),
        (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
        (&[0x7b, 0xbd], 15_293),
        (&[0x25], 37),
    ];

    #[test]
    fn varint_decodes_rfc9000_appendix_a1_vectors() {
        for (bytes, value) in RFC9000_A1 {
            assert_eq!(
                decode(bytes),
                Ok((*value, bytes.len())),
                "decoding {bytes:02x?}"
            );
        }
    }

    #[test]
    fn varint_encodes_rfc9000_appendix_a1_vectors_in_shortest_form() {
        for (bytes, value) in RFC9000_A1 {
            assert_eq!(enc(*value), *bytes, "encoding {value}");
            assert_eq!(encoded_len(*value), bytes.len());
        }
    }

    #[test]
    fn varint_accepts_non_minimal_two_byte_37() {
        assert_eq!(decode(&[0x40, 0x25]), Ok((37, 2)));
    }

    #[test]
    fn varint_decode_ignores_trailing_bytes() {
        assert_eq!(decode(&[0x25, 0xff, 0xff]), Ok((37, 1)));
    }

    #[test]
    fn varint_decode_short_input_is_incomplete() {
        assert_eq!(decode(&[]), Err(DecodeError::Incomplete));
        assert_eq!(decode(&[0x40]), Err(DecodeError::Incomplete));
        assert_eq!(decode(&[0x9d, 0x7f, 0x3e]), Err(DecodeError::Incomplete));
        assert_eq!(
            decode(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8]),
            Err(DecodeError::Incomplete)
        );
    }

    #[test]
    fn varint_round_trips_length_boundaries() {
        for v in [0, 0x3f, 0x40, 0x3fff, 0x4000, 0x3fff_ffff, 0x4000_0000, MAX] {
            let bytes = enc(v);
            assert_eq!(bytes.len(), encoded_len(v));
            assert_eq!(decode(&bytes), Ok((v, bytes.len())), "round trip of {v}");
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn varint_encode_panics_above_max() {
        enc(MAX + 1);
    }
}
