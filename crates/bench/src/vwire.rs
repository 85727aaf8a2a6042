//! `nsm-bench vwire`: vWire data plane, set-up, scale and heal, each beside a floor measured in the
//! same run.
//!
//! Parts (`--only`, default all):
//! - `throughput`: same-node TCP throughput (iperf3, 1 and 4 streams) and RTT between two
//!   namespaces over a bare veth pair wired by hand and over an nsm vWire between the same two
//!   namespaces; both stand side by side and runs alternate, R repetitions, medians.
//! - `setup`: same-node set-up latency, `CreateClient` → first round trip, against wiring the same
//!   veth pair, addresses and routes directly over netlink.
//! - `crossnode`: the same between two test-bed hosts: a VXLAN vWire through two `nsm node`
//!   processes against a kernel VXLAN pair built by hand the way nsm builds it; and cross-node
//!   set-up latency against building that pair by hand.
//! - `scale`: N vWires on one node: first create → all N answering a round trip, the daemon's RSS,
//!   and its CPU while nothing changes.
//! - `heal`: two endpoints of one service; the one a client uses is deleted; time until a round
//!   trip from the client is answered by the other.
//!
//! Round trips need no server where only an answer matters: a UDP datagram to a closed port comes
//! back as ICMP port-unreachable ([`probe`]). Where *who* answers matters (heal) or many clients
//! probe one endpoint (scale, where ICMP errors are rate limited), a small UDP echo responder in
//! the endpoint's namespace answers with its name ([`Echo`]).

mod cross;
mod heal;
mod same;
mod scale;
mod security;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use nsm_api::nsm::v1::{
    self as v1, node_service_client::NodeServiceClient, resource_service_client::ResourceServiceClient,
};
use nsm_dataplane::{NetNs, Netlink};
use nsm_testbed::Testbed;
use tonic::transport::Channel;

use crate::common::{
    Proc, Verdict, connect, free_port, iperf, median, meta, ms, percentile, pings_us, quiet, range, run_parts,
    spawn_registry, verdict, wait_registered,
};

/// Parts of `nsm-bench vwire`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(crate) enum Part {
    /// Same-node throughput and RTT against a bare veth pair.
    Throughput,
    /// Same-node set-up latency against direct netlink wiring.
    Setup,
    /// Cross-node VXLAN throughput, RTT and set-up latency against a hand-built VXLAN pair.
    Crossnode,
    /// N vWires on one node: time to all answering, RSS, idle CPU.
    Scale,
    /// Heal: endpoint deleted → traffic via the other endpoint.
    Heal,
    /// Set-up latency with identities on (mutual TLS, authorization, path tokens) against
    /// `--insecure`, same node and cross node, two meshes side by side, clients alternating.
    Security,
}

/// Flags of `nsm-bench vwire`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Parts to run (comma-separated).
    #[arg(long, value_delimiter = ',', value_enum,
          default_values_t = [Part::Throughput, Part::Setup, Part::Crossnode, Part::Scale, Part::Heal, Part::Security])]
    only: Vec<Part>,
    /// Repetitions of each throughput measurement; bare and nsm runs alternate, medians are
    /// compared. Fewer than ~15 leave the ratios at the mercy of this machine's noise (a bare veth
    /// pair swings 9–35 Gbit/s within one run here).
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    /// Workloads for the same-node set-up latency measurement.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Workloads for the cross-node set-up latency measurement.
    #[arg(long, default_value_t = 50)]
    cross_clients: usize,
    /// vWires on one node for the scale measurement.
    #[arg(long, default_value_t = 1000)]
    scale: usize,
    /// CreateClient calls in flight at once during the scale measurement.
    #[arg(long, default_value_t = 16)]
    scale_concurrency: usize,
    /// Idle CPU is sampled right after all scale vWires answer, then again this many seconds
    /// after IPv6 is switched off in the workloads (so nothing is sent on any vWire; longer than
    /// one 30 s resync, so the counters the chatter changed are written before the window).
    #[arg(long, default_value_t = 35)]
    settle: u64,
    /// Seconds of each idle CPU window (two of the daemon's default 30 s resync passes).
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Heal trials.
    #[arg(long, default_value_t = 20)]
    heal_trials: usize,
    /// `--resync` for the node daemons (default: the daemon's own default, 30s).
    #[arg(long)]
    node_resync: Option<String>,
    /// The `nsm` binary (default: next to this one).
    #[arg(long)]
    pub(crate) nsm_bin: Option<PathBuf>,
}

pub(crate) async fn run(args: Args, bin: PathBuf) -> anyhow::Result<()> {
    let all = [
        Part::Throughput,
        Part::Setup,
        Part::Crossnode,
        Part::Scale,
        Part::Heal,
        Part::Security,
    ];
    run_parts(&all, &args.only, async |part| run_part(part, &args, &bin).await).await
}

async fn run_part(part: Part, args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    match part {
        Part::Throughput => same::throughput(args, bin).await,
        Part::Setup => same::setup(args, bin).await,
        Part::Crossnode => cross::run(args, bin).await,
        Part::Scale => scale::run(args, bin).await,
        Part::Heal => heal::run(args, bin).await,
        Part::Security => security::run(args, bin).await,
    }
}

/// A registry and node daemons, as processes, killed when dropped.
/// Fields drop in order: the nodes stop before the registry they follow.
pub(crate) struct Mesh {
    nodes: Vec<Proc>,
    pub(crate) registry: Proc,
    pub(crate) res: ResourceServiceClient<Channel>,
    /// The admin's identity API; None for an `--insecure` mesh.
    identity: Option<nsm_api::nsm::v1::identity_service_client::IdentityServiceClient<Channel>>,
    bin: PathBuf,
    reg_url: String,
    dir: tempfile::TempDir,
    /// Flags every node started from now on gets as well.
    pub(crate) node_flags: Vec<String>,
}

/// A node daemon of a [`Mesh`].
pub(crate) struct NodeHandle {
    pub(crate) api: NodeServiceClient<Channel>,
    pub(crate) pid: u32,
}

impl Mesh {
    /// An `--insecure` mesh: what the figures before the security work measured.
    pub(crate) async fn start(bin: &Path) -> anyhow::Result<Mesh> {
        Self::start_with(bin, false).await
    }

    /// A mesh with identities on (`secure`: nodes join with tokens, everything is mutual TLS) or
    /// `--insecure`.
    pub(crate) async fn start_with(bin: &Path, secure: bool) -> anyhow::Result<Mesh> {
        let dir = tempfile::tempdir()?;
        let reg_dir = dir.path().join("reg");
        let (registry, reg_url) = spawn_registry(bin, &reg_dir, secure)?;
        let security = if secure {
            crate::common::admin_security(&reg_dir.join("admin.config"))?
        } else {
            nsm_transport::ClientSecurity::Insecure
        };
        let channel = crate::common::connect_with(&reg_url, &security).await?;
        Ok(Mesh {
            bin: bin.to_path_buf(),
            dir,
            reg_url,
            registry,
            nodes: Vec::new(),
            res: ResourceServiceClient::new(channel.clone()),
            identity: secure.then(|| nsm_api::nsm::v1::identity_service_client::IdentityServiceClient::new(channel)),
            node_flags: Vec::new(),
        })
    }

    /// Starts `nsm node --name NAME` with its API on a unix socket (and on TCP when `tcp`, for
    /// other nodes), its tunnels leaving from `host_netns`; waits until it has registered.
    pub(crate) async fn node(
        &mut self,
        name: &str,
        underlay: &str,
        host_netns: Option<&Path>,
        tcp: bool,
        resync: Option<&str>,
    ) -> anyhow::Result<NodeHandle> {
        let sock = format!("unix://{}", self.dir.path().join(format!("{name}.sock")).display());
        let mut c = Command::new(&self.bin);
        c.arg("node");
        match &mut self.identity {
            // As an operator joins a node: its Node, then a one-time token.
            Some(identity) => {
                self.res
                    .create(v1::CreateRequest {
                        resource: resource(v1::resource::Kind::Node(v1::Node {
                            metadata: meta(name),
                            spec: None,
                        })),
                    })
                    .await?;
                let token = identity
                    .create_join_token(v1::CreateJoinTokenRequest {
                        node: name.into(),
                        ttl_seconds: 600,
                    })
                    .await?
                    .into_inner()
                    .join_token;
                c.args(["--join", &token]);
            }
            None => {
                c.arg("--insecure");
            }
        }
        c.args([
            "--name",
            name,
            "--registry",
            &self.reg_url,
            "--underlay-address",
            underlay,
            "--listen",
            &sock,
        ])
        .arg("--data-dir")
        .arg(self.dir.path().join(name));
        if tcp {
            c.args(["--listen", &format!("tcp://127.0.0.1:{}", free_port()?)]);
        }
        if let Some(h) = host_netns {
            c.arg("--host-netns").arg(h);
        }
        if let Some(r) = resync {
            c.args(["--resync", r]);
        }
        c.args(&self.node_flags);
        quiet(&mut c);
        let p = Proc(c.spawn()?);
        let pid = p.pid();
        self.nodes.push(p);
        let api = NodeServiceClient::new(connect(&sock).await?);
        wait_registered(&mut self.res, name).await?;
        Ok(NodeHandle { api, pid })
    }

    /// Creates network service `name` with address pool `cidr`.
    pub(crate) async fn service(&mut self, name: &str, cidr: &str) -> anyhow::Result<()> {
        self.service_spec(
            name,
            v1::NetworkServiceSpec {
                cidr: cidr.into(),
                ..Default::default()
            },
        )
        .await
    }

    /// Creates network service `name` with `spec`.
    pub(crate) async fn service_spec(&mut self, name: &str, spec: v1::NetworkServiceSpec) -> anyhow::Result<()> {
        self.res
            .create(v1::CreateRequest {
                resource: resource(v1::resource::Kind::NetworkService(v1::NetworkService {
                    metadata: meta(name),
                    spec: Some(spec),
                })),
            })
            .await?;
        Ok(())
    }

    /// Creates endpoint `name` of `service` in namespace `netns` on node `node`.
    pub(crate) async fn endpoint(&mut self, name: &str, service: &str, netns: &Path, node: &str) -> anyhow::Result<()> {
        self.res
            .create(v1::CreateRequest {
                resource: resource(v1::resource::Kind::Endpoint(v1::Endpoint {
                    metadata: meta(name),
                    spec: Some(v1::EndpointSpec {
                        network_services: vec![service.into()],
                        netns: netns.display().to_string(),
                        node: node.into(),
                        ..Default::default()
                    }),
                })),
            })
            .await?;
        Ok(())
    }
}

/// A `CreateClient` request: client `name` of `service` in namespace `netns`, pinned to `endpoint`
/// unless empty, with interface `ifname`.
pub(crate) fn client(name: &str, service: &str, netns: &Path, endpoint: &str, ifname: &str) -> v1::CreateRequest {
    v1::CreateRequest {
        resource: resource(v1::resource::Kind::Client(v1::Client {
            metadata: meta(name),
            spec: Some(v1::ClientSpec {
                network_service: service.into(),
                endpoint: endpoint.into(),
                netns: netns.display().to_string(),
                interface: ifname.into(),
                ..Default::default()
            }),
            status: None,
        })),
    }
}

pub(crate) fn resource(kind: v1::resource::Kind) -> Option<v1::Resource> {
    Some(v1::Resource { kind: Some(kind) })
}

pub(crate) fn client_ref(name: &str) -> v1::ResourceRef {
    v1::ResourceRef {
        kind: v1::Kind::Client as i32,
        namespace: "default".into(),
        name: name.into(),
    }
}

/// The client's status (None while it has none).
pub(crate) async fn client_status(
    res: &mut ResourceServiceClient<Channel>,
    name: &str,
) -> anyhow::Result<Option<v1::ClientStatus>> {
    let got = res
        .get(v1::GetRequest {
            r#ref: Some(client_ref(name)),
        })
        .await?
        .into_inner();
    Ok(match got.kind {
        Some(v1::resource::Kind::Client(c)) => c.status,
        _ => None,
    })
}

/// The first address of a status address list.
pub(crate) fn first_addr(v: &[String]) -> anyhow::Result<IpAddr> {
    Ok(v.first().context("no address")?.parse::<IpNet>()?.addr())
}

/// Client `name`'s (src, dst) addresses once `st` says it is Ready; None before, an error once it
/// has failed.
fn ready_addrs(name: &str, st: &v1::ClientStatus) -> anyhow::Result<Option<(IpAddr, IpAddr)>> {
    if st.phase == v1::client_status::Phase::Ready as i32 {
        return Ok(Some((first_addr(&st.src_ip_addrs)?, first_addr(&st.dst_ip_addrs)?)));
    }
    if st.phase == v1::client_status::Phase::Failed as i32 {
        bail!("client {name} failed: {}", st.reason);
    }
    Ok(None)
}

/// Polls client `name` every 2 ms until it is Ready; returns its (src, dst) addresses.
pub(crate) async fn wait_ready(
    res: &mut ResourceServiceClient<Channel>,
    name: &str,
) -> anyhow::Result<(IpAddr, IpAddr)> {
    let start = Instant::now();
    loop {
        if let Some(st) = client_status(res, name).await?
            && let Some(addrs) = ready_addrs(name, &st)?
        {
            return Ok(addrs);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("client {name} not ready within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Clients' statuses as the registry pushes them (a watch), for waiting on one client at a time
/// without polling.
pub(crate) struct ReadyWatch(tonic::Streaming<v1::WatchEvent>);

/// Every event on clients, as the registry sends them.
pub(crate) async fn watch_clients(
    res: &mut ResourceServiceClient<Channel>,
) -> anyhow::Result<tonic::Streaming<v1::WatchEvent>> {
    let watch = v1::WatchRequest {
        kind: v1::Kind::Client as i32,
        ..Default::default()
    };
    Ok(res.watch(watch).await?.into_inner())
}

impl ReadyWatch {
    pub(crate) async fn start(res: &mut ResourceServiceClient<Channel>) -> anyhow::Result<ReadyWatch> {
        Ok(ReadyWatch(watch_clients(res).await?))
    }

    /// Waits until client `name` is Ready; returns its (src, dst) addresses. Other clients' events
    /// are skipped.
    pub(crate) async fn ready(&mut self, name: &str) -> anyhow::Result<(IpAddr, IpAddr)> {
        let wait = async {
            loop {
                let ev = self.0.message().await?.context("registry watch ended")?;
                let Some(v1::resource::Kind::Client(c)) = ev.resource.and_then(|r| r.kind) else {
                    continue;
                };
                if c.metadata.as_ref().is_none_or(|m| m.name != name) {
                    continue;
                }
                if let Some(st) = c.status
                    && let Some(addrs) = ready_addrs(name, &st)?
                {
                    return Ok(addrs);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .with_context(|| format!("client {name} not ready within 20 s"))?
    }
}

/// Waits until `dst` answers from inside `ns` (a datagram to a closed port, answered by ICMP
/// port-unreachable); returns false after `timeout`.
pub(crate) fn probe(ns: &NetNs, dst: IpAddr, timeout: Duration) -> anyhow::Result<bool> {
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

/// Port of the [`Echo`] responders.
pub(crate) const ECHO_PORT: u16 = 7777;

/// A UDP socket (IPv4, any port) opened inside `ns` and driven from this runtime.
pub(crate) async fn udp_in(ns: &NetNs, port: u16) -> anyhow::Result<tokio::net::UdpSocket> {
    let s = ns
        .run_async(move || {
            let s = UdpSocket::bind(("0.0.0.0", port))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .await??;
    Ok(tokio::net::UdpSocket::from_std(s)?)
}

/// A UDP echo responder in a namespace: every datagram to [`ECHO_PORT`] is answered with the
/// responder's tag. Stops when dropped.
pub(crate) struct Echo(tokio::task::JoinHandle<()>);

impl Echo {
    pub(crate) async fn start(ns: &NetNs, tag: &str) -> anyhow::Result<Echo> {
        let sock = udp_in(ns, ECHO_PORT).await?;
        let tag = tag.as_bytes().to_vec();
        Ok(Echo(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(&tag, peer).await;
            }
        })))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends one datagram to `dst`'s echo responder from `sock` and waits up to `wait` for an answer;
/// returns the answering responder's tag.
pub(crate) async fn echo_once(sock: &tokio::net::UdpSocket, dst: IpAddr, wait: Duration) -> Option<String> {
    sock.send_to(b"nsm", SocketAddr::new(dst, ECHO_PORT)).await.ok()?;
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Sends to `dst`'s echo responder from inside `ns` every 2 ms until answered; false after
/// `timeout`.
pub(crate) async fn echo_probe(ns: &NetNs, dst: IpAddr, timeout: Duration) -> anyhow::Result<bool> {
    let sock = udp_in(ns, 0).await?;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if echo_once(&sock, dst, Duration::from_millis(2)).await.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A veth pair `name` from `a` into `b` with host addresses, routes and static neighbours, as nsm
/// wires a same-node vWire.
pub(crate) async fn wire_bare(a: &NetNs, b: &NetNs, name: &str, src: IpNet, dst: IpNet) -> anyhow::Result<()> {
    let an = Netlink::connect(a).await?;
    let bn = Netlink::connect(b).await?;
    an.create_veth(name, name, b, 1500).await?;
    an.add_address(name, src).await?;
    bn.add_address(name, dst).await?;
    an.set_up(name).await?;
    bn.set_up(name).await?;
    an.add_route(dst, None, name).await?;
    bn.add_route(src, None, name).await?;
    let mac = async |nl: &Netlink| anyhow::Ok(nl.link(name).await?.context("link gone")?.mac);
    let (amac, bmac) = (mac(&an).await?, mac(&bn).await?);
    an.add_neighbour(name, dst.addr(), &bmac).await?;
    bn.add_neighbour(name, src.addr(), &amac).await?;
    Ok(())
}

/// Alternating throughput and RTT runs over two wirings between the same two namespaces.
#[derive(Default)]
pub(crate) struct Alternating {
    /// Gbit/s per run: [floor, measured] × [1 stream, 4 streams].
    pub(crate) tput: [[Vec<f64>; 2]; 2],
    /// RTT samples, µs: [floor, measured].
    pub(crate) rtt: [Vec<f64>; 2],
}

/// `reps` rounds of iperf3 (1 and 4 streams) and 50 pings from `client` to `server` over the floor's
/// wiring (`dsts[0]`) and the one measured against it (`dsts[1]`), alternating which goes first;
/// `labels` name the two in the progress lines.
pub(crate) fn alternate(
    bed: &Testbed,
    server: &str,
    client: &str,
    dsts: [IpAddr; 2],
    labels: [&str; 2],
    reps: usize,
    seconds: u32,
) -> anyhow::Result<Alternating> {
    let mut a = Alternating::default();
    for r in 0..reps {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for (si, streams) in [1u32, 4].into_iter().enumerate() {
            for w in order {
                let g = iperf(bed, server, client, dsts[w], streams, seconds)?;
                eprintln!("  rep {r} {} {streams} stream(s): {g:.2} Gbit/s", labels[w]);
                a.tput[w][si].push(g);
            }
        }
        for w in order {
            a.rtt[w].extend(pings_us(bed, client, dsts[w], 50)?);
        }
    }
    Ok(a)
}

impl Alternating {
    /// Table rows and verdicts: the measured wiring's median throughput over the floor's at least
    /// `targets` (1 stream, 4 streams); `target(streams, target)` words a verdict's target.
    pub(crate) fn report(&self, targets: [f64; 2], target: impl Fn(&str, f64) -> String) -> Vec<Verdict> {
        let mut out = Vec::new();
        let n = self.tput[0][0].len();
        for (si, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
            let (b, v) = (&self.tput[0][si], &self.tput[1][si]);
            let ratio = median(v) / median(b);
            println!(
                "| TCP {streams}, Gbit/s, median of {n} (range) | {:.2} ({}) | {:.2} ({}) | {ratio:.3} | ≥ {:.2} |",
                median(b),
                range(b),
                median(v),
                range(v),
                targets[si]
            );
            out.push(verdict(
                target(streams, targets[si]),
                format!("{ratio:.3} ({:.2} ÷ {:.2} Gbit/s)", median(v), median(b)),
                Some(ratio >= targets[si]),
            ));
        }
        let (b, v) = (median(&self.rtt[0]), median(&self.rtt[1]));
        println!(
            "| RTT median of {} pings, µs | {b:.0} | {v:.0} | {:+.0} µs | |",
            self.rtt[0].len(),
            v - b
        );
        out
    }
}

/// Set-up latency of nsm clients one after another: for each (client, workload), `CreateClient`
/// through `node` (a client of `service` pinned to `endpoint`) until a first round trip from the
/// workload is answered. In the order given.
pub(crate) async fn setup_latency(
    bed: &Testbed,
    node: &mut NodeHandle,
    watch: &mut ReadyWatch,
    service: &str,
    endpoint: &str,
    clients: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Vec<Duration>> {
    let mut setup = Vec::new();
    for (name, workload) in clients {
        let t = Instant::now();
        node.api
            .create_client(client(&name, service, &bed.netns_path(&workload), endpoint, "nsm-1"))
            .await?;
        let (_, d) = watch.ready(&name).await?;
        if crate::common::debug() {
            eprintln!("{name}: ready after {:?}", t.elapsed());
        }
        if !probe(bed.ns(&workload), d, Duration::from_secs(5))? {
            bail!("client {name}: no answer");
        }
        setup.push(t.elapsed());
    }
    Ok(setup)
}

/// Prints the set-up p50 and p99 rows (floor | nsm | nsm ÷ floor | target) of nsm's set-ups
/// (`setup`) against the floor's (both sorted); returns the verdict
/// `{what}: set-up p50 ≤ {target_ms} ms`.
pub(crate) fn setup_rows(what: &str, floor: &[Duration], setup: &[Duration], target_ms: f64) -> Verdict {
    let n = setup.len();
    let (f50, s50) = (ms(percentile(floor, 0.5)), ms(percentile(setup, 0.5)));
    let (f99, s99) = (ms(percentile(floor, 0.99)), ms(percentile(setup, 0.99)));
    println!(
        "| set-up p50 over {n}, ms | {f50:.2} | {s50:.2} | {:.1}× | ≤ {target_ms} ms |",
        s50 / f50
    );
    println!(
        "| set-up p99 over {n}, ms | {f99:.2} | {s99:.2} | {:.1}× | |",
        s99 / f99
    );
    verdict(
        format!("{what}: set-up p50 ≤ {target_ms} ms"),
        format!("{s50:.2} ms (floor {f50:.2} ms)"),
        Some(s50 <= target_ms),
    )
}

/// The `i`-th floor pair's two /32 addresses in 10.`net`.0.0/16 (100 pairs per /24).
pub(crate) fn nth_pair(net: u8, i: usize) -> anyhow::Result<(IpNet, IpNet)> {
    let (c, d) = (i / 100, 2 * (i % 100));
    Ok((
        format!("10.{net}.{c}.{}/32", d + 1).parse()?,
        format!("10.{net}.{c}.{}/32", d + 2).parse()?,
    ))
}

/// The addresses of a floor's one pair that stands beside nsm's: 198.51.100.1 and .2.
pub(crate) fn floor_pair() -> anyhow::Result<(IpNet, IpNet)> {
    Ok(("198.51.100.1/32".parse()?, "198.51.100.2/32".parse()?))
}

/// Table header of the throughput tables.
pub(crate) fn tput_header(floor: &str) -> String {
    format!("| measurement | {floor} (floor) | nsm | nsm ÷ floor | target |\n|---|---:|---:|---:|---|")
}
