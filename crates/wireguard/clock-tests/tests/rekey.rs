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
use nsm_wireguard::peer::Outcome;
use nsm_wireguard::testing::{PeerPair, packet};
use nsm_wireguard::wire::{self, MessageKind};
use nsm_wireguard::{DropReason, generate_private_key};

const SECOND: Duration = Duration::from_secs(1);

/// Two peers with fresh keys.
fn pair() -> PeerPair {
    PeerPair::new(&generate_private_key(), &generate_private_key())
}

/// One simulated second: the clock moves, packet `seq` goes each way, timers run.
fn second(net: &mut PeerPair, seq: u16) {
    MockClock::advance(SECOND);
    net.send(0, seq);
    net.send(1, seq);
    net.tick();
}

#[test]
fn sessions_rekey_every_rekey_after_time_without_loss() {
    MockClock::set_time(Duration::ZERO);
    let mut net = pair();
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
        second(&mut net, t);
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
    let mut net = pair();
    net.send(0, 0);
    net.send(1, 0);
    // From now on no handshake gets through: the rekey at 120 s and its retries are lost.
    net.block_handshakes = true;
    let mut late = None;
    for t in 1..=179u16 {
        second(&mut net, t);
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
        second(&mut net, 181);
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
