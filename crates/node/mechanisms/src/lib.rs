//! The data-plane mechanisms, one module each: `kernel` (a veth pair between two namespaces of
//! this host), `gateway` (forwarding and source NAT towards an address endpoint), and the
//! cross-node tunnels `vxlan` and `wireguard` (kernel and userspace backends), which implement
//! [`Tunnel`]: the client's node offers, the endpoint's node accepts a validated offer and builds
//! its end, the client's node connects its end to the answer, either side removes its end.
//! Adding a tunnel mechanism means adding a module, implementing [`Tunnel`] and registering it in
//! [`Tunnels`]. Upstream's mechanism and parameter names stay as they are on the wire.

#![forbid(unsafe_code)]

mod error;
pub mod gateway;
pub mod kernel;
pub mod vxlan;
pub mod wireguard;

pub use error::{MechanismError, Result};

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use nsm_api::connection::Mechanism;
use nsm_dataplane::{NetNs, Netlink};
use nsm_node_plan::{MechanismKind, Pair};

/// FNV-1a of `id`: unlike std's hasher, stable across restarts and versions, so what a daemon
/// derives from an id (link names, VNIs, WireGuard ports) a restarted one derives alike.
pub fn stable_hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A link name derived from an id: `prefix` + 10 hex digits of its [`stable_hash`], so a
/// restarted daemon finds what it built. With a 4-character prefix it fits the kernel's
/// 15-character limit.
pub fn link_name(prefix: &str, id: &str) -> String {
    format!("{prefix}{:010x}", stable_hash(id) & 0xff_ffff_ffff)
}

/// The far end's link of a connection: in the endpoint's namespace (a veth peer, a tunnel end).
pub fn peer_link(id: &str) -> String {
    link_name("nsm-", id)
}

/// Netlink handles by namespace path, so reconciling does not open a namespace and spawn a thread
/// for a new socket on every look. An entry is used only while the path still names the same
/// namespace (same inode), and dropped when it does not.
type NlCache = std::sync::Mutex<HashMap<String, ((u64, u64), Arc<NetNs>, Netlink)>>;

static NL_CACHE: std::sync::LazyLock<NlCache> = std::sync::LazyLock::new(Default::default);

/// A netlink handle in the namespace at `path` (cached, see [`NlCache`]).
pub async fn netlink_in(path: &str) -> Result<(Arc<NetNs>, Netlink)> {
    let id = nsm_dataplane::netns_identity(path);
    if let Some(id) = id
        && let Some((cached_id, ns, nl)) = NL_CACHE.lock().expect("not poisoned").get(path).cloned()
        && cached_id == id
    {
        return Ok((ns, nl));
    }
    let ns = Arc::new(NetNs::open(Path::new(path))?);
    let nl = Netlink::connect(&ns).await?;
    let id = ns.inode()?;
    NL_CACHE
        .lock()
        .expect("not poisoned")
        .insert(path.to_owned(), (id, ns.clone(), nl.clone()));
    Ok((ns, nl))
}

/// Forgets handles of namespaces that are gone or replaced (their fds would keep them alive).
pub fn prune_netlink_cache() {
    NL_CACHE
        .lock()
        .expect("not poisoned")
        .retain(|path, (id, _, _)| nsm_dataplane::netns_identity(path) == Some(*id));
}

/// The client's end of a cross-node vWire, as its node builds it.
pub struct ClientEnd<'a> {
    /// The connection id (the client's uid).
    pub id: &'a str,
    /// The client's namespace and interface.
    pub netns: &'a str,
    /// The client's interface.
    pub interface: &'a str,
    /// The vWire's addresses.
    pub pair: Pair,
    /// The address endpoint beyond the far end, if any (the peer may send from it too).
    pub route: Option<IpNet>,
    /// The endpoint node's underlay address (where its end listens unless it answers another).
    pub peer_underlay: IpAddr,
}

/// Routes what lies beyond the peer (an address endpoint) through a client's tunnel end: the
/// last step of every tunnel's `connect`.
async fn route_beyond(end: &ClientEnd<'_>) -> Result<()> {
    let Some(route) = end.route else { return Ok(()) };
    let (_ns, nl) = netlink_in(end.netns).await?;
    Ok(nl.add_route(route, Some(end.pair.dst.addr()), end.interface).await?)
}

/// What a client's end was built as.
pub struct Connected {
    /// The interface MTU.
    pub mtu: u32,
    /// A WIREGUARD end: its tunnel's id in the node's [`wireguard::Wg`].
    pub wg_id: Option<String>,
}

/// A request for the endpoint's end of a cross-node vWire, its fields checked.
pub struct EndRequest<'a> {
    /// The connection id.
    pub id: &'a str,
    /// Where the end goes: the endpoint's namespace, or the host's for an address endpoint.
    pub netns: &'a Path,
    /// The end's link name.
    pub link: &'a str,
    /// The vWire's addresses (`src` the client's, `dst` the endpoint side's).
    pub pair: Pair,
    /// The offer the client's node made.
    pub offer: &'a Mechanism,
}

/// An end this node built for another node's client, as far as keeping and removing it needs.
#[derive(Clone, Debug)]
pub enum EndState {
    /// A VXLAN link.
    Vxlan,
    /// A WireGuard tunnel, with what it was built for.
    WireGuard(wireguard::WgEnd),
}

/// What the endpoint's node answers: the end it keeps, and the parameters of its answer beyond
/// the offer's (`dst_ip`, `dst_port`, `MTU`, keys).
pub struct Accepted {
    pub state: EndState,
    pub params: HashMap<String, String>,
    pub mtu: u32,
}

/// A cross-node mechanism, negotiated over upstream's `NetworkService.Request`.
#[tonic::async_trait]
pub trait Tunnel: Send + Sync {
    /// The client's node: what it offers for connection `id`.
    fn offer(&self, id: &str) -> Result<Mechanism>;

    /// The endpoint's node: whether an offer's parameters are well formed (a bad one is
    /// `Invalid`, naming the parameter), checked before anything is looked up or touched.
    fn check_offer(&self, offer: &Mechanism) -> Result<()>;

    /// The endpoint's node: builds its end for a request (or keeps it, on a refresh: `known` is
    /// what stands for this connection). The offer's parameters are parsed into this
    /// mechanism's own typed offer before anything is touched; a bad one is `InvalidArgument`
    /// naming the parameter.
    async fn accept(&self, req: &EndRequest<'_>, known: Option<&(PathBuf, String, EndState)>) -> Result<Accepted>;

    /// The client's node: builds its end from the endpoint node's answer, with the route to
    /// what lies beyond the peer. All or nothing.
    async fn connect(&self, end: &ClientEnd<'_>, answer: &Mechanism) -> Result<Connected>;

    /// Removes an end this node built (either side): link `link` in `netns`, or tunnel `tunnel`
    /// of the node's WireGuard side.
    async fn remove(&self, netns: &Path, link: &str, tunnel: Option<&str>);
}

/// The tunnel mechanisms this node builds, in order of preference when encryption is asked for.
#[derive(Clone)]
pub struct Tunnels {
    pub vxlan: Arc<vxlan::Vxlan>,
    pub wireguard: Option<Arc<wireguard::Wg>>,
}

impl EndState {
    /// The mechanism of the end.
    pub fn kind(&self) -> MechanismKind {
        match self {
            EndState::Vxlan => MechanismKind::Vxlan,
            EndState::WireGuard(_) => MechanismKind::WireGuard,
        }
    }

    /// A WireGuard end's tunnel id.
    pub fn tunnel(&self) -> Option<&str> {
        match self {
            EndState::Vxlan => None,
            EndState::WireGuard(w) => Some(&w.tunnel),
        }
    }
}

impl Tunnels {
    /// The module of mechanism `kind`, if this node builds it.
    pub fn get(&self, kind: MechanismKind) -> Option<&dyn Tunnel> {
        match kind {
            MechanismKind::Vxlan => Some(self.vxlan.as_ref()),
            MechanismKind::WireGuard => self.wireguard.as_deref().map(|w| w as &dyn Tunnel),
            MechanismKind::Kernel => None,
        }
    }

    /// What this node builds, by upstream name, for messages.
    pub fn names(&self) -> String {
        if self.wireguard.is_some() {
            "VXLAN and WIREGUARD".into()
        } else {
            "VXLAN".into()
        }
    }
}

/// A required mechanism parameter, parsed.
pub fn param<T: std::str::FromStr>(m: &Mechanism, key: &str, what: &str) -> Result<T> {
    m.parameters
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| MechanismError::invalid(format!("mechanism.parameters.{key}"), format!("missing or not {what}")))
}

/// Where a node runs its WIREGUARD vWires. Both speak the same protocol with the same keys, so
/// nodes of either kind connect to each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireGuardBackend {
    /// The kernel's WireGuard when the kernel has it (checked at start), else userspace.
    #[default]
    Auto,
    /// The kernel's WireGuard; the daemon does not start without it.
    Kernel,
    /// nsm's userspace tunnel (a TUN device per vWire, served by this process).
    Userspace,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_fit() {
        assert_eq!(link_name("nsm-", "abc"), link_name("nsm-", "abc"));
        assert_ne!(link_name("nsm-", "abc"), link_name("nsm-", "abd"));
        assert_eq!(peer_link("some-uid").len(), 14);
        let mut m = Mechanism::default();
        m.parameters.insert("vni".into(), "x".into());
        let e = param::<u32>(&m, "vni", "a 24-bit number").unwrap_err();
        assert_eq!(
            e.to_string(),
            "mechanism.parameters.vni: missing or not a 24-bit number"
        );
    }
}
