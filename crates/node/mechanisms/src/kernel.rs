//! `KERNEL`: a veth pair straight between two namespaces of this host — a client's and an
//! endpoint's, this host's (a gateway), or a vL3 router's. Nothing sits between the two
//! namespaces, so a vWire costs what a bare veth pair costs.

use ipnet::IpNet;
use nsm_dataplane::{LinkStats, Netlink};
use nsm_node_plan::Pair;
use nsm_node_plan::client::Observed;

use super::netlink_in;
use crate::{MechanismError, Result};

/// MTU of a same-node veth vWire: nothing is encapsulated.
pub const VETH_MTU: u32 = 1500;

/// A veth vWire's client side.
pub struct Veth<'a> {
    /// The client's namespace and interface.
    pub netns: &'a str,
    /// The client's interface.
    pub interface: &'a str,
    /// Its addresses.
    pub pair: Pair,
    /// Its MTU.
    pub mtu: u32,
    /// What the client reaches through the peer beyond the peer itself (an address endpoint, a
    /// vL3's pool).
    pub route: Option<IpNet>,
}

/// Builds a veth vWire from the client's namespace into `far_netns` (an endpoint's, this host's
/// as a gateway, or a vL3 router's), the far end named `peer`, with /32 (/128) addresses, host
/// routes to each other, permanent neighbour entries both ways and the client's route beyond the
/// peer. All or nothing. Returns the MAC of the client's end.
pub async fn wire(v: &Veth<'_>, far_netns: &str, peer: &str) -> Result<Vec<u8>> {
    let pair = create(v.netns, v.interface, far_netns, peer, v.mtu).await?;
    pair.configure(v).await
}

/// A veth pair created between two namespaces, not yet configured: creating it needs no
/// addresses, so it can be made while they are being leased.
pub struct Created {
    client: Netlink,
    far: Netlink,
    peer: String,
}

/// Creates the veth pair `interface` (in `netns`) / `peer` (in `far_netns`). A name already
/// taken is refused and left alone.
pub async fn create(netns: &str, interface: &str, far_netns: &str, peer: &str, mtu: u32) -> Result<Created> {
    let in_ns = |role: &'static str| {
        move |e: MechanismError| MechanismError::Netns {
            role,
            source: Box::new(e),
        }
    };
    let (_cns, cnl) = netlink_in(netns).await.map_err(in_ns("client"))?;
    let (ens, enl) = netlink_in(far_netns).await.map_err(in_ns("endpoint"))?;
    cnl.create_veth(interface, peer, &ens, mtu).await?;
    Ok(Created {
        client: cnl,
        far: enl,
        peer: peer.to_owned(),
    })
}

impl Created {
    /// Configures the pair as `v` says (see [`wire`]); on failure the pair is deleted.
    pub async fn configure(self, v: &Veth<'_>) -> Result<Vec<u8>> {
        let (cnl, enl, peer) = (&self.client, &self.far, self.peer.as_str());
        let (src, dst) = (v.pair.src, v.pair.dst);
        // Requests that do not depend on each other go out together (each socket answers them in
        // order): three round trips after the veth instead of ten or eleven.
        let configured = async {
            tokio::try_join!(
                cnl.add_address(v.interface, src),
                cnl.set_up(v.interface),
                enl.add_address(peer, dst),
                enl.set_up(peer),
            )?;
            let (_, _, cmac, emac) = tokio::try_join!(
                cnl.add_route(dst, None, v.interface),
                enl.add_route(src, None, peer),
                link_mac(cnl, v.interface),
                link_mac(enl, peer),
            )?;
            // Each end knows the other's MAC: no ARP/ND, and no dynamic neighbour entries, which on
            // a node with many vWires would overflow the kernel's table (shared by every
            // namespace, 1024 entries by default) and drop traffic.
            tokio::try_join!(
                cnl.add_neighbour(v.interface, dst.addr(), &emac),
                enl.add_neighbour(peer, src.addr(), &cmac),
                async {
                    match v.route {
                        Some(beyond) => cnl.add_route(beyond, Some(dst.addr()), v.interface).await,
                        None => Ok(()),
                    }
                },
            )?;
            Ok::<_, nsm_dataplane::DataplaneError>(cmac)
        }
        .await;
        match configured {
            Ok(client_mac) => Ok(client_mac),
            Err(e) => {
                self.abandon(v.interface).await;
                Err(e.into())
            }
        }
    }

    /// Deletes the pair (its addresses could not be had).
    pub async fn abandon(&self, interface: &str) {
        let _ = self.client.delete_link(interface).await;
    }
}

/// The MAC of link `name` (empty if it has none).
async fn link_mac(nl: &Netlink, name: &str) -> nsm_dataplane::Result<Vec<u8>> {
    Ok(nl.link(name).await?.map(|l| l.mac).unwrap_or_default())
}

/// Deletes `interface` in `netns` (with a veth, its peer too); whether there was one (a
/// namespace that is gone took it with it).
pub async fn remove(netns: &str, interface: &str) -> Result<bool> {
    let Ok((_ns, nl)) = netlink_in(netns).await else {
        return Ok(false);
    };
    Ok(nl.delete_link(interface).await?)
}

/// What the kernel shows of `interface` in `netns`: up with carrier, its counters, its MAC, and
/// (when `addresses`, which costs a second round trip) its addresses. None: no such link, or no
/// such namespace.
pub async fn observe(netns: &str, interface: &str, addresses: bool) -> Option<(Observed, LinkStats, Vec<u8>)> {
    let (_ns, nl) = netlink_in(netns).await.ok()?;
    let link = nl.link(interface).await.ok()??;
    let addresses = if addresses {
        nl.addresses(interface).await.ok()?
    } else {
        Vec::new()
    };
    Some((
        Observed {
            lower_up: link.lower_up,
            addresses,
        },
        link.stats,
        link.mac,
    ))
}
