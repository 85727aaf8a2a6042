//! vL3 members: a client of a vL3 (or of a service on one) becomes a member of this node's
//! router of that vL3 (see [`crate::vl3`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_api::nsm::v1;
use nsm_model::{Kind, pb, upstream};

use super::{NotReady, Phase, Reconciler, Wired, failed, live_stats, netlink_in, peer_name, pending, wire};
use crate::vl3::{self, Lease, Vl3};

/// A vL3 member anywhere in the mesh, as its status says: for the routers' DNS names.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Member {
    pub(super) vl3: String,
    pub(super) name: String,
    pub(super) addr: IpAddr,
}

/// The member a client's status describes, if it is a Ready vL3 member.
pub(super) fn member_of(c: &pb::Client) -> Option<Member> {
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

impl Reconciler {
    /// Follows every client's status into the DNS names of its vL3.
    pub(super) fn note_member(&mut self, key: &(String, String), c: Option<&pb::Client>) {
        let new = c.and_then(member_of);
        let old = match &new {
            Some(m) => self.members.insert(key.clone(), m.clone()),
            None => self.members.remove(key),
        };
        if old == new {
            return;
        }
        for vl3 in old
            .iter()
            .chain(new.iter())
            .map(|m| m.vl3.clone())
            .collect::<HashSet<_>>()
        {
            let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
            for m in self.members.values().filter(|m| m.vl3 == vl3) {
                names.entry(m.name.clone()).or_default().push(m.addr);
            }
            self.vl3.set_records(&vl3, names.into_iter().collect());
        }
    }

    /// The vL3 named `name` (upstream), if it exists and is a vL3.
    async fn vl3_spec(&mut self, name: &str) -> Result<Option<Vl3>, NotReady> {
        let (ns, n, _) = upstream::parse_name("spec.vl3", name).map_err(|e| failed(e.to_string()))?;
        Ok(match self.get(Kind::NetworkService, &ns, &n).await? {
            Some(pb::Resource {
                kind: Some(pb::resource::Kind::NetworkService(s)),
            }) => {
                let spec = s.spec.unwrap_or_default();
                (spec.r#type == pb::ServiceType::Vl3 as i32 && spec.vl3.is_empty())
                    .then(|| {
                        let pool: IpNet = spec.cidr.parse().ok()?;
                        let prefix_len = match spec.prefix_len {
                            0 => nsm_model::validate::default_prefix_len(&pool),
                            n => n,
                        };
                        Some(Vl3 {
                            name: name.to_owned(),
                            pool,
                            prefix_len: u8::try_from(prefix_len).ok()?,
                            dns_template: spec.dns_template,
                        })
                    })
                    .flatten()
            }
            _ => None,
        })
    }

    /// Brings this node's router of `vl3` in line with `leases`, the nodes' addresses and the
    /// services on the vL3 with what they may reach.
    async fn converge(&mut self, vl3: &Vl3, leases: &[Lease]) -> Result<(), NotReady> {
        let nodes: HashMap<String, IpAddr> = self
            .list(Kind::Node)
            .await?
            .iter()
            .cloned()
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Node(n)) => Some((n.metadata?.name, n.spec?.address.parse::<IpAddr>().ok()?)),
                _ => None,
            })
            .collect();
        let services: Vec<(String, Vec<String>)> = self
            .list(Kind::NetworkService)
            .await?
            .iter()
            .cloned()
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::NetworkService(s)) => {
                    let on = vl3::vl3_of(&s)?;
                    let m = s.metadata.clone()?;
                    let spec = s.spec?;
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
                }
                _ => None,
            })
            .collect();
        self.vl3
            .converge(vl3, leases, &nodes, &services)
            .await
            .map_err(|e| failed(format!("vL3 router: {e}")))
    }

    /// Every lease of `vl3` (from a resync pass's listing when there is one).
    async fn leases_of(&mut self, vl3: &str) -> Result<Vec<Lease>, NotReady> {
        let items = self.list(Kind::Prefix).await?;
        Ok(vl3::leases_from(&items, vl3))
    }

    /// Converges every router this node runs (after lease, service or node changes), and removes
    /// the routers of vL3s that are gone.
    pub(super) async fn converge_vl3s(&mut self) {
        for name in self.vl3.router_names() {
            let vl3 = match self.vl3_spec(&name).await {
                Ok(Some(v)) => v,
                Ok(None) => {
                    self.vl3.remove_router(&name).await;
                    continue;
                }
                Err(_) => continue,
            };
            let Ok(leases) = self.leases_of(&vl3.name).await else {
                continue;
            };
            if let Err(e) = self.converge(&vl3, &leases).await {
                tracing::warn!(vl3 = %name, error = %e.reason, "vL3 router");
            }
        }
    }

    /// Makes `client` a member of `service`'s vL3 `vl3_name` on this node's router.
    pub(super) async fn reconcile_member(
        &mut self,
        key: &(String, String),
        client: &pb::Client,
        service: &pb::NetworkService,
        vl3_name: &str,
    ) -> Result<v1::ClientStatus, NotReady> {
        let spec = client.spec.clone().unwrap_or_default();
        let sm = service.metadata.clone().unwrap_or_default();
        let member_service = upstream::name_of(&sm.namespace, &sm.name);
        if !spec.endpoint.is_empty() {
            return Err(failed(format!(
                "{member_service:?} is on vL3 {vl3_name:?}: its members join the vL3, no endpoint can be pinned"
            )));
        }
        let Some(vl3) = self.vl3_spec(vl3_name).await? else {
            return Err(pending(format!(
                "network service {member_service:?} is on vL3 {vl3_name:?}, which does not exist"
            )));
        };
        let mut leases = self.leases_of(&vl3.name).await?;
        // Lease, node and service changes converge every router as they happen (and each resync
        // does): a member only needs it when its router is missing or was lost.
        if !self.vl3.router_standing(&vl3.name) {
            self.converge(&vl3, &leases).await?;
        }

        // The member's address: the one it had if it is still ours to give, else a free one, else
        // from a new lease.
        let previous: Option<IpAddr> = client
            .status
            .as_ref()
            .and_then(|s| s.src_ip_addrs.first())
            .and_then(|a| a.parse::<IpNet>().ok())
            .map(|n| n.addr());
        let mut used: HashSet<IpAddr> = HashSet::new();
        for (k, w) in &self.wired {
            if k != key {
                used.insert(w.src.addr());
            }
        }
        for (k, c) in &self.clients {
            if k != key
                && let Some(a) = c
                    .status
                    .as_ref()
                    .and_then(|s| s.src_ip_addrs.first())
                    .and_then(|a| a.parse::<IpNet>().ok())
            {
                used.insert(a.addr());
            }
        }
        let node = self.config.name.clone();
        let mine = |leases: &[Lease]| -> Vec<Lease> {
            leases
                .iter()
                .filter(|l| l.node == node && l.member == member_service)
                .cloned()
                .collect()
        };
        let pick = |own: &[Lease]| -> Option<(IpAddr, Lease)> {
            if let Some(p) = previous
                && !used.contains(&p)
                && let Some(l) = own
                    .iter()
                    .find(|l| l.prefix.contains(&p) && l.gateway().addr() != p && p != l.prefix.network())
            {
                return Some((p, l.clone()));
            }
            own.iter()
                .find_map(|l| vl3::free_address(l.prefix, &used).map(|a| (a, l.clone())))
        };
        let (addr, lease) = match pick(&mine(&leases)) {
            Some(x) => x,
            None => {
                // The prefix that held the member's previous address, even when no lease of
                // the vL3 is left to tell its length.
                let wanted = previous
                    .and_then(|p| IpNet::new(p, vl3.prefix_len).ok().map(|n| n.trunc()))
                    .filter(|n| vl3.pool.contains(n));
                let got = self
                    .vl3
                    .lease(&vl3.name, &member_service, wanted)
                    .await
                    .map_err(|e| failed(format!("vL3 {}: {e}", vl3.name)))?;
                tracing::info!(vl3 = %vl3.name, prefix = %got, member = %member_service, "prefix leased");
                // A resync pass's listing no longer holds every lease.
                if let Some(s) = self.snapshot.as_mut() {
                    s.remove(&Kind::Prefix);
                }
                leases = self.leases_of(&vl3.name).await?;
                if !leases.iter().any(|l| l.prefix == got) {
                    leases.push(Lease {
                        prefix: got,
                        node: node.clone(),
                        member: member_service.clone(),
                    });
                }
                self.converge(&vl3, &leases).await?;
                pick(&mine(&leases)).ok_or_else(|| failed(format!("no free address in {got}")))?
            }
        };
        let src = IpNet::from(addr);
        let gw = lease.gateway();
        let router = self.vl3.routers.get(&vl3.name).expect("converged");
        let router_path = nsm_dataplane::named_path(&router.netns).display().to_string();
        let mtu = self.vl3.member_mtu();

        // A member whose address moved is re-wired.
        if let Some(w) = self.wired.get(key)
            && (w.src != src || w.netns != spec.netns || w.interface != spec.interface || w.endpoint != vl3.name)
        {
            self.teardown(key).await;
        }
        let standing = match self.wired.get(key).cloned() {
            Some(w) => live_stats(&w).await.map(|s| (w, s)),
            None => None,
        };
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let (w, stats) = match standing {
            Some(x) => x,
            None => {
                let w = Wired {
                    netns: spec.netns.clone(),
                    interface: spec.interface.clone(),
                    endpoint: vl3.name.clone(),
                    src,
                    dst: gw,
                    mtu,
                    remote: None,
                    route: Some(vl3.pool),
                    nat: false,
                    mechanism: "KERNEL",
                    wg_id: None,
                };
                let (mac, fresh) = match adopt_member(&w).await {
                    Some(mac) => (mac, false),
                    None => {
                        // A veth pair into the router: the member's address, a route to the
                        // gateway and the pool through it, permanent neighbours both ways.
                        let mac = wire(&w, &router_path, &peer_name(&uid)).await.map_err(failed)?;
                        tracing::info!(client = ?key, vl3 = %vl3.name, address = %src, "vL3 member ready");
                        (mac, true)
                    }
                };
                self.vl3
                    .member_ready(
                        &vl3.name,
                        addr,
                        &peer_name(&uid),
                        &mac,
                        &member_service,
                        &w.netns,
                        &w.interface,
                        fresh,
                    )
                    .await;
                self.set_wired(key, &w);
                let stats = live_stats(&w).await.unwrap_or_default();
                (w, stats)
            }
        };
        let (ns, name) = key;
        let svc_short = sm.name.clone();
        Ok(v1::ClientStatus {
            phase: Phase::Ready as i32,
            endpoint: vl3.name.clone(),
            mechanism: "KERNEL".into(),
            src_ip_addrs: vec![w.src.to_string()],
            dst_ip_addrs: vec![w.dst.to_string()],
            connection_id: uid,
            path: vec![
                upstream::name_of(ns, name),
                self.config.name.clone(),
                format!("{}@{}", vl3.name, node),
            ],
            rx_bytes: stats.rx_bytes,
            tx_bytes: stats.tx_bytes,
            rx_packets: stats.rx_packets,
            tx_packets: stats.tx_packets,
            mtu: w.mtu,
            routes: vec![vl3.pool.to_string()],
            dns_name: vl3::dns_name(&vl3.dns_template, name, &svc_short, ns),
            dns_servers: vec![gw.addr().to_string()],
            search_domains: vl3::search_domain(&vl3.dns_template, &svc_short, ns)
                .into_iter()
                .collect(),
            ..Default::default()
        })
    }
}

/// The MAC of the member's interface if it stands with its address (an earlier run built it).
async fn adopt_member(w: &Wired) -> Option<Vec<u8>> {
    let (_ns, nl) = netlink_in(&w.netns).await.ok()?;
    let link = nl.link(&w.interface).await.ok()??;
    let standing = link.lower_up && nl.addresses(&w.interface).await.is_ok_and(|a| a.contains(&w.src));
    standing.then_some(link.mac)
}
