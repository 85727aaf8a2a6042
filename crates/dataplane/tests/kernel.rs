//! Real kernel objects, as root: namespaces, veth, VXLAN, addresses, routes, and traffic through them.
//! Only documentation and ULA ranges, only inside namespaces these tests create.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use common::Cleanup;
use ipnet::IpNet;
use nsm_dataplane::{DataplaneError, LinkInfo, NetNs, Netlink, set_ip_forwarding};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn link(nl: &Netlink, name: &str) -> LinkInfo {
    nl.link(name)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("link {name} missing in {}", nl.ns_path().display()))
}

/// Sends a UDP datagram from a socket opened in `from` to a socket bound in `to` on `dst`.
fn udp_roundtrip(from: &NetNs, to: &NetNs, dst: IpAddr, port: u16) {
    let addr = SocketAddr::new(dst, port);
    let rx = to
        .run(move || UdpSocket::bind(addr))
        .unwrap()
        .expect("bind udp in destination ns");
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let unspecified: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let tx = from
        .run(move || UdpSocket::bind(unspecified))
        .unwrap()
        .expect("bind udp in source ns");
    let mut buf = [0u8; 64];
    // ARP/ND may drop the very first datagram's predecessor queue; retry a few times.
    for _ in 0..5 {
        tx.send_to(b"nsm-hello", addr).expect("send udp");
        if let Ok((n, _)) = rx.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"nsm-hello");
            return;
        }
    }
    panic!("no UDP datagram arrived at {addr}");
}

/// TCP connect from `from` to a listener in `to`, echo one message back.
fn tcp_echo(from: &NetNs, to: &NetNs, dst: IpAddr, port: u16) {
    let addr = SocketAddr::new(dst, port);
    let listener = to
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .expect("listen in destination ns");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
    });
    let mut stream = from
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap()
        .expect("tcp connect from source ns");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"echo-me").unwrap();
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"echo-me");
    server.join().unwrap();
}

#[test]
fn netns_create_identity_delete() {
    let mut c = Cleanup::new();
    let (name, ns) = c.netns();
    assert_eq!(ns.path(), Path::new("/run/netns").join(&name));

    // The same namespace through another path and from inside: same identity.
    let again = NetNs::open_named(&name).unwrap();
    assert_eq!(ns.inode().unwrap(), again.inode().unwrap());
    let inside = ns.run(|| NetNs::current().unwrap().inode().unwrap()).unwrap();
    assert_eq!(inside, ns.inode().unwrap());
    // …and not the caller's.
    assert_ne!(NetNs::current().unwrap().inode().unwrap(), ns.inode().unwrap());

    // `ip netns` sees it too (iproute2 reads the same directory).
    let listed = std::fs::read_dir("/run/netns")
        .unwrap()
        .any(|e| e.unwrap().file_name() == name.as_str());
    assert!(listed);

    // Creating it twice is a clear error and leaves the first intact.
    let err = NetNs::create(&name).unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    assert_eq!(NetNs::open_named(&name).unwrap().inode().unwrap(), ns.inode().unwrap());

    drop((ns, again));
    NetNs::delete(&name).unwrap();
    let err = NetNs::delete(&name).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().starts_with("delete netns /run/netns/"), "{err}");
    c.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_netns_has_only_lo_and_it_is_up() {
    let mut c = Cleanup::new();
    let (_, ns) = c.netns();
    let nl = Netlink::connect(&ns).await.unwrap();
    let links = nl.links().await.unwrap();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].name, "lo");
    assert!(links[0].up);
    // Loopback works inside.
    udp_roundtrip(&ns, &ns, ip("127.0.0.1"), 9100);
    drop(nl);
    c.finish();
}

#[test]
fn open_rejects_what_is_not_a_netns() {
    let err = NetNs::open(Path::new("/etc/hostname")).unwrap_err();
    assert!(matches!(err, DataplaneError::NotANetns { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/etc/hostname is not a network namespace (not an nsfs file)"
    );

    let err = NetNs::open(Path::new("/proc/self/ns/mnt")).unwrap_err();
    assert!(
        err.to_string().contains("is not a network namespace (a mnt namespace)"),
        "{err}"
    );

    let err = NetNs::open(Path::new("/run/netns/nsmt-does-not-exist")).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        err.to_string()
            .starts_with("open netns /run/netns/nsmt-does-not-exist: "),
        "{err}"
    );

    let err = NetNs::delete("nsmt-does-not-exist").unwrap_err();
    assert!(err.is_not_found(), "{err}");

    for bad in ["", "..", "a/b"] {
        assert!(
            matches!(NetNs::create(bad), Err(DataplaneError::InvalidArgument { .. })),
            "{bad:?}"
        );
    }
    // /proc/PID/ns/net is accepted.
    NetNs::open(Path::new(&format!("/proc/{}/ns/net", std::process::id()))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_pair_carries_ipv4_and_ipv6_traffic() {
    let mut c = Cleanup::new();
    let (_, a) = c.netns();
    let (_, b) = c.netns();
    let na = Netlink::connect(&a).await.unwrap();
    let nb = Netlink::connect(&b).await.unwrap();
    c.link(&a, "nsm-a0");

    na.create_veth("nsm-a0", "nsm-b0", &b, 1400).await.unwrap();
    // Each end is where it belongs from the start, down, with the MTU asked for.
    let la = link(&na, "nsm-a0").await;
    let lb = link(&nb, "nsm-b0").await;
    assert!(na.link("nsm-b0").await.unwrap().is_none());
    assert!(nb.link("nsm-a0").await.unwrap().is_none());
    assert_eq!((la.kind.as_deref(), lb.kind.as_deref()), (Some("veth"), Some("veth")));
    assert_eq!((la.mtu, lb.mtu), (1400, 1400));
    assert!(!la.up && !lb.up);

    // A duplicate is a clear error naming the object, the operation and the namespace.
    let err = na.create_veth("nsm-a0", "nsm-b1", &b, 1400).await.unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("create veth nsm-a0/nsm-b1 (peer in /run/netns/"),
        "{msg}"
    );
    assert!(msg.ends_with("File exists (os error 17)"), "{msg}");

    na.set_mtu("nsm-a0", 1500).await.unwrap();
    nb.set_mtu("nsm-b0", 1500).await.unwrap();
    assert_eq!(link(&na, "nsm-a0").await.mtu, 1500);

    for (nl, dev, own, peer) in [
        (&na, "nsm-a0", "192.0.2.1/32", "192.0.2.2/32"),
        (&nb, "nsm-b0", "192.0.2.2/32", "192.0.2.1/32"),
        (&na, "nsm-a0", "fd00:2::1/128", "fd00:2::2/128"),
        (&nb, "nsm-b0", "fd00:2::2/128", "fd00:2::1/128"),
    ] {
        nl.add_address(dev, net(own)).await.unwrap();
        nl.add_address(dev, net(own)).await.unwrap(); // idempotent
        nl.set_up(dev).await.unwrap();
        nl.add_route(net(peer), None, dev).await.unwrap();
        nl.add_route(net(peer), None, dev).await.unwrap(); // idempotent
    }
    // A route through a gateway, reachable over the /32 link route.
    na.add_route(net("203.0.113.0/24"), Some(ip("192.0.2.2")), "nsm-a0")
        .await
        .unwrap();
    na.add_route(net("203.0.113.0/24"), Some(ip("192.0.2.2")), "nsm-a0")
        .await
        .unwrap();

    let addrs = na.addresses("nsm-a0").await.unwrap();
    assert_eq!(
        addrs.iter().filter(|a| **a == net("192.0.2.1/32")).count(),
        1,
        "{addrs:?}"
    );
    assert_eq!(
        addrs.iter().filter(|a| **a == net("fd00:2::1/128")).count(),
        1,
        "{addrs:?}"
    );
    let routes = na.routes().await.unwrap();
    let has = |dst: &str, gw: Option<&str>| {
        routes
            .iter()
            .filter(|r| r.dst == net(dst) && r.gateway == gw.map(ip) && r.dev.as_deref() == Some("nsm-a0"))
            .count()
    };
    assert_eq!(has("192.0.2.2/32", None), 1, "{routes:?}");
    assert_eq!(has("fd00:2::2/128", None), 1, "{routes:?}");
    assert_eq!(has("203.0.113.0/24", Some("192.0.2.2")), 1, "{routes:?}");

    let before_a = link(&na, "nsm-a0").await.stats;
    let before_b = link(&nb, "nsm-b0").await.stats;
    assert!(link(&na, "nsm-a0").await.lower_up);

    udp_roundtrip(&a, &b, ip("192.0.2.2"), 9000);
    udp_roundtrip(&a, &b, ip("fd00:2::2"), 9000);
    tcp_echo(&a, &b, ip("192.0.2.2"), 9001);
    tcp_echo(&b, &a, ip("fd00:2::1"), 9001);

    let after_a = link(&na, "nsm-a0").await.stats;
    let after_b = link(&nb, "nsm-b0").await.stats;
    assert!(
        after_a.tx_packets >= before_a.tx_packets + 4,
        "{before_a:?} -> {after_a:?}"
    );
    assert!(after_a.tx_bytes > before_a.tx_bytes);
    assert!(
        after_b.rx_packets >= before_b.rx_packets + 4,
        "{before_b:?} -> {after_b:?}"
    );
    assert!(after_b.rx_bytes > before_b.rx_bytes);

    // Deleting a route or an address twice: the second time reports that nothing was there.
    assert!(na.delete_route(net("203.0.113.0/24")).await.unwrap());
    assert!(!na.delete_route(net("203.0.113.0/24")).await.unwrap());
    assert!(na.delete_address("nsm-a0", net("fd00:2::1/128")).await.unwrap());
    assert!(!na.delete_address("nsm-a0", net("fd00:2::1/128")).await.unwrap());
    assert!(!na.addresses("nsm-a0").await.unwrap().contains(&net("fd00:2::1/128")));

    // Deleting one end removes both; deleting again reports that nothing was there.
    assert!(na.delete_link("nsm-a0").await.unwrap());
    assert!(nb.link("nsm-b0").await.unwrap().is_none());
    assert!(!na.delete_link("nsm-a0").await.unwrap());
    drop((na, nb));
    c.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_between_two_hosts_carries_workload_traffic() {
    let mut c = Cleanup::new();
    let (_, h1) = c.netns();
    let (_, h2) = c.netns();
    let (_, w1) = c.netns();
    let (_, w2) = c.netns();
    let (n1, n2) = (
        Netlink::connect(&h1).await.unwrap(),
        Netlink::connect(&h2).await.unwrap(),
    );
    let (nw1, nw2) = (
        Netlink::connect(&w1).await.unwrap(),
        Netlink::connect(&w2).await.unwrap(),
    );

    // Underlay: one veth between the two hosts, IPv4 and IPv6.
    c.link(&h1, "u1");
    n1.create_veth("u1", "u2", &h2, 1500).await.unwrap();
    for (nl, dev, v4, v6) in [
        (&n1, "u1", "198.51.100.1/24", "fd00:100::1/64"),
        (&n2, "u2", "198.51.100.2/24", "fd00:100::2/64"),
    ] {
        nl.add_address(dev, net(v4)).await.unwrap();
        nl.add_address(dev, net(v6)).await.unwrap();
        nl.set_up(dev).await.unwrap();
    }

    // One VXLAN over IPv4 and one over IPv6, each created on its host, then moved into the workload.
    let tunnels = [
        (
            100,
            "vx4",
            "198.51.100.1",
            "198.51.100.2",
            "203.0.113.1/24",
            "203.0.113.2/24",
        ),
        (
            101,
            "vx6",
            "fd00:100::1",
            "fd00:100::2",
            "fd00:203::1/64",
            "fd00:203::2/64",
        ),
    ];
    for (vni, name, l, r, a1, a2) in tunnels {
        c.link(&h1, name);
        c.link(&h2, name);
        c.link(&w1, name);
        c.link(&w2, name);
        n1.create_vxlan(name, vni, ip(l), ip(r), 4789, 1400).await.unwrap();
        n2.create_vxlan(name, vni, ip(r), ip(l), 4789, 1400).await.unwrap();
        let made = link(&n1, name).await;
        assert_eq!((made.kind.as_deref(), made.mtu, made.up), (Some("vxlan"), 1400, false));
        n1.move_to(name, &w1).await.unwrap();
        n2.move_to(name, &w2).await.unwrap();
        assert!(n1.link(name).await.unwrap().is_none());
        assert_eq!(link(&nw1, name).await.kind.as_deref(), Some("vxlan"));
        nw1.add_address(name, net(a1)).await.unwrap();
        nw2.add_address(name, net(a2)).await.unwrap();
        nw1.set_up(name).await.unwrap();
        nw2.set_up(name).await.unwrap();
    }

    let under_before = link(&n1, "u1").await.stats;
    let vx_before = link(&nw1, "vx4").await.stats;
    udp_roundtrip(&w1, &w2, ip("203.0.113.2"), 9000);
    tcp_echo(&w1, &w2, ip("203.0.113.2"), 9001);
    udp_roundtrip(&w2, &w1, ip("fd00:203::1"), 9000);
    tcp_echo(&w2, &w1, ip("fd00:203::1"), 9001);
    let under_after = link(&n1, "u1").await.stats;
    let vx_after = link(&nw1, "vx4").await.stats;
    assert!(
        vx_after.tx_packets > vx_before.tx_packets,
        "{vx_before:?} -> {vx_after:?}"
    );
    assert!(
        vx_after.rx_packets > vx_before.rx_packets,
        "{vx_before:?} -> {vx_after:?}"
    );
    // The encapsulated packets went over the underlay of the hosts, not anywhere else.
    assert!(under_after.tx_packets >= under_before.tx_packets + vx_after.tx_packets - vx_before.tx_packets);
    assert!(under_after.tx_bytes > under_before.tx_bytes);

    drop((n1, n2, nw1, nw2));
    c.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_object_and_the_operation() {
    let mut c = Cleanup::new();
    let (name, ns) = c.netns();
    let nl = Netlink::connect(&ns).await.unwrap();

    let err = nl.set_up("nsm-missing").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(
        err.to_string(),
        format!("set up link nsm-missing in /run/netns/{name}: no such link")
    );
    assert!(nl.link("nsm-missing").await.unwrap().is_none());
    assert!(!nl.delete_link("nsm-missing").await.unwrap());

    let err = nl
        .create_vxlan("vx0", 5, ip("192.0.2.1"), ip("fd00::2"), 4789, 1450)
        .await
        .unwrap_err();
    assert!(matches!(err, DataplaneError::InvalidArgument { .. }), "{err:?}");
    let err = nl
        .create_vxlan("vx0", 1 << 24, ip("192.0.2.1"), ip("192.0.2.2"), 4789, 1450)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("24 bits"), "{err}");
    let err = nl.create_veth("a-name-far-too-long", "p", &ns, 1500).await.unwrap_err();
    assert!(err.to_string().contains("not a valid link name"), "{err}");

    // The kernel's own refusal comes back with its errno: an MTU below the minimum.
    c.link(&ns, "v0");
    nl.create_veth("v0", "v1", &ns, 1500).await.unwrap();
    let err = nl.set_mtu("v0", 10).await.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(22), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("set mtu of link v0 to 10 in /run/netns/{name}: ")),
        "{err}"
    );

    // A gateway that is not reachable is refused by the kernel.
    let err = nl
        .add_route(net("198.51.100.0/24"), Some(ip("192.0.2.99")), "v0")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("add route 198.51.100.0/24 via 192.0.2.99 dev v0 in "),
        "{err}"
    );
    drop(nl);
    c.finish();
}

#[test]
fn ip_forwarding_is_set_inside_the_namespace_only() {
    let mut c = Cleanup::new();
    let (_, ns) = c.netns();
    let read = |f: &'static str| std::fs::read_to_string(f).unwrap().trim().to_string();
    let root_v4 = read("/proc/sys/net/ipv4/ip_forward");
    let inside = |ns: &NetNs| {
        ns.run(move || {
            (
                read("/proc/sys/net/ipv4/ip_forward"),
                read("/proc/sys/net/ipv6/conf/all/forwarding"),
            )
        })
        .unwrap()
    };
    assert_eq!(inside(&ns), ("0".to_string(), "0".to_string()));
    set_ip_forwarding(&ns, true, true).unwrap();
    assert_eq!(inside(&ns), ("1".to_string(), "1".to_string()));
    set_ip_forwarding(&ns, true, false).unwrap();
    assert_eq!(inside(&ns), ("1".to_string(), "0".to_string()));
    assert_eq!(read("/proc/sys/net/ipv4/ip_forward"), root_v4);
    c.finish();
}

#[test]
fn cleanup_guard_deletes_namespaces_when_a_test_panics() {
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = names.clone();
    let result = std::panic::catch_unwind(move || {
        let mut c = Cleanup::new();
        let (n1, _a) = c.netns();
        let (n2, _b) = c.netns();
        seen.lock().unwrap().extend([n1, n2]);
        panic!("on purpose");
    });
    assert!(result.is_err());
    let names = names.lock().unwrap();
    assert_eq!(names.len(), 2);
    for n in names.iter() {
        assert!(!nsm_dataplane::named_path(n).exists(), "{n} left behind");
    }
}

#[test]
fn run_resumes_a_panic_of_the_closure() {
    let ns = NetNs::current().unwrap();
    let r = std::panic::catch_unwind(|| ns.run(|| panic!("inner")).ok());
    assert!(r.is_err());
}

/// A gateway namespace masquerades one (source, destination) pair: the destination sees the
/// gateway's address, answers it, and the answer reaches the source; the pair comes and goes
/// without disturbing the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masquerade_pair_through_a_gateway() {
    let mut c = Cleanup::new();
    let (_, client) = c.netns();
    let (_, gw) = c.netns();
    let (_, server) = c.netns();
    let cnl = Netlink::connect(&client).await.unwrap();
    let gnl = Netlink::connect(&gw).await.unwrap();
    let snl = Netlink::connect(&server).await.unwrap();
    cnl.create_veth("c0", "g0", &gw, 1500).await.unwrap();
    snl.create_veth("s0", "g1", &gw, 1500).await.unwrap();
    cnl.add_address("c0", net("10.9.0.1/24")).await.unwrap();
    gnl.add_address("g0", net("10.9.0.2/24")).await.unwrap();
    gnl.add_address("g1", net("192.0.2.1/24")).await.unwrap();
    snl.add_address("s0", net("192.0.2.5/24")).await.unwrap();
    for (nl, l) in [(&cnl, "c0"), (&gnl, "g0"), (&gnl, "g1"), (&snl, "s0")] {
        nl.set_up(l).await.unwrap();
    }
    cnl.add_route(net("192.0.2.5/32"), Some(ip("10.9.0.2")), "c0")
        .await
        .unwrap();
    set_ip_forwarding(&gw, true, false).unwrap();

    nsm_dataplane::ensure_masquerade(&gw).await.unwrap();
    nsm_dataplane::add_masquerade(&gw, ip("10.9.0.1"), ip("192.0.2.5"))
        .await
        .unwrap();
    // Idempotent: a restarted daemon re-asserts both.
    nsm_dataplane::ensure_masquerade(&gw).await.unwrap();
    nsm_dataplane::add_masquerade(&gw, ip("10.9.0.1"), ip("192.0.2.5"))
        .await
        .unwrap();

    // The server sees the gateway's address, not the client's.
    let rx = server.run(|| UdpSocket::bind("192.0.2.5:9400")).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = client.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let mut buf = [0u8; 16];
    let mut from = None;
    for _ in 0..5 {
        tx.send_to(b"hi", "192.0.2.5:9400").unwrap();
        if let Ok((_, f)) = rx.recv_from(&mut buf) {
            from = Some(f.ip());
            break;
        }
    }
    assert_eq!(from, Some(ip("192.0.2.1")), "masqueraded source");
    // And it can answer: a TCP exchange completes through the NAT.
    tcp_echo(&client, &server, ip("192.0.2.5"), 9401);

    assert!(
        nsm_dataplane::remove_masquerade(&gw, ip("10.9.0.1"), ip("192.0.2.5"))
            .await
            .unwrap()
    );
    assert!(
        !nsm_dataplane::remove_masquerade(&gw, ip("10.9.0.1"), ip("192.0.2.5"))
            .await
            .unwrap()
    );
    let mixed = nsm_dataplane::add_masquerade(&gw, ip("10.9.0.1"), ip("2001:db8::1")).await;
    assert!(
        matches!(mixed, Err(DataplaneError::InvalidArgument { .. })),
        "{mixed:?}"
    );
    drop((cnl, gnl, snl));
    c.finish();
}
