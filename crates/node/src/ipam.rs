//! Point-to-point address pairs for vWires, sans-IO: what is free is decided from the set of
//! addresses already in use, so the same inputs always give the same pair.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// The pool a service without a CIDR draws from (link-local, as upstream's icmp-responder
/// examples use 169.254.0.0/16).
pub const DEFAULT_POOL: &str = "169.254.100.0/24";

/// The first free pair (client, endpoint) of host addresses in `pool`, as /32 (or /128) prefixes.
/// Pairs are taken two by two from the start of the pool, skipping an IPv4 pool's network and
/// broadcast addresses; a pair is free when neither address is in `used`.
pub fn allocate_pair(pool: IpNet, used: &HashSet<IpAddr>) -> Option<(IpNet, IpNet)> {
    let max_len = pool.max_prefix_len();
    let mut hosts = pool.hosts();
    loop {
        let a = hosts.next()?;
        let b = hosts.next()?;
        if !used.contains(&a) && !used.contains(&b) {
            return Some((IpNet::new(a, max_len).ok()?, IpNet::new(b, max_len).ok()?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_in_order_skipping_used() {
        let pool: IpNet = "10.60.0.0/29".parse().unwrap();
        let mut used = HashSet::new();
        let (a, b) = allocate_pair(pool, &used).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("10.60.0.1/32".into(), "10.60.0.2/32".into())
        );
        used.insert(a.addr());
        let (c, d) = allocate_pair(pool, &used).unwrap();
        assert_eq!(
            (c.to_string(), d.to_string()),
            ("10.60.0.3/32".into(), "10.60.0.4/32".into())
        );
        used.extend([c.addr(), d.addr()]);
        let (e, f) = allocate_pair(pool, &used).unwrap();
        assert_eq!(
            (e.to_string(), f.to_string()),
            ("10.60.0.5/32".into(), "10.60.0.6/32".into())
        );
        used.insert(e.addr());
        assert_eq!(allocate_pair(pool, &used), None, "a /29 has three pairs");
    }

    #[test]
    fn ipv6() {
        let pool: IpNet = "fd00::/126".parse().unwrap();
        let (a, b) = allocate_pair(pool, &HashSet::new()).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("fd00::/128".into(), "fd00::1/128".into())
        );
    }
}
