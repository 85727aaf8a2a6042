//! The file that lets `nsmctl` act as someone in a domain — a kubeconfig of sorts: where the
//! registry is, the trust bundle, a certificate and its key. YAML, written 0600 because it holds a
//! private key. The registry writes one for its admin (`<data-dir>/admin.config`);
//! `nsmctl user create` writes one per user.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Credentials, IdentityError, Svid};

/// A client configuration.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    /// Registry URLs (`tcp://HOST:PORT`), tried in order.
    pub registries: Vec<String>,
    /// The SPIFFE ID the certificate carries (informational: the certificate decides).
    pub spiffe_id: String,
    /// The CA certificates (PEM) that the registry's certificate must chain to.
    pub ca_bundle: String,
    /// The certificate chain (PEM).
    pub certificate: String,
    /// Its private key (PKCS#8 PEM).
    pub key: String,
}

impl Drop for ClientConfig {
    /// The key is wiped from memory with the configuration.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("registries", &self.registries)
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ClientConfig {
    /// A configuration for the holder of `svid`.
    pub fn new(registries: Vec<String>, svid: &Svid, bundle_pem: &str) -> ClientConfig {
        ClientConfig {
            registries,
            spiffe_id: svid.id().to_string(),
            ca_bundle: bundle_pem.to_owned(),
            certificate: svid.chain_pem().to_owned(),
            key: svid.key_pem().to_owned(),
        }
    }

    /// Reads and checks `path` (the certificate must parse and fit its key).
    pub fn load(path: &Path) -> Result<ClientConfig, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        let c: ClientConfig = serde_norway::from_str(&text).map_err(|e| IdentityError::BadMaterial {
            what: format!("config {}", path.display()),
            reason: e.to_string(),
        })?;
        c.svid().map_err(|e| IdentityError::BadMaterial {
            what: format!("config {}", path.display()),
            reason: e.to_string(),
        })?;
        Ok(c)
    }

    /// Writes it to `path`, mode 0600, through a temporary file so that a crash leaves the old one.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        use std::os::unix::fs::OpenOptionsExt;
        let yaml = format!(
            "# nsm client configuration for {} — it holds a private key: keep it secret.\n{}",
            self.spiffe_id,
            serde_norway::to_string(self).expect("serialisable")
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        f.write_all(yaml.as_bytes()).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    }

    /// The certificate and key.
    pub fn svid(&self) -> Result<Svid, IdentityError> {
        Svid::from_pem(&self.certificate, &self.key)
    }

    /// Credentials for mutual TLS.
    pub fn credentials(&self) -> Result<Credentials, IdentityError> {
        Credentials::new(self.svid()?, &self.ca_bundle)
    }
}
