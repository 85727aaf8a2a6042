//! One peer's protocol state without I/O, including key changes that keep traffic flowing.
//!
//! boringtun's core cannot change the peer's public key, and changing our private key drops every
//! session, so a key change in place would lose packets until a new handshake completes. Instead a
//! [`Peer`] changes keys make-before-break: it builds a second core with the new keys next to the
//! running one and keeps sending on the running one until the new one has a confirmed session (a
//! handshake response as initiator, or the first data or keepalive from the peer as responder).
//! Then the new core takes over, and the old one stays for a while only to decrypt what the peer
//! still sends on the old session. Incoming messages go to the core whose index they name; a
//! handshake initiation names none, so the pending core (the new keys) tries it first.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};

use crate::keys;
use crate::proto::{Boringtun, Protocol};
use crate::wire::{self, MessageKind};

pub use crate::proto::Outcome;

/// How long a replaced core keeps decrypting: WireGuard's REJECT_AFTER_TIME, after which no
/// session of it could be used anyway.
const RETIRE_AFTER: Duration = Duration::from_secs(180);

/// A protocol core and the keys it was built with.
struct Core {
    proto: Boringtun,
    private_key: [u8; 32],
    peer_public: [u8; 32],
}

struct Pending {
    core: Core,
    /// Whether this side starts the handshake of the new core. The side whose *peer* key changed
    /// does (the peer already has the keys that will match); the side whose own key changed waits
    /// for the peer, which can answer only once it has learnt the new public key.
    initiating: bool,
}

/// Which core handled the last message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    Next,
    Retired,
}

/// The protocol state of one peer: encryption, decryption, timers and key changes. Sans-IO: the
/// caller moves the bytes.
pub struct Peer {
    current: Core,
    next: Option<Pending>,
    retired: Option<(Core, Instant)>,
    preshared_key: Option<[u8; 32]>,
    keepalive: Option<u16>,
    key_changes: u64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &keys::encode_key(&self.public_key()))
            .field("peer_public_key", &keys::encode_key(&self.peer_public_key()))
            .field("key_change_pending", &self.next.is_some())
            .finish()
    }
}

impl Peer {
    /// A peer with our `private_key` and its `peer_public` key.
    pub fn new(
        private_key: [u8; 32],
        peer_public: [u8; 32],
        preshared_key: Option<[u8; 32]>,
        keepalive: Option<u16>,
    ) -> Peer {
        Peer {
            current: Core {
                proto: Boringtun::new(private_key, peer_public, preshared_key, keepalive, OsRng.next_u32()),
                private_key,
                peer_public,
            },
            next: None,
            retired: None,
            preshared_key,
            keepalive,
            key_changes: 0,
        }
    }

    /// The keys wanted now: those of the pending core while a change waits, else the running ones.
    fn wanted(&self) -> &Core {
        self.next.as_ref().map_or(&self.current, |n| &n.core)
    }

    /// Our public key as wanted now.
    pub fn public_key(&self) -> [u8; 32] {
        keys::public_key(&self.wanted().private_key)
    }

    /// The peer's public key as wanted now.
    pub fn peer_public_key(&self) -> [u8; 32] {
        self.wanted().peer_public
    }

    /// Whether a key change waits for its first handshake.
    pub fn key_change_pending(&self) -> bool {
        self.next.is_some()
    }

    /// Key changes completed (the new keys carry traffic).
    pub fn key_changes(&self) -> u64 {
        self.key_changes
    }

    /// Changes our private key. The running session keeps carrying traffic until the peer, told our
    /// new public key, completes a handshake with it. Returns what to send now (a handshake
    /// initiation if a change of the peer's key is pending too).
    pub fn set_private_key(&mut self, private_key: [u8; 32], dst: &mut [u8]) -> Outcome {
        let peer_public = self.wanted().peer_public;
        if private_key == self.wanted().private_key {
            return Outcome::Done;
        }
        self.replan(private_key, peer_public, false, dst)
    }

    /// Changes the peer's public key and starts a handshake with it (returned, to send now). The
    /// running session keeps carrying traffic until that handshake completes.
    pub fn set_peer_public_key(&mut self, peer_public: [u8; 32], dst: &mut [u8]) -> Outcome {
        let private_key = self.wanted().private_key;
        if peer_public == self.wanted().peer_public {
            return Outcome::Done;
        }
        self.replan(private_key, peer_public, true, dst)
    }

    /// Prepares a core for the wanted keys, or drops the pending one when the wanted keys are the
    /// running ones again.
    fn replan(&mut self, private_key: [u8; 32], peer_public: [u8; 32], initiate: bool, dst: &mut [u8]) -> Outcome {
        if (private_key, peer_public) == (self.current.private_key, self.current.peer_public) {
            self.next = None;
            return Outcome::Done;
        }
        let initiating = initiate || self.next.as_ref().is_some_and(|n| n.initiating);
        let mut proto = loop {
            // An index no other core of this peer uses, so replies find their core.
            let index = OsRng.next_u32() & 0x00ff_ffff;
            let taken = |c: &Core| c.proto.owns(index << 8);
            if !taken(&self.current) && !self.retired.as_ref().is_some_and(|(c, _)| taken(c)) {
                break Boringtun::new(private_key, peer_public, self.preshared_key, self.keepalive, index);
            }
        };
        let out = if initiating { proto.initiate(dst) } else { Outcome::Done };
        self.next = Some(Pending {
            core: Core {
                proto,
                private_key,
                peer_public,
            },
            initiating,
        });
        out
    }

    /// The pending core takes over; the running one only decrypts from now on.
    fn promote(&mut self) {
        if let Some(next) = self.next.take() {
            let old = std::mem::replace(&mut self.current, next.core);
            self.retired = Some((old, Instant::now()));
            self.key_changes += 1;
        }
    }

    /// Encrypts an IP packet from the TUN (or queues it and starts a handshake). `dst` must hold
    /// `packet.len() + 32` bytes and at least 148.
    pub fn encapsulate(&mut self, packet: &[u8], dst: &mut [u8]) -> Outcome {
        self.current.proto.encapsulate(packet, dst)
    }

    /// Handles a datagram from the network (`dst` as for [`Peer::encapsulate`]).
    pub fn decapsulate(&mut self, from: Option<IpAddr>, datagram: &[u8], dst: &mut [u8]) -> Outcome {
        let Ok(header) = wire::parse(datagram) else {
            return self.current.proto.decapsulate(from, datagram, dst);
        };
        let which = match header.receiver {
            // An initiation: to the new keys if the peer has them, else to the running ones.
            None => match &mut self.next {
                Some(next) => match next.core.proto.decapsulate(from, datagram, dst) {
                    out @ Outcome::Network(_) => return out,
                    _ => Which::Current,
                },
                None => Which::Current,
            },
            Some(r) if self.next.as_ref().is_some_and(|n| n.core.proto.owns(r)) => Which::Next,
            Some(r) if self.retired.as_ref().is_some_and(|(c, _)| c.proto.owns(r)) => Which::Retired,
            Some(_) => Which::Current,
        };
        match which {
            Which::Current => self.current.proto.decapsulate(from, datagram, dst),
            Which::Retired => match &mut self.retired {
                Some((core, _)) => core.proto.decapsulate(from, datagram, dst),
                None => Outcome::Dropped(crate::DropReason::UnknownPeer),
            },
            Which::Next => {
                let Some(next) = &mut self.next else {
                    return Outcome::Dropped(crate::DropReason::UnknownPeer);
                };
                let out = next.core.proto.decapsulate(from, datagram, dst);
                let confirmed = match (header.kind, out) {
                    // As initiator: the response completes the handshake (out is our keepalive).
                    (MessageKind::HandshakeResponse, Outcome::Network(_)) => true,
                    // As responder: the peer sends on the new session (a packet or a keepalive).
                    (MessageKind::Data, Outcome::Tunnel(_) | Outcome::Done) => true,
                    _ => false,
                };
                if confirmed {
                    self.promote();
                }
                out
            }
        }
    }

    /// After a `Network` outcome of [`Peer::decapsulate`]: the next packet that waited for the
    /// handshake.
    pub fn next_queued(&mut self, dst: &mut [u8]) -> Outcome {
        self.current.proto.next_queued(dst)
    }

    /// Runs the timers (rekey, keepalive, handshake retries, expiry) and hands what they ask to
    /// send to `send`. Call a few times a second.
    pub fn tick(&mut self, dst: &mut [u8], mut send: impl FnMut(&[u8])) {
        if let Outcome::Network(n) = self.current.proto.tick(dst) {
            send(&dst[..n]);
        }
        // A pending core that waits for the peer has nothing to time: it only answers.
        if let Some(next) = self.next.as_mut().filter(|n| n.initiating)
            && let Outcome::Network(n) = next.core.proto.tick(dst)
        {
            send(&dst[..n]);
        }
        if self
            .retired
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= RETIRE_AFTER)
        {
            self.retired = None;
        }
    }

    /// Starts a handshake on the running keys now, unless one is in progress.
    pub fn initiate(&mut self, dst: &mut [u8]) -> Outcome {
        self.current.proto.initiate(dst)
    }

    /// Time since the last completed handshake of the running keys.
    pub fn since_handshake(&self) -> Option<Duration> {
        self.current.proto.since_handshake()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::PeerPair as Net;
    use crate::{generate_private_key, public_key};

    #[test]
    fn key_changes_on_both_sides_lose_nothing() {
        let (ka, kb) = (generate_private_key(), generate_private_key());
        let mut net = Net::new(&ka, &kb);
        let mut seq = 0u16;
        // First packets: a handshake, then the queued packet goes out.
        for _ in 0..10 {
            net.send(0, seq);
            net.send(1, seq);
            seq += 1;
        }
        let old = net.data_index;
        assert!(old[0].is_some() && old[1].is_some());

        // a rotates its key: nothing changes on the wire until b learns the new public key.
        let ka2 = generate_private_key();
        let mut buf = [0u8; 256];
        assert_eq!(net.peers[0].set_private_key(ka2, &mut buf), Outcome::Done);
        assert!(net.peers[0].key_change_pending());
        assert_eq!(net.peers[0].public_key(), public_key(&ka2));
        for _ in 0..10 {
            net.send(0, seq);
            net.send(1, seq);
            seq += 1;
        }
        assert_eq!(net.data_index, old, "the old session carries traffic meanwhile");
        // Packets in flight on the old session when the switch happens.
        let in_flight: Vec<(usize, Vec<u8>)> = (0..2)
            .flat_map(|side| (0..3).map(move |i| (side, i)))
            .map(|(side, i)| (side, net.seal(side, seq + i).unwrap()))
            .collect();
        seq += 3;

        // b learns it (the mechanism parameters of a refresh) and starts a handshake right away.
        let out = net.peers[1].set_peer_public_key(public_key(&ka2), &mut buf);
        assert!(matches!(out, Outcome::Network(_)));
        net.send_out(1, out, &buf);
        assert!(!net.peers[0].key_change_pending() && !net.peers[1].key_change_pending());
        assert_eq!((net.peers[0].key_changes(), net.peers[1].key_changes()), (1, 1));
        for (side, d) in in_flight {
            net.carry(side, d);
        }
        for _ in 0..10 {
            net.send(0, seq);
            net.send(1, seq);
            seq += 1;
        }
        assert!(
            net.data_index[0] != old[0] && net.data_index[1] != old[1],
            "new sessions: {:?} → {:?}",
            old,
            net.data_index
        );
        let mut want: Vec<u16> = (0..seq).collect();
        for got in &mut net.got {
            got.sort_unstable();
            assert_eq!(*got, want, "every packet arrived once");
        }
        assert!(net.dropped.is_empty(), "{:?}", net.dropped);

        // The old key of a is of no use any more: a handshake with it is refused.
        let mut stale = Peer::new(ka, public_key(&kb), None, None);
        let out = stale.initiate(&mut buf);
        let Outcome::Network(n) = out else { panic!("{out:?}") };
        let mut dst = [0u8; 256];
        assert!(matches!(
            net.peers[1].decapsulate(None, &buf[..n], &mut dst),
            Outcome::Dropped(_)
        ));

        // Now b rotates and a learns it: same again the other way round.
        let kb2 = generate_private_key();
        let before = net.data_index;
        assert_eq!(net.peers[1].set_private_key(kb2, &mut buf), Outcome::Done);
        let out = net.peers[0].set_peer_public_key(public_key(&kb2), &mut buf);
        net.send_out(0, out, &buf);
        for _ in 0..10 {
            net.send(0, seq);
            net.send(1, seq);
            seq += 1;
        }
        assert!(net.data_index[0] != before[0] && net.data_index[1] != before[1]);
        assert_eq!((net.peers[0].key_changes(), net.peers[1].key_changes()), (2, 2));
        want = (0..seq).collect();
        for got in &mut net.got {
            got.sort_unstable();
            assert_eq!(*got, want);
        }
        assert!(net.dropped.is_empty(), "{:?}", net.dropped);
    }

    #[test]
    fn both_sides_rotating_at_once_converge() {
        let (ka, kb) = (generate_private_key(), generate_private_key());
        let mut net = Net::new(&ka, &kb);
        let mut buf = [0u8; 256];
        net.send(0, 0);
        net.send(1, 0);
        let (ka2, kb2) = (generate_private_key(), generate_private_key());
        assert_eq!(net.peers[0].set_private_key(ka2, &mut buf), Outcome::Done);
        assert_eq!(net.peers[1].set_private_key(kb2, &mut buf), Outcome::Done);
        // a learns b's new key first: its handshake (ka2 → kb2) finds b still expecting ka.
        let out = net.peers[0].set_peer_public_key(public_key(&kb2), &mut buf);
        net.send_out(0, out, &buf);
        assert!(net.peers[0].key_change_pending() && net.peers[1].key_change_pending());
        net.send(0, 1);
        net.send(1, 1);
        // Then b learns a's: its handshake completes both changes.
        let out = net.peers[1].set_peer_public_key(public_key(&ka2), &mut buf);
        net.send_out(1, out, &buf);
        assert!(!net.peers[0].key_change_pending() && !net.peers[1].key_change_pending());
        net.send(0, 2);
        net.send(1, 2);
        for got in &net.got {
            assert_eq!(*got, [0, 1, 2]);
        }
        // Setting the running keys again is no change at all.
        assert_eq!(net.peers[0].set_private_key(ka2, &mut buf), Outcome::Done);
        assert!(!net.peers[0].key_change_pending());
    }
}
