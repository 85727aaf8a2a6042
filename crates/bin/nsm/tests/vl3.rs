//! vL3 end to end, as root: three hosts with an `nsm node` each, members in workload namespaces,
//! real routers, real VXLAN between them, real pings and DNS queries from inside the members.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::*;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use nsm_testbed::{HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};
use nsm_testing::NsmRegistry;

const FAKE_ANSWER: &str = "198.51.100.53";

/// A DNS server in the test's own namespace that answers every A query with FAKE_ANSWER: the
/// "upstream" resolver the routers forward unknown names to.
fn fake_upstream() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let mut r = Message::response(q.metadata.id, hickory_proto::op::OpCode::Query);
            r.add_queries(q.queries.clone());
            if let Some(query) = q.queries.first() {
                r.add_answer(hickory_proto::rr::Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A(hickory_proto::rr::rdata::A(FAKE_ANSWER.parse().unwrap())),
                ));
            }
            let _ = s.send_to(&r.to_vec().unwrap(), from);
        }
    });
    addr
}

/// Resolves `name` (A or AAAA) by asking `server` from inside member `from`.
fn resolve(bed: &Testbed, from: &str, server: IpAddr, name: &str, qtype: RecordType) -> Vec<IpAddr> {
    let mut q = Message::query();
    q.metadata.id = 7;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let bytes = q.to_vec().unwrap();
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let sock = bed.ns(from).run(move || UdpSocket::bind(any)).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..5 {
        sock.send_to(&bytes, SocketAddr::new(server, 53)).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let m = Message::from_vec(&buf[..n]).unwrap();
            return m
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
        }
    }
    panic!("no DNS answer for {name} from {server} in {from}");
}

struct Mesh {
    bed: Testbed,
    registry: NsmRegistry,
    nodes: BTreeMap<String, NodeProc>,
}

impl Mesh {
    async fn up(tag: &str, hosts: &[&str], workloads: &[(&str, &str)], dns: SocketAddr) -> Mesh {
        let bed = Testbed::up(Topology {
            prefix: unique_prefix(tag),
            hosts: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| HostSpec {
                    name: h.to_string(),
                    underlay_addr: format!("192.0.2.{}", 11 + i).parse().unwrap(),
                })
                .collect(),
            workloads: workloads
                .iter()
                .map(|(w, h)| WorkloadSpec {
                    name: w.to_string(),
                    host: h.to_string(),
                })
                .collect(),
            address_hosts: vec![],
        })
        .await
        .unwrap();
        let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
        let mut nodes = BTreeMap::new();
        for (i, h) in hosts.iter().enumerate() {
            let addr = format!("192.0.2.{}", 11 + i);
            let args = node_args(&bed, h, &addr, &["--dns-forward", &dns.to_string()]);
            nodes.insert(h.to_string(), NodeProc::start_with(&registry.url(), h, &args));
        }
        Mesh { bed, registry, nodes }
    }

    /// `nsmctl client create NAME --service S` inside workload `w`, through its host's node.
    fn join(&self, name: &str, service: &str, w: &str, namespace: &str) {
        let node = &self.nodes[self.bed.workload_host(w)];
        let netns = self.bed.netns_path(w).display().to_string();
        ok(nsmctl_in(
            &self.registry,
            &netns,
            node,
            &["client", "create", name, "--service", service, "-n", namespace],
        ));
    }

    fn status(&self, name: &str, namespace: &str) -> serde_json::Value {
        serde_json::from_str(&ok(nsmctl(
            &self.registry,
            &["get", "client", name, "-n", namespace, "-o", "json"],
        )))
        .unwrap()
    }

    /// Waits until the member is Ready; returns (its address, its DNS server).
    fn ready(&self, name: &str, namespace: &str) -> (IpAddr, IpAddr) {
        let start = Instant::now();
        loop {
            let j = self.status(name, namespace);
            if phase(&j) == "Ready" {
                let a = j["status"]["srcIpAddrs"][0].as_str().unwrap();
                let d = j["status"]["dnsServers"][0].as_str().unwrap();
                return (a.split('/').next().unwrap().parse().unwrap(), d.parse().unwrap());
            }
            if start.elapsed() > Duration::from_secs(15) {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|(n, p)| format!("--- {n}:\n{}", p.log()))
                    .collect();
                panic!("{name} not Ready: {j:#}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|(n, p)| format!("--- {n}:\n{}", p.log()))
            .collect();
        logs.join("\n")
    }

    async fn down(self) {
        let Mesh { bed, registry, nodes } = self;
        drop(nodes);
        drop(registry);
        bed.down().await.unwrap();
    }
}

/// Every member of `members` (workload, address) pings every other; returns the failures.
fn all_pairs(bed: &Testbed, members: &[(&str, IpAddr)]) -> Vec<String> {
    let mut failed = Vec::new();
    for (w, _) in members {
        for (o, addr) in members {
            if w != o && !bed.ping(w, *addr, 2) {
                failed.push(format!("{w} -> {o} ({addr})"));
            }
        }
    }
    failed
}

/// Whether pings from `from` to `to` cross the vL3 on its fast path: neither the sending nor
/// the receiving router's stack (namespaces `routers`) forwards (next to) any of them or their replies.
fn on_fast_path(bed: &Testbed, from: &str, to: IpAddr, routers: &[&str]) -> bool {
    let forwarded = || -> u64 {
        routers
            .iter()
            .map(|r| nsm_dataplane::ipv4_forwarded(&nsm_dataplane::NetNs::open_named(r).unwrap()).unwrap())
            .sum()
    };
    let before = forwarded();
    assert!(bed.ping(from, to, 10), "{from} -> {to}");
    forwarded() - before < 5
}

/// Packets workload `w` has sent through its vL3 shortcuts (macvlans on its router's peer links,
/// which nsm marks with an alias), and how many shortcuts it has.
async fn shortcut_sent(bed: &Testbed, w: &str) -> (u64, usize) {
    let nl = nsm_dataplane::Netlink::connect(bed.workload_ns(w)).await.unwrap();
    let links = nl.links().await.unwrap();
    let shortcuts: Vec<_> = links
        .iter()
        .filter(|l| {
            l.alias
                .as_deref()
                .is_some_and(nsm_dataplane::fastpath::is_shortcut_alias)
        })
        .collect();
    (shortcuts.iter().map(|l| l.stats.tx_packets).sum(), shortcuts.len())
}

/// Whether pings from `from` to `to` leave through `from`'s shortcut (and arrive).
async fn through_shortcut(bed: &Testbed, from: &str, to: IpAddr) -> bool {
    let (before, _) = shortcut_sent(bed, from).await;
    assert!(bed.ping(from, to, 5), "{from} -> {to}");
    shortcut_sent(bed, from).await.0 - before >= 5
}

/// Router namespaces the nodes made for this test's mesh (named after the node names).
fn router_netns(hosts: &[&str]) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| hosts.iter().any(|h| n.starts_with(&format!("nsm-vl3-{h}-"))))
        .collect()
}

/// Three nodes, four members: every pair reaches every other by address and by name (DNS on
/// every router, unknown names forwarded); addresses survive a node daemon kill -9 + restart and
/// the loss of a router namespace; a node gone for good leaves the others' mesh intact, and on
/// return its member gets its old address and name back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vl3_across_three_nodes_with_dns_and_healing() {
    let hosts = ["vla", "vlb", "vlc"];
    let dns = fake_upstream();
    let _cleanup = RouterCleanup(vec![], hosts.map(String::from).to_vec());
    let mut mesh = Mesh::up(
        "vl3",
        &hosts,
        &[("a1", "vla"), ("a2", "vla"), ("b1", "vlb"), ("c1", "vlc")],
        dns,
    )
    .await;
    ok(nsmctl(
        &mesh.registry,
        &["ns", "create", "mesh", "--type", "vl3", "--cidr", "172.16.0.0/16"],
    ));
    let t0 = Instant::now();
    for (name, w) in [("a1", "a1"), ("a2", "a2"), ("b1", "b1"), ("c1", "c1")] {
        mesh.join(name, "mesh", w, "default");
    }
    let mut addrs = BTreeMap::new();
    let mut servers = BTreeMap::new();
    for name in ["a1", "a2", "b1", "c1"] {
        let (a, d) = mesh.ready(name, "default");
        addrs.insert(name, a);
        servers.insert(name, d);
    }
    let members: Vec<(&str, IpAddr)> = addrs.iter().map(|(k, v)| (*k, *v)).collect();
    let failed = all_pairs(&mesh.bed, &members);
    eprintln!(
        "4 members on 3 nodes: all pairs reachable {:?} after the first create",
        t0.elapsed()
    );
    assert!(failed.is_empty(), "unreachable pairs: {failed:?}\n{}", mesh.logs());
    // Two members on one node share their node's prefix; others have their own.
    let net = |a: &IpAddr| match a {
        IpAddr::V4(v) => v.octets()[2],
        IpAddr::V6(_) => unreachable!(),
    };
    assert_eq!(net(&addrs["a1"]), net(&addrs["a2"]));
    assert_ne!(net(&addrs["a1"]), net(&addrs["b1"]));
    let prefixes = ok(nsmctl(&mesh.registry, &["get", "prefixes"]));
    assert_eq!(prefixes.lines().count(), 4, "three leases and a header:\n{prefixes}");

    // Names: every member resolves every other through its own DNS server (on its router).
    for (from, server) in &servers {
        for (to, addr) in &addrs {
            let got = resolve(&mesh.bed, from, *server, &format!("{to}.mesh."), RecordType::A);
            assert_eq!(got, vec![*addr], "{from} resolving {to}.mesh.");
        }
        // Unknown names go to the upstream resolver.
        let got = resolve(&mesh.bed, from, *server, "www.example.org.", RecordType::A);
        assert_eq!(
            got,
            vec![FAKE_ANSWER.parse::<IpAddr>().unwrap()],
            "forwarded from {from}"
        );
    }
    // Member to member across nodes, both ways: past both routers' stacks.
    let routers_ab = router_netns(&["vla", "vlb"]);
    let routers_ab: Vec<&str> = routers_ab.iter().map(String::as_str).collect();
    assert!(
        on_fast_path(&mesh.bed, "a1", addrs["b1"], &routers_ab),
        "fast path between nodes a and b\n{}",
        mesh.logs()
    );
    // ...and past a1's own veth: it sends through its shortcut, one per peer node.
    assert!(
        through_shortcut(&mesh.bed, "a1", addrs["b1"]).await,
        "a1's shortcut\n{}",
        mesh.logs()
    );
    for name in ["a1", "a2", "b1", "c1"] {
        assert_eq!(
            shortcut_sent(&mesh.bed, name).await.1,
            2,
            "{name}: a shortcut per peer node"
        );
    }
    // A shortcut's frames carry the peer router's MAC, which both ends derive: b's router
    // itself (its DNS address) answers a1, and its stack takes only frames addressed to it.
    assert!(
        through_shortcut(&mesh.bed, "a1", servers["b1"]).await,
        "b's router through a1's shortcut\n{}",
        mesh.logs()
    );
    let j = mesh.status("a1", "default");
    assert_eq!(j["status"]["dnsName"], "a1.mesh.");
    assert_eq!(j["status"]["searchDomains"], serde_json::json!(["mesh."]));

    // The node daemon dies and comes back: addresses stay, traffic never stops.
    let node_a = mesh.nodes.get_mut("vla").unwrap();
    node_a.kill9();
    assert!(
        mesh.bed.ping("a1", addrs["b1"], 2),
        "forwarding while the daemon is down"
    );
    node_a.launch();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for name in ["a1", "a2"] {
        assert_eq!(mesh.ready(name, "default").0, addrs[name], "{name} kept its address");
    }
    assert!(all_pairs(&mesh.bed, &members).is_empty());
    // The restarted daemon puts the fast path back (its programs went with the old process).
    assert!(
        eventually(10, || async { on_fast_path(&mesh.bed, "b1", addrs["a1"], &routers_ab) }).await,
        "fast path after node a's restart\n{}",
        mesh.nodes["vla"].log()
    );
    // The restarted daemon finds the shortcuts it made: used again, none doubled.
    assert!(
        eventually(10, || async { through_shortcut(&mesh.bed, "a1", addrs["c1"]).await }).await,
        "a1's shortcut after the restart\n{}",
        mesh.nodes["vla"].log()
    );
    assert_eq!(shortcut_sent(&mesh.bed, "a1").await.1, 2);
    assert!(through_shortcut(&mesh.bed, "a1", servers["c1"]).await, "c's router");

    // The router itself dies (its namespace goes): the node rebuilds it, members keep addresses.
    // Listed and deleted again if the name went in between: one CI run (of 6512378) found the
    // router's namespace gone at this point (not reproduced, cause not found), so a miss is said,
    // with node a's log, rather than taken for the test's own failure.
    let mut deleted = false;
    for _ in 0..20 {
        let router_a = router_netns(&["vla"]);
        assert!(router_a.len() <= 1, "{router_a:?}");
        match router_a.first().map(|n| nsm_dataplane::NetNs::delete(n)) {
            Some(Ok(())) => {
                deleted = true;
                break;
            }
            Some(Err(e)) if e.is_not_found() => eprintln!("router namespace gone before the test deleted it: {e}"),
            Some(Err(e)) => panic!("deleting the router namespace: {e}"),
            None => eprintln!("no router namespace of node a listed"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        deleted,
        "no router namespace to delete; node a log:\n{}",
        mesh.nodes["vla"].log()
    );
    let healed = eventually(15, || async { all_pairs(&mesh.bed, &members).is_empty() }).await;
    assert!(healed, "router rebuilt; log:\n{}", mesh.nodes["vla"].log());
    for name in ["a1", "a2"] {
        assert_eq!(mesh.ready(name, "default").0, addrs[name], "{name} kept its address");
        assert_eq!(
            resolve(&mesh.bed, name, servers[name], "c1.mesh.", RecordType::A),
            vec![addrs["c1"]]
        );
    }

    // Node c goes away for good: its prefix returns to the pool, the others' mesh stays intact.
    let mut node_c = mesh.nodes.remove("vlc").unwrap();
    node_c.kill9();
    ok(nsmctl(&mesh.registry, &["delete", "node", "vlc"]));
    let rest: Vec<(&str, IpAddr)> = members.iter().filter(|(w, _)| *w != "c1").cloned().collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        all_pairs(&mesh.bed, &rest).is_empty(),
        "the remaining routers' mesh is intact"
    );
    // It returns — a deleted node is revoked, so an admin creates it again first; the daemon
    // rejoins with the identity it kept: nothing duplicated, c1 gets its old address (and so its
    // name) back.
    ok(nsmctl(&mesh.registry, &["node", "create", "vlc"]));
    node_c.launch();
    mesh.nodes.insert("vlc".into(), node_c);
    let healed = eventually(15, || async { all_pairs(&mesh.bed, &members).is_empty() }).await;
    assert!(healed, "node c back; log:\n{}", mesh.nodes["vlc"].log());
    assert_eq!(
        mesh.ready("c1", "default").0,
        addrs["c1"],
        "c1 kept its address across its node's return"
    );
    let prefixes = ok(nsmctl(&mesh.registry, &["get", "prefixes"]));
    assert_eq!(prefixes.lines().count(), 4, "no duplicate lease:\n{prefixes}");
    // Shortcuts to c went with its link, and come back with it (a2's router was rebuilt too).
    assert!(
        eventually(10, || async { through_shortcut(&mesh.bed, "a2", addrs["c1"]).await }).await,
        "a2's shortcut to the returned node\n{}",
        mesh.nodes["vla"].log()
    );
    assert_eq!(shortcut_sent(&mesh.bed, "a2").await.1, 2);

    // Leaving: delete a member, its interface goes.
    ok(nsmctl(&mesh.registry, &["delete", "client", "a2"]));
    assert!(eventually(5, || async { link_names(&mesh.bed, "a2").await == ["lo"] }).await);
    mesh.down().await;
}

/// Deletes the router namespaces a test's nodes left (they outlive their daemons by design).
/// Declared before the mesh, so it runs after the node daemons are gone, also on panic.
struct RouterCleanup(Vec<String>, Vec<String>);

impl Drop for RouterCleanup {
    fn drop(&mut self) {
        let hosts: Vec<&str> = self.1.iter().map(String::as_str).collect();
        for n in router_netns(&hosts).into_iter().chain(self.0.drain(..)) {
            let _ = nsm_dataplane::NetNs::delete(&n);
        }
    }
}

/// The design document's "Istio and Linkerd on one vL3": two services share a vL3's address space
/// and routers; by default each reaches only its own members and the vL3's shared member;
/// `reach` opens one direction; `*` opens all; closing again takes effect. Enforced by the
/// routers' filters, also between members on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_share_a_vl3_isolated_until_opened() {
    let hosts = ["isa", "isb"];
    let _cleanup = RouterCleanup(vec![], hosts.map(String::from).to_vec());
    let mesh = Mesh::up(
        "iso",
        &hosts,
        &[
            ("i1", "isa"),
            ("i2", "isb"),
            ("l1", "isa"),
            ("l2", "isb"),
            ("s1", "isb"),
        ],
        fake_upstream(),
    )
    .await;
    let r = &mesh.registry;
    ok(nsmctl(
        r,
        &["ns", "create", "mesh-net", "--type", "vl3", "--cidr", "10.128.0.0/16"],
    ));
    ok(nsmctl(
        r,
        &[
            "ns",
            "create",
            "istio",
            "--namespace=istio-system",
            "--vl3",
            "mesh-net.default",
        ],
    ));
    ok(nsmctl(
        r,
        &[
            "ns",
            "create",
            "linkerd",
            "--namespace=linkerd",
            "--vl3",
            "mesh-net.default",
        ],
    ));
    mesh.join("i1", "istio", "i1", "istio-system");
    mesh.join("i2", "istio", "i2", "istio-system");
    mesh.join("l1", "linkerd", "l1", "linkerd");
    mesh.join("l2", "linkerd", "l2", "linkerd");
    // A shared endpoint placed on the vL3 itself, in a namespace that filters reverse paths
    // strictly: it gets no shortcuts (replies to it would arrive on its veth and be dropped), and
    // its traffic takes its veth.
    let strict = mesh.bed.exec("s1", &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"]);
    assert!(strict.status.success());
    mesh.join("s1", "mesh-net", "s1", "default");
    let a = |n: &str, ns: &str| mesh.ready(n, ns).0;
    let (i1, i2, l1, l2, s1) = (
        a("i1", "istio-system"),
        a("i2", "istio-system"),
        a("l1", "linkerd"),
        a("l2", "linkerd"),
        a("s1", "default"),
    );
    let reach = |from: &str, to: IpAddr| mesh.bed.ping(from, to, 1);
    assert!(reach("i1", i2) && reach("l1", l2), "own service across nodes");
    let seen = (reach("i1", s1), reach("l2", s1), reach("s1", i1));
    assert_eq!(seen, (true, true, true), "everyone reaches the shared member");
    assert!(!reach("i1", l1), "istio -> linkerd on one node is blocked");
    assert!(!reach("i1", l2) && !reach("l2", i2), "and across nodes, both ways");
    // All of that with the fast path on (its reach table holds only what the filter admits).
    let routers = router_netns(&["isa", "isb"]);
    let routers: Vec<&str> = routers.iter().map(String::as_str).collect();
    assert!(on_fast_path(&mesh.bed, "i1", i2, &routers));
    // Members send to their own service's members on the other node through their shortcuts;
    // what they may not reach is not routed there (and the link's guard would drop it).
    assert!(through_shortcut(&mesh.bed, "i1", i2).await);
    assert!(through_shortcut(&mesh.bed, "l1", s1).await, "to the shared member");
    assert_eq!(
        shortcut_sent(&mesh.bed, "s1").await.1,
        0,
        "strict rp_filter: no shortcut"
    );
    assert!(reach("s1", i1) && reach("s1", l1));
    let (before, _) = shortcut_sent(&mesh.bed, "i1").await;
    assert!(!reach("i1", l2));
    assert_eq!(shortcut_sent(&mesh.bed, "i1").await.0, before, "no shortcut to linkerd");
    // Names resolve for all (isolation is about traffic).
    let dns = mesh.ready("i1", "istio-system").1;
    assert_eq!(resolve(&mesh.bed, "i1", dns, "l2.linkerd.", RecordType::A), vec![l2]);

    // Linkerd may reach istio: one direction opens (replies flow), the other stays closed.
    ok(nsmctl(r, &["delete", "ns", "linkerd", "-n", "linkerd"]));
    ok(nsmctl(
        r,
        &[
            "ns",
            "create",
            "linkerd",
            "--namespace=linkerd",
            "--vl3",
            "mesh-net.default",
            "--reach",
            "istio.istio-system",
        ],
    ));
    assert!(
        eventually(5, || async { reach("l1", i2) }).await,
        "linkerd -> istio opened"
    );
    assert!(reach("l2", i1));
    assert!(!reach("i1", l2), "istio -> linkerd still closed");
    // Replies of one-way reach need each router's connection tracking: no fast path, and no
    // shortcuts.
    assert!(!on_fast_path(&mesh.bed, "l1", i2, &routers));
    assert_eq!(shortcut_sent(&mesh.bed, "l1").await.1, 0, "shortcuts removed");
    // Istio reaches everyone.
    ok(nsmctl(r, &["delete", "ns", "istio", "-n", "istio-system"]));
    ok(nsmctl(
        r,
        &[
            "ns",
            "create",
            "istio",
            "--namespace=istio-system",
            "--vl3",
            "mesh-net.default",
            "--reach",
            "*",
        ],
    ));
    assert!(eventually(5, || async { reach("i1", l2) }).await, "istio -> everyone");
    assert!(reach("i2", l1));
    // Two-way reach again (istio reaches all, linkerd istio): fast path and shortcuts are back.
    assert!(
        eventually(5, || async { through_shortcut(&mesh.bed, "i1", l2).await }).await,
        "istio -> linkerd through the shortcut"
    );
    mesh.down().await;
}

/// An IPv6 vL3 across two nodes: /128 members, routes over the routers' VXLAN links, AAAA names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_vl3() {
    let hosts = ["v6a", "v6b"];
    let _cleanup = RouterCleanup(vec![], hosts.map(String::from).to_vec());
    let mesh = Mesh::up("v6", &hosts, &[("x", "v6a"), ("y", "v6b")], fake_upstream()).await;
    ok(nsmctl(
        &mesh.registry,
        &["ns", "create", "six", "--type", "vl3", "--cidr", "fd00:16::/64"],
    ));
    mesh.join("x", "six", "x", "default");
    mesh.join("y", "six", "y", "default");
    let (x, dx) = mesh.ready("x", "default");
    let (y, _) = mesh.ready("y", "default");
    assert!(x.is_ipv6() && y.is_ipv6(), "{x} {y}");
    assert!(mesh.bed.ping("x", y, 2), "x -> y over IPv6:\n{}", mesh.logs());
    assert!(mesh.bed.ping("y", x, 2));
    assert_eq!(resolve(&mesh.bed, "x", dx, "y.six.", RecordType::AAAA), vec![y]);
    let j = mesh.status("x", "default");
    assert!(j["status"]["srcIpAddrs"][0].as_str().unwrap().ends_with("/128"));
    mesh.down().await;
}

/// Bad input: a service on a vL3 that does not exist waits with the reason; an exhausted pool
/// fails the member with the reason and builds nothing; an overlapping pool is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vl3_bad_input() {
    let hosts = ["bda", "bdb"];
    let _cleanup = RouterCleanup(vec![], hosts.map(String::from).to_vec());
    let mesh = Mesh::up("bad", &hosts, &[("p", "bda"), ("q", "bdb")], fake_upstream()).await;
    let r = &mesh.registry;
    ok(nsmctl(r, &["ns", "create", "orphan", "--vl3", "nowhere"]));
    mesh.join("p", "orphan", "p", "default");
    let j = wait_client(r, &mesh.nodes["bda"], "p", "Pending", |j| phase(j) == "Pending");
    assert!(
        j["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("vL3 \"nowhere\", which does not exist"),
        "{j:#}"
    );
    assert_eq!(link_names(&mesh.bed, "p").await, ["lo"]);
    ok(nsmctl(r, &["delete", "client", "p"]));

    // One /30 prefix in the pool: the first node gets it, the second node's member cannot.
    ok(nsmctl(
        r,
        &[
            "ns",
            "create",
            "tiny",
            "--type",
            "vl3",
            "--cidr",
            "10.129.0.0/30",
            "--prefix-len",
            "30",
        ],
    ));
    mesh.join("p", "tiny", "p", "default");
    mesh.ready("p", "default");
    mesh.join("q", "tiny", "q", "default");
    let j = wait_client(r, &mesh.nodes["bdb"], "q", "Failed", |j| phase(j) == "Failed");
    assert!(
        j["status"]["reason"].as_str().unwrap().contains("no free /30 prefix"),
        "{j:#}"
    );
    assert_eq!(link_names(&mesh.bed, "q").await, ["lo"], "nothing built");

    let o = nsmctl(
        r,
        &["ns", "create", "overlap", "--type", "vl3", "--cidr", "10.129.0.0/16"],
    );
    assert!(
        !o.0 && o.2.contains("overlaps the pool 10.129.0.0/30 of vL3 tiny"),
        "{o:?}"
    );
    let o = nsmctl(
        r,
        &[
            "ns",
            "create",
            "bad",
            "--type",
            "vl3",
            "--cidr",
            "10.130.0.0/16",
            "--prefix-len",
            "8",
        ],
    );
    assert!(!o.0 && o.2.contains("spec.prefixLen"), "{o:?}");
    mesh.down().await;
}
