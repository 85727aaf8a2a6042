//! `nsm-bench vwire`: same-node vWire data plane and set-up latency, each beside its floor.
//!
//! - Throughput (iperf3, 1 and 4 streams) and RTT between two namespaces over a bare veth pair
//!   wired by hand, then over an nsm vWire between the same namespaces.
//! - Set-up: for N workloads, `CreateClient` on the node → first round trip answered, against the
//!   floor of wiring the same veth pair, addresses and routes directly over netlink.
//!
//! A round trip is proven without any server: a UDP datagram to a closed port on the peer comes
//! back as ICMP port-unreachable, which a connected UDP socket reports as `ConnectionRefused`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nsm_api::nsm::v1::{
    self as v1, node_service_client::NodeServiceClient, resource_service_client::ResourceServiceClient,
};
use nsm_dataplane::{NetNs, Netlink};
use nsm_testbed::{HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};
use tonic::transport::Channel;

use crate::percentile;

/// Flags of `nsm-bench vwire`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Workloads for the set-up latency measurement.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// The `nsm` binary (default: next to this one).
    #[arg(long)]
    pub(crate) nsm_bin: Option<PathBuf>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `dst` answers from inside `ns` (see the module doc); returns false after `timeout`.
fn probe(ns: &NetNs, dst: IpAddr, timeout: Duration) -> anyhow::Result<bool> {
    Ok(ns.run(move || {
        let sock = UdpSocket::bind((if dst.is_ipv4() { "0.0.0.0" } else { "::" }, 0))?;
        sock.connect(SocketAddr::new(dst, 9))?;
        sock.set_read_timeout(Some(Duration::from_millis(2)))?;
        let start = Instant::now();
        let mut buf = [0u8; 16];
        while start.elapsed() < timeout {
            let _ = sock.send(b"nsm");
            match sock.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok::<_, std::io::Error>(true),
                _ => {}
            }
        }
        Ok(false)
    })??)
}

/// iperf3 from `client` to `server_ip` (server in `server`), in Gbit/s.
fn iperf(
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

/// Median RTT in µs from 200 pings 10 ms apart.
fn rtt_us(bed: &Testbed, from: &str, to: IpAddr) -> anyhow::Result<f64> {
    let out = bed.exec(
        from,
        &["ping", "-n", "-c", "200", "-i", "0.01", "-W", "1", &to.to_string()],
    );
    let mut v: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if v.is_empty() {
        bail!("no ping replies from {from} to {to}");
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

async fn wire_bare(a: &NetNs, b: &NetNs, name: &str, src: ipnet::IpNet, dst: ipnet::IpNet) -> anyhow::Result<()> {
    let an = Netlink::connect(a).await?;
    let bn = Netlink::connect(b).await?;
    an.create_veth(name, name, b, 1500).await?;
    an.add_address(name, src).await?;
    bn.add_address(name, dst).await?;
    an.set_up(name).await?;
    bn.set_up(name).await?;
    an.add_route(dst, None, name).await?;
    bn.add_route(src, None, name).await?;
    Ok(())
}

async fn wait_ready(res: &mut ResourceServiceClient<Channel>, name: &str) -> anyhow::Result<(IpAddr, IpAddr)> {
    let r = v1::ResourceRef {
        kind: v1::Kind::Client as i32,
        namespace: "default".into(),
        name: name.into(),
    };
    let start = Instant::now();
    loop {
        let got = res.get(v1::GetRequest { r#ref: Some(r.clone()) }).await?.into_inner();
        if let Some(v1::resource::Kind::Client(c)) = got.kind
            && let Some(st) = c.status
        {
            if st.phase == v1::client_status::Phase::Ready as i32 {
                let ip = |v: &[String]| -> anyhow::Result<IpAddr> {
                    Ok(v.first().context("no address")?.parse::<ipnet::IpNet>()?.addr())
                };
                return Ok((ip(&st.src_ip_addrs)?, ip(&st.dst_ip_addrs)?));
            }
            if st.phase == v1::client_status::Phase::Failed as i32 {
                bail!("client {name} failed: {}", st.reason);
            }
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("client {name} not ready within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn resource(kind: v1::resource::Kind) -> Option<v1::Resource> {
    Some(v1::Resource { kind: Some(kind) })
}

fn meta(name: &str) -> Option<v1::ObjectMeta> {
    Some(v1::ObjectMeta {
        name: name.into(),
        ..Default::default()
    })
}

pub(crate) async fn run(args: Args, bin: PathBuf) -> anyhow::Result<()> {
    let n = args.clients;
    let mut workloads = vec!["a".to_string(), "b".to_string(), "e".to_string()];
    workloads.extend((0..n).map(|i| format!("p{i}")));
    let bed = Testbed::up(Topology {
        prefix: unique_prefix("bench"),
        hosts: vec![HostSpec {
            name: "h1".into(),
            underlay_addr: "192.0.2.11".parse()?,
        }],
        workloads: workloads
            .iter()
            .map(|w| WorkloadSpec {
                name: w.clone(),
                host: "h1".into(),
            })
            .collect(),
        address_hosts: vec![],
    })
    .await?;
    let result = measure(&args, &bin, &bed).await;
    bed.down().await?;
    result
}

async fn measure(args: &Args, bin: &Path, bed: &Testbed) -> anyhow::Result<()> {
    let n = args.clients;
    // --- Baseline: a bare veth pair between a and b.
    eprintln!("baseline: bare veth between two namespaces …");
    let (src, dst): (ipnet::IpNet, ipnet::IpNet) = ("198.51.100.1/32".parse()?, "198.51.100.2/32".parse()?);
    wire_bare(bed.ns("a"), bed.ns("b"), "bare0", src, dst).await?;
    let bare1 = iperf(bed, "b", "a", dst.addr(), 1, args.seconds)?;
    let bare4 = iperf(bed, "b", "a", dst.addr(), 4, args.seconds)?;
    let bare_rtt = rtt_us(bed, "a", dst.addr())?;
    Netlink::connect(bed.ns("a")).await?.delete_link("bare0").await?;

    // --- nsm: registry + node, a vWire between the same namespaces.
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let reg_url = format!("tcp://127.0.0.1:{port}");
    let sock = format!("unix://{}", dir.path().join("nsm.sock").display());
    let quiet = |c: &mut Command| {
        c.env(
            "NSM_LOG_LEVEL",
            if std::env::var_os("NSM_BENCH_DEBUG").is_some() {
                "info,nsm_node=debug"
            } else {
                "warn"
            },
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    };
    let mut c = Command::new(bin);
    c.args(["registry", "--listen", &reg_url])
        .arg("--data-dir")
        .arg(dir.path().join("reg"));
    quiet(&mut c);
    let _registry = Proc(c.spawn()?);
    let mut c = Command::new(bin);
    c.args([
        "node",
        "--name",
        "bench-node",
        "--registry",
        &reg_url,
        "--underlay-address",
        "192.0.2.11",
    ])
    .args(["--listen", &sock, "--resync", "1s"])
    .arg("--data-dir")
    .arg(dir.path().join("node"));
    quiet(&mut c);
    let _node = Proc(c.spawn()?);
    let connect = |url: String| async move {
        let start = Instant::now();
        loop {
            match nsm_transport::connect(&url, Duration::from_millis(200)).await {
                Ok(ch) => return Ok::<_, anyhow::Error>(ch),
                Err(e) if start.elapsed() > Duration::from_secs(20) => bail!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    let mut res = ResourceServiceClient::new(connect(reg_url.clone()).await?);
    let mut node = NodeServiceClient::new(connect(sock.clone()).await?);
    let path = |w: &str| bed.netns_path(w).display().to_string();
    res.create(v1::CreateRequest {
        resource: resource(v1::resource::Kind::NetworkService(v1::NetworkService {
            metadata: meta("bench"),
            spec: Some(v1::NetworkServiceSpec {
                cidr: "10.90.0.0/16".into(),
                ..Default::default()
            }),
        })),
    })
    .await?;
    for (ep, ns) in [("ep-b", "b"), ("ep-e", "e")] {
        res.create(v1::CreateRequest {
            resource: resource(v1::resource::Kind::Endpoint(v1::Endpoint {
                metadata: meta(ep),
                spec: Some(v1::EndpointSpec {
                    network_services: vec!["bench".into()],
                    netns: path(ns),
                    node: "bench-node".into(),
                    ..Default::default()
                }),
            })),
        })
        .await?;
    }
    let client = |name: &str, ns: &str, endpoint: &str, ifname: &str| v1::CreateRequest {
        resource: resource(v1::resource::Kind::Client(v1::Client {
            metadata: meta(name),
            spec: Some(v1::ClientSpec {
                network_service: "bench".into(),
                endpoint: endpoint.into(),
                netns: path(ns),
                interface: ifname.into(),
                node: String::new(),
                encryption: String::new(),
            }),
            status: None,
        })),
    };
    eprintln!("nsm: vWire between the same two namespaces …");
    node.create_client(client("tput", "a", "ep-b", "nsm-1")).await?;
    let (_, vdst) = wait_ready(&mut res, "tput").await?;
    let nsm1 = iperf(bed, "b", "a", vdst, 1, args.seconds)?;
    let nsm4 = iperf(bed, "b", "a", vdst, 4, args.seconds)?;
    let nsm_rtt = rtt_us(bed, "a", vdst)?;

    // --- Set-up latency: floor (direct netlink) and nsm, N workloads each.
    eprintln!("set-up: {n} workloads wired directly over netlink …");
    let mut floor = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("f{i}");
        let (s, d): (ipnet::IpNet, ipnet::IpNet) = (
            format!("10.91.{}.{}/32", i / 100, 2 * (i % 100) + 1).parse()?,
            format!("10.91.{}.{}/32", i / 100, 2 * (i % 100) + 2).parse()?,
        );
        let t = Instant::now();
        wire_bare(bed.ns(&format!("p{i}")), bed.ns("e"), &name, s, d).await?;
        if !probe(bed.ns(&format!("p{i}")), d.addr(), Duration::from_secs(5))? {
            bail!("direct wiring {i}: no answer");
        }
        floor.push(t.elapsed());
    }
    for i in 0..n {
        Netlink::connect(bed.ns(&format!("p{i}")))
            .await?
            .delete_link(&format!("f{i}"))
            .await?;
    }
    eprintln!("set-up: {n} nsm clients (CreateClient → first round trip) …");
    let mut setup = Vec::with_capacity(n);
    let t_all = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        if std::env::var_os("NSM_BENCH_DEBUG").is_some() {
            eprintln!("c{i}: create at {:?}", std::time::SystemTime::now());
        }
        node.create_client(client(&format!("c{i}"), &format!("p{i}"), "ep-e", "nsm-1"))
            .await?;
        let (_, d) = wait_ready(&mut res, &format!("c{i}")).await?;
        let ready = t.elapsed();
        if std::env::var_os("NSM_BENCH_DEBUG").is_some() {
            eprintln!("c{i}: ready after {ready:?}");
        }
        if !probe(bed.ns(&format!("p{i}")), d, Duration::from_secs(5))? {
            bail!("client c{i}: no answer");
        }
        setup.push(t.elapsed());
    }
    let total = t_all.elapsed();
    floor.sort_unstable();
    setup.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    println!("| measurement | bare (floor) | nsm | nsm ÷ bare |");
    println!("|---|---:|---:|---:|");
    println!(
        "| TCP 1 stream, Gbit/s | {bare1:.2} | {nsm1:.2} | {:.3} |",
        nsm1 / bare1
    );
    println!(
        "| TCP 4 streams, Gbit/s | {bare4:.2} | {nsm4:.2} | {:.3} |",
        nsm4 / bare4
    );
    println!(
        "| RTT median, µs | {bare_rtt:.0} | {nsm_rtt:.0} | +{:.0} µs |",
        nsm_rtt - bare_rtt
    );
    println!(
        "| set-up p50 over {n}, ms | {:.2} | {:.2} | {:.1}× |",
        ms(percentile(&floor, 0.5)),
        ms(percentile(&setup, 0.5)),
        ms(percentile(&setup, 0.5)) / ms(percentile(&floor, 0.5))
    );
    println!(
        "| set-up p99 over {n}, ms | {:.2} | {:.2} | {:.1}× |",
        ms(percentile(&floor, 0.99)),
        ms(percentile(&setup, 0.99)),
        ms(percentile(&setup, 0.99)) / ms(percentile(&floor, 0.99))
    );
    println!(
        "| {n} clients one after another, total s | | {:.2} | |",
        total.as_secs_f64()
    );
    Ok(())
}
