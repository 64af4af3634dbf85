//! QUIC-LB routable connection IDs (draft-ietf-quic-load-balancers-21 §3–§5), sans-IO.
//!
//! A QUIC server that issues only connection IDs built by [`CidEncoder`] can be put behind any
//! load balancer configured with the same [`LbConfig`]: the balancer recovers the server ID from
//! the Destination Connection ID of every packet ([`LbConfig::decode_server_id`]) and so keeps a
//! connection on one server across NAT rebinding and migration, with no per-connection state.
//!
//! A CID is `first octet ‖ block`, where the first octet carries 3 config-rotation bits and 5
//! bits of self-encoded length (or random bits), and the block is `server ID ‖ nonce` — as is
//! (plaintext), one AES-128-ECB block (exactly 16 octets), or the four-pass Feistel network
//! (any other length).
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use aes::Aes128;
use rand::RngCore;

mod cipher;
pub mod fuzzing;
mod packet;

pub use packet::{datagram_dcid, PacketDcid, PacketError};

/// Longest connection ID QUIC version 1 allows (RFC 9000 §17.2).
pub const MAX_CID_LEN: usize = 20;
/// Longest server ID: the block is at most 19 octets and the nonce at least 4.
pub const MAX_SERVER_ID_LEN: usize = MAX_BLOCK_LEN - MIN_NONCE_LEN;
/// Shortest nonce.
pub const MIN_NONCE_LEN: usize = 4;
/// Longest server ID ‖ nonce block.
pub const MAX_BLOCK_LEN: usize = MAX_CID_LEN - 1;
/// The config rotation codepoint of unroutable connection IDs.
pub const UNROUTABLE: u8 = 0b111;

/// A configuration problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config rotation {0} is out of range 0..=6 (0b111 marks unroutable connection IDs)")]
    ConfigRotation(u8),
    #[error("server ID length {0} is out of range 1..=15 octets")]
    ServerIdLen(usize),
    #[error("nonce length {0} is shorter than 4 octets")]
    NonceLen(usize),
    #[error("server ID ({server_id_len}) + nonce ({nonce_len}) is {} octets; at most 19 fit in a connection ID", server_id_len + nonce_len)]
    TooLong {
        server_id_len: usize,
        nonce_len: usize,
    },
    #[error("server ID has {got} octets, the configuration says {expected}")]
    ServerIdMismatch { expected: usize, got: usize },
    #[error("server ID `{0}` is not 1..=15 octets of hex")]
    ServerIdHex(String),
}

/// Why a connection ID does not route under a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer octets than this configuration's connection IDs have.
    #[error("connection ID incomplete: {needed} octets needed, {got} given")]
    Incomplete { needed: usize, got: usize },
    /// Config rotation 0b111: the issuer had no routable configuration.
    #[error("unroutable connection ID (config rotation 0b111)")]
    Unroutable,
    /// Another configuration's codepoint.
    #[error("connection ID of config rotation {0}, not this configuration's")]
    OtherConfig(u8),
    /// The self-encoded length is too short to hold this configuration's server ID and nonce.
    #[error(
        "self-encoded length {encoded} is shorter than the {needed} octets of server ID and nonce"
    )]
    Malformed { encoded: usize, needed: usize },
}

/// A server ID: 1..=15 octets, written in hex in configuration files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId {
    len: u8,
    octets: [u8; MAX_SERVER_ID_LEN],
}

impl ServerId {
    pub fn new(octets: &[u8]) -> Result<Self, ConfigError> {
        if octets.is_empty() || octets.len() > MAX_SERVER_ID_LEN {
            return Err(ConfigError::ServerIdLen(octets.len()));
        }
        let mut id = ServerId {
            len: octets.len() as u8,
            octets: [0; MAX_SERVER_ID_LEN],
        };
        id.octets[..octets.len()].copy_from_slice(octets);
        Ok(id)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.octets[..usize::from(self.len)]
    }

    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerId({self})")
    }
}

impl FromStr for ServerId {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let octets = hex::decode(s.trim()).map_err(|_| ConfigError::ServerIdHex(s.to_owned()))?;
        ServerId::new(&octets).map_err(|_| ConfigError::ServerIdHex(s.to_owned()))
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ServerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ServerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which algorithm a configuration uses (draft §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// No key: the server ID is readable by anyone on the path.
    Plaintext,
    /// Key and server ID + nonce = 16 octets: one AES-128-ECB block.
    SinglePass,
    /// Key and any other length: the four-pass Feistel network.
    FourPass,
}

/// One QUIC-LB configuration, shared by the load balancers and every server of a pool.
#[derive(Clone)]
pub struct LbConfig {
    config_rotation: u8,
    server_id_len: usize,
    nonce_len: usize,
    length_self_encoding: bool,
    aes: Option<Aes128>,
}

impl fmt::Debug for LbConfig {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LbConfig")
            .field("config_rotation", &self.config_rotation)
            .field("server_id_len", &self.server_id_len)
            .field("nonce_len", &self.nonce_len)
            .field("length_self_encoding", &self.length_self_encoding)
            .field("algorithm", &self.algorithm())
            .finish()
    }
}

impl LbConfig {
    /// A configuration with length self-encoding on (the draft's test vectors all use it). A
    /// `key` selects encryption; without one the server ID travels in the clear.
    pub fn new(
        config_rotation: u8,
        server_id_len: usize,
        nonce_len: usize,
        key: Option<[u8; 16]>,
    ) -> Result<Self, ConfigError> {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.1
        //# A configuration MUST NOT use the
        //# reserved identifier 0b111 (see {{config-failover}} below).
        if config_rotation >= UNROUTABLE {
            return Err(ConfigError::ConfigRotation(config_rotation));
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
        //# The nonce length MUST be at least 4 octets. The server ID length MUST be at
        //# least 1 octet.
        if server_id_len == 0 || server_id_len > MAX_SERVER_ID_LEN {
            return Err(ConfigError::ServerIdLen(server_id_len));
        }
        if nonce_len < MIN_NONCE_LEN {
            return Err(ConfigError::NonceLen(nonce_len));
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.3
        //# As QUIC version 1 limits connection IDs to 20 octets, the server ID and nonce
        //# lengths MUST sum to 19 octets or less.
        if server_id_len + nonce_len > MAX_BLOCK_LEN {
            return Err(ConfigError::TooLong {
                server_id_len,
                nonce_len,
            });
        }
        Ok(LbConfig {
            config_rotation,
            server_id_len,
            nonce_len,
            length_self_encoding: true,
            aes: key.as_ref().map(cipher::cipher),
        })
    }

    /// Whether the low 5 bits of the first octet carry the length of the rest of the CID (draft
    /// §3.3) or random bits. Load balancers ignore them either way; on by default.
    pub fn with_length_self_encoding(mut self, on: bool) -> Self {
        self.length_self_encoding = on;
        self
    }

    pub fn config_rotation(&self) -> u8 {
        self.config_rotation
    }

    pub fn server_id_len(&self) -> usize {
        self.server_id_len
    }

    pub fn nonce_len(&self) -> usize {
        self.nonce_len
    }

    pub fn length_self_encoding(&self) -> bool {
        self.length_self_encoding
    }

    pub fn algorithm(&self) -> Algorithm {
        match (&self.aes, self.block_len()) {
            (None, _) => Algorithm::Plaintext,
            (Some(_), cipher::BLOCK_LEN) => Algorithm::SinglePass,
            (Some(_), _) => Algorithm::FourPass,
        }
    }

    /// Octets of server ID ‖ nonce (the "plaintext_len" of the draft).
    pub fn block_len(&self) -> usize {
        self.server_id_len + self.nonce_len
    }

    /// Length of every connection ID of this configuration, first octet included.
    pub fn cid_len(&self) -> usize {
        1 + self.block_len()
    }

    /// The server ID a connection ID routes to. Extra octets after this configuration's length
    /// are ignored (a short header does not say where its DCID ends).
    pub fn decode_server_id(&self, cid: &[u8]) -> Result<ServerId, DecodeError> {
        let mut block = self.routable_block(cid)?;
        let block = &mut block[..self.block_len()];
        if let Some(aes) = &self.aes {
            cipher::decrypt(aes, block, self.server_id_len);
        }
        Ok(ServerId::new(&block[..self.server_id_len]).expect("validated length"))
    }

    /// Server ID and nonce of a connection ID (all four Feistel passes).
    pub fn decode(&self, cid: &[u8]) -> Result<DecodedCid, DecodeError> {
        let mut block = self.routable_block(cid)?;
        let len = self.block_len();
        if let Some(aes) = &self.aes {
            cipher::decrypt(aes, &mut block[..len], len);
        }
        let mut nonce = [0; MAX_BLOCK_LEN];
        nonce[..self.nonce_len].copy_from_slice(&block[self.server_id_len..len]);
        Ok(DecodedCid {
            server_id: ServerId::new(&block[..self.server_id_len]).expect("validated length"),
            nonce,
            nonce_len: self.nonce_len,
        })
    }

    /// Checks the first octet and copies out the (still encrypted) block.
    fn routable_block(&self, cid: &[u8]) -> Result<[u8; MAX_BLOCK_LEN], DecodeError> {
        let Some(&first) = cid.first() else {
            return Err(DecodeError::Incomplete {
                needed: self.cid_len(),
                got: 0,
            });
        };
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
        //# Note: a packet with a DCID with config ID codepoint 0b111 (see
        //# {{config-failover}}) is always unroutable.
        match config_rotation_of(first) {
            None => return Err(DecodeError::Unroutable),
            Some(cr) if cr != self.config_rotation => return Err(DecodeError::OtherConfig(cr)),
            Some(_) => {}
        }
        if cid.len() < self.cid_len() {
            return Err(DecodeError::Incomplete {
                needed: self.cid_len(),
                got: cid.len(),
            });
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-4.1
        //# * Verify that the self-encoded length is large enough for the decoder to process
        //# using the indicated config ID.
        let encoded = usize::from(first & 0x1f);
        if self.length_self_encoding && encoded < self.block_len() {
            return Err(DecodeError::Malformed {
                encoded,
                needed: self.block_len(),
            });
        }
        let mut block = [0; MAX_BLOCK_LEN];
        block[..self.block_len()].copy_from_slice(&cid[1..self.cid_len()]);
        Ok(block)
    }

    fn first_octet(&self, random_bits: u8) -> u8 {
        let low = if self.length_self_encoding {
            self.block_len() as u8
        } else {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.3
            //# A server not using this functionality SHOULD choose the five bits so as to have
            //# no observable relationship to previous connection IDs issued for that
            //# connection.
            random_bits & 0x1f
        };
        (self.config_rotation << 5) | low
    }
}

/// The config rotation codepoint of a connection ID's first octet; `None` for unroutable (0b111).
pub fn config_rotation_of(first_octet: u8) -> Option<u8> {
    match first_octet >> 5 {
        UNROUTABLE => None,
        cr => Some(cr),
    }
}

/// An unroutable connection ID of `len` octets (clamped to 1..=20): codepoint 0b111, the length
/// self-encoded, the rest random. For a server that has no usable configuration.
pub fn unroutable_cid(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let len = len.clamp(1, MAX_CID_LEN);
    let mut cid = vec![0; len];
    rng.fill_bytes(&mut cid[1..]);
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-3.2
    //# Servers with no active configuration MUST issue connection IDs with the reserved
    //# value of the three most significant bits set to 0b111 to signify the connection
    //# ID is unroutable. These connection IDs MUST self-encode their length (see
    //# {{length-self-description}}).
    cid[0] = (UNROUTABLE << 5) | (len - 1) as u8;
    cid
}

/// Server ID and nonce recovered from a connection ID.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DecodedCid {
    pub server_id: ServerId,
    nonce: [u8; MAX_BLOCK_LEN],
    nonce_len: usize,
}

impl DecodedCid {
    pub fn nonce(&self) -> &[u8] {
        &self.nonce[..self.nonce_len]
    }
}

/// Issues one server's connection IDs under one configuration.
///
/// Keep one encoder per server for the configuration's lifetime: with a key, nonces are a counter
/// from a random start so no nonce repeats until the space is used up (draft §9.6), after which
/// [`generate`](Self::generate) falls back to unroutable CIDs.
#[derive(Clone, Debug)]
pub struct CidEncoder {
    config: LbConfig,
    server_id: ServerId,
    /// Encrypted mode: the next nonce and the one the counter started at.
    counter: Option<NonceCounter>,
    exhausted: bool,
}

#[derive(Clone, Debug)]
struct NonceCounter {
    next: [u8; MAX_BLOCK_LEN],
    start: [u8; MAX_BLOCK_LEN],
}

impl CidEncoder {
    pub fn new(config: &LbConfig, server_id: &[u8]) -> Result<Self, ConfigError> {
        if server_id.len() != config.server_id_len {
            return Err(ConfigError::ServerIdMismatch {
                expected: config.server_id_len,
                got: server_id.len(),
            });
        }
        Ok(CidEncoder {
            config: config.clone(),
            server_id: ServerId::new(server_id)?,
            counter: None,
            exhausted: false,
        })
    }

    pub fn config(&self) -> &LbConfig {
        &self.config
    }

    pub fn server_id(&self) -> ServerId {
        self.server_id
    }

    /// Length of the connection IDs this encoder issues.
    pub fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    /// Whether the nonce space is used up and [`generate`](Self::generate) now issues unroutable
    /// CIDs (a new configuration is due).
    pub fn nonces_exhausted(&self) -> bool {
        self.exhausted
    }

    /// The connection ID for `nonce`; the caller guarantees nonces are never reused. With length
    /// self-encoding off, the first octet's low bits come from the thread-local CSPRNG.
    ///
    /// # Panics
    /// If `nonce` is not the configured nonce length.
    pub fn encode(&self, nonce: &[u8]) -> Vec<u8> {
        self.encode_with(nonce, rand::random())
    }

    fn encode_with(&self, nonce: &[u8], random_bits: u8) -> Vec<u8> {
        assert_eq!(
            nonce.len(),
            self.config.nonce_len,
            "nonce length must match the configuration"
        );
        let sid_len = self.config.server_id_len;
        let mut cid = vec![0; self.cid_len()];
        cid[0] = self.config.first_octet(random_bits);
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
        //# The server writes the first octet and its server ID into their respective
        //# fields.
        cid[1..1 + sid_len].copy_from_slice(self.server_id.as_bytes());
        cid[1 + sid_len..].copy_from_slice(nonce);
        if let Some(aes) = &self.config.aes {
            cipher::encrypt(aes, &mut cid[1..]);
        }
        cid
    }

    /// A fresh connection ID with a nonce drawn from `rng` (plaintext) or the next counter value
    /// (encrypted).
    pub fn generate(&mut self, rng: &mut impl RngCore) -> Vec<u8> {
        let nonce_len = self.config.nonce_len;
        let random_bits = (rng.next_u32() & 0x1f) as u8;
        if self.config.aes.is_none() {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4
            //# If there is no key in the configuration, the server MUST fill the Nonce field
            //# with bytes that have no observable relationship to the field in previously
            //# issued connection IDs.
            let mut nonce = [0; MAX_BLOCK_LEN];
            rng.fill_bytes(&mut nonce[..nonce_len]);
            return self.encode_with(&nonce[..nonce_len], random_bits);
        }
        if self.exhausted {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-9.6
            //# A server that has exhausted its
            //# nonces MUST either switch to a different configuration, or if none exists, use
            //# the 4-tuple routing config rotation codepoint.
            return unroutable_cid(rng, self.cid_len());
        }
        let counter = self.counter.get_or_insert_with(|| {
            //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-9.6
            //# To maximize entropy, servers SHOULD
            //# start with a random nonce value, in which case the configuration is usable until
            //# the nonce value wraps around to zero and then reaches the initial value again.
            let mut start = [0; MAX_BLOCK_LEN];
            rng.fill_bytes(&mut start[..nonce_len]);
            NonceCounter { next: start, start }
        });
        let nonce = counter.next;
        // Big-endian increment with wrap-around.
        for octet in counter.next[..nonce_len].iter_mut().rev() {
            *octet = octet.wrapping_add(1);
            if *octet != 0 {
                break;
            }
        }
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-9.6
        //# Whether or not it implements the counter method, the server MUST NOT reuse a
        //# nonce until it switches to a configuration with new keys.
        self.exhausted = counter.next == counter.start;
        self.encode_with(&nonce[..nonce_len], random_bits)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::OsRng;

    use super::*;

    #[test]
    fn configurations_outside_the_draft_limits_are_refused() {
        assert_eq!(
            LbConfig::new(7, 3, 4, None).unwrap_err(),
            ConfigError::ConfigRotation(7)
        );
        assert_eq!(
            LbConfig::new(0, 0, 4, None).unwrap_err(),
            ConfigError::ServerIdLen(0)
        );
        assert_eq!(
            LbConfig::new(0, 3, 3, None).unwrap_err(),
            ConfigError::NonceLen(3)
        );
        assert!(matches!(
            LbConfig::new(0, 10, 10, None).unwrap_err(),
            ConfigError::TooLong { .. }
        ));
        let config = LbConfig::new(6, 15, 4, Some([7; 16])).unwrap();
        assert_eq!(config.cid_len(), MAX_CID_LEN);
        assert_eq!(
            CidEncoder::new(&config, &[1; 3]).unwrap_err(),
            ConfigError::ServerIdMismatch {
                expected: 15,
                got: 3
            }
        );
        assert!(
            !format!("{config:?}").contains("7, 7"),
            "key must not be logged"
        );
    }

    #[test]
    fn server_ids_parse_from_hex() {
        let id: ServerId = "0a1B".parse().unwrap();
        assert_eq!(id.as_bytes(), &[0x0a, 0x1b]);
        assert_eq!(id.to_string(), "0a1b");
        assert!("".parse::<ServerId>().is_err());
        assert!("0g".parse::<ServerId>().is_err());
        assert!("00".repeat(16).parse::<ServerId>().is_err());
    }

    #[test]
    fn generated_cids_are_unique_and_route_to_the_server_in_every_algorithm() {
        for (sid_len, nonce_len, key) in [
            (2, 6, None),
            (2, 14, Some([3; 16])),
            (3, 5, Some([4; 16])),
            (11, 4, Some([5; 16])),
        ] {
            let config = LbConfig::new(1, sid_len, nonce_len, key).unwrap();
            let sid: Vec<u8> = (1..=sid_len as u8).collect();
            let mut encoder = CidEncoder::new(&config, &sid).unwrap();
            let mut seen = HashSet::new();
            for _ in 0..5_000 {
                let cid = encoder.generate(&mut OsRng);
                assert_eq!(cid.len(), config.cid_len());
                assert_eq!(cid[0], 0x20 | (sid_len + nonce_len) as u8);
                assert_eq!(config.decode_server_id(&cid).unwrap().as_bytes(), sid);
                assert!(seen.insert(cid), "{config:?} repeated a CID");
            }
        }
    }

    #[test]
    fn without_self_encoding_the_length_bits_are_random() {
        let config = LbConfig::new(5, 1, 4, None)
            .unwrap()
            .with_length_self_encoding(false);
        let mut encoder = CidEncoder::new(&config, &[9]).unwrap();
        let low_bits: HashSet<u8> = (0..500)
            .map(|_| encoder.generate(&mut OsRng)[0])
            .inspect(|first| assert_eq!(first >> 5, 5))
            .map(|first| first & 0x1f)
            .collect();
        assert!(low_bits.len() > 16, "only {low_bits:?}");
    }

    #[test]
    fn an_exhausted_nonce_counter_falls_back_to_unroutable_cids() {
        let config = LbConfig::new(0, 1, 4, Some([1; 16])).unwrap();
        let mut encoder = CidEncoder::new(&config, &[9]).unwrap();
        encoder.generate(&mut OsRng);
        // Put the counter one step before its start value: the next CID uses the last nonce.
        let counter = encoder.counter.as_mut().unwrap();
        counter.start[..4].copy_from_slice(&[0; 4]);
        counter.next[..4].copy_from_slice(&[0xff; 4]);
        let last = encoder.generate(&mut OsRng);
        assert_eq!(config.decode(&last).unwrap().nonce(), &[0xff; 4]);
        assert!(encoder.nonces_exhausted());
        let cid = encoder.generate(&mut OsRng);
        assert_eq!(cid.len(), config.cid_len());
        assert_eq!(cid[0], 0xe0 | (config.cid_len() - 1) as u8);
        assert_eq!(config.decode_server_id(&cid), Err(DecodeError::Unroutable));
    }
}
