//! The nsm-node daemon: one per host. It registers its host as a node and reconciles every client
//! (declarative vWire) assigned to it into kernel state, reporting what it observed as the client's
//! status.
//!
//! Current scope: same-node vWires with the `KERNEL` mechanism — one veth pair straight from the
//! client's namespace into the endpoint's, so traffic crosses no bridge, no forwarder namespace and
//! no userspace: the cost of a bare veth pair. Endpoint selection follows upstream's `matches`,
//! addresses come from the service's pool, and a vWire whose endpoint disappears is re-wired to
//! another eligible endpoint. Cross-node (VXLAN), address endpoints and the upstream
//! `NetworkService` API on the node come next.

pub mod ipam;
mod reconcile;
pub mod select;

use std::net::IpAddr;
use std::time::Duration;

pub use reconcile::run;

/// How the daemon runs.
#[derive(Clone)]
pub struct Config {
    /// Node name (also the name of its Node resource).
    pub name: String,
    /// Registry URL (tcp:// or unix://).
    pub registry: String,
    /// The host's underlay address, where tunnels to it end.
    pub underlay: IpAddr,
    /// TLS towards the registry.
    pub tls: Option<nsm_transport::ClientTls>,
    /// How often counters are refreshed into client statuses and failed clients are retried.
    pub resync: Duration,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The registry could not be reached or refused the node.
    #[error("registry: {0}")]
    Registry(String),
}
