//! The endpoint side of cross-node vWires, served as upstream's `networkservice.NetworkService`:
//! the client's node sends a `Request` naming the endpoint, with its mechanism offers and the IP
//! context it allocated; this node checks the request, builds its end of the tunnel into the
//! endpoint's namespace with the first offered mechanism it builds (see [`crate::mechanism`]),
//! and answers with its own parameters. Connections expire unless re-requested (refreshed)
//! before their path segment's `expires`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use nsm_api::connection::{self, Connection, Mechanism, PathSegment};
use nsm_api::networkservice::{NetworkServiceRequest, network_service_server::NetworkService};
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_dataplane::{NetNs, Netlink};
use nsm_model::{Kind, pb, upstream};
use nsm_node_plan::{MechanismKind, Pair};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cache::Cache;
use crate::gate::Caller;
use crate::{NodeError, Result};
use nsm_mechanisms::vxlan::{self, DST_IP, MTU};
use nsm_mechanisms::{self as mechanism, EndRequest, EndState, Tunnels};

/// Lifetime of a remote connection that is not refreshed. Client nodes refresh every resync
/// (30 s by default, at most `MAX_RESYNC`), so an end outlives two missed refreshes; upstream's
/// tokens live 10 min (NSM_MAX_TOKEN_LIFETIME), which keeps a dead client's end far longer.
pub const REMOTE_LIFETIME: Duration = Duration::from_secs(120);

/// The longest `--resync` that still refreshes remote ends well before they expire.
pub const MAX_RESYNC: Duration = Duration::from_secs(40);

/// One endpoint-side tunnel end this node built.
#[derive(Clone, Debug)]
struct End {
    /// The node whose client it serves (None: an `--insecure` daemon's caller): only that node
    /// refreshes or closes it.
    owner: Option<String>,
    netns: PathBuf,
    link: String,
    expires: SystemTime,
    state: EndState,
}

/// An end found at start-up in an endpoint's namespace, built by an earlier daemon for a
/// connection this one does not know: it goes at `expires` unless a request claims it first.
#[derive(Clone, Debug)]
struct Leftover {
    netns: PathBuf,
    expires: SystemTime,
}

/// The endpoint side's state, shared by the gRPC service and the expiry sweep.
#[derive(Clone)]
pub(crate) struct RemoteEnds {
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
    monitor: crate::monitor::Monitor,
    tunnels: Tunnels,
    cache: Cache,
    /// Path tokens and policies (None: `--insecure`).
    checker: Option<crate::tokens::Checker>,
}

/// What `handle` needs from a request, checked.
struct Checked {
    conn: Connection,
    endpoint: String,
    mechanism: Mechanism,
    kind: MechanismKind,
    pair: Pair,
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
        monitor: crate::monitor::Monitor,
        tunnels: Tunnels,
        cache: Cache,
        lifetime: Duration,
        checker: Option<crate::tokens::Checker>,
    ) -> Self {
        RemoteEnds {
            inner: Arc::default(),
            leftovers: Arc::default(),
            lifetime,
            registry,
            node,
            underlay,
            host_netns,
            monitor,
            tunnels,
            cache,
            checker,
        }
    }

    /// Removes every end whose connection was not refreshed in time.
    pub(crate) async fn sweep(&self) {
        let now = SystemTime::now();
        let expired: Vec<(String, End)> = self.inner.lock().await.extract_if(|_, e| e.expires < now).collect();
        for (id, end) in expired {
            tracing::info!(connection = %id, "remote connection expired");
            self.remove_end(&end).await;
            self.monitor.delete(&id);
        }
        // Under `inner`'s lock, so that no request claims a leftover while it is deleted.
        let _ends = self.inner.lock().await;
        let gone: Vec<(String, Leftover)> = self.leftovers.lock().await.extract_if(|_, e| e.expires < now).collect();
        for (link, left) in gone {
            tracing::info!(%link, netns = %left.netns.display(), "removed a vWire end an earlier daemon left and no client node asked for again");
            vxlan::remove_link(&left.netns, &link).await;
        }
    }

    /// Finds the ends an earlier daemon built in `namespaces` (the namespaces of this node's
    /// endpoints, and its host's): VXLAN links with its alias and kernel WireGuard links nsm
    /// made, under the names ends get. This daemon does not know their connections (the client
    /// may have been deleted while it was down, so no one will close them); each gets one
    /// lifetime for its client's node to ask for it again, and then goes, with the UDP port a
    /// kernel WireGuard end holds.
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

    /// The endpoint named `upstream_name`: from this node's view of the registry, else asked of
    /// the registry (one registered a moment ago may not have reached the view yet).
    async fn endpoint(&self, upstream_name: &str) -> Result<pb::EndpointSpec> {
        let (ns, name, _) = upstream::parse_name("connection.network_service_endpoint_name", upstream_name)
            .map_err(|e| NodeError::invalid(e.field, e.reason))?;
        if let Some(spec) = self.cache.endpoint(&ns, &name) {
            return Ok(spec);
        }
        let r = v1::ResourceRef {
            kind: Kind::Endpoint.to_pb() as i32,
            namespace: ns,
            name,
        };
        let got = match self.registry.clone().get(v1::GetRequest { r#ref: Some(r) }).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(NodeError::NotFound(format!("endpoint {upstream_name:?} not found")));
            }
            Err(s) => return Err(NodeError::RegistryCall(s)),
        };
        match got.kind {
            Some(pb::resource::Kind::Endpoint(e)) => Ok(e.spec.unwrap_or_default()),
            _ => Err(NodeError::NotFound(format!("endpoint {upstream_name:?} not found"))),
        }
    }

    /// What a calling node says about its client is checked against the registry: the client its
    /// path names exists, is placed on that node, and is the connection (its uid is the
    /// connection's id); the service and labels the policies see are the client's, not what the
    /// caller wrote. A node can thus neither act for another node's client nor take its
    /// connection id.
    async fn vouch(&self, conn: &mut Connection, node: &str) -> Result<()> {
        let (ns, name) = crate::tokens::client_of(conn)?;
        let r = v1::ResourceRef {
            kind: Kind::Client.to_pb() as i32,
            namespace: ns.clone(),
            name: name.clone(),
        };
        let refused = |why: &str| {
            NodeError::PermissionDenied(format!(
                "node {node} may not ask for connection {} for client {ns}/{name}: {why} (rule: a node acts for its own clients)",
                conn.id
            ))
        };
        // The watch's copy when it knows this connection; the registry itself when it does not
        // (a client created a moment ago whose event has not arrived, or one recreated since).
        let facts = match self.cache.client(&ns, &name).filter(|f| f.uid == conn.id) {
            Some(f) => f,
            None => match self.registry.clone().get(v1::GetRequest { r#ref: Some(r) }).await {
                Ok(r) => match r.into_inner().kind {
                    Some(pb::resource::Kind::Client(c)) => crate::cache::ClientFacts::of(&c),
                    _ => return Err(refused("no such client")),
                },
                Err(s) if s.code() == tonic::Code::NotFound => return Err(refused("no such client")),
                Err(s) => return Err(NodeError::RegistryCall(s)),
            },
        };
        if facts.node != node {
            return Err(refused(&format!("the client is placed on node {:?}", facts.node)));
        }
        if facts.uid != conn.id {
            return Err(refused("the connection id is not the client's"));
        }
        let service = upstream::qualify(&facts.service, &ns);
        if conn.network_service != service {
            return Err(refused(&format!("the client asks for {service:?}")));
        }
        conn.labels = facts.labels;
        Ok(())
    }

    /// Checks a request's fields, and picks the mechanism: the connection's own on a refresh,
    /// else the first preference this node builds. Nothing is touched before this passes.
    fn check(&self, req: NetworkServiceRequest) -> Result<Checked> {
        let conn = req
            .connection
            .ok_or_else(|| NodeError::invalid("connection", "missing"))?;
        if conn.id.is_empty() {
            return Err(NodeError::invalid("connection.id", "must not be empty"));
        }
        let endpoint = conn.network_service_endpoint_name.clone();
        if endpoint.is_empty() {
            return Err(NodeError::invalid(
                "connection.network_service_endpoint_name",
                "this node serves requests for a named endpoint",
            ));
        }
        let builds = |m: &Mechanism| {
            m.r#type
                .parse::<MechanismKind>()
                .ok()
                .filter(|k| self.tunnels.get(*k).is_some())
        };
        let (mechanism, kind) = conn
            .mechanism
            .iter()
            .chain(&req.mechanism_preferences)
            .find_map(|m| builds(m).map(|k| (m.clone(), k)))
            .ok_or_else(|| {
                let offered: Vec<&str> = req.mechanism_preferences.iter().map(|m| m.r#type.as_str()).collect();
                let wg_off = if self.tunnels.wireguard.is_none() && offered.contains(&MechanismKind::WireGuard.as_str())
                {
                    format!(" (WIREGUARD is disabled on node {:?})", self.node)
                } else {
                    String::new()
                };
                NodeError::Precondition(format!(
                    "mechanism_preferences: none this node builds: offered [{}], it builds {}{wg_off}",
                    offered.join(", "),
                    self.tunnels.names(),
                ))
            })?;
        self.tunnels
            .get(kind)
            .expect("chosen because this node builds it")
            .check_offer(&mechanism)?;
        let ip = conn
            .context
            .as_ref()
            .and_then(|c| c.ip_context.clone())
            .unwrap_or_default();
        // One host address each (/32, /128) that may be a vWire's: an address is what this node
        // adds to the endpoint's namespace, with a host route to the peer — a prefix such as
        // 0.0.0.0/0 would be a route over the namespace's own (the host's, for an endpoint there).
        let parse = |field: &str, v: &[String]| -> Result<IpNet> {
            let field = format!("connection.context.ip_context.{field}");
            let [one] = v else {
                return Err(NodeError::invalid(
                    field,
                    format!("expected exactly one addr/len, got {}", v.len()),
                ));
            };
            let net: IpNet = one
                .parse()
                .map_err(|_| NodeError::invalid(&field, format!("{one:?} is not an addr/len")))?;
            let addr = net.addr();
            if net.prefix_len() != net.max_prefix_len() {
                return Err(NodeError::invalid(
                    &field,
                    format!("{net} is not a single address (/32 or /128)"),
                ));
            }
            if addr.is_unspecified()
                || addr.is_loopback()
                || addr.is_multicast()
                || net == "255.255.255.255/32".parse::<IpNet>().expect("literal")
            {
                return Err(NodeError::invalid(&field, format!("{net} cannot be a vWire's address")));
            }
            Ok(net)
        };
        let pair = Pair {
            src: parse("src_ip_addrs", &ip.src_ip_addrs)?,
            dst: parse("dst_ip_addrs", &ip.dst_ip_addrs)?,
        };
        Ok(Checked {
            conn,
            endpoint,
            mechanism,
            kind,
            pair,
        })
    }

    async fn handle(
        &self,
        req: NetworkServiceRequest,
        owner: Option<&str>,
        peer: Option<&nsm_transport::Peer>,
        signer: Option<&[u8]>,
    ) -> Result<Connection> {
        let Checked {
            mut conn,
            endpoint,
            mechanism,
            kind,
            pair,
        } = self.check(req)?;
        let expires = SystemTime::now() + self.lifetime;
        // Another node's request: path tokens and policies, before anything is looked up or
        // built. (Local callers on the unix socket are the host's own, trusted as root is.)
        let checked = match (&self.checker, owner) {
            (Some(checker), Some(node)) => {
                self.vouch(&mut conn, node).await?;
                checker.check(&mut conn, peer, signer, &self.node, &endpoint, expires)?;
                true
            }
            _ => false,
        };
        // The client node's WireGuard key must be the one it publishes.
        if let (MechanismKind::WireGuard, Some(node), Some(_)) = (kind, owner, &self.checker) {
            let key = mechanism
                .parameters
                .get(mechanism::wireguard::SRC_PUBLIC_KEY)
                .cloned()
                .unwrap_or_default();
            crate::wgkeys::check(
                &self.cache,
                node,
                &key,
                &format!("mechanism.parameters.{}", mechanism::wireguard::SRC_PUBLIC_KEY),
            )
            .await?;
        }
        let tunnel = self.tunnels.get(kind).expect("checked: this node builds it");
        let ep = self.endpoint(&endpoint).await?;
        // A node's request carries addresses of the service's pool, as the registry leased them.
        if checked {
            let (svc_ns, svc_name, _) = upstream::parse_name("connection.network_service", &conn.network_service)
                .map_err(|e| NodeError::invalid(e.field, e.reason))?;
            let view = self.cache.snapshot();
            let spec = view.service(&svc_ns, &svc_name).and_then(|s| s.spec.as_ref());
            // The service's encryption binds the endpoint's side too: whatever the client's node
            // decided, a `required` service gets no plaintext tunnel here.
            if spec.is_some_and(|s| s.encryption == "required") && !kind.encrypted() {
                return Err(NodeError::PermissionDenied(format!(
                    "service {} requires encryption; {} is not encrypted (rule: the service's encryption is a floor, on both nodes)",
                    conn.network_service,
                    kind.as_str()
                )));
            }
            let cidr = spec
                .map(|s| s.cidr.clone())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| nsm_model::pairs::DEFAULT_POOL.to_owned());
            let pool: IpNet = cidr
                .parse()
                .map_err(|_| NodeError::Precondition(format!("service {}: pool {cidr:?}", conn.network_service)))?;
            for (field, a) in [("src_ip_addrs", pair.src), ("dst_ip_addrs", pair.dst)] {
                if !pool.contains(&a.addr()) {
                    return Err(NodeError::PermissionDenied(format!(
                        "connection.context.ip_context.{field}: {a} is not in service {}'s pool {pool} (rule: a vWire's addresses come from its service's pool)",
                        conn.network_service
                    )));
                }
            }
        }
        // A node's request is for a service the endpoint offers (an address endpoint without a
        // list serves what its clients pin it for).
        if checked && !ep.network_services.is_empty() {
            let ep_ns = upstream::parse_name("connection.network_service_endpoint_name", &endpoint)
                .map_err(|e| NodeError::invalid(e.field, e.reason))?
                .0;
            if !ep
                .network_services
                .iter()
                .any(|s| upstream::qualify(s, &ep_ns) == conn.network_service)
            {
                return Err(NodeError::PermissionDenied(format!(
                    "endpoint {endpoint:?} does not offer {:?}",
                    conn.network_service
                )));
            }
        }
        // The end goes into the endpoint's namespace here, or into this host's own namespace when
        // the endpoint is this host's address (a server running nsm).
        let netns = if !ep.netns.is_empty() && ep.node == self.node {
            PathBuf::from(&ep.netns)
        } else if ep.netns.is_empty() && ep.address.parse::<IpAddr>().ok() == Some(self.underlay) {
            self.host_netns.path().to_path_buf()
        } else {
            return Err(NodeError::Precondition(format!(
                "endpoint {endpoint:?} lives neither in a namespace on node {:?} nor at its address {}",
                self.node, self.underlay
            )));
        };
        let link = mechanism::peer_link(&conn.id);
        let mut ends = self.inner.lock().await;
        if let Some(e) = ends.get(&conn.id) {
            check_owner(&conn.id, e, owner)?;
        }
        // An end of another mechanism (the policy changed) goes before this one is built.
        let mut known = ends.get(&conn.id).cloned();
        if let Some(old) = known.take_if(|e| e.state.kind() != kind) {
            self.remove_end(&old).await;
        }
        let known = known.map(|e| (e.netns, e.link, e.state));
        let accepted = tunnel
            .accept(
                &EndRequest {
                    id: &conn.id,
                    netns: &netns,
                    link: &link,
                    pair,
                    offer: &mechanism,
                },
                known.as_ref(),
            )
            .await
            .map_err(NodeError::EndpointSide)?;
        // An end an earlier daemon left under this name is this connection's again.
        self.leftovers.lock().await.remove(&link);
        ends.insert(
            conn.id.clone(),
            End {
                owner: owner.map(str::to_owned),
                netns,
                link,
                expires,
                state: accepted.state,
            },
        );
        drop(ends);

        let mut params = mechanism.parameters.clone();
        // A refresh may carry the last answer's parameters back: this answer's replace them.
        params.remove(mechanism::wireguard::DST_LANE_PORTS);
        params.insert(DST_IP.into(), self.underlay.to_string());
        params.insert(MTU.into(), accepted.mtu.to_string());
        params.extend(accepted.params);
        conn.mechanism = Some(Mechanism {
            cls: vxlan::CLS_REMOTE.into(),
            r#type: kind.as_str().into(),
            parameters: params,
        });
        // With path tokens the checker has added this node's signed segment already.
        if !checked {
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
        }
        conn.state = connection::State::Up as i32;
        if let Some(ctx) = conn.context.as_mut() {
            ctx.mtu = accepted.mtu;
        }
        self.monitor.update(conn.clone());
        Ok(conn)
    }

    async fn close(&self, conn: Connection, owner: Option<&str>) -> Result<()> {
        let end = {
            let mut ends = self.inner.lock().await;
            if let Some(e) = ends.get(&conn.id) {
                check_owner(&conn.id, e, owner)?;
            }
            ends.remove(&conn.id)
        };
        if let Some(end) = end {
            self.remove_end(&end).await;
            self.monitor.delete(&conn.id);
            tracing::info!(connection = %conn.id, "remote vWire end closed");
        }
        Ok(())
    }

    async fn remove_end(&self, end: &End) {
        if let Some(t) = self.tunnels.get(end.state.kind()) {
            t.remove(&end.netns, &end.link, end.state.tunnel()).await;
        }
    }
}

/// Only the node that asked for an end refreshes or closes it.
fn check_owner(id: &str, end: &End, caller: Option<&str>) -> Result<()> {
    match (&end.owner, caller) {
        (Some(owner), Some(c)) if owner != c => Err(NodeError::PermissionDenied(format!(
            "node {c} may not change connection {id}: node {owner} asked for it (rule: a node acts on its own connections)"
        ))),
        _ => Ok(()),
    }
}

/// Whether `l` is an endpoint-side end nsm built: named as ends are (`nsm-` and ten hex digits)
/// and a VXLAN link with its alias or a kernel WireGuard link nsm made.
fn is_leftover(l: &nsm_dataplane::LinkInfo) -> bool {
    let named = l
        .name
        .strip_prefix("nsm-")
        .is_some_and(|h| h.len() == 10 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    let ours = match l.kind.as_deref() {
        Some("vxlan") => l.alias.as_deref() == Some(vxlan::END_ALIAS),
        Some("wireguard") => mechanism::wireguard::is_ours(l),
        _ => false,
    };
    named && ours
}

/// The node's upstream `networkservice.NetworkService`: `KERNEL` requests from workloads on this
/// host (upstream clients), and tunnel requests from other nodes for endpoints on this host.
pub(crate) struct NodeService {
    pub(crate) ends: RemoteEnds,
    pub(crate) local: crate::local::upstream_kernel::Connections,
}

#[tonic::async_trait]
impl NetworkService for NodeService {
    async fn request(&self, req: Request<NetworkServiceRequest>) -> Result<Response<Connection>, Status> {
        let caller: Caller = nsm_authz::caller(&req)?;
        let peer = nsm_transport::Peer::of(&req).cloned();
        let signer = req
            .metadata()
            .get_bin(crate::tokens::SIGNER_CERT)
            .and_then(|v| v.to_bytes().ok())
            .map(|b| b.to_vec());
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
        let conn = match (kernel, &caller) {
            (Some(mech), Caller::Local) => {
                self.local
                    .request(&self.ends.registry, &self.ends.node, req, mech)
                    .await?
            }
            (Some(_), Caller::Node(n)) => {
                return Err(Status::permission_denied(format!(
                    "node {n} may not request a KERNEL connection (rule: KERNEL is for workloads on this host's unix socket)"
                )));
            }
            (None, c) => {
                self.ends
                    .handle(req, c.node(), peer.as_ref(), signer.as_deref())
                    .await?
            }
        };
        Ok(Response::new(conn))
    }

    async fn close(&self, req: Request<Connection>) -> Result<Response<()>, Status> {
        let caller: Caller = nsm_authz::caller(&req)?;
        let conn = req.into_inner();
        if caller.node().is_some() || !self.local.close(&self.ends.registry, &conn.id).await {
            self.ends.close(conn, caller.node()).await?;
        }
        Ok(Response::new(()))
    }
}
