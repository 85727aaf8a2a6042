//! The eBPF fast path of a router and its members' shortcuts, rebuilt from kernel state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_dataplane::fastpath::{self, Direction, FastPath};
use nsm_mechanisms::link_name;

use super::filter::reaches;
use super::{Lease, Router, Vl3, peer_link_mac, shortcut};

/// A member table entry, if both MACs are Ethernet addresses.
pub(super) fn member_entry(
    ifindex: u32,
    member_mac: &[u8],
    router_mac: &[u8],
    service: u32,
) -> Option<fastpath::Member> {
    Some(fastpath::Member {
        ifindex,
        member_mac: member_mac.try_into().ok()?,
        router_mac: router_mac.try_into().ok()?,
        service,
    })
}

/// Turns the fast path on or off (`direct` says why not) and rebuilds its tables and attachments
/// from the router's kernel state and the vL3's leases and services: a host route through a veth
/// end with the permanent neighbour entry behind it makes a member (so members adopted after a
/// restart count too); the routes to each peer make its prefixes; [`reaches`] makes the pairs.
pub(super) async fn sync_fast_path(
    router: &mut Router,
    vl3: &Vl3,
    leases: &[Lease],
    services: &[(String, Vec<String>)],
    direct: Result<(), &str>,
) {
    let name = vl3.name.as_str();
    if let Err(why) = direct {
        if router.fast_off.as_deref() != Some(why) {
            // Shortcuts first: none may outlive the program that guards its link.
            for m in router.shortcuts.values_mut() {
                shortcut::clear(name, m).await;
            }
            // Programs stay attached without their owner (a daemon before a restart may have
            // left some), so every link of the router is cleared, not only those known here.
            let cleared = match router.nl.links().await {
                Ok(links) => {
                    let mut r = Ok(());
                    for l in links.iter().filter(|l| l.kind.is_some()) {
                        r = r.and(router.nl.detach_tc_ingress(&l.name).await.map(drop));
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if let Err(e) = cleared {
                tracing::warn!(vl3 = %name, error = %e, "vL3 fast path: detaching");
                return;
            }
            router.fast = None;
            router.fast_off = Some(why.to_owned());
            tracing::info!(vl3 = %name, reason = why, "vL3 fast path off");
        }
        return;
    }
    if router.fast.is_none() {
        match FastPath::new() {
            Ok(f) => {
                router.fast = Some(f);
                router.fast_off = None;
                tracing::info!(vl3 = %name, "vL3 fast path on");
            }
            Err(e) => {
                let why = e.to_string();
                if router.fast_off.as_deref() != Some(why.as_str()) {
                    tracing::warn!(vl3 = %name, error = %why, "vL3 fast path unavailable; all traffic takes the routed path");
                }
                router.fast_off = Some(why);
                return;
            }
        }
    }
    // Service numbers: every member service, the vL3's own (shared members) included.
    let mut names: BTreeSet<&str> = services.iter().map(|(s, _)| s.as_str()).collect();
    names.extend(leases.iter().map(|l| l.member.as_str()));
    names.insert(name);
    router.service_ids = names.iter().zip(1..).map(|(n, i)| ((*n).to_owned(), i)).collect();
    let ids = &router.service_ids;
    let mut pairs = BTreeSet::new();
    for a in &names {
        for b in &names {
            if reaches(name, services, a, b) {
                pairs.insert((ids[*a], ids[*b]));
            }
        }
    }
    let state = async {
        let links = router.nl.links().await?;
        let routes = router.nl.routes().await?;
        let neighbours = router.nl.permanent_neighbours().await?;
        Ok::<_, nsm_dataplane::DataplaneError>((links, routes, neighbours))
    };
    let (links, routes, neighbours) = match state.await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(vl3 = %name, error = %e, "vL3 fast path: reading the router's state");
            return;
        }
    };
    let fast = router.fast.as_mut().expect("on");
    let mut attach: Vec<(String, u32, Direction)> = Vec::new();
    let mut prefixes: HashMap<ipnet::Ipv4Net, fastpath::PeerPrefix> = HashMap::new();
    // Peer links' MACs: the link's own tells the router's frames from shortcut frames at their
    // egress; the peer's addresses the shortcut frames that may leave.
    let mut link_macs: HashMap<u32, fastpath::LinkMacs> = HashMap::new();
    for peer in router.peers.keys() {
        let link = link_name("vx-", peer);
        let Some(l) = links.iter().find(|l| l.name == link) else {
            continue;
        };
        attach.push((link, l.index, Direction::Deliver));
        if let Ok(own) = <[u8; 6]>::try_from(l.mac.as_slice()) {
            let peer = peer_link_mac(name, peer);
            link_macs.insert(l.index, fastpath::LinkMacs { own, peer });
        }
        for lease in leases.iter().filter(|x| &x.node == peer) {
            if let (IpNet::V4(p), IpAddr::V4(gateway)) = (lease.prefix, lease.gateway().addr()) {
                prefixes.insert(
                    p,
                    fastpath::PeerPrefix {
                        ifindex: l.index,
                        gateway,
                        service: ids[lease.member.as_str()],
                    },
                );
            }
        }
    }
    let veth_ends: HashMap<&str, &nsm_dataplane::LinkInfo> = links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .map(|l| (l.name.as_str(), l))
        .collect();
    let macs: HashMap<(u32, IpAddr), &[u8]> = neighbours.iter().map(|n| ((n.index, n.ip), &n.mac[..])).collect();
    let mut members: HashMap<std::net::Ipv4Addr, fastpath::Member> = HashMap::new();
    for r in &routes {
        let (IpAddr::V4(addr), None, Some(dev), 32) = (r.dst.addr(), r.gateway, r.dev.as_deref(), r.dst.prefix_len())
        else {
            continue;
        };
        let Some(end) = veth_ends.get(dev) else { continue };
        let Some(mac) = macs.get(&(end.index, IpAddr::V4(addr))) else {
            continue;
        };
        let Some(lease) = leases.iter().find(|l| l.prefix.contains(&IpAddr::V4(addr))) else {
            continue;
        };
        if let Some(m) = member_entry(end.index, mac, &end.mac, ids[lease.member.as_str()]) {
            members.insert(addr, m);
            attach.push((end.name.clone(), end.index, Direction::Send));
        }
    }
    // Tables before attachments: a program that a restarted daemon's replaces finds its entries.
    // The reach table first: a pair the filter stopped admitting leaves before any entry changes.
    let tables = fast
        .set_reach(&pairs)
        .and_then(|()| fast.set_members(&members))
        .and_then(|()| fast.set_prefixes(&prefixes))
        .and_then(|()| fast.set_link_macs(&link_macs));
    if let Err(e) = &tables {
        tracing::warn!(vl3 = %name, error = %e, "vL3 fast path: tables");
    }
    if let Err(e) = fast
        .detach_others(&router.nl, |l| attach.iter().any(|(n, _, _)| n == l))
        .await
    {
        tracing::warn!(vl3 = %name, error = %e, "vL3 fast path: detaching");
    }
    for (link, index, direction) in &attach {
        if let Err(e) = fast.attach(&router.nl, link, *index, *direction).await {
            tracing::warn!(vl3 = %name, %link, error = %e, "vL3 fast path: attaching");
        }
    }
    let guarded: HashMap<u32, String> = if tables.is_ok() {
        attach
            .iter()
            .filter(|(link, index, _)| fast.guards(link) && link_macs.contains_key(index))
            .map(|(link, index, _)| (*index, link.clone()))
            .collect()
    } else {
        HashMap::new()
    };
    if guarded != router.guarded {
        // Links came or went (and shortcuts on a deleted link with them): look again.
        for m in router.shortcuts.values_mut() {
            m.reread();
        }
        router.guarded = guarded;
    }
    router.fast_prefixes = prefixes;
    router.fast_pairs = pairs;
    sync_shortcuts(router, name, None).await;
}

/// Brings the shortcuts of every member (or only of `only`) in line with the fast path's tables.
pub(super) async fn sync_shortcuts(router: &mut Router, vl3: &str, only: Option<std::net::Ipv4Addr>) {
    let on = router.fast.is_some();
    let nobody = BTreeMap::new();
    for (addr, m) in router
        .shortcuts
        .iter_mut()
        .filter(|(a, _)| only.is_none_or(|o| o == **a))
    {
        let wanted = match router.service_ids.get(&m.service) {
            Some(id) if on => shortcut::wanted(vl3, m, *id, &router.fast_prefixes, &router.fast_pairs, &router.guarded),
            _ => nobody.clone(),
        };
        let outcome = shortcut::apply(vl3, &router.nl, m, *addr, &wanted).await.err();
        if outcome != m.failure {
            match &outcome {
                Some(e) => {
                    tracing::warn!(%vl3, member = %addr, error = %e, "vL3 shortcuts: this member's packets take its veth")
                }
                None => tracing::debug!(%vl3, member = %addr, shortcuts = wanted.len(), "vL3 shortcuts"),
            }
            m.failure = outcome;
        }
    }
}
