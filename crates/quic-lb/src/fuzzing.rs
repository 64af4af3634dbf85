//! Property checks used by the fuzz targets (`fuzz/fuzz_targets/quic_lb_cid.rs`,
//! `quic_packet_dcid.rs`) and by `tests/fuzz_corpus_replay.rs`, which replays the committed
//! corpora on stable Rust.
use crate::{datagram_dcid, CidEncoder, LbConfig, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN};

/// A property check: panics if `data` exposes a violation.
pub type PropertyCheck = fn(&[u8]);

/// Every property check by fuzz target name (the directory name under `fuzz/corpus/`).
pub const TARGETS: &[(&str, PropertyCheck)] = &[
    ("quic_lb_cid", quic_lb_cid),
    ("quic_packet_dcid", quic_packet_dcid),
];

/// Input: `[config rotation][server ID len][nonce len][flags][key (16, if flags & 1)][bytes...]`,
/// each length reduced into its valid range; flags & 2 turns length self-encoding off.
///
/// Properties: decoding `bytes` as a CID never panics, and what decodes re-encodes to the same
/// octets; encoding a server ID and nonce taken from `bytes` gives a CID of the configured length
/// that decodes back to them.
pub fn quic_lb_cid(data: &[u8]) {
    let Some((config, rest)) = config_from(data) else {
        return;
    };
    let (sid_len, nonce_len, cid_len) =
        (config.server_id_len(), config.nonce_len(), config.cid_len());

    let decoded = config.decode(rest);
    let routed = config.decode_server_id(rest);
    assert_eq!(
        decoded.map(|d| d.server_id),
        routed,
        "decode and decode_server_id must agree"
    );
    if let Ok(d) = decoded {
        let encoder = CidEncoder::new(&config, d.server_id.as_bytes()).expect("decoded length");
        let again = encoder.encode(d.nonce());
        assert_eq!(
            again[1..],
            rest[1..cid_len],
            "a decoded CID must re-encode to the same octets"
        );
        assert_eq!(again[0] >> 5, rest[0] >> 5, "config rotation bits");
    }

    let mut material = [0u8; MAX_CID_LEN];
    let n = rest.len().min(MAX_CID_LEN);
    material[..n].copy_from_slice(&rest[..n]);
    let (sid, nonce) = (
        &material[..sid_len],
        &material[sid_len..sid_len + nonce_len],
    );
    let encoder = CidEncoder::new(&config, sid).expect("configured length");
    let cid = encoder.encode(nonce);
    assert_eq!(cid.len(), cid_len);
    let d = config.decode(&cid).expect("an encoded CID decodes");
    assert_eq!(d.server_id.as_bytes(), sid, "server ID round trip");
    assert_eq!(d.nonce(), nonce, "nonce round trip");
    assert_eq!(config.decode_server_id(&cid), Ok(d.server_id));
}

fn config_from(data: &[u8]) -> Option<(LbConfig, &[u8])> {
    let (&[cr, sid, nonce, flags], rest) = data.split_first_chunk::<4>()?;
    let sid_len = 1 + usize::from(sid) % MAX_SERVER_ID_LEN;
    let nonce_len = MIN_NONCE_LEN + usize::from(nonce) % (MAX_SERVER_ID_LEN + 1 - sid_len);
    let (key, rest) = if flags & 1 == 1 {
        let (key, rest) = rest.split_first_chunk::<16>()?;
        (Some(*key), rest)
    } else {
        (None, rest)
    };
    let config = LbConfig::new(cr % 7, sid_len, nonce_len, key)
        .expect("lengths reduced into range")
        .with_length_self_encoding(flags & 2 == 0);
    Some((config, rest))
}

/// Input: `[short-header CID length][datagram...]`. Properties: never panics; a long header's
/// DCID is as long as its length octet says; a short header's as long as configured.
pub fn quic_packet_dcid(data: &[u8]) {
    let Some((&cid_len, datagram)) = data.split_first() else {
        return;
    };
    let cid_len = usize::from(cid_len) % (MAX_CID_LEN + 1);
    if let Ok(p) = datagram_dcid(datagram, cid_len) {
        let expected = if p.is_long_header() {
            usize::from(datagram[5])
        } else {
            cid_len
        };
        assert_eq!(p.dcid.len(), expected, "DCID length");
        assert_eq!(p.first_octet, datagram[0]);
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, RngCore};

    use super::*;

    /// A stable-Rust stand-in for a fuzzing run: random inputs in the targets' formats.
    #[test]
    fn properties_hold_on_random_inputs() {
        let mut rng = rand::thread_rng();
        for _ in 0..20_000 {
            let mut data = vec![0; rng.gen_range(0..48)];
            rng.fill_bytes(&mut data);
            quic_lb_cid(&data);
            quic_packet_dcid(&data);
        }
    }
}
