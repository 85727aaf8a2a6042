//! Counters of a tunnel: lock-free, updated once per batch by the data-plane threads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message, wrong length, truncated, or a decrypted payload that is not IP.
    Malformed,
    /// A data counter already seen or too old for the replay window, or a replayed handshake.
    Replayed,
    /// Authentication failed: bad MAC, bad AEAD tag (forged or corrupted).
    AuthFailed,
    /// For a session or peer we do not know (unknown receiver index, another static key).
    UnknownPeer,
    /// The inner source (from the network) or destination (from the TUN) is outside `allowed_ips`.
    NotAllowed,
    /// Handshake dropped under load (answered with a cookie).
    RateLimited,
    /// Nowhere to send: the peer has no endpoint yet.
    NoEndpoint,
    /// I/O errors on the TUN or UDP socket, and anything else.
    Other,
}

/// Dropped packets by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    pub malformed: u64,
    pub replayed: u64,
    pub auth_failed: u64,
    pub unknown_peer: u64,
    pub not_allowed: u64,
    pub rate_limited: u64,
    pub no_endpoint: u64,
    pub other: u64,
}

impl Drops {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.malformed
            + self.replayed
            + self.auth_failed
            + self.unknown_peer
            + self.not_allowed
            + self.rate_limited
            + self.no_endpoint
            + self.other
    }
}

/// A snapshot of a tunnel's counters. Bytes are inner (IP packet) bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Completed handshakes (as initiator or responder).
    pub handshakes: u64,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    pub dropped: Drops,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) tx_packets: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) rx_packets: AtomicU64,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    drops: [AtomicU64; 8],
}

impl Counters {
    pub(crate) fn drop(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.drops[reason as usize].fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    /// The counters of a tunnel's lanes, summed (each lane counts its own, so that lanes share
    /// no cache line on the data path).
    pub(crate) fn sum<'a>(lanes: impl IntoIterator<Item = &'a Counters>, last_handshake: Option<Duration>) -> Stats {
        let mut s = Stats {
            last_handshake,
            ..Stats::default()
        };
        for c in lanes {
            let d = |r: DropReason| c.drops[r as usize].load(Relaxed);
            s.tx_packets += c.tx_packets.load(Relaxed);
            s.tx_bytes += c.tx_bytes.load(Relaxed);
            s.rx_packets += c.rx_packets.load(Relaxed);
            s.rx_bytes += c.rx_bytes.load(Relaxed);
            s.handshakes += c.handshakes.load(Relaxed);
            s.dropped.malformed += d(DropReason::Malformed);
            s.dropped.replayed += d(DropReason::Replayed);
            s.dropped.auth_failed += d(DropReason::AuthFailed);
            s.dropped.unknown_peer += d(DropReason::UnknownPeer);
            s.dropped.not_allowed += d(DropReason::NotAllowed);
            s.dropped.rate_limited += d(DropReason::RateLimited);
            s.dropped.no_endpoint += d(DropReason::NoEndpoint);
            s.dropped.other += d(DropReason::Other);
        }
        s
    }
}
