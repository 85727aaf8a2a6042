//! Path tokens: signing, verification against a certificate, decoding.

mod common;

use std::time::Duration;

use common::{Hop, NOW, later};
use nsm_policy::{PolicyError, decode, sign, verify};

#[test]
fn sign_verify_round_trip() {
    let (a, b) = (Hop::new("a"), Hop::new("b"));
    let token = sign(&a.spiffe_id, &b.spiffe_id, later(), &a.key_der).unwrap();
    let claims = verify(&token, &a.cert_der).unwrap();
    assert_eq!(claims.sub, a.spiffe_id);
    assert_eq!(claims.aud, vec![b.spiffe_id.clone()]);
    assert_eq!(claims.exp, NOW + 600);
    assert!(claims.iat > 0);
    assert_eq!(decode(&token).unwrap(), claims);
}

#[test]
fn header_and_claims_are_upstreams_shape() {
    let a = Hop::new("a");
    let token = sign(&a.spiffe_id, "spiffe://test.nsm/node/b", later(), &a.key_der).unwrap();
    let part = |i: usize| token.split('.').nth(i).unwrap().to_owned();
    let json = |s: String| -> serde_json::Value {
        use base64::Engine as _;
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap()
    };
    assert_eq!(json(part(0))["alg"], "ES256");
    let claims = json(part(1));
    assert_eq!(claims["aud"], serde_json::json!(["spiffe://test.nsm/node/b"]));
    assert_eq!(claims["exp"], NOW + 600);
}

#[test]
fn verify_with_another_certificate_fails() {
    let (a, b) = (Hop::new("a"), Hop::new("b"));
    let token = a.token_to(&b);
    let err = verify(&token, &b.cert_der).unwrap_err();
    assert!(matches!(err, PolicyError::Signature(_)), "{err}");
}

#[test]
fn tampered_payload_fails() {
    let (a, b, mallory) = (Hop::new("a"), Hop::new("b"), Hop::new("mallory"));
    let token = a.token_to(&b);
    // Swap in the payload of a token addressed elsewhere, keeping a's signature.
    let other = a.token_to(&mallory);
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = other.split('.').nth(1).unwrap();
    let forged = parts.join(".");
    assert!(matches!(verify(&forged, &a.cert_der), Err(PolicyError::Signature(_))));
    // Decoding alone cannot tell: that is why only a verified token counts as the caller's.
    assert_eq!(decode(&forged).unwrap().aud, [mallory.spiffe_id]);
}

#[test]
fn garbage_fails_with_a_clear_error() {
    let err = decode("not a token").unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed path token: not a JWT (expected 3 dot-separated parts, got 1)"
    );
    assert_eq!(decode("").unwrap_err().to_string(), "malformed path token: no token");
    assert!(matches!(decode("a.b.c"), Err(PolicyError::Malformed(_))));
    let a = Hop::new("a");
    assert!(matches!(verify("a.b.c", &a.cert_der), Err(PolicyError::Malformed(_))));
}

#[test]
fn a_certificate_that_is_not_p256_is_refused() {
    let a = Hop::new("a");
    let token = a.token_to(&a);
    let err = verify(&token, b"not a certificate").unwrap_err();
    assert!(matches!(err, PolicyError::Certificate(_)), "{err}");

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let err = verify(&token, cert.der()).unwrap_err();
    assert!(err.to_string().contains("need P-256"), "{err}");
}

#[test]
fn go_shaped_tokens_decode() {
    // golang-jwt writes a single audience as a string and may omit iat.
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let token = format!(
        "{}.{}.sig",
        b64(serde_json::json!({"alg": "ES256", "typ": "JWT"})),
        b64(serde_json::json!({"sub": "spiffe://a", "aud": "spiffe://b", "exp": 1.9e9})),
    );
    let claims = decode(&token).unwrap();
    assert_eq!(claims.aud, ["spiffe://b"]);
    assert_eq!((claims.exp, claims.iat), (1_900_000_000, 0));
}

#[test]
fn a_key_that_is_not_pkcs8_p256_cannot_sign() {
    let err = sign("a", "b", later() + Duration::from_secs(1), b"junk").unwrap_err();
    assert!(matches!(err, PolicyError::Sign(_)), "{err}");
}
