//! Encrypted cross-node vWires (`WIREGUARD`), as root: two "hosts" of the test bed, a node daemon
//! on each, a pod on one and an endpoint on the other. `--encryption required` gives a WireGuard
//! tunnel (userspace, nsm-wireguard) whose TUN is the workload's interface and whose UDP socket is
//! in the host namespace on the underlay; traffic, DF-sized packets, restarts of either daemon,
//! deletion. Against a node that refuses WIREGUARD, `required` fails and `preferred` falls back to
//! VXLAN. Key rotation on either node under continuous traffic.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::*;
use nsm_testbed::Testbed;
use nsm_testing::NsmRegistry;

/// Sends `bytes` over TCP from `pod` to `dst:port` (a listener in `svc`) and says whether all arrived.
fn tcp_transfer(bed: &Testbed, dst: &str, port: u16, bytes: usize) -> bool {
    let addr: std::net::SocketAddr = format!("{dst}:{port}").parse().unwrap();
    let listener = bed
        .ns("svc")
        .run(move || std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n
    });
    let mut s = bed
        .ns("pod")
        .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    let chunk = vec![0x5au8; 1 << 16];
    let mut sent = 0;
    while sent < bytes {
        let k = chunk.len().min(bytes - sent);
        s.write_all(&chunk[..k]).unwrap();
        sent += k;
    }
    drop(s);
    rx.join().unwrap() == bytes
}

/// `ip -d link show IFNAME` in `ns`.
/// Pings `dst` from `pod` until it answers (15 s at most): traffic is back after `what`; on failure
/// the panic shows `node`'s log.
async fn traffic_back(bed: &Testbed, dst: &str, node: &NodeProc, what: &str) {
    let back = eventually(15, || async { bed.ping("pod", dst.parse().unwrap(), 1) }).await;
    assert!(back, "{what}; log:\n{}", node.log());
}

fn link_details(bed: &Testbed, ns: &str, ifname: &str) -> String {
    String::from_utf8_lossy(&bed.exec(ns, &["ip", "-d", "link", "show", ifname]).stdout).into_owned()
}

/// UDP sockets bound in `ns` (`ss -Huln`).
fn udp_listeners(bed: &Testbed, ns: &str) -> String {
    String::from_utf8_lossy(&bed.exec(ns, &["ss", "-Huln"]).stdout).into_owned()
}

/// Service `orders` (`cidr`, encryption required), endpoint `ep` in `svc` on node-b, client `c1`
/// in `pod` through node `a`: Ready on a WIREGUARD vWire that answers pings. Returns the endpoint's
/// address.
fn encrypted_vwire(bed: &Testbed, registry: &NsmRegistry, a: &NodeProc, cidr: &str) -> String {
    let path = |n: &str| bed.netns_path(n).display().to_string();
    ok(nsmctl(
        registry,
        &["ns", "create", "orders", "--cidr", cidr, "--encryption", "required"],
    ));
    endpoint_in(registry, "ep", "orders", &path("svc"), "node-b");
    ok(nsmctl_in(
        registry,
        &path("pod"),
        a,
        &["client", "create", "c1", "--service=orders", "--endpoint=ep"],
    ));
    let j = wait_client(registry, a, "c1", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["status"]["mechanism"], "WIREGUARD", "{j:#}");
    let dst = dst_of(&j);
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 3),
        "ping; node-a log:\n{}",
        a.log()
    );
    dst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_required_vwire() {
    let bed = two_hosts("wg").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let mut a = NodeProc::start_with(
        &registry.url(),
        "node-a",
        &node_args(
            &bed,
            "h1",
            "192.0.2.11",
            &["--wireguard-ports", "52000-52099", "--wireguard-backend", "userspace"],
        ),
    );
    let mut b = NodeProc::start_with(
        &registry.url(),
        "node-b",
        &node_args(
            &bed,
            "h2",
            "192.0.2.12",
            &["--wireguard-ports", "52000-52099", "--wireguard-backend", "userspace"],
        ),
    );
    ok(nsmctl(
        &registry,
        &[
            "ns",
            "create",
            "orders",
            "--cidr",
            "10.71.0.0/24",
            "--encryption",
            "required",
        ],
    ));
    let d = ok(nsmctl(&registry, &["describe", "ns", "orders"]));
    assert!(d.contains("required"), "{d}");
    let d = describe_node(&registry, &a, "node-a");
    assert!(
        d.lines()
            .any(|l| l.contains("WireGuard backend") && l.contains("userspace")),
        "{d}"
    );
    endpoint_in(&registry, "ep", "orders", &path("svc"), "node-b");
    let t0 = Instant::now();
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c1", "--service=orders", "--endpoint=ep"],
    ));
    let j = wait_client(&registry, &a, "c1", "Ready", |j| phase(j) == "Ready");
    eprintln!("WIREGUARD client create -> Ready in {:?}", t0.elapsed());
    assert_eq!(j["status"]["mechanism"], "WIREGUARD", "{j:#}\nnode-b log:\n{}", b.log());
    assert_eq!(j["status"]["mtu"], 1420, "underlay 1500 less 80 bytes of WireGuard");
    assert_eq!(j["status"]["path"], serde_json::json!(["c1", "node-a", "node-b", "ep"]));
    let dst = dst_of(&j);
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 3),
        "ping; node-a log:\n{}",
        a.log()
    );
    // Full-size packets with DF set: 1392 bytes of payload + 28 of headers fill the 1420 MTU.
    let o = bed.exec("pod", &["ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1392", &dst]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = bed.exec("pod", &["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1393", &dst]);
    assert!(!o.status.success(), "1393 + 28 bytes exceed the MTU");
    let t = Instant::now();
    assert!(tcp_transfer(&bed, &dst, 5201, 32 << 20), "32 MiB over TCP");
    eprintln!("32 MiB over the WIREGUARD vWire in {:?}", t.elapsed());

    // What carries it: TUNs in both workloads, no VXLAN link anywhere, and each node's UDP socket
    // on its underlay address in its host namespace.
    let pod_link = link_details(&bed, "pod", "nsm-1");
    assert!(pod_link.contains("tun") && !pod_link.contains("vxlan"), "{pod_link}");
    let svc_links = link_names(&bed, "svc").await;
    assert_eq!(svc_links.len(), 2, "lo and the endpoint's end: {svc_links:?}");
    let svc_link = link_details(&bed, "svc", &svc_links[1]);
    assert!(svc_link.contains("tun") && !svc_link.contains("vxlan"), "{svc_link}");
    for ns in ["h1", "h2"] {
        let links = String::from_utf8_lossy(&bed.exec(ns, &["ip", "-d", "link"]).stdout).into_owned();
        assert!(!links.contains("vxlan"), "{ns}: {links}");
    }
    let h1 = udp_listeners(&bed, "h1");
    assert!(h1.contains("192.0.2.11:520"), "{h1}");
    let h2 = udp_listeners(&bed, "h2");
    assert!(h2.contains("192.0.2.12:520"), "{h2}");
    let c = wait_client(&registry, &a, "c1", "counters", |j| {
        j["status"]["txBytes"].as_u64().unwrap_or(0) > 32_000_000
    });
    eprintln!(
        "client counters: tx {} B / {} pkts, rx {} B / {} pkts",
        c["status"]["txBytes"], c["status"]["txPackets"], c["status"]["rxBytes"], c["status"]["rxPackets"]
    );

    // The client's node restarts: its tunnel went with the process; the new daemon rebuilds it
    // with the same addresses and the same node key (kept in its data directory, so the other
    // node's unchanged tunnel accepts its handshake), and traffic resumes.
    a.kill9();
    assert!(!link_names(&bed, "pod").await.contains(&"nsm-1".to_string()));
    let t = Instant::now();
    // From now on the client's node resyncs only every 40 s: what it does within the 15 s limits
    // below, it does at start-up or on events (a restarted endpoint node is one).
    a.set_resync("40s");
    a.launch();
    traffic_back(&bed, &dst, &a, "traffic after node-a restarted").await;
    eprintln!("client node restart: traffic back {:?} after launch", t.elapsed());
    let j = wait_client(&registry, &a, "c1", "Ready", |j| phase(j) == "Ready");
    assert_eq!(dst_of(&j), dst, "same addresses after the rebuild");
    assert_eq!(j["status"]["mechanism"], "WIREGUARD");

    // The endpoint's node restarts: its new start time in the registry sets the client's node
    // re-requesting the vWire at once, which makes it build its end again.
    b.kill9();
    let t = Instant::now();
    b.launch();
    traffic_back(&bed, &dst, &b, "traffic after node-b restarted").await;
    eprintln!("endpoint node restart: traffic back {:?} after launch", t.elapsed());
    assert!(tcp_transfer(&bed, &dst, 5202, 4 << 20), "TCP after both restarts");

    // Delete: both ends go.
    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    let gone = eventually(5, || async {
        link_names(&bed, "pod").await == ["lo"] && link_names(&bed, "svc").await == ["lo"]
    })
    .await;
    assert!(
        gone,
        "pod {:?} svc {:?}",
        link_names(&bed, "pod").await,
        link_names(&bed, "svc").await
    );
    // And both tunnels' UDP sockets (closed as their threads finish).
    let closed = eventually(5, || async {
        !udp_listeners(&bed, "h1").contains("192.0.2.11:520") && !udp_listeners(&bed, "h2").contains("192.0.2.12:520")
    })
    .await;
    assert!(closed, "{}{}", udp_listeners(&bed, "h1"), udp_listeners(&bed, "h2"));
    drop((a, b));
    bed.down().await.unwrap();
}

/// A WIREGUARD vWire between nodes whose underlay addresses are IPv6: both tunnel sockets on
/// them, IPv4 inside, full-size packets and bulk TCP through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_vwire_over_ipv6_underlay() {
    let bed = two_hosts("wg6").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    for (host, addr) in [("h1", "fd00:12::11/64"), ("h2", "fd00:12::12/64")] {
        // `nodad`: usable at once, no duplicate address detection to wait for.
        let o = bed.exec(host, &["ip", "addr", "add", addr, "dev", "eth0", "nodad"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let flags = ["--wireguard-ports", "52100-52199", "--wireguard-backend", "userspace"];
    let a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "fd00:12::11", &flags));
    let b = NodeProc::start_with(&registry.url(), "node-b", &node_args(&bed, "h2", "fd00:12::12", &flags));
    ok(nsmctl(
        &registry,
        &[
            "ns",
            "create",
            "orders6",
            "--cidr",
            "10.76.0.0/24",
            "--encryption",
            "required",
        ],
    ));
    endpoint_in(&registry, "ep6", "orders6", &path("svc"), "node-b");
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c6", "--service=orders6", "--endpoint=ep6"],
    ));
    let j = wait_client(&registry, &a, "c6", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["status"]["mechanism"], "WIREGUARD", "{j:#}\nnode-b log:\n{}", b.log());
    assert_eq!(
        j["status"]["mtu"], 1420,
        "underlay 1500 less 80 bytes of WireGuard over IPv6"
    );
    let dst = dst_of(&j);
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 3),
        "ping; node-a log:\n{}",
        a.log()
    );
    let o = bed.exec("pod", &["ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1392", &dst]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(tcp_transfer(&bed, &dst, 5206, 16 << 20), "16 MiB over TCP");
    // The tunnels' sockets are on the IPv6 underlay addresses, and nothing on IPv4 carries them.
    let h1 = udp_listeners(&bed, "h1");
    assert!(h1.contains("[fd00:12::11]:521"), "{h1}");
    let h2 = udp_listeners(&bed, "h2");
    assert!(h2.contains("[fd00:12::12]:521"), "{h2}");
    assert!(!h1.contains("192.0.2.11:521") && !h2.contains("192.0.2.12:521"));
    ok(nsmctl(&registry, &["delete", "client", "c6"]));
    drop((a, b));
    bed.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_node_without_wireguard() {
    let bed = two_hosts("wgno").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "192.0.2.11", &[]));
    let b = NodeProc::start_with(
        &registry.url(),
        "node-b",
        &node_args(&bed, "h2", "192.0.2.12", &["--no-wireguard"]),
    );
    ok(nsmctl(&registry, &["ns", "create", "orders", "--cidr", "10.72.0.0/24"]));
    endpoint_in(&registry, "ep", "orders", &path("svc"), "node-b");

    // required: Failed with the reason, nothing built on either side.
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &[
            "client",
            "create",
            "c1",
            "--service=orders",
            "--endpoint=ep",
            "--encryption",
            "required",
        ],
    ));
    let j = wait_client(&registry, &a, "c1", "Failed", |j| phase(j) == "Failed");
    let reason = j["status"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("encryption required") && reason.contains("WIREGUARD is disabled on node \"node-b\""),
        "{reason}"
    );
    let d = ok(nsmctl(&registry, &["describe", "client", "c1"]));
    assert!(d.contains("required"), "{d}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(link_names(&bed, "pod").await, ["lo"]);
    assert_eq!(link_names(&bed, "svc").await, ["lo"]);
    ok(nsmctl(&registry, &["delete", "client", "c1"]));

    // preferred: VXLAN instead.
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &[
            "client",
            "create",
            "c2",
            "--service=orders",
            "--endpoint=ep",
            "--encryption",
            "preferred",
        ],
    ));
    let j = wait_client(&registry, &a, "c2", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["status"]["mechanism"], "VXLAN", "{j:#}");
    assert_eq!(j["status"]["mtu"], 1450);
    assert!(bed.ping("pod", dst_of(&j).parse().unwrap(), 3));
    ok(nsmctl(&registry, &["delete", "client", "c2"]));
    assert!(
        eventually(5, || async {
            link_names(&bed, "pod").await == ["lo"] && link_names(&bed, "svc").await == ["lo"]
        })
        .await
    );
    drop((a, b));
    bed.down().await.unwrap();
}

/// The public key the node logged last for `what` ("WireGuard key rotated", "WireGuard peer key
/// changed", ...), from its `field=` value.
fn logged_key(log: &str, what: &str, field: &str) -> Option<String> {
    let field = format!(" {field}=");
    let line = log.lines().rev().find(|l| l.contains(what) && l.contains(&field))?;
    let at = line.find(&field)? + field.len();
    Some(line[at..].chars().take(44).collect())
}

/// `wg pubkey` of the private key in `file`.
fn wg_pubkey(file: &Path) -> String {
    let out = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg pubkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Rotates `node`'s key with SIGUSR1 and checks the key file (replaced, mode 0600, the logged key)
/// and that `peer` took the new key for its tunnel and both switched to it. Returns the new key.
async fn rotate_and_check(
    registry: &NsmRegistry,
    (name, node): (&str, &NodeProc),
    peer: &NodeProc,
    who: &str,
) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let file = node.data_dir().join("wireguard.key");
    let old_private = std::fs::read_to_string(&file).unwrap();
    let old_public = wg_pubkey(&file);
    let rotations = node.log().matches("WireGuard key rotated").count();
    node.signal(nix::sys::signal::Signal::SIGUSR1);
    assert!(
        eventually(5, || async {
            node.log().matches("WireGuard key rotated").count() > rotations
        })
        .await,
        "{who}: no rotation logged:\n{}",
        node.log()
    );
    let new_public = logged_key(&node.log(), "WireGuard key rotated", "public_key").unwrap();
    assert_ne!(new_public, old_public, "{who}");
    assert_ne!(
        std::fs::read_to_string(&file).unwrap(),
        old_private,
        "{who}: key file replaced"
    );
    assert_eq!(wg_pubkey(&file), new_public, "{who}: the file holds the key in use");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{who}");
    assert!(!node.data_dir().join("wireguard.key.tmp").exists());
    // The node's registration shows the new key (what tells the other nodes).
    let published = eventually(5, || async {
        nsmctl(registry, &["describe", "node", name])
            .1
            .contains(new_public.as_str())
    })
    .await;
    assert!(published, "{who}: describe node does not show {new_public}");
    // The peer's tunnel has the new key as its peer key, and both ends moved over to it.
    let peer_took = eventually(10, || async {
        logged_key(&peer.log(), "WireGuard peer key changed", "peer_public_key").as_deref() == Some(&new_public)
    })
    .await;
    assert!(peer_took, "{who}: peer's log:\n{}", peer.log());
    let switched = eventually(10, || async {
        logged_key(&node.log(), "key change complete", "public_key").as_deref() == Some(&new_public)
            && logged_key(&peer.log(), "key change complete", "peer").as_deref() == Some(&new_public)
    })
    .await;
    assert!(switched, "{who}: node log:\n{}\npeer log:\n{}", node.log(), peer.log());
    new_public
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_key_rotation_keeps_traffic() {
    let bed = two_hosts("wgrot").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    // The client's node resyncs only every 40 s: the endpoint's node's new key must reach it
    // through that node's registration (a node watch event), not through a periodic refresh.
    let a = NodeProc::start_with(
        &registry.url(),
        "node-a",
        &node_args(
            &bed,
            "h1",
            "192.0.2.11",
            &[
                "--wireguard-ports",
                "52100-52199",
                "--resync",
                "40s",
                "--wireguard-backend",
                "userspace",
            ],
        ),
    );
    let b = NodeProc::start_with(
        &registry.url(),
        "node-b",
        &node_args(
            &bed,
            "h2",
            "192.0.2.12",
            &["--wireguard-ports", "52100-52199", "--wireguard-backend", "userspace"],
        ),
    );
    let dst = encrypted_vwire(&bed, &registry, &a, "10.73.0.0/24");

    // Continuous traffic: 20 pings a second for 15 s, while first the client's node and then the
    // endpoint's node rotate their keys.
    let ping = std::process::Command::new("nsenter")
        .arg(format!("--net={}", path("pod")))
        .args(["ping", "-n", "-q", "-i", "0.05", "-W", "1", "-w", "15", &dst])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let ka = rotate_and_check(&registry, ("node-a", &a), &b, "client's node").await;
    eprintln!("client node rotation: switched {:?} after SIGUSR1", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let kb = rotate_and_check(&registry, ("node-b", &b), &a, "endpoint's node").await;
    eprintln!("endpoint node rotation: switched {:?} after SIGUSR1", t.elapsed());
    let out = tokio::task::spawn_blocking(move || ping.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stats = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("ping output: {text}"));
    let nums: Vec<u64> = stats
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let (sent, received) = (nums[0], nums[1]);
    eprintln!("ping across both rotations: {stats}");
    assert!(sent >= 200, "{stats}");
    assert!(
        sent - received <= 1,
        "at most one ping lost across two rotations: {stats}"
    );

    // The rotated keys are the ones a rebuilt end uses: the client's node restarts with its new key
    // file, and the endpoint's tunnel (whose peer key is that new key) accepts it.
    let mut a = a;
    a.kill9();
    a.launch();
    traffic_back(&bed, &dst, &a, "traffic after node-a restarted with its rotated key").await;
    assert_eq!(wg_pubkey(&a.data_dir().join("wireguard.key")), ka);
    assert_eq!(wg_pubkey(&b.data_dir().join("wireguard.key")), kb);

    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    assert!(
        eventually(5, || async {
            link_names(&bed, "pod").await == ["lo"] && link_names(&bed, "svc").await == ["lo"]
        })
        .await
    );
    drop((a, b));
    bed.down().await.unwrap();
}

/// UDP ports of WireGuard ends bound on `addr` in `ns` (within the test's 52200-52299 range).
fn lane_sockets(bed: &Testbed, ns: &str, addr: &str) -> usize {
    udp_listeners(bed, ns)
        .lines()
        .filter(|l| l.contains(&format!("{addr}:522")))
        .count()
}

/// Lanes: node-a runs 3 per vWire, node-b 2, so the vWire gets 2 (each a WireGuard session with a
/// UDP port of its own on both hosts). Many flows get through intact. The endpoint's node
/// restarts and its lanes carry traffic again; the client's node restarts with one lane and the
/// vWire moves to one lane on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_vwire_lanes() {
    let bed = two_hosts("wgl").await;
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let flags = |lanes| {
        vec![
            "--wireguard-ports",
            "52200-52299",
            "--wireguard-backend",
            "userspace",
            "--wireguard-lanes",
            lanes,
        ]
    };
    let mut a = NodeProc::start_with(
        &registry.url(),
        "node-a",
        &node_args(&bed, "h1", "192.0.2.11", &flags("3")),
    );
    let mut b = NodeProc::start_with(
        &registry.url(),
        "node-b",
        &node_args(&bed, "h2", "192.0.2.12", &flags("2")),
    );
    let dst = encrypted_vwire(&bed, &registry, &a, "10.73.0.0/24");
    assert_eq!(
        lane_sockets(&bed, "h1", "192.0.2.11"),
        2,
        "{}",
        udp_listeners(&bed, "h1")
    );
    assert_eq!(
        lane_sockets(&bed, "h2", "192.0.2.12"),
        2,
        "{}",
        udp_listeners(&bed, "h2")
    );
    let flows = |first: u16| (first..first + 12).all(|port| tcp_transfer(&bed, &dst, port, 1 << 20));
    assert!(flows(5300), "12 flows over two lanes");

    b.kill9();
    b.launch();
    traffic_back(&bed, &dst, &b, "traffic after node-b restarted").await;
    assert_eq!(
        lane_sockets(&bed, "h2", "192.0.2.12"),
        2,
        "{}",
        udp_listeners(&bed, "h2")
    );
    assert!(flows(5320), "12 flows after the endpoint's node restarted");

    a.kill9();
    a.set_arg("--wireguard-lanes", "1");
    a.launch();
    let one_each = eventually(15, || async {
        lane_sockets(&bed, "h1", "192.0.2.11") == 1 && lane_sockets(&bed, "h2", "192.0.2.12") == 1
    })
    .await;
    assert!(
        one_each,
        "{}{}\nnode-a log:\n{}",
        udp_listeners(&bed, "h1"),
        udp_listeners(&bed, "h2"),
        a.log()
    );
    traffic_back(&bed, &dst, &a, "traffic on one lane").await;
    assert!(flows(5340), "12 flows over one lane");
    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    let closed = eventually(5, || async {
        lane_sockets(&bed, "h1", "192.0.2.11") + lane_sockets(&bed, "h2", "192.0.2.12") == 0
    })
    .await;
    assert!(closed, "{}{}", udp_listeners(&bed, "h1"), udp_listeners(&bed, "h2"));
    drop((a, b));
    bed.down().await.unwrap();
}
