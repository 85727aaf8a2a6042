//! TLS material for talking to an etcd cluster that requires it (`--etcd-ca`, `--etcd-cert`,
//! `--etcd-key` of the registry).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What the store needs to dial etcd over TLS: the CA that signed etcd's serving certificates and,
/// for clusters started with `--client-cert-auth`, the client certificate and key to present.
///
/// Only `ca_pem` is trusted: system roots are not, since an etcd cluster is served by a private CA.
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM certificate(s) of the CA that signed etcd's serving certificates.
    pub ca_pem: Vec<u8>,
    /// PEM client certificate (chain) and its PEM private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Key material never reaches logs: only whether an identity is present.
impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// Why the TLS files could not be loaded. Every variant names the file, so a misconfigured flag
/// is found from the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdTlsError {
    /// The file could not be read.
    #[error("reading etcd {what} {path}: {source}", path = .path.display())]
    Read {
        /// Which file this is (`CA certificate`, `client certificate`, `client key`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file was read but does not hold the PEM block expected (e.g. key and certificate
    /// swapped, or a DER file).
    #[error("etcd {what} {path} holds no PEM {expected}", path = .path.display())]
    NotPem {
        /// Which file this is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for (`certificate`, `private key`).
        expected: &'static str,
    },
    /// A client certificate was given without its key, or a key without its certificate.
    #[error("etcd client {given} {path} given without a client {missing}", path = .path.display())]
    Unpaired {
        /// What was given (`certificate` or `key`).
        given: &'static str,
        /// The file given.
        path: PathBuf,
        /// What is missing.
        missing: &'static str,
    },
}

impl EtcdTls {
    /// Loads the CA certificate and, if given, the client certificate and key from PEM files.
    ///
    /// The files are checked for the PEM blocks they should hold, so that swapped or wrong files
    /// fail here naming the file rather than later as an opaque handshake error.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<EtcdTls, EtcdTlsError> {
        let ca_pem = read_pem(ca, "CA certificate", "certificate", is_certificate)?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "client certificate", "certificate", is_certificate)?,
                read_pem(key, "client key", "private key", is_private_key)?,
            )),
            (Some(cert), None) => {
                return Err(EtcdTlsError::Unpaired {
                    given: "certificate",
                    path: cert.to_owned(),
                    missing: "key",
                });
            }
            (None, Some(key)) => {
                return Err(EtcdTlsError::Unpaired {
                    given: "key",
                    path: key.to_owned(),
                    missing: "certificate",
                });
            }
            (None, None) => None,
        };
        Ok(EtcdTls { ca_pem, identity })
    }

    /// The client configuration etcd-client (tonic, rustls with ring) dials with.
    pub(crate) fn to_options(&self) -> etcd_client::TlsOptions {
        let mut options =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options
    }
}

fn read_pem(
    path: &Path,
    what: &'static str,
    expected: &'static str,
    holds: fn(&str) -> bool,
) -> Result<Vec<u8>, EtcdTlsError> {
    let bytes = std::fs::read(path).map_err(|source| EtcdTlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    // PEM is ASCII; anything else (DER, garbage) cannot hold the block.
    if std::str::from_utf8(&bytes).is_ok_and(holds) {
        Ok(bytes)
    } else {
        Err(EtcdTlsError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        })
    }
}

fn is_certificate(pem: &str) -> bool {
    pem.contains("-----BEGIN CERTIFICATE-----")
}

/// PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`) keys; an
/// `ENCRYPTED PRIVATE KEY` is not usable without a passphrase and is rejected.
fn is_private_key(pem: &str) -> bool {
    pem.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("PRIVATE KEY-----"))
            .is_some_and(|kind| matches!(kind, "" | "RSA " | "EC "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_kinds() {
        assert!(is_private_key(
            "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"
        ));
        assert!(is_private_key("-----BEGIN EC PRIVATE KEY-----\n"));
        assert!(is_private_key("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert!(!is_private_key("-----BEGIN ENCRYPTED PRIVATE KEY-----\n"));
        assert!(!is_private_key("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn debug_hides_the_key() {
        let tls = EtcdTls {
            ca_pem: b"ca".to_vec(),
            identity: Some((b"cert".to_vec(), b"secret key".to_vec())),
        };
        let shown = format!("{tls:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
