//! N vWires on one node: first create → all N answering a round trip; the node daemon's RSS after;
//! its CPU while nothing changes.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use nsm_api::nsm::v1;
use nsm_testbed::Testbed;

use super::{Args, Echo, Mesh, client, echo_probe, first_addr, watch_clients};
use crate::common::{H1, Verdict, cpu_time, on_bed, one_host, proc_usage, verdict};

pub(crate) async fn run(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let n = args.scale;
    let workloads = || std::iter::once("e".to_string()).chain((0..n).map(|i| format!("s{i}")));
    let topo = one_host("scale", workloads())?;
    on_bed(topo, async |bed: &Testbed| {
        let mut mesh = Mesh::start(bin).await?;
        let node = mesh
            .node("bench-node", H1, None, false, args.node_resync.as_deref())
            .await?;
        mesh.service("scale", "10.96.0.0/12").await?;
        mesh.endpoint("ep-e", "scale", &bed.netns_path("e"), "bench-node").await?;
        let _echo = Echo::start(bed.ns("e"), "e").await?;
        let (rss0, fds0, _) = proc_usage(node.pid);

        // Follow every client's status from the registry, then create them all.
        let mut watch = watch_clients(&mut mesh.res).await?;
        eprintln!(
            "scale: {n} clients, {} CreateClient calls in flight …",
            args.scale_concurrency
        );
        let t0 = Instant::now();
        let requests: Vec<v1::CreateRequest> = (0..n)
            .map(|i| client(&format!("v{i}"), "scale", &bed.netns_path(&format!("s{i}")), "ep-e", "nsm-1"))
            .collect();
        let api = node.api.clone();
        let conc = args.scale_concurrency.max(1);
        let creator = tokio::spawn(async move {
            futures::stream::iter(requests)
                .map(|r| {
                    let mut api = api.clone();
                    async move { api.create_client(r).await }
                })
                .buffer_unordered(conc)
                .try_for_each(|_| async { Ok(()) })
                .await
                .map(|()| t0.elapsed())
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut ready = HashSet::new();
        let mut last_ready = Duration::ZERO;
        let mut answered = 0;
        let deadline = tokio::time::sleep(Duration::from_secs(120));
        tokio::pin!(deadline);
        while answered < n {
            tokio::select! {
                ev = watch.message() => {
                    let ev = ev?.context("registry watch ended")?;
                    let Some(v1::resource::Kind::Client(c)) = ev.resource.and_then(|r| r.kind) else { continue };
                    let name = c.metadata.map(|m| m.name).unwrap_or_default();
                    let Some(st) = c.status else { continue };
                    if st.phase == v1::client_status::Phase::Failed as i32 {
                        bail!("client {name} failed: {}", st.reason);
                    }
                    if st.phase != v1::client_status::Phase::Ready as i32 || !ready.insert(name.clone()) {
                        continue;
                    }
                    last_ready = t0.elapsed();
                    let i: usize = name.trim_start_matches('v').parse()?;
                    let ns = bed.ns(&format!("s{i}")).try_clone()?;
                    let dst = first_addr(&st.dst_ip_addrs)?;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let ok = echo_probe(&ns, dst, Duration::from_secs(10)).await;
                        let _ = tx.send((name, ok));
                    });
                }
                Some((name, ok)) = rx.recv() => {
                    if !ok? {
                        bail!("client {name}: Ready but no answer within 10 s");
                    }
                    answered += 1;
                }
                _ = &mut deadline => bail!("after 120 s {} of {n} Ready, {answered} answering", ready.len()),
            }
        }
        let total = t0.elapsed();
        let created = creator.await??;
        let (rss, fds, threads) = proc_usage(node.pid);
        let (reg_rss, _, _) = proc_usage(mesh.registry.pid());
        eprintln!(
            "scale: all {n} answering after {:.2} s; idle for {} s, then CPU over {} s …",
            total.as_secs_f64(),
            args.settle,
            args.idle_seconds
        );

        // Idle: nothing is created or deleted; the daemon only resyncs. First as things are: the
        // workloads' kernels still send IPv6 router solicitations (backing off from 4 s) and MLD
        // reports on their new interfaces, which change the counters the daemon reports. Then
        // with IPv6 switched off in the test bed's workloads, so nothing at all is sent on any
        // vWire: what the daemon costs by itself.
        let resync = args
            .node_resync
            .as_deref()
            .map_or(Ok(Duration::from_secs(30)), humantime::parse_duration)
            .context("--node-resync")?;
        let pids = [node.pid, mesh.registry.pid()];
        let idle = Duration::from_secs(args.idle_seconds);
        let after = idle_window(&mut watch, pids, idle).await?;
        for w in workloads() {
            bed.ns(&w)
                .run_async(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1\n"))
                .await??;
        }
        drain(&mut watch, Duration::from_secs(args.settle)).await?;
        let quiet = idle_window(&mut watch, pids, idle).await?;

        println!("\n{n} vWires on one node ({} CreateClient calls in flight):\n", conc);
        println!("| measurement | figure | target |");
        println!("|---|---:|---|");
        println!(
            "| first create → all {n} answering a round trip | {:.2} s | ≤ 10 s |",
            total.as_secs_f64()
        );
        println!("| … all CreateClient calls returned | {:.2} s | |", created.as_secs_f64());
        println!("| … last client Ready | {:.2} s | |", last_ready.as_secs_f64());
        println!("| node daemon RSS before → after | {rss0:.1} → {rss:.1} MB | ≤ 64 MB |");
        println!("| node daemon open fds before → after, threads | {fds0} → {fds}, {threads} | |");
        println!("| registry RSS after | {reg_rss:.1} MB | |");
        for (when, w) in [
            (
                format!(
                    "first {} s after all answered (workloads' IPv6 start-up chatter)",
                    args.idle_seconds
                ),
                &after,
            ),
            (
                format!(
                    "{} s with nothing sent on any vWire (IPv6 off in the workloads)",
                    args.idle_seconds
                ),
                &quiet,
            ),
        ] {
            println!(
                "| idle, {when}: node daemon CPU (resync every {resync:?}) | {:.2} % of a core, {:.0} ms per resync | |",
                w.cpu_pct[0],
                w.per_resync_ms(0, resync)
            );
            println!(
                "| idle, {when}: registry CPU; status writes seen | {:.2} % of a core; {} | |",
                w.cpu_pct[1], w.events
            );
        }
        Ok(vec![
            verdict(
                format!("{n} vWires: first create → all answering ≤ 10 s"),
                format!("{:.2} s", total.as_secs_f64()),
                Some(total <= Duration::from_secs(10)),
            ),
            verdict(
                format!("{n} vWires: node daemon RSS ≤ 64 MB"),
                format!("{rss:.1} MB"),
                Some(rss <= 64.0),
            ),
            verdict(
                format!("{n} vWires: node daemon CPU when idle"),
                format!(
                    "{:.2} % of a core ({:.0} ms per {resync:?} resync; registry {:.2} %); {:.2} % with the workloads' IPv6 start-up chatter ({} status writes in {} s)",
                    quiet.cpu_pct[0],
                    quiet.per_resync_ms(0, resync),
                    quiet.cpu_pct[1],
                    after.cpu_pct[0],
                    after.events,
                    args.idle_seconds
                ),
                None,
            ),
        ])
    })
    .await
}

/// CPU of the node daemon and the registry over an idle window, and the client events (status
/// writes) the registry sent meanwhile.
struct Window {
    cpu_pct: [f64; 2],
    events: usize,
}

impl Window {
    /// CPU per resync period, in ms: what one resync costs when nothing else happens.
    fn per_resync_ms(&self, i: usize, resync: Duration) -> f64 {
        self.cpu_pct[i] / 100.0 * resync.as_secs_f64() * 1e3
    }
}

async fn idle_window(
    watch: &mut tonic::Streaming<v1::WatchEvent>,
    pids: [u32; 2],
    len: Duration,
) -> anyhow::Result<Window> {
    let (c0, w0) = ([cpu_time(pids[0])?, cpu_time(pids[1])?], Instant::now());
    let events = drain(watch, len).await?;
    let (c1, wall) = ([cpu_time(pids[0])?, cpu_time(pids[1])?], w0.elapsed());
    let pct = |i: usize| (c1[i] - c0[i]).as_secs_f64() / wall.as_secs_f64() * 100.0;
    Ok(Window {
        cpu_pct: [pct(0), pct(1)],
        events,
    })
}

/// Reads (and counts) the watch's events for `len`.
async fn drain(watch: &mut tonic::Streaming<v1::WatchEvent>, len: Duration) -> anyhow::Result<usize> {
    let end = tokio::time::Instant::now() + len;
    let mut n = 0;
    while let Ok(m) = tokio::time::timeout_at(end, watch.message()).await {
        m?.context("registry watch ended")?;
        n += 1;
    }
    Ok(n)
}
