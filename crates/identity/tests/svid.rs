mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::TD;
use nsm_identity::{Ca, KeyAndCsr, SpiffeId, Svid, peer_id};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn save_and_load_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, _) = Ca::load_or_create(&tmp.path().join("ca"), TD).unwrap();
    let id = SpiffeId::node(TD, "n1").unwrap();
    let svid = ca.issue_new(&id, Duration::from_secs(3600), &[]).unwrap();
    let dir = tmp.path().join("node/identity");
    assert!(Svid::load(&dir).unwrap().is_none());
    svid.save(&dir, &ca.bundle_pem()).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("svid.key")), 0o600);
    let (loaded, bundle) = Svid::load(&dir).unwrap().unwrap();
    assert_eq!(bundle, ca.bundle_pem());
    assert_eq!(loaded.id(), &id);
    assert_eq!(loaded.chain_pem(), svid.chain_pem());
    assert_eq!(loaded.key_pem(), svid.key_pem());
    assert_eq!(loaded.leaf_der(), svid.leaf_der());
    assert_eq!(loaded.not_after(), svid.not_after());
    assert_eq!(peer_id(loaded.leaf_der()).unwrap(), id);
    // Halfway through its life, counted from issue (the CA backdates notBefore by a minute).
    let issued = svid.not_before() + std::time::Duration::from_secs(60);
    let life = svid.not_after().duration_since(issued).unwrap();
    assert_eq!(svid.renew_at(), issued + life / 2);
    // A lifetime shorter than the backdating is not due at once.
    let short = ca.issue_new(&id, std::time::Duration::from_secs(4), &[]).unwrap();
    let due = short.renew_at().duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        due > std::time::Duration::from_secs(1) && due <= std::time::Duration::from_secs(2),
        "{due:?}"
    );
    // No temporary files are left behind.
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["bundle.pem", "svid.key", "svid.pem"]);
    // Saving again (rotation) replaces the files.
    let next = ca.issue_new(&id, Duration::from_secs(3600), &[]).unwrap();
    next.save(&dir, &ca.bundle_pem()).unwrap();
    assert_eq!(Svid::load(&dir).unwrap().unwrap().0.leaf_der(), next.leaf_der());
    // Debug does not show the key.
    let dbg = format!("{next:?}");
    assert!(!dbg.contains("PRIVATE") && dbg.contains("node/n1"), "{dbg}");
}

#[test]
fn key_mismatch_and_bad_material_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, _) = Ca::load_or_create(tmp.path(), TD).unwrap();
    let id = SpiffeId::node(TD, "n1").unwrap();
    let a = ca.issue_new(&id, Duration::from_secs(3600), &[]).unwrap();
    let other = KeyAndCsr::generate().unwrap();
    let e = Svid::from_pem(a.chain_pem(), &other.key_pem).unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    assert!(Svid::from_pem("garbage", a.key_pem()).is_err());
    assert!(Svid::from_pem(a.chain_pem(), "garbage").is_err());
    // A certificate without a SPIFFE ID (the CA's own has only the trust domain) is no SVID.
    let e = Svid::from_pem(&ca.bundle_pem(), a.key_pem()).unwrap_err().to_string();
    assert!(e.contains("trust domain") || e.contains("does not match"), "{e}");
    assert!(peer_id(b"junk").is_err());

    // A damaged key file is reported with the directory.
    let dir = tmp.path().join("svid");
    a.save(&dir, &ca.bundle_pem()).unwrap();
    std::fs::write(dir.join("svid.key"), other.key_pem).unwrap();
    let e = Svid::load(&dir).unwrap_err().to_string();
    assert!(e.contains("does not match") && e.contains("svid"), "{e}");
    std::fs::remove_file(dir.join("svid.key")).unwrap();
    let e = Svid::load(&dir).unwrap_err().to_string();
    assert!(e.contains("svid.key"), "{e}");
}

#[test]
fn expired_and_self_signed_helpers_parse() {
    let tmp = tempfile::tempdir().unwrap();
    Ca::load_or_create(tmp.path(), TD).unwrap();
    let id = SpiffeId::node(TD, "old").unwrap();
    let old = common::expired_svid(tmp.path(), &id);
    assert!(old.not_after() < std::time::SystemTime::now());
    assert_eq!(common::self_signed_svid(&id).id(), &id);
}
