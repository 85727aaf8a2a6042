//! What a mechanism reports when it cannot do what it was asked.

use nsm_dataplane::DataplaneError;

/// A mechanism's error: the kernel's (kept as the source), a bad parameter (named), or a state
/// in which it cannot build.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MechanismError {
    /// The kernel refused (or a namespace could not be opened).
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A namespace a vWire is built in could not be reached (`role`: client, endpoint).
    #[error("{role} netns: {source}")]
    Netns {
        /// Whose namespace.
        role: &'static str,
        /// Why.
        #[source]
        source: Box<MechanismError>,
    },
    /// A mechanism parameter is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as the wire names it (`mechanism.parameters.src_ip`).
        field: String,
        /// Why it is refused.
        reason: String,
    },
    /// It cannot be built in this state (a link of that name that nsm did not make, a mechanism
    /// this node has disabled).
    #[error("{0}")]
    Precondition(String),
    /// The WireGuard set-up asked for cannot be had (a key file that cannot be read or written,
    /// `--wireguard-backend kernel` on a kernel without WireGuard, no free port).
    #[error("wireguard: {0}")]
    WireGuard(String),
    /// The userspace tunnel refused to start.
    #[error("wireguard tunnel: {0}")]
    Tunnel(#[from] nsm_wireguard::WgError),
    /// A blocking task (a tunnel's start or stop) panicked or was cancelled.
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl MechanismError {
    /// A malformed or missing parameter.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        MechanismError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Mechanism results.
pub type Result<T, E = MechanismError> = std::result::Result<T, E>;
