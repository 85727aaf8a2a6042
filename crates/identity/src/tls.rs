//! Rotating credentials and the rustls configurations built from them.
//!
//! A configuration is built once per listener or dialer; its certificate resolver and verifiers read
//! the *current* SVID and trust bundle from [`Credentials`] at every handshake, so rotation and a new
//! bundle take effect for new connections without rebuilding anything, and established connections
//! continue. Peers are authenticated by SPIFFE ID, never by host name (as go-spiffe's tlsconfig does).

use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::ca::fingerprint_of;
use crate::svid::parse_certs_pem;
use crate::{IdentityError, Role, SpiffeId, Svid, peer_id};

/// Whom a client accepts as the server.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Exactly this SPIFFE ID (e.g. the registry).
    Id(SpiffeId),
    /// Any SPIFFE ID of the client's own trust domain (e.g. a peer node).
    AnyInTrustDomain,
}

/// An SVID and trust bundle that rotate in place. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct Credentials {
    shared: Arc<Shared>,
}

struct Shared {
    id: SpiffeId,
    provider: Arc<CryptoProvider>,
    state: RwLock<State>,
}

struct State {
    svid: Svid,
    bundle_pem: String,
    roots: Arc<RootCertStore>,
    /// Built when the bundle changes, not at every handshake.
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The reason a peer is refused, shown in the handshake error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

fn refuse(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(reason)))))
}

fn bad_peer_cert(e: IdentityError) -> rustls::Error {
    refuse(e.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots_from(bundle_pem: &str) -> Result<RootCertStore, IdentityError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs_pem("trust bundle", bundle_pem)? {
        roots.add(cert).map_err(|e| IdentityError::BadMaterial {
            what: "trust bundle".into(),
            reason: format!("a certificate is not usable as a trust anchor: {e}"),
        })?;
    }
    Ok(roots)
}

fn state_for(provider: &Arc<CryptoProvider>, svid: Svid, bundle_pem: &str) -> Result<State, IdentityError> {
    let roots = Arc::new(roots_from(bundle_pem)?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| IdentityError::BadMaterial {
            what: "trust bundle".into(),
            reason: e.to_string(),
        })?;
    Ok(State {
        svid,
        bundle_pem: bundle_pem.to_owned(),
        roots,
        client_verifier,
    })
}

impl Credentials {
    /// From an SVID and the trust bundle (PEM, one or more CA certificates).
    pub fn new(svid: Svid, bundle_pem: &str) -> Result<Credentials, IdentityError> {
        let provider = provider();
        let id = svid.id().clone();
        let state = state_for(&provider, svid, bundle_pem)?;
        Ok(Credentials {
            shared: Arc::new(Shared {
                id,
                provider,
                state: RwLock::new(state),
            }),
        })
    }

    /// Replaces the SVID: new handshakes (as server and as client) present it; established
    /// connections continue. An SVID of another SPIFFE ID is refused: identity never changes in place.
    pub fn rotate(&self, svid: Svid) -> Result<(), IdentityError> {
        if svid.id() != &self.shared.id {
            return Err(IdentityError::BadMaterial {
                what: "rotated SVID".into(),
                reason: format!("it is for {}, these credentials are {}", svid.id(), self.shared.id),
            });
        }
        self.shared.state.write().svid = svid;
        Ok(())
    }

    /// Replaces the trust bundle (e.g. when the CA is rotated); new handshakes check against it.
    pub fn set_bundle(&self, bundle_pem: &str) -> Result<(), IdentityError> {
        let svid = self.svid();
        let new = state_for(&self.shared.provider, svid, bundle_pem)?;
        let mut state = self.shared.state.write();
        state.bundle_pem = new.bundle_pem;
        state.roots = new.roots;
        state.client_verifier = new.client_verifier;
        Ok(())
    }

    /// The current SVID.
    pub fn svid(&self) -> Svid {
        self.shared.state.read().svid.clone()
    }

    /// The SPIFFE ID (fixed for the life of the credentials).
    pub fn id(&self) -> SpiffeId {
        self.shared.id.clone()
    }

    /// The current trust bundle, PEM.
    pub fn bundle_pem(&self) -> String {
        self.shared.state.read().bundle_pem.clone()
    }

    /// The trust domain of the SPIFFE ID.
    pub fn trust_domain(&self) -> String {
        self.shared.id.trust_domain().to_owned()
    }

    /// Verifies `leaf` (DER, with its `intermediates`) as a client certificate is verified at a
    /// handshake — chains to the current bundle, valid now, one SPIFFE ID of this trust domain —
    /// and returns its ID. For certificates that arrive other than in a handshake: a path token's
    /// signer's, which after a rotation is no longer the one the connection was made with.
    pub fn verify_certificate(&self, leaf: &[u8], intermediates: &[Vec<u8>]) -> Result<SpiffeId, IdentityError> {
        let bad = |reason: String| IdentityError::BadMaterial {
            what: "certificate".into(),
            reason,
        };
        let webpki = self.shared.state.read().client_verifier.clone();
        let end_entity = CertificateDer::from(leaf.to_vec());
        let intermediates: Vec<CertificateDer<'static>> =
            intermediates.iter().map(|c| CertificateDer::from(c.clone())).collect();
        webpki
            .verify_client_cert(&end_entity, &intermediates, UnixTime::now())
            .map_err(|e| bad(e.to_string()))?;
        let id = peer_id(leaf)?;
        let td = self.shared.id.trust_domain();
        if id.trust_domain() != td {
            return Err(bad(format!("{id} is not of trust domain {td}")));
        }
        Ok(id)
    }

    /// Server side: presents the current SVID. A client certificate is optional at the TLS layer (a
    /// node that has not joined yet calls Join without one), but one that is given must chain to the
    /// bundle, be unexpired and carry a SPIFFE ID of this trust domain, or the handshake fails.
    /// ALPN "h2"; TLS 1.2 and 1.3; no session resumption, so that every connection shows a current
    /// certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let verifier = Arc::new(SpiffeClientVerifier {
            shared: self.shared.clone(),
            algs: self.shared.provider.signature_verification_algorithms,
        });
        let mut config = ServerConfig::builder_with_provider(self.shared.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentSvid {
                shared: self.shared.clone(),
            }));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    /// Client side: presents the current SVID; checks the server's chain against the bundle and its
    /// SPIFFE ID against `expect` (host names are not checked). ALPN "h2".
    pub fn client_config(&self, expect: Expect) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier {
            shared: self.shared.clone(),
            expect,
            algs: self.shared.provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(self.shared.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentSvid {
                shared: self.shared.clone(),
            }));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = Resumption::disabled();
        Arc::new(config)
    }

    /// For a holder with no SVID yet (joining): presents no certificate, and trusts a server whose
    /// chain contains a CA certificate with this fingerprint (`sha256:<hex>`, from the join token),
    /// whose leaf verifies against that CA, and which is the registry.
    pub fn joining_client_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, IdentityError> {
        check_fingerprint(ca_fingerprint).map_err(|reason| IdentityError::BadMaterial {
            what: format!("CA fingerprint {ca_fingerprint:?}"),
            reason,
        })?;
        let provider = provider();
        let verifier = Arc::new(PinnedCaVerifier {
            fingerprint: ca_fingerprint.to_owned(),
            algs: provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = Resumption::disabled();
        Ok(config.into())
    }
}

/// `sha256:` followed by 64 lowercase hex digits.
pub(crate) fn check_fingerprint(f: &str) -> Result<(), String> {
    let Some(hex) = f.strip_prefix("sha256:") else {
        return Err("expected \"sha256:\" followed by 64 hex digits".into());
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err("expected \"sha256:\" followed by 64 lowercase hex digits".into());
    }
    Ok(())
}

/// Hands out the current SVID, as server and as client.
struct CurrentSvid {
    shared: Arc<Shared>,
}

impl fmt::Debug for CurrentSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentSvid").field("id", &self.shared.id).finish()
    }
}

impl CurrentSvid {
    fn current(&self) -> Arc<CertifiedKey> {
        self.shared.state.read().svid.certified_key()
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The handshake-signature methods every verifier here has alike: checked with the ring
/// provider's algorithms, which each verifier keeps as `algs`.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Server side: optional client certificates, checked against the current bundle and trust domain.
struct SpiffeClientVerifier {
    shared: Arc<Shared>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends the one SVID it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let webpki = self.shared.state.read().client_verifier.clone();
        webpki.verify_client_cert(end_entity, intermediates, now)?;
        let id = peer_id(end_entity).map_err(bad_peer_cert)?;
        let td = self.shared.id.trust_domain();
        if id.trust_domain() != td {
            return Err(refuse(format!("client is {id}, not of trust domain {td}")));
        }
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// Client side: the server's chain against the current bundle, its SPIFFE ID against `expect`.
struct SpiffeServerVerifier {
    shared: Arc<Shared>,
    expect: Expect,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("id", &self.shared.id)
            .field("expect", &self.expect)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.shared.state.read().roots.clone();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &roots, intermediates, now, self.algs.all)?;
        let id = peer_id(end_entity).map_err(bad_peer_cert)?;
        match &self.expect {
            Expect::Id(want) if &id != want => Err(refuse(format!("server is {id}, expected {want}"))),
            Expect::AnyInTrustDomain if id.trust_domain() != self.shared.id.trust_domain() => Err(refuse(format!(
                "server is {id}, expected an identity of trust domain {}",
                self.shared.id.trust_domain()
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    signature_checks!();
}

/// Joining: the registry's chain must contain the CA the join token pins, and its leaf must verify
/// against that CA and be the registry.
struct PinnedCaVerifier {
    fingerprint: String,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedCaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCaVerifier")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint_of(c) == self.fingerprint) else {
            return Err(refuse(format!(
                "the server's certificate chain has no CA certificate with fingerprint {}",
                self.fingerprint
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| fingerprint_of(c) != self.fingerprint)
            .cloned()
            .collect();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &others, now, self.algs.all)?;
        let id = peer_id(end_entity).map_err(bad_peer_cert)?;
        if id.role() != Role::Registry {
            return Err(refuse(format!("server is {id}, expected the registry")));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}
