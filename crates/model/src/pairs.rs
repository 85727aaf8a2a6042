//! Point-to-point address pairs for vWires, sans-IO: which pair of a pool is free is decided from
//! the set of addresses already in use, so the same inputs always give the same pair. The registry
//! chooses with it when it leases pairs (`ResourceService.AllocateAddresses`); the node daemon
//! re-exports it.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::validate::{self, ValidationError};

/// The pool a service without a CIDR draws from (link-local, as upstream's icmp-responder
/// examples use 169.254.0.0/16). Every such service shares it.
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

/// Whether [`allocate_pair`] could hand out `addr` from `pool`: an address of the pool that is not
/// an IPv4 pool's network or broadcast address (those of a /31 or /32 are hosts).
pub fn is_host(pool: IpNet, addr: IpAddr) -> bool {
    if !pool.contains(&addr) {
        return false;
    }
    match pool {
        IpNet::V4(p) if p.prefix_len() < 31 => {
            let a = IpAddr::V4(p.network());
            let b = IpAddr::V4(p.broadcast());
            addr != a && addr != b
        }
        _ => true,
    }
}

/// A vWire address pool as a lease request names it: a CIDR without host bits, not the whole
/// address space, not multicast, with room for at least one pair. Errors name `field`.
pub fn pool(field: &str, s: &str) -> Result<IpNet, ValidationError> {
    let net = validate::cidr(field, s)?;
    if net.prefix_len() == 0 {
        return Err(ValidationError::new(
            field,
            format!("{s:?} is the whole address space, not a pool"),
        ));
    }
    if net.addr().is_multicast() {
        return Err(ValidationError::new(
            field,
            format!("{s:?} is a multicast range; point-to-point addresses must be unicast"),
        ));
    }
    if net.hosts().nth(1).is_none() {
        return Err(ValidationError::new(
            field,
            format!("{s:?} has no room for a pair of addresses"),
        ));
    }
    Ok(net)
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

    #[test]
    fn hosts_of_a_pool() {
        let p: IpNet = "10.60.0.0/29".parse().unwrap();
        assert!(!is_host(p, "10.60.0.0".parse().unwrap()), "network");
        assert!(is_host(p, "10.60.0.1".parse().unwrap()));
        assert!(is_host(p, "10.60.0.6".parse().unwrap()));
        assert!(!is_host(p, "10.60.0.7".parse().unwrap()), "broadcast");
        assert!(!is_host(p, "10.60.0.8".parse().unwrap()), "outside");
        assert!(!is_host(p, "fd00::1".parse().unwrap()), "other family");
        let p31: IpNet = "10.60.0.2/31".parse().unwrap();
        assert!(is_host(p31, "10.60.0.2".parse().unwrap()) && is_host(p31, "10.60.0.3".parse().unwrap()));
        let p6: IpNet = "fd00::/126".parse().unwrap();
        assert!(is_host(p6, "fd00::".parse().unwrap()));
        // Every address allocate_pair hands out is a host.
        let mut used = HashSet::new();
        while let Some((a, b)) = allocate_pair(p, &used) {
            assert!(is_host(p, a.addr()) && is_host(p, b.addr()));
            used.extend([a.addr(), b.addr()]);
        }
    }

    #[test]
    fn pools() {
        assert_eq!(pool("pool", DEFAULT_POOL).unwrap().to_string(), DEFAULT_POOL);
        assert!(pool("pool", "10.60.0.2/31").is_ok());
        assert!(pool("pool", "fd00::/127").is_ok());
        for bad in [
            "nope",
            "10.60.0.1/24",
            "0.0.0.0/0",
            "::/0",
            "10.60.0.1/32",
            "fd00::1/128",
            "224.1.0.0/16",
        ] {
            let e = pool("pool", bad).unwrap_err();
            assert_eq!(e.field, "pool", "{bad}: {e}");
        }
    }
}
