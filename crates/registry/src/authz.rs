//! Who may do what at the registry (docs/SECURITY.md has the table). Deny by default: the gate
//! ([`RegistryGate`]) admits a caller to a method, and the handlers ask [`Caller`] about the
//! resources a request touches — reads by namespace, writes by namespace and by owner (a node
//! writes only its own Node, and clients and endpoints placed on it). Pure rules, tested below; the
//! gate's only state is the user grants the registry keeps.

use std::collections::HashMap;
use std::sync::Arc;

use nsm_identity::{Role, SpiffeId};
use nsm_model::{Kind, pb};
use nsm_transport::Peer;
use parking_lot::RwLock;
use tonic::Status;

use crate::RegistryError;

/// A user's role in its namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserRole {
    /// Everything in its namespaces.
    Admin,
    /// Create, change, delete and read services, endpoints and clients in its namespaces.
    Edit,
    /// Read in its namespaces.
    View,
}

impl UserRole {
    /// From its name in the API and on the command line.
    pub fn parse(s: &str) -> Result<UserRole, RegistryError> {
        match s {
            "admin" => Ok(UserRole::Admin),
            "edit" => Ok(UserRole::Edit),
            "view" => Ok(UserRole::View),
            other => Err(nsm_model::ValidationError::new(
                "user.role",
                format!("{other:?} is not one of admin, edit, view"),
            )
            .into()),
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::Edit => "edit",
            UserRole::View => "view",
        }
    }
}

/// A user and what it was granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The user's name (its SPIFFE ID is `spiffe://<domain>/user/<name>`).
    pub name: String,
    /// Where the role applies.
    pub namespaces: Vec<String>,
    /// What it may do there.
    pub role: UserRole,
}

/// Who is calling, as the gate established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// May do everything: an admin SVID, a permitted local user on the unix socket, or any caller
    /// of a registry started with `--insecure`. The string says which, for messages.
    Admin(String),
    /// A user scoped to namespaces.
    User(Grant),
    /// A node daemon.
    Node(String),
    /// A workload holding an SVID of the domain in a namespace (`spiffe://<domain>/ns/<ns>/…`): an
    /// upstream endpoint registering itself.
    Workload {
        /// Its SPIFFE ID.
        id: String,
        /// Its namespace.
        namespace: String,
    },
    /// TLS without a certificate: a node about to join.
    Anonymous,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Admin(who) => write!(f, "admin {who}"),
            Caller::User(g) => write!(f, "user {} ({} in {})", g.name, g.role.as_str(), g.namespaces.join(",")),
            Caller::Node(n) => write!(f, "node {n}"),
            Caller::Workload { id, .. } => write!(f, "workload {id}"),
            Caller::Anonymous => f.write_str("an anonymous caller"),
        }
    }
}

fn denied(who: &Caller, rule: impl std::fmt::Display) -> RegistryError {
    RegistryError::PermissionDenied(format!("{who} may not {rule}"))
}

/// What a resource says about where it lives and who owns it.
fn placed_on(r: &pb::Resource) -> Option<&str> {
    match &r.kind {
        Some(pb::resource::Kind::Client(c)) => c.spec.as_ref().map(|s| s.node.as_str()),
        Some(pb::resource::Kind::Endpoint(e)) => e.spec.as_ref().map(|s| s.node.as_str()),
        Some(pb::resource::Kind::Node(n)) => n.metadata.as_ref().map(|m| m.name.as_str()),
        _ => None,
    }
}

/// What only admins (and, for what is placed on them, nodes) may say about where traffic goes: a
/// client's workload namespace, an endpoint's namespace, node or host address. A tenant who could
/// set them would have a node build interfaces in the host's or another tenant's namespace, or
/// masquerade to any address.
fn binds_hosts(r: &pb::Resource) -> Option<&'static str> {
    match &r.kind {
        Some(pb::resource::Kind::Client(_)) => {
            Some("clients are made through a node's unix socket, by the workload itself or the host's operator")
        }
        Some(pb::resource::Kind::Endpoint(e)) => {
            let s = e.spec.as_ref()?;
            if !s.netns.is_empty() {
                Some("spec.netns binds an endpoint to a host's namespace")
            } else if !s.node.is_empty() {
                Some("spec.node places an endpoint on a node")
            } else if !s.address.is_empty() {
                Some("spec.address makes nodes route and masquerade to that address")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A service an endpoint offers outside its own namespace (`name.other`), if any: offering another
/// namespace's service would draw that tenant's clients.
fn foreign_service(r: &pb::Resource, namespace: &str) -> Option<String> {
    let Some(pb::resource::Kind::Endpoint(e)) = &r.kind else {
        return None;
    };
    let s = e.spec.as_ref()?;
    s.network_services
        .iter()
        .chain(s.service_labels.keys())
        .find(|svc| svc.split_once('.').is_some_and(|(_, ns)| ns != namespace))
        .cloned()
}

fn endpoint_registrant(r: &pb::Resource) -> Option<&str> {
    match &r.kind {
        Some(pb::resource::Kind::Endpoint(e)) => e.spec.as_ref()?.path_ids.first().map(String::as_str),
        Some(pb::resource::Kind::NetworkService(s)) => s.spec.as_ref()?.path_ids.first().map(String::as_str),
        _ => None,
    }
}

impl Caller {
    /// The registry acting on its own (prefix leases, sweeps).
    pub(crate) fn internal() -> Caller {
        Caller::Admin("(the registry itself)".into())
    }

    /// Whether it may read resources of `kind` in `namespace` (empty: every namespace).
    pub fn may_read(&self, kind: Kind, namespace: &str) -> Result<(), RegistryError> {
        match self {
            Caller::Admin(_) | Caller::Node(_) => Ok(()),
            Caller::User(g) => {
                if !kind.namespaced() {
                    return Err(denied(
                        self,
                        format_args!(
                            "read {kind}s: they are cluster-scoped (rule: users read only in their namespaces)"
                        ),
                    ));
                }
                if namespace.is_empty() {
                    return Err(denied(
                        self,
                        format_args!(
                            "read {kind}s of every namespace: give one of {} (rule: users read only in their namespaces)",
                            g.namespaces.join(", ")
                        ),
                    ));
                }
                if g.namespaces.iter().any(|n| n == namespace) {
                    Ok(())
                } else {
                    Err(denied(
                        self,
                        format_args!("read in namespace {namespace:?} (rule: users read only in their namespaces)"),
                    ))
                }
            }
            Caller::Workload { namespace: own, .. } => {
                if matches!(kind, Kind::NetworkService | Kind::Endpoint) || (kind.namespaced() && namespace == own) {
                    Ok(())
                } else {
                    Err(denied(
                        self,
                        format_args!(
                            "read {kind}s here (rule: workloads read services, endpoints and their own namespace)"
                        ),
                    ))
                }
            }
            Caller::Anonymous => Err(denied(self, "read anything (rule: only Join without a certificate)")),
        }
    }

    /// Whether it may change the resource of `kind` in `namespace` from `current` to `next`
    /// (create: no current; delete: no next; `(None, None)`: whether it may change anything of
    /// `kind` there at all — asked before a resource is looked at, so that a refusal does not
    /// depend on, and so reveal, what exists).
    pub fn may_write(
        &self,
        kind: Kind,
        namespace: &str,
        current: Option<&pb::Resource>,
        next: Option<&pb::Resource>,
    ) -> Result<(), RegistryError> {
        match self {
            Caller::Admin(_) => Ok(()),
            Caller::User(g) => {
                if g.role == UserRole::View {
                    return Err(denied(
                        self,
                        format_args!("change {kind}s (rule: view grants reading only)"),
                    ));
                }
                if !matches!(kind, Kind::NetworkService | Kind::Endpoint | Kind::Client) {
                    return Err(denied(
                        self,
                        format_args!("change {kind}s (rule: users change services, endpoints and clients)"),
                    ));
                }
                if !g.namespaces.iter().any(|n| n == namespace) {
                    return Err(denied(
                        self,
                        format_args!(
                            "change anything in namespace {namespace:?} (rule: users change only their namespaces)"
                        ),
                    ));
                }
                self.tenant_content(kind, namespace, next)
            }
            Caller::Node(me) => {
                if !matches!(kind, Kind::Node | Kind::Client | Kind::Endpoint) {
                    return Err(denied(
                        self,
                        format_args!(
                            "change {kind}s (rule: a node changes only its Node and the clients and endpoints placed on it)"
                        ),
                    ));
                }
                if kind == Kind::Node && current.is_none() && next.is_some() {
                    // Only an admin makes a Node: a deleted node cannot bring itself back.
                    return Err(denied(
                        self,
                        "create a Node (rule: only admins create Nodes; a deleted node stays deleted)",
                    ));
                }
                if let Some(svc) = next.and_then(|r| foreign_service(r, namespace)) {
                    return Err(denied(
                        self,
                        format_args!(
                            "offer service {svc:?} from namespace {namespace:?} (rule: an endpoint offers its own namespace's services)"
                        ),
                    ));
                }
                for (which, r) in [("stored", current), ("requested", next)] {
                    let Some(r) = r else { continue };
                    let on = placed_on(r).unwrap_or_default();
                    if on != me {
                        let what = if kind == Kind::Node {
                            format!("change Node {on:?}")
                        } else if on.is_empty() {
                            format!("change a {kind} placed on no node ({which})")
                        } else {
                            format!("change a {kind} placed on node {on:?} ({which})")
                        };
                        return Err(denied(
                            self,
                            format_args!("{what} (rule: a node changes only its Node and what is placed on it)"),
                        ));
                    }
                }
                Ok(())
            }
            Caller::Workload { id, namespace: own } => {
                if !matches!(kind, Kind::NetworkService | Kind::Endpoint) || namespace != own {
                    return Err(denied(
                        self,
                        format_args!(
                            "change {kind}s in namespace {namespace:?} (rule: workloads register services and endpoints in their own namespace)"
                        ),
                    ));
                }
                self.tenant_content(kind, namespace, next)?;
                // Upstream's registry/client_allowed: only the original registrant refreshes or
                // unregisters a name.
                if let Some(first) = current.and_then(endpoint_registrant) {
                    if first != id {
                        return Err(denied(
                            self,
                            format_args!(
                                "change a {kind} that {first} registered (rule: only the original registrant)"
                            ),
                        ));
                    }
                } else if current.is_some() {
                    return Err(denied(
                        self,
                        format_args!("change a {kind} that an operator created (rule: only the original registrant)"),
                    ));
                }
                Ok(())
            }
            Caller::Anonymous => Err(denied(self, "change anything (rule: only Join without a certificate)")),
        }
    }

    /// What a user or workload writes stays in its tenancy: no host bindings, no other
    /// namespace's services.
    fn tenant_content(&self, kind: Kind, namespace: &str, next: Option<&pb::Resource>) -> Result<(), RegistryError> {
        let Some(r) = next else { return Ok(()) };
        if let Some(why) = binds_hosts(r) {
            return Err(denied(
                self,
                format_args!("write this {kind}: {why} (rule: only admins bind to hosts and namespaces)"),
            ));
        }
        if let Some(svc) = foreign_service(r, namespace) {
            return Err(denied(
                self,
                format_args!(
                    "offer service {svc:?} from namespace {namespace:?} (rule: an endpoint offers its own namespace's services)"
                ),
            ));
        }
        Ok(())
    }

    /// Whether it may write the status of `client`, or lease and release its addresses: the node
    /// the client is placed on, or an admin.
    pub fn may_act_for_client(&self, client: &pb::Resource) -> Result<(), RegistryError> {
        match self {
            Caller::Admin(_) => Ok(()),
            Caller::Node(me) if placed_on(client) == Some(me.as_str()) => Ok(()),
            Caller::Node(_) => Err(denied(
                self,
                format_args!(
                    "act for a client placed on node {:?} (rule: statuses and address leases belong to the client's node)",
                    placed_on(client).unwrap_or_default()
                ),
            )),
            _ => Err(denied(
                self,
                "write statuses or lease addresses (rule: only the client's node)",
            )),
        }
    }

    /// The node a prefix stream leases for: a node leases for itself whatever header it sends.
    pub fn prefix_node(&self, header: Option<&str>) -> Result<Option<String>, RegistryError> {
        match (self, header) {
            (Caller::Node(me), Some(h)) if h != me => Err(denied(
                self,
                format_args!("lease prefixes for node {h:?} (rule: a node leases only for itself)"),
            )),
            (Caller::Node(me), _) => Ok(Some(me.clone())),
            (Caller::Admin(_), h) => Ok(h.map(str::to_owned)),
            (_, Some(h)) => Err(denied(
                self,
                format_args!("lease prefixes for node {h:?} (rule: only that node)"),
            )),
            (_, None) => Ok(None),
        }
    }
}

/// How callers on the registry's unix socket are judged: by their uid (and primary group).
#[derive(Clone, Copy, Debug)]
pub struct UnixPolicy {
    /// The registry's own uid: that user and root are admins.
    pub own_uid: u32,
    /// Members of this group (the socket's group) are admins too.
    pub group: Option<u32>,
}

/// The registry's method-level rules, and where callers are classified.
pub struct RegistryGate {
    /// None: `--insecure`, every caller is an admin.
    trust_domain: Option<String>,
    unix: UnixPolicy,
    users: Arc<RwLock<HashMap<String, Grant>>>,
    /// Whether a Node exists: a deleted node's SVID, valid for the rest of its life, is refused.
    nodes: NodeExists,
}

/// Looks a Node up in the registry's view.
pub type NodeExists = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Which callers a method admits; everything else is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admits {
    Anyone,
    Authenticated,
    AdminsOnly,
    Operators,
    NodesAndAdmins,
    NodesAdminsWorkloads,
    NodesAndWorkloads,
    NotWorkloads,
}

fn method_rule(method: &str) -> Option<Admits> {
    let (service, m) = method.trim_start_matches('/').split_once('/')?;
    Some(match (service, m) {
        // Not Watch: an anonymous caller holds no stream open.
        ("grpc.health.v1.Health", "Check") => Admits::Anyone,
        ("grpc.health.v1.Health", _) => Admits::Authenticated,
        ("nsm.v1.IdentityService", "Join") => Admits::Anyone,
        ("nsm.v1.IdentityService", "WhoAmI") => Admits::Authenticated,
        // Users mint their own namespaces' workloads (the handler checks the grant).
        ("nsm.v1.IdentityService", "IssueWorkload") => Admits::Operators,
        // People's certificates end when they end: renewing is for daemons' short-lived SVIDs.
        ("nsm.v1.IdentityService", "Renew") => Admits::NodesAndWorkloads,
        ("nsm.v1.IdentityService", _) => Admits::AdminsOnly,
        ("nsm.v1.ResourceService", "UpdateStatus" | "AllocateAddresses" | "ReleaseAddresses") => Admits::NodesAndAdmins,
        ("nsm.v1.ResourceService", "ListAddressLeases") => Admits::Operators,
        ("nsm.v1.ResourceService", _) => Admits::NotWorkloads,
        ("ipam.IPAM", _) => Admits::NodesAdminsWorkloads,
        ("registry.NetworkServiceRegistry" | "registry.NetworkServiceEndpointRegistry", _) => Admits::Authenticated,
        _ => return None,
    })
}

impl RegistryGate {
    /// The gate of a registry whose callers authenticate in `trust_domain` (None: `--insecure`).
    pub fn new(
        trust_domain: Option<String>,
        unix: UnixPolicy,
        users: Arc<RwLock<HashMap<String, Grant>>>,
        nodes: NodeExists,
    ) -> Self {
        RegistryGate {
            trust_domain,
            unix,
            users,
            nodes,
        }
    }

    /// Who `peer` is.
    pub fn classify(&self, peer: Option<&Peer>) -> Result<Caller, Status> {
        let Some(td) = &self.trust_domain else {
            return Ok(Caller::Admin("(--insecure registry)".into()));
        };
        match peer {
            None => Err(Status::unauthenticated("the connection was not authenticated")),
            Some(Peer::Insecure { addr }) => Err(Status::unauthenticated(format!(
                "plaintext caller {addr:?} refused: this registry requires mutual TLS"
            ))),
            Some(Peer::Anonymous { .. }) => Ok(Caller::Anonymous),
            Some(Peer::Unix { uid, gid, .. }) => {
                if *uid == 0 || *uid == self.unix.own_uid || Some(*gid) == self.unix.group {
                    Ok(Caller::Admin(format!("uid {uid} on the unix socket")))
                } else {
                    Err(Status::permission_denied(format!(
                        "uid {uid} on the unix socket may not call the registry (rule: root, uid {}, or the socket's group)",
                        self.unix.own_uid
                    )))
                }
            }
            Some(Peer::Spiffe { id, .. }) => self.classify_id(td, id),
        }
    }

    fn classify_id(&self, td: &str, id: &SpiffeId) -> Result<Caller, Status> {
        if id.trust_domain() != td {
            return Err(Status::permission_denied(format!(
                "{id} is of trust domain {:?}, not this registry's {td:?}",
                id.trust_domain()
            )));
        }
        let path = id.path();
        match id.role() {
            Role::Admin(name) => Ok(Caller::Admin(name.to_owned())),
            Role::Node(name) if (self.nodes)(name) => Ok(Caller::Node(name.to_owned())),
            Role::Node(name) => Err(Status::permission_denied(format!(
                "{id}: node {name:?} does not exist (deleted?); its certificate is no longer honoured"
            ))),
            Role::User(name) => match self.users.read().get(name) {
                Some(g) => Ok(Caller::User(g.clone())),
                None => Err(Status::permission_denied(format!(
                    "{id}: user {name:?} does not exist (deleted?)"
                ))),
            },
            Role::Client { namespace, .. } => Ok(Caller::Workload {
                id: id.to_string(),
                namespace: namespace.to_owned(),
            }),
            Role::Registry | Role::Other => match path.strip_prefix("/ns/").and_then(|r| r.split('/').next()) {
                Some(ns) if !ns.is_empty() => Ok(Caller::Workload {
                    id: id.to_string(),
                    namespace: ns.to_owned(),
                }),
                _ => Err(Status::permission_denied(format!("{id}: no rule admits this identity"))),
            },
        }
    }
}

impl nsm_authz::Gate for RegistryGate {
    type Caller = Caller;

    fn admit(&self, peer: Option<&Peer>, method: &str) -> Result<Caller, Status> {
        let caller = self.classify(peer)?;
        let Some(rule) = method_rule(method) else {
            return Err(Status::permission_denied(format!(
                "{caller} may not call {method}: no rule admits it"
            )));
        };
        let ok = match (rule, &caller) {
            (Admits::NodesAndWorkloads, c) => matches!(c, Caller::Node(_) | Caller::Workload { .. }),
            (Admits::Anyone, _) | (_, Caller::Admin(_)) => true,
            (_, Caller::Anonymous) => false,
            (Admits::Authenticated, _) => true,
            (Admits::AdminsOnly, _) => false,
            (Admits::Operators, c) => matches!(c, Caller::User(_)),
            (Admits::NodesAndAdmins, c) => matches!(c, Caller::Node(_)),
            (Admits::NodesAdminsWorkloads, c) => matches!(c, Caller::Node(_) | Caller::Workload { .. }),
            (Admits::NotWorkloads, c) => !matches!(c, Caller::Workload { .. }),
        };
        if ok {
            Ok(caller)
        } else {
            let who = match rule {
                Admits::AdminsOnly => "admins",
                Admits::Operators => "admins and users",
                Admits::NodesAndAdmins => "nodes and admins",
                Admits::NodesAdminsWorkloads => "nodes, admins and workloads",
                Admits::NodesAndWorkloads => "nodes and workloads, whose SVIDs are short-lived",
                Admits::NotWorkloads => "admins, users and nodes",
                Admits::Authenticated | Admits::Anyone => "callers with a certificate",
            };
            Err(Status::permission_denied(format!(
                "{caller} may not call {method} (rule: only {who})"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_authz::Gate;

    fn client_on(node: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Client(pb::Client {
                metadata: Some(pb::ObjectMeta {
                    name: "c".into(),
                    namespace: "a".into(),
                    ..Default::default()
                }),
                spec: Some(pb::ClientSpec {
                    node: node.into(),
                    ..Default::default()
                }),
                status: None,
            })),
        }
    }

    fn node(name: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Node(pb::Node {
                metadata: Some(pb::ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                spec: None,
            })),
        }
    }

    fn endpoint(path_ids: &[&str]) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Endpoint(pb::Endpoint {
                metadata: None,
                spec: Some(pb::EndpointSpec {
                    path_ids: path_ids.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
            })),
        }
    }

    fn endpoint_with(services: &[&str], netns: &str, node: &str, address: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Endpoint(pb::Endpoint {
                metadata: None,
                spec: Some(pb::EndpointSpec {
                    network_services: services.iter().map(|s| s.to_string()).collect(),
                    netns: netns.into(),
                    node: node.into(),
                    address: address.into(),
                    ..Default::default()
                }),
            })),
        }
    }

    fn user(role: UserRole) -> Caller {
        Caller::User(Grant {
            name: "alice".into(),
            namespaces: vec!["a".into()],
            role,
        })
    }

    fn denied_msg(r: Result<(), RegistryError>) -> String {
        match r {
            Err(RegistryError::PermissionDenied(m)) => m,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn reads() {
        let admin = Caller::Admin("admin".into());
        let node1 = Caller::Node("n1".into());
        for c in [&admin, &node1] {
            for k in [
                Kind::NetworkService,
                Kind::Endpoint,
                Kind::Node,
                Kind::Client,
                Kind::Prefix,
            ] {
                c.may_read(k, "").unwrap();
                c.may_read(k, "b").unwrap();
            }
        }
        for role in [UserRole::View, UserRole::Edit, UserRole::Admin] {
            let u = user(role);
            u.may_read(Kind::Client, "a").unwrap();
            assert!(denied_msg(u.may_read(Kind::Client, "b")).contains("namespace \"b\""));
            assert!(denied_msg(u.may_read(Kind::Client, "")).contains("give one of a"));
            assert!(denied_msg(u.may_read(Kind::Node, "a")).contains("cluster-scoped"));
        }
        let w = Caller::Workload {
            id: "spiffe://d/ns/a/pod/p".into(),
            namespace: "a".into(),
        };
        w.may_read(Kind::Endpoint, "").unwrap();
        w.may_read(Kind::Client, "a").unwrap();
        assert!(w.may_read(Kind::Client, "b").is_err());
        assert!(w.may_read(Kind::Node, "").is_err());
        assert!(Caller::Anonymous.may_read(Kind::NetworkService, "a").is_err());
    }

    #[test]
    fn writes() {
        let c = Some(client_on("n1"));
        let admin = Caller::Admin("admin".into());
        admin.may_write(Kind::Client, "a", None, c.as_ref()).unwrap();
        // Users: edit and admin in their namespaces, services and endpoints that bind no host;
        // clients only deleted (they are made through a node's socket).
        for role in [UserRole::Edit, UserRole::Admin] {
            let u = user(role);
            assert!(denied_msg(u.may_write(Kind::Client, "a", None, c.as_ref())).contains("node's unix socket"));
            u.may_write(Kind::Client, "a", c.as_ref(), None).unwrap();
            u.may_write(Kind::NetworkService, "a", None, None).unwrap();
            u.may_write(Kind::Endpoint, "a", None, Some(&endpoint_with(&["s"], "", "", "")))
                .unwrap();
            for (ep, why) in [
                (endpoint_with(&["s"], "/proc/1/ns/net", "n1", ""), "spec.netns"),
                (endpoint_with(&["s"], "", "n1", ""), "spec.node"),
                (endpoint_with(&[], "", "", "169.254.169.254"), "spec.address"),
                (endpoint_with(&["payments.b"], "", "", ""), "\"payments.b\""),
            ] {
                assert!(
                    denied_msg(u.may_write(Kind::Endpoint, "a", None, Some(&ep))).contains(why),
                    "{why}"
                );
            }
            assert!(denied_msg(u.may_write(Kind::Client, "b", None, c.as_ref())).contains("namespace \"b\""));
            assert!(denied_msg(u.may_write(Kind::Node, "", None, Some(&node("n1")))).contains("change nodes"));
            assert!(u.may_write(Kind::Prefix, "a", None, None).is_err());
        }
        assert!(denied_msg(user(UserRole::View).may_write(Kind::Client, "a", None, c.as_ref())).contains("view"));
        // Nodes: own Node, what is placed on them, nothing else.
        let n1 = Caller::Node("n1".into());
        n1.may_write(Kind::Node, "", Some(&node("n1")), Some(&node("n1")))
            .unwrap();
        // A node never creates its Node: deleting a node revokes it for good.
        assert!(denied_msg(n1.may_write(Kind::Node, "", None, Some(&node("n1")))).contains("only admins create Nodes"));
        let mut on_n1 = endpoint_with(&["payments.b"], "/run/netns/x", "n1", "");
        assert!(denied_msg(n1.may_write(Kind::Endpoint, "a", None, Some(&on_n1))).contains("payments.b"));
        on_n1 = endpoint_with(&["s"], "/run/netns/x", "n1", "");
        n1.may_write(Kind::Endpoint, "a", None, Some(&on_n1)).unwrap();
        assert!(denied_msg(n1.may_write(Kind::Node, "", Some(&node("n2")), Some(&node("n2")))).contains("Node \"n2\""));
        n1.may_write(Kind::Client, "a", None, c.as_ref()).unwrap();
        n1.may_write(Kind::Client, "a", c.as_ref(), None).unwrap();
        let c2 = Some(client_on("n2"));
        assert!(denied_msg(n1.may_write(Kind::Client, "a", None, c2.as_ref())).contains("node \"n2\""));
        // Taking over another node's client by rewriting its spec.node is refused.
        assert!(n1.may_write(Kind::Client, "a", c2.as_ref(), c.as_ref()).is_err());
        assert!(n1.may_write(Kind::Client, "a", c2.as_ref(), None).is_err());
        assert!(n1.may_write(Kind::NetworkService, "a", None, None).is_err());
        assert!(n1.may_write(Kind::Prefix, "a", None, None).is_err());
        // Workloads: upstream registrations in their namespace; only the registrant refreshes.
        let w = Caller::Workload {
            id: "spiffe://d/ns/a/pod/p".into(),
            namespace: "a".into(),
        };
        let mine = endpoint(&["spiffe://d/ns/a/pod/p"]);
        let theirs = endpoint(&["spiffe://d/ns/a/pod/q"]);
        w.may_write(Kind::Endpoint, "a", None, Some(&mine)).unwrap();
        w.may_write(Kind::Endpoint, "a", Some(&mine), Some(&mine)).unwrap();
        assert!(denied_msg(w.may_write(Kind::Endpoint, "a", Some(&theirs), Some(&mine))).contains("pod/q"));
        assert!(w.may_write(Kind::Endpoint, "a", Some(&endpoint(&[])), None).is_err());
        assert!(w.may_write(Kind::Endpoint, "b", None, Some(&mine)).is_err());
        assert!(w.may_write(Kind::Client, "a", None, c.as_ref()).is_err());
        assert!(
            Caller::Anonymous
                .may_write(Kind::Client, "a", None, c.as_ref())
                .is_err()
        );
    }

    #[test]
    fn acting_for_clients_and_prefixes() {
        let c = client_on("n1");
        Caller::Node("n1".into()).may_act_for_client(&c).unwrap();
        Caller::Admin("a".into()).may_act_for_client(&c).unwrap();
        assert!(denied_msg(Caller::Node("n2".into()).may_act_for_client(&c)).contains("placed on node \"n1\""));
        assert!(user(UserRole::Admin).may_act_for_client(&c).is_err());
        // The prefix server's node is the caller's identity, not a header.
        assert_eq!(
            Caller::Node("n1".into()).prefix_node(None).unwrap().as_deref(),
            Some("n1")
        );
        assert_eq!(
            Caller::Node("n1".into()).prefix_node(Some("n1")).unwrap().as_deref(),
            Some("n1")
        );
        assert!(Caller::Node("n1".into()).prefix_node(Some("n2")).is_err());
        let w = Caller::Workload {
            id: "spiffe://d/ns/a/pod/p".into(),
            namespace: "a".into(),
        };
        assert_eq!(w.prefix_node(None).unwrap(), None);
        assert!(w.prefix_node(Some("n1")).is_err());
    }

    fn gate_with_alice() -> RegistryGate {
        let users = Arc::new(RwLock::new(HashMap::new()));
        users.write().insert(
            "alice".to_owned(),
            Grant {
                name: "alice".into(),
                namespaces: vec!["a".into()],
                role: UserRole::View,
            },
        );
        RegistryGate::new(
            Some("d".into()),
            UnixPolicy {
                own_uid: 500,
                group: Some(60),
            },
            users,
            Arc::new(|n| n == "n1"),
        )
    }

    fn spiffe(s: &str) -> Peer {
        Peer::Spiffe {
            id: SpiffeId::parse(s).unwrap(),
            addr: None,
            cert: Default::default(),
        }
    }

    /// Identities × methods at the gate; handlers judge the resources after it.
    #[test]
    fn gate_matrix() {
        let g = gate_with_alice();
        let create = "/nsm.v1.ResourceService/Create";
        let status = "/nsm.v1.ResourceService/UpdateStatus";
        let lease = "/nsm.v1.ResourceService/AllocateAddresses";
        let leases = "/nsm.v1.ResourceService/ListAddressLeases";
        let token = "/nsm.v1.IdentityService/CreateJoinToken";
        let user = "/nsm.v1.IdentityService/CreateUser";
        let join = "/nsm.v1.IdentityService/Join";
        let renew = "/nsm.v1.IdentityService/Renew";
        let register = "/registry.NetworkServiceEndpointRegistry/Register";
        let ipam = "/ipam.IPAM/ManagePrefixes";
        let health = "/grpc.health.v1.Health/Check";
        let watch_health = "/grpc.health.v1.Health/Watch";
        let unknown = "/nsm.v1.Other/Thing";
        let admin = spiffe("spiffe://d/admin/admin");
        let node = spiffe("spiffe://d/node/n1");
        let alice = spiffe("spiffe://d/user/alice");
        let bob = spiffe("spiffe://d/user/bob");
        let workload = spiffe("spiffe://d/ns/a/pod/p");
        let foreign = spiffe("spiffe://other/admin/admin");
        let anonymous = Peer::Anonymous { addr: None };
        let plain = Peer::Insecure { addr: None };
        let root = Peer::Unix {
            uid: 0,
            gid: 0,
            pid: None,
        };
        let member = Peer::Unix {
            uid: 1000,
            gid: 60,
            pid: None,
        };
        let stranger = Peer::Unix {
            uid: 1000,
            gid: 1000,
            pid: None,
        };
        #[rustfmt::skip]
        let table: &[(&Peer, &str, bool)] = &[
            (&admin, create, true), (&admin, status, true), (&admin, token, true), (&admin, user, true),
            (&admin, leases, true), (&admin, unknown, false),
            (&spiffe("spiffe://d/node/gone"), create, false),
            (&root, create, true), (&root, token, true), (&member, token, true), (&stranger, create, false),
            (&node, create, true), (&node, status, true), (&node, lease, true), (&node, ipam, true),
            (&node, renew, true), (&node, register, true), (&node, token, false), (&node, user, false),
            (&node, leases, false),
            (&alice, create, true), (&alice, leases, true), (&alice, status, false), (&alice, lease, false),
            (&alice, token, false), (&alice, ipam, false), (&alice, renew, false), (&admin, renew, false),
            (&workload, renew, true), (&anonymous, watch_health, false), (&node, watch_health, true),
            (&bob, create, false), (&bob, health, false),
            (&workload, register, true), (&workload, ipam, true), (&workload, create, false),
            (&workload, status, false), (&workload, token, false),
            (&anonymous, join, true), (&anonymous, health, true), (&anonymous, create, false),
            (&anonymous, renew, false), (&anonymous, register, false),
            (&foreign, create, false), (&foreign, join, false),
            (&plain, create, false), (&plain, join, false),
        ];
        for (peer, method, allowed) in table {
            let got = g.admit(Some(peer), method);
            assert_eq!(got.is_ok(), *allowed, "{peer:?} {method}: {got:?}");
            if let Err(s) = got {
                assert!(
                    matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated),
                    "{s:?}"
                );
                assert!(!s.message().is_empty());
            }
        }
        assert_eq!(g.admit(Some(&alice), create).unwrap(), user_view());
        assert!(g.admit(None, create).is_err());
        // A deleted user's certificate stops working at once.
        g.users.write().remove("alice");
        let e = g.admit(Some(&alice), create).unwrap_err();
        assert!(e.message().contains("does not exist"), "{}", e.message());
        // --insecure: everyone is an admin.
        let open = RegistryGate::new(None, g.unix, Arc::default(), Arc::new(|_| false));
        assert!(matches!(open.admit(Some(&plain), token).unwrap(), Caller::Admin(_)));
    }

    fn user_view() -> Caller {
        user(UserRole::View)
    }
}
