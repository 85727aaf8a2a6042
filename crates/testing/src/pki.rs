//! A throwaway PKI for TLS tests: a CA, and certificates with SPIFFE-shaped URI SANs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// A certificate and its key, PEM.
pub struct Pem {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// A CA that issues certificates for `127.0.0.1` with a `spiffe://nsm.test/<name>` URI SAN.
pub struct TestPki {
    ca_cert: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// A new CA.
    pub fn new() -> anyhow::Result<TestPki> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "nsm test CA");
        let cert = params.self_signed(&key)?;
        Ok(TestPki {
            ca_cert: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert
    }

    /// A certificate for `spiffe://nsm.test/<name>`, valid for 127.0.0.1 and `localhost`.
    pub fn issue(&self, name: &str) -> anyhow::Result<Pem> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::URI(format!("spiffe://nsm.test/{name}").try_into()?));
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `<name>.pem` and `<name>.key` for each name into `dir`; returns the paths
    /// `(ca, [(cert, key)…])`.
    pub fn write(&self, dir: &Path, names: &[&str]) -> anyhow::Result<(PathBuf, Vec<(PathBuf, PathBuf)>)> {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &self.ca_cert)?;
        let mut out = Vec::new();
        for n in names {
            let pem = self.issue(n)?;
            let (c, k) = (dir.join(format!("{n}.pem")), dir.join(format!("{n}.key")));
            std::fs::write(&c, pem.cert)?;
            std::fs::write(&k, pem.key)?;
            out.push((c, k));
        }
        Ok((ca, out))
    }
}
