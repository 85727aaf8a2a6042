//! The vL3 fast path on real kernel objects, as root. A "peer" namespace stands for the peer
//! router beyond a router's peer link, a "member" namespace for a member behind its veth pair:
//!
//! ```text
//! peer 198.51.100.1 (+ 192.0.2.5, "a remote member") ── nsm-p0/nsm-r0 ── router ── nsm-rm/nsm-m0 ── member 203.0.113.10
//! ```
//!
//! Traffic must cross the router without being forwarded by its stack exactly while the tables
//! say so, and take the stack again as soon as they do not.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::Cleanup;
use nsm_dataplane::fastpath::{Direction, FastPath, LinkMacs, Member, PeerPrefix};
use nsm_dataplane::{NetNs, Netlink, ipv4_forwarded, set_ip_forwarding};

const MEMBER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);
const PEER_GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// Sends `n` datagrams from `from` to `addr` (received by a socket bound in `to`) with the given
/// TTL; returns how many arrived.
fn datagrams(from: &NetNs, to: &NetNs, addr: SocketAddr, n: usize, ttl: u32) -> usize {
    let rx = to.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let tx = from.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    tx.set_ttl(ttl).unwrap();
    for _ in 0..n {
        tx.send_to(b"nsm-fastpath", addr).unwrap();
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while let Ok((len, _)) = rx.recv_from(&mut buf) {
        assert_eq!(&buf[..len], b"nsm-fastpath");
        got += 1;
    }
    got
}

/// How many of `n` datagrams from `from` to `addr` arrived, and how many the router forwarded.
fn through(router: &NetNs, from: &NetNs, to: &NetNs, addr: SocketAddr, n: usize) -> (usize, u64) {
    let before = ipv4_forwarded(router).unwrap();
    let got = datagrams(from, to, addr, n, 64);
    (got, ipv4_forwarded(router).unwrap() - before)
}

/// The three namespaces, wired and routed through the router's stack.
struct Bed {
    peer_name: String,
    router_name: String,
    member_name: String,
    peer: NetNs,
    router: NetNs,
    member: NetNs,
    np: Netlink,
    nr: Netlink,
    nm: Netlink,
}

async fn bed(c: &mut Cleanup) -> Bed {
    let (peer_name, peer) = c.netns();
    let (router_name, router) = c.netns();
    let (member_name, member) = c.netns();
    let np = Netlink::connect(&peer).await.unwrap();
    let nr = Netlink::connect(&router).await.unwrap();
    let nm = Netlink::connect(&member).await.unwrap();
    c.link(&router, "nsm-r0");
    c.link(&router, "nsm-rm");
    set_ip_forwarding(&router, true, false).unwrap();

    nr.create_veth("nsm-r0", "nsm-p0", &peer, 1500).await.unwrap();
    nr.create_veth("nsm-rm", "nsm-m0", &member, 1500).await.unwrap();
    for (nl, dev, addr) in [
        (&np, "nsm-p0", "198.51.100.1/24"),
        (&np, "lo", "192.0.2.5/32"),
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
    nr.add_route("192.0.2.0/24".parse().unwrap(), Some(IpAddr::V4(PEER_GW)), "nsm-r0")
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
    Bed {
        peer_name,
        router_name,
        member_name,
        peer,
        router,
        member,
        np,
        nr,
        nm,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_both_ways_and_back_to_the_stack() {
    let mut c = Cleanup::new();
    let Bed {
        peer_name,
        peer,
        router,
        member,
        nr,
        nm,
        ..
    } = bed(&mut c).await;
    let to_member = SocketAddr::new(IpAddr::V4(MEMBER), 7001);
    let to_remote = SocketAddr::new(IpAddr::V4(REMOTE), 7002);
    // Through the router's stack first: the paths work, neighbours are resolved.
    assert_eq!(through(&router, &peer, &member, to_member, 3), (3, 3));
    assert_eq!(through(&router, &member, &peer, to_remote, 3), (3, 3));

    let mut fp = FastPath::new().expect("the verifier accepts both programs");
    let r0 = nr.link("nsm-r0").await.unwrap().unwrap();
    let rm = nr.link("nsm-rm").await.unwrap().unwrap();
    let m0 = nm.link("nsm-m0").await.unwrap().unwrap();
    fp.attach(&nr, "nsm-r0", r0.index, Direction::Deliver).await.unwrap();
    fp.attach(&nr, "nsm-rm", rm.index, Direction::Send).await.unwrap();
    let entry = |ifindex: u32| Member {
        ifindex,
        member_mac: m0.mac.clone().try_into().unwrap(),
        router_mac: rm.mac.clone().try_into().unwrap(),
        service: 1,
    };
    let remote = PeerPrefix {
        ifindex: r0.index,
        gateway: PEER_GW,
        service: 2,
    };
    fp.set_member(MEMBER, entry(rm.index)).unwrap();
    fp.set_prefix("192.0.2.0/24".parse().unwrap(), remote).unwrap();
    fp.set_reach(&BTreeSet::from([(1, 2)])).unwrap();
    assert_eq!(fp.members().unwrap(), vec![(MEMBER, entry(rm.index))]);
    assert_eq!(fp.prefixes().unwrap(), vec![("192.0.2.0/24".parse().unwrap(), remote)]);

    // Both ways past the router's stack. Arriving at all proves the rewritten headers'
    // checksums (the receiving stacks drop bad ones).
    assert_eq!(through(&router, &peer, &member, to_member, 50), (50, 0), "delivered");
    assert_eq!(through(&router, &member, &peer, to_remote, 50), (50, 0), "sent");

    // A TTL that expires at the router is the router's to answer.
    let ttl1 = std::process::Command::new("ip")
        .args(["netns", "exec", &peer_name, "ping", "-c", "1", "-W", "2", "-t", "1"])
        .arg(MEMBER.to_string())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ttl1.stdout);
    assert!(out.contains("Time to live exceeded"), "{out}");
    assert_eq!(datagrams(&peer, &member, to_member, 5, 1), 0, "TTL 1 is not delivered");

    // Sending needs the pair of services in the reach table...
    fp.set_reach(&BTreeSet::from([(2, 1)])).unwrap();
    assert_eq!(
        through(&router, &member, &peer, to_remote, 20),
        (20, 20),
        "not reachable: the stack decides"
    );
    fp.set_reach(&BTreeSet::from([(1, 2)])).unwrap();
    // ...and the member's own veth: an address entered for another link is someone else's.
    fp.set_member(MEMBER, entry(r0.index)).unwrap();
    assert_eq!(
        through(&router, &member, &peer, to_remote, 20),
        (20, 20),
        "source on the wrong link"
    );
    fp.set_member(MEMBER, entry(rm.index)).unwrap();
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (20, 0));

    // Without the entries, the router routes again.
    assert!(fp.remove_member(MEMBER).unwrap());
    assert!(!fp.remove_member(MEMBER).unwrap());
    assert_eq!(through(&router, &peer, &member, to_member, 20), (20, 20));
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (20, 20));
    fp.set_member(MEMBER, entry(rm.index)).unwrap();
    assert!(fp.remove_prefix("192.0.2.0/24".parse().unwrap()).unwrap());
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (20, 20));

    // Detached, the tables no longer matter.
    fp.set_prefix("192.0.2.0/24".parse().unwrap(), remote).unwrap();
    fp.detach_others(&nr, |n| n != "nsm-r0").await.unwrap();
    assert_eq!(fp.attached().collect::<Vec<_>>(), vec![("nsm-rm", Direction::Send)]);
    assert_eq!(through(&router, &peer, &member, to_member, 20), (20, 20));
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (20, 0));
    fp.attach(&nr, "nsm-r0", r0.index, Direction::Deliver).await.unwrap();

    // The programs outlive their owner (a daemon restarting), tables as they were...
    drop(fp);
    assert_eq!(
        through(&router, &member, &peer, to_remote, 20),
        (20, 0),
        "after the owner is gone"
    );
    // ...until a new owner's attach replaces them: its tables are empty, so the stack routes.
    let mut fp = FastPath::new().unwrap();
    fp.attach(&nr, "nsm-r0", r0.index, Direction::Deliver).await.unwrap();
    fp.attach(&nr, "nsm-rm", rm.index, Direction::Send).await.unwrap();
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (20, 20), "replaced");
    fp.detach_all(&nr).await.unwrap();
    assert!(!nr.detach_tc_ingress("nsm-rm").await.unwrap(), "nothing left to detach");
    c.finish();
}

/// A member's shortcut: a macvlan on the router's peer link, in the member's namespace, through
/// which the member sends straight out of the link. The shortcut program at the link's egress
/// lets out exactly what the send program would have sent, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shortcut_sends_past_the_router_and_only_what_it_may() {
    let mut c = Cleanup::new();
    let Bed {
        router_name,
        member_name,
        peer,
        router,
        member,
        np,
        nr,
        nm,
        ..
    } = bed(&mut c).await;
    let to_member = SocketAddr::new(IpAddr::V4(MEMBER), 7003);
    let to_remote = SocketAddr::new(IpAddr::V4(REMOTE), 7004);
    assert_eq!(through(&router, &member, &peer, to_remote, 3), (3, 3));

    // An `ingress` qdisc, as an earlier nsm left on its peer links, gives way to clsact.
    let tc = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &router_name, "tc"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    tc(&["qdisc", "add", "dev", "nsm-r0", "ingress"]);
    let mut fp = FastPath::new().expect("the verifier accepts the programs");
    let r0 = nr.link("nsm-r0").await.unwrap().unwrap();
    let rm = nr.link("nsm-rm").await.unwrap().unwrap();
    let m0 = nm.link("nsm-m0").await.unwrap().unwrap();
    let member_mac: [u8; 6] = m0.mac.clone().try_into().unwrap();
    fp.attach(&nr, "nsm-r0", r0.index, Direction::Deliver).await.unwrap();
    assert!(fp.guards("nsm-r0"));
    let qdiscs = tc(&["qdisc", "show", "dev", "nsm-r0"]);
    assert!(
        qdiscs.contains("clsact") && !qdiscs.contains("qdisc ingress"),
        "{qdiscs}"
    );
    fp.set_member(
        MEMBER,
        Member {
            ifindex: rm.index,
            member_mac,
            router_mac: rm.mac.clone().try_into().unwrap(),
            service: 1,
        },
    )
    .unwrap();
    fp.set_prefix(
        "192.0.2.0/24".parse().unwrap(),
        PeerPrefix {
            ifindex: r0.index,
            gateway: PEER_GW,
            service: 2,
        },
    )
    .unwrap();
    fp.set_reach(&BTreeSet::from([(1, 2)])).unwrap();
    let p0 = np.link("nsm-p0").await.unwrap().unwrap();
    let macs = |peer: [u8; 6]| {
        HashMap::from([(
            r0.index,
            LinkMacs {
                own: r0.mac.clone().try_into().unwrap(),
                peer,
            },
        )])
    };
    fp.set_link_macs(&macs(p0.mac.clone().try_into().unwrap())).unwrap();

    // The shortcut, with the member's MAC, and the peer's prefix routed through it.
    nr.create_macvlan_in(&member, "nsm-s0", "nsm-r0", member_mac)
        .await
        .unwrap();
    let alias = nsm_dataplane::fastpath::shortcut_alias("v");
    nm.set_up_ipv4_only("nsm-s0", &alias).await.unwrap();
    let s0 = nm.link("nsm-s0").await.unwrap().unwrap();
    assert_eq!(
        (s0.kind.as_deref(), s0.up, s0.mac.as_slice()),
        (Some("macvlan"), true, &member_mac[..])
    );
    assert!(
        s0.alias
            .as_deref()
            .is_some_and(nsm_dataplane::fastpath::is_shortcut_alias)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        nm.addresses("nsm-s0").await.unwrap(),
        vec![],
        "no IPv6 link-local address"
    );
    nm.add_route_from("192.0.2.0/24".parse().unwrap(), "nsm-s0", MEMBER)
        .await
        .unwrap();
    let sent = |nl: Netlink| async move { nl.link("nsm-s0").await.unwrap().unwrap().stats.tx_packets };
    let before = sent(nm.clone()).await;
    assert_eq!(
        through(&router, &member, &peer, to_remote, 50),
        (50, 0),
        "past the router"
    );
    assert!(sent(nm.clone()).await - before >= 50, "through the shortcut");
    // Addressed to the peer by the table, not by a neighbour lookup: another peer MAC there and
    // the peer's stack no longer takes the frames.
    fp.set_link_macs(&macs([0x02, 0, 0, 0, 0x0b, 0xad])).unwrap();
    assert_eq!(through(&router, &member, &peer, to_remote, 10), (0, 0), "peer MAC");
    fp.set_link_macs(&macs(p0.mac.clone().try_into().unwrap())).unwrap();
    // Replies come back the usual way (the deliver program); the router's own traffic on the
    // link is untouched.
    assert_eq!(through(&router, &peer, &member, to_member, 10), (10, 0));
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", &router_name, "ping", "-c", "1", "-W", "2"])
        .arg(PEER_GW.to_string())
        .status()
        .unwrap();
    assert!(ping.success(), "the router's own packets pass");

    // Services that may not reach each other: dropped at the link, not routed either.
    fp.set_reach(&BTreeSet::from([(2, 1)])).unwrap();
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (0, 0), "reach");
    fp.set_reach(&BTreeSet::from([(1, 2)])).unwrap();
    // A source MAC that is not the member's (a forged frame): dropped.
    nm.set_down("nsm-s0").await.unwrap();
    let forged = std::process::Command::new("ip")
        .args(["netns", "exec", &member_name, "ip", "link", "set", "nsm-s0", "address"])
        .arg("02:00:00:00:be:ef")
        .status()
        .unwrap();
    assert!(forged.success());
    nm.set_up("nsm-s0").await.unwrap();
    nm.add_route_from("192.0.2.0/24".parse().unwrap(), "nsm-s0", MEMBER)
        .await
        .unwrap();
    assert_eq!(through(&router, &member, &peer, to_remote, 20), (0, 0), "forged MAC");
    // A destination that is no prefix of this link's peer: dropped.
    np.add_address("lo", "192.0.2.6/32".parse().unwrap()).await.unwrap();
    fp.remove_prefix("192.0.2.0/24".parse().unwrap()).unwrap();
    fp.set_prefix(
        "192.0.2.5/32".parse().unwrap(),
        PeerPrefix {
            ifindex: r0.index,
            gateway: PEER_GW,
            service: 2,
        },
    )
    .unwrap();
    let other = SocketAddr::new("192.0.2.6".parse().unwrap(), 7005);
    assert_eq!(through(&router, &member, &peer, other, 10), (0, 0), "not the peer's");
    fp.detach_all(&nr).await.unwrap();
    assert!(!nr.detach_tc_egress("nsm-r0").await.unwrap(), "nothing left to detach");
    c.finish();
}
