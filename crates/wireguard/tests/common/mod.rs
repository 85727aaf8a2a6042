//! Test bed: namespaces joined by a veth pair, commands inside them, TCP transfers. Everything is
//! named with the test's tag and this process's id, and removed by exact name on drop.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_dataplane::NetNs;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips (returns true) when not root: these tests need namespaces and TUN devices.
pub fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root");
        return true;
    }
    false
}

pub fn tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().expect("run command")
}

#[track_caller]
pub fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace that is deleted (by its exact name) when dropped.
pub struct Ns {
    pub name: String,
    pub ns: NetNs,
}

impl Ns {
    pub fn new(name: String) -> Ns {
        let _ = NetNs::delete(&name);
        let ns = NetNs::create(&name).expect("create netns");
        Ns { name, ns }
    }

    pub fn handle(&self) -> NetNs {
        self.ns.try_clone().unwrap()
    }

    /// `ip netns exec NAME args...`
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One ping, true if answered within `secs`.
    pub fn ping(&self, dst: &str, secs: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
        while Instant::now() < deadline {
            let out = self.cmd(&["ping", "-c", "1", "-W", "1", dst]).output().unwrap();
            if out.status.success() {
                return true;
            }
        }
        false
    }

    pub fn spawn(&self, args: &[&str]) -> KillOnDrop {
        let child = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        KillOnDrop(child)
    }

    /// A TCP listener bound inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.ns.run(move || TcpListener::bind(addr)).unwrap().unwrap()
    }

    /// A TCP connection made from inside this namespace.
    pub fn connect(&self, addr: SocketAddr) -> TcpStream {
        self.ns
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
            .unwrap()
            .unwrap()
    }

    pub fn udp(&self, addr: SocketAddr) -> std::net::UdpSocket {
        self.ns.run(move || std::net::UdpSocket::bind(addr)).unwrap().unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = NetNs::delete(&self.name);
    }
}

/// A child process killed by its PID and reaped on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Unique short names: interface names have at most 15 bytes.
pub fn tag(t: &str) -> String {
    format!("{t}{}", std::process::id() % 100_000)
}

/// Two namespaces joined by a veth pair: `a` has 10.(net).0.1/24, `b` has 10.(net).0.2/24.
pub struct Pair {
    pub a: Ns,
    pub b: Ns,
    pub a_ip: String,
    pub b_ip: String,
}

pub fn pair(t: &str, net: u8) -> Pair {
    let a = Ns::new(format!("nwg-{}-a", tag(t)));
    let b = Ns::new(format!("nwg-{}-b", tag(t)));
    let va = format!("v{}a", tag(t));
    let vb = format!("v{}b", tag(t));
    ok(&[
        "ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]);
    let (a_ip, b_ip) = (format!("10.{net}.0.1"), format!("10.{net}.0.2"));
    a.ok(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &va]);
    b.ok(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &vb]);
    a.ok(&["ip", "link", "set", &va, "up"]);
    b.ok(&["ip", "link", "set", &vb, "up"]);
    Pair { a, b, a_ip, b_ip }
}

/// Sends `len` bytes from `from` to a listener in `to` and checks they arrive intact.
pub fn tcp_transfer(from: &Ns, to: &Ns, addr: SocketAddr, len: usize) {
    let listener = to.listen(addr);
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::with_capacity(len);
        s.read_to_end(&mut got).unwrap();
        got
    });
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut c = from.connect(addr);
    c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&data).unwrap();
    drop(c);
    let got = server.join().unwrap();
    assert_eq!(got.len(), data.len(), "TCP transfer length");
    assert!(got == data, "TCP transfer corrupted");
}
