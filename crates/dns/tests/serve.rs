//! The server over real sockets on 127.0.0.1: answers from the table, forwarding to a fake
//! upstream, failures, TCP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use nsm_dns::{Records, TTL, UPSTREAM_TIMEOUT, resolv_conf_nameservers, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What the fake upstream answers for `UPSTREAM_NAME`.
const UPSTREAM_NAME: &str = "outside.example.";
const UPSTREAM_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// A name whose answer the fake upstream truncates over UDP and gives whole over TCP.
const BIG_NAME: &str = "big.example.";

/// A running server and how to stop it.
struct Dns {
    udp: SocketAddr,
    tcp: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), nsm_dns::DnsError>>,
}

impl Dns {
    fn start(records: Records, forward: Vec<SocketAddr>) -> Self {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(records, udp, Some(tcp), forward, async move {
            let _ = stopped.await;
        }));
        Self {
            udp: udp_addr,
            tcp: tcp_addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        result.expect("server stops").unwrap().unwrap();
    }
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.id = 0x1234;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

async fn ask_udp(server: SocketAddr, message: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&message.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0; 65535];
    let deadline = UPSTREAM_TIMEOUT * 2 + Duration::from_secs(2);
    let (len, _) = tokio::time::timeout(deadline, socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(answer.metadata.id, message.metadata.id, "the client's ID comes back");
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    answer
}

async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    ask_udp(server, &query(name, qtype)).await
}

async fn ask_tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let bytes = message.to_vec().unwrap();
    stream.write_u16(bytes.len() as u16).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    let answer = Message::from_vec(&buf).unwrap();
    assert_eq!(answer.metadata.id, message.metadata.id);
    answer
}

fn addrs(message: &Message) -> Vec<IpAddr> {
    message
        .answers
        .iter()
        .filter_map(|record| match record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A resolver on 127.0.0.1 that answers `UPSTREAM_NAME` A with `UPSTREAM_ADDR`, truncates
/// `BIG_NAME` over UDP (and answers it over TCP on the same port), and says NXDOMAIN to the rest.
/// Counts the queries it gets.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeUpstream {
    async fn start() -> Self {
        // TCP on the same port number as UDP, as a real resolver has it.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let counter = queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0; 65535];
            loop {
                let (len, from) = udp.recv_from(&mut buf).await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let reply = Self::reply(&buf[..len], false);
                udp.send_to(&reply, from).await.unwrap();
            }
        });
        let tcp_task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let len = stream.read_u16().await.unwrap();
                let mut buf = vec![0; usize::from(len)];
                stream.read_exact(&mut buf).await.unwrap();
                let reply = Self::reply(&buf, true);
                stream.write_u16(reply.len() as u16).await.unwrap();
                stream.write_all(&reply).await.unwrap();
            }
        });
        Self {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn reply(query: &[u8], tcp: bool) -> Vec<u8> {
        let query = Message::from_vec(query).unwrap();
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.metadata.recursion_available = true;
        reply.add_queries(query.queries.clone());
        let name = query.queries[0].name().clone();
        if name == Name::from_ascii(UPSTREAM_NAME).unwrap() {
            reply.add_answer(Record::from_rdata(name, 60, RData::A(A(UPSTREAM_ADDR))));
        } else if name == Name::from_ascii(BIG_NAME).unwrap() {
            if tcp {
                for i in 0..100 {
                    let addr = Ipv4Addr::new(198, 51, 100, i);
                    reply.add_answer(Record::from_rdata(name.clone(), 60, RData::A(A(addr))));
                }
            } else {
                reply.metadata.truncation = true;
            }
        } else {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply.to_vec().unwrap()
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[tokio::test]
async fn answers_a_aaaa_and_ptr_from_the_table() {
    let records = Records::new();
    records
        .set("web-1.istio", vec![ip("10.60.0.2"), ip("fd00::2")])
        .unwrap();
    records.set("web-2.istio.", vec![ip("10.60.0.3")]).unwrap();
    let dns = Dns::start(records, vec![]);

    let answer = ask(dns.udp, "web-1.istio.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert_eq!(addrs(&answer), [ip("10.60.0.2")]);
    assert_eq!(answer.answers[0].ttl, TTL);

    let answer = ask(dns.udp, "web-1.istio.", RecordType::AAAA).await;
    assert_eq!(addrs(&answer), [ip("fd00::2")]);

    // The owner name comes back as the client spelled it.
    let answer = ask(dns.udp, "WEB-2.Istio.", RecordType::A).await;
    assert_eq!(addrs(&answer), [ip("10.60.0.3")]);
    assert_eq!(answer.answers[0].name.to_string(), "WEB-2.Istio.");

    let answer = ask(dns.udp, "3.0.60.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let ptrs: Vec<String> = answer.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(ptrs, ["web-2.istio."]);

    let v6_reverse = Name::from(ip("fd00::2")).to_string();
    let answer = ask(dns.udp, &v6_reverse, RecordType::PTR).await;
    let ptrs: Vec<String> = answer.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(ptrs, ["web-1.istio."]);

    dns.stop().await;
}

#[tokio::test]
async fn updates_are_visible_at_once() {
    let records = Records::new();
    let dns = Dns::start(records.clone(), vec![]);

    assert_eq!(
        ask(dns.udp, "db.vl3.", RecordType::A).await.metadata.response_code,
        ResponseCode::Refused
    );
    records.set("db.vl3", vec![ip("10.1.0.1")]).unwrap();
    assert_eq!(addrs(&ask(dns.udp, "db.vl3.", RecordType::A).await), [ip("10.1.0.1")]);
    records.set("db.vl3", vec![ip("10.1.0.9")]).unwrap();
    assert_eq!(addrs(&ask(dns.udp, "db.vl3.", RecordType::A).await), [ip("10.1.0.9")]);
    records.replace_all([("cache.vl3", vec![ip("10.1.0.5")])]).unwrap();
    assert_eq!(
        addrs(&ask(dns.udp, "cache.vl3.", RecordType::A).await),
        [ip("10.1.0.5")]
    );
    assert_eq!(
        ask(dns.udp, "db.vl3.", RecordType::A).await.metadata.response_code,
        ResponseCode::Refused
    );
    assert!(records.remove("cache.vl3"));
    assert_eq!(
        ask(dns.udp, "cache.vl3.", RecordType::A).await.metadata.response_code,
        ResponseCode::Refused
    );

    dns.stop().await;
}

#[tokio::test]
async fn nodata_for_known_names_nxdomain_from_upstream_for_unknown() {
    let upstream = FakeUpstream::start().await;
    let records = Records::new();
    records.set("web-1.istio", vec![ip("10.60.0.2")]).unwrap();
    records.set("empty.istio", vec![]).unwrap();
    let dns = Dns::start(records, vec![upstream.addr]);

    // Known name, no address of that type: NOERROR, empty answer, not forwarded.
    for (name, qtype) in [
        ("web-1.istio.", RecordType::AAAA),
        ("web-1.istio.", RecordType::MX),
        ("empty.istio.", RecordType::A),
        ("2.0.60.10.in-addr.arpa.", RecordType::A),
    ] {
        let answer = ask(dns.udp, name, qtype).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "{name} {qtype}");
        assert!(answer.answers.is_empty(), "{name} {qtype}");
    }
    assert_eq!(upstream.queries(), 0);

    // Unknown name: the upstream's NXDOMAIN comes back.
    let answer = ask(dns.udp, "web-9.istio.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 1);
    // An address no member holds is not ours either.
    let answer = ask(dns.udp, "9.0.60.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 2);

    dns.stop().await;
}

#[tokio::test]
async fn unknown_names_get_the_upstream_answer() {
    let upstream = FakeUpstream::start().await;
    let records = Records::new();
    records.set("web-1.istio", vec![ip("10.60.0.2")]).unwrap();
    let dns = Dns::start(records, vec![upstream.addr]);

    let answer = ask(dns.udp, UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.recursion_available);
    assert!(!answer.metadata.authoritative);
    assert_eq!(addrs(&answer), [IpAddr::V4(UPSTREAM_ADDR)]);
    assert_eq!(answer.answers[0].ttl, 60);

    // Other types for unknown names are forwarded too.
    let answer = ask(dns.udp, UPSTREAM_NAME, RecordType::TXT).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(upstream.queries(), 2);

    dns.stop().await;
}

#[tokio::test]
async fn truncated_upstream_answers_are_fetched_over_tcp() {
    let upstream = FakeUpstream::start().await;
    let dns = Dns::start(Records::new(), vec![upstream.addr]);

    // With EDNS and a big buffer the whole TCP answer fits in one UDP reply.
    let mut message = query(BIG_NAME, RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.set_edns(edns);
    let answer = ask_udp(dns.udp, &message).await;
    assert!(!answer.metadata.truncation);
    assert_eq!(answer.answers.len(), 100);

    // A plain 512-byte client is told to retry over TCP, where it gets it all.
    let message = query(BIG_NAME, RecordType::A);
    let answer = ask_udp(dns.udp, &message).await;
    assert!(answer.metadata.truncation);
    let answer = ask_tcp(dns.tcp, &message).await;
    assert!(!answer.metadata.truncation);
    assert_eq!(answer.answers.len(), 100);

    dns.stop().await;
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_none_answering_is_servfail() {
    // Bound but silent: nothing comes back, not even a port-unreachable.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = FakeUpstream::start().await;

    let dns = Dns::start(Records::new(), vec![silent.local_addr().unwrap(), upstream.addr]);
    let started = Instant::now();
    let answer = ask(dns.udp, UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(addrs(&answer), [IpAddr::V4(UPSTREAM_ADDR)]);
    assert!(started.elapsed() >= UPSTREAM_TIMEOUT);
    dns.stop().await;

    let dns = Dns::start(Records::new(), vec![silent.local_addr().unwrap()]);
    let started = Instant::now();
    let answer = ask(dns.udp, UPSTREAM_NAME, RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= UPSTREAM_TIMEOUT && elapsed < UPSTREAM_TIMEOUT + Duration::from_secs(3),
        "{elapsed:?}"
    );
    dns.stop().await;
}

#[tokio::test]
async fn tcp_queries_are_answered_from_the_table() {
    let records = Records::new();
    records.set("web-1.istio", vec![ip("10.60.0.2")]).unwrap();
    let dns = Dns::start(records, vec![]);
    let answer = ask_tcp(dns.tcp, &query("web-1.istio.", RecordType::A)).await;
    assert_eq!(addrs(&answer), [ip("10.60.0.2")]);
    let answer = ask_tcp(dns.tcp, &query("nobody.istio.", RecordType::A)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    dns.stop().await;
}

#[test]
fn resolv_conf_nameservers_are_parsed() {
    let text = "\
# Generated by NetworkManager
search example.com
nameserver 192.0.2.53
  nameserver   2001:db8::53   # trailing words are ignored
; nameserver 192.0.2.99
#nameserver 192.0.2.98
nameserver fe80::1%2
nameserver fe80::1%eth0
nameserver not-an-address
nameserver
options edns0 trust-ad
nameservers 192.0.2.97
";
    let servers: Vec<String> = resolv_conf_nameservers(text).iter().map(|s| s.to_string()).collect();
    assert_eq!(servers, ["192.0.2.53:53", "[2001:db8::53]:53", "[fe80::1%2]:53"]);
    assert!(resolv_conf_nameservers("").is_empty());
}
