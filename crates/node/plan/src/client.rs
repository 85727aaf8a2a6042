//! What a node does for one of its vWire clients: a pure function of the client's spec and last
//! status, the registry as the node sees it ([`View`]), what the node built for it and what the
//! kernel shows of that ([`Standing`], [`Observed`]), and the time. No IO and no clock reads, so
//! every branch is tested below without root or a registry.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use nsm_model::{pb, upstream};

use crate::domain::{ClientKey, Encryption, MechanismKind, NotReady, Pair, Phase};
use crate::select::{self, Candidate};
use crate::view::View;

pub use nsm_model::pairs::DEFAULT_POOL;

/// This node, as decisions need it.
#[derive(Clone, Copy, Debug)]
pub struct Me<'a> {
    /// The node's name.
    pub name: &'a str,
    /// Its underlay address.
    pub underlay: IpAddr,
}

/// Where the far end of a vWire is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Far {
    /// An endpoint namespace on this node: a veth pair straight into it (KERNEL).
    Local {
        /// The endpoint's namespace.
        netns: String,
    },
    /// This node's own namespace, as the gateway to an address endpoint; `nat` when the address
    /// is another machine's (it does not know the pool, so it sees the node's address instead).
    Gateway {
        /// The endpoint's address.
        target: IpAddr,
        /// Whether the node masquerades the client's address.
        nat: bool,
    },
    /// Another node: a tunnel into an endpoint namespace there, or into its host namespace when
    /// the endpoint is that host's own address (`target`).
    Remote {
        /// The other node's name.
        node: String,
        /// Where its NetworkService API is served.
        url: String,
        /// Its underlay address.
        underlay: IpAddr,
        /// The endpoint's address, when the endpoint is that host.
        target: Option<IpAddr>,
    },
}

impl Far {
    /// The address endpoint beyond the vWire's peer, if the endpoint is an address.
    pub fn target(&self) -> Option<IpAddr> {
        match self {
            Far::Local { .. } => None,
            Far::Gateway { target, .. } => Some(*target),
            Far::Remote { target, .. } => *target,
        }
    }

    /// The client's route beyond its peer: a host route to the address endpoint.
    pub fn route(&self) -> Option<IpNet> {
        self.target().map(IpNet::from)
    }

    /// Whether this node masquerades the client towards the endpoint.
    pub fn nat(&self) -> bool {
        matches!(self, Far::Gateway { nat: true, .. })
    }

    /// Whether the far end is on another node.
    pub fn remote(&self) -> bool {
        matches!(self, Far::Remote { .. })
    }
}

/// What this node built for a client, as far as decisions look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    /// The endpoint it leads to (upstream name).
    pub endpoint: String,
    /// The client's namespace and interface.
    pub netns: String,
    /// The client's interface.
    pub interface: String,
    /// Its addresses.
    pub pair: Pair,
    /// Whether its far end is on another node.
    pub remote: bool,
    /// Its route beyond the peer (address endpoints).
    pub route: Option<IpNet>,
    /// Whether this node masquerades it.
    pub nat: bool,
    /// How it is built.
    pub mechanism: MechanismKind,
    /// When its far end on another node was last requested; `None`: due now.
    pub refreshed: Option<Instant>,
    /// The uid of the client it was built for.
    pub uid: String,
}

/// A link as the kernel shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Up with carrier (both ends of a veth up, a tunnel up).
    pub lower_up: bool,
    /// Its addresses.
    pub addresses: Vec<IpNet>,
}

/// Everything one decision depends on.
pub struct Input<'a> {
    /// This node.
    pub me: Me<'a>,
    /// The client, with its last status.
    pub client: &'a pb::Client,
    /// The registry as this node sees it.
    pub view: &'a View,
    /// What this node built for the client.
    pub standing: Option<&'a Standing>,
    /// The kernel's view of the link named by [`observe`] (`None`: no such link, or not looked).
    pub observed: Option<&'a Observed>,
    /// Round-robin counter for picking among eligible endpoints.
    pub rr: usize,
    /// Wall-clock time, for registrations' expiry.
    pub now: SystemTime,
    /// Monotonic time, for refresh intervals.
    pub mono: Instant,
    /// A far end on another node is re-requested when its last request is this old.
    pub refresh_after: Duration,
    /// Whether a namespace path exists (an endpoint on this node whose namespace is gone is not
    /// live); a function so that tests decide it.
    pub netns_exists: &'a dyn Fn(&str) -> bool,
}

/// Why what stands is rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rebuild {
    /// It was built for another client of the same name (deleted and made again).
    Replaced,
    /// The client's namespace or interface changed.
    Workload,
    /// The way to the endpoint changed (another node now hosts its address, or none does).
    Path,
    /// Its mechanism is no longer allowed by the encryption asked for.
    Encryption,
}

/// What the vWire is to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The service (upstream name).
    pub service: String,
    /// The endpoint (upstream name).
    pub endpoint: String,
    /// Where its far end is built.
    pub far: Far,
    /// The encryption asked for.
    pub encryption: Encryption,
    /// Whether the round-robin counter was used (picking anew).
    pub rr_used: bool,
}

impl Target {
    /// The path a status shows: client → this node → [endpoint's node →] endpoint.
    pub fn path(&self, key: &ClientKey, me: &Me<'_>) -> Vec<String> {
        let mut path = vec![key.upstream(), me.name.to_owned()];
        if let Far::Remote { node, .. } = &self.far {
            path.push(node.clone());
        }
        path.push(self.endpoint.clone());
        path
    }
}

/// A new vWire's addresses: from `pool`, preferring `wanted` (the client's last ones, so a
/// rebuild keeps them) when whoever allocates finds it free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The pool (the service's CIDR, else [`DEFAULT_POOL`]).
    pub pool: IpNet,
    /// The pair the client had.
    pub wanted: Option<Pair>,
}

/// The decision for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not this node's client (any more): remove what stands.
    TearDown,
    /// Cannot be Ready now: what stands is removed (it must not carry traffic to an endpoint
    /// that is gone or no longer eligible), and the status says why.
    NotReady(NotReady),
    /// A client of a vL3 (or of a service on one): [`crate::vl3::plan_member`] decides.
    Member {
        /// The service's upstream name.
        service: String,
        /// The vL3's upstream name.
        vl3: String,
    },
    /// What stands is right.
    Keep(Target),
    /// What stands is right; its far end on another node is re-requested (the endpoint's node
    /// drops ends that are not).
    Refresh(Target),
    /// What an earlier run of the daemon built is in the kernel, exactly as the status says:
    /// take it over instead of building.
    Adopt {
        /// The vWire.
        target: Target,
        /// Its addresses, from the status (the allocation's `wanted`, which the registry is told
        /// of: the lease is the client's).
        allocation: Allocation,
        /// How it was built.
        mechanism: MechanismKind,
    },
    /// Build the vWire (nothing stands, or what stood is gone from the kernel).
    Build(Target, Allocation),
    /// Remove what stands and build it again.
    Rebuild(Target, Allocation, Rebuild),
    /// The endpoint wired is gone or no longer eligible: remove what stands and wire `target`'s
    /// endpoint instead.
    Heal {
        /// The new vWire.
        target: Target,
        /// Its addresses.
        allocation: Allocation,
        /// The endpoint it leaves (upstream name).
        from: String,
    },
}

/// The link a decision needs to see, if any: what stands, else the interface an earlier run may
/// have built (only a Ready status can be adopted; a WIREGUARD tunnel lived in the old process).
/// Looking costs a netlink round trip, so a client that has neither is not looked at.
pub fn observe<'a>(client: &'a pb::Client, standing: Option<&'a Standing>) -> Option<(&'a str, &'a str)> {
    if let Some(s) = standing {
        return Some((&s.netns, &s.interface));
    }
    let st = client.status.as_ref()?;
    let spec = client.spec.as_ref()?;
    (st.phase == Phase::Ready as i32 && st.mechanism != MechanismKind::WireGuard.as_str())
        .then_some((spec.netns.as_str(), spec.interface.as_str()))
}

/// An endpoint registration that has not expired and, for one in a namespace on this node, whose
/// namespace still exists (a workload that is gone cannot be an endpoint, and its clients heal to
/// another).
fn live(e: &pb::Endpoint, input: &Input<'_>) -> bool {
    let Some(spec) = e.spec.as_ref() else { return true };
    let unexpired = spec
        .expiration_time
        .as_ref()
        .and_then(nsm_model::to_system_time)
        .is_none_or(|t| t > input.now);
    let here = spec.node == input.me.name && !spec.netns.is_empty();
    unexpired && (!here || (input.netns_exists)(&spec.netns))
}

/// Decides what to do for one client.
pub fn plan(input: &Input<'_>) -> Decision {
    match plan_inner(input) {
        Ok(d) => d,
        Err(nr) => Decision::NotReady(nr),
    }
}

fn plan_inner(input: &Input<'_>) -> Result<Decision, NotReady> {
    let client = input.client;
    let key = ClientKey::of(client);
    let spec = client.spec.clone().unwrap_or_default();
    if spec.node != input.me.name {
        return Ok(Decision::TearDown);
    }
    let labels = client.metadata.as_ref().map(|m| m.labels.clone()).unwrap_or_default();
    let (svc_ns, svc_name, _) = upstream::parse_name(
        "spec.networkService",
        &upstream::qualify(&spec.network_service, &key.namespace),
    )
    .map_err(|e| NotReady::failed(e.to_string()))?;
    let service_up = upstream::name_of(&svc_ns, &svc_name);
    let service = input.view.service(&svc_ns, &svc_name);
    if let Some(vl3) = service.and_then(vl3_of) {
        return Ok(Decision::Member {
            service: service_up,
            vl3,
        });
    }

    let endpoints: Vec<&pb::Endpoint> = input.view.endpoints().filter(|e| live(e, input)).collect();
    let mut rr_used = false;
    let chosen = if spec.endpoint.is_empty() {
        let Some(service) = service else {
            return Err(NotReady::pending(format!("network service {service_up:?} not found")));
        };
        let offering: Vec<(Candidate, &pb::Endpoint)> = endpoints
            .iter()
            .filter_map(|e| {
                let up = upstream::nse_to_upstream(e);
                up.network_service_names.contains(&service_up).then(|| {
                    let labels = up
                        .network_service_labels
                        .get(&service_up)
                        .map(|l| l.labels.clone())
                        .unwrap_or_default();
                    (Candidate { name: up.name, labels }, *e)
                })
            })
            .collect();
        let candidates: Vec<Candidate> = offering.iter().map(|(c, _)| c.clone()).collect();
        let matches = service.spec.as_ref().map(|s| s.matches.clone()).unwrap_or_default();
        let eligible = select::eligible(&matches, &labels, &candidates);
        // Stay with the endpoint already wired while it is still eligible.
        let current = input.standing.map(|w| w.endpoint.as_str());
        let pick = match current.filter(|c| eligible.iter().any(|e| e.name == *c)) {
            Some(c) => c.to_owned(),
            None => {
                let Some(p) = select::round_robin(&eligible, input.rr) else {
                    return Err(NotReady::pending(format!(
                        "no live endpoint for network service {service_up:?}"
                    )));
                };
                rr_used = true;
                p.name.clone()
            }
        };
        offering
            .into_iter()
            .find(|(c, _)| c.name == pick)
            .map(|(_, e)| e)
            .expect("picked from the list")
    } else {
        let pinned_up = upstream::qualify(&spec.endpoint, &key.namespace);
        match endpoints
            .iter()
            .find(|e| upstream::nse_to_upstream(e).name == pinned_up)
        {
            Some(e) => *e,
            None => return Err(NotReady::pending(format!("endpoint {pinned_up:?} not found"))),
        }
    };
    let chosen_up = upstream::nse_to_upstream(chosen);
    let endpoint_up = chosen_up.name;
    // A pinned endpoint that lists services must offer this one; one that lists none (an
    // address endpoint made with only `--address`) serves whatever service a client pins it for.
    if !spec.endpoint.is_empty()
        && !chosen_up.network_service_names.is_empty()
        && !chosen_up.network_service_names.contains(&service_up)
    {
        return Err(NotReady::failed(format!(
            "endpoint {endpoint_up:?} does not offer network service {service_up:?} (it offers {})",
            chosen_up.network_service_names.join(", ")
        )));
    }
    let ep_spec = chosen.spec.clone().unwrap_or_default();
    let far = far_end(input, &endpoint_up, &ep_spec)?;
    let service_spec = service.and_then(|s| s.spec.as_ref());
    let encryption = Encryption::effective(&spec.encryption, service_spec.map_or("", |s| s.encryption.as_str()));
    let target = Target {
        service: service_up,
        endpoint: endpoint_up,
        far,
        encryption,
        rr_used,
    };

    let status = client.status.as_ref();
    if let Some(w) = input.standing {
        let uid = client.metadata.as_ref().map_or("", |m| m.uid.as_str());
        let rebuild = if w.uid != uid {
            Some(Rebuild::Replaced)
        } else if w.endpoint != target.endpoint {
            None
        } else if w.netns != spec.netns || w.interface != spec.interface {
            Some(Rebuild::Workload)
        } else if w.remote != target.far.remote() || w.route != target.far.route() || w.nat != target.far.nat() {
            Some(Rebuild::Path)
        } else if w.remote && !encryption.allows(w.mechanism) {
            Some(Rebuild::Encryption)
        } else {
            let standing = input.observed.is_some_and(|o| o.lower_up);
            if standing {
                let due = w
                    .refreshed
                    .is_none_or(|t| input.mono.saturating_duration_since(t) >= input.refresh_after);
                return Ok(if w.remote && due {
                    Decision::Refresh(target)
                } else {
                    Decision::Keep(target)
                });
            }
            // What was built is gone from the kernel: built again (with the same addresses).
            let allocation = allocation(&target, service_spec, status)?;
            return Ok(Decision::Build(target, allocation));
        };
        let allocation = allocation(&target, service_spec, status)?;
        return Ok(match rebuild {
            Some(why) => Decision::Rebuild(target, allocation, why),
            None => Decision::Heal {
                from: w.endpoint.clone(),
                target,
                allocation,
            },
        });
    }

    // Adopt what an earlier run of this daemon built (it keeps forwarding across a restart): the
    // kernel has it with the status's addresses, which are still of the service's pool.
    let allocation = allocation(&target, service_spec, status)?;
    if let Some(st) = status
        && let Ok(mechanism) = st.mechanism.parse::<MechanismKind>()
        && mechanism != MechanismKind::WireGuard
        && let Some(pair) = allocation.wanted
        && input
            .observed
            .is_some_and(|o| o.lower_up && o.addresses.contains(&pair.src))
    {
        let mechanism = if target.far.remote() {
            MechanismKind::Vxlan
        } else {
            MechanismKind::Kernel
        };
        return Ok(Decision::Adopt {
            target,
            allocation,
            mechanism,
        });
    }
    Ok(Decision::Build(target, allocation))
}

/// Where a new vWire's addresses come from: the service's pool (checked against the endpoint's
/// address family), preferring the pair the client's Ready status had for this endpoint.
fn allocation(
    target: &Target,
    service: Option<&pb::NetworkServiceSpec>,
    status: Option<&pb::ClientStatus>,
) -> Result<Allocation, NotReady> {
    let pool: IpNet = service
        .map(|s| s.cidr.as_str())
        .filter(|c| !c.is_empty())
        .unwrap_or(DEFAULT_POOL)
        .parse()
        .map_err(|_| NotReady::failed("the service's CIDR does not parse"))?;
    if let Some(t) = target.far.target()
        && t.is_ipv4() != pool.addr().is_ipv4()
    {
        return Err(NotReady::failed(format!(
            "endpoint {:?} has address {t} but the pool {pool} of {:?} is of the other IP family",
            target.endpoint, target.service
        )));
    }
    let wanted = status
        .filter(|st| st.phase == Phase::Ready as i32 && st.endpoint == target.endpoint)
        .and_then(Pair::of_status)
        .filter(|p| pool.contains(&p.src.addr()) && pool.contains(&p.dst.addr()));
    Ok(Allocation { pool, wanted })
}

/// Decides where the far end of a vWire to `ep` is built.
fn far_end(input: &Input<'_>, endpoint_up: &str, ep: &pb::EndpointSpec) -> Result<Far, NotReady> {
    if !ep.netns.is_empty() {
        if ep.node == input.me.name {
            return Ok(Far::Local {
                netns: ep.netns.clone(),
            });
        }
        let Some(node) = input.view.node(&ep.node) else {
            return Err(NotReady::pending(format!(
                "node {:?} of endpoint {endpoint_up:?} is not registered",
                ep.node
            )));
        };
        return remote_far(&ep.node, node, None);
    }
    if ep.address.is_empty() {
        return Err(NotReady::failed(format!(
            "endpoint {endpoint_up:?} has neither a network namespace nor an address"
        )));
    }
    let target: IpAddr = ep.address.parse().map_err(|_| {
        NotReady::failed(format!(
            "endpoint {endpoint_up:?}: address {:?} is not an IP address",
            ep.address
        ))
    })?;
    if target == input.me.underlay {
        return Ok(Far::Gateway { target, nat: false });
    }
    // An nsm node on that host ends the vWire there; otherwise this node is the gateway.
    match input.view.node_at(target) {
        Some(n) => {
            let name = n.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            remote_far(&name, n, Some(target))
        }
        None => Ok(Far::Gateway { target, nat: true }),
    }
}

fn remote_far(name: &str, node: &pb::Node, target: Option<IpAddr>) -> Result<Far, NotReady> {
    let spec = node.spec.clone().unwrap_or_default();
    if spec.url.is_empty() {
        return Err(NotReady::pending(format!("node {name:?} advertises no URL")));
    }
    let underlay: IpAddr = spec
        .address
        .parse()
        .map_err(|_| NotReady::failed(format!("node {name:?} has no underlay address")))?;
    Ok(Far::Remote {
        node: name.to_owned(),
        url: spec.url,
        underlay,
        target,
    })
}

/// The vL3 a service puts its members on: itself if it is a vL3, else the one it names.
pub fn vl3_of(service: &pb::NetworkService) -> Option<String> {
    let spec = service.spec.as_ref()?;
    let m = service.metadata.as_ref()?;
    if spec.r#type != pb::ServiceType::Vl3 as i32 {
        return None;
    }
    Some(if spec.vl3.is_empty() {
        upstream::name_of(&m.namespace, &m.name)
    } else {
        upstream::qualify(&spec.vl3, &m.namespace)
    })
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
