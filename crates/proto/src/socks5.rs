//! SOCKS5 wire codec (RFC 1928) with username/password authentication (RFC 1929). Sans-IO.
//!
//! Every parser takes the bytes received so far and returns `(value, bytes consumed)`,
//! [`DecodeError::Incomplete`] when more bytes are needed, or [`DecodeError::Malformed`] when the
//! bytes can never be valid. Parsing is strict enough that a parsed value re-encodes to exactly
//! the bytes it was parsed from (checked by [`fuzz_socks5`]).
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{DecodeError, Host, Target};

/// SOCKS protocol version byte.
pub const VERSION: u8 = 5;
/// RFC 1929 §2: version of the username/password sub-negotiation.
pub const USER_PASS_VERSION: u8 = 1;

/// Authentication methods (RFC 1928 §3).
pub mod method {
    pub const NO_AUTH: u8 = 0x00;
    pub const GSSAPI: u8 = 0x01;
    pub const USER_PASS: u8 = 0x02;
    pub const NO_ACCEPTABLE: u8 = 0xff;
}

/// Address types (RFC 1928 §5).
pub mod atyp {
    pub const IPV4: u8 = 0x01;
    pub const DOMAIN: u8 = 0x03;
    pub const IPV6: u8 = 0x04;
}

/// The `Malformed` reason for an unknown ATYP: the server answers it with
/// [`Reply::AddressTypeNotSupported`].
pub const ERR_ADDRESS_TYPE: &str = "SOCKS5 address type not supported";

fn malformed(why: &'static str) -> DecodeError {
    DecodeError::Malformed(why)
}

fn need(buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::Incomplete)
    } else {
        Ok(())
    }
}

/// Client greeting: `VER NMETHODS METHODS...` (RFC 1928 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub methods: Vec<u8>,
}

impl Greeting {
    pub fn offers(&self, m: u8) -> bool {
        self.methods.contains(&m)
    }
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(self.methods.len() as u8);
        out.extend_from_slice(&self.methods);
    }
}

pub fn parse_greeting(buf: &[u8]) -> Result<(Greeting, usize), DecodeError> {
    need(buf, 2)?;
    if buf[0] != VERSION {
        return Err(malformed("not SOCKS version 5"));
    }
    let n = buf[1] as usize;
    need(buf, 2 + n)?;
    Ok((
        Greeting {
            methods: buf[2..2 + n].to_vec(),
        },
        2 + n,
    ))
}

/// Server's method selection: `VER METHOD`.
pub fn encode_method_selection(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// RFC 1929 §2 request: `VER=1 ULEN UNAME PLEN PASSWD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPass {
    pub username: Vec<u8>,
    pub password: Vec<u8>,
}

impl UserPass {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(USER_PASS_VERSION);
        out.push(self.username.len() as u8);
        out.extend_from_slice(&self.username);
        out.push(self.password.len() as u8);
        out.extend_from_slice(&self.password);
    }
}

/// Parses the RFC 1929 request. Empty names or passwords are accepted (RFC 1929 says 1..255, but
/// clients send empty passwords; the credential check rejects them anyway).
pub fn parse_user_pass(buf: &[u8]) -> Result<(UserPass, usize), DecodeError> {
    need(buf, 2)?;
    if buf[0] != USER_PASS_VERSION {
        return Err(malformed("not username/password sub-negotiation version 1"));
    }
    let ulen = buf[1] as usize;
    need(buf, 2 + ulen + 1)?;
    let plen = buf[2 + ulen] as usize;
    let end = 3 + ulen + plen;
    need(buf, end)?;
    Ok((
        UserPass {
            username: buf[2..2 + ulen].to_vec(),
            password: buf[3 + ulen..end].to_vec(),
        },
        end,
    ))
}

/// RFC 1929 §2 response: `VER STATUS`, STATUS 0 = success.
pub fn encode_user_pass_status(success: bool) -> [u8; 2] {
    [USER_PASS_VERSION, if success { 0 } else { 1 }]
}

/// A SOCKS5 address (RFC 1928 §5) with its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    V4(Ipv4Addr, u16),
    /// Domain name bytes as sent (1..=255 bytes, not necessarily valid UTF-8).
    Domain(Vec<u8>, u16),
    V6(Ipv6Addr, u16),
}

impl Address {
    pub fn port(&self) -> u16 {
        match self {
            Address::V4(_, p) | Address::Domain(_, p) | Address::V6(_, p) => *p,
        }
    }

    /// Appends `ATYP ADDR PORT`. A domain longer than 255 bytes is an encoder misuse and panics.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Address::V4(ip, _) => {
                out.push(atyp::IPV4);
                out.extend_from_slice(&ip.octets());
            }
            Address::Domain(name, _) => {
                assert!(
                    !name.is_empty() && name.len() <= 255,
                    "SOCKS5 domain must be 1..=255 bytes"
                );
                out.push(atyp::DOMAIN);
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
            Address::V6(ip, _) => {
                out.push(atyp::IPV6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }

    /// Parses `ATYP ADDR PORT`.
    pub fn parse(buf: &[u8]) -> Result<(Address, usize), DecodeError> {
        need(buf, 1)?;
        let (addr_len, start) = match buf[0] {
            atyp::IPV4 => (4, 1),
            atyp::IPV6 => (16, 1),
            atyp::DOMAIN => {
                need(buf, 2)?;
                let len = buf[1] as usize;
                if len == 0 {
                    return Err(malformed("empty SOCKS5 domain name"));
                }
                (len, 2)
            }
            _ => return Err(malformed(ERR_ADDRESS_TYPE)),
        };
        let end = start + addr_len + 2;
        need(buf, end)?;
        let a = &buf[start..start + addr_len];
        let port = u16::from_be_bytes([buf[end - 2], buf[end - 1]]);
        let addr = match buf[0] {
            atyp::IPV4 => Address::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]), port),
            atyp::IPV6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(a);
                Address::V6(Ipv6Addr::from(o), port)
            }
            _ => Address::Domain(a.to_vec(), port),
        };
        Ok((addr, end))
    }

    /// The tunnel target. Domain names go to the relay unresolved (socks5h semantics); `None` if
    /// the name is not a plausible DNS name (non-ASCII, spaces, …) or the port is 0.
    pub fn to_target(&self) -> Option<Target> {
        let port = self.port();
        if port == 0 {
            return None;
        }
        let host = match self {
            Address::V4(ip, _) => Host::Ip((*ip).into()),
            Address::V6(ip, _) => Host::Ip((*ip).into()),
            Address::Domain(name, _) => {
                let name = std::str::from_utf8(name).ok()?;
                let name = name.strip_suffix('.').unwrap_or(name);
                let ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
                if !ok {
                    return None;
                }
                // A dotted-quad "name" is an IPv4 literal.
                match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => Host::Ip(ip),
                    Err(_) => Host::Name(name.to_ascii_lowercase()),
                }
            }
        };
        Some(Target { host, port })
    }

    /// The SOCKS5 address of a tunnel target.
    pub fn from_target(t: &Target) -> Address {
        match &t.host {
            Host::Ip(std::net::IpAddr::V4(ip)) => Address::V4(*ip, t.port),
            Host::Ip(std::net::IpAddr::V6(ip)) => Address::V6(*ip, t.port),
            Host::Name(n) => {
                let mut b = n.as_bytes().to_vec();
                b.truncate(255);
                Address::Domain(b, t.port)
            }
        }
    }

    /// Encoded length of `ATYP ADDR PORT`.
    pub fn encoded_len(&self) -> usize {
        match self {
            Address::V4(..) => 7,
            Address::V6(..) => 19,
            Address::Domain(n, _) => 4 + n.len(),
        }
    }
}

impl From<std::net::SocketAddr> for Address {
    fn from(a: std::net::SocketAddr) -> Self {
        match a {
            std::net::SocketAddr::V4(a) => Address::V4(*a.ip(), a.port()),
            std::net::SocketAddr::V6(a) => Address::V6(*a.ip(), a.port()),
        }
    }
}

/// Request command (RFC 1928 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
    /// Any other value: answered with [`Reply::CommandNotSupported`].
    Other(u8),
}

impl Command {
    pub fn to_byte(self) -> u8 {
        match self {
            Command::Connect => 1,
            Command::Bind => 2,
            Command::UdpAssociate => 3,
            Command::Other(b) => b,
        }
    }
    pub fn from_byte(b: u8) -> Self {
        match b {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            b => Command::Other(b),
        }
    }
}

/// `VER CMD RSV ATYP DST.ADDR DST.PORT` (RFC 1928 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub address: Address,
}

impl Request {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[VERSION, self.command.to_byte(), 0]);
        self.address.encode(out);
    }
}

pub fn parse_request(buf: &[u8]) -> Result<(Request, usize), DecodeError> {
    need(buf, 3)?;
    if buf[0] != VERSION {
        return Err(malformed("not SOCKS version 5"));
    }
    // RFC 1928 §4: RSV is X'00'.
    if buf[2] != 0 {
        return Err(malformed("SOCKS5 request reserved byte is not zero"));
    }
    let (address, n) = Address::parse(&buf[3..])?;
    Ok((
        Request {
            command: Command::from_byte(buf[1]),
            address,
        },
        3 + n,
    ))
}

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Succeeded,
    GeneralFailure,
    NotAllowed,
    NetworkUnreachable,
    HostUnreachable,
    ConnectionRefused,
    TtlExpired,
    CommandNotSupported,
    AddressTypeNotSupported,
    /// Unassigned value (seen only when parsing).
    Other(u8),
}

impl Reply {
    pub fn to_byte(self) -> u8 {
        match self {
            Reply::Succeeded => 0,
            Reply::GeneralFailure => 1,
            Reply::NotAllowed => 2,
            Reply::NetworkUnreachable => 3,
            Reply::HostUnreachable => 4,
            Reply::ConnectionRefused => 5,
            Reply::TtlExpired => 6,
            Reply::CommandNotSupported => 7,
            Reply::AddressTypeNotSupported => 8,
            Reply::Other(b) => b,
        }
    }
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Reply::Succeeded,
            1 => Reply::GeneralFailure,
            2 => Reply::NotAllowed,
            3 => Reply::NetworkUnreachable,
            4 => Reply::HostUnreachable,
            5 => Reply::ConnectionRefused,
            6 => Reply::TtlExpired,
            7 => Reply::CommandNotSupported,
            8 => Reply::AddressTypeNotSupported,
            b => Reply::Other(b),
        }
    }
}

/// `VER REP RSV ATYP BND.ADDR BND.PORT` (RFC 1928 §6).
pub fn encode_reply(reply: Reply, bound: &Address, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, reply.to_byte(), 0]);
    bound.encode(out);
}

/// A reply with the all-zero IPv4 bound address (for failures and when the address is moot).
pub fn reply_bytes(reply: Reply) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    encode_reply(reply, &Address::V4(Ipv4Addr::UNSPECIFIED, 0), &mut out);
    out
}

/// Parses a server reply (client side, tests).
pub fn parse_reply(buf: &[u8]) -> Result<((Reply, Address), usize), DecodeError> {
    need(buf, 3)?;
    if buf[0] != VERSION {
        return Err(malformed("not SOCKS version 5"));
    }
    if buf[2] != 0 {
        return Err(malformed("SOCKS5 reply reserved byte is not zero"));
    }
    let (address, n) = Address::parse(&buf[3..])?;
    Ok(((Reply::from_byte(buf[1]), address), 3 + n))
}

/// UDP relay header: `RSV(2) FRAG ATYP DST.ADDR DST.PORT`, followed by DATA (RFC 1928 §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    pub frag: u8,
    pub address: Address,
}

impl UdpHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0, self.frag]);
        self.address.encode(out);
    }
}

/// Parses the UDP header; the payload is `buf[consumed..]`. A UDP datagram arrives whole, so
/// the caller treats `Incomplete` as a truncated datagram and drops it.
pub fn parse_udp_header(buf: &[u8]) -> Result<(UdpHeader, usize), DecodeError> {
    need(buf, 3)?;
    if buf[0] != 0 || buf[1] != 0 {
        return Err(malformed("SOCKS5 UDP reserved bytes are not zero"));
    }
    let (address, n) = Address::parse(&buf[3..])?;
    Ok((
        UdpHeader {
            frag: buf[2],
            address,
        },
        3 + n,
    ))
}

/// Fuzz property: no parser panics on any input, and whatever parses re-encodes to the exact
/// bytes it consumed.
pub fn fuzz_socks5(data: &[u8]) {
    fn check<T>(
        data: &[u8],
        parse: impl Fn(&[u8]) -> Result<(T, usize), DecodeError>,
        encode: impl Fn(&T, &mut Vec<u8>),
    ) {
        match parse(data) {
            Ok((v, n)) => {
                assert!(n <= data.len(), "consumed more than given");
                let mut out = Vec::new();
                encode(&v, &mut out);
                assert_eq!(&out[..], &data[..n], "re-encoding differs");
                // Every strict prefix is incomplete.
                if n > 0 {
                    assert_eq!(parse(&data[..n - 1]).err(), Some(DecodeError::Incomplete));
                }
            }
            Err(DecodeError::Incomplete) | Err(DecodeError::Malformed(_)) => {}
        }
    }
    check(data, parse_greeting, |g, o| g.encode(o));
    check(data, parse_user_pass, |u, o| u.encode(o));
    check(data, parse_request, |r, o| r.encode(o));
    check(data, parse_udp_header, |h, o| h.encode(o));
    check(data, parse_reply, |(r, a), o| encode_reply(*r, a, o));
    check(data, Address::parse, |a, o| a.encode(o));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socks5_greeting_parses_methods_and_waits_for_more() {
        assert_eq!(
            parse_greeting(&[5, 2, 0, 2, 0xaa]),
            Ok((
                Greeting {
                    methods: vec![0, 2]
                },
                4
            ))
        );
        assert_eq!(parse_greeting(&[5]), Err(DecodeError::Incomplete));
        assert_eq!(parse_greeting(&[5, 2, 0]), Err(DecodeError::Incomplete));
        assert!(matches!(
            parse_greeting(&[4, 1, 0]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn socks5_user_pass_rfc1929() {
        let bytes = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        let (up, n) = parse_user_pass(&bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(up.username, b"bob");
        assert_eq!(up.password, b"pw");
        for cut in 0..bytes.len() {
            assert_eq!(parse_user_pass(&bytes[..cut]), Err(DecodeError::Incomplete));
        }
        assert!(matches!(
            parse_user_pass(&[5, 1, b'a', 0]),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(encode_user_pass_status(true), [1, 0]);
        assert_eq!(encode_user_pass_status(false)[1], 1);
    }

    #[test]
    fn socks5_request_connect_domain_is_kept_unresolved() {
        let mut bytes = vec![5, 1, 0, 3, 11];
        bytes.extend_from_slice(b"Example.COM");
        bytes.extend_from_slice(&443u16.to_be_bytes());
        let (req, n) = parse_request(&bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(req.command, Command::Connect);
        assert_eq!(
            req.address.to_target(),
            Some(Target {
                host: Host::Name("example.com".into()),
                port: 443
            })
        );
    }

    #[test]
    fn socks5_request_ipv4_and_ipv6() {
        let (r, n) = parse_request(&[5, 3, 0, 1, 127, 0, 0, 1, 0, 53]).unwrap();
        assert_eq!(n, 10);
        assert_eq!(r.command, Command::UdpAssociate);
        assert_eq!(r.address, Address::V4(Ipv4Addr::LOCALHOST, 53));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0x1f, 0x90]);
        let (r, n) = parse_request(&v6).unwrap();
        assert_eq!(n, 22);
        assert_eq!(r.address, Address::V6(Ipv6Addr::LOCALHOST, 8080));
    }

    #[test]
    fn socks5_request_errors_distinguish_incomplete_and_malformed() {
        assert_eq!(
            parse_request(&[5, 1, 0, 1, 1, 2]),
            Err(DecodeError::Incomplete)
        );
        assert_eq!(parse_request(&[5, 1, 0, 3]), Err(DecodeError::Incomplete));
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]),
            Err(DecodeError::Malformed(ERR_ADDRESS_TYPE))
        );
        assert!(matches!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(&[5, 1, 1, 1, 1, 2, 3, 4, 0, 80]),
            Err(DecodeError::Malformed(_))
        ));
        // Unknown commands parse, so the server can answer "command not supported".
        let (r, _) = parse_request(&[5, 9, 0, 1, 1, 2, 3, 4, 0, 80]).unwrap();
        assert_eq!(r.command, Command::Other(9));
    }

    #[test]
    fn socks5_reply_encoding_matches_rfc1928() {
        assert_eq!(
            reply_bytes(Reply::HostUnreachable),
            vec![5, 4, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        let mut out = Vec::new();
        encode_reply(
            Reply::Succeeded,
            &Address::V4(Ipv4Addr::new(10, 0, 0, 1), 1080),
            &mut out,
        );
        assert_eq!(out, vec![5, 0, 0, 1, 10, 0, 0, 1, 0x04, 0x38]);
        let ((rep, addr), n) = parse_reply(&out).unwrap();
        assert_eq!((rep, n), (Reply::Succeeded, 10));
        assert_eq!(addr.port(), 1080);
        for (r, b) in [
            (Reply::GeneralFailure, 1),
            (Reply::NotAllowed, 2),
            (Reply::NetworkUnreachable, 3),
            (Reply::ConnectionRefused, 5),
            (Reply::TtlExpired, 6),
            (Reply::CommandNotSupported, 7),
            (Reply::AddressTypeNotSupported, 8),
        ] {
            assert_eq!(r.to_byte(), b);
            assert_eq!(Reply::from_byte(b), r);
        }
    }

    #[test]
    fn socks5_udp_header_round_trips_and_exposes_payload() {
        let h = UdpHeader {
            frag: 0,
            address: Address::Domain(b"dns.example".to_vec(), 53),
        };
        let mut pkt = Vec::new();
        h.encode(&mut pkt);
        pkt.extend_from_slice(b"query");
        let (parsed, n) = parse_udp_header(&pkt).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(&pkt[n..], b"query");
        assert!(matches!(
            parse_udp_header(&[0, 1, 0, 1, 1, 1, 1, 1, 0, 53]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn socks5_domain_target_rejects_garbage_names() {
        assert_eq!(Address::Domain(b"bad name".to_vec(), 80).to_target(), None);
        assert_eq!(Address::Domain(b"ok.example".to_vec(), 0).to_target(), None);
        assert_eq!(
            Address::Domain(b"10.0.0.1".to_vec(), 80).to_target(),
            Some(Target {
                host: Host::Ip("10.0.0.1".parse().unwrap()),
                port: 80
            })
        );
    }

    #[test]
    fn socks5_fuzz_property_holds_on_samples() {
        let samples: &[&[u8]] = &[
            &[],
            &[5, 1, 0],
            &[5, 1, 0, 3, 255],
            &[1, 0, 0],
            &[0, 0, 0, 1, 1, 2, 3, 4, 0, 80, 9, 9],
            &[
                5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1,
            ],
            &[5, 255, 0, 3, 1, b'a', 0, 0],
        ];
        for s in samples {
            fuzz_socks5(s);
        }
        // Pseudo-random inputs biased towards valid prefixes.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut v = Vec::with_capacity(len);
            for i in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let b = (x >> 8) as u8;
                v.push(match i {
                    0 => [5, 0, 1][(b % 3) as usize],
                    3 => [1, 3, 4, b][(b % 4) as usize],
                    4 => b % 12,
                    _ => b,
                });
            }
            fuzz_socks5(&v);
        }
    }
}
