//! `nsm-bench vwire --only security`: what identities cost a vWire's set-up. Two meshes on one
//! test bed — one `--insecure`, one with identities (mutual TLS on every connection, every call
//! authorized, path tokens signed and checked with upstream's default policies) — each with a node
//! on each of two hosts; their clients are created alternately, one of each in turn, so both see
//! the same machine at the same moments. Same node (node → registry only) and cross node (node →
//! node too).

use std::path::Path;
use std::time::Duration;

use nsm_testbed::Testbed;

use super::{Args, Mesh, NodeHandle, ReadyWatch, setup_latency};
use crate::common::{H1, H2, Verdict, ms, on_bed, percentile, two_hosts, verdict};

struct Side {
    mesh: Mesh,
    a: NodeHandle,
    watch: ReadyWatch,
    tag: &'static str,
}

async fn side(bin: &Path, bed: &Testbed, secure: bool, args: &Args) -> anyhow::Result<Side> {
    let mut mesh = Mesh::start_with(bin, secure).await?;
    // VXLAN only: the two meshes share the hosts, and WireGuard ports are not the question here.
    mesh.node_flags = vec!["--no-wireguard".into()];
    let resync = args.node_resync.as_deref();
    let a = mesh
        .node("node-a", H1, Some(&bed.netns_path("h1")), true, resync)
        .await?;
    let _b = mesh
        .node("node-b", H2, Some(&bed.netns_path("h2")), true, resync)
        .await?;
    // Pools of their own: both meshes' endpoints share the endpoint namespaces.
    let net = if secure { 96 } else { 95 };
    mesh.service("sbench", &format!("10.{net}.0.0/16")).await?;
    mesh.endpoint("ep-x", "sbench", &bed.netns_path("x"), "node-a").await?;
    mesh.endpoint("ep-y", "sbench", &bed.netns_path("y"), "node-b").await?;
    let watch = ReadyWatch::start(&mut mesh.res).await?;
    Ok(Side {
        mesh,
        a,
        watch,
        tag: if secure { "s" } else { "i" },
    })
}

pub(crate) async fn run(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let m = args.cross_clients;
    let mut workloads = vec![("x".to_string(), "h1"), ("y".to_string(), "h2")];
    for tag in ["i", "s"] {
        for kind in ["l", "r"] {
            workloads.extend((0..m).map(|i| (format!("{tag}{kind}{i}"), "h1")));
        }
    }
    let topo = two_hosts("sec", workloads)?;
    on_bed(topo, async |bed: &Testbed| {
        let mut plain = side(bin, bed, false, args).await?;
        let mut secure = side(bin, bed, true, args).await?;
        eprintln!("security: {m} same-node and {m} cross-node clients per mesh, alternating …");
        let mut times: [[Vec<Duration>; 2]; 2] = Default::default();
        for i in 0..m {
            for (s, side) in [&mut plain, &mut secure].into_iter().enumerate() {
                for (k, (kind, endpoint)) in [("l", "ep-x"), ("r", "ep-y")].into_iter().enumerate() {
                    let name = format!("{}{kind}{i}", side.tag);
                    let t = setup_latency(
                        bed,
                        &mut side.a,
                        &mut side.watch,
                        "sbench",
                        endpoint,
                        [(name.clone(), name)],
                    )
                    .await?;
                    times[s][k].extend(t);
                }
            }
        }
        for v in times.iter_mut().flatten() {
            v.sort_unstable();
        }
        drop(secure.mesh);
        drop(plain.mesh);
        println!("\nSet-up latency with identities on against --insecure, side by side ({m} clients each):\n");
        println!("| vWire | --insecure p50 / p99 | identities p50 / p99 | p50 difference | target |");
        println!("|---|---:|---:|---:|---|");
        let mut verdicts = Vec::new();
        for (k, what) in ["same node", "cross node"].into_iter().enumerate() {
            let (p, s) = (&times[0][k], &times[1][k]);
            let (p50, s50) = (ms(percentile(p, 0.5)), ms(percentile(s, 0.5)));
            println!(
                "| {what} | {p50:.2} / {:.2} ms | {s50:.2} / {:.2} ms | {:+.2} ms | ≤ +1 ms |",
                ms(percentile(p, 0.99)),
                ms(percentile(s, 0.99)),
                s50 - p50
            );
            verdicts.push(verdict(
                format!("{what}: set-up p50 with identities ≤ 1 ms above --insecure"),
                format!("{s50:.2} ms against {p50:.2} ms"),
                Some(s50 - p50 <= 1.0),
            ));
        }
        Ok(verdicts)
    })
    .await
}
