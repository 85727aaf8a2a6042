//! WIREGUARD vWires on the kernel's WireGuard, as root: two "hosts" of the test bed, a node daemon
//! on each with `--wireguard-backend kernel`, a pod on one and an endpoint on the other. Both ends
//! are `wireguard` links (no TUN, nothing served by the daemons); traffic; a restarted daemon adopts
//! its link with the session (same link, no new handshake needed); a key rotation; the endpoint's
//! node restarted as a userspace node (its end becomes a TUN, talking to the kernel end); deletion;
//! a link of the interface's name that nsm did not create is left alone; an end a dead daemon left
//! for a deleted client is removed by the restarted one after `--remote-lifetime`, port and all.
//!
//! This machine's kernel has no WireGuard, so `scripts/kernel-wg-test.sh` runs this test in a QEMU
//! guest whose kernel has it, with `NSM_TEST_KERNEL_WIREGUARD=1`. Elsewhere, on a kernel without
//! WireGuard, the test checks that `--wireguard-backend kernel` refuses to start, saying why.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::*;
use nsm_testing::NsmRegistry;

async fn link_kind(bed: &nsm_testbed::Testbed, ns: &str, name: &str) -> Option<String> {
    let nl = nsm_dataplane::Netlink::connect(bed.ns(ns)).await.unwrap();
    nl.link(name).await.unwrap().and_then(|l| l.kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_vwire_on_kernel_wireguard() {
    let bed = two_hosts("kwg").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let nl = nsm_dataplane::Netlink::connect(bed.ns("h1")).await.unwrap();
    if !nl.wireguard_supported().await.unwrap() {
        assert!(
            std::env::var_os("NSM_TEST_KERNEL_WIREGUARD").is_none(),
            "NSM_TEST_KERNEL_WIREGUARD is set, but this kernel refuses links of kind wireguard"
        );
        // Asked for the kernel's WireGuard on a kernel without: the daemon stops at once, saying why.
        let mut a = NodeProc::start_with(
            &registry.url(),
            "node-a",
            &node_args(&bed, "h1", "192.0.2.11", &["--wireguard-backend", "kernel"]),
        );
        let stopped = eventually(10, || async { a.log().contains("has no WireGuard") }).await;
        assert!(stopped, "log:\n{}", a.log());
        a.kill9();
        eprintln!(
            "skipped the rest: this kernel has no WireGuard (scripts/kernel-wg-test.sh runs it in a guest that has)"
        );
        drop(registry);
        bed.down().await.unwrap();
        return;
    }
    let args = |host: &str, addr: &str| {
        node_args(
            &bed,
            host,
            addr,
            &[
                "--wireguard-ports",
                "52000-52099",
                "--wireguard-backend",
                "kernel",
                // The defaults, given so that the end of the test can shorten them.
                "--resync",
                "30s",
                "--remote-lifetime",
                "120s",
            ],
        )
    };
    let mut a = NodeProc::start_with(&registry.url(), "node-a", &args("h1", "192.0.2.11"));
    let mut b = NodeProc::start_with(&registry.url(), "node-b", &args("h2", "192.0.2.12"));
    ok(nsmctl(
        &registry,
        &[
            "ns",
            "create",
            "orders",
            "--cidr",
            "10.73.0.0/24",
            "--encryption",
            "required",
        ],
    ));
    let d = describe_node(&registry, &a, "node-a");
    assert!(
        d.lines()
            .any(|l| l.contains("WireGuard backend") && l.contains("kernel")),
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
    let j = wait_client_for(&registry, &[&a, &b], "c1", "Ready", 60, |j| phase(j) == "Ready");
    eprintln!("kernel WIREGUARD client create -> Ready in {:?}", t0.elapsed());
    assert_eq!(j["status"]["mechanism"], "WIREGUARD", "{j:#}");
    assert_eq!(j["status"]["mtu"], 1420);
    let dst = dst_of(&j);
    assert!(
        bed.ping("pod", dst.parse().unwrap(), 5),
        "ping; logs:\n{}\n{}",
        a.log(),
        b.log()
    );

    // Both ends are kernel links; the daemons serve no tunnel. The pod's link was created from
    // h1, so its UDP socket is there: the port is taken in h1.
    assert_eq!(link_kind(&bed, "pod", "nsm-1").await.as_deref(), Some("wireguard"));
    let svc_links = link_names(&bed, "svc").await;
    assert_eq!(svc_links.len(), 2, "lo and the endpoint's end: {svc_links:?}");
    assert_eq!(
        link_kind(&bed, "svc", &svc_links[1]).await.as_deref(),
        Some("wireguard")
    );
    let dev = nsm_dataplane::wg_get(bed.ns("pod"), "nsm-1").await.unwrap();
    assert_eq!(dev.peers.len(), 1);
    assert!(dev.peers[0].last_handshake.is_some(), "{dev:?}");
    assert!((52000..=52099).contains(&dev.listen_port), "{dev:?}");
    let port = dev.listen_port;
    let taken = bed
        .ns("h1")
        .run(move || std::net::UdpSocket::bind(("192.0.2.11", port)).map(drop))
        .unwrap();
    assert_eq!(taken.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    let o = bed.exec("pod", &["ping", "-c", "2", "-W", "2", "-s", "1392", &dst]);
    assert!(
        o.status.success(),
        "full-size packets: {}",
        String::from_utf8_lossy(&o.stdout)
    );

    // The client's node restarts: the link outlives it, and the new daemon adopts it with its
    // session (same interface, the handshake of before still current).
    let index = link_index(&bed, "pod", "nsm-1").await;
    let handshake = dev.peers[0].last_handshake;
    a.kill9();
    assert!(bed.ping("pod", dst.parse().unwrap(), 3), "traffic while node-a is down");
    a.launch();
    let adopted = eventually(60, || async { a.log().contains("kept the kernel WireGuard link") }).await;
    assert!(adopted, "log:\n{}", a.log());
    assert_eq!(link_index(&bed, "pod", "nsm-1").await, index, "the same link");
    let dev = nsm_dataplane::wg_get(bed.ns("pod"), "nsm-1").await.unwrap();
    assert_eq!(dev.peers[0].last_handshake, handshake, "no new handshake: {dev:?}");
    assert!(bed.ping("pod", dst.parse().unwrap(), 3));

    // Key rotation on node-a (SIGUSR1): the kernel drops its sessions, node-b learns the new key
    // through the refresh the rotation triggers, a new handshake follows.
    let before = dev.public_key;
    a.signal(nix::sys::signal::Signal::SIGUSR1);
    let rotated = eventually(60, || async {
        nsm_dataplane::wg_get(bed.ns("pod"), "nsm-1")
            .await
            .is_ok_and(|d| d.public_key != before)
    })
    .await;
    assert!(rotated, "log:\n{}", a.log());
    let t = Instant::now();
    let back = eventually(60, || async { bed.ping("pod", dst.parse().unwrap(), 1) }).await;
    assert!(back, "traffic after the rotation; logs:\n{}\n{}", a.log(), b.log());
    eprintln!(
        "kernel link key rotation: traffic back {:?} after the new key was set",
        t.elapsed()
    );

    // node-b restarts as a userspace node: its end becomes a TUN in place of the kernel link (the
    // name is the end's own), and node-a's kernel end talks to it.
    b.kill9();
    b.set_arg("--wireguard-backend", "userspace");
    b.launch();
    let t = Instant::now();
    let tun = eventually(60, || async {
        link_kind(&bed, "svc", &svc_links[1]).await.as_deref() == Some("tun")
    })
    .await;
    assert!(tun, "node-b log:\n{}", b.log());
    let back = eventually(60, || async { bed.ping("pod", dst.parse().unwrap(), 1) }).await;
    assert!(back, "kernel end to userspace end; logs:\n{}\n{}", a.log(), b.log());
    eprintln!(
        "endpoint node back as userspace: traffic {:?} after launch",
        t.elapsed()
    );
    let o = bed.exec("pod", &["ping", "-c", "2", "-W", "2", "-s", "1392", &dst]);
    assert!(
        o.status.success(),
        "full-size packets: {}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Delete: both ends go, and with them their sockets.
    ok(nsmctl(&registry, &["delete", "client", "c1"]));
    let gone = eventually(30, || async {
        link_names(&bed, "pod").await == ["lo"] && link_names(&bed, "svc").await == ["lo"]
    })
    .await;
    assert!(
        gone,
        "pod {:?} svc {:?}",
        link_names(&bed, "pod").await,
        link_names(&bed, "svc").await
    );
    let free = bed
        .ns("h1")
        .run(move || std::net::UdpSocket::bind(("192.0.2.11", port)).map(drop))
        .unwrap();
    assert!(free.is_ok(), "{free:?}");

    // A link of the client's interface name that nsm did not create (no nsm alias) is neither
    // adopted nor deleted: the client fails, saying so, and the link stays.
    let o = bed.exec("pod", &["ip", "link", "add", "nsm-1", "type", "wireguard"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c2", "--service=orders", "--endpoint=ep"],
    ));
    let j = wait_client_for(&registry, &[&a, &b], "c2", "the refusal", 60, |j| {
        j["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not create"))
    });
    assert_ne!(phase(&j), "Ready", "{j:#}");
    assert_eq!(link_kind(&bed, "pod", "nsm-1").await.as_deref(), Some("wireguard"));
    ok(nsmctl(&registry, &["delete", "client", "c2"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        link_kind(&bed, "pod", "nsm-1").await.as_deref(),
        Some("wireguard"),
        "left alone"
    );
    assert!(bed.exec("pod", &["ip", "link", "del", "nsm-1"]).status.success());

    // A kernel end an earlier daemon left: node-b (kernel again) builds c3's end and dies; c3 is
    // deleted meanwhile, so no one closes the end or asks for it again. The restarted node-b
    // finds the link and removes it after --remote-lifetime, and its UDP port is free again.
    b.kill9();
    b.set_arg("--wireguard-backend", "kernel");
    b.launch();
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c3", "--service=orders", "--endpoint=ep"],
    ));
    wait_client_for(&registry, &[&a, &b], "c3", "Ready", 60, |j| phase(j) == "Ready");
    let svc_end = link_names(&bed, "svc").await.into_iter().find(|l| l != "lo").unwrap();
    assert_eq!(link_kind(&bed, "svc", &svc_end).await.as_deref(), Some("wireguard"));
    let b_port = nsm_dataplane::wg_get(bed.ns("svc"), &svc_end)
        .await
        .unwrap()
        .listen_port;
    b.kill9();
    ok(nsmctl(&registry, &["delete", "client", "c3"]));
    assert!(eventually(30, || async { link_names(&bed, "pod").await == ["lo"] }).await);
    b.set_arg("--resync", "4s");
    b.set_arg("--remote-lifetime", "10s");
    b.launch();
    let swept = eventually(90, || async { link_names(&bed, "svc").await == ["lo"] }).await;
    assert!(swept, "node-b log:\n{}", b.log());
    assert!(b.log().contains("removed a vWire end an earlier daemon left"));
    let free = bed
        .ns("h2")
        .run(move || std::net::UdpSocket::bind(("192.0.2.12", b_port)).map(drop))
        .unwrap();
    assert!(free.is_ok(), "{free:?}");
    drop((a, b));
    bed.down().await.unwrap();
}
