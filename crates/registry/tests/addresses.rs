//! vWire address pairs over real gRPC (`nsm.v1.ResourceService.AllocateAddresses`,
//! `ReleaseAddresses`, `ListAddressLeases`), each scenario on the embedded store and on a real
//! etcd (there with two registries sharing it): idempotence, wanted pairs, overlapping pools,
//! exhaustion, bad input, release on delete, addresses held by statuses only, a sweep at start-up,
//! and many allocations at the same instant.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_model::{Kind, pb};
use nsm_registry::{Config, Registry};
use nsm_store::Store;
use nsm_transport::{Listener, Url};
use tonic::Code;
use tonic::transport::Channel;

type Api = ResourceServiceClient<Channel>;

/// One or more registries over one store, each served on its own TCP port.
struct Harness {
    store: Arc<dyn Store>,
    /// For etcd: connects another client (another registry's own connection).
    etcd: Option<nsm_testing::Etcd>,
    registries: Vec<Api>,
    _dir: tempfile::TempDir,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Redb,
    Etcd,
}

impl Harness {
    /// `n` registries: on redb they share one store object (one file), on etcd each has its own
    /// connection, as separate processes would.
    async fn start(backend: Backend, n: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (store, etcd): (Arc<dyn Store>, _) = match backend {
            Backend::Redb => (
                Arc::new(nsm_store_redb::RedbStore::open(&dir.path().join("r.redb")).unwrap()),
                None,
            ),
            Backend::Etcd => {
                let etcd = nsm_testing::Etcd::start().expect("start etcd (Debian package etcd-server)");
                let s = nsm_store_etcd::EtcdStore::connect(&[etcd.endpoint()]).await.unwrap();
                (Arc::new(s), Some(etcd))
            }
        };
        let mut h = Harness {
            store,
            etcd,
            registries: Vec::new(),
            _dir: dir,
            _stops: Vec::new(),
        };
        for _ in 0..n {
            h.add_registry().await;
        }
        h
    }

    async fn own_store(&self) -> Arc<dyn Store> {
        match &self.etcd {
            None => self.store.clone(),
            Some(e) => Arc::new(nsm_store_etcd::EtcdStore::connect(&[e.endpoint()]).await.unwrap()),
        }
    }

    /// Starts one more registry on the store (what a restarted or a second registry does).
    async fn add_registry(&mut self) -> Api {
        let registry = Registry::start(self.own_store().await, Config::default())
            .await
            .unwrap();
        let l = Listener::bind(&"tcp://127.0.0.1:0".parse::<Url>().unwrap())
            .await
            .unwrap();
        let url = l.url().to_string();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(l.serve_secure(
            registry.routes().await,
            nsm_transport::ServerSecurity::Insecure,
            async move {
                let _ = rx.await;
            },
        ));
        self._stops.push(stop);
        let api = ResourceServiceClient::new(nsm_transport::connect(&url, Duration::from_secs(5)).await.unwrap());
        self.registries.push(api.clone());
        api
    }

    fn api(&self, i: usize) -> Api {
        self.registries[i % self.registries.len()].clone()
    }
}

fn client_res(namespace: &str, name: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Client(pb::Client {
            metadata: Some(pb::ObjectMeta {
                name: name.into(),
                namespace: namespace.into(),
                ..Default::default()
            }),
            spec: Some(pb::ClientSpec {
                network_service: "orders".into(),
                netns: format!("/run/netns/{name}"),
                ..Default::default()
            }),
            status: None,
        })),
    }
}

async fn create_client(api: &mut Api, namespace: &str, name: &str) {
    api.create(v1::CreateRequest {
        resource: Some(client_res(namespace, name)),
    })
    .await
    .unwrap();
}

fn cref(namespace: &str, name: &str) -> Option<v1::ResourceRef> {
    Some(v1::ResourceRef {
        kind: Kind::Client.to_pb() as i32,
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// AllocateAddresses for `namespace/name`; Ok((src, dst, created)).
async fn alloc(
    api: &mut Api,
    (namespace, name): (&str, &str),
    pool: &str,
    wanted: Option<(&str, &str)>,
) -> Result<(String, String, bool), tonic::Status> {
    let (s, d) = wanted.unwrap_or_default();
    let r = api
        .allocate_addresses(v1::AllocateAddressesRequest {
            client: cref(namespace, name),
            pool: pool.into(),
            src_ip_addr: s.into(),
            dst_ip_addr: d.into(),
        })
        .await?
        .into_inner();
    let l = r.lease.unwrap();
    Ok((l.src_ip_addr, l.dst_ip_addr, r.created))
}

fn pair(r: &(String, String, bool)) -> (&str, &str) {
    (&r.0, &r.1)
}

/// Every lease as (client namespace/name, src, dst).
async fn leases(api: &mut Api) -> Vec<(String, String, String)> {
    api.list_address_leases(v1::ListAddressLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| {
            let c = l.client.unwrap();
            (format!("{}/{}", c.namespace, c.name), l.src_ip_addr, l.dst_ip_addr)
        })
        .collect()
}

async fn delete_client(api: &mut Api, namespace: &str, name: &str) {
    api.delete(v1::DeleteRequest {
        r#ref: cref(namespace, name),
    })
    .await
    .unwrap();
}

async fn set_status(api: &mut Api, name: &str, src: &str, dst: &str) {
    api.update_status(v1::UpdateStatusRequest {
        r#ref: cref("default", name),
        status: Some(pb::ClientStatus {
            phase: pb::client_status::Phase::Ready as i32,
            src_ip_addrs: vec![src.into()],
            dst_ip_addrs: vec![dst.into()],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

async fn idempotent_wanted_overlapping_exhausted(backend: Backend) {
    let h = Harness::start(backend, 2).await;
    let (mut r0, mut r1) = (h.api(0), h.api(1));
    for c in ["a", "b", "c", "e", "v6"] {
        create_client(&mut r0, "default", c).await;
    }
    create_client(&mut r0, "shop", "d").await;
    let pool = "10.80.0.0/29"; // three pairs: .1/.2, .3/.4, .5/.6

    let first = alloc(&mut r0, ("default", "a"), pool, None).await.unwrap();
    assert_eq!(first, ("10.80.0.1/32".into(), "10.80.0.2/32".into(), true));
    // Asking again, on either registry, with or without a wanted pair: the same lease.
    let again = alloc(&mut r1, ("", "a"), pool, None).await.unwrap();
    assert_eq!(pair(&again), pair(&first));
    assert!(!again.2, "not a new lease");
    let again = alloc(&mut r0, ("default", "a"), pool, Some(("10.80.0.5/32", "10.80.0.6/32")))
        .await
        .unwrap();
    assert_eq!(pair(&again), pair(&first), "a held lease wins over a wanted pair");

    // A wanted pair someone else holds is refused: the first free pair instead.
    let b = alloc(&mut r1, ("default", "b"), pool, Some(("10.80.0.1/32", "10.80.0.2/32")))
        .await
        .unwrap();
    assert_eq!(pair(&b), ("10.80.0.3/32", "10.80.0.4/32"));
    // A free wanted pair is granted exactly, even out of order.
    let c = alloc(&mut r0, ("default", "c"), pool, Some(("10.80.0.6/32", "10.80.0.5/32")))
        .await
        .unwrap();
    assert_eq!(pair(&c), ("10.80.0.6/32", "10.80.0.5/32"));

    // Exhausted: FAILED_PRECONDITION naming the pool, nothing stored.
    let e = alloc(&mut r1, ("shop", "d"), pool, None).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("10.80.0.0/29"), "{e:?}");
    assert_eq!(leases(&mut r0).await.len(), 3);
    // Uniqueness is per address, not per pool: an overlapping pool skips what the other leased,
    // and a differently aligned one (a /31: .6/.7) cannot have .6 either.
    let d = alloc(&mut r1, ("shop", "d"), "10.80.0.0/28", None).await.unwrap();
    assert_eq!(pair(&d), ("10.80.0.7/32", "10.80.0.8/32"));
    let e = alloc(&mut r0, ("default", "e"), "10.80.0.6/31", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Another pool (the client's service changed): the old lease goes.
    let moved = alloc(&mut r0, ("default", "a"), "10.81.0.0/24", None).await.unwrap();
    assert_eq!(pair(&moved), ("10.81.0.1/32", "10.81.0.2/32"));
    let l = leases(&mut r1).await;
    assert_eq!(
        l.iter().filter(|(c, ..)| c == "default/a").count(),
        1,
        "one lease per client: {l:?}"
    );
    let e_pair = alloc(&mut r1, ("default", "e"), pool, None).await.unwrap();
    assert_eq!(
        pair(&e_pair),
        ("10.80.0.1/32", "10.80.0.2/32"),
        "a's old pair is free again"
    );

    // IPv6 pools: all addresses are hosts.
    let v6 = alloc(&mut r0, ("default", "v6"), "fd00:80::/126", None).await.unwrap();
    assert_eq!(pair(&v6), ("fd00:80::/128", "fd00:80::1/128"));

    // Explicit release.
    let released = r1
        .release_addresses(v1::ReleaseAddressesRequest {
            client: cref("default", "c"),
        })
        .await
        .unwrap()
        .into_inner()
        .released;
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].src_ip_addr, "10.80.0.6/32");
    assert_eq!(released[0].pool, pool);
    let l = leases(&mut r0).await;
    assert!(!l.iter().any(|(c, ..)| c == "default/c"), "{l:?}");
    assert_eq!(l.len(), 5, "{l:?}");
    // Listing by namespace.
    let shop = r0
        .list_address_leases(v1::ListAddressLeasesRequest {
            namespace: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(shop.len(), 1);
    assert_eq!(shop[0].src_ip_addr, "10.80.0.7/32");
}

async fn bad_input_stores_nothing(backend: Backend) {
    let h = Harness::start(backend, 1).await;
    let mut r = h.api(0);
    create_client(&mut r, "default", "a").await;
    let req = |client: Option<v1::ResourceRef>, pool: &str, src: &str, dst: &str| v1::AllocateAddressesRequest {
        client,
        pool: pool.into(),
        src_ip_addr: src.into(),
        dst_ip_addr: dst.into(),
    };
    let a = || cref("default", "a");
    let node_ref = Some(v1::ResourceRef {
        kind: Kind::Node.to_pb() as i32,
        namespace: String::new(),
        name: "a".into(),
    });
    let cases = [
        (req(a(), "nope", "", ""), "pool:"),
        (req(a(), "10.80.0.1/24", "", ""), "pool:"),
        (req(a(), "0.0.0.0/0", "", ""), "pool:"),
        (req(a(), "::/0", "", ""), "pool:"),
        (req(a(), "10.80.0.1/32", "", ""), "pool:"),
        (req(a(), "", "", ""), "pool:"),
        (req(None, "10.80.0.0/24", "", ""), "client:"),
        (req(cref("default", ""), "10.80.0.0/24", "", ""), "client.name:"),
        (req(cref("default", "A_b"), "10.80.0.0/24", "", ""), "client.name:"),
        (req(cref("No Such", "a"), "10.80.0.0/24", "", ""), "client.namespace:"),
        (req(node_ref, "10.80.0.0/24", "", ""), "client.kind:"),
        (req(a(), "10.80.0.0/24", "10.90.0.1/32", "10.80.0.2/32"), "src_ip_addr:"),
        (req(a(), "10.80.0.0/24", "10.80.0.0/32", "10.80.0.2/32"), "src_ip_addr:"),
        (
            req(a(), "10.80.0.0/24", "10.80.0.1/32", "10.80.0.255/32"),
            "dst_ip_addr:",
        ),
        (req(a(), "10.80.0.0/24", "10.80.0.1/32", ""), "dst_ip_addr:"),
        (req(a(), "10.80.0.0/24", "", "10.80.0.2/32"), "src_ip_addr:"),
        (req(a(), "10.80.0.0/24", "10.80.0.1/32", "10.80.0.1/32"), "dst_ip_addr:"),
        (req(a(), "10.80.0.0/24", "fd00::1/128", "fd00::2/128"), "src_ip_addr:"),
    ];
    for (rq, field) in cases {
        let e = r.allocate_addresses(rq.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{rq:?}: {e:?}");
        assert!(e.message().starts_with(field), "{rq:?}: {e:?}");
    }
    // A client that does not exist gets nothing.
    let e = alloc(&mut r, ("default", "ghost"), "10.80.0.0/24", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(leases(&mut r).await.is_empty(), "nothing stored");
    // The client was never refused for a good request.
    alloc(&mut r, ("default", "a"), "10.80.0.0/24", None).await.unwrap();
}

async fn delete_releases_statuses_count_and_startup_sweeps(backend: Backend) {
    let mut h = Harness::start(backend, 2).await;
    let (mut r0, mut r1) = (h.api(0), h.api(1));
    let pool = "10.82.0.0/24";
    for c in ["old", "old2", "n1", "n2", "n3", "orphan"] {
        create_client(&mut r0, "default", c).await;
    }
    // Clients made Ready before leasing existed: addresses in their statuses, no lease.
    set_status(&mut r0, "old", "10.82.0.1/32", "10.82.0.2/32").await;
    set_status(&mut r0, "old2", "10.82.0.5/32", "10.82.0.6/32").await;
    // Each registry's view follows the store; wait until the second one has both statuses.
    for name in ["old", "old2"] {
        let mut seen = false;
        for _ in 0..200 {
            let r = r1
                .get(v1::GetRequest {
                    r#ref: cref("default", name),
                })
                .await
                .unwrap()
                .into_inner();
            if matches!(r.kind, Some(pb::resource::Kind::Client(c)) if c.status.is_some()) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen, "{name}'s status reached the second registry");
    }

    let n1 = alloc(&mut r1, ("default", "n1"), pool, None).await.unwrap();
    assert_eq!(
        pair(&n1),
        ("10.82.0.3/32", "10.82.0.4/32"),
        "status-held pairs are taken"
    );
    let n2 = alloc(&mut r0, ("default", "n2"), pool, Some(("10.82.0.5/32", "10.82.0.6/32")))
        .await
        .unwrap();
    assert_eq!(
        pair(&n2),
        ("10.82.0.7/32", "10.82.0.8/32"),
        "another client's status pair is refused"
    );
    // The status's own client adopting its vWire gets exactly its pair.
    let old = alloc(
        &mut r1,
        ("default", "old"),
        pool,
        Some(("10.82.0.1/32", "10.82.0.2/32")),
    )
    .await
    .unwrap();
    assert_eq!(pair(&old), ("10.82.0.1/32", "10.82.0.2/32"));

    // Deleting a client releases its lease, whichever registry deletes it; nothing else goes.
    delete_client(&mut r1, "default", "n1").await;
    let l = leases(&mut r0).await;
    assert!(!l.iter().any(|(c, ..)| c == "default/n1"), "{l:?}");
    assert_eq!(l.len(), 2, "{l:?}");
    let n3 = alloc(&mut r0, ("default", "n3"), pool, None).await.unwrap();
    assert_eq!(pair(&n3), ("10.82.0.3/32", "10.82.0.4/32"), "n1's pair is free again");

    // A registry that stopped between deleting a client and releasing its lease: the next
    // registry to start sweeps the orphan.
    alloc(&mut r0, ("default", "orphan"), pool, None).await.unwrap();
    h.store
        .delete(&Kind::Client.key("default", "orphan"), nsm_store::Condition::None)
        .await
        .unwrap();
    assert!(leases(&mut r0).await.iter().any(|(c, ..)| c == "default/orphan"));
    let mut r2 = h.add_registry().await;
    let l = leases(&mut r2).await;
    assert!(!l.iter().any(|(c, ..)| c == "default/orphan"), "{l:?}");
    assert_eq!(l.len(), 3, "old, n2, n3: {l:?}");
}

async fn concurrent_allocations_are_distinct(backend: Backend) {
    const N: usize = 40;
    let h = Harness::start(backend, 2).await;
    let mut r0 = h.api(0);
    let names: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    for n in &names {
        create_client(&mut r0, "default", n).await;
    }
    // Every client asks at the same instant, half on each registry.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let (mut api, barrier, n) = (h.api(i), barrier.clone(), n.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            alloc(&mut api, ("default", &n), "10.83.0.0/24", None).await
        }));
    }
    let mut addrs = HashSet::new();
    for t in tasks {
        let (s, d, created) = t.await.unwrap().unwrap();
        assert!(created);
        assert!(addrs.insert(s.clone()) && addrs.insert(d.clone()), "{s} or {d} twice");
    }
    // The first N pairs exactly: .1 … .80.
    let expected: HashSet<String> = (1..=2 * N).map(|i| format!("10.83.0.{i}/32")).collect();
    assert_eq!(addrs, expected);
    assert_eq!(leases(&mut r0).await.len(), N);

    // One client asking many times at once (a retry racing its original): one pair for all.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    create_client(&mut r0, "default", "again").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (mut api, barrier) = (h.api(i), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            alloc(&mut api, ("default", "again"), "10.83.0.0/24", None).await
        }));
    }
    let mut got = HashSet::new();
    for t in tasks {
        let (s, d, _) = t.await.unwrap().unwrap();
        got.insert((s, d));
    }
    assert_eq!(got.len(), 1, "{got:?}");
    let l = leases(&mut r0).await;
    let mine: Vec<_> = l.iter().filter(|(c, ..)| c == "default/again").collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let (s, d) = got.into_iter().next().unwrap();
    assert_eq!((mine[0].1.clone(), mine[0].2.clone()), (s, d));
}

macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Redb).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Etcd).await;
                }
            )*
        }
    };
}

on_both_stores!(
    idempotent_wanted_overlapping_exhausted,
    bad_input_stores_nothing,
    delete_releases_statuses_count_and_startup_sweeps,
    concurrent_allocations_are_distinct,
);
