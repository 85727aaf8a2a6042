//! Path tokens on cross-node requests, as upstream signs and checks them (docs/SECURITY.md).
//!
//! The client's node sends `[client, itself]` with index 1: the client's segment says
//! `sub` = the client's workload ID (`spiffe://<domain>/ns/<namespace>/client/<name>`), `aud` = the
//! node — signed by the node on its client's behalf, since nsm's clients hold no keys of their own
//! — and the node's segment `sub` = the node, `aud` = the endpoint's node, signed with the node's
//! SVID key. The endpoint's node adds its own signed segment and runs the policies (upstream's
//! default server set, plus `--policy-dir`) over the path before it builds anything: the token of
//! the caller's segment must verify against the caller's TLS certificate, the chain of `aud`s and
//! `sub`s must be unbroken, no token may be expired.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use nsm_api::connection::{Connection, Path, PathSegment};
use nsm_identity::{Credentials, SpiffeId, Svid};
use nsm_model::upstream;
use nsm_policy::PolicySet;
use nsm_transport::Peer;

use crate::{NodeError, Result};

/// A token's expiry: upstream's default lifetime, and never past the signer's certificate.
fn expiry(svid: &Svid) -> SystemTime {
    (SystemTime::now() + nsm_policy::DEFAULT_TOKEN_LIFETIME).min(svid.not_after())
}

fn sign(svid: &Svid, sub: &str, aud: &str, expires: SystemTime) -> Result<String> {
    nsm_policy::sign(sub, aud, expires, svid.key_pkcs8_der())
        .map_err(|e| NodeError::Precondition(format!("signing a path token: {e}")))
}

fn segment(name: &str, id: &str, token: String, expires: SystemTime) -> PathSegment {
    PathSegment {
        name: name.to_owned(),
        id: id.to_owned(),
        token,
        expires: Some(prost_types::Timestamp::from(expires)),
        metrics: HashMap::new(),
    }
}

/// gRPC metadata with the certificate (DER) whose key signed the caller's path tokens. A pooled
/// connection was made with the certificate of its day; after a renewal the tokens are signed with
/// the new key, so the endpoint's node checks them against this certificate — once it has verified
/// it against the bundle and found it names the TLS peer.
pub(crate) const SIGNER_CERT: &str = "nsm-token-signer-bin";

/// The client's node: signs `[client, this node]` for a request to the node `peer` (a refresh
/// carries the last answer's path back; the endpoint node's segment is dropped and made anew).
/// Returns the certificate (DER) of the key that signed, for [`SIGNER_CERT`].
pub(crate) fn stamp_client_path(conn: &mut Connection, credentials: &Credentials, peer: &SpiffeId) -> Result<Vec<u8>> {
    // One SVID for both tokens and the certificate sent with them, whatever rotates meanwhile.
    let svid = credentials.svid();
    let me = svid.id().clone();
    let path = conn.path.get_or_insert_with(Path::default);
    let client = path
        .path_segments
        .first()
        .map(|s| s.name.clone())
        .ok_or_else(|| NodeError::invalid("connection.path", "the client's segment is missing"))?;
    let node_name = path.path_segments.get(1).map_or_else(String::new, |s| s.name.clone());
    let (namespace, name, _) = upstream::parse_name("connection.path.path_segments[0].name", &client)
        .map_err(|e| NodeError::invalid(e.field, e.reason))?;
    let workload = SpiffeId::client(me.trust_domain(), &namespace, &name)
        .map_err(|e| NodeError::invalid("connection.path.path_segments[0].name", e.to_string()))?;
    let expires = expiry(&svid);
    let client_token = sign(&svid, workload.as_str(), me.as_str(), expires)?;
    let node_token = sign(&svid, me.as_str(), peer.as_str(), expires)?;
    path.index = 1;
    path.path_segments = vec![
        segment(&client, &conn.id, client_token, expires),
        segment(&node_name, &conn.id, node_token, expires),
    ];
    Ok(svid.leaf_der().to_vec())
}

/// The endpoint's node: what it checks requests with.
#[derive(Clone)]
pub(crate) struct Checker {
    pub(crate) credentials: Credentials,
    pub(crate) policies: PolicySet,
}

impl Checker {
    /// Adds this node's signed segment (after the caller's, dropping any beyond it) and runs the
    /// policies over the path; a refusal names the policy. `endpoint` is the endpoint's name in
    /// `namespace/name` form, the next hop this node's token is addressed to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        &self,
        conn: &mut Connection,
        peer: Option<&Peer>,
        signer: Option<&[u8]>,
        node: &str,
        endpoint: &str,
        segment_expires: SystemTime,
    ) -> Result<()> {
        let Some(Peer::Spiffe { id, cert, .. }) = peer else {
            return Err(NodeError::PermissionDenied(
                "path tokens: the caller presented no certificate to check its token against".into(),
            ));
        };
        // The caller's token is checked against the certificate it says signed it (a renewal
        // later than its connection), provided that certificate is the domain's and the caller's.
        let cert: &[u8] = match signer {
            Some(der) => {
                let signer_id = self
                    .credentials
                    .verify_certificate(der, &[])
                    .map_err(|e| NodeError::PermissionDenied(format!("{id}: metadata {SIGNER_CERT}: {e}")))?;
                if &signer_id != id {
                    return Err(NodeError::PermissionDenied(format!(
                        "{id}: metadata {SIGNER_CERT} is {signer_id}'s certificate, not the caller's"
                    )));
                }
                der
            }
            None => cert,
        };
        let svid = self.credentials.svid();
        let me = svid.id().clone();
        let path = conn.path.get_or_insert_with(Path::default);
        if path.index < 1 {
            // Without a client's segment before the caller's, nothing says for whom it asks.
            return Err(NodeError::PermissionDenied(format!(
                "{id}: connection.path.index {}: the path must hold the client's segment and then the caller's",
                path.index
            )));
        }
        let index = path.index as usize;
        if index + 1 > path.path_segments.len() {
            return Err(NodeError::invalid(
                "connection.path.index",
                format!(
                    "{} is beyond the path's {} segments",
                    path.index,
                    path.path_segments.len()
                ),
            ));
        }
        path.path_segments.truncate(index + 1);
        let (ns, name, _) = upstream::parse_name("connection.network_service_endpoint_name", endpoint)
            .map_err(|e| NodeError::invalid(e.field, e.reason))?;
        let next = format!("spiffe://{}/ns/{ns}/endpoint/{name}", me.trust_domain());
        let expires = expiry(&svid);
        let token = sign(&svid, me.as_str(), &next, expires)?;
        path.path_segments.push(segment(node, &conn.id, token, segment_expires));
        path.index += 1;
        let raw: Vec<(String, String, String)> = path
            .path_segments
            .iter()
            .map(|s| (s.name.clone(), s.id.clone(), s.token.clone()))
            .collect();
        let labels: BTreeMap<String, String> = conn.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let input = nsm_policy::path_input(
            path.index,
            &raw,
            id.as_str(),
            cert,
            SystemTime::now(),
            &conn.network_service,
            &labels,
        );
        self.policies
            .check(&input)
            .map_err(|r| NodeError::PermissionDenied(format!("{id}: {r}")))
    }
}

/// The client a caller's path names in its first segment (whose token's `sub` is the client's
/// workload ID): `(namespace, name)`.
pub(crate) fn client_of(conn: &Connection) -> Result<(String, String)> {
    let refuse = |why: String| NodeError::PermissionDenied(format!("connection.path.path_segments[0]: {why}"));
    let token = conn
        .path
        .as_ref()
        .and_then(|p| p.path_segments.first())
        .map(|s| s.token.as_str())
        .unwrap_or_default();
    let claims = nsm_policy::decode(token).map_err(|e| refuse(e.to_string()))?;
    let id = SpiffeId::parse(&claims.sub).map_err(|e| refuse(e.to_string()))?;
    match id.role() {
        nsm_identity::Role::Client { namespace, name } => Ok((namespace.to_owned(), name.to_owned())),
        _ => Err(refuse(format!("{id} is not a client's identity"))),
    }
}
