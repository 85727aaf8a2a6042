//! The WireGuard message framing (whitepaper §5.4): four message types, each a little-endian
//! `u32` type whose upper three bytes are reserved zeros, with fixed sizes except transport data.
//! This parser only frames and classifies; authenticity is the protocol core's job.

/// Handshake initiation: type 1, 148 bytes.
pub const HANDSHAKE_INITIATION_LEN: usize = 148;
/// Handshake response: type 2, 92 bytes.
pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
/// Cookie reply: type 3, 64 bytes.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Transport data header (type, receiver, counter) plus the 16-byte Poly1305 tag.
pub const DATA_OVERHEAD: usize = 32;
/// Bytes in front of the encrypted payload of a transport data message.
pub const DATA_HEADER_LEN: usize = 16;

/// The four message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    HandshakeInitiation,
    HandshakeResponse,
    CookieReply,
    Data,
}

/// The framing of one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: MessageKind,
    /// Sender index (initiation, response) — the peer's name for this session.
    pub sender: Option<u32>,
    /// Receiver index (response, cookie reply, data) — our session the message is for.
    pub receiver: Option<u32>,
    /// Nonce counter of a data message.
    pub counter: Option<u64>,
}

/// Why a datagram is not a WireGuard message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("shorter than a message type")]
    TooShort,
    #[error("unknown message type or non-zero reserved bytes")]
    UnknownType,
    #[error("wrong length for its message type")]
    BadLength,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Frames a datagram. Never panics, whatever the input.
pub fn parse(datagram: &[u8]) -> Result<Header, Malformed> {
    if datagram.len() < 4 {
        return Err(Malformed::TooShort);
    }
    let (kind, want_len) = match u32_at(datagram, 0) {
        1 => (MessageKind::HandshakeInitiation, Some(HANDSHAKE_INITIATION_LEN)),
        2 => (MessageKind::HandshakeResponse, Some(HANDSHAKE_RESPONSE_LEN)),
        3 => (MessageKind::CookieReply, Some(COOKIE_REPLY_LEN)),
        4 => (MessageKind::Data, None),
        _ => return Err(Malformed::UnknownType),
    };
    match want_len {
        Some(n) if datagram.len() != n => return Err(Malformed::BadLength),
        None if datagram.len() < DATA_OVERHEAD => return Err(Malformed::BadLength),
        _ => {}
    }
    let header = match kind {
        MessageKind::HandshakeInitiation => Header {
            kind,
            sender: Some(u32_at(datagram, 4)),
            receiver: None,
            counter: None,
        },
        MessageKind::HandshakeResponse => Header {
            kind,
            sender: Some(u32_at(datagram, 4)),
            receiver: Some(u32_at(datagram, 8)),
            counter: None,
        },
        MessageKind::CookieReply => Header {
            kind,
            sender: None,
            receiver: Some(u32_at(datagram, 4)),
            counter: None,
        },
        MessageKind::Data => {
            let mut c = [0u8; 8];
            c.copy_from_slice(&datagram[8..16]);
            Header {
                kind,
                sender: None,
                receiver: Some(u32_at(datagram, 4)),
                counter: Some(u64::from_le_bytes(c)),
            }
        }
    };
    Ok(header)
}

/// Source and destination address of an IP packet, if it is one.
pub(crate) fn ip_addrs(packet: &[u8]) -> Option<(std::net::IpAddr, std::net::IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let s: [u8; 4] = packet[12..16].try_into().ok()?;
            let d: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((s.into(), d.into()))
        }
        6 if packet.len() >= 40 => {
            let s: [u8; 16] = packet[8..24].try_into().ok()?;
            let d: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((s.into(), d.into()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(parse(&[]), Err(Malformed::TooShort));
        assert_eq!(parse(&[1, 0, 0]), Err(Malformed::TooShort));
        assert_eq!(parse(&[1, 0, 0, 1]), Err(Malformed::UnknownType));
        assert_eq!(parse(&[1; 148]), Err(Malformed::UnknownType));
        let mut init = [0u8; 148];
        init[0] = 1;
        init[4] = 7;
        assert_eq!(parse(&init).unwrap().sender, Some(7));
        assert_eq!(parse(&init[..147]), Err(Malformed::BadLength));
        let mut data = [0u8; 32];
        data[0] = 4;
        data[8] = 9;
        let h = parse(&data).unwrap();
        assert_eq!((h.kind, h.counter), (MessageKind::Data, Some(9)));
        assert_eq!(parse(&data[..31]), Err(Malformed::BadLength));
    }
}
