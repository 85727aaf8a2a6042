//! The fast path through a vL3 router: eBPF programs that move a member's IPv4 packets between
//! the member and the router's peer links without the router's IP stack.
//!
//! - **deliver**, on each peer link: a packet for one of the router's members goes straight into
//!   the member's namespace (`bpf_redirect_peer`), skipping the router's forwarding and a second
//!   trip through the CPU's backlog queue on the member's veth.
//! - **send**, on each member's veth end: a packet from the member (its own address, on its own
//!   veth) to a prefix routed to a peer router, between services that may reach each other, goes
//!   straight out of that peer's link (`bpf_redirect_neigh`, whose neighbour lookup of the peer's
//!   gateway address fills in the Ethernet header).
//! - **shortcut**, at *egress* of each peer link: the guard of members' shortcuts (macvlans on the
//!   link, in the members' namespaces, which skip the veth pair altogether). The router's own
//!   frames pass; a member's leave only as **send** would move them, and are dropped otherwise.
//!   A member's frame that may leave gets the link's and its peer's MACs written in and goes on
//!   through the link's transmit as it is, with no redirect: a second pass through the device's
//!   transmit path and this program would cost the sender a few per cent of its CPU.
//!
//! Both do what the kernel's forwarding would: Ethernet addresses rewritten, TTL decremented with
//! the header checksum updated as `ip_decrease_ttl` does. Whatever they do not know or may not
//! decide — other EtherTypes, a TTL about to expire, an unknown address, a source that is not the
//! member's, a pair of services the reach table does not hold — continues up the router's stack
//! unchanged, where the router's filter and routes decide. The tables must only ever admit what
//! that filter admits; they suit routers that need no connection tracking.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::bpf::{Cond, Insn, Map, Program, Size};
use crate::error::Result;
use crate::netlink::Netlink;

/// Helper numbers (`enum bpf_func_id`, include/uapi/linux/bpf.h).
const MAP_LOOKUP_ELEM: i32 = 1;
const REDIRECT_NEIGH: i32 = 152;
const REDIRECT_PEER: i32 = 155;
/// `struct __sk_buff` offsets (include/uapi/linux/bpf.h).
const SKB_IFINDEX: i16 = 40;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
/// tc's "no verdict": the packet goes on up the stack (`TC_ACT_UNSPEC`, `TCX_NEXT`).
const PASS: i32 = -1;
/// tc's "drop" (`TC_ACT_SHOT`).
const DROP: i32 = 2;
/// tc's "carry on as it is" (`TC_ACT_OK`): at egress, on to the device's transmit.
const ACCEPT: i32 = 0;
/// Ethernet header length; the source address at its offset 6.
const ETH_HEADER: i32 = 14;
const ETH_SOURCE: i16 = 6;
/// Ethernet (14) and the fixed IPv4 header (20); the fields used, at their frame offsets.
const HEADERS: i32 = 34;
const TTL: i16 = 22;
const CHECKSUM: i16 = 24;
const SADDR: i16 = 26;
const DADDR: i16 = 30;
/// `AF_INET`, the `nh_family` of `struct bpf_redir_neigh`.
const AF_INET: i32 = 2;
/// Jump offsets standing for "to the pass exit" and "to the drop exit" until a program is
/// complete.
const TO_PASS: i16 = i16::MIN;
const TO_DROP: i16 = i16::MIN + 1;
/// The programs' names (`tc filter show`, `bpftool prog`).
const DELIVER: &str = "nsm_vl3_deliver";
const SEND: &str = "nsm_vl3_send";
const SHORTCUT: &str = "nsm_vl3_shortcut";
/// Most members, peer prefixes and service pairs one router's tables hold.
const MAX_MEMBERS: u32 = 65_536;
const MAX_PREFIXES: u32 = 65_536;
const MAX_PAIRS: u32 = 65_536;
const MAX_LINKS: u32 = 4_096;

/// What a member's shortcut onto a peer link of vL3 `vl3` (a macvlan in the member's namespace)
/// carries as its alias, so that nsm, and whoever looks, can tell it from the workload's links.
pub fn shortcut_alias(vl3: &str) -> String {
    format!("{SHORTCUT_ALIAS_PREFIX}{vl3}")
}

/// Whether `alias` marks a member's shortcut (of any vL3).
pub fn is_shortcut_alias(alias: &str) -> bool {
    alias.starts_with(SHORTCUT_ALIAS_PREFIX)
}

const SHORTCUT_ALIAS_PREFIX: &str = "nsm vL3 shortcut ";

/// A member of the router: where its packets go in, and which service it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Interface index of the router's end of the member's veth pair.
    pub ifindex: u32,
    /// MAC of the member's end: the new destination of frames delivered to it.
    pub member_mac: [u8; 6],
    /// MAC of the router's end: their new source.
    pub router_mac: [u8; 6],
    /// The member's service (a number the reach table uses).
    pub service: u32,
}

impl Member {
    const SIZE: usize = 20;

    fn encode(&self) -> [u8; Self::SIZE] {
        let mut v = [0u8; Self::SIZE];
        v[..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        v[4..10].copy_from_slice(&self.member_mac);
        v[10..16].copy_from_slice(&self.router_mac);
        v[16..].copy_from_slice(&self.service.to_ne_bytes());
        v
    }

    fn decode(v: &[u8]) -> Member {
        let u32_at = |i: usize| u32::from_ne_bytes(v[i..i + 4].try_into().expect("20-byte value"));
        let mut m = Member {
            ifindex: u32_at(0),
            member_mac: [0; 6],
            router_mac: [0; 6],
            service: u32_at(16),
        };
        m.member_mac.copy_from_slice(&v[4..10]);
        m.router_mac.copy_from_slice(&v[10..16]);
        m
    }
}

/// A prefix routed to a peer router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPrefix {
    /// Interface index of the link to the peer.
    pub ifindex: u32,
    /// The peer's gateway address in the prefix (the route's next hop).
    pub gateway: Ipv4Addr,
    /// The service whose members hold the prefix.
    pub service: u32,
}

impl PeerPrefix {
    const SIZE: usize = 12;

    fn encode(&self) -> [u8; Self::SIZE] {
        let mut v = [0u8; Self::SIZE];
        v[..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        v[4..8].copy_from_slice(&self.gateway.octets());
        v[8..].copy_from_slice(&self.service.to_ne_bytes());
        v
    }

    fn decode(v: &[u8]) -> PeerPrefix {
        PeerPrefix {
            ifindex: u32::from_ne_bytes(v[..4].try_into().expect("12-byte value")),
            gateway: Ipv4Addr::new(v[4], v[5], v[6], v[7]),
            service: u32::from_ne_bytes(v[8..12].try_into().expect("12-byte value")),
        }
    }
}

/// A peer link's Ethernet addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkMacs {
    /// The link's own: the source of the router's frames, and of members' frames once guarded.
    pub own: [u8; 6],
    /// The far end's (the peer router's link): the destination of members' frames. Both ends
    /// derive it, so no neighbour lookup is needed per frame.
    pub peer: [u8; 6],
}

impl LinkMacs {
    /// Own at 0, peer at 8, each padded to 8 bytes so the program's loads are aligned.
    const SIZE: usize = 16;

    fn encode(&self) -> [u8; Self::SIZE] {
        let mut v = [0u8; Self::SIZE];
        v[..6].copy_from_slice(&self.own);
        v[8..14].copy_from_slice(&self.peer);
        v
    }
}

fn prefix_key(p: Ipv4Net) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&u32::from(p.prefix_len()).to_ne_bytes());
    k[4..].copy_from_slice(&p.network().octets());
    k
}

fn pair_key(from: u32, to: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&from.to_ne_bytes());
    k[4..].copy_from_slice(&to.to_ne_bytes());
    k
}

/// Which of the two programs an attachment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// On a peer link: packets from the peer to members.
    Deliver,
    /// On a member's veth end: packets from the member to peers.
    Send,
}

/// One router's programs, tables and attachments. Programs stay attached (tc filters) when this
/// is dropped or the process exits, with their tables as they were, so traffic keeps its path
/// while the daemon restarts; a new one's [`FastPath::attach`] replaces them, and turning the fast
/// path off means [`FastPath::detach_all`].
#[derive(Debug)]
pub struct FastPath {
    members: Map,
    prefixes: Map,
    reach: Map,
    /// Peer link index -> [`LinkMacs`].
    link_macs: Map,
    deliver: Program,
    send: Program,
    shortcut: Program,
    /// Links this instance's programs are attached to: name -> (index, direction).
    links: HashMap<String, (u32, Direction)>,
}

impl FastPath {
    /// Creates the tables and loads the programs (needs `CAP_BPF` and `CAP_NET_ADMIN`).
    pub fn new() -> Result<FastPath> {
        let members = Map::hash("nsm_vl3_members", 4, Member::SIZE, MAX_MEMBERS)?;
        let prefixes = Map::lpm_trie("nsm_vl3_peers", 4, PeerPrefix::SIZE, MAX_PREFIXES)?;
        let reach = Map::hash("nsm_vl3_reach", 8, 4, MAX_PAIRS)?;
        let link_macs = Map::hash("nsm_vl3_links", 4, LinkMacs::SIZE, MAX_LINKS)?;
        let deliver = Program::load_tc(DELIVER, &deliver(&members))?;
        let send = Program::load_tc(SEND, &send(&members, &prefixes, &reach))?;
        let shortcut = Program::load_tc(SHORTCUT, &shortcut(&link_macs, &members, &prefixes, &reach))?;
        Ok(FastPath {
            members,
            prefixes,
            reach,
            link_macs,
            deliver,
            send,
            shortcut,
            links: HashMap::new(),
        })
    }

    /// Attaches the program for `direction` at ingress of link `name` (index `ifindex`) of `nl`'s
    /// namespace, replacing whatever program nsm left there, unless this one is attached already.
    /// A peer link (`Deliver`) also gets the shortcut program at egress, first: a member's
    /// shortcut onto the link must never find it unguarded.
    pub async fn attach(&mut self, nl: &Netlink, name: &str, ifindex: u32, direction: Direction) -> Result<()> {
        if self.links.get(name) == Some(&(ifindex, direction)) {
            return Ok(());
        }
        let (program, label) = match direction {
            Direction::Deliver => {
                nl.attach_tc_egress(name, self.shortcut.fd(), SHORTCUT).await?;
                (&self.deliver, DELIVER)
            }
            Direction::Send => (&self.send, SEND),
        };
        nl.attach_tc_ingress(name, program.fd(), label).await?;
        self.links.insert(name.to_owned(), (ifindex, direction));
        Ok(())
    }

    /// Whether link `name` is guarded by the shortcut program (attached as a peer link).
    pub fn guards(&self, name: &str) -> bool {
        matches!(self.links.get(name), Some((_, Direction::Deliver)))
    }

    /// Detaches from link `name`, if it is still there.
    pub async fn detach(&mut self, nl: &Netlink, name: &str) -> Result<()> {
        if let Some((_, direction)) = self.links.remove(name) {
            nl.detach_tc_ingress(name).await?;
            if direction == Direction::Deliver {
                nl.detach_tc_egress(name).await?;
            }
        }
        Ok(())
    }

    /// Forgets links not in `keep` (gone with their devices), detaching what is still there.
    pub async fn detach_others(&mut self, nl: &Netlink, keep: impl Fn(&str) -> bool) -> Result<()> {
        let gone: Vec<String> = self.links.keys().filter(|n| !keep(n)).cloned().collect();
        for name in gone {
            self.detach(nl, &name).await?;
        }
        Ok(())
    }

    /// Detaches from every link this instance attached to: all traffic takes the router's stack.
    pub async fn detach_all(&mut self, nl: &Netlink) -> Result<()> {
        self.detach_others(nl, |_| false).await
    }

    /// Links a program is attached to, with its direction.
    pub fn attached(&self) -> impl Iterator<Item = (&str, Direction)> {
        self.links.iter().map(|(n, (_, d))| (n.as_str(), *d))
    }

    /// Sets member `addr`.
    pub fn set_member(&self, addr: Ipv4Addr, member: Member) -> Result<()> {
        self.members.set(&addr.octets(), &member.encode())
    }

    /// Removes member `addr`: its packets take the router's stack; `false` if it was not known.
    pub fn remove_member(&self, addr: Ipv4Addr) -> Result<bool> {
        self.members.remove(&addr.octets())
    }

    /// The member table.
    pub fn members(&self) -> Result<Vec<(Ipv4Addr, Member)>> {
        let mut out = Vec::new();
        for k in self.members.keys()? {
            if let Some(v) = self.members.get(&k)? {
                out.push((Ipv4Addr::new(k[0], k[1], k[2], k[3]), Member::decode(&v)));
            }
        }
        Ok(out)
    }

    /// Routes `prefix` to a peer.
    pub fn set_prefix(&self, prefix: Ipv4Net, peer: PeerPrefix) -> Result<()> {
        self.prefixes.set(&prefix_key(prefix.trunc()), &peer.encode())
    }

    /// Stops routing `prefix` on the fast path; `false` if it was not known.
    pub fn remove_prefix(&self, prefix: Ipv4Net) -> Result<bool> {
        self.prefixes.remove(&prefix_key(prefix.trunc()))
    }

    /// The peer prefix table.
    pub fn prefixes(&self) -> Result<Vec<(Ipv4Net, PeerPrefix)>> {
        let mut out = Vec::new();
        for k in self.prefixes.keys()? {
            if let Some(v) = self.prefixes.get(&k)? {
                let len = u32::from_ne_bytes(k[..4].try_into().expect("8-byte key"));
                let addr = Ipv4Addr::new(k[4], k[5], k[6], k[7]);
                if let Ok(p) = Ipv4Net::new(addr, len as u8) {
                    out.push((p, PeerPrefix::decode(&v)));
                }
            }
        }
        Ok(out)
    }

    /// Makes the member table exactly `members`, changing only what differs.
    pub fn set_members(&self, members: &HashMap<Ipv4Addr, Member>) -> Result<()> {
        self.members.replace_all(
            &members
                .iter()
                .map(|(a, m)| (a.octets().to_vec(), m.encode().to_vec()))
                .collect(),
        )
    }

    /// Makes the peer prefix table exactly `prefixes`, changing only what differs.
    pub fn set_prefixes(&self, prefixes: &HashMap<Ipv4Net, PeerPrefix>) -> Result<()> {
        self.prefixes.replace_all(
            &prefixes
                .iter()
                .map(|(p, e)| (prefix_key(p.trunc()).to_vec(), e.encode().to_vec()))
                .collect(),
        )
    }

    /// Makes the peer links' MAC table exactly `macs` (link index -> its MACs): what tells the
    /// router's frames from its members' shortcut frames at egress of each link, and addresses
    /// the members' frames that may leave.
    pub fn set_link_macs(&self, macs: &HashMap<u32, LinkMacs>) -> Result<()> {
        self.link_macs.replace_all(
            &macs
                .iter()
                .map(|(i, m)| (i.to_ne_bytes().to_vec(), m.encode().to_vec()))
                .collect(),
        )
    }

    /// Makes the reach table exactly `pairs`: (from, to) services whose members' packets may
    /// take the fast path.
    pub fn set_reach(&self, pairs: &BTreeSet<(u32, u32)>) -> Result<()> {
        self.reach.replace_all(
            &pairs
                .iter()
                .map(|(from, to)| (pair_key(*from, *to).to_vec(), 1u32.to_ne_bytes().to_vec()))
                .collect(),
        )
    }
}

/// Checks that the packet holds Ethernet + IPv4 headers with a TTL that will not expire here,
/// leaving `data` in r2; else to `fail`. Clobbers r3–r5.
fn ipv4_headers(fail: i16) -> Vec<Insn> {
    use Insn as I;
    vec![
        I::load(Size::W, 2, 6, SKB_DATA),
        I::load(Size::W, 3, 6, SKB_DATA_END),
        I::mov(4, 2),
        I::add_imm(4, HEADERS),
        I::jump(Cond::Gt, 4, 3, fail),
        // EtherType 0x0800, read as a little-endian u16.
        I::load(Size::H, 5, 2, 12),
        I::jump_imm(Cond::Ne, 5, 0x0008, fail),
        I::load(Size::B, 5, 2, TTL),
        I::jump_imm(Cond::Lt, 5, 2, fail),
    ]
}

/// TTL - 1 and the checksum (as stored, little-endian) + htons(0x0100) with end-around carry, on
/// the packet at r2. Clobbers r5.
fn decrement_ttl() -> Vec<Insn> {
    use Insn as I;
    vec![
        I::load(Size::B, 5, 2, TTL),
        I::add_imm(5, -1),
        I::store(Size::B, 2, TTL, 5),
        I::load(Size::H, 5, 2, CHECKSUM),
        I::add_imm(5, 1),
        I::jump_imm(Cond::Lt, 5, 0xffff, 1),
        I::add_imm(5, 1),
        I::store(Size::H, 2, CHECKSUM, 5),
    ]
}

/// The frame's (at r2) destination and source MACs from the table entry at `entry`: six bytes at
/// its offsets `dst` and `src`. Clobbers r5.
fn ethernet_addresses(entry: u8, dst: i16, src: i16) -> Vec<Insn> {
    use Insn as I;
    let mut p = Vec::new();
    for (from, to) in [(dst, 0), (src, ETH_SOURCE)] {
        p.extend([
            I::load(Size::W, 5, entry, from),
            I::store(Size::W, 2, to, 5),
            I::load(Size::H, 5, entry, from + 4),
            I::store(Size::H, 2, to + 4, 5),
        ]);
    }
    p
}

/// r0 = lookup(`map`, key at r10 + `key`); to `fail` if absent.
fn lookup(map: &Map, key: i32, fail: i16) -> Vec<Insn> {
    use Insn as I;
    let mut p = I::load_map(1, map).to_vec();
    p.extend([
        I::mov(2, 10),
        I::add_imm(2, key),
        I::call(MAP_LOOKUP_ELEM),
        I::jump_imm(Cond::Eq, 0, 0, fail),
    ]);
    p
}

/// `bpf_redirect_neigh(ifindex in r1, next hop = the IPv4 address in r3)`, returning its verdict;
/// the `struct bpf_redir_neigh` goes at r10 - 48. Clobbers r1–r5.
fn redirect_neigh() -> Vec<Insn> {
    use Insn as I;
    vec![
        // { nh_family = AF_INET, ipv4_nh, zeroes }
        I::mov_imm(2, AF_INET),
        I::store(Size::W, 10, -48, 2),
        I::store(Size::W, 10, -44, 3),
        I::mov_imm(2, 0),
        I::store(Size::W, 10, -40, 2),
        I::store(Size::W, 10, -36, 2),
        I::store(Size::W, 10, -32, 2),
        I::mov(2, 10),
        I::add_imm(2, -48),
        I::mov_imm(3, 20),
        I::mov_imm(4, 0),
        I::call(REDIRECT_NEIGH),
        I::exit(),
    ]
}

/// Ends a program: the pass and drop exits that anything jumps to (the verifier refuses
/// unreachable code), and every jump to them resolved.
fn finish(mut p: Vec<Insn>) -> Vec<Insn> {
    let (mut pass, mut drop) = (0, 0);
    for (placeholder, verdict, at) in [(TO_PASS, PASS, &mut pass), (TO_DROP, DROP, &mut drop)] {
        if p.iter().any(|i| i.jumps_to(placeholder)) {
            *at = p.len();
            p.extend([Insn::mov_imm(0, verdict), Insn::exit()]);
        }
    }
    for (i, insn) in p.iter_mut().enumerate() {
        insn.resolve(TO_PASS, i, pass);
        insn.resolve(TO_DROP, i, drop);
    }
    p
}

/// The deliver program (r6 the context, r7 the member's entry).
fn deliver(members: &Map) -> Vec<Insn> {
    use Insn as I;
    let mut p = vec![I::mov(6, 1)];
    p.extend(ipv4_headers(TO_PASS));
    p.extend([I::load(Size::W, 5, 2, DADDR), I::store(Size::W, 10, -4, 5)]);
    p.extend(lookup(members, -4, TO_PASS));
    p.push(I::mov(7, 0));
    // Packet pointers do not survive a call: load and check them again.
    p.extend(ipv4_headers(TO_PASS));
    // Destination: the member's MAC (entry bytes 4..10); source: the router's end's (10..16).
    p.extend(ethernet_addresses(7, 4, 10));
    p.extend(decrement_ttl());
    p.extend([
        // Into the member's namespace, past its backlog queue.
        I::load(Size::W, 1, 7, 0),
        I::mov_imm(2, 0),
        I::call(REDIRECT_PEER),
        I::exit(),
    ]);
    finish(p)
}

/// Stores the packet's (at r2) source address at r10 - 4 and its destination where the LPM key
/// { 32, daddr } at r10 - 16 wants it. Clobbers r5.
fn addresses() -> Vec<Insn> {
    use Insn as I;
    vec![
        I::load(Size::W, 5, 2, SADDR),
        I::store(Size::W, 10, -4, 5),
        I::load(Size::W, 5, 2, DADDR),
        I::store(Size::W, 10, -12, 5),
    ]
}

/// From the source member's service in r8: r9 = the destination's peer prefix entry, to `fail`
/// unless there is one and the reach table pairs the two services. Key { from, to } at r10 - 24.
fn to_peer(prefixes: &Map, reach: &Map, fail: i16) -> Vec<Insn> {
    use Insn as I;
    let mut p = vec![I::mov_imm(1, 32), I::store(Size::W, 10, -16, 1)];
    p.extend(lookup(prefixes, -16, fail));
    p.extend([
        I::mov(9, 0),
        I::store(Size::W, 10, -24, 8),
        I::load(Size::W, 1, 9, 8),
        I::store(Size::W, 10, -20, 1),
    ]);
    p.extend(lookup(reach, -24, fail));
    p
}

/// Out of link r1 to the prefix entry's (r9) gateway, TTL decremented and the Ethernet header
/// from the neighbour table: what the router's forwarding would do.
fn forward(fail: i16) -> Vec<Insn> {
    let mut p = ipv4_headers(fail);
    p.extend(decrement_ttl());
    p.push(Insn::load(Size::W, 3, 9, 4));
    p.extend(redirect_neigh());
    p
}

/// The send program (r6 the context, r8 the source's service, r9 the destination's prefix entry).
fn send(members: &Map, prefixes: &Map, reach: &Map) -> Vec<Insn> {
    use Insn as I;
    let mut p = vec![I::mov(6, 1)];
    p.extend(ipv4_headers(TO_PASS));
    p.extend(addresses());
    // The source is a member, sending on its own veth.
    p.extend(lookup(members, -4, TO_PASS));
    p.extend([
        I::load(Size::W, 1, 0, 0),
        I::load(Size::W, 2, 6, SKB_IFINDEX),
        I::jump(Cond::Ne, 1, 2, TO_PASS),
        I::load(Size::W, 8, 0, 16),
    ]);
    p.extend(to_peer(prefixes, reach, TO_PASS));
    // Out of the peer's link.
    p.push(I::load(Size::W, 1, 9, 0));
    p.extend(forward(TO_PASS));
    finish(p)
}

/// The shortcut program, at egress of each peer link (r6 the context, r7 the link's entry, r8 the
/// source member's entry, then its service, r9 the destination's prefix entry). Frames with the
/// link's own source address are the router's and pass. Any other frame came from a member's
/// shortcut and leaves only as the send program would let it: IPv4 from a member, with the
/// member's own address *and* MAC (a member cannot pick another's unnoticed), to a prefix of this
/// link's peer, between services that may reach each other; TTL decremented and the link's and
/// its peer's MACs written in, as the router would, and on through the link's transmit.
/// Everything else is dropped: a member's shortcut leads nowhere but to its peers' members.
fn shortcut(links: &Map, members: &Map, prefixes: &Map, reach: &Map) -> Vec<Insn> {
    use Insn as I;
    let mut p = vec![
        I::mov(6, 1),
        I::load(Size::W, 5, 6, SKB_IFINDEX),
        I::store(Size::W, 10, -4, 5),
    ];
    p.extend(lookup(links, -4, TO_PASS));
    p.extend([
        I::mov(7, 0),
        I::load(Size::W, 2, 6, SKB_DATA),
        I::load(Size::W, 3, 6, SKB_DATA_END),
        I::mov(4, 2),
        I::add_imm(4, ETH_HEADER),
        I::jump(Cond::Gt, 4, 3, TO_DROP),
        // The router's own frame (the link's MAC as its source) passes; any other is a member's.
        I::load(Size::W, 4, 2, ETH_SOURCE),
        I::load(Size::W, 5, 7, 0),
        I::jump(Cond::Ne, 4, 5, 5),
        I::load(Size::H, 4, 2, ETH_SOURCE + 4),
        I::load(Size::H, 5, 7, 4),
        I::jump(Cond::Ne, 4, 5, 2),
        I::mov_imm(0, PASS),
        I::exit(),
    ]);
    p.extend(ipv4_headers(TO_DROP));
    p.extend(addresses());
    p.extend(lookup(members, -4, TO_DROP));
    p.push(I::mov(8, 0));
    // The member's own MAC as the source (entry bytes 4..10), not only its address.
    p.extend(ipv4_headers(TO_DROP));
    p.extend([
        I::load(Size::W, 4, 2, ETH_SOURCE),
        I::load(Size::W, 5, 8, 4),
        I::jump(Cond::Ne, 4, 5, TO_DROP),
        I::load(Size::H, 4, 2, ETH_SOURCE + 4),
        I::load(Size::H, 5, 8, 8),
        I::jump(Cond::Ne, 4, 5, TO_DROP),
        I::load(Size::W, 8, 8, 16),
    ]);
    p.extend(to_peer(prefixes, reach, TO_DROP));
    p.extend([
        // The prefix's peer is this link's.
        I::load(Size::W, 1, 9, 0),
        I::load(Size::W, 2, 6, SKB_IFINDEX),
        I::jump(Cond::Ne, 1, 2, TO_DROP),
    ]);
    // Packet pointers do not survive the lookups: load and check them again.
    p.extend(ipv4_headers(TO_DROP));
    p.extend(decrement_ttl());
    // Destination: the peer's MAC (entry bytes 8..14); source: the link's own (0..6).
    p.extend(ethernet_addresses(7, 8, 0));
    p.extend([I::mov_imm(0, ACCEPT), I::exit()]);
    finish(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entries_round_trip() {
        let m = Member {
            ifindex: 7,
            member_mac: [2, 0, 0, 0, 0, 1],
            router_mac: [2, 0, 0, 0, 0, 2],
            service: 3,
        };
        assert_eq!(Member::decode(&m.encode()), m);
        let p = PeerPrefix {
            ifindex: 9,
            gateway: Ipv4Addr::new(10, 0, 1, 0),
            service: 4,
        };
        assert_eq!(PeerPrefix::decode(&p.encode()), p);
        assert_eq!(
            prefix_key("10.0.1.7/24".parse::<Ipv4Net>().unwrap().trunc()),
            [24, 0, 0, 0, 10, 0, 1, 0]
        );
    }
}
