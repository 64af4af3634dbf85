//! The Destination Connection ID of a UDP datagram, read the way a load balancer reads it: from
//! the version-independent header fields of its first QUIC packet (RFC 8999).
/// Where a datagram's first packet keeps its Destination Connection ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketDcid<'a> {
    /// The packet's first octet.
    pub first_octet: u8,
    /// The version field of a long header; `None` for a short header.
    pub version: Option<u32>,
    pub dcid: &'a [u8],
}

/// QUIC version 1 (RFC 9000).
const VERSION_1: u32 = 1;
/// QUIC version 2 (RFC 9369).
const VERSION_2: u32 = 0x6b33_43cf;

impl PacketDcid<'_> {
    pub fn is_long_header(&self) -> bool {
        self.version.is_some()
    }

    /// Whether this is an Initial packet of QUIC version 1 or 2 (whose long-header type codes
    /// differ: 0b00 in v1, 0b01 in v2).
    pub fn is_initial(&self) -> bool {
        let packet_type = (self.first_octet >> 4) & 0b11;
        match self.version {
            Some(VERSION_1) => packet_type == 0b00,
            Some(VERSION_2) => packet_type == 0b01,
            _ => false,
        }
    }
}

/// A datagram the DCID cannot be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("datagram ends inside the QUIC header ({needed} octets needed, {got} given)")]
    Incomplete { needed: usize, got: usize },
    #[error("QUIC version {version:#x} long header with a {len}-octet connection ID (at most 20)")]
    Malformed { version: u32, len: usize },
}

/// The DCID of the first packet in `datagram`. Short headers do not carry the DCID length: it is
/// `short_header_cid_len`, the length every CID of the receiving server pool has.
pub fn datagram_dcid(
    datagram: &[u8],
    short_header_cid_len: usize,
) -> Result<PacketDcid<'_>, PacketError> {
    let incomplete = |needed| PacketError::Incomplete {
        needed,
        got: datagram.len(),
    };
    let &first_octet = datagram.first().ok_or(incomplete(1))?;
    //= https://www.rfc-editor.org/rfc/rfc8999#section-5.1
    //# A QUIC packet with a long header has the high bit of the first byte set to 1.
    if first_octet & 0x80 == 0 {
        let end = 1 + short_header_cid_len;
        let dcid = datagram.get(1..end).ok_or(incomplete(end))?;
        return Ok(PacketDcid {
            first_octet,
            version: None,
            dcid,
        });
    }
    let version = datagram.get(1..5).ok_or(incomplete(6))?;
    let version = u32::from_be_bytes(version.try_into().expect("four octets"));
    let len = usize::from(*datagram.get(5).ok_or(incomplete(6))?);
    //= https://www.rfc-editor.org/rfc/rfc9000#section-17.2
    //# Endpoints that receive a version 1 long header
    //# with a value larger than 20 MUST drop the packet.
    if matches!(version, VERSION_1 | VERSION_2) && len > crate::MAX_CID_LEN {
        return Err(PacketError::Malformed { version, len });
    }
    let dcid = datagram.get(6..6 + len).ok_or(incomplete(6 + len))?;
    Ok(PacketDcid {
        first_octet,
        version: Some(version),
        dcid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_header_dcid_has_the_configured_length() {
        let d = datagram_dcid(&[0x40, 1, 2, 3, 4, 5, 6], 4).unwrap();
        assert_eq!(d.dcid, &[1, 2, 3, 4]);
        assert!(!d.is_long_header() && !d.is_initial());
        assert_eq!(
            datagram_dcid(&[0x40, 1, 2], 4),
            Err(PacketError::Incomplete { needed: 5, got: 3 })
        );
    }

    #[test]
    fn long_header_dcid_carries_its_length() {
        let initial_v1 = [0xc3, 0, 0, 0, 1, 3, 0xaa, 0xbb, 0xcc, 0];
        let d = datagram_dcid(&initial_v1, 8).unwrap();
        assert_eq!(d.dcid, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(d.version, Some(1));
        assert!(d.is_initial());
        let handshake_v1 = [0xe3, 0, 0, 0, 1, 0];
        assert!(!datagram_dcid(&handshake_v1, 8).unwrap().is_initial());
        assert_eq!(
            datagram_dcid(&[0xc3, 0, 0, 0, 1, 21], 8),
            Err(PacketError::Malformed {
                version: 1,
                len: 21
            })
        );
        // Unknown versions may use longer CIDs (RFC 8999 §5.1).
        assert_eq!(
            datagram_dcid(&[0xc3, 0, 0, 0, 9, 21], 8),
            Err(PacketError::Incomplete { needed: 27, got: 6 })
        );
        assert_eq!(
            datagram_dcid(&[], 8),
            Err(PacketError::Incomplete { needed: 1, got: 0 })
        );
    }
}
