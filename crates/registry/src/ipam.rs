//! The vL3 prefix server: upstream's `ipam.IPAM/ManagePrefixes`, over `Prefix` resources.
//!
//! A stream sends `ALLOCATE` (optionally naming the prefix it had before, and prefixes to avoid)
//! and gets a prefix of the vL3's pool of the vL3's prefix length: the one it asked for if that is
//! still free (or already its own), else the first free one. `DELETE` gives one back. Each lease is
//! a `Prefix` resource named `<vl3>-<index>`, so the store itself refuses a second lease of one
//! prefix, also between registries sharing an etcd. Leases of a node's router (stream metadata
//! `nsm-node`) outlive the stream and go with the node; an upstream client's go back to the pool
//! when its stream ends, as upstream's prefix server does (sdk:pkg/ipam/vl3ipam/server.go).

use std::collections::HashSet;

use futures::StreamExt;
use ipnet::IpNet;
use nsm_api::ipam::{self, PrefixRequest, PrefixResponse, ipam_server::Ipam};
use nsm_api::service_names::{IPAM_MEMBER_HEADER, IPAM_NODE_HEADER, IPAM_VL3_HEADER};
use nsm_model::{Kind, ValidationError, pb, upstream, validate};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::upstream_api::BoxStream;
use crate::{Caller, Registry, RegistryError, Result};

/// A vL3 whose pool is leased from.
#[derive(Clone, Debug)]
pub(crate) struct Vl3 {
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// Its upstream name (what leases and member services refer to it by).
    pub(crate) upstream: String,
    pub(crate) pool: IpNet,
    pub(crate) prefix_len: u8,
}

/// A lease as stored.
struct Lease {
    name: String,
    spec: pb::PrefixSpec,
    prefix: IpNet,
}

/// The index of `prefix` among the pool's prefixes of its length.
fn index_of(pool: IpNet, prefix: IpNet) -> u128 {
    let bits = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => u128::from(u32::from(v)),
        std::net::IpAddr::V6(v) => u128::from(v),
    };
    let shift = u32::from(prefix.max_prefix_len() - prefix.prefix_len());
    (bits(prefix.network()) - bits(pool.network())) >> shift
}

/// The root vL3 service a resource names, if it is one.
fn as_vl3(r: &pb::Resource) -> Option<Vl3> {
    let Some(pb::resource::Kind::NetworkService(ns)) = &r.kind else {
        return None;
    };
    let spec = ns.spec.as_ref()?;
    if spec.r#type != pb::ServiceType::Vl3 as i32 || !spec.vl3.is_empty() {
        return None;
    }
    let m = ns.metadata.as_ref()?;
    Some(Vl3 {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        upstream: upstream::name_of(&m.namespace, &m.name),
        pool: spec.cidr.parse().ok()?,
        prefix_len: u8::try_from(spec.prefix_len).ok()?,
    })
}

impl Registry {
    /// Every root vL3.
    pub(crate) fn vl3s(&self) -> Vec<Vl3> {
        let (items, _) = self.list(Kind::NetworkService, "", &Default::default());
        items.iter().filter_map(|r| as_vl3(r)).collect()
    }

    /// The vL3 named `upstream_name`, or the only one there is when no name is given.
    fn vl3_for(&self, upstream_name: Option<&str>) -> Result<Vl3> {
        let all = self.vl3s();
        match upstream_name {
            Some(n) => all
                .into_iter()
                .find(|v| v.upstream == n)
                .ok_or_else(|| RegistryError::NotFound {
                    kind: Kind::NetworkService,
                    name: format!("{n} (a vL3)"),
                }),
            None => match all.len() {
                1 => Ok(all.into_iter().next().expect("one")),
                0 => Err(RegistryError::Precondition("no vL3 network service exists".into())),
                n => Err(ValidationError::new(
                    IPAM_VL3_HEADER,
                    format!("{n} vL3s exist; name one in the {IPAM_VL3_HEADER} metadata"),
                )
                .into()),
            },
        }
    }

    fn leases_of(&self, vl3: &Vl3) -> Vec<Lease> {
        let (items, _) = self.list(Kind::Prefix, &vl3.namespace, &Default::default());
        items
            .iter()
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Prefix(p)) => {
                    let spec = p.spec.clone()?;
                    (spec.network_service == vl3.upstream).then_some(())?;
                    Some(Lease {
                        name: p.metadata.as_ref()?.name.clone(),
                        prefix: spec.prefix.parse().ok()?,
                        spec,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Leases a prefix of `vl3` to `node` (empty: to the calling stream) for `member`'s members.
    /// Returns the prefix, the lease's name, and whether it is a new lease.
    pub(crate) async fn allocate_prefix(
        &self,
        vl3: &Vl3,
        node: &str,
        member: &str,
        requested: Option<IpNet>,
        excludes: &[IpNet],
    ) -> Result<(IpNet, String, bool)> {
        let plen = vl3.prefix_len;
        let excluded = |p: &IpNet| excludes.iter().any(|e| e.contains(p) || p.contains(e));
        let leases = self.leases_of(vl3);
        if let Some(r) = requested {
            if r.prefix_len() != plen || !vl3.pool.contains(&r) || r.trunc() != r {
                return Err(ValidationError::new(
                    "prefix",
                    format!(
                        "{r} is not a /{plen} prefix of the pool {} of {}",
                        vl3.pool, vl3.upstream
                    ),
                )
                .into());
            }
            match leases.iter().find(|l| l.prefix == r) {
                Some(l) if !node.is_empty() && l.spec.node == node && l.spec.member_service == member => {
                    return Ok((r, l.name.clone(), false));
                }
                Some(_) => {}
                None if excluded(&r) => {}
                None => {
                    if let Some(name) = self.try_lease(vl3, index_of(vl3.pool, r), r, node, member).await? {
                        return Ok((r, name, true));
                    }
                }
            }
        }
        let held: HashSet<IpNet> = leases.iter().map(|l| l.prefix).collect();
        let subnets = vl3
            .pool
            .subnets(plen)
            .map_err(|_| ValidationError::new("spec.prefixLen", format!("/{plen} does not fit {}", vl3.pool)))?;
        for (i, p) in subnets.enumerate() {
            if held.contains(&p) || excluded(&p) {
                continue;
            }
            if let Some(name) = self.try_lease(vl3, i as u128, p, node, member).await? {
                return Ok((p, name, true));
            }
        }
        Err(RegistryError::Precondition(format!(
            "the pool {} of vL3 {} has no free /{plen} prefix ({} leased)",
            vl3.pool,
            vl3.upstream,
            held.len()
        )))
    }

    /// Creates the lease of prefix number `index`; None if someone else holds it already.
    async fn try_lease(
        &self,
        vl3: &Vl3,
        index: u128,
        prefix: IpNet,
        node: &str,
        member: &str,
    ) -> Result<Option<String>> {
        let name = format!("{}-{index}", vl3.name);
        let r = pb::Resource {
            kind: Some(pb::resource::Kind::Prefix(pb::Prefix {
                metadata: Some(pb::ObjectMeta {
                    name: name.clone(),
                    namespace: vl3.namespace.clone(),
                    ..Default::default()
                }),
                spec: Some(pb::PrefixSpec {
                    network_service: vl3.upstream.clone(),
                    prefix: prefix.to_string(),
                    node: node.to_owned(),
                    member_service: member.to_owned(),
                }),
            })),
        };
        match self.insert(&Caller::internal(), r).await {
            Ok(_) => Ok(Some(name)),
            Err(RegistryError::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes every lease for which `pred` holds (a node or a vL3 is gone).
    pub(crate) async fn release_where(&self, pred: impl Fn(&pb::PrefixSpec) -> bool) {
        let (items, _) = self.list(Kind::Prefix, "", &Default::default());
        for r in items {
            let Some(pb::resource::Kind::Prefix(p)) = &r.kind else {
                continue;
            };
            let (Some(m), Some(spec)) = (&p.metadata, &p.spec) else {
                continue;
            };
            if pred(spec)
                && let Err(e) = self
                    .delete_one(&Caller::internal(), Kind::Prefix, &m.namespace, &m.name)
                    .await
                && !matches!(e, RegistryError::NotFound { .. })
            {
                tracing::warn!(prefix = %spec.prefix, error = %e, "releasing a prefix");
            }
        }
    }

    /// Refuses a vL3 whose pool overlaps another's, and a change of pool or prefix length while
    /// prefixes are leased (members would keep addresses outside the new pool).
    pub(crate) fn check_vl3(&self, r: &pb::Resource) -> Result<()> {
        let Some(new) = as_vl3(r) else { return Ok(()) };
        for other in self.vl3s() {
            if other.upstream == new.upstream {
                if (other.pool != new.pool || other.prefix_len != new.prefix_len) && !self.leases_of(&other).is_empty()
                {
                    return Err(RegistryError::Precondition(format!(
                        "spec.cidr: vL3 {} has prefixes leased from {} /{}; its pool and prefix length cannot change while they are",
                        other.upstream, other.pool, other.prefix_len
                    )));
                }
            } else if other.pool.contains(&new.pool) || new.pool.contains(&other.pool) {
                return Err(ValidationError::new(
                    "spec.cidr",
                    format!(
                        "{} overlaps the pool {} of vL3 {}",
                        new.pool, other.pool, other.upstream
                    ),
                )
                .into());
            }
        }
        Ok(())
    }
}

/// Serves `ipam.IPAM`.
pub(crate) struct PrefixServer(pub(crate) Registry);

fn parse_prefix(field: &str, s: &str) -> std::result::Result<IpNet, Status> {
    validate::cidr(field, s).map_err(|e| RegistryError::from(e).into())
}

#[tonic::async_trait]
impl Ipam for PrefixServer {
    type ManagePrefixesStream = BoxStream<PrefixResponse>;

    async fn manage_prefixes(
        &self,
        req: Request<Streaming<PrefixRequest>>,
    ) -> std::result::Result<Response<Self::ManagePrefixesStream>, Status> {
        let header = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .filter(|s| !s.is_empty())
        };
        let who: Caller = nsm_authz::caller(&req)?;
        let vl3 = self.0.vl3_for(header(IPAM_VL3_HEADER).as_deref())?;
        // A workload leases only from its own namespace's vL3s (nodes lease for their routers).
        if let Caller::Workload { namespace, .. } = &who
            && vl3.namespace != *namespace
        {
            return Err(RegistryError::PermissionDenied(format!(
                "{who} may not lease prefixes of a vL3 in namespace {:?} (rule: workloads lease from their own namespace)",
                vl3.namespace
            ))
            .into());
        }
        let node = header(IPAM_NODE_HEADER);
        if let Some(n) = &node {
            validate::name(IPAM_NODE_HEADER, n).map_err(RegistryError::from)?;
        }
        // The node is the caller's identity, not what a header claims.
        let node = who.prefix_node(node.as_deref())?.unwrap_or_default();
        let member = header(IPAM_MEMBER_HEADER).unwrap_or_else(|| vl3.upstream.clone());
        if member != vl3.upstream {
            let on_vl3 = self.0.member_service_vl3(&member);
            if on_vl3.as_deref() != Some(vl3.upstream.as_str()) {
                return Err(RegistryError::from(ValidationError::new(
                    IPAM_MEMBER_HEADER,
                    format!("{member:?} is not a network service on vL3 {}", vl3.upstream),
                ))
                .into());
            }
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let registry = self.0.clone();
        tokio::spawn(async move {
            // Leases of an upstream client (no node): released when the stream ends.
            let mut own: Vec<String> = Vec::new();
            while let Some(Ok(msg)) = inbound.next().await {
                let outcome = async {
                    let excludes = msg
                        .exclude_prefixes
                        .iter()
                        .enumerate()
                        .map(|(i, e)| parse_prefix(&format!("exclude_prefixes[{i}]"), e))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let prefix = (!msg.prefix.is_empty())
                        .then(|| parse_prefix("prefix", &msg.prefix))
                        .transpose()?;
                    match ipam::Type::try_from(msg.r#type) {
                        Ok(ipam::Type::Allocate) => {
                            let (p, name, created) = registry
                                .allocate_prefix(&vl3, &node, &member, prefix, &excludes)
                                .await?;
                            if node.is_empty() && created {
                                own.push(name);
                            }
                            Ok(Some(PrefixResponse {
                                prefix: p.to_string(),
                                exclude_prefixes: msg.exclude_prefixes.clone(),
                            }))
                        }
                        Ok(ipam::Type::Delete) => {
                            let p =
                                prefix.ok_or_else(|| Status::invalid_argument("prefix: DELETE needs the prefix"))?;
                            let lease = registry.leases_of(&vl3).into_iter().find(|l| l.prefix == p);
                            if let Some(l) = lease
                                && ((!node.is_empty() && l.spec.node == node) || own.contains(&l.name))
                            {
                                own.retain(|n| *n != l.name);
                                registry
                                    .delete_one(&Caller::internal(), Kind::Prefix, &vl3.namespace, &l.name)
                                    .await?;
                            }
                            Ok(None)
                        }
                        _ => Err(Status::invalid_argument("type: expected ALLOCATE or DELETE")),
                    }
                }
                .await;
                let reply = match outcome {
                    Ok(None) => continue,
                    Ok(Some(r)) => Ok(r),
                    Err(e) => Err(e),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
            for name in own {
                let _ = registry
                    .delete_one(&Caller::internal(), Kind::Prefix, &vl3.namespace, &name)
                    .await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
