//! The DNS server of nsm's vL3 routers.
//!
//! Every member of a vL3 gets a name (`web-1.istio.`) and every member resolves every other
//! member's name through this server, which answers A, AAAA and PTR from a live [`Records`]
//! table that the node daemon updates as members come and go. Names the table does not hold are
//! relayed to upstream resolvers (the host's, by default: [`resolv_conf_nameservers`]), so a
//! member that points its resolver here still resolves everything else.
//!
//! The server is hickory-server's [`Server`] (UDP and TCP framing, per-request tasks) with this
//! crate's [`RequestHandler`] behind it.
#![forbid(unsafe_code)]

mod forward;
mod records;

pub use records::Records;

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::warn;

/// TTL of the answers from the table. Members come and go as workloads are rescheduled and an
/// address can move to another member; a few seconds bounds how long a client's cache keeps a
/// stale answer, and asking again costs a round trip to a router on the same vL3.
pub const TTL: u32 = 5;

/// How long one upstream gets to answer (UDP plus any TCP retry) before the next is tried.
/// Stub resolvers give up on a server after about 5 s (glibc's default), so a dead first upstream
/// must leave time for a second one, or for our SERVFAIL to reach the client.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a TCP client may stay idle before its connection is closed, so idle connections
/// cannot pile up on a router.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 16;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A name given to [`Records`] is not a valid DNS name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket could not be handed to the runtime.
    #[error("DNS socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server stopped on a socket error.
    #[error("DNS server: {0}")]
    Server(#[from] NetError),
}

/// Serves DNS on `udp` (and `tcp`, if given) until `shutdown` resolves.
///
/// The sockets come bound because the caller binds them inside the vL3 router's network
/// namespace; they are set non-blocking here. Must be awaited inside a Tokio runtime. Queries for
/// unknown names are relayed to `forward`, in order, first answer wins; SERVFAIL if none answers
/// within [`UPSTREAM_TIMEOUT`] each. With an empty `forward`, unknown names get REFUSED: this
/// server is then only an authority for the table, and REFUSED tells the client to ask another
/// of its resolvers.
///
/// The sockets to upstreams are opened by the task that relays, in the network namespace of the
/// thread running it: run this on a current-thread runtime on the thread that entered the
/// namespace if the upstreams are to be reached from inside it.
pub async fn serve(
    records: Records,
    udp: std::net::UdpSocket,
    tcp: Option<std::net::TcpListener>,
    forward: Vec<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    udp.set_nonblocking(true)?;
    let udp = tokio::net::UdpSocket::from_std(udp)?;
    let tcp = match tcp {
        Some(tcp) => {
            tcp.set_nonblocking(true)?;
            Some(tokio::net::TcpListener::from_std(tcp)?)
        }
        None => None,
    };
    let mut server = Server::new(Handler { records, forward });
    server.register_socket(udp);
    if let Some(tcp) = tcp {
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    }
    let token = server.shutdown_token().clone();
    let mut done = std::pin::pin!(server.block_until_done());
    let shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        result = &mut done => result?,
        () = shutdown => {
            token.cancel();
            done.await?;
        }
    }
    Ok(())
}

/// The nameservers of a resolv.conf, on port 53, in order: the node's default upstreams.
///
/// Lines that are not `nameserver ADDRESS` are skipped, as are link-local IPv6 addresses with a
/// named zone (`fe80::1%eth0`), which cannot be used without resolving the interface. Loopback
/// addresses (a local caching resolver) are returned as they are, though from inside another
/// network namespace they reach that namespace's loopback, not the host's.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let addr = words.next()?;
            match addr.split_once('%') {
                None => addr.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)),
                Some((ip, zone)) => {
                    let ip: Ipv6Addr = ip.parse().ok()?;
                    let scope = zone.parse().ok()?;
                    Some(SocketAddrV6::new(ip, 53, 0, scope).into())
                }
            }
        })
        .collect()
}

/// Answers from the table, relays the rest.
struct Handler {
    records: Records,
    forward: Vec<SocketAddr>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        match self.respond(request, &mut response).await {
            Ok(info) => info,
            Err(error) => {
                warn!(%error, src = %request.src(), "cannot send DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                Header {
                    metadata,
                    counts: HeaderCounts::default(),
                }
                .into()
            }
        }
    }
}

impl Handler {
    async fn respond<R: ResponseHandler>(&self, request: &Request, response: &mut R) -> Result<ResponseInfo, NetError> {
        let edns = response_edns(request);
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let none = std::iter::empty::<&Record>;

        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            let reply = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return response.send_response(reply).await;
        }
        let query = match request.request_info() {
            Ok(info) => info.query,
            Err(_) => {
                let reply = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return response.send_response(reply).await;
            }
        };

        if query.query_class() == DNSClass::IN
            && let Some(answers) = self.records.answer(query.original().name(), query.query_type())
        {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.authoritative = true;
            metadata.recursion_available = !self.forward.is_empty();
            let reply = builder.build(metadata, answers.iter(), none(), none(), none());
            return response.send_response(reply).await;
        }

        if self.forward.is_empty() {
            let reply = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return response.send_response(reply).await;
        }
        let Some(upstream) = forward::forward(&self.forward, request).await else {
            let reply = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return response.send_response(reply).await;
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = upstream.metadata.response_code;
        metadata.authoritative = upstream.metadata.authoritative;
        metadata.truncation = upstream.metadata.truncation;
        metadata.recursion_available = upstream.metadata.recursion_available;
        metadata.authentic_data = upstream.metadata.authentic_data;
        let reply = builder.build(
            metadata,
            upstream.answers.iter(),
            upstream.authorities.iter(),
            none(),
            upstream.additionals.iter(),
        );
        response.send_response(reply).await
    }
}

/// EDNS for the response when the client sent it: its buffer size (at least 512) decides how
/// much of a UDP answer fits before it is truncated.
fn response_edns(request: &Request) -> Option<Edns> {
    let asked = request.edns.as_ref()?;
    let mut edns = Edns::new();
    edns.set_max_payload(asked.max_payload().max(512));
    edns.set_dnssec_ok(asked.flags().dnssec_ok);
    Some(edns)
}
