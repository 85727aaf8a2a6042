//! The nsm.v1 resource API.

use std::collections::HashMap;

use nsm_api::nsm::v1::{self as v1, resource_service_server::ResourceService};
use nsm_model::{Kind, kind, pairs, pb};
use tonic::{Request, Response, Status};

use crate::addresses;
use crate::cache::Item;
use crate::upstream_api::{BoxStream, follow};
use crate::{Applied, Caller, Registry, RegistryError};

pub(crate) struct ResourceApi(pub(crate) Registry);

/// Whether `item` is in `namespace` (empty = any) and carries every label of `selector`.
pub(crate) fn selected(item: &pb::Resource, namespace: &str, selector: &HashMap<String, String>) -> bool {
    let Some(m) = kind::meta(item) else { return false };
    (namespace.is_empty() || m.namespace == namespace || m.namespace.is_empty())
        && selector.iter().all(|(k, v)| m.labels.get(k) == Some(v))
}

fn reference(r: Option<v1::ResourceRef>) -> Result<(Kind, String, String), Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("ref: missing"))?;
    let kind = Kind::from_pb(r.kind).map_err(RegistryError::from)?;
    if r.name.is_empty() {
        return Err(Status::invalid_argument("ref.name: must not be empty"));
    }
    let namespace = if kind.namespaced() && r.namespace.is_empty() {
        nsm_model::DEFAULT_NAMESPACE.to_owned()
    } else {
        r.namespace
    };
    Ok((kind, namespace, r.name))
}

fn owned(i: Item) -> pb::Resource {
    std::sync::Arc::unwrap_or_clone(i)
}

#[tonic::async_trait]
impl ResourceService for ResourceApi {
    type WatchStream = BoxStream<v1::WatchEvent>;

    async fn create(&self, req: Request<v1::CreateRequest>) -> Result<Response<pb::Resource>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let r = req
            .into_inner()
            .resource
            .ok_or_else(|| Status::invalid_argument("resource: missing"))?;
        Ok(Response::new(owned(self.0.create(&who, r).await?)))
    }

    async fn apply(&self, req: Request<v1::ApplyRequest>) -> Result<Response<v1::ApplyResponse>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let req = req.into_inner();
        let r = req
            .resource
            .ok_or_else(|| Status::invalid_argument("resource: missing"))?;
        let (outcome, stored) = self.0.apply(&who, r, req.dry_run).await?;
        let outcome = match outcome {
            Applied::Created => v1::ApplyOutcome::Created,
            Applied::Configured => v1::ApplyOutcome::Configured,
            Applied::Unchanged => v1::ApplyOutcome::Unchanged,
        };
        Ok(Response::new(v1::ApplyResponse {
            resource: Some(owned(stored)),
            outcome: outcome as i32,
        }))
    }

    async fn get(&self, req: Request<v1::GetRequest>) -> Result<Response<pb::Resource>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let (kind, namespace, name) = reference(req.into_inner().r#ref)?;
        who.may_read(kind, &namespace)?;
        Ok(Response::new(owned(self.0.get(kind, &namespace, &name)?)))
    }

    async fn list(&self, req: Request<v1::ListRequest>) -> Result<Response<v1::ListResponse>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let req = req.into_inner();
        let kind = Kind::from_pb(req.kind).map_err(RegistryError::from)?;
        who.may_read(kind, &req.namespace)?;
        let (items, revision) = self.0.list(kind, &req.namespace, &req.label_selector);
        Ok(Response::new(v1::ListResponse {
            items: items.into_iter().map(owned).collect(),
            revision,
        }))
    }

    async fn delete(&self, req: Request<v1::DeleteRequest>) -> Result<Response<pb::Resource>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let (kind, namespace, name) = reference(req.into_inner().r#ref)?;
        Ok(Response::new(owned(
            self.0.delete(&who, kind, &namespace, &name).await?,
        )))
    }

    async fn update_status(&self, req: Request<v1::UpdateStatusRequest>) -> Result<Response<pb::Resource>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let req = req.into_inner();
        let (kind, namespace, name) = reference(req.r#ref)?;
        if kind != Kind::Client {
            return Err(Status::invalid_argument("ref.kind: only clients have a status"));
        }
        let status = req.status.ok_or_else(|| Status::invalid_argument("status: missing"))?;
        Ok(Response::new(owned(
            self.0.update_status(&who, &namespace, &name, status).await?,
        )))
    }

    async fn allocate_addresses(
        &self,
        req: Request<v1::AllocateAddressesRequest>,
    ) -> Result<Response<v1::AllocateAddressesResponse>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let req = req.into_inner();
        let client = addresses::client_of("client", req.client)?;
        self.0.may_act_for(&who, &client)?;
        let pool = pairs::pool("pool", &req.pool).map_err(RegistryError::from)?;
        let wanted = addresses::wanted_of(&req.src_ip_addr, &req.dst_ip_addr, pool)?;
        let (lease, created) = self.0.allocate_addresses(client, pool, wanted).await?;
        Ok(Response::new(v1::AllocateAddressesResponse {
            lease: Some(lease),
            created,
        }))
    }

    async fn release_addresses(
        &self,
        req: Request<v1::ReleaseAddressesRequest>,
    ) -> Result<Response<v1::ReleaseAddressesResponse>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let client = addresses::client_of("client", req.into_inner().client)?;
        self.0.may_act_for(&who, &client)?;
        Ok(Response::new(v1::ReleaseAddressesResponse {
            released: self.0.release_addresses(&client).await?,
        }))
    }

    async fn list_address_leases(
        &self,
        req: Request<v1::ListAddressLeasesRequest>,
    ) -> Result<Response<v1::ListAddressLeasesResponse>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let namespace = req.into_inner().namespace;
        who.may_read(Kind::Client, &namespace)?;
        Ok(Response::new(v1::ListAddressLeasesResponse {
            leases: self.0.address_leases(&namespace).await?,
        }))
    }

    async fn watch(&self, req: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use v1::watch_event::Type;
        let who: Caller = nsm_authz::caller(&req)?;
        let req = req.into_inner();
        let kind = Kind::from_pb(req.kind).map_err(RegistryError::from)?;
        who.may_read(kind, &req.namespace)?;
        let (namespace, selector) = (req.namespace, req.label_selector);
        let (initial, rx) = self.0.inner.cache.snapshot_and_subscribe(|s| {
            let revision = s.revision;
            s.kind(kind)
                .filter(|i| selected(i, &namespace, &selector))
                .map(|i| v1::WatchEvent {
                    r#type: Type::Initial as i32,
                    resource: Some(owned(i)),
                    revision,
                })
                .collect::<Vec<_>>()
        });
        let stream = follow(initial, rx, move |c| {
            if c.kind != kind {
                return None;
            }
            let (t, item) = match (&c.old, &c.new) {
                (None, Some(n)) => (Type::Added, n),
                (Some(_), Some(n)) => (Type::Modified, n),
                (Some(o), None) => (Type::Deleted, o),
                (None, None) => return None,
            };
            selected(item, &namespace, &selector).then(|| v1::WatchEvent {
                r#type: t as i32,
                resource: Some((**item).clone()),
                revision: c.revision,
            })
        });
        Ok(Response::new(stream))
    }
}
