//! Certificates the CA would never issue (expired, self-signed), made directly with rcgen.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use nsm_identity::{SpiffeId, Svid};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

pub const TD: &str = "example.org";

fn leaf_params(id: &SpiffeId, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params
}

/// An SVID for `id` signed by the CA in `ca_dir` that expired an hour ago.
pub fn expired_svid(ca_dir: &Path, id: &SpiffeId) -> Svid {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let now = SystemTime::now();
    let params = leaf_params(id, now - Duration::from_secs(7200), now - Duration::from_secs(3600));
    let cert = params.signed_by(&key, &issuer).unwrap();
    Svid::from_pem(&format!("{}{}", cert.pem(), ca_pem), &key.serialize_pem()).unwrap()
}

/// A self-signed certificate that looks like an SVID for `id`.
pub fn self_signed_svid(id: &SpiffeId) -> Svid {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let now = SystemTime::now();
    let params = leaf_params(id, now - Duration::from_secs(60), now + Duration::from_secs(3600));
    let cert = params.self_signed(&key).unwrap();
    Svid::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
}
