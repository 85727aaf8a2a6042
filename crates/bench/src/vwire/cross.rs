//! Cross-node vWires: a VXLAN vWire through two node daemons against a kernel VXLAN pair built by
//! hand, between the same two test-bed hosts and workloads.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use ipnet::IpNet;
use nsm_dataplane::{NetNs, Netlink};
use nsm_testbed::Testbed;

use super::{
    Args, Mesh, ReadyWatch, alternate, client, floor_pair, nth_pair, probe, setup_latency, setup_rows, tput_header,
    wait_ready,
};
use crate::common::{H1, H2, VXLAN_MTU, VXLAN_PORT, Verdict, ms, on_bed, percentile, two_hosts};

/// How a hand-built VXLAN end gets into the workload's namespace.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// Created in the host's namespace, then moved (two netlink calls; the move waits for RCU
    /// grace periods).
    Moved,
    /// Created directly inside the workload's namespace by a request from the host's, as nsm
    /// does: the same kernel state in one call.
    InPlace,
}

/// One end of a hand-built VXLAN pair: its UDP socket in `host` (on the underlay), the link in
/// `target` with `addr` and a host route to `peer`.
#[allow(clippy::too_many_arguments)]
async fn vxlan_end(
    build: Build,
    host: &NetNs,
    target: &NetNs,
    name: &str,
    vni: u32,
    local: IpAddr,
    remote: IpAddr,
    addr: IpNet,
    peer: IpNet,
) -> anyhow::Result<()> {
    let hnl = Netlink::connect(host).await?;
    let tnl = Netlink::connect(target).await?;
    match build {
        Build::Moved => {
            hnl.create_vxlan(name, vni, local, remote, VXLAN_PORT, VXLAN_MTU)
                .await?;
            hnl.move_to(name, target).await?;
        }
        Build::InPlace => {
            hnl.create_vxlan_in(target, name, vni, local, remote, VXLAN_PORT, VXLAN_MTU)
                .await?;
        }
    }
    tnl.add_address(name, addr).await?;
    tnl.set_up(name).await?;
    tnl.add_route(peer, None, name).await?;
    Ok(())
}

/// A hand-built VXLAN pair `name` between workload `a` on host h1 and `b` on host h2.
#[allow(clippy::too_many_arguments)]
async fn vxlan_pair(
    build: Build,
    bed: &Testbed,
    name: &str,
    vni: u32,
    a: &str,
    b: &str,
    src: IpNet,
    dst: IpNet,
) -> anyhow::Result<()> {
    let (h1, h2): (IpAddr, IpAddr) = (H1.parse()?, H2.parse()?);
    vxlan_end(build, bed.ns("h1"), bed.ns(a), name, vni, h1, h2, src, dst).await?;
    vxlan_end(build, bed.ns("h2"), bed.ns(b), name, vni, h2, h1, dst, src).await?;
    Ok(())
}

/// Set-up latency of `m` hand-built VXLAN pairs between `q0…` and `y`, one after another, each
/// until a first round trip answers (sorted); the pairs are removed afterwards.
async fn floor(bed: &Testbed, m: usize, build: Build) -> anyhow::Result<Vec<Duration>> {
    let mut floor = Vec::with_capacity(m);
    for i in 0..m {
        let (s, d) = nth_pair(94, i)?;
        let (name, q) = (format!("bf{i}"), format!("q{i}"));
        let t = Instant::now();
        vxlan_pair(build, bed, &name, 0x00b1_0000 + i as u32, &q, "y", s, d).await?;
        if !probe(bed.ns(&q), d.addr(), Duration::from_secs(5))? {
            bail!("hand-built VXLAN {i}: no answer");
        }
        floor.push(t.elapsed());
    }
    let ynl = Netlink::connect(bed.ns("y")).await?;
    for i in 0..m {
        let name = format!("bf{i}");
        Netlink::connect(bed.ns(&format!("q{i}")))
            .await?
            .delete_link(&name)
            .await?;
        ynl.delete_link(&name).await?;
    }
    floor.sort_unstable();
    Ok(floor)
}

pub(crate) async fn run(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let m = args.cross_clients;
    let mut workloads = vec![("x".to_string(), "h1"), ("y".to_string(), "h2")];
    workloads.extend((0..m).map(|i| (format!("q{i}"), "h1")));
    let topo = two_hosts("cross", workloads)?;
    on_bed(topo, async |bed: &Testbed| {
        // The floor's pair between x and y, built the way the issue describes (created in the
        // host's namespace, moved into the workload's), left standing beside nsm's.
        let (src, dst) = floor_pair()?;
        vxlan_pair(Build::Moved, bed, "bx0", 0x00b0_0001, "x", "y", src, dst).await?;

        let mut mesh = Mesh::start(bin).await?;
        let resync = args.node_resync.as_deref();
        let mut node_a = mesh
            .node("node-a", H1, Some(&bed.netns_path("h1")), true, resync)
            .await?;
        let _node_b = mesh
            .node("node-b", H2, Some(&bed.netns_path("h2")), true, resync)
            .await?;
        mesh.service("xbench", "10.93.0.0/16").await?;
        mesh.endpoint("ep-y", "xbench", &bed.netns_path("y"), "node-b").await?;
        node_a
            .api
            .create_client(client("xt", "xbench", &bed.netns_path("x"), "ep-y", "nsm-1"))
            .await?;
        let (_, vdst) = wait_ready(&mut mesh.res, "xt").await?;
        eprintln!(
            "cross node: {} × (iperf3 1 and 4 streams, {} s), hand-built VXLAN and nsm vWire alternating …",
            args.reps, args.seconds
        );
        let labels = ["bare", "nsm "];
        let a = alternate(bed, "y", "x", [dst.addr(), vdst], labels, args.reps, args.seconds)?;

        // Set-up latency: the floor builds the same pair by hand as nsm does (and, for
        // comparison, the way that moves each end), then nsm clients.
        eprintln!("cross-node set-up: {m} VXLAN pairs built directly over netlink, twice …");
        let floor_in_place = floor(bed, m, Build::InPlace).await?;
        let floor_moved = floor(bed, m, Build::Moved).await?;
        eprintln!("cross-node set-up: {m} nsm clients (CreateClient → first round trip) …");
        let mut watch = ReadyWatch::start(&mut mesh.res).await?;
        let clients = (0..m).map(|i| (format!("xc{i}"), format!("q{i}")));
        let mut setup = setup_latency(bed, &mut node_a, &mut watch, "xbench", "ep-y", clients).await?;
        setup.sort_unstable();

        println!("\nCross-node VXLAN vWire vs a hand-built kernel VXLAN pair between the same hosts:\n");
        println!("{}", tput_header("hand-built VXLAN"));
        let mut v = a.report([0.95, 0.95], |s, t| format!("cross node: TCP {s} nsm ÷ floor ≥ {t:.2}"));
        let setup_verdict = setup_rows("cross node", &floor_in_place, &setup, 25.0);
        println!(
            "| set-up p50 / p99 over {m}, ms, floor's ends created in the host namespace and moved | {:.2} / {:.2} | | | |",
            ms(percentile(&floor_moved, 0.5)),
            ms(percentile(&floor_moved, 0.99))
        );
        v.push(setup_verdict);
        Ok(v)
    })
    .await
}
