//! A tunnel: one TUN device, one peer, and per lane (see [`LaneConfig`]) a TUN queue, a UDP socket
//! and two data-plane threads.
//!
//! * `wg-tx<lane>`: TUN → encrypt → UDP. Reads a batch from the TUN (with IFF_VNET_HDR a read is a TSO
//!   super-packet of up to 64 KiB, split into MTU-sized packets in place, see `gso`), encrypts the
//!   whole batch under one lock of the protocol state into one contiguous buffer, and sends runs of
//!   equal-sized datagrams with UDP GSO (one `sendmsg` per run). It also drives the protocol timers.
//! * `wg-rx<lane>`: UDP → decrypt → TUN. Receives with `recvmmsg` and UDP GRO (one buffer holds up to 64
//!   datagrams), decrypts under one lock per receive, and writes the packets to the TUN with TCP/UDP
//!   GRO: each packet is decrypted straight into the super-packet it joins (see `gro`), with a
//!   virtio-net header that leaves checksums to the kernel.
//!
//! All buffers are allocated once per thread at start; nothing is allocated per packet. Idle, the
//! receiving thread sleeps until a datagram comes and the sending one wakes only for the timers
//! (every 250 ms); stopping wakes both through an eventfd.
//! The TUN is created in `tun_netns` and the UDP socket in `udp_netns`; the threads themselves stay
//! in the caller's namespace (an fd keeps the namespace it was created in).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nsm_dataplane::NetNs;
use parking_lot::Mutex;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{DeviceBuilder, IDEAL_BATCH_SIZE, SyncDevice};

use crate::gro::Gro;
use crate::gso;
use crate::peer::{Outcome, Peer};
use crate::stats::{Counters, DropReason, Stats};
use crate::vnet::HDR;
use crate::wire::{self, MessageKind};
use crate::{WgError, keys};

/// Default MTU of the TUN device: 1500 minus IPv6 (40), UDP (8) and WireGuard (32) overheads,
/// as `wg-quick` picks.
pub const DEFAULT_MTU: u16 = 1420;

/// The one peer of a tunnel.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's static public key.
    pub public_key: [u8; 32],
    /// Where to send to; `None` to wait for the peer to reach us first. Updated ("roaming") from the
    /// source of every authenticated packet, as WireGuard does.
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses the peer may send from and we send to it; others are dropped.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds.
    pub keepalive: Option<u16>,
    pub preshared_key: Option<[u8; 32]>,
}

/// Offloads to use where the kernel has them (all on by default). Each is a kill switch: a buggy
/// kernel offload can be turned off without a rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// IFF_VNET_HDR with TSO4/6 (and USO4/6 where the kernel has them) on the TUN, GRO on write.
    pub tun: bool,
    /// UDP generic segmentation offload on send.
    pub udp_gso: bool,
    /// UDP generic receive offload.
    pub udp_gro: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads {
            tun: true,
            udp_gso: true,
            udp_gro: true,
        }
    }
}

/// The offloads a running tunnel actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveOffloads {
    /// TUN with virtio-net header: TCP segmentation offload on read, TCP GRO on write.
    pub tun_tso: bool,
    /// TUN UDP segmentation offload (Linux ≥ 6.2), UDP GRO on write.
    pub tun_uso: bool,
    /// Datagrams per `sendmsg` with UDP GSO (1: none).
    pub udp_gso_segments: usize,
    /// Datagrams per receive buffer with UDP GRO (1: none).
    pub udp_gro_segments: usize,
}

/// Everything a tunnel needs.
#[derive(Debug)]
pub struct TunnelConfig {
    /// Name of the TUN device (at most 15 bytes).
    pub name: String,
    /// Namespace to create the TUN in; `None`: the caller's.
    pub tun_netns: Option<NetNs>,
    /// Namespace to bind the UDP socket in; `None`: the caller's.
    pub udp_netns: Option<NetNs>,
    /// UDP address to listen on (port 0: any free port, see [`Tunnel::local_addr`]).
    pub listen: SocketAddr,
    pub private_key: [u8; 32],
    pub peer: PeerConfig,
    /// MTU of the TUN device.
    pub mtu: u16,
    pub offloads: Offloads,
    /// Lanes beyond the first (see [`LaneConfig`]); empty for a plain WireGuard tunnel.
    pub extra_lanes: Vec<LaneConfig>,
}

/// Most lanes a tunnel runs.
pub const MAX_LANES: usize = 16;

/// One more lane of a tunnel: per-core workers for a single peer.
///
/// boringtun's protocol core encrypts and decrypts only under `&mut`, so one core is one CPU's
/// worth of ChaCha20-Poly1305 however many threads serve it. A lane is therefore a whole WireGuard
/// session of its own, with the same keys: its own TUN queue (IFF_MULTI_QUEUE), UDP socket,
/// protocol core and two threads, sharing no lock with the other lanes. The kernel spreads flows
/// over the TUN's queues by flow hash and keeps a flow on the queue its replies are written to, so
/// a flow stays on one lane and in order. Both ends must run the same lanes, lane *i* talking to
/// lane *i* (nsm's nodes agree on them in the mechanism parameters); a stock WireGuard peer knows
/// one endpoint per peer and gets one lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneConfig {
    /// UDP address this lane listens on (port 0: any free port, see [`Tunnel::local_addrs`]).
    pub listen: SocketAddr,
    /// The peer's lane to send to; `None` to wait for it to reach us first.
    pub endpoint: Option<SocketAddr>,
}

impl TunnelConfig {
    /// A configuration with the default MTU and all offloads, both ends in the caller's namespace.
    pub fn new(name: impl Into<String>, listen: SocketAddr, private_key: [u8; 32], peer: PeerConfig) -> TunnelConfig {
        TunnelConfig {
            name: name.into(),
            tun_netns: None,
            udp_netns: None,
            listen,
            private_key,
            peer,
            mtu: DEFAULT_MTU,
            offloads: Offloads::default(),
            extra_lanes: Vec::new(),
        }
    }
}

/// Decrypted packets per batch of TUN writes.
const BATCH: usize = IDEAL_BATCH_SIZE;
/// TUN reads per batch (one TSO read is split into ~45 packets at MTU 1420).
const READS: usize = 4;
/// Receive buffers per `recvmmsg`, each large enough for a GRO train.
const RX_BUFS: usize = 8;
const MAX_UDP_PAYLOAD: usize = 65535;
/// How long a sender waits for room in the socket buffer before it looks at `stop` again.
const POLL_MS: u16 = 100;
/// How often the sending thread runs the protocol timers, and so wakes when idle.
const TIMER_EVERY_MS: u16 = 250;
const TIMER_EVERY: Duration = Duration::from_millis(TIMER_EVERY_MS as u64);

struct PeerState {
    proto: Peer,
    endpoint: Option<SocketAddr>,
}

/// What a tunnel's lanes share, read-only on the data path (no lock, no counter).
struct Common {
    name: String,
    allowed: Vec<IpNet>,
    stop: AtomicBool,
    /// Readable once the tunnel stops, so that threads sleep in `poll` without a timeout to notice
    /// it: an idle tunnel's receiving threads never wake, its sending threads only for the timers.
    stopped: EventFd,
    mtu: usize,
}

impl Common {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Waits until `fd` is ready for `flags` (true), the tunnel stops or `timeout` passes.
    fn wait(&self, fd: BorrowedFd<'_>, flags: PollFlags, timeout: PollTimeout) -> bool {
        let mut fds = [
            PollFd::new(fd, flags),
            PollFd::new(self.stopped.as_fd(), PollFlags::POLLIN),
        ];
        matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.intersects(flags | PollFlags::POLLERR))
    }
}

/// One lane: a TUN queue, a UDP socket and a protocol core, served by two threads of its own.
struct Lane {
    common: Arc<Common>,
    tun: SyncDevice,
    udp: std::net::UdpSocket,
    udp_state: UdpSocketState,
    peer: Mutex<PeerState>,
    gso: bool,
    gso_warned: AtomicBool,
    /// The TUN takes a virtio-net header (TSO) and UDP segmentation offload: what GRO may build.
    tun_tso: bool,
    tun_uso: bool,
    /// This lane's counters; [`Tunnel::stats`] sums the lanes'.
    counters: Counters,
}

/// A running tunnel. Dropping it stops it (and removes the TUN device).
pub struct Tunnel {
    common: Arc<Common>,
    lanes: Vec<Arc<Lane>>,
    threads: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    offloads: ActiveOffloads,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("name", &self.common.name)
            .field("local_addrs", &self.local_addrs)
            .field("offloads", &self.offloads)
            .finish()
    }
}

fn in_netns<T: Send + 'static>(ns: Option<&NetNs>, f: impl FnOnce() -> T + Send + 'static) -> Result<T, WgError> {
    match ns {
        Some(ns) => Ok(ns.run(f)?),
        None => Ok(f()),
    }
}

/// Opens the TUN device, and `queues - 1` more queues of it (IFF_MULTI_QUEUE) if `queues > 1`.
fn open_tun(name: String, mtu: u16, offload: bool, queues: usize) -> Result<(Vec<SyncDevice>, bool, bool), WgError> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name.clone())
            .mtu(mtu)
            .offload(offload)
            .multi_queue(queues > 1)
            .enable(true)
            .build_sync()
    };
    let err = |source| WgError::Tun {
        name: name.clone(),
        op: "create",
        source,
    };
    let dev = if offload {
        match build(true) {
            Ok(dev) => dev,
            Err(e) => {
                tracing::warn!(tun = %name, error = %e, "TUN offloads (IFF_VNET_HDR, TSO) unavailable; plain TUN");
                build(false).map_err(err)?
            }
        }
    } else {
        build(false).map_err(err)?
    };
    let (tso, uso) = (dev.tcp_gso(), dev.udp_gso());
    if tso && !uso {
        tracing::warn!(tun = %name, "TUN UDP segmentation offload (USO4/6) unavailable; UDP inside is not coalesced");
    }
    let mut queues_out = Vec::with_capacity(queues);
    for _ in 1..queues {
        // Opened here, in the TUN's namespace: attaching a queue looks the device up by name in
        // the namespace /dev/net/tun was opened in.
        queues_out.push(dev.try_clone().map_err(|source| WgError::Tun {
            name: name.clone(),
            op: "open another queue",
            source,
        })?);
    }
    queues_out.insert(0, dev);
    for q in &queues_out {
        q.set_nonblocking(true).map_err(|source| WgError::Tun {
            name: name.clone(),
            op: "set non-blocking",
            source,
        })?;
    }
    Ok((queues_out, tso, uso))
}

fn open_udp(listen: SocketAddr, offloads: Offloads) -> Result<(std::net::UdpSocket, UdpSocketState), WgError> {
    use socket2::{Domain, Protocol as P, Socket, Type};
    let err = |op| {
        move |source| WgError::Udp {
            addr: listen,
            op,
            source,
        }
    };
    let sock = Socket::new(Domain::for_address(listen), Type::DGRAM, Some(P::UDP)).map_err(err("create"))?;
    sock.set_nonblocking(true).map_err(err("set non-blocking"))?;
    sock.bind(&listen.into()).map_err(err("bind"))?;
    // Large socket buffers absorb bursts; FORCE (root) goes past net.core.*mem_max.
    const SOCK_BUF: usize = 8 << 20;
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &SOCK_BUF).is_err() {
        let _ = sock.set_recv_buffer_size(SOCK_BUF);
    }
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBufForce, &SOCK_BUF).is_err() {
        let _ = sock.set_send_buffer_size(SOCK_BUF);
    }
    let udp: std::net::UdpSocket = sock.into();
    let state = UdpSocketState::new(UdpSockRef::from(&udp)).map_err(err("probe offloads"))?;
    if !offloads.udp_gro {
        let _ = nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::UdpGroSegment, &false);
    }
    Ok((udp, state))
}

impl Tunnel {
    /// Creates the TUN device and UDP sockets and starts the data-plane threads (two per lane).
    /// The TUN is up but has no addresses or routes: the caller adds those (the namespace is the
    /// caller's business). All or nothing: on failure nothing is left open.
    pub fn start(config: TunnelConfig) -> Result<Tunnel, WgError> {
        let TunnelConfig {
            name,
            tun_netns,
            udp_netns,
            listen,
            private_key,
            peer,
            mtu,
            offloads,
            extra_lanes,
        } = config;
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(WgError::InvalidConfig(format!("bad interface name {name:?}")));
        }
        if mtu < 576 {
            return Err(WgError::InvalidConfig(format!("MTU {mtu} below 576")));
        }
        if extra_lanes.len() >= MAX_LANES {
            return Err(WgError::InvalidConfig(format!(
                "{} lanes; at most {MAX_LANES}",
                extra_lanes.len() + 1
            )));
        }
        let ends: Vec<(SocketAddr, Option<SocketAddr>)> = std::iter::once((listen, peer.endpoint))
            .chain(extra_lanes.iter().map(|l| (l.listen, l.endpoint)))
            .collect();
        let mut sockets = Vec::with_capacity(ends.len());
        for &(addr, _) in &ends {
            let (udp, state) = in_netns(udp_netns.as_ref(), move || open_udp(addr, offloads))??;
            let local = udp.local_addr().map_err(|source| WgError::Udp {
                addr,
                op: "local address",
                source,
            })?;
            sockets.push((udp, state, local));
        }
        let tun_name = name.clone();
        let queues = ends.len();
        let (tuns, tun_tso, tun_uso) = in_netns(tun_netns.as_ref(), move || {
            open_tun(tun_name, mtu, offloads.tun, queues)
        })??;

        let first = &sockets[0].1;
        let gso = offloads.udp_gso && first.max_gso_segments() > 1;
        if offloads.udp_gso && !gso {
            tracing::warn!(tun = %name, "UDP GSO unavailable; one sendmsg per datagram");
        }
        let gro_segments = if offloads.udp_gro { first.gro_segments() } else { 1 };
        if offloads.udp_gro && gro_segments <= 1 {
            tracing::warn!(tun = %name, "UDP GRO unavailable; one datagram per receive buffer");
        }
        let active = ActiveOffloads {
            tun_tso,
            tun_uso,
            udp_gso_segments: if gso { first.max_gso_segments() } else { 1 },
            udp_gro_segments: gro_segments,
        };
        let common = Arc::new(Common {
            name: name.clone(),
            allowed: peer.allowed_ips,
            stop: AtomicBool::new(false),
            stopped: EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(|e| WgError::Tun {
                name: name.clone(),
                op: "create the stop event",
                source: e.into(),
            })?,
            mtu: usize::from(mtu),
        });
        let local_addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.2).collect();
        let lanes: Vec<Arc<Lane>> = sockets
            .into_iter()
            .zip(tuns)
            .zip(&ends)
            .map(|(((udp, udp_state, _), tun), &(_, endpoint))| {
                Arc::new(Lane {
                    common: common.clone(),
                    tun,
                    udp,
                    udp_state,
                    peer: Mutex::new(PeerState {
                        proto: Peer::new(private_key, peer.public_key, peer.preshared_key, peer.keepalive),
                        endpoint,
                    }),
                    gso,
                    gso_warned: AtomicBool::new(false),
                    tun_tso,
                    tun_uso,
                    counters: Counters::default(),
                })
            })
            .collect();
        tracing::info!(tun = %name, ?local_addrs, peer = %keys::encode_key(&peer.public_key), ?active, "WireGuard tunnel up");

        let mut tunnel = Tunnel {
            common,
            lanes,
            threads: Vec::new(),
            local_addrs,
            offloads: active,
        };
        for (i, lane) in tunnel.lanes.clone().into_iter().enumerate() {
            for (role, work) in [("tx", tx_loop as fn(&Lane)), ("rx", rx_loop as fn(&Lane))] {
                let lane = lane.clone();
                // Thread names are cut at 15 bytes: the role and lane first.
                let handle = std::thread::Builder::new()
                    .name(format!("wg-{role}{i}-{name}"))
                    .spawn(move || work(&lane))
                    .map_err(WgError::Thread)?;
                tunnel.threads.push(handle);
            }
        }
        Ok(tunnel)
    }

    /// The name of the TUN device.
    pub fn name(&self) -> &str {
        &self.common.name
    }

    /// The first lane's bound UDP address (the port, if `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every lane's bound UDP address, the first lane's first.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The offloads in use.
    pub fn offloads(&self) -> ActiveOffloads {
        self.offloads
    }

    /// The peer's current endpoint on the first lane (learnt from authenticated packets if not
    /// configured).
    pub fn peer_endpoint(&self) -> Option<SocketAddr> {
        self.lanes[0].peer.lock().endpoint
    }

    /// Changes our static private key without a gap in traffic: the running session carries on
    /// until the peer, given our new public key out of band (and [`Tunnel::set_peer_public_key`]
    /// there), completes a handshake with it; then the new keys take over. On every lane.
    pub fn set_private_key(&self, private_key: [u8; 32]) {
        self.on_every_lane(|proto, buf| proto.set_private_key(private_key, buf));
    }

    /// Changes the peer's public key (the peer rotated its key) without a gap in traffic: a
    /// handshake with the new key starts now, and the running session carries on until it
    /// completes. On every lane.
    pub fn set_peer_public_key(&self, public_key: [u8; 32]) {
        self.on_every_lane(|proto, buf| proto.set_peer_public_key(public_key, buf));
    }

    /// Applies a key change to every lane's protocol core and sends what it asks for (a handshake
    /// initiation) outside the lock.
    fn on_every_lane(&self, change: impl Fn(&mut Peer, &mut [u8]) -> Outcome) {
        for lane in &self.lanes {
            let mut buf = [0u8; wire::HANDSHAKE_INITIATION_LEN + 64];
            let (out, dest) = {
                let mut peer = lane.peer.lock();
                (change(&mut peer.proto, &mut buf), peer.endpoint)
            };
            lane.send_now(out, dest, &buf);
        }
    }

    /// Our public key and the peer's as wanted now (the new ones while a key change is pending).
    pub fn keys(&self) -> ([u8; 32], [u8; 32]) {
        let peer = self.lanes[0].peer.lock();
        (peer.proto.public_key(), peer.proto.peer_public_key())
    }

    /// Whether a key change waits for its first handshake on any lane (the old keys still carry
    /// traffic there).
    pub fn key_change_pending(&self) -> bool {
        self.lanes.iter().any(|l| l.peer.lock().proto.key_change_pending())
    }

    /// A snapshot of the counters, summed over the lanes; the time since the latest handshake of
    /// any lane.
    pub fn stats(&self) -> Stats {
        let since = self
            .lanes
            .iter()
            .filter_map(|l| l.peer.lock().proto.since_handshake())
            .min();
        Counters::sum(self.lanes.iter().map(|l| &l.counters), since)
    }

    /// Data packets sent and received per lane, the first lane's first: how the kernel spread the
    /// flows over the lanes.
    pub fn lane_packets(&self) -> Vec<(u64, u64)> {
        self.lanes
            .iter()
            .map(|l| {
                let s = Counters::sum([&l.counters], None);
                (s.tx_packets, s.rx_packets)
            })
            .collect()
    }

    /// Stops the threads and closes the TUN (the kernel removes the device) and the sockets.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.common.stop.store(true, Ordering::Relaxed);
        // Wakes every thread; the counter stays non-zero, so the event stays readable.
        let _ = self.common.stopped.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn allowed(nets: &[IpNet], ip: std::net::IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

impl Lane {
    fn send_now(&self, out: Outcome, dest: Option<SocketAddr>, buf: &[u8]) {
        if let (Outcome::Network(n), Some(dest)) = (out, dest) {
            self.send(dest, &buf[..n], None);
        }
    }

    /// Sends `contents` to `dest`: one datagram, or with `segment` a GSO train of datagrams of that
    /// size (the last may be shorter). Waits while the socket buffer is full (back-pressure).
    fn send(&self, dest: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let transmit = Transmit {
            destination: dest,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            match self.udp_state.try_send(UdpSockRef::from(&self.udp), &transmit) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.common.stopping() {
                        return;
                    }
                    self.common
                        .wait(self.udp.as_fd(), PollFlags::POLLOUT, PollTimeout::from(POLL_MS));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if let Some(seg) = segment.filter(|_| matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL))) {
                        // The egress device refused GSO: quinn-udp turned it off; resend one by one.
                        if !self.gso_warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!(tun = %self.common.name, error = %e, "UDP GSO refused by the kernel; sending datagrams one by one");
                        }
                        for d in contents.chunks(seg) {
                            self.send(dest, d, None);
                        }
                    } else {
                        tracing::debug!(tun = %self.common.name, error = %e, %dest, "UDP send failed");
                        self.counters.drop(DropReason::Other, 1);
                    }
                    return;
                }
            }
        }
    }

    /// Sends the datagrams laid out back to back in `arena` (lengths in `lens`), grouping runs of
    /// equal size into GSO trains.
    fn send_all(&self, dest: SocketAddr, arena: &[u8], lens: &[usize]) {
        let max_segs = if self.gso {
            self.udp_state.max_gso_segments().clamp(1, 64)
        } else {
            1
        };
        let (mut i, mut start) = (0, 0);
        while i < lens.len() {
            let seg = lens[i];
            let (mut end, mut j) = (start + seg, i + 1);
            while j < lens.len()
                && j - i < max_segs
                && lens[j] <= seg
                && end + lens[j] - start <= MAX_UDP_PAYLOAD - 1000
            {
                end += lens[j];
                j += 1;
                if lens[j - 1] < seg {
                    break;
                }
            }
            let segment = (j - i > 1).then_some(seg);
            self.send(dest, &arena[start..end], segment);
            start = end;
            i = j;
        }
    }

    /// Runs the protocol timers and sends what they ask for (handshake retries, keepalives).
    /// `out` collects the messages so they are sent outside the lock.
    fn tick(&self, buf: &mut [u8], out: &mut Vec<u8>, lens: &mut Vec<usize>) {
        out.clear();
        lens.clear();
        let dest = {
            let mut peer = self.peer.lock();
            peer.proto.tick(buf, |m| {
                out.extend_from_slice(m);
                lens.push(m.len());
            });
            peer.endpoint
        };
        if let Some(dest) = dest {
            let mut at = 0;
            for &n in lens.iter() {
                self.send(dest, &out[at..at + n], None);
                at += n;
            }
        }
    }
}

/// TUN → encrypt → UDP, plus the timers.
fn tx_loop(sh: &Lane) {
    // One batch: up to READS TUN reads, each a super-packet of up to 64 KiB behind its virtio-net
    // header (or one plain packet), split in place and sealed into `arena` under one lock.
    let mut reads: Vec<Vec<u8>> = (0..READS).map(|_| vec![0u8; HDR + MAX_UDP_PAYLOAD]).collect();
    let mut read_lens = [0usize; READS];
    // Twice the reads' size: room for every packet's headers and WireGuard overhead down to
    // segments of a few hundred bytes; smaller ones send what is sealed when it fills up.
    let mut arena = vec![0u8; 2 * READS * (HDR + MAX_UDP_PAYLOAD)];
    let mut lens: Vec<usize> = Vec::with_capacity(1024);
    let mut timer_buf = vec![0u8; 256];
    let mut timer_out: Vec<u8> = Vec::with_capacity(1024);
    let mut timer_lens: Vec<usize> = Vec::with_capacity(4);
    let mut last_tick = Instant::now();
    // A TUN without a virtio-net header gives plain packets: read them behind room for one.
    let at = if sh.tun_tso { 0 } else { HDR };

    // Handshake right away if we know where the peer is, so the first packet does not wait.
    {
        let mut peer = sh.peer.lock();
        let out = peer.proto.initiate(&mut timer_buf);
        if let (Outcome::Network(n), Some(dest)) = (out, peer.endpoint) {
            drop(peer);
            sh.send(dest, &timer_buf[..n], None);
        }
    }

    while !sh.common.stopping() {
        let readable = sh
            .common
            .wait(sh.tun.as_fd(), PollFlags::POLLIN, PollTimeout::from(TIMER_EVERY_MS));
        if last_tick.elapsed() >= TIMER_EVERY {
            last_tick = Instant::now();
            sh.tick(&mut timer_buf, &mut timer_out, &mut timer_lens);
        }
        if !readable {
            continue;
        }
        let mut n = 0;
        while n < READS {
            match sh.tun.recv(&mut reads[n][at..]) {
                Ok(len) => {
                    read_lens[n] = at + len;
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(tun = %sh.common.name, error = %e, "TUN read failed");
                    sh.counters.drop(DropReason::Other, 1);
                    if e.raw_os_error() == Some(libc::EBADFD) {
                        return;
                    }
                    break;
                }
            }
        }
        if n == 0 {
            continue;
        }

        lens.clear();
        let (mut pos, mut sent, mut tx_bytes, mut not_allowed, mut other) = (0, 0u64, 0u64, 0u64, 0u64);
        let mut unsplit = 0u64;
        let dest = {
            let mut peer = sh.peer.lock();
            let mut seal = |packet: &[u8]| {
                match wire::ip_addrs(packet) {
                    Some((_, dst)) if allowed(&sh.common.allowed, dst) => {}
                    _ => {
                        not_allowed += 1;
                        return;
                    }
                }
                let want = (packet.len() + wire::DATA_OVERHEAD + 16).max(wire::HANDSHAKE_INITIATION_LEN);
                if pos + want > arena.len() {
                    // Tiny segments: send what is sealed so far to make room.
                    match peer.endpoint {
                        Some(dest) => {
                            sh.send_all(dest, &arena[..pos], &lens);
                            sent += lens.len() as u64;
                        }
                        None => sh.counters.drop(DropReason::NoEndpoint, lens.len() as u64),
                    }
                    lens.clear();
                    pos = 0;
                }
                let Some(dst) = arena.get_mut(pos..pos + want) else {
                    other += 1;
                    return;
                };
                match peer.proto.encapsulate(packet, dst) {
                    Outcome::Network(len) => {
                        if dst[0] == 4 {
                            tx_bytes += packet.len() as u64;
                        }
                        lens.push(len);
                        pos += len;
                    }
                    Outcome::Dropped(r) => sh.counters.drop(r, 1),
                    Outcome::Done | Outcome::Tunnel(_) => {}
                }
            };
            for (read, &len) in reads.iter_mut().zip(&read_lens).take(n) {
                if !sh.tun_tso {
                    seal(&read[HDR..len]);
                } else if let Err(e) = gso::split(&mut read[..len], &mut seal) {
                    tracing::debug!(tun = %sh.common.name, error = %e, "TUN read not split");
                    unsplit += 1;
                }
            }
            peer.endpoint
        };
        sh.counters.drop(DropReason::NotAllowed, not_allowed);
        sh.counters.drop(DropReason::Other, other + unsplit);
        match dest {
            Some(dest) => {
                sh.send_all(dest, &arena[..pos], &lens);
                Counters::add(&sh.counters.tx_packets, sent + lens.len() as u64);
                Counters::add(&sh.counters.tx_bytes, tx_bytes);
            }
            None => sh.counters.drop(DropReason::NoEndpoint, lens.len() as u64),
        }
    }
}

/// Writes the batch of decrypted packets to the TUN and empties it.
fn flush(sh: &Lane, gro: &mut Gro) {
    for packet in gro.packets() {
        if let Err(e) = sh.tun.send(packet) {
            tracing::debug!(tun = %sh.common.name, error = %e, "TUN write failed");
            sh.counters.drop(DropReason::Other, 1);
        }
    }
    gro.clear();
}

/// UDP → decrypt → TUN.
fn rx_loop(sh: &Lane) {
    let mut rx: Vec<Vec<u8>> = (0..RX_BUFS).map(|_| vec![0u8; MAX_UDP_PAYLOAD]).collect();
    let mut metas = [RecvMeta::default(); RX_BUFS];
    let mut gro = Gro::new(BATCH, sh.tun_tso, sh.tun_uso);
    // Datagrams to send back: handshake responses, cookies, packets queued during a handshake.
    let mut replies: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut reply_to: Vec<(SocketAddr, usize)> = Vec::with_capacity(64);
    let mut scratch = vec![0u8; sh.common.mtu + 256];

    while !sh.common.stopping() {
        if !sh.common.wait(sh.udp.as_fd(), PollFlags::POLLIN, PollTimeout::NONE) {
            continue;
        }
        for _ in 0..16 {
            let got = {
                let mut iovs: [IoSliceMut<'_>; RX_BUFS] = std::array::from_fn(|_| IoSliceMut::new(&mut []));
                for (iov, b) in iovs.iter_mut().zip(rx.iter_mut()) {
                    *iov = IoSliceMut::new(b);
                }
                sh.udp_state.recv(UdpSockRef::from(&sh.udp), &mut iovs, &mut metas)
            };
            let got = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(tun = %sh.common.name, error = %e, "UDP receive failed");
                    sh.counters.drop(DropReason::Other, 1);
                    break;
                }
            };
            replies.clear();
            reply_to.clear();
            let (mut rx_packets, mut rx_bytes, mut handshakes) = (0u64, 0u64, 0u64);
            {
                let mut peer = sh.peer.lock();
                let key_changes = peer.proto.key_changes();
                for (meta, buf) in metas.iter().zip(&rx).take(got) {
                    let stride = meta.stride.max(1);
                    for datagram in buf[..meta.len].chunks(stride) {
                        let kind = match wire::parse(datagram) {
                            Ok(h) => h.kind,
                            Err(_) => {
                                sh.counters.drop(DropReason::Malformed, 1);
                                continue;
                            }
                        };
                        // Decrypted in place: into the last packet's flow if it continues it.
                        let need = datagram.len().max(wire::HANDSHAKE_INITIATION_LEN);
                        if gro.is_full() {
                            flush(sh, &mut gro);
                        }
                        let Some(dst) = gro.dst(need) else {
                            sh.counters.drop(DropReason::Other, 1);
                            continue;
                        };
                        match peer.proto.decapsulate(Some(meta.addr.ip()), datagram, dst) {
                            Outcome::Tunnel(len) => match wire::ip_addrs(gro.decrypted(len)) {
                                Some((src, _)) if allowed(&sh.common.allowed, src) => {
                                    gro.push(len);
                                    rx_packets += 1;
                                    rx_bytes += len as u64;
                                    peer.endpoint = Some(meta.addr);
                                }
                                _ => {
                                    gro.discard();
                                    sh.counters.drop(DropReason::NotAllowed, 1);
                                }
                            },
                            Outcome::Network(len) => {
                                replies.extend_from_slice(gro.decrypted(len));
                                gro.discard();
                                reply_to.push((meta.addr, len));
                                if matches!(kind, MessageKind::HandshakeInitiation | MessageKind::HandshakeResponse) {
                                    // Authenticated: a session is established.
                                    handshakes += 1;
                                    peer.endpoint = Some(meta.addr);
                                    // Packets that waited for this handshake.
                                    while let Outcome::Network(len) = peer.proto.next_queued(&mut scratch) {
                                        replies.extend_from_slice(&scratch[..len]);
                                        reply_to.push((meta.addr, len));
                                    }
                                }
                            }
                            Outcome::Done => {
                                gro.discard();
                                if kind == MessageKind::Data {
                                    // An authenticated keepalive.
                                    peer.endpoint = Some(meta.addr);
                                }
                            }
                            Outcome::Dropped(r) => {
                                gro.discard();
                                sh.counters.drop(r, 1);
                            }
                        }
                    }
                }
                if peer.proto.key_changes() != key_changes {
                    tracing::info!(
                        tun = %sh.common.name,
                        public_key = %keys::encode_key(&peer.proto.public_key()),
                        peer = %keys::encode_key(&peer.proto.peer_public_key()),
                        "WireGuard key change complete: the new keys carry traffic"
                    );
                }
            }
            Counters::add(&sh.counters.rx_packets, rx_packets);
            Counters::add(&sh.counters.rx_bytes, rx_bytes);
            Counters::add(&sh.counters.handshakes, handshakes);
            let mut at = 0;
            for &(dest, len) in &reply_to {
                sh.send(dest, &replies[at..at + len], None);
                at += len;
            }
            if got < RX_BUFS {
                break;
            }
        }
        flush(sh, &mut gro);
    }
}
