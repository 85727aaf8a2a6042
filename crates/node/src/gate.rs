//! Who may call the node daemon (docs/SECURITY.md). Over its unix socket: local users the socket
//! admits (root, the daemon's own uid, the socket's group) — workloads and `nsmctl` on this host —
//! for everything. Over TCP: only other nodes of the domain (mutual TLS, `spiffe://<domain>/node/…`),
//! and only for `networkservice.NetworkService`: the calls that build the endpoint side of their own
//! clients' vWires.

use nsm_identity::Role;
use nsm_transport::Peer;
use tonic::Status;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A local process through the unix socket (or any caller of an `--insecure` daemon's TCP
    /// listener for NetworkService).
    Local,
    /// Another node, by name.
    Node(String),
}

impl Caller {
    /// The calling node's name, if a node calls.
    pub(crate) fn node(&self) -> Option<&str> {
        match self {
            Caller::Node(n) => Some(n),
            Caller::Local => None,
        }
    }
}

/// The node's method-level rules.
pub(crate) struct NodeGate {
    /// None: `--insecure`.
    pub(crate) trust_domain: Option<String>,
    pub(crate) own_uid: u32,
    pub(crate) group: Option<u32>,
}

const NETWORK_SERVICE: &str = "/networkservice.NetworkService/";
const HEALTH: &str = "/grpc.health.v1.Health/";

impl nsm_authz::Gate for NodeGate {
    type Caller = Caller;

    fn admit(&self, peer: Option<&Peer>, method: &str) -> Result<Caller, Status> {
        let remote_method = method.starts_with(NETWORK_SERVICE) || method.starts_with(HEALTH);
        match peer {
            Some(Peer::Unix { uid, gid, .. }) => {
                if *uid == 0 || *uid == self.own_uid || Some(*gid) == self.group {
                    Ok(Caller::Local)
                } else {
                    Err(Status::permission_denied(format!(
                        "uid {uid} on the node's unix socket may not call {method} (rule: root, uid {}, or the socket's group)",
                        self.own_uid
                    )))
                }
            }
            Some(Peer::Insecure { .. }) if self.trust_domain.is_none() && remote_method => Ok(Caller::Local),
            Some(Peer::Spiffe { id, .. }) if remote_method => {
                let td = self.trust_domain.as_deref().unwrap_or_default();
                match id.role() {
                    Role::Node(n) if id.trust_domain() == td => Ok(Caller::Node(n.to_owned())),
                    _ => Err(Status::permission_denied(format!(
                        "{id} may not call {method} (rule: over TCP only the domain's nodes, spiffe://{td}/node/…)"
                    ))),
                }
            }
            Some(Peer::Spiffe { .. } | Peer::Insecure { .. } | Peer::Anonymous { .. }) if !remote_method => {
                Err(Status::permission_denied(format!(
                    "{method} is served on the node's unix socket only (rule: over TCP only NetworkService, for other nodes)"
                )))
            }
            Some(Peer::Anonymous { addr }) => Err(Status::unauthenticated(format!(
                "caller {addr:?} presented no certificate (rule: over TCP only the domain's nodes)"
            ))),
            Some(Peer::Insecure { addr }) => Err(Status::unauthenticated(format!(
                "plaintext caller {addr:?} refused: this node requires mutual TLS"
            ))),
            None => Err(Status::unauthenticated("the connection was not authenticated")),
            Some(_) => Err(Status::permission_denied(format!(
                "no rule admits this caller to {method}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_authz::Gate;
    use nsm_identity::SpiffeId;

    fn gate() -> NodeGate {
        NodeGate {
            trust_domain: Some("d".into()),
            own_uid: 0,
            group: Some(50),
        }
    }

    fn spiffe(s: &str) -> Peer {
        Peer::Spiffe {
            id: SpiffeId::parse(s).unwrap(),
            addr: None,
            cert: Default::default(),
        }
    }

    #[test]
    fn matrix() {
        let g = gate();
        let req = "/networkservice.NetworkService/Request";
        let create = "/nsm.v1.NodeService/CreateClient";
        let monitor = "/connection.MonitorConnection/MonitorConnections";
        let unix = |uid, gid| Peer::Unix { uid, gid, pid: None };
        // Local users the socket admits: everything.
        for m in [req, create, monitor] {
            assert_eq!(g.admit(Some(&unix(0, 0)), m).unwrap(), Caller::Local);
            assert_eq!(g.admit(Some(&unix(1000, 50)), m).unwrap(), Caller::Local);
            let e = g.admit(Some(&unix(1000, 1000)), m).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("uid 1000"), "{}", e.message());
        }
        // Nodes over TCP: NetworkService only.
        assert_eq!(
            g.admit(Some(&spiffe("spiffe://d/node/n2")), req).unwrap(),
            Caller::Node("n2".into())
        );
        for m in [create, monitor] {
            let e = g.admit(Some(&spiffe("spiffe://d/node/n2")), m).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}");
            assert!(e.message().contains("unix socket only"), "{}", e.message());
        }
        // Not nodes, other domains, no certificate, plaintext.
        for p in [
            "spiffe://d/admin/admin",
            "spiffe://d/user/u",
            "spiffe://other/node/n2",
            "spiffe://d/registry",
        ] {
            let e = g.admit(Some(&spiffe(p)), req).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{p}");
        }
        let e = g.admit(Some(&Peer::Anonymous { addr: None }), req).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = g.admit(Some(&Peer::Insecure { addr: None }), req).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(g.admit(None, req).is_err());
        // An --insecure node: plaintext TCP for NetworkService, still not NodeService.
        let open = NodeGate {
            trust_domain: None,
            ..gate()
        };
        assert_eq!(
            open.admit(Some(&Peer::Insecure { addr: None }), req).unwrap(),
            Caller::Local
        );
        assert!(open.admit(Some(&Peer::Insecure { addr: None }), create).is_err());
    }
}
