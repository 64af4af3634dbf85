//! HTTP Datagrams (RFC 9297 §2) carried in QUIC DATAGRAM frames, and the RFC 9298 context ID.
use bytes::Bytes;

use crate::{varint, DecodeError};

/// Context ID 0 carries a UDP payload (RFC 9298 §4).
pub const UDP_PAYLOAD_CONTEXT: u64 = 0;

/// Largest UDP payload that fits a DATAGRAM capsule / UDP datagram (RFC 9298 §5: 65527).
pub const MAX_UDP_PAYLOAD: usize = 65527;

/// Largest quarter stream ID (RFC 9297 §2.1: a stream ID is at most 2^62-1, so its quarter is at
/// most 2^60-1).
/// The UDP payload size a tunnelling QUIC connection (client ↔ relay) starts with, before path MTU
/// discovery: a 1200-byte inner QUIC packet (the smallest every QUIC path must carry, RFC 9000
/// §14) plus the quarter stream ID and context ID, a DATAGRAM frame header and the outer short
/// header and AEAD tag fit in one outer datagram from the first packet, so an inner connection
/// never starts on the capsule fallback. On a path that cannot carry it, quinn's black-hole
/// detection falls back to 1200.
pub const TUNNEL_INITIAL_MTU: u16 = 1350;

pub const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// Splits a QUIC DATAGRAM frame payload into (quarter stream ID, HTTP datagram payload).
///
/// A frame too short to hold a whole varint is Malformed, not Incomplete: a QUIC DATAGRAM frame
/// is delivered whole.
pub fn split_quarter_stream_id(frame: &Bytes) -> Result<(u64, Bytes), DecodeError> {
    let (qsid, used) = varint::decode(frame)
        .map_err(|_| DecodeError::Malformed("HTTP datagram too short for its quarter stream ID"))?;
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# The largest legal QUIC stream ID value is 2^62-1, so the
    //# largest legal value of the Quarter Stream ID field is 2^60-1. Receipt
    //# of an HTTP/3 Datagram that includes a larger value MUST be treated as an HTTP/3
    //# connection error of type H3_DATAGRAM_ERROR (0x33).
    //
    // Reported as Malformed; the caller (`cfr_relay::http3`) closes the connection.
    if qsid > MAX_QUARTER_STREAM_ID {
        return Err(DecodeError::Malformed("quarter stream ID exceeds 2^60-1"));
    }
    Ok((qsid, frame.slice(used..)))
}

/// Splits an HTTP datagram payload into (context ID, data).
///
/// An empty `data` is valid (RFC 9298 §5: a UDP payload may be empty). Context IDs other than
/// [`UDP_PAYLOAD_CONTEXT`] are returned as-is; the caller drops them (RFC 9298 §4).
pub fn split_context_id(payload: &Bytes) -> Result<(u64, Bytes), DecodeError> {
    // RFC 9298 §5: the UDP Proxying Payload starts with a Context ID; a payload too short for it
    // is malformed (the datagram "MUST" be dropped or the stream aborted by the caller).
    let (ctx, used) = varint::decode(payload).map_err(|_| {
        DecodeError::Malformed("HTTP datagram payload too short for its context ID")
    })?;
    Ok((ctx, payload.slice(used..)))
}

/// Builds a QUIC DATAGRAM frame payload: quarter stream ID, context ID, data.
pub fn encode_quic_datagram(quarter_stream_id: u64, context_id: u64, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(
        varint::encoded_len(quarter_stream_id) + varint::encoded_len(context_id) + data.len(),
    );
    varint::encode(quarter_stream_id, &mut out);
    varint::encode(context_id, &mut out);
    out.extend_from_slice(data);
    Bytes::from(out)
}

/// Quarter stream ID of a client-initiated bidirectional (request) stream (RFC 9297 §2.1).
pub fn quarter_stream_id(stream_id: u64) -> u64 {
    stream_id / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_splits_quarter_stream_id_and_context_id() {
        let frame = encode_quic_datagram(quarter_stream_id(8), UDP_PAYLOAD_CONTEXT, b"hello");
        assert_eq!(&frame[..], b"\x02\x00hello");
        let (qsid, payload) = split_quarter_stream_id(&frame).unwrap();
        assert_eq!(qsid, 2);
        let (ctx, data) = split_context_id(&payload).unwrap();
        assert_eq!(ctx, UDP_PAYLOAD_CONTEXT);
        assert_eq!(&data[..], b"hello");
    }

    #[test]
    fn datagram_split_is_zero_copy() {
        let frame = encode_quic_datagram(1000, 0, &[7u8; 100]);
        let (_, payload) = split_quarter_stream_id(&frame).unwrap();
        let (_, data) = split_context_id(&payload).unwrap();
        // The data must point into the original frame's allocation.
        let frame_range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        assert!(frame_range.contains(&(data.as_ptr() as usize)));
    }

    #[test]
    fn datagram_empty_udp_payload_is_valid() {
        let frame = encode_quic_datagram(0, 0, b"");
        let (_, payload) = split_quarter_stream_id(&frame).unwrap();
        assert_eq!(split_context_id(&payload), Ok((0, Bytes::new())));
    }

    #[test]
    fn datagram_unknown_context_id_is_not_an_error() {
        let frame = encode_quic_datagram(3, 0x1234, b"x");
        let (_, payload) = split_quarter_stream_id(&frame).unwrap();
        assert_eq!(
            split_context_id(&payload),
            Ok((0x1234, Bytes::from_static(b"x")))
        );
    }

    #[test]
    fn datagram_without_context_id_is_malformed() {
        assert!(matches!(
            split_context_id(&Bytes::new()),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            split_context_id(&Bytes::from_static(&[0x40])),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn datagram_truncated_quarter_stream_id_is_malformed() {
        assert!(matches!(
            split_quarter_stream_id(&Bytes::new()),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            split_quarter_stream_id(&Bytes::from_static(&[0x80, 0])),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn datagram_quarter_stream_id_above_2_pow_60_is_malformed() {
        let mut frame = Vec::new();
        varint::encode(MAX_QUARTER_STREAM_ID + 1, &mut frame);
        frame.push(0);
        assert!(matches!(
            split_quarter_stream_id(&Bytes::from(frame)),
            Err(DecodeError::Malformed(_))
        ));
        let ok = encode_quic_datagram(MAX_QUARTER_STREAM_ID, 0, b"");
        assert_eq!(
            split_quarter_stream_id(&ok).unwrap().0,
            MAX_QUARTER_STREAM_ID
        );
    }

    #[test]
    fn datagram_quarter_stream_id_divides_request_stream_id_by_four() {
        assert_eq!(quarter_stream_id(0), 0);
        assert_eq!(quarter_stream_id(4), 1);
        assert_eq!(quarter_stream_id(400), 100);
    }
}
