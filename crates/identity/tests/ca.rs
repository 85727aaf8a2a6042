mod common;

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::TD;
use nsm_identity::{Ca, IdentityError, KeyAndCsr, SpiffeId, Svid};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256};
use x509_parser::extensions::GeneralName;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn load_or_create_is_stable_and_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/ca");
    let (ca, created) = Ca::load_or_create(&dir, TD).unwrap();
    assert!(created);
    let (again, created) = Ca::load_or_create(&dir, TD).unwrap();
    assert!(!created);
    assert_eq!(ca.fingerprint(), again.fingerprint());
    assert_eq!(ca.bundle_pem(), again.bundle_pem());
    assert_eq!(ca.trust_domain(), TD);
    let fp = ca.fingerprint();
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    assert!(
        fp[7..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);

    // What the CA certificate says.
    let der = rustls_pemfile_cert(&ca.bundle_pem());
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.subject().to_string(), format!("CN=nsm {TD} CA"));
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    let sans: Vec<_> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(sans, vec![GeneralName::URI("spiffe://example.org")]);
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((10 * 365 * 86400..=10 * 366 * 86400).contains(&life), "{life}");

    // Another trust domain does not reuse it.
    assert!(Ca::load_or_create(&dir, "other.org").is_err());
}

fn rustls_pemfile_cert(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}

#[test]
fn one_file_missing_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    Ca::load_or_create(&dir, TD).unwrap();
    let key = dir.join("ca.key");
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let e = Ca::load_or_create(&dir, TD).unwrap_err().to_string();
    assert!(e.contains("ca.key"), "{e}");
    std::fs::write(&key, saved).unwrap();
    std::fs::remove_file(dir.join("ca.pem")).unwrap();
    let e = Ca::load_or_create(&dir, TD).unwrap_err().to_string();
    assert!(e.contains("ca.pem"), "{e}");
}

fn issued_cert(ca: &Ca, id: &SpiffeId, ttl: Duration, ips: &[IpAddr]) -> (Vec<u8>, SystemTime) {
    let req = KeyAndCsr::generate().unwrap();
    let issued = ca.issue(&req.csr_der, id, ttl, ips).unwrap();
    let svid = Svid::from_pem(&issued.chain_pem, &req.key_pem).unwrap();
    assert_eq!(svid.id(), id);
    assert_eq!(svid.not_after(), issued.not_after);
    assert!(issued.chain_pem.ends_with(&ca.bundle_pem()));
    (svid.leaf_der().to_vec(), issued.not_after)
}

#[test]
fn issue_sets_exactly_the_id_and_ips() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, _) = Ca::load_or_create(tmp.path(), TD).unwrap();
    let id = SpiffeId::node(TD, "n1").unwrap();
    let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    let before = SystemTime::now();
    let (der, not_after) = issued_cert(&ca, &id, Duration::from_secs(3600), &ips);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(
        sans,
        vec![
            GeneralName::URI("spiffe://example.org/node/n1"),
            GeneralName::IPAddress(&[10, 0, 0, 1]),
            GeneralName::IPAddress(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets()),
        ]
    );
    assert!(!cert.is_ca());
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let nb = cert.validity().not_before.timestamp();
    let now = before.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - 62..=now - 58).contains(&nb), "notBefore {nb}, now {now}");
    let na = not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now + 3598..=now + 3602).contains(&na));
    assert_eq!(cert.validity().not_after.timestamp(), na);
    // Random serials.
    let (der2, _) = issued_cert(&ca, &id, Duration::from_secs(3600), &[]);
    let (_, cert2) = x509_parser::parse_x509_certificate(&der2).unwrap();
    assert_ne!(cert.raw_serial(), cert2.raw_serial());
    assert_eq!(
        cert2
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len(),
        1
    );
}

#[test]
fn issue_ignores_names_in_the_csr() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, _) = Ca::load_or_create(tmp.path(), TD).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI("spiffe://example.org/registry".try_into().unwrap()));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap();
    let id = SpiffeId::node(TD, "n1").unwrap();
    let issued = ca.issue(csr.der(), &id, Duration::from_secs(60), &[]).unwrap();
    let svid = Svid::from_pem(&issued.chain_pem, &key.serialize_pem()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf_der()).unwrap();
    assert!(!cert.is_ca());
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(sans, vec![GeneralName::URI("spiffe://example.org/node/n1")]);
}

#[test]
fn issue_refuses_bad_signatures_and_foreign_domains() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, _) = Ca::load_or_create(tmp.path(), TD).unwrap();
    let id = SpiffeId::node(TD, "n1").unwrap();
    let req = KeyAndCsr::generate().unwrap();
    // The signature is the last element of the CSR: flip a bit in it.
    let mut tampered = req.csr_der.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x01;
    let e = ca.issue(&tampered, &id, Duration::from_secs(60), &[]).unwrap_err();
    assert!(matches!(e, IdentityError::BadMaterial { .. }), "{e}");
    assert!(e.to_string().contains("signature"), "{e}");
    assert!(ca.issue(b"not a csr", &id, Duration::from_secs(60), &[]).is_err());

    let foreign = SpiffeId::node("other.org", "n1").unwrap();
    let e = ca
        .issue(&req.csr_der, &foreign, Duration::from_secs(60), &[])
        .unwrap_err();
    assert!(e.to_string().contains("other.org"), "{e}");
    let domain = SpiffeId::parse("spiffe://example.org").unwrap();
    assert!(ca.issue(&req.csr_der, &domain, Duration::from_secs(60), &[]).is_err());
    // The genuine request still works.
    ca.issue(&req.csr_der, &id, Duration::from_secs(60), &[]).unwrap();
}

/// An operator's CA (files) valid for one more hour.
fn short_lived_ca(dir: &std::path::Path, is_ca: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = if is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
    params.not_after = (SystemTime::now() + Duration::from_secs(3600)).into();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("corp.pem"), dir.join("corp.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn operators_ca_and_capped_lifetime() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k) = short_lived_ca(tmp.path(), true);
    let ca = Ca::from_files(&c, &k, TD).unwrap();
    let id = SpiffeId::node(TD, "n1").unwrap();
    let (_, not_after) = issued_cert(&ca, &id, Duration::from_secs(30 * 86400), &[]);
    let cap = SystemTime::now() + Duration::from_secs(3600);
    assert!(
        not_after <= cap && not_after > cap - Duration::from_secs(120),
        "{not_after:?}"
    );
    let svid = ca.issue_new(&id, Duration::from_secs(600), &[]).unwrap();
    assert_eq!(svid.id(), &id);

    // Not a CA.
    let other = tempfile::tempdir().unwrap();
    let (c2, k2) = short_lived_ca(other.path(), false);
    let e = Ca::from_files(&c2, &k2, TD).unwrap_err().to_string();
    assert!(e.contains("not a CA"), "{e}");
    // A key that is not the certificate's.
    let e = Ca::from_files(&c, &k2, TD).unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    // Missing files are named.
    let e = Ca::from_files(&tmp.path().join("nope.pem"), &k, TD)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem"), "{e}");
}
