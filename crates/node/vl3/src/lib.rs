//! vL3 on a node: one router per vL3, in its own network namespace, built into the daemon.
//!
//! Layout for vL3 `V` on node `N`:
//!
//! ```text
//!   client ns ── veth ──┐
//!   client ns ── veth ──┤ router ns nsm-vl3-N-<hash V>      (kernel forwarding, nftables filter,
//!                       ├── vx-<peer1> ═ VXLAN ═ peer1's router   DNS server on :53)
//!                       └── vx-<peer2> ═ VXLAN ═ peer2's router
//! ```
//!
//! Addresses: the router leases prefixes of V's pool from the registry's prefix server, one lease
//! per member service (so a service's members are recognisable by prefix), more when one fills up.
//! Each lease's first address is the router's gateway address for it; members get single
//! addresses from the rest, and keep them (the client's last status says which) across refresh,
//! heal and restarts, because the node keeps its leases until it is deleted.
//!
//! Routers peer with every other node that holds a lease of V: each side builds its end of a
//! point-to-point VXLAN link (VNI and names derived from V and the two node names, so both agree
//! without talking) and routes the peer's prefixes over it. No central router exists.
//!
//! Fast path: a member's IPv4 packets to and from other nodes skip the router's stack
//! ([`nsm_dataplane::fastpath`], eBPF at ingress of each peer link and each member's veth end),
//! and on their way out its veth pair too, through the member's shortcuts ([`shortcut`]),
//! with tables the router keeps beside its routes and filter: its members, the peers' prefixes,
//! and the pairs of services the filter lets through. Only IPv4 vL3s whose filter tracks no
//! connections use it; everything else (IPv6, one-way reach, a kernel that refuses the programs,
//! a daemon that is not running) takes the routed path, which stays complete underneath.
//!
//! Isolation: every router's forward chain admits a packet only when its source's service may
//! reach its destination's (own service, the vL3's shared members, or the service's `reach`),
//! recognised by the leased prefixes; strict reverse-path filtering stops a member from borrowing
//! another's address. Where some service reaches another one-way, replies pass as established
//! connections; otherwise the router tracks no connections at all.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use nsm_api::ipam::{PrefixRequest, Type, ipam_client::IpamClient};
use nsm_api::service_names::{IPAM_MEMBER_HEADER, IPAM_NODE_HEADER, IPAM_VL3_HEADER};
use nsm_dataplane::fastpath::{self, Direction, FastPath};
use nsm_dataplane::{NetNs, Netlink};
use tonic::transport::Channel;

use nsm_mechanisms::{link_name, stable_hash, vxlan};
use nsm_node_plan::vl3::gateway_of;
pub use nsm_node_plan::vl3::{Lease, Vl3};

pub use error::{Result, Vl3Error};

mod error;
mod fast;
mod filter;
mod shortcut;

use fast::{member_entry, sync_fast_path, sync_shortcuts};
pub use filter::filter_script;
use filter::tracks_connections;

/// nftables table of a router's filter.
const FILTER_TABLE: &str = "nsmvl3";

/// A router this node runs.
pub struct Router {
    pub netns: String,
    pub ns: Arc<NetNs>,
    pub nl: Netlink,
    identity: (u64, u64),
    /// Peer node -> its underlay address, the prefixes routed to it, and the own gateway
    /// addresses put on its link (IPv6 neighbour discovery answers only for addresses of the
    /// asking link).
    peers: HashMap<String, (IpAddr, BTreeSet<IpNet>, BTreeSet<IpNet>)>,
    /// Gateway addresses configured (own leases).
    gateways: BTreeSet<IpNet>,
    /// The filter last applied.
    filter: String,
    /// The fast path, while it is on (see the module's doc).
    fast: Option<FastPath>,
    /// Why the fast path is off, as last logged.
    fast_off: Option<String>,
    /// Service numbers of the fast path's tables, by member service name.
    service_ids: HashMap<String, u32>,
    /// Members that may have shortcuts, by address (see [`shortcut`]).
    shortcuts: HashMap<std::net::Ipv4Addr, shortcut::Member>,
    /// What shortcuts are made from, as the fast path last synced it: the peer links guarded by
    /// the shortcut program (index -> name), the peer prefix table and the reach pairs.
    guarded: HashMap<u32, String>,
    fast_prefixes: HashMap<ipnet::Ipv4Net, fastpath::PeerPrefix>,
    fast_pairs: BTreeSet<(u32, u32)>,
    dns_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(stop) = self.dns_stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What the node's vL3 part needs from the daemon.
pub struct Vl3Plane {
    node: String,
    underlay: IpAddr,
    underlay_mtu: u32,
    host: Arc<NetNs>,
    ipam: IpamClient<Channel>,
    dns_forward: Vec<SocketAddr>,
    pub routers: HashMap<String, Router>,
    /// DNS names of every vL3's members (all nodes), served by this node's routers.
    records: HashMap<String, nsm_dns::Records>,
}

/// The stable 24-bit VNI of the link between two nodes' routers of one vL3.
fn peer_vni(vl3: &str, a: &str, b: &str) -> u32 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let h = u64::from_str_radix(&link_name("", &format!("vl3/{vl3}/{lo}/{hi}")), 16).unwrap_or(1);
    // Fold all 40 bits of the hash into 24, so names differing in one byte differ in VNI.
    (((h ^ (h >> 24)) & 0x00ff_ffff) as u32).max(1)
}

/// The MAC of `node`'s router's links to its peers in vL3 `vl3`: derived, not learned, so that a
/// peer's members' shortcut frames can be addressed to it with no neighbour lookup. Locally
/// administered and unicast; every link of one router has it (each is its own segment).
fn peer_link_mac(vl3: &str, node: &str) -> [u8; 6] {
    let h = stable_hash(&format!("vl3-mac/{vl3}/{node}")).to_be_bytes();
    [(h[0] & 0xfc) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

/// The router namespace's name for vL3 `vl3` on `node` (under /run/netns, so it outlives the
/// daemon and a restarted one finds it).
pub fn router_netns(node: &str, vl3: &str) -> String {
    let node: String = node
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    link_name(&format!("nsm-vl3-{node}-"), vl3)
}

impl Vl3Plane {
    pub fn new(
        node: String,
        underlay: IpAddr,
        underlay_mtu: u32,
        host: Arc<NetNs>,
        channel: Channel,
        dns_forward: Vec<SocketAddr>,
    ) -> Self {
        Vl3Plane {
            node,
            underlay,
            underlay_mtu,
            host,
            ipam: IpamClient::new(channel),
            dns_forward,
            routers: HashMap::new(),
            records: HashMap::new(),
        }
    }

    /// The MTU of members' interfaces: what crosses the routers' VXLAN links without fragments.
    pub fn member_mtu(&self) -> u32 {
        self.underlay_mtu - vxlan::OVERHEAD_V4
    }

    /// Leases a new prefix of `vl3` for `member`'s members on this node, asking for `wanted`
    /// first (the prefix a member's previous address was in, so it can keep it).
    pub async fn lease(&mut self, vl3: &str, member: &str, wanted: Option<IpNet>) -> crate::Result<IpNet> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(PrefixRequest {
                r#type: Type::Allocate as i32,
                prefix: wanted.map(|p| p.to_string()).unwrap_or_default(),
                exclude_prefixes: vec![],
            })
            .await;
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        for (k, v) in [
            (IPAM_VL3_HEADER, vl3),
            (IPAM_NODE_HEADER, &self.node),
            (IPAM_MEMBER_HEADER, member),
        ] {
            req.metadata_mut().insert(
                k,
                v.parse().map_err(|_| Vl3Error::Invalid {
                    field: k.to_owned(),
                    reason: format!("{v:?} is not a valid header value"),
                })?,
            );
        }
        let mut stream = self
            .ipam
            .manage_prefixes(req)
            .await
            .map_err(Vl3Error::PrefixServer)?
            .into_inner();
        drop(tx);
        let resp = stream
            .message()
            .await
            .map_err(Vl3Error::PrefixServer)?
            .ok_or_else(|| Vl3Error::PrefixAnswer("closed the stream without an answer".into()))?;
        resp.prefix
            .parse()
            .map_err(|_| Vl3Error::PrefixAnswer(format!("answered {:?}, not a prefix", resp.prefix)))
    }

    /// Ensures this node's router of `vl3` exists (creating its namespace, sysctls and DNS server).
    pub async fn ensure_router(&mut self, vl3: &Vl3) -> crate::Result<&Router> {
        let name = router_netns(&self.node, &vl3.name);
        let path = nsm_dataplane::named_path(&name);
        let stale = self.routers.contains_key(&vl3.name) && !self.router_standing(&vl3.name);
        if stale {
            tracing::warn!(vl3 = %vl3.name, netns = %name, "vL3 router namespace vanished; rebuilding");
            self.routers.remove(&vl3.name);
        }
        if !self.routers.contains_key(&vl3.name) {
            let ns = match NetNs::open(&path) {
                Ok(ns) => ns,
                Err(_) => {
                    // A name left without its namespace (a crash half-way through) is cleared first.
                    if path.exists() {
                        let _ = NetNs::delete(&name);
                    }
                    NetNs::create(&name)?
                }
            };
            let ns = Arc::new(ns);
            let identity = ns.inode()?;
            nsm_dataplane::enable_ip_forwarding(&ns, vl3.pool.addr().is_ipv6())?;
            // Links made later skip duplicate address detection: their link-local addresses would
            // stay tentative for a second or more, and neighbour discovery with them.
            for key in ["net.ipv6.conf.default.accept_dad", "net.ipv6.conf.all.accept_dad"] {
                nsm_dataplane::write_sysctl(&ns, key, "0")?;
            }
            let nl = Netlink::connect(&ns).await?;
            nl.set_up("lo").await?;
            let records = self.records.entry(vl3.name.clone()).or_default().clone();
            let dns_stop = self.start_dns(&ns, records, &vl3.name).await;
            tracing::info!(vl3 = %vl3.name, netns = %name, "vL3 router ready");
            self.routers.insert(
                vl3.name.clone(),
                Router {
                    netns: name,
                    ns,
                    nl,
                    identity,
                    peers: HashMap::new(),
                    gateways: BTreeSet::new(),
                    filter: String::new(),
                    fast: None,
                    fast_off: None,
                    service_ids: HashMap::new(),
                    shortcuts: HashMap::new(),
                    guarded: HashMap::new(),
                    fast_prefixes: HashMap::new(),
                    fast_pairs: BTreeSet::new(),
                    dns_stop,
                },
            );
        }
        Ok(self.routers.get(&vl3.name).expect("inserted"))
    }

    /// Whether this node runs a router of `vl3` whose namespace is still the one it built.
    pub fn router_standing(&self, vl3: &str) -> bool {
        let Some(r) = self.routers.get(vl3) else { return false };
        nsm_dataplane::netns_identity(nsm_dataplane::named_path(&r.netns)) == Some(r.identity)
    }

    /// Serves the vL3's names on port 53 of the router namespace (every gateway address).
    async fn start_dns(
        &self,
        ns: &NetNs,
        records: nsm_dns::Records,
        vl3: &str,
    ) -> Option<tokio::sync::oneshot::Sender<()>> {
        let sockets = ns.run(|| {
            let udp = std::net::UdpSocket::bind("[::]:53")?;
            let tcp = std::net::TcpListener::bind("[::]:53")?;
            Ok::<_, std::io::Error>((udp, tcp))
        });
        let (udp, tcp) = match sockets {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%vl3, error = %e, "vL3 DNS server cannot bind port 53; names will not resolve");
                return None;
            }
            Err(e) => {
                tracing::warn!(%vl3, error = %e, "vL3 DNS server cannot enter the router namespace");
                return None;
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let forward = self.dns_forward.clone();
        let vl3 = vl3.to_owned();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = nsm_dns::serve(records, udp, Some(tcp), forward, shutdown).await {
                tracing::warn!(%vl3, error = %e, "vL3 DNS server stopped");
            }
        });
        Some(stop)
    }

    /// Brings this node's router of `vl3` in line with the leases (gateways, peer links, routes)
    /// and the services on it (the filter).
    pub async fn converge(
        &mut self,
        vl3: &Vl3,
        leases: &[Lease],
        nodes: &HashMap<String, IpAddr>,
        services: &[(String, Vec<String>)],
    ) -> crate::Result<()> {
        self.ensure_router(vl3).await?;
        let node = self.node.clone();
        let underlay = self.underlay;
        let mtu = self.member_mtu();
        let host = self.host.clone();
        let router = self.routers.get_mut(&vl3.name).expect("ensured");

        // Gateways of own leases on lo (and on every link the router has, for IPv6 neighbour
        // discovery, which answers only for addresses of the asking link).
        let own: BTreeSet<IpNet> = leases.iter().filter(|l| l.node == node).map(Lease::gateway).collect();
        for gw in own.difference(&router.gateways.clone()) {
            router.nl.add_address("lo", *gw).await?;
            router.gateways.insert(*gw);
        }
        for gw in router.gateways.clone().difference(&own) {
            let _ = router.nl.delete_address("lo", *gw).await;
            router.gateways.remove(gw);
        }

        // Peers: every other node holding a lease.
        let mut wanted: HashMap<String, BTreeSet<IpNet>> = HashMap::new();
        for l in leases.iter().filter(|l| l.node != node && !l.node.is_empty()) {
            wanted.entry(l.node.clone()).or_default().insert(l.prefix);
        }
        for gone in router
            .peers
            .keys()
            .filter(|p| !wanted.contains_key(*p))
            .cloned()
            .collect::<Vec<_>>()
        {
            let link = link_name("vx-", &gone);
            let _ = router.nl.delete_link(&link).await;
            if let Some(f) = router.fast.as_mut() {
                let _ = f.detach(&router.nl, &link).await;
            }
            router.peers.remove(&gone);
            tracing::info!(vl3 = %vl3.name, peer = %gone, "vL3 peer link removed");
        }
        let mut failures = Vec::new();
        for (peer, prefixes) in wanted {
            let Some(&remote) = nodes.get(&peer) else { continue };
            // One peer that cannot be reached must not cut this router off from the others.
            let link = PeerLink {
                vl3: &vl3.name,
                node: &node,
                peer: &peer,
                remote,
                underlay,
                mtu,
            };
            if let Err(err) = Self::converge_peer(router, &host, &link, prefixes, &own).await {
                failures.push(format!("peer {peer}: {err}"));
            }
        }
        for f in &failures {
            tracing::warn!(vl3 = %vl3.name, error = %f, "vL3 peer link");
        }

        // The filter: replaced as a whole, atomically, when it changes.
        let filter = filter_script(vl3, leases, services);
        if filter != router.filter {
            let script = format!("add table inet {FILTER_TABLE}\ndelete table inet {FILTER_TABLE}\n{filter}");
            nsm_dataplane::nft_script(&router.ns, "apply vL3 filter", script).await?;
            router.filter = filter;
        }
        let direct = if vl3.pool.addr().is_ipv6() {
            Err("IPv6 vL3s take the routed path")
        } else if tracks_connections(vl3, leases, services) {
            Err("a service reaches another one-way, so replies need the router's connection tracking")
        } else {
            Ok(())
        };
        sync_fast_path(router, vl3, leases, services, direct).await;
        Ok(())
    }

    /// Puts member `addr` of service `service`, behind the router's veth end `end`, on the fast
    /// path (if it is on; else the next pass does, when it is), and gives it its shortcuts; the
    /// member's own end is `iface` in namespace `netns`, made just now if `fresh` (else adopted
    /// from an earlier run, shortcuts perhaps with it).
    #[allow(clippy::too_many_arguments)]
    pub async fn member_ready(
        &mut self,
        vl3: &str,
        addr: IpAddr,
        end: &str,
        member_mac: &[u8],
        service: &str,
        netns: &str,
        iface: &str,
        fresh: bool,
    ) {
        let Some(router) = self.routers.get_mut(vl3) else {
            return;
        };
        let IpAddr::V4(v4) = addr else { return };
        if let Ok(mac) = <[u8; 6]>::try_from(member_mac) {
            let entry = shortcut::Member::new(netns.to_owned(), iface.to_owned(), mac, service.to_owned(), fresh);
            if !router.shortcuts.get(&v4).is_some_and(|m| m.same(&entry)) {
                router.shortcuts.insert(v4, entry);
            }
        }
        let Some(id) = router.service_ids.get(service).copied() else {
            return;
        };
        let Some(fast) = router.fast.as_mut() else { return };
        let nl = &router.nl;
        let done = async {
            let Some(l) = nl.link(end).await? else {
                return Ok(());
            };
            if let Some(m) = member_entry(l.index, member_mac, &l.mac, id) {
                fast.set_member(v4, m)?;
                fast.attach(nl, end, l.index, Direction::Send).await?;
            }
            Ok::<_, nsm_dataplane::DataplaneError>(())
        };
        if let Err(e) = done.await {
            tracing::warn!(%vl3, member = %addr, error = %e, "vL3 fast path");
            return;
        }
        sync_shortcuts(router, vl3, Some(v4)).await;
    }

    /// Takes member `addr` off the fast path and removes its shortcuts (its veth pair is going).
    pub async fn member_gone(&mut self, vl3: &str, addr: IpAddr) {
        let (Some(router), IpAddr::V4(v4)) = (self.routers.get_mut(vl3), addr) else {
            return;
        };
        if let Some(f) = router.fast.as_ref() {
            let _ = f.remove_member(v4);
        }
        if let Some(mut m) = router.shortcuts.remove(&v4) {
            shortcut::clear(vl3, &mut m).await;
        }
    }

    /// One peer's link, routes and gateway addresses.
    async fn converge_peer(
        router: &mut Router,
        host: &NetNs,
        l: &PeerLink<'_>,
        prefixes: BTreeSet<IpNet>,
        own: &BTreeSet<IpNet>,
    ) -> crate::Result<()> {
        let (vl3, node, remote, underlay, mtu) = (l.vl3, l.node, l.remote, l.underlay, l.mtu);
        {
            let peer = l.peer.to_owned();
            let link = link_name("vx-", &peer);
            let known = router.peers.get(&peer).map(|(r, _, _)| *r);
            if known != Some(remote) {
                if router.nl.link(&link).await?.is_some() && known.is_some() {
                    let _ = router.nl.delete_link(&link).await;
                }
                let mac = peer_link_mac(vl3, node);
                match router.nl.link(&link).await? {
                    None => {
                        let ends = LinkEnds {
                            vni: peer_vni(vl3, node, &peer),
                            mac,
                            local: underlay,
                            remote,
                            mtu,
                        };
                        build_peer_link(host, &router.ns, &router.nl, &link, &ends).await?;
                        tracing::info!(%vl3, %peer, %remote, "vL3 peer link ready");
                    }
                    // Built by a daemon that let the kernel pick its MAC.
                    Some(l) if l.mac != mac => router.nl.set_mac(&link, mac).await?,
                    Some(_) => {}
                }
                router
                    .peers
                    .insert(peer.clone(), (remote, BTreeSet::new(), BTreeSet::new()));
            }
            let (routed, addressed) = router
                .peers
                .get(&peer)
                .map(|(_, r, a)| (r.clone(), a.clone()))
                .unwrap_or_default();
            for gw in own.difference(&addressed) {
                router.nl.add_address(&link, *gw).await?;
            }
            for p in prefixes.difference(&routed) {
                let gw = gateway_of(*p);
                router.nl.add_route(gw, None, &link).await?;
                router.nl.add_route(*p, Some(gw.addr()), &link).await?;
            }
            for p in routed.difference(&prefixes) {
                let _ = router.nl.delete_route(*p).await;
                let _ = router.nl.delete_route(gateway_of(*p)).await;
            }
            if let Some((_, r, a)) = router.peers.get_mut(&peer) {
                *r = prefixes;
                *a = own.clone();
            }
        }
        Ok(())
    }

    /// Removes the router of a vL3 this node no longer takes part in.
    pub async fn remove_router(&mut self, vl3: &str) {
        if let Some(r) = self.routers.remove(vl3) {
            let name = r.netns.clone();
            drop(r);
            match NetNs::delete(&name) {
                Ok(()) => tracing::info!(%vl3, netns = %name, "vL3 router removed"),
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(%vl3, netns = %name, error = %e, "removing the vL3 router"),
            }
        }
    }

    /// Replaces the DNS names of `vl3`'s members.
    pub fn set_records(&mut self, vl3: &str, names: Vec<(String, Vec<IpAddr>)>) {
        let records = self.records.entry(vl3.to_owned()).or_default();
        if let Err(e) = records.replace_all(names) {
            tracing::warn!(%vl3, error = %e, "vL3 DNS names");
        }
    }

    /// vL3s whose routers this node runs.
    pub fn router_names(&self) -> Vec<String> {
        self.routers.keys().cloned().collect()
    }
}

/// What identifies one router-to-router link.
struct PeerLink<'a> {
    vl3: &'a str,
    node: &'a str,
    peer: &'a str,
    remote: IpAddr,
    underlay: IpAddr,
    mtu: u32,
}

/// What one end of a router-to-router link is built with.
struct LinkEnds {
    vni: u32,
    mac: [u8; 6],
    local: IpAddr,
    remote: IpAddr,
    mtu: u32,
}

/// Builds one end of a router-to-router link: a VXLAN link whose UDP socket stays in the host
/// namespace, inside the router namespace.
async fn build_peer_link(host: &NetNs, router: &NetNs, rnl: &Netlink, name: &str, l: &LinkEnds) -> crate::Result<()> {
    let hnl = Netlink::connect(host).await?;
    hnl.create_vxlan_in(router, name, l.vni, l.local, l.remote, vxlan::PORT, l.mtu)
        .await?;
    if let Err(e) = async {
        rnl.set_mac(name, l.mac).await?;
        rnl.set_up(name).await
    }
    .await
    {
        let _ = rnl.delete_link(name).await;
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_link_macs_are_local_unicast_and_differ_by_node_and_vl3() {
        let m = peer_link_mac("mesh", "node-a");
        assert_eq!(m[0] & 0x03, 0x02, "locally administered, unicast: {m:02x?}");
        assert_eq!(m, peer_link_mac("mesh", "node-a"), "both ends derive the same");
        assert_ne!(m, peer_link_mac("mesh", "node-b"));
        assert_ne!(m, peer_link_mac("other", "node-a"));
    }

    #[test]
    fn vni_is_symmetric_and_names_fit() {
        assert_eq!(peer_vni("v", "a", "b"), peer_vni("v", "b", "a"));
        assert_ne!(peer_vni("v", "a", "b"), peer_vni("w", "a", "b"));
        assert!(peer_vni("v", "a", "b") < 1 << 24);
        assert!(link_name("vx-", "some-long-node-name").len() <= 15);
        assert_eq!(router_netns("n1", "mesh"), router_netns("n1", "mesh"));
        assert_ne!(router_netns("n1", "mesh"), router_netns("n2", "mesh"));
    }
}
