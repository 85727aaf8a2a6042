//! WireGuard's time-based key lifecycle through nsm-wireguard's protocol core, on a mocked clock:
//! two [`Peer`]s joined in memory, traffic both ways every simulated second, timers ticked.
//!
//! * Rekey: the session's initiator starts a new handshake once the session is REKEY_AFTER_TIME
//!   (120 s) old; the new session (a new receiver index on the wire) takes over without losing a
//!   packet, and again 120 s later.
//! * Reject: if no handshake gets through, data flows on the old session until REJECT_AFTER_TIME
//!   (180 s), then it is refused both ways; a handshake that gets through again brings it back.

use std::time::Duration;

use mock_instant::MockClock;
use nsm_wireguard::peer::{Outcome, Peer};
use nsm_wireguard::wire::{self, MessageKind};
use nsm_wireguard::{DropReason, generate_private_key, public_key};

const SECOND: Duration = Duration::from_secs(1);

/// An IPv4 header (what boringtun checks of a packet) carrying `seq` in its identification field.
fn packet(seq: u16) -> Vec<u8> {
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

/// Two peers over an in-memory network that can lose handshake messages.
struct Net {
    peers: [Peer; 2],
    /// Sequence numbers each side decrypted.
    got: [Vec<u16>; 2],
    /// Receiver index of the last data message each side sent (names the session in use).
    data_index: [Option<u32>; 2],
    /// Handshake initiations each side sent (delivered or not).
    initiations: [usize; 2],
    dropped: Vec<DropReason>,
    /// The network loses every handshake message.
    block_handshakes: bool,
}

impl Net {
    fn new() -> Net {
        let (a, b) = (generate_private_key(), generate_private_key());
        Net {
            peers: [
                Peer::new(a, public_key(&b), None, None),
                Peer::new(b, public_key(&a), None, None),
            ],
            got: [Vec::new(), Vec::new()],
            data_index: [None, None],
            initiations: [0, 0],
            dropped: Vec::new(),
            block_handshakes: false,
        }
    }

    /// Sends `datagram` from side `from`, and whatever the receiving side answers, to the end.
    fn carry(&mut self, from: usize, datagram: Vec<u8>) {
        let mut queue = std::collections::VecDeque::from([(from, datagram)]);
        while let Some((from, d)) = queue.pop_front() {
            let kind = wire::parse(&d).unwrap().kind;
            match kind {
                MessageKind::Data => self.data_index[from] = wire::parse(&d).unwrap().receiver,
                MessageKind::HandshakeInitiation => self.initiations[from] += 1,
                _ => {}
            }
            if self.block_handshakes && kind != MessageKind::Data {
                continue;
            }
            let to = 1 - from;
            let mut dst = vec![0u8; 2048];
            match self.peers[to].decapsulate(None, &d, &mut dst) {
                Outcome::Tunnel(_) => self.got[to].push(u16::from_be_bytes([dst[4], dst[5]])),
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

    /// Encrypts packet `seq` at side `from`: the datagram, not yet delivered.
    fn seal(&mut self, from: usize, seq: u16) -> Option<Vec<u8>> {
        let mut dst = vec![0u8; 2048];
        match self.peers[from].encapsulate(&packet(seq), &mut dst) {
            Outcome::Network(n) => Some(dst[..n].to_vec()),
            _ => None,
        }
    }

    fn send(&mut self, from: usize, seq: u16) {
        if let Some(d) = self.seal(from, seq) {
            self.carry(from, d);
        }
    }

    /// Runs both sides' timers and delivers what they send.
    fn tick(&mut self) {
        for side in 0..2 {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 256];
            self.peers[side].tick(&mut buf, |m| out.push(m.to_vec()));
            for m in out {
                self.carry(side, m);
            }
        }
    }

    /// One simulated second: the clock moves, packet `seq` goes each way, timers run.
    fn second(&mut self, seq: u16) {
        MockClock::advance(SECOND);
        self.send(0, seq);
        self.send(1, seq);
        self.tick();
    }
}

#[test]
fn sessions_rekey_every_rekey_after_time_without_loss() {
    MockClock::set_time(Duration::ZERO);
    let mut net = Net::new();
    // Side 0 sends first: it initiates the handshake and so owns the time-based rekey.
    net.send(0, 0);
    net.send(1, 0);
    let first = net.data_index;
    assert!(first[0].is_some() && first[1].is_some(), "session up");
    assert_eq!(net.initiations, [1, 0]);

    // When each side first sends on a new session, and the receiver indices it used.
    let mut changes: [Vec<(u16, u32)>; 2] = [Vec::new(), Vec::new()];
    let mut last = first;
    for t in 1..=250u16 {
        net.second(t);
        for side in 0..2 {
            if net.data_index[side] != last[side] {
                changes[side].push((t, net.data_index[side].unwrap()));
            }
        }
        last = net.data_index;
    }
    // Two rekeys, at 120 s and 240 s of session age; the responder moves over on its next packet.
    for (side, c) in changes.iter().enumerate() {
        let times: Vec<u16> = c.iter().map(|c| c.0).collect();
        assert_eq!(times.len(), 2, "side {side}: session changes at {times:?}");
        assert!(
            (120..=122).contains(&times[0]),
            "side {side}: first rekey at {} s",
            times[0]
        );
        assert!(
            (240..=244).contains(&times[1]),
            "side {side}: second rekey at {} s",
            times[1]
        );
        let indices = [first[side].unwrap(), c[0].1, c[1].1];
        assert!(
            indices[0] != indices[1] && indices[1] != indices[2],
            "side {side}: three sessions {indices:x?}"
        );
    }
    assert_eq!(
        net.initiations,
        [3, 0],
        "the initiator rekeys; one initiation each time"
    );
    for got in &net.got {
        assert_eq!(*got, (0..=250).collect::<Vec<u16>>(), "every packet, in order");
    }
    assert!(net.dropped.is_empty(), "{:?}", net.dropped);
}

#[test]
fn data_is_refused_after_reject_after_time_without_a_handshake() {
    MockClock::set_time(Duration::ZERO);
    let mut net = Net::new();
    net.send(0, 0);
    net.send(1, 0);
    // From now on no handshake gets through: the rekey at 120 s and its retries are lost.
    net.block_handshakes = true;
    let mut late = None;
    for t in 1..=179u16 {
        net.second(t);
        if t == 179 {
            late = net.seal(0, 9999);
        }
    }
    assert!(
        net.initiations[0] > 1,
        "rekey attempts from 120 s on: {:?}",
        net.initiations
    );
    for got in &net.got {
        assert_eq!(
            *got,
            (0..=179).collect::<Vec<u16>>(),
            "the old session carries on until 180 s"
        );
    }

    // Past REJECT_AFTER_TIME: the session is gone on both sides.
    MockClock::advance(2 * SECOND);
    net.tick();
    let mut dst = vec![0u8; 2048];
    let out = net.peers[0].encapsulate(&packet(180), &mut dst);
    let sent_data = matches!(out, Outcome::Network(n) if wire::parse(&dst[..n]).unwrap().kind == MessageKind::Data);
    assert!(!sent_data, "no data is encrypted on an expired session: {out:?}");
    let out = net.peers[1].encapsulate(&packet(180), &mut dst);
    let sent_data = matches!(out, Outcome::Network(n) if wire::parse(&dst[..n]).unwrap().kind == MessageKind::Data);
    assert!(!sent_data, "nor by the responder: {out:?}");
    // A message sealed before the expiry and arriving after it is refused.
    let out = net.peers[1].decapsulate(None, &late.unwrap(), &mut dst);
    assert_eq!(out, Outcome::Dropped(DropReason::UnknownPeer));
    assert_eq!(net.got[1].last(), Some(&179));

    // Handshakes get through again: a new session, and the packets queued meanwhile arrive.
    net.block_handshakes = false;
    for _ in 0..10 {
        net.second(181);
        if net.got[1].last() == Some(&181) {
            break;
        }
    }
    assert_eq!(net.got[1].last(), Some(&181), "traffic back after a handshake");
    assert!(
        net.got[1].contains(&180),
        "the packet queued during the outage went out: {:?} {:?} {:?}",
        &net.got[1][170..],
        &net.got[0][170..],
        net.dropped
    );
}
