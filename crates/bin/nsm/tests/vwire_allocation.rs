//! vWire address pairs leased from the registry, end to end.
//!
//! - `lease_pair` (the node's call, `nsm_node::ipam::lease_pair`) against a real `nsm registry`
//!   process: idempotent, wanted pairs, exhaustion, release on delete. No root needed.
//! - As root: a registry and three `nsm node` daemons on three test-bed hosts; clients of one
//!   service with a small pool are created on all three nodes at the same instant; every pair in
//!   their statuses is distinct, is the client's lease, and carries traffic. Everything is in
//!   namespaces named `nsmt-<pid>-…`, deleted by name when the test bed drops (also on failure).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Barrier};

mod common;

use common::*;
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_testbed::{HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};
use nsm_testing::NsmRegistry;
use tonic::transport::Channel;

async fn resources(registry: &NsmRegistry) -> ResourceServiceClient<Channel> {
    ResourceServiceClient::new(registry.channel().await.unwrap())
}

/// Every lease as (client name, src, dst).
async fn leases(api: &mut ResourceServiceClient<Channel>) -> Vec<(String, String, String)> {
    api.list_address_leases(v1::ListAddressLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| (l.client.unwrap().name, l.src_ip_addr, l.dst_ip_addr))
        .collect()
}

async fn create_client(api: &mut ResourceServiceClient<Channel>, name: &str) {
    api.create(v1::CreateRequest {
        resource: Some(v1::Resource {
            kind: Some(v1::resource::Kind::Client(v1::Client {
                metadata: Some(v1::ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                spec: Some(v1::ClientSpec {
                    network_service: "orders".into(),
                    netns: format!("/run/netns/{name}"),
                    ..Default::default()
                }),
                status: None,
            })),
        }),
    })
    .await
    .unwrap();
}

/// A pair as strings.
fn shown<T: std::fmt::Display>(p: (T, T)) -> (String, String) {
    (p.0.to_string(), p.1.to_string())
}

#[tokio::test]
async fn lease_pair_against_a_registry_process() {
    use nsm_node::ipam::lease_pair;

    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let mut api = resources(&registry).await;
    for c in ["c1", "c2", "c3", "c4"] {
        create_client(&mut api, c).await;
    }
    let pool = "10.96.0.0/29".parse().unwrap(); // three pairs
    let a = lease_pair(&mut api, ("default", "c1"), pool, None).await.unwrap();
    assert_eq!(shown(a), ("10.96.0.1/32".into(), "10.96.0.2/32".into()));
    assert_eq!(
        lease_pair(&mut api, ("default", "c1"), pool, None).await.unwrap(),
        a,
        "asking again is harmless"
    );
    // The wanted pair (a client's last status) is kept when free; one outside the pool (the
    // service's CIDR changed) is not sent, so it does not fail the request.
    let wanted = ("10.96.0.6/32".parse().unwrap(), "10.96.0.5/32".parse().unwrap());
    let b = lease_pair(&mut api, ("default", "c2"), pool, Some(wanted))
        .await
        .unwrap();
    assert_eq!(b, wanted);
    let stale = ("10.200.0.1/32".parse().unwrap(), "10.200.0.2/32".parse().unwrap());
    let c = lease_pair(&mut api, ("default", "c3"), pool, Some(stale))
        .await
        .unwrap();
    assert_eq!(shown(c), ("10.96.0.3/32".into(), "10.96.0.4/32".into()));
    // Exhausted: the error names the pool. A client that does not exist gets nothing.
    let e = lease_pair(&mut api, ("default", "c4"), pool, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("10.96.0.0/29"), "{e:?}");
    let e = lease_pair(&mut api, ("default", "c9"), pool, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // Deleting a client gives its pair back.
    ok(nsmctl(&registry, &["delete", "client", "c2"]));
    assert_eq!(leases(&mut api).await.len(), 2);
    let d = lease_pair(&mut api, ("default", "c4"), pool, None).await.unwrap();
    assert_eq!(shown(d), ("10.96.0.5/32".into(), "10.96.0.6/32".into()));
}

/// Three hosts, one endpoint workload on h1, `PER_NODE` client workloads on each host.
const PER_NODE: usize = 3;

async fn three_hosts() -> Testbed {
    let mut workloads = vec![WorkloadSpec {
        name: "svc".into(),
        host: "h1".into(),
    }];
    for h in 1..=3 {
        for i in 0..PER_NODE {
            workloads.push(WorkloadSpec {
                name: format!("p{h}{i}"),
                host: format!("h{h}"),
            });
        }
    }
    Testbed::up(Topology {
        prefix: unique_prefix("alloc"),
        hosts: (1..=3)
            .map(|h| HostSpec {
                name: format!("h{h}"),
                underlay_addr: format!("192.0.2.{}", 10 + h).parse().unwrap(),
            })
            .collect(),
        workloads,
        address_hosts: vec![],
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn clients_on_three_nodes_at_once_get_distinct_pairs() {
    let bed = three_hosts().await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let nodes: Vec<NodeProc> = (1..=3)
        .map(|h| {
            NodeProc::start_with(
                &registry.url(),
                &format!("node-{h}"),
                &node_args(&bed, &format!("h{h}"), &format!("192.0.2.{}", 10 + h), &[]),
            )
        })
        .collect();
    for (h, n) in nodes.iter().enumerate() {
        describe_node(&registry, n, &format!("node-{}", h + 1));
    }
    let node_refs: Vec<&NodeProc> = nodes.iter().collect();

    // A small pool: 15 pairs for 9 clients, so a collision would be likely without leases.
    ok(nsmctl(&registry, &["ns", "create", "orders", "--cidr", "10.97.0.0/27"]));
    endpoint_in(&registry, "ep", "orders", &path("svc"), "node-1");

    // Every client created at the same instant, on all three nodes.
    let clients: Vec<(String, String, String)> = (1..=3)
        .flat_map(|h| (0..PER_NODE).map(move |i| (h, i)))
        .map(|(h, i)| (format!("c{h}{i}"), format!("p{h}{i}"), nodes[h - 1].socket.clone()))
        .collect();
    let barrier = Arc::new(Barrier::new(clients.len()));
    let registry_url = registry.url();
    let threads: Vec<_> = clients
        .iter()
        .map(|(name, workload, socket)| {
            let (name, netns, socket) = (name.clone(), path(workload), socket.clone());
            let (barrier, registry_url) = (barrier.clone(), registry_url.clone());
            std::thread::spawn(move || {
                let nsmctl = nsm_testing::sibling_binary(NSM, "nsmctl").unwrap();
                barrier.wait();
                std::process::Command::new(nsmctl)
                    .args(["client", "create", &name, "--service", "orders", "--netns", &netns])
                    .args(["--node", &socket])
                    .env("NSM_REGISTRY", registry_url)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for t in threads {
        let o = t.join().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    let mut seen = HashSet::new();
    let mut pairs = Vec::new();
    for (name, workload, _) in &clients {
        let j = wait_client_for(&registry, &node_refs, name, "Ready", 60, |j| phase(j) == "Ready");
        let src = j["status"]["srcIpAddrs"][0].as_str().unwrap().to_owned();
        let dst = j["status"]["dstIpAddrs"][0].as_str().unwrap().to_owned();
        assert!(seen.insert(src.clone()), "{src} twice (client {name})");
        assert!(seen.insert(dst.clone()), "{dst} twice (client {name})");
        pairs.push((name.clone(), workload.clone(), src, dst));
    }
    // Each status pair is the client's lease.
    let mut api = resources(&registry).await;
    let held: HashSet<(String, String, String)> = leases(&mut api).await.into_iter().collect();
    for (name, _, src, dst) in &pairs {
        assert!(
            held.contains(&(name.clone(), src.clone(), dst.clone())),
            "{name} {src} {dst} is not leased: {held:?}"
        );
    }
    // Traffic across every vWire.
    for (name, workload, _, dst) in &pairs {
        let to: std::net::IpAddr = dst.split('/').next().unwrap().parse().unwrap();
        assert!(bed.ping(workload, to, 3), "ping over {name}'s vWire to {to}");
    }

    // Deleting the clients gives every pair back.
    for (name, ..) in &pairs {
        ok(nsmctl(&registry, &["delete", "client", name]));
    }
    assert!(leases(&mut api).await.is_empty());
    drop(nodes);
    bed.down().await.unwrap();
}
