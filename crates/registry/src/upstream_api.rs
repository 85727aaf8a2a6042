//! Upstream's registry services over the registry's state.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use nsm_api::registry::{
    self as reg, network_service_endpoint_registry_server::NetworkServiceEndpointRegistry,
    network_service_registry_server::NetworkServiceRegistry,
};
use nsm_model::{Kind, pb, upstream};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::cache::{Change, State};
use crate::{Caller, Registry, RegistryError};

pub(crate) struct NsRegistry(pub(crate) Registry);
pub(crate) struct NseRegistry(pub(crate) Registry);

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Upstream clients send the registration path in the `path` metadata and read the updated path
/// back from the response header of the same name. Until per-hop tokens exist, the path passes
/// through unchanged, which upstream clients accept.
fn with_path<T, R>(req: &Request<R>, body: T) -> Response<T> {
    let mut resp = Response::new(body);
    if let Some(p) = req.metadata().get("path") {
        resp.metadata_mut().insert("path", p.clone());
    }
    resp
}

/// Turns a change subscription into a stream of responses; ends with ABORTED if the watcher falls
/// behind, so that the client finds again instead of silently missing changes.
pub(crate) fn follow<T, F>(initial: Vec<T>, rx: broadcast::Receiver<Arc<Change>>, map: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnMut(&Change) -> Option<T> + Send + 'static,
{
    let live = futures::stream::unfold(Some((rx, map)), |state| async move {
        let (mut rx, mut map) = state?;
        loop {
            match rx.recv().await {
                Ok(change) => {
                    if let Some(item) = map(&change) {
                        return Some((Ok(item), Some((rx, map))));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Some((Err(Status::from(RegistryError::WatchLagged)), None));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Box::pin(futures::stream::iter(initial.into_iter().map(Ok)).chain(live))
}

pub(crate) fn no_watch<T: Send + 'static>(initial: Vec<T>) -> BoxStream<T> {
    Box::pin(futures::stream::iter(initial.into_iter().map(Ok)))
}

impl Registry {
    /// Rewrites the names of an upstream query into local upstream form (domain stripped).
    fn local_query_name(&self, field: &str, name: &str) -> Result<String, RegistryError> {
        if name.is_empty() {
            return Ok(String::new());
        }
        let (ns, n) = self.local_name(field, name)?;
        Ok(upstream::name_of(&ns, &n))
    }
}

fn find_services(state: &State, q: &reg::NetworkService) -> Vec<reg::NetworkServiceResponse> {
    let one = |i: &crate::cache::Item| match &i.kind {
        Some(pb::resource::Kind::NetworkService(n)) => Some(upstream::ns_to_upstream(n)),
        _ => None,
    };
    let candidates: Vec<reg::NetworkService> = if q.name.is_empty() {
        state.kind(Kind::NetworkService).filter_map(|i| one(&i)).collect()
    } else {
        upstream::parse_name("name", &q.name)
            .ok()
            .and_then(|(ns, n, _)| state.get(Kind::NetworkService, &Kind::NetworkService.key(&ns, &n)))
            .and_then(|i| one(&i))
            .into_iter()
            .collect()
    };
    candidates
        .into_iter()
        .filter(|s| upstream::match_ns(q, s))
        .map(|s| reg::NetworkServiceResponse {
            network_service: Some(s),
            deleted: false,
        })
        .collect()
}

fn nse_of(i: &crate::cache::Item) -> Option<reg::NetworkServiceEndpoint> {
    match &i.kind {
        Some(pb::resource::Kind::Endpoint(e)) => Some(upstream::nse_to_upstream(e)),
        _ => None,
    }
}

fn find_endpoints(state: &State, q: &reg::NetworkServiceEndpoint) -> Vec<reg::NetworkServiceEndpointResponse> {
    let candidates: Vec<reg::NetworkServiceEndpoint> = if !q.name.is_empty() {
        upstream::parse_name("name", &q.name)
            .ok()
            .and_then(|(ns, n, _)| state.get(Kind::Endpoint, &Kind::Endpoint.key(&ns, &n)))
            .and_then(|i| nse_of(&i))
            .into_iter()
            .collect()
    } else if let Some(first) = q.network_service_names.first() {
        // Index: only endpoints offering the first queried service are candidates.
        state
            .endpoints_by_service
            .get(first)
            .into_iter()
            .flatten()
            .filter_map(|key| state.get(Kind::Endpoint, key))
            .filter_map(|i| nse_of(&i))
            .collect()
    } else {
        state.kind(Kind::Endpoint).filter_map(|i| nse_of(&i)).collect()
    };
    candidates
        .into_iter()
        .filter(|e| upstream::match_nse(q, e))
        .map(|e| reg::NetworkServiceEndpointResponse {
            network_service_endpoint: Some(e),
            deleted: false,
        })
        .collect()
}

/// The upstream form of a change, if it concerns `kind`: (object, deleted).
fn changed<T>(c: &Change, kind: Kind, conv: impl Fn(&crate::cache::Item) -> Option<T>) -> Option<(T, bool)> {
    if c.kind != kind {
        return None;
    }
    match (&c.new, &c.old) {
        (Some(n), _) => conv(n).map(|x| (x, false)),
        (None, Some(o)) => conv(o).map(|x| (x, true)),
        (None, None) => None,
    }
}

#[tonic::async_trait]
impl NetworkServiceRegistry for NsRegistry {
    type FindStream = BoxStream<reg::NetworkServiceResponse>;

    async fn register(&self, req: Request<reg::NetworkService>) -> Result<Response<reg::NetworkService>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let out = self.0.register_ns(&who, req.get_ref()).await?;
        Ok(with_path(&req, out))
    }

    async fn find(&self, req: Request<reg::NetworkServiceQuery>) -> Result<Response<Self::FindStream>, Status> {
        nsm_authz::caller::<Caller, _>(&req)?.may_read(Kind::NetworkService, "")?;
        let q = req.into_inner();
        let mut query = q.network_service.unwrap_or_default();
        query.name = self.0.local_query_name("network_service.name", &query.name)?;
        let (initial, rx) = self.0.inner.cache.snapshot_and_subscribe(|s| find_services(s, &query));
        if !q.watch {
            return Ok(Response::new(no_watch(initial)));
        }
        let stream = follow(initial, rx, move |c| {
            let one = |i: &crate::cache::Item| match &i.kind {
                Some(pb::resource::Kind::NetworkService(n)) => Some(upstream::ns_to_upstream(n)),
                _ => None,
            };
            let (ns, deleted) = changed(c, Kind::NetworkService, one)?;
            upstream::match_ns(&query, &ns).then_some(reg::NetworkServiceResponse {
                network_service: Some(ns),
                deleted,
            })
        });
        Ok(Response::new(stream))
    }

    async fn unregister(&self, req: Request<reg::NetworkService>) -> Result<Response<()>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        self.0
            .unregister(&who, Kind::NetworkService, &req.get_ref().name)
            .await?;
        Ok(with_path(&req, ()))
    }
}

#[tonic::async_trait]
impl NetworkServiceEndpointRegistry for NseRegistry {
    type FindStream = BoxStream<reg::NetworkServiceEndpointResponse>;

    async fn register(
        &self,
        req: Request<reg::NetworkServiceEndpoint>,
    ) -> Result<Response<reg::NetworkServiceEndpoint>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        let out = self.0.register_nse(&who, req.get_ref()).await?;
        Ok(with_path(&req, out))
    }

    async fn find(&self, req: Request<reg::NetworkServiceEndpointQuery>) -> Result<Response<Self::FindStream>, Status> {
        nsm_authz::caller::<Caller, _>(&req)?.may_read(Kind::Endpoint, "")?;
        let q = req.into_inner();
        let mut query = q.network_service_endpoint.unwrap_or_default();
        query.name = self.0.local_query_name("network_service_endpoint.name", &query.name)?;
        for (i, n) in query.network_service_names.iter_mut().enumerate() {
            *n = self
                .0
                .local_query_name(&format!("network_service_endpoint.network_service_names[{i}]"), n)?;
        }
        let (initial, rx) = self.0.inner.cache.snapshot_and_subscribe(|s| find_endpoints(s, &query));
        if !q.watch {
            return Ok(Response::new(no_watch(initial)));
        }
        let stream = follow(initial, rx, move |c| {
            let (nse, deleted) = changed(c, Kind::Endpoint, nse_of)?;
            upstream::match_nse(&query, &nse).then_some(reg::NetworkServiceEndpointResponse {
                network_service_endpoint: Some(nse),
                deleted,
            })
        });
        Ok(Response::new(stream))
    }

    async fn unregister(&self, req: Request<reg::NetworkServiceEndpoint>) -> Result<Response<()>, Status> {
        let who: Caller = nsm_authz::caller(&req)?;
        self.0.unregister(&who, Kind::Endpoint, &req.get_ref().name).await?;
        Ok(with_path(&req, ()))
    }
}
