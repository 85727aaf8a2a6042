//! Client statuses: written to the registry when they change, without holding up the work (the
//! write commits while the next client is reconciled), in order per client; and a Ready client
//! as upstream's `Connection`, for MonitorConnection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use nsm_api::connection::{Connection, Mechanism, Path as ConnPath, PathSegment};
use nsm_api::connectioncontext::{ConnectionContext, IpContext};
use nsm_api::nsm::v1;
use nsm_model::{Kind, pb, upstream};
use nsm_node_plan::ClientKey;

use super::reconciler::{Reconciler, monitor_id};

/// Status writes in flight, at most one per client (a newer one waits for the older, so they
/// land in order), and the clients whose last write failed (written again at their next
/// reconcile).
#[derive(Default)]
pub(crate) struct Reports {
    in_flight: parking_lot::Mutex<HashMap<ClientKey, tokio::task::JoinHandle<()>>>,
    unreported: Arc<parking_lot::Mutex<HashSet<ClientKey>>>,
}

impl Reports {
    /// Writes the client's status if it changed (or its last write failed).
    pub(crate) async fn report(
        &self,
        r: &Reconciler,
        key: &ClientKey,
        client: &pb::Client,
        mut status: v1::ClientStatus,
    ) {
        let mut old = client.status.clone().unwrap_or_default();
        old.updated = None;
        status.updated = None;
        let retry = self.unreported.lock().remove(key);
        if client.status.is_some() && old == status && !retry {
            return;
        }
        status.updated = Some(prost_types::Timestamp::from(SystemTime::now()));
        // What the registry will hold, so the next reconcile compares against it.
        if let Some(c) = r.state.lock().clients.get_mut(key) {
            c.status = Some(status.clone());
        }
        // Only this client's reconcile writes its status, so nothing else waits on this one.
        let previous = self.in_flight.lock().remove(key);
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        let reference = v1::ResourceRef {
            kind: Kind::Client.to_pb() as i32,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        let mut registry = r.registry.clone();
        let unreported = self.unreported.clone();
        let k = key.clone();
        let write = tokio::spawn(async move {
            let req = v1::UpdateStatusRequest {
                r#ref: Some(reference),
                status: Some(status),
            };
            match registry.update_status(req).await {
                Ok(_) => {}
                // Deleted meanwhile: nothing to report.
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => {
                    tracing::warn!(client = %k, error = %s.message(), "cannot report status");
                    unreported.lock().insert(k);
                }
            }
        });
        let mut in_flight = self.in_flight.lock();
        in_flight.retain(|_, h| !h.is_finished());
        in_flight.insert(key.clone(), write);
    }
}

/// A Ready client as upstream's `Connection`, for MonitorConnections.
pub(crate) fn upstream_connection(key: &ClientKey, client: &pb::Client, st: &v1::ClientStatus) -> Connection {
    let spec = client.spec.clone().unwrap_or_default();
    let mut params = HashMap::new();
    params.insert("name".to_owned(), spec.interface.clone());
    params.insert("inodeURL".to_owned(), format!("file://{}", spec.netns));
    let labels = client.metadata.as_ref().map(|m| m.labels.clone()).unwrap_or_default();
    let id = monitor_id(client);
    let segments = st
        .path
        .iter()
        .map(|name| PathSegment {
            name: name.clone(),
            id: id.clone(),
            ..Default::default()
        })
        .collect();
    Connection {
        id: id.clone(),
        network_service: upstream::qualify(&spec.network_service, &key.namespace),
        mechanism: Some(Mechanism {
            cls: "LOCAL".into(),
            r#type: st.mechanism.clone(),
            parameters: params,
        }),
        context: Some(ConnectionContext {
            ip_context: Some(IpContext {
                src_ip_addrs: st.src_ip_addrs.clone(),
                dst_ip_addrs: st.dst_ip_addrs.clone(),
                dst_routes: st
                    .routes
                    .iter()
                    .map(|r| nsm_api::connectioncontext::Route {
                        prefix: r.clone(),
                        next_hop: String::new(),
                    })
                    .collect(),
                ..Default::default()
            }),
            mtu: st.mtu,
            ..Default::default()
        }),
        labels,
        path: Some(ConnPath {
            index: 0,
            path_segments: segments,
        }),
        network_service_endpoint_name: st.endpoint.clone(),
        payload: "IP".into(),
        state: nsm_api::connection::State::Up as i32,
    }
}
