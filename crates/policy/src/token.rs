//! Path tokens: ES256 JWTs signed with a hop's X.509-SVID key, as upstream's `spiffejwt` makes them.
//!
//! Compact JWS is done here with ring (already in the tree for rustls) rather than with
//! `jsonwebtoken`'s RustCrypto backend: an ES256 verification costs ~240 µs there, a fraction of
//! that with ring, and a server verifies one per request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

use crate::PolicyError;

/// Upstream's default token lifetime (`NSM_MAX_TOKEN_LIFETIME`); callers also cap it at the
/// signer's certificate `notAfter`, since a token must not outlive the key that vouches for it.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// The claims of a path token. Decoding is lenient about the shapes Go's JWT library writes
/// (`aud` as a single string, numeric dates as floats, no `iat`) so upstream tokens read too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The signing hop's SPIFFE ID.
    pub sub: String,
    /// The next hop's SPIFFE ID (upstream writes exactly one).
    #[serde(deserialize_with = "string_or_seq")]
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    #[serde(deserialize_with = "numeric_date")]
    pub exp: u64,
    /// Issue time, Unix seconds (0 when the token has none).
    #[serde(default, deserialize_with = "numeric_date")]
    pub iat: u64,
}

/// Signs `{"sub","aud":[aud],"iat","exp"}` with ES256 and a PKCS#8 DER P-256 key.
pub fn sign(sub: &str, aud: &str, expires: SystemTime, key_pkcs8_der: &[u8]) -> Result<String, PolicyError> {
    let claims = Claims {
        sub: sub.to_owned(),
        aud: vec![aud.to_owned()],
        exp: unix_seconds(expires),
        iat: unix_seconds(SystemTime::now()),
    };
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key_pkcs8_der, &rng)
        .map_err(|e| PolicyError::Sign(format!("not a PKCS#8 P-256 key: {e}")))?;
    let payload = serde_json::to_vec(&claims).map_err(|e| PolicyError::Sign(e.to_string()))?;
    let signing_input = format!("{HEADER}.{}", B64.encode(payload));
    let signature = key
        .sign(&rng, signing_input.as_bytes())
        .map_err(|e| PolicyError::Sign(e.to_string()))?;
    Ok(format!("{signing_input}.{}", B64.encode(signature.as_ref())))
}

/// Verifies the ES256 signature against the public key of an X.509 certificate (DER) and returns
/// the claims. Expiry and audience are deliberately not judged: that is the policies' job, so a
/// refusal names the policy that made it.
pub fn verify(token: &str, signer_cert_der: &[u8]) -> Result<Claims, PolicyError> {
    let jwt = Jwt::parse(token)?;
    if jwt.alg != "ES256" {
        return Err(PolicyError::Signature(format!("algorithm is {}, not ES256", jwt.alg)));
    }
    let point = p256_point(signer_cert_der)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(jwt.signing_input.as_bytes(), &jwt.signature)
        .map_err(|_| PolicyError::Signature("not signed by this certificate's key".to_owned()))?;
    Ok(jwt.claims)
}

/// Decodes the claims without verifying the signature: for segments whose signer's certificate
/// the verifier does not hold (only the TLS peer's is at hand).
pub fn decode(token: &str) -> Result<Claims, PolicyError> {
    Jwt::parse(token).map(|jwt| jwt.claims)
}

/// `{"alg":"ES256","typ":"JWT"}`, base64url: the header every path token carries.
const HEADER: &str = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A compact JWS split and decoded, signature unchecked.
struct Jwt<'a> {
    alg: String,
    claims: Claims,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jwt<'a> {
    fn parse(token: &'a str) -> Result<Self, PolicyError> {
        let bad = |what: String| PolicyError::Malformed(what);
        if token.is_empty() {
            return Err(bad("no token".to_owned()));
        }
        let parts = token.split('.').count();
        let (Some((signing_input, signature)), 3) = (token.rsplit_once('.'), parts) else {
            return Err(bad(format!("not a JWT (expected 3 dot-separated parts, got {parts})")));
        };
        let (header, payload) = signing_input.split_once('.').unwrap_or_default();
        let part = |name: &str, text: &str| {
            B64.decode(text)
                .map_err(|e| bad(format!("{name} is not base64url: {e}")))
        };
        #[derive(Deserialize)]
        struct Header {
            alg: String,
        }
        let header: Header =
            serde_json::from_slice(&part("header", header)?).map_err(|e| bad(format!("header: {e}")))?;
        let claims: Claims =
            serde_json::from_slice(&part("payload", payload)?).map_err(|e| bad(format!("claims: {e}")))?;
        Ok(Self {
            alg: header.alg,
            claims,
            signing_input,
            signature: part("signature", signature)?,
        })
    }
}

/// The uncompressed P-256 point of a certificate's SubjectPublicKeyInfo.
fn p256_point(cert_der: &[u8]) -> Result<Vec<u8>, PolicyError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| PolicyError::Certificate(e.to_string()))?;
    let spki = cert.public_key();
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(PolicyError::Certificate(format!(
            "key is {} (curve {}), path tokens need P-256",
            spki.algorithm.algorithm,
            curve.map_or_else(|| "none".to_owned(), |c| c.to_string())
        )));
    }
    Ok(spki.subject_public_key.data.to_vec())
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn string_or_seq<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Aud::deserialize(d)? {
        Aud::One(s) => vec![s],
        Aud::Many(v) => v,
    })
}

fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 {
        // Fractions of a second (Go may write them) do not matter to a policy.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(v as u64)
    } else {
        Err(serde::de::Error::custom(format!("{v} is not a date")))
    }
}
