//! Brings real test beds up and down (as root) and checks that nothing with the prefix remains.

use std::net::IpAddr;

use nsm_dataplane::{NetNs, Netlink};
use nsm_testbed::{AddressHostSpec, HostSpec, Testbed, TestbedError, Topology, WorkloadSpec, unique_prefix};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn design_topology(tag: &str) -> Topology {
    Topology {
        prefix: unique_prefix(tag),
        hosts: vec![
            HostSpec {
                name: "h1".into(),
                underlay_addr: "192.0.2.11".parse().unwrap(),
            },
            HostSpec {
                name: "h2".into(),
                underlay_addr: "192.0.2.12".parse().unwrap(),
            },
        ],
        workloads: vec![
            WorkloadSpec {
                name: "w1".into(),
                host: "h1".into(),
            },
            WorkloadSpec {
                name: "w2".into(),
                host: "h2".into(),
            },
        ],
        address_hosts: vec![AddressHostSpec {
            name: "vm".into(),
            addr: "10.0.0.5".parse().unwrap(),
        }],
    }
}

/// Namespaces under /run/netns whose name starts with `prefix`.
fn leftovers(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

async fn root_link_names() -> Vec<String> {
    let nl = Netlink::connect(&NetNs::current().unwrap()).await.unwrap();
    let mut names: Vec<String> = nl.links().await.unwrap().into_iter().map(|l| l.name).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_an_address_host_and_workloads_come_up_talk_and_go() {
    let root_links = root_link_names().await;
    let t = design_topology("up");
    let prefix = t.prefix.clone();
    let tb = Testbed::up(t).await.unwrap();
    assert_eq!(leftovers(&prefix).len(), 6, "{:?}", leftovers(&prefix)); // underlay, 2 hosts, vm, 2 workloads
    assert_eq!(
        tb.netns_path("h1"),
        std::path::Path::new("/run/netns").join(format!("{prefix}-h1"))
    );
    assert_eq!(tb.workload_host("w2"), "h2");

    // Hosts reach each other and the address host over the underlay, and the address host them.
    assert!(tb.ping("h1", ip("192.0.2.12"), 2));
    assert!(tb.ping("h2", ip("192.0.2.11"), 2));
    assert!(tb.ping("h1", ip("10.0.0.5"), 2));
    assert!(tb.ping("h2", ip("10.0.0.5"), 2));
    assert!(tb.ping("vm", ip("192.0.2.11"), 2));
    // Workloads are not wired yet: they have only `lo`, and reach nothing.
    let nw = Netlink::connect(tb.workload_ns("w1")).await.unwrap();
    let names: Vec<String> = nw.links().await.unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["lo"]);
    assert!(!tb.ping("w1", ip("192.0.2.11"), 1));

    // Hosts forward; the underlay is plain 1500-byte Ethernet.
    let out = tb.exec("h1", &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let nh = Netlink::connect(tb.host_ns("h1")).await.unwrap();
    let eth0 = nh.link("eth0").await.unwrap().unwrap();
    assert_eq!((eth0.mtu, eth0.up, eth0.kind.as_deref()), (1500, true, Some("veth")));
    assert!(
        nh.addresses("eth0")
            .await
            .unwrap()
            .contains(&"192.0.2.11/24".parse().unwrap())
    );
    // A full-size packet crosses the underlay unfragmented (1472 + 28 = 1500).
    let out = tb.exec(
        "h1",
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            "1472",
            "192.0.2.12",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    drop((nw, nh));

    tb.down().await.unwrap();
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
    assert_eq!(root_link_names().await, root_links);
}

#[test]
fn a_panicking_test_still_tears_everything_down() {
    let t = design_topology("panic");
    let prefix = t.prefix.clone();
    let result = std::panic::catch_unwind(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tb = Testbed::up(t).await.unwrap();
            assert!(tb.ping("h1", ip("192.0.2.12"), 1));
            panic!("on purpose, with the test bed up");
        })
    });
    assert!(result.is_err());
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_without_down_tears_down() {
    let t = design_topology("drop");
    let prefix = t.prefix.clone();
    let tb = Testbed::up(t).await.unwrap();
    assert!(!leftovers(&prefix).is_empty());
    drop(tb);
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_up_removes_what_it_built_and_only_that() {
    let t = design_topology("fail");
    let prefix = t.prefix.clone();
    // Someone else's namespace holds the name the second host needs.
    let squatter = format!("{prefix}-h2");
    NetNs::create(&squatter).unwrap();
    let err = Testbed::up(t).await.unwrap_err();
    let found = leftovers(&prefix);
    NetNs::delete(&squatter).unwrap();
    assert!(
        matches!(&err, TestbedError::Step { step, source } if step == "create h2" && source.is_already_exists()),
        "{err}"
    );
    assert_eq!(found, [squatter], "only the squatter may remain");
}

#[tokio::test]
async fn an_invalid_topology_builds_nothing() {
    let mut t = design_topology("bad");
    t.workloads.push(WorkloadSpec {
        name: "w3".into(),
        host: "nowhere".into(),
    });
    let prefix = t.prefix.clone();
    let err = Testbed::up(t).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid topology: workload \"w3\" is on unknown host \"nowhere\""
    );

    let mut t = design_topology("bad");
    t.address_hosts.push(AddressHostSpec {
        name: "h1".into(),
        addr: "10.0.0.6".parse().unwrap(),
    });
    assert!(matches!(Testbed::up(t).await, Err(TestbedError::InvalidTopology(_))));
    let mut t = design_topology("bad");
    t.hosts[1].underlay_addr = t.hosts[0].underlay_addr;
    assert!(matches!(Testbed::up(t).await, Err(TestbedError::InvalidTopology(_))));
    assert!(leftovers(&prefix).is_empty());
}
