//! The domain's identities at the registry: join tokens redeemed for node SVIDs, renewals, users
//! and their grants (`nsm.v1.IdentityService`). Tokens and grants live in the store beside the
//! resources — a token only as the hash of its secret — so they survive restarts and are shared by
//! the registries of an etcd-backed domain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use nsm_api::nsm::v1::{self as v1, identity_service_server::IdentityService};
use nsm_identity::{Ca, JoinToken, SpiffeId};
use nsm_model::{Kind, ValidationError, validate};
use nsm_store::{Condition, PutOptions, Store, StoreError};
use nsm_transport::Peer;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::authz::{Caller, Grant, UserRole};
use crate::{Registry, RegistryError};

const USERS: &str = "/nsm/identity/v1/users/";
const JOIN: &str = "/nsm/identity/v1/join/";
/// The longest workload SVID: workloads renew theirs (`Renew`).
const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// A join token's lifetime when the request gives none.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// A user certificate's lifetime when the request gives none: people are not daemons that renew
/// every half hour, so their configs last a month (docs/SECURITY.md).
pub const DEFAULT_USER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// How the registry secures its domain. Absent from [`crate::Config`]: `--insecure`, every
/// caller is an admin and nothing is issued.
#[derive(Clone)]
pub struct Security {
    /// The domain CA.
    pub ca: Arc<Ca>,
    /// Where nodes and nsmctl reach this registry (written into join tokens and SVID responses).
    pub advertise: Vec<String>,
    /// Lifetime of node (and workload) SVIDs.
    pub svid_ttl: Duration,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("ca", &self.ca.fingerprint())
            .field("advertise", &self.advertise)
            .field("svid_ttl", &self.svid_ttl)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredUser {
    namespaces: Vec<String>,
    role: String,
    created: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    /// sha256 of the secret, never the secret itself.
    hash: String,
    /// Unix seconds.
    expires: u64,
}

/// The users and their grants, as the gate needs them on every call: in memory, following the
/// store.
#[derive(Clone, Default)]
pub(crate) struct Users(pub(crate) Arc<RwLock<HashMap<String, Grant>>>);

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn grant_of(name: &str, value: &[u8]) -> Option<Grant> {
    let u: StoredUser = serde_json::from_slice(value).ok()?;
    Some(Grant {
        name: name.to_owned(),
        namespaces: u.namespaces,
        role: UserRole::parse(&u.role).ok()?,
    })
}

impl Users {
    /// Loads the grants and keeps following the store.
    pub(crate) async fn start(store: Arc<dyn Store>) -> Result<Users, StoreError> {
        let users = Users::default();
        let (items, revision) = store.list(USERS).await?;
        {
            let mut map = users.0.write();
            for kv in items {
                let name = kv.key.trim_start_matches(USERS);
                if let Some(g) = grant_of(name, &kv.value) {
                    map.insert(name.to_owned(), g);
                }
            }
        }
        let map = users.0.clone();
        tokio::spawn(async move {
            let mut from = revision + 1;
            loop {
                match store.watch(USERS, from).await {
                    Ok(mut events) => {
                        while let Some(ev) = events.next().await {
                            let Ok(ev) = ev else { break };
                            from = ev.revision() + 1;
                            let mut m = map.write();
                            match ev {
                                nsm_store::WatchEvent::Put(kv) => {
                                    let name = kv.key.trim_start_matches(USERS);
                                    match grant_of(name, &kv.value) {
                                        Some(g) => m.insert(name.to_owned(), g),
                                        None => m.remove(name),
                                    };
                                }
                                nsm_store::WatchEvent::Delete { prev, .. } => {
                                    m.remove(prev.key.trim_start_matches(USERS));
                                }
                                nsm_store::WatchEvent::Reset { items, .. } => {
                                    m.clear();
                                    for kv in items {
                                        let name = kv.key.trim_start_matches(USERS);
                                        if let Some(g) = grant_of(name, &kv.value) {
                                            m.insert(name.to_owned(), g);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching users"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(users)
    }
}

pub(crate) struct IdentityApi(pub(crate) Registry);

fn invalid(field: &str, reason: impl Into<String>) -> Status {
    Status::from(RegistryError::from(ValidationError::new(field, reason.into())))
}

fn issue_status(e: nsm_identity::IdentityError) -> Status {
    match e {
        nsm_identity::IdentityError::BadMaterial { .. } | nsm_identity::IdentityError::InvalidId { .. } => {
            invalid("csr", e.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

impl IdentityApi {
    fn security(&self) -> Result<&Security, Status> {
        self.0.inner.config.security.as_ref().ok_or_else(|| {
            Status::failed_precondition("this registry runs with --insecure: it has no CA and issues no identities")
        })
    }

    fn response(&self, sec: &Security, svid: nsm_identity::Issued, id: &SpiffeId) -> v1::SvidResponse {
        v1::SvidResponse {
            spiffe_id: id.to_string(),
            certificate_chain: svid.chain_pem,
            trust_bundle: sec.ca.bundle_pem(),
            expires: Some(prost_types::Timestamp::from(svid.not_after)),
            registries: sec.advertise.clone(),
        }
    }

    fn node_exists(&self, name: &str) -> bool {
        self.0.get_item(Kind::Node, "", name).is_some()
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn join(&self, req: Request<v1::JoinRequest>) -> Result<Response<v1::SvidResponse>, Status> {
        let sec = self.security()?;
        let req = req.into_inner();
        let token = JoinToken::decode(&req.token).map_err(|e| invalid("token", e.to_string()))?;
        if token.ca_fingerprint != sec.ca.fingerprint() {
            return Err(Status::permission_denied(format!(
                "token: made for CA {}, and this registry's CA is {}",
                token.ca_fingerprint,
                sec.ca.fingerprint()
            )));
        }
        let refused = || {
            Status::permission_denied(format!(
                "token: not valid for node {:?} (used already, replaced by a newer one, expired, or never issued); \
                 issue a new one with `nsmctl node token {}`",
                token.node, token.node
            ))
        };
        let key = format!("{JOIN}{}", token.node);
        let store = &self.0.inner.store;
        let Some(kv) = store.get(&key).await.map_err(RegistryError::from)? else {
            return Err(refused());
        };
        let stored: StoredToken = serde_json::from_slice(&kv.value).map_err(|_| refused())?;
        if stored.hash != token.secret_hash() || stored.expires <= unix_secs(SystemTime::now()) {
            return Err(refused());
        }
        if !self.node_exists(&token.node) {
            return Err(Status::failed_precondition(format!(
                "node {:?} was deleted after its token was issued",
                token.node
            )));
        }
        let id = SpiffeId::node(sec.ca.trust_domain(), &token.node).map_err(issue_status)?;
        let issued = sec.ca.issue(&req.csr, &id, sec.svid_ttl, &[]).map_err(issue_status)?;
        // Single use: only the call that removes the token's very revision gets the SVID.
        match store.delete(&key, Condition::ModRevision(kv.mod_revision)).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => return Err(refused()),
            Err(e) => return Err(RegistryError::from(e).into()),
        }
        tracing::info!(node = %token.node, id = %id, "node joined");
        Ok(Response::new(self.response(sec, issued, &id)))
    }

    async fn renew(&self, req: Request<v1::RenewRequest>) -> Result<Response<v1::SvidResponse>, Status> {
        let sec = self.security()?;
        let who: Caller = nsm_authz::caller(&req)?;
        let Some(Peer::Spiffe { id, .. }) = Peer::of(&req).cloned() else {
            return Err(Status::failed_precondition(
                "only a caller with a certificate renews it (this one came through the unix socket)",
            ));
        };
        if let Caller::Node(n) = &who
            && !self.node_exists(n)
        {
            return Err(Status::permission_denied(format!(
                "{id}: node {n:?} no longer exists; its identity is not renewed"
            )));
        }
        // The same lifetime as before: the gate admits only daemons (nodes, workloads) here.
        let issued = sec
            .ca
            .issue(&req.into_inner().csr, &id, sec.svid_ttl, &[])
            .map_err(issue_status)?;
        Ok(Response::new(self.response(sec, issued, &id)))
    }

    async fn create_join_token(
        &self,
        req: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let sec = self.security()?;
        let req = req.into_inner();
        validate::name("node", &req.node).map_err(RegistryError::from)?;
        if !self.node_exists(&req.node) {
            return Err(RegistryError::NotFound {
                kind: Kind::Node,
                name: req.node,
            }
            .into());
        }
        let ttl = if req.ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        let expires = SystemTime::now() + ttl;
        let token = JoinToken::generate(sec.advertise.clone(), sec.ca.fingerprint(), req.node.clone());
        let stored = StoredToken {
            hash: token.secret_hash(),
            expires: unix_secs(expires),
        };
        // A newer token replaces the node's previous one.
        self.0
            .inner
            .store
            .put(
                &format!("{JOIN}{}", req.node),
                serde_json::to_vec(&stored).expect("serialisable"),
                PutOptions {
                    condition: Condition::None,
                    expires_at: Some(expires),
                },
            )
            .await
            .map_err(RegistryError::from)?;
        Ok(Response::new(v1::CreateJoinTokenResponse {
            join_token: token.encode(),
            expires: Some(prost_types::Timestamp::from(expires)),
        }))
    }

    async fn create_user(
        &self,
        req: Request<v1::CreateUserRequest>,
    ) -> Result<Response<v1::CreateUserResponse>, Status> {
        let sec = self.security()?;
        let req = req.into_inner();
        let user = req.user.ok_or_else(|| invalid("user", "missing"))?;
        validate::name("user.name", &user.name).map_err(RegistryError::from)?;
        if user.namespaces.is_empty() {
            return Err(invalid("user.namespaces", "give at least one namespace"));
        }
        for (i, n) in user.namespaces.iter().enumerate() {
            validate::namespace(&format!("user.namespaces[{i}]"), n).map_err(RegistryError::from)?;
        }
        let role = if user.role.is_empty() {
            UserRole::Edit
        } else {
            UserRole::parse(&user.role)?
        };
        let ttl = if req.ttl_seconds == 0 {
            DEFAULT_USER_TTL
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        let id = SpiffeId::user(sec.ca.trust_domain(), &user.name).map_err(issue_status)?;
        // Checked before anything is stored: a bad CSR leaves no grant behind.
        let issued = sec.ca.issue(&req.csr, &id, ttl, &[]).map_err(issue_status)?;
        let now = SystemTime::now();
        let stored = StoredUser {
            namespaces: user.namespaces.clone(),
            role: role.as_str().to_owned(),
            created: unix_secs(now),
        };
        let value = serde_json::to_vec(&stored).expect("serialisable");
        self.0
            .inner
            .store
            .put(&format!("{USERS}{}", user.name), value.clone(), PutOptions::default())
            .await
            .map_err(RegistryError::from)?;
        if let Some(g) = grant_of(&user.name, &value) {
            self.0.inner.users.0.write().insert(user.name.clone(), g);
        }
        tracing::info!(user = %user.name, role = role.as_str(), namespaces = ?user.namespaces, "user granted");
        Ok(Response::new(v1::CreateUserResponse {
            user: Some(v1::User {
                name: user.name,
                namespaces: user.namespaces,
                role: role.as_str().to_owned(),
                creation_timestamp: Some(prost_types::Timestamp::from(now)),
            }),
            svid: Some(self.response(sec, issued, &id)),
        }))
    }

    async fn delete_user(&self, req: Request<v1::DeleteUserRequest>) -> Result<Response<v1::User>, Status> {
        self.security()?;
        let name = req.into_inner().name;
        validate::name("name", &name).map_err(RegistryError::from)?;
        let (prev, _) = match self
            .0
            .inner
            .store
            .delete(&format!("{USERS}{name}"), Condition::None)
            .await
        {
            Ok(x) => x,
            Err(StoreError::NotFound(_)) => return Err(Status::not_found(format!("user {name:?} not found"))),
            Err(e) => return Err(RegistryError::from(e).into()),
        };
        self.0.inner.users.0.write().remove(&name);
        let u: Option<StoredUser> = serde_json::from_slice(&prev.value).ok();
        Ok(Response::new(user_pb(&name, u)))
    }

    async fn list_users(&self, _req: Request<v1::ListUsersRequest>) -> Result<Response<v1::ListUsersResponse>, Status> {
        let (items, _) = self.0.inner.store.list(USERS).await.map_err(RegistryError::from)?;
        let users = items
            .into_iter()
            .map(|kv| {
                let name = kv.key.trim_start_matches(USERS).to_owned();
                user_pb(&name, serde_json::from_slice(&kv.value).ok())
            })
            .collect();
        Ok(Response::new(v1::ListUsersResponse { users }))
    }

    async fn issue_workload(
        &self,
        req: Request<v1::IssueWorkloadRequest>,
    ) -> Result<Response<v1::SvidResponse>, Status> {
        let sec = self.security()?;
        let who: Caller = nsm_authz::caller(&req)?;
        let req = req.into_inner();
        validate::namespace("namespace", &req.namespace).map_err(RegistryError::from)?;
        validate::name("name", &req.name).map_err(RegistryError::from)?;
        let kind = if req.kind.is_empty() {
            "workload"
        } else {
            req.kind.as_str()
        };
        validate::name("kind", kind).map_err(RegistryError::from)?;
        if matches!(kind, "client") {
            // Client IDs are what nodes sign their clients' path segments as.
            return Err(invalid(
                "kind",
                "\"client\" is reserved for nsm's clients; name the workload's kind (pod, nse, nsc, …)",
            ));
        }
        // A user mints identities only for its namespaces, and only with a role that changes them.
        who.may_write(Kind::NetworkService, &req.namespace, None, None)?;
        let ttl = match req.ttl_seconds {
            0 => sec.svid_ttl,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_WORKLOAD_TTL {
            return Err(invalid(
                "ttl_seconds",
                format!("at most {} (24 h): workloads renew", MAX_WORKLOAD_TTL.as_secs()),
            ));
        }
        let id = SpiffeId::workload(sec.ca.trust_domain(), &req.namespace, kind, &req.name)
            .map_err(|e| invalid("name", e.to_string()))?;
        let issued = sec.ca.issue(&req.csr, &id, ttl, &[]).map_err(issue_status)?;
        tracing::info!(id = %id, by = %who, "workload identity issued");
        Ok(Response::new(self.response(sec, issued, &id)))
    }

    async fn who_am_i(&self, req: Request<v1::WhoAmIRequest>) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let spiffe_id = match Peer::of(&req) {
            Some(Peer::Spiffe { id, .. }) => id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(v1::WhoAmIResponse {
            spiffe_id,
            identity: who.to_string(),
        }))
    }
}

fn user_pb(name: &str, u: Option<StoredUser>) -> v1::User {
    let u = u.unwrap_or(StoredUser {
        namespaces: vec![],
        role: String::new(),
        created: 0,
    });
    v1::User {
        name: name.to_owned(),
        namespaces: u.namespaces,
        role: u.role,
        creation_timestamp: Some(prost_types::Timestamp {
            seconds: i64::try_from(u.created).unwrap_or(0),
            nanos: 0,
        }),
    }
}
