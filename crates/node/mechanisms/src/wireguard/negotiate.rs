//! WIREGUARD negotiated between two nodes ([`Tunnel`]): the client's node offers its underlay
//! address, the port its end will listen on, its public key and its extra lanes' ports; the
//! endpoint's node builds its end and answers with its own; the client's node builds its end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use nsm_api::connection::Mechanism;

use super::params::{answered_lanes, format_lane_ports, parse_lane_ports};
use super::{DST_LANE_PORTS, DST_PUBLIC_KEY, End, HostSide, OVERHEAD, SRC_LANE_PORTS, SRC_PUBLIC_KEY, TYPE, Wg};
use crate::vxlan::{CLS_REMOTE, DST_IP, DST_PORT, SRC_IP, SRC_PORT};
use crate::{Accepted, ClientEnd, Connected, EndRequest, EndState, Tunnel, param};
use crate::{MechanismError, Result};

/// A client node's WIREGUARD offer, validated; kept with the end built for it, since another
/// address or port means another end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgEnd {
    /// The offer's `src_ip`, `src_port` and the ports of its other lanes.
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub src_lanes: Vec<u16>,
    /// The offer's `src_public_key`, decoded (a new one is moved to in place).
    pub key: [u8; 32],
    /// The ports the end listens on, the first lane's first.
    pub ports: Vec<u16>,
    /// The end's tunnel id in this node's [`Wg`].
    pub tunnel: String,
}

impl WgEnd {
    /// Parses upstream's parameters (and nsm's lane ports); the error names the bad one.
    pub fn parse(m: &Mechanism) -> Result<Self> {
        let src_ip = param(m, SRC_IP, "an IP address")?;
        let src_port: u16 = param(m, SRC_PORT, "a UDP port")?;
        if src_port == 0 {
            return Err(MechanismError::invalid(
                format!("mechanism.parameters.{SRC_PORT}"),
                "missing or not a UDP port",
            ));
        }
        let key = m
            .parameters
            .get(SRC_PUBLIC_KEY)
            .and_then(|k| nsm_wireguard::decode_key(k).ok())
            .ok_or_else(|| {
                MechanismError::invalid(
                    format!("mechanism.parameters.{SRC_PUBLIC_KEY}"),
                    "missing or not a WireGuard key",
                )
            })?;
        let src_lanes = parse_lane_ports(m.parameters.get(SRC_LANE_PORTS))
            .map_err(|e| MechanismError::invalid(format!("mechanism.parameters.{SRC_LANE_PORTS}"), e))?;
        Ok(WgEnd {
            src_ip,
            src_port,
            src_lanes,
            key,
            ports: Vec::new(),
            tunnel: String::new(),
        })
    }

    /// Whether an end built for `self` serves `offer` (same address and ports).
    fn same_place(&self, offer: &WgEnd) -> bool {
        (self.src_ip, self.src_port, &self.src_lanes) == (offer.src_ip, offer.src_port, &offer.src_lanes)
    }
}

impl Wg {
    fn host_side(&self) -> Result<&HostSide> {
        self.host
            .as_ref()
            .ok_or_else(|| MechanismError::WireGuard("this node's WireGuard side has no host namespace".into()))
    }
}

#[tonic::async_trait]
impl Tunnel for Wg {
    fn offer(&self, id: &str) -> Result<Mechanism> {
        let host = self.host_side()?;
        let mut params = HashMap::new();
        params.insert(SRC_IP.to_owned(), host.underlay.to_string());
        let ports = self.ports_for(&super::client_end_id(id), self.lanes());
        params.insert(SRC_PORT.to_owned(), ports[0].to_string());
        if ports.len() > 1 {
            params.insert(SRC_LANE_PORTS.to_owned(), format_lane_ports(&ports[1..]));
        }
        params.insert(SRC_PUBLIC_KEY.to_owned(), self.public_key());
        Ok(Mechanism {
            cls: CLS_REMOTE.into(),
            r#type: TYPE.into(),
            parameters: params,
        })
    }

    fn check_offer(&self, offer: &Mechanism) -> Result<()> {
        WgEnd::parse(offer).map(drop)
    }

    async fn accept(&self, req: &EndRequest<'_>, known: Option<&(PathBuf, String, EndState)>) -> Result<Accepted> {
        let offer = WgEnd::parse(req.offer)?;
        let host = self.host_side()?;
        let mtu = host.underlay_mtu - OVERHEAD;
        let id = super::endpoint_end_id(req.id);
        // Built already for this offer's address and ports (a refresh): keep it, with the offer's
        // key (the client's node rotated its key: the tunnel moves to the new one in place). A
        // restarted daemon has no tunnels (a userspace one lived in the old process; a kernel
        // link is adopted), so it builds the end again.
        let mut same = known
            .and_then(|(_, _, s)| match s {
                EndState::WireGuard(w) => Some(w.clone()),
                EndState::Vxlan => None,
            })
            .filter(|w| w.same_place(&offer) && self.has(&id));
        if let Some(w) = &same
            && w.key != offer.key
            && !self.set_peer_key(&id, offer.key).await
        {
            same = None;
        }
        let ports = match same {
            Some(w) => w.ports,
            None => {
                // As many lanes as both nodes run.
                let lanes = (offer.src_lanes.len() + 1).min(self.lanes());
                let ports = self.ports_for(&id, lanes);
                let ports = self
                    .build(End {
                        id: id.clone(),
                        netns: req.netns,
                        name: req.link,
                        host: &host.netns,
                        listen: host.underlay,
                        port: ports[0],
                        peer_key: offer.key,
                        peer_endpoint: SocketAddr::new(offer.src_ip, offer.src_port),
                        allowed: vec![req.pair.src],
                        mtu,
                        local_addr: req.pair.dst,
                        peer_addr: req.pair.src,
                        extra_lanes: ports[1..]
                            .iter()
                            .copied()
                            .zip(offer.src_lanes.iter().copied().map(Some))
                            .collect(),
                    })
                    .await?;
                tracing::info!(connection = %req.id, ?ports, "remote WIREGUARD vWire end ready");
                ports
            }
        };
        let mut params = HashMap::new();
        params.insert(DST_PORT.into(), ports[0].to_string());
        params.insert(DST_PUBLIC_KEY.into(), self.public_key());
        if ports.len() > 1 {
            params.insert(DST_LANE_PORTS.into(), format_lane_ports(&ports[1..]));
        }
        Ok(Accepted {
            state: EndState::WireGuard(WgEnd {
                ports,
                tunnel: id,
                ..offer
            }),
            params,
            mtu,
        })
    }

    async fn connect(&self, end: &ClientEnd<'_>, answer: &Mechanism) -> Result<Connected> {
        let host = self.host_side()?;
        let params = &answer.parameters;
        let remote_ip: IpAddr = params
            .get(DST_IP)
            .and_then(|s| s.parse().ok())
            .unwrap_or(end.peer_underlay);
        let mtu = host.underlay_mtu - OVERHEAD;
        let id = super::client_end_id(end.id);
        // As many lanes as the endpoint's node answered for; their ports as offered.
        let peer_lanes = answered_lanes(params, self.lanes()).map_err(MechanismError::WireGuard)?;
        let lanes = peer_lanes.len() + 1;
        let peer_key = params
            .get(DST_PUBLIC_KEY)
            .and_then(|k| nsm_wireguard::decode_key(k).ok())
            .ok_or_else(|| {
                MechanismError::WireGuard(
                    "the endpoint's node answered WIREGUARD without a valid dst_public_key".into(),
                )
            })?;
        let peer_port: u16 = params.get(DST_PORT).and_then(|p| p.parse().ok()).ok_or_else(|| {
            MechanismError::WireGuard("the endpoint's node answered WIREGUARD without a dst_port".into())
        })?;
        let ports = self.ports_for(&id, lanes);
        if ports.len() != lanes {
            // Every lane the endpoint built needs its peer here, or the flows hashed onto it
            // would be lost; the retry offers what fits now.
            return Err(MechanismError::WireGuard(format!(
                "no free UDP port in --wireguard-ports for each of the {lanes} WireGuard lanes"
            )));
        }
        let mut allowed = vec![end.pair.dst];
        allowed.extend(end.route);
        self.build(End {
            id: id.clone(),
            netns: Path::new(end.netns),
            name: end.interface,
            host: &host.netns,
            listen: host.underlay,
            port: ports[0],
            peer_key,
            peer_endpoint: SocketAddr::new(remote_ip, peer_port),
            allowed,
            mtu,
            local_addr: end.pair.src,
            peer_addr: end.pair.dst,
            extra_lanes: ports[1..]
                .iter()
                .copied()
                .zip(peer_lanes.into_iter().map(Some))
                .collect(),
        })
        .await?;
        if let Err(e) = crate::route_beyond(end).await {
            Wg::remove(self, &id).await;
            return Err(e);
        }
        Ok(Connected { mtu, wg_id: Some(id) })
    }

    async fn remove(&self, _netns: &Path, _link: &str, tunnel: Option<&str>) {
        // Stopping the tunnel removes its TUN (or deletes its kernel link), with its addresses
        // and routes.
        if let Some(id) = tunnel {
            Wg::remove(self, id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_parsed_once_and_refused_by_name() {
        let key = nsm_wireguard::encode_key(&nsm_wireguard::public_key(&nsm_wireguard::generate_private_key()));
        let offer = |extra: &[(&str, &str)]| {
            let mut p: HashMap<String, String> = [
                (SRC_IP, "192.0.2.1"),
                (SRC_PORT, "51820"),
                (SRC_PUBLIC_KEY, key.as_str()),
            ]
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
            for (k, v) in extra {
                if v.is_empty() {
                    p.remove(*k);
                } else {
                    p.insert((*k).into(), (*v).into());
                }
            }
            Mechanism {
                cls: CLS_REMOTE.into(),
                r#type: TYPE.into(),
                parameters: p,
            }
        };
        let ok = WgEnd::parse(&offer(&[(SRC_LANE_PORTS, "51821,51822")])).unwrap();
        assert_eq!((ok.src_port, ok.src_lanes.as_slice()), (51820, &[51821, 51822][..]));
        for (extra, field) in [
            (vec![(SRC_IP, "")], SRC_IP),
            (vec![(SRC_PORT, "0")], SRC_PORT),
            (vec![(SRC_PORT, "70000")], SRC_PORT),
            (vec![(SRC_PUBLIC_KEY, "short")], SRC_PUBLIC_KEY),
            (vec![(SRC_LANE_PORTS, "1,x")], SRC_LANE_PORTS),
        ] {
            let e = WgEnd::parse(&offer(&extra)).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("mechanism.parameters.{field}:")),
                "{extra:?}: {e}"
            );
        }
    }
}
