//! The embedded store: a redb file in the data directory, durable on every acknowledged write.
//!
//! Writes go through one writer thread that drains every pending write into a single redb
//! transaction and commits it once (group commit): 64 concurrent registrations cost one fsync, not
//! 64, which is what lets a registry on one disk sustain thousands of durable writes per second.
//! The writer also owns expiry: it sleeps until the next deadline and deletes due keys in the same
//! kind of transaction, so expirations get revisions and reach watchers like any other delete.
//!
//! Watch history is kept in memory (the last [`HISTORY_LEN`] events). A watch from before that is
//! answered with [`StoreError::Compacted`], exactly as etcd answers a compacted revision; a watcher
//! that falls behind its buffer resumes from history by itself, or gets a
//! [`WatchEvent::Reset`] if history no longer covers it.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use nsm_store::{Condition, KeyValue, PutOptions, Revision, Store, StoreError, WatchEvent, WatchStream};
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";

/// Events kept in memory for watches that start in the past.
pub const HISTORY_LEN: usize = 16_384;
/// Events buffered per watcher before it is considered behind and made to catch up from history.
const WATCHER_BUFFER: usize = 8_192;
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 4_096;
/// redb page cache. The registry keeps its own in-memory index, so a small cache suffices.
const CACHE_BYTES: usize = 32 << 20;

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A stored record: revisions and expiry ahead of the value.
struct Record {
    create_revision: Revision,
    mod_revision: Revision,
    /// Milliseconds since the Unix epoch; 0 = never.
    expires_ms: u64,
    value: Vec<u8>,
}

impl Record {
    const HEADER: usize = 24;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER + self.value.len());
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.mod_revision.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() < Self::HEADER {
            return Err(StoreError::Backend(format!("corrupt record of {} bytes", bytes.len())));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        Ok(Record {
            create_revision: word(0),
            mod_revision: word(1),
            expires_ms: word(2),
            value: bytes[Self::HEADER..].to_vec(),
        })
    }

    fn into_kv(self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    // Instants before the epoch cannot be meant as deadlines; they expire at once.
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

enum Command {
    Put {
        key: String,
        value: Vec<u8>,
        opts: PutOptions,
        reply: oneshot::Sender<Result<KeyValue, StoreError>>,
    },
    Delete {
        key: String,
        condition: Condition,
        reply: oneshot::Sender<Result<(KeyValue, Revision), StoreError>>,
    },
}

struct Subscriber {
    prefix: String,
    tx: mpsc::Sender<WatchEvent>,
}

/// In-memory event history and live subscribers; one lock so that "replay then subscribe" is atomic
/// with respect to new events.
struct Hub {
    history: VecDeque<WatchEvent>,
    /// Every event with a revision >= this is in `history`.
    history_start: Revision,
    current: Revision,
    subscribers: Vec<Subscriber>,
}

impl Hub {
    fn publish(&mut self, events: Vec<WatchEvent>) {
        for event in events {
            self.current = event.revision();
            let key = match &event {
                WatchEvent::Put(kv) => kv.key.as_str(),
                WatchEvent::Delete { prev, .. } => prev.key.as_str(),
                WatchEvent::Reset { .. } => unreachable!("the writer never produces resets"),
            };
            // A subscriber whose buffer is full is dropped; its stream notices and catches up.
            self.subscribers
                .retain(|s| !key.starts_with(&s.prefix) || s.tx.try_send(event.clone()).is_ok());
            if self.history.len() == HISTORY_LEN
                && let Some(old) = self.history.pop_front()
            {
                self.history_start = old.revision() + 1;
            }
            self.history.push_back(event);
        }
    }

    /// Subscribes to `prefix` from revision `from`, returning the replayed events first.
    fn subscribe(&mut self, prefix: &str, from: Revision) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let from = if from == 0 { self.current + 1 } else { from };
        if from < self.history_start {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: self.history_start,
            });
        }
        let backlog: Vec<WatchEvent> = self
            .history
            .iter()
            .filter(|e| e.revision() >= from && event_key(e).starts_with(prefix))
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER.max(backlog.len() + 1));
        for e in backlog {
            tx.try_send(e).expect("channel sized for the backlog");
        }
        self.subscribers.push(Subscriber {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(rx)
    }
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { prev, .. } => &prev.key,
        WatchEvent::Reset { .. } => "",
    }
}

struct Inner {
    db: Arc<Database>,
    commands: Mutex<Option<std_mpsc::Sender<Command>>>,
    hub: Arc<Mutex<Hub>>,
}

/// The embedded [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl RedbStore {
    /// Opens (or creates) the store file `path`, deletes keys whose expiry passed while it was
    /// closed, and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(backend)?;
        let db = Arc::new(db);
        // Make sure the tables exist so that readers never see "table does not exist".
        let txn = db.begin_write().map_err(backend)?;
        let current = {
            txn.open_table(KV).map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            meta.get(META_REVISION).map_err(backend)?.map_or(0, |g| g.value())
        };
        txn.commit().map_err(backend)?;

        // Rebuild the expiry index from the records.
        let mut deadlines = BTreeSet::new();
        {
            let read = db.begin_read().map_err(backend)?;
            let kv = read.open_table(KV).map_err(backend)?;
            for item in kv.iter().map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let rec = Record::decode(v.value())?;
                if rec.expires_ms != 0 {
                    deadlines.insert((rec.expires_ms, k.value().to_owned()));
                }
            }
        }

        let hub = Arc::new(Mutex::new(Hub {
            history: VecDeque::new(),
            history_start: current + 1,
            current,
            subscribers: Vec::new(),
        }));
        let (tx, rx) = std_mpsc::channel();
        let mut writer = Writer {
            db: db.clone(),
            hub: hub.clone(),
            revision: current,
            deadlines,
        };
        // Expire what is due before anyone can read it.
        writer.run_batch(Vec::new());
        std::thread::Builder::new()
            .name("nsm-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(backend)?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                db,
                commands: Mutex::new(Some(tx)),
                hub,
            }),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), StoreError> {
        let guard = self.inner.commands.lock();
        let tx = guard
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        tx.send(cmd)
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))
    }

    fn read_list(db: &Database, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let read = db.begin_read().map_err(backend)?;
        // The revision published to watchers can run ahead of this snapshot only by writes that are
        // committed; read META inside the snapshot so the pair is consistent.
        let meta = read.open_table(META).map_err(backend)?;
        let revision = meta.get(META_REVISION).map_err(backend)?.map_or(0, |g| g.value());
        let kv = read.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for item in kv.range(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(Record::decode(v.value())?.into_kv(key));
        }
        Ok((out, revision))
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let read = self.inner.db.begin_read().map_err(backend)?;
        let kv = read.open_table(KV).map_err(backend)?;
        match kv.get(key).map_err(backend)? {
            Some(v) => Ok(Some(Record::decode(v.value())?.into_kv(key))),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || Self::read_list(&inner.db, &prefix))
            .await
            .map_err(backend)?
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<KeyValue, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Put {
            key: key.to_owned(),
            value,
            opts,
            reply,
        })?;
        rx.await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    async fn delete(&self, key: &str, condition: Condition) -> Result<(KeyValue, Revision), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Delete {
            key: key.to_owned(),
            condition,
            reply,
        })?;
        rx.await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let rx = self.inner.hub.lock().subscribe(prefix, from)?;
        let state = WatchState {
            store: self.clone(),
            prefix: prefix.to_owned(),
            rx,
            last: None,
        };
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }

    fn backend(&self) -> &'static str {
        "redb"
    }
}

struct WatchState {
    store: RedbStore,
    prefix: String,
    rx: mpsc::Receiver<WatchEvent>,
    last: Option<Revision>,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(event) = self.rx.recv().await {
                self.last = Some(event.revision());
                return Some((Ok(event), self));
            }
            // Our sender was dropped: we fell behind (or the store closed). Catch up.
            if self.store.inner.commands.lock().is_none() {
                return None;
            }
            let from = self.last.map_or(0, |r| r + 1);
            let resubscribed = self.store.inner.hub.lock().subscribe(&self.prefix, from);
            match resubscribed {
                Ok(rx) => self.rx = rx,
                Err(StoreError::Compacted { .. }) => {
                    // History moved on: hand the watcher a full snapshot, then follow from it.
                    let inner = self.store.inner.clone();
                    let prefix = self.prefix.clone();
                    let snapshot = tokio::task::spawn_blocking(move || {
                        let mut hub = inner.hub.lock();
                        let (items, revision) = RedbStore::read_list(&inner.db, &prefix)?;
                        // The writer commits before it publishes under this lock, so a snapshot read
                        // while holding the lock is exactly the state at the hub's position: no gap.
                        let rx = hub.subscribe(&prefix, revision + 1)?;
                        Ok::<_, StoreError>((items, revision, rx))
                    })
                    .await;
                    match snapshot {
                        Ok(Ok((items, revision, rx))) => {
                            self.rx = rx;
                            self.last = Some(revision);
                            return Some((Ok(WatchEvent::Reset { items, revision }), self));
                        }
                        Ok(Err(e)) => return Some((Err(e), self)),
                        Err(e) => return Some((Err(backend(e)), self)),
                    }
                }
                Err(e) => return Some((Err(e), self)),
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping the sender stops the writer thread after it finishes what it has.
        self.commands.lock().take();
    }
}

struct Writer {
    db: Arc<Database>,
    hub: Arc<Mutex<Hub>>,
    revision: Revision,
    /// (deadline ms, key); stale entries (key rewritten since) are skipped when they fire.
    deadlines: BTreeSet<(u64, String)>,
}

enum Reply {
    Put(
        oneshot::Sender<Result<KeyValue, StoreError>>,
        Result<KeyValue, StoreError>,
    ),
    Delete(
        oneshot::Sender<Result<(KeyValue, Revision), StoreError>>,
        Result<(KeyValue, Revision), StoreError>,
    ),
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        loop {
            let now = unix_ms(SystemTime::now());
            let first = match self.deadlines.first() {
                Some(&(due, _)) if due <= now => None,
                Some(&(due, _)) => match rx.recv_timeout(Duration::from_millis(due - now)) {
                    Ok(cmd) => Some(cmd),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => return,
                },
            };
            let mut batch: Vec<Command> = first.into_iter().collect();
            if !batch.is_empty() {
                batch.extend(rx.try_iter().take(MAX_BATCH - 1));
            }
            self.run_batch(batch);
        }
    }

    /// Applies `batch` and every due expiry in one transaction, then publishes and replies.
    fn run_batch(&mut self, batch: Vec<Command>) {
        let now = unix_ms(SystemTime::now());
        let start_revision = self.revision;
        let mut events = Vec::new();
        let mut replies = Vec::with_capacity(batch.len());
        let mut new_deadlines = Vec::new();
        let mut fired = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let txn = self.db.begin_write().map_err(backend)?;
            {
                let mut kv = txn.open_table(KV).map_err(backend)?;
                for cmd in batch {
                    match cmd {
                        Command::Put {
                            key,
                            value,
                            opts,
                            reply,
                        } => {
                            let existing = kv
                                .get(key.as_str())
                                .map_err(backend)?
                                .map(|g| Record::decode(g.value()))
                                .transpose()?;
                            let res = match check(&key, existing.as_ref(), opts.condition, true) {
                                Err(e) => Err(e),
                                Ok(()) => {
                                    self.revision += 1;
                                    let expires_ms = opts.expires_at.map_or(0, unix_ms);
                                    let rec = Record {
                                        create_revision: existing.as_ref().map_or(self.revision, |r| r.create_revision),
                                        mod_revision: self.revision,
                                        expires_ms,
                                        value,
                                    };
                                    kv.insert(key.as_str(), rec.encode().as_slice()).map_err(backend)?;
                                    if expires_ms != 0 {
                                        new_deadlines.push((expires_ms, key.clone()));
                                    }
                                    let stored = rec.into_kv(&key);
                                    events.push(WatchEvent::Put(stored.clone()));
                                    Ok(stored)
                                }
                            };
                            replies.push(Reply::Put(reply, res));
                        }
                        Command::Delete { key, condition, reply } => {
                            let existing = kv
                                .get(key.as_str())
                                .map_err(backend)?
                                .map(|g| Record::decode(g.value()))
                                .transpose()?;
                            let res = match (check(&key, existing.as_ref(), condition, false), existing) {
                                (Ok(()), Some(rec)) => {
                                    self.revision += 1;
                                    kv.remove(key.as_str()).map_err(backend)?;
                                    let prev = rec.into_kv(&key);
                                    events.push(WatchEvent::Delete {
                                        prev: prev.clone(),
                                        revision: self.revision,
                                    });
                                    Ok((prev, self.revision))
                                }
                                (Err(e), _) => Err(e),
                                (Ok(()), None) => Err(StoreError::NotFound(key.clone())),
                            };
                            replies.push(Reply::Delete(reply, res));
                        }
                    }
                }
                // Expiries that are due. A key rewritten since its deadline was recorded carries a
                // different expiry (or none) and is left alone.
                while let Some((due, key)) = self.deadlines.first().cloned() {
                    if due > now {
                        break;
                    }
                    self.deadlines.pop_first();
                    fired.push((due, key.clone()));
                    let existing = kv
                        .get(key.as_str())
                        .map_err(backend)?
                        .map(|g| Record::decode(g.value()))
                        .transpose()?;
                    if let Some(rec) = existing
                        && rec.expires_ms == due
                        && !new_deadlines.iter().any(|(_, k)| *k == key)
                    {
                        self.revision += 1;
                        kv.remove(key.as_str()).map_err(backend)?;
                        events.push(WatchEvent::Delete {
                            prev: rec.into_kv(&key),
                            revision: self.revision,
                        });
                    }
                }
                let mut meta = txn.open_table(META).map_err(backend)?;
                meta.insert(META_REVISION, self.revision).map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })();

        match result {
            Ok(()) => {
                self.deadlines.extend(new_deadlines);
                if !events.is_empty() {
                    self.hub.lock().publish(events);
                }
                for r in replies {
                    match r {
                        Reply::Put(tx, res) => {
                            let _ = tx.send(res);
                        }
                        Reply::Delete(tx, res) => {
                            let _ = tx.send(res);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store transaction failed; nothing of the batch was written");
                self.revision = start_revision;
                self.deadlines.extend(fired);
                let msg = e.to_string();
                for r in replies {
                    match r {
                        Reply::Put(tx, _) => {
                            let _ = tx.send(Err(StoreError::Backend(msg.clone())));
                        }
                        Reply::Delete(tx, _) => {
                            let _ = tx.send(Err(StoreError::Backend(msg.clone())));
                        }
                    }
                }
            }
        }
    }
}

/// Checks a write condition against the key's current record.
fn check(key: &str, existing: Option<&Record>, condition: Condition, is_put: bool) -> Result<(), StoreError> {
    match (condition, existing) {
        (Condition::None, _) if is_put => Ok(()),
        (Condition::None, Some(_)) => Ok(()),
        (Condition::None, None) => Err(StoreError::NotFound(key.to_owned())),
        (Condition::Absent, None) => Ok(()),
        (Condition::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.to_owned())),
        (Condition::Exists, Some(_)) => Ok(()),
        (Condition::Exists | Condition::ModRevision(_), None) => Err(StoreError::NotFound(key.to_owned())),
        (Condition::ModRevision(expected), Some(rec)) if rec.mod_revision == expected => Ok(()),
        (Condition::ModRevision(expected), Some(rec)) => Err(StoreError::Conflict {
            key: key.to_owned(),
            expected,
            actual: rec.mod_revision,
        }),
    }
}
