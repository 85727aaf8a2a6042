//! Send-side segmentation in place: a TSO/USO super-packet read from the TUN becomes MTU-sized
//! packets without its payload being copied.
//!
//! Packet k's headers are written just in front of its payload, over the last bytes of packet
//! k-1's payload, which the caller has consumed by then (the protocol core copies a packet as it
//! encrypts it). tun-rs's split, which this replaces, copied every packet into a buffer of its own
//! first. Checksums are still computed: a stock WireGuard receiver hands packets on as they come.
//!
//! Sans-IO: [`split`] takes what one TUN read returned and hands each packet to a closure.

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4, VirtioNetHdr};

use crate::vnet::{F_NEEDS_CSUM, HDR, be16, pseudo_header_sum, put16};

/// linux/virtio_net.h: the TCP segments carry ECN (CWR belongs to the first one only).
const GSO_ECN: u8 = 0x80;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// Longest headers kept per super-packet: IPv6 with extension headers and TCP with options.
const MAX_HEADERS: usize = 256;

/// Why a TUN read could not be split (the kernel does not send such packets; it is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SplitError {
    #[error("shorter than its virtio-net header or its own headers")]
    Short,
    #[error("unknown segmentation type {0}")]
    GsoType(u8),
    #[error("inconsistent virtio-net header")]
    Header,
}

/// Hands each packet of `read` (one TUN read: virtio-net header, then the packet) to `each`, in
/// order, with checksums complete. Returns how many there were.
pub(crate) fn split(read: &mut [u8], mut each: impl FnMut(&[u8])) -> Result<usize, SplitError> {
    if read.len() <= HDR {
        return Err(SplitError::Short);
    }
    let hdr = VirtioNetHdr::decode(&read[..HDR]).map_err(|_| SplitError::Short)?;
    let pkt = &mut read[HDR..];
    let len = pkt.len();
    let csum_start = usize::from(hdr.csum_start);
    let csum_at = csum_start + usize::from(hdr.csum_offset);
    let gso_type = hdr.gso_type & !GSO_ECN;
    if gso_type == 0 {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            if csum_at + 2 > len {
                return Err(SplitError::Header);
            }
            // The field holds the pseudo-header sum; the checksum covers it and the rest.
            let initial = u64::from(be16(pkt, csum_at));
            put16(pkt, csum_at, 0);
            let sum = !tun_rs::checksum(&pkt[csum_start..], initial);
            put16(pkt, csum_at, sum);
        }
        each(pkt);
        return Ok(1);
    }
    let v6 = match pkt[0] >> 4 {
        4 => false,
        6 => true,
        _ => return Err(SplitError::Header),
    };
    let (tcp, csum_offset) = match gso_type {
        VIRTIO_NET_HDR_GSO_TCPV4 if !v6 => (true, 16),
        VIRTIO_NET_HDR_GSO_TCPV6 if v6 => (true, 16),
        VIRTIO_NET_HDR_GSO_UDP_L4 => (false, 6),
        t => return Err(SplitError::GsoType(t)),
    };
    // csum_start is where the transport header starts (after IPv6 extension headers too). The
    // header's hdr_len is only a hint (on the forward path it can be the whole first packet), so
    // the header length is read from the transport header itself.
    let gso = usize::from(hdr.gso_size);
    if gso == 0 || usize::from(hdr.csum_offset) != csum_offset || csum_start < if v6 { 40 } else { 20 } {
        return Err(SplitError::Header);
    }
    let hdrs = if tcp {
        let doff = usize::from(*pkt.get(csum_start + 12).ok_or(SplitError::Short)? >> 4) * 4;
        if doff < 20 {
            return Err(SplitError::Header);
        }
        csum_start + doff
    } else {
        csum_start + 8
    };
    if hdrs > MAX_HEADERS || hdrs > len {
        return Err(SplitError::Short);
    }
    let mut orig = [0u8; MAX_HEADERS];
    orig[..hdrs].copy_from_slice(&pkt[..hdrs]);
    // Per segment only the transport length is added.
    let pseudo_base = pseudo_header_sum(&orig, v6, if tcp { 6 } else { 17 }, 0);
    let (id, seq) = (
        be16(&orig, 4),
        u32::from_be_bytes([
            orig[csum_start + 4],
            orig[csum_start + 5],
            orig[csum_start + 6],
            orig[csum_start + 7],
        ]),
    );
    let mut count = 0;
    let mut data = hdrs;
    while data < len {
        let end = (data + gso).min(len);
        let start = data - hdrs;
        let last = end == len;
        let p = &mut pkt[start..end];
        p[..hdrs].copy_from_slice(&orig[..hdrs]);
        let total = p.len();
        if v6 {
            put16(p, 4, (total - 40) as u16);
        } else {
            put16(p, 2, total as u16);
            put16(p, 4, id.wrapping_add(count as u16));
            put16(p, 10, 0);
            let sum = !tun_rs::checksum(&p[..csum_start], 0);
            put16(p, 10, sum);
        }
        let l4_len = total - csum_start;
        if tcp {
            let s = seq.wrapping_add((count * gso) as u32);
            p[csum_start + 4..csum_start + 8].copy_from_slice(&s.to_be_bytes());
            if count > 0 {
                p[csum_start + 13] &= !TCP_CWR;
            }
            if !last {
                p[csum_start + 13] &= !(TCP_FIN | TCP_PSH);
            }
        } else {
            put16(p, csum_start + 4, l4_len as u16);
        }
        put16(p, csum_start + csum_offset, 0);
        let sum = !tun_rs::checksum(&p[csum_start..], pseudo_base + l4_len as u64);
        // UDP sends a computed 0 as all ones (RFC 768).
        put16(p, csum_start + csum_offset, if !tcp && sum == 0 { 0xffff } else { sum });
        each(p);
        count += 1;
        data = end;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A super-packet as the kernel hands it over with TSO/USO: one header, the whole payload,
    /// the pseudo-header sum in the checksum field.
    fn super_packet(v6: bool, tcp: bool, gso: u16, payload: &[u8], flags: u8, ecn: bool) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let l4h = if tcp { 32 } else { 8 };
        let mut p = vec![0u8; HDR + iph + l4h + payload.len()];
        let total = iph + l4h + payload.len();
        let proto = if tcp { 6 } else { 17 };
        {
            let q = &mut p[HDR..];
            if v6 {
                q[0] = 0x60;
                put16(q, 4, (total - 40) as u16);
                q[6] = proto;
                q[7] = 64;
                q[8] = 0xfd;
                q[23] = 1;
                q[24] = 0xfd;
                q[39] = 2;
            } else {
                q[0] = 0x45;
                put16(q, 2, total as u16);
                put16(q, 4, 0xfff0);
                q[6] = 0x40;
                q[8] = 64;
                q[9] = proto;
                q[12..16].copy_from_slice(&[10, 0, 0, 1]);
                q[16..20].copy_from_slice(&[10, 0, 0, 2]);
            }
            put16(q, iph, 40000);
            put16(q, iph + 2, 5201);
            if tcp {
                q[iph + 4..iph + 8].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
                q[iph + 12] = 8 << 4;
                q[iph + 13] = flags;
                q[iph + 20..iph + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
            } else {
                put16(q, iph + 4, (total - iph) as u16);
            }
            q[iph + l4h..].copy_from_slice(payload);
            let addrs = if v6 { &q[8..40] } else { &q[12..20] };
            let pseudo = tun_rs::checksum(addrs, u64::from(proto) + (total - iph) as u64);
            put16(q, iph + if tcp { 16 } else { 6 }, pseudo);
        }
        let multi = payload.len() > usize::from(gso);
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: match (multi, tcp, v6) {
                (false, ..) => 0,
                (true, false, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
                (true, true, false) => VIRTIO_NET_HDR_GSO_TCPV4 | if ecn { GSO_ECN } else { 0 },
                (true, true, true) => VIRTIO_NET_HDR_GSO_TCPV6 | if ecn { GSO_ECN } else { 0 },
            },
            // As on the forward path: the whole first packet, which must not be trusted.
            hdr_len: (iph + l4h + usize::from(gso)).min(total) as u16,
            gso_size: if multi { gso } else { 0 },
            csum_start: iph as u16,
            csum_offset: if tcp { 16 } else { 6 },
        };
        hdr.encode(&mut p[..HDR]).unwrap();
        p
    }

    /// tun-rs's split of the same read, the reference (given the header length it derives first).
    fn reference(read: &[u8], v6: bool, tcp: bool) -> Vec<Vec<u8>> {
        let mut hdr = VirtioNetHdr::decode(&read[..HDR]).unwrap();
        let mut input = read[HDR..].to_vec();
        if hdr.gso_type == 0 {
            let at = usize::from(hdr.csum_start + hdr.csum_offset);
            let initial = u64::from(be16(&input, at));
            put16(&mut input, at, 0);
            let sum = !tun_rs::checksum(&input[usize::from(hdr.csum_start)..], initial);
            put16(&mut input, at, sum);
            return vec![input];
        }
        let iph = if v6 { 40 } else { 20 };
        hdr.hdr_len = iph + if tcp { 32 } else { 8 };
        let mut out = vec![vec![0u8; 2048]; 200];
        let mut sizes = vec![0usize; 200];
        let n = tun_rs::gso_split(&mut input, hdr, &mut out, &mut sizes, 0, v6).unwrap();
        out.iter().zip(&sizes).take(n).map(|(b, &s)| b[..s].to_vec()).collect()
    }

    #[test]
    fn rejects_what_the_kernel_does_not_send() {
        let mut short = vec![0u8; HDR];
        assert_eq!(split(&mut short, |_| ()), Err(SplitError::Short));
        let mut p = super_packet(false, true, 100, &[1u8; 1000], 0x10, false);
        p[1] = 9; // gso_type
        assert_eq!(split(&mut p, |_| ()), Err(SplitError::GsoType(9)));
        let mut p = super_packet(false, true, 100, &[1u8; 1000], 0x10, false);
        p[4] = 0; // gso_size 0
        p[5] = 0;
        assert_eq!(split(&mut p, |_| ()), Err(SplitError::Header));
        let mut p = super_packet(false, true, 100, &[1u8; 1000], 0x10, false);
        p[HDR + 20 + 12] = 2 << 4; // TCP data offset below 20 bytes
        assert_eq!(split(&mut p, |_| ()), Err(SplitError::Header));
    }

    proptest! {
        /// Every packet equals tun-rs's (the split this replaces) byte for byte, for TCP and UDP
        /// over IPv4 and IPv6, ECN or not, with PSH/FIN on the super-packet, single packets too.
        #[test]
        fn packets_equal_tun_rs_split(
            v6 in any::<bool>(),
            tcp in any::<bool>(),
            ecn in any::<bool>(),
            gso in 1u16..1500,
            len in 1usize..20_000,
            flags in prop::sample::select(vec![0x10u8, 0x18, 0x19, 0x90, 0x98]),
            seed in any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 8) as u8).collect();
            prop_assume!(len.div_ceil(usize::from(gso)) <= 200);
            let read = super_packet(v6, tcp, gso, &payload, flags, ecn && tcp);
            let want = reference(&read, v6, tcp);
            let mut got = Vec::new();
            let mut mine = read.clone();
            let n = split(&mut mine, |p| got.push(p.to_vec())).unwrap();
            prop_assert_eq!(n, want.len());
            prop_assert_eq!(got, want);
        }
    }
}
