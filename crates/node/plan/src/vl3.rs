//! vL3 members, sans-IO: what a vL3 is to a node, its prefix leases, members' addresses and DNS
//! names, and the decision for one member client (the same shape as [`crate::client::plan`]).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_model::{pb, upstream};

use crate::client::{Observed, Standing};
use crate::domain::{ClientKey, NotReady};
use crate::view::View;

/// A vL3 as the node needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vl3 {
    /// Upstream name.
    pub name: String,
    /// The address space of every member.
    pub pool: IpNet,
    /// Length of the prefixes routers lease from the pool.
    pub prefix_len: u8,
    /// Members' DNS names (`{client}`, `{service}`, `{namespace}`).
    pub dns_template: String,
}

/// A lease of a vL3's pool (any node's).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    /// The leased prefix.
    pub prefix: IpNet,
    /// The node whose router holds it.
    pub node: String,
    /// The member service its members belong to.
    pub member: String,
}

impl Lease {
    /// The router's address in this prefix.
    pub fn gateway(&self) -> IpNet {
        gateway_of(self.prefix)
    }
}

/// The router's address in a prefix: its first for IPv4 (as upstream's vL3 IPAM does), its
/// second for IPv6, whose first is the Subnet-Router anycast address (RFC 4291 §2.6.1).
pub fn gateway_of(prefix: IpNet) -> IpNet {
    let skip = usize::from(prefix.addr().is_ipv6());
    let a = prefix
        .subnets(prefix.max_prefix_len())
        .ok()
        .and_then(|mut s| s.nth(skip))
        .map_or(prefix.network(), |n| n.addr());
    IpNet::from(a)
}

/// Free host addresses of `prefix` for members: all but the gateway (its first), skipping `used`.
pub fn free_address(prefix: IpNet, used: &HashSet<IpAddr>) -> Option<IpAddr> {
    let max = prefix.max_prefix_len();
    let subnets = prefix.subnets(max).ok()?;
    let gateway = gateway_of(prefix).addr();
    subnets
        .map(|n| n.addr())
        .filter(|a| *a != prefix.network() && *a != gateway)
        .find(|a| !used.contains(a))
}

/// A member's DNS name from the vL3's template.
pub fn dns_name(template: &str, client: &str, service: &str, namespace: &str) -> String {
    let n = template
        .replace("{client}", client)
        .replace("{service}", service)
        .replace("{namespace}", namespace);
    if n.ends_with('.') { n } else { format!("{n}.") }
}

/// The search domain the template implies (what follows the `{client}` label), if any.
pub fn search_domain(template: &str, service: &str, namespace: &str) -> Option<String> {
    let rest = template.strip_prefix("{client}.")?;
    let d = dns_name(rest, "", service, namespace);
    (d != ".").then_some(d)
}

/// The leases of `vl3`, in a stable order.
pub fn leases_of(view: &View, vl3: &str) -> Vec<Lease> {
    let mut out: Vec<Lease> = view
        .prefixes()
        .filter_map(|p| {
            let s = p.spec.as_ref()?;
            (s.network_service == vl3).then_some(())?;
            Some(Lease {
                prefix: s.prefix.parse().ok()?,
                node: s.node.clone(),
                member: s.member_service.clone(),
            })
        })
        .collect();
    out.sort();
    out
}

/// The vL3 named `name` (upstream), if it exists and is a root vL3 whose pool parses.
pub fn vl3_spec(view: &View, name: &str) -> Result<Option<Vl3>, NotReady> {
    let (ns, n, _) = upstream::parse_name("spec.vl3", name).map_err(|e| NotReady::failed(e.to_string()))?;
    let Some(spec) = view.service(&ns, &n).and_then(|s| s.spec.as_ref()) else {
        return Ok(None);
    };
    if spec.r#type != pb::ServiceType::Vl3 as i32 || !spec.vl3.is_empty() {
        return Ok(None);
    }
    let Ok(pool) = spec.cidr.parse::<IpNet>() else {
        return Ok(None);
    };
    let prefix_len = match spec.prefix_len {
        0 => nsm_model::validate::default_prefix_len(&pool),
        n => n,
    };
    Ok(u8::try_from(prefix_len).ok().map(|prefix_len| Vl3 {
        name: name.to_owned(),
        pool,
        prefix_len,
        dns_template: spec.dns_template.clone(),
    }))
}

/// Where a member sits: its address and the lease (router prefix) it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The vL3.
    pub vl3: Vl3,
    /// The member's service (upstream name).
    pub service: String,
    /// The member's address.
    pub addr: IpAddr,
    /// The lease it is from; its gateway is the member's peer.
    pub lease: Lease,
}

/// The decision for a member client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberDecision {
    /// Cannot be a member now (what stands is removed).
    NotReady(NotReady),
    /// None of this node's leases for the member's service has a free address: lease a prefix
    /// of the vL3 (`wanted`: the one that held the member's last address), then decide again.
    Lease {
        /// The vL3.
        vl3: Vl3,
        /// The member's service.
        service: String,
        /// The prefix asked for first.
        wanted: Option<IpNet>,
    },
    /// What stands is right.
    Keep(Membership),
    /// The member's link of an earlier run stands with its address: take it over.
    Adopt(Membership),
    /// Build the member's link into the router (nothing stands, or it is gone from the kernel).
    Build(Membership),
    /// Its address, namespace or interface changed: remove what stands and build it again.
    Rebuild(Membership),
}

/// Everything a member decision depends on.
pub struct MemberInput<'a> {
    /// This node's name.
    pub node: &'a str,
    /// The client.
    pub client: &'a pb::Client,
    /// Its service (upstream name) and the vL3 that service is on.
    pub service: &'a str,
    /// The vL3's upstream name.
    pub vl3: &'a str,
    /// The registry as this node sees it.
    pub view: &'a View,
    /// Member addresses held by this node's other clients (built or in their statuses).
    pub used: &'a HashSet<IpAddr>,
    /// What this node built for the client.
    pub standing: Option<&'a Standing>,
    /// The kernel's view of the link [`crate::client::observe`] names.
    pub observed: Option<&'a Observed>,
}

/// Decides what to do for a member client.
pub fn plan_member(input: &MemberInput<'_>) -> MemberDecision {
    match plan_member_inner(input) {
        Ok(d) => d,
        Err(nr) => MemberDecision::NotReady(nr),
    }
}

fn plan_member_inner(input: &MemberInput<'_>) -> Result<MemberDecision, NotReady> {
    let spec = input.client.spec.clone().unwrap_or_default();
    let (member, vl3_name) = (input.service, input.vl3);
    if !spec.endpoint.is_empty() {
        return Err(NotReady::failed(format!(
            "{member:?} is on vL3 {vl3_name:?}: its members join the vL3, no endpoint can be pinned"
        )));
    }
    let Some(vl3) = vl3_spec(input.view, vl3_name)? else {
        return Err(NotReady::pending(format!(
            "network service {member:?} is on vL3 {vl3_name:?}, which does not exist"
        )));
    };
    // The member's address: the one it had if it is still ours to give, else a free one, else
    // from a new lease.
    let previous: Option<IpAddr> = input
        .client
        .status
        .as_ref()
        .and_then(|s| s.src_ip_addrs.first())
        .and_then(|a| a.parse::<IpNet>().ok())
        .map(|n| n.addr());
    let own: Vec<Lease> = leases_of(input.view, &vl3.name)
        .into_iter()
        .filter(|l| l.node == input.node && l.member == member)
        .collect();
    let picked = previous
        .filter(|p| !input.used.contains(p))
        .and_then(|p| {
            own.iter()
                .find(|l| l.prefix.contains(&p) && l.gateway().addr() != p && p != l.prefix.network())
                .map(|l| (p, l.clone()))
        })
        .or_else(|| {
            own.iter()
                .find_map(|l| free_address(l.prefix, input.used).map(|a| (a, l.clone())))
        });
    let Some((addr, lease)) = picked else {
        // The prefix that held the member's previous address, even when no lease of the vL3 is
        // left to tell its length.
        let wanted = previous
            .and_then(|p| IpNet::new(p, vl3.prefix_len).ok().map(|n| n.trunc()))
            .filter(|n| vl3.pool.contains(n));
        return Ok(MemberDecision::Lease {
            vl3,
            service: member.to_owned(),
            wanted,
        });
    };
    let m = Membership {
        vl3,
        service: member.to_owned(),
        addr,
        lease,
    };
    let src = IpNet::from(addr);
    if let Some(w) = input.standing {
        let uid = input.client.metadata.as_ref().map_or("", |m| m.uid.as_str());
        if w.uid != uid
            || w.pair.src != src
            || w.netns != spec.netns
            || w.interface != spec.interface
            || w.endpoint != m.vl3.name
        {
            return Ok(MemberDecision::Rebuild(m));
        }
        if input.observed.is_some_and(|o| o.lower_up) {
            return Ok(MemberDecision::Keep(m));
        }
    }
    if input.observed.is_some_and(|o| o.lower_up && o.addresses.contains(&src)) {
        return Ok(MemberDecision::Adopt(m));
    }
    Ok(MemberDecision::Build(m))
}

/// The status fields a Ready member shows beyond the common ones: its DNS name, DNS server and
/// search domains.
pub fn member_dns(
    vl3: &Vl3,
    key: &ClientKey,
    service_short: &str,
    gateway: IpNet,
) -> (String, Vec<String>, Vec<String>) {
    (
        dns_name(&vl3.dns_template, &key.name, service_short, &key.namespace),
        vec![gateway.addr().to_string()],
        search_domain(&vl3.dns_template, service_short, &key.namespace)
            .into_iter()
            .collect(),
    )
}

#[cfg(test)]
#[path = "vl3_tests.rs"]
mod tests;
