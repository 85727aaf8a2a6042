//! Registry errors and their one mapping onto gRPC statuses.

use nsm_model::{Kind, ValidationError};
use nsm_store::StoreError;
use tonic::Status;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The request is malformed; nothing was written.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The resource does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Kind.
        kind: Kind,
        /// `namespace/name` or `name`.
        name: String,
    },
    /// A create found the resource already there.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Kind.
        kind: Kind,
        /// `namespace/name` or `name`.
        name: String,
    },
    /// The resource kept changing under us; the caller may retry.
    #[error("{kind} {name:?} is being modified concurrently; retry")]
    Conflict {
        /// Kind.
        kind: Kind,
        /// `namespace/name` or `name`.
        name: String,
    },
    /// A name in another registry domain; interdomain registration is not served here.
    #[error("{0}")]
    Interdomain(String),
    /// The request is well formed but the state does not allow it (e.g. changing a vL3's pool
    /// while prefixes are leased from it, an exhausted pool).
    #[error("{0}")]
    Precondition(String),
    /// No free point-to-point address pair is left in a vWire pool.
    #[error(
        "pool {pool} has no free address pair ({leased} of its addresses are leased, {in_statuses} more are in clients' statuses)"
    )]
    PoolExhausted {
        /// The pool.
        pool: ipnet::IpNet,
        /// Its addresses under a lease.
        leased: usize,
        /// Its addresses held by clients' statuses without a lease.
        in_statuses: usize,
    },
    /// A watcher fell too far behind the change stream.
    #[error("watch fell behind the registry's change stream; start a new one")]
    WatchLagged,
    /// The caller may not do this (see `authz.rs`); the message names the caller and the rule.
    #[error("{0}")]
    PermissionDenied(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let msg = e.to_string();
        match e {
            RegistryError::Invalid(_) => Status::invalid_argument(msg),
            RegistryError::NotFound { .. } => Status::not_found(msg),
            RegistryError::AlreadyExists { .. } => Status::already_exists(msg),
            RegistryError::Conflict { .. } | RegistryError::WatchLagged => Status::aborted(msg),
            RegistryError::Interdomain(_) => Status::unimplemented(msg),
            RegistryError::PermissionDenied(_) => Status::permission_denied(msg),
            RegistryError::Precondition(_) | RegistryError::PoolExhausted { .. } => Status::failed_precondition(msg),
            RegistryError::Store(StoreError::Unavailable(_)) => Status::unavailable(msg),
            RegistryError::Store(_) => Status::internal(msg),
        }
    }
}
