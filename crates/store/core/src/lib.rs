//! The storage contract of nsm.
//!
//! Everything the control plane remembers — network services, endpoints, nodes, and later clients
//! and policies — lives in a [`Store`]: a flat key space of byte values with a single, monotonically
//! increasing *revision* (as in etcd). Every write bumps the revision; a [`watch`](Store::watch)
//! replays all changes after a given revision and then follows live ones, so a consumer that keeps
//! the last revision it saw can resume after a dropped stream without missing or repeating an
//! event. Keys may carry an expiry: the store itself deletes them when it passes, which is how
//! registrations that stop being refreshed disappear even when the registry that accepted them is
//! gone (etcd leases) or restarted (embedded store).
//!
//! Backends: `nsm-store-redb` (embedded, durable, the default) and `nsm-store-etcd`.
#![forbid(unsafe_code)]

#[cfg(feature = "conformance")]
pub mod conformance;

use std::time::SystemTime;

use futures::stream::BoxStream;

/// A store revision. Revision 0 means "nothing written yet"; the first write gets revision 1.
pub type Revision = u64;

/// One stored key with its value and bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key.
    pub key: String,
    /// The opaque value.
    pub value: Vec<u8>,
    /// Revision of the write that created the key (survives updates, reset by delete + create).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
}

/// What must hold for a write to go ahead. A failed condition leaves the store untouched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Condition {
    /// Write unconditionally (put: create or replace; delete: the key must exist).
    #[default]
    None,
    /// The key must not exist (create-only).
    Absent,
    /// The key must exist (update-only).
    Exists,
    /// The key must exist with exactly this `mod_revision` (optimistic concurrency).
    ModRevision(Revision),
}

/// Options of a put.
#[derive(Clone, Copy, Debug, Default)]
pub struct PutOptions {
    /// Precondition on the key's current state.
    pub condition: Condition,
    /// When set, the store deletes the key by itself at (or shortly after) this instant unless it is
    /// written again before. Backends round up to their own granularity (etcd leases: 1 s).
    pub expires_at: Option<SystemTime>,
}

/// One change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or replaced; `kv.mod_revision` is the change's revision.
    Put(KeyValue),
    /// A key was removed (deleted or expired). `prev` is its last value; `revision` the deletion's.
    Delete {
        /// The value the key had before it was removed.
        prev: KeyValue,
        /// Revision of the deletion.
        revision: Revision,
    },
    /// Continuity was lost (the backend compacted history past the watcher's position). The
    /// watcher must replace everything it knows under its prefix with `items`, which is the full
    /// state at `revision`; events after it follow.
    Reset {
        /// Every key under the watched prefix at `revision`.
        items: Vec<KeyValue>,
        /// The revision of that snapshot.
        revision: Revision,
    },
}

impl WatchEvent {
    /// The revision this event brings the watcher to.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } | WatchEvent::Reset { revision, .. } => *revision,
        }
    }
}

/// A stream of changes under a prefix, in revision order. Several events may share one revision
/// (etcd deletes all keys of an expired lease in one revision), so a consumer resuming after
/// revision `r` must have seen every event of `r`. It ends only on an unrecoverable error.
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A create found the key already present.
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    /// The key does not exist (delete, update-only put, or a revision condition).
    #[error("key {0:?} not found")]
    NotFound(String),
    /// The key exists but its revision is not the one the caller expected.
    #[error("key {key:?} was modified concurrently: expected revision {expected}, found {actual}")]
    Conflict {
        /// The key.
        key: String,
        /// The revision the caller expected.
        expected: Revision,
        /// The revision found.
        actual: Revision,
    },
    /// The requested history is no longer available; re-list and watch from the list's revision.
    #[error("revision {requested} is compacted (oldest available: {oldest})")]
    Compacted {
        /// Revision asked for.
        requested: Revision,
        /// Oldest revision still available.
        oldest: Revision,
    },
    /// The backend is not reachable or failed; the operation may or may not have taken effect only
    /// where the backend says so (etcd: a timed-out write may still commit).
    #[error("store backend unavailable: {0}")]
    Unavailable(String),
    /// The backend rejected or corrupted data; not retryable.
    #[error("store backend error: {0}")]
    Backend(String),
}

/// The contract every backend fulfils. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key starting with `prefix`, in key order, with the revision of that snapshot.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Writes a key, returning it as stored (with its new revisions) once the write is durable.
    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<KeyValue, StoreError>;

    /// Deletes a key, returning its last value and the revision of the deletion. Deleting a key that
    /// does not exist is [`StoreError::NotFound`]; `condition` may also pin the expected revision.
    async fn delete(&self, key: &str, condition: Condition) -> Result<(KeyValue, Revision), StoreError>;

    /// Streams every change under `prefix` with a revision `>= from`, then live changes.
    /// `from = list_revision + 1` continues exactly after a [`list`](Store::list).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// A short name of the backend for logs and status ("redb", "etcd").
    fn backend(&self) -> &'static str;
}
