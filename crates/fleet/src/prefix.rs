//! Splitting the fleet's egress prefix into one sub-prefix per member.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The `index`-th sub-prefix of length `new_len` inside `net` (`index` 0 is the lowest), e.g. member
/// 3's /68 of a /64. Distinct indexes give disjoint sub-prefixes: they differ in the bits between
/// the two prefix lengths.
pub fn subprefix(net: IpNet, new_len: u8, index: u64) -> Result<IpNet, String> {
    let (base, width) = match net.trunc() {
        IpNet::V4(n) => (u128::from(u32::from(n.network())), 32u8),
        IpNet::V6(n) => (u128::from(n.network()), 128u8),
    };
    if new_len < net.prefix_len() || new_len > width {
        return Err(format!(
            "sub-prefix length /{new_len} must be between /{} and /{width}",
            net.prefix_len()
        ));
    }
    let split_bits = u32::from(new_len - net.prefix_len());
    if split_bits < 64 && index >> split_bits != 0 {
        return Err(format!(
            "index {index} does not fit: {net} has {} sub-prefixes of length /{new_len}",
            1u128 << split_bits
        ));
    }
    let shift = u32::from(width - new_len);
    let offset = u128::from(index).checked_shl(shift).unwrap_or(0);
    let addr = match net {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from((base | offset) as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(base | offset)),
    };
    Ok(IpNet::new(addr, new_len).expect("length checked against the family width"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_64_splits_into_68s_by_the_fifth_nibble_of_the_iid() {
        let p = net("2001:db8:cf::/64");
        assert_eq!(subprefix(p, 68, 0).unwrap(), net("2001:db8:cf::/68"));
        assert_eq!(subprefix(p, 68, 1).unwrap(), net("2001:db8:cf:0:1000::/68"));
        assert_eq!(
            subprefix(p, 68, 15).unwrap(),
            net("2001:db8:cf:0:f000::/68")
        );
        assert!(subprefix(p, 68, 16).is_err(), "a /64 has 16 /68s");
    }

    #[test]
    fn a_56_splits_into_64s_and_ipv4_into_smaller_blocks() {
        let p = net("2001:db8:cf00::/56");
        assert_eq!(
            subprefix(p, 64, 0x2a).unwrap(),
            net("2001:db8:cf00:2a::/64")
        );
        let v4 = net("198.51.100.0/24");
        assert_eq!(subprefix(v4, 26, 3).unwrap(), net("198.51.100.192/26"));
        assert_eq!(subprefix(v4, 24, 0).unwrap(), v4, "no split: index 0 only");
        assert!(subprefix(v4, 24, 1).is_err());
    }

    #[test]
    fn lengths_outside_the_prefix_are_refused() {
        assert!(subprefix(net("2001:db8::/64"), 60, 0).is_err());
        assert!(subprefix(net("10.0.0.0/8"), 33, 0).is_err());
    }

    #[test]
    fn distinct_indexes_never_overlap() {
        let p = net("2001:db8:cf::/64");
        let subs: Vec<IpNet> = (0..16).map(|i| subprefix(p, 68, i).unwrap()).collect();
        for (i, a) in subs.iter().enumerate() {
            assert!(p.contains(a));
            for b in &subs[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
        // Wide splits (more than 64 bits between the lengths) take any u64 index.
        let huge = subprefix(net("::/0"), 128, u64::MAX).unwrap();
        assert_eq!(huge, net("::ffff:ffff:ffff:ffff/128"));
    }
}
