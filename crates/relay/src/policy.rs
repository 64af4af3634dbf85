//! Destination policy: which resolved addresses a tunnel may dial.
//!
//! Applied to every address right before it is dialled (literals and resolved names alike), and
//! the checked address is the one dialled — no re-resolution — so DNS rebinding cannot bypass it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::LazyLock;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{PolicyConfig, PortRange};

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// In the operator's deny list.
    OperatorDenied,
    /// In a reserved range (loopback, private, link-local, ...) and not explicitly allowed.
    Reserved(&'static str),
    /// One of the relay's own addresses.
    OwnAddress,
    /// Port not in the allowed list.
    Port,
}

impl Refusal {
    /// Details for Proxy-Status: names the rule, never echoes client data.
    pub fn details(self) -> &'static str {
        match self {
            Refusal::OperatorDenied => "destination denied by operator policy",
            Refusal::Reserved(what) => what,
            Refusal::OwnAddress => "destination is the relay itself",
            Refusal::Port => "destination port not allowed",
        }
    }
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct DestinationPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    ports: Vec<PortRange>,
    /// Socket addresses of the relay's own listeners: refused even when `allow` covers them, so a
    /// client cannot loop the relay into itself.
    own_sockets: Vec<SocketAddr>,
    /// Addresses owned by the relay (egress prefixes, specific listen IPs).
    own_nets: Vec<IpNet>,
    /// The host's interface addresses when a listener is bound to the unspecified address:
    /// refused unless the operator allows them explicitly (they reach the host's other services).
    own_hosts: Vec<IpAddr>,
}

impl DestinationPolicy {
    pub fn new(cfg: &PolicyConfig) -> Self {
        Self {
            allow: cfg.allow.clone(),
            deny: cfg.deny.clone(),
            ports: cfg.ports.clone(),
            own_sockets: Vec::new(),
            own_nets: Vec::new(),
            own_hosts: Vec::new(),
        }
    }

    /// Registers a listener of the relay: its port on its address is never a valid destination.
    /// A listener on the unspecified address listens on every interface address of the host, read
    /// once here (see [`local_addresses`]).
    pub fn add_own_socket(&mut self, addr: SocketAddr) {
        if addr.ip().is_unspecified() {
            self.add_unspecified_listener(addr.port(), &local_addresses());
        } else {
            self.own_sockets.push(addr);
            if !addr.ip().is_loopback() {
                self.own_nets.push(IpNet::from(addr.ip()));
            }
        }
    }

    /// [`Self::add_own_socket`] for a listener on `[::]`/`0.0.0.0`, with the host's addresses given.
    pub fn add_unspecified_listener(&mut self, port: u16, local: &[IpAddr]) {
        for ip in local {
            let ip = canonical(*ip);
            self.own_sockets.push(SocketAddr::new(ip, port));
            if !ip.is_loopback() && !self.own_hosts.contains(&ip) {
                self.own_hosts.push(ip);
            }
        }
    }

    /// Registers a network owned by the relay (egress prefixes).
    pub fn add_own_net(&mut self, net: IpNet) {
        self.own_nets.push(net);
    }

    /// Decides whether `dest` may be dialled.
    //= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
    //# Since CONNECT creates a tunnel to an arbitrary server, proxies that
    //# support CONNECT SHOULD restrict its use to a set of known ports or a
    //# list of safe request targets; see Section 9.3.6 of [HTTP] for more
    //# details.
    pub fn check(&self, dest: SocketAddr) -> Result<(), Refusal> {
        let ip = canonical(dest.ip());
        if !self.ports.iter().any(|r| r.contains(dest.port())) {
            return Err(Refusal::Port);
        }
        for own in &self.own_sockets {
            let same_ip = canonical(own.ip()) == ip;
            if own.port() == dest.port() && (same_ip || ip.is_loopback()) {
                return Err(Refusal::OwnAddress);
            }
        }
        // Deny lists and the relay's own networks also match the IPv4 address a mapped, compatible,
        // NAT64 or 6to4 form embeds, so no spelling of a denied address slips through.
        let embedded = match dest.ip() {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let hits = |nets: &[IpNet]| {
            nets.iter()
                .any(|n| n.contains(&ip) || embedded.is_some_and(|e| n.contains(&e)))
        };
        if hits(&self.deny) {
            return Err(Refusal::OperatorDenied);
        }
        // Before `allow`: an egress prefix is routed to this host (`ip route add local`), so any
        // address in it reaches the relay's own services, however broad the operator's allow list.
        if hits(&self.own_nets) {
            return Err(Refusal::OwnAddress);
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if self.own_hosts.contains(&ip) {
            return Err(Refusal::OwnAddress);
        }
        if let Some(what) = reserved(dest.ip()) {
            return Err(Refusal::Reserved(what));
        }
        Ok(())
    }
}

/// The host's interface addresses (getifaddrs), for listeners on the unspecified address. Empty
/// (with a warning) if they cannot be read; loopback is refused by the reserved ranges anyway.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!(
            "cannot list interface addresses; the relay's own addresses are not refused by IP"
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// IPv4-mapped IPv6 addresses are the IPv4 address for every purpose here.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

const V4_RESERVED: &[(&str, &str)] = &[
    (
        "0.0.0.0/8",
        "unspecified / this-network destination not allowed",
    ),
    ("10.0.0.0/8", "private (RFC 1918) destination not allowed"),
    (
        "100.64.0.0/10",
        "shared address space (CGNAT) destination not allowed",
    ),
    ("127.0.0.0/8", "loopback destination not allowed"),
    ("169.254.0.0/16", "link-local destination not allowed"),
    (
        "172.16.0.0/12",
        "private (RFC 1918) destination not allowed",
    ),
    (
        "192.0.0.0/24",
        "IETF protocol assignment destination not allowed",
    ),
    (
        "192.0.2.0/24",
        "documentation range destination not allowed",
    ),
    (
        "192.88.99.0/24",
        "6to4 relay anycast destination not allowed",
    ),
    (
        "192.168.0.0/16",
        "private (RFC 1918) destination not allowed",
    ),
    (
        "198.18.0.0/15",
        "benchmarking range destination not allowed",
    ),
    (
        "198.51.100.0/24",
        "documentation range destination not allowed",
    ),
    (
        "203.0.113.0/24",
        "documentation range destination not allowed",
    ),
    ("224.0.0.0/4", "multicast destination not allowed"),
    (
        "240.0.0.0/4",
        "reserved / broadcast destination not allowed",
    ),
];

const V6_RESERVED: &[(&str, &str)] = &[
    ("::/128", "unspecified destination not allowed"),
    ("::1/128", "loopback destination not allowed"),
    ("100::/64", "discard-only destination not allowed"),
    ("64:ff9b:1::/48", "local-use NAT64 destination not allowed"),
    (
        "2001::/23",
        "IETF protocol assignment destination not allowed",
    ),
    (
        "2001:db8::/32",
        "documentation range destination not allowed",
    ),
    ("3fff::/20", "documentation range destination not allowed"),
    ("fc00::/7", "unique local (ULA) destination not allowed"),
    ("fe80::/10", "link-local destination not allowed"),
    ("fec0::/10", "site-local destination not allowed"),
    ("ff00::/8", "multicast destination not allowed"),
];

/// [`V4_RESERVED`] parsed, once per process rather than per dial.
static RESERVED_V4: LazyLock<Vec<(Ipv4Net, &'static str)>> =
    LazyLock::new(|| parse_table(V4_RESERVED));
/// [`V6_RESERVED`] parsed, once per process rather than per dial.
static RESERVED_V6: LazyLock<Vec<(Ipv6Net, &'static str)>> =
    LazyLock::new(|| parse_table(V6_RESERVED));

fn parse_table<N: std::str::FromStr>(table: &[(&str, &'static str)]) -> Vec<(N, &'static str)>
where
    N::Err: std::fmt::Debug,
{
    table
        .iter()
        .map(|(net, why)| (net.parse().expect("static net"), *why))
        .collect()
}

/// Names the reserved range `ip` falls in, looking through IPv4-mapped, IPv4-compatible, NAT64
/// (64:ff9b::/96) and 6to4 (2002::/16) forms to the embedded IPv4 address.
pub fn reserved(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => reserved_v4(v4),
        IpAddr::V6(v6) => {
            if is_deprecated_compat(v6) {
                return Some("IPv4-compatible destination not allowed");
            }
            // A mapped / NAT64 / 6to4 form of a reserved IPv4 address is that address.
            if let Some(why) = embedded_v4(v6).and_then(reserved_v4) {
                return Some(why);
            }
            RESERVED_V6
                .iter()
                .find(|(net, _)| net.contains(&v6))
                .map(|(_, why)| *why)
        }
    }
}

fn reserved_v4(v4: Ipv4Addr) -> Option<&'static str> {
    RESERVED_V4
        .iter()
        .find(|(net, _)| net.contains(&v4))
        .map(|(_, why)| *why)
}

/// The deprecated IPv4-compatible form `::a.b.c.d` is never dialled, whatever it embeds.
fn is_deprecated_compat(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    s[..6].iter().all(|&x| x == 0) && !v6.is_loopback() && !v6.is_unspecified()
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if is_deprecated_compat(v6) {
        return Some(tail);
    }
    // RFC 6052 well-known NAT64 prefix.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    // RFC 3056 6to4: 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DestinationPolicy {
        DestinationPolicy::new(&PolicyConfig::default())
    }

    fn sa(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 443)
    }

    #[test]
    fn reserved_ranges_are_refused_by_default() {
        let p = policy();
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::8.8.8.8",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "fec0::1",
        ] {
            assert!(p.check(sa(bad)).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn public_addresses_and_their_translated_forms_are_allowed() {
        let p = policy();
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(p.check(sa(good)), Ok(()), "{good} must be allowed");
        }
    }

    #[test]
    fn operator_allow_and_deny_lists_apply_in_order() {
        let p = DestinationPolicy::new(&PolicyConfig {
            allow: vec![
                "127.0.0.0/8".parse().unwrap(),
                "8.8.0.0/16".parse().unwrap(),
            ],
            deny: vec!["8.8.8.0/24".parse().unwrap()],
            ports: vec![PortRange::ALL],
        });
        assert_eq!(p.check(sa("127.0.0.1")), Ok(()));
        assert_eq!(p.check(sa("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(p.check(sa("8.8.8.8")), Err(Refusal::OperatorDenied));
    }

    #[test]
    fn ports_outside_the_allow_list_are_refused() {
        let p = DestinationPolicy::new(&PolicyConfig {
            ports: vec![PortRange::single(443).unwrap()],
            ..Default::default()
        });
        assert_eq!(p.check("8.8.8.8:443".parse().unwrap()), Ok(()));
        assert_eq!(p.check("8.8.8.8:80".parse().unwrap()), Err(Refusal::Port));
    }

    #[test]
    fn a_listener_on_the_unspecified_address_refuses_only_the_hosts_own_addresses() {
        let mut p = policy();
        let host: IpAddr = "203.0.114.7".parse().unwrap(); // stands for a public interface address
        p.add_unspecified_listener(
            443,
            &["127.0.0.1".parse().unwrap(), "::1".parse().unwrap(), host],
        );
        // Other hosts on the listen port are ordinary destinations (port 443 is everyone's HTTPS).
        assert_eq!(p.check("8.8.8.8:443".parse().unwrap()), Ok(()));
        assert_eq!(p.check("[2606:4700::1111]:443".parse().unwrap()), Ok(()));
        // The host itself, on any port, is refused unless the operator allows it explicitly.
        assert_eq!(
            p.check(SocketAddr::new(host, 443)),
            Err(Refusal::OwnAddress)
        );
        assert_eq!(p.check(SocketAddr::new(host, 22)), Err(Refusal::OwnAddress));
        let mut allowed = DestinationPolicy::new(&PolicyConfig {
            allow: vec!["203.0.114.0/24".parse().unwrap()],
            ..Default::default()
        });
        allowed.add_unspecified_listener(443, &[host]);
        assert_eq!(allowed.check(SocketAddr::new(host, 22)), Ok(()));
        // ...but never the listener itself.
        assert_eq!(
            allowed.check(SocketAddr::new(host, 443)),
            Err(Refusal::OwnAddress)
        );
    }

    #[test]
    fn local_addresses_include_loopback() {
        assert!(
            local_addresses().iter().any(|ip| ip.is_loopback()),
            "getifaddrs should list lo"
        );
    }

    #[test]
    fn the_relay_itself_is_refused_even_when_allowed() {
        let mut p = DestinationPolicy::new(&PolicyConfig {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        p.add_own_socket("127.0.0.1:4433".parse().unwrap());
        p.add_own_net("2001:db8:cf::/64".parse().unwrap());
        assert_eq!(
            p.check("127.0.0.1:4433".parse().unwrap()),
            Err(Refusal::OwnAddress)
        );
        assert_eq!(p.check("127.0.0.1:4434".parse().unwrap()), Ok(()));
        assert_eq!(
            p.check("[2001:db8:cf::5]:80".parse().unwrap()),
            Err(Refusal::OwnAddress)
        );
    }

    #[test]
    fn own_egress_prefix_beats_a_broader_allow() {
        let mut p = DestinationPolicy::new(&PolicyConfig {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        p.add_own_net("127.1.0.0/16".parse().unwrap());
        assert_eq!(p.check(sa("127.0.0.1")), Ok(()));
        for own in ["127.1.2.3", "::ffff:127.1.2.3"] {
            assert_eq!(p.check(sa(own)), Err(Refusal::OwnAddress), "{own}");
        }
    }

    #[test]
    fn operator_deny_matches_every_spelling_of_an_ipv4_address() {
        let p = DestinationPolicy::new(&PolicyConfig {
            deny: vec!["8.8.8.0/24".parse().unwrap()],
            ..Default::default()
        });
        for spelling in [
            "8.8.8.8",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(
                p.check(sa(spelling)),
                Err(Refusal::OperatorDenied),
                "{spelling}"
            );
        }
        assert_eq!(p.check(sa("8.8.4.4")), Ok(()));
    }
}
