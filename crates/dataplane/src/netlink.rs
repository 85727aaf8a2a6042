//! rtnetlink, bound to one namespace: links (veth, VXLAN), addresses and routes.
//!
//! The only module that speaks rtnetlink, so an rtnetlink upgrade touches this file alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags,
    LinkInfo as NlLinkInfo, LinkMessage, MacVlanMode,
};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::{Handle, LinkMacVlan, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::error::{DataplaneError, Result, netlink_errno, netlink_io};
use crate::netns::NetNs;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_LINK_NAME: usize = 15;

/// A link as the data plane cares about it: identity, state and traffic counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index in its namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Link kind (`veth`, `vxlan`, `bridge`, …); `None` for kind-less links such as `lo`.
    pub kind: Option<String>,
    /// Current MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Carrier present (`IFF_LOWER_UP`): for a veth, both ends are up.
    pub lower_up: bool,
    /// Link-layer address (`IFLA_ADDRESS`; a MAC for veth and VXLAN), empty if it has none.
    pub mac: Vec<u8>,
    /// Its alias (`IFLA_IFALIAS`, `ip link set NAME alias TEXT`), if it has one: nsm marks links
    /// it may later adopt or delete by name.
    pub alias: Option<String>,
    /// Traffic counters (`IFLA_STATS64`).
    pub stats: LinkStats,
}

/// 64-bit traffic counters of a link, from `IFLA_STATS64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets dropped on transmit.
    pub tx_dropped: u64,
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination prefix (`0.0.0.0/0` / `::/0` for a default route).
    pub dst: IpNet,
    /// Next hop, if the route has one.
    pub gateway: Option<IpAddr>,
    /// Output device name, if the route has one.
    pub dev: Option<String>,
}

/// A permanent neighbour entry (one nsm set: it resolves addresses without ARP/ND).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourInfo {
    /// Interface index the entry is on.
    pub index: u32,
    /// The neighbour's address.
    pub ip: IpAddr,
    /// Its link-layer address.
    pub mac: Vec<u8>,
}

/// An rtnetlink handle whose socket lives in one namespace: every request acts on that namespace,
/// from whichever task or thread calls it. Cheap to clone; the socket (which keeps the namespace
/// alive) closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
    ns: PathBuf,
}

impl Netlink {
    /// Opens a netlink socket inside `ns` (on a dedicated thread that entered it) and drives the
    /// connection on the caller's tokio runtime. Must be called from within a tokio runtime.
    pub async fn connect(ns: &NetNs) -> Result<Netlink> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns
            .run_async(move || {
                // The socket is registered with the caller's reactor but created in `ns`.
                let _guard = rt.enter();
                rtnetlink::new_connection()
            })
            .await?
            .map_err(|source| DataplaneError::Namespace {
                op: "open netlink socket in",
                path: ns.path().to_path_buf(),
                source,
            })?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            ns: ns.path().to_path_buf(),
        })
    }

    /// The namespace this handle acts on (its path, for messages).
    pub fn ns_path(&self) -> &std::path::Path {
        &self.ns
    }

    /// Creates a veth pair: `name` here, `peer` created directly inside `peer_ns` (the peer's
    /// `IFLA_NET_NS_FD` is part of the create request, so the peer is never visible in the wrong
    /// namespace). Both ends get `mtu` and are left down.
    pub async fn create_veth(&self, name: &str, peer: &str, peer_ns: &NetNs, mtu: u32) -> Result<()> {
        const OP: &str = "create veth";
        check_name(OP, name)?;
        check_name(OP, peer)?;
        let peer_msg = LinkUnspec::new_with_name(peer)
            .mtu(mtu)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        let object = format!("{name}/{peer} (peer in {})", peer_ns.path().display());
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.nl_err(OP, object, e))
    }

    /// Creates a unicast point-to-point VXLAN link (no multicast group, learning off): frames go to
    /// `remote:port` from `local`. Left down. Its UDP socket opens, when it is brought up, in *this*
    /// namespace, even after the link is moved elsewhere with [`Netlink::move_to`].
    pub async fn create_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: IpAddr,
        remote: IpAddr,
        port: u16,
        mtu: u32,
    ) -> Result<()> {
        self.vxlan(name, vni, local, remote, port, mtu, None).await
    }

    /// Like [`Netlink::create_vxlan`], but the link is created directly inside `target` (the
    /// request carries `IFLA_NET_NS_FD`) while its UDP socket still opens in *this* namespace: the
    /// same kernel state as creating it here and moving it, without the move, which waits for RCU
    /// grace periods (tens of milliseconds). `name` only has to be free in `target`.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_vxlan_in(
        &self,
        target: &NetNs,
        name: &str,
        vni: u32,
        local: IpAddr,
        remote: IpAddr,
        port: u16,
        mtu: u32,
    ) -> Result<()> {
        self.vxlan(name, vni, local, remote, port, mtu, Some(target)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn vxlan(
        &self,
        name: &str,
        vni: u32,
        local: IpAddr,
        remote: IpAddr,
        port: u16,
        mtu: u32,
        target: Option<&NetNs>,
    ) -> Result<()> {
        const OP: &str = "create vxlan";
        check_name(OP, name)?;
        if vni >= 1 << 24 {
            return Err(invalid(OP, format!("VNI {vni} does not fit in 24 bits")));
        }
        let builder = LinkVxlan::new(name, vni).port(port).learning(false).mtu(mtu);
        let builder = match (local, remote) {
            (IpAddr::V4(l), IpAddr::V4(r)) => builder.local(l).remote(r),
            (IpAddr::V6(l), IpAddr::V6(r)) => builder.local6(l).remote6(r),
            _ => {
                return Err(invalid(
                    OP,
                    format!("local {local} and remote {remote} are of different families"),
                ));
            }
        };
        let (builder, object) = match target {
            Some(ns) => (
                builder.setns_by_fd(ns.as_raw_fd()),
                format!(
                    "{name} (vni {vni}, {local} -> {remote}:{port}, in {})",
                    ns.path().display()
                ),
            ),
            None => (builder, format!("{name} (vni {vni}, {local} -> {remote}:{port})")),
        };
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|e| self.nl_err(OP, object, e))
    }

    /// Creates a macvlan link `name` on link `lower` of this namespace, directly inside `target`,
    /// in private mode (no traffic between macvlans of one lower link): what it sends leaves
    /// through `lower`'s transmit path at once, with no queue or receive pass in between. It gets
    /// link-layer address `mac`, no ARP (`IFF_NOARP`: its neighbours need no resolution) and is
    /// left down.
    pub async fn create_macvlan_in(&self, target: &NetNs, name: &str, lower: &str, mac: [u8; 6]) -> Result<()> {
        const OP: &str = "create macvlan";
        check_name(OP, name)?;
        let index = self.index(OP, lower).await?;
        let msg = LinkMacVlan::new(name, index, MacVlanMode::Private)
            .address(mac.to_vec())
            .arp(false)
            .setns_by_fd(target.as_raw_fd())
            .build();
        let object = format!("{name} (on {lower}, in {})", target.path().display());
        self.add_link(OP, object, msg).await
    }

    /// Moves link `name` into `ns` (`ip link set NAME netns NS`). It arrives down there; a VXLAN
    /// keeps its UDP socket in the namespace it was created in.
    pub async fn move_to(&self, name: &str, ns: &NetNs) -> Result<()> {
        const OP: &str = "move link";
        let index = self.index(OP, name).await?;
        let msg = LinkUnspec::new_with_index(index).setns_by_fd(ns.as_raw_fd()).build();
        let object = format!("{name} to {}", ns.path().display());
        self.set_link(OP, object, msg).await
    }

    /// Brings link `name` up.
    pub async fn set_up(&self, name: &str) -> Result<()> {
        const OP: &str = "set up link";
        let index = self.index(OP, name).await?;
        self.set_link(OP, name.to_string(), LinkUnspec::new_with_index(index).up().build())
            .await
    }

    /// Brings link `name` down.
    pub async fn set_down(&self, name: &str) -> Result<()> {
        const OP: &str = "set down link";
        let index = self.index(OP, name).await?;
        self.set_link(OP, name.to_string(), LinkUnspec::new_with_index(index).down().build())
            .await
    }

    /// Sets the MTU of link `name`.
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<()> {
        const OP: &str = "set mtu of link";
        let index = self.index(OP, name).await?;
        let object = format!("{name} to {mtu}");
        self.set_link(OP, object, LinkUnspec::new_with_index(index).mtu(mtu).build())
            .await
    }

    /// Renames link `name` to `new` (the link must be down). Lets a link be created under a name
    /// unique in one namespace and given its final name in the namespace it is moved to.
    pub async fn rename(&self, name: &str, new: &str) -> Result<()> {
        const OP: &str = "rename link";
        check_name(OP, new)?;
        let index = self.index(OP, name).await?;
        let object = format!("{name} to {new}");
        self.set_link(OP, object, LinkUnspec::new_with_index(index).name(new).build())
            .await
    }

    /// Sets the link-layer address of link `name` (`ip link set NAME address MAC`); the link may
    /// be up if its kind allows (VXLAN, veth, bridge do).
    pub async fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<()> {
        const OP: &str = "set address of link";
        let index = self.index(OP, name).await?;
        let object = format!("{name} to {}", format_mac(&mac));
        self.set_link(
            OP,
            object,
            LinkUnspec::new_with_index(index).address(mac.to_vec()).build(),
        )
        .await
    }

    /// Sets the alias of link `name` (`ip link set NAME alias ALIAS`).
    pub async fn set_alias(&self, name: &str, alias: &str) -> Result<()> {
        const OP: &str = "set alias of link";
        let index = self.index(OP, name).await?;
        let object = format!("{name} to {alias:?}");
        self.set_link(OP, object, LinkUnspec::new_with_index(index).alias(alias).build())
            .await
    }

    /// Brings link `name` up with alias `alias` and no IPv6 addresses of its own (address
    /// generation mode `none`: no link-local address, so no duplicate address detection, router
    /// solicitations or MLD from it): for a link that carries only IPv4. Two requests, because the
    /// kernel brings a link up before it applies the mode of the same request.
    pub async fn set_up_ipv4_only(&self, name: &str, alias: &str) -> Result<()> {
        const OP: &str = "bring up (IPv4 only)";
        let index = self.index(OP, name).await?;
        let msg = LinkUnspec::new_with_index(index)
            .alias(alias)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![
                AfSpecInet6::AddrGenMode(In6AddrGenMode::None),
            ])]))
            .build();
        self.set_link(OP, name.to_string(), msg).await?;
        self.set_link(OP, name.to_string(), LinkUnspec::new_with_index(index).up().build())
            .await
    }

    /// Attaches link `name` to bridge `bridge` (`ip link set NAME master BRIDGE`).
    pub async fn set_controller(&self, name: &str, bridge: &str) -> Result<()> {
        const OP: &str = "attach link";
        let index = self.index(OP, name).await?;
        let bridge_index = self.index(OP, bridge).await?;
        let object = format!("{name} to {bridge}");
        self.set_link(
            OP,
            object,
            LinkUnspec::new_with_index(index).controller(bridge_index).build(),
        )
        .await
    }

    /// Creates a bridge (left down), e.g. the shared underlay of a test bed.
    pub async fn create_bridge(&self, name: &str, mtu: u32) -> Result<()> {
        const OP: &str = "create bridge";
        check_name(OP, name)?;
        let msg = rtnetlink::LinkBridge::new(name).mtu(mtu).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.nl_err(OP, name.to_string(), e))
    }

    /// Adds `addr` (address and prefix length) to link `name`. Idempotent: the same address already
    /// present is success. IPv6 addresses skip duplicate address detection (`nodad`): nsm's IPAM
    /// owns uniqueness, and DAD would leave the address unusable for a second or more.
    pub async fn add_address(&self, name: &str, addr: IpNet) -> Result<()> {
        const OP: &str = "add address";
        let index = self.index(OP, name).await?;
        let mut req = self.handle.address().add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if netlink_errno(&e) == Some(nix::libc::EEXIST) => Ok(()),
            Err(e) => Err(self.nl_err(OP, format!("{addr} on {name}"), e)),
        }
    }

    /// Removes `addr` from link `name`; `false` if it was not there.
    pub async fn delete_address(&self, name: &str, addr: IpNet) -> Result<bool> {
        const OP: &str = "delete address";
        let index = self.index(OP, name).await?;
        let found: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .set_prefix_length_filter(addr.prefix_len())
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.nl_err(OP, format!("{addr} on {name}"), e))?;
        let Some(msg) = found.into_iter().next() else {
            return Ok(false);
        };
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if netlink_errno(&e) == Some(nix::libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(self.nl_err(OP, format!("{addr} on {name}"), e)),
        }
    }

    /// Adds (or replaces) a main-table route to `dst` via `gateway` (if any) out of `dev`.
    /// Idempotent. A gateway-less IPv4 route gets link scope, as `ip route add DST dev DEV` does.
    pub async fn add_route(&self, dst: IpNet, gateway: Option<IpAddr>, dev: &str) -> Result<()> {
        const OP: &str = "add route";
        let object = match gateway {
            Some(gw) => format!("{dst} via {gw} dev {dev}"),
            None => format!("{dst} dev {dev}"),
        };
        let index = self.index(OP, dev).await?;
        let dst = dst.trunc();
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| invalid(OP, format!("{object}: {e}")))?
            .output_interface(index);
        match gateway {
            Some(gw) => {
                builder = builder.gateway(gw).map_err(|e| invalid(OP, format!("{object}: {e}")))?;
            }
            None if dst.addr().is_ipv4() => builder = builder.scope(RouteScope::Link),
            None => {}
        }
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(|e| self.nl_err(OP, object, e))
    }

    /// Adds (or replaces) a link-scope IPv4 route to `dst` out of `dev`, with preferred source
    /// `src` (an address of another link: `dev` may have none).
    pub async fn add_route_from(&self, dst: ipnet::Ipv4Net, dev: &str, src: Ipv4Addr) -> Result<()> {
        const OP: &str = "add route";
        let object = format!("{dst} dev {dev} src {src}");
        let index = self.index(OP, dev).await?;
        let dst = dst.trunc();
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .pref_source(src)
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| self.nl_err(OP, object, e))
    }

    /// Deletes the main-table route to `dst`; `false` if there was none.
    pub async fn delete_route(&self, dst: IpNet) -> Result<bool> {
        const OP: &str = "delete route";
        let dst = dst.trunc();
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| invalid(OP, format!("{dst}: {e}")))?
            .build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if netlink_errno(&e) == Some(nix::libc::ESRCH) => Ok(false),
            Err(e) => Err(self.nl_err(OP, dst.to_string(), e)),
        }
    }

    /// Adds (or replaces) a permanent neighbour entry: `ip` on link `name` is at link-layer address
    /// `mac`, so no ARP/ND is needed to reach it. Permanent entries do not count towards the
    /// kernel's neighbour-table garbage-collection thresholds (`gc_thresh3`, shared by every
    /// namespace), which dynamic entries of many point-to-point links would exhaust. It goes with
    /// the link.
    pub async fn add_neighbour(&self, name: &str, ip: IpAddr, mac: &[u8]) -> Result<()> {
        const OP: &str = "add neighbour";
        let index = self.index(OP, name).await?;
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| self.nl_err(OP, format!("{ip} on {name}"), e))
    }

    /// The permanent neighbour entries of this namespace (IPv4 and IPv6).
    pub async fn permanent_neighbours(&self) -> Result<Vec<NeighbourInfo>> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.nl_err("list neighbours", "(all)".to_string(), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let mut ip = None;
                let mut mac = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
                        NeighbourAttribute::LinkLayerAddress(l) => mac = Some(l.clone()),
                        _ => {}
                    }
                }
                Some(NeighbourInfo {
                    index: m.header.ifindex,
                    ip: ip?,
                    mac: mac?,
                })
            })
            .collect())
    }

    /// Runs eBPF program `prog` (a `sched_cls` program, named `name` in `tc filter show`) in
    /// direct-action mode at ingress of link `link`, replacing the one attached there before, and
    /// makes the link's `ingress` qdisc first if it has none (a `clsact` one serves as well). A tc
    /// filter, not a tcx link: attaching one costs no RCU grace period under the RTNL lock (tcx's
    /// does, ~15 ms), and it stays when the process that attached it exits.
    pub async fn attach_tc_ingress(&self, link: &str, prog: std::os::fd::BorrowedFd<'_>, name: &str) -> Result<()> {
        const OP: &str = "attach tc ingress program to";
        let index = self.index(OP, link).await?;
        match self.handle.qdisc().add(index as i32).ingress().execute().await {
            Ok(()) => {}
            Err(e) if netlink_errno(&e) == Some(nix::libc::EEXIST) => {}
            Err(e) => return Err(self.nl_err(OP, link.to_string(), e)),
        }
        self.attach_tc(OP, link, index, TcHandle::MIN_INGRESS, prog, name).await
    }

    /// Like [`Netlink::attach_tc_ingress`], at egress: the link's qdisc becomes `clsact`, which
    /// has both hooks. An `ingress` qdisc standing there goes first, with its filters, so callers
    /// attach their ingress program after this.
    pub async fn attach_tc_egress(&self, link: &str, prog: std::os::fd::BorrowedFd<'_>, name: &str) -> Result<()> {
        const OP: &str = "attach tc egress program to";
        let index = self.index(OP, link).await?;
        self.ensure_clsact(OP, link, index).await?;
        self.attach_tc(OP, link, index, TcHandle::MIN_EGRESS, prog, name).await
    }

    async fn ensure_clsact(&self, op: &'static str, link: &str, index: u32) -> Result<()> {
        let qdisc = |kind: &str| {
            let mut msg = TcMessage::with_index(index as i32);
            msg.header.parent = TcHandle::CLSACT;
            msg.header.handle = TcHandle {
                major: 0xffff,
                minor: 0,
            };
            msg.attributes.push(TcAttribute::Kind(kind.to_string()));
            msg
        };
        let add = || {
            let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(qdisc("clsact")));
            req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            req
        };
        match self.tc_request(op, link, add()).await {
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
            other => return other,
        }
        // Something holds the hook: clsact already, or an `ingress` qdisc, which a delete that
        // names its kind removes (the kernel refuses it with EINVAL for any other kind).
        let mut del = NetlinkMessage::from(RouteNetlinkMessage::DelQueueDiscipline(qdisc("ingress")));
        del.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        match self.tc_request(op, link, del).await {
            Ok(()) => self.tc_request(op, link, add()).await,
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn attach_tc(
        &self,
        op: &'static str,
        link: &str,
        index: u32,
        hook: u16,
        prog: std::os::fd::BorrowedFd<'_>,
        name: &str,
    ) -> Result<()> {
        let mut msg = tc_filter(index, hook);
        msg.attributes.push(TcAttribute::Kind(TcFilterBpf::KIND.to_string()));
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_raw_fd() as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.to_string())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        self.tc_request(op, link, req).await
    }

    /// Removes what [`Netlink::attach_tc_ingress`] attached at ingress of `link`; `false` if
    /// nothing (or no such link) was there.
    pub async fn detach_tc_ingress(&self, link: &str) -> Result<bool> {
        self.detach_tc("detach tc ingress program from", link, TcHandle::MIN_INGRESS)
            .await
    }

    /// Removes what [`Netlink::attach_tc_egress`] attached at egress of `link`; `false` if
    /// nothing (or no such link) was there.
    pub async fn detach_tc_egress(&self, link: &str) -> Result<bool> {
        self.detach_tc("detach tc egress program from", link, TcHandle::MIN_EGRESS)
            .await
    }

    async fn detach_tc(&self, op: &'static str, link: &str, hook: u16) -> Result<bool> {
        let Some(l) = self.link(link).await? else {
            return Ok(false);
        };
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(tc_filter(l.index, hook)));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        match self.tc_request(op, link, req).await {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ENOENT | nix::libc::EINVAL)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn tc_request(&self, op: &'static str, link: &str, req: NetlinkMessage<RouteNetlinkMessage>) -> Result<()> {
        let mut handle = self.handle.clone();
        let mut answers = handle.request(req).map_err(|e| self.nl_err(op, link.to_string(), e))?;
        while let Some(msg) = answers.next().await {
            if let NetlinkPayload::Error(err) = msg.payload
                && err.code.is_some()
            {
                return Err(self.nl_err(op, link.to_string(), rtnetlink::Error::NetlinkError(err)));
            }
        }
        Ok(())
    }

    /// Deletes link `name` (for a veth, both ends go); `false` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        const OP: &str = "delete link";
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if netlink_errno(&e) == Some(nix::libc::ENODEV) => Ok(false),
            Err(e) => Err(self.nl_err(OP, name.to_string(), e)),
        }
    }

    /// Link `name`, or `None` if there is no such link in this namespace.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        const OP: &str = "get link";
        check_name(OP, name)?;
        let mut stream = self.handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_info(&msg))),
            Ok(None) => Ok(None),
            Err(e) if netlink_errno(&e) == Some(nix::libc::ENODEV) => Ok(None),
            Err(e) => Err(self.nl_err(OP, name.to_string(), e)),
        }
    }

    /// Every link of this namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.nl_err("list links", "(all)".to_string(), e))?;
        Ok(msgs.iter().map(link_info).collect())
    }

    /// The addresses (with prefix length) of link `name`, IPv4 and IPv6, link-local included.
    pub async fn addresses(&self, name: &str) -> Result<Vec<IpNet>> {
        const OP: &str = "list addresses of";
        let index = self.index(OP, name).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.nl_err(OP, name.to_string(), e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                IpNet::new(local.or(address)?, m.header.prefix_len).ok()
            })
            .collect())
    }

    /// The routes of the main table, IPv4 then IPv6.
    pub async fn routes(&self) -> Result<Vec<RouteInfo>> {
        const OP: &str = "list routes";
        let names: HashMap<u32, String> = self.links().await?.into_iter().map(|l| (l.index, l.name)).collect();
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(|e| self.nl_err(OP, "(main table)".to_string(), e))?;
            out.extend(
                msgs.iter()
                    .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
                    .filter_map(|m| {
                        let mut dst = None;
                        let mut gateway = None;
                        let mut dev = None;
                        for attr in &m.attributes {
                            match attr {
                                RouteAttribute::Destination(a) => dst = route_ip(a),
                                RouteAttribute::Gateway(a) => gateway = route_ip(a),
                                RouteAttribute::Oif(i) => {
                                    dev = Some(names.get(i).cloned().unwrap_or_else(|| i.to_string()))
                                }
                                _ => {}
                            }
                        }
                        let dst = dst.unwrap_or(match m.header.address_family {
                            netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        });
                        let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
                        Some(RouteInfo { dst, gateway, dev })
                    }),
            );
        }
        Ok(out)
    }

    async fn index(&self, op: &'static str, name: &str) -> Result<u32> {
        match self.link(name).await? {
            Some(l) => Ok(l.index),
            None => Err(DataplaneError::LinkNotFound {
                op,
                name: name.to_string(),
                ns: self.ns.clone(),
            }),
        }
    }

    pub(crate) async fn add_link(&self, op: &'static str, object: String, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.nl_err(op, object, e))
    }

    async fn set_link(&self, op: &'static str, object: String, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| self.nl_err(op, object, e))
    }

    fn nl_err(&self, op: &'static str, object: String, e: rtnetlink::Error) -> DataplaneError {
        DataplaneError::Netlink {
            op,
            object,
            ns: self.ns.clone(),
            source: netlink_io(e),
        }
    }
}

/// The one ingress filter nsm keeps on a link: priority 1, handle 1, every protocol.
/// The one filter nsm keeps at a link's `hook` (`TcHandle::MIN_INGRESS` or `MIN_EGRESS`).
fn tc_filter(index: u32, hook: u16) -> TcMessage {
    const ETH_P_ALL: u16 = 0x0003;
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle {
        major: 0xffff,
        minor: hook,
    };
    msg.header.handle = TcHandle { major: 0, minor: 1 };
    msg.header.info = u32::from(TcHandle {
        major: 1,
        minor: ETH_P_ALL.to_be(),
    });
    msg
}

/// `aa:bb:cc:dd:ee:ff`, for messages.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn invalid(op: &'static str, reason: String) -> DataplaneError {
    DataplaneError::InvalidArgument { op, reason }
}

/// Rejects names the kernel would refuse, with a message that says why (the kernel says `EINVAL`).
pub(crate) fn check_name(op: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_LINK_NAME || name.contains(['/', ' ', '\0', ':']) {
        return Err(invalid(
            op,
            format!("{name:?} is not a valid link name (1 to {MAX_LINK_NAME} bytes, no '/', ':' or space)"),
        ));
    }
    Ok(())
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        lower_up: msg.header.flags.contains(LinkFlags::LowerUp),
        mac: Vec::new(),
        alias: None,
        stats: LinkStats::default(),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name.clone_from(n),
            LinkAttribute::IfAlias(a) => info.alias = Some(a.clone()),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::Address(a) => info.mac.clone_from(a),
            LinkAttribute::Stats64(s) => {
                info.stats = LinkStats {
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    rx_packets: s.rx_packets,
                    tx_packets: s.tx_packets,
                    rx_dropped: s.rx_dropped,
                    tx_dropped: s.tx_dropped,
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let NlLinkInfo::Kind(k) = i {
                        info.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
