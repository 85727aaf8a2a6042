//! `nsm demo`: the design document's hybrid-cloud path, as far as vWires go, on one machine.
//!
//! It builds a test bed (namespaces for two hosts, a VM and two workloads on one underlay bridge),
//! starts a registry on the embedded store and an `nsm node` per host, runs the design document's
//! `nsmctl` commands (the `client create`s inside the pod, as a pod would), and proves that
//! traffic flows: pings, a TCP transfer, the counters. Everything it starts or creates is listed in
//! a state file first, so `nsm demo --down` can remove what a killed demo left behind.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nsm_dataplane::NetNs;
use nsm_testbed::{AddressHostSpec, HostSpec, Testbed, Topology, WorkloadSpec};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Remove what an earlier demo left behind (after it was killed): stop its processes and
    /// delete its namespaces, by the exact names in its state file, then exit.
    #[arg(long)]
    down: bool,
    /// Build, prove, tear down and exit, instead of keeping the mesh up until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Where the demo keeps its state: sockets, registry data, logs, and the list of what it built.
    #[arg(long, default_value = "/run/nsm-demo")]
    state_dir: PathBuf,
    /// Prefix of the demo's namespace names (`PREFIX-pod`, `PREFIX-vm`, …).
    #[arg(long, default_value = "nsmdemo")]
    prefix: String,
}

/// What a demo started and created, written before each step so nothing is lost if it is killed.
#[derive(Default, Serialize, Deserialize)]
struct State {
    /// The `nsm` binary that started the processes: a pid is only signalled while it still runs it.
    exe: PathBuf,
    pids: Vec<u32>,
    namespaces: Vec<String>,
}

const STATE_FILE: &str = "state.json";
const POD: &str = "pod";
const VM: &str = "vm";
const K8S_NODE: &str = "k8s-node";
const SERVER: &str = "server";
const PAYMENTS: &str = "payments";
const VM_ADDR: &str = "10.0.0.5";

fn topology(prefix: &str) -> Topology {
    Topology {
        prefix: prefix.to_owned(),
        hosts: vec![
            HostSpec {
                name: K8S_NODE.into(),
                underlay_addr: "192.0.2.11".parse().expect("address"),
            },
            HostSpec {
                name: SERVER.into(),
                underlay_addr: "10.0.0.7".parse().expect("address"),
            },
        ],
        workloads: vec![
            WorkloadSpec {
                name: POD.into(),
                host: K8S_NODE.into(),
            },
            WorkloadSpec {
                name: PAYMENTS.into(),
                host: SERVER.into(),
            },
        ],
        address_hosts: vec![AddressHostSpec {
            name: VM.into(),
            addr: VM_ADDR.parse().expect("address"),
        }],
    }
}

struct Demo {
    dir: PathBuf,
    state: State,
    children: Vec<Child>,
    bed: Option<Testbed>,
    nsmctl: PathBuf,
    registry: String,
    pod_node: String,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("nsm demo needs root: it creates network namespaces, links and nftables rules");
    }
    if args.down {
        return down(&args.state_dir, true);
    }
    if let Some(old) = read_state(&args.state_dir)? {
        let exe = old.exe.clone();
        let running: Vec<u32> = old.pids.iter().copied().filter(|p| runs(*p, &exe)).collect();
        if !running.is_empty() {
            bail!(
                "a demo is already running (processes {running:?}, state in {}): stop it with Ctrl-C or `nsm demo --down`",
                args.state_dir.display()
            );
        }
        println!("Removing what an earlier demo left behind…");
        down(&args.state_dir, false)?;
    }
    let exe = std::env::current_exe().context("locating the nsm binary")?;
    let nsmctl = exe.with_file_name("nsmctl");
    if !nsmctl.exists() {
        bail!(
            "nsmctl not found next to {} (build both: cargo build --release -p nsm -p nsmctl)",
            exe.display()
        );
    }
    let dir = args.state_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut demo = Demo {
        registry: format!("unix://{}", dir.join("registry.sock").display()),
        pod_node: format!("unix://{}", dir.join(format!("{K8S_NODE}.sock")).display()),
        dir,
        state: State {
            exe,
            ..Default::default()
        },
        children: Vec::new(),
        bed: None,
        nsmctl,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let interrupted = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tokio::pin!(interrupted);
    let outcome = tokio::select! {
        r = demo.bring_up(&args.prefix) => Some(r),
        _ = &mut interrupted => None,
    };
    match outcome {
        None => println!("\nInterrupted."),
        Some(Err(e)) => {
            println!();
            demo.show_logs();
            demo.teardown().await;
            return Err(e);
        }
        Some(Ok(())) if args.once => {}
        Some(Ok(())) => {
            println!();
            println!("The mesh stays up. Try:");
            println!("  export NSM_REGISTRY={}", demo.registry);
            println!("  {} get clients", demo.nsmctl.display());
            println!(
                "  nsenter --net={} ping {VM_ADDR}",
                demo.bed().netns_path(POD).display()
            );
            println!("Logs are in {}.", demo.dir.display());
            println!("Press Ctrl-C to tear it down (or run `nsm demo --down` from another shell).");
            interrupted.await;
        }
    }
    demo.teardown().await;
    Ok(())
}

impl Demo {
    fn bed(&self) -> &Testbed {
        self.bed.as_ref().expect("the test bed is up")
    }

    async fn bring_up(&mut self, prefix: &str) -> anyhow::Result<()> {
        println!("nsm demo: a pod reaches a VM that runs no nsm, and a service on a physical server that does.");
        println!();
        println!("  {prefix}-{POD} (workload on host {K8S_NODE}, 192.0.2.11)");
        println!("     ├─ vWire orders-vwire ─► {K8S_NODE} routes + masquerades ─► VM {VM_ADDR} (no nsm)");
        println!("     └─ vWire payments-vwire ═ VXLAN ═► host {SERVER} (10.0.0.7, nsm node) ─► {PAYMENTS} service");
        println!();

        let t = Instant::now();
        let topo = topology(prefix);
        self.state.namespaces = topo.netns_names();
        self.save()?;
        print!(
            "[1/5] Test bed: {} namespaces on one underlay bridge … ",
            self.state.namespaces.len()
        );
        flush();
        self.bed = Some(Testbed::up(topo).await.context("building the test bed")?);
        println!("done in {} ms", t.elapsed().as_millis());

        let t = Instant::now();
        print!("[2/5] Registry (embedded store) and an `nsm node` on each host … ");
        flush();
        let data = self.dir.join("registry-data");
        let _ = std::fs::remove_dir_all(&data);
        let registry = self.registry.clone();
        let data = data.display().to_string();
        self.spawn("registry", &["registry", "--listen", &registry, "--data-dir", &data])?;
        self.until("the registry answers", Duration::from_secs(10), |d| {
            d.ctl_quiet(&["get", "nodes"]).is_ok()
        })
        .await?;
        for (name, addr) in [(K8S_NODE, "192.0.2.11"), (SERVER, "10.0.0.7")] {
            let netns = self.bed().netns_path(name).display().to_string();
            let sock = format!("unix://{}", self.dir.join(format!("{name}.sock")).display());
            let tcp = format!("tcp://127.0.0.1:{}", free_port()?);
            let data = self.dir.join(name).display().to_string();
            self.spawn(
                name,
                &[
                    "node",
                    "--name",
                    name,
                    "--registry",
                    &registry,
                    "--host-netns",
                    &netns,
                    "--underlay-address",
                    addr,
                    "--listen",
                    &sock,
                    "--listen",
                    &tcp,
                    "--data-dir",
                    &data,
                    "--resync",
                    "1s",
                ],
            )?;
        }
        self.until("both nodes register", Duration::from_secs(10), |d| {
            d.ctl_quiet(&["get", "nodes", "-o", "json"])
                .is_ok_and(|o| o.contains(K8S_NODE) && o.contains(SERVER))
        })
        .await?;
        println!("done in {} ms", t.elapsed().as_millis());

        println!("[3/5] The design document's commands (the client creates run inside the pod):");
        println!("  export NSM_REGISTRY={}", self.registry);
        let pod = self.bed().netns_path(POD);
        let payments_ns = self.bed().netns_path(PAYMENTS).display().to_string();
        self.ctl(None, &["ns", "create", "istio-namespace", "--namespace=istio-system"])?;
        self.ctl(None, &["endpoint", "create", "vm-endpoint", "--address=10.0.0.5"])?;
        let first_create = Instant::now();
        self.ctl(
            Some(&pod),
            &[
                "client",
                "create",
                "orders-vwire",
                "--service=orders",
                "--endpoint=vm-endpoint",
            ],
        )?;
        self.ctl(None, &["ns", "create", PAYMENTS, "--cidr=10.80.0.0/24"])?;
        self.ctl(
            None,
            &[
                "endpoint",
                "create",
                "payments-server",
                "--service=payments",
                "--node=server",
                &format!("--netns={payments_ns}"),
            ],
        )?;
        self.ctl(
            Some(&pod),
            &["client", "create", "payments-vwire", "--service=payments"],
        )?;

        print!("[4/5] Waiting for the vWires … ");
        flush();
        let mut statuses = Vec::new();
        for name in ["orders-vwire", "payments-vwire"] {
            let mut last = serde_json::Value::Null;
            self.until(&format!("{name} is Ready"), Duration::from_secs(20), |d| {
                last = d
                    .ctl_quiet(&["get", "client", name, "-o", "json"])
                    .ok()
                    .and_then(|o| serde_json::from_str(&o).ok())
                    .unwrap_or_default();
                last["status"]["phase"] == "Ready"
            })
            .await
            .with_context(|| format!("last status of {name}: {}", last["status"]))?;
            statuses.push(last);
        }
        println!(
            "both Ready {} ms after the first `client create` (nsmctl runs included)",
            first_create.elapsed().as_millis()
        );
        self.ctl(None, &["get", "clients"])?;

        println!("[5/5] Proof that traffic flows:");
        let payments_addr = statuses[1]["status"]["dstIpAddrs"][0]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
            .context("payments-vwire has no peer address")?;
        let vm: IpAddr = VM_ADDR.parse()?;
        for (what, to) in [("VM", vm), ("payments service", payments_addr)] {
            let o = Command::new("nsenter")
                .arg(format!("--net={}", pod.display()))
                .args(["--", "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1"])
                .arg(to.to_string())
                .output()
                .context("running ping (Debian package iputils-ping)")?;
            let text = String::from_utf8_lossy(&o.stdout);
            let summary = text
                .lines()
                .filter(|l| l.contains("packets") || l.contains("rtt"))
                .collect::<Vec<_>>();
            println!("  $ nsenter --net={} ping -c 3 {to}    # the {what}", pod.display());
            for l in summary {
                println!("    {l}");
            }
            if !o.status.success() {
                bail!("ping from the pod to the {what} ({to}) failed");
            }
        }
        for (what, ns, to, port) in [
            ("the VM", VM, vm, 5201),
            ("the payments service", PAYMENTS, payments_addr, 5202),
        ] {
            let (bytes, took, seen) = tcp_transfer(self.bed().ns(POD), self.bed().ns(ns), to, port, 64 << 20)?;
            println!(
                "  TCP pod → {what} ({to}): {} MiB in {} ms = {:.2} Gbit/s; the server saw the connection from {}",
                bytes >> 20,
                took.as_millis(),
                bytes as f64 * 8.0 / took.as_secs_f64() / 1e9,
                seen.ip()
            );
        }
        println!(
            "  (the VM sees {K8S_NODE}'s underlay address 192.0.2.11: the node masquerades the vWire onto the underlay;"
        );
        println!("   the payments service sees the pod's own vWire address: the VXLAN tunnel carries it unchanged)");
        // Counters are read from the kernel on every resync (1 s here).
        tokio::time::sleep(Duration::from_millis(1300)).await;
        self.ctl(None, &["describe", "client", "orders-vwire"])?;
        self.ctl(None, &["describe", "client", "payments-vwire"])?;
        Ok(())
    }

    /// Starts `nsm ARGS` with its output in `<state dir>/<name>.log`, recording its pid first.
    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Command::new(&self.state.exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting nsm {}", args[0]))?;
        self.state.pids.push(child.id());
        self.children.push(child);
        self.save()
    }

    /// Runs and shows one nsmctl command (inside `netns` if given); fails if nsmctl does.
    fn ctl(&self, netns: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
        match netns {
            Some(p) => println!("  $ nsenter --net={} nsmctl {}", p.display(), args.join(" ")),
            None => println!("  $ nsmctl {}", args.join(" ")),
        }
        let out = self.ctl_command(netns, args).output().context("running nsmctl")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        for l in stdout.lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("    {l}");
        }
        if !out.status.success() {
            bail!("nsmctl {} failed", args.join(" "));
        }
        Ok(stdout.into_owned())
    }

    fn ctl_quiet(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctl_command(None, args).output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ctl_command(&self, netns: Option<&Path>, args: &[&str]) -> Command {
        let mut c = match netns {
            Some(p) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", p.display())).arg("--").arg(&self.nsmctl);
                c
            }
            None => Command::new(&self.nsmctl),
        };
        c.args(args)
            .env("NSM_REGISTRY", &self.registry)
            .env("NSM_NODE", &self.pod_node)
            .stdin(Stdio::null());
        c
    }

    /// Polls `cond` every 50 ms until it holds, or fails after `limit` saying what was awaited.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&mut Self) -> bool,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while !cond(self) {
            if start.elapsed() > limit {
                bail!("timed out after {limit:?} waiting until {what}");
            }
            if let Some(c) = self.children.iter_mut().find_map(|c| c.try_wait().ok().flatten()) {
                bail!("a daemon exited ({c}) while waiting until {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    fn show_logs(&self) {
        for name in ["registry", K8S_NODE, SERVER] {
            let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            if !tail.is_empty() {
                println!("--- last lines of {name}.log:");
                for l in tail.iter().rev() {
                    println!("    {l}");
                }
            }
        }
    }

    async fn teardown(&mut self) {
        print!("Tearing down … ");
        flush();
        for c in &self.children {
            signal(c.id(), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut problems = Vec::new();
        if let Some(bed) = self.bed.take()
            && let Err(e) = bed.down().await
        {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            let _ = std::fs::remove_file(self.dir.join(STATE_FILE));
            println!("done: every process stopped and every namespace deleted.");
        } else {
            println!("incomplete: {}; run `nsm demo --down` to retry", problems.join("; "));
        }
    }
}

/// Sends `bytes` over TCP from a socket in `from` to a listener on `to_addr` in `to`; returns the
/// bytes received, the time from connect to the last byte, and the peer address the server saw.
fn tcp_transfer(
    from: &NetNs,
    to: &NetNs,
    to_addr: IpAddr,
    port: u16,
    bytes: usize,
) -> anyhow::Result<(usize, Duration, SocketAddr)> {
    let addr = SocketAddr::new(to_addr, port);
    let listener = to.run(move || TcpListener::bind(addr))??;
    let server = std::thread::spawn(move || -> std::io::Result<(usize, SocketAddr)> {
        let (mut s, peer) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok((n, peer)),
                k => n += k,
            }
        }
    });
    let start = Instant::now();
    let mut stream = from.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))??;
    let chunk = vec![0x5au8; 1 << 16];
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&chunk)?;
        sent += chunk.len();
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let (received, peer) = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok((received, start.elapsed(), peer))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn flush() {
    let _ = std::io::stdout().flush();
}

fn read_state(dir: &Path) -> anyhow::Result<Option<State>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// True while `pid` runs `exe` (so a recycled pid is never signalled).
fn runs(pid: u32, exe: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Stops the processes and deletes the namespaces a state file lists.
fn down(dir: &Path, verbose: bool) -> anyhow::Result<()> {
    let Some(state) = read_state(dir)? else {
        if verbose {
            println!("No demo state in {}: nothing to remove.", dir.display());
        }
        return Ok(());
    };
    let mut stopped = Vec::new();
    for &pid in &state.pids {
        if runs(pid, &state.exe) {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
            stopped.push(pid);
        }
    }
    // A killed process's namespace fds close with it; wait until the pids are gone.
    let deadline = Instant::now() + Duration::from_secs(3);
    while stopped.iter().any(|p| runs(*p, &state.exe)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for name in state.namespaces.iter().rev() {
        match NetNs::delete(name) {
            Ok(()) => deleted.push(name.clone()),
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if verbose {
        println!("Stopped processes {stopped:?}; deleted namespaces {deleted:?}.");
    }
    if !errors.is_empty() {
        bail!("could not delete: {}", errors.join("; "));
    }
    std::fs::remove_file(dir.join(STATE_FILE)).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}
