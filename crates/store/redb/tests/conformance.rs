//! The shared Store contract, run against a real redb file.

use std::sync::Arc;

use nsm_store::{Condition, PutOptions, Store, conformance};
use nsm_store_redb::RedbStore;

fn open() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn crud_and_revisions() {
    let (_d, s) = open();
    conformance::crud_and_revisions(&s, "t/").await;
}

#[tokio::test]
async fn conditions_leave_state_untouched() {
    let (_d, s) = open();
    conformance::conditions_leave_state_untouched(&s, "t/").await;
}

#[tokio::test]
async fn watch_replays_then_follows() {
    let (_d, s) = open();
    conformance::watch_replays_then_follows(&s, "t").await;
}

#[tokio::test]
async fn expiry() {
    let (_d, s) = open();
    conformance::expiry(&s, "t/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes() {
    let (_d, s) = open();
    conformance::concurrent_writes(Arc::new(s), "t/").await;
}

/// Data and revisions survive closing and reopening the file; a key whose expiry passed while the
/// store was closed is gone on reopen.
#[tokio::test]
async fn reopen_keeps_data_and_expires_overdue_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let last = {
        let s = RedbStore::open(&path).unwrap();
        s.put("k/keep", b"v".to_vec(), PutOptions::default()).await.unwrap();
        let opts = PutOptions {
            condition: Condition::None,
            expires_at: Some(std::time::SystemTime::now() + std::time::Duration::from_millis(300)),
        };
        s.put("k/short", b"v".to_vec(), opts).await.unwrap().mod_revision
    };
    // Wait until the old writer thread has let go of the file.
    let s = loop {
        match RedbStore::open(&path) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let s2 = s.clone();
    drop(s);
    let _ = s2.put("k/poke", vec![], PutOptions::default()).await.unwrap();
    let (items, rev) = s2.list("k/").await.unwrap();
    let keys: Vec<_> = items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["k/keep", "k/poke"]);
    assert!(rev > last, "revisions continue after reopen");
    // A watch from before the reopen cannot be served from memory: it must say so.
    let err = s2.watch("k/", 1).await.err().expect("compacted");
    assert!(matches!(err, nsm_store::StoreError::Compacted { .. }), "{err:?}");
}
