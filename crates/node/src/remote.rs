//! The endpoint side of cross-node vWires, served as upstream's `networkservice.NetworkService`:
//! the client's node sends a `Request` naming the endpoint, with a `VXLAN` mechanism carrying its
//! underlay address and VNI, and the IP context it allocated; this node builds its end of the
//! tunnel into the endpoint's namespace and answers with its own underlay address.
//! Connections expire unless re-requested (refreshed) before their path segment's `expires`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use nsm_api::connection::{self, Connection, Mechanism, PathSegment};
use nsm_api::networkservice::{NetworkServiceRequest, network_service_server::NetworkService};
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_dataplane::{NetNs, Netlink};
use nsm_model::{Kind, pb, upstream};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Upstream's mechanism type and parameter keys (api:pkg/api/networkservice/mechanisms/vxlan,
/// common; see shared/reference/nsm-upstream.md §1.7).
pub(crate) mod vxlan {
    pub(crate) const TYPE: &str = "VXLAN";
    pub(crate) const CLS_REMOTE: &str = "REMOTE";
    pub(crate) const SRC_IP: &str = "src_ip";
    pub(crate) const DST_IP: &str = "dst_ip";
    pub(crate) const SRC_PORT: &str = "src_port";
    pub(crate) const DST_PORT: &str = "dst_port";
    pub(crate) const VNI: &str = "vni";
    pub(crate) const MTU: &str = "MTU";
    /// IANA VXLAN port, upstream's default.
    pub(crate) const PORT: u16 = 4789;
    /// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
    pub(crate) const OVERHEAD_V4: u32 = 50;
    /// Outer IPv6 is 20 bytes longer.
    pub(crate) const OVERHEAD_V6: u32 = 70;
}

/// Lifetime of a remote connection that is not refreshed. Client nodes refresh every resync
/// (30 s by default, at most `MAX_RESYNC`), so an end outlives two missed refreshes; upstream's
/// tokens live 10 min (NSM_MAX_TOKEN_LIFETIME), which keeps a dead client's end far longer.
pub const REMOTE_LIFETIME: Duration = Duration::from_secs(120);

/// The longest `--resync` that still refreshes remote ends well before they expire.
pub const MAX_RESYNC: Duration = Duration::from_secs(40);

/// One endpoint-side tunnel end this node built.
#[derive(Clone, Debug)]
struct End {
    netns: PathBuf,
    link: String,
    expires: SystemTime,
    /// A WIREGUARD end.
    wg: Option<WgEnd>,
}

/// A WIREGUARD end: the client node's offer it was built for, and the ports it listens on.
#[derive(Clone, Debug)]
struct WgEnd {
    /// The offer's `src_ip` and `src_port`, and the ports of its other lanes: another of any of
    /// them means another end.
    src_ip: String,
    src_port: String,
    src_lanes: Vec<u16>,
    /// The offer's `src_public_key` (a new one is moved to in place).
    key: String,
    /// The ports the end listens on, the first lane's first.
    ports: Vec<u16>,
}

/// The alias of an endpoint-side VXLAN end, so that a restarted daemon can tell the ends an
/// earlier one built from anything else in an endpoint's namespace.
const END_ALIAS: &str = "nsm remote vWire end";

/// An end found at start-up in an endpoint's namespace, built by an earlier daemon for a
/// connection this one does not know: it goes at `expires` unless a request claims it first.
#[derive(Clone, Debug)]
struct Leftover {
    netns: PathBuf,
    expires: SystemTime,
}

/// The endpoint side's state, shared by the gRPC service and the expiry sweep.
#[derive(Clone)]
pub struct RemoteEnds {
    inner: Arc<Mutex<HashMap<String, End>>>,
    /// Link name -> an end an earlier daemon left (see [`RemoteEnds::adopt_leftovers`]). Locked
    /// only while `inner` is.
    leftovers: Arc<Mutex<HashMap<String, Leftover>>>,
    /// How long an end lives without a refresh.
    lifetime: Duration,
    pub(crate) registry: ResourceServiceClient<Channel>,
    pub(crate) node: String,
    underlay: IpAddr,
    host_netns: Arc<NetNs>,
    underlay_mtu: u32,
    monitor: crate::monitor::Monitor,
    wg: Option<Arc<crate::wg::Wg>>,
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// FNV-1a of `id`: unlike std's hasher, stable across restarts and versions, so what a daemon
/// derives from an id (link names, VNIs, WireGuard ports) a restarted one derives alike.
pub(crate) fn stable_hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A link name derived from an id: `prefix` + 10 hex digits of its [`stable_hash`], so a
/// restarted daemon finds what it built. With a 4-character prefix it fits the kernel's
/// 15-character limit.
pub(crate) fn link_name(prefix: &str, id: &str) -> String {
    format!("{prefix}{:010x}", stable_hash(id) & 0xff_ffff_ffff)
}

/// The VNI of a connection: 24 bits from its id.
pub(crate) fn vni_of(id: &str) -> u32 {
    let name = link_name("", id);
    u32::from_str_radix(&name[..6], 16).unwrap_or(1).max(1) & 0x00ff_ffff
}

impl RemoteEnds {
    /// State for node `node` whose tunnels leave from `underlay` in `host_netns`; ends live
    /// `lifetime` without a refresh.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        registry: ResourceServiceClient<Channel>,
        node: String,
        underlay: IpAddr,
        host_netns: Arc<NetNs>,
        underlay_mtu: u32,
        monitor: crate::monitor::Monitor,
        wg: Option<Arc<crate::wg::Wg>>,
        lifetime: Duration,
    ) -> Self {
        RemoteEnds {
            inner: Arc::default(),
            leftovers: Arc::default(),
            lifetime,
            registry,
            node,
            underlay,
            host_netns,
            underlay_mtu,
            monitor,
            wg,
        }
    }

    /// Removes every end whose connection was not refreshed in time.
    pub async fn sweep(&self) {
        let now = SystemTime::now();
        let expired: Vec<(String, End)> = self.inner.lock().await.extract_if(|_, e| e.expires < now).collect();
        for (id, end) in expired {
            tracing::info!(connection = %id, "remote connection expired");
            self.remove_end(&id, &end).await;
            self.monitor.delete(&id);
        }
        // Under `inner`'s lock, so that no request claims a leftover while it is deleted.
        let _ends = self.inner.lock().await;
        let gone: Vec<(String, Leftover)> = self.leftovers.lock().await.extract_if(|_, e| e.expires < now).collect();
        for (link, left) in gone {
            tracing::info!(%link, netns = %left.netns.display(), "removed a vWire end an earlier daemon left and no client node asked for again");
            remove_link(&left.netns, &link).await;
        }
    }

    /// Finds the ends an earlier daemon built in `namespaces` (the namespaces of this node's
    /// endpoints, and its host's): VXLAN links with this module's alias and kernel WireGuard
    /// links nsm made, under the names ends get. This daemon does not know their connections
    /// (the client may have been deleted while it was down, so no one will close them); each
    /// gets one lifetime for its client's node to ask for it again, and then goes, with the UDP
    /// port a kernel WireGuard end holds.
    pub(crate) async fn adopt_leftovers(&self, namespaces: impl IntoIterator<Item = PathBuf>) {
        let expires = SystemTime::now() + self.lifetime;
        let mut found = Vec::new();
        for netns in namespaces {
            let Ok(ns) = NetNs::open(&netns) else { continue };
            let Ok(nl) = Netlink::connect(&ns).await else { continue };
            let Ok(links) = nl.links().await else { continue };
            for l in links.iter().filter(|l| is_leftover(l)) {
                found.push((l.name.clone(), netns.clone()));
            }
        }
        if found.is_empty() {
            return;
        }
        tracing::info!(
            ends = found.len(),
            lifetime = ?self.lifetime,
            "found vWire ends an earlier daemon built; each goes unless its client's node asks for it within its lifetime"
        );
        // Requests served meanwhile built or claimed their ends: those are not left over.
        let ends = self.inner.lock().await;
        let mut l = self.leftovers.lock().await;
        for (link, netns) in found {
            if !ends.values().any(|e| e.link == link && e.netns == netns) {
                l.insert(link, Leftover { netns, expires });
            }
        }
    }

    async fn endpoint(&self, upstream_name: &str) -> Result<pb::EndpointSpec, Status> {
        let (ns, name, _) = upstream::parse_name("connection.network_service_endpoint_name", upstream_name)
            .map_err(|e| bad(e.to_string()))?;
        let r = v1::ResourceRef {
            kind: Kind::Endpoint.to_pb() as i32,
            namespace: ns,
            name,
        };
        let got = self
            .registry
            .clone()
            .get(v1::GetRequest { r#ref: Some(r) })
            .await?
            .into_inner();
        match got.kind {
            Some(pb::resource::Kind::Endpoint(e)) => Ok(e.spec.unwrap_or_default()),
            _ => Err(Status::not_found(format!("endpoint {upstream_name:?} not found"))),
        }
    }

    async fn handle(&self, req: NetworkServiceRequest) -> Result<Connection, Status> {
        let mut conn = req.connection.ok_or_else(|| bad("connection: missing"))?;
        if conn.id.is_empty() {
            return Err(bad("connection.id: must not be empty"));
        }
        let endpoint_name = conn.network_service_endpoint_name.clone();
        if endpoint_name.is_empty() {
            return Err(bad(
                "connection.network_service_endpoint_name: this node serves requests for a named endpoint",
            ));
        }
        // The connection's mechanism on a refresh, else the first preference this node builds.
        let builds = |m: &Mechanism| m.r#type == vxlan::TYPE || (m.r#type == crate::wg::TYPE && self.wg.is_some());
        let mech = conn
            .mechanism
            .clone()
            .filter(|m| builds(m))
            .or_else(|| req.mechanism_preferences.iter().find(|m| builds(m)).cloned())
            .ok_or_else(|| {
                let offered: Vec<&str> = req.mechanism_preferences.iter().map(|m| m.r#type.as_str()).collect();
                let wg_off = if self.wg.is_none() && offered.contains(&crate::wg::TYPE) {
                    format!(" (WIREGUARD is disabled on node {:?})", self.node)
                } else {
                    String::new()
                };
                Status::failed_precondition(format!(
                    "mechanism_preferences: none this node builds: offered [{}], it builds VXLAN{}{wg_off}",
                    offered.join(", "),
                    if self.wg.is_some() { " and WIREGUARD" } else { "" },
                ))
            })?;
        let wireguard = mech.r#type == crate::wg::TYPE;
        let src_ip: IpAddr = mech
            .parameters
            .get(vxlan::SRC_IP)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("mechanism.parameters.src_ip: missing or not an IP address"))?;
        let vni: u32 = if wireguard {
            0
        } else {
            mech.parameters
                .get(vxlan::VNI)
                .and_then(|s| s.parse().ok())
                .filter(|v| *v > 0 && *v < (1 << 24))
                .ok_or_else(|| bad("mechanism.parameters.vni: missing or not a 24-bit number"))?
        };
        let wg_offer = if wireguard {
            let port = mech
                .parameters
                .get(vxlan::SRC_PORT)
                .filter(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
                .ok_or_else(|| bad("mechanism.parameters.src_port: missing or not a UDP port"))?;
            let key = mech
                .parameters
                .get(crate::wg::SRC_PUBLIC_KEY)
                .filter(|k| nsm_wireguard::decode_key(k).is_ok())
                .ok_or_else(|| bad("mechanism.parameters.src_public_key: missing or not a WireGuard key"))?;
            let src_lanes = crate::wg::parse_lane_ports(mech.parameters.get(crate::wg::SRC_LANE_PORTS))
                .map_err(|e| bad(format!("mechanism.parameters.{}: {e}", crate::wg::SRC_LANE_PORTS)))?;
            Some(WgEnd {
                src_ip: src_ip.to_string(),
                src_port: port.clone(),
                src_lanes,
                key: key.clone(),
                ports: Vec::new(),
            })
        } else {
            None
        };
        let ip = conn
            .context
            .as_ref()
            .and_then(|c| c.ip_context.clone())
            .unwrap_or_default();
        let parse = |field: &str, v: &[String]| -> Result<IpNet, Status> {
            v.first()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("connection.context.ip_context.{field}: expected one addr/len")))
        };
        let src = parse("src_ip_addrs", &ip.src_ip_addrs)?;
        let dst = parse("dst_ip_addrs", &ip.dst_ip_addrs)?;
        let ep = self.endpoint(&endpoint_name).await?;
        // The end goes into the endpoint's namespace here, or into this host's own namespace when
        // the endpoint is this host's address (a server running nsm).
        let netns = if !ep.netns.is_empty() && ep.node == self.node {
            PathBuf::from(&ep.netns)
        } else if ep.netns.is_empty() && ep.address.parse::<IpAddr>().ok() == Some(self.underlay) {
            self.host_netns.path().to_path_buf()
        } else {
            return Err(Status::failed_precondition(format!(
                "endpoint {endpoint_name:?} lives neither in a namespace on node {:?} nor at its address {}",
                self.node, self.underlay
            )));
        };
        let overhead = if wireguard {
            crate::wg::OVERHEAD
        } else if src_ip.is_ipv6() {
            vxlan::OVERHEAD_V6
        } else {
            vxlan::OVERHEAD_V4
        };
        let mtu = self.underlay_mtu - overhead;
        let link = link_name("nsm-", &conn.id);
        let expires = SystemTime::now() + self.lifetime;
        let mut ends = self.inner.lock().await;
        let known = ends.get(&conn.id).cloned();
        let mut wg_state = None;
        if let (Some(offer), Some(wg)) = (&wg_offer, &self.wg) {
            let id = crate::wg::endpoint_end_id(&conn.id);
            // Built already for this offer's address and ports (a refresh): keep it, with the
            // offer's key (the client's node rotated its key: the tunnel moves to the new one in
            // place). A restarted daemon has no tunnels (a userspace one lived in the old
            // process; a kernel link is adopted), so it builds the end again.
            let mut same = known.as_ref().and_then(|e| e.wg.clone()).filter(|w| {
                (&w.src_ip, &w.src_port, &w.src_lanes) == (&offer.src_ip, &offer.src_port, &offer.src_lanes)
                    && wg.has(&id)
            });
            if let Some(w) = &same
                && w.key != offer.key
            {
                let moved = match nsm_wireguard::decode_key(&offer.key) {
                    Ok(k) => wg.set_peer_key(&id, k).await,
                    Err(_) => false,
                };
                if !moved {
                    same = None;
                }
            }
            let ports = match same {
                Some(w) => w.ports,
                None => {
                    if let Some(old) = &known
                        && old.wg.is_none()
                    {
                        remove_link(&old.netns, &old.link).await;
                    }
                    let peer_key = nsm_wireguard::decode_key(&offer.key).map_err(|e| bad(e.to_string()))?;
                    let peer_port: u16 = offer.src_port.parse().unwrap_or_default();
                    // As many lanes as both nodes run.
                    let lanes = (offer.src_lanes.len() + 1).min(wg.lanes());
                    let ports = wg.ports_for(&id, lanes);
                    let ports = wg
                        .build(crate::wg::End {
                            id: id.clone(),
                            netns: &netns,
                            name: &link,
                            host: &self.host_netns,
                            listen: self.underlay,
                            port: ports[0],
                            peer_key,
                            peer_endpoint: std::net::SocketAddr::new(src_ip, peer_port),
                            allowed: vec![src],
                            mtu,
                            local_addr: dst,
                            peer_addr: src,
                            extra_lanes: ports[1..]
                                .iter()
                                .copied()
                                .zip(offer.src_lanes.iter().copied().map(Some))
                                .collect(),
                        })
                        .await
                        .map_err(|e| Status::internal(format!("building the endpoint side: {e}")))?;
                    tracing::info!(connection = %conn.id, endpoint = %endpoint_name, ?ports, "remote WIREGUARD vWire end ready");
                    ports
                }
            };
            wg_state = Some(WgEnd { ports, ..offer.clone() });
        } else if known.as_ref().is_none_or(|e| e.wg.is_some()) && !end_present(&netns, &link, dst).await {
            if let Some(old) = &known {
                self.remove_end(&conn.id, old).await;
            }
            build_end(
                &self.host_netns,
                &netns,
                &link,
                vni,
                self.underlay,
                src_ip,
                mtu,
                src,
                dst,
                Some(END_ALIAS),
            )
            .await
            .map_err(|e| Status::internal(format!("building the endpoint side: {e}")))?;
            tracing::info!(connection = %conn.id, endpoint = %endpoint_name, %vni, "remote vWire end ready");
        } else if known.is_none() && wg_state.is_none() {
            // Adopted from an earlier daemon, which may have been one that did not mark its ends:
            // marked now, so that a later restart finds it if its client goes meanwhile.
            if let Err(e) = set_end_alias(&netns, &link).await {
                tracing::debug!(connection = %conn.id, error = %e, "marking an adopted end");
            }
        }
        let dst_port = wg_state.as_ref().map_or(vxlan::PORT, |w| w.ports[0]);
        let dst_lanes = wg_state.as_ref().map(|w| crate::wg::format_lane_ports(&w.ports[1..]));
        // An end an earlier daemon left under this name is this connection's again.
        self.leftovers.lock().await.remove(&link);
        ends.insert(
            conn.id.clone(),
            End {
                netns,
                link,
                expires,
                wg: wg_state,
            },
        );
        drop(ends);

        let mut params = mech.parameters.clone();
        params.insert(vxlan::DST_IP.into(), self.underlay.to_string());
        params.insert(vxlan::DST_PORT.into(), dst_port.to_string());
        params.insert(vxlan::MTU.into(), mtu.to_string());
        if let (true, Some(wg)) = (wireguard, &self.wg) {
            params.insert(crate::wg::DST_PUBLIC_KEY.into(), wg.public_key());
        }
        // A refresh may carry the last answer's lanes back: this answer's replace them.
        params.remove(crate::wg::DST_LANE_PORTS);
        if let Some(lanes) = dst_lanes.filter(|l| !l.is_empty()) {
            params.insert(crate::wg::DST_LANE_PORTS.into(), lanes);
        }
        conn.mechanism = Some(Mechanism {
            cls: vxlan::CLS_REMOTE.into(),
            r#type: mech.r#type.clone(),
            parameters: params,
        });
        let path = conn.path.get_or_insert_with(Default::default);
        let segment = PathSegment {
            name: self.node.clone(),
            id: conn.id.clone(),
            token: String::new(),
            expires: Some(prost_types::Timestamp::from(expires)),
            metrics: HashMap::new(),
        };
        match path.path_segments.iter_mut().find(|s| s.name == self.node) {
            Some(s) => *s = segment,
            None => path.path_segments.push(segment),
        }
        conn.state = connection::State::Up as i32;
        if let Some(ctx) = conn.context.as_mut() {
            ctx.mtu = mtu;
        }
        self.monitor.update(conn.clone());
        Ok(conn)
    }

    async fn close(&self, conn: Connection) -> Result<(), Status> {
        let end = self.inner.lock().await.remove(&conn.id);
        if let Some(end) = end {
            self.remove_end(&conn.id, &end).await;
            self.monitor.delete(&conn.id);
            tracing::info!(connection = %conn.id, "remote vWire end closed");
        }
        Ok(())
    }
}

async fn end_present(netns: &Path, link: &str, dst: IpNet) -> bool {
    let Ok(ns) = NetNs::open(netns) else { return false };
    let Ok(nl) = Netlink::connect(&ns).await else {
        return false;
    };
    matches!(nl.addresses(link).await, Ok(a) if a.contains(&dst))
}

impl RemoteEnds {
    async fn remove_end(&self, id: &str, end: &End) {
        if end.wg.is_some()
            && let Some(wg) = &self.wg
        {
            wg.remove(&crate::wg::endpoint_end_id(id)).await;
            return;
        }
        remove_link(&end.netns, &end.link).await;
    }
}

async fn remove_link(netns: &Path, link: &str) {
    if let Ok(ns) = NetNs::open(netns)
        && let Ok(nl) = Netlink::connect(&ns).await
    {
        let _ = nl.delete_link(link).await;
    }
}

async fn set_end_alias(netns: &Path, link: &str) -> Result<(), String> {
    let ns = NetNs::open(netns).map_err(|e| e.to_string())?;
    let nl = Netlink::connect(&ns).await.map_err(|e| e.to_string())?;
    nl.set_alias(link, END_ALIAS).await.map_err(|e| e.to_string())
}

/// Whether `l` is an endpoint-side end nsm built: named as ends are (`nsm-` and ten hex digits)
/// and a VXLAN link with [`END_ALIAS`] or a kernel WireGuard link nsm made.
fn is_leftover(l: &nsm_dataplane::LinkInfo) -> bool {
    let named = l
        .name
        .strip_prefix("nsm-")
        .is_some_and(|h| h.len() == 10 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    let ours = match l.kind.as_deref() {
        Some("vxlan") => l.alias.as_deref() == Some(END_ALIAS),
        Some("wireguard") => crate::wg::is_ours(l),
        _ => false,
    };
    named && ours
}

/// Creates a VXLAN link named `name` directly inside `target`, its UDP socket in `host` (on the
/// underlay), and gives it `alias` (if any) and `local_addr` with a host route to `peer_addr`. All
/// or nothing: a `name` already taken in `target` (another vWire's interface) is refused and left
/// alone.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build_end(
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
) -> Result<(), String> {
    let hnl = Netlink::connect(host).await.map_err(|e| e.to_string())?;
    let tns = NetNs::open(target).map_err(|e| e.to_string())?;
    let tnl = Netlink::connect(&tns).await.map_err(|e| e.to_string())?;
    hnl.create_vxlan_in(&tns, name, vni, local, remote, vxlan::PORT, mtu)
        .await
        .map_err(|e| e.to_string())?;
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
        return Err(e.to_string());
    }
    Ok(())
}

/// The node's upstream `networkservice.NetworkService`: `KERNEL` requests from workloads on this
/// host (upstream clients), and `VXLAN` requests from other nodes for endpoints on this host.
pub struct NodeService {
    pub(crate) ends: RemoteEnds,
    pub(crate) local: crate::local::upstream_kernel::Connections,
}

#[tonic::async_trait]
impl NetworkService for NodeService {
    async fn request(&self, req: Request<NetworkServiceRequest>) -> Result<Response<Connection>, Status> {
        let req = req.into_inner();
        let refreshing = req.connection.as_ref().and_then(|c| c.mechanism.clone());
        let kernel = refreshing
            .filter(|m| m.r#type == crate::local::upstream_kernel::TYPE)
            .or_else(|| {
                req.mechanism_preferences
                    .iter()
                    .find(|m| m.r#type == crate::local::upstream_kernel::TYPE)
                    .cloned()
            });
        let conn = match kernel {
            Some(mech) => {
                self.local
                    .request(&self.ends.registry, &self.ends.node, req, mech)
                    .await?
            }
            None => self.ends.handle(req).await?,
        };
        Ok(Response::new(conn))
    }

    async fn close(&self, req: Request<Connection>) -> Result<Response<()>, Status> {
        let conn = req.into_inner();
        if !self.local.close(&self.ends.registry, &conn.id).await {
            self.ends.close(conn).await?;
        }
        Ok(Response::new(()))
    }
}
