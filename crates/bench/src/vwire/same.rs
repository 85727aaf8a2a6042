//! Same-node vWires: throughput and RTT against a bare veth pair, set-up latency against direct
//! netlink wiring.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use nsm_dataplane::Netlink;
use nsm_testbed::{HostSpec, Testbed, Topology, WorkloadSpec, unique_prefix};

use super::{Args, Mesh, ReadyWatch, alternate, client, probe, tput_header, wait_ready, wire_bare};
use crate::common::{Verdict, ms, on_bed, verdict};
use crate::percentile;

fn one_host(tag: &str, workloads: impl IntoIterator<Item = String>) -> anyhow::Result<Topology> {
    Ok(Topology {
        prefix: unique_prefix(tag),
        hosts: vec![HostSpec {
            name: "h1".into(),
            underlay_addr: "192.0.2.11".parse()?,
        }],
        workloads: workloads
            .into_iter()
            .map(|w| WorkloadSpec {
                name: w,
                host: "h1".into(),
            })
            .collect(),
        address_hosts: vec![],
    })
}

/// Throughput (1 and 4 streams) and RTT between workloads `a` and `b`: a bare veth pair and an nsm
/// vWire stand side by side (different interfaces and addresses) and runs alternate between them.
pub(crate) async fn throughput(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let topo = one_host("tput", ["a".to_string(), "b".to_string()])?;
    on_bed(topo, async |bed: &Testbed| {
        let (src, dst): (ipnet::IpNet, ipnet::IpNet) = ("198.51.100.1/32".parse()?, "198.51.100.2/32".parse()?);
        wire_bare(bed.ns("a"), bed.ns("b"), "bare0", src, dst).await?;
        let mut mesh = Mesh::start(bin).await?;
        let mut node = mesh
            .node("bench-node", "192.0.2.11", None, false, args.node_resync.as_deref())
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
        let a = alternate(bed, "b", "a", [dst.addr(), vdst], args.reps, args.seconds)?;
        println!("\nSame-node vWire vs bare veth pair between the same two namespaces:\n");
        println!("{}", tput_header("bare veth"));
        let mut v = a.report("same node", [0.95, 0.90]);
        let rtt_delta = crate::common::median(&a.rtt[1]) - crate::common::median(&a.rtt[0]);
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

        let mut mesh = Mesh::start(bin).await?;
        let mut node = mesh
            .node("bench-node", "192.0.2.11", None, false, args.node_resync.as_deref())
            .await?;
        mesh.service("bench", "10.90.0.0/16").await?;
        mesh.endpoint("ep-e", "bench", &bed.netns_path("e"), "bench-node")
            .await?;
        eprintln!("set-up: {n} nsm clients (CreateClient → first round trip) …");
        let mut watch = ReadyWatch::start(&mut mesh.res).await?;
        let mut setup = Vec::with_capacity(n);
        let t_all = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            let ns = format!("p{i}");
            node.api
                .create_client(client(&format!("c{i}"), "bench", &bed.netns_path(&ns), "ep-e", "nsm-1"))
                .await?;
            let (_, d) = watch.ready(&format!("c{i}")).await?;
            if crate::common::debug() {
                eprintln!("c{i}: ready after {:?}", t.elapsed());
            }
            if !probe(bed.ns(&ns), d, Duration::from_secs(5))? {
                bail!("client c{i}: no answer");
            }
            setup.push(t.elapsed());
        }
        let total = t_all.elapsed();
        floor.sort_unstable();
        setup.sort_unstable();
        let (f50, s50) = (ms(percentile(&floor, 0.5)), ms(percentile(&setup, 0.5)));
        let (f99, s99) = (ms(percentile(&floor, 0.99)), ms(percentile(&setup, 0.99)));
        println!("\nSame-node set-up latency (one after another):\n");
        println!("| measurement | direct netlink (floor) | nsm | nsm ÷ floor | target |");
        println!("|---|---:|---:|---:|---|");
        println!(
            "| set-up p50 over {n}, ms | {f50:.2} | {s50:.2} | {:.1}× | ≤ 10 ms |",
            s50 / f50
        );
        println!(
            "| set-up p99 over {n}, ms | {f99:.2} | {s99:.2} | {:.1}× | |",
            s99 / f99
        );
        println!(
            "| {n} clients one after another, total s | | {:.2} | | |",
            total.as_secs_f64()
        );
        Ok(vec![verdict(
            "same node: set-up p50 ≤ 10 ms",
            format!("{s50:.2} ms (floor {f50:.2} ms)"),
            Some(s50 <= 10.0),
        )])
    })
    .await
}
