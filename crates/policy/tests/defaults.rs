//! Upstream's default server-side policies over a three-hop path nsc → nsmgr → nse, checked at
//! the nse (index 2, TLS peer nsmgr).

mod common;

use std::time::Duration;

use common::{Hop, Mesh, input_from, now};
use nsm_policy::{PolicySet, Refusal, sign};

fn refusal(mesh: &Mesh, segments: &[(String, String, String)]) -> Refusal {
    PolicySet::server_defaults().check(&mesh.input(segments)).unwrap_err()
}

#[test]
fn a_valid_path_passes() {
    let mesh = Mesh::new();
    let input = mesh.input(&mesh.segments());
    assert!(input.path_segments[1].signature_verified);
    assert!(!input.path_segments[0].signature_verified);
    PolicySet::server_defaults().check(&input).unwrap();
}

#[test]
fn an_expired_token_is_refused_by_tokens_expired() {
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    let stale = now() - Duration::from_secs(1);
    segments[0].2 = sign(&mesh.nsc.spiffe_id, &mesh.nsmgr.spiffe_id, stale, &mesh.nsc.key_der).unwrap();
    let r = refusal(&mesh, &segments);
    assert_eq!(r.policy, "tokens_expired");
    assert!(
        r.reason
            .starts_with("segment 0 (nsc): token of spiffe://test.nsm/node/nsc expired at"),
        "{r}"
    );
    // Expiring exactly now is expired too.
    segments[0].2 = sign(&mesh.nsc.spiffe_id, &mesh.nsmgr.spiffe_id, now(), &mesh.nsc.key_der).unwrap();
    assert_eq!(refusal(&mesh, &segments).policy, "tokens_expired");
}

#[test]
fn a_broken_chain_is_refused_by_tokens_chained() {
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    // The nsc addressed its token to the nse, skipping the nsmgr.
    segments[0].2 = mesh.nsc.token_to(&mesh.nse);
    let r = refusal(&mesh, &segments);
    assert_eq!(r.policy, "tokens_chained");
    assert_eq!(
        r.reason,
        "segment 0 (nsc): token is addressed to [\"spiffe://test.nsm/node/nse\"], not to segment 1 (nsmgr) signed by spiffe://test.nsm/node/nsmgr"
    );
    assert_eq!(r.to_string(), format!("policy tokens_chained refused: {}", r.reason));
}

#[test]
fn a_previous_token_not_signed_by_the_peer_is_refused_by_prev_token_signed() {
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    // Claims the nsmgr's identity but is signed with another key.
    let impostor = Hop::new("impostor");
    segments[1].2 = sign(
        &mesh.nsmgr.spiffe_id,
        &mesh.nse.spiffe_id,
        common::later(),
        &impostor.key_der,
    )
    .unwrap();
    let r = refusal(&mesh, &segments);
    assert_eq!(r.policy, "prev_token_signed");
    assert_eq!(
        r.reason,
        "segment 1 (nsmgr): token is not signed by the TLS peer spiffe://test.nsm/node/nsmgr"
    );
}

#[test]
fn a_peer_naming_someone_else_as_subject_is_refused_by_prev_token_signed() {
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    // Signed by the peer, but the subject is not the peer: the chain is fine, the caller lies.
    segments[0].2 = sign(
        &mesh.nsc.spiffe_id,
        "spiffe://test.nsm/node/other",
        common::later(),
        &mesh.nsc.key_der,
    )
    .unwrap();
    segments[1].2 = sign(
        "spiffe://test.nsm/node/other",
        &mesh.nse.spiffe_id,
        common::later(),
        &mesh.nsmgr.key_der,
    )
    .unwrap();
    let r = refusal(&mesh, &segments);
    assert_eq!(r.policy, "prev_token_signed");
    assert!(
        r.reason
            .contains("token's subject spiffe://test.nsm/node/other is not the TLS peer"),
        "{r}"
    );
}

#[test]
fn a_token_replayed_from_another_path_is_refused_by_tokens_chained() {
    let mesh = Mesh::new();
    let elsewhere = Hop::new("other-nsmgr");
    let mut segments = mesh.segments();
    // A genuine, unexpired nsc token taken from the nsc's path through another node.
    segments[0].2 = mesh.nsc.token_to(&elsewhere);
    let r = refusal(&mesh, &segments);
    assert_eq!(r.policy, "tokens_chained");
    assert!(r.reason.contains("other-nsmgr"), "{r}");
}

#[test]
fn a_peer_replaying_the_previous_hops_token_is_refused_by_prev_token_signed() {
    // Mallory copies the nsmgr's genuine token (addressed to the nse) into its own request: the
    // chain is intact, but the token is not Mallory's.
    let mesh = Mesh::new();
    let mallory = Hop::new("mallory");
    let input = input_from(2, &mesh.segments(), &mallory);
    let r = PolicySet::server_defaults().check(&input).unwrap_err();
    assert_eq!(r.policy, "prev_token_signed");
}

#[test]
fn a_garbage_token_is_refused_by_tokens_valid() {
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    segments[0].2 = "garbage".to_owned();
    let r = refusal(&mesh, &segments);
    assert_eq!(r.policy, "tokens_valid");
    assert_eq!(r.reason, "segment 0 (nsc): token is missing or not a JWT");
    segments[0].2 = String::new();
    assert_eq!(refusal(&mesh, &segments).policy, "tokens_valid");
}

#[test]
fn an_index_outside_the_path_is_refused_by_tokens_valid() {
    let mesh = Mesh::new();
    let input = input_from(3, &mesh.segments(), &mesh.nse);
    let r = PolicySet::server_defaults().check(&input).unwrap_err();
    assert_eq!(r.policy, "tokens_valid");
    assert_eq!(r.reason, "index 3 is outside the path's 3 segments");
}

#[test]
fn a_caller_without_a_segment_is_refused_by_prev_token_signed() {
    let mesh = Mesh::new();
    let segments = vec![mesh.nse.segment(mesh.nse.token_to(&mesh.nsmgr))];
    let input = input_from(0, &segments, &mesh.nsmgr);
    let r = PolicySet::server_defaults().check(&input).unwrap_err();
    assert_eq!(r.policy, "prev_token_signed");
    assert_eq!(r.reason, "index is 0: the caller put no segment of its own in the path");
    // An empty path as well.
    let r = PolicySet::server_defaults()
        .check(&input_from(0, &[], &mesh.nsmgr))
        .unwrap_err();
    assert_eq!(r.policy, "prev_token_signed");
}

#[test]
fn segments_after_index_are_not_judged() {
    // On a refresh the path still carries the hops beyond this one from the last request.
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    let stale = now() - Duration::from_secs(3600);
    segments.push((
        "forwarder".into(),
        "f".into(),
        sign("spiffe://x", "spiffe://y", stale, &mesh.nse.key_der).unwrap(),
    ));
    segments.push(("nse2".into(), "g".into(), "garbage".into()));
    PolicySet::server_defaults().check(&mesh.input(&segments)).unwrap();
}

#[test]
fn a_two_hop_path_passes() {
    let (nsc, nsmgr) = (Hop::new("nsc"), Hop::new("nsmgr"));
    let segments = vec![nsc.segment(nsc.token_to(&nsmgr)), nsmgr.segment(nsmgr.token_to(&nsc))];
    PolicySet::server_defaults()
        .check(&input_from(1, &segments, &nsc))
        .unwrap();
}

#[test]
fn the_set_is_shared_across_threads() {
    let mesh = Mesh::new();
    let input = mesh.input(&mesh.segments());
    let set = PolicySet::server_defaults();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..20 {
                    set.check(&input).unwrap();
                }
            });
        }
    });
}
