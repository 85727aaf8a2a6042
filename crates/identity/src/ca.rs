//! The domain CA: it signs every SVID of a domain. The registry creates one in its data directory
//! on first start, or takes the operator's own (e.g. an intermediate of a corporate PKI).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::spiffe::check_trust_domain;
use crate::svid::{
    ensure_private_dir, io_err, key_spki, parse_cert, parse_certs_pem, read_file, unix_time, uri_sans, write_atomic,
};
use crate::{IdentityError, KeyAndCsr, SpiffeId, Svid};

/// How long a CA that nsm creates itself is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this much in the past, so that a holder whose clock is a little behind
/// still accepts them.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A domain CA: its certificate and signing key.
pub struct Ca {
    trust_domain: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.fingerprint())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An issued SVID certificate (the key stayed with the requester).
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, then the CA certificate, PEM.
    pub chain_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

fn bad(what: &str, reason: impl fmt::Display) -> IdentityError {
    IdentityError::BadMaterial {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// Whole seconds, as certificates carry them, so that what is reported equals what is signed.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A random positive serial number (RFC 5280: unique per CA, at most 20 bytes).
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Issue("no randomness for a serial number".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// `sha256:<hex>` of some DER.
pub(crate) fn fingerprint_of(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
    )
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Ca {
    /// Loads `dir/ca.pem` and `dir/ca.key`, or creates them (key 0600, directory 0700) when both are
    /// missing; the flag says whether they were created. One without the other is an error naming
    /// the missing file, because silently making a new CA would cut off every holder of the old one.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<(Ca, bool), IdentityError> {
        check_trust_domain(trust_domain)?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Ok((Ca::from_files(&cert_path, &key_path, trust_domain)?, false)),
            (true, false) => Err(io_err(
                &key_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("the CA key is missing while {} exists", cert_path.display()),
                ),
            )),
            (false, true) => Err(io_err(
                &cert_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("the CA certificate is missing while {} exists", key_path.display()),
                ),
            )),
            (false, false) => {
                let (cert_pem, key_pem) = Self::generate(trust_domain)?;
                ensure_private_dir(dir)?;
                write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
                write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
                tracing::info!(trust_domain, dir = %dir.display(), "created a domain CA");
                Ok((Ca::from_files(&cert_path, &key_path, trust_domain)?, true))
            }
        }
    }

    /// A self-signed P-256 CA for `trust_domain`: CA:true with path length 0 (it issues SVIDs only),
    /// keyCertSign + cRLSign, the trust domain's SPIFFE ID as URI SAN.
    fn generate(trust_domain: &str) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Issue(e.to_string()))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("nsm {trust_domain} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let uri = format!("spiffe://{trust_domain}");
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(|e| IdentityError::Issue(format!("{e}")))?,
        )];
        params.not_before = whole_seconds(now - CLOCK_SKEW).into();
        params.not_after = whole_seconds(now + CA_LIFETIME).into();
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Issue(format!("cannot sign the CA certificate: {e}")))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The operator's own CA (PEM files), e.g. a corporate intermediate. It must be a CA certificate
    /// whose key matches; when it carries a SPIFFE trust-domain URI SAN, that must be `trust_domain`.
    pub fn from_files(cert: &Path, key: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        check_trust_domain(trust_domain)?;
        let what = format!("CA certificate {}", cert.display());
        let cert_pem = read_file(cert)?;
        let key_pem = read_file(key)?;
        let certs = parse_certs_pem(&what, &cert_pem)?;
        let cert_der = certs[0].to_vec();
        let parsed = parse_cert(&what, &cert_der)?;
        let is_ca = parsed
            .basic_constraints()
            .map_err(|e| bad(&what, format!("bad basicConstraints: {e}")))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(bad(&what, "not a CA certificate (basicConstraints CA:true is missing)"));
        }
        for uri in uri_sans(&what, &parsed)? {
            if let Ok(id) = SpiffeId::parse(uri)
                && id.trust_domain() != trust_domain
            {
                return Err(bad(
                    &what,
                    format!(
                        "it is the CA of trust domain {:?}, not {trust_domain:?}",
                        id.trust_domain()
                    ),
                ));
            }
        }
        let not_after = unix_time(parsed.validity().not_after.timestamp());
        if not_after <= SystemTime::now() {
            return Err(bad(&what, "it has expired"));
        }
        let key_what = format!("CA key {}", key.display());
        let (key_pair, spki) = key_spki(&key_what, &key_pem)?;
        if spki != parsed.public_key().raw {
            return Err(bad(
                &key_what,
                format!("it does not match the public key of {}", cert.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&certs[0], key_pair).map_err(|e| bad(&what, e))?;
        // Only the CA certificate itself goes into bundles and chains.
        let own_pem = pem_of(&cert_der);
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            cert_pem: own_pem,
            cert_der,
            not_after,
            issuer,
        })
    }

    /// The trust domain it issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `sha256:<64 lowercase hex>` of the CA certificate's DER: what a join token pins.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.cert_der)
    }

    /// The trust bundle handed to holders: the CA certificate, PEM.
    pub fn bundle_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// When the CA itself expires; no SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issues an X.509-SVID for `id` from a PKCS#10 CSR (DER). The CSR's self-signature is checked
    /// (proof of possession) and every name in it ignored: the certificate carries exactly the URI
    /// SAN `id` plus the IP SANs `ips` (so that stock TLS clients can verify a server by address).
    pub fn issue(&self, csr_der: &[u8], id: &SpiffeId, ttl: Duration, ips: &[IpAddr]) -> Result<Issued, IdentityError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::Issue(format!(
                "{id} is not in trust domain {:?}",
                self.trust_domain
            )));
        }
        if id.path().is_empty() {
            return Err(IdentityError::Issue(format!("{id} is a trust domain, not a workload")));
        }
        if ttl.is_zero() {
            return Err(IdentityError::Issue("the lifetime is zero".into()));
        }
        let csr = match X509CertificationRequest::from_der(csr_der) {
            Ok(([], csr)) => csr,
            Ok(_) => return Err(bad("CSR", "trailing bytes after the request")),
            Err(e) => return Err(bad("CSR", format!("not a PKCS#10 request: {e}"))),
        };
        csr.verify_signature().map_err(|e| {
            bad(
                "CSR",
                format!("its signature does not verify (no proof of key possession): {e}"),
            )
        })?;
        let public_key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| bad("CSR", format!("unsupported public key: {e}")))?;

        let now = SystemTime::now();
        let not_after = whole_seconds((now + ttl).min(self.not_after));
        if not_after <= now {
            return Err(IdentityError::Issue("the CA has expired".into()));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nsm");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let uri = id
            .as_str()
            .to_owned()
            .try_into()
            .map_err(|e| IdentityError::Issue(format!("{id}: {e}")))?;
        params.subject_alt_names = std::iter::once(SanType::URI(uri))
            .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.not_before = whole_seconds(now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| IdentityError::Issue(format!("cannot sign for {id}: {e}")))?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            not_after,
        })
    }

    /// Generates a key here and issues for it (the registry's own SVID, admin configurations).
    pub fn issue_new(&self, id: &SpiffeId, ttl: Duration, ips: &[IpAddr]) -> Result<Svid, IdentityError> {
        let req = KeyAndCsr::generate()?;
        let issued = self.issue(&req.csr_der, id, ttl, ips)?;
        Svid::from_pem(&issued.chain_pem, &req.key_pem)
    }
}

/// PEM of one certificate.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
