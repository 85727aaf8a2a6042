//! Mutual TLS through tonic over real loopback sockets: the transport authenticates each
//! connection once and every request sees the [`Peer`] it proved.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nsm_identity::{Ca, Credentials, Expect, SpiffeId, Svid};
use nsm_transport::{
    ClientSecurity, Listener, Peer, ServerSecurity, UnixOptions, Url, connect_lazy_secure, connect_secure,
};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const TD: &str = "example.org";
const HOUR: Duration = Duration::from_secs(3600);
const T: Duration = Duration::from_secs(5);

/// grpc.health.v1 that records the peer of every Check.
#[derive(Clone, Default)]
struct Recorder {
    peers: Arc<Mutex<Vec<Option<Peer>>>>,
}

impl Recorder {
    fn last(&self) -> Option<Peer> {
        self.peers.lock().unwrap().last().cloned().flatten()
    }

    fn count(&self) -> usize {
        self.peers.lock().unwrap().len()
    }
}

#[tonic::async_trait]
impl Health for Recorder {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.peers.lock().unwrap().push(Peer::of(&req).cloned());
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, _req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

struct Server {
    url: String,
    recorder: Recorder,
    _stop: oneshot::Sender<()>,
}

async fn serve(url: &str, security: ServerSecurity) -> Server {
    let listener = Listener::bind(&url.parse().unwrap()).await.unwrap();
    let url = listener.url().to_string();
    let recorder = Recorder::default();
    let routes = Routes::new(HealthServer::new(recorder.clone()));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        listener
            .serve_secure(routes, security, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server {
        url,
        recorder,
        _stop: stop,
    }
}

async fn mtls_server(creds: &Credentials) -> Server {
    serve("tcp://127.0.0.1:0", ServerSecurity::Mtls(creds.clone())).await
}

async fn check(ch: Channel) -> Result<(), Status> {
    let req = HealthCheckRequest { service: String::new() };
    let resp = tokio::time::timeout(T, HealthClient::new(ch).check(req))
        .await
        .map_err(|_| Status::deadline_exceeded("test timeout"))??;
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
    Ok(())
}

/// Connects and calls; the error of whichever step failed.
async fn call(url: &str, security: &ClientSecurity) -> Result<(), String> {
    let ch = connect_secure(url, T, security).await.map_err(|e| e.to_string())?;
    check(ch).await.map_err(|e| e.to_string())
}

struct Domain {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Domain {
    fn new() -> Domain {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::load_or_create(dir.path(), TD).unwrap();
        Domain { dir, ca }
    }

    fn svid(&self, id: &SpiffeId) -> Svid {
        self.ca.issue_new(id, HOUR, &["127.0.0.1".parse().unwrap()]).unwrap()
    }

    fn creds(&self, id: &SpiffeId) -> Credentials {
        Credentials::new(self.svid(id), &self.ca.bundle_pem()).unwrap()
    }

    /// Made with rcgen: the CA never issues these.
    fn odd_svid(&self, id: &SpiffeId, expired: bool, self_signed: bool) -> Svid {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let (nb, na) = if expired {
            (now - 2 * HOUR, now - HOUR)
        } else {
            (now - HOUR, now + HOUR)
        };
        params.not_before = nb.into();
        params.not_after = na.into();
        let chain = if self_signed {
            params.self_signed(&key).unwrap().pem()
        } else {
            let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.dir.path().join("ca.key")).unwrap()).unwrap();
            let issuer = Issuer::from_ca_cert_pem(&self.ca.bundle_pem(), ca_key).unwrap();
            format!(
                "{}{}",
                params.signed_by(&key, &issuer).unwrap().pem(),
                self.ca.bundle_pem()
            )
        };
        Svid::from_pem(&chain, &key.serialize_pem()).unwrap()
    }
}

fn node(name: &str) -> SpiffeId {
    SpiffeId::node(TD, name).unwrap()
}

fn mtls(creds: &Credentials, expect: SpiffeId) -> ClientSecurity {
    ClientSecurity::Mtls {
        credentials: creds.clone(),
        expect: Expect::Id(expect),
    }
}

#[tokio::test]
async fn the_handler_sees_the_clients_spiffe_id() {
    let d = Domain::new();
    let server = mtls_server(&d.creds(&node("s"))).await;
    let client = d.creds(&node("c"));
    call(&server.url, &mtls(&client, node("s"))).await.unwrap();
    match server.recorder.last() {
        Some(Peer::Spiffe { id, addr, .. }) => {
            assert_eq!(id, node("c"));
            assert_eq!(addr.unwrap().ip().to_string(), "127.0.0.1");
        }
        other => panic!("{other:?}"),
    }
    // Any identity of the trust domain, when that is what the client asks for.
    let any = ClientSecurity::Mtls {
        credentials: client.clone(),
        expect: Expect::AnyInTrustDomain,
    };
    call(&server.url, &any).await.unwrap();
    // A lazy channel too.
    check(connect_lazy_secure(&server.url, &any).unwrap()).await.unwrap();
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_one_is_named() {
    let d = Domain::new();
    let server = mtls_server(&d.creds(&node("x"))).await;
    let client = d.creds(&node("c"));
    let registry = SpiffeId::registry(TD).unwrap();
    let e = call(&server.url, &mtls(&client, registry)).await.unwrap_err();
    assert!(e.contains(&server.url), "{e}");
    assert!(
        e.contains("server is spiffe://example.org/node/x, expected spiffe://example.org/registry"),
        "{e}"
    );
    assert_eq!(server.recorder.count(), 0);
}

#[tokio::test]
async fn bad_client_certificates_fail_the_handshake() {
    let d = Domain::new();
    let foreign = Domain::new();
    let server = mtls_server(&d.creds(&node("s"))).await;
    let bundle = d.ca.bundle_pem();
    for (what, svid) in [
        ("expired", d.odd_svid(&node("c"), true, false)),
        ("foreign CA", foreign.svid(&node("c"))),
        ("self-signed", d.odd_svid(&node("c"), false, true)),
    ] {
        let creds = Credentials::new(svid, &bundle).unwrap();
        let e = call(&server.url, &mtls(&creds, node("s"))).await;
        assert!(e.is_err(), "{what} was accepted");
    }
    assert_eq!(server.recorder.count(), 0);
    // The server goes on serving good clients.
    call(&server.url, &mtls(&d.creds(&node("c")), node("s"))).await.unwrap();
}

#[tokio::test]
async fn bad_server_certificates_are_refused_by_the_client() {
    let d = Domain::new();
    let foreign = Domain::new();
    let client = d.creds(&node("c"));
    let bundle = d.ca.bundle_pem();

    let expired = mtls_server(&Credentials::new(d.odd_svid(&node("s"), true, false), &bundle).unwrap()).await;
    let e = call(&expired.url, &mtls(&client, node("s"))).await.unwrap_err();
    assert!(e.contains("certificate expired") && e.contains(&expired.url), "{e}");

    let other = mtls_server(&Credentials::new(foreign.svid(&node("s")), &bundle).unwrap()).await;
    assert!(call(&other.url, &mtls(&client, node("s"))).await.is_err());

    let selfish = mtls_server(&Credentials::new(d.odd_svid(&node("s"), false, true), &bundle).unwrap()).await;
    assert!(call(&selfish.url, &mtls(&client, node("s"))).await.is_err());
}

#[tokio::test]
async fn plaintext_clients_get_nothing_from_an_mtls_server() {
    let d = Domain::new();
    let server = mtls_server(&d.creds(&node("s"))).await;
    assert!(call(&server.url, &ClientSecurity::Insecure).await.is_err());
    assert_eq!(server.recorder.count(), 0);
}

#[tokio::test]
async fn joining_clients_are_anonymous_and_pin_the_ca() {
    let d = Domain::new();
    let registry = mtls_server(&d.creds(&SpiffeId::registry(TD).unwrap())).await;
    let joining = ClientSecurity::Joining {
        ca_fingerprint: d.ca.fingerprint(),
    };
    call(&registry.url, &joining).await.unwrap();
    match registry.recorder.last() {
        Some(Peer::Anonymous { addr }) => assert!(addr.is_some()),
        other => panic!("{other:?}"),
    }

    let wrong = ClientSecurity::Joining {
        ca_fingerprint: Domain::new().ca.fingerprint(),
    };
    let e = call(&registry.url, &wrong).await.unwrap_err();
    assert!(e.contains("fingerprint"), "{e}");

    // The right CA, but a node, not the registry.
    let node_server = mtls_server(&d.creds(&node("s"))).await;
    let e = call(&node_server.url, &joining).await.unwrap_err();
    assert!(e.contains("expected the registry"), "{e}");
}

/// The leaf certificate a server presents to a new connection.
async fn server_leaf(addr: SocketAddr, creds: &Credentials) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(creds.client_config(Expect::AnyInTrustDomain))
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The leaf certificate a client presents to a new connection (seen by a bare TLS acceptor).
async fn client_leaf(server: &Credentials, client: &ClientSecurity) -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
    let client = client.clone();
    // The bare acceptor speaks no HTTP/2; only the handshake matters.
    let dialer = tokio::spawn(async move { connect_secure(&url, Duration::from_secs(2), &client).await });
    let (tcp, _) = listener.accept().await.unwrap();
    let tls = acceptor.accept(tcp).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    dialer.abort();
    leaf
}

#[tokio::test]
async fn rotation_keeps_channels_and_new_connections_show_new_certificates() {
    let d = Domain::new();
    let server_creds = d.creds(&node("s"));
    let client_creds = d.creds(&node("c"));
    let server = mtls_server(&server_creds).await;
    let addr: SocketAddr = server.url.trim_start_matches("tcp://").parse().unwrap();
    let security = mtls(&client_creds, node("s"));
    let channel = connect_secure(&server.url, T, &security).await.unwrap();
    check(channel.clone()).await.unwrap();
    assert_eq!(server_leaf(addr, &client_creds).await, server_creds.svid().leaf_der());
    assert_eq!(
        client_leaf(&server_creds, &security).await,
        client_creds.svid().leaf_der()
    );

    let (old_server, old_client) = (server_creds.svid(), client_creds.svid());
    server_creds.rotate(d.svid(&node("s"))).unwrap();
    client_creds.rotate(d.svid(&node("c"))).unwrap();

    // The open channel goes on over its established connection.
    check(channel.clone()).await.unwrap();
    check(channel).await.unwrap();
    // New connections, with the same server and client configurations, show the new certificates.
    let new_server_leaf = server_leaf(addr, &client_creds).await;
    assert_eq!(new_server_leaf, server_creds.svid().leaf_der());
    assert_ne!(new_server_leaf, old_server.leaf_der());
    let new_client_leaf = client_leaf(&server_creds, &security).await;
    assert_eq!(new_client_leaf, client_creds.svid().leaf_der());
    assert_ne!(new_client_leaf, old_client.leaf_der());
    assert!(client_creds.svid().not_after() >= old_client.not_after());
    call(&server.url, &security).await.unwrap();
    match server.recorder.last() {
        Some(Peer::Spiffe { id, .. }) => assert_eq!(id, node("c")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unix_sockets_know_the_caller_from_the_kernel() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = Domain::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nsm.sock");
    let url = format!("unix://{}", path.display());
    // Even with mTLS configured, a unix socket is served without TLS.
    let server = serve(&url, ServerSecurity::Mtls(d.creds(&node("s")))).await;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
    // The client's security is ignored for unix sockets too.
    call(&url, &mtls(&d.creds(&node("c")), node("s"))).await.unwrap();
    let me = std::fs::metadata(dir.path()).unwrap();
    match server.recorder.last() {
        Some(Peer::Unix { uid, gid, pid }) => {
            assert_eq!(uid, me.uid());
            assert_eq!(gid, me.gid());
            assert_eq!(pid, Some(std::process::id() as i32));
        }
        other => panic!("{other:?}"),
    }
    call(&url, &ClientSecurity::Insecure).await.unwrap();

    // Mode and group as asked.
    let other = Url::Unix(dir.path().join("private.sock"));
    let opts = UnixOptions {
        mode: 0o600,
        group: Some(me.gid()),
    };
    let _l = Listener::bind_with(&other, opts).await.unwrap();
    let meta = std::fs::metadata(dir.path().join("private.sock")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.gid(), me.gid());
}

#[tokio::test]
async fn plaintext_tcp_is_insecure() {
    let server = serve("tcp://127.0.0.1:0", ServerSecurity::Insecure).await;
    call(&server.url, &ClientSecurity::Insecure).await.unwrap();
    assert!(matches!(server.recorder.last(), Some(Peer::Insecure { addr: Some(_) })));
}

#[tokio::test]
async fn a_stock_tls_client_can_call_by_address() {
    let d = Domain::new();
    let server = mtls_server(&d.creds(&node("s"))).await;
    let addr = server.url.trim_start_matches("tcp://");
    let client = d.svid(&node("c"));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(d.ca.bundle_pem()))
        .domain_name("127.0.0.1");
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tls.clone()
                .identity(Identity::from_pem(client.chain_pem(), client.key_pem())),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    check(ch).await.unwrap();
    match server.recorder.last() {
        Some(Peer::Spiffe { id, .. }) => assert_eq!(id, node("c")),
        other => panic!("{other:?}"),
    }
    // Without a client certificate: anonymous.
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    check(ch).await.unwrap();
    assert!(matches!(server.recorder.last(), Some(Peer::Anonymous { .. })));
}

#[tokio::test]
async fn a_stalled_handshake_does_not_block_others() {
    let d = Domain::new();
    let server = mtls_server(&d.creds(&node("s"))).await;
    let addr = server.url.trim_start_matches("tcp://").to_owned();
    // Connections that never send a ClientHello.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    call(&server.url, &mtls(&d.creds(&node("c")), node("s"))).await.unwrap();
}

/// A flood of connections that never finish their handshake holds at most
/// `MAX_HANDSHAKES` of the server's descriptors: the next connection is closed unanswered, and
/// once the flood goes, clients are served again.
#[tokio::test]
async fn handshakes_under_way_are_capped() {
    // Both ends of every connection live in this process: room for twice the cap and more.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let want = (4 * nsm_transport::MAX_HANDSHAKES as u64).min(hard);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, hard).unwrap();
    let d = Domain::new();
    let server = mtls_server(&d.creds(&node("s"))).await;
    let addr = server.url.trim_start_matches("tcp://").to_owned();
    let mut flood = Vec::new();
    for _ in 0..nsm_transport::MAX_HANDSHAKES {
        flood.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // The server has taken them all (each is waiting for its ClientHello).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut over, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection beyond the cap was not closed: {read:?}"
    );
    // One under the cap is held open, waiting for its handshake.
    drop(flood.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut under = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let read = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(&mut under, &mut buf),
    )
    .await;
    assert!(read.is_err(), "a connection under the cap was closed: {read:?}");
    drop((flood, under));
    let mut served = false;
    for _ in 0..50 {
        if call(&server.url, &mtls(&d.creds(&node("c")), node("s"))).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "clients are served again once the flood is gone");
}
