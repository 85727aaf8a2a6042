//! A tunnel: one TUN device, one UDP socket, one peer, two data-plane threads.
//!
//! * `wg-tx`: TUN → encrypt → UDP. Reads a batch from the TUN (with IFF_VNET_HDR a read is a TSO
//!   super-packet of up to 64 KiB that is split into MTU-sized packets), encrypts the whole batch
//!   under one lock of the protocol state into one contiguous buffer, and sends runs of equal-sized
//!   datagrams with UDP GSO (one `sendmsg` per run). It also drives the protocol timers.
//! * `wg-rx`: UDP → decrypt → TUN. Receives with `recvmmsg` and UDP GRO (one buffer holds up to 64
//!   datagrams), decrypts under one lock per receive, and writes the packets to the TUN with TCP/UDP
//!   GRO (coalesced back into super-packets with a virtio-net header).
//!
//! All buffers are allocated once per thread at start; nothing is allocated per packet.
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
use nsm_dataplane::NetNs;
use parking_lot::Mutex;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::peer::{Outcome, Peer};
use crate::stats::{Counters, DropReason, Stats};
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
        }
    }
}

/// Packets per batch of TUN reads (one TSO read can be split into ~45 packets at MTU 1420).
const BATCH: usize = IDEAL_BATCH_SIZE;
/// Receive buffers per `recvmmsg`, each large enough for a GRO train.
const RX_BUFS: usize = 8;
const MAX_UDP_PAYLOAD: usize = 65535;
/// How long a thread sleeps in `poll` at most, so it notices `stop` and runs timers.
const POLL_MS: u16 = 100;
const TIMER_EVERY: Duration = Duration::from_millis(250);
/// Room at the front of a TUN write buffer for the virtio-net header.
const HDR: usize = VIRTIO_NET_HDR_LEN;

struct PeerState {
    proto: Peer,
    endpoint: Option<SocketAddr>,
}

struct Shared {
    name: String,
    tun: SyncDevice,
    udp: std::net::UdpSocket,
    udp_state: UdpSocketState,
    peer: Mutex<PeerState>,
    allowed: Vec<IpNet>,
    counters: Counters,
    stop: AtomicBool,
    mtu: usize,
    gso: bool,
    gso_warned: AtomicBool,
}

/// A running tunnel. Dropping it stops it (and removes the TUN device).
pub struct Tunnel {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
    offloads: ActiveOffloads,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("name", &self.shared.name)
            .field("local_addr", &self.local_addr)
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

fn open_tun(name: String, mtu: u16, offload: bool) -> Result<(SyncDevice, bool, bool), WgError> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name.clone())
            .mtu(mtu)
            .offload(offload)
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
    dev.set_nonblocking(true).map_err(|source| WgError::Tun {
        name: name.clone(),
        op: "set non-blocking",
        source,
    })?;
    Ok((dev, tso, uso))
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
    /// Creates the TUN device and UDP socket and starts the data-plane threads. The TUN is up but
    /// has no addresses or routes: the caller adds those (the namespace is the caller's business).
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
        } = config;
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(WgError::InvalidConfig(format!("bad interface name {name:?}")));
        }
        if mtu < 576 {
            return Err(WgError::InvalidConfig(format!("MTU {mtu} below 576")));
        }
        let (udp, udp_state) = in_netns(udp_netns.as_ref(), move || open_udp(listen, offloads))??;
        let local_addr = udp.local_addr().map_err(|source| WgError::Udp {
            addr: listen,
            op: "local address",
            source,
        })?;
        let tun_name = name.clone();
        let (tun, tun_tso, tun_uso) = in_netns(tun_netns.as_ref(), move || open_tun(tun_name, mtu, offloads.tun))??;

        let gso = offloads.udp_gso && udp_state.max_gso_segments() > 1;
        if offloads.udp_gso && !gso {
            tracing::warn!(tun = %name, "UDP GSO unavailable; one sendmsg per datagram");
        }
        let gro_segments = if offloads.udp_gro { udp_state.gro_segments() } else { 1 };
        if offloads.udp_gro && gro_segments <= 1 {
            tracing::warn!(tun = %name, "UDP GRO unavailable; one datagram per receive buffer");
        }
        let active = ActiveOffloads {
            tun_tso,
            tun_uso,
            udp_gso_segments: if gso { udp_state.max_gso_segments() } else { 1 },
            udp_gro_segments: gro_segments,
        };
        let proto = Peer::new(private_key, peer.public_key, peer.preshared_key, peer.keepalive);
        let shared = Arc::new(Shared {
            name: name.clone(),
            tun,
            udp,
            udp_state,
            peer: Mutex::new(PeerState {
                proto,
                endpoint: peer.endpoint,
            }),
            allowed: peer.allowed_ips,
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            mtu: usize::from(mtu),
            gso,
            gso_warned: AtomicBool::new(false),
        });
        tracing::info!(tun = %name, %local_addr, peer = %keys::encode_key(&peer.public_key), ?active, "WireGuard tunnel up");

        let mut tunnel = Tunnel {
            shared: shared.clone(),
            threads: Vec::new(),
            local_addr,
            offloads: active,
        };
        for (role, work) in [("tx", tx_loop as fn(&Shared)), ("rx", rx_loop as fn(&Shared))] {
            let sh = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("wg-{role}-{name}"))
                .spawn(move || work(&sh))
                .map_err(WgError::Thread)?;
            tunnel.threads.push(handle);
        }
        Ok(tunnel)
    }

    /// The name of the TUN device.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The bound UDP address (the port, if `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The offloads in use.
    pub fn offloads(&self) -> ActiveOffloads {
        self.offloads
    }

    /// The peer's current endpoint (learnt from authenticated packets if not configured).
    pub fn peer_endpoint(&self) -> Option<SocketAddr> {
        self.shared.peer.lock().endpoint
    }

    /// Changes our static private key without a gap in traffic: the running session carries on
    /// until the peer, given our new public key out of band (and [`Tunnel::set_peer_public_key`]
    /// there), completes a handshake with it; then the new keys take over.
    pub fn set_private_key(&self, private_key: [u8; 32]) {
        let mut buf = [0u8; wire::HANDSHAKE_INITIATION_LEN + 64];
        let (out, dest) = {
            let mut peer = self.shared.peer.lock();
            (peer.proto.set_private_key(private_key, &mut buf), peer.endpoint)
        };
        self.send_now(out, dest, &buf);
    }

    /// Changes the peer's public key (the peer rotated its key) without a gap in traffic: a
    /// handshake with the new key starts now, and the running session carries on until it
    /// completes.
    pub fn set_peer_public_key(&self, public_key: [u8; 32]) {
        let mut buf = [0u8; wire::HANDSHAKE_INITIATION_LEN + 64];
        let (out, dest) = {
            let mut peer = self.shared.peer.lock();
            (peer.proto.set_peer_public_key(public_key, &mut buf), peer.endpoint)
        };
        self.send_now(out, dest, &buf);
    }

    fn send_now(&self, out: Outcome, dest: Option<SocketAddr>, buf: &[u8]) {
        if let (Outcome::Network(n), Some(dest)) = (out, dest) {
            self.shared.send(dest, &buf[..n], None);
        }
    }

    /// Our public key and the peer's as wanted now (the new ones while a key change is pending).
    pub fn keys(&self) -> ([u8; 32], [u8; 32]) {
        let peer = self.shared.peer.lock();
        (peer.proto.public_key(), peer.proto.peer_public_key())
    }

    /// Whether a key change waits for its first handshake (the old keys still carry traffic).
    pub fn key_change_pending(&self) -> bool {
        self.shared.peer.lock().proto.key_change_pending()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let since = self.shared.peer.lock().proto.since_handshake();
        self.shared.counters.snapshot(since)
    }

    /// Stops the threads and closes the TUN (the kernel removes the device) and the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
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

fn wait(fd: BorrowedFd<'_>, flags: PollFlags) -> bool {
    let mut fds = [PollFd::new(fd, flags)];
    matches!(poll(&mut fds, PollTimeout::from(POLL_MS)), Ok(n) if n > 0)
}

fn allowed(nets: &[IpNet], ip: std::net::IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
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
                    if self.stopping() {
                        return;
                    }
                    wait(self.udp.as_fd(), PollFlags::POLLOUT);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if let Some(seg) = segment.filter(|_| matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL))) {
                        // The egress device refused GSO: quinn-udp turned it off; resend one by one.
                        if !self.gso_warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!(tun = %self.name, error = %e, "UDP GSO refused by the kernel; sending datagrams one by one");
                        }
                        for d in contents.chunks(seg) {
                            self.send(dest, d, None);
                        }
                    } else {
                        tracing::debug!(tun = %self.name, error = %e, %dest, "UDP send failed");
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
fn tx_loop(sh: &Shared) {
    let room = sh.mtu + 64;
    let mut orig = vec![0u8; HDR + 65535];
    let mut bufs: Vec<Vec<u8>> = (0..2 * BATCH).map(|_| vec![0u8; room]).collect();
    let mut sizes = vec![0usize; bufs.len()];
    let mut arena = vec![0u8; bufs.len() * room + 256];
    let mut lens: Vec<usize> = Vec::with_capacity(bufs.len());
    let mut timer_buf = vec![0u8; 256];
    let mut timer_out: Vec<u8> = Vec::with_capacity(1024);
    let mut timer_lens: Vec<usize> = Vec::with_capacity(4);
    let mut last_tick = Instant::now();

    // Handshake right away if we know where the peer is, so the first packet does not wait.
    {
        let mut peer = sh.peer.lock();
        let out = peer.proto.initiate(&mut timer_buf);
        if let (Outcome::Network(n), Some(dest)) = (out, peer.endpoint) {
            drop(peer);
            sh.send(dest, &timer_buf[..n], None);
        }
    }

    while !sh.stopping() {
        let readable = wait(sh.tun.as_fd(), PollFlags::POLLIN);
        if last_tick.elapsed() >= TIMER_EVERY {
            last_tick = Instant::now();
            sh.tick(&mut timer_buf, &mut timer_out, &mut timer_lens);
        }
        if !readable {
            continue;
        }
        let mut n = 0;
        while n + BATCH / 2 <= bufs.len() {
            match sh.tun.recv_multiple(&mut orig, &mut bufs[n..], &mut sizes[n..], 0) {
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(tun = %sh.name, error = %e, "TUN read failed");
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
        let (mut pos, mut tx_bytes, mut not_allowed, mut other) = (0, 0u64, 0u64, 0u64);
        let dest = {
            let mut peer = sh.peer.lock();
            for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
                let packet = &buf[..size];
                match wire::ip_addrs(packet) {
                    Some((_, dst)) if allowed(&sh.allowed, dst) => {}
                    _ => {
                        not_allowed += 1;
                        continue;
                    }
                }
                let want = (size + wire::DATA_OVERHEAD + 16).max(wire::HANDSHAKE_INITIATION_LEN);
                let Some(dst) = arena.get_mut(pos..pos + want) else {
                    other += 1;
                    continue;
                };
                match peer.proto.encapsulate(packet, dst) {
                    Outcome::Network(len) => {
                        if dst[0] == 4 {
                            tx_bytes += size as u64;
                        }
                        lens.push(len);
                        pos += len;
                    }
                    Outcome::Dropped(r) => sh.counters.drop(r, 1),
                    Outcome::Done | Outcome::Tunnel(_) => {}
                }
            }
            peer.endpoint
        };
        sh.counters.drop(DropReason::NotAllowed, not_allowed);
        sh.counters.drop(DropReason::Other, other);
        match dest {
            Some(dest) => {
                let data = lens.len() as u64;
                sh.send_all(dest, &arena[..pos], &lens);
                Counters::add(&sh.counters.tx_packets, data);
                Counters::add(&sh.counters.tx_bytes, tx_bytes);
            }
            None => sh.counters.drop(DropReason::NoEndpoint, lens.len() as u64),
        }
    }
}

/// Decrypted packets waiting to be written to the TUN, with room for the virtio-net header in
/// front and for GRO to coalesce up to 64 KiB into one buffer.
struct TunBatch {
    bufs: Vec<Vec<u8>>,
    n: usize,
    gro: GROTable,
}

impl TunBatch {
    fn flush(&mut self, sh: &Shared) {
        if self.n == 0 {
            return;
        }
        if let Err(e) = sh.tun.send_multiple(&mut self.gro, &mut self.bufs[..self.n], HDR) {
            tracing::debug!(tun = %sh.name, error = %e, "TUN write failed");
            sh.counters.drop(DropReason::Other, 1);
        }
        for b in &mut self.bufs[..self.n] {
            b.clear();
        }
        self.n = 0;
    }
}

/// UDP → decrypt → TUN.
fn rx_loop(sh: &Shared) {
    let mut rx: Vec<Vec<u8>> = (0..RX_BUFS).map(|_| vec![0u8; MAX_UDP_PAYLOAD]).collect();
    let mut metas = [RecvMeta::default(); RX_BUFS];
    let mut tun = TunBatch {
        bufs: (0..BATCH).map(|_| Vec::with_capacity(HDR + 65535 + 256)).collect(),
        n: 0,
        gro: GROTable::default(),
    };
    // Datagrams to send back: handshake responses, cookies, packets queued during a handshake.
    let mut replies: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut reply_to: Vec<(SocketAddr, usize)> = Vec::with_capacity(64);
    let mut scratch = vec![0u8; sh.mtu + 256];

    while !sh.stopping() {
        if !wait(sh.udp.as_fd(), PollFlags::POLLIN) {
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
                    tracing::debug!(tun = %sh.name, error = %e, "UDP receive failed");
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
                        if tun.n == tun.bufs.len() {
                            tun.flush(sh);
                        }
                        let out = &mut tun.bufs[tun.n];
                        out.resize(HDR + datagram.len().max(wire::HANDSHAKE_INITIATION_LEN), 0);
                        match peer.proto.decapsulate(Some(meta.addr.ip()), datagram, &mut out[HDR..]) {
                            Outcome::Tunnel(len) => {
                                let packet = &out[HDR..HDR + len];
                                match wire::ip_addrs(packet) {
                                    Some((src, _)) if allowed(&sh.allowed, src) => {
                                        out.truncate(HDR + len);
                                        tun.n += 1;
                                        rx_packets += 1;
                                        rx_bytes += len as u64;
                                        peer.endpoint = Some(meta.addr);
                                    }
                                    _ => sh.counters.drop(DropReason::NotAllowed, 1),
                                }
                            }
                            Outcome::Network(len) => {
                                replies.extend_from_slice(&out[HDR..HDR + len]);
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
                                if kind == MessageKind::Data {
                                    // An authenticated keepalive.
                                    peer.endpoint = Some(meta.addr);
                                }
                            }
                            Outcome::Dropped(r) => sh.counters.drop(r, 1),
                        }
                    }
                }
                if peer.proto.key_changes() != key_changes {
                    tracing::info!(
                        tun = %sh.name,
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
        tun.flush(sh);
    }
}
