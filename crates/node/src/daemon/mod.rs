//! The node daemon: start-up, the registry's watch streams feeding the cache and the work queue,
//! and the events that say which clients to look at again. What to do for a client is decided in
//! [`reconciler`] by the pure planner and carried out there.

mod execute;
mod member;
mod peers;
pub(crate) mod queue;
mod reconciler;
mod records;
mod status;
mod triggers;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_api::nsm::v1;
use nsm_dataplane::NetNs;
use nsm_model::{Kind, pb, upstream};
use nsm_node_plan::ClientKey;
use tokio::sync::mpsc;

use crate::endpoint::RemoteEnds;
use crate::{Config, NodeError};
use nsm_mechanisms::gateway::Gateway;
use nsm_mechanisms::vxlan::Vxlan;
use nsm_mechanisms::wireguard::{self, HostSide, Wg};
use nsm_mechanisms::{Tunnels, prune_netlink_cache};
use reconciler::{Reconciler, Registry, State};
use triggers::Trigger;

/// How many clients are reconciled at once. Each waits mostly on the kernel and other nodes, so
/// a few more than the cores keep both busy; more would only queue on the same sockets.
const WORKERS: usize = 8;

/// How often expired remote ends are swept.
const SWEEP: Duration = Duration::from_secs(2);

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
    let security = match &config.credentials {
        Some(c) => nsm_transport::ClientSecurity::Mtls {
            credentials: c.clone(),
            expect: nsm_identity::Expect::Id(
                nsm_identity::SpiffeId::registry(&c.trust_domain()).map_err(|e| NodeError::Registry(e.to_string()))?,
            ),
        },
        None => nsm_transport::ClientSecurity::Insecure,
    };
    let endpoint_check = nsm_transport::connect_secure(&config.registry, Duration::from_millis(100), &security).await;
    if let Err(nsm_transport::TransportError::InvalidUrl { .. } | nsm_transport::TransportError::Tls(_)) =
        &endpoint_check
    {
        return Err(NodeError::Registry(
            endpoint_check.err().map(|e| e.to_string()).unwrap_or_default(),
        ));
    }
    let channel = match endpoint_check {
        Ok(ch) => ch,
        Err(_) => nsm_transport::connect_lazy_secure(&config.registry, &security)?,
    };
    if let Some(c) = &config.credentials {
        tokio::spawn(crate::identity::renew_forever(
            c.clone(),
            config.data_dir.clone(),
            channel.clone(),
        ));
    }
    let mut registry = Registry::new(channel.clone());
    let wg = match &config.wireguard_ports {
        Some(ports) => {
            let key = wireguard::load_or_create_key(&config.data_dir)
                .map_err(|e| NodeError::WireGuard(format!("key in {}: {e}", config.data_dir.display())))?;
            let backend = wireguard::choose_backend(config.wireguard_backend, &host_netns).await?;
            let wg = Wg::new(
                key,
                ports.clone(),
                config.data_dir.clone(),
                backend,
                config.wireguard_lanes,
            )
            .on_host(HostSide {
                underlay: config.underlay,
                underlay_mtu: config.underlay_mtu,
                netns: host_netns.clone(),
            });
            tracing::info!(public_key = %wg.public_key(), ?ports, ?backend, lanes = wg.lanes(), "WireGuard vWires enabled");
            Some(Arc::new(wg))
        }
        None => None,
    };
    let tunnels = Tunnels {
        vxlan: Arc::new(Vxlan {
            underlay: config.underlay,
            underlay_mtu: config.underlay_mtu,
            host: host_netns.clone(),
        }),
        wireguard: wg.clone(),
    };
    let started = prost_types::Timestamp::from(SystemTime::now());
    register_node(&mut registry, &config, started, wg.as_deref()).await?;

    // The view of the registry every decision reads, filled before anything is decided (a
    // restarted daemon must not take an empty view for endpoints that are gone).
    let cache = crate::cache::Cache::default();
    for kind in [Kind::NetworkService, Kind::Endpoint, Kind::Node, Kind::Prefix] {
        let items = list_until_answered(&mut registry, kind).await;
        cache.replace(kind, items);
    }

    let monitor = crate::monitor::Monitor::default();
    let ends = RemoteEnds::new(
        registry.clone(),
        config.name.clone(),
        config.underlay,
        host_netns.clone(),
        monitor.clone(),
        tunnels.clone(),
        cache.clone(),
        config.remote_lifetime,
        config.credentials.clone().map(|credentials| crate::tokens::Checker {
            credentials,
            policies: config.policies.clone(),
        }),
    );
    let upstream_conns = crate::local::upstream_kernel::Connections::default();
    let interfaces = crate::local::Interfaces::default();
    let stop_tx = serve(
        &config,
        listeners,
        &registry,
        &ends,
        &upstream_conns,
        &interfaces,
        &monitor,
    )
    .await;

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
    for kind in [
        Kind::Client,
        Kind::Endpoint,
        Kind::Prefix,
        Kind::NetworkService,
        Kind::Node,
    ] {
        triggers::spawn_watch(registry.clone(), kind, cache.clone(), tx.clone());
    }
    triggers::spawn_netns_watch(tx.clone());
    triggers::spawn_ticker(config.resync, || Trigger::Resync, tx.clone());
    triggers::spawn_ticker(SWEEP, || Trigger::Sweep, tx.clone());

    let vl3 = nsm_vl3::Vl3Plane::new(
        config.name.clone(),
        config.underlay,
        config.underlay_mtu,
        host_netns.clone(),
        channel,
        config.dns_forward.clone(),
    );
    let records = records::Records::open(&config.data_dir)
        .map_err(|e| NodeError::DataDir(format!("{}: {e}", config.data_dir.join("wired").display())))?;
    let peers = peers::Peers::new(config.credentials.clone(), cache.clone());
    let r = Arc::new(Reconciler {
        gateway: Gateway::new(host_netns.clone()),
        tunnels,
        vl3: tokio::sync::Mutex::new(vl3),
        config,
        registry,
        cache,
        host_netns,
        peers,
        monitor,
        interfaces,
        state: parking_lot::Mutex::new(State::default()),
        records: parking_lot::Mutex::new(records),
        reports: status::Reports::default(),
        rr: Default::default(),
    });
    // Each node's start time and key as the view has them, so that a restart or rotation after
    // this is told from the first sighting.
    {
        let view = r.cache.snapshot();
        let mut st = r.state.lock();
        for n in view.nodes() {
            if let (Some(m), Some(spec)) = (&n.metadata, &n.spec)
                && let Some(started) = spec.started
            {
                st.node_seen
                    .insert(m.name.clone(), (started, spec.wireguard_public_key.clone()));
            }
        }
    }
    // Addresses and interfaces already held, before the first allocation or create.
    seed_clients(&r).await;
    // Ends an earlier daemon built for other nodes' clients: in this node's endpoints'
    // namespaces, or its host's (endpoints at its address).
    let mut namespaces = std::collections::BTreeSet::from([r.host_netns.path().to_path_buf()]);
    for e in r.cache.snapshot().endpoints() {
        if let Some(spec) = &e.spec
            && spec.node == r.config.name
            && !spec.netns.is_empty()
        {
            namespaces.insert(std::path::PathBuf::from(&spec.netns));
        }
    }
    ends.adopt_leftovers(namespaces).await;

    let queue = queue::Queue::new();
    {
        let r = r.clone();
        queue.spawn_workers(WORKERS, move |key: ClientKey| {
            let r = r.clone();
            async move { r.reconcile(key).await }
        });
    }
    queue.add_all(r.state.lock().clients.keys().cloned().collect::<Vec<_>>());
    r.converge_vl3s().await;

    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            t = rx.recv() => match t {
                Some(t) => triggers::handle(&r, &queue, &ends, &upstream_conns, started, t).await,
                None => break Err(NodeError::Registry("watch tasks stopped".into())),
            },
        }
    };
    let _ = stop_tx.send(true);
    result
}

/// Serves the node's APIs on `listeners` until the returned sender says stop.
async fn serve(
    config: &Config,
    listeners: Vec<nsm_transport::Listener>,
    registry: &Registry,
    ends: &RemoteEnds,
    upstream_conns: &crate::local::upstream_kernel::Connections,
    interfaces: &crate::local::Interfaces,
    monitor: &crate::monitor::Monitor,
) -> tokio::sync::watch::Sender<bool> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for svc in [
        nsm_api::service_names::NETWORK_SERVICE,
        nsm_api::service_names::NODE,
        "connection.MonitorConnection",
        "",
    ] {
        reporter
            .set_service_status(svc, tonic_health::ServingStatus::Serving)
            .await;
    }
    let gate = Arc::new(crate::gate::NodeGate {
        trust_domain: config.credentials.as_ref().map(|c| c.trust_domain()),
        own_uid: nix::unistd::geteuid().as_raw(),
        group: config.socket_group,
    });
    let mut b = tonic::service::Routes::builder();
    b.add_service(nsm_authz::Gated::new(gate.clone(), health))
        .add_service(nsm_authz::Gated::new(
            gate.clone(),
            nsm_api::networkservice::network_service_server::NetworkServiceServer::new(crate::endpoint::NodeService {
                ends: ends.clone(),
                local: upstream_conns.clone(),
            }),
        ))
        .add_service(nsm_authz::Gated::new(
            gate.clone(),
            nsm_api::nsm::v1::node_service_server::NodeServiceServer::new(crate::local::LocalApi {
                registry: registry.clone(),
                node: config.name.clone(),
                interfaces: interfaces.clone(),
            }),
        ))
        .add_service(nsm_authz::Gated::new(
            gate.clone(),
            nsm_api::connection::monitor_connection_server::MonitorConnectionServer::new(monitor.clone()),
        ));
    let routes = b.routes();
    let server_security = match &config.credentials {
        Some(c) => nsm_transport::ServerSecurity::Mtls(c.clone()),
        None => nsm_transport::ServerSecurity::Insecure,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for l in listeners {
        let mut rx = stop_rx.clone();
        let url = l.url().clone();
        let routes = routes.clone();
        let security = server_security.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = l.serve_secure(routes, security, stopped).await {
                tracing::error!(%url, error = %e, "node listener failed");
            }
        });
    }
    stop_tx
}

/// Every resource of `kind`, asking again until the registry answers.
async fn list_until_answered(registry: &mut Registry, kind: Kind) -> Vec<pb::Resource> {
    let mut delay = Duration::from_millis(100);
    loop {
        let req = v1::ListRequest {
            kind: kind.to_pb() as i32,
            ..Default::default()
        };
        match registry.list(req).await {
            Ok(r) => return r.into_inner().items,
            Err(s) => {
                tracing::warn!(%kind, error = %s.message(), "cannot list; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Learns every client (this node's interfaces and clients, every vL3 member's DNS name)
/// and removes what an earlier daemon wired for clients that are no longer this node's.
async fn seed_clients(r: &Reconciler) {
    let items = list_until_answered(&mut r.registry.clone(), Kind::Client).await;
    let mut ours = HashSet::new();
    let mut all = Vec::new();
    {
        let mut st = r.state.lock();
        for res in items {
            if let Some(pb::resource::Kind::Client(c)) = res.kind {
                let key = ClientKey::of(&c);
                r.interfaces.note(&r.config.name, &c);
                if c.spec.as_ref().is_some_and(|s| s.node == r.config.name) {
                    ours.insert(key.clone());
                    st.clients.insert(key.clone(), c.clone());
                }
                all.push((key, c));
            }
        }
    }
    r.interfaces.seeded();
    for (key, c) in &all {
        r.note_member(key, Some(c)).await;
    }
    r.remove_unclaimed(&ours).await;
}

/// Registers (or updates) this node: its underlay address, URL, start time and WireGuard public
/// key, retrying while the registry does not answer.
pub(crate) async fn register_node(
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
    let mut delay = Duration::from_millis(100);
    loop {
        match registry
            .apply(v1::ApplyRequest {
                resource: Some(node.clone()),
                dry_run: false,
            })
            .await
        {
            Ok(_) => break,
            Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::PermissionDenied) => {
                return Err(NodeError::Registry(format!("register node: {}", s.message())));
            }
            Err(s) => {
                tracing::warn!(registry = %config.registry, error = %s.message(), "registry not answering; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!(node = %config.name, underlay = %config.underlay, "node registered");
    Ok(())
}

/// The upstream name of a resource's metadata.
fn upstream_name(meta: Option<&pb::ObjectMeta>) -> String {
    meta.map(|m| upstream::name_of(&m.namespace, &m.name))
        .unwrap_or_default()
}

/// Resyncs the view from full listings (what a lost watch event left wrong is put right), forgets
/// this node's clients the registry no longer has (deleted while a watch was down; they are
/// returned, to be torn down), and prunes handles of namespaces that are gone.
async fn relist(r: &Reconciler) -> Vec<ClientKey> {
    prune_netlink_cache();
    let list = |kind: Kind| {
        let mut registry = r.registry.clone();
        async move {
            let req = v1::ListRequest {
                kind: kind.to_pb() as i32,
                ..Default::default()
            };
            registry.list(req).await.map(|l| l.into_inner().items)
        }
    };
    for kind in [Kind::NetworkService, Kind::Endpoint, Kind::Node, Kind::Prefix] {
        let changes = r.cache.changes();
        match list(kind).await {
            Ok(items) => {
                if !r.cache.replace_if_unchanged(kind, items, changes) {
                    tracing::debug!(%kind, "a watch event came during the listing; the view keeps the watch's");
                }
            }
            Err(s) => {
                tracing::warn!(%kind, error = %s.message(), "cannot list for the resync; the view stays as the watch left it")
            }
        }
    }
    // Only clients known before the listing began can be missing from it for being deleted.
    let before: Vec<ClientKey> = r.state.lock().clients.keys().cloned().collect();
    let Ok(items) = list(Kind::Client).await else {
        return Vec::new();
    };
    let listed: HashSet<ClientKey> = items
        .iter()
        .filter_map(|res| match &res.kind {
            Some(pb::resource::Kind::Client(c)) => Some(ClientKey::of(c)),
            _ => None,
        })
        .collect();
    let mut st = r.state.lock();
    before
        .into_iter()
        .filter(|k| !listed.contains(k) && st.clients.remove(k).is_some())
        .collect()
}
