//! Member shortcuts: a member's packets to other nodes skip its veth pair as well as its router's
//! stack.
//!
//! On the fast path alone a member's packet still crosses its veth pair into the router, which
//! costs a trip through the CPU's backlog queue and a second receive pass before the send
//! program moves it onto a peer link. A shortcut removes that hop. For each peer link with
//! prefixes the member's service may reach, the member's namespace gets a macvlan on that link
//! (private mode, the member's own MAC, no ARP) and link-scope routes to those prefixes, with the
//! member's address as preferred source. Sending through it is the peer link's transmit path
//! itself, as a vWire's VXLAN link is.
//!
//! The link's shortcut program ([`nsm_dataplane::fastpath`]) is the guard: it lets out only what
//! the send program would have sent (the member's own address and MAC, a prefix of that link's
//! peer, services that may reach each other), so a shortcut reaches nothing its router would not
//! forward. Replies come back as before, by the deliver program, on the member's veth.
//!
//! Shortcuts carry an alias, so a restarted daemon finds them in the member's namespace. None are
//! made where the member's namespace filters reverse paths strictly (`rp_filter` 1): replies
//! arrive on the veth, not the shortcut, and would be dropped there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nsm_dataplane::Netlink;
use nsm_dataplane::fastpath::{PeerPrefix, shortcut_alias as alias};

use nsm_mechanisms::link_name;
use nsm_mechanisms::netlink_in;

/// A member that may have shortcuts.
#[derive(Clone, Debug)]
pub(crate) struct Member {
    /// Its namespace (path) and interface (the veth end).
    pub netns: String,
    pub iface: String,
    pub mac: [u8; 6],
    /// Its service (upstream name).
    pub service: String,
    /// Shortcut -> its routes, as applied; `None` until read from the namespace.
    applied: Option<BTreeMap<String, BTreeSet<Ipv4Net>>>,
    /// The last failure logged, so a lasting one is logged once.
    pub failure: Option<String>,
    /// Its namespace filters reverse paths strictly, as last read; `None`: to be read.
    strict: Option<bool>,
}

impl Member {
    /// A member; `fresh` if its interface was just made (so it has no shortcuts yet).
    pub(crate) fn new(netns: String, iface: String, mac: [u8; 6], service: String, fresh: bool) -> Member {
        Member {
            netns,
            iface,
            mac,
            service,
            applied: fresh.then(BTreeMap::new),
            failure: None,
            strict: None,
        }
    }

    /// Whether `other` is this member unchanged (what was applied still describes it).
    pub(crate) fn same(&self, other: &Member) -> bool {
        (&self.netns, &self.iface, self.mac, &self.service) == (&other.netns, &other.iface, other.mac, &other.service)
    }

    /// Forgets what was applied: the next sync reads it from the namespace again.
    pub(crate) fn reread(&mut self) {
        self.applied = None;
        self.strict = None;
    }
}

/// The shortcuts one member (of service number `service`) should have: name -> (peer link,
/// prefixes to route through it). `guarded` holds the peer links (index -> name) whose shortcut
/// program and tables are in place.
pub(crate) fn wanted(
    vl3: &str,
    member: &Member,
    service: u32,
    prefixes: &HashMap<Ipv4Net, PeerPrefix>,
    pairs: &BTreeSet<(u32, u32)>,
    guarded: &HashMap<u32, String>,
) -> BTreeMap<String, (String, BTreeSet<Ipv4Net>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<Ipv4Net>)> = BTreeMap::new();
    for (prefix, peer) in prefixes {
        let Some(link) = guarded.get(&peer.ifindex) else {
            continue;
        };
        if !pairs.contains(&(service, peer.service)) {
            continue;
        }
        let name = link_name("nsc", &format!("{vl3}/{link}/{}", member.iface));
        out.entry(name)
            .or_insert_with(|| (link.clone(), BTreeSet::new()))
            .1
            .insert(*prefix);
    }
    out
}

/// Makes `member`'s shortcuts (address `addr`) exactly `wanted`, creating macvlans on the router's
/// links (`router`) and changing only what differs from what was applied. A shortcut that cannot
/// be completed is removed again.
pub(crate) async fn apply(
    vl3: &str,
    router: &Netlink,
    member: &mut Member,
    addr: Ipv4Addr,
    wanted: &BTreeMap<String, (String, BTreeSet<Ipv4Net>)>,
) -> Result<(), String> {
    let (ns, nl) = netlink_in(&member.netns).await.map_err(|e| e.to_string())?;
    let applied = match member.applied.take() {
        Some(a) => a,
        None => standing(vl3, &nl).await.map_err(|e| e.to_string())?,
    };
    let strict = match member.strict {
        Some(s) => s,
        None => *member.strict.insert(strict_reverse_paths(&ns, &member.iface)),
    };
    let mut result = Ok(());
    let none = BTreeMap::new();
    let wanted = if strict {
        if !wanted.is_empty() {
            result = Err("the member's namespace filters reverse paths strictly (rp_filter 1)".to_owned());
        }
        &none
    } else {
        wanted
    };
    let mut now = BTreeMap::new();
    for (name, routes) in applied {
        if !wanted.contains_key(&name) {
            let _ = nl.delete_link(&name).await;
        } else {
            now.insert(name, routes);
        }
    }
    for (name, (link, prefixes)) in wanted {
        let done = async {
            let (mut routes, new) = match now.remove(name) {
                Some(r) => (r, false),
                None => {
                    if router.create_macvlan_in(&ns, name, link, member.mac).await.is_err() {
                        // One left behind under its name (a member re-wired while the daemon
                        // was down) goes, and the create is tried once more.
                        let _ = nl.delete_link(name).await;
                        router
                            .create_macvlan_in(&ns, name, link, member.mac)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    (BTreeSet::new(), true)
                }
            };
            let setup = async {
                if new {
                    // It carries IPv4 to peers only (the guard would drop anything else).
                    nl.set_up_ipv4_only(name, &alias(vl3)).await?;
                }
                let (add, gone): (Vec<Ipv4Net>, Vec<Ipv4Net>) = (
                    prefixes.difference(&routes).copied().collect(),
                    routes.difference(prefixes).copied().collect(),
                );
                for p in add {
                    nl.add_route_from(p, name, addr).await?;
                    routes.insert(p);
                }
                for p in gone {
                    nl.delete_route(p.into()).await?;
                    routes.remove(&p);
                }
                Ok::<_, nsm_dataplane::DataplaneError>(())
            };
            match setup.await {
                Ok(()) => Ok(routes),
                Err(e) => {
                    let _ = nl.delete_link(name).await;
                    Err(format!("shortcut {name} on {link}: {e}"))
                }
            }
        };
        match done.await {
            Ok(routes) => {
                now.insert(name.clone(), routes);
            }
            Err(e) => result = Err(e),
        }
    }
    member.applied = Some(now);
    result
}

/// Removes all of `member`'s shortcuts.
pub(crate) async fn clear(vl3: &str, member: &mut Member) {
    let Ok((_, nl)) = netlink_in(&member.netns).await else {
        return;
    };
    let names: Vec<String> = match member.applied.take() {
        Some(a) => a.into_keys().collect(),
        None => standing(vl3, &nl)
            .await
            .map(|s| s.into_keys().collect())
            .unwrap_or_default(),
    };
    for name in names {
        let _ = nl.delete_link(&name).await;
    }
    member.applied = Some(BTreeMap::new());
}

/// The shortcuts of `vl3` standing in a member's namespace, with their routes.
async fn standing(vl3: &str, nl: &Netlink) -> nsm_dataplane::Result<BTreeMap<String, BTreeSet<Ipv4Net>>> {
    let mark = alias(vl3);
    let mut out: BTreeMap<String, BTreeSet<Ipv4Net>> = nl
        .links()
        .await?
        .into_iter()
        .filter(|l| l.alias.as_deref() == Some(mark.as_str()))
        .map(|l| (l.name, BTreeSet::new()))
        .collect();
    for r in nl.routes().await? {
        if let (Some(dev), ipnet::IpNet::V4(dst)) = (r.dev.as_deref(), r.dst)
            && let Some(routes) = out.get_mut(dev)
        {
            routes.insert(dst);
        }
    }
    Ok(out)
}

/// Whether `ns` drops packets arriving on `iface` that its routes would send back elsewhere:
/// `rp_filter` 1 for all links or for this one (the kernel takes the higher of the two).
fn strict_reverse_paths(ns: &nsm_dataplane::NetNs, iface: &str) -> bool {
    let strict = |key: &str| nsm_dataplane::read_sysctl(ns, key).is_ok_and(|v| v == "1");
    strict("net.ipv4.conf.all.rp_filter")
        || (!iface.contains('.') && strict(&format!("net.ipv4.conf.{iface}.rp_filter")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str, ifindex: u32, service: u32) -> (Ipv4Net, PeerPrefix) {
        (
            p.parse().unwrap(),
            PeerPrefix {
                ifindex,
                gateway: p.parse::<Ipv4Net>().unwrap().network(),
                service,
            },
        )
    }

    #[test]
    fn one_shortcut_per_guarded_link_with_the_reachable_prefixes() {
        let member = |iface: &str| {
            Member::new(
                "/run/netns/a".into(),
                iface.into(),
                [2, 0, 0, 0, 0, 1],
                "s".into(),
                true,
            )
        };
        let m = member("nsm0");
        let prefixes = HashMap::from([
            prefix("10.0.1.0/24", 7, 1),
            prefix("10.0.2.0/24", 7, 2),
            prefix("10.0.3.0/24", 8, 1),
            prefix("10.0.4.0/24", 9, 1),
        ]);
        let guarded = HashMap::from([(7, "vx-a".to_owned()), (8, "vx-b".to_owned())]);
        // Service 1 reaches itself only: 10.0.2.0/24 (service 2) stays with the router, and
        // 10.0.4.0/24's link is not guarded.
        let w = wanted("v", &m, 1, &prefixes, &BTreeSet::from([(1, 1)]), &guarded);
        let links: BTreeMap<&str, Vec<String>> = w
            .values()
            .map(|(l, p)| (l.as_str(), p.iter().map(|p| p.to_string()).collect()))
            .collect();
        assert_eq!(
            links,
            BTreeMap::from([
                ("vx-a", vec!["10.0.1.0/24".to_owned()]),
                ("vx-b", vec!["10.0.3.0/24".to_owned()])
            ])
        );
        assert!(
            w.keys()
                .all(|n| n.len() <= nsm_dataplane::MAX_LINK_NAME && n.starts_with("nsc"))
        );
        // Opening reach adds the prefix to the same shortcut.
        let w2 = wanted("v", &m, 1, &prefixes, &BTreeSet::from([(1, 1), (1, 2)]), &guarded);
        assert_eq!(w2.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
        assert_eq!(w2.values().map(|(_, p)| p.len()).sum::<usize>(), 3);
        // Names differ by vL3 and by interface (one namespace may hold several members).
        let other = member("nsm1");
        let w3 = wanted("v", &other, 1, &prefixes, &BTreeSet::from([(1, 1)]), &guarded);
        assert!(w3.keys().all(|n| !w.contains_key(n)));
        let w4 = wanted("u", &m, 1, &prefixes, &BTreeSet::from([(1, 1)]), &guarded);
        assert!(w4.keys().all(|n| !w.contains_key(n)));
    }
}
