//! The shared Store contract, run against a real etcd, plus the etcd-specific behaviour: watches
//! that survive a crashed server and compaction, and shared expiry leases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use nsm_store::{Condition, KeyValue, PutOptions, Store, StoreError, WatchEvent, WatchStream, conformance};
use nsm_store_etcd::EtcdStore;
use nsm_testing::Etcd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Store logs (watch reconnects, resets) go to the test output; `RUST_LOG` filters them.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("nsm_store_etcd=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

async fn start() -> (Etcd, EtcdStore) {
    init_tracing();
    let etcd = Etcd::start().expect("start etcd");
    let store = EtcdStore::connect(&[etcd.endpoint()]).await.expect("connect to etcd");
    (etcd, store)
}

async fn raw_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("raw etcd client")
}

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("watch event within 20 s")
        .expect("watch stream ended")
        .expect("watch stream error")
}

/// Asserts the stream stays quiet for a while (nothing repeated or invented).
async fn assert_quiet(w: &mut WatchStream) {
    if let Ok(e) = tokio::time::timeout(Duration::from_millis(1500), w.next()).await {
        panic!("unexpected watch item: {e:?}");
    }
}

fn plain() -> PutOptions {
    PutOptions::default()
}

#[tokio::test]
async fn crud_and_revisions() {
    let (_etcd, s) = start().await;
    conformance::crud_and_revisions(&s, "crud/").await;
}

#[tokio::test]
async fn conditions_leave_state_untouched() {
    let (_etcd, s) = start().await;
    conformance::conditions_leave_state_untouched(&s, "cond/").await;
}

#[tokio::test]
async fn watch_replays_then_follows() {
    let (_etcd, s) = start().await;
    conformance::watch_replays_then_follows(&s, "replay").await;
}

#[tokio::test]
async fn expiry() {
    let (_etcd, s) = start().await;
    conformance::expiry(&s, "exp/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes() {
    let (_etcd, s) = start().await;
    conformance::concurrent_writes(Arc::new(s), "conc/").await;
}

#[tokio::test]
async fn backend_name_and_unreachable_endpoint() {
    let (_etcd, s) = start().await;
    assert_eq!(s.backend(), "etcd");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("127.0.0.1:{port}");
    let err = EtcdStore::connect(std::slice::from_ref(&dead))
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains(&dead)),
        "{err:?}"
    );
}

/// Keys expiring in the same second share one lease; a different second gets its own.
#[tokio::test]
async fn expiring_keys_share_leases() {
    let (etcd, s) = start().await;
    let mut raw = raw_client(&etcd).await;
    // Two instants in the same whole second, well in the future.
    let base = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 60,
        );
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let s = s.clone();
        let at = base + Duration::from_millis(200 + i * 10);
        tasks.push(tokio::spawn(async move {
            let opts = PutOptions {
                condition: Condition::None,
                expires_at: Some(at),
            };
            s.put(&format!("lease/{i:02}"), b"v".to_vec(), opts).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        raw.leases().await.unwrap().leases().len(),
        1,
        "one lease for one expiry second"
    );
    let other = PutOptions {
        condition: Condition::None,
        expires_at: Some(base + Duration::from_secs(5)),
    };
    s.put("lease/other", b"v".to_vec(), other).await.unwrap();
    let leases = raw.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 2, "another second, another lease");
    let ttl = raw.lease_time_to_live(leases.leases()[0].id(), None).await.unwrap();
    assert!(
        (55..=67).contains(&ttl.ttl()),
        "lease TTL reaches its second: {}",
        ttl.ttl()
    );
    // A plain put detaches the key from its lease.
    s.put("lease/00", b"v2".to_vec(), plain()).await.unwrap();
    let (kvs, _) = s.list("lease/").await.unwrap();
    assert_eq!(kvs.len(), 51);
    let got = raw.get("lease/00", None).await.unwrap();
    assert_eq!(got.kvs()[0].lease(), 0, "plain put carries no lease");

    // A cached lease that disappears (revoked here; expired early in real life) is replaced.
    let other_lease = raw.get("lease/other", None).await.unwrap().kvs()[0].lease();
    raw.lease_revoke(other_lease).await.unwrap();
    let again = PutOptions {
        condition: Condition::None,
        expires_at: Some(base + Duration::from_secs(5)),
    };
    s.put("lease/again", b"v".to_vec(), again).await.unwrap();
    let lease = raw.get("lease/again", None).await.unwrap().kvs()[0].lease();
    assert!(lease != 0 && lease != other_lease, "attached to a fresh lease");
}

/// A watch keeps going across a crash (SIGKILL) and restart of etcd, delivering every change
/// exactly once, including those written while it was disconnected.
#[tokio::test]
async fn watch_survives_etcd_restart() {
    let (mut etcd, s) = start().await;
    let (_, rev) = s.list("w/").await.unwrap();
    let mut w = s.watch("w/", rev + 1).await.unwrap();
    let one = s.put("w/1", b"1".to_vec(), plain()).await.unwrap();
    let two = s.put("w/2", b"2".to_vec(), plain()).await.unwrap();
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(one.clone()));
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(two));

    etcd.stop().unwrap();
    let err = s.put("w/down", b"x".to_vec(), plain()).await.expect_err("etcd is down");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains(&etcd.endpoint())),
        "{err:?}"
    );
    etcd.restart().unwrap();

    // Written right after the restart, most likely before the watcher has reconnected.
    let three = put_retrying(&s, "w/3", b"3").await;
    let (prev, del_rev) = s.delete("w/1", Condition::None).await.unwrap();
    assert_eq!(prev, one);
    s.put("x/outside", b"o".to_vec(), plain()).await.unwrap();
    let four = s.put("w/4", b"4".to_vec(), plain()).await.unwrap();

    assert_eq!(next_event(&mut w).await, WatchEvent::Put(three));
    assert_eq!(
        next_event(&mut w).await,
        WatchEvent::Delete {
            prev: one,
            revision: del_rev
        }
    );
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(four));
    assert_quiet(&mut w).await;

    // And once more, with live writes after the reconnect.
    etcd.restart().unwrap();
    let five = put_retrying(&s, "w/5", b"5").await;
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(five));
    assert_quiet(&mut w).await;
}

/// The first write after a restart may race the client's reconnect; retry briefly.
async fn put_retrying(s: &EtcdStore, key: &str, value: &[u8]) -> KeyValue {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match s.put(key, value.to_vec(), plain()).await {
            Ok(kv) => return kv,
            Err(StoreError::Unavailable(m)) if tokio::time::Instant::now() < deadline => {
                eprintln!("put after restart: {m}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put after restart: {e:?}"),
        }
    }
}

/// A watcher that loses its connection and comes back after etcd compacted past its position
/// gets a `Reset` with the full current state, then continues with live events.
#[tokio::test]
async fn watcher_behind_compaction_gets_reset() {
    init_tracing();
    let etcd = Etcd::start().unwrap();
    let direct = EtcdStore::connect(&[etcd.endpoint()]).await.unwrap();
    let mut raw = raw_client(&etcd).await;
    // The watching store reaches etcd through a proxy the test can cut, so the watcher is
    // disconnected exactly while history is written and compacted.
    let proxy = Proxy::start(etcd.endpoint()).await;
    let watching = EtcdStore::connect(&[proxy.endpoint()]).await.unwrap();

    direct.put("c/a", b"a1".to_vec(), plain()).await.unwrap();
    direct.put("c/b", b"b1".to_vec(), plain()).await.unwrap();
    let (_, rev) = direct.list("c/").await.unwrap();
    let mut w = watching.watch("c/", rev + 1).await.unwrap();
    let a2 = direct.put("c/a", b"a2".to_vec(), plain()).await.unwrap();
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(a2));

    proxy.cut();
    direct.put("c/c", b"c1".to_vec(), plain()).await.unwrap();
    direct.delete("c/b", Condition::None).await.unwrap();
    direct.put("c/a", b"a3".to_vec(), plain()).await.unwrap();
    let last = direct.put("other/x", b"x".to_vec(), plain()).await.unwrap();
    raw.compact(
        last.mod_revision as i64,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    let (expected, expected_rev) = direct.list("c/").await.unwrap();
    proxy.heal();

    match next_event(&mut w).await {
        WatchEvent::Reset { items, revision } => {
            assert_eq!(items, expected, "the reset carries the full current state");
            assert_eq!(revision, expected_rev);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    let d = direct.put("c/d", b"d1".to_vec(), plain()).await.unwrap();
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(d));
    assert_quiet(&mut w).await;
}

/// Asking for history that etcd has compacted away fails at once, naming the oldest revision.
#[tokio::test]
async fn watch_from_compacted_revision_fails() {
    let (etcd, s) = start().await;
    let mut raw = raw_client(&etcd).await;
    let first = s.put("k/a", b"1".to_vec(), plain()).await.unwrap();
    s.put("k/a", b"2".to_vec(), plain()).await.unwrap();
    let last = s.put("k/a", b"3".to_vec(), plain()).await.unwrap();
    raw.compact(last.mod_revision as i64, None).await.unwrap();

    let err = s.watch("k/", first.mod_revision).await.err().expect("compacted");
    assert!(
        matches!(err, StoreError::Compacted { requested, oldest } if requested == first.mod_revision && oldest == last.mod_revision),
        "{err:?}"
    );
    // The compaction point itself is still watchable.
    let mut w = s.watch("k/", last.mod_revision).await.unwrap();
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(last));
    // From 0 means from now: only later writes.
    let mut now = s.watch("k/", 0).await.unwrap();
    let live = s.put("k/b", b"4".to_vec(), plain()).await.unwrap();
    assert_eq!(next_event(&mut now).await, WatchEvent::Put(live.clone()));
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(live));
}

/// Dropping a watch stream ends its background task and with it the watch in etcd.
#[tokio::test]
async fn dropping_the_stream_stops_the_watcher() {
    let (etcd, s) = start().await;
    let first = s.watch("d/", 0).await.unwrap();
    let second = s.watch("e/", 0).await.unwrap();
    wait_for_watchers(&etcd, 2).await;
    drop(first);
    wait_for_watchers(&etcd, 1).await;
    drop(second);
    wait_for_watchers(&etcd, 0).await;
}

/// Waits until etcd reports `n` active watchers (its `etcd_debugging_mvcc_watcher_total` gauge).
async fn wait_for_watchers(etcd: &Etcd, n: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    while tokio::time::Instant::now() < deadline {
        let mut conn = TcpStream::connect(etcd.endpoint()).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).await.unwrap();
        seen = body
            .lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        if seen == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd watchers: expected {n}, last seen {seen:?}");
}

/// A TCP proxy to etcd that can be cut (all connections closed, new ones refused) and healed.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    continue; // dropping the socket refuses the connection
                }
                let upstream = upstream.clone();
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { addr, cut, accept }
    }

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_replace(true);
    }
}
