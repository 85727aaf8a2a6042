//! The vL3 prefix server over real gRPC (`ipam.IPAM/ManagePrefixes`): node leases that outlive
//! their stream, upstream-client leases that do not, requested and excluded prefixes, exhaustion,
//! IPv6, pool checks, and leases going with their node.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nsm_api::ipam::{PrefixRequest, PrefixResponse, Type, ipam_client::IpamClient};
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_api::service_names::{IPAM_MEMBER_HEADER, IPAM_NODE_HEADER, IPAM_VL3_HEADER};
use nsm_model::{Kind, pb};
use nsm_registry::{Config, Registry};
use nsm_store::Store;
use nsm_transport::{Listener, Url};
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    _dir: tempfile::TempDir,
    channel: Channel,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(nsm_store_redb::RedbStore::open(&dir.path().join("r.redb")).unwrap());
    let registry = Registry::start(store, Config::default()).await.unwrap();
    let routes = registry.routes().await;
    let l = Listener::bind(&"tcp://127.0.0.1:0".parse::<Url>().unwrap())
        .await
        .unwrap();
    let url = l.url().to_string();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        l.serve_secure(routes, nsm_transport::ServerSecurity::Insecure, async move {
            let _ = rx.await;
        }),
    );
    let channel = nsm_transport::connect(&url, Duration::from_secs(5)).await.unwrap();
    Harness {
        _dir: dir,
        channel,
        _stop: stop,
    }
}

fn service(name: &str, namespace: &str, spec: pb::NetworkServiceSpec) -> v1::CreateRequest {
    v1::CreateRequest {
        resource: Some(pb::Resource {
            kind: Some(pb::resource::Kind::NetworkService(pb::NetworkService {
                metadata: Some(pb::ObjectMeta {
                    name: name.into(),
                    namespace: namespace.into(),
                    ..Default::default()
                }),
                spec: Some(spec),
            })),
        }),
    }
}

fn vl3(cidr: &str, prefix_len: u32) -> pb::NetworkServiceSpec {
    pb::NetworkServiceSpec {
        r#type: pb::ServiceType::Vl3 as i32,
        cidr: cidr.into(),
        prefix_len,
        ..Default::default()
    }
}

/// One ManagePrefixes stream: send requests, read answers.
struct Stream {
    tx: mpsc::Sender<PrefixRequest>,
    rx: tonic::Streaming<PrefixResponse>,
}

async fn open(h: &Harness, headers: &[(&'static str, &str)]) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    let rx = IpamClient::new(h.channel.clone())
        .manage_prefixes(req)
        .await?
        .into_inner();
    Ok(Stream { tx, rx })
}

impl Stream {
    async fn allocate(&mut self, prefix: &str, excludes: &[&str]) -> Result<String, tonic::Status> {
        self.tx
            .send(PrefixRequest {
                r#type: Type::Allocate as i32,
                prefix: prefix.into(),
                exclude_prefixes: excludes.iter().map(|s| s.to_string()).collect(),
            })
            .await
            .unwrap();
        match self.rx.next().await {
            Some(Ok(r)) => Ok(r.prefix),
            Some(Err(s)) => Err(s),
            None => panic!("stream ended"),
        }
    }
}

async fn leases(h: &Harness) -> Vec<pb::PrefixSpec> {
    let items = ResourceServiceClient::new(h.channel.clone())
        .list(v1::ListRequest {
            kind: Kind::Prefix.to_pb() as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    items
        .into_iter()
        .filter_map(|r| match r.kind {
            Some(pb::resource::Kind::Prefix(p)) => p.spec,
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn node_leases_requested_excluded_exhausted_and_released_with_the_node() {
    let h = start().await;
    let mut res = ResourceServiceClient::new(h.channel.clone());
    res.create(service("mesh-net", "", vl3("10.90.0.0/22", 24)))
        .await
        .unwrap();
    res.create(service(
        "istio",
        "istio-system",
        pb::NetworkServiceSpec {
            vl3: "mesh-net.default".into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();

    let node_a = [(IPAM_VL3_HEADER, "mesh-net"), (IPAM_NODE_HEADER, "node-a")];
    let mut a = open(&h, &node_a).await.unwrap();
    assert_eq!(a.allocate("", &[]).await.unwrap(), "10.90.0.0/24");
    // Excluded prefixes are skipped.
    assert_eq!(a.allocate("", &["10.90.1.0/24"]).await.unwrap(), "10.90.2.0/24");
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let l = leases(&h).await;
    assert_eq!(l.len(), 2, "a node's leases outlive its stream: {l:?}");
    assert!(l.iter().all(|p| p.node == "node-a" && p.member_service == "mesh-net"));

    // The same node asking for its own prefix again gets it (a restarted router).
    let mut a = open(&h, &node_a).await.unwrap();
    assert_eq!(a.allocate("10.90.0.0/24", &[]).await.unwrap(), "10.90.0.0/24");
    assert_eq!(leases(&h).await.len(), 2);
    // Another node asking for it gets a free one instead, for its own service's members.
    let mut b = open(
        &h,
        &[
            (IPAM_VL3_HEADER, "mesh-net"),
            (IPAM_NODE_HEADER, "node-b"),
            (IPAM_MEMBER_HEADER, "istio.istio-system"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(b.allocate("10.90.0.0/24", &[]).await.unwrap(), "10.90.1.0/24");
    // The pool (/22 = four /24s) is now exhausted.
    let e = b.allocate("", &[]).await.unwrap();
    assert_eq!(e, "10.90.3.0/24");
    let e = b.allocate("", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no free /24"), "{e:?}");
    // A prefix outside the pool is refused by field.
    let mut b = open(&h, &[(IPAM_VL3_HEADER, "mesh-net"), (IPAM_NODE_HEADER, "node-b")])
        .await
        .unwrap();
    let e = b.allocate("10.91.0.0/24", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("prefix:"), "{e:?}");

    // The pool cannot change while leased; another vL3 cannot overlap it.
    let e = res
        .apply(v1::ApplyRequest {
            resource: service("mesh-net", "", vl3("10.90.0.0/21", 24)).resource,
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = res
        .create(service("other", "", vl3("10.90.2.0/23", 24)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("overlaps the pool 10.90.0.0/22 of vL3 mesh-net"),
        "{e:?}"
    );
    // Leases are made by the prefix server only.
    let e = res
        .create(v1::CreateRequest {
            resource: Some(pb::Resource {
                kind: Some(pb::resource::Kind::Prefix(pb::Prefix {
                    metadata: Some(pb::ObjectMeta {
                        name: "mesh-net-9".into(),
                        ..Default::default()
                    }),
                    spec: Some(pb::PrefixSpec {
                        network_service: "mesh-net".into(),
                        prefix: "10.90.0.0/24".into(),
                        node: "x".into(),
                        member_service: "mesh-net".into(),
                    }),
                })),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // A node that is gone for good gives its prefixes back.
    res.create(v1::CreateRequest {
        resource: Some(pb::Resource {
            kind: Some(pb::resource::Kind::Node(pb::Node {
                metadata: Some(pb::ObjectMeta {
                    name: "node-a".into(),
                    ..Default::default()
                }),
                spec: Some(pb::NodeSpec {
                    address: "192.0.2.1".into(),
                    ..Default::default()
                }),
            })),
        }),
    })
    .await
    .unwrap();
    res.delete(v1::DeleteRequest {
        r#ref: Some(v1::ResourceRef {
            kind: Kind::Node.to_pb() as i32,
            namespace: String::new(),
            name: "node-a".into(),
        }),
    })
    .await
    .unwrap();
    let l = leases(&h).await;
    assert!(l.iter().all(|p| p.node == "node-b"), "{l:?}");
    assert_eq!(l.len(), 2);
}

#[tokio::test]
async fn upstream_client_leases_end_with_the_stream_and_ipv6_pools_work() {
    let h = start().await;
    let mut res = ResourceServiceClient::new(h.channel.clone());
    res.create(service("v6", "", vl3("fd00:5::/64", 112))).await.unwrap();
    // An upstream vL3 NSE sends no metadata: the only vL3 is used.
    let mut s = open(&h, &[]).await.unwrap();
    assert_eq!(s.allocate("", &[]).await.unwrap(), "fd00:5::/112");
    assert_eq!(s.allocate("", &[]).await.unwrap(), "fd00:5::1:0/112");
    assert_eq!(leases(&h).await.len(), 2);
    drop(s);
    let mut gone = false;
    for _ in 0..50 {
        if leases(&h).await.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gone,
        "an upstream client's prefixes go back to the pool with its stream"
    );

    // With two vL3s, an anonymous stream must say which.
    res.create(service("v4", "", vl3("10.92.0.0/16", 24))).await.unwrap();
    let e = match open(&h, &[]).await {
        Err(e) => e,
        Ok(mut s) => s.allocate("", &[]).await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(IPAM_VL3_HEADER));
    // A member service that is not on that vL3 is refused.
    let e = match open(&h, &[(IPAM_VL3_HEADER, "v4"), (IPAM_MEMBER_HEADER, "nope")]).await {
        Err(e) => e,
        Ok(mut s) => s.allocate("", &[]).await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}
