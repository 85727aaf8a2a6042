//! Same-node vWires: throughput and RTT against a bare veth pair, set-up latency against direct
//! netlink wiring.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use nsm_dataplane::Netlink;
use nsm_testbed::Testbed;

use super::{
    Args, Mesh, ReadyWatch, alternate, client, floor_pair, nth_pair, probe, setup_latency, setup_rows, tput_header,
    wait_ready, wire_bare,
};
use crate::common::{H1, Verdict, median, on_bed, one_host, verdict};

/// Throughput (1 and 4 streams) and RTT between workloads `a` and `b`: a bare veth pair and an nsm
/// vWire stand side by side (different interfaces and addresses) and runs alternate between them.
pub(crate) async fn throughput(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let topo = one_host("tput", ["a".to_string(), "b".to_string()])?;
    on_bed(topo, async |bed: &Testbed| {
        let (src, dst) = floor_pair()?;
        wire_bare(bed.ns("a"), bed.ns("b"), "bare0", src, dst).await?;
        let mut mesh = Mesh::start(bin).await?;
        let mut node = mesh
            .node("bench-node", H1, None, false, args.node_resync.as_deref())
            .await?;
        mesh.service("bench", "10.90.0.0/16").await?;
        mesh.endpoint("ep-b", "bench", &bed.netns_path("b"), "bench-node")
            .await?;
        node.api
            .create_client(client("tput", "bench", &bed.netns_path("a"), "ep-b", "nsm-1"))
            .await?;
        let (_, vdst) = wait_ready(&mut mesh.res, "tput").await?;
        eprintln!(
            "same node: {} × (iperf3 1 and 4 streams, {} s), bare veth and nsm vWire alternating …",
            args.reps, args.seconds
        );
        let labels = ["bare", "nsm "];
        let a = alternate(bed, "b", "a", [dst.addr(), vdst], labels, args.reps, args.seconds)?;
        println!("\nSame-node vWire vs bare veth pair between the same two namespaces:\n");
        println!("{}", tput_header("bare veth"));
        let mut v = a.report([0.95, 0.90], |s, t| format!("same node: TCP {s} nsm ÷ floor ≥ {t:.2}"));
        let rtt_delta = median(&a.rtt[1]) - median(&a.rtt[0]);
        v.push(verdict(
            "same node: RTT ≤ floor + 10 µs",
            format!("{rtt_delta:+.0} µs"),
            Some(rtt_delta <= 10.0),
        ));
        Ok(v)
    })
    .await
}

/// Set-up latency: `n` workloads wired directly over netlink until a first round trip answers (the
/// floor), then `n` nsm clients from `CreateClient` until their first round trip answers.
pub(crate) async fn setup(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let n = args.clients;
    let topo = one_host(
        "setup",
        std::iter::once("e".to_string()).chain((0..n).map(|i| format!("p{i}"))),
    )?;
    on_bed(topo, async |bed: &Testbed| {
        eprintln!("set-up: {n} workloads wired directly over netlink …");
        let mut floor = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("f{i}");
            let (s, d) = nth_pair(91, i)?;
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

        let mut mesh = Mesh::start(bin).await?;
        let mut node = mesh
            .node("bench-node", H1, None, false, args.node_resync.as_deref())
            .await?;
        mesh.service("bench", "10.90.0.0/16").await?;
        mesh.endpoint("ep-e", "bench", &bed.netns_path("e"), "bench-node")
            .await?;
        eprintln!("set-up: {n} nsm clients (CreateClient → first round trip) …");
        let mut watch = ReadyWatch::start(&mut mesh.res).await?;
        let clients = (0..n).map(|i| (format!("c{i}"), format!("p{i}")));
        let t_all = Instant::now();
        let mut setup = setup_latency(bed, &mut node, &mut watch, "bench", "ep-e", clients).await?;
        let total = t_all.elapsed();
        floor.sort_unstable();
        setup.sort_unstable();
        println!("\nSame-node set-up latency (one after another):\n");
        println!("| measurement | direct netlink (floor) | nsm | nsm ÷ floor | target |");
        println!("|---|---:|---:|---:|---|");
        let v = setup_rows("same node", &floor, &setup, 10.0);
        println!(
            "| {n} clients one after another, total s | | {:.2} | | |",
            total.as_secs_f64()
        );
        Ok(vec![v])
    })
    .await
}
