//! What a policy sees: the path with its tokens already decoded and, where the verifier can,
//! verified.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::{Claims, decode, verify};

/// A request's path as policy input (`input` in Rego).
#[derive(Debug, Clone, Serialize)]
pub struct PathInput {
    /// The checking hop's own segment.
    pub index: u32,
    pub path_segments: Vec<SegmentInput>,
    /// The TLS peer's SPIFFE ID (the caller).
    pub peer_spiffe_id: String,
    /// Unix seconds: given, not read by policies, so checks are deterministic and testable.
    pub now: u64,
    /// The network service asked for.
    pub service: String,
    /// The client's labels.
    pub labels: BTreeMap<String, String>,
}

/// One path segment as policy input.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentInput {
    pub name: String,
    pub id: String,
    /// The decoded claims; `None` when the token is missing or does not decode.
    pub claims: Option<Claims>,
    /// Whether the token verified against the certificate the checker could check it with: only
    /// segment `index-1`'s, against the TLS peer's certificate; false for every other segment.
    pub signature_verified: bool,
}

/// Builds [`PathInput`] from the raw segments `(name, id, token)`: decodes every token and
/// verifies the one at `index-1` against the TLS peer's leaf certificate (DER).
pub fn path_input(
    index: u32,
    segments: &[(String, String, String)],
    peer_spiffe_id: &str,
    peer_cert_der: &[u8],
    now: SystemTime,
    service: &str,
    labels: &BTreeMap<String, String>,
) -> PathInput {
    let prev = usize::try_from(index).ok().and_then(|i| i.checked_sub(1));
    let path_segments = segments
        .iter()
        .enumerate()
        .map(|(i, (name, id, token))| {
            let (claims, signature_verified) = if Some(i) == prev {
                match verify(token, peer_cert_der) {
                    Ok(claims) => (Some(claims), true),
                    Err(e) => {
                        tracing::debug!(segment = i, %name, error = %e, "previous hop's token does not verify against the TLS peer");
                        (decode(token).ok(), false)
                    }
                }
            } else {
                (decode(token).ok(), false)
            };
            SegmentInput {
                name: name.clone(),
                id: id.clone(),
                claims,
                signature_verified,
            }
        })
        .collect();
    PathInput {
        index,
        path_segments,
        peer_spiffe_id: peer_spiffe_id.to_owned(),
        now: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        service: service.to_owned(),
        labels: labels.clone(),
    }
}
