//! The kernel's WireGuard: links of kind `wireguard` (rtnetlink) configured over the `wireguard`
//! generic-netlink family, the interface `wg(8)` uses. A node whose kernel has WireGuard runs its
//! encrypted vWires there instead of in nsm's userspace tunnel: same protocol and keys, no copy
//! through a TUN device, and the link outlives the daemon like a VXLAN does.
//!
//! Generic netlink is spoken on a blocking socket from a thread inside the link's namespace (the
//! family resolves devices by name in the caller's namespace); requests are few (create, key
//! change, peer change), so a thread per request costs nothing that matters.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_route::link::InfoKind;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use rtnetlink::LinkMessageBuilder;
use rtnetlink::packet_core::{
    Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkDeserializable, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, ParseableParametrized,
};
use rtnetlink::sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_GENERIC};

use crate::error::{DataplaneError, Result};
use crate::netlink::Netlink;
use crate::netns::NetNs;

/// WireGuard keys are Curve25519 points and scalars: 32 bytes.
pub type Key = [u8; 32];

/// What to change on a kernel WireGuard device (`wg set`). Fields left `None` stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgDeviceUpdate {
    /// The device's private key.
    pub private_key: Option<Key>,
    /// The UDP port it listens on (0: the kernel picks one).
    pub listen_port: Option<u16>,
    /// Peers not listed in `peers` are removed (`wg set … replace-peers`, as `wg setconf` does).
    pub replace_peers: bool,
    /// Peers to add, change or remove.
    pub peers: Vec<WgPeerUpdate>,
}

/// One peer's part of a [`WgDeviceUpdate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerUpdate {
    /// The peer's public key (its identity on the device).
    pub public_key: Key,
    /// Remove this peer instead of adding or changing it.
    pub remove: bool,
    /// Where its packets go until it roams.
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives (0: off).
    pub keepalive: Option<u16>,
    /// Inner prefixes it may send from and is sent to; replaces the peer's current list.
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Change the peer only if the device has it; never add it.
    pub update_only: bool,
}

impl WgPeerUpdate {
    /// A peer to add or update with these settings.
    pub fn new(public_key: Key, endpoint: SocketAddr, allowed_ips: Vec<IpNet>) -> WgPeerUpdate {
        WgPeerUpdate {
            endpoint: Some(endpoint),
            allowed_ips: Some(allowed_ips),
            ..WgPeerUpdate::only(public_key)
        }
    }

    /// A change of the peer's persistent keepalive only (0: off). Turning it on makes the kernel
    /// send a keepalive at once, which starts a handshake when there is no session.
    pub fn keepalive(public_key: Key, secs: u16) -> WgPeerUpdate {
        WgPeerUpdate {
            keepalive: Some(secs),
            update_only: true,
            ..WgPeerUpdate::only(public_key)
        }
    }

    /// The removal of a peer.
    pub fn removal(public_key: Key) -> WgPeerUpdate {
        WgPeerUpdate {
            remove: true,
            ..WgPeerUpdate::only(public_key)
        }
    }

    /// The peer named, nothing changed.
    fn only(public_key: Key) -> WgPeerUpdate {
        WgPeerUpdate {
            public_key,
            remove: false,
            endpoint: None,
            keepalive: None,
            allowed_ips: None,
            update_only: false,
        }
    }
}

/// A kernel WireGuard device as `wg show` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgDevice {
    /// Its interface index.
    pub index: u32,
    /// Its public key (`None` before a private key is set).
    pub public_key: Option<Key>,
    /// The UDP port it listens on (0 while down with none configured).
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<WgPeer>,
}

/// One peer of a [`WgDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// The peer's public key.
    pub public_key: Key,
    /// Its current endpoint (the configured one, or where it last sent from).
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// When the last handshake with it completed (`None`: never).
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from it (after decryption, including keepalives).
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

impl Netlink {
    /// Creates a `wireguard` link `name` directly inside `target`, with `mtu`, left down. Its UDP
    /// socket opens in *this* namespace (the one the link is created from), the arrangement
    /// WireGuard documents for namespaces: the tunnel's underlay stays on the host while its
    /// interface is the workload's.
    pub async fn create_wireguard_in(&self, target: &NetNs, name: &str, mtu: u32) -> Result<()> {
        const OP: &str = "create wireguard link";
        crate::netlink::check_name(OP, name)?;
        let msg = LinkMessageBuilder::<rtnetlink::LinkUnspec>::new_with_info_kind(InfoKind::Wireguard)
            .name(name)
            .mtu(mtu)
            .setns_by_fd(target.as_raw_fd())
            .build();
        self.add_link(OP, format!("{name} (in {})", target.path().display()), msg)
            .await
    }

    /// Whether the kernel can make WireGuard links here: creates one under a throwaway name and
    /// deletes it. `Ok(false)` when the kernel does not know the link kind (no module, or it may
    /// not be loaded), an error for anything else (no `CAP_NET_ADMIN`, …).
    pub async fn wireguard_supported(&self) -> Result<bool> {
        let name = format!("nsmwg{:x}", std::process::id());
        let ns = NetNs::open(self.ns_path())?;
        // One left by a probe that died half-way (in a container the PID repeats).
        self.delete_link(&name).await?;
        match self.create_wireguard_in(&ns, &name, 1420).await {
            Ok(()) => {
                self.delete_link(&name).await?;
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Applies `update` to WireGuard link `name` of namespace `ns`. Atomic as the kernel makes it:
/// a failure (a port in use: `EADDRINUSE`) can leave the parts set before it. A link that is
/// down binds no socket: a taken port is reported here only for a link that is up (for one that
/// is down, when it is brought up).
pub async fn wg_set(ns: &NetNs, name: &str, update: WgDeviceUpdate) -> Result<()> {
    const OP: &str = "configure wireguard link";
    crate::netlink::check_name(OP, name)?;
    let mut attrs = vec![WireguardAttribute::IfName(name.to_owned())];
    if let Some(k) = update.private_key {
        attrs.push(WireguardAttribute::PrivateKey(k));
    }
    if let Some(p) = update.listen_port {
        attrs.push(WireguardAttribute::ListenPort(p));
    }
    if update.replace_peers {
        attrs.push(WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers));
    }
    if !update.peers.is_empty() || update.replace_peers {
        attrs.push(WireguardAttribute::Peers(update.peers.iter().map(peer_attrs).collect()));
    }
    let msg = WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: attrs,
    };
    let object = name.to_owned();
    let path = ns.path().to_path_buf();
    ns.run_async(move || genl(msg, false).map(drop))
        .await?
        .map_err(|source| DataplaneError::Netlink {
            op: OP,
            object,
            ns: path,
            source,
        })
}

/// Reads WireGuard link `name` of namespace `ns` (`wg show`).
pub async fn wg_get(ns: &NetNs, name: &str) -> Result<WgDevice> {
    const OP: &str = "read wireguard link";
    crate::netlink::check_name(OP, name)?;
    let msg = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(name.to_owned())],
    };
    let object = name.to_owned();
    let path = ns.path().to_path_buf();
    let replies = ns
        .run_async(move || genl(msg, true))
        .await?
        .map_err(|source| DataplaneError::Netlink {
            op: OP,
            object,
            ns: path,
            source,
        })?;
    // A device with many peers comes in several messages, a peer's allowed IPs possibly split
    // over two of them (the second repeats the public key).
    let mut dev = WgDevice::default();
    for m in replies {
        for a in m.attributes {
            match a {
                WireguardAttribute::IfIndex(i) => dev.index = i,
                WireguardAttribute::PublicKey(k) => dev.public_key = Some(k).filter(|k| *k != [0; 32]),
                WireguardAttribute::ListenPort(p) => dev.listen_port = p,
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        merge_peer(&mut dev.peers, p);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(dev)
}

fn merge_peer(peers: &mut Vec<WgPeer>, p: WireguardPeer) {
    let mut peer = WgPeer {
        public_key: [0; 32],
        endpoint: None,
        allowed_ips: Vec::new(),
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
    };
    for a in p.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => peer.public_key = k,
            WireguardPeerAttribute::Endpoint(e) => peer.endpoint = Some(e),
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 || t.nano_seconds > 0 => {
                let d = Duration::new(
                    u64::try_from(t.seconds).unwrap_or(0),
                    u32::try_from(t.nano_seconds).unwrap_or(0),
                );
                peer.last_handshake = SystemTime::UNIX_EPOCH.checked_add(d);
            }
            WireguardPeerAttribute::RxBytes(b) => peer.rx_bytes = b,
            WireguardPeerAttribute::TxBytes(b) => peer.tx_bytes = b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                peer.allowed_ips.extend(ips.iter().filter_map(allowed_ip));
            }
            _ => {}
        }
    }
    match peers.iter_mut().find(|q| q.public_key == peer.public_key) {
        Some(q) => q.allowed_ips.extend(peer.allowed_ips),
        None => peers.push(peer),
    }
}

fn allowed_ip(ip: &WireguardAllowedIp) -> Option<IpNet> {
    let mut addr = None;
    let mut cidr = None;
    for a in &ip.0 {
        match a {
            WireguardAllowedIpAttr::IpAddr(i) => addr = Some(*i),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    IpNet::new(addr?, cidr?).ok()
}

fn peer_attrs(p: &WgPeerUpdate) -> WireguardPeer {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(p.public_key)];
    let mut flags = WireguardPeerFlags::empty();
    if p.remove {
        flags |= WireguardPeerFlags::RemoveMe;
    }
    if p.update_only {
        flags |= WireguardPeerFlags::UpdateOnly;
    }
    if let Some(e) = p.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(e));
    }
    if let Some(k) = p.keepalive {
        attrs.push(WireguardPeerAttribute::PersistentKeepalive(k));
    }
    if let Some(ips) = &p.allowed_ips {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
        let list = ips
            .iter()
            .map(|n| {
                let family = match n.addr() {
                    IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
                    IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
                };
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(family),
                    WireguardAllowedIpAttr::IpAddr(n.network()),
                    WireguardAllowedIpAttr::Cidr(n.prefix_len()),
                ])
            })
            .collect();
        attrs.push(WireguardPeerAttribute::AllowedIps(list));
    }
    if !flags.is_empty() {
        attrs.push(WireguardPeerAttribute::Flags(flags));
    }
    WireguardPeer(attrs)
}

/// One generic-netlink exchange on a fresh socket of the calling thread's namespace: resolves
/// the `wireguard` family, sends `msg` (a dump when `dump`) and collects the replies up to the
/// acknowledgement or the end of the dump. `ENOENT` from the resolution means the kernel has no
/// WireGuard.
fn genl(msg: WireguardMessage, dump: bool) -> std::io::Result<Vec<WireguardMessage>> {
    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    // The kernel answers at once; a reply that never comes must not hold the caller forever.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(GENL_TIMEOUT_SECS, 0),
    )?;
    let ctrl = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(WireguardMessage::family_name().to_owned())],
    };
    let family = match exchange(&socket, 1, GenlMessage::from_payload(ctrl), NLM_F_REQUEST | NLM_F_ACK) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the kernel has no WireGuard (no wireguard generic-netlink family)",
            ));
        }
        other => other?,
    }
    .into_iter()
    .flat_map(|m| m.payload.nlas)
    .find_map(|a| match a {
        GenlCtrlAttrs::FamilyId(id) => Some(id),
        _ => None,
    })
    .ok_or_else(|| std::io::Error::other("the kernel did not say the wireguard family's id"))?;
    let flags = if dump {
        NLM_F_REQUEST | NLM_F_DUMP
    } else {
        NLM_F_REQUEST | NLM_F_ACK
    };
    // A dump that raced a change says so (NLM_F_DUMP_INTR) and is asked for again, as wg(8) does.
    let mut seq = 2;
    loop {
        let mut request = GenlMessage::from_payload(msg.clone());
        request.set_resolved_family_id(family);
        match exchange(&socket, seq, request, flags) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && dump && seq < 2 + DUMP_RETRIES => seq += 1,
            other => return other.map(|v| v.into_iter().map(|m| m.payload).collect()),
        }
    }
}

/// Seconds a generic-netlink request may wait for its reply.
const GENL_TIMEOUT_SECS: i64 = 5;
/// How often an interrupted dump is asked for again.
const DUMP_RETRIES: u32 = 3;

/// Sends `payload` and reads replies until the kernel acknowledges it (or ends the dump).
fn exchange<F>(socket: &Socket, seq: u32, payload: GenlMessage<F>, flags: u16) -> std::io::Result<Vec<GenlMessage<F>>>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
    GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
{
    let mut nl = NetlinkMessage::from(payload);
    nl.header.flags = flags;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut interrupted = false;
    loop {
        let (bytes, _) = socket.recv_from_full()?;
        let mut at = 0;
        while at + 16 <= bytes.len() {
            let len = u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
            if len < 16 || at + len > bytes.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "truncated generic netlink reply",
                ));
            }
            let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(&bytes[at..at + len])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            at += (len + 3) & !3;
            if reply.header.sequence_number != seq {
                continue;
            }
            if reply.header.flags & NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => {
                    out.push(m);
                    if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                        return Ok(out);
                    }
                }
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Done(d) if d.code != 0 => return Err(std::io::Error::from_raw_os_error(-d.code)),
                NetlinkPayload::Error(_) | NetlinkPayload::Done(_) if interrupted => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "the dump was interrupted by a change",
                    ));
                }
                NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(out),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_update_carries_flags_and_prefixes() {
        let p = WgPeerUpdate::new(
            [7; 32],
            "192.0.2.1:51820".parse().unwrap(),
            vec!["10.0.0.1/32".parse().unwrap(), "fd00::/64".parse().unwrap()],
        );
        let attrs = peer_attrs(&p).0;
        assert!(attrs.contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps)));
        let ips = attrs
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(v) => Some(v.iter().filter_map(allowed_ip).collect::<Vec<_>>()),
                _ => None,
            })
            .unwrap();
        assert_eq!(ips, p.allowed_ips.clone().unwrap());
        let r = peer_attrs(&WgPeerUpdate::removal([7; 32])).0;
        assert_eq!(
            r,
            vec![
                WireguardPeerAttribute::PublicKey([7; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
            ]
        );
    }

    #[test]
    fn split_peers_merge() {
        let ip = |s: &str| {
            let n: IpNet = s.parse().unwrap();
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::IpAddr(n.addr()),
                WireguardAllowedIpAttr::Cidr(n.prefix_len()),
            ])
        };
        let mut peers = Vec::new();
        merge_peer(
            &mut peers,
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([1; 32]),
                WireguardPeerAttribute::AllowedIps(vec![ip("10.0.0.0/24")]),
            ]),
        );
        merge_peer(
            &mut peers,
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([1; 32]),
                WireguardPeerAttribute::AllowedIps(vec![ip("10.0.1.0/24")]),
            ]),
        );
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].allowed_ips.len(), 2);
        assert_eq!(peers[0].last_handshake, None);
    }
}
