//! The WireGuard protocol core behind a small trait, so the data plane does not depend on one
//! implementation. Today: boringtun's sans-IO `noise::Tunn` (Noise IK handshake, cookies, timers,
//! rekey, replay window, keepalive).

use std::net::IpAddr;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;

use crate::stats::DropReason;

/// What the core wants done with what it wrote at the start of `dst` (lengths in bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to send or deliver (a queued packet, a keepalive, a cookie taken in).
    Done,
    /// Send `dst[..n]` to the peer.
    Network(usize),
    /// Deliver the decrypted IP packet `dst[..n]` to the TUN device.
    Tunnel(usize),
    /// The input was rejected.
    Dropped(DropReason),
}

/// The protocol operations the data plane needs. `dst` must hold at least `src.len() + 32` bytes
/// and at least 148 bytes.
pub(crate) trait Protocol: Send {
    /// Encrypts an IP packet from the TUN (or queues it and starts a handshake).
    fn encapsulate(&mut self, packet: &[u8], dst: &mut [u8]) -> Outcome;
    /// Handles a datagram from the network.
    fn decapsulate(&mut self, from: Option<IpAddr>, datagram: &[u8], dst: &mut [u8]) -> Outcome;
    /// After a `Network` outcome of `decapsulate`: the next packet queued during a handshake.
    fn next_queued(&mut self, dst: &mut [u8]) -> Outcome;
    /// Timers (rekey, keepalive, handshake retry); call a few times a second.
    fn tick(&mut self, dst: &mut [u8]) -> Outcome;
    /// Starts a handshake now, unless one is in progress.
    fn initiate(&mut self, dst: &mut [u8]) -> Outcome;
    /// Time since the last completed handshake.
    fn since_handshake(&self) -> Option<Duration>;
    /// Whether `receiver` (the receiver index of a handshake response, cookie reply or data
    /// message) names one of this core's sessions or handshakes.
    fn owns(&self, receiver: u32) -> bool;
}

/// boringtun's `Tunn`.
pub(crate) struct Boringtun {
    tunn: Tunn,
    /// The 24-bit index: boringtun's local indices are `index << 8 | session counter`.
    index: u32,
}

impl Boringtun {
    pub(crate) fn new(
        private_key: [u8; 32],
        peer_public: [u8; 32],
        preshared_key: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
    ) -> Boringtun {
        // boringtun shifts the index left by 8 bits for its session ring: 24 bits are used.
        let index = index & 0x00ff_ffff;
        Boringtun {
            tunn: Tunn::new(
                x25519::StaticSecret::from(private_key),
                x25519::PublicKey::from(peer_public),
                preshared_key,
                keepalive,
                index,
                None,
            ),
            index,
        }
    }
}

/// boringtun writes every output at the start of `dst`; checked, so a change there cannot make us
/// send or deliver the wrong bytes.
fn outcome(dst: *const u8, r: TunnResult<'_>) -> Outcome {
    let at_start = |p: &[u8]| p.as_ptr() == dst || p.is_empty();
    match r {
        TunnResult::Done => Outcome::Done,
        TunnResult::WriteToNetwork(p) if at_start(p) => Outcome::Network(p.len()),
        TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) if at_start(p) => {
            Outcome::Tunnel(p.len())
        }
        TunnResult::Err(e) => Outcome::Dropped(classify(&e)),
        _ => Outcome::Dropped(DropReason::Other),
    }
}

/// Sorts boringtun's errors into the drop reasons we count.
pub(crate) fn classify(e: &WireGuardError) -> DropReason {
    use WireGuardError as E;
    match e {
        E::IncorrectPacketLength | E::WrongPacketType | E::InvalidPacket | E::InvalidTai64nTimestamp => {
            DropReason::Malformed
        }
        E::DuplicateCounter | E::InvalidCounter | E::WrongTai64nTimestamp => DropReason::Replayed,
        E::InvalidMac | E::InvalidAeadTag => DropReason::AuthFailed,
        E::WrongKey | E::WrongIndex | E::NoCurrentSession | E::UnexpectedPacket => DropReason::UnknownPeer,
        E::UnderLoad => DropReason::RateLimited,
        E::DestinationBufferTooSmall | E::LockFailed | E::ConnectionExpired => DropReason::Other,
    }
}

impl Protocol for Boringtun {
    fn encapsulate(&mut self, packet: &[u8], dst: &mut [u8]) -> Outcome {
        outcome(dst.as_ptr(), self.tunn.encapsulate(packet, dst))
    }

    fn decapsulate(&mut self, from: Option<IpAddr>, datagram: &[u8], dst: &mut [u8]) -> Outcome {
        if datagram.is_empty() {
            // boringtun reads an empty datagram as "flush the queue".
            return Outcome::Dropped(DropReason::Malformed);
        }
        outcome(dst.as_ptr(), self.tunn.decapsulate(from, datagram, dst))
    }

    fn next_queued(&mut self, dst: &mut [u8]) -> Outcome {
        outcome(dst.as_ptr(), self.tunn.decapsulate(None, &[], dst))
    }

    fn tick(&mut self, dst: &mut [u8]) -> Outcome {
        outcome(dst.as_ptr(), self.tunn.update_timers(dst))
    }

    fn initiate(&mut self, dst: &mut [u8]) -> Outcome {
        outcome(dst.as_ptr(), self.tunn.format_handshake_initiation(dst, false))
    }

    fn since_handshake(&self) -> Option<Duration> {
        self.tunn.stats().0
    }

    fn owns(&self, receiver: u32) -> bool {
        receiver >> 8 == self.index
    }
}
