//! Upstream's `connection.MonitorConnection` on the node: every vWire this node holds, as an
//! upstream `Connection`, streamed with upstream's event semantics (one INITIAL_STATE_TRANSFER with
//! everything that matches the scope selector, then UPDATE and DELETE; events with no matching
//! connection are not sent).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nsm_api::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, PathSegment,
    monitor_connection_server::MonitorConnection,
};
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

/// Whether `conn` is in the scope of `selector` (api `MatchesMonitorScopeSelector`): services
/// empty = any, else the connection's service is one of them; segments empty = any, else they
/// must match a contiguous run of the connection's path, where an empty name, id or token in a
/// selector segment matches anything.
pub fn in_scope(selector: &MonitorScopeSelector, conn: &Connection) -> bool {
    if !selector.network_services.is_empty() && !selector.network_services.contains(&conn.network_service) {
        return false;
    }
    let want = &selector.path_segments;
    if want.is_empty() {
        return true;
    }
    let have = conn
        .path
        .as_ref()
        .map(|p| p.path_segments.as_slice())
        .unwrap_or_default();
    let seg_ok = |w: &PathSegment, h: &PathSegment| {
        (w.name.is_empty() || w.name == h.name)
            && (w.id.is_empty() || w.id == h.id)
            && (w.token.is_empty() || w.token == h.token)
    };
    have.windows(want.len())
        .any(|win| win.iter().zip(want).all(|(h, w)| seg_ok(w, h)))
}

/// The connections of this node and the stream of their changes.
#[derive(Clone)]
pub struct Monitor {
    conns: Arc<Mutex<HashMap<String, Connection>>>,
    tx: broadcast::Sender<(ConnectionEventType, Connection)>,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            conns: Arc::default(),
            tx: broadcast::channel(4096).0,
        }
    }
}

impl Monitor {
    /// A connection was created or changed (sent only when it did change).
    pub fn update(&self, conn: Connection) {
        let mut m = self.conns.lock();
        if m.get(&conn.id) == Some(&conn) {
            return;
        }
        m.insert(conn.id.clone(), conn.clone());
        let _ = self.tx.send((ConnectionEventType::Update, conn));
    }

    /// A connection is gone.
    pub fn delete(&self, id: &str) {
        let mut m = self.conns.lock();
        if let Some(conn) = m.remove(id) {
            let _ = self.tx.send((ConnectionEventType::Delete, conn));
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ConnectionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl MonitorConnection for Monitor {
    type MonitorConnectionsStream = EventStream;

    async fn monitor_connections(
        &self,
        req: Request<MonitorScopeSelector>,
    ) -> Result<Response<Self::MonitorConnectionsStream>, Status> {
        let selector = req.into_inner();
        let (initial, rx) = {
            let m = self.conns.lock();
            let initial: HashMap<String, Connection> = m
                .values()
                .filter(|c| in_scope(&selector, c))
                .map(|c| (c.id.clone(), c.clone()))
                .collect();
            (initial, self.tx.subscribe())
        };
        let first = ConnectionEvent {
            r#type: ConnectionEventType::InitialStateTransfer as i32,
            connections: initial,
        };
        let live = futures::stream::unfold((rx, selector), |(mut rx, selector)| async move {
            loop {
                match rx.recv().await {
                    Ok((t, conn)) if in_scope(&selector, &conn) => {
                        let ev = ConnectionEvent {
                            r#type: t as i32,
                            connections: [(conn.id.clone(), conn)].into(),
                        };
                        return Some((Ok(ev), (rx, selector)));
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some((
                            Err(Status::aborted("monitor fell behind; subscribe again")),
                            (rx, selector),
                        ));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let stream = futures::StreamExt::chain(futures::stream::iter([Ok(first)]), live);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_api::connection::Path;

    fn conn(service: &str, segs: &[(&str, &str)]) -> Connection {
        Connection {
            id: segs.first().map(|s| s.1.to_owned()).unwrap_or_default(),
            network_service: service.into(),
            path: Some(Path {
                index: 0,
                path_segments: segs
                    .iter()
                    .map(|(n, i)| PathSegment {
                        name: n.to_string(),
                        id: i.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    fn sel(services: &[&str], segs: &[(&str, &str)]) -> MonitorScopeSelector {
        MonitorScopeSelector {
            network_services: services.iter().map(|s| s.to_string()).collect(),
            path_segments: segs
                .iter()
                .map(|(n, i)| PathSegment {
                    name: n.to_string(),
                    id: i.to_string(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn scope_selectors() {
        let c = conn("icmp", &[("nsc", "1"), ("node-a", "1"), ("nse", "1")]);
        assert!(in_scope(&sel(&[], &[]), &c), "empty selector: everything");
        assert!(in_scope(&sel(&["icmp"], &[]), &c));
        assert!(!in_scope(&sel(&["dns"], &[]), &c));
        assert!(
            in_scope(&sel(&[], &[("node-a", ""), ("nse", "")]), &c),
            "contiguous run, wildcard ids"
        );
        assert!(!in_scope(&sel(&[], &[("nsc", ""), ("nse", "")]), &c), "not contiguous");
        assert!(in_scope(&sel(&[], &[("", "1")]), &c), "empty name is a wildcard");
        assert!(!in_scope(&sel(&[], &[("nsc", "2")]), &c));
    }
}
