//! The vL3 delivery program on real kernel objects, as root: a "peer" namespace sends through a
//! "router" namespace to a "member" namespace, and the member's packets must skip the router's
//! veth end while the program holds the member, and take it again once it does not.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::Cleanup;
use nsm_dataplane::delivery::{Delivery, Member};
use nsm_dataplane::{NetNs, Netlink, set_ip_forwarding};

const MEMBER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Sends `n` datagrams from `from` to `addr` (received by a socket bound in `to`) with the given
/// TTL; returns how many arrived.
fn datagrams(from: &NetNs, to: &NetNs, addr: SocketAddr, n: usize, ttl: u32) -> usize {
    let rx = to.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let tx = from.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    tx.set_ttl(ttl).unwrap();
    for _ in 0..n {
        tx.send_to(b"nsm-delivery", addr).unwrap();
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while let Ok((len, _)) = rx.recv_from(&mut buf) {
        assert_eq!(&buf[..len], b"nsm-delivery");
        got += 1;
    }
    got
}

async fn tx_packets(nl: &Netlink, name: &str) -> u64 {
    nl.link(name).await.unwrap().unwrap().stats.tx_packets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_skips_the_routers_veth_end_and_falls_back() {
    let mut c = Cleanup::new();
    let (peer_name, peer) = c.netns();
    let (_, router) = c.netns();
    let (_, member) = c.netns();
    let np = Netlink::connect(&peer).await.unwrap();
    let nr = Netlink::connect(&router).await.unwrap();
    let nm = Netlink::connect(&member).await.unwrap();
    c.link(&router, "nsm-r0");
    c.link(&router, "nsm-rm");
    set_ip_forwarding(&router, true, false).unwrap();

    // peer 198.51.100.1 ── nsm-p0/nsm-r0 ── router ── nsm-rm/nsm-m0 ── member 203.0.113.10
    nr.create_veth("nsm-r0", "nsm-p0", &peer, 1500).await.unwrap();
    nr.create_veth("nsm-rm", "nsm-m0", &member, 1500).await.unwrap();
    for (nl, dev, addr) in [
        (&np, "nsm-p0", "198.51.100.1/24"),
        (&nr, "nsm-r0", "198.51.100.2/24"),
        (&nr, "nsm-rm", "203.0.113.1/32"),
        (&nm, "nsm-m0", "203.0.113.10/32"),
    ] {
        nl.add_address(dev, addr.parse().unwrap()).await.unwrap();
        nl.set_up(dev).await.unwrap();
    }
    nr.add_route("203.0.113.10/32".parse().unwrap(), None, "nsm-rm")
        .await
        .unwrap();
    nm.add_route("203.0.113.1/32".parse().unwrap(), None, "nsm-m0")
        .await
        .unwrap();
    nm.add_route(
        "0.0.0.0/0".parse().unwrap(),
        Some("203.0.113.1".parse().unwrap()),
        "nsm-m0",
    )
    .await
    .unwrap();
    np.add_route(
        "203.0.113.0/24".parse().unwrap(),
        Some("198.51.100.2".parse().unwrap()),
        "nsm-p0",
    )
    .await
    .unwrap();
    let addr = SocketAddr::new(IpAddr::V4(MEMBER), 7001);
    // Through the router's stack first: neighbours resolved, the path known to work.
    assert_eq!(datagrams(&peer, &member, addr, 3, 64), 3, "the routed path works");

    let mut d = Delivery::new().expect("the verifier accepts the program");
    let r0 = nr.link("nsm-r0").await.unwrap().unwrap();
    d.attach(&router, "nsm-r0", r0.index).await.unwrap();
    let rm = nr.link("nsm-rm").await.unwrap().unwrap();
    let m0 = nm.link("nsm-m0").await.unwrap().unwrap();
    let entry = Member {
        ifindex: rm.index,
        member_mac: m0.mac.clone().try_into().unwrap(),
        router_mac: rm.mac.clone().try_into().unwrap(),
    };
    d.set(MEMBER, entry).unwrap();
    assert_eq!(d.members().unwrap(), vec![(MEMBER, entry)]);
    assert_eq!(d.attached().collect::<Vec<_>>(), vec!["nsm-r0"]);

    // Delivered straight into the member: the router's end of its veth sends nothing. Arriving
    // at all proves the rewritten header's checksum (the member's stack drops bad ones).
    let before = tx_packets(&nr, "nsm-rm").await;
    assert_eq!(datagrams(&peer, &member, addr, 50, 64), 50);
    let skipped = tx_packets(&nr, "nsm-rm").await - before;
    assert!(
        skipped < 5,
        "{skipped} of 50 datagrams went through the router's veth end"
    );

    // A TTL that expires at the router is the router's to answer, not delivered.
    let ttl1 = std::process::Command::new("ip")
        .args(["netns", "exec", &peer_name, "ping", "-c", "1", "-W", "2", "-t", "1"])
        .arg(MEMBER.to_string())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ttl1.stdout);
    assert!(out.contains("Time to live exceeded"), "{out}");
    assert_eq!(datagrams(&peer, &member, addr, 5, 1), 0, "TTL 1 must not be delivered");

    // Without the entry, the router routes again.
    assert!(d.remove(MEMBER).unwrap());
    assert!(!d.remove(MEMBER).unwrap());
    let before = tx_packets(&nr, "nsm-rm").await;
    assert_eq!(datagrams(&peer, &member, addr, 50, 64), 50);
    assert!(tx_packets(&nr, "nsm-rm").await - before >= 50);

    // Detached when dropped: entries no longer matter.
    d.set(MEMBER, entry).unwrap();
    d.detach("nsm-r0");
    let before = tx_packets(&nr, "nsm-rm").await;
    assert_eq!(datagrams(&peer, &member, addr, 20, 64), 20);
    assert!(tx_packets(&nr, "nsm-rm").await - before >= 20);
    drop(d);
    c.finish();
}
