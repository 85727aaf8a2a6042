//! Join tokens: everything a new node needs to get its first SVID, in one string an operator can
//! paste — where the registries are, which CA to trust (pinned by fingerprint, so the first
//! connection needs no prior trust), the node's name, and a one-time secret.
//!
//! Shape: `nsmjoin1.` + base64url (no padding) of `{"r":[urls],"f":"sha256:…","n":"node","s":"secret"}`.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::ca::hex;
use crate::tls::check_fingerprint;
use crate::{IdentityError, SpiffeId};

const PREFIX: &str = "nsmjoin1.";

/// A decoded join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Registry URLs to try, in order (`tcp://HOST:PORT`).
    pub registries: Vec<String>,
    /// `sha256:<hex>` of the domain CA certificate.
    pub ca_fingerprint: String,
    /// The node's name (its SPIFFE ID will be `/node/<name>`).
    pub node: String,
    /// The one-time secret (base64url); the registry keeps only its hash.
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("registries", &self.registries)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("node", &self.node)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    r: Vec<String>,
    f: String,
    n: String,
    s: String,
}

impl JoinToken {
    /// A token with a fresh secret of 32 random bytes.
    pub fn generate(registries: Vec<String>, ca_fingerprint: String, node: String) -> JoinToken {
        let mut bytes = [0u8; 32];
        // The system random source failing leaves no safe way to continue.
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random number generator failed");
        JoinToken {
            registries,
            ca_fingerprint,
            node,
            secret: URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    /// The string form: `nsmjoin1.<base64url JSON>`.
    pub fn encode(&self) -> String {
        let wire = Wire {
            r: self.registries.clone(),
            f: self.ca_fingerprint.clone(),
            n: self.node.clone(),
            s: self.secret.clone(),
        };
        let json = serde_json::to_vec(&wire).expect("a struct of strings serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses the string form, saying exactly what is wrong with a damaged token.
    pub fn decode(s: &str) -> Result<JoinToken, IdentityError> {
        let bad = |m: String| IdentityError::BadToken(m);
        let s = s.trim();
        let Some(body) = s.strip_prefix(PREFIX) else {
            return Err(bad(format!("it does not start with {PREFIX:?} (is it a join token?)")));
        };
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| bad(format!("bad base64url after {PREFIX:?} (truncated when pasted?): {e}")))?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|e| bad(format!("bad JSON inside: {e}")))?;
        if wire.r.is_empty() {
            return Err(bad("it names no registry".into()));
        }
        if wire.r.iter().any(|r| r.trim().is_empty()) {
            return Err(bad("it has an empty registry URL".into()));
        }
        check_fingerprint(&wire.f).map_err(|e| bad(format!("CA fingerprint {:?}: {e}", wire.f)))?;
        if wire.n.is_empty() {
            return Err(bad("the node name is empty".into()));
        }
        // The name becomes a SPIFFE ID path segment; refuse what could not.
        SpiffeId::node("join.invalid", &wire.n)
            .map_err(|_| bad(format!("node name {:?} is not a valid SPIFFE path segment", wire.n)))?;
        if wire.s.is_empty() {
            return Err(bad("the secret is empty".into()));
        }
        Ok(JoinToken {
            registries: wire.r,
            ca_fingerprint: wire.f,
            node: wire.n,
            secret: wire.s,
        })
    }

    /// Lowercase hex SHA-256 of the secret: what the registry stores, never the secret.
    pub fn secret_hash(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes()).as_ref())
    }
}
