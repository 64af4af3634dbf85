//! Property checks used by fuzz targets and corpus replay.
//!
//! Each function takes arbitrary bytes and panics if a property of the wire formats is violated.
//! `fuzz/fuzz_targets/*.rs` are one-line wrappers around them, and
//! `tests/fuzz_corpus_replay.rs` runs every committed corpus file through the same functions on
//! stable Rust, so a crash found once stays a regression test.
use bytes::Bytes;

use crate::capsule::{self, Capsule, CapsuleDecoder, MAX_HEADER_LEN};
use crate::datagram;
use crate::proxy_status::ProxyStatus;
use crate::target::{self, Host, Target};
use crate::{varint, DecodeError};

/// A property check: panics if `data` exposes a violation.
pub type PropertyCheck = fn(&[u8]);

/// Every property check by fuzz target name (the directory name under `fuzz/corpus/`).
pub const TARGETS: &[(&str, PropertyCheck)] = &[
    ("capsule_decoder", capsule_decoder),
    ("datagram_payload", datagram_payload),
    ("connect_udp_path", connect_udp_path),
    ("authority", authority),
    ("proxy_status", proxy_status),
    ("socks5", crate::socks5::fuzz_socks5),
    ("pvd", crate::pvd::fuzz_pvd),
    ("udp_template", udp_template),
    ("http1_response_head", crate::http1::fuzz_response_head),
    ("http1_request_head", http1_request_head),
];

/// `max_datagram_len` values the capsule target chooses from with its first input byte.
pub const CAPSULE_MAX_LENS: [usize; 5] = [1, 2, 16, 1500, 65535];

/// What decoding a capsule stream produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    capsules: Vec<Capsule>,
    error: Option<DecodeError>,
    finish: Result<(), DecodeError>,
}

/// Decodes `chunks` pushed one after another, draining after each, and checks the memory bound.
fn decode_chunks<'a>(max: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut d = CapsuleDecoder::new(max);
    let mut capsules = Vec::new();
    let mut error = None;
    'outer: for chunk in chunks {
        d.push(chunk);
        loop {
            match d.next_capsule() {
                Ok(Some(c)) => capsules.push(c),
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        matches!(e, DecodeError::Malformed(_)),
                        "next_capsule must never report Incomplete as an error: {e:?}"
                    );
                    error = Some(e);
                    break 'outer;
                }
            }
        }
        assert!(
            d.buffered_len() <= MAX_HEADER_LEN + max,
            "decoder buffers {} bytes with max_datagram_len {max}",
            d.buffered_len()
        );
    }
    Outcome {
        capsules,
        error,
        finish: d.finish(),
    }
}

/// Capsule decoder: input = `[max selector][split u16 BE][stream...]`.
///
/// Properties: decoding in one push, in two pushes split at the chosen offset, and byte by byte
/// give the same capsules and errors; the buffer stays within header + `max_datagram_len`;
/// DATAGRAM capsules respect the limit and re-encode (shortest form) to capsules that decode the
/// same; a cleanly decoded stream re-encodes to a stream that decodes the same.
pub fn capsule_decoder(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let max = CAPSULE_MAX_LENS[usize::from(data[0]) % CAPSULE_MAX_LENS.len()];
    let stream = &data[3..];
    let split = usize::from(u16::from_be_bytes([data[1], data[2]])) % (stream.len() + 1);

    let whole = decode_chunks(max, [stream]);
    let halves = decode_chunks(max, [&stream[..split], &stream[split..]]);
    assert_eq!(whole, halves, "split at {split} changed the decoding");
    let bytewise = decode_chunks(max, stream.chunks(1));
    assert_eq!(whole, bytewise, "byte-by-byte pushes changed the decoding");
    if whole.error.is_some() {
        assert_eq!(whole.finish, Err(whole.error.clone().unwrap()));
    }

    let mut reencoded = Vec::new();
    for c in &whole.capsules {
        match c {
            Capsule::Datagram { context_id, data } => {
                let value_len = varint::encoded_len(*context_id) + data.len();
                assert!(
                    value_len <= max,
                    "DATAGRAM of {value_len} bytes passed limit {max}"
                );
                let mut one = Vec::new();
                capsule::encode_datagram(*context_id, data, &mut one);
                let again = decode_chunks(max, [one.as_slice()]);
                assert_eq!(
                    again.capsules,
                    std::slice::from_ref(c),
                    "DATAGRAM did not round-trip"
                );
                assert_eq!(again.error, None);
                assert_eq!(again.finish, Ok(()));
                reencoded.extend_from_slice(&one);
            }
            Capsule::Unknown {
                capsule_type,
                length,
            } => {
                assert_ne!(*capsule_type, capsule::DATAGRAM);
                let length = usize::try_from(*length).expect("skipped more than the input");
                assert!(length <= stream.len(), "skipped more than the input");
                capsule::encode_capsule(*capsule_type, &vec![0; length], &mut reencoded);
            }
        }
    }
    if whole.error.is_none() && whole.finish.is_ok() {
        assert!(
            reencoded.len() <= stream.len(),
            "shortest form grew the stream"
        );
        let again = decode_chunks(max, [reencoded.as_slice()]);
        assert_eq!(again, whole, "re-encoded stream decodes differently");
    }
}

/// QUIC DATAGRAM payload: split quarter stream ID and context ID, re-encode, split again.
pub fn datagram_payload(data: &[u8]) {
    let frame = Bytes::copy_from_slice(data);
    match datagram::split_quarter_stream_id(&frame) {
        Ok((qsid, payload)) => {
            assert!(qsid <= datagram::MAX_QUARTER_STREAM_ID);
            assert!(frame.ends_with(&payload));
            if let Ok((ctx, udp)) = datagram::split_context_id(&payload) {
                assert!(payload.ends_with(&udp));
                let re = datagram::encode_quic_datagram(qsid, ctx, &udp);
                assert!(re.len() <= frame.len(), "shortest form grew the datagram");
                if re.len() == frame.len() {
                    assert_eq!(re, frame, "minimal encoding did not re-encode identically");
                }
                let (qsid2, payload2) = datagram::split_quarter_stream_id(&re).unwrap();
                let (ctx2, udp2) = datagram::split_context_id(&payload2).unwrap();
                assert_eq!((qsid2, ctx2, udp2), (qsid, ctx, udp));
            }
        }
        Err(e) => assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}"),
    }
    if let Ok((_, rest)) = datagram::split_context_id(&frame) {
        assert!(frame.ends_with(&rest));
    }
}

/// Checks the invariants of a parsed target and that both client-side forms round-trip.
fn check_target(t: &Target) {
    assert_ne!(t.port, 0);
    if let Host::Name(name) = &t.host {
        assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
        assert!(!name.ends_with('.'), "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
            "{name:?}"
        );
    }
    let path = target::connect_udp_path(t);
    assert_eq!(
        target::parse_connect_udp_path(&path).as_ref(),
        Ok(t),
        "{path}"
    );
    let auth = target::authority(t);
    assert_eq!(target::parse_authority(&auth).as_ref(), Ok(t), "{auth}");
}

/// connect-udp `:path`: parse → `connect_udp_path` → parse gives the same target.
pub fn connect_udp_path(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = target::parse_connect_udp_path(s) {
        check_target(&t);
    }
}

/// CONNECT `:authority`: parse → `authority` → parse gives the same target.
pub fn authority(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = target::parse_authority(s) {
        check_target(&t);
    }
}

/// Proxy-Status: whatever parses serialises to printable ASCII that parses back to a value that
/// is a fixed point of serialise → parse.
pub fn proxy_status(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Some(ps) = ProxyStatus::parse(s) else {
        return;
    };
    let v = ps.to_header_value();
    assert!(v.bytes().all(|b| (0x20..0x7f).contains(&b)), "{v:?}");
    let ps2 = ProxyStatus::parse(&v).unwrap_or_else(|| panic!("own output did not parse: {v}"));
    assert_eq!(ps2.error, ps.error);
    assert_eq!(ps2.details.is_some(), ps.details.is_some());
    let v2 = ps2.to_header_value();
    assert_eq!(ProxyStatus::parse(&v2).as_ref(), Some(&ps2), "{v2}");
}

/// connect-udp URI template: input = `[template]\n[path]`. Parsing either never panics; a
/// template that parses matches its own expansion of the target the path names.
pub fn udp_template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, path) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(tpl) = crate::template::UdpTemplate::parse(template) else {
        return;
    };
    if let Ok(target) = tpl.match_path(path) {
        let expanded = tpl.expand(&target);
        assert_eq!(
            tpl.match_path(&expanded),
            Ok(target),
            "{template}: expansion {expanded} must match back"
        );
    }
    for target in [
        Target::new("example.com", 443).expect("valid"),
        Target::new("2001:db8::1", 53).expect("valid"),
    ] {
        let expanded = tpl.expand(&target);
        assert_eq!(
            tpl.match_path(&expanded),
            Ok(target),
            "{template}: expansion {expanded} must match back"
        );
    }
}

/// HTTP/1.1 request heads: never panics; an accepted head ends within the bytes and the limit,
/// ends with an empty line, and is unaffected by whatever follows it (tunnel bytes); a head
/// that is incomplete stays incomplete or becomes complete/refused, never accepted differently,
/// as bytes arrive. The first input byte picks the size limit.
pub fn http1_request_head(data: &[u8]) {
    use crate::http1::{parse_request_head, HeadError, RequestKind};
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let max = [16, 64, 256, 16 * 1024][usize::from(pick % 4)];
    let verdict = parse_request_head(bytes, max);
    match &verdict {
        Ok(head) => {
            assert!(head.len <= bytes.len() && head.len <= max, "{head:?}");
            assert!(bytes[..head.len].ends_with(b"\r\n\r\n"), "{head:?}");
            assert_eq!(
                parse_request_head(&bytes[..head.len], max).as_ref(),
                Ok(head),
                "the head alone parses the same"
            );
            if let RequestKind::Connect(t) = &head.kind {
                check_target(t);
            }
        }
        Err(HeadError::Incomplete) => assert!(bytes.len() < max),
        Err(_) => {}
    }
    // Feeding a prefix never accepts a different head than the whole input.
    if bytes.len() > 1 {
        let prefix = parse_request_head(&bytes[..bytes.len() / 2], max);
        if let Ok(head) = prefix {
            assert_eq!(
                verdict,
                Ok(head),
                "a head accepted early changed with more bytes"
            );
        }
    }
}
