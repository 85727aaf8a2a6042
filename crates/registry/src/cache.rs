//! The registry's in-memory view of the store.
//!
//! Every read (Get, List, Find) is served from here, never from the store: that is what keeps Find
//! under a millisecond at six-figure sizes, whichever backend holds the data. The view is fed only
//! by the store's watch, so several registries on one etcd see the same state, and a write is
//! acknowledged once the view has caught up with its revision (read-your-writes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nsm_model::{Kind, pb, upstream};
use nsm_store::{KeyValue, Revision, Store, StoreError, WatchEvent};
use parking_lot::RwLock;
use prost::Message;
use tokio::sync::{broadcast, watch};

/// Root of every key the registry owns.
pub(crate) const ROOT: &str = "/nsm/v1/";
/// Changes buffered per watcher before it is cut off as lagging.
const CHANGE_BUFFER: usize = 16_384;

/// A decoded resource, shared.
pub(crate) type Item = Arc<pb::Resource>;

/// A resource as the view keeps it: its encoded form (a few hundred bytes) rather than the decoded
/// message (about five times more with its strings and maps), so that 100k endpoints fit in well
/// under 200 MB. Decoding one costs about a microsecond, far below a gRPC round trip.
pub(crate) struct Stored {
    bytes: Box<[u8]>,
    revision: Revision,
}

impl Stored {
    pub(crate) fn decode(&self) -> Item {
        let mut r = pb::Resource::decode(&*self.bytes).expect("validated when stored");
        if let Some(m) = nsm_model::kind::meta_mut(&mut r) {
            m.resource_version = self.revision;
        }
        Arc::new(r)
    }
}

/// One change of the view.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) revision: Revision,
    pub(crate) kind: Kind,
    pub(crate) old: Option<Item>,
    pub(crate) new: Option<Item>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) revision: Revision,
    pub(crate) items: HashMap<Kind, BTreeMap<String, Stored>>,
    /// Upstream service name → keys of endpoints offering it.
    pub(crate) endpoints_by_service: HashMap<String, BTreeSet<String>>,
    /// Client key → the addresses its status lists: what address leasing must avoid, without
    /// decoding every client for every lease.
    pub(crate) client_addresses: HashMap<String, Vec<std::net::IpAddr>>,
}

impl State {
    /// Every resource of `kind`, decoded, in key order.
    pub(crate) fn kind(&self, kind: Kind) -> impl Iterator<Item = Item> + '_ {
        self.items.get(&kind).into_iter().flatten().map(|(_, s)| s.decode())
    }

    /// Number of resources of `kind`.
    pub(crate) fn count(&self, kind: Kind) -> usize {
        self.items.get(&kind).map_or(0, BTreeMap::len)
    }

    pub(crate) fn get(&self, kind: Kind, key: &str) -> Option<Item> {
        self.items.get(&kind)?.get(key).map(Stored::decode)
    }

    fn index(&mut self, key: &str, item: &pb::Resource, add: bool) {
        if let Some(pb::resource::Kind::Client(c)) = &item.kind {
            let addrs: Vec<std::net::IpAddr> = c
                .status
                .iter()
                .flat_map(|st| st.src_ip_addrs.iter().chain(&st.dst_ip_addrs))
                .filter_map(|a| a.parse::<ipnet::IpNet>().ok())
                .map(|n| n.addr())
                .collect();
            if add && !addrs.is_empty() {
                self.client_addresses.insert(key.to_owned(), addrs);
            } else {
                self.client_addresses.remove(key);
            }
        }
        if let Some(pb::resource::Kind::Endpoint(ep)) = &item.kind {
            for svc in upstream::nse_to_upstream(ep).network_service_names {
                let set = self.endpoints_by_service.entry(svc.clone()).or_default();
                if add {
                    set.insert(key.to_owned());
                } else {
                    set.remove(key);
                    if set.is_empty() {
                        self.endpoints_by_service.remove(&svc);
                    }
                }
            }
        }
    }

    /// Applies a put (the stored bytes and the decoded item) or a delete; returns the change if
    /// the key belongs to a known kind.
    fn apply(&mut self, key: &str, new: Option<(Stored, Item)>, revision: Revision) -> Option<Change> {
        let kind = kind_of_key(key)?;
        let (old, new) = match new {
            Some((stored, item)) => (
                self.items.entry(kind).or_default().insert(key.to_owned(), stored),
                Some(item),
            ),
            None => (self.items.entry(kind).or_default().remove(key), None),
        };
        let old = old.map(|o| o.decode());
        if let Some(o) = &old {
            self.index(key, o, false);
        }
        if let Some(n) = &new {
            self.index(key, n, true);
        }
        self.revision = revision;
        (old.is_some() || new.is_some()).then_some(Change {
            revision,
            kind,
            old,
            new,
        })
    }
}

fn kind_of_key(key: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| key.starts_with(k.key_prefix()))
}

/// Decodes a stored value, filling in its resource version from the store.
pub(crate) fn decode(kv: &KeyValue) -> Option<Item> {
    match pb::Resource::decode(kv.value.as_slice()) {
        Ok(mut r) => {
            if let Some(m) = nsm_model::kind::meta_mut(&mut r) {
                m.resource_version = kv.mod_revision;
            }
            Some(Arc::new(r))
        }
        Err(e) => {
            tracing::error!(key = %kv.key, error = %e, "undecodable value in the store; ignored");
            None
        }
    }
}

/// The view's form of a stored value, with the decoded item (None if undecodable).
fn entry(kv: &KeyValue) -> Option<(Stored, Item)> {
    let item = decode(kv)?;
    Some((
        Stored {
            bytes: kv.value.clone().into_boxed_slice(),
            revision: kv.mod_revision,
        },
        item,
    ))
}

/// The shared view.
pub(crate) struct Cache {
    pub(crate) state: RwLock<State>,
    changes: broadcast::Sender<Arc<Change>>,
    applied: watch::Sender<Revision>,
}

impl Cache {
    /// Loads everything, then keeps following the store in a background task.
    pub(crate) async fn start(store: Arc<dyn Store>) -> Result<Arc<Cache>, StoreError> {
        let (items, revision) = store.list(ROOT).await?;
        let cache = Arc::new(Cache {
            state: RwLock::new(State::default()),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            applied: watch::channel(revision).0,
        });
        cache.reset(items, revision);
        let stream = store.watch(ROOT, revision + 1).await?;
        tokio::spawn(Cache::follow(Arc::downgrade(&cache), store, stream));
        Ok(cache)
    }

    async fn follow(cache: std::sync::Weak<Cache>, store: Arc<dyn Store>, mut stream: nsm_store::WatchStream) {
        loop {
            let next = stream.next().await;
            let Some(cache) = cache.upgrade() else { return };
            match next {
                Some(Ok(event)) => cache.on_event(event),
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(error = %e, "store watch failed; re-listing");
                    } else {
                        tracing::warn!("store watch ended; re-listing");
                    }
                    // Re-list and diff until the store answers again.
                    loop {
                        match store.list(ROOT).await {
                            Ok((items, revision)) => match store.watch(ROOT, revision + 1).await {
                                Ok(s) => {
                                    cache.reset(items, revision);
                                    stream = s;
                                    break;
                                }
                                Err(e) => tracing::warn!(error = %e, "store watch failed"),
                            },
                            Err(e) => tracing::warn!(error = %e, "store list failed"),
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    fn on_event(&self, event: WatchEvent) {
        match event {
            WatchEvent::Put(kv) => {
                let Some(e) = entry(&kv) else { return };
                self.publish(
                    |s| s.apply(&kv.key, Some(e), kv.mod_revision).into_iter().collect(),
                    kv.mod_revision,
                );
            }
            WatchEvent::Delete { prev, revision } => {
                self.publish(|s| s.apply(&prev.key, None, revision).into_iter().collect(), revision);
            }
            WatchEvent::Reset { items, revision } => self.reset(items, revision),
        }
    }

    /// Replaces the view with a full snapshot, telling watchers what changed.
    fn reset(&self, items: Vec<KeyValue>, revision: Revision) {
        self.publish(
            |s| {
                let mut fresh: BTreeMap<String, (Stored, Item)> = BTreeMap::new();
                for kv in &items {
                    if let Some(e) = entry(kv) {
                        fresh.insert(kv.key.clone(), e);
                    }
                }
                let mut changes = Vec::new();
                let gone: Vec<String> = s
                    .items
                    .values()
                    .flat_map(|m| m.keys())
                    .filter(|k| !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    changes.extend(s.apply(&key, None, revision));
                }
                for (key, (stored, item)) in fresh {
                    let same = kind_of_key(&key)
                        .and_then(|k| s.items.get(&k)?.get(&key))
                        .is_some_and(|old| old.bytes == stored.bytes && old.revision == stored.revision);
                    if !same {
                        changes.extend(s.apply(&key, Some((stored, item)), revision));
                    }
                }
                s.revision = revision;
                changes
            },
            revision,
        );
    }

    /// Mutates the state under the write lock and broadcasts the resulting changes before
    /// releasing it, so a subscriber that snapshots under the read lock misses nothing.
    fn publish(&self, f: impl FnOnce(&mut State) -> Vec<Change>, revision: Revision) {
        let mut state = self.state.write();
        for change in f(&mut state) {
            let _ = self.changes.send(Arc::new(change));
        }
        state.revision = state.revision.max(revision);
        drop(state);
        self.applied.send_if_modified(|r| {
            let moved = revision > *r;
            *r = (*r).max(revision);
            moved
        });
    }

    /// Runs `f` on a consistent snapshot and subscribes to every later change.
    pub(crate) fn snapshot_and_subscribe<T>(
        &self,
        f: impl FnOnce(&State) -> T,
    ) -> (T, broadcast::Receiver<Arc<Change>>) {
        let state = self.state.read();
        let rx = self.changes.subscribe();
        (f(&state), rx)
    }

    /// Waits until the view includes `revision` (after a write), for read-your-writes.
    pub(crate) async fn wait_for(&self, revision: Revision) -> Result<(), StoreError> {
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| *r >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(format!(
                "the registry's view did not reach revision {revision} within 10 s"
            ))),
        }
    }
}
