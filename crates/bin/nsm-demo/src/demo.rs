//! `nsm demo`: the design document's hybrid-cloud path, as far as vWires go, on one machine.
//!
//! It builds a test bed (namespaces for two hosts, a VM and two workloads on one underlay bridge),
//! starts a registry on the embedded store and an `nsm node` per host, runs the design document's
//! `nsmctl` commands (the `client create`s inside the pod, as a pod would), and proves that
//! traffic flows: pings, a TCP transfer, the counters. Everything it starts or creates is listed in
//! a state file first, so `nsm demo --down` can remove what a killed demo left behind.
//!
//! The daemons are the `nsm` binary's (`--nsm`, which `nsm demo` sets to itself; else `nsm` next to
//! this binary), and `nsmctl` is the one next to that.

use std::collections::BTreeMap;
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
    /// The nsm binary that runs the registry and the node daemons (nsmctl is taken from its
    /// directory). `nsm demo` passes itself. Default: `nsm` next to this binary.
    #[arg(long, env = "NSM_BIN", hide_env_values = true)]
    nsm: Option<PathBuf>,
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
/// An on-premises VM that runs nsm (a vL3 member lives on it).
const ONPREM_VM: &str = "onprem-vm";
/// The hosts that run `nsm node`, with their underlay addresses.
const NODES: [(&str, &str); 3] = [(K8S_NODE, "192.0.2.11"), (SERVER, "10.0.0.7"), (ONPREM_VM, "10.0.0.8")];
/// vL3 members: (workload = client name, host, client namespace, service).
const MEMBERS: [(&str, &str, &str, &str); 6] = [
    ("web", K8S_NODE, "istio-system", "istio"),
    ("vm-app", ONPREM_VM, "istio-system", "istio"),
    ("db", SERVER, "istio-system", "istio"),
    ("shop-a", K8S_NODE, "default", "tenant-a"),
    ("shop-b", K8S_NODE, "default", "tenant-b"),
    ("billing", SERVER, "default", "mesh-net"),
];
const VL3: &str = "mesh-net";

fn topology(prefix: &str) -> Topology {
    Topology {
        prefix: prefix.to_owned(),
        hosts: NODES
            .iter()
            .map(|(name, addr)| HostSpec {
                name: (*name).into(),
                underlay_addr: addr.parse().expect("address"),
            })
            .collect(),
        workloads: [(POD, K8S_NODE), (PAYMENTS, SERVER)]
            .into_iter()
            .chain(MEMBERS.iter().map(|(w, h, _, _)| (*w, *h)))
            .map(|(name, host)| WorkloadSpec {
                name: name.into(),
                host: host.into(),
            })
            .collect(),
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
    /// The registry's TCP URL (mutual TLS): what nsmctl and the nodes dial.
    registry: String,
    /// Its admin config (the registry writes it on its first start).
    admin_config: PathBuf,
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
    let exe = match &args.nsm {
        Some(nsm) => nsm.clone(),
        None => std::env::current_exe()
            .context("locating the nsm-demo binary")?
            .with_file_name("nsm"),
    };
    // The path the kernel shows in /proc/PID/exe, which `runs` compares with.
    let exe = std::fs::canonicalize(&exe).with_context(|| {
        format!(
            "the nsm binary {} (build all three: cargo build --release -p nsm -p nsmctl -p nsm-demo)",
            exe.display()
        )
    })?;
    let nsmctl = exe.with_file_name("nsmctl");
    if !nsmctl.exists() {
        bail!(
            "nsmctl not found next to {} (build all three: cargo build --release -p nsm -p nsmctl -p nsm-demo)",
            exe.display()
        );
    }
    let dir = args.state_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut demo = Demo {
        registry: format!("tcp://127.0.0.1:{}", free_port()?),
        admin_config: dir.join("registry-data").join("admin.config"),
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
            println!("  export NSM_CONFIG={}", demo.admin_config.display());
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
        // The vL3 routers the nodes will make (they outlive a daemon by design).
        self.state
            .namespaces
            .extend(NODES.iter().map(|(n, _)| nsm_node::vl3::router_netns(n, VL3)));
        self.save()?;
        print!(
            "[1/7] Test bed: {} namespaces on one underlay bridge … ",
            self.state.namespaces.len()
        );
        flush();
        self.bed = Some(Testbed::up(topo).await.context("building the test bed")?);
        println!("done in {} ms", t.elapsed().as_millis());

        let t = Instant::now();
        print!("[2/7] Registry (embedded store) and an `nsm node` on each host … ");
        flush();
        let data = self.dir.join("registry-data");
        let _ = std::fs::remove_dir_all(&data);
        let registry = self.registry.clone();
        let data = data.display().to_string();
        let socket = format!("unix://{}", self.dir.join("registry.sock").display());
        // Identities on, as a domain runs: the registry creates its CA and the admin config, and
        // each node joins with a one-time token from `nsmctl node create`.
        self.spawn(
            "registry",
            &[
                "registry",
                "--listen",
                &registry,
                "--listen",
                &socket,
                "--data-dir",
                &data,
            ],
        )?;
        self.until("the registry answers", Duration::from_secs(10), |d| {
            d.ctl_quiet(&["get", "nodes"]).is_ok()
        })
        .await?;
        for (name, addr) in NODES {
            let netns = self.bed().netns_path(name).display().to_string();
            let sock = format!("unix://{}", self.dir.join(format!("{name}.sock")).display());
            let tcp = format!("tcp://127.0.0.1:{}", free_port()?);
            let data = self.dir.join(name).display().to_string();
            let created = self.ctl_quiet(&["node", "create", name, "-o", "json"])?;
            let token = serde_json::from_str::<serde_json::Value>(&created)
                .ok()
                .and_then(|v| v["joinToken"].as_str().map(str::to_owned))
                .with_context(|| format!("no join token for node {name} in {created:?}"))?;
            self.spawn(
                name,
                &[
                    "node",
                    "--join",
                    &token,
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
        // `node create` made the Nodes; a node has registered when its daemon has set its URL.
        self.until("every node registers", Duration::from_secs(10), |d| {
            NODES.iter().all(|(n, _)| {
                d.ctl_quiet(&["get", "node", n, "-o", "json"])
                    .ok()
                    .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                    .is_some_and(|v| v["spec"]["url"].as_str().is_some_and(|u| !u.is_empty()))
            })
        })
        .await?;
        println!("done in {} ms", t.elapsed().as_millis());

        println!("[3/7] The design document's commands (the client creates run inside the pod):");
        println!("  export NSM_REGISTRY={}", self.registry);
        println!(
            "  export NSM_CONFIG={}    # the admin's identity",
            self.admin_config.display()
        );
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

        print!("[4/7] Waiting for the vWires … ");
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

        println!("[5/7] Proof that traffic flows:");
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
        self.vl3().await
    }

    /// The design document's two vL3 scenarios on one vL3: hybrid cloud (a pod through Istio to an
    /// on-premises VM and a physical server, by name) and multi-tenant SaaS (tenant services
    /// isolated from each other, all reaching a shared endpoint).
    async fn vl3(&mut self) -> anyhow::Result<()> {
        println!("[6/7] vL3 `{VL3}`: Istio, two tenants and a shared billing service on one virtual L3 network:");
        println!(
            "  hybrid cloud:  web (pod, {K8S_NODE}) → istio → {VL3} → vm-app (on-prem VM {ONPREM_VM}) → db (physical server {SERVER})"
        );
        println!("  multi-tenant:  shop-a → tenant-a ┐");
        println!("                 shop-b → tenant-b ┴→ {VL3} (shared) → billing");
        self.ctl(None, &["ns", "create", VL3, "--type", "vl3", "--cidr", "172.16.0.0/16"])?;
        self.ctl(
            None,
            &[
                "ns",
                "create",
                "istio",
                "--namespace=istio-system",
                "--vl3",
                "mesh-net.default",
            ],
        )?;
        self.ctl(None, &["ns", "create", "tenant-a", "--vl3", VL3])?;
        self.ctl(None, &["ns", "create", "tenant-b", "--vl3", VL3])?;
        let first = Instant::now();
        for (w, host, ns, service) in MEMBERS {
            let netns = self.bed().netns_path(w);
            self.ctl_on(
                Some((&netns, host)),
                &["client", "create", w, "--service", service, "-n", ns],
            )?;
        }
        print!("[7/7] Waiting for the members … ");
        flush();
        let mut members = BTreeMap::new();
        for (w, _, ns, _) in MEMBERS {
            let mut last = serde_json::Value::Null;
            self.until(&format!("{w} is Ready"), Duration::from_secs(20), |d| {
                last = d
                    .ctl_quiet(&["get", "client", w, "-n", ns, "-o", "json"])
                    .ok()
                    .and_then(|o| serde_json::from_str(&o).ok())
                    .unwrap_or_default();
                last["status"]["phase"] == "Ready"
            })
            .await
            .with_context(|| format!("last status of {w}: {}", last["status"]))?;
            let st = &last["status"];
            let addr: IpAddr = st["srcIpAddrs"][0]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .context("member without an address")?;
            let dns: IpAddr = st["dnsServers"][0]
                .as_str()
                .and_then(|a| a.parse().ok())
                .context("member without a DNS server")?;
            let name = st["dnsName"].as_str().unwrap_or_default().to_owned();
            members.insert(w, (addr, dns, name));
        }
        println!(
            "all {} members Ready {} ms after the first create",
            members.len(),
            first.elapsed().as_millis()
        );
        self.ctl(None, &["get", "clients", "-A"])?;
        self.ctl(None, &["get", "prefixes"])?;

        println!("  Names resolve from the pod (through the DNS server its connection names), and traffic flows:");
        let (_, web_dns, _) = members["web"].clone();
        for to in ["vm-app", "db", "billing"] {
            let (addr, _, name) = members[to].clone();
            // A member Ready on another node has its name on web's router once web's node has
            // seen that status in its watch: moments later, not necessarily before the registry
            // told us.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let got = resolve(self.bed().ns("web"), web_dns, &name)?;
                if got == Some(addr) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} resolved to {got:?} from web for 3 s, expected {addr}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let ok = self.ping("web", addr);
            println!(
                "    web: {name} → {addr}; ping {}",
                if ok { "answered" } else { "FAILED" }
            );
            if !ok {
                bail!("web cannot reach {name}");
            }
        }
        let (db, _, _) = members["db"].clone();
        let (bytes, took, _) = tcp_transfer(self.bed().ns("web"), self.bed().ns("db"), db, 5203, 64 << 20)?;
        println!(
            "    TCP web → db.istio. across the vL3: {} MiB in {} ms = {:.2} Gbit/s",
            bytes >> 20,
            took.as_millis(),
            bytes as f64 * 8.0 / took.as_secs_f64() / 1e9
        );
        println!("  Tenants reach the shared billing endpoint, not each other (enforced by the routers):");
        let checks = [
            ("shop-a", "billing", true),
            ("shop-b", "billing", true),
            ("shop-a", "shop-b", false),
            ("shop-b", "shop-a", false),
        ];
        for (from, to, expected) in checks {
            let (addr, _, name) = members[to].clone();
            let ok = self.ping(from, addr);
            println!(
                "    {from} → {name} ({addr}): {}",
                match (ok, expected) {
                    (true, true) => "reached",
                    (false, false) => "blocked, as intended",
                    (true, false) => "REACHED (isolation broken)",
                    (false, true) => "FAILED",
                }
            );
            if ok != expected {
                bail!(
                    "{from} → {to}: expected {}",
                    if expected { "reachable" } else { "blocked" }
                );
            }
        }
        Ok(())
    }

    fn ping(&self, from: &str, to: IpAddr) -> bool {
        self.bed().ping(from, to, 2)
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

    /// Runs and shows one nsmctl command (inside `netns` if given, talking to the pod's node);
    /// fails if nsmctl does.
    fn ctl(&self, netns: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
        self.ctl_on(netns.map(|p| (p, K8S_NODE)), args)
    }

    /// Like [`Demo::ctl`], inside a workload on the given node's host.
    fn ctl_on(&self, within: Option<(&Path, &str)>, args: &[&str]) -> anyhow::Result<String> {
        match within {
            Some((p, node)) => println!(
                "  $ nsenter --net={} nsmctl {}    # on {node}",
                p.display(),
                args.join(" ")
            ),
            None => println!("  $ nsmctl {}", args.join(" ")),
        }
        let mut cmd = self.ctl_command(within.map(|(p, _)| p), args);
        if let Some((_, node)) = within {
            cmd.env(
                "NSM_NODE",
                format!("unix://{}", self.dir.join(format!("{node}.sock")).display()),
            );
        }
        let out = cmd.output().context("running nsmctl")?;
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
            .env("NSM_CONFIG", &self.admin_config)
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
        for name in ["registry", K8S_NODE, SERVER, ONPREM_VM] {
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
        // What the nodes made outside the test bed (vL3 routers), by the names recorded.
        let bed_names = topology("").netns_names().len();
        for name in self.state.namespaces.iter().skip(bed_names) {
            match NetNs::delete(name) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => problems.push(e.to_string()),
            }
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

/// Asks `server` for the address of `name` from inside `ns` (a plain DNS query over UDP).
fn resolve(ns: &NetNs, server: IpAddr, name: &str) -> anyhow::Result<Option<IpAddr>> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut q = Message::query();
    q.metadata.id = 1;
    q.metadata.recursion_desired = true;
    let qtype = if server.is_ipv4() {
        RecordType::A
    } else {
        RecordType::AAAA
    };
    q.add_query(Query::query(Name::from_ascii(name)?, qtype));
    let bytes = q.to_vec()?;
    let sock = ns.run(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        sock.send_to(&bytes, SocketAddr::new(server, 53))?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let m = Message::from_vec(&buf[..n])?;
            return Ok(m.answers.iter().find_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            }));
        }
    }
    bail!("no answer from the DNS server {server}")
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
