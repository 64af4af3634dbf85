//! Outgoing sockets bound to a drawn egress address.
//!
//! The source address is fixed when the socket is bound, before any packet leaves; nothing here ever
//! re-binds. That is what makes "never rotate an address in the middle of a flow"
//! (draft-scalone-cfr-source-privacy) structural rather than a rule to remember.

use std::io;
use std::net::{IpAddr, SocketAddr};

use rustix::net::sockopt::{Ipv4PathMtuDiscovery, Ipv6PathMtuDiscovery};
use socket2::{Domain, Protocol, Socket, Type};

/// Which transport a socket is for (metrics label, socket options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

fn family_label(addr: IpAddr) -> &'static str {
    if addr.is_ipv6() {
        "v6"
    } else {
        "v4"
    }
}

fn count_bind_failure(source: IpAddr, proto: Proto, err: &io::Error) {
    metrics::counter!(
        "cfr_egress_bind_failures_total",
        "family" => family_label(source),
        "proto" => proto.label()
    )
    .increment(1);
    // Debug only, and never with client data: the egress address must not end up in operator logs.
    tracing::debug!(family = family_label(source), proto = proto.label(), error = %err,
        "egress bind failed");
}

/// IPv4-mapped IPv6 destinations are reached over IPv4 (the pool draws IPv4 sources for them).
fn canonical(dest: SocketAddr) -> SocketAddr {
    SocketAddr::new(dest.ip().to_canonical(), dest.port())
}

/// A non-blocking socket of `family_of`'s family, with the per-protocol options applied.
fn new_socket(family_of: IpAddr, proto: Proto) -> io::Result<Socket> {
    let domain = if family_of.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    // Non-blocking from socket(2) on (SOCK_NONBLOCK): two fcntl(2) fewer on every tunnel setup.
    let socket = match proto {
        Proto::Tcp => Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?,
        Proto::Udp => Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?,
    };
    if family_of.is_ipv6() {
        // One family per socket: an IPv6 egress socket never carries IPv4-mapped traffic.
        socket.set_only_v6(true)?;
    }
    if proto == Proto::Udp {
        //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
        //# UDP proxies MUST NOT introduce fragmentation at the IP layer when forwarding
        //# HTTP Datagrams onto a UDP socket; overly large datagrams are silently dropped.
        //# In IPv4, the Don't Fragment (DF) bit MUST be set, if possible, to prevent
        //# fragmentation on the path.
        //
        //= https://www.rfc-editor.org/rfc/rfc9298#section-6.2
        //# A UDP proxy MUST ignore ECN bits in the IP header of UDP packets received from
        //# the target, and it MUST set the ECN bits to Not-ECT on UDP packets it sends to
        //# the target.
        if family_of.is_ipv6() {
            // PROBE sets DF-equivalent behaviour without caching a path MTU: an oversize
            // datagram fails with EMSGSIZE and the caller drops it.
            rustix::net::sockopt::set_ipv6_mtu_discover(&socket, Ipv6PathMtuDiscovery::PROBE)?;
            // Not-ECT: the two low traffic-class bits (ECN field) are 0.
            socket.set_tclass_v6(0)?;
        } else {
            // DF set, no PMTU cache; see above.
            rustix::net::sockopt::set_ip_mtu_discover(&socket, Ipv4PathMtuDiscovery::PROBE)?;
            // Not-ECT: the two low TOS bits (ECN field) are 0.
            socket.set_tos(0)?;
        }
    }
    Ok(socket)
}

/// Binds `socket` to `source` (port 0) with freebind, so a prefix routed to the host (AnyIP,
/// `ip -6 route add local PREFIX dev lo`) is usable without configuring each address.
fn bind_source(socket: &Socket, source: IpAddr, proto: Proto) -> io::Result<()> {
    if source.is_ipv6() {
        socket.set_freebind_ipv6(true)?;
    } else {
        socket.set_freebind(true)?;
    }
    if proto == Proto::Tcp {
        // Defer the ephemeral port choice to connect(): ports are then shared across destinations
        // (the 4-tuple stays unique) instead of exhausting 28k ports per source address on bind().
        // The option is at the IPPROTO_IP level and also applies to IPv6 sockets.
        nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(io::Error::from)?;
    }
    socket.bind(&SocketAddr::new(source, 0).into())
}

/// A socket for `proto` bound to `source` with all egress options applied, for the egress check
/// ([`crate::check`]): bind only, no traffic.
pub(crate) fn probe_bind(source: IpAddr, proto: Proto) -> io::Result<()> {
    let socket = new_socket(source, proto)?;
    bind_source(&socket, source, proto)
}

fn prepare(source: Option<IpAddr>, dest: SocketAddr, proto: Proto) -> io::Result<Socket> {
    if let Some(src) = source {
        if src.is_ipv6() != dest.is_ipv6() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "egress source and destination are of different address families",
            ));
        }
    }
    let socket = new_socket(dest.ip(), proto)?;
    if let Some(src) = source {
        bind_source(&socket, src, proto).inspect_err(|e| count_bind_failure(src, proto, e))?;
    }
    Ok(socket)
}

/// Opens a TCP connection to `dest` from `source` (`None`: kernel-chosen source). The source is bound
/// with freebind and `IP_BIND_ADDRESS_NO_PORT`. No timeout inside: the caller wraps this in one.
///
/// An IPv4-mapped `dest` is connected over IPv4. Must be called inside a Tokio runtime.
pub async fn connect_tcp(
    source: Option<IpAddr>,
    dest: SocketAddr,
) -> io::Result<tokio::net::TcpStream> {
    bind_tcp(source, dest)?.connect().await
}

/// A TCP socket bound to its egress source, not connected yet: [`connect_tcp`] in two steps, so a
/// caller can tell the time spent binding from the time spent in the handshake.
pub struct BoundTcp {
    socket: tokio::net::TcpSocket,
    source: Option<IpAddr>,
    dest: SocketAddr,
}

/// The first step of [`connect_tcp`]: a socket for `dest`, bound to `source`.
pub fn bind_tcp(source: Option<IpAddr>, dest: SocketAddr) -> io::Result<BoundTcp> {
    let dest = canonical(dest);
    let socket = prepare(source, dest, Proto::Tcp)?;
    Ok(BoundTcp {
        socket: tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket)),
        source,
        dest,
    })
}

impl BoundTcp {
    /// The second step of [`connect_tcp`]: the TCP handshake with the destination.
    pub async fn connect(self) -> io::Result<tokio::net::TcpStream> {
        let BoundTcp {
            socket,
            source,
            dest,
        } = self;
        socket.connect(dest).await.inspect_err(|e| {
            // With IP_BIND_ADDRESS_NO_PORT the source port is allocated here: running out of ports for
            // this source shows up as EADDRNOTAVAIL at connect time.
            if let Some(src) = source {
                if e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL) {
                    count_bind_failure(src, Proto::Tcp, e);
                }
            }
        })
    }
}

/// A UDP socket bound to `source` (`None`: kernel-chosen source) and connected to `dest`, so the
/// kernel drops datagrams that do not come from the target (RFC 9298 §3.1; one connected socket
/// per tunnel, docs/spec-notes.md). Fragmentation is disabled and outgoing ECN is Not-ECT (RFC 9298
/// §3.1, §6.2), with or without a source.
///
/// An IPv4-mapped `dest` is connected over IPv4. Must be called inside a Tokio runtime.
pub fn bind_udp(source: Option<IpAddr>, dest: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let dest = canonical(dest);
    let socket = prepare(source, dest, Proto::Udp)?;
    socket.connect(&dest.into())?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn udp_socket_has_pmtud_probe_and_not_ect() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = bind_udp(None, server.local_addr().unwrap()).unwrap();
        assert_eq!(
            rustix::net::sockopt::ip_mtu_discover(&s).unwrap(),
            Ipv4PathMtuDiscovery::PROBE
        );
        assert_eq!(rustix::net::sockopt::ip_tos(&s).unwrap() & 0b11, 0);
        assert_eq!(s.peer_addr().unwrap(), server.local_addr().unwrap());
    }

    #[tokio::test]
    async fn udp_datagrams_leave_from_the_requested_source() {
        // The fragmentation behaviour itself (EMSGSIZE above the path MTU) is tested in the netns
        // test, where the loopback MTU can be lowered.
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = bind_udp(
            Some("127.0.0.9".parse().unwrap()),
            server.local_addr().unwrap(),
        )
        .unwrap();
        s.send(b"ok").await.unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ok");
        assert_eq!(from.ip(), "127.0.0.9".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn mismatched_families_are_refused() {
        let err =
            bind_udp(Some("::1".parse().unwrap()), "127.0.0.1:9".parse().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = connect_tcp(
            Some("127.0.0.1".parse().unwrap()),
            "[::1]:9".parse().unwrap(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn ipv4_mapped_destination_is_reached_over_ipv4() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dest: SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
        let s = connect_tcp(Some("127.0.0.5".parse().unwrap()), dest)
            .await
            .unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, s.local_addr().unwrap());
        assert_eq!(peer.ip(), "127.0.0.5".parse::<IpAddr>().unwrap());
    }
}
