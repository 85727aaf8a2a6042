//! iperf3 TCP throughput through (a) two nsm-wireguard tunnels and (b) two wireguard-go + `wg`,
//! between two namespaces joined by a veth pair; 1 and 4 streams; several alternating runs; medians.
//!
//! As root: `cargo run --release -p nsm-wireguard --example throughput -- [RUNS] [SECONDS]`
//! (needs iperf3, wireguard-go, wireguard-tools; namespaces `nwgb-PID-{a,b}` are removed at exit).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_dataplane::NetNs;
use nsm_wireguard::{PeerConfig, Tunnel, TunnelConfig, encode_key, generate_private_key, public_key};

struct Ns(String);

impl Ns {
    fn new(name: String) -> Ns {
        let _ = NetNs::delete(&name);
        NetNs::create(&name).expect("create netns");
        Ns(name)
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
    fn ok(&self, args: &[&str]) {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fn handle(&self) -> NetNs {
        NetNs::open_named(&self.0).unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = NetNs::delete(&self.0);
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut c: Command) -> Proc {
    Proc(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[allow(dead_code)] // held only to keep the tunnels or processes alive
enum Setup {
    Ours(Tunnel, Tunnel),
    Go(Proc, Proc),
}

const DEV_A: &str = "wgbencha";
const DEV_B: &str = "wgbenchb";

fn ours(a: &Ns, b: &Ns) -> Setup {
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let la: SocketAddr = "10.181.0.1:51820".parse().unwrap();
    let lb: SocketAddr = "10.181.0.2:51820".parse().unwrap();
    let mk = |name: &str, ns: &Ns, listen, key, peer, ep, allowed: &str| {
        let mut c = TunnelConfig::new(
            name,
            listen,
            key,
            PeerConfig {
                public_key: public_key(&peer),
                endpoint: Some(ep),
                allowed_ips: vec![allowed.parse().unwrap()],
                keepalive: None,
                preshared_key: None,
            },
        );
        c.tun_netns = Some(ns.handle());
        c.udp_netns = Some(ns.handle());
        Tunnel::start(c).unwrap()
    };
    let ta = mk(DEV_A, a, la, ka, kb, lb, "10.182.0.2/32");
    let tb = mk(DEV_B, b, lb, kb, ka, la, "10.182.0.1/32");
    eprintln!("nsm-wireguard offloads: {:?}", ta.offloads());
    Setup::Ours(ta, tb)
}

fn go(a: &Ns, b: &Ns) -> Setup {
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let start = |ns: &Ns, dev: &str, key: &[u8; 32], port: &str, peer: &[u8; 32], ep: &str, allowed: &str| {
        let sock = format!("/var/run/wireguard/{dev}.sock");
        let _ = std::fs::remove_file(&sock);
        let mut c = ns.cmd(&["wireguard-go", "-f", dev]);
        c.env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        let p = spawn(c);
        while !Path::new(&sock).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let kf = std::env::temp_dir().join(format!("{dev}.key"));
        std::fs::write(&kf, encode_key(key)).unwrap();
        let peer = encode_key(peer);
        ns.ok(&[
            "wg",
            "set",
            dev,
            "private-key",
            kf.to_str().unwrap(),
            "listen-port",
            port,
            "peer",
            &peer,
            "endpoint",
            ep,
            "allowed-ips",
            allowed,
        ]);
        let _ = std::fs::remove_file(&kf);
        p
    };
    let pa = start(
        a,
        DEV_A,
        &ka,
        "51820",
        &public_key(&kb),
        "10.181.0.2:51820",
        "10.182.0.2/32",
    );
    let pb = start(
        b,
        DEV_B,
        &kb,
        "51820",
        &public_key(&ka),
        "10.181.0.1:51820",
        "10.182.0.1/32",
    );
    Setup::Go(pa, pb)
}

fn iperf(a: &Ns, b: &Ns, streams: u32, secs: u32) -> f64 {
    let server = spawn(b.cmd(&["iperf3", "-s", "-1", "-B", "10.182.0.2", "-p", "5299"]));
    std::thread::sleep(Duration::from_millis(300));
    let out = a
        .cmd(&[
            "iperf3",
            "-c",
            "10.182.0.2",
            "-p",
            "5299",
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .unwrap();
    drop(server);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let secs: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let pid = std::process::id();
    let a = Ns::new(format!("nwgb-{pid}-a"));
    let b = Ns::new(format!("nwgb-{pid}-b"));
    let ok = |args: &[&str]| assert!(Command::new(args[0]).args(&args[1..]).status().unwrap().success());
    ok(&[
        "ip",
        "link",
        "add",
        "vwgbencha",
        "netns",
        &a.0,
        "type",
        "veth",
        "peer",
        "name",
        "vwgbenchb",
        "netns",
        &b.0,
    ]);
    a.ok(&["ip", "addr", "add", "10.181.0.1/24", "dev", "vwgbencha"]);
    b.ok(&["ip", "addr", "add", "10.181.0.2/24", "dev", "vwgbenchb"]);
    a.ok(&["ip", "link", "set", "vwgbencha", "up"]);
    b.ok(&["ip", "link", "set", "vwgbenchb", "up"]);

    let names = ["nsm-wireguard", "wireguard-go"];
    let mut results: [[Vec<f64>; 2]; 2] = Default::default();
    for run in 0..runs {
        for k in 0..2 {
            let which = (run + k) % 2;
            let setup = if which == 0 { ours(&a, &b) } else { go(&a, &b) };
            a.ok(&["ip", "addr", "add", "10.182.0.1/24", "dev", DEV_A]);
            b.ok(&["ip", "addr", "add", "10.182.0.2/24", "dev", DEV_B]);
            a.ok(&["ip", "link", "set", DEV_A, "up"]);
            b.ok(&["ip", "link", "set", DEV_B, "up"]);
            let _ = a
                .cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.182.0.2"])
                .output();
            for (s, streams) in [1u32, 4].into_iter().enumerate() {
                let g = iperf(&a, &b, streams, secs);
                eprintln!("run {run} {:>14} -P {streams}: {g:.2} Gbit/s", names[which]);
                results[which][s].push(g);
            }
            if let Setup::Ours(ta, _) = &setup {
                eprintln!("  stats A: {:?}", ta.stats());
            }
            drop(setup);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    println!("median of {runs} runs, {secs} s each (Gbit/s, iperf3 TCP):");
    println!("{:>14} {:>9} {:>9}", "", "1 stream", "4 streams");
    for (which, name) in names.iter().enumerate() {
        println!(
            "{name:>14} {:>9.2} {:>9.2}",
            median(results[which][0].clone()),
            median(results[which][1].clone())
        );
    }
}
