//! The nsm registry.
//!
//! One per domain. It serves upstream's `registry.NetworkServiceRegistry` and
//! `registry.NetworkServiceEndpointRegistry` (wire-compatible, upstream semantics) and nsm's own
//! `nsm.v1.ResourceService` over the same state, so that what `nsmctl` creates is visible to
//! upstream clients and the other way round. State lives in a [`Store`]; reads are served from an
//! in-memory view that follows the store ([`cache`]). vWire address pairs are leased from it too
//! ([`addresses`]).
#![forbid(unsafe_code)]

mod addresses;
mod authz;
mod cache;
mod error;
mod identity;
mod ipam;
mod resources;
mod upstream_api;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_model::{ValidationError, kind, pb, upstream, validate};
use nsm_store::{Condition, PutOptions, Store, StoreError};
use prost::Message;
use tonic::service::Routes;

pub use authz::{Caller, Grant, NodeExists, RegistryGate, UnixPolicy, UserRole};
pub use error::RegistryError;
use identity::Users;
pub use identity::{DEFAULT_USER_TTL, Security};
pub use nsm_model::Kind;

use crate::cache::{Cache, Item};

/// How the registry behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Lifetime of an upstream endpoint registration that is not refreshed (upstream: 1 minute).
    pub default_expiration: Duration,
    /// This registry's domain: names `x@<domain>` are local. None = only undomained names.
    pub domain: Option<String>,
    /// The domain's CA and what it issues; None: `--insecure` (every caller is an admin).
    pub security: Option<Security>,
    /// Who is an admin on the unix socket.
    pub unix: UnixPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_expiration: Duration::from_secs(60),
            domain: None,
            security: None,
            unix: UnixPolicy {
                own_uid: 0,
                group: None,
            },
        }
    }
}

/// A running registry (cheap to clone).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    cache: Arc<Cache>,
    config: Config,
    /// Addresses this registry is writing a lease for right now (see `addresses.rs`).
    addresses_in_flight: parking_lot::Mutex<std::collections::HashSet<std::net::IpAddr>>,
    /// Users and their grants (empty without security).
    users: Users,
}

/// What an apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The resource did not exist.
    Created,
    /// It existed and was changed.
    Configured,
    /// It existed and already matched.
    Unchanged,
}

type Result<T> = std::result::Result<T, RegistryError>;

/// Attempts of an optimistic read-modify-write before giving up with `Conflict`.
const WRITE_ATTEMPTS: usize = 8;

fn display_name(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    }
}

fn meta_of(r: &pb::Resource) -> (String, String) {
    kind::meta(r).map_or_else(Default::default, |m| (m.namespace.clone(), m.name.clone()))
}

/// The expiry a resource asks the store for (endpoints registered with an expiration time).
fn expiry_of(r: &pb::Resource) -> Option<SystemTime> {
    match &r.kind {
        Some(pb::resource::Kind::Endpoint(ep)) => ep
            .spec
            .as_ref()?
            .expiration_time
            .as_ref()
            .and_then(nsm_model::to_system_time),
        _ => None,
    }
}

/// A resource as it is written to the store: without the store-owned resource version.
fn encode(r: &pb::Resource) -> Vec<u8> {
    let mut r = r.clone();
    if let Some(m) = kind::meta_mut(&mut r) {
        m.resource_version = 0;
    }
    r.encode_to_vec()
}

/// Spec and labels, the parts a user changes (not uid, timestamps or versions).
fn same_content(a: &pb::Resource, b: &pb::Resource) -> bool {
    let strip = |r: &pb::Resource| {
        let mut r = r.clone();
        if let Some(m) = kind::meta_mut(&mut r) {
            m.uid.clear();
            m.resource_version = 0;
            m.creation_timestamp = None;
        }
        if let Some(pb::resource::Kind::Client(c)) = &mut r.kind {
            c.status = None;
        }
        r
    };
    strip(a) == strip(b)
}

/// Prefix leases are made by the prefix server only: a hand-made one could overlap a router's.
fn refuse_prefix(r: &pb::Resource) -> Result<()> {
    if matches!(r.kind, Some(pb::resource::Kind::Prefix(_))) {
        return Err(RegistryError::Precondition(
            "prefixes are leased through ipam.IPAM/ManagePrefixes (nsm node does it for its vL3 routers); they can be listed and deleted, not created".into(),
        ));
    }
    Ok(())
}

impl Registry {
    /// Loads the store's state and starts following it.
    pub async fn start(store: Arc<dyn Store>, config: Config) -> std::result::Result<Registry, StoreError> {
        let cache = Cache::start(store.clone()).await?;
        let users = if config.security.is_some() {
            Users::start(store.clone()).await?
        } else {
            Users::default()
        };
        let registry = Registry {
            inner: Arc::new(Inner {
                store,
                cache,
                config,
                addresses_in_flight: Default::default(),
                users,
            }),
        };
        if let Err(e) = registry.sweep_address_leases().await {
            tracing::warn!(error = %e, "sweeping the address leases of deleted clients");
        }
        Ok(registry)
    }

    /// The gRPC services — upstream registry ×2, nsm.v1 resources and identities, upstream IPAM,
    /// health (all SERVING) — each behind the registry's authorization gate.
    pub async fn routes(&self) -> Routes {
        let gate = Arc::new(RegistryGate::new(
            self.inner
                .config
                .security
                .as_ref()
                .map(|s| s.ca.trust_domain().to_owned()),
            self.inner.config.unix,
            self.inner.users.0.clone(),
            {
                let registry = self.clone();
                Arc::new(move |name: &str| registry.get_item(Kind::Node, "", name).is_some())
            },
        ));
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in [
            nsm_api::service_names::NS_REGISTRY,
            nsm_api::service_names::NSE_REGISTRY,
            nsm_api::service_names::RESOURCES,
            nsm_api::service_names::IDENTITY,
            nsm_api::service_names::IPAM,
            "",
        ] {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let mut b = Routes::builder();
        b.add_service(nsm_authz::Gated::new(gate.clone(), health))
            .add_service(nsm_authz::Gated::new(
                gate.clone(),
                nsm_api::registry::network_service_registry_server::NetworkServiceRegistryServer::new(
                    upstream_api::NsRegistry(self.clone()),
                ),
            ))
            .add_service(nsm_authz::Gated::new(
                gate.clone(),
                nsm_api::registry::network_service_endpoint_registry_server::NetworkServiceEndpointRegistryServer::new(
                    upstream_api::NseRegistry(self.clone()),
                ),
            ))
            .add_service(nsm_authz::Gated::new(
                gate.clone(),
                nsm_api::nsm::v1::resource_service_server::ResourceServiceServer::new(resources::ResourceApi(
                    self.clone(),
                )),
            ))
            .add_service(nsm_authz::Gated::new(
                gate.clone(),
                nsm_api::nsm::v1::identity_service_server::IdentityServiceServer::new(identity::IdentityApi(
                    self.clone(),
                )),
            ))
            .add_service(nsm_authz::Gated::new(
                gate,
                nsm_api::ipam::ipam_server::IpamServer::new(ipam::PrefixServer(self.clone())),
            ));
        b.routes()
    }

    /// The store backend's name.
    pub fn backend(&self) -> &'static str {
        self.inner.store.backend()
    }

    /// Number of resources of `kind` in the view.
    pub fn count(&self, kind: Kind) -> usize {
        self.inner.cache.state.read().count(kind)
    }

    fn get_item(&self, kind: Kind, namespace: &str, name: &str) -> Option<Item> {
        self.inner.cache.state.read().get(kind, &kind.key(namespace, name))
    }

    /// Gets one resource.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Item> {
        self.get_item(kind, namespace, name)
            .ok_or_else(|| RegistryError::NotFound {
                kind,
                name: display_name(kind, namespace, name),
            })
    }

    /// Lists resources of `kind` in `namespace` (empty = all) whose labels include `selector`.
    pub fn list(
        &self,
        kind: Kind,
        namespace: &str,
        selector: &std::collections::HashMap<String, String>,
    ) -> (Vec<Item>, u64) {
        let state = self.inner.cache.state.read();
        let items = state
            .kind(kind)
            .filter(|i| resources::selected(i, namespace, selector))
            .collect();
        (items, state.revision)
    }

    /// Writes `resource` (already validated) with a read-modify-write loop: `decide` sees the
    /// current value and returns what to store, or None to leave it as is.
    async fn write(
        &self,
        who: &Caller,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut decide: impl FnMut(Option<&pb::Resource>) -> Result<Option<pb::Resource>>,
    ) -> Result<(Option<Item>, Item)> {
        // Refused before anything is looked at: a refusal must not depend on what exists.
        who.may_write(kind, namespace, None, None)?;
        let key = kind.key(namespace, name);
        let mut current = self.inner.cache.state.read().get(kind, &key);
        for _ in 0..WRITE_ATTEMPTS {
            let Some(next) = decide(current.as_deref())? else {
                let cur = current.clone().expect("decide keeps only what exists");
                // Even "unchanged" is an answer about someone else's resource.
                who.may_write(kind, namespace, Some(&cur), Some(&cur))?;
                return Ok((current, cur));
            };
            who.may_write(kind, namespace, current.as_deref(), Some(&next))?;
            let condition = match &current {
                Some(c) => Condition::ModRevision(kind::meta(c).map_or(0, |m| m.resource_version)),
                None => Condition::Absent,
            };
            let opts = PutOptions {
                condition,
                expires_at: expiry_of(&next),
            };
            match self.inner.store.put(&key, encode(&next), opts).await {
                Ok(kv) => {
                    self.inner.cache.wait_for(kv.mod_revision).await?;
                    let mut stored = next;
                    if let Some(m) = kind::meta_mut(&mut stored) {
                        m.resource_version = kv.mod_revision;
                    }
                    return Ok((current, Arc::new(stored)));
                }
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_) | StoreError::NotFound(_)) => {
                    current = self.inner.store.get(&key).await?.as_ref().and_then(cache::decode);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Conflict {
            kind,
            name: display_name(kind, namespace, name),
        })
    }

    fn stamp_new(r: &mut pb::Resource) {
        if let Some(m) = kind::meta_mut(r) {
            m.uid = uuid::Uuid::new_v4().to_string();
            m.creation_timestamp = Some(nsm_model::now_timestamp());
        }
    }

    /// Carries over what the registry and the node daemons own: identity and a client's status.
    fn keep_identity(r: &mut pb::Resource, existing: &pb::Resource) {
        if let (Some(old), Some(m)) = (kind::meta(existing).cloned(), kind::meta_mut(r)) {
            m.uid = old.uid;
            m.creation_timestamp = old.creation_timestamp;
        }
        if let (Some(pb::resource::Kind::Client(new)), Some(pb::resource::Kind::Client(old))) =
            (&mut r.kind, &existing.kind)
        {
            new.status = old.status.clone();
        }
    }

    /// Clears what a user may not set: a client's status.
    fn strip_status(r: &mut pb::Resource) {
        if let Some(pb::resource::Kind::Client(c)) = &mut r.kind {
            c.status = None;
        }
    }

    /// Whether `who` may lease or release the addresses of `client`: its node (or an admin). A client
    /// that does not exist is judged by the lease call itself (allocating needs it; releasing what
    /// a deleted client left is harmless).
    pub(crate) fn may_act_for(&self, who: &Caller, client: &(String, String)) -> Result<()> {
        if matches!(who, Caller::Admin(_)) {
            return Ok(());
        }
        match self.get_item(Kind::Client, &client.0, &client.1) {
            Some(c) => who.may_act_for_client(&c),
            None => Ok(()),
        }
    }

    /// Replaces a client's status (node daemons report what they observed); the spec stays.
    pub async fn update_status(
        &self,
        who: &Caller,
        namespace: &str,
        name: &str,
        status: pb::ClientStatus,
    ) -> Result<Item> {
        let kind = Kind::Client;
        let namespace = if namespace.is_empty() {
            nsm_model::DEFAULT_NAMESPACE
        } else {
            namespace
        };
        // The status is the node's to write; the write itself is checked as the registry's own.
        let (_, stored) = self
            .write(&Caller::internal(), kind, namespace, name, |current| {
                let Some(cur) = current else {
                    return Err(RegistryError::NotFound {
                        kind,
                        name: display_name(kind, namespace, name),
                    });
                };
                who.may_act_for_client(cur)?;
                let mut next = cur.clone();
                if let Some(pb::resource::Kind::Client(c)) = &mut next.kind {
                    if c.status.as_ref() == Some(&status) {
                        return Ok(None);
                    }
                    c.status = Some(status.clone());
                }
                Ok(Some(next))
            })
            .await?;
        Ok(stored)
    }

    /// Creates a resource; fails with AlreadyExists if it exists.
    pub async fn create(&self, who: &Caller, resource: pb::Resource) -> Result<Item> {
        refuse_prefix(&resource)?;
        self.insert(who, resource).await
    }

    /// Two Nodes may not share a URL or an underlay address: nodes find each other by them, so a
    /// node that claimed another's would be dialled, and trusted, in its place.
    fn check_node_unique(&self, r: &pb::Resource) -> Result<()> {
        let Some(pb::resource::Kind::Node(n)) = &r.kind else {
            return Ok(());
        };
        let (Some(m), Some(spec)) = (&n.metadata, &n.spec) else {
            return Ok(());
        };
        let state = self.inner.cache.state.read();
        for other in state.kind(Kind::Node) {
            let Some(pb::resource::Kind::Node(o)) = &other.kind else {
                continue;
            };
            let (Some(om), Some(os)) = (&o.metadata, &o.spec) else {
                continue;
            };
            if om.name == m.name {
                continue;
            }
            let clash = if !spec.url.is_empty() && spec.url == os.url {
                Some(("spec.url", &spec.url))
            } else if !spec.address.is_empty() && spec.address == os.address {
                Some(("spec.address", &spec.address))
            } else {
                None
            };
            if let Some((field, value)) = clash {
                return Err(RegistryError::Precondition(format!(
                    "{field}: {value} is node {:?}'s already",
                    om.name
                )));
            }
        }
        Ok(())
    }

    /// The upstream name of the vL3 that the service `upstream_name` is on, if it is on one.
    pub(crate) fn member_service_vl3(&self, upstream_name: &str) -> Option<String> {
        let (ns, name, _) = upstream::parse_name("service", upstream_name).ok()?;
        let item = self.get_item(Kind::NetworkService, &ns, &name)?;
        let Some(pb::resource::Kind::NetworkService(s)) = &item.kind else {
            return None;
        };
        let vl3 = &s.spec.as_ref()?.vl3;
        (!vl3.is_empty()).then(|| upstream::qualify(vl3, &ns))
    }

    /// Creates a resource of any kind (prefix leases included); AlreadyExists if it exists.
    async fn insert(&self, who: &Caller, mut resource: pb::Resource) -> Result<Item> {
        let kind = validate::resource(&mut resource)?;
        let (namespace, _) = meta_of(&resource);
        // Before the pool checks, whose errors name other namespaces' vL3s.
        who.may_write(kind, &namespace, None, Some(&resource))?;
        self.check_vl3(&resource)?;
        self.check_node_unique(&resource)?;
        Self::strip_status(&mut resource);
        let (namespace, name) = meta_of(&resource);
        Self::stamp_new(&mut resource);
        let (_, stored) = self
            .write(who, kind, &namespace, &name, |current| match current {
                Some(_) => Err(RegistryError::AlreadyExists {
                    kind,
                    name: display_name(kind, &namespace, &name),
                }),
                None => Ok(Some(resource.clone())),
            })
            .await?;
        Ok(stored)
    }

    /// Creates or updates a resource. With `dry_run`, only validates and reports the outcome.
    pub async fn apply(&self, who: &Caller, mut resource: pb::Resource, dry_run: bool) -> Result<(Applied, Item)> {
        refuse_prefix(&resource)?;
        let kind = validate::resource(&mut resource)?;
        // Whether it may write here at all, and what it writes — before the pool checks, whose
        // errors name other namespaces' vL3s (whether it may create or change is judged with what
        // is stored, in the write).
        who.may_write(kind, &meta_of(&resource).0, None, None)?;
        if !matches!(who, Caller::Admin(_) | Caller::Node(_)) {
            who.may_write(kind, &meta_of(&resource).0, None, Some(&resource))?;
        }
        self.check_vl3(&resource)?;
        self.check_node_unique(&resource)?;
        Self::strip_status(&mut resource);
        let (namespace, name) = meta_of(&resource);
        if dry_run {
            let current = self.get_item(kind, &namespace, &name);
            who.may_write(kind, &namespace, current.as_deref(), Some(&resource))?;
            return Ok(match current {
                None => (Applied::Created, Arc::new(resource)),
                Some(cur) if same_content(&cur, &resource) => (Applied::Unchanged, cur),
                Some(_) => (Applied::Configured, Arc::new(resource)),
            });
        }
        let (before, stored) = self
            .write(who, kind, &namespace, &name, |current| {
                let mut next = resource.clone();
                match current {
                    None => Self::stamp_new(&mut next),
                    Some(cur) if same_content(cur, &next) => return Ok(None),
                    Some(cur) => Self::keep_identity(&mut next, cur),
                }
                Ok(Some(next))
            })
            .await?;
        let outcome = match before {
            None => Applied::Created,
            Some(b) if Arc::ptr_eq(&b, &stored) || same_content(&b, &stored) => Applied::Unchanged,
            Some(_) => Applied::Configured,
        };
        Ok((outcome, stored))
    }

    /// Deletes a resource, returning its last state. A node takes its routers' prefix leases with
    /// it, a vL3 every lease of its pool, and a client its address pair.
    pub async fn delete(&self, who: &Caller, kind: Kind, namespace: &str, name: &str) -> Result<Item> {
        let gone = self.delete_one(who, kind, namespace, name).await?;
        match &gone.kind {
            Some(pb::resource::Kind::Client(_)) => {
                if let Err(e) = self.release_addresses(&meta_of(&gone)).await {
                    // The next registry start sweeps what is left.
                    tracing::warn!(client = %display_name(kind, namespace, name), error = %e, "releasing a deleted client's address pair");
                }
            }
            Some(pb::resource::Kind::Node(_)) => self.release_where(|p| p.node == name).await,
            Some(pb::resource::Kind::NetworkService(ns)) if ns.spec.as_ref().is_some_and(|s| s.vl3.is_empty()) => {
                let up = kind::meta(&gone).map(|m| upstream::name_of(&m.namespace, &m.name));
                self.release_where(|p| Some(&p.network_service) == up.as_ref()).await;
            }
            _ => {}
        }
        Ok(gone)
    }

    pub(crate) async fn delete_one(&self, who: &Caller, kind: Kind, namespace: &str, name: &str) -> Result<Item> {
        let namespace = if kind.namespaced() && namespace.is_empty() {
            nsm_model::DEFAULT_NAMESPACE
        } else {
            namespace
        };
        let key = kind.key(namespace, name);
        // A caller that is not an admin deletes what it was judged on, not what replaced it since
        // (a status written meanwhile is judged again).
        if !matches!(who, Caller::Admin(_)) {
            who.may_write(kind, namespace, None, None)?;
            let mut current = self.get_item(kind, namespace, name);
            let mut attempts = 0;
            loop {
                let Some(cur) = current.clone() else {
                    return Err(RegistryError::NotFound {
                        kind,
                        name: display_name(kind, namespace, name),
                    });
                };
                who.may_write(kind, namespace, Some(&cur), None)?;
                let rev = kind::meta(&cur).map_or(0, |m| m.resource_version);
                match self.inner.store.delete(&key, Condition::ModRevision(rev)).await {
                    Err(StoreError::Conflict { .. }) if attempts < WRITE_ATTEMPTS => {
                        attempts += 1;
                        // The store's own revision decides the next attempt.
                        current = self.inner.store.get(&key).await?.as_ref().and_then(cache::decode);
                    }
                    other => return self.finish_delete(kind, namespace, name, &key, other).await,
                }
            }
        }
        let outcome = self.inner.store.delete(&key, Condition::None).await;
        self.finish_delete(kind, namespace, name, &key, outcome).await
    }

    async fn finish_delete(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        key: &str,
        outcome: std::result::Result<(nsm_store::KeyValue, nsm_store::Revision), StoreError>,
    ) -> Result<Item> {
        match outcome {
            Err(StoreError::Conflict { .. }) => Err(RegistryError::Conflict {
                kind,
                name: display_name(kind, namespace, name),
            }),
            Ok((prev, revision)) => {
                self.inner.cache.wait_for(revision).await?;
                cache::decode(&prev).ok_or_else(|| StoreError::Backend(format!("undecodable value at {key}")).into())
            }
            Err(StoreError::NotFound(_)) => Err(RegistryError::NotFound {
                kind,
                name: display_name(kind, namespace, name),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Resolves an upstream name to (namespace, name), accepting our own domain suffix.
    fn local_name(&self, field: &str, upstream_name: &str) -> Result<(String, String)> {
        let (namespace, name, domain) = upstream::parse_name(field, upstream_name)?;
        match (domain, &self.inner.config.domain) {
            (None, _) => Ok((namespace, name)),
            (Some(d), Some(ours)) if d == *ours => Ok((namespace, name)),
            (Some(d), ours) => Err(RegistryError::Interdomain(format!(
                "{field}: {upstream_name:?} belongs to domain {d:?}, and this registry serves {}; \
                 interdomain registration is not supported yet",
                ours.as_deref()
                    .map_or("no domain".to_owned(), |o| format!("domain {o:?}"))
            ))),
        }
    }

    /// Upstream NetworkServiceRegistry.Register: creates or updates the service.
    pub async fn register_ns(
        &self,
        who: &Caller,
        ns: &pb::registry::NetworkService,
    ) -> Result<pb::registry::NetworkService> {
        if ns.name.is_empty() {
            return Err(ValidationError::new("name", "must not be empty").into());
        }
        let (namespace, name) = self.local_name("name", &ns.name)?;
        let mut local = ns.clone();
        local.name = upstream::name_of(&namespace, &name);
        registrant(who, &mut local.path_ids);
        let (_, stored) = self
            .write(who, Kind::NetworkService, &namespace, &name, |current| {
                let existing = match current.and_then(|c| c.kind.as_ref()) {
                    Some(pb::resource::Kind::NetworkService(n)) => Some(n),
                    _ => None,
                };
                let mut r = pb::Resource {
                    kind: Some(pb::resource::Kind::NetworkService(upstream::ns_from_upstream(
                        &local, existing,
                    )?)),
                };
                validate::resource(&mut r)?;
                match current {
                    None => Self::stamp_new(&mut r),
                    Some(c) if same_content(c, &r) => return Ok(None),
                    Some(_) => {}
                }
                Ok(Some(r))
            })
            .await?;
        let Some(pb::resource::Kind::NetworkService(n)) = &stored.kind else {
            unreachable!("wrote a service")
        };
        let mut out = upstream::ns_to_upstream(n);
        out.name = ns.name.clone();
        Ok(out)
    }

    /// Upstream NetworkServiceEndpointRegistry.Register: creates or refreshes the endpoint with an
    /// expiry of at most `default_expiration` from now (upstream `expire` semantics).
    pub async fn register_nse(
        &self,
        who: &Caller,
        nse: &pb::registry::NetworkServiceEndpoint,
    ) -> Result<pb::registry::NetworkServiceEndpoint> {
        if nse.name.is_empty() {
            return Err(ValidationError::new("name", "must not be empty").into());
        }
        let (namespace, name) = self.local_name("name", &nse.name)?;
        let mut local = nse.clone();
        local.name = upstream::name_of(&namespace, &name);
        let now = SystemTime::now();
        let cap = now + self.inner.config.default_expiration;
        let expires = match nse.expiration_time.as_ref().and_then(nsm_model::to_system_time) {
            Some(t) if t < cap => t,
            _ => cap,
        };
        local.expiration_time = Some(prost_types::Timestamp::from(expires));
        registrant(who, &mut local.path_ids);
        let (_, stored) = self
            .write(who, Kind::Endpoint, &namespace, &name, |current| {
                let existing = match current.and_then(|c| c.kind.as_ref()) {
                    Some(pb::resource::Kind::Endpoint(e)) => Some(e),
                    _ => None,
                };
                let mut ep = upstream::nse_from_upstream(&local, existing)?;
                let spec = ep.spec.get_or_insert_with(Default::default);
                // setregistrationtime: the first registration's time is kept for good.
                spec.initial_registration_time = existing
                    .and_then(|e| e.spec.as_ref()?.initial_registration_time)
                    .or(nse.initial_registration_time)
                    .or_else(|| Some(prost_types::Timestamp::from(now)));
                let mut r = pb::Resource {
                    kind: Some(pb::resource::Kind::Endpoint(ep)),
                };
                validate::resource(&mut r)?;
                if current.is_none() {
                    Self::stamp_new(&mut r);
                }
                Ok(Some(r))
            })
            .await?;
        let Some(pb::resource::Kind::Endpoint(e)) = &stored.kind else {
            unreachable!("wrote an endpoint")
        };
        let mut out = upstream::nse_to_upstream(e);
        out.name = nse.name.clone();
        Ok(out)
    }

    /// Upstream Unregister: removes the resource; like upstream, removing what is not there is
    /// not an error (clients unregister after their registration may already have expired).
    pub async fn unregister(&self, who: &Caller, kind: Kind, upstream_name: &str) -> Result<()> {
        if upstream_name.is_empty() {
            return Err(ValidationError::new("name", "must not be empty").into());
        }
        let (namespace, name) = self.local_name("name", upstream_name)?;
        match self.delete(who, kind, &namespace, &name).await {
            Ok(_) | Err(RegistryError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Upstream's updatepath: a workload's registration records its SPIFFE ID first in `path_ids`, so
/// that only it may refresh or remove the name later (registry/client_allowed).
fn registrant(who: &Caller, path_ids: &mut Vec<String>) {
    if let Caller::Workload { id, .. } = who
        && path_ids.first() != Some(id)
    {
        path_ids.insert(0, id.clone());
    }
}
