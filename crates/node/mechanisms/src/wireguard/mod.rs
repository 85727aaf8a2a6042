//! Encrypted cross-node vWires: upstream's `WIREGUARD` mechanism, run by the kernel's WireGuard
//! where the kernel has it and by nsm-wireguard's userspace tunnels elsewhere (both speak the same
//! protocol, so nodes of either kind connect). Each node has one static key pair (kept in its data
//! directory); each vWire end is one WireGuard interface in the workload's namespace whose UDP
//! socket sits in the host namespace on the underlay, on a port of its own from the node's range.
//! A userspace tunnel lives in this process (a restarted daemon builds it again); a kernel link
//! outlives the daemon, and a restarted daemon adopts it with its session.
//!
//! Key rotation: the node replaces its key when it is older than its lifetime, or when asked
//! ([`Wg::spawn_rotation`]). The new key is on disk before anything uses it; every tunnel moves to
//! it — make-before-break in userspace (the old session carries traffic until the peer completes a
//! handshake with the new key); the kernel drops its sessions when its key changes, so a kernel
//! end is without traffic until the peer has the new key — and the peer learns the new public key
//! the way it learnt the first one, in the mechanism parameters: `src_public_key` of the client
//! node's refresh, `dst_public_key` of the endpoint node's answer. The node also publishes its
//! public key in its registration, so the other nodes refresh their vWires to it as soon as they
//! see it change. Each side changes its tunnel's peer key in place.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use nsm_api::connection::Connection;
use nsm_dataplane::{NetNs, Netlink, WgDeviceUpdate, WgPeerUpdate};
use nsm_wireguard::Tunnel;

use crate::WireGuardBackend;

mod build;
mod keys;
mod negotiate;
pub mod params;

pub use build::is_ours;
use build::set_kernel;
use keys::{Keys, key_age, write_key};
pub use keys::{choose_backend, load_or_create_key};
pub use negotiate::WgEnd;

/// Upstream's mechanism type and its parameter keys (api:pkg/api/networkservice/mechanisms/wireguard;
/// see shared/reference/nsm-upstream.md §1.7). `src_ip`, `dst_ip`, `src_port`, `dst_port` and
/// `MTU` are the common keys VXLAN uses too.
pub const TYPE: &str = "WIREGUARD";
pub const SRC_PUBLIC_KEY: &str = "src_public_key";
pub const DST_PUBLIC_KEY: &str = "dst_public_key";
/// nsm's own keys (upstream ignores parameters it does not know, so a vWire to an upstream node has
/// one lane): the UDP ports of the client end's lanes after the first, which the client's node
/// offers, and of the endpoint end's, which the endpoint's node answers with (as many as both
/// run), comma-separated. See `nsm_wireguard::LaneConfig`.
pub const SRC_LANE_PORTS: &str = "nsm_src_lane_ports";
pub const DST_LANE_PORTS: &str = "nsm_dst_lane_ports";
/// Bytes the underlay MTU loses: outer IPv6 (40) + UDP (8) + WireGuard data header (16) + tag
/// (16) = 80, the worst case that `wg-quick` also assumes (1420 on a 1500 underlay). Over IPv4
/// the overhead is 60, so 20 bytes stay spare; one figure for both families keeps a vWire's MTU
/// independent of the underlay's family.
pub const OVERHEAD: u32 = 80;
/// The keepalive interval (s) briefly set on a kernel peer to start a handshake with it.
const KICK_KEEPALIVE: u16 = 25;
/// How many ports of the range an end tries before it fails.
const PORT_TRIES: usize = 16;
/// The key file in the node's data directory.
const KEY_FILE: &str = "wireguard.key";

/// This node's WireGuard side: its key pair, its port range and its running tunnels.
pub struct Wg {
    keys: parking_lot::RwLock<Keys>,
    /// Where the key file lives.
    dir: PathBuf,
    ports: RangeInclusive<u16>,
    /// Kernel or userspace (never `Auto`: decided at start).
    backend: WireGuardBackend,
    /// Lanes per userspace tunnel (1 with the kernel backend).
    lanes: usize,
    tunnels: parking_lot::Mutex<HashMap<String, Tun>>,
    /// Ports handed out by [`Wg::ports_for`] to ends not built yet (an offer made, the answer
    /// awaited): no other end is given them meanwhile, since several vWires are built at once.
    claimed: parking_lot::Mutex<HashMap<String, Vec<u16>>>,
    /// Where this node's ends listen and what they are built from (see [`Wg::on_host`]).
    host: Option<HostSide>,
}

/// The host side of this node's ends: their UDP sockets are bound in `netns` to `underlay`; their
/// MTU is the underlay's less [`OVERHEAD`].
pub struct HostSide {
    pub underlay: IpAddr,
    pub underlay_mtu: u32,
    pub netns: Arc<NetNs>,
}

impl std::fmt::Debug for Wg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wg")
            .field("public_key", &self.public_key())
            .field("backend", &self.backend)
            .finish()
    }
}

/// One running vWire end.
enum Tun {
    /// nsm-wireguard's tunnel, served by this process.
    User(Tunnel),
    /// A kernel `wireguard` link; what is needed to change it later.
    Kernel(KernelEnd),
}

struct KernelEnd {
    netns: PathBuf,
    name: String,
    port: u16,
    peer_key: [u8; 32],
    peer_endpoint: SocketAddr,
    allowed: Vec<IpNet>,
}

impl Tun {
    fn holds(&self, port: u16) -> bool {
        match self {
            Tun::User(t) => t.local_addrs().iter().any(|a| a.port() == port),
            Tun::Kernel(k) => k.port == port,
        }
    }
}

/// The id of the tunnel a client's node runs for client connection `uid`.
pub fn client_end_id(uid: &str) -> String {
    format!("c/{uid}")
}

/// The id of the tunnel an endpoint's node runs for connection `id`.
pub fn endpoint_end_id(id: &str) -> String {
    format!("e/{id}")
}

/// What one end of a WireGuard vWire needs.
pub struct End<'a> {
    /// Tunnel id within this node ([`client_end_id`] or [`endpoint_end_id`]).
    pub id: String,
    pub netns: &'a Path,
    pub name: &'a str,
    pub host: &'a NetNs,
    pub listen: IpAddr,
    /// The port to bind first (others of the range follow if it is taken).
    pub port: u16,
    pub peer_key: [u8; 32],
    pub peer_endpoint: SocketAddr,
    /// Inner addresses the peer may send from (its address, and what lies beyond it).
    pub allowed: Vec<IpNet>,
    pub mtu: u32,
    pub local_addr: IpNet,
    pub peer_addr: IpNet,
    /// Lanes after the first: the port to bind first (as `port`) and the peer's lane's port.
    pub extra_lanes: Vec<(u16, Option<u16>)>,
}

impl Wg {
    /// The node's WireGuard side with `private_key` (kept in `dir`).
    pub fn new(
        private_key: [u8; 32],
        ports: RangeInclusive<u16>,
        dir: PathBuf,
        backend: WireGuardBackend,
        lanes: usize,
    ) -> Wg {
        Wg {
            keys: parking_lot::RwLock::new(Keys::new(private_key)),
            dir,
            ports,
            backend,
            lanes: if backend == WireGuardBackend::Kernel {
                1
            } else {
                lanes.clamp(1, nsm_wireguard::MAX_LANES)
            },
            tunnels: parking_lot::Mutex::default(),
            claimed: parking_lot::Mutex::default(),
            host: None,
        }
    }

    /// Where this node's ends listen: needed to negotiate vWires ([`crate::Tunnel`]).
    pub fn on_host(mut self, host: HostSide) -> Self {
        self.host = Some(host);
        self
    }

    /// Lanes this node runs per vWire (1: kernel backend, or `--wireguard-lanes 1`).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// `kernel` or `userspace`, as the node's registration says.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            WireGuardBackend::Kernel => "kernel",
            _ => "userspace",
        }
    }

    /// The node's public key as `wg` prints it (what it offers peers now).
    pub fn public_key(&self) -> String {
        self.keys.read().public.clone()
    }

    /// Replaces the node's key: a new one on disk first, then in every tunnel. Returns the new
    /// public key. The peers learn it at the next refresh of each vWire.
    pub async fn rotate(&self) -> std::io::Result<String> {
        let key = nsm_wireguard::generate_private_key();
        write_key(&self.dir, &key)?;
        let public = {
            let mut keys = self.keys.write();
            *keys = Keys::new(key);
            keys.public.clone()
        };
        let mut kernel = Vec::new();
        for (id, t) in self.tunnels.lock().iter() {
            match t {
                Tun::User(t) => t.set_private_key(key),
                Tun::Kernel(k) => kernel.push((id.clone(), k.netns.clone(), k.name.clone())),
            }
        }
        for (id, netns, name) in kernel {
            let update = WgDeviceUpdate {
                private_key: Some(key),
                ..WgDeviceUpdate::default()
            };
            if let Err(e) = set_kernel(&netns, &name, update).await {
                // Its peer is about to move to the new key: the link goes, and the vWire's next
                // refresh builds it again with the new key.
                tracing::warn!(link = %name, netns = %netns.display(), error = %e, "could not give a WireGuard link the new key; deleting it to be rebuilt");
                self.remove(&id).await;
            }
        }
        Ok(public)
    }

    /// Rotates the key when it is older than `lifetime` (its age counted from the key file, so a
    /// restart does not reset it) and whenever `trigger` fires; calls `rotated` after each
    /// rotation (the caller refreshes its vWires then, so peers learn the key at once).
    pub fn spawn_rotation(
        self: &Arc<Self>,
        lifetime: Option<Duration>,
        trigger: Option<Arc<tokio::sync::Notify>>,
        rotated: impl Fn() + Send + 'static,
    ) {
        let lifetime = lifetime.filter(|l| !l.is_zero());
        if lifetime.is_none() && trigger.is_none() {
            return;
        }
        let wg = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let due = async {
                    match lifetime {
                        Some(l) => tokio::time::sleep(l.saturating_sub(key_age(&wg.dir))).await,
                        None => std::future::pending().await,
                    }
                };
                let asked = async {
                    match &trigger {
                        Some(t) => t.notified().await,
                        None => std::future::pending().await,
                    }
                };
                let why = tokio::select! {
                    () = due => "key lifetime reached",
                    () = asked => "asked to",
                };
                match wg.rotate().await {
                    Ok(public_key) => {
                        tracing::info!(%public_key, reason = why, "WireGuard key rotated");
                        rotated();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, dir = %wg.dir.display(), "WireGuard key rotation failed; the old key stays");
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            }
        });
    }

    /// Puts the node's current public key into a connection's WIREGUARD mechanism, so that a
    /// refresh tells the endpoint's node about a rotation.
    pub fn offer_current_key(&self, conn: &mut Connection) {
        if let Some(m) = conn.mechanism.as_mut().filter(|m| m.r#type == TYPE) {
            m.parameters.insert(SRC_PUBLIC_KEY.to_owned(), self.public_key());
        }
    }

    /// After the refresh of client-side tunnel `id`: a new `dst_public_key` (the endpoint's node
    /// rotated its key) goes into the tunnel in place. Returns false when the end must be built
    /// anew instead (other ports or lanes, a key that does not parse, no such tunnel).
    pub async fn refreshed(&self, id: &str, before: &Connection, after: &Connection) -> bool {
        let param = |c: &Connection, k: &str| {
            c.mechanism
                .as_ref()
                .and_then(|m| m.parameters.get(k).cloned())
                .unwrap_or_default()
        };
        if [crate::vxlan::DST_PORT, DST_LANE_PORTS]
            .iter()
            .any(|k| param(before, k) != param(after, k))
        {
            return false;
        }
        let key = param(after, DST_PUBLIC_KEY);
        if key == param(before, DST_PUBLIC_KEY) {
            return true;
        }
        match nsm_wireguard::decode_key(&key) {
            Ok(k) => self.set_peer_key(id, k).await,
            Err(_) => false,
        }
    }

    /// Gives tunnel `id` a new peer public key (the peer's node rotated its key). A userspace
    /// tunnel keeps traffic on the old session until a handshake with the new key completes; a
    /// kernel link swaps the peer and starts that handshake at once. False if there is no such
    /// tunnel, or the kernel refused the change (the caller rebuilds the end).
    pub async fn set_peer_key(&self, id: &str, key: [u8; 32]) -> bool {
        let kernel = {
            let mut tunnels = self.tunnels.lock();
            match tunnels.get_mut(id) {
                Some(Tun::User(t)) => {
                    if t.keys().1 != key {
                        tracing::info!(tunnel = %id, peer_public_key = %nsm_wireguard::encode_key(&key), "WireGuard peer key changed");
                        t.set_peer_public_key(key);
                    }
                    return true;
                }
                Some(Tun::Kernel(k)) if k.peer_key == key => return true,
                Some(Tun::Kernel(k)) => {
                    let old = std::mem::replace(&mut k.peer_key, key);
                    (k.netns.clone(), k.name.clone(), old, k.peer_endpoint, k.allowed.clone())
                }
                None => return false,
            }
        };
        // The kernel keys peers by public key: the old peer goes, the new one comes with the
        // same endpoint and addresses, and with a keepalive, which the kernel sends at once and
        // which, without a session, begins a handshake: the peer's node changed its key and is
        // waiting to be reached with it, and a handshake this end began before the change
        // reached it would otherwise be retried only after REKEY_TIMEOUT (5 s). A second request
        // turns the keepalive off again.
        let (netns, name, old, endpoint, allowed) = kernel;
        tracing::info!(tunnel = %id, peer_public_key = %nsm_wireguard::encode_key(&key), "WireGuard peer key changed");
        let swap = WgDeviceUpdate {
            peers: vec![
                WgPeerUpdate::removal(old),
                WgPeerUpdate {
                    keepalive: Some(KICK_KEEPALIVE),
                    ..WgPeerUpdate::new(key, endpoint, allowed)
                },
            ],
            ..WgDeviceUpdate::default()
        };
        let quiet = WgDeviceUpdate {
            peers: vec![WgPeerUpdate::keepalive(key, 0)],
            ..WgDeviceUpdate::default()
        };
        let changed = async {
            set_kernel(&netns, &name, swap).await?;
            set_kernel(&netns, &name, quiet).await
        };
        match changed.await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(tunnel = %id, error = %e, "could not change a WireGuard link's peer key; rebuilding it");
                false
            }
        }
    }

    /// The ports of a tunnel id's `lanes` lanes, the first lane's first: each a hash of the id
    /// (and the lane) into the range (so it stays the same across restarts), then the next one
    /// that no running tunnel or earlier lane holds. Fewer lanes get a prefix of more lanes' ports;
    /// a range without a free port for a lane after the first gives fewer lanes.
    pub fn ports_for(&self, id: &str, lanes: usize) -> Vec<u16> {
        let (lo, hi) = (u64::from(*self.ports.start()), u64::from(*self.ports.end()));
        let size = hi - lo + 1;
        let tunnels = self.tunnels.lock();
        let mut claimed = self.claimed.lock();
        let taken = |p: u16| {
            tunnels.iter().any(|(k, t)| k != id && t.holds(p)) || claimed.iter().any(|(k, c)| k != id && c.contains(&p))
        };
        let mut ports: Vec<u16> = Vec::with_capacity(lanes);
        for lane in 0..lanes {
            let key = if lane == 0 {
                id.to_owned()
            } else {
                format!("{id}/{lane}")
            };
            let first = crate::stable_hash(&key) % size;
            let free = (0..size)
                .map(|i| u16::try_from(lo + (first + i) % size).unwrap_or(u16::MAX))
                .find(|p| !ports.contains(p) && !taken(*p));
            match free {
                Some(port) => ports.push(port),
                // A full range: the first lane tries the range's start (binding reports the
                // failure); further lanes are left out, so a crowded range means fewer lanes.
                None if lane == 0 => ports.push(*self.ports.start()),
                None => break,
            }
        }
        claimed.insert(id.to_owned(), ports.clone());
        ports
    }

    /// Gives back the ports claimed for end `id` (built, failed, or its vWire gone).
    pub fn unclaim(&self, id: &str) {
        self.claimed.lock().remove(id);
    }

    /// The ports an end tries to bind, in order: `first`, then the next ones of the range
    /// (wrapping round), [`PORT_TRIES`] at most: a port something else holds costs a retry.
    fn ports_from(&self, first: u16) -> impl Iterator<Item = u16> + use<> {
        let (lo, hi) = (*self.ports.start(), *self.ports.end());
        let size = usize::from(hi - lo) + 1;
        std::iter::successors(Some(first), move |&p| Some(if p >= hi { lo } else { p + 1 })).take(size.min(PORT_TRIES))
    }

    /// Whether tunnel `id` runs.
    pub fn has(&self, id: &str) -> bool {
        self.tunnels.lock().contains_key(id)
    }
}

impl Wg {
    /// Stops tunnel `id`: a userspace tunnel's TUN goes with it, a kernel link is deleted.
    pub async fn remove(&self, id: &str) {
        self.unclaim(id);
        self.stop(id).await;
    }

    /// Stops tunnel `id` (its claimed ports stay claimed: it is being built again).
    async fn stop(&self, id: &str) {
        if let Some(Tun::Kernel(k)) = self.remove_entry(id).await
            && let Ok(ns) = NetNs::open(&k.netns)
            && let Ok(nl) = Netlink::connect(&ns).await
            && let Err(e) = nl.delete_link(&k.name).await
        {
            tracing::warn!(link = %k.name, netns = %k.netns.display(), error = %e, "could not delete a WireGuard link");
        }
    }

    /// Forgets tunnel `id`, stopping it if it is a userspace one; a kernel end is returned (its
    /// link left as it is).
    async fn remove_entry(&self, id: &str) -> Option<Tun> {
        let t = self.tunnels.lock().remove(id);
        match t {
            Some(Tun::User(t)) => {
                let _ = tokio::task::spawn_blocking(move || t.stop()).await;
                None
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::keys::*;
    use super::params::*;
    use super::*;

    #[test]
    fn key_file_is_kept_and_private() {
        let dir = std::env::temp_dir().join(format!("nsm-wg-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let k1 = load_or_create_key(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_key(&dir).unwrap(), k1, "a second start keeps the key");
        // A rotation replaces the file (private again, no temporary left) and the offered key.
        let wg = Wg::new(k1, 51820..=51829, dir.clone(), WireGuardBackend::Userspace, 1);
        let before = wg.public_key();
        let public = futures::executor::block_on(wg.rotate()).unwrap();
        assert_ne!(public, before);
        assert_eq!(wg.public_key(), public);
        let k2 = load_or_create_key(&dir).unwrap();
        assert_eq!(nsm_wireguard::encode_key(&nsm_wireguard::public_key(&k2)), public);
        let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.join(format!("{KEY_FILE}.tmp")).exists());
        assert!(key_age(&dir) < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ports_handed_out_are_not_handed_out_again_until_given_back() {
        let wg = Wg::new(
            [1; 32],
            51820..=51821,
            PathBuf::from("/nonexistent"),
            WireGuardBackend::Userspace,
            1,
        );
        // Two ends offered at once (built concurrently) never share a port.
        let a = wg.ports_for("a", 1)[0];
        let b = wg.ports_for("b", 1)[0];
        assert_ne!(a, b);
        assert_eq!(
            wg.ports_for("a", 1)[0],
            a,
            "asking again for the same end keeps its port"
        );
        // A full range: a third end gets the range's start (its bind will report the failure).
        assert_eq!(wg.ports_for("c", 1)[0], 51820);
        wg.unclaim("c");
        wg.unclaim("a");
        assert_eq!(wg.ports_for("c", 1)[0], a, "a given-back port is free again");
    }

    #[test]
    fn ports_are_stable_and_in_range() {
        let wg = Wg::new(
            [1; 32],
            51820..=51829,
            PathBuf::from("/nonexistent"),
            WireGuardBackend::Userspace,
            1,
        );
        let p = wg.ports_for(&client_end_id("abc"), 1)[0];
        assert!((51820..=51829).contains(&p));
        assert_eq!(wg.ports_for(&client_end_id("abc"), 1)[0], p);
        // Binding tries the hashed port, then the next ones, wrapping round, 16 at most.
        assert_eq!(
            wg.ports_from(51828).collect::<Vec<_>>(),
            [51828, 51829, 51820, 51821, 51822, 51823, 51824, 51825, 51826, 51827]
        );
        let wide = Wg::new(
            [1; 32],
            51820..=52819,
            PathBuf::from("/nonexistent"),
            WireGuardBackend::Userspace,
            1,
        );
        assert_eq!(wide.ports_from(52819).count(), 16);
        // Lanes: the first lane's port is the one-lane port; the others differ and stay stable.
        let lanes = wide.ports_for(&client_end_id("abc"), 4);
        assert_eq!(lanes[0], wide.ports_for(&client_end_id("abc"), 1)[0]);
        assert_eq!(lanes, wide.ports_for(&client_end_id("abc"), 4));
        let mut distinct = lanes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 4);
        assert!(lanes.iter().all(|p| (51820..=52819).contains(p)));
        // A range too small for every lane gives fewer lanes.
        let tiny = Wg::new(
            [1; 32],
            51820..=51821,
            PathBuf::from("/nonexistent"),
            WireGuardBackend::Userspace,
            4,
        );
        assert_eq!(tiny.ports_for("x", 4).len(), 2);
        let kernel = Wg::new(
            [1; 32],
            51820..=51829,
            PathBuf::from("/nonexistent"),
            WireGuardBackend::Kernel,
            4,
        );
        assert_eq!(kernel.lanes(), 1);
        assert_eq!(
            parse_lane_ports(Some(&"52001, 52002".to_owned())),
            Ok(vec![52001, 52002])
        );
        assert_eq!(parse_lane_ports(Some(&String::new())), Ok(vec![]));
        assert_eq!(parse_lane_ports(None), Ok(vec![]));
        assert!(parse_lane_ports(Some(&"52001,0".to_owned())).is_err());
        assert!(parse_lane_ports(Some(&"52001,x".to_owned())).is_err());
        let many = format_lane_ports(&[52001; 16]);
        assert!(parse_lane_ports(Some(&many)).is_err());
        // An answer: as many lanes as offered or fewer; more, or a malformed value, is refused.
        let answer = |v: &str| HashMap::from([(DST_LANE_PORTS.to_owned(), v.to_owned())]);
        assert_eq!(answered_lanes(&HashMap::new(), 1), Ok(vec![]));
        assert_eq!(answered_lanes(&answer("52001,52002"), 3), Ok(vec![52001, 52002]));
        assert_eq!(
            answered_lanes(&answer("52001,52002"), 2),
            Err("the endpoint's node answered 3 WireGuard lanes; this node offered 2".to_owned())
        );
        let bad = answered_lanes(&answer("52001,x"), 3).unwrap_err();
        assert!(
            bad.starts_with("the endpoint's node answered a bad nsm_dst_lane_ports: "),
            "{bad}"
        );
        assert_eq!(wide.ports_from(52819).nth(1), Some(51820));
    }
}
