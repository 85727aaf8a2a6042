//! What the send-side split ([`crate::gso`]) and the receive-side GRO ([`crate::gro`]) share: the
//! virtio-net header's room and flag, big-endian field access, and the pseudo-header sum.

/// Room for the virtio-net header in front of every TUN read and write.
pub(crate) const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// linux/virtio_net.h: the checksum from `csum_start` on is left to be computed (CHECKSUM_PARTIAL).
pub(crate) const F_NEEDS_CSUM: u8 = 1;

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The unfolded sum of the TCP/UDP pseudo-header (RFC 793/768, RFC 8200 §8.1) of the IPv4 or IPv6
/// packet `pkt` for `l4_len` transport bytes: a checksum's starting value.
pub(crate) fn pseudo_header_sum(pkt: &[u8], v6: bool, proto: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    tun_rs::checksum_no_fold(addrs, u64::from(proto) + l4_len as u64)
}
