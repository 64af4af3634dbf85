//! quinn's connection ID generator backed by the QUIC-LB encoder: with `[quic_lb]` configured,
//! every connection ID this relay issues (the handshake's Source CID and every NEW_CONNECTION_ID)
//! carries its server ID, so a load balancer keeps the connection on this instance.
use cfr_quic_lb::CidEncoder;
use quinn::{ConnectionId, ConnectionIdGenerator};
use rand::rngs::OsRng;

/// One endpoint's generator; quinn builds one per endpoint from the factory.
#[derive(Debug)]
pub struct LbCidGenerator {
    encoder: CidEncoder,
}

impl From<CidEncoder> for LbCidGenerator {
    fn from(encoder: CidEncoder) -> Self {
        LbCidGenerator { encoder }
    }
}

impl ConnectionIdGenerator for LbCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        ConnectionId::new(&self.encoder.generate(&mut OsRng))
    }

    /// Only CIDs that route to this instance can be ours: a packet for any other (a forged CID,
    /// another instance's, a stray) gets no stateless reset from here.
    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        match self.encoder.config().decode_server_id(cid) {
            Ok(id) if id == self.encoder.server_id() => Ok(()),
            _ => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.encoder.cid_len()
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The endpoint configuration: QUIC-LB connection IDs from `encoder` when given, quinn's
/// defaults otherwise.
pub fn endpoint_config(encoder: Option<CidEncoder>) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    if let Some(encoder) = encoder {
        // Each endpoint gets a fresh copy: its nonce counter starts at its own random value.
        config.cid_generator(move || Box::new(LbCidGenerator::from(encoder.clone())));
    }
    config
}

#[cfg(test)]
mod tests {
    use cfr_quic_lb::{LbConfig, ServerId};

    use super::*;

    #[test]
    fn generated_cids_validate_and_other_server_ids_do_not() {
        let config = LbConfig::new(1, 2, 6, Some([9; 16])).unwrap();
        let mine: ServerId = "0a0b".parse().unwrap();
        let mut generator = LbCidGenerator::from(CidEncoder::new(&config, &[10, 11]).unwrap());
        let theirs = LbCidGenerator::from(CidEncoder::new(&config, &[10, 12]).unwrap());
        for _ in 0..100 {
            let cid = generator.generate_cid();
            assert_eq!(cid.len(), generator.cid_len());
            assert_eq!(config.decode_server_id(&cid).unwrap(), mine);
            assert!(generator.validate(&cid).is_ok());
            assert!(theirs.validate(&cid).is_err());
        }
        assert!(generator.validate(&ConnectionId::new(&[0xff; 9])).is_err());
    }
}
