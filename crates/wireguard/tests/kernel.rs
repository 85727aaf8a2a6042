//! The kernel's WireGuard, created and configured by nsm-dataplane (rtnetlink + the `wireguard`
//! generic-netlink family), against one of our userspace tunnels: handshake and traffic both
//! ways, what `wg_get` reports, the UDP socket's namespace, a taken port, a key change on either
//! side. Needs root and a kernel with WireGuard, which this project's CI machine lacks:
//! `scripts/kernel-wg-test.sh` runs this test in a QEMU guest whose kernel has it, with
//! `NSM_TEST_KERNEL_WIREGUARD=1`, which makes a kernel without WireGuard a failure. Without
//! that variable, on a kernel without WireGuard, it checks that the refusal is recognised.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use ipnet::IpNet;
use nsm_dataplane::{Netlink, WgDeviceUpdate, WgPeerUpdate, wg_get, wg_set};
use nsm_wireguard::{PeerConfig, Tunnel, TunnelConfig, generate_private_key, public_key};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn kernel_wireguard_configured_by_nsm_talks_to_our_tunnel() {
    if skip() {
        return;
    }
    tracing();
    let rt = rt();
    let p = pair("kw", 72);
    let nl_a = rt.block_on(Netlink::connect(&p.a.ns)).unwrap();
    let supported = rt.block_on(nl_a.wireguard_supported()).unwrap();
    if !supported {
        assert!(
            std::env::var_os("NSM_TEST_KERNEL_WIREGUARD").is_none(),
            "NSM_TEST_KERNEL_WIREGUARD is set, but this kernel refuses links of kind wireguard"
        );
        // The probe leaves nothing behind, and configuring a link that is not there says so.
        let links = rt.block_on(nl_a.links()).unwrap();
        assert!(
            links.iter().all(|l| l.kind.as_deref() != Some("wireguard")),
            "{links:?}"
        );
        let e = rt
            .block_on(wg_set(&p.a.ns, "nowg0", WgDeviceUpdate::default()))
            .unwrap_err();
        assert!(e.to_string().contains("nowg0"), "{e}");
        eprintln!(
            "skipped the rest: this kernel has no WireGuard (scripts/kernel-wg-test.sh runs it in a guest that has)"
        );
        return;
    }

    // A: a kernel link in workload namespace `wa`, its UDP socket in A (the "host"). B: our
    // userspace tunnel, TUN and socket in B.
    let wa = Ns::new(format!("nwg-{}-w", tag("kw")));
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let (la, lb): (SocketAddr, SocketAddr) = (
        format!("{}:51820", p.a_ip).parse().unwrap(),
        format!("{}:51820", p.b_ip).parse().unwrap(),
    );
    rt.block_on(nl_a.create_wireguard_in(&wa.ns, "kwg0", 1420)).unwrap();
    let configure = WgDeviceUpdate {
        private_key: Some(ka),
        listen_port: Some(la.port()),
        replace_peers: true,
        peers: vec![WgPeerUpdate::new(public_key(&kb), lb, vec![net("10.172.0.2/32")])],
    };
    rt.block_on(wg_set(&wa.ns, "kwg0", configure.clone())).unwrap();
    wa.ok(&["ip", "addr", "add", "10.172.0.1/24", "dev", "kwg0"]);
    wa.ok(&["ip", "link", "set", "kwg0", "up"]);
    let nb = format!("w{}b", tag("kw"));
    let mut cb = TunnelConfig::new(
        &nb,
        lb,
        kb,
        PeerConfig {
            public_key: public_key(&ka),
            endpoint: Some(la),
            allowed_ips: vec![net("10.172.0.1/32")],
            keepalive: None,
            preshared_key: None,
        },
    );
    cb.tun_netns = Some(p.b.handle());
    cb.udp_netns = Some(p.b.handle());
    let tb = Tunnel::start(cb).unwrap();
    p.b.ok(&["ip", "addr", "add", "10.172.0.2/24", "dev", &nb]);
    p.b.ok(&["ip", "link", "set", &nb, "up"]);

    assert!(wa.ping("10.172.0.2", 10), "kernel -> userspace");
    assert!(p.b.ping("10.172.0.1", 5), "userspace -> kernel");
    tcp_transfer(&wa, &p.b, "10.172.0.2:5201".parse().unwrap(), 4 << 20);
    tcp_transfer(&p.b, &wa, "10.172.0.1:5202".parse().unwrap(), 4 << 20);

    let dev = rt.block_on(wg_get(&wa.ns, "kwg0")).unwrap();
    eprintln!("kernel device: port {} peers {:?}", dev.listen_port, dev.peers);
    assert_eq!(dev.public_key, Some(public_key(&ka)));
    assert_eq!(dev.listen_port, la.port());
    assert_eq!(dev.peers.len(), 1);
    let peer = &dev.peers[0];
    assert_eq!(peer.public_key, public_key(&kb));
    assert_eq!(peer.endpoint, Some(lb));
    assert_eq!(peer.allowed_ips, vec![net("10.172.0.2/32")]);
    assert!(peer.last_handshake.is_some());
    assert!(peer.rx_bytes > 4 << 20 && peer.tx_bytes > 4 << 20, "{peer:?}");
    assert!(tb.stats().handshakes >= 1);

    // The link's UDP socket is in A, where it was created, not in the workload namespace.
    let in_a = p.a.ns.run(move || UdpSocket::bind(la).map(drop)).unwrap();
    assert_eq!(
        in_a.unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse,
        "port taken in A"
    );
    // A second link (up: a link that is down binds no socket, and would only fail when brought
    // up) asking for the same port is told the port is taken.
    rt.block_on(nl_a.create_wireguard_in(&wa.ns, "kwg1", 1420)).unwrap();
    wa.ok(&["ip", "link", "set", "kwg1", "up"]);
    let e = rt
        .block_on(wg_set(
            &wa.ns,
            "kwg1",
            WgDeviceUpdate {
                listen_port: Some(la.port()),
                ..WgDeviceUpdate::default()
            },
        ))
        .unwrap_err();
    assert!(e.is_addr_in_use(), "{e}");
    let nl_wa = rt.block_on(Netlink::connect(&wa.ns)).unwrap();
    assert!(rt.block_on(nl_wa.delete_link("kwg1")).unwrap());

    // A changes its key; B learns the new public key; traffic resumes with a new handshake.
    let ka2 = generate_private_key();
    rt.block_on(wg_set(
        &wa.ns,
        "kwg0",
        WgDeviceUpdate {
            private_key: Some(ka2),
            ..WgDeviceUpdate::default()
        },
    ))
    .unwrap();
    tb.set_peer_public_key(public_key(&ka2));
    assert!(wa.ping("10.172.0.2", 10), "after A's key change");
    assert_eq!(
        rt.block_on(wg_get(&wa.ns, "kwg0")).unwrap().public_key,
        Some(public_key(&ka2))
    );

    // B changes its key; A swaps the peer (the kernel keys peers by public key).
    let kb2 = generate_private_key();
    tb.set_private_key(kb2);
    rt.block_on(wg_set(
        &wa.ns,
        "kwg0",
        WgDeviceUpdate {
            peers: vec![
                WgPeerUpdate::removal(public_key(&kb)),
                WgPeerUpdate::new(public_key(&kb2), lb, vec![net("10.172.0.2/32")]),
            ],
            ..WgDeviceUpdate::default()
        },
    ))
    .unwrap();
    assert!(wa.ping("10.172.0.2", 10), "after B's key change");
    let dev = rt.block_on(wg_get(&wa.ns, "kwg0")).unwrap();
    assert_eq!(
        dev.peers.iter().map(|p| p.public_key).collect::<Vec<_>>(),
        vec![public_key(&kb2)]
    );

    // Deleting the link closes its socket in A.
    assert!(rt.block_on(nl_wa.delete_link("kwg0")).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let in_a = p.a.ns.run(move || UdpSocket::bind(la).map(drop)).unwrap();
    assert!(in_a.is_ok(), "port free again: {in_a:?}");
    tb.stop();
}
