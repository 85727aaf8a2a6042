//! Two of our tunnels between namespaces (real TUN devices, real sockets): traffic, a UDP socket in
//! another namespace than the TUN, bad packets, peer restart, lanes. Needs root.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use nsm_wireguard::{LaneConfig, PeerConfig, Tunnel, TunnelConfig, generate_private_key, public_key};

struct Side {
    key: [u8; 32],
}

/// Two ends with fresh keys.
fn sides() -> (Side, Side) {
    let side = || Side {
        key: generate_private_key(),
    };
    (side(), side())
}

#[allow(clippy::too_many_arguments)] // a test helper: one call per scenario reads best flat
fn config(
    name: &str,
    tun_ns: &Ns,
    udp_ns: &Ns,
    listen: SocketAddr,
    me: &Side,
    peer: &Side,
    endpoint: Option<SocketAddr>,
    allowed: &str,
) -> TunnelConfig {
    let mut c = TunnelConfig::new(
        name,
        listen,
        me.key,
        PeerConfig {
            public_key: public_key(&peer.key),
            endpoint,
            allowed_ips: vec![allowed.parse().unwrap()],
            keepalive: None,
            preshared_key: None,
        },
    );
    c.tun_netns = Some(tun_ns.handle());
    c.udp_netns = Some(udp_ns.handle());
    c
}

fn addr(ns: &Ns, dev: &str, cidr: &str) {
    ns.ok(&["ip", "addr", "add", cidr, "dev", dev]);
    ns.ok(&["ip", "link", "set", dev, "up"]);
}

#[test]
fn our_tunnels_carry_ping_and_tcp_udp_socket_in_host_namespace() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("t1", 71);
    // B's TUN sits in a "workload" namespace while its UDP socket stays in B (the "host").
    let w = Ns::new(format!("nwg-{}-w", tag("t1")));
    let (ka, kb) = sides();
    let (la, lb): (SocketAddr, SocketAddr) = (
        format!("{}:51820", p.a_ip).parse().unwrap(),
        format!("{}:51820", p.b_ip).parse().unwrap(),
    );
    let (na, nb) = (format!("w{}a", tag("t1")), format!("w{}b", tag("t1")));
    let ta = Tunnel::start(config(&na, &p.a, &p.a, la, &ka, &kb, Some(lb), "10.171.0.2/32")).unwrap();
    let tb = Tunnel::start(config(&nb, &w, &p.b, lb, &kb, &ka, Some(la), "10.171.0.1/32")).unwrap();
    eprintln!("offloads: {:?}", ta.offloads());
    addr(&p.a, &na, "10.171.0.1/24");
    addr(&w, &nb, "10.171.0.2/24");
    assert!(p.a.ping("10.171.0.2", 10), "ping through the tunnel");
    assert!(w.ping("10.171.0.1", 5), "ping back");
    tcp_transfer(&p.a, &w, "10.171.0.2:5201".parse().unwrap(), 20 << 20);
    tcp_transfer(&w, &p.a, "10.171.0.1:5202".parse().unwrap(), 20 << 20);
    let (sa, sb) = (ta.stats(), tb.stats());
    eprintln!("A {sa:?}\nB {sb:?}");
    assert!(sa.tx_bytes > 20 << 20 && sb.rx_bytes > 20 << 20);
    assert!(sa.handshakes + sb.handshakes >= 2);
    assert!(sa.last_handshake.is_some());
    assert_eq!(sa.dropped.auth_failed + sb.dropped.auth_failed, 0);
    ta.stop();
    drop(tb);
    // The TUN devices are gone with the tunnels.
    assert!(
        !sh(&["ip", "netns", "exec", &w.name, "ip", "link", "show", &nb])
            .status
            .success()
    );
}

/// A UDP relay between A and B that records A's data packets, so the test can replay and forge.
struct Relay {
    sock: Arc<UdpSocket>,
    captured: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn new(sock: UdpSocket, a: SocketAddr, b: SocketAddr) -> Relay {
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let sock = Arc::new(sock);
        let captured = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (sock.clone(), captured.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = s.recv_from(&mut buf) else { continue };
                let to = if from == b { a } else { b };
                if from == a && buf[0] == 4 && n > 32 {
                    let mut c = c.lock();
                    if c.len() < 64 {
                        c.push(buf[..n].to_vec());
                    }
                }
                let _ = s.send_to(&buf[..n], to);
            }
        });
        Relay {
            sock,
            captured,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn bad_packets_are_counted_and_traffic_continues() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("t2", 72);
    let (ka, kb) = sides();
    let la: SocketAddr = format!("{}:51820", p.a_ip).parse().unwrap();
    let lb: SocketAddr = format!("{}:51820", p.b_ip).parse().unwrap();
    let relay_addr: SocketAddr = format!("{}:40000", p.b_ip).parse().unwrap();
    let relay = Relay::new(p.b.udp(relay_addr), la, lb);
    let (na, nb) = (format!("w{}a", tag("t2")), format!("w{}b", tag("t2")));
    // A talks to B through the relay; B learns the relay as A's endpoint from A's packets.
    let ta = Tunnel::start(config(&na, &p.a, &p.a, la, &ka, &kb, Some(relay_addr), "10.172.0.2/32")).unwrap();
    let tb = Tunnel::start(config(&nb, &p.b, &p.b, lb, &kb, &ka, None, "10.172.0.1/32")).unwrap();
    addr(&p.a, &na, "10.172.0.1/24");
    addr(&p.b, &nb, "10.172.0.2/24");
    assert!(p.a.ping("10.172.0.2", 10), "ping through the relay");
    assert_eq!(tb.peer_endpoint(), Some(relay_addr));
    let data = relay.captured.lock().first().cloned().expect("a captured data packet");
    let before = tb.stats();

    let send = |d: &[u8]| {
        relay.sock.send_to(d, lb).unwrap();
    };
    // Random bytes (type byte forced out of range), and a burst of pure random data.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    for len in [0usize, 1, 3, 16, 100, 1400] {
        let mut junk: Vec<u8> = (0..len).map(|_| rnd()).collect();
        if let Some(b) = junk.first_mut() {
            *b = 9;
        }
        send(&junk);
    }
    // Truncated: a data header too short for the tag, and a handshake initiation cut short.
    send(&data[..20]);
    let mut init = [0u8; 148];
    init[0] = 1;
    send(&init[..100]);
    // Replayed: the captured data packet again.
    send(&data);
    send(&data);
    // Forged: a fresh counter and a bit flipped in the ciphertext (a stale counter would be
    // rejected as a replay before the tag is checked).
    let mut forged = data.clone();
    let counter = u64::from_le_bytes(forged[8..16].try_into().unwrap()) + 1000;
    forged[8..16].copy_from_slice(&counter.to_le_bytes());
    forged[20] ^= 1;
    send(&forged);
    // For a session that does not exist.
    let mut stranger = data.clone();
    stranger[4..8].copy_from_slice(&0x00ab_cdefu32.to_le_bytes());
    send(&stranger);

    std::thread::sleep(Duration::from_millis(300));
    assert!(p.a.ping("10.172.0.2", 5), "traffic continues after bad packets");
    let after = tb.stats();
    eprintln!("before {before:?}\nafter {after:?}");
    let d = |f: fn(&nsm_wireguard::Drops) -> u64| f(&after.dropped) - f(&before.dropped);
    assert!(d(|x| x.malformed) >= 7, "malformed: {after:?}");
    assert!(d(|x| x.replayed) >= 2, "replayed: {after:?}");
    assert!(d(|x| x.auth_failed) >= 1, "forged: {after:?}");
    assert!(d(|x| x.unknown_peer) >= 1, "unknown session: {after:?}");
    assert!(after.rx_packets > before.rx_packets);
    drop((ta, tb, relay));
}

#[test]
fn peer_restart_rehandshakes_and_traffic_resumes() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("t3", 73);
    let (ka, kb) = sides();
    let la: SocketAddr = format!("{}:51820", p.a_ip).parse().unwrap();
    let lb: SocketAddr = format!("{}:51820", p.b_ip).parse().unwrap();
    let (na, nb) = (format!("w{}a", tag("t3")), format!("w{}b", tag("t3")));
    let ta = Tunnel::start(config(&na, &p.a, &p.a, la, &ka, &kb, Some(lb), "10.173.0.2/32")).unwrap();
    let tb = Tunnel::start(config(&nb, &p.b, &p.b, lb, &kb, &ka, Some(la), "10.173.0.1/32")).unwrap();
    addr(&p.a, &na, "10.173.0.1/24");
    addr(&p.b, &nb, "10.173.0.2/24");
    assert!(p.a.ping("10.173.0.2", 10));

    // B restarts (new sessions, same keys); A still holds the old session and keeps sending with it
    // until its timers notice no answer and re-handshake (REKEY_TIMEOUT + KEEPALIVE_TIMEOUT = 15 s).
    tb.stop();
    let tb = Tunnel::start(config(&nb, &p.b, &p.b, lb, &kb, &ka, Some(la), "10.173.0.1/32")).unwrap();
    addr(&p.b, &nb, "10.173.0.2/24");
    assert!(p.a.ping("10.173.0.2", 30), "traffic resumes after B restarts");
    tcp_transfer(&p.a, &p.b, "10.173.0.2:5203".parse().unwrap(), 4 << 20);

    // A restarts with no endpoint: B's traffic finds it at its old address; A learns B's.
    ta.stop();
    let ta = Tunnel::start(config(&na, &p.a, &p.a, la, &ka, &kb, None, "10.173.0.2/32")).unwrap();
    addr(&p.a, &na, "10.173.0.1/24");
    assert!(p.b.ping("10.173.0.1", 30), "traffic resumes after A restarts");
    assert_eq!(ta.peer_endpoint(), Some(lb));
    drop((ta, tb));
}

/// Over an IPv6 underlay: both sockets on IPv6 addresses, the peer's endpoint learnt as one, and
/// bulk TCP (UDP segmentation and coalescing over IPv6 where the kernel has them) arrives intact.
#[test]
fn ipv6_underlay_carries_traffic() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("t6", 76);
    let (va, vb) = (format!("v{}a", tag("t6")), format!("v{}b", tag("t6")));
    // `nodad`: usable at once, no duplicate address detection to wait for.
    p.a.ok(&["ip", "addr", "add", "fd00:76::1/64", "dev", &va, "nodad"]);
    p.b.ok(&["ip", "addr", "add", "fd00:76::2/64", "dev", &vb, "nodad"]);
    let (ka, kb) = sides();
    let la: SocketAddr = "[fd00:76::1]:51820".parse().unwrap();
    let lb: SocketAddr = "[fd00:76::2]:51820".parse().unwrap();
    let (na, nb) = (format!("w{}a", tag("t6")), format!("w{}b", tag("t6")));
    // B knows no endpoint: it learns A's IPv6 address from A's handshake.
    let ta = Tunnel::start(config(&na, &p.a, &p.a, la, &ka, &kb, Some(lb), "10.176.0.2/32")).unwrap();
    let tb = Tunnel::start(config(&nb, &p.b, &p.b, lb, &kb, &ka, None, "10.176.0.1/32")).unwrap();
    addr(&p.a, &na, "10.176.0.1/24");
    addr(&p.b, &nb, "10.176.0.2/24");
    assert!(p.a.ping("10.176.0.2", 10), "ping through the tunnel over IPv6");
    assert_eq!(ta.local_addr(), la);
    assert_eq!(tb.peer_endpoint(), Some(la), "A's IPv6 endpoint, learnt");
    tcp_transfer(&p.a, &p.b, "10.176.0.2:5206".parse().unwrap(), 20 << 20);
    tcp_transfer(&p.b, &p.a, "10.176.0.1:5207".parse().unwrap(), 20 << 20);
    let (sa, sb) = (ta.stats(), tb.stats());
    eprintln!("offloads: {:?}\nA {sa:?}\nB {sb:?}", ta.offloads());
    assert!(sa.tx_bytes > 20 << 20 && sb.rx_bytes > 20 << 20);
    assert_eq!(sa.dropped.auth_failed + sb.dropped.auth_failed, 0);
    drop((ta, tb));
}

/// Lanes (per-core workers): three lanes each side, lane *i* to lane *i*. Flows spread over the
/// lanes (each a session of its own: its own handshake), every flow arrives intact and in order,
/// after a peer restart every lane carries traffic again, and a key change moves every lane.
#[test]
fn lanes_spread_flows_and_resume_after_a_peer_restart() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("t7", 77);
    let (ka, kb) = sides();
    let at = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };
    let (na, nb) = (format!("w{}a", tag("t7")), format!("w{}b", tag("t7")));
    let laned = |name: &str, ns: &Ns, me: &Side, peer: &Side, mine: &str, theirs: &str, allowed: &str| {
        let mut c = config(
            name,
            ns,
            ns,
            at(mine, 51820),
            me,
            peer,
            Some(at(theirs, 51820)),
            allowed,
        );
        c.extra_lanes = [51821, 51822]
            .map(|port| LaneConfig {
                listen: at(mine, port),
                endpoint: Some(at(theirs, port)),
            })
            .to_vec();
        Tunnel::start(c).unwrap()
    };
    let ta = laned(&na, &p.a, &ka, &kb, &p.a_ip, &p.b_ip, "10.177.0.2/32");
    let tb = laned(&nb, &p.b, &kb, &ka, &p.b_ip, &p.a_ip, "10.177.0.1/32");
    assert_eq!(ta.local_addrs().len(), 3);
    addr(&p.a, &na, "10.177.0.1/24");
    addr(&p.b, &nb, "10.177.0.2/24");
    assert!(p.a.ping("10.177.0.2", 10), "ping through a laned tunnel");
    // Flows hashed over three queues: 24 of them all on one lane would be a 1 in 10^11 chance.
    let flows = |first_port: u16| {
        for i in 0..24 {
            let to = SocketAddr::new("10.177.0.2".parse().unwrap(), first_port + i);
            tcp_transfer(&p.a, &p.b, to, 256 << 10);
        }
    };
    flows(5300);
    // One flow stays on one lane (so it is never reordered between lanes).
    let before = ta.lane_packets();
    tcp_transfer(&p.a, &p.b, "10.177.0.2:5299".parse().unwrap(), 4 << 20);
    let grew = ta
        .lane_packets()
        .iter()
        .zip(&before)
        .filter(|(now, then)| now.0 > then.0 + 100)
        .count();
    assert_eq!(grew, 1, "one flow, one lane: {before:?} → {:?}", ta.lane_packets());
    let busy = |t: &Tunnel| t.lane_packets().iter().filter(|(tx, rx)| *tx > 0 && *rx > 0).count();
    eprintln!("lanes A {:?}, B {:?}", ta.lane_packets(), tb.lane_packets());
    assert!(busy(&ta) >= 2 && busy(&tb) >= 2, "flows spread over the lanes");
    // Lane i's packets arrive on lane i: what each of A's lanes sent, B's same lane received
    // (TCP's acknowledgements on the way back make "received" at least some).
    for ((a_tx, _), (_, b_rx)) in ta.lane_packets().into_iter().zip(tb.lane_packets()) {
        assert_eq!(a_tx > 0, b_rx > 0, "a lane's packets arrive on the same lane");
    }
    let (sa, sb) = (ta.stats(), tb.stats());
    assert!(
        sa.handshakes + sb.handshakes >= 3,
        "a handshake per lane: {sa:?} {sb:?}"
    );
    // (A dropped packet the TUN's own kernel sends outside the allowed addresses, such as IPv6
    // router solicitations, is `not_allowed` and fine.)
    let bad = |s: &nsm_wireguard::Stats| s.dropped.total() - s.dropped.not_allowed;
    assert_eq!(bad(&sa) + bad(&sb), 0, "{sa:?} {sb:?}");

    // B restarts (new sessions on every lane, same keys and ports): it knows A's lanes and
    // handshakes on each at once, so every flow gets through again.
    tb.stop();
    let tb = laned(&nb, &p.b, &kb, &ka, &p.b_ip, &p.a_ip, "10.177.0.1/32");
    addr(&p.b, &nb, "10.177.0.2/24");
    assert!(p.a.ping("10.177.0.2", 30), "traffic resumes after B restarts");
    flows(5400);
    eprintln!(
        "after B's restart: lanes A {:?}, B {:?}",
        ta.lane_packets(),
        tb.lane_packets()
    );
    assert!(busy(&tb) >= 2, "the restarted end's lanes carry traffic");

    // A key change moves every lane: A takes a new key, B is told A's new public key (as the nodes
    // do through the mechanism parameters) and handshakes with it on each lane.
    let ka2 = generate_private_key();
    ta.set_private_key(ka2);
    tb.set_peer_public_key(public_key(&ka2));
    let moved = (0..100).any(|i| {
        tcp_transfer(
            &p.a,
            &p.b,
            SocketAddr::new("10.177.0.2".parse().unwrap(), 5500 + i),
            64 << 10,
        );
        !ta.key_change_pending() && !tb.key_change_pending()
    });
    assert!(moved, "every lane moved to the new key");
    assert_eq!(ta.keys().0, public_key(&ka2));
    assert_eq!(tb.keys().1, public_key(&ka2));
    flows(5600);
    // Every lane of A holds the new key: a fresh B that knows only A's new public key handshakes
    // on each lane (a lane left on the old key would stall the flows hashed onto it).
    tb.stop();
    let tb = laned(&nb, &p.b, &kb, &Side { key: ka2 }, &p.b_ip, &p.a_ip, "10.177.0.1/32");
    addr(&p.b, &nb, "10.177.0.2/24");
    assert!(
        p.a.ping("10.177.0.2", 30),
        "traffic with a B that knows only A's new key"
    );
    flows(5700);
    assert_eq!(
        busy(&tb),
        3,
        "every lane of A answers with the new key: {:?}",
        tb.lane_packets()
    );

    // Too many lanes is refused, with nothing left behind.
    let mut c = config("wlanesx", &p.a, &p.a, at(&p.a_ip, 0), &ka, &kb, None, "10.177.0.2/32");
    c.extra_lanes = vec![
        LaneConfig {
            listen: at(&p.a_ip, 0),
            endpoint: None,
        };
        nsm_wireguard::MAX_LANES
    ];
    let err = Tunnel::start(c).unwrap_err().to_string();
    assert!(err.contains("lanes"), "{err}");
    drop((ta, tb));
}

/// Voluntary context switches of this process's threads whose name starts with `prefix`, summed.
fn wakeups(prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// An idle tunnel's threads sleep: the receiving one until a datagram comes (no polling), the
/// sending one until a packet or its next timer round (every 250 ms). A node with many idle vWires
/// (and lanes) would otherwise wake thousands of times a second.
#[test]
fn idle_tunnel_threads_sleep() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("t8", 78);
    let (ka, kb) = sides();
    let la: SocketAddr = format!("{}:51820", p.a_ip).parse().unwrap();
    let lb: SocketAddr = format!("{}:51820", p.b_ip).parse().unwrap();
    // Short names, so that the threads' names (cut at 15 bytes) keep the whole tunnel name.
    let (na, nb) = ("wid8a", "wid8b");
    let ta = Tunnel::start(config(na, &p.a, &p.a, la, &ka, &kb, Some(lb), "10.178.0.2/32")).unwrap();
    let tb = Tunnel::start(config(nb, &p.b, &p.b, lb, &kb, &ka, Some(la), "10.178.0.1/32")).unwrap();
    addr(&p.a, na, "10.178.0.1/24");
    addr(&p.b, nb, "10.178.0.2/24");
    assert!(p.a.ping("10.178.0.2", 10));
    // Let the handshake's and the ping's stragglers pass, then count over 2 s of silence.
    std::thread::sleep(Duration::from_millis(500));
    let (rx0, tx0) = (wakeups("wg-rx0-wid8a"), wakeups("wg-tx0-wid8a"));
    std::thread::sleep(Duration::from_secs(2));
    let (rx, tx) = (wakeups("wg-rx0-wid8a") - rx0, wakeups("wg-tx0-wid8a") - tx0);
    eprintln!("in 2 s idle: receiving thread woke {rx} times, sending thread {tx}");
    assert!(rx <= 2, "the receiving thread polls: {rx} wake-ups in 2 s");
    assert!(
        (4..=12).contains(&tx),
        "the sending thread runs its timers every 250 ms: {tx} wake-ups in 2 s"
    );
    // Stopping wakes them at once.
    let t = std::time::Instant::now();
    drop((ta, tb));
    assert!(t.elapsed() < Duration::from_millis(200), "stopped in {:?}", t.elapsed());
}

/// What the sending side's in-place split and the receiving side's GRO build and the kernel takes
/// apart again: inner IPv6 TCP both ways, bursts of equal-sized UDP datagrams (coalesced into UDP
/// GSO packets where the TUN has USO) with shorter ones between, over IPv4 and IPv6, and TCP with a
/// small MSS (TSO packets of many segments). Every byte must arrive as sent.
#[test]
fn inner_ipv6_tcp_and_udp_bursts_arrive_intact() {
    if skip() {
        return;
    }
    tracing();
    let p = pair("tg", 77);
    let (ka, kb) = sides();
    let (la, lb): (SocketAddr, SocketAddr) = (
        format!("{}:51820", p.a_ip).parse().unwrap(),
        format!("{}:51820", p.b_ip).parse().unwrap(),
    );
    let (na, nb) = (format!("w{}a", tag("tg")), format!("w{}b", tag("tg")));
    let mut ca = config(&na, &p.a, &p.a, la, &ka, &kb, Some(lb), "10.177.0.2/32");
    ca.peer.allowed_ips.push("fd77::2/128".parse().unwrap());
    let mut cb = config(&nb, &p.b, &p.b, lb, &kb, &ka, Some(la), "10.177.0.1/32");
    cb.peer.allowed_ips.push("fd77::1/128".parse().unwrap());
    let ta = Tunnel::start(ca).unwrap();
    let tb = Tunnel::start(cb).unwrap();
    eprintln!("offloads: {:?}", tb.offloads());
    addr(&p.a, &na, "10.177.0.1/24");
    addr(&p.b, &nb, "10.177.0.2/24");
    p.a.ok(&["ip", "addr", "add", "fd77::1/64", "dev", &na, "nodad"]);
    p.b.ok(&["ip", "addr", "add", "fd77::2/64", "dev", &nb, "nodad"]);
    assert!(p.a.ping("10.177.0.2", 10), "ping through the tunnel");
    tcp_transfer(&p.a, &p.b, "[fd77::2]:5208".parse().unwrap(), 20 << 20);
    tcp_transfer(&p.b, &p.a, "[fd77::1]:5209".parse().unwrap(), 20 << 20);

    const BURSTS: u32 = 30;
    const PER_BURST: u32 = 60;
    let datagram = |seq: u32| -> Vec<u8> {
        let len = if seq % 37 == 36 { 300 } else { 1200 };
        let mut d: Vec<u8> = (0..len).map(|i| (i as u32 * 13 + seq) as u8).collect();
        d[..4].copy_from_slice(&seq.to_be_bytes());
        d
    };
    for (to, from) in [("10.177.0.2:6000", "10.177.0.1:0"), ("[fd77::2]:6001", "[fd77::1]:0")] {
        let to: SocketAddr = to.parse().unwrap();
        let rx = p.b.udp(to);
        socket2::SockRef::from(&rx).set_recv_buffer_size(16 << 20).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let tx = p.a.udp(from.parse().unwrap());
        let receiver = std::thread::spawn(move || {
            let (mut got, mut bad) = (vec![false; (BURSTS * PER_BURST) as usize], 0u32);
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = rx.recv(&mut buf) {
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                match got.get_mut(seq as usize) {
                    Some(g) if buf[..n] == datagram(seq)[..] => *g = true,
                    _ => bad += 1,
                }
                if got.iter().all(|&g| g) {
                    break;
                }
            }
            (got.iter().filter(|&&g| g).count() as u32, bad)
        });
        for b in 0..BURSTS {
            for i in 0..PER_BURST {
                tx.send_to(&datagram(b * PER_BURST + i), to).unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (arrived, bad) = receiver.join().unwrap();
        eprintln!("UDP to {to}: {arrived} of {} intact, {bad} bad", BURSTS * PER_BURST);
        assert_eq!(bad, 0, "UDP datagrams altered on the way to {to}");
        assert!(
            arrived * 100 >= BURSTS * PER_BURST * 99,
            "UDP to {to}: {arrived} arrived"
        );
    }
    // A small MSS: B advertises 500 bytes, so A's kernel hands its TUN 64 KiB TSO packets of ~130
    // segments each, more than a fixed set of split buffers would hold.
    p.b.ok(&["ip", "route", "add", "10.177.0.1/32", "dev", &nb, "advmss", "500"]);
    tcp_transfer(&p.a, &p.b, "10.177.0.2:5210".parse().unwrap(), 20 << 20);
    // The smallest MSS Linux uses (88): hundreds of segments per TSO packet.
    p.b.ok(&["ip", "route", "replace", "10.177.0.1/32", "dev", &nb, "advmss", "88"]);
    tcp_transfer(&p.a, &p.b, "10.177.0.2:5211".parse().unwrap(), 4 << 20);
    let (sa, sb) = (ta.stats(), tb.stats());
    eprintln!("A {sa:?}\nB {sb:?}");
    // (`not_allowed` counts what the kernels send on their own to no peer address: IPv6 multicast.)
    assert_eq!(
        sa.dropped.other + sb.dropped.other + sb.dropped.auth_failed,
        0,
        "no TUN read dropped: tun-rs's split into a fixed set of buffers dropped reads of many segments"
    );
    drop((ta, tb));
}
