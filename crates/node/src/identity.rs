//! The node's identity: its X.509-SVID `spiffe://<domain>/node/<name>`, obtained once with a
//! one-time join token and kept 0600 in `<data-dir>/identity`, then renewed halfway through each
//! lifetime over mutual TLS with the current one — so a restarted node rejoins without a token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nsm_api::nsm::v1::{self as v1, identity_service_client::IdentityServiceClient};
use nsm_identity::{Credentials, JoinToken, KeyAndCsr, Role, Svid};
use tonic::transport::Channel;

use crate::{NodeError, Result};

/// The registry URLs a node joined through, beside its SVID.
const REGISTRIES: &str = "registries";
/// How long a join may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A node with its identity.
pub struct Joined {
    /// Its SVID and trust bundle, rotating in place.
    pub credentials: Credentials,
    /// The node's name, from its SVID.
    pub name: String,
    /// The registry to follow.
    pub registry: String,
}

fn fail(what: impl std::fmt::Display) -> NodeError {
    NodeError::Registry(what.to_string())
}

/// Where the identity lives.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

fn node_name(svid: &Svid) -> Result<String> {
    match svid.id().role() {
        Role::Node(n) => Ok(n.to_owned()),
        _ => Err(fail(format!("the identity {} is not a node's", svid.id()))),
    }
}

/// The node's identity: the stored one while it is valid (a token given anyway is not used),
/// else one obtained with `token`. `name` and `registry`, when given, must agree with them.
pub async fn establish(
    data_dir: &Path,
    name: Option<&str>,
    registry: Option<&str>,
    token: Option<&str>,
) -> Result<Joined> {
    let dir = dir(data_dir);
    let stored = Svid::load(&dir).map_err(|e| fail(format!("the node's identity in {}: {e}", dir.display())))?;
    let now = SystemTime::now();
    if let Some((svid, bundle)) = &stored
        && svid.not_after() > now + Duration::from_secs(30)
    {
        let n = node_name(svid)?;
        if let Some(given) = name
            && given != n
        {
            return Err(fail(format!(
                "--name {given}: {} holds the identity of node {n}; use another --data-dir for another node",
                dir.display()
            )));
        }
        let known = std::fs::read_to_string(dir.join(REGISTRIES)).unwrap_or_default();
        let registry = registry
            .map(str::to_owned)
            .or_else(|| known.lines().next().map(str::to_owned))
            .ok_or_else(|| fail("--registry: not given, and the node's identity does not record one"))?;
        if token.is_some() {
            tracing::info!(id = %svid.id(), "rejoining with the stored identity; the join token is not used");
        }
        let credentials =
            Credentials::new(svid.clone(), bundle).map_err(|e| fail(format!("the node's identity: {e}")))?;
        return Ok(Joined {
            credentials,
            name: n,
            registry,
        });
    }
    let Some(token) = token else {
        return Err(fail(match stored {
            Some((svid, _)) => format!(
                "the node's identity in {} ({}) expired at {}; start it with a new --join token (`nsmctl node token {}`)",
                dir.display(),
                svid.id(),
                humantime::format_rfc3339_seconds(svid.not_after()),
                node_name(&svid).unwrap_or_default()
            ),
            None => "no identity: start with --join TOKEN (printed by `nsmctl node create NAME`), or --insecure for a registry started with --insecure".to_owned(),
        }));
    };
    let token = JoinToken::decode(token).map_err(|e| fail(format!("--join: {e}")))?;
    if let Some(given) = name
        && given != token.node
    {
        return Err(fail(format!(
            "--name {given}: the join token is for node {}",
            token.node
        )));
    }
    let urls: Vec<String> = match registry {
        Some(r) => vec![r.to_owned()],
        None => token.registries.clone(),
    };
    let mut last = String::from("the token names no registry; give --registry");
    for url in &urls {
        match join(url, &token).await {
            Ok((svid, bundle, registries)) => {
                svid.save(&dir, &bundle)
                    .map_err(|e| fail(format!("storing the node's identity in {}: {e}", dir.display())))?;
                let list = if registries.is_empty() {
                    urls.clone()
                } else {
                    registries
                };
                let mut order = vec![url.clone()];
                order.extend(list.into_iter().filter(|u| u != url));
                std::fs::write(dir.join(REGISTRIES), order.join("\n"))
                    .map_err(|e| fail(format!("{}: {e}", dir.join(REGISTRIES).display())))?;
                tracing::info!(id = %svid.id(), registry = %url, "joined the domain");
                let credentials =
                    Credentials::new(svid, &bundle).map_err(|e| fail(format!("the issued identity: {e}")))?;
                return Ok(Joined {
                    credentials,
                    name: token.node.clone(),
                    registry: url.clone(),
                });
            }
            // A refusal is the registry's answer: another URL of the same domain gives the same.
            Err(JoinError::Refused(s)) => return Err(fail(format!("--join: {url} refused the token: {s}"))),
            Err(JoinError::Unreachable(e)) => last = format!("{url}: {e}"),
        }
    }
    Err(fail(format!("--join: no registry of the token answered ({last})")))
}

enum JoinError {
    Refused(String),
    Unreachable(String),
}

async fn join(url: &str, token: &JoinToken) -> std::result::Result<(Svid, String, Vec<String>), JoinError> {
    let security = nsm_transport::ClientSecurity::Joining {
        ca_fingerprint: token.ca_fingerprint.clone(),
    };
    let ch = nsm_transport::connect_secure(url, JOIN_TIMEOUT, &security)
        .await
        .map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let key = KeyAndCsr::generate().map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let resp = IdentityServiceClient::new(ch)
        .join(v1::JoinRequest {
            token: token.encode(),
            csr: key.csr_der.clone(),
        })
        .await
        .map_err(|s| JoinError::Refused(format!("{} ({:?})", s.message(), s.code())))?
        .into_inner();
    let svid = Svid::from_pem(&resp.certificate_chain, &key.key_pem)
        .map_err(|e| JoinError::Refused(format!("the registry answered an unusable certificate: {e}")))?;
    Ok((svid, resp.trust_bundle, resp.registries))
}

/// Renews the node's SVID halfway through each lifetime, for as long as the daemon runs; a failed
/// renewal is retried every 10 s (the current SVID keeps working until it expires).
pub(crate) async fn renew_forever(credentials: Credentials, data_dir: PathBuf, registry: Channel) {
    let dir = dir(&data_dir);
    let mut client = IdentityServiceClient::new(registry);
    loop {
        let wait = credentials
            .svid()
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        match renew(&mut client, &credentials, &dir).await {
            Ok(not_after) => tracing::info!(
                id = %credentials.id(),
                expires = %humantime::format_rfc3339_seconds(not_after),
                "renewed the node's SVID"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "renewing the node's SVID; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

async fn renew(
    client: &mut IdentityServiceClient<Channel>,
    credentials: &Credentials,
    dir: &Path,
) -> std::result::Result<SystemTime, String> {
    let key = KeyAndCsr::generate().map_err(|e| e.to_string())?;
    let resp = client
        .renew(v1::RenewRequest {
            csr: key.csr_der.clone(),
        })
        .await
        .map_err(|s| format!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    let svid = Svid::from_pem(&resp.certificate_chain, &key.key_pem).map_err(|e| e.to_string())?;
    let not_after = svid.not_after();
    // Stored first: a crash after the rotation must not leave the old (soon expired) SVID on disk.
    svid.save(dir, &resp.trust_bundle).map_err(|e| e.to_string())?;
    credentials.set_bundle(&resp.trust_bundle).map_err(|e| e.to_string())?;
    credentials.rotate(svid).map_err(|e| e.to_string())?;
    Ok(not_after)
}
