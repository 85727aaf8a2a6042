//! The node's copy of the registry (services, endpoints, nodes, vL3 prefixes): kept from the
//! watch streams, repaired from full listings at every resync, read as an immutable snapshot by
//! each decision. Deciding what a client needs therefore asks the registry nothing.

use std::sync::Arc;
use std::time::SystemTime;

use nsm_model::{Kind, pb};
use nsm_node_plan::View;

/// Shared, copy-on-write: a snapshot taken by a decision stays as it was while events change the
/// view.
#[derive(Clone, Default)]
pub(crate) struct Cache(Arc<Inner>);

#[derive(Default)]
struct Inner {
    view: parking_lot::RwLock<Arc<View>>,
    /// Changes taken from the watches, counted: a listing started before one must not replace it.
    changes: std::sync::atomic::AtomicU64,
    /// Since when the endpoint watch has been down (None: it is up, or never was down).
    endpoints_stale_since: parking_lot::Mutex<Option<SystemTime>>,
    /// Every client of the domain, by (namespace, name): what a calling node's claims about its
    /// client are checked against without a registry call (the watch brings all of them anyway).
    clients: parking_lot::RwLock<std::collections::HashMap<(String, String), ClientFacts>>,
}

/// What the endpoint side needs to know of a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientFacts {
    pub(crate) uid: String,
    pub(crate) node: String,
    /// `spec.network_service` as written (relative to the client's namespace).
    pub(crate) service: String,
    pub(crate) labels: std::collections::HashMap<String, String>,
}

impl ClientFacts {
    pub(crate) fn of(c: &pb::Client) -> ClientFacts {
        let (m, spec) = (
            c.metadata.clone().unwrap_or_default(),
            c.spec.clone().unwrap_or_default(),
        );
        ClientFacts {
            uid: m.uid,
            node: spec.node,
            service: spec.network_service,
            labels: m.labels,
        }
    }
}

impl Cache {
    /// The view as it is now.
    pub(crate) fn snapshot(&self) -> Arc<View> {
        self.0.view.read().clone()
    }

    /// The time the view's endpoints are true at: now while their watch is up, else when it went
    /// down. Registrations expire by it, so that a registry out of reach (whose endpoints keep
    /// re-registering there) does not make this node tear down vWires to them.
    pub(crate) fn endpoints_as_of(&self) -> SystemTime {
        self.0.endpoints_stale_since.lock().unwrap_or_else(SystemTime::now)
    }

    /// The endpoint watch is up (`true`) or went down.
    pub(crate) fn endpoints_watched(&self, up: bool) {
        let mut since = self.0.endpoints_stale_since.lock();
        if up {
            *since = None;
        } else if since.is_none() {
            *since = Some(SystemTime::now());
        }
    }

    /// Takes in a watch event; whether the view changed.
    pub(crate) fn apply(&self, resource: pb::Resource, deleted: bool) -> bool {
        let changed = Arc::make_mut(&mut self.0.view.write()).apply(resource, deleted);
        if changed {
            self.0.changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        changed
    }

    /// How many changes the watches brought so far (see [`Cache::replace_if_unchanged`]).
    pub(crate) fn changes(&self) -> u64 {
        self.0.changes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replaces everything of `kind` by a full listing.
    pub(crate) fn replace(&self, kind: Kind, items: Vec<pb::Resource>) {
        Arc::make_mut(&mut self.0.view.write()).replace(kind, items);
    }

    /// Replaces everything of `kind` by a listing made when the watches had brought `changes`
    /// changes, unless they have brought more since (the listing would undo them; the watch is
    /// alive, and the next resync lists again). Whether it replaced.
    pub(crate) fn replace_if_unchanged(&self, kind: Kind, items: Vec<pb::Resource>, changes: u64) -> bool {
        let mut view = self.0.view.write();
        if self.changes() != changes {
            return false;
        }
        Arc::make_mut(&mut view).replace(kind, items);
        true
    }

    /// Follows a client's watch event.
    pub(crate) fn note_client(&self, c: &pb::Client, deleted: bool) {
        let Some(m) = &c.metadata else { return };
        let key = (m.namespace.clone(), m.name.clone());
        let mut clients = self.0.clients.write();
        if deleted {
            clients.remove(&key);
        } else {
            clients.insert(key, ClientFacts::of(c));
        }
    }

    /// Client `namespace`/`name` as the watch last showed it.
    pub(crate) fn client(&self, namespace: &str, name: &str) -> Option<ClientFacts> {
        self.0
            .clients
            .read()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The spec of endpoint `namespace`/`name`, if the view has it.
    pub(crate) fn endpoint(&self, namespace: &str, name: &str) -> Option<pb::EndpointSpec> {
        self.0
            .view
            .read()
            .endpoints()
            .find(|e| {
                e.metadata
                    .as_ref()
                    .is_some_and(|m| m.namespace == namespace && m.name == name)
            })
            .and_then(|e| e.spec.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Endpoint(pb::Endpoint {
                metadata: Some(pb::ObjectMeta {
                    namespace: "default".into(),
                    name: name.into(),
                    ..Default::default()
                }),
                spec: Some(pb::EndpointSpec::default()),
            })),
        }
    }

    #[test]
    fn endpoints_expire_by_the_time_their_watch_went_down() {
        let c = Cache::default();
        let t0 = SystemTime::now();
        assert!(c.endpoints_as_of() >= t0, "watched: now");
        c.endpoints_watched(false);
        let down = c.endpoints_as_of();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.endpoints_watched(false);
        assert_eq!(c.endpoints_as_of(), down, "stays at when it went down");
        c.endpoints_watched(true);
        assert!(c.endpoints_as_of() > down);
    }

    #[test]
    fn a_listing_does_not_undo_an_event_that_came_while_it_was_made() {
        let c = Cache::default();
        let before = c.changes();
        assert!(c.apply(endpoint("new"), false));
        assert!(
            !c.replace_if_unchanged(Kind::Endpoint, vec![], before),
            "the listing is older"
        );
        assert_eq!(c.snapshot().endpoints().count(), 1);
        assert!(c.replace_if_unchanged(Kind::Endpoint, vec![], c.changes()));
        assert_eq!(c.snapshot().endpoints().count(), 0);
    }
}
