//! Direct delivery into a router's members: an eBPF program at tc ingress of a vL3 router's peer
//! links that hands an IPv4 packet addressed to one of the router's members straight to the
//! member's namespace (`bpf_redirect_peer`), instead of routing it in the router namespace and
//! sending it through the member's veth (a second trip through the CPU's backlog queue).
//!
//! What the kernel's forwarding would do to such a packet, the program does: it rewrites the
//! Ethernet addresses to the veth pair's and decrements the TTL (updating the header checksum
//! as `ip_decrease_ttl` does). Anything it does not know — other EtherTypes, a TTL about to
//! expire, an address that is not a member here — continues up the router's stack unchanged.
//! The router's own filter is not on this path: it suits routers whose packets from peers were
//! already filtered by the sending router and need no connection tracking here.

use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::bpf::{Cond, HashMap, Insn, Link, Program, Size};
use crate::error::Result;
use crate::netns::NetNs;

/// Helper numbers (`enum bpf_func_id`, include/uapi/linux/bpf.h).
const MAP_LOOKUP_ELEM: i32 = 1;
const REDIRECT_PEER: i32 = 155;
/// `struct __sk_buff` offsets of `data` and `data_end`.
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
/// tc's "no verdict": the packet goes on up the stack (`TC_ACT_UNSPEC`, `TCX_NEXT`).
const PASS: i32 = -1;
/// Ethernet (14) and the fixed IPv4 header (20).
const HEADERS: i32 = 34;
/// Jump offset standing for "to the pass exit" until the program is complete.
const TO_PASS: i16 = i16::MIN;
/// Most members one router's table holds.
const MAX_MEMBERS: u32 = 65_536;

/// Where a member's packets go: the router's end of its veth pair and both ends' MACs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Interface index of the router's end (in the router namespace).
    pub ifindex: u32,
    /// MAC of the member's end: the frame's new destination.
    pub member_mac: [u8; 6],
    /// MAC of the router's end: the frame's new source.
    pub router_mac: [u8; 6],
}

impl Member {
    fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        v[4..10].copy_from_slice(&self.member_mac);
        v[10..].copy_from_slice(&self.router_mac);
        v
    }

    fn decode(v: &[u8]) -> Member {
        let mut m = Member {
            ifindex: u32::from_ne_bytes(v[..4].try_into().expect("16-byte value")),
            member_mac: [0; 6],
            router_mac: [0; 6],
        };
        m.member_mac.copy_from_slice(&v[4..10]);
        m.router_mac.copy_from_slice(&v[10..16]);
        m
    }
}

/// One router's delivery program, its member table and its attachments.
#[derive(Debug)]
pub struct Delivery {
    members: HashMap,
    program: Arc<Program>,
    /// Attachments by link name; a link's goes when the link is removed or replaced.
    links: std::collections::HashMap<String, (u32, Link)>,
}

impl Delivery {
    /// Creates the member table and loads the program (needs `CAP_BPF` and `CAP_NET_ADMIN`).
    pub fn new() -> Result<Delivery> {
        let members = HashMap::create("nsm_vl3_members", 4, 16, MAX_MEMBERS)?;
        let program = Arc::new(Program::load_tc("nsm_vl3_deliver", &program(&members))?);
        Ok(Delivery {
            members,
            program,
            links: Default::default(),
        })
    }

    /// Attaches the program at ingress of link `name` (index `ifindex`) of namespace `ns`, unless
    /// it is attached there already.
    pub async fn attach(&mut self, ns: &NetNs, name: &str, ifindex: u32) -> Result<()> {
        if self.links.get(name).is_some_and(|(i, _)| *i == ifindex) {
            return Ok(());
        }
        let program = self.program.clone();
        let link = ns.run_async(move || program.attach_tc_ingress(ifindex)).await??;
        self.links.insert(name.to_owned(), (ifindex, link));
        Ok(())
    }

    /// Forgets the attachment on link `name` (the link is gone or being removed).
    pub fn detach(&mut self, name: &str) {
        self.links.remove(name);
    }

    /// Links the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Delivers packets for `addr` to `member`.
    pub fn set(&self, addr: Ipv4Addr, member: Member) -> Result<()> {
        self.members.set(&addr.octets(), &member.encode())
    }

    /// Stops delivering packets for `addr` directly; `false` if it was not in the table.
    pub fn remove(&self, addr: Ipv4Addr) -> Result<bool> {
        self.members.remove(&addr.octets())
    }

    /// The member table.
    pub fn members(&self) -> Result<Vec<(Ipv4Addr, Member)>> {
        let mut out = Vec::new();
        for k in self.members.keys()? {
            let addr = Ipv4Addr::new(k[0], k[1], k[2], k[3]);
            if let Some(v) = self.members.get(&k)? {
                out.push((addr, Member::decode(&v)));
            }
        }
        Ok(out)
    }
}

/// The program. r6 holds the packet's context, r7 the member's table entry.
fn program(members: &HashMap) -> Vec<Insn> {
    use Insn as I;
    let mut p = vec![
        I::mov(6, 1),
        // Ethernet + IPv4 header present?
        I::load(Size::W, 2, 6, SKB_DATA),
        I::load(Size::W, 3, 6, SKB_DATA_END),
        I::mov(4, 2),
        I::add_imm(4, HEADERS),
        I::jump(Cond::Gt, 4, 3, TO_PASS),
        // EtherType 0x0800, read as a little-endian u16.
        I::load(Size::H, 5, 2, 12),
        I::jump_imm(Cond::Ne, 5, 0x0008, TO_PASS),
        // A TTL that would expire here: the stack answers it.
        I::load(Size::B, 5, 2, 22),
        I::jump_imm(Cond::Lt, 5, 2, TO_PASS),
        // Look the destination address up (a 4-byte key on the stack).
        I::load(Size::W, 5, 2, 30),
        I::store(Size::W, 10, -4, 5),
    ];
    p.extend(I::load_map(1, members));
    p.extend([
        I::mov(2, 10),
        I::add_imm(2, -4),
        I::call(MAP_LOOKUP_ELEM),
        I::jump_imm(Cond::Eq, 0, 0, TO_PASS),
        I::mov(7, 0),
        // Packet pointers do not survive the call: load and check them again.
        I::load(Size::W, 2, 6, SKB_DATA),
        I::load(Size::W, 3, 6, SKB_DATA_END),
        I::mov(4, 2),
        I::add_imm(4, HEADERS),
        I::jump(Cond::Gt, 4, 3, TO_PASS),
        // Destination and source MAC from the entry (bytes 4..16) over the frame's first 12.
        I::load(Size::W, 5, 7, 4),
        I::store(Size::W, 2, 0, 5),
        I::load(Size::W, 5, 7, 8),
        I::store(Size::W, 2, 4, 5),
        I::load(Size::W, 5, 7, 12),
        I::store(Size::W, 2, 8, 5),
        // TTL - 1; the checksum (as stored, little-endian) + htons(0x0100) with end-around carry.
        I::load(Size::B, 5, 2, 22),
        I::add_imm(5, -1),
        I::store(Size::B, 2, 22, 5),
        I::load(Size::H, 5, 2, 24),
        I::add_imm(5, 1),
        I::jump_imm(Cond::Lt, 5, 0xffff, 1),
        I::add_imm(5, 1),
        I::store(Size::H, 2, 24, 5),
        // Into the member's namespace, past its backlog queue.
        I::load(Size::W, 1, 7, 0),
        I::mov_imm(2, 0),
        I::call(REDIRECT_PEER),
        I::exit(),
    ]);
    let pass = p.len();
    p.extend([I::mov_imm(0, PASS), I::exit()]);
    for (i, insn) in p.iter_mut().enumerate() {
        insn.resolve(TO_PASS, i, pass);
    }
    p
}
