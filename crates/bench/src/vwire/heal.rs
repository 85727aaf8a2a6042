//! Heal: a client's endpoint is deleted; time from the Delete call until a round trip from the
//! client is answered by the service's other endpoint.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nsm_api::nsm::v1;
use nsm_dataplane::Netlink;
use nsm_testbed::Testbed;

use super::{
    Args, Echo, Mesh, client, client_status, echo_once, first_addr, floor_pair, udp_in, wait_ready, wire_bare,
};
use crate::common::{H1, Verdict, ms, on_bed, one_host, percentile, verdict};

/// Endpoint name → its workload namespace.
const ENDPOINTS: [(&str, &str); 2] = [("ep1", "e1"), ("ep2", "e2")];

fn other(ep: &str) -> &'static str {
    if ep == ENDPOINTS[0].0 {
        ENDPOINTS[1].0
    } else {
        ENDPOINTS[0].0
    }
}

fn workload_of(ep: &str) -> &'static str {
    ENDPOINTS.iter().find(|(e, _)| *e == ep).map_or("e1", |(_, w)| w)
}

/// Sends from `sock` to `dst` every 2 ms until `tag` answers; the elapsed time, or an error after
/// `timeout`. `dst` is re-read through `refresh` every 10 ms (None: keep it).
async fn until_answered_by(
    sock: &tokio::net::UdpSocket,
    mut dst: std::net::IpAddr,
    tag: &str,
    t0: Instant,
    timeout: Duration,
    mut refresh: impl AsyncFnMut() -> Option<std::net::IpAddr>,
) -> anyhow::Result<Duration> {
    for i in 0u64.. {
        if i % 5 == 4
            && let Some(d) = refresh().await
        {
            dst = d;
        }
        if echo_once(sock, dst, Duration::from_millis(2)).await.as_deref() == Some(tag) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            break;
        }
    }
    bail!("no answer from {tag} within {timeout:?}")
}

pub(crate) async fn run(args: &Args, bin: &Path) -> anyhow::Result<Vec<Verdict>> {
    let trials = args.heal_trials;
    let topo = one_host("heal", ["hc", "e1", "e2"].map(String::from))?;
    on_bed(topo, async |bed: &Testbed| {
        let _echo: Vec<Echo> = vec![
            Echo::start(bed.ns("e1"), "ep1").await?,
            Echo::start(bed.ns("e2"), "ep2").await?,
        ];
        let sock = udp_in(bed.ns("hc"), 0).await?;

        // Floor: the same move by hand — delete the veth pair to one endpoint's namespace, wire one
        // to the other's, until the other answers.
        eprintln!("heal: {trials} re-wirings by hand …");
        let (src, dst) = floor_pair()?;
        let hc = Netlink::connect(bed.ns("hc")).await?;
        wire_bare(bed.ns("hc"), bed.ns("e1"), "bare0", src, dst).await?;
        let mut cur = "ep1";
        let mut floor = Vec::with_capacity(trials);
        for _ in 0..trials {
            let next = other(cur);
            let t0 = Instant::now();
            hc.delete_link("bare0").await?;
            wire_bare(bed.ns("hc"), bed.ns(workload_of(next)), "bare0", src, dst).await?;
            floor.push(until_answered_by(&sock, dst.addr(), next, t0, Duration::from_secs(10), async || None).await?);
            cur = next;
        }
        hc.delete_link("bare0").await?;

        let mut mesh = Mesh::start(bin).await?;
        let mut node = mesh
            .node("bench-node", H1, None, false, args.node_resync.as_deref())
            .await?;
        mesh.service("heal", "10.97.0.0/24").await?;
        for (ep, w) in ENDPOINTS {
            mesh.endpoint(ep, "heal", &bed.netns_path(w), "bench-node").await?;
        }
        node.api
            .create_client(client("hc", "heal", &bed.netns_path("hc"), "", "nsm-1"))
            .await?;
        wait_ready(&mut mesh.res, "hc").await?;
        eprintln!("heal: {trials} trials (Delete the client's endpoint → the other answers) …");
        let mut heal = Vec::with_capacity(trials);
        for trial in 0..trials {
            let st = client_status(&mut mesh.res, "hc").await?.context("no status")?;
            if st.phase != v1::client_status::Phase::Ready as i32 {
                bail!("trial {trial}: client not Ready: {}", st.reason);
            }
            let cur = if st.endpoint == ENDPOINTS[0].0 {
                ENDPOINTS[0].0
            } else {
                ENDPOINTS[1].0
            };
            let next = other(cur);
            let d = first_addr(&st.dst_ip_addrs)?;
            // It answers from where its status says before the delete.
            until_answered_by(&sock, d, cur, Instant::now(), Duration::from_secs(5), async || None).await?;
            let t0 = Instant::now();
            mesh.res
                .delete(v1::DeleteRequest {
                    r#ref: Some(v1::ResourceRef {
                        kind: v1::Kind::Endpoint as i32,
                        namespace: "default".into(),
                        name: cur.into(),
                    }),
                })
                .await?;
            let mut res = mesh.res.clone();
            let took = until_answered_by(&sock, d, next, t0, Duration::from_secs(10), async || {
                let st = client_status(&mut res, "hc").await.ok()??;
                (st.phase == v1::client_status::Phase::Ready as i32)
                    .then(|| first_addr(&st.dst_ip_addrs).ok())
                    .flatten()
            })
            .await
            .with_context(|| format!("trial {trial}: heal from {cur} to {next}"))?;
            if crate::common::debug() {
                eprintln!("  trial {trial}: {cur} → {next} in {took:?}");
            }
            heal.push(took);
            // Bring the deleted endpoint back; the client stays where it is (still eligible).
            mesh.endpoint(cur, "heal", &bed.netns_path(workload_of(cur)), "bench-node")
                .await?;
            // The status catches up with the healed wiring before the next trial reads it.
            let start = Instant::now();
            loop {
                let st = client_status(&mut mesh.res, "hc").await?.context("no status")?;
                if st.phase == v1::client_status::Phase::Ready as i32 && st.endpoint == next {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("trial {trial}: status does not show {next}: {st:?}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        floor.sort_unstable();
        heal.sort_unstable();
        let (f50, h50) = (ms(percentile(&floor, 0.5)), ms(percentile(&heal, 0.5)));
        let (fmax, hmax) = (ms(floor[floor.len() - 1]), ms(heal[heal.len() - 1]));
        println!("\nHeal: endpoint deleted → a round trip answered by the other endpoint ({trials} trials):\n");
        println!("| measurement | re-wired by hand (floor) | nsm | target |");
        println!("|---|---:|---:|---|");
        println!("| p50, ms | {f50:.2} | {h50:.2} | ≤ 500 ms |");
        println!(
            "| p90, ms | {:.2} | {:.2} | |",
            ms(percentile(&floor, 0.9)),
            ms(percentile(&heal, 0.9))
        );
        println!("| max, ms | {fmax:.2} | {hmax:.2} | |");
        Ok(vec![verdict(
            "heal p50 ≤ 500 ms",
            format!("{h50:.2} ms (floor {f50:.2} ms)"),
            Some(h50 <= 500.0),
        )])
    })
    .await
}
