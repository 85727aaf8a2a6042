//! One client reconciled: gather what the decision needs (the client, this node's view of the
//! registry, what stands and what the kernel shows of it), ask the planner
//! ([`nsm_node_plan::client::plan`]), carry the decision out ([`super::execute`]), report the
//! status. Runs on the work queue's workers, several clients at once; a client is never
//! reconciled twice at the same time, so what stands for it changes only here.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nsm_api::connection::Connection;
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_dataplane::{LinkStats, NetNs};
use nsm_model::pb;
use nsm_node_plan::client::{self as plan, Decision, Input, Me, Observed, Standing};
use nsm_node_plan::{ClientKey, MechanismKind, NotReady, Pair, Phase};
use tonic::transport::Channel;

use super::member::Member;
use super::peers::Peers;
use super::queue::Outcome;
use super::records::{self, Records};
use super::status::Reports;
use crate::Config;
use crate::cache::Cache;
use nsm_mechanisms::gateway::Gateway;
use nsm_mechanisms::{Tunnels, kernel};

pub(crate) type Registry = ResourceServiceClient<Channel>;

/// What this daemon built for one client.
#[derive(Clone, Debug)]
pub(crate) struct Wired {
    pub(crate) netns: String,
    pub(crate) interface: String,
    pub(crate) endpoint: String,
    pub(crate) pair: Pair,
    pub(crate) mtu: u32,
    /// Cross-node: the endpoint node's URL and the connection it accepted (refreshed, closed).
    pub(crate) remote: Option<(String, Connection)>,
    /// When the far end was last requested.
    pub(crate) refreshed: Option<Instant>,
    /// An address endpoint's host (or a vL3's pool), routed through the vWire via its peer.
    pub(crate) route: Option<IpNet>,
    /// Gateway vWire: this node masquerades `src` → the route's address on the underlay.
    pub(crate) nat: bool,
    pub(crate) mechanism: MechanismKind,
    /// A WIREGUARD vWire: its tunnel's id in this node's WireGuard side.
    pub(crate) wg_id: Option<String>,
    /// The client's uid it was built for (a client deleted and made again under the same name is
    /// another client).
    pub(crate) uid: String,
    /// Its id in MonitorConnections.
    pub(crate) monitor_id: String,
}

impl Wired {
    /// What the planner looks at.
    pub(crate) fn standing(&self) -> Standing {
        Standing {
            endpoint: self.endpoint.clone(),
            netns: self.netns.clone(),
            interface: self.interface.clone(),
            pair: self.pair,
            remote: self.remote.is_some(),
            route: self.route,
            nat: self.nat,
            mechanism: self.mechanism,
            refreshed: self.refreshed,
            uid: self.uid.clone(),
        }
    }

    /// The route a gateway vWire masquerades its source address to, if it does.
    pub(crate) fn nat_route(&self) -> Option<IpNet> {
        self.route.filter(|_| self.nat)
    }
}

/// Why a decision could not be carried out.
pub(crate) struct Failure {
    pub(crate) not_ready: NotReady,
    /// The registry could not be asked: keep whatever is built rather than tear it down on a blip.
    pub(crate) transient: bool,
}

impl From<NotReady> for Failure {
    fn from(not_ready: NotReady) -> Self {
        Failure {
            not_ready,
            transient: false,
        }
    }
}

/// A node error as the status shows it: Failed, with the error's text.
pub(crate) fn failed(e: impl std::fmt::Display) -> Failure {
    NotReady::failed(e.to_string()).into()
}

/// The daemon's mutable state, locked briefly (never across an await).
#[derive(Default)]
pub(crate) struct State {
    /// Clients assigned to this node, as last seen.
    pub(crate) clients: HashMap<ClientKey, pb::Client>,
    pub(crate) wired: HashMap<ClientKey, Wired>,
    /// vL3 prefix leases this node made that the cache has not seen yet (see `member.rs`).
    pub(crate) own_leases: Vec<pb::Resource>,
    /// Every vL3 member in the mesh (from all clients' statuses), for the routers' DNS names.
    pub(crate) members: HashMap<ClientKey, Member>,
    /// Clients whose far end is to be requested again at once (its node restarted, or a key
    /// changed): taken when their reconcile starts, so a trigger during it is not lost.
    pub(crate) force_refresh: std::collections::HashSet<ClientKey>,
    /// Each node's daemon start time and WireGuard key as last seen, to tell a restart or a key
    /// rotation from another change.
    pub(crate) node_seen: HashMap<String, (prost_types::Timestamp, String)>,
}

impl State {
    /// Keys of this node's clients that are not Ready (they wait for something).
    pub(crate) fn not_ready(&self) -> Vec<ClientKey> {
        self.clients
            .iter()
            .filter(|(_, c)| c.status.as_ref().is_none_or(|st| st.phase != Phase::Ready as i32))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Everything a reconcile needs, shared by the workers.
pub(crate) struct Reconciler {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    pub(crate) cache: Cache,
    pub(crate) host_netns: Arc<NetNs>,
    pub(crate) tunnels: Tunnels,
    pub(crate) gateway: Gateway,
    pub(crate) peers: Peers,
    pub(crate) monitor: crate::monitor::Monitor,
    pub(crate) interfaces: crate::local::Interfaces,
    pub(crate) vl3: tokio::sync::Mutex<nsm_vl3::Vl3Plane>,
    pub(crate) state: parking_lot::Mutex<State>,
    pub(crate) records: parking_lot::Mutex<Records>,
    pub(crate) reports: Reports,
    /// Round-robin counter for picking among eligible endpoints.
    pub(crate) rr: AtomicUsize,
}

impl Reconciler {
    pub(crate) fn me(&self) -> Me<'_> {
        Me {
            name: &self.config.name,
            underlay: self.config.underlay,
        }
    }

    /// A far end on another node is re-requested when its last request is this old: half the
    /// resync, so each resync pass refreshes it, while an endpoint's own refresh between passes
    /// (which touches the clients using it) does not.
    fn refresh_after(&self) -> Duration {
        self.config.resync / 2
    }

    /// Reconciles client `key`.
    pub(crate) async fn reconcile(&self, key: ClientKey) -> Outcome {
        let started = Instant::now();
        let client = self.state.lock().clients.get(&key).cloned();
        let Some(client) = client else {
            self.teardown(&key).await;
            return Outcome::Done;
        };
        let view = self.cache.snapshot();
        let (mut standing, forced) = {
            let mut st = self.state.lock();
            (st.wired.get(&key).map(Wired::standing), st.force_refresh.remove(&key))
        };
        if forced && let Some(s) = standing.as_mut() {
            s.refreshed = None;
        }
        // Picking among endpoints anew takes a turn of the counter up front, so that clients
        // reconciled at once do not all pick the same one.
        let rr = if standing.is_none() {
            self.rr.fetch_add(1, Ordering::Relaxed)
        } else {
            self.rr.load(Ordering::Relaxed)
        };
        let (observed, stats) = self.observe(&client, standing.as_ref()).await;
        let exists = |p: &str| Path::new(p).exists();
        let decision = plan::plan(&Input {
            me: self.me(),
            client: &client,
            view: &view,
            standing: standing.as_ref(),
            observed: observed.as_ref(),
            rr,
            now: self.cache.endpoints_as_of(),
            mono: Instant::now(),
            refresh_after: self.refresh_after(),
            netns_exists: &exists,
        });
        tracing::debug!(client = %key, ?decision, elapsed_us = started.elapsed().as_micros() as u64, "planned");
        let result = match decision {
            // Not this node's (the client moved): what stands goes, and its status is the new
            // node's to write.
            Decision::TearDown => {
                self.teardown(&key).await;
                return Outcome::Done;
            }
            Decision::Member { service, vl3 } => {
                self.reconcile_member(
                    &key,
                    &client,
                    &service,
                    &vl3,
                    standing.as_ref(),
                    observed.as_ref(),
                    stats,
                )
                .await
            }
            d => self.execute(&key, &client, d, stats).await,
        };
        tracing::debug!(client = %key, elapsed_us = started.elapsed().as_micros() as u64, "reconciled");
        let uid = monitor_id(&client);
        match result {
            Ok(status) => {
                self.monitor
                    .update(super::status::upstream_connection(&key, &client, &status));
                self.reports.report(self, &key, &client, status).await;
                Outcome::Done
            }
            Err(Failure { not_ready, transient }) => {
                if not_ready.phase == Phase::Failed {
                    tracing::warn!(client = %key, reason = %not_ready.reason, "vWire failed");
                }
                if transient {
                    tracing::debug!(client = %key, reason = %not_ready.reason, "not ready for now; what stands is kept");
                    return Outcome::Retry;
                }
                // The desired vWire cannot be built now: what stands (to an endpoint that is gone
                // or no longer eligible) must not keep carrying traffic.
                self.teardown(&key).await;
                self.monitor.delete(&uid);
                let prev = client.status.clone().unwrap_or_default();
                let status = v1::ClientStatus {
                    phase: not_ready.phase as i32,
                    reason: not_ready.reason,
                    updated: prev.updated,
                    ..Default::default()
                };
                self.reports.report(self, &key, &client, status).await;
                Outcome::Retry
            }
        }
    }

    /// What the kernel shows of the link the planner needs to see, and its counters.
    async fn observe(&self, client: &pb::Client, standing: Option<&Standing>) -> (Option<Observed>, LinkStats) {
        let Some((netns, interface)) = plan::observe(client, standing) else {
            return (None, LinkStats::default());
        };
        // Addresses matter only for adopting (nothing stands yet).
        match kernel::observe(netns, interface, standing.is_none()).await {
            Some((o, stats, _)) => (Some(o), stats),
            None => (None, LinkStats::default()),
        }
    }

    /// Records what stands for client `key`.
    pub(crate) fn set_wired(&self, key: &ClientKey, w: &Wired) {
        self.state.lock().wired.insert(key.clone(), w.clone());
        self.records.lock().save(records::Record {
            key: key.clone(),
            netns: w.netns.clone(),
            interface: w.interface.clone(),
            src: w.pair.src,
            nat_route: w.nat_route(),
        });
    }

    /// Forgets what stands for client `key` (in memory and on disk) and returns it.
    pub(crate) fn take_wired(&self, key: &ClientKey) -> Option<Wired> {
        self.records.lock().forget(key);
        self.state.lock().wired.remove(key)
    }

    /// Removes what stands for client `key`.
    pub(crate) async fn teardown(&self, key: &ClientKey) {
        let Some(w) = self.take_wired(key) else { return };
        self.vl3.lock().await.member_gone(&w.endpoint, w.pair.src.addr()).await;
        self.unwire(&w).await;
        self.monitor.delete(&w.monitor_id);
        tracing::info!(client = %key, interface = %w.interface, "vWire removed");
    }

    /// Removes a vWire: its far end on another node is closed; deleting one end of a veth pair
    /// deletes both, with their addresses and routes; a gateway vWire also takes its NAT pair out
    /// of the host namespace.
    pub(crate) async fn unwire(&self, w: &Wired) {
        if let Some((url, conn)) = &w.remote {
            self.peers.close(url, conn.clone()).await;
        }
        if let (Some(id), Some(wg)) = (&w.wg_id, &self.tunnels.wireguard) {
            // Stopping the tunnel removes its TUN, with its addresses and routes.
            wg.remove(id).await;
            return;
        }
        if let Some(route) = w.nat_route() {
            self.gateway.unmasquerade(w.pair.src.addr(), route.addr()).await;
        }
        if let Err(e) = kernel::remove(&w.netns, &w.interface).await {
            tracing::warn!(interface = %w.interface, error = %e, "removing vWire");
        }
    }

    /// Removes what an earlier daemon wired for clients that are no longer this node's (deleted
    /// while it was down, say): nothing else would, since no event names them any more.
    pub(crate) async fn remove_unclaimed(&self, ours: &HashSet<ClientKey>) {
        let all = self.records.lock().all();
        for r in all {
            if ours.contains(&r.key) {
                continue;
            }
            if let Some(route) = r.nat_route {
                self.gateway.unmasquerade(r.src.addr(), route.addr()).await;
            }
            match kernel::remove(&r.netns, &r.interface).await {
                Ok(true) => {
                    tracing::info!(client = %r.key, interface = %r.interface, netns = %r.netns, "removed the vWire of a client that is gone (deleted while this daemon was down)");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(client = %r.key, interface = %r.interface, error = %e, "removing a vWire an earlier daemon left");
                    continue;
                }
            }
            self.records.lock().forget(&r.key);
        }
    }
}

/// The id a client's connection has in MonitorConnections: the upstream connection id for clients
/// made from upstream requests, else the client's uid.
pub(crate) fn monitor_id(client: &pb::Client) -> String {
    let m = client.metadata.clone().unwrap_or_default();
    m.labels
        .get(crate::local::upstream_kernel::LABEL)
        .cloned()
        .unwrap_or(m.uid)
}
