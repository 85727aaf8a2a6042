//! `nsm-bench`: measurements that back the figures in docs/BENCHMARKS.md.
//!
//! `nsm-bench registry` starts a real `nsm registry` process per (store, size), registers N
//! endpoints through the upstream API with many concurrent clients, measures Find-by-name latency,
//! the registry's RSS, and the time a `kill -9`-ed registry takes to serve again.
//!
//! `nsm-bench vwire` measures vWires against bare kernel wiring in the same run (see `vwire.rs`).
//!
//! `nsm-bench vl3` measures a vL3 across nodes against the same topology wired by hand (see
//! `vl3.rs`).
//!
//! `nsm-bench wireguard` compares nsm's WIREGUARD vWire with stock userspace WireGuard and with
//! nsm's clear-text VXLAN vWire on one two-host test bed (see `wireguard.rs`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nsm_api::registry::{self as reg, network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient};
use tonic::transport::Channel;

use crate::common::percentile;

mod common;
mod vl3;
mod vwire;
mod wireguard;

#[derive(Parser)]
#[command(name = "nsm-bench", about = "nsm benchmarks (see docs/BENCHMARKS.md)")]
struct Cli {
    /// Pin every iperf3 run to CPUs (iperf3's `-A CLIENT[,SERVER]`, e.g. `0,1`): the whole path's
    /// softirq work then falls on the sender's CPU, so a wiring's extra per-packet cost shows in
    /// its throughput instead of hiding in the other CPU's idle time. Default: not pinned.
    #[arg(long, global = true, value_name = "CLIENT[,SERVER]")]
    iperf_affinity: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Registry: Register throughput, Find-by-name latency, RSS, restart-to-serving time.
    Registry(RegistryArgs),
    /// vWires (root): same-node and cross-node throughput, RTT and set-up latency against bare
    /// kernel wiring; 1,000 vWires on one node; heal.
    Vwire(vwire::Args),
    /// vL3 (root): nodes × members joining, all-pairs reachability, throughput against a cross-node
    /// vWire, join latency, many members (RSS, router state).
    Vl3(vl3::Args),
    /// WireGuard (root): TCP throughput, RTT and CPU per gigabit through nsm's WIREGUARD vWire,
    /// wireguard-go, boringtun-cli and nsm's VXLAN vWire between the same two workloads.
    Wireguard(wireguard::Args),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Embedded,
    Etcd,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Etcd => "etcd",
        }
    }
}

/// How the benchmark reaches the registry.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Security {
    /// `--insecure`: plaintext TCP, every caller an admin (the figures before issue 17).
    Insecure,
    /// The default: mutual TLS with the admin's identity, every call authorized.
    Mtls,
}

impl Security {
    fn name(self) -> &'static str {
        match self {
            Security::Insecure => "plaintext",
            Security::Mtls => "mTLS",
        }
    }
}

#[derive(clap::Args)]
struct RegistryArgs {
    /// Numbers of endpoints to measure at.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 10_000, 100_000])]
    endpoints: Vec<usize>,
    /// Stores to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [StoreKind::Embedded, StoreKind::Etcd])]
    store: Vec<StoreKind>,
    /// Concurrent registering clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Security modes, measured one after the other for each store and size (mTLS: the admin's
    /// identity, connections reused as nodes and nsmctl reuse them).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Security::Insecure, Security::Mtls])]
    security: Vec<Security>,
    /// Find-by-name calls per measurement.
    #[arg(long, default_value_t = 5_000)]
    finds: usize,
    /// The `nsm` binary (default: next to this one).
    #[arg(long)]
    nsm_bin: Option<PathBuf>,
    /// Run the registry on these CPUs (`taskset -c LIST`), e.g. `1` while the benchmark itself runs
    /// under `taskset -c 0`: on a small machine this keeps client and server off each other's core.
    #[arg(long)]
    registry_cpus: Option<String>,
}

struct RegistryProc {
    child: Child,
    url: String,
    /// How to reach it.
    client: nsm_transport::ClientSecurity,
}

impl RegistryProc {
    fn spawn(
        bin: &PathBuf,
        cpus: Option<&str>,
        port: u16,
        data_dir: &std::path::Path,
        store: &str,
        security: Security,
    ) -> anyhow::Result<Self> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = match cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("registry");
        if security == Security::Insecure {
            cmd.arg("--insecure");
        }
        let mut child = cmd
            .args(["--listen", &url, "--store", store, "--default-expiration", "1h"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("NSM_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let client = match security {
            Security::Insecure => nsm_transport::ClientSecurity::Insecure,
            Security::Mtls => match common::admin_security(&data_dir.join("admin.config")) {
                Ok(c) => c,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            },
        };
        Ok(RegistryProc { child, url, client })
    }

    fn rss_mb(&self) -> f64 {
        common::rss_mb(self.child.id())
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `name` can be found, returning how long that took.
async fn wait_serving(
    url: &str,
    security: &nsm_transport::ClientSecurity,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(ch) = nsm_transport::connect_secure(url, Duration::from_millis(200), security).await {
            let mut c = NetworkServiceEndpointRegistryClient::new(ch);
            if find_one(&mut c, name).await.is_ok_and(|found| found) {
                return Ok(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("registry at {url} did not serve {name} within {timeout:?}")
}

async fn find_one(c: &mut NetworkServiceEndpointRegistryClient<Channel>, name: &str) -> anyhow::Result<bool> {
    let q = reg::NetworkServiceEndpointQuery {
        network_service_endpoint: Some(reg::NetworkServiceEndpoint {
            name: name.into(),
            ..Default::default()
        }),
        watch: false,
    };
    let mut s = c.find(q).await?.into_inner();
    let mut found = false;
    while let Some(r) = s.message().await? {
        found |= r.network_service_endpoint.is_some_and(|e| e.name == name);
    }
    Ok(found)
}

fn endpoint(i: usize) -> reg::NetworkServiceEndpoint {
    let svc = format!("svc-{}", i % 100);
    reg::NetworkServiceEndpoint {
        name: format!("nse-{i}"),
        network_service_names: vec![svc.clone()],
        network_service_labels: [(
            svc,
            reg::NetworkServiceLabels {
                labels: [("app".to_string(), format!("a{}", i % 7))].into(),
            },
        )]
        .into(),
        url: format!("tcp://10.{}.{}.{}:5001", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        ..Default::default()
    }
}

struct Row {
    store: &'static str,
    security: &'static str,
    n: usize,
    reg_per_s: f64,
    find_p50: Duration,
    find_p99: Duration,
    floor_p50: Duration,
    floor_p99: Duration,
    rss_mb: f64,
    restart: Duration,
}

async fn measure(
    args: &RegistryArgs,
    bin: &PathBuf,
    store: StoreKind,
    n: usize,
    security: Security,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let etcd = match store {
        StoreKind::Etcd => Some(nsm_testing::Etcd::start()?),
        StoreKind::Embedded => None,
    };
    let store_arg = etcd
        .as_ref()
        .map_or("embedded".to_string(), |e| format!("etcd://{}", e.endpoint()));
    let port = common::free_port()?;
    let mut proc = RegistryProc::spawn(
        bin,
        args.registry_cpus.as_deref(),
        port,
        dir.path(),
        &store_arg,
        security,
    )?;
    let url = proc.url.clone();
    // Wait for the listener.
    let ch = common::connect_with(&url, &proc.client)
        .await
        .context("registry did not start")?;

    // Register N endpoints with `clients` concurrent callers over 8 HTTP/2 connections.
    let mut channels = vec![ch];
    for _ in 1..8 {
        channels.push(nsm_transport::connect_secure(&url, Duration::from_secs(5), &proc.client).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = NetworkServiceEndpointRegistryClient::new(channels[c % channels.len()].clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, tonic::Status>(());
                }
                client.register(endpoint(i)).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let reg_elapsed = t0.elapsed();

    // Find by name, sequentially (latency, not throughput).
    let mut client = NetworkServiceEndpointRegistryClient::new(channels[0].clone());
    let mut lat = Vec::with_capacity(args.finds);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..args.finds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let name = format!("nse-{}", x as usize % n);
        let t = Instant::now();
        if !find_one(&mut client, &name).await? {
            bail!("{name} not found");
        }
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    // The floor: a unary health check on the same connection, measured the same way.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channels[0].clone());
    let mut floor = Vec::with_capacity(args.finds);
    for _ in 0..args.finds {
        let t = Instant::now();
        health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await?;
        floor.push(t.elapsed());
    }
    floor.sort_unstable();
    let rss_mb = proc.rss_mb();

    // kill -9 and measure time until the last registered endpoint is served again.
    proc.kill9();
    drop(channels);
    drop(client);
    let t = Instant::now();
    let proc2 = RegistryProc::spawn(
        bin,
        args.registry_cpus.as_deref(),
        port,
        dir.path(),
        &store_arg,
        security,
    )?;
    let ready = wait_serving(
        &proc2.url,
        &proc2.client,
        &format!("nse-{}", n - 1),
        Duration::from_secs(60),
    )
    .await?;
    let restart = t.elapsed().max(ready);
    // Every acknowledged registration survived.
    let ch = nsm_transport::connect_secure(&proc2.url, Duration::from_secs(5), &proc2.client).await?;
    let mut c = NetworkServiceEndpointRegistryClient::new(ch);
    let mut s = c
        .find(reg::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(Default::default()),
            watch: false,
        })
        .await?
        .into_inner();
    let mut count = 0;
    while s.message().await?.is_some() {
        count += 1;
    }
    if count != n {
        bail!("after kill -9 and restart the registry has {count} endpoints, expected {n}");
    }
    drop(proc2);
    drop(etcd);
    Ok(Row {
        store: store.name(),
        security: security.name(),
        n,
        reg_per_s: n as f64 / reg_elapsed.as_secs_f64(),
        find_p50: percentile(&lat, 0.5),
        find_p99: percentile(&lat, 0.99),
        floor_p50: percentile(&floor, 0.5),
        floor_p99: percentile(&floor, 0.99),
        rss_mb,
        restart,
    })
}

/// `--nsm-bin`, or the `nsm` binary next to this one.
fn nsm_bin(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(b) = given {
        return Ok(b.clone());
    }
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("nsm");
    if !bin.exists() {
        bail!(
            "{} not found; build it (cargo build --release -p nsm) or pass --nsm-bin",
            bin.display()
        );
    }
    Ok(bin)
}

async fn registry(args: RegistryArgs) -> anyhow::Result<()> {
    let bin = nsm_bin(args.nsm_bin.as_ref())?;
    println!(
        "| store | security | endpoints | Register/s ({} clients) | Find p50 | Find p99 | health-check p50 / p99 (floor) | RSS after load | kill -9 → serving |",
        args.clients
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for &store in &args.store {
        for &n in &args.endpoints {
            for &security in &args.security {
                eprintln!("measuring {n} endpoints on {} ({}) …", store.name(), security.name());
                let r = measure(&args, &bin, store, n, security).await?;
                println!(
                    "| {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.0} / {:.0} µs | {:.0} MB | {:.0} ms |",
                    r.store,
                    r.security,
                    r.n,
                    r.reg_per_s,
                    r.find_p50.as_secs_f64() * 1e6,
                    r.find_p99.as_secs_f64() * 1e6,
                    r.floor_p50.as_secs_f64() * 1e6,
                    r.floor_p99.as_secs_f64() * 1e6,
                    r.rss_mb,
                    r.restart.as_secs_f64() * 1e3
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(a) = &cli.iperf_affinity {
        common::set_iperf_affinity(a)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Cmd::Registry(a) => registry(a).await,
            Cmd::Vwire(a) => {
                let bin = nsm_bin(a.nsm_bin.as_ref())?;
                vwire::run(a, bin).await
            }
            Cmd::Vl3(a) => {
                let bin = nsm_bin(a.nsm_bin.as_ref())?;
                vl3::run(a, bin).await
            }
            Cmd::Wireguard(a) => {
                let bin = nsm_bin(a.nsm_bin.as_ref())?;
                wireguard::run(a, bin).await
            }
        }
    })
}
