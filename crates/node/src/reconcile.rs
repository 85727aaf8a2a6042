//! The reconcile loop.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use futures::StreamExt;
use ipnet::IpNet;
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_dataplane::{NetNs, Netlink};
use nsm_model::{Kind, pb, upstream};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::select::{self, Candidate};
use crate::{Config, NodeError, ipam};

type Registry = ResourceServiceClient<Channel>;
type Phase = v1::client_status::Phase;

/// MTU of a same-node veth vWire: nothing is encapsulated.
const VETH_MTU: u32 = 1500;

/// What this daemon built for one client.
#[derive(Clone, Debug)]
struct Wired {
    netns: String,
    interface: String,
    endpoint: String,
    src: IpNet,
    dst: IpNet,
}

/// Why a client is not Ready.
struct NotReady {
    phase: Phase,
    reason: String,
    /// The registry could not be asked: keep whatever is built rather than tear it down on a blip.
    transient: bool,
}

fn pending(reason: impl Into<String>) -> NotReady {
    NotReady {
        phase: Phase::Pending,
        reason: reason.into(),
        transient: false,
    }
}

fn failed(reason: impl Into<String>) -> NotReady {
    NotReady {
        phase: Phase::Failed,
        reason: reason.into(),
        transient: false,
    }
}

fn unreachable_registry(s: &tonic::Status) -> NotReady {
    NotReady {
        phase: Phase::Pending,
        reason: format!("registry: {}", s.message()),
        transient: true,
    }
}

enum Trigger {
    Client(Box<pb::Client>, bool /* deleted */),
    Endpoints,
    Resync,
}

fn key_of(c: &pb::Client) -> (String, String) {
    c.metadata
        .as_ref()
        .map_or_else(Default::default, |m| (m.namespace.clone(), m.name.clone()))
}

fn status_err(what: &str, s: tonic::Status) -> NodeError {
    NodeError::Registry(format!("{what}: {}", s.message()))
}

/// The veth end inside the endpoint's namespace: a stable name derived from the client's uid.
fn peer_name(uid: &str) -> String {
    // FNV-1a: stable across restarts and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("nsm-{:010x}", h & 0xff_ffff_ffff)
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
    let channel = nsm_transport::connect_with(&config.registry, std::time::Duration::from_secs(5), config.tls.as_ref())
        .await
        .map_err(|e| NodeError::Registry(e.to_string()))?;
    let mut registry = Registry::new(channel);
    let node = pb::Resource {
        kind: Some(pb::resource::Kind::Node(pb::Node {
            metadata: Some(pb::ObjectMeta {
                name: config.name.clone(),
                ..Default::default()
            }),
            spec: Some(pb::NodeSpec {
                address: config.underlay.to_string(),
            }),
        })),
    };
    registry
        .apply(v1::ApplyRequest {
            resource: Some(node),
            dry_run: false,
        })
        .await
        .map_err(|s| status_err("register node", s))?;
    tracing::info!(node = %config.name, underlay = %config.underlay, "node registered");

    let (tx, mut rx) = mpsc::channel(1024);
    spawn_watch(registry.clone(), Kind::Client, tx.clone());
    spawn_watch(registry.clone(), Kind::Endpoint, tx.clone());
    let ticker = tx.clone();
    let every = config.resync;
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        loop {
            t.tick().await;
            if ticker.send(Trigger::Resync).await.is_err() {
                return;
            }
        }
    });

    let mut r = Reconciler {
        config,
        registry,
        clients: HashMap::new(),
        wired: HashMap::new(),
        rr: 0,
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            t = rx.recv() => match t {
                Some(Trigger::Client(c, deleted)) => r.on_client(*c, deleted).await,
                Some(Trigger::Endpoints) | Some(Trigger::Resync) => r.resync().await,
                None => return Err(NodeError::Registry("watch tasks stopped".into())),
            },
        }
    }
}

/// Follows one kind in the registry, re-subscribing after a dropped stream.
fn spawn_watch(mut registry: Registry, kind: Kind, tx: mpsc::Sender<Trigger>) {
    tokio::spawn(async move {
        loop {
            let req = v1::WatchRequest {
                kind: kind.to_pb() as i32,
                ..Default::default()
            };
            match registry.watch(req).await {
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    while let Some(Ok(ev)) = s.next().await {
                        let deleted = ev.r#type == v1::watch_event::Type::Deleted as i32;
                        let trigger = match ev.resource.and_then(|r| r.kind) {
                            Some(pb::resource::Kind::Client(c)) => Trigger::Client(Box::new(c), deleted),
                            Some(pb::resource::Kind::Endpoint(_)) => Trigger::Endpoints,
                            _ => continue,
                        };
                        if tx.send(trigger).await.is_err() {
                            return;
                        }
                    }
                    tracing::warn!(%kind, "registry watch ended; re-subscribing");
                }
                Err(s) => tracing::warn!(%kind, error = %s.message(), "registry watch failed; retrying"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
}

struct Reconciler {
    config: Config,
    registry: Registry,
    /// Clients assigned to this node, as last seen.
    clients: HashMap<(String, String), pb::Client>,
    wired: HashMap<(String, String), Wired>,
    rr: usize,
}

impl Reconciler {
    async fn on_client(&mut self, c: pb::Client, deleted: bool) {
        let key = key_of(&c);
        let ours = c.spec.as_ref().is_some_and(|s| s.node == self.config.name);
        if deleted || !ours {
            self.clients.remove(&key);
            self.teardown(&key).await;
            return;
        }
        // Our own status writes come back through the watch: only a spec change needs work.
        let spec_changed = self.clients.get(&key).is_none_or(|old| old.spec != c.spec);
        self.clients.insert(key.clone(), c);
        if spec_changed {
            self.reconcile(&key).await;
        }
    }

    async fn resync(&mut self) {
        let keys: Vec<_> = self.clients.keys().cloned().collect();
        for key in keys {
            self.reconcile(&key).await;
        }
    }

    async fn teardown(&mut self, key: &(String, String)) {
        let Some(w) = self.wired.remove(key) else { return };
        match unwire(&w).await {
            Ok(()) => tracing::info!(client = ?key, interface = %w.interface, "vWire removed"),
            Err(e) => tracing::warn!(client = ?key, error = %e, "removing vWire"),
        }
    }

    async fn reconcile(&mut self, key: &(String, String)) {
        let Some(client) = self.clients.get(key).cloned() else {
            return;
        };
        let outcome = self.try_reconcile(key, &client).await;
        let status = match outcome {
            Ok(status) => status,
            Err(nr) => {
                if nr.phase == Phase::Failed {
                    tracing::warn!(client = ?key, reason = %nr.reason, "vWire failed");
                }
                if nr.transient {
                    return;
                }
                // The desired vWire cannot be built now: what stands (to an endpoint that is gone
                // or no longer eligible) must not keep carrying traffic.
                self.teardown(key).await;
                let prev = client.status.clone().unwrap_or_default();
                v1::ClientStatus {
                    phase: nr.phase as i32,
                    reason: nr.reason,
                    updated: prev.updated,
                    ..Default::default()
                }
            }
        };
        self.report(key, &client, status).await;
    }

    async fn report(&mut self, key: &(String, String), client: &pb::Client, mut status: v1::ClientStatus) {
        let mut old = client.status.clone().unwrap_or_default();
        old.updated = None;
        status.updated = None;
        if client.status.is_some() && old == status {
            return;
        }
        status.updated = Some(prost_types::Timestamp::from(SystemTime::now()));
        let r = v1::ResourceRef {
            kind: Kind::Client.to_pb() as i32,
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        match self
            .registry
            .update_status(v1::UpdateStatusRequest {
                r#ref: Some(r),
                status: Some(status),
            })
            .await
        {
            Ok(resp) => {
                if let Some(pb::resource::Kind::Client(c)) = resp.into_inner().kind {
                    self.clients.insert(key.clone(), c);
                }
            }
            Err(s) => tracing::warn!(client = ?key, error = %s.message(), "cannot report status"),
        }
    }

    async fn get(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<Option<pb::Resource>, NotReady> {
        let r = v1::ResourceRef {
            kind: kind.to_pb() as i32,
            namespace: namespace.into(),
            name: name.into(),
        };
        match self.registry.get(v1::GetRequest { r#ref: Some(r) }).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(unreachable_registry(&s)),
        }
    }

    async fn list(&mut self, kind: Kind) -> Result<Vec<pb::Resource>, NotReady> {
        let req = v1::ListRequest {
            kind: kind.to_pb() as i32,
            ..Default::default()
        };
        match self.registry.list(req).await {
            Ok(r) => Ok(r.into_inner().items),
            Err(s) => Err(unreachable_registry(&s)),
        }
    }

    async fn try_reconcile(
        &mut self,
        key: &(String, String),
        client: &pb::Client,
    ) -> Result<v1::ClientStatus, NotReady> {
        let spec = client.spec.clone().unwrap_or_default();
        let namespace = key.0.clone();
        let labels = client.metadata.as_ref().map(|m| m.labels.clone()).unwrap_or_default();
        let (svc_ns, svc_name, _) = upstream::parse_name(
            "spec.networkService",
            &upstream::qualify(&spec.network_service, &namespace),
        )
        .map_err(|e| failed(e.to_string()))?;
        let service_up = upstream::name_of(&svc_ns, &svc_name);
        let service = match self.get(Kind::NetworkService, &svc_ns, &svc_name).await? {
            Some(pb::Resource {
                kind: Some(pb::resource::Kind::NetworkService(s)),
            }) => Some(s),
            _ => None,
        };

        // Select the endpoint.
        let endpoints: Vec<pb::Endpoint> = self
            .list(Kind::Endpoint)
            .await?
            .into_iter()
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Endpoint(e)) => Some(e),
                _ => None,
            })
            .filter(live)
            .collect();
        let chosen = if spec.endpoint.is_empty() {
            let Some(service) = &service else {
                return Err(pending(format!("network service {service_up:?} not found")));
            };
            let offering: Vec<(Candidate, &pb::Endpoint)> = endpoints
                .iter()
                .filter_map(|e| {
                    let up = upstream::nse_to_upstream(e);
                    up.network_service_names.contains(&service_up).then(|| {
                        let labels = up
                            .network_service_labels
                            .get(&service_up)
                            .map(|l| l.labels.clone())
                            .unwrap_or_default();
                        (
                            Candidate {
                                name: up.name.clone(),
                                labels,
                            },
                            e,
                        )
                    })
                })
                .collect();
            let candidates: Vec<Candidate> = offering.iter().map(|(c, _)| c.clone()).collect();
            let matches = service.spec.as_ref().map(|s| s.matches.clone()).unwrap_or_default();
            let eligible = select::eligible(&matches, &labels, &candidates);
            // Stay with the endpoint already wired while it is still eligible.
            let current = self.wired.get(key).map(|w| w.endpoint.clone());
            let pick = match current.filter(|c| eligible.iter().any(|e| e.name == *c)) {
                Some(c) => c,
                None => {
                    let Some(p) = select::round_robin(&eligible, self.rr) else {
                        return Err(pending(format!("no live endpoint for network service {service_up:?}")));
                    };
                    self.rr = self.rr.wrapping_add(1);
                    p.name.clone()
                }
            };
            offering
                .into_iter()
                .find(|(c, _)| c.name == pick)
                .map(|(_, e)| e.clone())
                .expect("picked from the list")
        } else {
            let pinned_up = upstream::qualify(&spec.endpoint, &namespace);
            match endpoints
                .iter()
                .find(|e| upstream::nse_to_upstream(e).name == pinned_up)
            {
                Some(e) => e.clone(),
                None => return Err(pending(format!("endpoint {pinned_up:?} not found"))),
            }
        };
        let endpoint_up = upstream::nse_to_upstream(&chosen).name;
        let ep_spec = chosen.spec.clone().unwrap_or_default();
        if ep_spec.netns.is_empty() || ep_spec.node != self.config.name {
            let where_ = if !ep_spec.address.is_empty() {
                format!("is an address endpoint ({})", ep_spec.address)
            } else {
                format!("is on node {:?}", ep_spec.node)
            };
            return Err(pending(format!(
                "endpoint {endpoint_up:?} {where_}; this node wires same-node endpoints only so far"
            )));
        }

        // Re-wire if the endpoint or the workload changed.
        if let Some(w) = self.wired.get(key)
            && (w.endpoint != endpoint_up || w.netns != spec.netns || w.interface != spec.interface)
        {
            self.teardown(key).await;
        }
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let w = match self.wired.get(key).cloned() {
            Some(w) if link_present(&w).await => w,
            _ => {
                // Adopt what an earlier run of this daemon built (it keeps forwarding across a
                // restart), else build it.
                let adopted = adopt(client, &spec, &endpoint_up).await;
                let w = match adopted {
                    Some(w) => w,
                    None => {
                        let pool: IpNet = service
                            .as_ref()
                            .and_then(|s| s.spec.as_ref())
                            .map(|s| s.cidr.clone())
                            .filter(|c| !c.is_empty())
                            .unwrap_or_else(|| ipam::DEFAULT_POOL.to_owned())
                            .parse()
                            .map_err(|_| failed("the service's CIDR does not parse"))?;
                        let used = self.used_addresses(key).await?;
                        let (src, dst) = ipam::allocate_pair(pool, &used)
                            .ok_or_else(|| failed(format!("address pool {pool} of {service_up:?} is exhausted")))?;
                        let w = Wired {
                            netns: spec.netns.clone(),
                            interface: spec.interface.clone(),
                            endpoint: endpoint_up.clone(),
                            src,
                            dst,
                        };
                        wire(&w, &ep_spec.netns, &peer_name(&uid)).await.map_err(failed)?;
                        tracing::info!(client = ?key, endpoint = %endpoint_up, src = %src, dst = %dst, "vWire ready");
                        w
                    }
                };
                self.wired.insert(key.clone(), w.clone());
                w
            }
        };
        let stats = link_stats(&w).await;
        let (ns, name) = key;
        Ok(v1::ClientStatus {
            phase: Phase::Ready as i32,
            reason: String::new(),
            endpoint: endpoint_up.clone(),
            mechanism: "KERNEL".into(),
            src_ip_addrs: vec![w.src.to_string()],
            dst_ip_addrs: vec![w.dst.to_string()],
            connection_id: uid,
            path: vec![upstream::name_of(ns, name), self.config.name.clone(), endpoint_up],
            rx_bytes: stats.rx_bytes,
            tx_bytes: stats.tx_bytes,
            rx_packets: stats.rx_packets,
            tx_packets: stats.tx_packets,
            updated: None,
            mtu: VETH_MTU,
        })
    }

    /// Addresses in use by any client (this node's wiring and every status in the registry).
    async fn used_addresses(&mut self, except: &(String, String)) -> Result<HashSet<IpAddr>, NotReady> {
        let mut used: HashSet<IpAddr> = HashSet::new();
        for (k, w) in &self.wired {
            if k != except {
                used.extend([w.src.addr(), w.dst.addr()]);
            }
        }
        for r in self.list(Kind::Client).await? {
            let Some(pb::resource::Kind::Client(c)) = &r.kind else {
                continue;
            };
            if key_of(c) == *except {
                continue;
            }
            if let Some(st) = &c.status {
                for a in st.src_ip_addrs.iter().chain(&st.dst_ip_addrs) {
                    if let Ok(n) = a.parse::<IpNet>() {
                        used.insert(n.addr());
                    }
                }
            }
        }
        Ok(used)
    }
}

/// An endpoint registration that has not expired.
fn live(e: &pb::Endpoint) -> bool {
    e.spec
        .as_ref()
        .and_then(|s| s.expiration_time.as_ref())
        .and_then(nsm_model::to_system_time)
        .is_none_or(|t| t > SystemTime::now())
}

async fn netlink_in(path: &str) -> Result<(NetNs, Netlink), String> {
    let ns = NetNs::open(Path::new(path)).map_err(|e| e.to_string())?;
    let nl = Netlink::connect(&ns).await.map_err(|e| e.to_string())?;
    Ok((ns, nl))
}

/// Builds a same-node vWire: a veth pair from the client's namespace into the endpoint's, with
/// /32 (/128) addresses and host routes to each other. All or nothing.
async fn wire(w: &Wired, endpoint_netns: &str, peer: &str) -> Result<(), String> {
    let (_cns, cnl) = netlink_in(&w.netns).await.map_err(|e| format!("client netns: {e}"))?;
    let (ens, enl) = netlink_in(endpoint_netns)
        .await
        .map_err(|e| format!("endpoint netns: {e}"))?;
    cnl.create_veth(&w.interface, peer, &ens, VETH_MTU)
        .await
        .map_err(|e| e.to_string())?;
    let configured = async {
        cnl.add_address(&w.interface, w.src).await?;
        enl.add_address(peer, w.dst).await?;
        cnl.set_up(&w.interface).await?;
        enl.set_up(peer).await?;
        cnl.add_route(w.dst, None, &w.interface).await?;
        enl.add_route(w.src, None, peer).await?;
        Ok::<_, nsm_dataplane::DataplaneError>(())
    }
    .await;
    if let Err(e) = configured {
        let _ = cnl.delete_link(&w.interface).await;
        return Err(e.to_string());
    }
    Ok(())
}

/// Removes a vWire: deleting one end of a veth pair deletes both, with their addresses and routes.
async fn unwire(w: &Wired) -> Result<(), String> {
    let (_ns, nl) = match netlink_in(&w.netns).await {
        Ok(x) => x,
        // The workload's namespace is gone, and the vWire with it.
        Err(_) => return Ok(()),
    };
    nl.delete_link(&w.interface)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn link_present(w: &Wired) -> bool {
    match netlink_in(&w.netns).await {
        Ok((_ns, nl)) => matches!(nl.link(&w.interface).await, Ok(Some(l)) if l.lower_up),
        Err(_) => false,
    }
}

async fn link_stats(w: &Wired) -> nsm_dataplane::LinkStats {
    match netlink_in(&w.netns).await {
        Ok((_ns, nl)) => nl
            .link(&w.interface)
            .await
            .ok()
            .flatten()
            .map(|l| l.stats)
            .unwrap_or_default(),
        Err(_) => Default::default(),
    }
}

/// Takes over a vWire that a previous run built, if the kernel still has exactly what the
/// client's last status says.
async fn adopt(client: &pb::Client, spec: &pb::ClientSpec, endpoint: &str) -> Option<Wired> {
    let st = client.status.as_ref()?;
    if st.phase != Phase::Ready as i32 || st.endpoint != endpoint {
        return None;
    }
    let src: IpNet = st.src_ip_addrs.first()?.parse().ok()?;
    let dst: IpNet = st.dst_ip_addrs.first()?.parse().ok()?;
    let w = Wired {
        netns: spec.netns.clone(),
        interface: spec.interface.clone(),
        endpoint: endpoint.to_owned(),
        src,
        dst,
    };
    let (_ns, nl) = netlink_in(&w.netns).await.ok()?;
    let link = nl.link(&w.interface).await.ok()??;
    let addrs = nl.addresses(&w.interface).await.ok()?;
    (link.lower_up && addrs.contains(&src)).then_some(w)
}
