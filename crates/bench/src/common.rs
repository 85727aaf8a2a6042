//! What the benchmark subcommands share: the summary table, test beds and processes that go away
//! when dropped, iperf3 and ping runs, and a few statistics.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nsm_api::nsm::v1;
use nsm_testbed::Testbed;
use tonic::transport::Channel;

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

pub(crate) async fn connect(url: &str) -> anyhow::Result<Channel> {
    let start = Instant::now();
    loop {
        match nsm_transport::connect(url, Duration::from_millis(200)).await {
            Ok(ch) => return Ok(ch),
            Err(e) if start.elapsed() > Duration::from_secs(20) => bail!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
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
    let path = bed.netns_path(server);
    let srv = Proc(
        Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["--", "iperf3", "-s", "-1", "-B", &server_ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 (Debian package iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = bed.exec(
        client,
        &[
            "iperf3",
            "-c",
            &server_ip.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    );
    drop(srv);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow::anyhow!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout)))
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
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}
