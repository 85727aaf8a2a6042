//! Address endpoints end to end, as root: an endpoint that is a machine's address (a VM, a physical
//! server) rather than a namespace. Without nsm on that machine the client's node is the gateway
//! (veth into its host namespace, source NAT onto the underlay); with an nsm node there the vWire is
//! a VXLAN tunnel ending in that host's own namespace.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

mod common;

use common::*;
use nsm_testbed::{AddressHostSpec, HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};
use nsm_testing::NsmRegistry;

fn host(name: &str, addr: &str) -> HostSpec {
    HostSpec {
        name: name.into(),
        underlay_addr: addr.parse().unwrap(),
    }
}

fn nat_set(bed: &Testbed, host: &str) -> String {
    let o = bed.exec(host, &["nft", "list", "set", "inet", "nsm", "gw4"]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The design document's three commands, in order, on a fresh mesh, the last one inside the pod:
/// the pod gets a vWire to the VM at 10.0.0.5, which runs no nsm. The node gateways it (the VM
/// sees the node's underlay address), the vWire survives a `kill -9` of the node, and deleting the
/// client removes the interface, the gateway's end and the NAT pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_commands_give_a_pod_a_vwire_to_a_vm() {
    let bed = Testbed::up(Topology {
        prefix: unique_prefix("vm"),
        hosts: vec![host("h1", "192.0.2.11")],
        workloads: vec![WorkloadSpec {
            name: "pod".into(),
            host: "h1".into(),
        }],
        address_hosts: vec![AddressHostSpec {
            name: "vm".into(),
            addr: "10.0.0.5".parse().unwrap(),
        }],
    })
    .await
    .unwrap();
    let pod = bed.netns_path("pod").display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let mut a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "192.0.2.11", &[]));
    let vm: IpAddr = "10.0.0.5".parse().unwrap();
    assert!(!bed.ping("pod", vm, 1), "the pod starts with no way to the VM");

    ok(nsmctl(
        &registry,
        &["ns", "create", "istio-namespace", "--namespace=istio-system"],
    ));
    ok(nsmctl(
        &registry,
        &["endpoint", "create", "vm-endpoint", "--address=10.0.0.5"],
    ));
    ok(nsmctl_in(
        &registry,
        &pod,
        &a,
        &[
            "client",
            "create",
            "orders-vwire",
            "--service=orders",
            "--endpoint=vm-endpoint",
        ],
    ));
    let j = wait_client(&registry, &a, "orders-vwire", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["spec"]["netns"], pod.as_str());
    assert_eq!(j["status"]["mechanism"], "KERNEL", "{j:#}");
    assert_eq!(j["status"]["routes"], serde_json::json!(["10.0.0.5/32"]));
    assert_eq!(
        j["status"]["path"],
        serde_json::json!(["orders-vwire", "node-a", "vm-endpoint"])
    );
    let src = j["status"]["srcIpAddrs"][0]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_owned();

    assert!(bed.ping("pod", vm, 3), "pod -> VM; node log:\n{}", a.log());
    assert_eq!(
        udp_source(&bed, "pod", "vm", vm, 9500),
        Some("192.0.2.11".parse().unwrap()),
        "the VM sees the gateway node's underlay address"
    );
    assert!(
        nat_set(&bed, "h1").contains(&format!("{src} . 10.0.0.5")),
        "{}",
        nat_set(&bed, "h1")
    );
    // A second vWire of the same pod cannot take the first one's interface.
    let dup = nsmctl_in(
        &registry,
        &pod,
        &a,
        &[
            "client",
            "create",
            "dup",
            "--service=orders",
            "--endpoint=vm-endpoint",
            "--interface=nsm-1",
        ],
    );
    assert!(
        !dup.0 && dup.2.contains("already belongs to client orders-vwire"),
        "{dup:?}"
    );
    assert!(
        !ok(nsmctl(&registry, &["get", "clients"])).contains("dup"),
        "nothing created"
    );
    let described = ok(nsmctl(&registry, &["describe", "client", "orders-vwire"]));
    assert!(described.contains("10.0.0.5/32"), "{described}");

    // The daemon dies and comes back: the vWire keeps forwarding and is adopted, not rebuilt.
    let index = link_index(&bed, "pod", "nsm-1").await;
    let h1_links = link_names(&bed, "h1").await;
    a.kill9();
    assert!(bed.ping("pod", vm, 2), "forwarding while the daemon is down");
    a.launch();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        bed.ping("pod", vm, 2),
        "forwarding after restart; node log:\n{}",
        a.log()
    );
    assert_eq!(link_index(&bed, "pod", "nsm-1").await, index, "adopted, not rebuilt");
    assert_eq!(link_names(&bed, "h1").await, h1_links, "nothing duplicated on the host");

    // A pinned endpoint that lists its services must offer the requested one.
    ok(nsmctl(
        &registry,
        &["endpoint", "create", "db-vm", "--address=10.0.0.5", "--service=db"],
    ));
    ok(nsmctl_in(
        &registry,
        &pod,
        &a,
        &[
            "client",
            "create",
            "wrong",
            "--service=orders",
            "--endpoint=db-vm",
            "--interface=nsm-2",
        ],
    ));
    let j = wait_client(&registry, &a, "wrong", "Failed", |j| phase(j) == "Failed");
    let reason = j["status"]["reason"].as_str().unwrap();
    assert!(reason.contains("does not offer network service \"orders\""), "{reason}");
    assert!(
        link_index(&bed, "pod", "nsm-2").await.is_none(),
        "nothing built for a refused client"
    );

    ok(nsmctl(&registry, &["delete", "client", "orders-vwire"]));
    assert!(
        eventually(5, || async { link_names(&bed, "pod").await == ["lo"] }).await,
        "client end removed"
    );
    assert!(
        eventually(5, || async { link_names(&bed, "h1").await.len() < h1_links.len() }).await,
        "gateway end removed"
    );
    assert!(
        !nat_set(&bed, "h1").contains(&src),
        "NAT pair removed: {}",
        nat_set(&bed, "h1")
    );
    assert!(!bed.ping("pod", vm, 1));
    drop(a);
    bed.down().await.unwrap();
}

/// An address endpoint whose host runs an nsm node: the vWire is a VXLAN tunnel that ends in that
/// host's own namespace, so the pod reaches the server's address through it (full-size packets
/// too), and no NAT is involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_endpoint_on_an_nsm_host_gets_a_tunnel() {
    let bed = Testbed::up(Topology {
        prefix: unique_prefix("srv"),
        hosts: vec![host("h1", "192.0.2.11"), host("srv", "10.0.0.7")],
        workloads: vec![WorkloadSpec {
            name: "pod".into(),
            host: "h1".into(),
        }],
        address_hosts: vec![],
    })
    .await
    .unwrap();
    let pod = bed.netns_path("pod").display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "192.0.2.11", &[]));
    let b = NodeProc::start_with(&registry.url(), "server", &node_args(&bed, "srv", "10.0.0.7", &[]));
    // Registered before the client asks: an address no registered node has is reached through a
    // gateway, and a Ready gateway vWire would only be rebuilt at the next resync.
    describe_node(&registry, &b, "server");
    let srv_links = link_names(&bed, "srv").await;

    ok(nsmctl(
        &registry,
        &["endpoint", "create", "backup-server", "--address=10.0.0.7"],
    ));
    ok(nsmctl_in(
        &registry,
        &pod,
        &a,
        &[
            "client",
            "create",
            "backup",
            "--service=backup",
            "--endpoint=backup-server",
        ],
    ));
    let j = wait_client(&registry, &a, "backup", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["status"]["mechanism"], "VXLAN", "{j:#}\nserver log:\n{}", b.log());
    assert_eq!(
        j["status"]["path"],
        serde_json::json!(["backup", "node-a", "server", "backup-server"])
    );
    assert_eq!(j["status"]["routes"], serde_json::json!(["10.0.0.7/32"]));
    assert!(
        bed.ping("pod", "10.0.0.7".parse().unwrap(), 3),
        "pod -> server; server log:\n{}",
        b.log()
    );
    let o = bed.exec(
        "pod",
        &["ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1400", "10.0.0.7"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        link_names(&bed, "srv").await.len(),
        srv_links.len() + 1,
        "the tunnel's end on the server"
    );
    assert!(nat_set(&bed, "h1").is_empty(), "no NAT on a tunnelled vWire");

    ok(nsmctl(&registry, &["delete", "client", "backup"]));
    assert!(
        eventually(5, || async { link_names(&bed, "srv").await == srv_links }).await,
        "server end removed by Close; server log:\n{}",
        b.log()
    );
    assert!(eventually(5, || async { link_names(&bed, "pod").await == ["lo"] }).await);
    drop((a, b));
    bed.down().await.unwrap();
}
