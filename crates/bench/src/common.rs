//! What the benchmark subcommands share: running parts until a signal, the summary table, test
//! beds and processes that go away when dropped, a registry and its nodes' registration, iperf3
//! and ping runs, and a few statistics.

use std::fmt::Debug;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nsm_api::nsm::v1::{self, resource_service_client::ResourceServiceClient};
use nsm_testbed::{HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};
use tokio::signal::unix::{Signal, SignalKind};
use tonic::transport::Channel;

/// The IANA VXLAN port, which nsm uses.
pub(crate) const VXLAN_PORT: u16 = 4789;
/// Underlay MTU 1500 less 50 bytes of VXLAN over IPv4, as nsm sets it on a VXLAN vWire (and on vL3
/// members and peer links).
pub(crate) const VXLAN_MTU: u32 = 1450;

/// Ctrl-C and SIGTERM, for ending a benchmark: what runs under [`Signals::run`] is dropped (its test
/// bed and processes torn down) when one arrives.
pub(crate) struct Signals(Signal);

impl Signals {
    /// Listens from now on: a SIGTERM that arrives between two [`Signals::run`]s ends the next.
    pub(crate) fn new() -> anyhow::Result<Signals> {
        Ok(Signals(tokio::signal::unix::signal(SignalKind::terminate())?))
    }

    /// `f`'s result, or an error as soon as Ctrl-C or SIGTERM arrives.
    pub(crate) async fn run<T>(&mut self, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        tokio::select! {
            r = f => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = self.0.recv() => bail!("terminated"),
        }
    }
}

/// Runs the parts of `all` that `only` names, in the order of `all`, each under [`Signals`] (when
/// interrupted, a part's test bed and processes are torn down as its future is dropped); then
/// prints the summary of their verdicts.
pub(crate) async fn run_parts<P: Copy + PartialEq + Debug>(
    all: &[P],
    only: &[P],
    run: impl AsyncFn(P) -> anyhow::Result<Vec<Verdict>>,
) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let mut summary = Vec::new();
    for &part in all.iter().filter(|p| only.contains(p)) {
        eprintln!("=== {part:?} ===");
        summary.extend(signals.run(run(part)).await?);
    }
    print_summary(&summary);
    Ok(())
}

/// Prints the summary table: every figure against its target.
pub(crate) fn print_summary(summary: &[Verdict]) {
    println!();
    println!("| target | figure | verdict |");
    println!("|---|---|---|");
    for v in summary {
        let verdict = match v.met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "reported",
        };
        println!("| {} | {} | {verdict} |", v.target, v.figure);
    }
}

/// VmRSS of process `pid`, MB.
pub(crate) fn rss_mb(pid: u32) -> f64 {
    proc_usage(pid).0
}

/// One line of the summary: a figure against its target.
pub(crate) struct Verdict {
    pub(crate) target: String,
    pub(crate) figure: String,
    /// None: reported, no numeric target.
    pub(crate) met: Option<bool>,
}

pub(crate) fn verdict(target: impl Into<String>, figure: impl Into<String>, met: Option<bool>) -> Verdict {
    Verdict {
        target: target.into(),
        figure: figure.into(),
        met,
    }
}

/// Underlay addresses of the hosts of [`one_host`] and [`two_hosts`].
pub(crate) const H1: &str = "192.0.2.11";
pub(crate) const H2: &str = "192.0.2.12";

/// A test bed of `hosts` as (name, underlay address) pairs on one underlay, with `workloads` as
/// (name, host) pairs; `tag` makes its namespace names unique.
pub(crate) fn topology(
    tag: &str,
    hosts: impl IntoIterator<Item = (impl Into<String>, impl AsRef<str>)>,
    workloads: impl IntoIterator<Item = (impl Into<String>, impl Into<String>)>,
) -> anyhow::Result<Topology> {
    Ok(Topology {
        prefix: unique_prefix(tag),
        hosts: hosts
            .into_iter()
            .map(|(name, addr)| {
                Ok(HostSpec {
                    name: name.into(),
                    underlay_addr: addr.as_ref().parse()?,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        workloads: workloads
            .into_iter()
            .map(|(name, host)| WorkloadSpec {
                name: name.into(),
                host: host.into(),
            })
            .collect(),
        address_hosts: vec![],
    })
}

/// One test-bed host `h1` ([`H1`]) with `workloads`: the same-node test bed.
pub(crate) fn one_host(tag: &str, workloads: impl IntoIterator<Item = String>) -> anyhow::Result<Topology> {
    topology(tag, [("h1", H1)], workloads.into_iter().map(|w| (w, "h1")))
}

/// Two test-bed hosts `h1` ([`H1`]) and `h2` ([`H2`]) on one underlay, with `workloads` as
/// (name, host) pairs: the cross-node test bed.
pub(crate) fn two_hosts(tag: &str, workloads: Vec<(String, &str)>) -> anyhow::Result<Topology> {
    topology(tag, [("h1", H1), ("h2", H2)], workloads)
}

/// Runs `f` on a test bed built from `topology` and tears the bed down afterwards, also when `f`
/// fails (and, through the bed's `Drop`, when it panics or is cancelled).
pub(crate) async fn on_bed<T>(
    topology: nsm_testbed::Topology,
    f: impl AsyncFnOnce(&Testbed) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let t = Instant::now();
    let n = topology.netns_names().len();
    let bed = Testbed::up(topology).await?;
    eprintln!("test bed of {n} namespaces up in {:.1} s", t.elapsed().as_secs_f64());
    let result = f(&bed).await;
    bed.down().await?;
    result
}

/// A child process, killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn debug() -> bool {
    std::env::var_os("NSM_BENCH_DEBUG").is_some()
}

pub(crate) fn quiet(c: &mut Command) {
    c.env("NSM_LOG_LEVEL", if debug() { "info,nsm_node=debug" } else { "warn" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `nsm registry` on a free local port with its data under `dir`; the process and its URL.
/// Unless `secure`, `--insecure`: most benchmarks measure the mesh without TLS, as their earlier
/// figures did.
pub(crate) fn spawn_registry(bin: &Path, dir: &Path, secure: bool) -> anyhow::Result<(Proc, String)> {
    let url = format!("tcp://127.0.0.1:{}", free_port()?);
    let mut c = Command::new(bin);
    c.arg("registry");
    if !secure {
        c.arg("--insecure");
    }
    c.args(["--listen", &url]).arg("--data-dir").arg(dir);
    quiet(&mut c);
    let registry = Proc(c.spawn().with_context(|| format!("cannot start {}", bin.display()))?);
    Ok((registry, url))
}

/// Waits until node `name` has registered: its Node resource exists (other nodes need it to reach
/// this one).
pub(crate) async fn wait_registered(res: &mut ResourceServiceClient<Channel>, name: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let r = v1::ResourceRef {
        kind: v1::Kind::Node as i32,
        namespace: String::new(),
        name: name.into(),
    };
    // Its daemon has registered once the Node carries its start time (a joining node's Node is
    // made before the daemon starts).
    let started = |n: Result<tonic::Response<v1::Resource>, tonic::Status>| {
        n.ok()
            .and_then(|r| match r.into_inner().kind {
                Some(v1::resource::Kind::Node(n)) => n.spec.and_then(|s| s.started),
                _ => None,
            })
            .is_some()
    };
    while !started(res.get(v1::GetRequest { r#ref: Some(r.clone()) }).await) {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("node {name} did not register within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A channel to `url`, retried every 20 ms for up to 20 s while the server starts.
pub(crate) async fn connect(url: &str) -> anyhow::Result<Channel> {
    connect_with(url, &nsm_transport::ClientSecurity::Insecure).await
}

/// Like [`connect`], with `security`.
pub(crate) async fn connect_with(url: &str, security: &nsm_transport::ClientSecurity) -> anyhow::Result<Channel> {
    let start = Instant::now();
    loop {
        match nsm_transport::connect_secure(url, Duration::from_millis(200), security).await {
            Ok(ch) => return Ok(ch),
            Err(e) if start.elapsed() > Duration::from_secs(20) => bail!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Mutual TLS as the admin of the registry that writes `config` on its first start (waited for,
/// up to 20 s).
pub(crate) fn admin_security(config: &Path) -> anyhow::Result<nsm_transport::ClientSecurity> {
    let start = Instant::now();
    let cfg = loop {
        match nsm_identity::ClientConfig::load(config) {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => bail!("{}: {e}", config.display()),
        }
    };
    let credentials = cfg.credentials()?;
    let expect = nsm_identity::Expect::Id(nsm_identity::SpiffeId::registry(&credentials.trust_domain())?);
    Ok(nsm_transport::ClientSecurity::Mtls { credentials, expect })
}

pub(crate) fn meta(name: &str) -> Option<v1::ObjectMeta> {
    Some(v1::ObjectMeta {
        name: name.into(),
        ..Default::default()
    })
}

/// iperf3 from `client` to `server_ip` (server in `server`), in Gbit/s.
pub(crate) fn iperf(
    bed: &Testbed,
    server: &str,
    client: &str,
    server_ip: IpAddr,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<f64> {
    let _srv = iperf_server(bed, server, server_ip)?;
    Ok(iperf_client(bed, client, server_ip, streams, seconds)?.gbps)
}

/// A one-shot iperf3 server on `ip` in `server`'s namespace, ready for one client; killed when
/// dropped.
pub(crate) fn iperf_server(bed: &Testbed, server: &str, ip: IpAddr) -> anyhow::Result<Proc> {
    let path = bed.netns_path(server);
    let srv = Proc(
        Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["--", "iperf3", "-s", "-1", "-B", &ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 (Debian package iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    Ok(srv)
}

/// What the receiving end of one iperf3 run counted.
pub(crate) struct IperfRun {
    pub(crate) gbps: f64,
    /// Bytes received.
    pub(crate) bytes: f64,
    /// TCP retransmissions the sender counted (iperf3 reports them on Linux): lost packets, which
    /// cost throughput that has nothing to do with a wiring's per-byte work.
    pub(crate) retransmits: Option<u64>,
}

/// `--iperf-affinity`, for every iperf3 client run (iperf3 passes the server's part on).
static IPERF_AFFINITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets `--iperf-affinity` (`CLIENT[,SERVER]`, CPU numbers), checked here so a typo fails at once.
pub(crate) fn set_iperf_affinity(a: &str) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts: Vec<&str> = a.split(',').collect();
    if parts.len() > 2 {
        bail!("--iperf-affinity {a:?}: expected CLIENT or CLIENT,SERVER");
    }
    for p in parts {
        match p.parse::<usize>() {
            Ok(n) if n < cpus => {}
            _ => bail!("--iperf-affinity {a:?}: {p:?} is not a CPU number below {cpus}"),
        }
    }
    IPERF_AFFINITY
        .set(a.to_owned())
        .map_err(|_| anyhow::anyhow!("--iperf-affinity set twice"))
}

/// An iperf3 client in `client`'s namespace against a server started by [`iperf_server`].
pub(crate) fn iperf_client(
    bed: &Testbed,
    client: &str,
    server_ip: IpAddr,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<IperfRun> {
    let (ip, t, p) = (server_ip.to_string(), seconds.to_string(), streams.to_string());
    let mut args = vec!["iperf3", "-c", &ip, "-t", &t, "-P", &p, "-J"];
    if let Some(a) = IPERF_AFFINITY.get() {
        args.extend(["-A", a]);
    }
    let out = bed.exec(client, &args);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let sum = &j["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) => Ok(IperfRun {
            gbps: bps / 1e9,
            bytes,
            retransmits: j["end"]["sum_sent"]["retransmits"].as_u64(),
        }),
        _ => bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout)),
    }
}

/// RTTs in µs of `count` pings 10 ms apart.
pub(crate) fn pings_us(bed: &Testbed, from: &str, to: IpAddr, count: u32) -> anyhow::Result<Vec<f64>> {
    let out = bed.exec(
        from,
        &[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            &to.to_string(),
        ],
    );
    let v: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if v.is_empty() {
        bail!("no ping replies from {from} to {to}");
    }
    Ok(v)
}

/// The `p` quantile of sorted samples (nearest rank).
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The median of samples (the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `min–max` of samples.
pub(crate) fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}–{max:.2}")
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (VmRSS MB, open fds, threads) of process `pid`.
pub(crate) fn proc_usage(pid: u32) -> (f64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (field("VmRSS:") / 1024.0, fds, field("Threads:") as usize)
}

/// CPU time (user + system, all threads, including exited ones) of process `pid` so far.
pub(crate) fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3; utime is 14, stime 15.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ticks(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// `n` clock ticks (the unit of /proc's CPU times) as a duration.
pub(crate) fn ticks(n: u64) -> anyhow::Result<Duration> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as u64;
    Ok(Duration::from_nanos(n * 1_000_000_000 / hz))
}
