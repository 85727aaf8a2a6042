//! The registry over real gRPC: a registry on the embedded store, served on a real TCP port and a
//! real unix socket, driven by generated upstream and nsm.v1 clients.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_api::registry::{
    self as reg, network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient,
    network_service_registry_client::NetworkServiceRegistryClient,
};
use nsm_registry::{Config, Registry};
use nsm_store::Store;
use nsm_transport::{Listener, Url};
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    _dir: tempfile::TempDir,
    tcp: String,
    unix: String,
    store: Arc<dyn Store>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(config: Config) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(nsm_store_redb::RedbStore::open(&dir.path().join("r.redb")).unwrap());
    let registry = Registry::start(store.clone(), config).await.unwrap();
    let routes = registry.routes().await;
    let tcp = Listener::bind(&"tcp://127.0.0.1:0".parse::<Url>().unwrap())
        .await
        .unwrap();
    let unix_url: Url = format!("unix://{}", dir.path().join("reg.sock").display())
        .parse()
        .unwrap();
    let unix = Listener::bind(&unix_url).await.unwrap();
    let (tcp_url, unix_url) = (tcp.url().to_string(), unix.url().to_string());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let shared = futures::FutureExt::shared(async move {
        let _ = rx.await;
    });
    tokio::spawn(tcp.serve_secure(routes.clone(), nsm_transport::ServerSecurity::Insecure, shared.clone()));
    tokio::spawn(unix.serve_secure(routes, nsm_transport::ServerSecurity::Insecure, shared));
    Harness {
        _dir: dir,
        tcp: tcp_url,
        unix: unix_url,
        store,
        _stop: stop,
    }
}

async fn channel(url: &str) -> Channel {
    nsm_transport::connect(url, Duration::from_secs(5)).await.unwrap()
}

fn nse(name: &str, services: &[&str], url: &str) -> reg::NetworkServiceEndpoint {
    reg::NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: services.iter().map(|s| s.to_string()).collect(),
        url: url.into(),
        ..Default::default()
    }
}

async fn find_nses(
    c: &mut NetworkServiceEndpointRegistryClient<Channel>,
    q: reg::NetworkServiceEndpoint,
) -> Vec<reg::NetworkServiceEndpoint> {
    let mut s = c
        .find(reg::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(q),
            watch: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await.unwrap() {
        assert!(!r.deleted);
        out.push(r.network_service_endpoint.unwrap());
    }
    out
}

#[tokio::test]
async fn upstream_network_services_register_find_watch_unregister() {
    let h = start(Config::default()).await;
    let mut c = NetworkServiceRegistryClient::new(channel(&h.unix).await);
    let mut watcher = NetworkServiceRegistryClient::new(channel(&h.tcp).await);
    let mut w = watcher
        .find(reg::NetworkServiceQuery {
            network_service: Some(reg::NetworkService {
                name: "icmp-responder".into(),
                ..Default::default()
            }),
            watch: true,
        })
        .await
        .unwrap()
        .into_inner();

    // Register returns the stored object, with upstream's default payload.
    let stored = c
        .register(reg::NetworkService {
            name: "icmp-responder".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.payload, "IP");
    let ev = w.message().await.unwrap().unwrap();
    assert_eq!(
        (ev.network_service.unwrap().name, ev.deleted),
        ("icmp-responder".to_string(), false)
    );

    // A second service the watcher does not ask for.
    c.register(reg::NetworkService {
        name: "other".into(),
        payload: "ETHERNET".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Find without watch ends after current matches; payload matches exactly.
    let q = |payload: &str| reg::NetworkServiceQuery {
        network_service: Some(reg::NetworkService {
            payload: payload.into(),
            ..Default::default()
        }),
        watch: false,
    };
    let mut s = c.find(q("ETHERNET")).await.unwrap().into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.network_service.unwrap().name, "other");
    assert!(
        s.message().await.unwrap().is_none(),
        "the stream ends after current matches"
    );

    c.unregister(reg::NetworkService {
        name: "icmp-responder".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ev = w.message().await.unwrap().unwrap();
    assert_eq!(
        (ev.network_service.unwrap().name, ev.deleted),
        ("icmp-responder".to_string(), true)
    );
    // As upstream: unregistering what is not there is not an error.
    c.unregister(reg::NetworkService {
        name: "icmp-responder".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn upstream_endpoints_expire_and_find_by_example() {
    let h = start(Config {
        default_expiration: Duration::from_secs(2),
        domain: Some("cluster1".into()),
        ..Default::default()
    })
    .await;
    let mut c = NetworkServiceEndpointRegistryClient::new(channel(&h.tcp).await);

    let before = SystemTime::now();
    let mut e1 = nse("nse-1", &["icmp", "dns"], "tcp://192.0.2.1:5001");
    e1.network_service_labels.insert(
        "icmp".into(),
        reg::NetworkServiceLabels {
            labels: HashMap::from([("app".into(), "a".into())]),
        },
    );
    // A requested expiry later than the default is capped to it.
    e1.expiration_time = Some((SystemTime::now() + Duration::from_secs(3600)).into());
    let r1 = c.register(e1.clone()).await.unwrap().into_inner();
    let exp = SystemTime::try_from(r1.expiration_time.unwrap()).unwrap();
    assert!(
        exp <= SystemTime::now() + Duration::from_secs(2) && exp >= before,
        "expiry capped to the default"
    );
    let first = r1.initial_registration_time.unwrap();
    c.register(nse("nse-2@cluster1", &["icmp"], "tcp://192.0.2.2:5001"))
        .await
        .unwrap();

    // Find by example: service subset, url substring, labels subset, exact name.
    let names = |v: Vec<reg::NetworkServiceEndpoint>| v.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(
        names(find_nses(&mut c, nse("", &["icmp"], "")).await),
        ["nse-1", "nse-2"]
    );
    assert_eq!(names(find_nses(&mut c, nse("", &["icmp", "dns"], "")).await), ["nse-1"]);
    assert_eq!(names(find_nses(&mut c, nse("", &[], "192.0.2.2")).await), ["nse-2"]);
    assert_eq!(
        names(find_nses(&mut c, nse("nse-2@cluster1", &[], "")).await),
        ["nse-2"]
    );
    assert!(
        find_nses(&mut c, nse("nse", &[], "")).await.is_empty(),
        "names match exactly"
    );
    let mut by_label = nse("", &[], "");
    by_label.network_service_labels.insert(
        "icmp".into(),
        reg::NetworkServiceLabels {
            labels: HashMap::from([("app".into(), "a".into())]),
        },
    );
    assert_eq!(names(find_nses(&mut c, by_label).await), ["nse-1"]);

    // A foreign domain is refused, not silently stored locally.
    let err = c
        .register(nse("x@cluster9", &["icmp"], "tcp://192.0.2.9:1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    // Watch: nse-1 is refreshed, nse-2 is not and expires; the watcher sees the deletion.
    let mut w = c
        .find(reg::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(nse("", &["icmp"], "")),
            watch: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        w.message()
            .await
            .unwrap()
            .unwrap()
            .network_service_endpoint
            .unwrap()
            .name,
        "nse-1"
    );
    assert_eq!(
        w.message()
            .await
            .unwrap()
            .unwrap()
            .network_service_endpoint
            .unwrap()
            .name,
        "nse-2"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut deleted = None;
    let mut refresh = tokio::time::interval(Duration::from_millis(500));
    while tokio::time::Instant::now() < deadline && deleted.is_none() {
        tokio::select! {
            _ = refresh.tick() => {
                let again = c.register(e1.clone()).await.unwrap().into_inner();
                assert_eq!(again.initial_registration_time.unwrap(), first, "initial registration time is kept");
            }
            m = w.message() => {
                let r = m.unwrap().unwrap();
                if r.deleted { deleted = Some(r.network_service_endpoint.unwrap().name); }
            }
        }
    }
    assert_eq!(
        deleted.as_deref(),
        Some("nse-2"),
        "the unrefreshed endpoint expires and watchers see it"
    );
    assert_eq!(names(find_nses(&mut c, nse("", &["icmp"], "")).await), ["nse-1"]);
    drop(h.store);
}

fn resource(kind: v1::resource::Kind) -> v1::Resource {
    v1::Resource { kind: Some(kind) }
}

fn meta(name: &str, namespace: &str) -> Option<v1::ObjectMeta> {
    Some(v1::ObjectMeta {
        name: name.into(),
        namespace: namespace.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn resources_and_upstream_see_the_same_state() {
    let h = start(Config::default()).await;
    let ch = channel(&h.tcp).await;
    let mut res = ResourceServiceClient::new(ch.clone());
    let mut nss = NetworkServiceRegistryClient::new(ch.clone());
    let mut nses = NetworkServiceEndpointRegistryClient::new(ch);

    // nsmctl-style creates ...
    let ns = v1::resource::Kind::NetworkService(v1::NetworkService {
        metadata: meta("istio-namespace", "istio-system"),
        spec: Some(v1::NetworkServiceSpec {
            cidr: "10.60.0.0/16".into(),
            ..Default::default()
        }),
    });
    let created = res
        .create(v1::CreateRequest {
            resource: Some(resource(ns.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(v1::resource::Kind::NetworkService(c)) = created.kind else {
        panic!()
    };
    let m = c.metadata.unwrap();
    assert!(!m.uid.is_empty() && m.resource_version > 0 && m.creation_timestamp.is_some());
    let ep = v1::resource::Kind::Endpoint(v1::Endpoint {
        metadata: Some(v1::ObjectMeta {
            labels: HashMap::from([("app".into(), "istio".into())]),
            ..meta("gw", "istio-system").unwrap()
        }),
        spec: Some(v1::EndpointSpec {
            network_services: vec!["istio-namespace".into()],
            url: "tcp://192.0.2.7:5001".into(),
            ..Default::default()
        }),
    });
    res.create(v1::CreateRequest {
        resource: Some(resource(ep)),
    })
    .await
    .unwrap();

    // ... are visible upstream under namespace-qualified names.
    let mut s = nss
        .find(reg::NetworkServiceQuery {
            network_service: Some(reg::NetworkService {
                name: "istio-namespace.istio-system".into(),
                ..Default::default()
            }),
            watch: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.message().await.unwrap().unwrap().network_service.unwrap().payload,
        "IP"
    );
    let found = find_nses(&mut nses, nse("", &["istio-namespace.istio-system"], "")).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "gw.istio-system");
    assert_eq!(
        found[0].network_service_labels["istio-namespace.istio-system"].labels["app"],
        "istio"
    );
    assert!(found[0].expiration_time.is_none(), "declared endpoints do not expire");

    // Upstream registrations show up as resources in the default namespace.
    nses.register(nse(
        "upstream-nse",
        &["istio-namespace.istio-system"],
        "tcp://192.0.2.8:5001",
    ))
    .await
    .unwrap();
    let list = res
        .list(v1::ListRequest {
            kind: v1::Kind::Endpoint as i32,
            namespace: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.items.len(), 1);
    let Some(v1::resource::Kind::Endpoint(e)) = &list.items[0].kind else {
        panic!()
    };
    let spec = e.spec.as_ref().unwrap();
    assert_eq!(spec.network_services, ["istio-namespace.istio-system"]);
    assert!(spec.expiration_time.is_some());

    // Upstream re-registration of the service keeps what upstream cannot express.
    nss.register(reg::NetworkService {
        name: "istio-namespace.istio-system".into(),
        payload: "IP".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = res
        .get(v1::GetRequest {
            r#ref: Some(v1::ResourceRef {
                kind: v1::Kind::NetworkService as i32,
                namespace: "istio-system".into(),
                name: "istio-namespace".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(v1::resource::Kind::NetworkService(g)) = got.kind else {
        panic!()
    };
    assert_eq!(g.spec.unwrap().cidr, "10.60.0.0/16");
    assert_eq!(g.metadata.unwrap().uid, m.uid, "identity survives updates");

    // Apply: unchanged, then configured.
    let applied = res
        .apply(v1::ApplyRequest {
            resource: Some(resource(ns.clone())),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.outcome, v1::ApplyOutcome::Unchanged as i32);
    let mut changed = ns.clone();
    if let v1::resource::Kind::NetworkService(n) = &mut changed {
        n.spec.as_mut().unwrap().cidr = "10.61.0.0/16".into();
    }
    let applied = res
        .apply(v1::ApplyRequest {
            resource: Some(resource(changed)),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.outcome, v1::ApplyOutcome::Configured as i32);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let h = start(Config::default()).await;
    let ch = channel(&h.tcp).await;
    let mut res = ResourceServiceClient::new(ch.clone());
    let mut nses = NetworkServiceEndpointRegistryClient::new(ch);
    let (_, rev_before) = h.store.list("/").await.unwrap();

    let cases: Vec<(v1::resource::Kind, &str)> = vec![
        (
            v1::resource::Kind::NetworkService(v1::NetworkService {
                metadata: meta("Bad_Name", ""),
                spec: None,
            }),
            "metadata.name",
        ),
        (
            v1::resource::Kind::NetworkService(v1::NetworkService {
                metadata: meta("ok", ""),
                spec: Some(v1::NetworkServiceSpec {
                    cidr: "10.0.0.300/8".into(),
                    ..Default::default()
                }),
            }),
            "spec.cidr",
        ),
        (
            v1::resource::Kind::Endpoint(v1::Endpoint {
                metadata: meta("ep", ""),
                spec: Some(v1::EndpointSpec {
                    address: "10.0.0".into(),
                    ..Default::default()
                }),
            }),
            "spec.address",
        ),
        (
            v1::resource::Kind::Endpoint(v1::Endpoint {
                metadata: meta("ep", ""),
                spec: Some(v1::EndpointSpec {
                    url: "http://x:1".into(),
                    ..Default::default()
                }),
            }),
            "spec.url",
        ),
        (
            v1::resource::Kind::Node(v1::Node {
                metadata: meta("n1", ""),
                spec: Some(v1::NodeSpec {
                    address: "10.0.0".into(),
                    ..Default::default()
                }),
            }),
            "spec.address",
        ),
        (
            v1::resource::Kind::NetworkService(v1::NetworkService {
                metadata: Some(v1::ObjectMeta {
                    labels: HashMap::from([("bad key".into(), "v".into())]),
                    ..meta("ok", "").unwrap()
                }),
                spec: None,
            }),
            "metadata.labels",
        ),
    ];
    for (kind, field) in cases {
        let err = res
            .create(v1::CreateRequest {
                resource: Some(resource(kind)),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }
    let err = nses.register(nse("UPPER", &["x"], "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = nses.register(nse("", &["x"], "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = res
        .delete(v1::DeleteRequest {
            r#ref: Some(v1::ResourceRef {
                kind: v1::Kind::Node as i32,
                namespace: String::new(),
                name: "ghost".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "node \"ghost\" not found");
    let err = res
        .list(v1::ListRequest {
            kind: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let (items, rev_after) = h.store.list("/").await.unwrap();
    assert!(
        items.is_empty() && rev_after == rev_before,
        "rejected requests write nothing"
    );

    let node = v1::resource::Kind::Node(v1::Node {
        metadata: meta("n1", ""),
        spec: Some(v1::NodeSpec {
            address: "192.0.2.1".into(),
            ..Default::default()
        }),
    });
    res.create(v1::CreateRequest {
        resource: Some(resource(node.clone())),
    })
    .await
    .unwrap();
    let (_, rev) = h.store.list("/").await.unwrap();
    let err = res
        .create(v1::CreateRequest {
            resource: Some(resource(node)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        h.store.list("/").await.unwrap().1,
        rev,
        "a duplicate create writes nothing"
    );
}

#[tokio::test]
async fn health_and_path_metadata() {
    let h = start(Config::default()).await;
    let ch = channel(&h.unix).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for svc in [
        "",
        "registry.NetworkServiceRegistry",
        "registry.NetworkServiceEndpointRegistry",
        "nsm.v1.ResourceService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: svc.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{svc}"
        );
    }
    let mut c = NetworkServiceRegistryClient::new(ch);
    let mut req = tonic::Request::new(reg::NetworkService {
        name: "svc".into(),
        ..Default::default()
    });
    let path = r#"{"Index":0,"PathSegments":[{"token":"t"}]}"#;
    req.metadata_mut().insert("path", path.parse().unwrap());
    let resp = c.register(req).await.unwrap();
    assert_eq!(resp.metadata().get("path").unwrap().to_str().unwrap(), path);
}

#[tokio::test]
async fn client_status_belongs_to_the_node() {
    let h = start(Config::default()).await;
    let mut res = ResourceServiceClient::new(channel(&h.tcp).await);
    let client = |status: Option<v1::ClientStatus>| {
        resource(v1::resource::Kind::Client(v1::Client {
            metadata: meta("c1", ""),
            spec: Some(v1::ClientSpec {
                network_service: "orders".into(),
                netns: "/var/run/netns/pod-1".into(),
                node: "node-a".into(),
                ..Default::default()
            }),
            status,
        }))
    };
    let forged = v1::ClientStatus {
        phase: v1::client_status::Phase::Ready as i32,
        ..Default::default()
    };
    // What a user says of the status is ignored; the interface gets its default.
    let created = res
        .create(v1::CreateRequest {
            resource: Some(client(Some(forged.clone()))),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(v1::resource::Kind::Client(c)) = created.kind else {
        panic!()
    };
    assert!(c.status.is_none());
    assert_eq!(c.spec.unwrap().interface, "nsm-1");

    let cref = || {
        Some(v1::ResourceRef {
            kind: v1::Kind::Client as i32,
            namespace: String::new(),
            name: "c1".into(),
        })
    };
    let observed = v1::ClientStatus {
        phase: v1::client_status::Phase::Ready as i32,
        src_ip_addrs: vec!["10.60.0.1/32".into()],
        rx_bytes: 42,
        ..Default::default()
    };
    res.update_status(v1::UpdateStatusRequest {
        r#ref: cref(),
        status: Some(observed.clone()),
    })
    .await
    .unwrap();
    // A user's apply of the same spec keeps the node's status.
    let applied = res
        .apply(v1::ApplyRequest {
            resource: Some(client(None)),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.outcome, v1::ApplyOutcome::Unchanged as i32);
    let got = res.get(v1::GetRequest { r#ref: cref() }).await.unwrap().into_inner();
    let Some(v1::resource::Kind::Client(c)) = got.kind else {
        panic!()
    };
    assert_eq!(c.status, Some(observed));

    let missing = Some(v1::ResourceRef {
        kind: v1::Kind::Client as i32,
        namespace: String::new(),
        name: "nope".into(),
    });
    let err = res
        .update_status(v1::UpdateStatusRequest {
            r#ref: missing,
            status: Some(forged.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let node = Some(v1::ResourceRef {
        kind: v1::Kind::Node as i32,
        namespace: String::new(),
        name: "n".into(),
    });
    let err = res
        .update_status(v1::UpdateStatusRequest {
            r#ref: node,
            status: Some(forged),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
