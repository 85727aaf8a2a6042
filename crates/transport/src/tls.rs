//! TLS material for servers and clients (PEM files), checked when loaded so that a bad file stops
//! start-up with its name rather than failing the first connection.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::TransportError;

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TransportError> {
    let bytes =
        std::fs::read(path).map_err(|e| TransportError::Tls(format!("cannot read {what} {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(TransportError::Tls(format!("{what} {} is not PEM", path.display())));
    }
    Ok(bytes)
}

/// A server's certificate and key, and optionally the CA its clients' certificates must chain to
/// (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl ServerTls {
    /// From PEM bytes.
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, client_ca: Option<Vec<u8>>) -> Self {
        ServerTls { cert, key, client_ca }
    }

    /// From PEM files; the files are read and checked now.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TransportError> {
        let tls = ServerTls {
            cert: read("certificate", cert)?,
            key: read("key", key)?,
            client_ca: client_ca.map(|p| read("client CA", p)).transpose()?,
        };
        // Build a server config once so that a key that does not fit its certificate is reported here.
        tonic::transport::Server::builder()
            .tls_config(tls.config()?)
            .map_err(|e| TransportError::Tls(crate::error_chain(&e)))?;
        Ok(tls)
    }

    pub(crate) fn config(&self) -> Result<ServerTlsConfig, TransportError> {
        let mut c = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(c)
    }
}

/// What a client trusts (CA), who it is (certificate and key, for mutual TLS), and the name it
/// expects in the server's certificate (default: the IP address it dials).
#[derive(Clone)]
pub struct ClientTls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
}

impl ClientTls {
    /// From PEM bytes.
    pub fn from_pem(ca: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>, server_name: Option<String>) -> Self {
        ClientTls {
            ca,
            identity,
            server_name,
        }
    }

    /// From PEM files; the files are read and checked now.
    pub fn from_files(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> Result<Self, TransportError> {
        let identity = match identity {
            Some((cert, key)) => Some((read("certificate", cert)?, read("key", key)?)),
            None => None,
        };
        Ok(ClientTls {
            ca: read("CA", ca)?,
            identity,
            server_name,
        })
    }

    pub(crate) fn config(&self, default_name: &str) -> Result<ClientTlsConfig, TransportError> {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name(self.server_name.clone().unwrap_or_else(|| default_name.to_owned()));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        Ok(c)
    }
}
