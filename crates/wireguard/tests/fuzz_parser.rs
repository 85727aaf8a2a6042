//! Fuzz-style tests of the packet parser and the protocol core: random and mutated datagrams never
//! panic, and garbage is classified as a drop. (A cargo-fuzz target is in `fuzz/`.)

use nsm_wireguard::{DropReason, fuzz_datagram, wire};
use proptest::prelude::*;

/// A datagram shaped like a real message of type 1–4 with the right length, random contents.
fn shaped() -> impl Strategy<Value = Vec<u8>> {
    (1u8..=4, prop::collection::vec(any::<u8>(), 200..1600)).prop_map(|(t, mut body)| {
        let len = match t {
            1 => wire::HANDSHAKE_INITIATION_LEN,
            2 => wire::HANDSHAKE_RESPONSE_LEN,
            3 => wire::COOKIE_REPLY_LEN,
            _ => body.len(),
        };
        body.truncate(len);
        body[0] = t;
        body[1..4].fill(0);
        body
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(d in prop::collection::vec(any::<u8>(), 0..2048)) {
        let parsed = wire::parse(&d);
        let verdict = fuzz_datagram(&d);
        if parsed.is_err() {
            prop_assert_eq!(verdict, Some(DropReason::Malformed));
        }
    }

    #[test]
    fn well_framed_garbage_is_dropped(d in shaped(), cut in 0usize..200, flip in any::<(usize, u8)>()) {
        let h = wire::parse(&d).expect("shaped datagrams frame");
        prop_assert_eq!(h.receiver.is_some(), h.kind != wire::MessageKind::HandshakeInitiation);
        // Whole: never delivered (no session, MACs are random).
        prop_assert!(fuzz_datagram(&d).is_some());
        // Truncated and bit-flipped variants.
        let t = &d[..d.len().saturating_sub(cut)];
        let _ = wire::parse(t);
        prop_assert!(fuzz_datagram(t).is_some() || t.is_empty());
        let mut m = d.clone();
        let i = flip.0 % m.len();
        m[i] ^= flip.1 | 1;
        prop_assert!(fuzz_datagram(&m).is_some());
    }
}
