//! The node's own API for workloads on its host: `CreateClient` over the unix socket, where the
//! caller's network namespace is learned from the socket's peer credentials (as upstream's clients
//! hand their namespace to the node through the same socket).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use nsm_api::nsm::v1::{self as v1, node_service_server::NodeService, resource_service_client::ResourceServiceClient};
use nsm_dataplane::netns_identity;
use nsm_model::pb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Serves `nsm.v1.NodeService`.
pub(crate) struct LocalApi {
    /// The registry the client is created in.
    pub(crate) registry: ResourceServiceClient<Channel>,
    /// This node's name.
    pub(crate) node: String,
    /// The interfaces this node's clients hold, kept from the registry's client watch.
    pub(crate) interfaces: Interfaces,
}

/// The interfaces this node's clients hold (by client: namespace path, that namespace's identity
/// when first seen, interface), kept by the reconciler from the registry's client watch, so
/// `CreateClient` checks the names taken in a namespace without listing every client on every
/// create (which made creating N clients cost O(N²)).
#[derive(Clone, Default)]
pub(crate) struct Interfaces(Arc<parking_lot::Mutex<Held>>);

#[derive(Default)]
struct Held {
    /// Filled from a full list of the clients; until then `CreateClient` lists them itself.
    seeded: bool,
    by_client: HashMap<nsm_node_plan::ClientKey, Holder>,
}

/// One client's hold on an interface name.
struct Holder {
    /// The namespace path of its spec.
    netns: String,
    /// That namespace's identity when the client was noted.
    id: Option<(u64, u64)>,
    interface: String,
}

impl Interfaces {
    /// Records client `c` if it is node `node`'s, else forgets it.
    pub(crate) fn note(&self, node: &str, c: &pb::Client) {
        let key = nsm_node_plan::ClientKey::of(c);
        let mut held = self.0.lock();
        match c.spec.as_ref().filter(|s| s.node == node) {
            Some(s) => {
                let id = match held.by_client.get(&key) {
                    Some(h) if h.netns == s.netns => h.id,
                    _ => netns_identity(&s.netns),
                };
                let holder = Holder {
                    netns: s.netns.clone(),
                    id,
                    interface: s.interface.clone(),
                };
                held.by_client.insert(key, holder);
            }
            None => {
                held.by_client.remove(&key);
            }
        }
    }

    /// Forgets a deleted client.
    pub(crate) fn forget(&self, key: &nsm_node_plan::ClientKey) {
        self.0.lock().by_client.remove(key);
    }

    /// Every client of the node has been noted.
    pub(crate) fn seeded(&self) {
        self.0.lock().seeded = true;
    }

    /// (interface, owner) of the clients other than `except` (a name) in the namespace `netns`
    /// (identity `id`) names; None until seeded. A client at another path counts when its
    /// namespace is the same one, confirmed by a fresh look at its path.
    fn taken(&self, netns: &str, id: Option<(u64, u64)>, except: &str) -> Option<Vec<(String, String)>> {
        let held = self.0.lock();
        if !held.seeded {
            return None;
        }
        Some(
            held.by_client
                .iter()
                .filter(|(k, h)| {
                    k.name != except
                        && (h.netns == netns || (id.is_some() && h.id == id && netns_identity(&h.netns) == id))
                })
                .map(|(k, h)| (h.interface.clone(), k.upstream()))
                .collect(),
        )
    }
}

/// A lasting path for the network namespace of process `pid`: its name under /run/netns if it has
/// one, else `/proc/P/ns/net` of the longest-lived other process in it (a pod's first process), so
/// the path outlives the short-lived caller.
pub(crate) fn lasting_netns_of(pid: i32) -> Result<PathBuf, String> {
    let id = netns_identity(format!("/proc/{pid}/ns/net"))
        .ok_or_else(|| format!("cannot read the network namespace of process {pid}"))?;
    if netns_identity("/proc/1/ns/net") == Some(id) {
        return Err("the caller runs in the host's network namespace; give --netns".into());
    }
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if netns_identity(e.path()) == Some(id) {
                    return Ok(e.path());
                }
            }
        }
    }
    let mut others: Vec<i32> = std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != pid && netns_identity(format!("/proc/{p}/ns/net")) == Some(id))
        .collect();
    others.sort_unstable();
    others
        .first()
        .map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
        .ok_or_else(|| "the caller's network namespace has no name and no other process; give --netns".into())
}

#[tonic::async_trait]
impl NodeService for LocalApi {
    async fn create_client(&self, req: Request<v1::CreateRequest>) -> Result<Response<pb::Resource>, Status> {
        let caller = match nsm_transport::Peer::of(&req) {
            Some(nsm_transport::Peer::Unix { pid, .. }) => *pid,
            _ => None,
        };
        let mut resource = req
            .into_inner()
            .resource
            .ok_or_else(|| Status::invalid_argument("resource: missing"))?;
        let Some(pb::resource::Kind::Client(client)) = resource.kind.as_mut() else {
            return Err(Status::invalid_argument(
                "resource: only clients are created through a node",
            ));
        };
        let spec = client.spec.get_or_insert_with(Default::default);
        if !spec.node.is_empty() && spec.node != self.node {
            return Err(Status::invalid_argument(format!(
                "spec.node: {:?} is not this node ({:?})",
                spec.node, self.node
            )));
        }
        spec.node = self.node.clone();
        if spec.netns.is_empty() {
            let pid = caller.ok_or_else(|| {
                Status::failed_precondition("spec.netns: not given, and the caller is not on this node's unix socket")
            })?;
            spec.netns = lasting_netns_of(pid)
                .map_err(|e| Status::failed_precondition(format!("spec.netns: {e}")))?
                .display()
                .to_string();
        }
        let name = client.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        let taken = self.interfaces_in(&spec.netns, &name).await?;
        if spec.interface.is_empty() {
            spec.interface = free_interface(&taken);
        } else if let Some((_, owner)) = taken.iter().find(|(i, _)| *i == spec.interface) {
            return Err(Status::already_exists(format!(
                "spec.interface: {:?} in {} already belongs to client {owner}",
                spec.interface, spec.netns
            )));
        }
        let created = self
            .registry
            .clone()
            .create(v1::CreateRequest {
                resource: Some(resource),
            })
            .await?
            .into_inner();
        // Taken from now on, before the watch brings it back.
        if let Some(pb::resource::Kind::Client(c)) = &created.kind {
            self.interfaces.note(&self.node, c);
        }
        Ok(Response::new(created))
    }
}

impl LocalApi {
    /// Interfaces that this node's other clients have in the namespace `netns` names (compared by
    /// namespace identity: two paths may name one namespace), with their owners.
    async fn interfaces_in(&self, netns: &str, except: &str) -> Result<Vec<(String, String)>, Status> {
        let id = netns_identity(netns);
        if let Some(taken) = self.interfaces.taken(netns, id, except) {
            return Ok(taken);
        }
        let items = self
            .registry
            .clone()
            .list(v1::ListRequest {
                kind: nsm_model::Kind::Client.to_pb() as i32,
                ..Default::default()
            })
            .await?
            .into_inner()
            .items;
        Ok(items
            .into_iter()
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Client(c)) => Some(c),
                _ => None,
            })
            .filter_map(|c| {
                let m = c.metadata.unwrap_or_default();
                let s = c.spec.unwrap_or_default();
                let same =
                    s.node == self.node && (s.netns == netns || (id.is_some() && netns_identity(&s.netns) == id));
                (same && m.name != except).then(|| (s.interface, nsm_model::upstream::name_of(&m.namespace, &m.name)))
            })
            .collect())
    }
}

/// The first of `nsm-1`, `nsm-2`, … that no other client holds, so a workload that asks for
/// several vWires without naming interfaces gets one interface each.
fn free_interface(taken: &[(String, String)]) -> String {
    (1..)
        .map(|n| format!("nsm-{n}"))
        .find(|i| taken.iter().all(|(t, _)| t != i))
        .expect("some name is free")
}

/// Upstream clients asking this node for a vWire with the `KERNEL` mechanism (upstream's NSC
/// shape): each connection becomes a Client resource reconciled like any other, so it shows in
/// `nsmctl get clients`, heals and is counted the same way. A connection not refreshed within
/// [`UPSTREAM_LIFETIME`] is closed, as upstream's timeout element does.
pub(crate) mod upstream_kernel {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use nsm_api::connection::{self, Connection, Mechanism, PathSegment};
    use nsm_api::connectioncontext::{ConnectionContext, IpContext, Route};
    use nsm_api::networkservice::NetworkServiceRequest;
    use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
    use nsm_model::{Kind, pb, upstream};
    use tokio::sync::Mutex;
    use tonic::Status;
    use tonic::transport::Channel;

    /// Upstream's KERNEL mechanism (api:pkg/api/networkservice/mechanisms/kernel; common keys).
    pub(crate) const TYPE: &str = "KERNEL";
    const INODE_URL: &str = "inodeURL";
    const NAME: &str = "name";
    /// Label marking clients made from upstream connections (value: the connection id).
    pub(crate) const LABEL: &str = "nsm.dev/upstream-connection";
    /// Lifetime of an upstream connection that is not refreshed.
    pub(crate) const UPSTREAM_LIFETIME: Duration = Duration::from_secs(60);

    /// An upstream connection's client resource (namespace, name) and its expiry.
    type Entry = (String, String, SystemTime);

    /// Live upstream connections by id.
    #[derive(Clone, Default)]
    pub(crate) struct Connections(Arc<Mutex<HashMap<String, Entry>>>);

    fn bad(msg: impl Into<String>) -> Status {
        Status::invalid_argument(msg.into())
    }

    /// A resource name for a connection id (ids are uuids upstream, but any string is allowed).
    fn client_name(id: &str) -> String {
        let clean: String = id
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let clean = clean.trim_matches('-');
        if !clean.is_empty() && clean.len() <= 60 && nsm_model::validate::name("", clean).is_ok() {
            format!("up-{clean}")
        } else {
            nsm_mechanisms::link_name("up-", id)
        }
    }

    /// The namespace file an upstream `inodeURL` names (`file:///proc/…/ns/net` or a plain path).
    fn netns_path(url: &str) -> Result<String, Status> {
        if let Some(p) = url.strip_prefix("file://") {
            return Ok(p.to_owned());
        }
        if url.starts_with('/') {
            return Ok(url.to_owned());
        }
        if url.starts_with("inode://") {
            return Err(Status::unimplemented(
                "mechanism_preferences.parameters.inodeURL: inode:// URLs need file-descriptor passing, not supported yet; send file:///proc/PID/ns/net",
            ));
        }
        Err(bad(format!(
            "mechanism_preferences.parameters.inodeURL: {url:?} is not a file:// URL"
        )))
    }

    impl Connections {
        /// Handles Request (and refresh) of a KERNEL connection.
        pub(crate) async fn request(
            &self,
            registry: &ResourceServiceClient<Channel>,
            node: &str,
            req: NetworkServiceRequest,
            mech: Mechanism,
        ) -> Result<Connection, Status> {
            let mut conn = req.connection.ok_or_else(|| bad("connection: missing"))?;
            if conn.id.is_empty() {
                return Err(bad("connection.id: must not be empty"));
            }
            if conn.network_service.is_empty() {
                return Err(bad("connection.network_service: must not be empty"));
            }
            let (svc_ns, svc_name, _) = upstream::parse_name("connection.network_service", &conn.network_service)
                .map_err(|e| bad(e.to_string()))?;
            let netns = netns_path(mech.parameters.get(INODE_URL).map(String::as_str).unwrap_or_default())?;
            let interface = mech
                .parameters
                .get(NAME)
                .cloned()
                .unwrap_or_else(|| nsm_model::validate::DEFAULT_INTERFACE.into());
            let name = client_name(&conn.id);
            let mut labels = conn.labels.clone();
            // The connection id itself when it fits a label value (upstream ids are uuids), so
            // MonitorConnections reports the connection under the id its client knows.
            let id_label = if nsm_model::validate::labels("", &[("k".to_string(), conn.id.clone())].into()).is_ok() {
                conn.id.clone()
            } else {
                nsm_mechanisms::link_name("", &conn.id)
            };
            labels.insert(LABEL.into(), id_label);
            let client = pb::Client {
                metadata: Some(pb::ObjectMeta {
                    name: name.clone(),
                    namespace: svc_ns.clone(),
                    labels,
                    ..Default::default()
                }),
                spec: Some(pb::ClientSpec {
                    network_service: svc_name,
                    endpoint: if conn.network_service_endpoint_name.is_empty() {
                        String::new()
                    } else {
                        upstream::relative(
                            "connection.network_service_endpoint_name",
                            &conn.network_service_endpoint_name,
                            &svc_ns,
                        )
                        .map_err(|e| bad(e.to_string()))?
                    },
                    netns,
                    interface,
                    node: node.to_owned(),
                    encryption: String::new(),
                }),
                status: None,
            };
            let mut reg = registry.clone();
            let resource = pb::Resource {
                kind: Some(pb::resource::Kind::Client(client)),
            };
            reg.apply(v1::ApplyRequest {
                resource: Some(resource),
                dry_run: false,
            })
            .await?;
            let expires = SystemTime::now() + UPSTREAM_LIFETIME;
            self.0
                .lock()
                .await
                .insert(conn.id.clone(), (svc_ns.clone(), name.clone(), expires));

            // Wait for the reconciler's verdict (upstream requests time out after 15 s).
            let r = v1::ResourceRef {
                kind: Kind::Client.to_pb() as i32,
                namespace: svc_ns.clone(),
                name: name.clone(),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let status = loop {
                let got = reg.get(v1::GetRequest { r#ref: Some(r.clone()) }).await?.into_inner();
                let st = match got.kind {
                    Some(pb::resource::Kind::Client(c)) => c.status,
                    _ => None,
                };
                match st {
                    Some(st) if st.phase == v1::client_status::Phase::Ready as i32 => break st,
                    Some(st) if st.phase == v1::client_status::Phase::Failed as i32 => {
                        self.close(registry, &conn.id).await;
                        return Err(Status::failed_precondition(st.reason));
                    }
                    other if tokio::time::Instant::now() > deadline => {
                        self.close(registry, &conn.id).await;
                        let why = other.map(|s| s.reason).unwrap_or_else(|| "no status".into());
                        return Err(Status::deadline_exceeded(format!("vWire not ready within 10 s: {why}")));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };

            let dst_routes = status
                .dst_ip_addrs
                .iter()
                .map(|p| Route {
                    prefix: p.clone(),
                    next_hop: String::new(),
                })
                .collect();
            conn.context = Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: status.src_ip_addrs.clone(),
                    dst_ip_addrs: status.dst_ip_addrs.clone(),
                    dst_routes,
                    ..Default::default()
                }),
                mtu: status.mtu,
                ..conn.context.unwrap_or_default()
            });
            conn.mechanism = Some(mech);
            conn.network_service_endpoint_name = status.endpoint.clone();
            conn.state = connection::State::Up as i32;
            let path = conn.path.get_or_insert_with(Default::default);
            let seg = |name: String| PathSegment {
                name,
                id: conn.id.clone(),
                token: String::new(),
                expires: Some(prost_types::Timestamp::from(expires)),
                metrics: HashMap::new(),
            };
            if !path.path_segments.iter().any(|s| s.name == node) {
                path.path_segments.push(seg(node.to_owned()));
            }
            if !status.endpoint.is_empty() && !path.path_segments.iter().any(|s| s.name == status.endpoint) {
                path.path_segments.push(seg(status.endpoint.clone()));
            }
            Ok(conn)
        }

        /// Close: the client resource goes, and with it the interface.
        pub(crate) async fn close(&self, registry: &ResourceServiceClient<Channel>, id: &str) -> bool {
            let Some((ns, name, _)) = self.0.lock().await.remove(id) else {
                return false;
            };
            let r = v1::ResourceRef {
                kind: Kind::Client.to_pb() as i32,
                namespace: ns,
                name,
            };
            let _ = registry.clone().delete(v1::DeleteRequest { r#ref: Some(r) }).await;
            true
        }

        /// Closes connections that were not refreshed in time.
        pub(crate) async fn sweep(&self, registry: &ResourceServiceClient<Channel>) {
            let now = SystemTime::now();
            let expired: Vec<String> = self
                .0
                .lock()
                .await
                .iter()
                .filter(|(_, v)| v.2 < now)
                .map(|(k, _)| k.clone())
                .collect();
            for id in expired {
                tracing::info!(connection = %id, "upstream connection expired");
                self.close(registry, &id).await;
            }
        }
    }
}
