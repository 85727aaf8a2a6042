//! Interoperability with stock WireGuard: Debian's `wireguard-go` configured with `wg`, our tunnel
//! in the other namespace; each side initiating; a restart of the stock peer. Needs root and the
//! `wireguard-go` and `wireguard-tools` packages (skipped with a message if they are missing).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nsm_wireguard::{PeerConfig, Tunnel, TunnelConfig, encode_key, generate_private_key, public_key};

fn have_tools() -> bool {
    let found = ["wireguard-go", "wg"]
        .iter()
        .all(|t| sh(&["sh", "-c", &format!("command -v {t}")]).status.success());
    if !found {
        eprintln!("skipped: needs wireguard-go and wireguard-tools (apt-get install wireguard-go wireguard-tools)");
    }
    found
}

/// wireguard-go in `ns` as interface `dev`, configured with `wg set`.
struct StockPeer {
    proc: KillOnDrop,
    dev: String,
}

#[allow(clippy::too_many_arguments)] // a test helper: one call per scenario reads best flat
fn stock_peer(
    ns: &Ns,
    dev: &str,
    key: &[u8; 32],
    port: u16,
    peer_pub: &[u8; 32],
    endpoint: Option<SocketAddr>,
    allowed: &str,
    cidr: &str,
) -> StockPeer {
    let sock = format!("/var/run/wireguard/{dev}.sock");
    let _ = std::fs::remove_file(&sock);
    let mut c = ns.cmd(&["wireguard-go", "-f", dev]);
    c.env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let proc = KillOnDrop(c.spawn().expect("spawn wireguard-go"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&sock).exists() {
        assert!(Instant::now() < deadline, "wireguard-go did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let key_file = std::env::temp_dir().join(format!("{dev}.key"));
    std::fs::write(&key_file, encode_key(key)).unwrap();
    let port = port.to_string();
    let peer = encode_key(peer_pub);
    let mut args = vec![
        "wg",
        "set",
        dev,
        "private-key",
        key_file.to_str().unwrap(),
        "listen-port",
        &port,
        "peer",
        &peer,
        "allowed-ips",
        allowed,
    ];
    let ep = endpoint.map(|e| e.to_string());
    if let Some(ep) = &ep {
        args.extend(["endpoint", ep]);
    }
    ns.ok(&args);
    let _ = std::fs::remove_file(&key_file);
    ns.ok(&["ip", "addr", "add", cidr, "dev", dev]);
    ns.ok(&["ip", "link", "set", dev, "up"]);
    StockPeer {
        proc,
        dev: dev.to_string(),
    }
}

impl Drop for StockPeer {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.dev));
    }
}

fn ours(
    name: &str,
    ns: &Ns,
    listen: SocketAddr,
    key: [u8; 32],
    peer: [u8; 32],
    endpoint: Option<SocketAddr>,
    allowed: &str,
) -> Tunnel {
    let mut c = TunnelConfig::new(
        name,
        listen,
        key,
        PeerConfig {
            public_key: peer,
            endpoint,
            allowed_ips: vec![allowed.parse().unwrap()],
            keepalive: None,
            preshared_key: None,
        },
    );
    c.tun_netns = Some(ns.handle());
    c.udp_netns = Some(ns.handle());
    Tunnel::start(c).unwrap()
}

fn up(ns: &Ns, dev: &str, cidr: &str) {
    ns.ok(&["ip", "addr", "add", cidr, "dev", dev]);
    ns.ok(&["ip", "link", "set", dev, "up"]);
}

#[test]
fn interop_with_wireguard_go_both_directions_and_restart() {
    if skip() || !have_tools() {
        return;
    }
    tracing();
    let p = pair("i1", 74);
    let (ko, ks) = (generate_private_key(), generate_private_key());
    let lo: SocketAddr = format!("{}:51820", p.a_ip).parse().unwrap();
    let ls: SocketAddr = format!("{}:51821", p.b_ip).parse().unwrap();
    let (no, ns_dev) = (format!("w{}a", tag("i1")), format!("g{}b", tag("i1")));

    // 1. Our side initiates: ping and TCP from us, then back.
    let stock = stock_peer(
        &p.b,
        &ns_dev,
        &ks,
        51821,
        &public_key(&ko),
        Some(lo),
        "10.174.0.1/32",
        "10.174.0.2/24",
    );
    let t = ours(&no, &p.a, lo, ko, public_key(&ks), Some(ls), "10.174.0.2/32");
    up(&p.a, &no, "10.174.0.1/24");
    assert!(p.a.ping("10.174.0.2", 10), "ours → wireguard-go");
    tcp_transfer(&p.a, &p.b, "10.174.0.2:5301".parse().unwrap(), 8 << 20);
    tcp_transfer(&p.b, &p.a, "10.174.0.1:5302".parse().unwrap(), 8 << 20);
    let s = t.stats();
    eprintln!("ours-initiated: {s:?}");
    assert!(s.handshakes >= 1 && s.rx_bytes > 8 << 20 && s.tx_bytes > 8 << 20);

    // 2. The stock peer restarts; traffic from us resumes (our timers re-handshake).
    drop(stock);
    let stock = stock_peer(
        &p.b,
        &ns_dev,
        &ks,
        51821,
        &public_key(&ko),
        Some(lo),
        "10.174.0.1/32",
        "10.174.0.2/24",
    );
    assert!(
        p.a.ping("10.174.0.2", 30),
        "traffic resumes after wireguard-go restarts"
    );
    drop(stock);
    t.stop();

    // 3. Their side initiates: ours knows no endpoint and learns it from the handshake.
    let stock = stock_peer(
        &p.b,
        &ns_dev,
        &ks,
        51821,
        &public_key(&ko),
        Some(lo),
        "10.174.0.1/32",
        "10.174.0.2/24",
    );
    let t = ours(&no, &p.a, lo, ko, public_key(&ks), None, "10.174.0.2/32");
    up(&p.a, &no, "10.174.0.1/24");
    assert!(p.b.ping("10.174.0.1", 10), "wireguard-go → ours");
    assert_eq!(t.peer_endpoint(), Some(ls));
    tcp_transfer(&p.b, &p.a, "10.174.0.1:5303".parse().unwrap(), 8 << 20);
    tcp_transfer(&p.a, &p.b, "10.174.0.2:5304".parse().unwrap(), 8 << 20);
    let s = t.stats();
    eprintln!("stock-initiated: {s:?}");
    assert!(s.handshakes >= 1);
    assert_eq!(s.dropped.auth_failed + s.dropped.malformed, 0);

    // 4. We restart (same keys, endpoint known): traffic resumes both ways.
    t.stop();
    let t = ours(&no, &p.a, lo, ko, public_key(&ks), Some(ls), "10.174.0.2/32");
    up(&p.a, &no, "10.174.0.1/24");
    assert!(p.a.ping("10.174.0.2", 30), "traffic resumes after our restart");
    assert!(p.b.ping("10.174.0.1", 10));
    drop((t, stock));
}
