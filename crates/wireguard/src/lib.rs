//! A WireGuard-protocol userspace data plane for nsm's encrypted vWires.
//!
//! One [`Tunnel`] is one point-to-point WireGuard link: a TUN device (created in a given network
//! namespace, typically the workload's), a UDP socket (bound in another namespace if wanted,
//! typically the host's, as nsm's VXLAN links do) and one peer. The protocol (Noise IK handshake,
//! cookies, timers, rekey, replay window) is boringtun's sans-IO core; the data plane around it is
//! built for per-packet cost: TUN offloads (virtio-net header, TSO/USO on read, GRO on write), UDP
//! GSO/GRO, batches end to end, buffers allocated once, and its own threads; with lanes
//! ([`LaneConfig`]), one peer's flows are encrypted on several cores.
//!
//! It is wire-compatible with stock WireGuard (kernel, wireguard-go, `wg` keys).
#![forbid(unsafe_code)]

mod error;
mod gro;
mod gso;
pub mod keys;
pub mod peer;
mod proto;
mod stats;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod tunnel;
mod vnet;
pub mod wire;

pub use error::WgError;
pub use keys::{decode_key, encode_key, generate_preshared_key, generate_private_key, public_key};
pub use peer::Peer;
pub use stats::{DropReason, Drops, Stats};
pub use tunnel::{ActiveOffloads, DEFAULT_MTU, LaneConfig, MAX_LANES, Offloads, PeerConfig, Tunnel, TunnelConfig};

/// Fuzzing entry point: runs a datagram through the framing parser and a fresh protocol core, which
/// must reject garbage without panicking. Returns what the core made of it.
#[doc(hidden)]
pub fn fuzz_datagram(datagram: &[u8]) -> Option<DropReason> {
    use proto::Protocol as _;
    let _ = wire::parse(datagram);
    let mut core = proto::Boringtun::new([7u8; 32], public_key(&[9u8; 32]), None, None, 1);
    let mut dst = vec![0u8; datagram.len().max(wire::HANDSHAKE_INITIATION_LEN) + 64];
    match core.decapsulate(Some(std::net::Ipv4Addr::LOCALHOST.into()), datagram, &mut dst) {
        proto::Outcome::Dropped(r) => Some(r),
        _ => None,
    }
}
