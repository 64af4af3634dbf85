//! The Capsule Protocol (RFC 9297 §3): Type (varint), Length (varint), Value.
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{varint, DecodeError};

/// Capsule type of DATAGRAM (RFC 9297 §3.5).
pub const DATAGRAM: u64 = 0x00;

/// Longest capsule header: an 8-byte Type and an 8-byte Length.
pub const MAX_HEADER_LEN: usize = 16;

/// One decoded capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    /// A DATAGRAM capsule: an HTTP datagram split into its context ID and data.
    Datagram { context_id: u64, data: Bytes },
    /// A capsule of a type we do not implement; its value was skipped (RFC 9297 §3.2).
    Unknown { capsule_type: u64, length: u64 },
}

/// Appends a DATAGRAM capsule holding `context_id` + `data`.
pub fn encode_datagram(context_id: u64, data: &[u8], out: &mut impl BufMut) {
    encode_datagram_header(context_id, data.len(), out);
    out.put_slice(data);
}

/// Appends only the header of a DATAGRAM capsule (Type, Length, Context ID) for `data_len` bytes
/// of data; the caller sends the data itself right after it (saves copying large payloads).
pub fn encode_datagram_header(context_id: u64, data_len: usize, out: &mut impl BufMut) {
    let value_len = varint::encoded_len(context_id) as u64 + data_len as u64;
    varint::encode(DATAGRAM, out);
    varint::encode(value_len, out);
    varint::encode(context_id, out);
}

/// Appends a capsule of any type with the given value (tests, and capsule types a caller owns).
pub fn encode_capsule(capsule_type: u64, value: &[u8], out: &mut impl BufMut) {
    varint::encode(capsule_type, out);
    varint::encode(value.len() as u64, out);
    out.put_slice(value);
}

/// Where the decoder is inside the capsule stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Between capsules, or inside a header / DATAGRAM value that is being buffered.
    Ready,
    /// Discarding the value of an unknown capsule as it arrives; `remaining` bytes still to go.
    Skipping {
        capsule_type: u64,
        length: u64,
        remaining: u64,
    },
    /// The stream was malformed; every later call reports the same error.
    Failed(&'static str),
}

/// Incremental decoder for a capsule stream (a request body after a 2xx).
///
/// Feed it chunks as they arrive; it yields whole capsules, skips the values of unknown capsule
/// types without buffering them, and never buffers more than `max_datagram_len` + a header.
///
/// Memory bound: once [`next_capsule`](Self::next_capsule) has returned `Ok(None)` the decoder holds
/// at most [`MAX_HEADER_LEN`] + `max_datagram_len` bytes (see [`buffered_len`](Self::buffered_len)).
/// A single `push` is buffered whole until it is drained, so callers drain after every push.
#[derive(Debug)]
pub struct CapsuleDecoder {
    max_datagram_len: usize,
    buf: BytesMut,
    state: State,
}

/// Buffer capacity kept between capsules; more is released once the buffer drains.
const RETAINED_CAPACITY: usize = 4096;

/// A parsed capsule header.
struct Header {
    capsule_type: u64,
    length: u64,
    header_len: usize,
}

/// Parses the Type and Length at the front of `buf`; `Ok(None)` if they are not all there yet.
fn parse_header(buf: &[u8], max_datagram_len: usize) -> Result<Option<Header>, DecodeError> {
    let (capsule_type, type_len) = match varint::decode(buf) {
        Ok(v) => v,
        Err(DecodeError::Incomplete) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (length, length_len) = match varint::decode(&buf[type_len..]) {
        Ok(v) => v,
        Err(DecodeError::Incomplete) => return Ok(None),
        Err(e) => return Err(e),
    };
    if capsule_type == DATAGRAM {
        // RFC 9298 §5: a connect-udp HTTP Datagram Payload starts with a Context ID, so an empty
        // DATAGRAM value terminates before the end of the identified fields.
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
        //# A Capsule payload that contains additional bytes after the
        //# identified fields or a Capsule payload that terminates before the end of the
        //# identified fields MUST be treated as it if were a malformed or incomplete
        //# message.
        if length == 0 {
            return Err(DecodeError::Malformed(
                "DATAGRAM capsule without a context ID",
            ));
        }
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
        //# If an incoming
        //# DATAGRAM Capsule has a length that is known to be so large as to not be usable,
        //# the implementation SHOULD discard the Capsule without buffering its contents
        //# into memory.
        //
        // Refused from the header alone (the stream is aborted, RFC 9298 §5).
        if length > max_datagram_len as u64 {
            return Err(DecodeError::Malformed(
                "DATAGRAM capsule exceeds the maximum size",
            ));
        }
    }
    Ok(Some(Header {
        capsule_type,
        length,
        header_len: type_len + length_len,
    }))
}

impl CapsuleDecoder {
    /// `max_datagram_len`: largest DATAGRAM capsule value accepted (context ID + data); larger is Malformed.
    pub fn new(max_datagram_len: usize) -> Self {
        CapsuleDecoder {
            max_datagram_len,
            buf: BytesMut::new(),
            state: State::Ready,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, mut chunk: &[u8]) {
        match &mut self.state {
            // Nothing after a malformed capsule can be decoded; do not hold on to it.
            State::Failed(_) => return,
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
            //# Endpoints that receive a Capsule with an unknown Capsule Type MUST silently
            //# drop that Capsule and skip over it to parse the next Capsule.
            //
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
            //# When processing Capsules, a receiver might be tempted to accumulate the full
            //# length of the Capsule Value field in the data stream before handling it. This
            //# approach SHOULD be avoided
            //
            // The value is discarded as it streams past (its Length may be up to 2^62-1).
            State::Skipping { remaining, .. } => {
                let from_buf = (*remaining).min(self.buf.len() as u64) as usize;
                self.buf.advance(from_buf);
                *remaining -= from_buf as u64;
                let from_chunk = (*remaining).min(chunk.len() as u64) as usize;
                *remaining -= from_chunk as u64;
                chunk = &chunk[from_chunk..];
            }
            State::Ready => {}
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Next whole capsule, `Ok(None)` when more bytes are needed, `Err` if the stream is malformed.
    pub fn next_capsule(&mut self) -> Result<Option<Capsule>, DecodeError> {
        loop {
            match &mut self.state {
                State::Failed(why) => return Err(DecodeError::Malformed(why)),
                State::Skipping {
                    capsule_type,
                    length,
                    remaining,
                } => {
                    let n = (*remaining).min(self.buf.len() as u64) as usize;
                    self.buf.advance(n);
                    *remaining -= n as u64;
                    if *remaining > 0 {
                        return Ok(None);
                    }
                    let capsule = Capsule::Unknown {
                        capsule_type: *capsule_type,
                        length: *length,
                    };
                    self.state = State::Ready;
                    return Ok(Some(capsule));
                }
                State::Ready => {}
            }

            let header = match parse_header(&self.buf, self.max_datagram_len) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    if self.buf.is_empty() && self.buf.capacity() > RETAINED_CAPACITY {
                        // Release the memory of a large DATAGRAM once it has been consumed.
                        self.buf = BytesMut::new();
                    }
                    return Ok(None);
                }
                Err(DecodeError::Malformed(why)) => return Err(self.fail(why)),
                Err(DecodeError::Incomplete) => return Ok(None),
            };

            if header.capsule_type != DATAGRAM {
                self.buf.advance(header.header_len);
                self.state = State::Skipping {
                    capsule_type: header.capsule_type,
                    length: header.length,
                    remaining: header.length,
                };
                continue;
            }

            // parse_header bounded the length by max_datagram_len, so it fits in usize.
            let value_len = header.length as usize;
            if self.buf.len() < header.header_len + value_len {
                // Make room once for the whole capsule rather than growing chunk by chunk.
                self.buf
                    .reserve(header.header_len + value_len - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(header.header_len);
            let mut value = self.buf.split_to(value_len).freeze();
            let (context_id, id_len) = match varint::decode(&value) {
                Ok(v) => v,
                // RFC 9297 §3.3 (quoted above): a payload that ends inside its fields is
                // malformed.
                Err(_) => return Err(self.fail("DATAGRAM capsule with a truncated context ID")),
            };
            value.advance(id_len);
            return Ok(Some(Capsule::Datagram {
                context_id,
                data: value,
            }));
        }
    }

    /// Call at end of stream: a partial capsule left over is Malformed (RFC 9297 §3.3).
    pub fn finish(&self) -> Result<(), DecodeError> {
        match &self.state {
            State::Failed(why) => return Err(DecodeError::Malformed(why)),
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
            //# If the receive side of a stream carrying Capsules is terminated cleanly (for
            //# example, in HTTP/3 this is defined as receiving a QUIC STREAM frame with the FIN
            //# bit set) and the last Capsule on the stream was truncated, this MUST be treated
            //# as if it were a malformed or incomplete message.
            State::Skipping { remaining, .. } if *remaining > self.buf.len() as u64 => {
                return Err(DecodeError::Malformed("stream ended inside a capsule"));
            }
            _ => {}
        }
        // Whole capsules that are still buffered are fine; only a truncated tail is not.
        let mut rest: &[u8] = &self.buf;
        if let State::Skipping { remaining, .. } = self.state {
            rest = &rest[remaining as usize..];
        }
        while !rest.is_empty() {
            let header = parse_header(rest, self.max_datagram_len)?.ok_or(
                DecodeError::Malformed("stream ended inside a capsule header"),
            )?;
            let total = header.header_len as u64 + header.length;
            if total > rest.len() as u64 {
                return Err(DecodeError::Malformed("stream ended inside a capsule"));
            }
            if header.capsule_type == DATAGRAM {
                let value = &rest[header.header_len..total as usize];
                if varint::decode(value).is_err() {
                    return Err(DecodeError::Malformed(
                        "DATAGRAM capsule with a truncated context ID",
                    ));
                }
            }
            rest = &rest[total as usize..];
        }
        Ok(())
    }

    /// Bytes currently held by the decoder (for metrics and memory-bound checks).
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// The `max_datagram_len` this decoder was created with.
    pub fn max_datagram_len(&self) -> usize {
        self.max_datagram_len
    }

    fn fail(&mut self, why: &'static str) -> DecodeError {
        self.state = State::Failed(why);
        self.buf = BytesMut::new();
        DecodeError::Malformed(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(context_id: u64, data: &[u8]) -> Capsule {
        Capsule::Datagram {
            context_id,
            data: Bytes::copy_from_slice(data),
        }
    }

    /// Drains every capsule; stops at the first error.
    fn drain(d: &mut CapsuleDecoder) -> Result<Vec<Capsule>, DecodeError> {
        let mut out = Vec::new();
        while let Some(c) = d.next_capsule()? {
            out.push(c);
        }
        Ok(out)
    }

    fn sample_stream() -> (Vec<u8>, Vec<Capsule>) {
        let mut s = Vec::new();
        encode_datagram(0, b"hello", &mut s);
        encode_capsule(0x2a, b"ignored value", &mut s);
        encode_datagram(0, b"", &mut s);
        encode_datagram(77, b"other context", &mut s);
        encode_capsule(0x1234_5678, b"", &mut s);
        let expect = vec![
            datagram(0, b"hello"),
            Capsule::Unknown {
                capsule_type: 0x2a,
                length: 13,
            },
            datagram(0, b""),
            datagram(77, b"other context"),
            Capsule::Unknown {
                capsule_type: 0x1234_5678,
                length: 0,
            },
        ];
        (s, expect)
    }

    #[test]
    fn capsule_datagram_encoding_matches_rfc9297_layout() {
        let mut out = Vec::new();
        encode_datagram(0, b"abc", &mut out);
        assert_eq!(out, [0x00, 0x04, 0x00, b'a', b'b', b'c']);
        let mut hdr = Vec::new();
        encode_datagram_header(0, 3, &mut hdr);
        assert_eq!(hdr, out[..3]);
    }

    #[test]
    fn capsule_decoder_decodes_single_push() {
        let (stream, expect) = sample_stream();
        let mut d = CapsuleDecoder::new(1500);
        d.push(&stream);
        assert_eq!(drain(&mut d), Ok(expect));
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(d.buffered_len(), 0);
    }

    #[test]
    fn capsule_decoder_decodes_byte_by_byte() {
        let (stream, expect) = sample_stream();
        let mut d = CapsuleDecoder::new(1500);
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            got.extend(drain(&mut d).unwrap());
        }
        assert_eq!(got, expect);
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn capsule_decoder_decodes_every_two_chunk_split() {
        let (stream, expect) = sample_stream();
        for split in 0..=stream.len() {
            let mut d = CapsuleDecoder::new(1500);
            d.push(&stream[..split]);
            let mut got = drain(&mut d).unwrap();
            d.push(&stream[split..]);
            got.extend(drain(&mut d).unwrap());
            assert_eq!(got, expect, "split at {split}");
            assert_eq!(d.finish(), Ok(()), "split at {split}");
        }
    }

    #[test]
    fn capsule_decoder_skips_unknown_type_without_buffering() {
        let huge: u64 = 1 << 40;
        let mut header = Vec::new();
        varint::encode(0x4242, &mut header);
        varint::encode(huge, &mut header);
        let mut d = CapsuleDecoder::new(1500);
        d.push(&header);
        assert_eq!(d.next_capsule(), Ok(None));
        let chunk = vec![0xAB; 64 * 1024];
        let mut fed = 0u64;
        // Feed 1 MiB of the value: nothing may be retained.
        for _ in 0..16 {
            d.push(&chunk);
            fed += chunk.len() as u64;
            assert_eq!(d.next_capsule(), Ok(None));
            assert_eq!(d.buffered_len(), 0, "skipped value bytes were buffered");
        }
        assert!(
            matches!(d.finish(), Err(DecodeError::Malformed(_))),
            "stream ending inside a skipped value must be malformed"
        );
        assert!(fed < huge);
    }

    #[test]
    fn capsule_decoder_yields_unknown_after_value_fully_skipped() {
        let mut s = Vec::new();
        encode_capsule(0x17, &[1; 300], &mut s);
        encode_datagram(0, b"after", &mut s);
        let mut d = CapsuleDecoder::new(1500);
        d.push(&s[..100]);
        assert_eq!(d.next_capsule(), Ok(None));
        d.push(&s[100..303]);
        assert_eq!(
            d.next_capsule(),
            Ok(Some(Capsule::Unknown {
                capsule_type: 0x17,
                length: 300
            }))
        );
        d.push(&s[303..]);
        assert_eq!(d.next_capsule(), Ok(Some(datagram(0, b"after"))));
        assert_eq!(d.next_capsule(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn capsule_decoder_rejects_oversized_datagram_before_buffering() {
        let mut header = Vec::new();
        varint::encode(DATAGRAM, &mut header);
        varint::encode(1501, &mut header);
        let mut d = CapsuleDecoder::new(1500);
        d.push(&header);
        assert!(matches!(d.next_capsule(), Err(DecodeError::Malformed(_))));
        // Later bytes are dropped, and the error is sticky.
        d.push(&[0; 4096]);
        assert_eq!(d.buffered_len(), 0);
        assert!(matches!(d.next_capsule(), Err(DecodeError::Malformed(_))));
        assert!(matches!(d.finish(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn capsule_decoder_accepts_datagram_of_exactly_max_len() {
        let data = vec![9u8; 1499];
        let mut s = Vec::new();
        encode_datagram(0, &data, &mut s);
        let mut d = CapsuleDecoder::new(1500);
        d.push(&s);
        assert_eq!(d.next_capsule(), Ok(Some(datagram(0, &data))));
    }

    #[test]
    fn capsule_decoder_rejects_datagram_without_context_id() {
        let mut d = CapsuleDecoder::new(1500);
        d.push(&[0x00, 0x00]);
        assert!(matches!(d.next_capsule(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn capsule_decoder_rejects_datagram_with_truncated_context_id() {
        // Length 1, but the context ID varint claims 2 bytes.
        let mut d = CapsuleDecoder::new(1500);
        d.push(&[0x00, 0x01, 0x40]);
        assert!(matches!(d.next_capsule(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn capsule_decoder_finish_rejects_truncated_capsule() {
        let mut s = Vec::new();
        encode_datagram(0, b"hello", &mut s);
        for cut in 1..s.len() {
            let mut d = CapsuleDecoder::new(1500);
            d.push(&s[..cut]);
            assert_eq!(drain(&mut d), Ok(vec![]));
            assert!(
                matches!(d.finish(), Err(DecodeError::Malformed(_))),
                "truncated at {cut} must be malformed"
            );
        }
    }

    #[test]
    fn capsule_decoder_finish_accepts_undrained_whole_capsules() {
        let (stream, _) = sample_stream();
        let mut d = CapsuleDecoder::new(1500);
        d.push(&stream);
        assert_eq!(d.finish(), Ok(()));
        d.push(&[0x00]);
        assert!(matches!(d.finish(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn capsule_decoder_buffer_stays_within_header_plus_max_datagram_len() {
        let max = 100;
        let mut s = Vec::new();
        for i in 0..20u8 {
            encode_datagram(u64::from(i), &[i; 90], &mut s);
            encode_capsule(0x99, &[i; 500], &mut s);
        }
        for chunk_len in [1, 7, 64, 333] {
            let mut d = CapsuleDecoder::new(max);
            let mut n = 0;
            for chunk in s.chunks(chunk_len) {
                d.push(chunk);
                n += drain(&mut d).unwrap().len();
                assert!(d.buffered_len() <= MAX_HEADER_LEN + max);
            }
            assert_eq!(n, 40);
            assert_eq!(d.finish(), Ok(()));
        }
    }

    #[test]
    fn capsule_decoder_accepts_non_minimal_header_varints() {
        // Type 0 as 8 bytes, Length 3 as 2 bytes, context ID 0 as 4 bytes would overflow length;
        // use context ID as 1 byte.
        let s = [0xc0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0x03, 0x00, b'h', b'i'];
        let mut d = CapsuleDecoder::new(1500);
        d.push(&s);
        assert_eq!(d.next_capsule(), Ok(Some(datagram(0, b"hi"))));
    }
}
