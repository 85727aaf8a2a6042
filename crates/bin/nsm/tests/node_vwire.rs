//! `nsm node` end to end, as root: real registry and node processes, real namespaces from the test
//! bed, real veth pairs, real pings. Same-node vWires: creation, counters, healing to another
//! endpoint, a daemon `kill -9` + restart without disturbing the vWire, deletion, bad input.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::*;
use nsm_testbed::{HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};
use nsm_testing::{NsmRegistry, sibling_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_vwire_lifecycle() {
    let prefix = unique_prefix("vw");
    let bed = Testbed::up(Topology {
        prefix,
        hosts: vec![HostSpec {
            name: "h1".into(),
            underlay_addr: "192.0.2.11".parse().unwrap(),
        }],
        workloads: ["pod", "epa", "epb"]
            .iter()
            .map(|n| WorkloadSpec {
                name: n.to_string(),
                host: "h1".into(),
            })
            .collect(),
        address_hosts: vec![],
    })
    .await
    .unwrap();
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let mut node = NodeProc::start(&registry.url(), "node-a");

    ok(nsmctl(&registry, &["ns", "create", "orders", "--cidr", "10.60.0.0/24"]));
    endpoint_in(&registry, "ep-a", "orders", &path("epa"), "node-a");

    // Create → Ready, with the addresses in the workload and traffic flowing.
    let t0 = Instant::now();
    ok(nsmctl(
        &registry,
        &[
            "client",
            "create",
            "c1",
            "--service",
            "orders",
            "--netns",
            &path("pod"),
            "--node",
            &node.socket,
        ],
    ));
    let j = wait_client(&registry, &node, "c1", "Ready", |j| phase(j) == "Ready");
    let setup = t0.elapsed();
    assert_eq!(j["status"]["endpoint"], "ep-a");
    assert_eq!(j["status"]["mechanism"], "KERNEL");
    assert_eq!(j["status"]["srcIpAddrs"][0], "10.60.0.1/32");
    let dst = dst_of(&j);
    assert!(bed.ping("pod", dst.parse().unwrap(), 3), "ping over the vWire");
    eprintln!("client create -> Ready in {setup:?}");

    // Counters reach the status.
    wait_client(&registry, &node, "c1", "counters", |j| {
        j["status"]["txPackets"].as_u64().unwrap_or(0) >= 3
    });
    let d = ok(nsmctl(&registry, &["describe", "client", "c1"]));
    assert!(
        d.contains("Status:") && d.contains("Ready") && d.contains("KERNEL") && d.contains("10.60.0.1/32"),
        "{d}"
    );

    // kill -9 the daemon and restart it: the vWire keeps forwarding and is adopted, not rebuilt.
    let before = link_index(&bed, "pod", "nsm-1").await.expect("nsm-1 exists");
    node.kill9();
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 1),
        "forwarding survives the daemon's death"
    );
    node.launch();
    // Once the new daemon has registered, give it a few resyncs to adopt (or wrongly rebuild).
    let start = Instant::now();
    while node.log().matches("node registered").count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not restart:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        link_index(&bed, "pod", "nsm-1").await,
        Some(before),
        "re-adopted, not rebuilt"
    );
    assert_eq!(phase(&client_json(&registry, "c1")), "Ready");
    assert!(bed.ping("pod", dst.parse().unwrap(), 1));

    // Heal: the endpoint goes away, another one is selected and traffic flows again.
    endpoint_in(&registry, "ep-b", "orders", &path("epb"), "node-a");
    let t1 = Instant::now();
    ok(nsmctl(&registry, &["delete", "endpoint", "ep-a"]));
    let j = wait_client(&registry, &node, "c1", "healed to ep-b", |j| {
        phase(j) == "Ready" && j["status"]["endpoint"] == "ep-b"
    });
    let dst = dst_of(&j);
    assert!(bed.ping("pod", dst.parse().unwrap(), 2), "traffic flows via ep-b");
    eprintln!("endpoint deleted -> healed in {:?}", t1.elapsed());
    assert_eq!(link_names(&bed, "epa").await, ["lo"], "nothing left in ep-a");

    // No live endpoint: Pending with the reason; back to Ready when one returns.
    ok(nsmctl(&registry, &["delete", "endpoint", "ep-b"]));
    let j = wait_client(&registry, &node, "c1", "Pending", |j| phase(j) == "Pending");
    assert!(
        j["status"]["reason"].as_str().unwrap().contains("no live endpoint"),
        "{j:#}"
    );
    assert!(
        link_index(&bed, "pod", "nsm-1").await.is_none(),
        "no half-built interface while Pending"
    );

    // Bad input: a missing namespace fails clearly; an unknown service waits.
    ok(nsmctl(
        &registry,
        &[
            "client",
            "create",
            "c2",
            "--service",
            "orders",
            "--netns",
            "/var/run/netns/does-not-exist",
            "--node",
            &node.socket,
            "--interface",
            "nsm-2",
        ],
    ));
    endpoint_in(&registry, "ep-c", "orders", &path("epb"), "node-a");
    let j = wait_client(&registry, &node, "c2", "Failed", |j| phase(j) == "Failed");
    assert!(
        j["status"]["reason"].as_str().unwrap().contains("does-not-exist"),
        "{j:#}"
    );
    ok(nsmctl(
        &registry,
        &[
            "client",
            "create",
            "c3",
            "--service",
            "nope",
            "--netns",
            &path("pod"),
            "--node",
            &node.socket,
            "--interface",
            "nsm-3",
        ],
    ));
    let j = wait_client(&registry, &node, "c3", "Pending", |j| phase(j) == "Pending");
    assert!(
        j["status"]["reason"].as_str().unwrap().contains("\"nope\" not found"),
        "{j:#}"
    );

    // Delete removes the interface (c1 is Ready again on ep-c first).
    wait_client(&registry, &node, "c1", "Ready on ep-c", |j| {
        phase(j) == "Ready" && j["status"]["endpoint"] == "ep-c"
    });
    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    let start = Instant::now();
    while link_index(&bed, "pod", "nsm-1").await.is_some() && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        link_index(&bed, "pod", "nsm-1").await.is_none(),
        "delete removes the vWire; node log:\n{}",
        node.log()
    );
    assert_eq!(link_names(&bed, "epb").await, ["lo"]);

    drop(node);
    bed.down().await.unwrap();
}

/// Bad input the node reports on the client (unknown pinned endpoint, an exhausted pool) or the CLI
/// refuses (a duplicate name), never leaving half-built interfaces; a Failed client recovers when
/// its cause goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_and_builds_nothing() {
    let bed = Testbed::up(Topology {
        prefix: unique_prefix("bad"),
        hosts: vec![HostSpec {
            name: "h1".into(),
            underlay_addr: "192.0.2.11".parse().unwrap(),
        }],
        workloads: ["pod", "ep"]
            .iter()
            .map(|n| WorkloadSpec {
                name: n.to_string(),
                host: "h1".into(),
            })
            .collect(),
        address_hosts: vec![],
    })
    .await
    .unwrap();
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let node = NodeProc::start(&registry.url(), "node-a");
    let pod = path("pod");
    // A /30 holds one pair of host addresses: room for one vWire.
    ok(nsmctl(&registry, &["ns", "create", "tiny", "--cidr", "10.61.0.0/30"]));
    endpoint_in(&registry, "ep", "tiny", &path("ep"), "node-a");
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec!["client", "create", name, "--netns", &pod, "--node", &node.socket];
        args.extend_from_slice(extra);
        nsmctl(&registry, &args)
    };

    // A pinned endpoint that does not exist: Pending with the reason, nothing built.
    ok(create("ghost", &["--service", "tiny", "--endpoint", "nobody"]));
    let j = wait_client(&registry, &node, "ghost", "Pending", |j| phase(j) == "Pending");
    let reason = j["status"]["reason"].as_str().unwrap();
    assert!(reason.contains("endpoint \"nobody\" not found"), "{reason}");
    assert_eq!(link_names(&bed, "pod").await, ["lo"]);
    ok(nsmctl(&registry, &["delete", "client", "ghost"]));

    // The pool has room for one vWire: the second fails with the reason, and is built once the
    // first goes.
    ok(create("first", &["--service", "tiny"]));
    wait_client(&registry, &node, "first", "Ready", |j| phase(j) == "Ready");
    ok(create("second", &["--service", "tiny"]));
    let j = wait_client(&registry, &node, "second", "Failed", |j| phase(j) == "Failed");
    let reason = j["status"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("address pool 10.61.0.0/30") && reason.contains("exhausted"),
        "{reason}"
    );
    assert_eq!(
        link_names(&bed, "pod").await,
        ["lo", "nsm-1"],
        "nothing built for the second"
    );

    // A duplicate name is refused by the CLI and changes nothing.
    let dup = create("first", &["--service", "tiny"]);
    assert!(!dup.0 && dup.2.contains("already exists"), "{dup:?}");

    ok(nsmctl(&registry, &["delete", "client", "first"]));
    let j = wait_client(&registry, &node, "second", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["status"]["srcIpAddrs"][0], "10.61.0.1/32", "the freed pair is reused");
    assert!(bed.ping("pod", "10.61.0.2".parse().unwrap(), 2));
    ok(nsmctl(&registry, &["delete", "client", "second"]));
    assert!(eventually(5, || async { link_names(&bed, "pod").await == ["lo"] }).await);
    drop(node);
    bed.down().await.unwrap();
}

/// An endpoint whose namespace disappears (the workload is gone) stops being selectable: its
/// clients heal to another endpoint, without anyone deleting the endpoint resource. The node
/// resyncs only every 40 s here: the removal itself must set the heal off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_namespace_gone_heals_to_another() {
    let bed = Testbed::up(Topology {
        prefix: unique_prefix("gone"),
        hosts: vec![HostSpec {
            name: "h1".into(),
            underlay_addr: "192.0.2.11".parse().unwrap(),
        }],
        workloads: ["pod", "epy"]
            .iter()
            .map(|n| WorkloadSpec {
                name: n.to_string(),
                host: "h1".into(),
            })
            .collect(),
        address_hosts: vec![],
    })
    .await
    .unwrap();
    // The first endpoint's workload is a namespace this test deletes itself.
    let epx = format!("{}-epx", bed.prefix());
    let _epx_ns = nsm_dataplane::NetNs::create(&epx).unwrap();
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = nsm_dataplane::NetNs::delete(&self.0);
        }
    }
    let _gone = Gone(epx.clone());
    let epx_path = nsm_dataplane::named_path(&epx).display().to_string();
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let node = NodeProc::start_with(
        &registry.url(),
        "node-a",
        &["--underlay-address", "192.0.2.1", "--resync", "40s"].map(String::from),
    );
    ok(nsmctl(&registry, &["ns", "create", "svc", "--cidr", "10.62.0.0/24"]));
    endpoint_in(&registry, "ep-x", "svc", &epx_path, "node-a");
    ok(nsmctl(
        &registry,
        &[
            "client",
            "create",
            "c",
            "--service",
            "svc",
            "--netns",
            &path("pod"),
            "--node",
            &node.socket,
        ],
    ));
    wait_client(&registry, &node, "c", "Ready on ep-x", |j| {
        phase(j) == "Ready" && j["status"]["endpoint"] == "ep-x"
    });
    endpoint_in(&registry, "ep-y", "svc", &path("epy"), "node-a");
    drop(_epx_ns);
    nsm_dataplane::NetNs::delete(&epx).unwrap();
    let j = wait_client(&registry, &node, "c", "Ready on ep-y", |j| {
        phase(j) == "Ready" && j["status"]["endpoint"] == "ep-y"
    });
    let dst = dst_of(&j);
    assert!(bed.ping("pod", dst.parse().unwrap(), 2), "traffic flows via ep-y");
    drop(node);
    bed.down().await.unwrap();
}

/// A pod on one host, a service endpoint on another: a VXLAN vWire over the test bed's underlay,
/// built by two node daemons talking upstream's NetworkService API, with an MTU that lets
/// full-size packets through without fragmentation, and removed from both hosts on delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_vxlan_vwire() {
    let bed = two_hosts("xn").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "192.0.2.11", &[]));
    let mut b = NodeProc::start_with(&registry.url(), "node-b", &node_args(&bed, "h2", "192.0.2.12", &[]));

    ok(nsmctl(&registry, &["ns", "create", "orders", "--cidr", "10.70.0.0/24"]));
    endpoint_in(&registry, "ep", "orders", &path("svc"), "node-b");
    let t0 = Instant::now();
    // As the design document has it: run inside the pod's namespace, the client is the pod.
    let o = Command::new("nsenter")
        .arg(format!("--net={}", path("pod")))
        .arg("--")
        .arg(sibling_binary(NSM, "nsmctl").unwrap())
        .args([
            "client",
            "create",
            "c1",
            "--service=orders",
            "--endpoint=ep",
            "--node",
            &a.socket,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = wait_client(&registry, &a, "c1", "Ready", |j| phase(j) == "Ready");
    assert_eq!(
        j["spec"]["netns"],
        path("pod"),
        "the node found the caller's namespace by name"
    );
    assert_eq!(j["spec"]["node"], "node-a");
    eprintln!("cross-node client create -> Ready in {:?}", t0.elapsed());
    assert_eq!(j["status"]["mechanism"], "VXLAN", "{j:#}");
    assert_eq!(
        j["status"]["mtu"], 1450,
        "underlay 1500 less 50 bytes of VXLAN over IPv4"
    );
    assert_eq!(j["status"]["path"], serde_json::json!(["c1", "node-a", "node-b", "ep"]));
    let dst = dst_of(&j);
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 3),
        "ping across hosts; node-b log:\n{}",
        b.log()
    );
    // Full-size packets with DF set: 1400 bytes of payload + 28 of headers fit the 1450 MTU.
    let o = bed.exec("pod", &["ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1400", &dst]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let pod_links = link_names(&bed, "pod").await;
    assert!(pod_links.contains(&"nsm-1".to_string()), "{pod_links:?}");
    assert_eq!(link_names(&bed, "svc").await.len(), 2, "lo and the endpoint's end");

    // The endpoint's node dies and comes back: the tunnel keeps forwarding, and the restarted
    // daemon adopts its end on the next refresh instead of rebuilding it (so Close still finds it).
    let svc_end = link_names(&bed, "svc").await.into_iter().find(|l| l != "lo").unwrap();
    let svc_index = link_index(&bed, "svc", &svc_end).await;
    let nl = nsm_dataplane::Netlink::connect(bed.ns("svc")).await.unwrap();
    let alias = async |link: &str| nl.link(link).await.unwrap().unwrap().alias.unwrap_or_default();
    assert_eq!(alias(&svc_end).await, "nsm remote vWire end");
    b.kill9();
    // As a daemon from before ends were marked would have left it: unmarked.
    let o = bed.exec("svc", &["ip", "link", "set", "dev", &svc_end, "alias", ""]);
    assert!(o.status.success() && alias(&svc_end).await.is_empty());
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 2),
        "forwarding while node-b is down"
    );
    b.launch();
    // node-a's request after node-b's re-registration marks the adopted end.
    let marked = eventually(10, || async { alias(&svc_end).await == "nsm remote vWire end" }).await;
    assert!(marked, "marked on adoption; node-b log:\n{}", b.log());
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 2),
        "forwarding after node-b restarted"
    );
    assert_eq!(
        link_index(&bed, "svc", &svc_end).await,
        svc_index,
        "adopted, not rebuilt"
    );
    assert_eq!(phase(&client_json(&registry, "c1")), "Ready");

    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    let start = Instant::now();
    while (link_names(&bed, "pod").await.len() > 1 || link_names(&bed, "svc").await.len() > 1)
        && start.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(link_names(&bed, "pod").await, ["lo"], "client end removed");
    assert_eq!(
        link_names(&bed, "svc").await,
        ["lo"],
        "endpoint end removed by Close; node-b log:\n{}",
        b.log()
    );
    drop((a, b));
    bed.down().await.unwrap();
}

/// An upstream-shaped client (what upstream's NSC sends: a KERNEL mechanism preference whose
/// inodeURL is the namespace file, an interface name, labels) asks the node over its unix socket,
/// gets a working interface and a Connection with its IP context and path; Close removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_requests_a_kernel_vwire() {
    use nsm_api::connection::{Connection, Mechanism, Path as ConnPath, PathSegment};
    use nsm_api::networkservice::{NetworkServiceRequest, network_service_client::NetworkServiceClient};

    let bed = Testbed::up(Topology {
        prefix: unique_prefix("up"),
        hosts: vec![HostSpec {
            name: "h1".into(),
            underlay_addr: "192.0.2.11".parse().unwrap(),
        }],
        workloads: ["nsc", "nse"]
            .iter()
            .map(|n| WorkloadSpec {
                name: n.to_string(),
                host: "h1".into(),
            })
            .collect(),
        address_hosts: vec![],
    })
    .await
    .unwrap();
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let node = NodeProc::start(&registry.url(), "node-a");
    ok(nsmctl(
        &registry,
        &["ns", "create", "icmp-responder", "--cidr", "10.80.0.0/24"],
    ));
    endpoint_in(&registry, "nse-1", "icmp-responder", &path("nse"), "node-a");

    let start = Instant::now();
    let ch = loop {
        match nsm_transport::connect(&node.socket, Duration::from_millis(500)).await {
            Ok(ch) => break ch,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("{e}\n{}", node.log()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut c = NetworkServiceClient::new(ch.clone());
    // Monitor first, as upstream's NSC does: an initial state transfer (empty), then its events.
    let mut monitor = nsm_api::connection::monitor_connection_client::MonitorConnectionClient::new(ch)
        .monitor_connections(nsm_api::connection::MonitorScopeSelector {
            network_services: vec!["icmp-responder".into()],
            path_segments: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let first = monitor.message().await.unwrap().unwrap();
    assert_eq!(
        first.r#type,
        nsm_api::connection::ConnectionEventType::InitialStateTransfer as i32
    );
    assert!(first.connections.is_empty());
    let id = "5f3c1b2a-0000-4000-8000-000000000001".to_string();
    let request = NetworkServiceRequest {
        connection: Some(Connection {
            id: id.clone(),
            network_service: "icmp-responder".into(),
            labels: [("app".to_string(), "nsc".to_string())].into(),
            path: Some(ConnPath {
                index: 0,
                path_segments: vec![PathSegment {
                    name: "nsc-1".into(),
                    id: id.clone(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![Mechanism {
            cls: "LOCAL".into(),
            r#type: "KERNEL".into(),
            parameters: [
                ("inodeURL".to_string(), format!("file://{}", path("nsc"))),
                ("name".to_string(), "nsm-up".to_string()),
            ]
            .into(),
        }],
    };
    let conn = c.request(request.clone()).await.unwrap().into_inner();
    assert_eq!(conn.state, nsm_api::connection::State::Up as i32);
    assert_eq!(conn.mechanism.as_ref().unwrap().r#type, "KERNEL");
    assert_eq!(conn.network_service_endpoint_name, "nse-1");
    let ip = conn.context.as_ref().unwrap().ip_context.clone().unwrap();
    assert_eq!(ip.src_ip_addrs, ["10.80.0.1/32"]);
    let names: Vec<&str> = conn
        .path
        .as_ref()
        .unwrap()
        .path_segments
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["nsc-1", "node-a", "nse-1"]);
    assert!(link_names(&bed, "nsc").await.contains(&"nsm-up".to_string()));
    let ev = tokio::time::timeout(Duration::from_secs(5), monitor.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.r#type, nsm_api::connection::ConnectionEventType::Update as i32);
    let seen = &ev.connections[&id];
    assert_eq!(seen.network_service_endpoint_name, "nse-1");
    assert_eq!(
        seen.context.as_ref().unwrap().ip_context.as_ref().unwrap().src_ip_addrs,
        ["10.80.0.1/32"]
    );
    let dst = ip.dst_ip_addrs[0].trim_end_matches("/32").to_owned();
    assert!(
        bed.ping("nsc", dst.parse().unwrap(), 2),
        "traffic over the upstream-requested vWire"
    );
    // It is a client like any other.
    let t = ok(nsmctl(&registry, &["get", "clients", "-A"]));
    assert!(t.contains("Ready") && t.contains("nse-1"), "{t}");
    // Refresh is a re-Request of the same connection.
    let again = c
        .request(NetworkServiceRequest {
            connection: Some(conn.clone()),
            mechanism_preferences: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.context.unwrap().ip_context.unwrap().src_ip_addrs,
        ["10.80.0.1/32"]
    );
    // Bad input: an inode:// URL (fd passing) is refused clearly; a missing service waits no more than it must.
    let mut bad = request.clone();
    bad.connection.as_mut().unwrap().id = "other".into();
    bad.mechanism_preferences[0]
        .parameters
        .insert("inodeURL".into(), "inode://4/4026532338".into());
    let err = c.request(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");

    c.close(conn).await.unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), monitor.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ev.r#type == nsm_api::connection::ConnectionEventType::Delete as i32 {
            assert!(ev.connections.contains_key(&id));
            break;
        }
    }
    let start = Instant::now();
    while link_names(&bed, "nsc").await.len() > 1 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        link_names(&bed, "nsc").await,
        ["lo"],
        "Close removes the interface; log:\n{}",
        node.log()
    );
    assert!(ok(nsmctl(&registry, &["get", "clients", "-A", "-o", "json"])).contains("\"items\": []"));
    drop(node);
    bed.down().await.unwrap();
}

/// Two hosts with a node each (`node_flags` for both), service `orders` on `cidr` with endpoint
/// `ep` in `svc` on node-b, and clients c1 and c2 in `pod` on node-a, Ready; their far addresses.
async fn two_clients_across(
    tag: &str,
    cidr: &str,
    node_flags: &[&str],
) -> (Testbed, NsmRegistry, NodeProc, NodeProc, Vec<String>) {
    let bed = two_hosts(tag).await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let a = NodeProc::start_with(
        &registry.url(),
        "node-a",
        &node_args(&bed, "h1", "192.0.2.11", node_flags),
    );
    let b = NodeProc::start_with(
        &registry.url(),
        "node-b",
        &node_args(&bed, "h2", "192.0.2.12", node_flags),
    );
    ok(nsmctl(&registry, &["ns", "create", "orders", "--cidr", cidr]));
    endpoint_in(&registry, "ep", "orders", &path("svc"), "node-b");
    let mut dst = Vec::new();
    for c in ["c1", "c2"] {
        ok(nsmctl_in(
            &registry,
            &path("pod"),
            &a,
            &["client", "create", c, "--service=orders", "--endpoint=ep"],
        ));
        dst.push(dst_of(&wait_client(&registry, &a, c, "Ready", |j| phase(j) == "Ready")));
    }
    (bed, registry, a, b, dst)
}

/// Ends the endpoint's node built for clients that were deleted while it was down: no one closes
/// them or asks for them again. The restarted daemon finds them by their alias, gives each one
/// `--remote-lifetime` and then removes them; an end whose client still exists is asked for again
/// at once (its node sees the restart) and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_left_by_an_earlier_daemon_go_unless_asked_for() {
    let quick = ["--resync", "4s", "--remote-lifetime", "10s"];
    let (bed, registry, a, mut b, dst) = two_clients_across("lf", "10.72.0.0/24", &quick).await;
    assert_eq!(link_names(&bed, "svc").await.len(), 3, "lo and two ends");

    // node-b dies, and c1 is deleted meanwhile: node-a removes its side; its Close reaches no one.
    b.kill9();
    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    assert!(
        eventually(5, || async { link_names(&bed, "pod").await.len() == 2 }).await,
        "{:?}",
        link_names(&bed, "pod").await
    );
    assert_eq!(link_names(&bed, "svc").await.len(), 3, "c1's end left behind");
    b.launch();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        link_names(&bed, "svc").await.len(),
        3,
        "within the lifetime, both ends stay; node-b log:\n{}",
        b.log()
    );
    assert!(
        eventually(20, || async { link_names(&bed, "svc").await.len() == 2 }).await,
        "c1's end goes after the lifetime; node-b log:\n{}",
        b.log()
    );
    eprintln!("left-over end removed {:?} after node-b's restart", t.elapsed());
    assert!(b.log().contains("removed a vWire end an earlier daemon left"));
    assert!(bed.ping("pod", dst[1].parse().unwrap(), 3), "c2's vWire stays");
    drop((a, b));
    bed.down().await.unwrap();
}

/// Flags that cannot work stop the daemon at once, naming the flag and why.
#[test]
fn node_refuses_timers_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let o = Command::new(NSM)
            .args(["node", "--name", "n", "--underlay-address", "192.0.2.1", "--registry"])
            .arg("tcp://127.0.0.1:1")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (ok, err) = run(&["--resync", "30s", "--remote-lifetime", "60s"]);
    assert!(
        !ok && err.contains("--remote-lifetime 1m") && err.contains("twice --resync (30s)"),
        "{err}"
    );
    let (ok, err) = run(&["--resync", "0s"]);
    assert!(!ok && err.contains("--resync 0s"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing created");
}

/// A client deleted while its node's daemon is down: the restarted daemon no longer finds it in the
/// registry, and removes its interface from the record it kept; a client that still exists keeps
/// its vWire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deleted_while_its_node_is_down_leaves_nothing() {
    let (bed, registry, mut a, b, dst) = two_clients_across("cd", "10.74.0.0/24", &[]).await;
    assert_eq!(link_names(&bed, "pod").await.len(), 3, "lo and two vWires");
    a.kill9();
    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    assert_eq!(
        link_names(&bed, "pod").await.len(),
        3,
        "nothing removes c1's interface meanwhile"
    );
    a.launch();
    assert!(
        eventually(10, || async { link_names(&bed, "pod").await.len() == 2 }).await,
        "c1's interface removed; node-a log:\n{}",
        a.log()
    );
    // The daemon logs once its delete has returned, which can be after the test saw the link go.
    assert!(
        eventually(5, || async {
            a.log().contains("removed the vWire of a client that is gone")
        })
        .await,
        "{}",
        a.log()
    );
    assert!(bed.ping("pod", dst[1].parse().unwrap(), 3), "c2's vWire stays");
    drop((a, b));
    bed.down().await.unwrap();
}
