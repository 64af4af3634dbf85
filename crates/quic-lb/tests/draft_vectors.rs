//! The test vectors of draft-ietf-quic-load-balancers-21, Appendix B "Load Balancer Test
//! Vectors" (quicwg/load-balancers, tag draft-ietf-quic-load-balancers-21,
//! draft-ietf-quic-load-balancers.md), plus the §5.4.2.4 encryption example. "In all cases, the
//! server is configured to encode the CID length."
use cfr_quic_lb::{Algorithm, CidEncoder, DecodeError, LbConfig};

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

const KEY: &str = "8f95f09245765f80256934e50c66207f";

/// Encodes `sid`/`nonce` under the config and checks the CID, then decodes it back.
fn check(cr: u8, key: Option<&str>, sid: &str, nonce: &str, cid: &str, algorithm: Algorithm) {
    let (sid, nonce, cid) = (unhex(sid), unhex(nonce), unhex(cid));
    let key = key.map(|k| unhex(k).try_into().unwrap());
    let config = LbConfig::new(cr, sid.len(), nonce.len(), key).unwrap();
    assert_eq!(config.algorithm(), algorithm);
    assert_eq!(config.cid_len(), cid.len());
    let encoder = CidEncoder::new(&config, &sid).unwrap();
    assert_eq!(
        hex::encode(encoder.encode(&nonce)),
        hex::encode(&cid),
        "encoding server ID {} nonce {} (config rotation {cr})",
        hex::encode(&sid),
        hex::encode(&nonce)
    );
    let decoded = config.decode(&cid).unwrap();
    assert_eq!(decoded.server_id.as_bytes(), sid.as_slice());
    assert_eq!(decoded.nonce(), nonce.as_slice());
    assert_eq!(config.decode_server_id(&cid).unwrap(), decoded.server_id);
    // A load balancer reading a short header gets the CID followed by the rest of the packet.
    let mut packet_tail = cid.clone();
    packet_tail.extend_from_slice(b"rest of the packet");
    assert_eq!(
        config.decode_server_id(&packet_tail).unwrap(),
        decoded.server_id
    );
}

#[test]
fn unencrypted_vectors() {
    check(
        0,
        None,
        "c4605e",
        "4504cc4f",
        "07c4605e4504cc4f",
        Algorithm::Plaintext,
    );
    // The draft prints this row as `1 350d28b420 3487d970b 20a350d28b4203487d970b`: the nonce has
    // an odd number of hex digits and the CID starts with 0x20 (rotation 1, length 0). Commit
    // 4fef60a ("Three config rotation bits") prefixed "2" to the older "0a350d…" (length 0x0a,
    // server ID, nonce) and the nonce lost a leading zero in both places. With the nonce as five
    // octets (0x03487d970b) and the first octet 0b001_01010 the row is consistent.
    check(
        1,
        None,
        "350d28b420",
        "03487d970b",
        "2a350d28b42003487d970b",
        Algorithm::Plaintext,
    );
}

#[test]
fn encrypted_vectors() {
    let key = Some(KEY);
    // 3 + 4 octets: four-pass, odd length; the server ID fits in left_0 (three passes suffice).
    check(
        0,
        key,
        "ed793a",
        "ee080dbf",
        "0720b1d07b359d3c",
        Algorithm::FourPass,
    );
    // 10 + 5 octets: the server ID exceeds the nonce, so decoding needs the fourth pass.
    check(
        1,
        key,
        "ed793a51d49b8f5fab65",
        "ee080dbf48",
        "2fcc381bc74cb4fbad2823a3d1f8fed2",
        Algorithm::FourPass,
    );
    // 8 + 8 octets: the single-pass AES-128-ECB special case.
    check(
        2,
        key,
        "ed793a51d49b8f5f",
        "ee080dbf48c0d1e5",
        "504dd2d05a7b0de9b2b9907afb5ecf8cc3",
        Algorithm::SinglePass,
    );
    // 9 + 9 octets: four-pass, even length. The draft's row says config rotation 3 but prints
    // the first octet 0x12 (rotation 0, length 18): commit f150581 ("Rearrange expand()")
    // regenerated the ciphertext without the 0x60 that commit 4fef60a ("Three config rotation
    // bits") had put in. The 18 ciphertext octets are the draft's under either reading.
    for (cr, first_octet) in [(0, "12"), (3, "72")] {
        check(
            cr,
            key,
            "ed793a51d49b8f5fab",
            "ee080dbf48c0d1e55d",
            &format!("{first_octet}5779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"),
            Algorithm::FourPass,
        );
    }
}

#[test]
fn section_5_4_2_4_encryption_example() {
    check(
        0,
        Some("fdf726a9893ec05c0632d3956680baf0"),
        "31441a",
        "9c69c275",
        "0767947d29be054a",
        Algorithm::FourPass,
    );
}

#[test]
fn unroutable_and_foreign_cids_do_not_decode() {
    let config = LbConfig::new(2, 3, 4, None).unwrap();
    assert_eq!(
        config.decode_server_id(&unhex("e7c4605e4504cc4f")),
        Err(DecodeError::Unroutable)
    );
    assert_eq!(
        config.decode_server_id(&unhex("07c4605e4504cc4f")),
        Err(DecodeError::OtherConfig(0))
    );
    assert_eq!(
        config.decode_server_id(&unhex("47c4605e45")),
        Err(DecodeError::Incomplete { needed: 8, got: 5 })
    );
    assert_eq!(
        config.decode_server_id(&[]),
        Err(DecodeError::Incomplete { needed: 8, got: 0 })
    );
    // Self-encoded length 6 cannot hold 3 + 4 octets.
    assert_eq!(
        config.decode_server_id(&unhex("46c4605e4504cc4f")),
        Err(DecodeError::Malformed {
            encoded: 6,
            needed: 7
        })
    );
    // Without self-encoding the low five bits are random and not checked.
    let random_bits = config.clone().with_length_self_encoding(false);
    assert_eq!(
        random_bits
            .decode_server_id(&unhex("46c4605e4504cc4f"))
            .unwrap()
            .as_bytes(),
        unhex("c4605e")
    );
}
