//! Starting a WireGuard end: a userspace tunnel over a TUN, or a kernel `wireguard` link.

use std::net::SocketAddr;
use std::path::Path;

use nsm_dataplane::{NetNs, Netlink, WgDeviceUpdate, WgPeerUpdate};
use nsm_wireguard::{PeerConfig, Tunnel, TunnelConfig};

use super::{End, KernelEnd, Tun, Wg};
use crate::{MechanismError, WireGuardBackend};

impl Wg {
    /// Starts a tunnel end and gives its TUN the addresses and the route to the peer. Returns the
    /// bound ports, the first lane's first (one port for a kernel end, which has one lane). All or
    /// nothing.
    pub async fn build(&self, end: End<'_>) -> crate::Result<Vec<u16>> {
        let id = end.id.clone();
        let built = self.build_end(end).await;
        // Built, the tunnel holds its ports; failed, they are free again.
        self.unclaim(&id);
        built
    }

    async fn build_end(&self, end: End<'_>) -> crate::Result<Vec<u16>> {
        if self.backend == WireGuardBackend::Kernel {
            return self.build_kernel(end).await.map(|p| vec![p]);
        }
        self.stop(&end.id).await;
        let mtu =
            u16::try_from(end.mtu).map_err(|_| MechanismError::WireGuard(format!("MTU {} too large", end.mtu)))?;
        // A kernel end of a run with `--wireguard-backend kernel` left under this name goes, or
        // the TUN could not be made; a link that is not nsm's is left alone, and the end fails.
        let ns = NetNs::open(end.netns)?;
        let nl = Netlink::connect(&ns).await?;
        match nl.link(end.name).await? {
            Some(l) if is_ours(&l) => {
                nl.delete_link(end.name).await?;
                tracing::info!(tunnel = %end.id, link = %end.name, "deleted the kernel WireGuard link of an earlier run");
            }
            Some(_) => return Err(taken(end.name, end.netns)),
            None => {}
        }
        let mut tunnel = None;
        let mut last_err = String::new();
        // A port something else holds costs a retry, with the next port of every lane.
        let mut lane_ports: Vec<_> = end.extra_lanes.iter().map(|&(p, _)| self.ports_from(p)).collect();
        for port in self.ports_from(end.port) {
            let extra_lanes = end
                .extra_lanes
                .iter()
                .zip(&mut lane_ports)
                .map(|(&(_, peer), ports)| nsm_wireguard::LaneConfig {
                    listen: SocketAddr::new(end.listen, ports.next().unwrap_or(0)),
                    endpoint: peer.map(|p| SocketAddr::new(end.peer_endpoint.ip(), p)),
                })
                .collect();
            let config = TunnelConfig {
                name: end.name.to_owned(),
                tun_netns: Some(ns.try_clone()?),
                udp_netns: Some(NetNs::open(end.host.path())?),
                listen: SocketAddr::new(end.listen, port),
                private_key: self.keys.read().private,
                peer: PeerConfig {
                    public_key: end.peer_key,
                    endpoint: Some(end.peer_endpoint),
                    allowed_ips: end.allowed.clone(),
                    keepalive: None,
                    preshared_key: None,
                },
                mtu,
                offloads: nsm_wireguard::Offloads::default(),
                extra_lanes,
            };
            match tokio::task::spawn_blocking(move || Tunnel::start(config)).await? {
                Ok(t) => {
                    tunnel = Some(t);
                    break;
                }
                Err(e @ nsm_wireguard::WgError::Udp { .. }) => last_err = e.to_string(),
                Err(e) => return Err(e.into()),
            }
        }
        let tunnel = tunnel.ok_or_else(|| MechanismError::WireGuard(format!("no free UDP port: {last_err}")))?;
        let bound: Vec<u16> = tunnel.local_addrs().iter().map(SocketAddr::port).collect();
        let configured = async {
            nl.add_address(end.name, end.local_addr).await?;
            nl.set_up(end.name).await?;
            nl.add_route(end.peer_addr, None, end.name).await?;
            Ok::<_, crate::MechanismError>(())
        }
        .await;
        if let Err(e) = configured {
            let _ = tokio::task::spawn_blocking(move || tunnel.stop()).await;
            return Err(e);
        }
        let mut tunnels = self.tunnels.lock();
        // A rotation while the tunnel was being built: it missed the new key.
        let private = self.keys.read().private;
        if tunnel.keys().0 != nsm_wireguard::public_key(&private) {
            tunnel.set_private_key(private);
        }
        tunnels.insert(end.id, Tun::User(tunnel));
        Ok(bound)
    }

    /// [`Wg::build`] with a kernel link. A `wireguard` link of that name already in the namespace
    /// (an earlier daemon's) is adopted: configured in place, so a session with the same keys
    /// survives the daemon's restart. All or nothing: on failure the link is gone.
    async fn build_kernel(&self, end: End<'_>) -> crate::Result<u16> {
        self.remove_entry(&end.id).await;
        let target = NetNs::open(end.netns)?;
        let nl = Netlink::connect(&target).await?;
        let existing = nl.link(end.name).await?;
        if existing.as_ref().is_some_and(|l| !is_ours(l)) {
            return Err(taken(end.name, end.netns));
        }
        let adopted = existing.is_some();
        if !adopted {
            // Fails with nothing of ours created (a link of that name appearing meanwhile is not
            // ours to delete).
            let host = Netlink::connect(end.host).await?;
            host.create_wireguard_in(&target, end.name, end.mtu).await?;
        }
        // The key the link gets; a rotation after this is caught up below.
        let private = self.keys.read().private;
        let result = async {
            let stale = if adopted {
                if existing.as_ref().is_some_and(|l| l.mtu != end.mtu) {
                    nl.set_mtu(end.name, end.mtu).await?;
                }
                nsm_dataplane::wg_get(&target, end.name)
                    .await?
                    .peers
                    .into_iter()
                    .map(|p| p.public_key)
                    .filter(|k| *k != end.peer_key)
                    .collect()
            } else {
                nl.set_alias(end.name, LINK_ALIAS).await?;
                Vec::new()
            };
            // Up before the port is set: a link that is down binds no socket, so a taken port
            // would show only when it is brought up; up, setting the port rebinds at once.
            nl.set_up(end.name).await?;
            let mut peers: Vec<WgPeerUpdate> = stale.into_iter().map(WgPeerUpdate::removal).collect();
            peers.push(WgPeerUpdate::new(end.peer_key, end.peer_endpoint, end.allowed.clone()));
            let mut bound = None;
            for port in self.ports_from(end.port) {
                let update = WgDeviceUpdate {
                    private_key: Some(private),
                    listen_port: Some(port),
                    replace_peers: false,
                    peers: peers.clone(),
                };
                match nsm_dataplane::wg_set(&target, end.name, update).await {
                    Ok(()) => {
                        bound = Some(port);
                        break;
                    }
                    Err(e) if e.is_addr_in_use() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let bound = bound.ok_or_else(|| {
                MechanismError::WireGuard(format!(
                    "WireGuard link {}: {} UDP ports of --wireguard-ports {}-{} from {} are all taken",
                    end.name,
                    self.ports_from(end.port).count(),
                    self.ports.start(),
                    self.ports.end(),
                    end.port
                ))
            })?;
            nl.add_address(end.name, end.local_addr).await?;
            nl.add_route(end.peer_addr, None, end.name).await?;
            Ok::<_, crate::MechanismError>(bound)
        }
        .await;
        let port = match result {
            Ok(p) => p,
            Err(e) => {
                let _ = nl.delete_link(end.name).await;
                return Err(e);
            }
        };
        if adopted {
            tracing::info!(tunnel = %end.id, link = %end.name, "kept the kernel WireGuard link of an earlier run");
        }
        self.tunnels.lock().insert(
            end.id.clone(),
            Tun::Kernel(KernelEnd {
                netns: end.netns.to_path_buf(),
                name: end.name.to_owned(),
                port,
                peer_key: end.peer_key,
                peer_endpoint: end.peer_endpoint,
                allowed: end.allowed,
            }),
        );
        // A rotation while the link was being built: it missed the new key.
        let current = self.keys.read().private;
        if private != current {
            let update = WgDeviceUpdate {
                private_key: Some(current),
                ..WgDeviceUpdate::default()
            };
            if let Err(e) = set_kernel(end.netns, end.name, update).await {
                self.remove(&end.id).await;
                return Err(MechanismError::WireGuard(format!(
                    "giving WireGuard link {} the rotated key: {e}",
                    end.name
                )));
            }
        }
        Ok(port)
    }
}

/// The alias nsm gives the kernel WireGuard links it creates: only links that carry it are
/// adopted or deleted by name (a workload's own link of that name is never touched).
const LINK_ALIAS: &str = "nsm wireguard vWire end";

/// Whether link `l` is a kernel WireGuard end nsm created.
pub fn is_ours(l: &nsm_dataplane::LinkInfo) -> bool {
    l.kind.as_deref() == Some("wireguard") && l.alias.as_deref() == Some(LINK_ALIAS)
}

fn taken(name: &str, netns: &Path) -> MechanismError {
    MechanismError::Precondition(format!(
        "a link named {name} that nsm did not create exists in {}; it is left alone",
        netns.display()
    ))
}

/// Applies `update` to kernel WireGuard link `name` in the namespace at `netns`.
pub(super) async fn set_kernel(netns: &Path, name: &str, update: WgDeviceUpdate) -> nsm_dataplane::Result<()> {
    let ns = NetNs::open(netns)?;
    nsm_dataplane::wg_set(&ns, name, update).await
}
