use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nsm_identity::{IdentityError, JoinToken};

const FP: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn round_trip() {
    let t = JoinToken::generate(
        vec!["tcp://10.0.0.1:5002".into(), "tcp://10.0.0.2:5002".into()],
        FP.into(),
        "n1".into(),
    );
    let s = t.encode();
    assert!(s.starts_with("nsmjoin1."));
    assert!(!s.contains('='), "{s}");
    assert_eq!(JoinToken::decode(&s).unwrap(), t);
    assert_eq!(JoinToken::decode(&format!("  {s}\n")).unwrap(), t);
    // 32 random bytes, base64url without padding.
    assert_eq!(URL_SAFE_NO_PAD.decode(&t.secret).unwrap().len(), 32);
    let t2 = JoinToken::generate(t.registries.clone(), FP.into(), "n1".into());
    assert_ne!(t.secret, t2.secret);
    // The hash, not the secret.
    let h = t.secret_hash();
    assert_eq!(h.len(), 64);
    assert!(!h.contains(&t.secret));
    assert_eq!(h, JoinToken::decode(&s).unwrap().secret_hash());
    assert_ne!(h, t2.secret_hash());
    let dbg = format!("{t:?}");
    assert!(!dbg.contains(&t.secret) && dbg.contains("n1"), "{dbg}");
}

fn token(json: &str) -> String {
    format!("nsmjoin1.{}", URL_SAFE_NO_PAD.encode(json))
}

#[test]
fn malformed_tokens_say_why() {
    let good = format!(r#"{{"r":["tcp://10.0.0.1:5002"],"f":"{FP}","n":"n1","s":"c2VjcmV0"}}"#);
    assert!(JoinToken::decode(&token(&good)).is_ok());
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "does not start with"),
        ("nsmjoin2.abc".into(), "does not start with"),
        (good.clone(), "does not start with"),
        ("nsmjoin1.***".into(), "base64"),
        (format!("nsmjoin1.{}=", URL_SAFE_NO_PAD.encode(&good)), "base64"),
        (token("not json"), "JSON"),
        (token(r#"{"r":[],"f":"x"}"#), "JSON"),
        (token(&good.replace(r#"["tcp://10.0.0.1:5002"]"#, "[]")), "no registry"),
        (token(&good.replace("tcp://10.0.0.1:5002", "")), "empty registry"),
        (token(&good.replace(FP, "")), "fingerprint"),
        (token(&good.replace(FP, "md5:abcd")), "fingerprint"),
        (
            token(&good.replace(FP, &FP.to_uppercase().replace("SHA256", "sha256"))),
            "fingerprint",
        ),
        (token(&good.replace(FP, &FP[..70])), "fingerprint"),
        (token(&good.replace(r#""n":"n1""#, r#""n":"""#)), "node name is empty"),
        (token(&good.replace(r#""n":"n1""#, r#""n":"a/b""#)), "node name"),
        (token(&good.replace("c2VjcmV0", "")), "secret is empty"),
    ];
    for (s, why) in cases {
        match JoinToken::decode(&s) {
            Ok(t) => panic!("{s:?} decoded to {t:?}"),
            Err(e) => {
                assert!(matches!(e, IdentityError::BadToken(_)));
                assert!(e.to_string().contains(why), "{s:?}: {e} (expected {why:?})");
            }
        }
    }
}
