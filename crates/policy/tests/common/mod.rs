//! Test identities: P-256 keys with self-signed certificates carrying SPIFFE IDs, and paths.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nsm_policy::{PathInput, path_input, sign};
use rcgen::{CertificateParams, KeyPair, SanType};

/// A fixed "now" so every check is deterministic.
pub const NOW: u64 = 1_900_000_000;

pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

/// In ten minutes, upstream's default token lifetime.
pub fn later() -> SystemTime {
    now() + Duration::from_secs(600)
}

pub struct Hop {
    pub name: String,
    pub spiffe_id: String,
    pub key_der: Vec<u8>,
    pub cert_der: Vec<u8>,
}

impl Hop {
    pub fn new(name: &str) -> Self {
        let spiffe_id = format!("spiffe://test.nsm/node/{name}");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        Self {
            name: name.to_owned(),
            spiffe_id,
            key_der: key.serialize_der(),
            cert_der: cert.der().to_vec(),
        }
    }

    /// This hop's token addressed to `next`.
    pub fn token_to(&self, next: &Hop) -> String {
        sign(&self.spiffe_id, &next.spiffe_id, later(), &self.key_der).unwrap()
    }

    /// A segment `(name, id, token)` of this hop.
    pub fn segment(&self, token: String) -> (String, String, String) {
        (self.name.clone(), format!("{}-conn", self.name), token)
    }
}

/// The three hops of a path `nsc → nsmgr → nse`.
pub struct Mesh {
    pub nsc: Hop,
    pub nsmgr: Hop,
    pub nse: Hop,
}

impl Mesh {
    pub fn new() -> Self {
        Self {
            nsc: Hop::new("nsc"),
            nsmgr: Hop::new("nsmgr"),
            nse: Hop::new("nse"),
        }
    }

    /// The path as the nse sees it while authorizing: each hop's token addressed to the next,
    /// and the nse's own token addressed back to its caller (upstream's server-side token).
    pub fn segments(&self) -> Vec<(String, String, String)> {
        vec![
            self.nsc.segment(self.nsc.token_to(&self.nsmgr)),
            self.nsmgr.segment(self.nsmgr.token_to(&self.nse)),
            self.nse.segment(self.nse.token_to(&self.nsmgr)),
        ]
    }

    /// The nse's input: index 2, the TLS peer is the nsmgr.
    pub fn input(&self, segments: &[(String, String, String)]) -> PathInput {
        input_from(2, segments, &self.nsmgr)
    }
}

pub fn input_from(index: u32, segments: &[(String, String, String)], peer: &Hop) -> PathInput {
    path_input(
        index,
        segments,
        &peer.spiffe_id,
        &peer.cert_der,
        now(),
        "s",
        &BTreeMap::new(),
    )
}
