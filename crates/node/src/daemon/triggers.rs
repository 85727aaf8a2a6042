//! What sets the daemon working, and which clients each event touches: a client's spec change
//! touches that client; an endpoint's change the clients wired or pinned to it; a service's its
//! clients; every change also retries the clients that are not Ready (they may wait for it). The
//! periodic resync, the safety net, touches every client after re-listing the registry.

use std::time::Duration;

use futures::StreamExt;
use nsm_api::nsm::v1;
use nsm_model::{Kind, pb, upstream};
use nsm_node_plan::ClientKey;
use tokio::sync::mpsc;

use super::queue::Queue;
use super::reconciler::{Reconciler, Registry};
use crate::cache::Cache;
use crate::endpoint::RemoteEnds;
use nsm_mechanisms::prune_netlink_cache;

pub(crate) enum Trigger {
    Client(Box<pb::Client>, bool /* deleted */),
    /// An endpoint changed (upstream name).
    Endpoint(String),
    /// A network service changed (upstream name).
    Service(String),
    /// vL3 prefix leases changed: vL3 routers re-converge, pending clients are retried.
    Prefix,
    /// A node was registered or changed: as `Prefix`, and if its daemon restarted, this node's
    /// vWires to it are re-requested (their ends there may be gone).
    Node(Box<pb::Node>),
    /// This node's WireGuard key was rotated: the registration shows the new public key (other
    /// nodes refresh their vWires to it on it) and every vWire is refreshed.
    Rotated,
    /// Expired remote ends are swept.
    Sweep,
    /// A named network namespace was removed (`ip netns del`): the vWires in or to it go.
    NetnsGone(String),
    /// A named network namespace appeared: a client waiting for it may now be built.
    NetnsAdded,
    /// The safety net: the view re-listed, every vWire checked against the kernel, its counters
    /// refreshed and its remote end re-requested.
    Resync,
}

impl Trigger {
    fn name(&self) -> &'static str {
        match self {
            Trigger::Client(..) => "client",
            Trigger::Endpoint(_) => "endpoint",
            Trigger::Service(_) => "service",
            Trigger::Prefix => "prefix",
            Trigger::Node(_) => "node",
            Trigger::Rotated => "rotated",
            Trigger::Sweep => "sweep",
            Trigger::NetnsGone(_) => "netns gone",
            Trigger::NetnsAdded => "netns added",
            Trigger::Resync => "resync",
        }
    }
}

/// Sends `make()` every `every`, the first one at once.
pub(crate) fn spawn_ticker(every: Duration, make: fn() -> Trigger, tx: mpsc::Sender<Trigger>) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t.tick().await;
        loop {
            t.tick().await;
            if tx.send(make()).await.is_err() {
                return;
            }
        }
    });
}

/// Follows one kind in the registry, re-subscribing after a dropped stream; the view takes each
/// event before the trigger goes out, so whatever the trigger touches decides on it.
pub(crate) fn spawn_watch(mut registry: Registry, kind: Kind, cache: Cache, tx: mpsc::Sender<Trigger>) {
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let req = v1::WatchRequest {
                kind: kind.to_pb() as i32,
                ..Default::default()
            };
            match registry.watch(req).await {
                Ok(resp) => {
                    if kind == Kind::Endpoint {
                        cache.endpoints_watched(true);
                    }
                    // Subscribed again after a gap: what was deleted meanwhile comes from no
                    // event, so everything is listed and checked again.
                    if !std::mem::take(&mut first) && tx.send(Trigger::Resync).await.is_err() {
                        return;
                    }
                    let mut s = resp.into_inner();
                    while let Some(Ok(ev)) = s.next().await {
                        let deleted = ev.r#type == v1::watch_event::Type::Deleted as i32;
                        let Some(resource) = ev.resource else { continue };
                        if let Some(pb::resource::Kind::Client(c)) = &resource.kind {
                            cache.note_client(c, deleted);
                        }
                        let changed = !nsm_node_plan::View::keeps(kind) || cache.apply(resource.clone(), deleted);
                        // Nothing changed for the view (an INITIAL event repeating it, or what a
                        // listing brought already); a node's restart is still looked at.
                        if !changed && kind != Kind::Node {
                            continue;
                        }
                        let trigger = match resource.kind {
                            Some(pb::resource::Kind::Client(c)) => Trigger::Client(Box::new(c), deleted),
                            Some(pb::resource::Kind::Endpoint(e)) => {
                                Trigger::Endpoint(super::upstream_name(e.metadata.as_ref()))
                            }
                            Some(pb::resource::Kind::NetworkService(s)) => {
                                Trigger::Service(super::upstream_name(s.metadata.as_ref()))
                            }
                            Some(pb::resource::Kind::Node(n)) => Trigger::Node(Box::new(n)),
                            Some(pb::resource::Kind::Prefix(_)) => Trigger::Prefix,
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
            if kind == Kind::Endpoint {
                cache.endpoints_watched(false);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// Turns named namespaces coming and going into triggers, so that a workload's namespace being
/// removed is handled at once and not at the next resync. Namespaces named by `/proc/PID/ns/net`
/// have no such event; the resync covers them.
pub(crate) fn spawn_netns_watch(tx: mpsc::Sender<Trigger>) {
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

/// Acts on one trigger: updates the daemon's state and queues the clients it touches.
pub(crate) async fn handle(
    r: &Reconciler,
    queue: &Queue<ClientKey>,
    ends: &RemoteEnds,
    upstream_conns: &crate::local::upstream_kernel::Connections,
    started: prost_types::Timestamp,
    t: Trigger,
) {
    tracing::trace!(trigger = t.name(), "trigger");
    match t {
        Trigger::Client(c, deleted) => on_client(r, queue, *c, deleted).await,
        Trigger::Endpoint(name) => {
            let mut keys = r.state.lock().not_ready();
            keys.extend(clients_where(r, |key, c, w| {
                w.is_some_and(|w| w.endpoint == name)
                    || c.spec.as_ref().is_some_and(|s| {
                        !s.endpoint.is_empty() && upstream::qualify(&s.endpoint, &key.namespace) == name
                    })
            }));
            queue.add_all(keys);
        }
        Trigger::Service(name) => {
            r.converge_vl3s().await;
            let mut keys = r.state.lock().not_ready();
            keys.extend(clients_where(r, |key, c, _| {
                c.spec
                    .as_ref()
                    .is_some_and(|s| upstream::qualify(&s.network_service, &key.namespace) == name)
            }));
            queue.add_all(keys);
        }
        Trigger::Prefix => {
            r.converge_vl3s().await;
            queue.add_all(r.state.lock().not_ready());
        }
        Trigger::Node(n) => {
            r.converge_vl3s().await;
            on_node(r, queue, &n);
            queue.add_all(r.state.lock().not_ready());
        }
        Trigger::Rotated => {
            // Published aside, so that a registry that does not answer holds nothing up.
            let (mut registry, config, wg) = (r.registry.clone(), r.config.clone(), r.tunnels.wireguard.clone());
            tokio::spawn(async move {
                if let Err(e) = super::register_node(&mut registry, &config, started, wg.as_deref()).await {
                    tracing::warn!(error = %e, "cannot publish the rotated WireGuard key");
                }
            });
            let keys = refresh_where(r, |_| true);
            queue.add_all(keys);
        }
        Trigger::Sweep => {
            ends.sweep().await;
            upstream_conns.sweep(&ends.registry).await;
        }
        Trigger::NetnsGone(path) => {
            prune_netlink_cache();
            // Clients in that namespace lose their vWires; clients wired to an endpoint of this
            // node that lived there heal to another.
            let gone_endpoints: Vec<String> = r
                .cache
                .snapshot()
                .endpoints()
                .filter(|e| {
                    e.spec
                        .as_ref()
                        .is_some_and(|s| s.node == r.config.name && s.netns == path)
                })
                .map(|e| super::upstream_name(e.metadata.as_ref()))
                .collect();
            let keys = clients_where(r, |_, c, w| {
                c.spec.as_ref().is_some_and(|s| s.netns == path)
                    || w.is_some_and(|w| gone_endpoints.contains(&w.endpoint))
            });
            queue.add_all(keys);
            if path.rsplit('/').next().is_some_and(|n| n.starts_with("nsm-vl3-")) {
                r.converge_vl3s().await;
            }
        }
        Trigger::NetnsAdded => queue.add_all(r.state.lock().not_ready()),
        Trigger::Resync => {
            let gone = super::relist(r).await;
            if !gone.is_empty() {
                tracing::info!(
                    clients = gone.len(),
                    "clients deleted while a watch was down; removing their vWires"
                );
            }
            queue.add_all(gone);
            r.converge_vl3s().await;
            // A node that restarted or rotated its key while its watch was down.
            for n in r.cache.snapshot().nodes() {
                on_node(r, queue, n);
            }
            let keys: Vec<ClientKey> = r.state.lock().clients.keys().cloned().collect();
            tracing::debug!(clients = keys.len(), busy = queue.busy(), "resync");
            queue.add_all(keys);
        }
    }
}

/// This node's clients for which `f(key, client, what stands)` holds.
fn clients_where(
    r: &Reconciler,
    f: impl Fn(&ClientKey, &pb::Client, Option<&super::reconciler::Wired>) -> bool,
) -> Vec<ClientKey> {
    let st = r.state.lock();
    st.clients
        .iter()
        .filter(|(k, c)| f(k, c, st.wired.get(*k)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Marks the remote ends of the vWires whose far end's URL satisfies `f` as due for a refresh;
/// their keys.
fn refresh_where(r: &Reconciler, f: impl Fn(&str) -> bool) -> Vec<ClientKey> {
    let mut st = r.state.lock();
    let keys: Vec<ClientKey> = st
        .wired
        .iter()
        .filter(|(_, w)| w.remote.as_ref().is_some_and(|(url, _)| f(url)))
        .map(|(k, _)| k.clone())
        .collect();
    st.force_refresh.extend(keys.iter().cloned());
    keys
}

async fn on_client(r: &Reconciler, queue: &Queue<ClientKey>, c: pb::Client, deleted: bool) {
    let key = ClientKey::of(&c);
    let ours = c.spec.as_ref().is_some_and(|s| s.node == r.config.name);
    let spec_changed = {
        let mut st = r.state.lock();
        if deleted || !ours {
            st.clients.remove(&key).is_some() || st.wired.contains_key(&key)
        } else {
            // Our own status writes come back through the watch: only a spec change needs work.
            let changed = st.clients.get(&key).is_none_or(|old| old.spec != c.spec);
            st.clients.insert(key.clone(), c.clone());
            changed
        }
    };
    if deleted {
        r.interfaces.forget(&key);
    } else {
        r.interfaces.note(&r.config.name, &c);
    }
    r.note_member(&key, (!deleted).then_some(&c)).await;
    if deleted || !ours {
        r.monitor.delete(&super::reconciler::monitor_id(&c));
        queue.forget(&key);
    }
    if spec_changed {
        queue.add(key);
    }
}

/// Re-requests the vWires to `node` when its daemon restarted since it was last seen, so that
/// ends it lost (WIREGUARD tunnels live in its process) are built again at once rather than at
/// the next resync, or when it rotated its WireGuard key, so that the tunnels here take the new
/// key now.
fn on_node(r: &Reconciler, queue: &Queue<ClientKey>, node: &pb::Node) {
    let name = node.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    let spec = node.spec.clone().unwrap_or_default();
    let Some(started) = spec.started else { return };
    let seen = (started, spec.wireguard_public_key.clone());
    let before = r.state.lock().node_seen.insert(name.clone(), seen.clone());
    if before.is_none_or(|b| b == seen) || spec.url.is_empty() {
        return;
    }
    let keys = refresh_where(r, |url| url == spec.url);
    if !keys.is_empty() {
        tracing::info!(node = %name, vwires = keys.len(), "node restarted or rotated its key; re-requesting its ends");
    }
    queue.add_all(keys);
}
