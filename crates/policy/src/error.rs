use std::path::PathBuf;

/// Why a token could not be made or read, or a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The signing key is not a PKCS#8 DER P-256 key, or signing failed.
    #[error("cannot sign a path token: {0}")]
    Sign(String),
    /// The token is not a JWT carrying `sub`, `aud` and `exp`.
    #[error("malformed path token: {0}")]
    Malformed(String),
    /// The certificate does not parse or does not hold a P-256 public key.
    #[error("signer certificate: {0}")]
    Certificate(String),
    /// The signature does not verify against the certificate's key.
    #[error("path token signature does not verify: {0}")]
    Signature(String),
    /// A policy directory or file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A policy does not parse (the message carries regorus' `file:line:col`).
    #[error("policy {file} does not parse: {message}")]
    Parse { file: String, message: String },
    /// A policy parses but is not `package nsm` with a rule `valid`.
    #[error("policy {file}:{line}: {message}")]
    Shape { file: String, line: usize, message: String },
}
