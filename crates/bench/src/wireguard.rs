//! `nsm-bench wireguard`: encrypted cross-node throughput, latency and CPU cost, in one run on one
//! two-host test bed, through four wirings that stand side by side between the same two workloads
//! (`x` on host h1, `y` on host h2):
//!
//! - (a) `nsm`: a WIREGUARD vWire built by two `nsm node` daemons for a service with
//!   `encryption: required`. The TUN is the workload's interface, its UDP socket is in the host's
//!   namespace on the underlay, the WireGuard data plane runs in the node daemon.
//! - (b) `wireguard-go` (Debian), one daemon per host namespace, configured with `wg set`. Its TUN
//!   is moved into the workload's namespace (the daemon keeps its fd and its UDP socket stays in
//!   the host's), so packets take (a)'s path: workload → TUN → daemon → UDP on the underlay.
//! - (c) `boringtun-cli` from crates.io, set up like (b).
//! - (d) a VXLAN vWire by the same two nodes (`encryption: none`): clear text in the kernel, the
//!   ceiling.
//!
//! Each repetition runs iperf3 with 1 and then 4 streams over every wiring, in an order rotated
//! every repetition so that the machine's noise hits all alike, then pings; medians over the
//! repetitions. CPU cost per gigabit: the whole machine's busy CPU time during the iperf3 client's
//! run (see [`machine_busy`]) over the gigabits the receiver counted, and the share of the tunnel
//! daemons' own processes in it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use nsm_api::nsm::v1;
use nsm_dataplane::Netlink;
use nsm_testbed::Testbed;

use crate::common::{
    H1, H2, Proc, Signals, Verdict, cpu_time, iperf_client, iperf_server, median, on_bed, pings_us, print_summary,
    range, ticks, two_hosts, verdict,
};
use crate::vwire::{Mesh, client, client_status, wait_ready};

/// The wirings compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(crate) enum Wiring {
    /// (a) nsm's WIREGUARD vWire.
    Nsm,
    /// (b) Debian's wireguard-go, configured with wg.
    WireguardGo,
    /// (c) boringtun-cli from crates.io, configured with wg.
    Boringtun,
    /// (d) nsm's VXLAN vWire (clear text, the ceiling).
    Vxlan,
}

impl Wiring {
    fn label(self) -> &'static str {
        match self {
            Wiring::Nsm => "(a) nsm WIREGUARD",
            Wiring::WireguardGo => "(b) wireguard-go",
            Wiring::Boringtun => "(c) boringtun-cli",
            Wiring::Vxlan => "(d) nsm VXLAN",
        }
    }

    fn letter(self) -> &'static str {
        &self.label()[1..2]
    }
}

/// Flags of `nsm-bench wireguard`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Wirings to measure (comma-separated); a ratio is reported when both of its wirings are.
    #[arg(long, value_delimiter = ',', value_enum,
          default_values_t = [Wiring::Nsm, Wiring::WireguardGo, Wiring::Boringtun, Wiring::Vxlan])]
    only: Vec<Wiring>,
    /// Repetitions; each runs every wiring once per stream count, medians are compared.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Pings per wiring, 10 ms apart, spread over the repetitions.
    #[arg(long, default_value_t = 200)]
    pings: u32,
    /// An existing boringtun-cli (default: TARGET/bench-tools/bin/boringtun-cli, installed there
    /// with `cargo install boringtun-cli --locked` if missing; TARGET is the directory above this
    /// binary's profile directory).
    #[arg(long)]
    boringtun_bin: Option<PathBuf>,
    /// The `nsm` binary (default: next to this one).
    #[arg(long)]
    pub(crate) nsm_bin: Option<PathBuf>,
    /// Lanes of nsm's WIREGUARD vWire (the nodes' `--wireguard-lanes`; default: theirs, 1).
    #[arg(long)]
    lanes: Option<String>,
}

/// MTU of every wiring's encrypted interface: what nsm gives a WIREGUARD vWire on a 1500 underlay
/// (and wireguard-go's default), so that all carry the same packet sizes.
const WG_MTU: u32 = 1420;
/// UDP ports of the stock daemons, outside nsm's default WireGuard range (51820–52819).
const WIREGUARD_GO_PORT: u16 = 53100;
const BORINGTUN_PORT: u16 = 53200;

pub(crate) async fn run(args: Args, bin: PathBuf) -> anyhow::Result<()> {
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let boringtun = if args.only.contains(&Wiring::Boringtun) {
        Some(boringtun_bin(&args)?)
    } else {
        None
    };
    println!("Versions and machine:\n");
    for line in versions(&bin, boringtun.as_deref()) {
        println!("- {line}");
    }
    // Interrupted: the test bed, daemons and nodes go when the future is dropped.
    let summary = Signals::new()?.run(measure(&args, &bin, boringtun.as_deref())).await?;
    print_summary(&summary);
    Ok(())
}

/// The boringtun-cli to run: `--boringtun-bin`, or the one in TARGET/bench-tools, installed there
/// first if missing (progress from cargo on stderr).
fn boringtun_bin(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(b) = &args.boringtun_bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot tell the target directory from this binary's path")?;
    let root = target.join("bench-tools");
    let bin = root.join("bin").join("boringtun-cli");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "boringtun-cli not found: cargo install boringtun-cli --locked --root {} (a few minutes) …",
        root.display()
    );
    let status = Command::new("cargo")
        .args(["install", "boringtun-cli", "--locked", "--root"])
        .arg(&root)
        .stdin(Stdio::null())
        .status()
        .context("cargo")?;
    if !status.success() || !bin.exists() {
        bail!("cargo install boringtun-cli failed ({status}); pass --boringtun-bin PATH");
    }
    Ok(bin)
}

/// What the figures depend on: the tools' versions, nsm's revision, kernel and CPU.
fn versions(nsm: &Path, boringtun: Option<&Path>) -> Vec<String> {
    let first_line = |program: &Path, args: &[&str]| -> String {
        match Command::new(program).args(args).output() {
            Ok(o) => {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("(no output)")
                    .to_string()
            }
            Err(e) => format!("{}: {e}", program.display()),
        }
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = Path::new("git");
    let rev = first_line(
        git,
        &[
            "-C",
            &repo.display().to_string(),
            "describe",
            "--always",
            "--dirty",
            "--abbrev=12",
        ],
    );
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim()))
        .unwrap_or("?");
    let mut v = vec![
        format!(
            "nsm: {} (source tree now at git {rev})",
            first_line(nsm, &["--version"])
        ),
        format!(
            "wireguard-go --version: {}",
            first_line(Path::new("wireguard-go"), &["--version"])
        ),
        format!("wg --version: {}", first_line(Path::new("wg"), &["--version"])),
        format!("iperf3 --version: {}", first_line(Path::new("iperf3"), &["--version"])),
        format!(
            "kernel {}, {} CPUs ({cpu})",
            read("/proc/sys/kernel/osrelease").trim(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    ];
    if let Some(b) = boringtun {
        v.insert(2, format!("boringtun-cli --version: {}", first_line(b, &["--version"])));
    }
    v
}

/// Busy CPU time of the whole machine so far: user + nice + system + irq + softirq summed over all
/// CPUs, from the first line of /proc/stat (guest time is already part of user; idle, iowait and
/// steal are not counted). Every process counts, the benchmark's own and anything else running.
fn machine_busy() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let f: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if f.len() < 7 {
        bail!("/proc/stat: short cpu line");
    }
    ticks(f[0] + f[1] + f[2] + f[5] + f[6])
}

/// Share of all CPUs busy over 3 s (%) while the benchmark sends nothing: the load that others put
/// on the machine, which the CPU-per-gigabit figures include.
async fn background_busy(cpus: f64) -> anyhow::Result<f64> {
    let (t0, m0) = (Instant::now(), machine_busy()?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(100.0 * (machine_busy()? - m0).as_secs_f64() / (t0.elapsed().as_secs_f64() * cpus))
}

/// A stock userspace WireGuard daemon (`wireguard-go`, `boringtun-cli`) in a host's namespace,
/// serving `wg` on its socket /var/run/wireguard/DEV.sock; killed and the socket removed when
/// dropped (a killed daemon leaves it behind).
struct StockDaemon {
    proc: Proc,
    sock: PathBuf,
}

impl StockDaemon {
    /// Starts `program args… dev` in `host`'s namespace (output to `log`) and waits for its socket.
    fn start(bed: &Testbed, host: &str, program: &Path, args: &[&str], dev: &str, log: &Path) -> anyhow::Result<Self> {
        let sock = PathBuf::from(format!("/var/run/wireguard/{dev}.sock"));
        if sock.exists() {
            bail!("{} exists: another daemon serves {dev}", sock.display());
        }
        let out = std::fs::File::create(log)?;
        let mut proc = Proc(
            Command::new("nsenter")
                .arg(format!("--net={}", bed.netns_path(host).display()))
                .arg("--")
                .arg(program)
                .args(args)
                .arg(dev)
                // wireguard-go refuses to run where a kernel module exists unless told to.
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))?,
        );
        let daemon = |proc| StockDaemon {
            proc,
            sock: sock.clone(),
        };
        let start = Instant::now();
        while !sock.exists() {
            if let Some(status) = proc.0.try_wait()? {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{} {dev} exited ({status}):\n{log}", program.display());
            }
            if start.elapsed() > Duration::from_secs(10) {
                drop(daemon(proc));
                bail!("{} {dev}: no {} within 10 s", program.display(), sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon(proc))
    }
}

impl Drop for StockDaemon {
    fn drop(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Runs `wg ARGS` (the daemons' sockets are found by name, from any namespace) with `stdin`;
/// returns its trimmed output.
fn wg(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("wg (Debian package wireguard-tools)")?;
    if let Some(s) = stdin {
        child.stdin.take().context("wg stdin")?.write_all(s.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// A stock tunnel between `x` and `y`: one daemon per host namespace, each TUN moved into its
/// workload with a /32 address and a route to the other's, keys from `wg genkey`.
struct StockTunnel {
    daemons: Vec<StockDaemon>,
    /// `y`'s address on it.
    dst: IpAddr,
}

/// Brings up a [`StockTunnel`] of `program args…` on interfaces `{tag}{pid}x` / `{tag}{pid}y`
/// (unique on the machine: the daemons' sockets share one directory), addresses 10.97.`net`.1/.2,
/// UDP `port` on each host's underlay address; keys, logs in `dir`.
async fn stock_tunnel(
    bed: &Testbed,
    dir: &Path,
    (program, args): (&Path, &[&str]),
    tag: &str,
    net: u8,
    port: u16,
) -> anyhow::Result<StockTunnel> {
    let ends = [("h1", "x", H1), ("h2", "y", H2)];
    let pid = std::process::id();
    let devs = ends.map(|(_, w, _)| format!("{tag}{pid}{w}"));
    let addrs: [IpNet; 2] = [
        format!("10.97.{net}.1/32").parse()?,
        format!("10.97.{net}.2/32").parse()?,
    ];
    let mut keys = Vec::new();
    for dev in &devs {
        let private = wg(&["genkey"], None)?;
        let public = wg(&["pubkey"], Some(&private))?;
        let file = dir.join(format!("{dev}.key"));
        std::fs::write(&file, &private)?;
        keys.push((file, public));
    }
    let mut daemons = Vec::new();
    for (i, (host, _, _)) in ends.iter().enumerate() {
        let log = dir.join(format!("{}.log", devs[i]));
        daemons.push(StockDaemon::start(bed, host, program, args, &devs[i], &log)?);
    }
    for (i, (host, workload, _)) in ends.iter().enumerate() {
        let (dev, peer) = (&devs[i], 1 - i);
        let hnl = Netlink::connect(bed.ns(host)).await?;
        hnl.set_mtu(dev, WG_MTU).await?;
        hnl.move_to(dev, bed.ns(workload)).await?;
        wg(
            &[
                "set",
                dev,
                "listen-port",
                &port.to_string(),
                "private-key",
                &keys[i].0.display().to_string(),
                "peer",
                &keys[peer].1,
                "allowed-ips",
                &addrs[peer].to_string(),
                "endpoint",
                &format!("{}:{port}", ends[peer].2),
            ],
            None,
        )?;
        let wnl = Netlink::connect(bed.ns(workload)).await?;
        wnl.add_address(dev, addrs[i]).await?;
        wnl.set_up(dev).await?;
        wnl.add_route(addrs[peer], None, dev).await?;
    }
    Ok(StockTunnel {
        daemons,
        dst: addrs[1].addr(),
    })
}

/// One wiring under test: where `y` is on it, and the processes that carry its packets (whose
/// CPU is reported separately).
struct Under {
    wiring: Wiring,
    dst: IpAddr,
    pids: Vec<u32>,
}

/// Per wiring, per stream count (1, 4): one value per repetition.
#[derive(Default)]
struct Figures {
    gbps: [Vec<f64>; 2],
    /// Busy CPU seconds of the whole machine per gigabit received.
    cpu_per_gbit: [Vec<f64>; 2],
    /// The tunnel processes' CPU seconds per gigabit received.
    daemon_cpu_per_gbit: [Vec<f64>; 2],
    /// Busy share of all CPUs during the run, %.
    busy: [Vec<f64>; 2],
    /// RTT samples, µs.
    rtt: Vec<f64>,
}

/// CPU time of `pids` so far.
fn pids_cpu(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter().map(|&p| cpu_time(p)).sum()
}

async fn measure(args: &Args, bin: &Path, boringtun: Option<&Path>) -> anyhow::Result<Vec<Verdict>> {
    let topo = two_hosts("wgb", vec![("x".into(), "h1"), ("y".into(), "h2")])?;
    on_bed(topo, async |bed: &Testbed| {
        let dir = tempfile::tempdir()?;
        let mut under = Vec::new();
        let want = |w| args.only.contains(&w);

        // (a) and (d): two nodes, one service each way, an endpoint in y, clients in x.
        eprintln!("starting a registry and nsm nodes on h1 and h2 …");
        let mut mesh = Mesh::start(bin).await?;
        if let Some(l) = &args.lanes {
            mesh.node_flags = vec!["--wireguard-lanes".into(), l.clone()];
            eprintln!("nsm nodes with --wireguard-lanes {l}");
        }
        let node_a = mesh.node("node-a", H1, Some(&bed.netns_path("h1")), true, None).await?;
        let node_b = mesh.node("node-b", H2, Some(&bed.netns_path("h2")), true, None).await?;
        let mut api = node_a.api.clone();
        let nodes = vec![node_a.pid, node_b.pid];
        for (wiring, svc, cidr, encryption, ifname, mechanism) in [
            (Wiring::Nsm, "wgsvc", "10.93.0.0/24", "required", "nsm-1", "WIREGUARD"),
            (Wiring::Vxlan, "vxsvc", "10.94.0.0/24", "none", "nsm-2", "VXLAN"),
        ] {
            if !want(wiring) {
                continue;
            }
            let spec = v1::NetworkServiceSpec {
                cidr: cidr.into(),
                encryption: encryption.into(),
                ..Default::default()
            };
            mesh.service_spec(svc, spec).await?;
            let ep = format!("ep-{svc}");
            mesh.endpoint(&ep, svc, &bed.netns_path("y"), "node-b").await?;
            api.create_client(client(svc, svc, &bed.netns_path("x"), &ep, ifname))
                .await?;
            let (_, dst) = wait_ready(&mut mesh.res, svc).await?;
            let got = client_status(&mut mesh.res, svc).await?.unwrap_or_default().mechanism;
            if got != mechanism {
                bail!("{}: the client's vWire is {got}, not {mechanism}", wiring.label());
            }
            eprintln!("{}: client Ready, {mechanism} vWire x → {dst}", wiring.label());
            under.push(Under {
                wiring,
                dst,
                pids: nodes.clone(),
            });
        }

        // (b) and (c): stock daemons in the host namespaces.
        let mut stock = Vec::new();
        let wireguard_go = Path::new("wireguard-go");
        let stock_kinds = [
            (Wiring::WireguardGo, Some(wireguard_go), &["-f"][..], "wgo", 1, WIREGUARD_GO_PORT),
            (
                Wiring::Boringtun,
                boringtun,
                &["--foreground", "--disable-drop-privileges"][..],
                "btn",
                2,
                BORINGTUN_PORT,
            ),
        ];
        for (wiring, program, argv, tag, net, port) in stock_kinds {
            let Some(program) = program.filter(|_| want(wiring)) else {
                continue;
            };
            let t = stock_tunnel(bed, dir.path(), (program, argv), tag, net, port).await?;
            eprintln!("{}: daemons up, tunnel x → {}", wiring.label(), t.dst);
            under.push(Under {
                wiring,
                dst: t.dst,
                pids: t.daemons.iter().map(|d| d.proc.pid()).collect(),
            });
            stock.push(t);
        }
        under.sort_by_key(|u| u.wiring as u8);
        for u in &under {
            if !bed.ping("x", u.dst, 5) {
                bail!("{}: x cannot ping {}", u.wiring.label(), u.dst);
            }
        }

        let n = under.len();
        let per_rep = args.pings.div_ceil(args.reps as u32);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut figs: Vec<Figures> = (0..n).map(|_| Figures::default()).collect();
        eprintln!(
            "{} × (iperf3 1 and 4 streams, {} s; {per_rep} pings) over {n} wirings, order rotated every repetition …",
            args.reps, args.seconds
        );
        let before = background_busy(cpus).await?;
        eprintln!("CPUs busy with nothing sent, over 3 s: {before:.0} % of {cpus:.0}");
        for r in 0..args.reps {
            let mut order: Vec<usize> = (0..n).collect();
            order.rotate_left(r % n);
            for (si, streams) in [1u32, 4].into_iter().enumerate() {
                for &w in &order {
                    let u = &under[w];
                    let _srv = iperf_server(bed, "y", u.dst)?;
                    let (t0, m0, p0) = (Instant::now(), machine_busy()?, pids_cpu(&u.pids)?);
                    let run = iperf_client(bed, "x", u.dst, streams, args.seconds)?;
                    let (wall, m1, p1) = (t0.elapsed(), machine_busy()?, pids_cpu(&u.pids)?);
                    let gbit = run.bytes * 8.0 / 1e9;
                    let (cpu, daemon) = ((m1 - m0).as_secs_f64(), (p1 - p0).as_secs_f64());
                    let f = &mut figs[w];
                    f.gbps[si].push(run.gbps);
                    f.cpu_per_gbit[si].push(cpu / gbit);
                    f.daemon_cpu_per_gbit[si].push(daemon / gbit);
                    f.busy[si].push(100.0 * cpu / (wall.as_secs_f64() * cpus));
                    eprintln!(
                        "  rep {r} {:<18} {streams} stream(s): {:6.2} Gbit/s, {:.3} CPU-s/Gbit (tunnel processes {:.3}), CPUs {:.0} % busy, {} TCP retransmits",
                        u.wiring.label(),
                        run.gbps,
                        cpu / gbit,
                        daemon / gbit,
                        100.0 * cpu / (wall.as_secs_f64() * cpus),
                        run.retransmits.map_or("?".into(), |n| n.to_string()),
                    );
                    // Runs block this thread; let a Ctrl-C or SIGTERM end the benchmark between them.
                    tokio::task::yield_now().await;
                }
            }
            for &w in &order {
                figs[w].rtt.extend(pings_us(bed, "x", under[w].dst, per_rep)?);
            }
        }
        drop(stock);
        let after = background_busy(cpus).await?;
        println!(
            "\nCPUs busy with nothing sent (other processes on the machine), 3 s before and after the runs: \
             {before:.0} % and {after:.0} % of {cpus:.0}"
        );
        Ok(report(args, &under, &figs, cpus))
    })
    .await
}

/// Prints the figures table and returns the verdicts.
fn report(args: &Args, under: &[Under], figs: &[Figures], cpus: f64) -> Vec<Verdict> {
    let idx = |w: Wiring| under.iter().position(|u| u.wiring == w);
    let a = idx(Wiring::Nsm);
    // Ratio columns: (a) against each other wiring measured with it.
    let others: Vec<usize> = match a {
        Some(a) => (0..under.len()).filter(|&i| i != a).collect(),
        None => Vec::new(),
    };
    let reps = args.reps;
    let mut head = String::from("| measurement |");
    let mut rule = String::from("|---|");
    for u in under {
        let _ = write!(head, " {} |", u.wiring.label());
        rule.push_str("---:|");
    }
    for &o in &others {
        let _ = write!(head, " a ÷ {} |", under[o].wiring.letter());
        rule.push_str("---:|");
    }
    println!(
        "\nWireGuard: x on h1 → y on h2, {reps} repetition(s) of {} s:\n",
        args.seconds
    );
    println!("{head}\n{rule}");
    let row = |name: String, values: &dyn Fn(&Figures) -> String, ratio: &dyn Fn(&Figures, &Figures) -> String| {
        let mut line = format!("| {name} |");
        for f in figs {
            let _ = write!(line, " {} |", values(f));
        }
        if let Some(a) = a {
            for &o in &others {
                let _ = write!(line, " {} |", ratio(&figs[a], &figs[o]));
            }
        }
        println!("{line}");
    };
    for (si, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
        row(
            format!("TCP {streams}, Gbit/s, median of {reps} (range)"),
            &|f| format!("{:.2} ({})", median(&f.gbps[si]), range(&f.gbps[si])),
            &|a, o| format!("{:.2}", median(&a.gbps[si]) / median(&o.gbps[si])),
        );
    }
    row(
        format!("RTT, median of {} pings, µs", figs.first().map_or(0, |f| f.rtt.len())),
        &|f| format!("{:.0}", median(&f.rtt)),
        &|a, o| format!("{:+.0} µs", median(&a.rtt) - median(&o.rtt)),
    );
    for (si, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
        row(
            format!("CPU per Gbit, {streams}: whole machine, CPU-s"),
            &|f| format!("{:.3}", median(&f.cpu_per_gbit[si])),
            &|a, o| format!("{:.2}", median(&a.cpu_per_gbit[si]) / median(&o.cpu_per_gbit[si])),
        );
        row(
            format!("— of it the tunnel processes', CPU-s ({streams})"),
            &|f| format!("{:.3}", median(&f.daemon_cpu_per_gbit[si])),
            &|_, _| String::new(),
        );
        row(
            format!("CPUs busy during the {streams} runs, % of {cpus:.0}"),
            &|f| format!("{:.0}", median(&f.busy[si])),
            &|_, _| String::new(),
        );
    }
    println!(
        "\nCPU per Gbit: busy CPU time of the whole machine (user + nice + system + irq + softirq over all CPUs, \
         /proc/stat; every process, including iperf3 at both ends and anything else running) during the iperf3 \
         client's run, divided by the gigabits the receiver counted. Tunnel processes: utime + stime of the two \
         nsm node daemons ((a), (d)) or the two stock daemons ((b), (c)), /proc/PID/stat."
    );

    let mut v = Vec::new();
    let Some(ai) = a else { return v };
    let fa = &figs[ai];
    for (w, target) in [
        (Wiring::WireguardGo, 3.0),
        (Wiring::Boringtun, 3.0),
        (Wiring::Vxlan, 0.25),
    ] {
        let Some(o) = idx(w) else { continue };
        for (si, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
            let (x, y) = (median(&fa.gbps[si]), median(&figs[o].gbps[si]));
            v.push(verdict(
                format!("TCP {streams}: (a) ÷ {} ≥ {target}", w.label()),
                format!("{:.2} ({x:.2} ÷ {y:.2} Gbit/s)", x / y),
                Some(x / y >= target),
            ));
        }
    }
    if let Some(b) = idx(Wiring::WireguardGo) {
        let (x, y) = (median(&fa.rtt), median(&figs[b].rtt));
        v.push(verdict(
            "RTT: (a) no worse than (b) wireguard-go",
            format!("{x:.0} vs {y:.0} µs (medians)"),
            Some(x <= y),
        ));
    }
    for (si, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
        let mut figure = format!("(a) {:.3}", median(&fa.cpu_per_gbit[si]));
        for &o in &others {
            let _ = write!(
                figure,
                ", ({}) {:.3}",
                under[o].wiring.letter(),
                median(&figs[o].cpu_per_gbit[si])
            );
        }
        v.push(verdict(
            format!("CPU-s per Gbit, {streams}, whole machine"),
            figure,
            None,
        ));
    }
    v
}
