//! The etcd store: nsm's [`Store`] contract on an etcd v3 cluster, for control planes that run
//! several registries against shared, replicated state.
//!
//! The mapping is direct — store revisions are etcd revisions, conditional writes are etcd
//! transactions (compare on `create_revision`, `version` or `mod_revision`, and on failure read the
//! key in the same transaction so the error names what was actually there) — except for two
//! places where a naive mapping would not hold up in production:
//!
//! * **Expiry shares leases.** A key written with [`PutOptions::expires_at`] is attached to an etcd
//!   lease, but granting one lease per write would make 100 000 registrations a minute cost 100 000
//!   leases for etcd to track and expire. Instead every key expiring in the same whole second
//!   shares one lease, granted on first use with a TTL reaching that second and cached until the
//!   second has passed: a steady stream of registrations with a one-minute expiry needs about 60
//!   live leases. Re-writing a key attaches it to the lease of its new expiry second; writing it
//!   without an expiry detaches it (a plain etcd put carries no lease). Expiry therefore has 1 s
//!   granularity, rounded up, and etcd's minimum lease TTL (about 2 s with the default election
//!   timeout) applies to very short expiries.
//!
//! * **Watches are resilient.** etcd's watch RPC is a raw stream: it breaks when the connection
//!   does, and it is cancelled when the watcher's position has been compacted away. Each
//!   [`Store::watch`] therefore runs a background task that owns the etcd watch, remembers the
//!   revision of the last event it delivered, and when the stream breaks re-creates it from the
//!   next revision (with exponential backoff, logged through `tracing`), so consumers see neither
//!   gaps nor repeats. When etcd reports the position compacted, the task re-lists the prefix and
//!   delivers [`WatchEvent::Reset`] with the full current state, then continues after it. A watch
//!   asked to start at an already compacted revision fails at once with
//!   [`StoreError::Compacted`], as with the embedded backend. The task stops when the consumer
//!   drops the stream.
//!
//! A cluster that requires TLS (and client certificates) is reached with
//! [`EtcdStore::connect_with`] and an [`EtcdTls`]; TLS is rustls with the ring provider, as for
//! nsm's own gRPC, and only the given CA is trusted.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client as etcd;
use futures::StreamExt;
use nsm_store::{Condition, KeyValue, PutOptions, Revision, Store, StoreError, WatchEvent, WatchStream};
use parking_lot::Mutex;
use tokio::sync::{OnceCell, mpsc};

mod tls;
pub use tls::{EtcdTls, EtcdTlsError};

/// Bound on each unary request; a request that takes longer reports [`StoreError::Unavailable`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on establishing a TCP connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive, so that a silently dead connection (no FIN, e.g. a partition) breaks watch
/// streams and gets replaced. etcd rejects pings more frequent than every 5 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (lists of many keys, watch responses of a mass expiry).
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Keys fetched per range request when listing a prefix.
const LIST_PAGE: i64 = 1000;
/// Events buffered per watcher between the background task and the consumer.
const WATCH_BUFFER: usize = 1024;
/// Backoff between attempts to re-establish a broken watch.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// gRPC status codes this crate distinguishes (numeric values fixed by the gRPC spec).
mod grpc {
    pub(crate) const INVALID_ARGUMENT: i32 = 3;
    pub(crate) const NOT_FOUND: i32 = 5;
    pub(crate) const PERMISSION_DENIED: i32 = 7;
    pub(crate) const OUT_OF_RANGE: i32 = 11;
    pub(crate) const UNIMPLEMENTED: i32 = 12;
    pub(crate) const UNAUTHENTICATED: i32 = 16;
}

/// Why an etcd request failed, before it is turned into a [`StoreError`].
#[derive(Debug)]
enum RpcError {
    Etcd(etcd::Error),
    TimedOut(&'static str),
}

impl RpcError {
    fn status(&self) -> Option<(i32, &str)> {
        match self {
            RpcError::Etcd(etcd::Error::GRpcStatus(s)) => Some((i32::from(s.code()), s.message())),
            _ => None,
        }
    }

    /// The requested revision is older than etcd's compaction point.
    fn is_compacted(&self) -> bool {
        self.status()
            .is_some_and(|(code, msg)| code == grpc::OUT_OF_RANGE && msg.contains("compacted"))
    }

    /// The requested revision is newer than etcd's current revision.
    fn is_future_revision(&self) -> bool {
        self.status()
            .is_some_and(|(code, msg)| code == grpc::OUT_OF_RANGE && msg.contains("future revision"))
    }

    /// A lease the write referred to no longer exists (expired, or revoked by someone).
    fn is_lease_not_found(&self) -> bool {
        self.status()
            .is_some_and(|(code, msg)| code == grpc::NOT_FOUND && msg.contains("lease not found"))
    }

    /// Errors that retrying will not fix: a watcher gives up on these.
    fn is_permanent(&self) -> bool {
        self.status().is_some_and(|(code, _)| {
            matches!(
                code,
                grpc::INVALID_ARGUMENT | grpc::PERMISSION_DENIED | grpc::UNIMPLEMENTED | grpc::UNAUTHENTICATED
            )
        })
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (head, source) = match self {
            RpcError::Etcd(etcd::Error::GRpcStatus(s)) => {
                (format!("{:?}: {}", s.code(), s.message()), std::error::Error::source(s))
            }
            RpcError::Etcd(e) => (e.to_string(), std::error::Error::source(e)),
            RpcError::TimedOut(what) => return write!(f, "{what} timed out after {REQUEST_TIMEOUT:?}"),
        };
        f.write_str(&head)?;
        write_causes(f, head, source)
    }
}

/// What a TLS connection that etcd closed most likely means. etcd (Go) refuses a missing or
/// untrusted client certificate with a `bad_certificate` alert (newer Go: `certificate_required`
/// for a missing one), but under TLS 1.3 it checks the certificate only after the client considers
/// the handshake done, so the client often meets a closed connection (broken pipe, reset, closed)
/// instead of reading the alert, and tonic reports no more than that.
fn handshake_hint(message: &str, tls: &EtcdTls) -> Option<&'static str> {
    let alert = [
        "alert: BadCertificate",
        "alert: CertificateRequired",
        "alert: UnknownCA",
    ]
    .iter()
    .any(|a| message.contains(a));
    let closed = ["broken pipe", "onnection reset", "connection closed"]
        .iter()
        .any(|c| message.contains(c));
    match (alert, closed, &tls.identity) {
        (true, _, None) => Some(" (etcd requires a client certificate, and none is configured)"),
        (true, _, Some(_)) => Some(" (etcd rejected the client certificate: is it signed by a CA etcd trusts?)"),
        (false, true, None) => {
            Some(" (etcd closed the TLS connection: it probably requires a client certificate, and none is configured)")
        }
        (false, true, Some(_)) => Some(
            " (etcd closed the TLS connection: it probably rejected the client certificate; is it signed by a CA \
             etcd trusts?)",
        ),
        (false, false, _) => None,
    }
}

/// Appends the causes of a transport failure: tonic reports a refused TLS handshake or a
/// connection reset only as "transport error", with what actually happened (an unknown CA, a
/// missing client certificate) further down the chain. Causes whose text the previous one already
/// contains are skipped.
fn write_causes(
    f: &mut std::fmt::Formatter<'_>,
    mut last: String,
    mut cause: Option<&(dyn std::error::Error + 'static)>,
) -> std::fmt::Result {
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !last.contains(&text) {
            write!(f, ": {text}")?;
        }
        last = text;
        cause = e.source();
    }
    Ok(())
}

/// Runs one etcd request with [`REQUEST_TIMEOUT`].
async fn timed<T>(what: &'static str, fut: impl Future<Output = Result<T, etcd::Error>>) -> Result<T, RpcError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(result) => result.map_err(RpcError::Etcd),
        Err(_) => Err(RpcError::TimedOut(what)),
    }
}

fn to_revision(r: i64) -> Revision {
    Revision::try_from(r).unwrap_or(0)
}

fn to_etcd_revision(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// The `[key, range_end)` covering every key that starts with `prefix` (all keys for "").
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = prefix.as_bytes().to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("non-empty") += 1;
            return (prefix.as_bytes().to_vec(), end);
        }
        end.pop();
    }
    // A prefix of only 0xff bytes (not valid UTF-8, but be total): everything from it on.
    (prefix.as_bytes().to_vec(), vec![0])
}

fn to_kv(kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv
        .key_str()
        .map_err(|_| StoreError::Backend(format!("etcd key {:?} is not UTF-8", String::from_utf8_lossy(kv.key()))))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: to_revision(kv.create_revision()),
        mod_revision: to_revision(kv.mod_revision()),
    })
}

fn header_revision(header: Option<&etcd::ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(|h| to_revision(h.revision()))
        .ok_or_else(|| StoreError::Backend("etcd response without header".into()))
}

/// Whole seconds since the Unix epoch, rounded up.
fn unix_seconds_ceil(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

struct Inner {
    client: etcd::Client,
    /// The endpoints as given, for error messages.
    endpoints: String,
    /// One lease per expiry second (Unix seconds, rounded up), shared by every key expiring then.
    /// The cell is filled by the first writer that needs it; concurrent writers wait for it.
    leases: Mutex<HashMap<u64, Arc<OnceCell<i64>>>>,
}

impl Inner {
    fn kv(&self) -> etcd::KvClient {
        self.client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn error(&self, e: RpcError) -> StoreError {
        let transient = match &e {
            RpcError::TimedOut(_) => true,
            RpcError::Etcd(etcd::Error::TransportError(_) | etcd::Error::IoError(_)) => true,
            RpcError::Etcd(etcd::Error::GRpcStatus(_)) => !e.is_permanent(),
            RpcError::Etcd(_) => false,
        };
        if transient {
            StoreError::Unavailable(format!("etcd at {}: {e}", self.endpoints))
        } else {
            StoreError::Backend(format!("etcd at {}: {e}", self.endpoints))
        }
    }

    /// Every key under `prefix` at one revision, fetched in pages of [`LIST_PAGE`].
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        // Later pages are read at the revision of the first, so the result is one snapshot. If
        // that revision is compacted between pages (only with very large prefixes), start over.
        let mut attempts = 0;
        'snapshot: loop {
            attempts += 1;
            let (mut from, end) = prefix_range(prefix);
            let mut items = Vec::new();
            let mut revision = 0;
            loop {
                let mut opts = etcd::GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
                if revision != 0 {
                    opts = opts.with_revision(to_etcd_revision(revision));
                }
                let resp = match timed("list", self.kv().get(from.clone(), Some(opts))).await {
                    Ok(resp) => resp,
                    Err(e) if e.is_compacted() && attempts < 5 => continue 'snapshot,
                    Err(e) => return Err(self.error(e)),
                };
                if revision == 0 {
                    revision = header_revision(resp.header())?;
                }
                for kv in resp.kvs() {
                    items.push(to_kv(kv)?);
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => return Ok((items, revision)),
                }
            }
        }
    }

    /// The current revision of the store.
    async fn current_revision(&self, prefix: &str) -> Result<Revision, StoreError> {
        let (key, end) = prefix_range(prefix);
        let opts = etcd::GetOptions::new().with_range(end).with_count_only();
        let resp = timed("get revision", self.kv().get(key, Some(opts)))
            .await
            .map_err(|e| self.error(e))?;
        header_revision(resp.header())
    }

    /// Fails with [`StoreError::Compacted`] if history before `from` is no longer available.
    async fn check_not_compacted(&self, prefix: &str, from: Revision) -> Result<(), StoreError> {
        let (key, end) = prefix_range(prefix);
        let opts = etcd::GetOptions::new()
            .with_range(end.clone())
            .with_count_only()
            .with_revision(to_etcd_revision(from));
        match timed("check revision", self.kv().get(key.clone(), Some(opts))).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_future_revision() => Ok(()),
            Err(e) if e.is_compacted() => {
                // A range error does not say how far etcd compacted; a watch at the compacted
                // revision does, promptly, in the response that cancels it.
                let oldest = self.compact_revision(key, end, from).await.unwrap_or(from + 1);
                Err(StoreError::Compacted {
                    requested: from,
                    oldest,
                })
            }
            Err(e) => Err(self.error(e)),
        }
    }

    async fn compact_revision(&self, key: Vec<u8>, end: Vec<u8>, from: Revision) -> Option<Revision> {
        let probe = async {
            let opts = etcd::WatchOptions::new()
                .with_range(end)
                .with_start_revision(to_etcd_revision(from));
            let mut stream = self.client.watch_client().watch(key, Some(opts)).await.ok()?;
            while let Some(resp) = stream.message().await.ok()? {
                if resp.compact_revision() > 0 {
                    return Some(to_revision(resp.compact_revision()));
                }
                if resp.canceled() {
                    return None;
                }
            }
            None
        };
        tokio::time::timeout(REQUEST_TIMEOUT, probe).await.ok().flatten()
    }

    /// The lease shared by keys expiring in the same second as `expires_at`, granting it first
    /// if needed. Returns (second, lease id).
    async fn lease_for(&self, expires_at: SystemTime) -> Result<(u64, i64), StoreError> {
        let now = SystemTime::now();
        let now_secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        // Expiries in the past or within the current second get the next second's lease.
        let second = unix_seconds_ceil(expires_at).max(now_secs + 1);
        let cell = {
            let mut leases = self.leases.lock();
            // A lease whose second has begun is about to expire; new keys must not join it.
            leases.retain(|&s, _| s > now_secs);
            leases.entry(second).or_default().clone()
        };
        let id = cell
            .get_or_try_init(|| async {
                let until = UNIX_EPOCH + Duration::from_secs(second);
                let ttl = until.duration_since(SystemTime::now()).unwrap_or_default();
                // Round up so the lease never ends before its second; etcd may raise it further
                // to its minimum TTL.
                let ttl_secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
                let mut lease = self.client.lease_client();
                let resp = timed(
                    "lease grant",
                    lease.grant(i64::try_from(ttl_secs).unwrap_or(i64::MAX), None),
                )
                .await
                .map_err(|e| self.error(e))?;
                if !resp.error().is_empty() {
                    return Err(StoreError::Backend(format!(
                        "etcd at {}: lease grant: {}",
                        self.endpoints,
                        resp.error()
                    )));
                }
                tracing::debug!(
                    lease = resp.id(),
                    ttl = resp.ttl(),
                    second,
                    "granted shared expiry lease"
                );
                Ok(resp.id())
            })
            .await?;
        Ok((second, *id))
    }

    /// Drops a cached lease that etcd no longer knows.
    fn forget_lease(&self, second: u64, id: i64) {
        let mut leases = self.leases.lock();
        if leases.get(&second).and_then(|c| c.get()) == Some(&id) {
            leases.remove(&second);
        }
    }

    /// One conditional put in a transaction; on a failed condition the same transaction reads the
    /// key so the error reports what is there.
    async fn put_txn(
        &self,
        key: &str,
        value: &[u8],
        condition: Condition,
        lease: Option<i64>,
    ) -> Result<Result<KeyValue, StoreError>, RpcError> {
        let mut opts = etcd::PutOptions::new().with_prev_key();
        if let Some(id) = lease {
            opts = opts.with_lease(id);
        }
        let txn = etcd::Txn::new()
            .when(compares(key, condition))
            .and_then([etcd::TxnOp::put(key, value, Some(opts))])
            .or_else([etcd::TxnOp::get(key, None)]);
        let resp = timed("put", self.kv().txn(txn)).await?;
        let outcome = (|| {
            let revision = header_revision(resp.header())?;
            let first = resp.op_responses().into_iter().next();
            if !resp.succeeded() {
                let current = match first {
                    Some(etcd::TxnOpResponse::Get(get)) => get.kvs().first().map(to_kv).transpose()?,
                    _ => {
                        return Err(StoreError::Backend("etcd txn: missing read of failed condition".into()));
                    }
                };
                return Err(condition_error(key, condition, current.as_ref()));
            }
            let prev = match first {
                Some(etcd::TxnOpResponse::Put(put)) => put.prev_key().map(to_kv).transpose()?,
                _ => return Err(StoreError::Backend("etcd txn: missing put response".into())),
            };
            Ok(KeyValue {
                key: key.to_owned(),
                value: value.to_vec(),
                create_revision: prev.map_or(revision, |p| p.create_revision),
                mod_revision: revision,
            })
        })();
        Ok(outcome)
    }
}

/// The transaction guard for `condition` on `key`. Keys that do not exist compare as revision 0
/// and version 0 in etcd.
fn compares(key: &str, condition: Condition) -> Vec<etcd::Compare> {
    let exists = || etcd::Compare::version(key, etcd::CompareOp::Greater, 0);
    match condition {
        Condition::None => Vec::new(),
        Condition::Absent => vec![etcd::Compare::create_revision(key, etcd::CompareOp::Equal, 0)],
        Condition::Exists => vec![exists()],
        Condition::ModRevision(r) => {
            vec![
                exists(),
                etcd::Compare::mod_revision(key, etcd::CompareOp::Equal, to_etcd_revision(r)),
            ]
        }
    }
}

/// The error for a failed `condition`, given what the key holds.
fn condition_error(key: &str, condition: Condition, current: Option<&KeyValue>) -> StoreError {
    match (condition, current) {
        (Condition::Absent, Some(_)) => StoreError::AlreadyExists(key.to_owned()),
        (Condition::ModRevision(expected), Some(kv)) => StoreError::Conflict {
            key: key.to_owned(),
            expected,
            actual: kv.mod_revision,
        },
        (_, None) => StoreError::NotFound(key.to_owned()),
        // The key changed between the compare and the read of the same transaction: impossible,
        // but report it as a conflict rather than panic.
        (_, Some(kv)) => StoreError::Conflict {
            key: key.to_owned(),
            expected: 0,
            actual: kv.mod_revision,
        },
    }
}

/// The etcd [`Store`]. Cheap to clone; clones share the connection and the lease cache.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`host:port` or `http://host:port`) over
    /// plain HTTP and checks that it answers. An unreachable cluster is
    /// [`StoreError::Unavailable`] naming the endpoints.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, None).await
    }

    /// Connects to the etcd cluster at `endpoints` and checks that it answers; with `tls`, over
    /// TLS (`host:port` endpoints are dialed as `https://host:port`), trusting only `tls.ca_pem`
    /// and presenting `tls.identity` if given.
    ///
    /// An endpoint whose scheme contradicts the choice (`http://` with TLS, `https://` without)
    /// is refused up front, since it could only fail later with a less helpful error. A cluster
    /// that is unreachable or refuses the handshake (unknown CA, missing or rejected client
    /// certificate) is [`StoreError::Unavailable`] naming the endpoints and the TLS failure.
    pub async fn connect_with(endpoints: &[String], tls: Option<EtcdTls>) -> Result<Self, StoreError> {
        let label = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let contradicting = if tls.is_some() { "http://" } else { "https://" };
        if let Some(e) = endpoints.iter().find(|e| e.starts_with(contradicting)) {
            return Err(StoreError::Backend(if tls.is_some() {
                format!("etcd endpoint {e} is plain HTTP but TLS is configured; use https:// or host:port")
            } else {
                format!("etcd endpoint {e} is HTTPS but no TLS settings (CA certificate) are given")
            }));
        }
        let mut options = etcd::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        if let Some(tls) = &tls {
            options = options.with_tls(tls.to_options());
        }
        let client = timed("connect", etcd::Client::connect(endpoints, Some(options)))
            .await
            .map_err(|e| StoreError::Unavailable(format!("etcd at {label}: {e}")))?;
        let inner = Inner {
            client,
            endpoints: label,
            leases: Mutex::new(HashMap::new()),
        };
        // Connecting is lazy; make one request so that a wrong address fails here, not later.
        let mut maintenance = inner.client.maintenance_client();
        timed("status", maintenance.status())
            .await
            .map_err(|e| match inner.error(e) {
                StoreError::Backend(m) | StoreError::Unavailable(m) => {
                    let hint = tls.as_ref().and_then(|tls| handshake_hint(&m, tls));
                    StoreError::Unavailable(format!("{m}{}", hint.unwrap_or_default()))
                }
                other => other,
            })?;
        Ok(EtcdStore { inner: Arc::new(inner) })
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let inner = &self.inner;
        let resp = timed("get", inner.kv().get(key, None))
            .await
            .map_err(|e| inner.error(e))?;
        resp.kvs().first().map(to_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.inner.list(prefix).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<KeyValue, StoreError> {
        let inner = &self.inner;
        let mut lease_retried = false;
        loop {
            let lease = match opts.expires_at {
                Some(at) => Some(inner.lease_for(at).await?),
                None => None,
            };
            match inner
                .put_txn(key, &value, opts.condition, lease.map(|(_, id)| id))
                .await
            {
                Ok(outcome) => return outcome,
                // The cached lease expired or was revoked under us: get a fresh one, once.
                Err(e) if e.is_lease_not_found() && !lease_retried => {
                    if let Some((second, id)) = lease {
                        tracing::debug!(lease = id, second, "cached expiry lease is gone; granting a new one");
                        inner.forget_lease(second, id);
                    }
                    lease_retried = true;
                }
                Err(e) => return Err(inner.error(e)),
            }
        }
    }

    async fn delete(&self, key: &str, condition: Condition) -> Result<(KeyValue, Revision), StoreError> {
        let inner = &self.inner;
        if condition == Condition::Absent {
            // Deleting a key on condition that it is absent can never delete anything.
            return Err(match self.get(key).await? {
                Some(_) => StoreError::AlreadyExists(key.to_owned()),
                None => StoreError::NotFound(key.to_owned()),
            });
        }
        // Plain deletes too must find the key (NotFound otherwise).
        let guard = match condition {
            Condition::None => Condition::Exists,
            other => other,
        };
        let txn = etcd::Txn::new()
            .when(compares(key, guard))
            .and_then([etcd::TxnOp::delete(
                key,
                Some(etcd::DeleteOptions::new().with_prev_key()),
            )])
            .or_else([etcd::TxnOp::get(key, None)]);
        let resp = timed("delete", inner.kv().txn(txn)).await.map_err(|e| inner.error(e))?;
        let revision = header_revision(resp.header())?;
        match resp.op_responses().into_iter().next() {
            Some(etcd::TxnOpResponse::Delete(del)) if resp.succeeded() => {
                match del.prev_kvs().first() {
                    Some(prev) => Ok((to_kv(prev)?, revision)),
                    // Removed concurrently between compare and delete: impossible within one txn.
                    None => Err(StoreError::NotFound(key.to_owned())),
                }
            }
            Some(etcd::TxnOpResponse::Get(get)) if !resp.succeeded() => {
                let current = get.kvs().first().map(to_kv).transpose()?;
                Err(condition_error(key, guard, current.as_ref()))
            }
            _ => Err(StoreError::Backend("etcd txn: unexpected response to delete".into())),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let next = if from == 0 {
            self.inner.current_revision(prefix).await? + 1
        } else {
            self.inner.check_not_compacted(prefix, from).await?;
            from
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            inner: self.inner.clone(),
            prefix: prefix.to_owned(),
            next,
            tx,
        };
        tokio::spawn(watcher.run());
        Ok(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) }).boxed())
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }
}

/// Why one etcd watch stream ended.
enum StreamEnd {
    /// The stream broke or etcd cancelled it; re-create it from `next`.
    Dropped(String),
    /// etcd compacted history past `next`; re-list and reset.
    Compacted(Revision),
    /// A failure retrying will not fix; report it and stop.
    Fatal(StoreError),
    /// The consumer dropped the stream.
    Closed,
}

/// The background task behind one [`Store::watch`] stream.
struct Watcher {
    inner: Arc<Inner>,
    prefix: String,
    /// The revision to (re)start the etcd watch from: one past the last delivered event.
    next: Revision,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
}

impl Watcher {
    async fn run(mut self) {
        let tx = self.tx.clone();
        tokio::select! {
            () = tx.closed() => {}
            () = self.follow() => {}
        }
        tracing::debug!(prefix = %self.prefix, "etcd watcher stopped");
    }

    async fn follow(&mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.follow_stream(&mut backoff).await {
                StreamEnd::Dropped(reason) => {
                    tracing::warn!(
                        prefix = %self.prefix,
                        endpoints = %self.inner.endpoints,
                        resume_from = self.next,
                        retry_in = ?backoff,
                        %reason,
                        "etcd watch stream lost; reconnecting",
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                StreamEnd::Compacted(compact_revision) => {
                    tracing::info!(
                        prefix = %self.prefix,
                        position = self.next,
                        compact_revision,
                        "etcd compacted past the watch position; re-listing",
                    );
                    if !self.reset(&mut backoff).await {
                        return;
                    }
                }
                StreamEnd::Fatal(e) => {
                    tracing::error!(prefix = %self.prefix, error = %e, "etcd watch failed");
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
                StreamEnd::Closed => return,
            }
        }
    }

    /// Re-lists the prefix and delivers it as a [`WatchEvent::Reset`]. False if the consumer is
    /// gone.
    async fn reset(&mut self, backoff: &mut Duration) -> bool {
        loop {
            match self.inner.list(&self.prefix).await {
                Ok((items, revision)) => {
                    if self.tx.send(Ok(WatchEvent::Reset { items, revision })).await.is_err() {
                        return false;
                    }
                    self.next = revision + 1;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, retry_in = ?backoff, "re-listing after compaction failed");
                    tokio::time::sleep(*backoff).await;
                    *backoff = (*backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Runs one etcd watch from `self.next` until it ends, delivering its events.
    async fn follow_stream(&mut self, backoff: &mut Duration) -> StreamEnd {
        let (key, end) = prefix_range(&self.prefix);
        let opts = etcd::WatchOptions::new()
            .with_range(end)
            .with_start_revision(to_etcd_revision(self.next))
            .with_prev_key();
        let mut client = self
            .inner
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let stream = match timed("watch", client.watch(key, Some(opts))).await {
            Ok(stream) => stream,
            Err(e) => return self.ended(e),
        };
        // Keep the request half open: closing it would end the watch on some etcd versions.
        let (_requests, mut responses) = stream.split();
        loop {
            let resp = match responses.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return StreamEnd::Dropped("stream closed by etcd".into()),
                Err(e) => return self.ended(RpcError::Etcd(e)),
            };
            if resp.compact_revision() > 0 {
                return StreamEnd::Compacted(to_revision(resp.compact_revision()));
            }
            if resp.canceled() {
                return StreamEnd::Dropped(format!("watch cancelled by etcd: {}", resp.cancel_reason()));
            }
            if resp.created() {
                *backoff = MIN_BACKOFF;
                tracing::debug!(prefix = %self.prefix, from = self.next, "etcd watch established");
            }
            for event in resp.events() {
                let event = match to_event(event) {
                    Ok(event) => event,
                    Err(e) => return StreamEnd::Fatal(e),
                };
                let revision = event.revision();
                if self.tx.send(Ok(event)).await.is_err() {
                    return StreamEnd::Closed;
                }
                self.next = revision + 1;
            }
        }
    }

    fn ended(&self, e: RpcError) -> StreamEnd {
        if e.is_permanent() {
            StreamEnd::Fatal(self.inner.error(e))
        } else {
            StreamEnd::Dropped(e.to_string())
        }
    }
}

fn to_event(event: &etcd::Event) -> Result<WatchEvent, StoreError> {
    let kv = event
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd watch event without kv".into()))?;
    match event.event_type() {
        etcd::EventType::Put => Ok(WatchEvent::Put(to_kv(kv)?)),
        etcd::EventType::Delete => {
            // The deleted kv carries only the key and the deletion's revision; the last value
            // comes from prev_kv, which etcd omits only if that version was already compacted.
            let revision = to_revision(kv.mod_revision());
            let prev = match event.prev_kv() {
                Some(prev) => to_kv(prev)?,
                None => {
                    let mut prev = to_kv(kv)?;
                    tracing::warn!(key = %prev.key, revision, "etcd delete event without previous value");
                    prev.create_revision = 0;
                    prev.mod_revision = 0;
                    prev
                }
            };
            Ok(WatchEvent::Delete { prev, revision })
        }
    }
}
