//! Errors of identity handling; each says which file, field or certificate is at fault.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A SPIFFE ID that does not follow the SPIFFE specification or nsm's shapes.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidId {
        /// What was given.
        id: String,
        /// Why it is refused.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate, key or CSR that cannot be parsed or used.
    #[error("{what}: {reason}")]
    BadMaterial {
        /// Which item ("CA certificate /var/lib/nsm/registry/ca/ca.pem", "CSR", …).
        what: String,
        /// Why.
        reason: String,
    },
    /// A join token that cannot be decoded.
    #[error("join token: {0}")]
    BadToken(String),
    /// Signing failed.
    #[error("cannot issue a certificate: {0}")]
    Issue(String),
}
