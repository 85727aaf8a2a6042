//! Backend-independent tests of the [`Store`] contract. Each backend's test suite calls every
//! function here against a real instance (a redb file, a real etcd), so both backends are held to
//! exactly the same semantics.

use std::time::{Duration, SystemTime};

use futures::StreamExt;

use crate::{Condition, PutOptions, Store, StoreError, WatchEvent, WatchStream};

fn put(condition: Condition) -> PutOptions {
    PutOptions {
        condition,
        expires_at: None,
    }
}

async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("watch event within 10 s")
        .expect("watch stream ended")
        .expect("watch stream error")
}

/// Put, get, list and revisions: every write bumps the revision, create_revision survives updates.
pub async fn crud_and_revisions(store: &dyn Store, prefix: &str) {
    let a = format!("{prefix}a");
    let b = format!("{prefix}b");
    let kv1 = store.put(&a, b"1".to_vec(), put(Condition::None)).await.unwrap();
    assert_eq!(kv1.create_revision, kv1.mod_revision);
    let kv2 = store.put(&a, b"2".to_vec(), put(Condition::None)).await.unwrap();
    assert!(kv2.mod_revision > kv1.mod_revision, "revision must grow");
    assert_eq!(
        kv2.create_revision, kv1.create_revision,
        "create_revision survives updates"
    );
    let kv3 = store.put(&b, b"3".to_vec(), put(Condition::None)).await.unwrap();
    assert_eq!(store.get(&a).await.unwrap().unwrap().value, b"2");
    assert_eq!(store.get(&format!("{prefix}zz")).await.unwrap(), None);

    let (items, rev) = store.list(prefix).await.unwrap();
    assert_eq!(
        items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        [a.as_str(), b.as_str()]
    );
    assert!(rev >= kv3.mod_revision);
    // A prefix with nothing under it lists nothing.
    let (none, _) = store.list(&format!("{prefix}nothing/")).await.unwrap();
    assert!(none.is_empty());

    let (prev, del_rev) = store.delete(&a, Condition::None).await.unwrap();
    assert_eq!(prev.value, b"2");
    assert!(del_rev > kv3.mod_revision);
    assert_eq!(store.get(&a).await.unwrap(), None);
}

/// Failed conditions report the right error and change nothing.
pub async fn conditions_leave_state_untouched(store: &dyn Store, prefix: &str) {
    let k = format!("{prefix}k");
    let created = store.put(&k, b"v1".to_vec(), put(Condition::Absent)).await.unwrap();
    let err = store.put(&k, b"v2".to_vec(), put(Condition::Absent)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists(ref key) if *key == k),
        "{err:?}"
    );
    let err = store
        .put(
            &k,
            b"v3".to_vec(),
            put(Condition::ModRevision(created.mod_revision + 1000)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let missing = format!("{prefix}missing");
    let err = store
        .put(&missing, b"x".to_vec(), put(Condition::Exists))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store.delete(&missing, Condition::None).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store
        .delete(&k, Condition::ModRevision(created.mod_revision + 1000))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");

    let now = store.get(&k).await.unwrap().unwrap();
    assert_eq!(now, created, "failed writes must not change the key");
    assert_eq!(store.get(&missing).await.unwrap(), None);

    let updated = store
        .put(&k, b"v4".to_vec(), put(Condition::ModRevision(created.mod_revision)))
        .await
        .unwrap();
    assert_eq!(updated.value, b"v4");
    store
        .delete(&k, Condition::ModRevision(updated.mod_revision))
        .await
        .unwrap();
}

/// A watch from a past revision replays history in order, then follows live writes.
pub async fn watch_replays_then_follows(store: &dyn Store, prefix: &str) {
    let (_, start) = store.list(prefix).await.unwrap();
    let a = format!("{prefix}a");
    let other = format!("{prefix}-not-under-prefix");
    let kv1 = store.put(&a, b"1".to_vec(), put(Condition::None)).await.unwrap();
    store.put(&other, b"x".to_vec(), put(Condition::None)).await.unwrap();
    let kv2 = store.put(&a, b"2".to_vec(), put(Condition::None)).await.unwrap();

    let watch_prefix = format!("{prefix}/");
    let a_sub = format!("{prefix}/a");
    let kv3 = store.put(&a_sub, b"3".to_vec(), put(Condition::None)).await.unwrap();
    let mut w = store.watch(&watch_prefix, start + 1).await.unwrap();
    // Only the key under "<prefix>/" is replayed; earlier keys are outside the watched prefix.
    assert_eq!(next_event(&mut w).await, WatchEvent::Put(kv3.clone()));
    let (_, del_rev) = store.delete(&a_sub, Condition::None).await.unwrap();
    assert_eq!(
        next_event(&mut w).await,
        WatchEvent::Delete {
            prev: kv3,
            revision: del_rev
        }
    );

    let mut all = store.watch(prefix, kv1.mod_revision).await.unwrap();
    assert_eq!(next_event(&mut all).await, WatchEvent::Put(kv1));
    let e = next_event(&mut all).await;
    assert!(matches!(&e, WatchEvent::Put(kv) if kv.key == other), "{e:?}");
    assert_eq!(next_event(&mut all).await, WatchEvent::Put(kv2));
    let live = store.put(&a, b"live".to_vec(), put(Condition::None)).await.unwrap();
    // skip the replayed a_sub put/delete
    loop {
        let e = next_event(&mut all).await;
        if e.revision() == live.mod_revision {
            assert_eq!(e, WatchEvent::Put(live));
            break;
        }
        assert!(e.revision() < live.mod_revision, "events must come in revision order");
    }
}

/// A key written with an expiry disappears by itself and watchers see the deletion; writing it
/// again pushes the expiry back; writing it without an expiry makes it permanent.
pub async fn expiry(store: &dyn Store, prefix: &str) {
    let short = format!("{prefix}short");
    let renewed = format!("{prefix}renewed");
    let permanent = format!("{prefix}permanent");
    let (_, rev) = store.list(prefix).await.unwrap();
    let mut w = store.watch(prefix, rev + 1).await.unwrap();
    let soon = || PutOptions {
        condition: Condition::None,
        expires_at: Some(SystemTime::now() + Duration::from_secs(2)),
    };
    let later = PutOptions {
        condition: Condition::None,
        expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
    };
    store.put(&short, b"s".to_vec(), soon()).await.unwrap();
    store.put(&renewed, b"r".to_vec(), soon()).await.unwrap();
    store.put(&renewed, b"r2".to_vec(), later).await.unwrap();
    store.put(&permanent, b"p".to_vec(), soon()).await.unwrap();
    store
        .put(&permanent, b"p2".to_vec(), put(Condition::None))
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut deleted = Vec::new();
    while tokio::time::Instant::now() < deadline && store.get(&short).await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.get(&short).await.unwrap(), None, "expired key must be gone");
    // Give a wrongly attached expiry time to fire too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        store.get(&renewed).await.unwrap().is_some(),
        "a renewed key must not expire early"
    );
    assert!(
        store.get(&permanent).await.unwrap().is_some(),
        "a key re-put without expiry is permanent"
    );
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), w.next()).await {
        if let WatchEvent::Delete { prev, .. } = e {
            deleted.push(prev.key);
        }
    }
    assert_eq!(deleted, vec![short], "watchers see exactly the expired key deleted");
}

/// Many concurrent writers: every acknowledged write is readable and revisions are unique.
pub async fn concurrent_writes(store: std::sync::Arc<dyn Store>, prefix: &str) {
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        let key = format!("{prefix}{i:03}");
        tasks.push(tokio::spawn(async move {
            store
                .put(&key, vec![i as u8], put(Condition::Absent))
                .await
                .unwrap()
                .mod_revision
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.unwrap());
    }
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 64, "each write has its own revision");
    let (items, _) = store.list(prefix).await.unwrap();
    assert_eq!(items.len(), 64);
}
