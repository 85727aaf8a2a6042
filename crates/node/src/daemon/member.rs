//! vL3 members: a client of a vL3 (or of a service on one) becomes a member of this node's
//! router of that vL3 (see [`crate::vl3`]); [`nsm_node_plan::vl3::plan_member`] decides, this
//! carries it out. Members are planned and wired one at a time, under the routers' lock (the
//! routers are one piece of state, and a member's address must be taken before the next picks).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_api::nsm::v1;
use nsm_dataplane::LinkStats;
use nsm_model::{pb, upstream};
use nsm_node_plan::client::{Observed, Standing, vl3_of};
use nsm_node_plan::vl3::{self as plan, MemberDecision, MemberInput, Vl3, leases_of, member_dns, vl3_spec};
use nsm_node_plan::{ClientKey, MechanismKind, NotReady, Pair, Phase, View};

use super::reconciler::{Failure, Reconciler, Wired, failed};
use nsm_mechanisms::kernel::{self, Veth};
use nsm_mechanisms::peer_link;
use nsm_vl3::Vl3Plane;

/// A vL3 member anywhere in the mesh, as its status says: for the routers' DNS names.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Member {
    pub(crate) vl3: String,
    pub(crate) name: String,
    pub(crate) addr: IpAddr,
}

/// The member a client's status describes, if it is a Ready vL3 member.
pub(crate) fn member_of(c: &pb::Client) -> Option<Member> {
    let st = c.status.as_ref()?;
    if st.phase != Phase::Ready as i32 || st.dns_name.is_empty() {
        return None;
    }
    Some(Member {
        vl3: st.endpoint.clone(),
        name: st.dns_name.clone(),
        addr: st.src_ip_addrs.first()?.parse::<IpNet>().ok()?.addr(),
    })
}

/// Nodes' underlay addresses by name.
type Nodes = HashMap<String, IpAddr>;
/// Services on a vL3 (upstream names) with the services each may reach.
type Reach = Vec<(String, Vec<String>)>;
/// A vL3's DNS names: each name with its addresses.
type Names = Vec<(String, Vec<IpAddr>)>;

/// The nodes' underlay addresses and the services on `vl3` with what they may reach, as a
/// router's convergence needs them.
fn router_inputs(view: &View, vl3: &Vl3) -> (Nodes, Reach) {
    let nodes = view
        .nodes()
        .filter_map(|n| {
            Some((
                n.metadata.clone()?.name,
                n.spec.as_ref()?.address.parse::<IpAddr>().ok()?,
            ))
        })
        .collect();
    let services = view
        .services()
        .filter_map(|s| {
            let on = vl3_of(s)?;
            let m = s.metadata.clone()?;
            let spec = s.spec.as_ref()?;
            (on == vl3.name).then(|| {
                let reach = spec
                    .reach
                    .iter()
                    .map(|r| {
                        if r == "*" {
                            r.clone()
                        } else {
                            upstream::qualify(r, &m.namespace)
                        }
                    })
                    .collect();
                (upstream::name_of(&m.namespace, &m.name), reach)
            })
        })
        .collect();
    (nodes, services)
}

/// Brings this node's router of `vl3` in line with the view's leases, nodes and services.
async fn converge(plane: &mut Vl3Plane, view: &View, vl3: &Vl3) -> Result<(), Failure> {
    let leases = leases_of(view, &vl3.name);
    let (nodes, services) = router_inputs(view, vl3);
    plane
        .converge(vl3, &leases, &nodes, &services)
        .await
        .map_err(|e| failed(format!("vL3 router: {e}")))
}

impl Reconciler {
    /// Follows every client's status into the DNS names of its vL3.
    pub(crate) async fn note_member(&self, key: &ClientKey, c: Option<&pb::Client>) {
        let new = c.and_then(member_of);
        let changed: Vec<(String, Names)> = {
            let mut st = self.state.lock();
            let old = match &new {
                Some(m) => st.members.insert(key.clone(), m.clone()),
                None => st.members.remove(key),
            };
            if old == new {
                return;
            }
            old.iter()
                .chain(new.iter())
                .map(|m| m.vl3.clone())
                .collect::<HashSet<_>>()
                .into_iter()
                .map(|vl3| {
                    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
                    for m in st.members.values().filter(|m| m.vl3 == vl3) {
                        names.entry(m.name.clone()).or_default().push(m.addr);
                    }
                    (vl3, names.into_iter().collect())
                })
                .collect()
        };
        let mut plane = self.vl3.lock().await;
        for (vl3, names) in changed {
            plane.set_records(&vl3, names);
        }
    }

    /// The registry view with the prefix leases this node made that the watch has not brought yet
    /// (those it has are forgotten here).
    fn view_with_own_leases(&self) -> View {
        let mut view = (*self.cache.snapshot()).clone();
        let mut st = self.state.lock();
        st.own_leases.retain(|l| {
            let Some(pb::resource::Kind::Prefix(p)) = &l.kind else {
                return false;
            };
            let spec = p.spec.clone().unwrap_or_default();
            !view.prefixes().any(|q| {
                q.spec
                    .as_ref()
                    .is_some_and(|s| s.network_service == spec.network_service && s.prefix == spec.prefix)
            })
        });
        for l in &st.own_leases {
            view.apply(l.clone(), false);
        }
        view
    }

    /// Converges every router this node runs (after lease, service or node changes), and removes
    /// the routers of vL3s that are gone.
    pub(crate) async fn converge_vl3s(&self) {
        let mut plane = self.vl3.lock().await;
        let view = self.view_with_own_leases();
        for name in plane.router_names() {
            let vl3 = match vl3_spec(&view, &name) {
                Ok(Some(v)) => v,
                Ok(None) => {
                    plane.remove_router(&name).await;
                    continue;
                }
                Err(_) => continue,
            };
            if let Err(e) = converge(&mut plane, &view, &vl3).await {
                tracing::warn!(vl3 = %name, error = %e.not_ready.reason, "vL3 router");
            }
        }
    }

    /// Makes `client` a member of `service`'s vL3 `vl3_name` on this node's router.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn reconcile_member(
        &self,
        key: &ClientKey,
        client: &pb::Client,
        service: &str,
        vl3_name: &str,
        standing: Option<&Standing>,
        observed: Option<&Observed>,
        stats: LinkStats,
    ) -> Result<v1::ClientStatus, Failure> {
        // The routers are one piece of state: a member is planned and wired under their lock, so
        // the next member sees its address taken and its lease in the view.
        let mut plane = self.vl3.lock().await;
        let mut view = self.view_with_own_leases();
        // Addresses this node's other clients hold.
        let used: HashSet<IpAddr> = {
            let st = self.state.lock();
            let wired = st
                .wired
                .iter()
                .filter(|(k, _)| *k != key)
                .map(|(_, w)| w.pair.src.addr());
            let statuses = st.clients.iter().filter(|(k, _)| *k != key).filter_map(|(_, c)| {
                c.status
                    .as_ref()
                    .and_then(|s| s.src_ip_addrs.first())
                    .and_then(|a| a.parse::<IpNet>().ok())
                    .map(|n| n.addr())
            });
            wired.chain(statuses).collect()
        };
        let mut leased = false;
        let decision = loop {
            let d = plan::plan_member(&MemberInput {
                node: &self.config.name,
                client,
                service,
                vl3: vl3_name,
                view: &view,
                used: &used,
                standing,
                observed,
            });
            // Lease, node and service changes converge every router as they happen (and each
            // resync does): a member only needs it when its router is missing or was lost.
            if let MemberDecision::Keep(m)
            | MemberDecision::Adopt(m)
            | MemberDecision::Build(m)
            | MemberDecision::Rebuild(m) = &d
                && !plane.router_standing(&m.vl3.name)
            {
                converge(&mut plane, &view, &m.vl3).await?;
            }
            let MemberDecision::Lease { vl3, service, wanted } = d else {
                break d;
            };
            if leased {
                return Err(failed(format!("no free address in the prefixes of vL3 {}", vl3.name)));
            }
            let got = plane.lease(&vl3.name, &service, wanted).await.map_err(|e| {
                let transient =
                    matches!(&e, nsm_vl3::Vl3Error::PrefixServer(s) if s.code() == tonic::Code::Unavailable);
                Failure {
                    not_ready: NotReady::failed(format!("vL3 {}: {e}", vl3.name)),
                    transient,
                }
            })?;
            tracing::info!(vl3 = %vl3.name, prefix = %got, member = %service, "prefix leased");
            // The lease is in the registry; the watch brings it to the cache, and until it does
            // the view every decision and convergence reads has it from here.
            let lease = lease_resource(&vl3, got, &self.config.name, &service);
            self.state.lock().own_leases.push(lease.clone());
            view.apply(lease, false);
            converge(&mut plane, &view, &vl3).await?;
            leased = true;
        };
        let (m, rebuild, adopt) = match decision {
            MemberDecision::NotReady(nr) => return Err(nr.into()),
            MemberDecision::Lease { .. } => unreachable!("leased above"),
            MemberDecision::Keep(m) => {
                let w = self.state.lock().wired.get(key).cloned().expect("it stands");
                return Ok(member_status(key, client, &self.config.name, &m.vl3, &w, stats));
            }
            MemberDecision::Adopt(m) => (m, false, true),
            MemberDecision::Build(m) => (m, false, false),
            MemberDecision::Rebuild(m) => (m, true, false),
        };
        if rebuild {
            let gone = self.take_wired(key);
            if let Some(w) = gone {
                plane.member_gone(&w.endpoint, w.pair.src.addr()).await;
                self.unwire(&w).await;
            }
        }
        let spec = client.spec.clone().unwrap_or_default();
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let Some(router) = plane.routers.get(&m.vl3.name) else {
            return Err(NotReady::pending(format!("the router of vL3 {} is not up yet", m.vl3.name)).into());
        };
        let router_path = nsm_dataplane::named_path(&router.netns).display().to_string();
        let w = Wired {
            netns: spec.netns.clone(),
            interface: spec.interface.clone(),
            endpoint: m.vl3.name.clone(),
            pair: Pair {
                src: IpNet::from(m.addr),
                dst: m.lease.gateway(),
            },
            mtu: plane.member_mtu(),
            remote: None,
            refreshed: None,
            route: Some(m.vl3.pool),
            nat: false,
            mechanism: MechanismKind::Kernel,
            wg_id: None,
            uid: uid.clone(),
            monitor_id: super::reconciler::monitor_id(client),
        };
        let (mac, fresh) = match kernel::observe(&w.netns, &w.interface, false).await {
            Some((_, _, mac)) if adopt => (mac, false),
            _ => {
                // A veth pair into the router: the member's address, a route to the gateway and
                // the pool through it, permanent neighbours both ways.
                let veth = Veth {
                    netns: &w.netns,
                    interface: &w.interface,
                    pair: w.pair,
                    mtu: w.mtu,
                    route: w.route,
                };
                let mac = kernel::wire(&veth, &router_path, &peer_link(&uid))
                    .await
                    .map_err(failed)?;
                tracing::info!(client = %key, vl3 = %m.vl3.name, address = %m.addr, "vL3 member ready");
                (mac, true)
            }
        };
        plane
            .member_ready(
                &m.vl3.name,
                m.addr,
                &peer_link(&uid),
                &mac,
                &m.service,
                &w.netns,
                &w.interface,
                fresh,
            )
            .await;
        self.set_wired(key, &w);
        drop(plane);
        let stats = kernel::observe(&w.netns, &w.interface, false)
            .await
            .map(|(_, s, _)| s)
            .unwrap_or_default();
        Ok(member_status(key, client, &self.config.name, &m.vl3, &w, stats))
    }
}

/// The Prefix resource of a lease just made (what the registry stores and its watch will send).
fn lease_resource(vl3: &Vl3, prefix: IpNet, node: &str, member: &str) -> pb::Resource {
    let (ns, _, _) = upstream::parse_name("vl3", &vl3.name).unwrap_or_default();
    pb::Resource {
        kind: Some(pb::resource::Kind::Prefix(pb::Prefix {
            metadata: Some(pb::ObjectMeta {
                namespace: ns,
                name: format!("{}-local-{prefix}", vl3.name),
                ..Default::default()
            }),
            spec: Some(pb::PrefixSpec {
                network_service: vl3.name.clone(),
                prefix: prefix.to_string(),
                node: node.to_owned(),
                member_service: member.to_owned(),
            }),
        })),
    }
}

/// A Ready member's status.
fn member_status(
    key: &ClientKey,
    client: &pb::Client,
    node: &str,
    vl3: &Vl3,
    w: &Wired,
    stats: LinkStats,
) -> v1::ClientStatus {
    let spec = client.spec.clone().unwrap_or_default();
    let svc_short = upstream::parse_name(
        "spec.networkService",
        &upstream::qualify(&spec.network_service, &key.namespace),
    )
    .map(|(_, n, _)| n)
    .unwrap_or_default();
    let (dns_name, dns_servers, search_domains) = member_dns(vl3, key, &svc_short, w.pair.dst);
    v1::ClientStatus {
        phase: Phase::Ready as i32,
        endpoint: vl3.name.clone(),
        mechanism: MechanismKind::Kernel.as_str().into(),
        src_ip_addrs: vec![w.pair.src.to_string()],
        dst_ip_addrs: vec![w.pair.dst.to_string()],
        connection_id: client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default(),
        path: vec![key.upstream(), node.to_owned(), format!("{}@{}", vl3.name, node)],
        rx_bytes: stats.rx_bytes,
        tx_bytes: stats.tx_bytes,
        rx_packets: stats.rx_packets,
        tx_packets: stats.tx_packets,
        mtu: w.mtu,
        routes: vec![vl3.pool.to_string()],
        dns_name,
        dns_servers,
        search_domains,
        ..Default::default()
    }
}
