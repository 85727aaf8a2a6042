//! The gate in front of each gRPC service (DESIGN.md §8: one tower layer per concern, at the tonic
//! boundary). For every request it turns the connection's [`Peer`] (what the transport
//! authenticated: a SPIFFE ID, a unix socket's credentials, nothing) into the server's own notion
//! of a caller and decides whether that caller may call this method at all — deny by default,
//! before any handler runs. The caller is left in the request's extensions, where handlers that
//! must look at the request's content (whose namespace, which node's client) find it.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::task::{Context, Poll};

use nsm_transport::Peer;
use tonic::server::NamedService;

/// A server's authorization rules at the method level.
pub trait Gate: Send + Sync + 'static {
    /// Who a caller is, as the server's handlers want to know it.
    type Caller: Clone + Send + Sync + 'static;

    /// Admits `peer` to `method` (`/package.Service/Method`) or refuses it; a refusal is
    /// `PermissionDenied` naming the identity and the rule. `None`: the connection carries no
    /// [`Peer`] (a server not started through nsm-transport), which gates should refuse.
    fn admit(&self, peer: Option<&Peer>, method: &str) -> Result<Self::Caller, tonic::Status>;
}

/// A service behind a [`Gate`]; named as the service it wraps, so it routes the same.
pub struct Gated<G, S> {
    gate: Arc<G>,
    inner: S,
}

impl<G, S: Clone> Clone for Gated<G, S> {
    fn clone(&self) -> Self {
        Gated {
            gate: self.gate.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<G, S> Gated<G, S> {
    /// `inner` behind `gate`.
    pub fn new(gate: Arc<G>, inner: S) -> Self {
        Gated { gate, inner }
    }
}

impl<G, S: NamedService> NamedService for Gated<G, S> {
    const NAME: &'static str = S::NAME;
}

impl<G, S, B> tower::Service<http::Request<B>> for Gated<G, S>
where
    G: Gate,
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = Peer::from_extensions(req.extensions());
        match self.gate.admit(peer, req.uri().path()) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                futures::future::Either::Right(self.inner.call(req))
            }
            Err(status) => {
                tracing::info!(method = req.uri().path(), peer = ?peer, reason = status.message(), "refused");
                futures::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The caller a gate admitted, from a request's extensions; `Unauthenticated` when no gate ran
/// (a handler reached without one refuses rather than assuming anything).
pub fn caller<C: Clone + Send + Sync + 'static, T>(req: &tonic::Request<T>) -> Result<C, tonic::Status> {
    req.extensions()
        .get::<C>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("no authorization gate admitted this call"))
}
