//! `VXLAN`: unencrypted cross-node vWires, a kernel VXLAN link at each end whose UDP socket stays
//! in the host namespace on the underlay, created straight into the workload's namespace (moving
//! a link between namespaces would cost tens of milliseconds).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use nsm_api::connection::Mechanism;
use nsm_dataplane::{NetNs, Netlink};

use super::{Accepted, ClientEnd, Connected, EndRequest, EndState, Tunnel, netlink_in, param};
use crate::Result;

/// Upstream's mechanism type and parameter keys (api:pkg/api/networkservice/mechanisms/vxlan,
/// common; see shared/reference/nsm-upstream.md §1.7). WIREGUARD uses the common ones too.
pub const TYPE: &str = "VXLAN";
pub const CLS_REMOTE: &str = "REMOTE";
pub const SRC_IP: &str = "src_ip";
pub const DST_IP: &str = "dst_ip";
pub const SRC_PORT: &str = "src_port";
pub const DST_PORT: &str = "dst_port";
pub const VNI: &str = "vni";
pub const MTU: &str = "MTU";
/// IANA VXLAN port, upstream's default.
pub const PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const OVERHEAD_V4: u32 = 50;
/// Outer IPv6 is 20 bytes longer.
pub const OVERHEAD_V6: u32 = 70;

/// The alias of an endpoint-side VXLAN end, so that a restarted daemon can tell the ends an
/// earlier one built from anything else in an endpoint's namespace.
pub const END_ALIAS: &str = "nsm remote vWire end";

/// The VNI of a connection: 24 bits from its id.
pub fn vni_of(id: &str) -> u32 {
    let name = super::link_name("", id);
    u32::from_str_radix(&name[..6], 16).unwrap_or(1).max(1) & 0x00ff_ffff
}

/// A client node's VXLAN offer, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanOffer {
    /// Its underlay address.
    pub src_ip: IpAddr,
    /// The VXLAN network identifier (24 bits, not 0).
    pub vni: u32,
}

impl VxlanOffer {
    /// Parses upstream's parameters; the error names the bad one.
    pub fn parse(m: &Mechanism) -> Result<Self> {
        let src_ip = param(m, SRC_IP, "an IP address")?;
        let vni: u32 = param(m, VNI, "a 24-bit number")?;
        if vni == 0 || vni >= 1 << 24 {
            return Err(crate::MechanismError::invalid(
                format!("mechanism.parameters.{VNI}"),
                "missing or not a 24-bit number",
            ));
        }
        Ok(VxlanOffer { src_ip, vni })
    }
}

/// The interface MTU of a VXLAN vWire over an underlay of `underlay_mtu` towards `remote`.
pub fn mtu(underlay_mtu: u32, remote: IpAddr) -> u32 {
    underlay_mtu - if remote.is_ipv6() { OVERHEAD_V6 } else { OVERHEAD_V4 }
}

/// This node's VXLAN side.
pub struct Vxlan {
    pub underlay: IpAddr,
    pub underlay_mtu: u32,
    pub host: Arc<NetNs>,
}

#[tonic::async_trait]
impl Tunnel for Vxlan {
    fn offer(&self, id: &str) -> Result<Mechanism> {
        let mut params = HashMap::new();
        params.insert(SRC_IP.to_owned(), self.underlay.to_string());
        params.insert(SRC_PORT.to_owned(), PORT.to_string());
        params.insert(VNI.to_owned(), vni_of(id).to_string());
        Ok(Mechanism {
            cls: CLS_REMOTE.into(),
            r#type: TYPE.into(),
            parameters: params,
        })
    }

    fn check_offer(&self, offer: &Mechanism) -> Result<()> {
        VxlanOffer::parse(offer).map(drop)
    }

    async fn accept(&self, req: &EndRequest<'_>, known: Option<&(PathBuf, String, EndState)>) -> Result<Accepted> {
        let offer = VxlanOffer::parse(req.offer)?;
        let mtu = mtu(self.underlay_mtu, offer.src_ip);
        if known.is_none() {
            if end_present(req.netns, req.link, req.pair.dst).await {
                // Adopted from an earlier daemon, which may have been one that did not mark its
                // ends: marked now, so that a later restart finds it if its client goes meanwhile.
                if let Err(e) = set_alias(req.netns, req.link).await {
                    tracing::debug!(connection = %req.id, error = %e, "marking an adopted end");
                }
            } else {
                build_end(
                    &self.host,
                    req.netns,
                    req.link,
                    offer.vni,
                    self.underlay,
                    offer.src_ip,
                    mtu,
                    req.pair.src,
                    req.pair.dst,
                    Some(END_ALIAS),
                )
                .await?;
                tracing::info!(connection = %req.id, vni = offer.vni, "remote vWire end ready");
            }
        }
        let mut params = HashMap::new();
        params.insert(DST_PORT.into(), PORT.to_string());
        Ok(Accepted {
            state: EndState::Vxlan,
            params,
            mtu,
        })
    }

    async fn connect(&self, end: &ClientEnd<'_>, answer: &Mechanism) -> Result<Connected> {
        let remote: IpAddr = answer
            .parameters
            .get(DST_IP)
            .and_then(|s| s.parse().ok())
            .unwrap_or(end.peer_underlay);
        let mtu = mtu(self.underlay_mtu, remote);
        build_end(
            &self.host,
            Path::new(end.netns),
            end.interface,
            vni_of(end.id),
            self.underlay,
            remote,
            mtu,
            end.pair.dst,
            end.pair.src,
            None,
        )
        .await?;
        if let Err(e) = super::route_beyond(end).await {
            remove_link(Path::new(end.netns), end.interface).await;
            return Err(e);
        }
        Ok(Connected { mtu, wg_id: None })
    }

    async fn remove(&self, netns: &Path, link: &str, _tunnel: Option<&str>) {
        remove_link(netns, link).await;
    }
}

/// Whether the end `link` stands in `netns` with address `dst`.
async fn end_present(netns: &Path, link: &str, dst: IpNet) -> bool {
    let Ok((_ns, nl)) = netlink_in(&netns.display().to_string()).await else {
        return false;
    };
    matches!(nl.addresses(link).await, Ok(a) if a.contains(&dst))
}

/// Deletes `link` in `netns`, if both are there.
pub async fn remove_link(netns: &Path, link: &str) {
    if let Ok((_ns, nl)) = netlink_in(&netns.display().to_string()).await {
        let _ = nl.delete_link(link).await;
    }
}

async fn set_alias(netns: &Path, link: &str) -> Result<()> {
    let (_ns, nl) = netlink_in(&netns.display().to_string()).await?;
    Ok(nl.set_alias(link, END_ALIAS).await?)
}

/// Creates a VXLAN link named `name` directly inside `target`, its UDP socket in `host` (on the
/// underlay), and gives it `alias` (if any) and `local_addr` with a host route to `peer_addr`. All
/// or nothing: a `name` already taken in `target` (another vWire's interface) is refused and left
/// alone.
#[allow(clippy::too_many_arguments)]
pub async fn build_end(
    host: &NetNs,
    target: &Path,
    name: &str,
    vni: u32,
    local: IpAddr,
    remote: IpAddr,
    mtu: u32,
    peer_addr: IpNet,
    local_addr: IpNet,
    alias: Option<&str>,
) -> Result<()> {
    let hnl = Netlink::connect(host).await?;
    let (tns, tnl) = netlink_in(&target.display().to_string()).await?;
    hnl.create_vxlan_in(&tns, name, vni, local, remote, PORT, mtu).await?;
    let configured = async {
        if let Some(alias) = alias {
            tnl.set_alias(name, alias).await?;
        }
        tnl.add_address(name, local_addr).await?;
        tnl.set_up(name).await?;
        tnl.add_route(peer_addr, None, name).await?;
        Ok::<_, nsm_dataplane::DataplaneError>(())
    }
    .await;
    if let Err(e) = configured {
        let _ = tnl.delete_link(name).await;
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(params: &[(&str, &str)]) -> Mechanism {
        Mechanism {
            cls: CLS_REMOTE.into(),
            r#type: TYPE.into(),
            parameters: params.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        }
    }

    #[test]
    fn offers_are_parsed_once_and_refused_by_name() {
        let ok = VxlanOffer::parse(&offer(&[(SRC_IP, "192.0.2.1"), (VNI, "42")])).unwrap();
        assert_eq!(
            ok,
            VxlanOffer {
                src_ip: "192.0.2.1".parse().unwrap(),
                vni: 42
            }
        );
        for (params, field) in [
            (vec![(VNI, "42")], "src_ip"),
            (vec![(SRC_IP, "not-an-ip"), (VNI, "42")], "src_ip"),
            (vec![(SRC_IP, "192.0.2.1")], "vni"),
            (vec![(SRC_IP, "192.0.2.1"), (VNI, "0")], "vni"),
            (vec![(SRC_IP, "192.0.2.1"), (VNI, "16777216")], "vni"),
        ] {
            let e = VxlanOffer::parse(&offer(&params)).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("mechanism.parameters.{field}:")),
                "{params:?}: {e}"
            );
        }
    }

    #[test]
    fn vnis_are_24_bit_and_mtus_leave_room() {
        let v = vni_of("some-connection");
        assert!(v > 0 && v < 1 << 24);
        assert_eq!(v, vni_of("some-connection"));
        assert_eq!(mtu(1500, "192.0.2.1".parse().unwrap()), 1450);
        assert_eq!(mtu(1500, "2001:db8::1".parse().unwrap()), 1430);
    }
}
