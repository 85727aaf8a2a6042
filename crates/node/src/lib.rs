//! The nsm-node daemon: one per host. It registers its host as a node and reconciles every client
//! (declarative vWire) assigned to it into kernel state, reporting what it observed as the client's
//! status.
//!
//! The crates of the node, and the direction data flows (docs/ARCHITECTURE.md walks a request):
//! - `nsm-node-plan`: the decisions, sans-IO — registry view + client + kernel state + time →
//!   keep, refresh, build, adopt, rebuild, heal, tear down or not ready.
//! - `nsm-mechanisms`: how a vWire is built — kernel (veth), gateway (NAT), and the negotiated
//!   tunnels VXLAN and WireGuard behind one trait.
//! - `nsm-vl3`: the vL3 routers.
//! - this crate: the daemon — the registry's watches into a cache and a work queue, the
//!   reconciler that plans and carries out, the node's gRPC APIs (the endpoint side of
//!   cross-node vWires, `CreateClient`, MonitorConnection), one error type and its mapping to
//!   gRPC statuses.

#![forbid(unsafe_code)]

mod cache;
mod daemon;
mod endpoint;
mod error;
mod gate;
pub mod identity;
pub mod ipam;
mod local;
pub mod monitor;
mod tokens;
mod wgkeys;
pub use nsm_mechanisms::WireGuardBackend;
pub use nsm_node_plan::select;
pub use nsm_vl3 as vl3;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use daemon::run;
pub use endpoint::{MAX_RESYNC, REMOTE_LIFETIME};
pub use error::{NodeError, Result};
/// Most lanes a userspace WIREGUARD vWire runs (`--wireguard-lanes`).
pub use nsm_wireguard::MAX_LANES as MAX_WIREGUARD_LANES;

/// How the daemon runs.
#[derive(Clone)]
pub struct Config {
    /// Node name (also the name of its Node resource).
    pub name: String,
    /// Registry URL (tcp:// or unix://).
    pub registry: String,
    /// The host's underlay address, where tunnels to it end.
    pub underlay: IpAddr,
    /// The node's identity: mutual TLS with the registry and other nodes. None: `--insecure`
    /// (plaintext TCP, for tests and benchmarks that measure without TLS).
    pub credentials: Option<nsm_identity::Credentials>,
    /// Group whose members may use the unix socket, besides root and the daemon's own user.
    pub socket_group: Option<u32>,
    /// The policies other nodes' requests are checked with (with identities on): upstream's
    /// default server set and the operator's (`--policy-dir`).
    pub policies: nsm_policy::PolicySet,
    /// How often counters are refreshed into client statuses and failed clients are retried.
    pub resync: Duration,
    /// How long an end this node built for another node's client lives without a refresh (its
    /// client's node refreshes every resync); also the grace an end left by an earlier daemon
    /// gets at start-up. [`REMOTE_LIFETIME`] by default.
    pub remote_lifetime: Duration,
    /// The URL other nodes reach this daemon's NetworkService API at (tcp://HOST:PORT).
    pub url: Option<String>,
    /// The host's network namespace, where tunnels leave on the underlay (default: the daemon's
    /// own). Lets several "hosts" share one machine, as the test bed does.
    pub host_netns: Option<PathBuf>,
    /// MTU of the underlay; tunnelled vWires get it less the encapsulation overhead.
    pub underlay_mtu: u32,
    /// Where vL3 routers' DNS servers send names they do not know (default: the host's
    /// resolvers from /etc/resolv.conf).
    pub dns_forward: Vec<std::net::SocketAddr>,
    /// State directory: the node's WireGuard key lives there.
    pub data_dir: PathBuf,
    /// UDP ports for WireGuard vWire ends; `None`: this node builds no WIREGUARD vWires (it
    /// refuses them as an endpoint's node, and offers only VXLAN as a client's).
    pub wireguard_ports: Option<std::ops::RangeInclusive<u16>>,
    /// How long the node's WireGuard key is used before it is replaced (counted from when the key
    /// file was written); `None`: until rotated by hand.
    pub wireguard_key_lifetime: Option<Duration>,
    /// Rotates the WireGuard key now when notified (the `nsm node` binary does on SIGUSR1).
    pub wireguard_rotate: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Where WIREGUARD vWires run: the kernel's WireGuard or nsm's userspace tunnel.
    pub wireguard_backend: WireGuardBackend,
    /// Lanes per userspace WIREGUARD vWire (per-core workers; `nsm_wireguard::LaneConfig`).
    pub wireguard_lanes: usize,
}
