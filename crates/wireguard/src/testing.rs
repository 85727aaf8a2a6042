//! Two [`Peer`]s joined by an in-memory network, for protocol tests: this crate's own and the
//! mocked-clock tests in `clock-tests` (a separate workspace, hence a feature and not
//! `cfg(test)`). Datagrams are delivered in order, replies included; handshake messages can be
//! lost on purpose.

use std::collections::VecDeque;

use crate::DropReason;
use crate::keys::public_key;
use crate::peer::{Outcome, Peer};
use crate::wire::{self, MessageKind};

/// An IPv4 header (what boringtun checks of a packet) from 10.0.0.1 to 10.0.0.2 carrying `seq`
/// in its identification field.
pub fn packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[4..6].copy_from_slice(&seq.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

/// The `seq` of a [`packet`].
pub fn seq_of(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[4], p[5]])
}

/// Two peers and the network between them.
pub struct PeerPair {
    pub peers: [Peer; 2],
    /// Sequence numbers each side decrypted.
    pub got: [Vec<u16>; 2],
    /// Receiver index of the last data message each side sent (names the session in use).
    pub data_index: [Option<u32>; 2],
    /// Handshake initiations each side sent (delivered or not).
    pub initiations: [usize; 2],
    pub dropped: Vec<DropReason>,
    /// The network loses every message that is not data.
    pub block_handshakes: bool,
}

impl PeerPair {
    /// Peers with private keys `a` and `b`, each knowing the other's public key.
    pub fn new(a: &[u8; 32], b: &[u8; 32]) -> PeerPair {
        PeerPair {
            peers: [
                Peer::new(*a, public_key(b), None, None),
                Peer::new(*b, public_key(a), None, None),
            ],
            got: [Vec::new(), Vec::new()],
            data_index: [None, None],
            initiations: [0, 0],
            dropped: Vec::new(),
            block_handshakes: false,
        }
    }

    /// Sends `datagram` from side `from`, and everything it sets off, to the end.
    pub fn carry(&mut self, from: usize, datagram: Vec<u8>) {
        let mut queue = VecDeque::from([(from, datagram)]);
        while let Some((from, d)) = queue.pop_front() {
            let kind = wire::parse(&d).ok().map(|h| (h.kind, h.receiver));
            match kind {
                Some((MessageKind::Data, receiver)) => self.data_index[from] = receiver,
                Some((MessageKind::HandshakeInitiation, _)) => self.initiations[from] += 1,
                _ => {}
            }
            if self.block_handshakes && !matches!(kind, Some((MessageKind::Data, _))) {
                continue;
            }
            let to = 1 - from;
            let mut dst = vec![0u8; 2048];
            match self.peers[to].decapsulate(None, &d, &mut dst) {
                Outcome::Tunnel(n) => self.got[to].push(seq_of(&dst[..n])),
                Outcome::Network(n) => {
                    queue.push_back((to, dst[..n].to_vec()));
                    let mut q = vec![0u8; 2048];
                    while let Outcome::Network(n) = self.peers[to].next_queued(&mut q) {
                        queue.push_back((to, q[..n].to_vec()));
                    }
                }
                Outcome::Dropped(r) => self.dropped.push(r),
                Outcome::Done => {}
            }
        }
    }

    /// Encrypts packet `seq` at side `from` without delivering it.
    pub fn seal(&mut self, from: usize, seq: u16) -> Option<Vec<u8>> {
        let mut dst = vec![0u8; 2048];
        match self.peers[from].encapsulate(&packet(seq), &mut dst) {
            Outcome::Network(n) => Some(dst[..n].to_vec()),
            _ => None,
        }
    }

    /// Sends packet `seq` from side `from`.
    pub fn send(&mut self, from: usize, seq: u16) {
        if let Some(d) = self.seal(from, seq) {
            self.carry(from, d);
        }
    }

    /// Delivers what a call on side `from` returned in `buf`, if it is a datagram.
    pub fn send_out(&mut self, from: usize, out: Outcome, buf: &[u8]) {
        if let Outcome::Network(n) = out {
            self.carry(from, buf[..n].to_vec());
        }
    }

    /// Runs both sides' timers and delivers what they send.
    pub fn tick(&mut self) {
        for side in 0..2 {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 256];
            self.peers[side].tick(&mut buf, |m| out.push(m.to_vec()));
            for m in out {
                self.carry(side, m);
            }
        }
    }
}
