//! `nsm-bench vl3`: vL3 join, data plane, join latency and scale, each beside a floor measured in
//! the same run.
//!
//! Parts (`--only`, default all):
//! - `join`: N nodes × M members join one vL3; time from the first `CreateClient` until every
//!   ordered pair of members has exchanged a datagram (all N·M·(N·M−1) pairs probed, none may
//!   fail). Floor: the same topology wired by hand over netlink (a router namespace per host, a
//!   veth per member into it, a full mesh of VXLAN links between the routers, host and prefix
//!   routes, permanent neighbours: what nsm builds, without nsm), timed the same way.
//! - `throughput`: TCP throughput (iperf3, 1 and 4 streams) and RTT between two members on two
//!   hosts over the vL3 (member → router → VXLAN → router → member), against a cross-node VXLAN
//!   vWire between the same two namespaces (client → VXLAN → endpoint), built by the same nodes;
//!   both stand side by side and runs alternate, R repetitions, medians.
//! - `latency`: join latency onto an existing vL3 spread over the nodes: `CreateClient` → the new
//!   member has exchanged a datagram with every other member. Floor: wiring the member by hand
//!   into the hand-built routers, until it reaches every hand-built member.
//! - `scale`: K members on one vL3 across the nodes: first create → all Ready, a reachability
//!   sample, each node's RSS, and each router's state (routes, permanent neighbours, nftables set
//!   elements) against members on that node and prefixes of the others.
//!
//! Reachability probe: every member namespace holds one UDP socket on [`PORT`] (bound to the
//! wildcard address before the member joins, so it serves whichever address the member gets).
//! A probe is a datagram `Q` from member i's socket to member j's address; j's socket answers `R`
//! with its index, and the pair (i, j) counts as reached when that answer arrives at i from j's
//! address. One exchange proves both directions of the pair's path (request and reply). ICMP
//! port-unreachable answers would need no responder but are rate limited per host (a member
//! answering 89 probers at once gets most of its errors suppressed), so they cannot prove 8,010
//! pairs quickly.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use ipnet::IpNet;
use nsm_api::nsm::v1::{
    self as v1, node_service_client::NodeServiceClient, resource_service_client::ResourceServiceClient,
};
use nsm_dataplane::{NetNs, Netlink};
use nsm_testbed::{Testbed, Topology};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::common::{VXLAN_MTU, VXLAN_PORT, Verdict, ms, on_bed, percentile, rss_mb, run_parts, verdict};
use crate::vwire::{self, alternate, client, client_status, first_addr, watch_clients};

/// UDP port of the members' probe sockets.
const PORT: u16 = 7999;
/// Pool of the hand-built floor (a /24 per host).
const FLOOR_NET: [u8; 2] = [10, 201];
/// Pool of the vWire service of the throughput comparison.
const VWIRE_POOL: &str = "10.93.0.0/16";

/// Parts of `nsm-bench vl3`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(crate) enum Part {
    /// Nodes × members joining one vL3: first create → all pairs reachable.
    Join,
    /// Cross-node member-to-member TCP throughput and RTT against a cross-node VXLAN vWire.
    Throughput,
    /// Join latency onto an existing vL3: create → reaches every other member.
    Latency,
    /// Many members: time to all Ready, node RSS, router state.
    Scale,
}

/// Flags of `nsm-bench vl3`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Parts to run (comma-separated).
    #[arg(long, value_delimiter = ',', value_enum,
          default_values_t = [Part::Join, Part::Throughput, Part::Latency, Part::Scale])]
    only: Vec<Part>,
    /// Nodes (test-bed hosts, one `nsm node` each) the vL3 spans.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Members per node in the all-pairs join.
    #[arg(long, default_value_t = 30)]
    members: usize,
    /// The vL3's address pool.
    #[arg(long, default_value = "10.200.0.0/16")]
    pool: String,
    /// Repetitions of each throughput measurement; vL3 and vWire runs alternate, medians are
    /// compared.
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Seconds per iperf3 run (iperf3's default): in shorter runs TCP's ramp and the scheduler's
    /// bursts weigh more in each figure.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Joins measured by `latency` (spread over the nodes in turn).
    #[arg(long, default_value_t = 30)]
    joins: usize,
    /// Members per node already on the vL3 before the measured joins.
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Members in the scale measurement.
    #[arg(long, default_value_t = 1000)]
    scale: usize,
    /// CreateClient calls in flight at once (join and scale).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The `nsm` binary (default: next to this one).
    #[arg(long)]
    pub(crate) nsm_bin: Option<PathBuf>,
}

pub(crate) async fn run(args: Args, bin: PathBuf) -> anyhow::Result<()> {
    if args.nodes < 2 {
        bail!("--nodes: a vL3 across nodes needs at least 2");
    }
    // Interrupted: the part's processes, router namespaces and test bed go when its future is
    // dropped.
    let all = [Part::Join, Part::Throughput, Part::Latency, Part::Scale];
    run_parts(&all, &args.only, async |part| run_part(part, &args, &bin).await).await
}

async fn run_part(part: Part, args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    match part {
        Part::Join => join(args, bin).await,
        Part::Throughput => throughput(args, bin).await,
        Part::Latency => latency(args, bin).await,
        Part::Scale => scale(args, bin).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Test bed, processes, registry.

/// Host `i` of the test bed and its underlay address.
fn host(i: usize) -> (String, String) {
    (format!("h{i}"), format!("192.0.2.{}", 11 + i))
}

/// A topology of `nodes` hosts and the given workloads (name, host index).
fn topology(tag: &str, nodes: usize, workloads: &[(String, usize)]) -> anyhow::Result<Topology> {
    crate::common::topology(
        tag,
        (0..nodes).map(host),
        workloads.iter().map(|(name, h)| (name.clone(), host(*h).0)),
    )
}

/// Deletes, when dropped, the router namespaces (`nsm-vl3-<node>-<hash>` under /run/netns) that
/// the named nodes made: they outlive their daemons by design.
struct RouterCleanup(Vec<String>);

impl Drop for RouterCleanup {
    fn drop(&mut self) {
        for n in router_namespaces(&self.0) {
            if let Err(e) = NetNs::delete(&n)
                && !e.is_not_found()
            {
                eprintln!("nsm-bench: deleting router namespace {n}: {e}");
            }
        }
    }
}

/// The router namespaces of node `node` (exactly `nsm-vl3-<node>-` followed by the vL3's hash).
fn router_namespaces(nodes: &[String]) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(nsm_dataplane::NETNS_RUN_DIR) else {
        return vec![];
    };
    let mut out: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| nodes.iter().any(|node| n.starts_with(&format!("nsm-vl3-{node}-"))))
        .collect();
    out.sort();
    out
}

/// A node daemon of a [`Mesh`].
struct Node {
    name: String,
    api: NodeServiceClient<Channel>,
    pid: u32,
}

/// A registry and one node daemon per test-bed host, as processes. Fields drop in order: the
/// daemons stop, then the router namespaces their nodes made go.
struct Mesh {
    daemons: vwire::Mesh,
    _routers: RouterCleanup,
    nodes: Vec<Node>,
}

impl Mesh {
    /// A registry and one `nsm node` per test-bed host (`tag` makes the node names, and so their
    /// router namespaces, unique to this run and part).
    async fn start(bin: &Path, bed: &Testbed, nodes: usize, tag: &str) -> anyhow::Result<Mesh> {
        let names: Vec<String> = (0..nodes)
            .map(|i| format!("b{}-{tag}-{i}", std::process::id()))
            .collect();
        // Dropped after `daemons` also when a node fails to start.
        let routers = RouterCleanup(names.clone());
        let mut daemons = vwire::Mesh::start(bin).await?;
        let mut started = Vec::with_capacity(nodes);
        for (i, name) in names.into_iter().enumerate() {
            let (h, underlay) = host(i);
            let node = daemons
                .node(&name, &underlay, Some(&bed.netns_path(&h)), true, None)
                .await?;
            started.push(Node {
                name,
                api: node.api,
                pid: node.pid,
            });
        }
        Ok(Mesh {
            daemons,
            _routers: routers,
            nodes: started,
        })
    }

    /// Creates vL3 `name` with pool `cidr` (`nsmctl ns create NAME --type vl3 --cidr CIDR`).
    async fn vl3(&mut self, name: &str, cidr: &str) -> anyhow::Result<()> {
        let spec = v1::NetworkServiceSpec {
            r#type: v1::ServiceType::Vl3 as i32,
            cidr: cidr.into(),
            ..Default::default()
        };
        self.daemons.service_spec(name, spec).await
    }

    /// The RSS of each node daemon, MB.
    fn rss_mb(&self) -> Vec<f64> {
        self.nodes.iter().map(|n| rss_mb(n.pid)).collect()
    }
}

/// What the client watch has seen of one client.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// Its address and when it was first seen Ready.
    ready: Option<(IpAddr, Instant)>,
    failed: Option<String>,
}

/// Every client's phase as the registry's watch reports it, with the instant it was seen.
struct Statuses {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Statuses {
    async fn watch(res: &ResourceServiceClient<Channel>) -> anyhow::Result<Statuses> {
        let mut stream = watch_clients(&mut res.clone()).await?;
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                let at = Instant::now();
                let Some(v1::resource::Kind::Client(c)) = ev.resource.and_then(|r| r.kind) else {
                    continue;
                };
                let name = c.metadata.map(|m| m.name).unwrap_or_default();
                let Some(st) = c.status else { continue };
                let mut seen = s.lock().expect("not poisoned");
                let e = seen.entry(name).or_default();
                if st.phase == v1::client_status::Phase::Ready as i32 {
                    if let (None, Ok(a)) = (e.ready, first_addr(&st.src_ip_addrs)) {
                        e.ready = Some((a, at));
                    }
                } else if st.phase == v1::client_status::Phase::Failed as i32 {
                    e.failed = Some(st.reason);
                }
            }
        });
        Ok(Statuses { seen, task })
    }

    fn get(&self, name: &str) -> Seen {
        self.seen
            .lock()
            .expect("not poisoned")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until every client in `names` is Ready; fails on a Failed one or after `timeout`.
    async fn all_ready(&self, names: &[String], timeout: Duration) -> anyhow::Result<Vec<(IpAddr, Instant)>> {
        let start = Instant::now();
        loop {
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                let s = self.get(n);
                if let Some(why) = s.failed {
                    bail!("client {n} failed: {why}");
                }
                match s.ready {
                    Some(r) => out.push(r),
                    None => break,
                }
            }
            if out.len() == names.len() {
                return Ok(out);
            }
            if start.elapsed() > timeout {
                bail!(
                    "only {} of {} clients Ready after {timeout:?}",
                    names.iter().filter(|n| self.get(n).ready.is_some()).count(),
                    names.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Statuses {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates clients of `service`, each (name, node index) in the workload of its name, through their
/// nodes' APIs, `concurrency` calls in flight.
async fn create_all(
    mesh: &Mesh,
    bed: &Testbed,
    service: &str,
    clients: Vec<(String, usize)>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let apis: Vec<NodeServiceClient<Channel>> = mesh.nodes.iter().map(|n| n.api.clone()).collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(clients)
        .map(|(name, node)| {
            let mut api = apis[node].clone();
            let request = client(&name, service, &bed.netns_path(&name), "", "");
            async move {
                api.create_client(request)
                    .await
                    .with_context(|| format!("CreateClient {name}"))?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Probes.

/// An answer: member `prober`'s probe answered by member `responder`, from `from`, at `at`.
struct Answer {
    prober: usize,
    responder: usize,
    from: IpAddr,
    at: Instant,
}

/// One probe socket per member namespace (see the module documentation).
struct Probes {
    socks: Vec<Arc<tokio::net::UdpSocket>>,
    answers: mpsc::UnboundedReceiver<Answer>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Probes {
    /// Opens a socket on [`PORT`] in each of `namespaces` (index = member index).
    async fn open(bed: &Testbed, namespaces: &[String]) -> anyhow::Result<Probes> {
        let (tx, answers) = mpsc::unbounded_channel();
        let mut socks = Vec::with_capacity(namespaces.len());
        let mut tasks = Vec::with_capacity(namespaces.len());
        for (i, ns) in namespaces.iter().enumerate() {
            let std_sock = bed
                .ns(ns)
                .run_async(|| {
                    let s = std::net::UdpSocket::bind(("0.0.0.0", PORT))?;
                    s.set_nonblocking(true)?;
                    Ok::<_, std::io::Error>(s)
                })
                .await??;
            let sock = Arc::new(tokio::net::UdpSocket::from_std(std_sock)?);
            let (s, tx) = (sock.clone(), tx.clone());
            let me = u32::try_from(i)?.to_le_bytes();
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 16];
                loop {
                    let Ok((n, from)) = s.recv_from(&mut buf).await else {
                        // Transient (an error queued on the socket): keep serving, without spinning.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    match &buf[..n] {
                        [b'Q', ..] => {
                            let reply = [b'R', me[0], me[1], me[2], me[3]];
                            let _ = s.try_send_to(&reply, from);
                        }
                        &[b'R', a, b, c, d] => {
                            let _ = tx.send(Answer {
                                prober: i,
                                responder: u32::from_le_bytes([a, b, c, d]) as usize,
                                from: from.ip(),
                                at: Instant::now(),
                            });
                        }
                        _ => {}
                    }
                }
            }));
            socks.push(sock);
        }
        Ok(Probes { socks, answers, tasks })
    }

    /// Sends one probe from member `from` to `to`'s address; errors (no route yet) are ignored.
    fn send(&self, from: usize, to: IpAddr) {
        let _ = self.socks[from].try_send_to(b"Q", SocketAddr::new(to, PORT));
    }

    /// Answers received so far.
    fn drain(&mut self) -> Vec<Answer> {
        let mut out = Vec::new();
        while let Ok(a) = self.answers.try_recv() {
            out.push(a);
        }
        out
    }

    /// Until every ordered pair of `members` (indexes into the sockets) whose addresses `addr`
    /// knows has answered: probes the unanswered pairs every `period`, re-reading addresses each
    /// round. Returns the instant of the last answer, or the unanswered pairs after `timeout`.
    async fn all_pairs(
        &mut self,
        members: &[usize],
        mut addr: impl FnMut(usize) -> Option<IpAddr>,
        period: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Result<Instant, Vec<(usize, usize)>>> {
        let start = Instant::now();
        let mut reached: HashMap<(usize, usize), Instant> = HashMap::new();
        let total = members.len() * members.len().saturating_sub(1);
        let mut addrs: HashMap<usize, IpAddr> = HashMap::new();
        loop {
            for &m in members {
                if let std::collections::hash_map::Entry::Vacant(e) = addrs.entry(m)
                    && let Some(a) = addr(m)
                {
                    e.insert(a);
                }
            }
            for &i in members {
                if !addrs.contains_key(&i) {
                    continue;
                }
                for &j in members {
                    if i != j
                        && !reached.contains_key(&(i, j))
                        && let Some(&a) = addrs.get(&j)
                    {
                        self.send(i, a);
                    }
                }
            }
            tokio::time::sleep(period).await;
            for a in self.drain() {
                if addrs.get(&a.responder) == Some(&a.from) {
                    reached.entry((a.prober, a.responder)).or_insert(a.at);
                }
            }
            if reached.len() == total {
                let last = reached.values().max().copied().unwrap_or(start);
                return Ok(Ok(last));
            }
            if start.elapsed() > timeout {
                let mut missing = Vec::new();
                for &i in members {
                    for &j in members {
                        if i != j && !reached.contains_key(&(i, j)) {
                            missing.push((i, j));
                        }
                    }
                }
                return Ok(Err(missing));
            }
        }
    }

    /// Member `from` probes each of `to` (addresses) every `period` until all have answered;
    /// returns the instant of the last answer, None after `timeout`.
    async fn reach_all(
        &mut self,
        from: usize,
        to: &[(usize, IpAddr)],
        period: Duration,
        timeout: Duration,
    ) -> Option<Instant> {
        let start = Instant::now();
        let mut got: HashMap<usize, Instant> = HashMap::new();
        while start.elapsed() < timeout {
            for &(j, a) in to {
                if !got.contains_key(&j) {
                    self.send(from, a);
                }
            }
            tokio::time::sleep(period).await;
            for a in self.drain() {
                if a.prober == from && to.iter().any(|&(j, addr)| j == a.responder && addr == a.from) {
                    got.entry(a.responder).or_insert(a.at);
                }
            }
            if got.len() == to.len() {
                return got.values().max().copied().or(Some(start));
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The floor: the same vL3 topology wired by hand.

/// Routers in test-bed namespaces `r<h>` (one per host) joined by a full mesh of VXLAN links,
/// members wired into them with veth pairs: what nsm builds for a vL3, built directly over
/// netlink. Host h's prefix is 10.201.h.0/24, its router's address 10.201.h.1.
struct Floor {
    routers: Vec<(String, Netlink)>,
    members: Vec<(String, usize)>,
}

fn floor_gw(h: usize) -> IpAddr {
    IpAddr::from([FLOOR_NET[0], FLOOR_NET[1], h as u8, 1])
}

impl Floor {
    /// Builds the routers `r0…` of `hosts` hosts and their links.
    async fn routers(bed: &Testbed, hosts: usize) -> anyhow::Result<Floor> {
        let mut routers = Vec::new();
        for h in 0..hosts {
            let name = format!("r{h}");
            let ns = bed.ns(&name);
            nsm_dataplane::enable_ip_forwarding(ns, false)?;
            let nl = Netlink::connect(ns).await?;
            nl.set_up("lo").await?;
            nl.add_address("lo", IpNet::from(floor_gw(h))).await?;
            routers.push((name, nl));
        }
        for a in 0..hosts {
            for b in a + 1..hosts {
                for (me, peer) in [(a, b), (b, a)] {
                    let (hname, local) = host(me);
                    let remote: IpAddr = host(peer).1.parse()?;
                    let link = format!("fx{peer}");
                    let hnl = Netlink::connect(bed.ns(&hname)).await?;
                    let rnl = &routers[me].1;
                    hnl.create_vxlan_in(
                        bed.ns(&routers[me].0),
                        &link,
                        0x00f0_0000 + (a * 64 + b) as u32,
                        local.parse()?,
                        remote,
                        VXLAN_PORT,
                        VXLAN_MTU,
                    )
                    .await?;
                    rnl.set_up(&link).await?;
                    let pgw = floor_gw(peer);
                    rnl.add_route(IpNet::from(pgw), None, &link).await?;
                    let prefix = IpNet::new(IpAddr::from([FLOOR_NET[0], FLOOR_NET[1], peer as u8, 0]), 24)?;
                    rnl.add_route(prefix, Some(pgw), &link).await?;
                }
            }
        }
        Ok(Floor {
            routers,
            members: Vec::new(),
        })
    }

    /// Wires member namespace `ns` (the `k`-th member of host `h`) into its host's router, as nsm
    /// wires a vL3 member; returns its address.
    async fn member(&mut self, bed: &Testbed, ns: &str, h: usize, k: usize) -> anyhow::Result<IpAddr> {
        let (rname, rnl) = &self.routers[h];
        let addr = IpAddr::from([FLOOR_NET[0], FLOOR_NET[1], h as u8, u8::try_from(k + 2)?]);
        let gw = floor_gw(h);
        let peer = format!("b{}", self.members.len());
        let cnl = Netlink::connect(bed.ns(ns)).await?;
        cnl.create_veth("bare0", &peer, bed.ns(rname), VXLAN_MTU).await?;
        cnl.add_address("bare0", IpNet::from(addr)).await?;
        rnl.add_address(&peer, IpNet::from(gw)).await?;
        cnl.set_up("bare0").await?;
        rnl.set_up(&peer).await?;
        cnl.add_route(IpNet::from(gw), None, "bare0").await?;
        let pool = IpNet::new(IpAddr::from([FLOOR_NET[0], FLOOR_NET[1], 0, 0]), 16)?;
        cnl.add_route(pool, Some(gw), "bare0").await?;
        rnl.add_route(IpNet::from(addr), None, &peer).await?;
        let mac = |l: Option<nsm_dataplane::LinkInfo>| l.map(|l| l.mac).unwrap_or_default();
        let cmac = mac(cnl.link("bare0").await?);
        let rmac = mac(rnl.link(&peer).await?);
        cnl.add_neighbour("bare0", gw, &rmac).await?;
        rnl.add_neighbour(&peer, addr, &cmac).await?;
        self.members.push((ns.to_owned(), h));
        Ok(addr)
    }

    /// Removes every link the floor made (member veths, router links).
    async fn remove(self, bed: &Testbed) -> anyhow::Result<()> {
        for (ns, _) in &self.members {
            Netlink::connect(bed.ns(ns)).await?.delete_link("bare0").await?;
        }
        for (_, nl) in &self.routers {
            for l in nl.links().await? {
                if l.name.starts_with("fx") {
                    nl.delete_link(&l.name).await?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Parts.

/// Formats the first few unanswered pairs.
fn missing_pairs(missing: &[(usize, usize)], names: &[String]) -> String {
    let shown: Vec<String> = missing
        .iter()
        .take(10)
        .map(|(i, j)| format!("{} -> {}", names[*i], names[*j]))
        .collect();
    format!("{} unanswered pairs, e.g. {}", missing.len(), shown.join(", "))
}

/// `join`: nodes × members join one vL3; first create → all pairs reachable.
async fn join(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let (nodes, per) = (args.nodes, args.members);
    let n = nodes * per;
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    // Member i is on host i % nodes.
    let mut workloads: Vec<(String, usize)> = names.iter().enumerate().map(|(i, m)| (m.clone(), i % nodes)).collect();
    workloads.extend((0..nodes).map(|h| (format!("r{h}"), h)));
    let pairs = n * (n - 1);
    on_bed(topology("vl3j", nodes, &workloads)?, async |bed: &Testbed| {
        let mut probes = Probes::open(bed, &names).await?;
        let all: Vec<usize> = (0..n).collect();

        // Floor: build it all by hand, then probe the same way.
        eprintln!("floor: {nodes} hand-built routers and {n} members over netlink, then {pairs} pairs …");
        let t0 = Instant::now();
        let mut floor = Floor::routers(bed, nodes).await?;
        let mut faddr = Vec::with_capacity(n);
        for (i, m) in names.iter().enumerate() {
            faddr.push(floor.member(bed, m, i % nodes, i / nodes).await?);
        }
        let floor_built = t0.elapsed();
        let floor_done = match probes
            .all_pairs(
                &all,
                |i| Some(faddr[i]),
                Duration::from_millis(5),
                Duration::from_secs(30),
            )
            .await?
        {
            Ok(t) => t.duration_since(t0),
            Err(missing) => bail!("hand-built vL3: {}", missing_pairs(&missing, &names)),
        };
        // The probe's own cost: one more full pass over a mesh that already answers.
        let t = Instant::now();
        if let Err(m) = probes
            .all_pairs(
                &all,
                |i| Some(faddr[i]),
                Duration::from_millis(1),
                Duration::from_secs(10),
            )
            .await?
        {
            bail!("hand-built vL3, second pass: {}", missing_pairs(&m, &names));
        }
        let probe_pass = t.elapsed();
        floor.remove(bed).await?;

        // nsm.
        let mut mesh = Mesh::start(bin, bed, nodes, "j").await?;
        mesh.vl3("bench", &args.pool).await?;
        let statuses = Statuses::watch(&mesh.daemons.res).await?;
        let clients: Vec<(String, usize)> = names.iter().enumerate().map(|(i, m)| (m.clone(), i % nodes)).collect();
        eprintln!(
            "nsm: {n} CreateClient calls ({} in flight), then {pairs} pairs …",
            args.concurrency
        );
        let t0 = Instant::now();
        let creating = create_all(&mesh, bed, "bench", clients, args.concurrency);
        let names_ref = &names;
        let probing = probes.all_pairs(
            &all,
            |i| statuses.get(&names_ref[i]).ready.map(|(a, _)| a),
            Duration::from_millis(5),
            Duration::from_secs(60),
        );
        let (created, probed) = tokio::join!(
            async {
                let r = creating.await;
                (r, t0.elapsed())
            },
            probing
        );
        created.0?;
        let created_in = created.1;
        let ready = statuses.all_ready(&names, Duration::from_secs(1)).await?;
        let last_ready = ready.iter().map(|(_, t)| *t).max().unwrap_or(t0).duration_since(t0);
        let done = match probed? {
            Ok(t) => t.duration_since(t0),
            Err(missing) => bail!("nsm vL3: {}", missing_pairs(&missing, &names)),
        };
        let rss = mesh.rss_mb();
        let state = router_state(&mesh).await?;
        drop(statuses);
        drop(mesh);

        println!("\nvL3 join: {nodes} nodes × {per} members, first create → all {pairs} ordered pairs answered:\n");
        println!("| measurement | hand-built (floor) | nsm | target |");
        println!("|---|---:|---:|---|");
        println!(
            "| all {n} created (nsm: CreateClient calls returned), ms | {:.0} | {:.0} | |",
            ms(floor_built),
            ms(created_in)
        );
        println!("| all {n} Ready (status), ms | | {:.0} | |", ms(last_ready));
        println!(
            "| all {pairs} pairs answered, ms | {:.0} | {:.0} | ≤ 5000 |",
            ms(floor_done),
            ms(done)
        );
        println!(
            "| one probe pass over {pairs} answering pairs, ms | {:.0} | | |",
            ms(probe_pass)
        );
        println!("| node RSS after, MB | | {} | |", mbs(&rss));
        print_router_state(&state);
        Ok(vec![verdict(
            format!("join: {nodes}×{per} members, first create → all {pairs} pairs reachable ≤ 5 s"),
            format!(
                "{:.2} s, {pairs}/{pairs} pairs (hand-built floor {:.2} s)",
                done.as_secs_f64(),
                floor_done.as_secs_f64()
            ),
            Some(done <= Duration::from_secs(5)),
        )])
    })
    .await
}

/// `throughput`: member to member across two nodes over the vL3, against a cross-node VXLAN vWire
/// between the same two namespaces.
async fn throughput(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let workloads = vec![("x".to_string(), 0), ("y".to_string(), 1)];
    on_bed(topology("vl3t", 2, &workloads)?, async |bed: &Testbed| {
        let mut mesh = Mesh::start(bin, bed, 2, "t").await?;
        let statuses = Statuses::watch(&mesh.daemons.res).await?;
        mesh.vl3("bench", &args.pool).await?;
        // The vWire: client in x on node 0, endpoint in y on node 1.
        mesh.daemons.service("wire", VWIRE_POOL).await?;
        mesh.daemons
            .endpoint("ep-y", "wire", &bed.netns_path("y"), &mesh.nodes[1].name)
            .await?;
        let (x, y) = (bed.netns_path("x"), bed.netns_path("y"));
        mesh.nodes[0]
            .api
            .create_client(client("vx", "bench", &x, "", ""))
            .await?;
        mesh.nodes[1]
            .api
            .create_client(client("vy", "bench", &y, "", ""))
            .await?;
        mesh.nodes[0]
            .api
            .create_client(client("wx", "wire", &x, "ep-y", ""))
            .await?;
        let names = ["vx", "vy", "wx"].map(String::from);
        statuses.all_ready(&names, Duration::from_secs(20)).await?;
        let vl3_dst = statuses.get("vy").ready.context("vy")?.0;
        // The vWire's far address: the endpoint's side, from the client's status.
        let wire_status = client_status(&mut mesh.daemons.res, "wx")
            .await?
            .context("wx: no status")?;
        let wire_dst = first_addr(&wire_status.dst_ip_addrs)?;
        eprintln!(
            "vL3 x → {vl3_dst} (y), vWire x → {wire_dst} (y); {} × (iperf3 1 and 4 streams, {} s) alternating …",
            args.reps, args.seconds
        );
        let labels = ["vWire", "vL3  "];
        let before = member_sent(bed, "x").await?;
        let a = alternate(bed, "y", "x", [wire_dst, vl3_dst], labels, args.reps, args.seconds)?;
        let after = member_sent(bed, "x").await?;
        // Which way the vL3's bytes left x: its shortcut to node 1 or its veth into its router.
        eprintln!(
            "x sent {:.1} GB through its vL3 shortcut(s), {:.1} GB through its vL3 veth",
            (after.0 - before.0) as f64 / 1e9,
            (after.1 - before.1) as f64 / 1e9
        );
        drop(statuses);
        drop(mesh);

        println!("\nvL3 member → member across two nodes vs a cross-node VXLAN vWire between the same namespaces:\n");
        println!("| measurement | vWire (floor) | vL3 | vL3 ÷ vWire | target |");
        println!("|---|---:|---:|---:|---|");
        Ok(a.report([0.90, 0.90], |s, _| {
            format!("throughput: vL3 ÷ cross-node vWire, TCP {s} ≥ 0.90")
        }))
    })
    .await
}

/// Bytes namespace `w` has sent through its vL3 shortcuts (links nsm marks with an alias) and
/// through its veth links.
async fn member_sent(bed: &Testbed, w: &str) -> anyhow::Result<(u64, u64)> {
    let nl = nsm_dataplane::Netlink::connect(bed.workload_ns(w)).await?;
    let (mut shortcut, mut veth) = (0, 0);
    for l in nl.links().await? {
        if l.alias
            .as_deref()
            .is_some_and(nsm_dataplane::fastpath::is_shortcut_alias)
        {
            shortcut += l.stats.tx_bytes;
        } else if l.kind.as_deref() == Some("veth") {
            veth += l.stats.tx_bytes;
        }
    }
    Ok((shortcut, veth))
}

/// `latency`: joins onto an existing vL3 spread over the nodes, create → reaches every other
/// member; against wiring a member by hand into hand-built routers.
async fn latency(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let nodes = args.nodes;
    let seeds = nodes * args.seeds;
    let joins = args.joins;
    // Members 0..seeds are the existing ones, then the joiners; member i is on host i % nodes.
    let names: Vec<String> = (0..seeds)
        .map(|i| format!("s{i}"))
        .chain((0..joins).map(|i| format!("j{i}")))
        .collect();
    let on_host = |i: usize| if i < seeds { i % nodes } else { (i - seeds) % nodes };
    let mut workloads: Vec<(String, usize)> = names.iter().enumerate().map(|(i, m)| (m.clone(), on_host(i))).collect();
    workloads.extend((0..nodes).map(|h| (format!("r{h}"), h)));
    on_bed(topology("vl3l", nodes, &workloads)?, async |bed: &Testbed| {
        let mut probes = Probes::open(bed, &names).await?;
        let period = Duration::from_millis(1);
        let timeout = Duration::from_secs(10);

        // Floor.
        eprintln!("floor: {seeds} hand-built members, then {joins} joins by hand …");
        let mut floor = Floor::routers(bed, nodes).await?;
        let mut per_host = vec![0usize; nodes];
        let mut members: Vec<(usize, IpAddr)> = Vec::new();
        for (i, name) in names.iter().enumerate().take(seeds) {
            let h = on_host(i);
            members.push((i, floor.member(bed, name, h, per_host[h]).await?));
            per_host[h] += 1;
        }
        let seed_idx: Vec<usize> = (0..seeds).collect();
        let addrs: HashMap<usize, IpAddr> = members.iter().copied().collect();
        if let Err(m) = probes
            .all_pairs(&seed_idx, |i| addrs.get(&i).copied(), period, timeout)
            .await?
        {
            bail!("hand-built seeds: {}", missing_pairs(&m, &names));
        }
        let mut floor_lat = Vec::with_capacity(joins);
        for (i, name) in names.iter().enumerate().skip(seeds) {
            let h = on_host(i);
            let t = Instant::now();
            let a = floor.member(bed, name, h, per_host[h]).await?;
            per_host[h] += 1;
            let Some(done) = probes.reach_all(i, &members, period, timeout).await else {
                bail!("hand-built join of {} did not reach every member", name);
            };
            floor_lat.push(done.duration_since(t));
            members.push((i, a));
        }
        floor.remove(bed).await?;

        // nsm: seeds first, all pairs answering, then the joins one at a time.
        let mut mesh = Mesh::start(bin, bed, nodes, "l").await?;
        mesh.vl3("bench", &args.pool).await?;
        let statuses = Statuses::watch(&mesh.daemons.res).await?;
        eprintln!("nsm: {seeds} members on {nodes} nodes, then {joins} joins …");
        let seed_clients = (0..seeds).map(|i| (names[i].clone(), on_host(i))).collect();
        create_all(&mesh, bed, "bench", seed_clients, args.concurrency).await?;
        statuses.all_ready(&names[..seeds], Duration::from_secs(30)).await?;
        let seeded = probes
            .all_pairs(
                &seed_idx,
                |i| statuses.get(&names[i]).ready.map(|(a, _)| a),
                period,
                timeout,
            )
            .await?;
        if let Err(m) = seeded {
            bail!("nsm seeds: {}", missing_pairs(&m, &names));
        }
        let mut members: Vec<(usize, IpAddr)> = (0..seeds)
            .map(|i| Ok((i, statuses.get(&names[i]).ready.context("seed")?.0)))
            .collect::<anyhow::Result<_>>()?;
        let mut lat = Vec::with_capacity(joins);
        let mut to_ready = Vec::with_capacity(joins);
        for i in seeds..seeds + joins {
            let node = on_host(i);
            let t = Instant::now();
            let mut api = mesh.nodes[node].api.clone();
            api.create_client(client(&names[i], "bench", &bed.netns_path(&names[i]), "", ""))
                .await?;
            let Some(done) = probes.reach_all(i, &members, period, timeout).await else {
                let s = statuses.get(&names[i]);
                bail!("nsm join of {} did not reach every member: {s:?}", names[i]);
            };
            lat.push(done.duration_since(t));
            // Ready as the watch saw it (it may come after the first answers).
            let ready = statuses.all_ready(&names[i..=i], timeout).await?[0];
            to_ready.push(ready.1.duration_since(t));
            members.push((i, ready.0));
            // Let the node write the status and settle before the next join.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(statuses);
        drop(mesh);

        for v in [&mut floor_lat, &mut lat, &mut to_ready] {
            v.sort_unstable();
        }
        let p = |v: &[Duration], q: f64| ms(percentile(v, q));
        println!(
            "\nvL3 join latency: {joins} joins (in turn on each of {nodes} nodes) onto a vL3 of {seeds} members, \
             until the new member has exchanged a datagram with every other member:\n"
        );
        println!("| measurement | hand-built (floor) | nsm | target |");
        println!("|---|---:|---:|---|");
        println!(
            "| join → reaches all, p50, ms | {:.1} | {:.1} | ≤ 50 ms |",
            p(&floor_lat, 0.5),
            p(&lat, 0.5)
        );
        println!(
            "| join → reaches all, p99, ms | {:.1} | {:.1} | |",
            p(&floor_lat, 0.99),
            p(&lat, 0.99)
        );
        println!(
            "| join → Ready seen in the registry's watch, p50 / p99, ms | | {:.1} / {:.1} | |",
            p(&to_ready, 0.5),
            p(&to_ready, 0.99)
        );
        Ok(vec![verdict(
            "latency: join → reaches every member, p50 ≤ 50 ms",
            format!(
                "{:.1} ms, p99 {:.1} ms (hand-built floor {:.1} / {:.1} ms)",
                p(&lat, 0.5),
                p(&lat, 0.99),
                p(&floor_lat, 0.5),
                p(&floor_lat, 0.99)
            ),
            Some(p(&lat, 0.5) <= 50.0),
        )])
    })
    .await
}

/// One router namespace's state.
struct RouterState {
    node: String,
    netns: String,
    routes: usize,
    neighbours: usize,
    set_elements: usize,
    links: usize,
}

/// Members (by node), own and peer prefixes, and every router's state.
struct MeshState {
    /// node → (members there, prefixes it leases).
    per_node: BTreeMap<String, (usize, usize)>,
    routers: Vec<RouterState>,
}

impl MeshState {
    /// (members on `r`'s node, prefixes that node leases, prefixes the other nodes lease).
    fn counts(&self, r: &RouterState) -> (usize, usize, usize) {
        let prefixes: usize = self.per_node.values().map(|(_, p)| p).sum();
        let (members, own) = self.per_node.get(&r.node).copied().unwrap_or_default();
        (members, own, prefixes - own)
    }

    /// The IPv4 routes router `r` should hold: one per member on its node, and per peer prefix its
    /// router's address and the prefix behind it.
    fn expected_routes(&self, r: &RouterState) -> usize {
        let (members, _, peer) = self.counts(r);
        members + 2 * peer
    }
}

/// Reads the routers of a mesh: IPv4 routes of the main table and permanent neighbours (netlink /
/// `ip neigh`), nftables set elements (`nft -j list table inet nsmvl3`).
async fn router_state(mesh: &Mesh) -> anyhow::Result<MeshState> {
    let mut res = mesh.daemons.res.clone();
    let list = |kind: v1::Kind| v1::ListRequest {
        kind: kind as i32,
        ..Default::default()
    };
    let mut per_node: BTreeMap<String, (usize, usize)> = mesh.nodes.iter().map(|n| (n.name.clone(), (0, 0))).collect();
    for r in res.list(list(v1::Kind::Client)).await?.into_inner().items {
        if let Some(v1::resource::Kind::Client(c)) = r.kind
            && let Some(spec) = c.spec
            && let Some(e) = per_node.get_mut(&spec.node)
            && c.status
                .is_some_and(|s| s.phase == v1::client_status::Phase::Ready as i32)
        {
            e.0 += 1;
        }
    }
    for r in res.list(list(v1::Kind::Prefix)).await?.into_inner().items {
        if let Some(v1::resource::Kind::Prefix(p)) = r.kind
            && let Some(e) = p.spec.and_then(|s| per_node.get_mut(&s.node))
        {
            e.1 += 1;
        }
    }
    let mut routers = Vec::new();
    for node in &mesh.nodes {
        for netns in router_namespaces(std::slice::from_ref(&node.name)) {
            let ns = NetNs::open_named(&netns)?;
            let nl = Netlink::connect(&ns).await?;
            let routes = nl.routes().await?.iter().filter(|r| r.dst.addr().is_ipv4()).count();
            let links = nl.links().await?.len();
            let neigh = Command::new("ip")
                .args(["-n", &netns, "-4", "neigh", "show", "nud", "permanent"])
                .output()?;
            let neighbours = String::from_utf8_lossy(&neigh.stdout).lines().count();
            let nft = Command::new("nsenter")
                .arg(format!("--net={}", nsm_dataplane::named_path(&netns).display()))
                .args(["--", "nft", "-j", "list", "table", "inet", "nsmvl3"])
                .output()?;
            let j: serde_json::Value = serde_json::from_slice(&nft.stdout).unwrap_or_default();
            let set_elements = j["nftables"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i["set"]["elem"].as_array())
                        .map(Vec::len)
                        .sum()
                })
                .unwrap_or(0);
            routers.push(RouterState {
                node: node.name.clone(),
                netns,
                routes,
                neighbours,
                set_elements,
                links,
            });
        }
    }
    Ok(MeshState { per_node, routers })
}

/// Each node's RSS, MB, as `a / b / …`.
fn mbs(v: &[f64]) -> String {
    v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / ")
}

fn print_router_state(s: &MeshState) {
    println!(
        "\nRouter state (routes = IPv4 main table; expected = members on the node + 2 per peer prefix: \
         its router's address and the prefix behind it):\n"
    );
    println!(
        "| node | router namespace | members here | own prefixes | peer prefixes | routes | expected | permanent neighbours | nft set elements | links |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &s.routers {
        let (members, own, peer) = s.counts(r);
        println!(
            "| {} | {} | {members} | {own} | {peer} | {} | {} | {} | {} | {} |",
            r.node,
            r.netns,
            r.routes,
            s.expected_routes(r),
            r.neighbours,
            r.set_elements,
            r.links
        );
    }
}

/// `scale`: many members on one vL3 across the nodes.
async fn scale(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let (nodes, n) = (args.nodes, args.scale);
    if n < 2 * nodes {
        bail!("--scale: at least two members per node");
    }
    let names: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let workloads: Vec<(String, usize)> = names.iter().enumerate().map(|(i, m)| (m.clone(), i % nodes)).collect();
    on_bed(topology("vl3s", nodes, &workloads)?, async |bed: &Testbed| {
        let mut probes = Probes::open(bed, &names).await?;
        let mut mesh = Mesh::start(bin, bed, nodes, "s").await?;
        mesh.vl3("bench", &args.pool).await?;
        let statuses = Statuses::watch(&mesh.daemons.res).await?;
        let rss_before = mesh.rss_mb();
        eprintln!("nsm: {n} CreateClient calls ({} in flight) …", args.concurrency);
        let t0 = Instant::now();
        create_all(&mesh, bed, "bench", workloads.clone(), args.concurrency).await?;
        let created = t0.elapsed();
        let ready = statuses.all_ready(&names, Duration::from_secs(600)).await?;
        let all_ready = ready.iter().map(|(_, t)| *t).max().unwrap_or(t0).duration_since(t0);
        eprintln!(
            "all {n} Ready in {:.1} s; reachability sample and router state …",
            all_ready.as_secs_f64()
        );
        // Sample: each member → the next one (another node) and the one `nodes` on (same node).
        let mut sample_ok = 0;
        let mut sample_failed = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let to: Vec<(usize, IpAddr)> = [(i + 1) % n, (i + nodes) % n]
                .into_iter()
                .map(|j| (j, ready[j].0))
                .collect();
            match probes
                .reach_all(i, &to, Duration::from_millis(2), Duration::from_secs(2))
                .await
            {
                Some(_) => sample_ok += to.len(),
                None => sample_failed.push(name.clone()),
            }
        }
        if !sample_failed.is_empty() {
            bail!(
                "reachability sample: {} members did not reach their two peers, e.g. {:?}",
                sample_failed.len(),
                &sample_failed[..sample_failed.len().min(10)]
            );
        }
        let rss = mesh.rss_mb();
        let state = router_state(&mesh).await?;
        drop(statuses);
        drop(mesh);

        println!("\nvL3 scale: {n} members on {nodes} nodes ({} CreateClient calls in flight):\n", args.concurrency);
        println!("| measurement | nsm |");
        println!("|---|---:|");
        println!("| all {n} CreateClient calls returned, s | {:.2} |", created.as_secs_f64());
        println!("| first create → all {n} Ready, s | {:.2} |", all_ready.as_secs_f64());
        println!(
            "| reachability sample (each member → next member on another node and one on its own) | {sample_ok}/{sample_ok} pairs |"
        );
        println!("| node RSS before → after, MB | {} → {} |", mbs(&rss_before), mbs(&rss));
        print_router_state(&state);
        let bounded = state.routers.iter().all(|r| r.routes == state.expected_routes(r));
        Ok(vec![
            verdict(
                format!("scale: {n} members on {nodes} nodes, first create → all Ready"),
                format!("{:.2} s", all_ready.as_secs_f64()),
                None,
            ),
            verdict(
                "scale: node RSS",
                format!("{} MB", mbs(&rss)),
                None,
            ),
            verdict(
                "scale: router routes = members on the node + 2 per peer prefix (not total members)",
                state
                    .routers
                    .iter()
                    .map(|r| format!("{} routes", r.routes))
                    .collect::<Vec<_>>()
                    .join(", "),
                Some(bounded),
            ),
        ])
    })
    .await
}
