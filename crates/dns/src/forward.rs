//! Relaying queries for names the table does not know to upstream resolvers.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::LowerName;
use hickory_server::server::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

use crate::UPSTREAM_TIMEOUT;

/// Asks each upstream in turn and returns the first real answer. An upstream that answers
/// SERVFAIL or REFUSED is passed over for the next one (as stub resolvers do), but its answer is
/// kept in case no one does better. `None` when no upstream answered at all.
pub(crate) async fn forward(upstreams: &[SocketAddr], request: &Request) -> Option<Message> {
    let mut query = request.as_slice().to_vec();
    let mut fallback = None;
    for &upstream in upstreams {
        // A fresh ID per upstream query, so an off-path spoofer has to guess it as well as the
        // ephemeral port; the client's own ID goes back on when the answer is relayed.
        let id = random_id();
        query[..2].copy_from_slice(&id.to_be_bytes());
        let answer = match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange(upstream, &query, id)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(error)) => {
                debug!(%upstream, %error, "upstream failed");
                continue;
            }
            Err(_) => {
                debug!(%upstream, "upstream timed out");
                continue;
            }
        };
        let message = match Message::from_vec(&answer) {
            Ok(message) if answers(&message, request) => message,
            Ok(_) => {
                debug!(%upstream, "upstream answered another question");
                continue;
            }
            Err(error) => {
                debug!(%upstream, %error, "undecodable answer from upstream");
                continue;
            }
        };
        match message.metadata.response_code {
            ResponseCode::ServFail | ResponseCode::Refused => {
                fallback.get_or_insert(message);
            }
            _ => return Some(message),
        }
    }
    fallback
}

/// One upstream: UDP, then TCP if the answer was truncated. If TCP fails the truncated answer
/// is relayed as it is, TC bit and all, and the client may retry over TCP itself.
async fn exchange(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let answer = exchange_udp(upstream, query, id).await?;
    // The TC bit is bit 1 of the third header byte.
    if answer.get(2).is_some_and(|flags| flags & 0x02 != 0) {
        match exchange_tcp(upstream, query, id).await {
            Ok(full) => return Ok(full),
            Err(error) => debug!(%upstream, %error, "truncated over UDP and TCP failed"),
        }
    }
    Ok(answer)
}

async fn exchange_udp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected, so the kernel drops datagrams from anyone but the upstream.
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0; usize::from(u16::MAX)];
    loop {
        let len = socket.recv(&mut buf).await?;
        if len >= 12 && buf[..2] == id.to_be_bytes() {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long for TCP"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut answer = vec![0; usize::from(len)];
    stream.read_exact(&mut answer).await?;
    if answer.len() < 12 || answer[..2] != id.to_be_bytes() {
        return Err(io::Error::other("answer with another ID over TCP"));
    }
    Ok(answer)
}

/// Whether `message` is a response to the question `request` asked.
fn answers(message: &Message, request: &Request) -> bool {
    let asked = request.queries.queries();
    message.metadata.message_type == MessageType::Response
        && message.queries.len() == asked.len()
        && message.queries.iter().zip(asked).all(|(got, asked)| {
            LowerName::new(got.name()) == *asked.name()
                && got.query_type() == asked.query_type()
                && got.query_class() == asked.query_class()
        })
}

/// A 16-bit ID from the operating system's CSPRNG: a forwarded query's ID is what an off-path
/// attacker must guess to poison the answer, so it must not follow from earlier ones.
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // The kernel's getrandom does not fail once the system has booted; a zero ID would still be
    // matched against the question, as every answer is.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u16::from_ne_bytes(b)
}
