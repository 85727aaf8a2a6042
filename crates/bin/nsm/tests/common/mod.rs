//! Shared by the end-to-end tests: node daemon processes, `nsmctl` runs, polling a client's status,
//! looking at links in test-bed namespaces.

#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_testbed::Testbed;
use nsm_testing::{NsmRegistry, sibling_binary};

pub const NSM: &str = env!("CARGO_BIN_EXE_nsm");

pub struct NodeProc {
    /// unix:// URL of its socket (what `nsmctl client create --node` dials).
    pub socket: String,
    child: Option<Child>,
    args: Vec<String>,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeProc {
    pub fn start(registry: &str, name: &str) -> NodeProc {
        Self::start_with(registry, name, &["--underlay-address".into(), "192.0.2.1".into()])
    }

    pub fn start_with(registry: &str, name: &str, extra: &[String]) -> NodeProc {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec![
            "node".into(),
            "--name".into(),
            name.into(),
            "--registry".into(),
            registry.into(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--listen".into(),
            format!("unix://{}", dir.path().join("nsm.sock").display()),
        ];
        // Tests see resync-driven behaviour quickly, unless one asks for its own interval.
        if !extra.iter().any(|a| a == "--resync") {
            args.extend(["--resync".into(), "300ms".into()]);
        }
        args.extend(extra.iter().cloned());
        let log = dir.path().join("node.log");
        let socket = format!("unix://{}", dir.path().join("nsm.sock").display());
        // Joins the registry as an operator would have it: a token from `nsmctl node create`,
        // used on the first launch only (later launches rejoin with the stored identity).
        let token = if args.iter().any(|a| a == "--insecure") {
            None
        } else {
            nsm_testing::join_token(std::path::Path::new(NSM), registry, name).unwrap()
        };
        let mut n = NodeProc {
            socket,
            child: None,
            args,
            log,
            _dir: dir,
        };
        match token {
            Some(t) => n.launch_with(&["--join".into(), t]),
            None => {
                if nsm_testing::admin_config_for(registry).is_none() {
                    n.args.push("--insecure".into());
                }
                n.launch()
            }
        }
        n
    }

    pub fn launch(&mut self) {
        self.launch_with(&[]);
    }

    /// Launches with `extra` flags for this launch only.
    pub fn launch_with(&mut self, extra: &[String]) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(NSM)
                .args(&self.args)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        self.wait_for_socket();
    }

    /// Waits (10 s at most) until the daemon's unix socket takes connections, or the daemon has
    /// exited: the daemon binds it first thing, and `nsmctl --node` connects once, without
    /// retrying. (A file left by a killed daemon refuses connections until the new one binds.)
    fn wait_for_socket(&mut self) {
        let path = std::path::PathBuf::from(self.socket.trim_start_matches("unix://"));
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&path).is_err() {
            let exited = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                return;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!("{} not bound after 10 s; node log:\n{}", path.display(), self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets the `--resync` of its next launch.
    pub fn set_resync(&mut self, every: &str) {
        self.set_arg("--resync", every);
    }

    /// Sets flag `flag` (given at start) to `value` for its next launch.
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        let i = self
            .args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("started with {flag}"));
        self.args[i + 1] = value.to_owned();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its `--data-dir`.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    /// Sends the running daemon `sig`.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("daemon running").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), sig).unwrap();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn nsmctl(registry: &NsmRegistry, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(sibling_binary(NSM, "nsmctl").unwrap());
    cmd.args(args).env("NSM_REGISTRY", registry.url());
    if registry.is_insecure() {
        cmd.env("NSM_INSECURE", "1");
    } else {
        cmd.env("NSM_CONFIG", registry.admin_config());
    }
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[track_caller]
pub fn ok(r: (bool, String, String)) -> String {
    assert!(r.0, "nsmctl failed: {}{}", r.1, r.2);
    r.1
}

/// `nsmctl endpoint create NAME --service SERVICE --netns NETNS --node NODE`, which must succeed.
pub fn endpoint_in(registry: &NsmRegistry, name: &str, service: &str, netns: &str, node: &str) {
    ok(nsmctl(
        registry,
        &[
            "endpoint",
            "create",
            name,
            "--service",
            service,
            "--netns",
            netns,
            "--node",
            node,
        ],
    ));
}

/// `nsmctl describe node NAME`, polled until the node has registered (10 s at most): a node
/// process registers a moment after it starts, and tests do not wait for that otherwise.
pub fn describe_node(registry: &NsmRegistry, node: &NodeProc, name: &str) -> String {
    let start = Instant::now();
    loop {
        let (ok, out, err) = nsmctl(registry, &["describe", "node", name]);
        if ok {
            return out;
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!("describe node {name}: {out}{err}\nnode log:\n{}", node.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn client_json(registry: &NsmRegistry, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(nsmctl(registry, &["get", "client", name, "-o", "json"]))).unwrap()
}

/// Polls the client until `pred` holds on its JSON (10 s at most).
pub fn wait_client(
    registry: &NsmRegistry,
    node: &NodeProc,
    name: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_client_for(registry, &[node], name, what, 10, pred)
}

/// Polls the client until `pred` holds on its JSON, `secs` at most; on failure the panic shows the
/// logs of `nodes`.
pub fn wait_client_for(
    registry: &NsmRegistry,
    nodes: &[&NodeProc],
    name: &str,
    what: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let j = client_json(registry, name);
        if pred(&j) {
            return j;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
            panic!(
                "client {name}: {what} not reached; last: {j:#}\nnode logs:\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first destination address of a client's status, without its prefix length.
pub fn dst_of(j: &serde_json::Value) -> String {
    j["status"]["dstIpAddrs"][0]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_owned()
}

pub fn phase(j: &serde_json::Value) -> &str {
    j["status"]["phase"].as_str().unwrap_or("")
}

pub async fn link_index(bed: &Testbed, ns: &str, ifname: &str) -> Option<u32> {
    let nl = nsm_dataplane::Netlink::connect(bed.ns(ns)).await.unwrap();
    nl.link(ifname).await.unwrap().map(|l| l.index)
}

pub async fn link_names(bed: &Testbed, ns: &str) -> Vec<String> {
    let nl = nsm_dataplane::Netlink::connect(bed.ns(ns)).await.unwrap();
    nl.links().await.unwrap().into_iter().map(|l| l.name).collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `nsmctl` inside namespace `netns` (a path), as a workload would, talking to `node`'s socket.
pub fn nsmctl_in(registry: &NsmRegistry, netns: &str, node: &NodeProc, args: &[&str]) -> (bool, String, String) {
    let o = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg(sibling_binary(NSM, "nsmctl").unwrap())
        .args(args)
        .args(["--node", &node.socket])
        .env("NSM_REGISTRY", registry.url())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Polls `cond` every 50 ms for up to `secs` seconds; true once it holds.
pub async fn eventually<F: std::future::Future<Output = bool>>(secs: u64, mut cond: impl FnMut() -> F) -> bool {
    let start = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The source address a UDP datagram sent from `from` to `to_addr` arrives with in `to`.
pub fn udp_source(
    bed: &Testbed,
    from: &str,
    to: &str,
    to_addr: std::net::IpAddr,
    port: u16,
) -> Option<std::net::IpAddr> {
    use std::net::{SocketAddr, UdpSocket};
    let addr = SocketAddr::new(to_addr, port);
    let rx = bed.ns(to).run(move || UdpSocket::bind(addr)).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = bed.ns(from).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..5 {
        tx.send_to(b"nsm", addr).unwrap();
        if let Ok((_, f)) = rx.recv_from(&mut buf) {
            return Some(f.ip());
        }
    }
    None
}

/// Two hosts on the underlay (h1 192.0.2.11, h2 192.0.2.12), a workload `pod` on h1 and `svc` on h2.
pub async fn two_hosts(tag: &str) -> Testbed {
    nsm_testbed::Testbed::up(nsm_testbed::Topology {
        prefix: nsm_testbed::unique_prefix(tag),
        hosts: vec![
            nsm_testbed::HostSpec {
                name: "h1".into(),
                underlay_addr: "192.0.2.11".parse().unwrap(),
            },
            nsm_testbed::HostSpec {
                name: "h2".into(),
                underlay_addr: "192.0.2.12".parse().unwrap(),
            },
        ],
        workloads: vec![
            nsm_testbed::WorkloadSpec {
                name: "pod".into(),
                host: "h1".into(),
            },
            nsm_testbed::WorkloadSpec {
                name: "svc".into(),
                host: "h2".into(),
            },
        ],
        address_hosts: vec![],
    })
    .await
    .unwrap()
}

/// `nsm node` flags for a daemon of test-bed host `host` (its namespace, underlay address, a TCP
/// listener other nodes reach it on), plus `extra`.
pub fn node_args(bed: &Testbed, host: &str, addr: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--host-netns".to_string(),
        bed.netns_path(host).display().to_string(),
        "--underlay-address".into(),
        addr.into(),
        "--listen".into(),
        format!("tcp://127.0.0.1:{}", free_port()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}
