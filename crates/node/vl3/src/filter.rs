//! A router's filter: which members may reach which, by leased prefix (nftables), and the reach
//! relation the fast path's tables are built from.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;

use super::{FILTER_TABLE, Lease, Vl3};

/// The filter of a router: which members may reach which, by leased prefix.
pub fn filter_script(vl3: &Vl3, leases: &[Lease], services: &[(String, Vec<String>)]) -> String {
    let v6 = vl3.pool.addr().is_ipv6();
    let (ty, saddr, daddr) = if v6 {
        ("ipv6_addr", "ip6 saddr", "ip6 daddr")
    } else {
        ("ipv4_addr", "ip saddr", "ip daddr")
    };
    // Member services: the vL3 itself (shared members) and every service on it that holds a lease
    // or is declared.
    let mut members: BTreeMap<String, BTreeSet<IpNet>> = BTreeMap::new();
    members.entry(vl3.name.clone()).or_default();
    for (s, _) in services {
        members.entry(s.clone()).or_default();
    }
    for l in leases {
        members.entry(l.member.clone()).or_default().insert(l.prefix);
    }
    let set_of: HashMap<&str, String> = members
        .keys()
        .enumerate()
        .map(|(i, s)| (s.as_str(), format!("m{i}")))
        .collect();
    let mut s = format!("table inet {FILTER_TABLE} {{\n");
    for (svc, prefixes) in &members {
        s += &format!("  set {} {{\n    type {ty}; flags interval;\n", set_of[svc.as_str()]);
        if !prefixes.is_empty() {
            let e: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
            s += &format!("    elements = {{ {} }}\n", e.join(", "));
        }
        s += &format!("    comment \"members of {svc}\"\n  }}\n");
    }
    s += "  chain prerouting {\n    type filter hook prerouting priority raw; policy accept;\n";
    s += "    fib saddr . iif oif missing drop comment \"a member may only use its own address\"\n  }\n";
    s += "  chain forward {\n    type filter hook forward priority filter; policy drop;\n";
    // Replies need connection tracking only when some service reaches one that may not reach it
    // back. Without a `ct` rule the kernel tracks nothing in the router's namespace: no per-packet
    // conntrack lookup and no table to fill.
    if tracks_connections(vl3, leases, services) {
        s += "    ct state established,related accept\n";
    }
    let shared = &set_of[vl3.name.as_str()];
    s += &format!("    {saddr} @{shared} accept comment \"shared members reach everyone\"\n");
    s += &format!("    {daddr} @{shared} accept comment \"everyone reaches shared members\"\n");
    for (svc, reach) in services {
        let own = &set_of[svc.as_str()];
        if reach.iter().any(|r| r == "*") {
            s += &format!("    {saddr} @{own} accept comment \"{svc} reaches everyone\"\n");
            continue;
        }
        s += &format!("    {saddr} @{own} {daddr} @{own} accept comment \"{svc} reaches itself\"\n");
        for r in reach {
            if let Some(other) = set_of.get(r.as_str()) {
                s += &format!("    {saddr} @{own} {daddr} @{other} accept comment \"{svc} reaches {r}\"\n");
            }
        }
    }
    s += "  }\n}\n";
    s
}

/// Whether members of service `from` may reach members of `to` on vL3 `vl3`: exactly what
/// [`filter_script`]'s rules admit (the fast path's reach table is built from it).
pub(super) fn reaches(vl3: &str, services: &[(String, Vec<String>)], from: &str, to: &str) -> bool {
    from == vl3
        || to == vl3
        || services
            .iter()
            .any(|(s, r)| s == from && (from == to || r.iter().any(|x| x == "*" || x == to)))
}

/// Whether a router's filter needs connection tracking: some member service reaches another
/// that may not reach it back.
pub(super) fn tracks_connections(vl3: &Vl3, leases: &[Lease], services: &[(String, Vec<String>)]) -> bool {
    let mut names: BTreeSet<&str> = services.iter().map(|(s, _)| s.as_str()).collect();
    names.extend(leases.iter().map(|l| l.member.as_str()));
    names.remove(vl3.name.as_str());
    !reach_is_symmetric(&names, services)
}

/// Whether, among the member services `names` (not the shared members, who reach and are reached
/// by everyone), each that may reach another is reachable from it in turn. A name without an
/// entry in `services` reaches only itself.
fn reach_is_symmetric(names: &BTreeSet<&str>, services: &[(String, Vec<String>)]) -> bool {
    let reaches = |from: &str, to: &str| {
        from == to
            || services
                .iter()
                .any(|(s, r)| s == from && r.iter().any(|x| x == "*" || x == to))
    };
    names
        .iter()
        .all(|a| names.iter().all(|b| reaches(a, b) == reaches(b, a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vl3() -> Vl3 {
        Vl3 {
            name: "mesh".into(),
            pool: "172.16.0.0/16".parse().unwrap(),
            prefix_len: 24,
            dns_template: "{client}.{service}.".into(),
        }
    }

    #[test]
    fn filter_isolates_services_and_opens_reach() {
        let leases = vec![
            Lease {
                prefix: "172.16.0.0/24".parse().unwrap(),
                node: "a".into(),
                member: "istio.istio-system".into(),
            },
            Lease {
                prefix: "172.16.1.0/24".parse().unwrap(),
                node: "b".into(),
                member: "linkerd.linkerd".into(),
            },
            Lease {
                prefix: "172.16.2.0/24".parse().unwrap(),
                node: "b".into(),
                member: "mesh".into(),
            },
        ];
        let services = vec![
            ("istio.istio-system".to_owned(), vec![]),
            ("linkerd.linkerd".to_owned(), vec!["istio.istio-system".to_owned()]),
        ];
        let f = filter_script(&vl3(), &leases, &services);
        // Sets are in name order: istio (m0), linkerd (m1), mesh (m2, shared).
        assert!(
            f.contains("elements = { 172.16.0.0/24 }\n    comment \"members of istio.istio-system\""),
            "{f}"
        );
        assert!(f.contains("ip saddr @m0 ip daddr @m0 accept"), "{f}");
        assert!(f.contains("ip saddr @m1 ip daddr @m1 accept"), "{f}");
        assert!(
            f.contains("ip saddr @m1 ip daddr @m0 accept"),
            "linkerd reaches istio: {f}"
        );
        assert!(
            !f.contains("ip saddr @m0 ip daddr @m1"),
            "istio does not reach linkerd: {f}"
        );
        assert!(
            f.contains("ip saddr @m2 accept") && f.contains("ip daddr @m2 accept"),
            "shared: {f}"
        );
        assert!(f.contains("policy drop"));
        let open = filter_script(
            &vl3(),
            &leases,
            &[("istio.istio-system".to_owned(), vec!["*".to_owned()])],
        );
        assert!(open.contains("ip saddr @m0 accept"), "{open}");
        let v6 = Vl3 {
            pool: "fd00::/64".parse().unwrap(),
            ..vl3()
        };
        assert!(filter_script(&v6, &[], &services).contains("ip6 saddr"));
        // linkerd reaches istio but not back: replies need connection tracking.
        assert!(f.contains("ct state established,related accept"), "{f}");
    }

    #[test]
    fn reach_pairs_are_what_the_filter_admits() {
        let services = vec![
            ("istio".to_owned(), vec![]),
            ("linkerd".to_owned(), vec!["istio".to_owned()]),
            ("admin".to_owned(), vec!["*".to_owned()]),
        ];
        let r = |a: &str, b: &str| reaches("mesh", &services, a, b);
        assert!(r("istio", "istio") && r("linkerd", "linkerd"), "own service");
        assert!(r("linkerd", "istio") && !r("istio", "linkerd"), "one way");
        assert!(r("admin", "istio") && !r("istio", "admin"), "* reaches all, not back");
        assert!(r("mesh", "istio") && r("istio", "mesh"), "shared members both ways");
        // A lease whose service is gone: the filter has no rule for it but the shared ones.
        assert!(!r("gone", "gone") && !r("gone", "istio") && r("gone", "mesh"));
        let f = filter_script(&vl3(), &[], &services);
        assert!(!f.contains("@m1 ip daddr @m0"), "{f}");
    }

    #[test]
    fn connection_tracking_only_for_one_way_reach() {
        let svc = |s: &str, r: &[&str]| (s.to_owned(), r.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>());
        let tracked = |services: &[(String, Vec<String>)]| filter_script(&vl3(), &[], services).contains("ct state");
        assert!(!tracked(&[]), "no services: shared members only");
        assert!(!tracked(&[svc("a", &[]), svc("b", &[])]), "isolated services");
        assert!(!tracked(&[svc("a", &["b"]), svc("b", &["a"])]), "mutual reach");
        assert!(tracked(&[svc("a", &["b"]), svc("b", &[])]), "one-way reach");
        assert!(
            tracked(&[svc("a", &["*"]), svc("b", &[])]),
            "a reaches all, b does not reach a"
        );
        assert!(
            !tracked(&[svc("a", &["*"]), svc("b", &["*"])]),
            "everyone reaches everyone"
        );
        let lease = Lease {
            prefix: "172.16.0.0/24".parse().unwrap(),
            node: "n".into(),
            member: "c".into(),
        };
        let f = filter_script(&vl3(), &[lease], &[svc("a", &["*"])]);
        assert!(
            f.contains("ct state"),
            "a reaches c (a lease without a service), not back: {f}"
        );
    }
}
