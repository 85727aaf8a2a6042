//! Receive-side coalescing ("GRO on write"): decrypted packets of one TCP or UDP flow become one
//! super-packet with a virtio-net header, so the kernel handles one 64 KiB packet instead of ~45.
//!
//! Why not tun-rs's GRO, which this replaces: it copies every packet into a fresh allocation
//! before looking at it, copies it again to coalesce, and verifies every segment's checksum. A
//! profile of a 4-stream run put those at ~5 % of the machine's CPU. Here:
//!
//! * A packet is decrypted straight into place. While the last buffer holds a flow that can still
//!   grow, [`Gro::dst`] hands the protocol core that buffer's tail less one header's length. If
//!   the packet continues the flow, its headers have overlaid the end of the previous payload,
//!   whose bytes were saved and are now put back: the new payload follows the old one without a
//!   copy. If it does not, it moves to a fresh buffer (the one copy there always was).
//! * Checksums are not verified. Poly1305 has already authenticated the packet, and the kernel's
//!   WireGuard marks decrypted packets CHECKSUM_UNNECESSARY for the same reason. Every TCP/UDP
//!   packet goes out with NEEDS_CSUM and the pseudo-header sum in its checksum field: the kernel
//!   trusts it on local delivery and computes the checksum only if it forwards the packet.
//!
//! Sans-IO: the caller decrypts into [`Gro::dst`], then writes [`Gro::packets`] to the TUN.

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4, VirtioNetHdr};

use crate::vnet::{F_NEEDS_CSUM, HDR, be16, pseudo_header_sum, put16};

/// Largest IP packet (IPv4 total length, IPv6 payload length without jumbograms).
const MAX_IP: usize = 65535;
/// Largest headers a flow can have: IPv6 (40) and TCP with options (60).
const MAX_HEADERS: usize = 100;
/// A buffer's size: the header, the largest packet, and room behind it for the protocol core,
/// which writes the authentication tag after the plaintext.
const CAP: usize = HDR + MAX_IP + 256;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
}

/// What a packet's headers say, for the packets whose checksum can be left to the kernel.
#[derive(Clone, Copy, Debug)]
struct Seg {
    l4: L4,
    v6: bool,
    /// IP header length.
    iph: usize,
    /// IP and transport header length.
    hdrs: usize,
    payload: usize,
    seq: u32,
    /// TCP flags are ACK or ACK|PSH with a payload (UDP: a payload): it may join a super-packet.
    joins: bool,
    psh: bool,
}

/// Parses an IPv4 (without options or fragmentation) or IPv6 (without extension headers) TCP or
/// UDP packet; anything else is written as it came, checksum and all.
fn parse(pkt: &[u8]) -> Option<Seg> {
    let (v6, iph, proto) = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20
            && pkt[0] & 0x0f == 5
            && usize::from(be16(pkt, 2)) == pkt.len()
            && be16(pkt, 6) & 0x3fff == 0 =>
        {
            (false, 20, pkt[9])
        }
        6 if pkt.len() >= 40 && usize::from(be16(pkt, 4)) + 40 == pkt.len() => (true, 40, pkt[6]),
        _ => return None,
    };
    match proto {
        6 if pkt.len() >= iph + 20 => {
            let hdrs = iph + usize::from(pkt[iph + 12] >> 4) * 4;
            if hdrs < iph + 20 || pkt.len() < hdrs {
                return None;
            }
            let flags = pkt[iph + 13];
            let payload = pkt.len() - hdrs;
            Some(Seg {
                l4: L4::Tcp,
                v6,
                iph,
                hdrs,
                payload,
                seq: u32::from_be_bytes([pkt[iph + 4], pkt[iph + 5], pkt[iph + 6], pkt[iph + 7]]),
                joins: flags & !TCP_PSH == TCP_ACK && payload > 0,
                psh: flags & TCP_PSH != 0,
            })
        }
        // IPv4 UDP without a checksum (0) keeps it that way.
        17 if pkt.len() >= iph + 8
            && usize::from(be16(pkt, iph + 4)) == pkt.len() - iph
            && (v6 || be16(pkt, iph + 6) != 0) =>
        {
            let payload = pkt.len() - iph - 8;
            Some(Seg {
                l4: L4::Udp,
                v6,
                iph,
                hdrs: iph + 8,
                payload,
                seq: 0,
                joins: payload > 0,
                psh: false,
            })
        }
        _ => None,
    }
}

/// Whether `b`'s headers equal those of `a` (the flow's first packet) where a super-packet needs
/// them equal: everything but lengths, IPv4 ID and checksums, TCP sequence number and PSH.
fn same_headers(a: &[u8], b: &[u8], s: &Seg) -> bool {
    let ip_same = if s.v6 {
        a[..4] == b[..4] && a[6..40] == b[6..40]
    } else {
        a[..2] == b[..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    };
    let (x, y) = (&a[s.iph..s.hdrs], &b[s.iph..s.hdrs]);
    ip_same
        && match s.l4 {
            L4::Udp => x[..4] == y[..4],
            L4::Tcp => {
                x[..4] == y[..4]
                    && x[8..13] == y[8..13]
                    && x[13] & !TCP_PSH == y[13] & !TCP_PSH
                    && x[14..16] == y[14..16]
                    && x[18..] == y[18..]
            }
        }
}

/// The pseudo-header sum for `l4_len` bytes, folded but not complemented: what NEEDS_CSUM wants in
/// the checksum field.
fn pseudo_sum(pkt: &[u8], s: &Seg, l4_len: usize) -> u16 {
    let proto = match s.l4 {
        L4::Tcp => 6,
        L4::Udp => 17,
    };
    tun_rs::checksum(&[], pseudo_header_sum(pkt, s.v6, proto, l4_len))
}

/// One buffer's packet: its first segment's headers and how far the flow has grown.
#[derive(Clone, Copy, Debug, Default)]
struct Meta {
    seg: Option<Seg>,
    segs: u16,
    /// Payload of each segment but the last (the first one's).
    size: usize,
    next_seq: u32,
    /// Another segment may still join.
    open: bool,
}

/// Where the packet being decrypted goes, and the bytes its headers overlay.
struct Pending {
    buf: usize,
    at: usize,
    saved: [u8; MAX_HEADERS],
    saved_len: usize,
}

/// Buffers of decrypted packets on their way to the TUN.
pub(crate) struct Gro {
    bufs: Vec<Box<[u8]>>,
    ends: Vec<usize>,
    meta: Vec<Meta>,
    n: usize,
    pending: Option<Pending>,
    /// The TUN takes a virtio-net header (and TSO): coalesce TCP, leave checksums to the kernel.
    vnet: bool,
    /// The TUN takes UDP segmentation offload: coalesce UDP too.
    uso: bool,
}

impl Gro {
    /// `buffers` super-packets per batch, for a TUN with (`vnet`) or without a virtio-net header.
    pub(crate) fn new(buffers: usize, vnet: bool, uso: bool) -> Gro {
        Gro {
            bufs: (0..buffers.max(2)).map(|_| vec![0u8; CAP].into_boxed_slice()).collect(),
            ends: vec![0; buffers.max(2)],
            meta: vec![Meta::default(); buffers.max(2)],
            n: 0,
            pending: None,
            vnet,
            uso: vnet && uso,
        }
    }

    /// Whether every buffer is taken: [`Gro::dst`] has nowhere to put a packet until the batch is
    /// written out.
    pub(crate) fn is_full(&self) -> bool {
        self.n >= self.bufs.len()
    }

    /// Where to decrypt a datagram of `need` bytes (the protocol core writes up to that many), or
    /// `None` when the batch is full: write it out with [`Gro::packets`] and [`Gro::clear`] first.
    /// Follow with [`Gro::push`] or [`Gro::discard`].
    pub(crate) fn dst(&mut self, need: usize) -> Option<&mut [u8]> {
        self.discard();
        // A fresh buffer must stay free in case the packet does not continue the last flow.
        if self.is_full() {
            return None;
        }
        // The tail of the last buffer, if its flow may grow and the packet's headers would overlay
        // payload only (not the first segment's headers, which later packets are compared with).
        let tail = self.n.checked_sub(1).filter(|&t| self.meta[t].open).and_then(|t| {
            let hdrs = self.meta[t].seg?.hdrs;
            let at = self.ends[t] - hdrs;
            (at >= HDR + hdrs && at + need <= CAP).then_some((t, at, hdrs))
        });
        let (buf, at, saved_len) = tail.unwrap_or((self.n, HDR, 0));
        if need > CAP - at {
            return None;
        }
        let mut saved = [0u8; MAX_HEADERS];
        saved[..saved_len].copy_from_slice(&self.bufs[buf][at..at + saved_len]);
        self.pending = Some(Pending {
            buf,
            at,
            saved,
            saved_len,
        });
        Some(&mut self.bufs[buf][at..])
    }

    /// The `len` bytes decrypted into [`Gro::dst`].
    pub(crate) fn decrypted(&self, len: usize) -> &[u8] {
        let p = self.pending.as_ref().expect("decrypted() after dst()");
        &self.bufs[p.buf][p.at..p.at + len]
    }

    /// Drops what was decrypted into [`Gro::dst`] (not a packet for the TUN), restoring what it
    /// overlaid.
    pub(crate) fn discard(&mut self) {
        if let Some(p) = self.pending.take() {
            self.bufs[p.buf][p.at..p.at + p.saved_len].copy_from_slice(&p.saved[..p.saved_len]);
        }
    }

    /// Keeps the `len`-byte packet decrypted into [`Gro::dst`]: joins the last flow or starts a
    /// buffer of its own.
    pub(crate) fn push(&mut self, len: usize) {
        let Some(p) = self.pending.take() else { return };
        let seg = if self.vnet {
            parse(&self.bufs[p.buf][p.at..p.at + len])
        } else {
            None
        };
        if p.buf != self.n {
            // Decrypted at the tail of buffer `p.buf`, overlaying `saved_len` bytes of its payload.
            let t = p.buf;
            let joined = seg.is_some_and(|s| self.joins(t, &s, p.at, len));
            if !joined {
                let (head, rest) = self.bufs.split_at_mut(self.n);
                rest[0][HDR..HDR + len].copy_from_slice(&head[t][p.at..p.at + len]);
            }
            self.bufs[t][p.at..p.at + p.saved_len].copy_from_slice(&p.saved[..p.saved_len]);
            if joined {
                let s = seg.expect("joined");
                let m = &mut self.meta[t];
                self.ends[t] += s.payload;
                m.segs += 1;
                m.next_seq = s.seq.wrapping_add(s.payload as u32);
                m.open = s.payload == m.size && !s.psh && self.ends[t] - HDR + m.size <= MAX_IP;
                return;
            }
        }
        let i = self.n;
        self.ends[i] = HDR + len;
        self.meta[i] = match seg {
            Some(s) if s.l4 == L4::Udp && !self.uso => Meta {
                seg: Some(s),
                segs: 1,
                ..Meta::default()
            },
            Some(s) => Meta {
                seg: Some(s),
                segs: 1,
                size: s.payload,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                open: s.joins && !s.psh && len + s.payload <= MAX_IP,
            },
            None => Meta::default(),
        };
        self.n += 1;
    }

    /// Whether the packet at `bufs[t][at..at + len]` continues buffer `t`'s flow.
    fn joins(&self, t: usize, s: &Seg, at: usize, len: usize) -> bool {
        let m = &self.meta[t];
        let Some(first) = m.seg else { return false };
        m.open
            && s.joins
            && s.l4 == first.l4
            && s.v6 == first.v6
            && s.hdrs == first.hdrs
            && at + s.hdrs == self.ends[t]
            && s.payload <= m.size
            && (s.l4 == L4::Udp || s.seq == m.next_seq)
            && self.ends[t] - HDR + s.payload <= MAX_IP
            && same_headers(
                &self.bufs[t][HDR..HDR + first.hdrs],
                &self.bufs[t][at..at + len],
                &first,
            )
    }

    /// Completes the batch's headers and returns each packet to write: with the virtio-net header
    /// when the TUN takes one, without otherwise.
    pub(crate) fn packets(&mut self) -> impl Iterator<Item = &[u8]> {
        self.discard();
        for i in 0..self.n {
            if self.vnet {
                self.finish(i);
            }
        }
        let start = if self.vnet { 0 } else { HDR };
        self.bufs[..self.n]
            .iter()
            .zip(&self.ends)
            .map(move |(b, &end)| &b[start..end])
    }

    /// Empties the batch.
    pub(crate) fn clear(&mut self) {
        self.discard();
        self.n = 0;
    }

    /// Packets in the batch.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.n
    }

    /// Writes buffer `i`'s lengths, IPv4 header checksum, pseudo-header sum and virtio-net header.
    fn finish(&mut self, i: usize) {
        let m = self.meta[i];
        let (head, pkt) = self.bufs[i][..self.ends[i]].split_at_mut(HDR);
        let Some(s) = m.seg else {
            let _ = VirtioNetHdr::default().encode(head);
            return;
        };
        let l4_len = pkt.len() - s.iph;
        let gso = m.segs > 1;
        if gso {
            if s.v6 {
                put16(pkt, 4, l4_len as u16);
            } else {
                put16(pkt, 2, pkt.len() as u16);
                put16(pkt, 10, 0);
                let sum = !tun_rs::checksum(&pkt[..20], 0);
                put16(pkt, 10, sum);
            }
            if s.l4 == L4::Udp {
                put16(pkt, s.iph + 4, l4_len as u16);
            }
        }
        let csum_offset: u16 = match s.l4 {
            L4::Tcp => 16,
            L4::Udp => 6,
        };
        let sum = pseudo_sum(pkt, &s, l4_len);
        put16(pkt, s.iph + usize::from(csum_offset), sum);
        let gso_type = match (gso, s.l4, s.v6) {
            (false, ..) => 0,
            (true, L4::Udp, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
            (true, L4::Tcp, false) => VIRTIO_NET_HDR_GSO_TCPV4,
            (true, L4::Tcp, true) => VIRTIO_NET_HDR_GSO_TCPV6,
        };
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: s.hdrs as u16,
            gso_size: if gso { m.size as u16 } else { 0 },
            csum_start: s.iph as u16,
            csum_offset,
        };
        let _ = hdr.encode(head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A TCP or UDP packet of flow `flow` with a valid checksum.
    fn packet(v6: bool, tcp: bool, flow: u8, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let l4h = if tcp { 32 } else { 8 };
        let mut p = vec![0u8; iph + l4h + payload.len()];
        let proto = if tcp { 6 } else { 17 };
        if v6 {
            p[0] = 0x60;
            put16(&mut p, 4, (l4h + payload.len()) as u16);
            p[6] = proto;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            put16(&mut p, 2, (iph + l4h + payload.len()) as u16);
            put16(&mut p, 4, seq as u16); // IP IDs differ per packet
            p[6] = 0x40;
            p[8] = 64;
            p[9] = proto;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let sum = !tun_rs::checksum(&p[..20], 0);
            put16(&mut p, 10, sum);
        }
        put16(&mut p, iph, 40000 + u16::from(flow));
        put16(&mut p, iph + 2, 5201);
        if tcp {
            p[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
            p[iph + 8..iph + 12].copy_from_slice(&7u32.to_be_bytes());
            p[iph + 12] = 8 << 4;
            p[iph + 13] = flags;
            put16(&mut p, iph + 14, 500);
            p[iph + 20..iph + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        } else {
            put16(&mut p, iph + 4, (l4h + payload.len()) as u16);
        }
        p[iph + l4h..].copy_from_slice(payload);
        let s = parse(&p).unwrap();
        let off = iph + if tcp { 16 } else { 6 };
        let sum = !tun_rs::checksum(&p[iph..], u64::from(pseudo_sum(&p, &s, p.len() - iph)));
        put16(&mut p, off, sum);
        p
    }

    /// Decrypts `pkt` into the batch as the protocol core does: the plaintext, then a 16-byte tag.
    fn arrive(g: &mut Gro, pkt: &[u8]) {
        let dst = match g.dst(pkt.len() + 32) {
            Some(d) => d,
            None => panic!("batch full"),
        };
        dst[..pkt.len()].copy_from_slice(pkt);
        dst[pkt.len()..pkt.len() + 16].fill(0xee);
        g.push(pkt.len());
    }

    fn hdr(out: &[u8]) -> VirtioNetHdr {
        VirtioNetHdr::decode(out).unwrap()
    }

    /// Splits written packets back into segments the way the kernel's GSO would (headers copied,
    /// lengths and checksums fixed), so tests can compare with what went in.
    fn resegment(out: &[u8]) -> Vec<Vec<u8>> {
        let h = hdr(out);
        let pkt = &out[HDR..];
        if h.gso_type == 0 {
            let mut p = pkt.to_vec();
            if h.flags & F_NEEDS_CSUM != 0 {
                let cs = usize::from(h.csum_start);
                let at = cs + usize::from(h.csum_offset);
                let init = u64::from(be16(&p, at));
                put16(&mut p, at, 0);
                let sum = !tun_rs::checksum(&p[cs..], init);
                put16(&mut p, at, sum);
            }
            return vec![p];
        }
        let s = parse(pkt).unwrap();
        let size = usize::from(h.gso_size);
        assert_eq!(usize::from(h.hdr_len), s.hdrs);
        let mut segs = Vec::new();
        let mut seq = s.seq;
        for chunk in pkt[s.hdrs..].chunks(size) {
            let mut p = pkt[..s.hdrs].to_vec();
            p.extend_from_slice(chunk);
            let n = p.len();
            if s.v6 {
                put16(&mut p, 4, (n - 40) as u16);
            } else {
                put16(&mut p, 2, n as u16);
            }
            match s.l4 {
                L4::Tcp => p[s.iph + 4..s.iph + 8].copy_from_slice(&seq.to_be_bytes()),
                L4::Udp => put16(&mut p, s.iph + 4, (n - s.iph) as u16),
            }
            seq = seq.wrapping_add(chunk.len() as u32);
            let sp = parse(&p).unwrap();
            let at = s.iph + usize::from(h.csum_offset);
            put16(&mut p, at, 0);
            let sum = !tun_rs::checksum(&p[s.iph..], u64::from(pseudo_sum(&p, &sp, n - s.iph)));
            put16(&mut p, at, sum);
            segs.push(p);
        }
        segs
    }

    /// Payload and transport checksum validity of a packet, what a receiver cares about.
    fn l4_view(p: &[u8]) -> (u16, u32, Vec<u8>, bool) {
        let s = parse(p).unwrap();
        let valid = tun_rs::checksum(&p[s.iph..], u64::from(pseudo_sum(p, &s, p.len() - s.iph))) == 0xffff;
        (be16(p, s.iph), s.seq, p[s.hdrs..].to_vec(), valid)
    }

    #[test]
    fn one_flow_becomes_one_super_packet() {
        for v6 in [false, true] {
            let mut g = Gro::new(8, true, true);
            let data: Vec<u8> = (0..40 * 1000).map(|i| (i * 7 + i / 251) as u8).collect();
            let pkts: Vec<Vec<u8>> = data
                .chunks(1000)
                .enumerate()
                .map(|(i, c)| packet(v6, true, 1, 1000 + 1000 * i as u32, TCP_ACK, c))
                .collect();
            for p in &pkts {
                arrive(&mut g, p);
            }
            assert_eq!(g.len(), 1, "v6={v6}");
            let out: Vec<Vec<u8>> = g.packets().map(<[u8]>::to_vec).collect();
            let h = hdr(&out[0]);
            assert_eq!(h.flags, F_NEEDS_CSUM);
            let want = if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            };
            assert_eq!(
                (h.gso_type, h.gso_size, h.csum_start, h.csum_offset),
                (want, 1000, if v6 { 40 } else { 20 }, 16)
            );
            let s = parse(&out[0][HDR..]).unwrap();
            assert_eq!(&out[0][HDR + s.hdrs..], &data[..], "payload contiguous and intact");
            if !v6 {
                assert_eq!(
                    tun_rs::checksum(&out[0][HDR..HDR + 20], 0),
                    0xffff,
                    "IPv4 header checksum"
                );
            }
            let back = resegment(&out[0]);
            assert_eq!(back.len(), pkts.len());
            for (b, p) in back.iter().zip(&pkts) {
                assert_eq!(l4_view(b), l4_view(p));
                assert!(l4_view(b).3, "resegmented checksum valid");
            }
        }
    }

    #[test]
    fn what_may_not_join_starts_its_own_packet() {
        let mut g = Gro::new(16, true, true);
        let pl = [5u8; 1000];
        arrive(&mut g, &packet(false, true, 1, 0, TCP_ACK, &pl));
        arrive(&mut g, &packet(false, true, 1, 1000, TCP_ACK, &pl));
        // a gap in the sequence
        arrive(&mut g, &packet(false, true, 1, 3000, TCP_ACK, &pl));
        // another flow
        arrive(&mut g, &packet(false, true, 2, 4000, TCP_ACK, &pl));
        // a SYN never joins
        arrive(&mut g, &packet(false, true, 2, 5000, 0x02, &pl));
        // a shorter segment joins and ends the flow; nothing joins after it
        arrive(&mut g, &packet(false, true, 3, 0, TCP_ACK, &pl));
        arrive(&mut g, &packet(false, true, 3, 1000, TCP_ACK, &pl[..500]));
        arrive(&mut g, &packet(false, true, 3, 1500, TCP_ACK, &pl));
        // PSH joins and ends the flow
        arrive(&mut g, &packet(false, true, 4, 0, TCP_ACK, &pl));
        arrive(&mut g, &packet(false, true, 4, 1000, TCP_ACK | TCP_PSH, &pl));
        arrive(&mut g, &packet(false, true, 4, 2000, TCP_ACK, &pl));
        // a longer segment than the first does not join
        arrive(&mut g, &packet(false, true, 5, 0, TCP_ACK, &pl[..500]));
        arrive(&mut g, &packet(false, true, 5, 500, TCP_ACK, &pl));
        // an ACK without payload, and ICMP
        arrive(&mut g, &packet(false, true, 6, 0, TCP_ACK, &[]));
        let mut icmp = packet(false, true, 6, 0, TCP_ACK, &pl[..8]);
        icmp[9] = 1;
        arrive(&mut g, &icmp);
        let segs: Vec<u16> = {
            let out: Vec<Vec<u8>> = g.packets().map(<[u8]>::to_vec).collect();
            out.iter().map(|o| resegment(o).len() as u16).collect()
        };
        assert_eq!(segs, [2, 1, 1, 1, 2, 1, 2, 1, 1, 1, 1, 1]);
        // The ICMP packet goes out untouched, with an empty virtio-net header.
        let out: Vec<Vec<u8>> = g.packets().map(<[u8]>::to_vec).collect();
        let last = out.last().unwrap();
        assert_eq!(hdr(last).flags, 0);
        assert_eq!(&last[HDR..], &icmp[..]);
    }

    #[test]
    fn header_differences_keep_packets_apart() {
        let pl = [1u8; 800];
        let base = packet(false, true, 1, 800, TCP_ACK, &pl);
        let changes: [(usize, u8); 5] = [(1, 0x02), (8, 63), (20 + 8 + 3, 8), (20 + 14, 7), (20 + 31, 3)];
        for (at, v) in changes {
            let mut g = Gro::new(4, true, true);
            arrive(&mut g, &packet(false, true, 1, 0, TCP_ACK, &pl));
            let mut p = base.clone();
            p[at] = v;
            arrive(&mut g, &p);
            assert_eq!(g.len(), 2, "byte {at} differs");
        }
        // IP ID and checksums may differ.
        let mut g = Gro::new(4, true, true);
        arrive(&mut g, &packet(false, true, 1, 0, TCP_ACK, &pl));
        arrive(&mut g, &base);
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn udp_joins_only_with_uso_and_discard_restores_the_tail() {
        let pl = [9u8; 1200];
        for uso in [false, true] {
            let mut g = Gro::new(4, true, uso);
            for i in 0..3 {
                arrive(&mut g, &packet(true, false, 1, 0, 0, &pl[..1200 - i * 100]));
            }
            // UDP segments must be equal but for a shorter last one: 1200, 1100 joins and ends it.
            assert_eq!(g.len(), if uso { 2 } else { 3 }, "uso={uso}");
        }
        let mut g = Gro::new(4, true, true);
        arrive(&mut g, &packet(false, true, 1, 0, TCP_ACK, &pl));
        let before: Vec<u8> = g.bufs[0][..g.ends[0]].to_vec();
        let dst = g.dst(1500).unwrap();
        dst[..200].fill(0xab);
        g.discard();
        assert_eq!(
            &g.bufs[0][..g.ends[0]],
            &before[..],
            "a dropped datagram leaves no trace"
        );
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn without_vnet_header_packets_go_out_as_they_came() {
        let mut g = Gro::new(4, false, false);
        let p = packet(false, true, 1, 0, TCP_ACK, &[3u8; 1000]);
        let q = packet(false, true, 1, 1000, TCP_ACK, &[4u8; 1000]);
        arrive(&mut g, &p);
        arrive(&mut g, &q);
        let out: Vec<Vec<u8>> = g.packets().map(<[u8]>::to_vec).collect();
        assert_eq!(out, [p, q]);
    }

    #[test]
    fn a_full_batch_asks_to_be_written() {
        let mut g = Gro::new(3, true, true);
        for f in 0..3u8 {
            assert!(g.dst(1500).is_some(), "room for packet {f}");
            g.discard();
            arrive(&mut g, &packet(false, true, f, 0, TCP_ACK, &[1u8; 1000]));
        }
        assert!(g.dst(1500).is_none());
        assert!(g.is_full());
        assert_eq!(g.packets().count(), 3);
        g.clear();
        assert!(g.dst(1500).is_some());
    }

    proptest! {
        /// Whatever an authenticated peer sends, nothing panics, and what is not a TCP/UDP packet
        /// this module understands goes out byte for byte as it came.
        #[test]
        fn arbitrary_packets_pass_unharmed(
            pkts in proptest::collection::vec(
                (0usize..3, proptest::collection::vec(any::<u8>(), 0..200)), 1..40),
        ) {
            let mut g = Gro::new(64, true, true);
            let mut sent = Vec::new();
            for (kind, mut p) in pkts {
                // Make some look like IPv4/IPv6 TCP/UDP headers so that parsing goes deep.
                if kind > 0 && p.len() >= 48 {
                    let v6 = kind == 2;
                    p[0] = if v6 { 0x60 } else { 0x45 };
                    let len = p.len();
                    if v6 { put16(&mut p, 4, (len - 40) as u16) } else { put16(&mut p, 2, len as u16); p[6] &= 0x40; p[7] = 0 }
                    p[if v6 { 6 } else { 9 }] = if p[1] & 1 == 0 { 6 } else { 17 };
                }
                arrive(&mut g, &p);
                sent.push(p);
            }
            let out: Vec<Vec<u8>> = g.packets().map(<[u8]>::to_vec).collect();
            prop_assert!(out.len() <= sent.len());
            if out.len() == sent.len() {
                for (o, p) in out.iter().zip(&sent) {
                    if parse(p).is_none() {
                        prop_assert_eq!(&o[HDR..], &p[..]);
                        prop_assert_eq!(hdr(o).flags, 0);
                    }
                }
            }
        }

        /// Interleaved segments of several flows, some out of order, come out as packets that
        /// resegment into exactly the packets that went in, in order per flow.
        #[test]
        fn coalescing_loses_and_reorders_nothing(
            steps in proptest::collection::vec((0u8..3, 1usize..4, any::<bool>()), 1..80),
            v6 in any::<bool>(),
        ) {
            let mut g = Gro::new(32, true, true);
            let mut seqs = [0u32; 3];
            let mut sent = Vec::new();
            let mut got = Vec::new();
            for (i, (flow, n, skip)) in steps.into_iter().enumerate() {
                for k in 0..n {
                    if skip && k == 0 {
                        seqs[flow as usize] += 700; // a lost segment
                    }
                    let pl: Vec<u8> = (0..700).map(|j| (i * 31 + k * 7 + j) as u8).collect();
                    let p = packet(v6, true, flow, seqs[flow as usize], TCP_ACK, &pl);
                    seqs[flow as usize] += 700;
                    if g.is_full() {
                        got.extend(g.packets().flat_map(resegment));
                        g.clear();
                    }
                    arrive(&mut g, &p);
                    sent.push(p);
                }
            }
            got.extend(g.packets().flat_map(resegment));
            let view = |ps: &[Vec<u8>]| ps.iter().map(|p| l4_view(p)).collect::<Vec<_>>();
            prop_assert_eq!(view(&got), view(&sent));
        }
    }
}
