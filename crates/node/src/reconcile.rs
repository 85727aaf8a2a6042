//! The reconcile loop.

mod member;
mod records;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use ipnet::IpNet;
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_dataplane::{NetNs, Netlink};
use nsm_model::{Kind, pb, upstream};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::remote::{self, RemoteEnds, vxlan};
use crate::select::{self, Candidate};
use crate::wg::{self, Encryption, Wg};
use crate::{Config, NodeError, ipam};
use nsm_api::connection::{Connection, Mechanism, Path as ConnPath, PathSegment};
use nsm_api::connectioncontext::{ConnectionContext, IpContext};
use nsm_api::networkservice::{NetworkServiceRequest, network_service_client::NetworkServiceClient};

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
    mtu: u32,
    /// Cross-node: the endpoint node's URL and the connection it accepted (refreshed, closed).
    remote: Option<(String, Connection)>,
    /// An address endpoint's host, routed through the vWire via `dst`.
    route: Option<IpNet>,
    /// Gateway vWire: this node masquerades `src` → the route's address on the underlay.
    nat: bool,
    /// KERNEL, VXLAN or WIREGUARD.
    mechanism: &'static str,
    /// A WIREGUARD vWire: its tunnel's id in this node's [`Wg`].
    wg_id: Option<String>,
}

/// Where the far end of a vWire is built.
enum Far {
    /// An endpoint namespace on this node: a veth pair straight into it.
    Local { netns: String },
    /// This node's own namespace, as the gateway to an address endpoint; `nat` when the address
    /// is another machine's (it does not know the pool, so it sees the node's address instead).
    Gateway { target: IpAddr, nat: bool },
    /// Another node: a VXLAN tunnel into an endpoint namespace there, or into its host namespace
    /// when the endpoint is that host's own address (`target`).
    Remote {
        node: String,
        url: String,
        underlay: IpAddr,
        target: Option<IpAddr>,
    },
}

impl Far {
    fn target(&self) -> Option<IpAddr> {
        match self {
            Far::Local { .. } => None,
            Far::Gateway { target, .. } => Some(*target),
            Far::Remote { target, .. } => *target,
        }
    }
}

/// A host route (/32 or /128) to `a`.
fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
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
    /// Prefix leases, network services or nodes changed: vL3 routers re-converge, pending
    /// clients are retried.
    Vl3,
    /// A node was registered or changed: as `Vl3`, and if its daemon restarted, this node's
    /// vWires to it are re-requested (their ends there may be gone).
    Node(Box<pb::Node>),
    /// This node's WireGuard key was rotated: the registration shows the new public key (other
    /// nodes refresh their vWires to this one on it) and every vWire is refreshed.
    Rotated,
    /// Clients that are not Ready are retried; expired remote ends are swept.
    Retry,
    /// A named network namespace was removed (`ip netns del`): the vWires in or to it go.
    NetnsGone(String),
    /// A named network namespace appeared: a client waiting for it may now be built.
    NetnsAdded,
    /// The safety net: every vWire is checked against the kernel, its counters refreshed and its
    /// remote end re-requested.
    Resync,
}

/// How often clients that are not Ready are retried (at most; `--resync` when shorter). Costs
/// nothing when every client is Ready.
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends `make()` every `every`, the first one at once.
fn spawn_ticker(every: std::time::Duration, make: fn() -> Trigger, tx: mpsc::Sender<Trigger>) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            if tx.send(make()).await.is_err() {
                return;
            }
        }
    });
}

/// Turns named namespaces coming and going into triggers, so that a workload's namespace being
/// removed is handled at once and not at the next resync. Namespaces named by `/proc/PID/ns/net`
/// have no such event; the resync covers them.
fn spawn_netns_watch(tx: mpsc::Sender<Trigger>) {
    use futures::StreamExt as _;
    use inotify::{Inotify, WatchMask};
    let dir = std::path::Path::new(nsm_dataplane::NETNS_RUN_DIR);
    let stream = std::fs::create_dir_all(dir).and_then(|()| {
        let ino = Inotify::init()?;
        ino.watches().add(
            dir,
            WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::MOVED_TO,
        )?;
        ino.into_event_stream([0u8; 4096])
    });
    let mut events = match stream {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch named namespaces; removed ones are noticed at the next resync");
            return;
        }
    };
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            let trigger = match ev {
                // The kernel's queue overflowed and events were lost: check everything.
                Ok(ev) if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) => Trigger::Resync,
                Ok(ev) => {
                    let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    let gone = ev
                        .mask
                        .intersects(inotify::EventMask::DELETE | inotify::EventMask::MOVED_FROM);
                    if gone {
                        Trigger::NetnsGone(nsm_dataplane::named_path(name).display().to_string())
                    } else {
                        Trigger::NetnsAdded
                    }
                }
                // The watch could not be read: check everything.
                Err(_) => Trigger::Resync,
            };
            if tx.send(trigger).await.is_err() {
                return;
            }
        }
    });
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
    remote::link_name("nsm-", uid)
}

/// Runs the daemon until `shutdown` resolves, serving its NetworkService API on `listeners`.
pub async fn run(
    config: Config,
    listeners: Vec<nsm_transport::Listener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    // Opened by a path that stays valid (not a thread's), so it can be re-opened and cached by path.
    let host_path = config
        .host_netns
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("/proc/self/ns/net"));
    let host_netns = Arc::new(NetNs::open(&host_path).map_err(|e| NodeError::HostNetns(e.to_string()))?);
    // The registry's channel reconnects by itself; the first registration is retried until the
    // registry answers, so the daemon may start before it (as on a booting host).
    let endpoint_check = nsm_transport::connect_with(
        &config.registry,
        std::time::Duration::from_millis(100),
        config.tls.as_ref(),
    )
    .await;
    if let Err(nsm_transport::TransportError::InvalidUrl { .. } | nsm_transport::TransportError::Tls(_)) =
        &endpoint_check
    {
        return Err(NodeError::Registry(
            endpoint_check.err().map(|e| e.to_string()).unwrap_or_default(),
        ));
    }
    let channel = match endpoint_check {
        Ok(ch) => ch,
        Err(_) => nsm_transport::connect_lazy_with(&config.registry, config.tls.as_ref())?,
    };
    let mut registry = Registry::new(channel.clone());
    let wg = match &config.wireguard_ports {
        Some(ports) => {
            let key = wg::load_or_create_key(&config.data_dir)
                .map_err(|e| NodeError::WireGuard(format!("key in {}: {e}", config.data_dir.display())))?;
            let backend = wg::choose_backend(config.wireguard_backend, &host_netns)
                .await
                .map_err(NodeError::WireGuard)?;
            let wg = Wg::new(
                key,
                ports.clone(),
                config.data_dir.clone(),
                backend,
                config.wireguard_lanes,
            );
            tracing::info!(public_key = %wg.public_key(), ?ports, ?backend, lanes = wg.lanes(), "WireGuard vWires enabled");
            Some(Arc::new(wg))
        }
        None => None,
    };
    let started = prost_types::Timestamp::from(SystemTime::now());
    register_node(&mut registry, &config, started, wg.as_deref()).await?;

    let monitor = crate::monitor::Monitor::default();
    let ends = RemoteEnds::new(
        registry.clone(),
        config.name.clone(),
        config.underlay,
        host_netns.clone(),
        config.underlay_mtu,
        monitor.clone(),
        wg.clone(),
        config.remote_lifetime,
    );
    let upstream_conns = crate::local::upstream_kernel::Connections::default();
    let interfaces = crate::local::Interfaces::default();
    let routes = {
        let (reporter, health) = tonic_health::server::health_reporter();
        for svc in [
            nsm_api::service_names::NETWORK_SERVICE,
            nsm_api::service_names::NODE,
            "connection.MonitorConnection",
        ] {
            reporter
                .set_service_status(svc, tonic_health::ServingStatus::Serving)
                .await;
        }
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let mut b = tonic::service::Routes::builder();
        b.add_service(health)
            .add_service(
                nsm_api::networkservice::network_service_server::NetworkServiceServer::new(remote::NodeService {
                    ends: ends.clone(),
                    local: upstream_conns.clone(),
                }),
            )
            .add_service(nsm_api::nsm::v1::node_service_server::NodeServiceServer::new(
                crate::local::LocalApi {
                    registry: registry.clone(),
                    node: config.name.clone(),
                    interfaces: interfaces.clone(),
                },
            ))
            .add_service(nsm_api::connection::monitor_connection_server::MonitorConnectionServer::new(monitor.clone()));
        b.routes()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for l in listeners {
        let mut rx = stop_rx.clone();
        let url = l.url().clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = l.serve(routes, None, stopped).await {
                tracing::error!(%url, error = %e, "node listener failed");
            }
        });
    }

    let (tx, mut rx) = mpsc::channel(1024);
    if let Some(wg) = &wg {
        // After a key rotation, refresh the vWires now so that peers learn the new key.
        let resync = tx.clone();
        wg.spawn_rotation(
            config.wireguard_key_lifetime,
            config.wireguard_rotate.clone(),
            move || {
                let _ = resync.try_send(Trigger::Rotated);
            },
        );
    }
    spawn_watch(registry.clone(), Kind::Client, tx.clone());
    spawn_watch(registry.clone(), Kind::Endpoint, tx.clone());
    spawn_watch(registry.clone(), Kind::Prefix, tx.clone());
    spawn_watch(registry.clone(), Kind::NetworkService, tx.clone());
    spawn_watch(registry.clone(), Kind::Node, tx.clone());
    spawn_netns_watch(tx.clone());
    spawn_ticker(config.resync, || Trigger::Resync, tx.clone());
    spawn_ticker(config.resync.min(RETRY), || Trigger::Retry, tx.clone());

    let vl3 = crate::vl3::Vl3Plane::new(
        config.name.clone(),
        config.underlay,
        config.underlay_mtu,
        host_netns.clone(),
        channel,
        config.dns_forward.clone(),
    );
    let records = records::Records::open(&config.data_dir)
        .map_err(|e| NodeError::DataDir(format!("{}: {e}", config.data_dir.join("wired").display())))?;
    let mut r = Reconciler {
        wg,
        vl3,
        members: HashMap::new(),
        config,
        registry,
        host_netns,
        monitor: monitor.clone(),
        clients: HashMap::new(),
        wired: HashMap::new(),
        records,
        status_addrs: HashMap::new(),
        snapshot: None,
        reports: HashMap::new(),
        unreported: Arc::default(),
        interfaces,
        rr: 0,
        gateway_ready: [false; 2],
        node_seen: HashMap::new(),
    };
    // Addresses and interfaces already held, before the first allocation or create (the watch's
    // initial events may still be queued behind a client that needs one).
    match r.list(Kind::Client).await {
        Ok(items) => {
            let mut ours = HashSet::new();
            for res in items.iter() {
                if let Some(pb::resource::Kind::Client(c)) = &res.kind {
                    r.note_status(&key_of(c), c.status.as_ref());
                    r.interfaces.note(&r.config.name, c);
                    if c.spec.as_ref().is_some_and(|s| s.node == r.config.name) {
                        ours.insert(key_of(c));
                    }
                }
            }
            r.interfaces.seeded();
            r.remove_unclaimed(&ours).await;
        }
        Err(nr) => tracing::warn!(reason = %nr.reason, "cannot list clients; learning addresses from the watch"),
    }
    // Ends an earlier daemon built for other nodes' clients: in this node's endpoints'
    // namespaces, or its host's (endpoints at its address).
    match r.list(Kind::Endpoint).await {
        Ok(items) => {
            let mut namespaces = std::collections::BTreeSet::from([r.host_netns.path().to_path_buf()]);
            for res in items.iter() {
                if let Some(pb::resource::Kind::Endpoint(e)) = &res.kind
                    && let Some(spec) = &e.spec
                    && spec.node == r.config.name
                    && !spec.netns.is_empty()
                {
                    namespaces.insert(std::path::PathBuf::from(&spec.netns));
                }
            }
            ends.adopt_leftovers(namespaces).await;
        }
        Err(nr) => {
            tracing::warn!(reason = %nr.reason, "cannot list endpoints; ends an earlier daemon left are not looked for")
        }
    }
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            t = rx.recv() => match t {
                Some(Trigger::Client(c, deleted)) => r.on_client(*c, deleted).await,
                Some(Trigger::Endpoints) => r.resync().await,
                Some(Trigger::Vl3) => {
                    r.converge_vl3s().await;
                    // A service or node that a pending client waits for may be what changed.
                    r.retry().await;
                }
                Some(Trigger::Node(n)) => {
                    r.converge_vl3s().await;
                    r.on_node(&n).await;
                    r.retry().await;
                }
                Some(Trigger::Rotated) => {
                    // Published aside, so that a registry that does not answer holds nothing up.
                    let (mut registry, config, wg) = (r.registry.clone(), r.config.clone(), r.wg.clone());
                    tokio::spawn(async move {
                        if let Err(e) = register_node(&mut registry, &config, started, wg.as_deref()).await {
                            tracing::warn!(error = %e, "cannot publish the rotated WireGuard key");
                        }
                    });
                    r.resync().await;
                }
                Some(Trigger::Retry) => {
                    ends.sweep().await;
                    upstream_conns.sweep(&ends.registry).await;
                    r.retry().await;
                }
                Some(Trigger::NetnsGone(path)) => {
                    prune_netlink_cache();
                    r.on_netns_gone(&path).await;
                }
                Some(Trigger::NetnsAdded) => r.retry().await,
                // Expired ends are swept by the (more frequent) retry tick.
                Some(Trigger::Resync) => {
                    prune_netlink_cache();
                    r.converge_vl3s().await;
                    r.resync().await;
                }
                None => break Err(NodeError::Registry("watch tasks stopped".into())),
            },
        }
    };
    let _ = stop_tx.send(true);
    result
}

/// Registers (or updates) this node: its underlay address, URL, start time and WireGuard public
/// key, retrying while the registry does not answer.
async fn register_node(
    registry: &mut Registry,
    config: &Config,
    started: prost_types::Timestamp,
    wg: Option<&Wg>,
) -> Result<(), NodeError> {
    let node = pb::Resource {
        kind: Some(pb::resource::Kind::Node(pb::Node {
            metadata: Some(pb::ObjectMeta {
                name: config.name.clone(),
                ..Default::default()
            }),
            spec: Some(pb::NodeSpec {
                address: config.underlay.to_string(),
                url: config.url.clone().unwrap_or_default(),
                started: Some(started),
                wireguard_public_key: wg.map(Wg::public_key).unwrap_or_default(),
                wireguard_backend: wg.map(Wg::backend_name).unwrap_or_default().to_owned(),
            }),
        })),
    };
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match registry
            .apply(v1::ApplyRequest {
                resource: Some(node.clone()),
                dry_run: false,
            })
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::InvalidArgument => return Err(status_err("register node", s)),
            Err(s) => {
                tracing::warn!(registry = %config.registry, error = %s.message(), "registry not answering; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    tracing::info!(node = %config.name, underlay = %config.underlay, "node registered");
    Ok(())
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
                            Some(pb::resource::Kind::Node(n)) => Trigger::Node(Box::new(n)),
                            Some(pb::resource::Kind::Prefix(_) | pb::resource::Kind::NetworkService(_)) => Trigger::Vl3,
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
    /// This node's WireGuard side (None: disabled).
    wg: Option<Arc<Wg>>,
    /// This node's vL3 routers.
    vl3: crate::vl3::Vl3Plane,
    /// Every vL3 member in the mesh (from all clients' statuses), for the routers' DNS names.
    members: HashMap<(String, String), member::Member>,
    config: Config,
    registry: Registry,
    host_netns: Arc<NetNs>,
    monitor: crate::monitor::Monitor,
    /// Clients assigned to this node, as last seen.
    clients: HashMap<(String, String), pb::Client>,
    wired: HashMap<(String, String), Wired>,
    /// `wired`, as far as removing it needs, on disk (see [`records`]).
    records: records::Records,
    /// The addresses in every client's status (all nodes' clients), kept from the client watch:
    /// what allocation must avoid, without listing every client per allocation.
    status_addrs: HashMap<(String, String), Vec<IpAddr>>,
    /// Status writes in flight, at most one per client (a newer one waits for the older, so they
    /// land in order). They do not hold up the loop, and concurrent ones share the registry's
    /// commits.
    reports: HashMap<(String, String), tokio::task::JoinHandle<()>>,
    /// Clients whose last status write failed: written again at their next reconcile.
    unreported: Arc<parking_lot::Mutex<HashSet<(String, String)>>>,
    /// The interfaces this node's clients hold, for `CreateClient`.
    interfaces: crate::local::Interfaces,
    /// During a resync pass: the services, endpoints and nodes read once for every client.
    snapshot: Option<HashMap<Kind, Arc<Vec<pb::Resource>>>>,
    rr: usize,
    /// Families for which forwarding and the NAT table are set up in the host namespace (on the
    /// first gateway vWire of that family, so a node that never gateways leaves the host alone).
    gateway_ready: [bool; 2],
    /// Each node's daemon start time and WireGuard key as last seen, to tell a restart or a key
    /// rotation from another change.
    node_seen: HashMap<String, (prost_types::Timestamp, String)>,
}

impl Reconciler {
    async fn on_client(&mut self, c: pb::Client, deleted: bool) {
        let key = key_of(&c);
        if deleted {
            self.status_addrs.remove(&key);
            self.interfaces.forget(&key);
        } else {
            self.interfaces.note(&self.config.name, &c);
            self.note_status(&key, c.status.as_ref());
        }
        self.note_member(&key, (!deleted).then_some(&c));
        let ours = c.spec.as_ref().is_some_and(|s| s.node == self.config.name);
        if deleted || !ours {
            self.clients.remove(&key);
            self.teardown(&key).await;
            self.monitor.delete(&monitor_id(&c));
            return;
        }
        // Our own status writes come back through the watch: only a spec change needs work.
        let spec_changed = self.clients.get(&key).is_none_or(|old| old.spec != c.spec);
        self.clients.insert(key.clone(), c);
        if spec_changed {
            self.reconcile(&key).await;
        }
    }

    /// Reconciles every client. What each one looks up (services, endpoints, nodes, vL3 prefixes)
    /// is read once for the whole pass: four List calls instead of several calls per client. A kind that
    /// cannot be listed is asked per client, as outside a pass.
    async fn resync(&mut self) {
        let keys: Vec<_> = self.clients.keys().cloned().collect();
        self.reconcile_pass(keys).await;
    }

    /// Retries the clients that are not Ready (nothing to do when all are).
    async fn retry(&mut self) {
        let keys: Vec<_> = self
            .clients
            .iter()
            .filter(|(_, c)| c.status.as_ref().is_none_or(|st| st.phase != Phase::Ready as i32))
            .map(|(k, _)| k.clone())
            .collect();
        self.reconcile_pass(keys).await;
    }

    /// Reconciles `keys`; several of them from one snapshot of what they look up.
    async fn reconcile_pass(&mut self, keys: Vec<(String, String)>) {
        if keys.len() > 1 {
            let mut snapshot = HashMap::new();
            for kind in [Kind::NetworkService, Kind::Endpoint, Kind::Node, Kind::Prefix] {
                if let Ok(items) = self.list(kind).await {
                    snapshot.insert(kind, items);
                }
            }
            self.snapshot = Some(snapshot);
        }
        for key in keys {
            self.reconcile(&key).await;
        }
        self.snapshot = None;
    }

    /// Re-requests the vWires to `node` when its daemon restarted since it was last seen, so
    /// that ends it lost (WIREGUARD tunnels live in its process) are built again at once rather
    /// than at the next resync, or when it rotated its WireGuard key, so that the tunnels here
    /// take the new key now.
    async fn on_node(&mut self, node: &pb::Node) {
        let name = node.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        let spec = node.spec.clone().unwrap_or_default();
        let Some(started) = spec.started else { return };
        let seen = (started, spec.wireguard_public_key.clone());
        let before = self.node_seen.insert(name.clone(), seen.clone());
        if before.is_none_or(|b| b == seen) || spec.url.is_empty() {
            return;
        }
        let keys: Vec<_> = self
            .wired
            .iter()
            .filter(|(_, w)| w.remote.as_ref().is_some_and(|(url, _)| *url == spec.url))
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            tracing::info!(node = %name, vwires = keys.len(), "node restarted or rotated its key; re-requesting its ends");
        }
        for key in keys {
            self.reconcile(&key).await;
        }
    }

    /// A named namespace was removed: the clients in it are reconciled (their vWires go), and if
    /// it held one of this node's endpoints, every client is (those wired to it re-select).
    async fn on_netns_gone(&mut self, path: &str) {
        let endpoint_here = match self.list(Kind::Endpoint).await {
            Ok(items) => items.iter().any(|r| match &r.kind {
                Some(pb::resource::Kind::Endpoint(e)) => e
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.node == self.config.name && s.netns == path),
                _ => false,
            }),
            Err(_) => true,
        };
        if endpoint_here {
            self.resync().await;
            return;
        }
        let keys: Vec<_> = self
            .clients
            .iter()
            .filter(|(_, c)| c.spec.as_ref().is_some_and(|s| s.netns == path))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.reconcile(&key).await;
        }
        if path.rsplit('/').next().is_some_and(|n| n.starts_with("nsm-vl3-")) {
            self.converge_vl3s().await;
        }
    }

    /// Records the addresses a client's status holds.
    fn note_status(&mut self, key: &(String, String), status: Option<&v1::ClientStatus>) {
        let addrs: Vec<IpAddr> = status
            .iter()
            .flat_map(|st| st.src_ip_addrs.iter().chain(&st.dst_ip_addrs))
            .filter_map(|a| a.parse::<IpNet>().ok())
            .map(|n| n.addr())
            .collect();
        if addrs.is_empty() {
            self.status_addrs.remove(key);
        } else {
            self.status_addrs.insert(key.clone(), addrs);
        }
    }

    /// Removes what an earlier daemon wired for clients that are no longer this node's (deleted
    /// while it was down, say): nothing else would, since no event names them any more.
    async fn remove_unclaimed(&mut self, ours: &HashSet<(String, String)>) {
        for r in self.records.all() {
            if ours.contains(&r.key) {
                continue;
            }
            match remove_interface(&self.host_netns, &r.netns, &r.interface, r.src, r.nat_route).await {
                Ok(true) => {
                    tracing::info!(client = ?r.key, interface = %r.interface, netns = %r.netns, "removed the vWire of a client that is gone (deleted while this daemon was down)");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(client = ?r.key, interface = %r.interface, error = %e, "removing a vWire an earlier daemon left");
                    continue;
                }
            }
            self.records.forget(&r.key);
        }
    }

    /// Records what stands for client `key`.
    fn set_wired(&mut self, key: &(String, String), w: &Wired) {
        self.wired.insert(key.clone(), w.clone());
        self.records.save(records::Record {
            key: key.clone(),
            netns: w.netns.clone(),
            interface: w.interface.clone(),
            src: w.src,
            nat_route: nat_route(w),
        });
    }

    async fn teardown(&mut self, key: &(String, String)) {
        self.records.forget(key);
        let Some(w) = self.wired.remove(key) else { return };
        self.vl3.member_gone(&w.endpoint, w.src.addr()).await;
        match unwire(&w, &self.host_netns, self.wg.as_deref()).await {
            Ok(()) => tracing::info!(client = ?key, interface = %w.interface, "vWire removed"),
            Err(e) => tracing::warn!(client = ?key, error = %e, "removing vWire"),
        }
    }

    async fn reconcile(&mut self, key: &(String, String)) {
        let Some(client) = self.clients.get(key).cloned() else {
            return;
        };
        let outcome = self.try_reconcile(key, &client).await;
        let uid = monitor_id(&client);
        let status = match outcome {
            Ok(status) => {
                self.monitor.update(self.upstream_connection(key, &client, &status));
                status
            }
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
                self.monitor.delete(&uid);
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

    /// Writes the client's status if it changed (or its last write failed), without waiting for
    /// the registry: the loop goes on with the next client while the write commits.
    async fn report(&mut self, key: &(String, String), client: &pb::Client, mut status: v1::ClientStatus) {
        let mut old = client.status.clone().unwrap_or_default();
        old.updated = None;
        status.updated = None;
        let retry = self.unreported.lock().remove(key);
        if client.status.is_some() && old == status && !retry {
            return;
        }
        status.updated = Some(prost_types::Timestamp::from(SystemTime::now()));
        // What the registry will hold, so the next reconcile compares against it.
        self.note_status(key, Some(&status));
        if let Some(c) = self.clients.get_mut(key) {
            c.status = Some(status.clone());
        }
        if let Some(previous) = self.reports.remove(key) {
            let _ = previous.await;
        }
        self.reports.retain(|_, h| !h.is_finished());
        let r = v1::ResourceRef {
            kind: Kind::Client.to_pb() as i32,
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        let mut registry = self.registry.clone();
        let unreported = self.unreported.clone();
        let k = key.clone();
        let write = tokio::spawn(async move {
            let req = v1::UpdateStatusRequest {
                r#ref: Some(r),
                status: Some(status),
            };
            match registry.update_status(req).await {
                Ok(_) => {}
                // Deleted meanwhile: nothing to report.
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => {
                    tracing::warn!(client = ?k, error = %s.message(), "cannot report status");
                    unreported.lock().insert(k);
                }
            }
        });
        self.reports.insert(key.clone(), write);
    }

    async fn get(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<Option<pb::Resource>, NotReady> {
        if let Some(items) = self.snapshot.as_ref().and_then(|s| s.get(&kind)) {
            return Ok(items
                .iter()
                .find(|r| {
                    nsm_model::kind::meta(r)
                        .is_some_and(|m| m.name == name && (!kind.namespaced() || m.namespace == namespace))
                })
                .cloned());
        }
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

    async fn list(&mut self, kind: Kind) -> Result<Arc<Vec<pb::Resource>>, NotReady> {
        if let Some(items) = self.snapshot.as_ref().and_then(|s| s.get(&kind)) {
            return Ok(items.clone());
        }
        let req = v1::ListRequest {
            kind: kind.to_pb() as i32,
            ..Default::default()
        };
        match self.registry.list(req).await {
            Ok(r) => Ok(Arc::new(r.into_inner().items)),
            Err(s) => Err(unreachable_registry(&s)),
        }
    }

    async fn try_reconcile(
        &mut self,
        key: &(String, String),
        client: &pb::Client,
    ) -> Result<v1::ClientStatus, NotReady> {
        let started = std::time::Instant::now();
        let step = |what: &str| tracing::debug!(client = ?key, step = what, elapsed_us = started.elapsed().as_micros() as u64, "reconcile");
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
        if let Some(svc) = &service
            && let Some(vl3) = crate::vl3::vl3_of(svc)
        {
            return self.reconcile_member(key, client, svc, &vl3).await;
        }

        // Select the endpoint.
        let listed = self.list(Kind::Endpoint).await?;
        let endpoints: Vec<&pb::Endpoint> = listed
            .iter()
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Endpoint(e)) => Some(e),
                _ => None,
            })
            .filter(|e| live(e, &self.config.name))
            .collect();
        let chosen = if spec.endpoint.is_empty() {
            let Some(service) = &service else {
                return Err(pending(format!("network service {service_up:?} not found")));
            };
            let offering: Vec<(Candidate, &pb::Endpoint)> = endpoints
                .iter()
                .copied()
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
                Some(e) => (*e).clone(),
                None => return Err(pending(format!("endpoint {pinned_up:?} not found"))),
            }
        };
        let chosen_up = upstream::nse_to_upstream(&chosen);
        let endpoint_up = chosen_up.name;
        // A pinned endpoint that lists services must offer this one; one that lists none (an
        // address endpoint made with only `--address`) serves whatever service a client pins it for.
        if !spec.endpoint.is_empty()
            && !chosen_up.network_service_names.is_empty()
            && !chosen_up.network_service_names.contains(&service_up)
        {
            return Err(failed(format!(
                "endpoint {endpoint_up:?} does not offer network service {service_up:?} (it offers {})",
                chosen_up.network_service_names.join(", ")
            )));
        }
        step("selected");
        let ep_spec = chosen.spec.clone().unwrap_or_default();
        let far = self.far_end(&endpoint_up, &ep_spec).await?;
        let encryption = Encryption::effective(
            &spec.encryption,
            service
                .as_ref()
                .and_then(|s| s.spec.as_ref())
                .map_or("", |s| s.encryption.as_str()),
        );

        // Re-wire if the endpoint, the workload or the way to the endpoint changed.
        if let Some(w) = self.wired.get(key)
            && (w.endpoint != endpoint_up
                || w.netns != spec.netns
                || w.interface != spec.interface
                || w.remote.is_some() != matches!(far, Far::Remote { .. })
                || w.route != far.target().map(host_net)
                || w.nat != matches!(far, Far::Gateway { nat: true, .. })
                || (w.remote.is_some() && !allowed(encryption, w.mechanism)))
        {
            self.teardown(key).await;
        }
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        // One link lookup tells both that a built vWire still stands and its counters.
        let standing = match self.wired.get(key).cloned() {
            Some(w) => live_stats(&w).await.map(|stats| (w, stats)),
            None => None,
        };
        let (w, stats) = match standing {
            Some((mut w, stats)) => {
                if let Some((url, conn)) = &w.remote {
                    // Refresh: the endpoint's node forgets connections that are not re-requested.
                    // It carries this node's current WireGuard key (a rotation reaches the peer).
                    let mut offer = conn.clone();
                    if let (Some(wg), Some(_)) = (&self.wg, &w.wg_id) {
                        wg.offer_current_key(&mut offer);
                    }
                    let prefs = offer.mechanism.clone().into_iter().collect();
                    match request_remote(url, offer, prefs).await {
                        Ok(c) => {
                            // A WIREGUARD end whose peer answers with a new key (it rotated) takes
                            // it in place; one answered with another port (the key file was lost,
                            // the port was taken) is built anew.
                            let changed = match (&self.wg, &w.wg_id) {
                                (Some(wg), Some(id)) => !wg.refreshed(id, conn, &c).await,
                                _ => false,
                            };
                            w.remote = Some((url.clone(), c));
                            if changed {
                                self.set_wired(key, &w);
                                self.teardown(key).await;
                                return Err(pending(
                                    "the endpoint's node changed its WireGuard key or port; rebuilding",
                                ));
                            }
                        }
                        Err(e) => tracing::warn!(client = ?key, error = %e, "refreshing the remote end failed"),
                    }
                    self.set_wired(key, &w);
                }
                (w, stats)
            }
            None => {
                // Adopt what an earlier run of this daemon built (it keeps forwarding across a
                // restart), else build it.
                let adopted = adopt(client, &spec, &endpoint_up, &far).await;
                let w = match adopted {
                    Some(mut w) => {
                        if let Far::Remote { url, .. } = &far {
                            let conn = self.connection(key, &uid, &service_up, &endpoint_up, &labels, w.src, w.dst);
                            let prefs = vec![self.vxlan_offer(&uid)];
                            let accepted = request_remote(url, conn, prefs).await.map_err(pending)?;
                            w.remote = Some((url.clone(), accepted));
                        }
                        if let Some(route) = w.route.filter(|_| w.nat) {
                            self.ensure_gateway(route.addr()).await.map_err(failed)?;
                            self.masquerade(&w).await.map_err(failed)?;
                        }
                        w
                    }
                    None => {
                        let pool: IpNet = service
                            .as_ref()
                            .and_then(|s| s.spec.as_ref())
                            .map(|s| s.cidr.clone())
                            .filter(|c| !c.is_empty())
                            .unwrap_or_else(|| ipam::DEFAULT_POOL.to_owned())
                            .parse()
                            .map_err(|_| failed("the service's CIDR does not parse"))?;
                        if let Some(t) = far.target()
                            && t.is_ipv4() != pool.addr().is_ipv4()
                        {
                            return Err(failed(format!(
                                "endpoint {endpoint_up:?} has address {t} but the pool {pool} of {service_up:?} is of the other IP family"
                            )));
                        }
                        let used = self.used_addresses(key);
                        step("allocated");
                        // Rebuilding what stood before (a WIREGUARD vWire after a restart: its
                        // tunnel went with the old process) keeps the addresses.
                        let before = client
                            .status
                            .as_ref()
                            .filter(|st| st.phase == Phase::Ready as i32 && st.endpoint == endpoint_up)
                            .and_then(|st| {
                                let src: IpNet = st.src_ip_addrs.first()?.parse().ok()?;
                                let dst: IpNet = st.dst_ip_addrs.first()?.parse().ok()?;
                                (pool.contains(&src.addr())
                                    && pool.contains(&dst.addr())
                                    && !used.contains(&src.addr())
                                    && !used.contains(&dst.addr()))
                                .then_some((src, dst))
                            });
                        let (src, dst) = match before {
                            Some(p) => p,
                            None => ipam::allocate_pair(pool, &used)
                                .ok_or_else(|| failed(format!("address pool {pool} of {service_up:?} is exhausted")))?,
                        };
                        let w = Wired {
                            netns: spec.netns.clone(),
                            interface: spec.interface.clone(),
                            endpoint: endpoint_up.clone(),
                            src,
                            dst,
                            mtu: VETH_MTU,
                            remote: None,
                            route: far.target().map(host_net),
                            nat: matches!(far, Far::Gateway { nat: true, .. }),
                            mechanism: "KERNEL",
                            wg_id: None,
                        };
                        let w = self
                            .build(key, w, &far, &peer_name(&uid), &uid, &service_up, &labels, encryption)
                            .await
                            .map_err(failed)?;
                        tracing::info!(client = ?key, endpoint = %endpoint_up, src = %src, dst = %dst, "vWire ready");
                        w
                    }
                };
                self.set_wired(key, &w);
                let stats = live_stats(&w).await.unwrap_or_default();
                (w, stats)
            }
        };
        step("wired");
        let (ns, name) = key;
        let mut path = vec![upstream::name_of(ns, name), self.config.name.clone()];
        if let Far::Remote { node, .. } = &far {
            path.push(node.clone());
        }
        path.push(endpoint_up.clone());
        Ok(v1::ClientStatus {
            phase: Phase::Ready as i32,
            reason: String::new(),
            endpoint: endpoint_up.clone(),
            mechanism: w.mechanism.into(),
            src_ip_addrs: vec![w.src.to_string()],
            dst_ip_addrs: vec![w.dst.to_string()],
            connection_id: uid,
            path,
            rx_bytes: stats.rx_bytes,
            tx_bytes: stats.tx_bytes,
            rx_packets: stats.rx_packets,
            tx_packets: stats.tx_packets,
            updated: None,
            mtu: w.mtu,
            routes: w.route.iter().map(ToString::to_string).collect(),
            ..Default::default()
        })
    }

    /// Decides where the far end of a vWire to `ep` is built.
    async fn far_end(&mut self, endpoint_up: &str, ep: &pb::EndpointSpec) -> Result<Far, NotReady> {
        if !ep.netns.is_empty() {
            if ep.node == self.config.name {
                return Ok(Far::Local {
                    netns: ep.netns.clone(),
                });
            }
            let node = match self.get(Kind::Node, "", &ep.node).await? {
                Some(pb::Resource {
                    kind: Some(pb::resource::Kind::Node(n)),
                }) => n.spec.unwrap_or_default(),
                _ => {
                    return Err(pending(format!(
                        "node {:?} of endpoint {endpoint_up:?} is not registered",
                        ep.node
                    )));
                }
            };
            return self.remote_far(&ep.node, node, None);
        }
        if ep.address.is_empty() {
            return Err(failed(format!(
                "endpoint {endpoint_up:?} has neither a network namespace nor an address"
            )));
        }
        let target: IpAddr = ep.address.parse().map_err(|_| {
            failed(format!(
                "endpoint {endpoint_up:?}: address {:?} is not an IP address",
                ep.address
            ))
        })?;
        if target == self.config.underlay {
            return Ok(Far::Gateway { target, nat: false });
        }
        // An nsm node on that host ends the vWire there; otherwise this node is the gateway.
        let host_node = self.list(Kind::Node).await?.iter().find_map(|r| match &r.kind {
            Some(pb::resource::Kind::Node(n))
                if n.spec.as_ref().and_then(|s| s.address.parse::<IpAddr>().ok()) == Some(target) =>
            {
                Some(n.clone())
            }
            _ => None,
        });
        match host_node {
            Some(n) => {
                let name = n.metadata.map(|m| m.name).unwrap_or_default();
                self.remote_far(&name, n.spec.unwrap_or_default(), Some(target))
            }
            None => Ok(Far::Gateway { target, nat: true }),
        }
    }

    fn remote_far(&self, name: &str, node: pb::NodeSpec, target: Option<IpAddr>) -> Result<Far, NotReady> {
        if node.url.is_empty() {
            return Err(pending(format!("node {name:?} advertises no URL")));
        }
        let underlay: IpAddr = node
            .address
            .parse()
            .map_err(|_| failed(format!("node {name:?} has no underlay address")))?;
        Ok(Far::Remote {
            node: name.to_owned(),
            url: node.url,
            underlay,
            target,
        })
    }

    /// Builds a vWire towards `far`: all or nothing.
    #[allow(clippy::too_many_arguments)]
    async fn build(
        &mut self,
        key: &(String, String),
        mut w: Wired,
        far: &Far,
        peer: &str,
        uid: &str,
        service_up: &str,
        labels: &HashMap<String, String>,
        encryption: Encryption,
    ) -> Result<Wired, String> {
        match far {
            Far::Local { netns } => {
                wire(&w, netns, peer).await?;
            }
            Far::Gateway { nat, target } => {
                if *nat {
                    self.ensure_gateway(*target).await?;
                }
                let host = self.host_netns.path().display().to_string();
                wire(&w, &host, peer).await?;
            }
            Far::Remote { url, underlay, .. } => {
                let conn = self.connection(key, uid, service_up, &w.endpoint, labels, w.src, w.dst);
                let prefs = self.offers(uid, encryption)?;
                let (accepted, mtu) = self
                    .wire_remote(&mut w, url, *underlay, conn, prefs, encryption, uid)
                    .await?;
                w.mtu = mtu;
                w.remote = Some((url.clone(), accepted));
            }
        }
        let extras = async {
            // A tunnelled vWire's route beyond its peer (veth vWires got theirs from `wire`).
            if let Some(route) = w.route.filter(|_| w.remote.is_some()) {
                let (_ns, nl) = netlink_in(&w.netns).await?;
                nl.add_route(route, Some(w.dst.addr()), &w.interface)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if w.nat {
                self.masquerade(&w).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        if let Err(e) = extras {
            let _ = unwire(&w, &self.host_netns, self.wg.as_deref()).await;
            return Err(e);
        }
        Ok(w)
    }

    /// Turns on forwarding for `target`'s family and creates the NAT table in the host namespace,
    /// once per family.
    async fn ensure_gateway(&mut self, target: IpAddr) -> Result<(), String> {
        let family = usize::from(target.is_ipv6());
        if self.gateway_ready[family] {
            return Ok(());
        }
        nsm_dataplane::enable_ip_forwarding(&self.host_netns, target.is_ipv6()).map_err(|e| e.to_string())?;
        nsm_dataplane::ensure_masquerade(&self.host_netns)
            .await
            .map_err(|e| e.to_string())?;
        self.gateway_ready[family] = true;
        Ok(())
    }

    async fn masquerade(&self, w: &Wired) -> Result<(), String> {
        let Some(route) = w.route else { return Ok(()) };
        nsm_dataplane::add_masquerade(&self.host_netns, w.src.addr(), route.addr())
            .await
            .map_err(|e| e.to_string())
    }

    /// A Ready client as upstream's `Connection`, for MonitorConnections.
    fn upstream_connection(&self, key: &(String, String), client: &pb::Client, st: &v1::ClientStatus) -> Connection {
        let spec = client.spec.clone().unwrap_or_default();
        let mut params = HashMap::new();
        params.insert("name".to_owned(), spec.interface.clone());
        params.insert("inodeURL".to_owned(), format!("file://{}", spec.netns));
        let labels = client.metadata.as_ref().map(|m| m.labels.clone()).unwrap_or_default();
        let id = monitor_id(client);
        let segments = st
            .path
            .iter()
            .map(|name| PathSegment {
                name: name.clone(),
                id: id.clone(),
                ..Default::default()
            })
            .collect();
        Connection {
            id: id.clone(),
            network_service: upstream::qualify(&spec.network_service, &key.0),
            mechanism: Some(Mechanism {
                cls: "LOCAL".into(),
                r#type: st.mechanism.clone(),
                parameters: params,
            }),
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: st.src_ip_addrs.clone(),
                    dst_ip_addrs: st.dst_ip_addrs.clone(),
                    dst_routes: st
                        .routes
                        .iter()
                        .map(|r| nsm_api::connectioncontext::Route {
                            prefix: r.clone(),
                            next_hop: String::new(),
                        })
                        .collect(),
                    ..Default::default()
                }),
                mtu: st.mtu,
                ..Default::default()
            }),
            labels,
            path: Some(ConnPath {
                index: 0,
                path_segments: segments,
            }),
            network_service_endpoint_name: st.endpoint.clone(),
            payload: "IP".into(),
            state: nsm_api::connection::State::Up as i32,
        }
    }

    /// The upstream connection this node asks the endpoint's node for.
    #[allow(clippy::too_many_arguments)]
    fn connection(
        &self,
        key: &(String, String),
        uid: &str,
        service: &str,
        endpoint: &str,
        labels: &HashMap<String, String>,
        src: IpNet,
        dst: IpNet,
    ) -> Connection {
        let expires = Some(prost_types::Timestamp::from(
            SystemTime::now() + self.config.remote_lifetime,
        ));
        let seg = |name: String| PathSegment {
            name,
            id: uid.to_owned(),
            token: String::new(),
            expires,
            metrics: HashMap::new(),
        };
        Connection {
            id: uid.to_owned(),
            network_service: service.to_owned(),
            // Chosen by the endpoint's node from the request's preferences.
            mechanism: None,
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec![src.to_string()],
                    dst_ip_addrs: vec![dst.to_string()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            labels: labels.clone(),
            path: Some(ConnPath {
                index: 1,
                path_segments: vec![seg(upstream::name_of(&key.0, &key.1)), seg(self.config.name.clone())],
            }),
            network_service_endpoint_name: endpoint.to_owned(),
            payload: "IP".into(),
            state: 0,
        }
    }

    /// The VXLAN mechanism this node offers for connection `uid`.
    fn vxlan_offer(&self, uid: &str) -> Mechanism {
        let mut params = HashMap::new();
        params.insert(vxlan::SRC_IP.to_owned(), self.config.underlay.to_string());
        params.insert(vxlan::SRC_PORT.to_owned(), vxlan::PORT.to_string());
        params.insert(vxlan::VNI.to_owned(), remote::vni_of(uid).to_string());
        Mechanism {
            cls: vxlan::CLS_REMOTE.into(),
            r#type: vxlan::TYPE.into(),
            parameters: params,
        }
    }

    /// The mechanisms this node offers the endpoint's node for connection `uid`, in order of
    /// preference: WIREGUARD (this node's public key, and the UDP port its end will listen on)
    /// when encryption is required or preferred, VXLAN unless it is required.
    fn offers(&self, uid: &str, encryption: Encryption) -> Result<Vec<Mechanism>, String> {
        let mut offers = Vec::new();
        if encryption != Encryption::None {
            match &self.wg {
                Some(wg) => {
                    let mut params = HashMap::new();
                    params.insert(vxlan::SRC_IP.to_owned(), self.config.underlay.to_string());
                    let ports = wg.ports_for(&wg::client_end_id(uid), wg.lanes());
                    params.insert(vxlan::SRC_PORT.to_owned(), ports[0].to_string());
                    if ports.len() > 1 {
                        params.insert(wg::SRC_LANE_PORTS.to_owned(), wg::format_lane_ports(&ports[1..]));
                    }
                    params.insert(wg::SRC_PUBLIC_KEY.to_owned(), wg.public_key());
                    offers.push(Mechanism {
                        cls: vxlan::CLS_REMOTE.into(),
                        r#type: wg::TYPE.into(),
                        parameters: params,
                    });
                }
                None if encryption == Encryption::Required => {
                    return Err(format!(
                        "encryption required, but WIREGUARD is disabled on node {:?} (--no-wireguard)",
                        self.config.name
                    ));
                }
                None => {}
            }
        }
        if encryption != Encryption::Required {
            offers.push(self.vxlan_offer(uid));
        }
        Ok(offers)
    }

    /// Builds a cross-node vWire: the endpoint's node first (so a refusal leaves nothing here),
    /// then this end, with the mechanism the endpoint's node chose. Returns the accepted
    /// connection and the interface MTU.
    #[allow(clippy::too_many_arguments)]
    async fn wire_remote(
        &self,
        w: &mut Wired,
        url: &str,
        underlay: IpAddr,
        conn: Connection,
        prefs: Vec<Mechanism>,
        encryption: Encryption,
        uid: &str,
    ) -> Result<(Connection, u32), String> {
        let accepted = request_remote(url, conn, prefs).await.map_err(|e| {
            if encryption == Encryption::Required {
                format!("encryption required, but the endpoint's node did not accept WIREGUARD: {e}")
            } else {
                e
            }
        })?;
        let (kind, params) = accepted
            .mechanism
            .as_ref()
            .map(|m| (m.r#type.clone(), m.parameters.clone()))
            .unwrap_or_default();
        let remote_ip: IpAddr = params
            .get(vxlan::DST_IP)
            .and_then(|s| s.parse().ok())
            .unwrap_or(underlay);
        let built = match kind.as_str() {
            wg::TYPE => {
                let wg = self
                    .wg
                    .as_ref()
                    .ok_or("the endpoint's node chose WIREGUARD, which is disabled here")?;
                let mtu = self.config.underlay_mtu - wg::OVERHEAD;
                let id = wg::client_end_id(uid);
                let end = async {
                    // As many lanes as the endpoint's node answered for; their ports as offered.
                    let peer_lanes = wg::answered_lanes(&params, wg.lanes())?;
                    let lanes = peer_lanes.len() + 1;
                    let peer_key = params
                        .get(wg::DST_PUBLIC_KEY)
                        .and_then(|k| nsm_wireguard::decode_key(k).ok())
                        .ok_or("the endpoint's node answered WIREGUARD without a valid dst_public_key")?;
                    let peer_port: u16 = params
                        .get(vxlan::DST_PORT)
                        .and_then(|p| p.parse().ok())
                        .ok_or("the endpoint's node answered WIREGUARD without a dst_port")?;
                    let ports = wg.ports_for(&id, lanes);
                    if ports.len() != lanes {
                        // Every lane the endpoint built needs its peer here, or the flows hashed
                        // onto it would be lost; the retry offers what fits now.
                        return Err(format!(
                            "no free UDP port in --wireguard-ports for each of the {lanes} WireGuard lanes"
                        ));
                    }
                    let mut allowed = vec![w.dst];
                    allowed.extend(w.route);
                    wg.build(wg::End {
                        id: id.clone(),
                        netns: Path::new(&w.netns),
                        name: &w.interface,
                        host: &self.host_netns,
                        listen: self.config.underlay,
                        port: ports[0],
                        peer_key,
                        peer_endpoint: std::net::SocketAddr::new(remote_ip, peer_port),
                        allowed,
                        mtu,
                        local_addr: w.src,
                        peer_addr: w.dst,
                        extra_lanes: ports[1..]
                            .iter()
                            .copied()
                            .zip(peer_lanes.into_iter().map(Some))
                            .collect(),
                    })
                    .await
                };
                end.await.map(|_| {
                    w.mechanism = wg::TYPE;
                    w.wg_id = Some(id);
                    mtu
                })
            }
            vxlan::TYPE if encryption != Encryption::Required => {
                let overhead = if remote_ip.is_ipv6() {
                    vxlan::OVERHEAD_V6
                } else {
                    vxlan::OVERHEAD_V4
                };
                let mtu = self.config.underlay_mtu - overhead;
                remote::build_end(
                    &self.host_netns,
                    Path::new(&w.netns),
                    &w.interface,
                    remote::vni_of(&accepted.id),
                    self.config.underlay,
                    remote_ip,
                    mtu,
                    w.dst,
                    w.src,
                    None,
                )
                .await
                .map(|()| {
                    w.mechanism = vxlan::TYPE;
                    mtu
                })
            }
            other => Err(format!(
                "the endpoint's node chose mechanism {other:?}, which this vWire does not allow"
            )),
        };
        match built {
            Ok(mtu) => Ok((accepted, mtu)),
            Err(e) => {
                close_remote(url, accepted).await;
                Err(e)
            }
        }
    }

    /// Addresses in use by any client: this node's wiring and every status seen from the registry.
    fn used_addresses(&self, except: &(String, String)) -> HashSet<IpAddr> {
        let wired = self
            .wired
            .iter()
            .filter(|(k, _)| *k != except)
            .flat_map(|(_, w)| [w.src.addr(), w.dst.addr()]);
        let statuses = self
            .status_addrs
            .iter()
            .filter(|(k, _)| *k != except)
            .flat_map(|(_, a)| a.iter().copied());
        wired.chain(statuses).collect()
    }
}

/// Whether a cross-node vWire built with `mechanism` may stand under `encryption`.
fn allowed(encryption: Encryption, mechanism: &str) -> bool {
    match encryption {
        Encryption::Required => mechanism == wg::TYPE,
        Encryption::Preferred => true,
        Encryption::None => mechanism != wg::TYPE,
    }
}

/// The id a client's connection has in MonitorConnections: the upstream connection id for clients
/// made from upstream requests, else the client's uid.
fn monitor_id(client: &pb::Client) -> String {
    let m = client.metadata.clone().unwrap_or_default();
    m.labels
        .get(crate::local::upstream_kernel::LABEL)
        .cloned()
        .unwrap_or(m.uid)
}

async fn node_client(url: &str) -> Result<NetworkServiceClient<Channel>, String> {
    let ch = nsm_transport::connect(url, std::time::Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    Ok(NetworkServiceClient::new(ch))
}

/// Requests (or refreshes) a connection at another node.
async fn request_remote(
    url: &str,
    conn: Connection,
    mechanism_preferences: Vec<Mechanism>,
) -> Result<Connection, String> {
    let req = NetworkServiceRequest {
        connection: Some(conn),
        mechanism_preferences,
    };
    node_client(url)
        .await?
        .request(req)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("node at {url}: {}", s.message()))
}

async fn close_remote(url: &str, conn: Connection) {
    match node_client(url).await {
        Ok(mut c) => {
            if let Err(s) = c.close(conn).await {
                tracing::warn!(%url, error = %s.message(), "closing the remote end failed");
            }
        }
        Err(e) => tracing::warn!(%url, error = %e, "closing the remote end failed"),
    }
}

/// An endpoint registration that has not expired and, for one in a namespace on this node, whose
/// namespace still exists (a workload that is gone cannot be an endpoint, and its clients heal to
/// another).
fn live(e: &pb::Endpoint, node: &str) -> bool {
    let Some(spec) = e.spec.as_ref() else { return true };
    let unexpired = spec
        .expiration_time
        .as_ref()
        .and_then(nsm_model::to_system_time)
        .is_none_or(|t| t > SystemTime::now());
    let here = spec.node == node && !spec.netns.is_empty();
    unexpired && (!here || Path::new(&spec.netns).exists())
}

/// Netlink handles by namespace path, so reconciling does not open a namespace and spawn a thread
/// for a new socket on every look. An entry is used only while the path still names the same
/// namespace (same inode), and dropped when it does not.
type NlCache = std::sync::Mutex<HashMap<String, ((u64, u64), Arc<NetNs>, Netlink)>>;

static NL_CACHE: std::sync::LazyLock<NlCache> = std::sync::LazyLock::new(Default::default);

pub(crate) async fn netlink_in(path: &str) -> Result<(Arc<NetNs>, Netlink), String> {
    let id = nsm_dataplane::netns_identity(path);
    if let Some(id) = id
        && let Some((cached_id, ns, nl)) = NL_CACHE.lock().expect("not poisoned").get(path).cloned()
        && cached_id == id
    {
        return Ok((ns, nl));
    }
    let ns = Arc::new(NetNs::open(Path::new(path)).map_err(|e| e.to_string())?);
    let nl = Netlink::connect(&ns).await.map_err(|e| e.to_string())?;
    let id = ns.inode().map_err(|e| e.to_string())?;
    NL_CACHE
        .lock()
        .expect("not poisoned")
        .insert(path.to_owned(), (id, ns.clone(), nl.clone()));
    Ok((ns, nl))
}

/// Forgets handles of namespaces that are gone or replaced (their fds would keep them alive).
fn prune_netlink_cache() {
    NL_CACHE
        .lock()
        .expect("not poisoned")
        .retain(|path, (id, _, _)| nsm_dataplane::netns_identity(path) == Some(*id));
}

/// Builds a veth vWire from the client's namespace into `endpoint_netns` (an endpoint's, this
/// host's as a gateway, or a vL3 router's), with /32 (/128) addresses, host routes to each other,
/// and the client's route to what lies beyond the peer (`w.route`). All or nothing. Returns the
/// MAC of the client's end.
async fn wire(w: &Wired, endpoint_netns: &str, peer: &str) -> Result<Vec<u8>, String> {
    let (_cns, cnl) = netlink_in(&w.netns).await.map_err(|e| format!("client netns: {e}"))?;
    let (ens, enl) = netlink_in(endpoint_netns)
        .await
        .map_err(|e| format!("endpoint netns: {e}"))?;
    cnl.create_veth(&w.interface, peer, &ens, w.mtu)
        .await
        .map_err(|e| e.to_string())?;
    // Requests that do not depend on each other go out together (each socket answers them in
    // order): three round trips after the veth instead of ten or eleven.
    let configured = async {
        tokio::try_join!(
            cnl.add_address(&w.interface, w.src),
            cnl.set_up(&w.interface),
            enl.add_address(peer, w.dst),
            enl.set_up(peer),
        )?;
        let (_, _, cmac, emac) = tokio::try_join!(
            cnl.add_route(w.dst, None, &w.interface),
            enl.add_route(w.src, None, peer),
            link_mac(&cnl, &w.interface),
            link_mac(&enl, peer),
        )?;
        // Each end knows the other's MAC: no ARP/ND, and no dynamic neighbour entries, which on a
        // node with many vWires would overflow the kernel's table (shared by every namespace,
        // 1024 entries by default) and drop traffic.
        tokio::try_join!(
            cnl.add_neighbour(&w.interface, w.dst.addr(), &emac),
            enl.add_neighbour(peer, w.src.addr(), &cmac),
            async {
                match w.route {
                    Some(beyond) => cnl.add_route(beyond, Some(w.dst.addr()), &w.interface).await,
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
            let _ = cnl.delete_link(&w.interface).await;
            Err(e.to_string())
        }
    }
}

/// The MAC of link `name` (empty if it has none).
async fn link_mac(nl: &Netlink, name: &str) -> Result<Vec<u8>, nsm_dataplane::DataplaneError> {
    Ok(nl.link(name).await?.map(|l| l.mac).unwrap_or_default())
}

/// Removes a vWire: deleting one end of a veth pair deletes both, with their addresses and routes;
/// a gateway vWire also takes its NAT pair out of the host namespace.
async fn unwire(w: &Wired, host: &NetNs, wg: Option<&Wg>) -> Result<(), String> {
    if let Some((url, conn)) = &w.remote {
        close_remote(url, conn.clone()).await;
    }
    if let (Some(id), Some(wg)) = (&w.wg_id, wg) {
        // Stopping the tunnel removes its TUN, with its addresses and routes.
        wg.remove(id).await;
        return Ok(());
    }
    remove_interface(host, &w.netns, &w.interface, w.src, nat_route(w))
        .await
        .map(drop)
}

/// The route a gateway vWire masquerades its source address to, if it does.
fn nat_route(w: &Wired) -> Option<IpNet> {
    w.route.filter(|_| w.nat)
}

/// Takes `src`'s NAT pair to `nat_route` (if any) out of the host namespace and deletes
/// `interface` in `netns`; whether there was one (a namespace that is gone took it with it).
async fn remove_interface(
    host: &NetNs,
    netns: &str,
    interface: &str,
    src: IpNet,
    nat_route: Option<IpNet>,
) -> Result<bool, String> {
    if let Some(route) = nat_route
        && let Err(e) = nsm_dataplane::remove_masquerade(host, src.addr(), route.addr()).await
    {
        tracing::warn!(%interface, error = %e, "removing the NAT pair");
    }
    let Ok((_ns, nl)) = netlink_in(netns).await else {
        return Ok(false);
    };
    nl.delete_link(interface).await.map_err(|e| e.to_string())
}

/// The counters of a vWire's interface if it stands with carrier (both ends up), else None.
async fn live_stats(w: &Wired) -> Option<nsm_dataplane::LinkStats> {
    let (_ns, nl) = netlink_in(&w.netns).await.ok()?;
    nl.link(&w.interface)
        .await
        .ok()
        .flatten()
        .filter(|l| l.lower_up)
        .map(|l| l.stats)
}

/// Takes over a vWire that a previous run built, if the kernel still has exactly what the
/// client's last status says.
async fn adopt(client: &pb::Client, spec: &pb::ClientSpec, endpoint: &str, far: &Far) -> Option<Wired> {
    let st = client.status.as_ref()?;
    // A WIREGUARD vWire's TUN went with the process that ran its tunnel: nothing to adopt.
    if st.phase != Phase::Ready as i32 || st.endpoint != endpoint || st.mechanism == wg::TYPE {
        return None;
    }
    let mechanism = if matches!(far, Far::Remote { .. }) {
        vxlan::TYPE
    } else {
        "KERNEL"
    };
    let src: IpNet = st.src_ip_addrs.first()?.parse().ok()?;
    let dst: IpNet = st.dst_ip_addrs.first()?.parse().ok()?;
    let w = Wired {
        netns: spec.netns.clone(),
        interface: spec.interface.clone(),
        endpoint: endpoint.to_owned(),
        src,
        dst,
        mtu: if st.mtu == 0 { VETH_MTU } else { st.mtu },
        remote: None,
        route: far.target().map(host_net),
        nat: matches!(far, Far::Gateway { nat: true, .. }),
        mechanism,
        wg_id: None,
    };
    let (_ns, nl) = netlink_in(&w.netns).await.ok()?;
    let link = nl.link(&w.interface).await.ok()??;
    let addrs = nl.addresses(&w.interface).await.ok()?;
    (link.lower_up && addrs.contains(&src)).then_some(w)
}
