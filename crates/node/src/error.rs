//! The node's one error type, and its one mapping to `tonic::Status`. Kernel errors keep the
//! dataplane error as their source; what a peer node or the registry answered keeps its status.

use nsm_mechanisms::MechanismError;
use nsm_vl3::Vl3Error;

/// What went wrong in the node daemon: at start-up, carrying out a decision, or serving a call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The registry could not be reached or refused the node.
    #[error("registry: {0}")]
    Registry(String),
    /// A call to the registry failed.
    #[error("registry: {}", .0.message())]
    RegistryCall(#[source] tonic::Status),
    /// Another node refused or did not answer a request.
    #[error("node at {url}: {}", status.message())]
    Peer {
        /// The other node's URL.
        url: String,
        /// What it answered.
        #[source]
        status: tonic::Status,
    },
    /// The host namespace could not be opened.
    #[error("host namespace: {0}")]
    HostNetns(String),
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as the wire names it (`mechanism.parameters.src_ip`).
        field: String,
        /// Why it is refused.
        reason: String,
    },
    /// The request is well formed but cannot be served in this state (a mechanism this node does
    /// not build, an endpoint that lives elsewhere).
    #[error("{0}")]
    Precondition(String),
    /// The caller may not do this (another node's connection, a method not for it); the message
    /// names the caller and the rule.
    #[error("{0}")]
    PermissionDenied(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The WireGuard set-up asked for cannot be had (a key file that cannot be read or written,
    /// `--wireguard-backend kernel` on a kernel without WireGuard, no free port).
    #[error("wireguard: {0}")]
    WireGuard(String),
    /// The data directory cannot hold the node's records.
    #[error("data directory: {0}")]
    DataDir(String),
    /// The endpoint side of a cross-node vWire could not be built (answered `Internal`, as
    /// before the mechanisms were modules).
    #[error("building the endpoint side: {0}")]
    EndpointSide(#[source] nsm_mechanisms::MechanismError),
    /// A mechanism could not build, keep or remove an end.
    #[error(transparent)]
    Mechanism(#[from] nsm_mechanisms::MechanismError),
    /// A vL3 router could not converge or lease.
    #[error(transparent)]
    Vl3(#[from] nsm_vl3::Vl3Error),
    /// A listener failed.
    #[error(transparent)]
    Transport(#[from] nsm_transport::TransportError),
}

impl NodeError {
    /// A malformed or missing request field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        NodeError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The one mapping from node errors to gRPC statuses.
impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            NodeError::Invalid { .. } => Status::invalid_argument(msg),
            NodeError::Precondition(_) | NodeError::WireGuard(_) => Status::failed_precondition(msg),
            NodeError::PermissionDenied(_) => Status::permission_denied(msg),
            NodeError::NotFound(_) => Status::not_found(msg),
            NodeError::RegistryCall(s) | NodeError::Peer { status: s, .. } => {
                // Keep the code the registry or peer gave; say where it came from.
                Status::new(s.code(), msg)
            }
            NodeError::Registry(_) | NodeError::Transport(_) => Status::unavailable(msg),
            NodeError::Mechanism(m) => match m {
                MechanismError::Invalid { .. } => Status::invalid_argument(msg),
                MechanismError::Precondition(_) | MechanismError::WireGuard(_) => Status::failed_precondition(msg),
                _ => Status::internal(msg),
            },
            NodeError::Vl3(v) => match v {
                Vl3Error::Invalid { .. } => Status::invalid_argument(msg),
                Vl3Error::PrefixServer(s) => Status::new(s.code(), msg),
                _ => Status::internal(msg),
            },
            NodeError::EndpointSide(_) | NodeError::HostNetns(_) | NodeError::DataDir(_) => Status::internal(msg),
        }
    }
}

/// Node results.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_name_the_field_and_keep_the_peers_code() {
        let s = tonic::Status::from(NodeError::invalid("mechanism.parameters.vni", "missing"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "mechanism.parameters.vni: missing");
        let s = tonic::Status::from(NodeError::Peer {
            url: "tcp://192.0.2.2:5001".into(),
            status: tonic::Status::failed_precondition("no"),
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "node at tcp://192.0.2.2:5001: no");
        let s = tonic::Status::from(NodeError::Precondition("WIREGUARD is disabled".into()));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let s = tonic::Status::from(NodeError::from(MechanismError::invalid(
            "mechanism.parameters.vni",
            "missing",
        )));
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::InvalidArgument, "mechanism.parameters.vni: missing")
        );
    }
}
