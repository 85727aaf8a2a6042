//! SPIFFE IDs (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>) and the shapes
//! nsm gives them. Parsing is strict, because an ID is compared byte for byte in authorization: two
//! spellings of one identity would be two identities.

use std::fmt;

use crate::IdentityError;

const SCHEME: &str = "spiffe://";
/// The SPIFFE specification's limit for the whole URI.
const MAX_LEN: usize = 2048;

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
///
/// The path is empty only for a trust domain's own ID (`spiffe://example.org`, which the domain CA
/// carries); every SVID names a workload and so has a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Where the path starts in `uri` (= its length when the path is empty).
    path_at: usize,
}

/// What a SPIFFE ID stands for in nsm; authorization decides by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    /// `/registry`: the domain's registry.
    Registry,
    /// `/node/<name>`: a node daemon.
    Node(&'a str),
    /// `/admin/<name>`: an operator with every right.
    Admin(&'a str),
    /// `/user/<name>`: a person whose rights the policies say.
    User(&'a str),
    /// `/ns/<namespace>/client/<name>`: a workload acting as one client.
    Client {
        /// Its namespace.
        namespace: &'a str,
        /// Its name.
        name: &'a str,
    },
    /// Any other path (or none): no rights unless a policy names it.
    Other,
}

fn invalid(id: &str, reason: impl Into<String>) -> IdentityError {
    IdentityError::InvalidId {
        id: id.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a trust domain name: lowercase letters, digits, `.`, `-`, `_`.
pub(crate) fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    let id = format!("{SCHEME}{td}");
    if td.is_empty() {
        return Err(invalid(&id, "the trust domain is empty"));
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        let reason = match c {
            ':' => "a trust domain has no port".to_owned(),
            '@' => "a trust domain has no user info".to_owned(),
            c if c.is_ascii_uppercase() => "the trust domain must be lowercase".to_owned(),
            c => format!("the trust domain may not contain {c:?} (only a-z, 0-9, '.', '-', '_')"),
        };
        return Err(invalid(&id, reason));
    }
    Ok(())
}

/// Checks one path segment: non-empty, `[A-Za-z0-9.-_]`, not `.` or `..`.
fn check_segment(id: &str, seg: &str) -> Result<(), IdentityError> {
    if seg.is_empty() {
        return Err(invalid(
            id,
            "path segments may not be empty (no \"//\" and no trailing '/')",
        ));
    }
    if seg == "." || seg == ".." {
        return Err(invalid(id, "path segments may not be \".\" or \"..\""));
    }
    if let Some(c) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        let reason = match c {
            '?' => "a SPIFFE ID has no query".to_owned(),
            '#' => "a SPIFFE ID has no fragment".to_owned(),
            '%' => "a SPIFFE ID has no percent-encoding".to_owned(),
            c => format!("the path may not contain {c:?} (only A-Z, a-z, 0-9, '.', '-', '_')"),
        };
        return Err(invalid(id, reason));
    }
    Ok(())
}

impl SpiffeId {
    /// Parses and validates `s` by the SPIFFE ID specification.
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        if s.len() > MAX_LEN {
            return Err(invalid(s, format!("longer than {MAX_LEN} bytes")));
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(invalid(s, "the scheme must be spiffe:// (lowercase)"));
        };
        let (td, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some(c) = path.chars().next().filter(|c| *c != '/') {
            let reason = if c == '?' {
                "a SPIFFE ID has no query"
            } else {
                "a SPIFFE ID has no fragment"
            };
            return Err(invalid(s, reason));
        }
        check_trust_domain(td).map_err(|e| match e {
            IdentityError::InvalidId { reason, .. } => invalid(s, reason),
            e => e,
        })?;
        if let Some(segments) = path.strip_prefix('/') {
            for seg in segments.split('/') {
                check_segment(s, seg)?;
            }
        }
        Ok(SpiffeId {
            uri: s.to_owned(),
            path_at: SCHEME.len() + td.len(),
        })
    }

    fn build(td: &str, segments: &[&str]) -> Result<SpiffeId, IdentityError> {
        let mut s = format!("{SCHEME}{td}");
        for seg in segments {
            s.push('/');
            s.push_str(seg);
        }
        // Every segment is checked on its own first, so that a name with a '/' in it is refused
        // rather than silently becoming two segments.
        for seg in segments {
            check_segment(&s, seg)?;
        }
        SpiffeId::parse(&s)
    }

    /// The trust domain (nsm's domain), e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_at]
    }

    /// The path, e.g. `/node/n1`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_at..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// `spiffe://<td>/registry`.
    pub fn registry(td: &str) -> Result<Self, IdentityError> {
        Self::build(td, &["registry"])
    }

    /// `spiffe://<td>/node/<name>`.
    pub fn node(td: &str, name: &str) -> Result<Self, IdentityError> {
        Self::build(td, &["node", name])
    }

    /// `spiffe://<td>/admin/<name>`.
    pub fn admin(td: &str, name: &str) -> Result<Self, IdentityError> {
        Self::build(td, &["admin", name])
    }

    /// `spiffe://<td>/user/<name>`.
    pub fn user(td: &str, name: &str) -> Result<Self, IdentityError> {
        Self::build(td, &["user", name])
    }

    /// `spiffe://<td>/ns/<namespace>/client/<name>`.
    pub fn client(td: &str, namespace: &str, name: &str) -> Result<Self, IdentityError> {
        Self::build(td, &["ns", namespace, "client", name])
    }

    /// `spiffe://td/ns/<namespace>/<kind>/<name>`: a workload of a namespace (an upstream NSC or
    /// NSE, a pod).
    pub fn workload(td: &str, namespace: &str, kind: &str, name: &str) -> Result<Self, IdentityError> {
        Self::build(td, &["ns", namespace, kind, name])
    }

    /// What this ID stands for in nsm.
    pub fn role(&self) -> Role<'_> {
        let segs: Vec<&str> = match self.path().strip_prefix('/') {
            Some(p) => p.split('/').collect(),
            None => return Role::Other,
        };
        match segs.as_slice() {
            ["registry"] => Role::Registry,
            ["node", name] => Role::Node(name),
            ["admin", name] => Role::Admin(name),
            ["user", name] => Role::User(name),
            ["ns", namespace, "client", name] => Role::Client { namespace, name },
            _ => Role::Other,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}
