//! X.509-SVIDs (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>): one holder's
//! certificate chain and private key, checked on load so that a wrong file is reported by name
//! before any handshake uses it.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::{IdentityError, SpiffeId};

/// A holder's SVID: certificate chain (leaf first) and PKCS#8 private key.
#[derive(Clone)]
pub struct Svid {
    inner: Arc<Inner>,
}

struct Inner {
    id: SpiffeId,
    chain_pem: String,
    /// Wiped when the last holder drops it, as are all private keys nsm keeps.
    key_pem: zeroize::Zeroizing<String>,
    key_der: zeroize::Zeroizing<Vec<u8>>,
    chain: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Built once, so that each handshake only clones an `Arc`.
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.inner.id)
            .field("not_before", &self.inner.not_before)
            .field("not_after", &self.inner.not_after)
            .finish_non_exhaustive()
    }
}

fn bad(what: &str, reason: impl fmt::Display) -> IdentityError {
    IdentityError::BadMaterial {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// Parses one DER certificate.
pub(crate) fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, IdentityError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(bad(what, "trailing bytes after the certificate")),
        Err(e) => Err(bad(what, format!("not an X.509 certificate: {e}"))),
    }
}

/// Seconds since the epoch as a `SystemTime` (certificate times before 1970 clamp to it).
pub(crate) fn unix_time(ts: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0))
}

/// The certificates of a PEM text, in order.
pub(crate) fn parse_certs_pem(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(what, "no CERTIFICATE in the PEM text"));
    }
    Ok(certs)
}

/// The URI SANs of a certificate.
pub(crate) fn uri_sans<'a>(what: &str, cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(what, format!("bad subjectAltName: {e}")))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn leaf_id(what: &str, cert: &X509Certificate<'_>) -> Result<SpiffeId, IdentityError> {
    let uris = uri_sans(what, cert)?;
    let [uri] = uris.as_slice() else {
        return Err(bad(
            what,
            format!(
                "an SVID has exactly one URI SAN (its SPIFFE ID); this one has {}",
                uris.len()
            ),
        ));
    };
    let id = SpiffeId::parse(uri).map_err(|e| bad(what, e))?;
    if id.path().is_empty() {
        return Err(bad(what, format!("{id} is a trust domain, not a workload's SPIFFE ID")));
    }
    Ok(id)
}

/// The SPIFFE ID of a certificate (DER): its single URI SAN.
pub fn peer_id(cert_der: &[u8]) -> Result<SpiffeId, IdentityError> {
    leaf_id("peer certificate", &parse_cert("peer certificate", cert_der)?)
}

/// The SubjectPublicKeyInfo (DER) of a PKCS#8 key, to compare with a certificate's.
pub(crate) fn key_spki(what: &str, key_pem: &str) -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| bad(what, format!("not a usable PKCS#8 private key: {e}")))?;
    let spki = key.subject_public_key_info();
    Ok((key, spki))
}

impl Svid {
    /// Parses the chain (leaf first) and PKCS#8 key; checks the leaf has exactly one URI SAN that is
    /// a SPIFFE ID and that the key matches the leaf's public key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Svid, IdentityError> {
        let chain = parse_certs_pem("SVID certificate chain", chain_pem)?;
        let key_der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad("SVID key", format!("expected a PKCS#8 \"PRIVATE KEY\" PEM: {e}")))?;
        let leaf = parse_cert("SVID certificate", &chain[0])?;
        let id = leaf_id("SVID certificate", &leaf)?;
        let (_, spki) = key_spki("SVID key", key_pem)?;
        if spki != leaf.public_key().raw {
            return Err(bad(
                "SVID key",
                format!("it does not match the public key of the certificate of {id}"),
            ));
        }
        let validity = leaf.validity();
        let not_before = unix_time(validity.not_before.timestamp());
        let not_after = unix_time(validity.not_after.timestamp());
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain.clone(), PrivateKeyDer::Pkcs8(key_der.clone_key()), &provider)
            .map_err(|e| bad("SVID key", e))?;
        Ok(Svid {
            inner: Arc::new(Inner {
                id,
                chain_pem: chain_pem.to_owned(),
                key_pem: zeroize::Zeroizing::new(key_pem.to_owned()),
                key_der: zeroize::Zeroizing::new(key_der.secret_pkcs8_der().to_vec()),
                chain,
                not_before,
                not_after,
                certified: Arc::new(certified),
            }),
        })
    }

    /// Its SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.id
    }

    /// The chain, leaf first, PEM.
    pub fn chain_pem(&self) -> &str {
        &self.inner.chain_pem
    }

    /// The private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.inner.key_pem
    }

    /// The private key, PKCS#8 DER (for signing path tokens, ES256).
    pub fn key_pkcs8_der(&self) -> &[u8] {
        &self.inner.key_der
    }

    /// The leaf certificate, DER.
    pub fn leaf_der(&self) -> &[u8] {
        &self.inner.chain[0]
    }

    /// The chain, leaf first, DER.
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.inner.chain
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.inner.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.inner.not_after
    }

    /// When to renew: halfway through its lifetime (as SPIRE does), so that a registry that is down
    /// for less than half a lifetime costs no identity.
    /// The CA backdates `notBefore` by its clock-skew allowance, which is not lifetime to wait
    /// through: a 4 s SVID would otherwise be due for renewal the moment it is issued.
    pub fn renew_at(&self) -> SystemTime {
        let issued = (self.inner.not_before + crate::ca::CLOCK_SKEW).min(self.inner.not_after);
        let life = self.inner.not_after.duration_since(issued).unwrap_or_default();
        issued + life / 2
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.inner.certified.clone()
    }

    /// Writes `dir/svid.pem` (chain), `dir/svid.key` (0600) and `dir/bundle.pem`, each to a
    /// temporary file renamed into place so that a crash never leaves half a file.
    pub fn save(&self, dir: &Path, bundle_pem: &str) -> Result<(), IdentityError> {
        ensure_private_dir(dir)?;
        // The key first: a chain without its key would be the worse half-state to restart from.
        write_atomic(&dir.join("svid.key"), self.key_pem().as_bytes(), 0o600)?;
        write_atomic(&dir.join("svid.pem"), self.chain_pem().as_bytes(), 0o644)?;
        write_atomic(&dir.join("bundle.pem"), bundle_pem.as_bytes(), 0o644)
    }

    /// Reads what [`Svid::save`] wrote; `Ok(None)` when `dir/svid.pem` does not exist.
    pub fn load(dir: &Path) -> Result<Option<(Svid, String)>, IdentityError> {
        let chain_path = dir.join("svid.pem");
        let Some(chain) = read_optional(&chain_path)? else {
            return Ok(None);
        };
        let key = read_file(&dir.join("svid.key"))?;
        let bundle = read_file(&dir.join("bundle.pem"))?;
        let svid = Svid::from_pem(&chain, &key).map_err(|e| match e {
            IdentityError::BadMaterial { what, reason } => IdentityError::BadMaterial {
                what: format!("{what} in {}", dir.display()),
                reason,
            },
            e => e,
        })?;
        parse_certs_pem(&format!("trust bundle {}", dir.join("bundle.pem").display()), &bundle)?;
        Ok(Some((svid, bundle)))
    }
}

/// A fresh P-256 key and a CSR for it (the CSR carries no names; the CA decides them).
pub struct KeyAndCsr {
    /// The key, PKCS#8 PEM; it stays with its holder (wiped when dropped).
    pub key_pem: zeroize::Zeroizing<String>,
    /// The PKCS#10 request, DER; it goes to the CA.
    pub csr_der: Vec<u8>,
}

impl fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .finish_non_exhaustive()
    }
}

impl KeyAndCsr {
    /// Generates an ECDSA P-256 key and a self-signed request for it (proof of possession).
    pub fn generate() -> Result<KeyAndCsr, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Issue(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| IdentityError::Issue(format!("cannot make a CSR: {e}")))?;
        Ok(KeyAndCsr {
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
            csr_der: csr.der().to_vec(),
        })
    }
}

// --- files ---

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    // `mode` is filtered by the umask; the directory holds keys, so make sure.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))
}

/// Writes `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    // Unique per process and call, so that two saves racing in one process never share a file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    // Make the rename itself durable.
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(crate) fn read_file(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, IdentityError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}
