//! What a vL3 router reports when it cannot converge or lease.

/// A router's error: the kernel's or a mechanism's (kept as the source), or the prefix server's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Vl3Error {
    /// The kernel refused (or a namespace could not be opened).
    #[error(transparent)]
    Dataplane(#[from] nsm_dataplane::DataplaneError),
    /// A link into or out of the router could not be built.
    #[error(transparent)]
    Mechanism(#[from] nsm_mechanisms::MechanismError),
    /// The registry's prefix server refused or did not answer.
    #[error("prefix server: {}", .0.message())]
    PrefixServer(#[source] tonic::Status),
    /// The prefix server answered something that is not a prefix of the vL3.
    #[error("prefix server: {0}")]
    PrefixAnswer(String),
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why it is refused.
        reason: String,
    },
}

/// vL3 results.
pub type Result<T, E = Vl3Error> = std::result::Result<T, E>;
