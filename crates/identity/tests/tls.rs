//! The rustls configurations over real loopback TCP, with tokio-rustls directly (the transport
//! crate's tests do the same through tonic).
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::TD;
use nsm_identity::{Ca, Credentials, Expect, SpiffeId, Svid};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOUR: Duration = Duration::from_secs(3600);

/// What the server saw of one connection: the client's leaf (None: no certificate) or why the
/// handshake failed.
type Seen = Result<Option<Vec<u8>>, String>;

/// A TLS echo server; reports each handshake.
async fn echo_server(config: Arc<ServerConfig>) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    Ok(mut tls) => {
                        let leaf = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.to_vec());
                        let _ = tx.send(Ok(leaf));
                        let mut buf = [0u8; 64];
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

type Conn = tokio_rustls::client::TlsStream<TcpStream>;

async fn ping(conn: &mut Conn) -> Result<(), String> {
    conn.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

/// Connects, checks one echo, and returns the connection and the server's leaf.
async fn dial(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<(Conn, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut conn = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = conn.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    ping(&mut conn).await?;
    Ok((conn, leaf))
}

struct Domain {
    _dir: tempfile::TempDir,
    ca: Ca,
}

impl Domain {
    fn new(td: &str) -> Domain {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::load_or_create(dir.path(), td).unwrap();
        Domain { _dir: dir, ca }
    }

    fn svid(&self, id: &SpiffeId) -> Svid {
        self.ca.issue_new(id, HOUR, &["127.0.0.1".parse().unwrap()]).unwrap()
    }

    fn creds(&self, id: &SpiffeId) -> Credentials {
        Credentials::new(self.svid(id), &self.ca.bundle_pem()).unwrap()
    }

    fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }
}

fn node(name: &str) -> SpiffeId {
    SpiffeId::node(TD, name).unwrap()
}

#[tokio::test]
async fn mutual_tls_and_rotation() {
    let d = Domain::new(TD);
    let server = d.creds(&node("s"));
    let client = d.creds(&node("c"));
    let (addr, mut seen) = echo_server(server.server_config()).await;
    let client_config = client.client_config(Expect::Id(node("s")));

    let (mut first, server_leaf) = dial(addr, client_config.clone()).await.unwrap();
    assert_eq!(server_leaf, server.svid().leaf_der());
    assert_eq!(seen.recv().await.unwrap().unwrap().unwrap(), client.svid().leaf_der());

    let (old_server, old_client) = (server.svid(), client.svid());
    server.rotate(d.svid(&node("s"))).unwrap();
    client.rotate(d.svid(&node("c"))).unwrap();
    assert_ne!(server.svid().leaf_der(), old_server.leaf_der());

    // The established connection goes on; a new one shows the new certificates, both ways, with
    // the same configurations.
    ping(&mut first).await.unwrap();
    let (_second, server_leaf) = dial(addr, client_config).await.unwrap();
    assert_eq!(server_leaf, server.svid().leaf_der());
    let client_leaf = seen.recv().await.unwrap().unwrap().unwrap();
    assert_eq!(client_leaf, client.svid().leaf_der());
    assert_ne!(client_leaf, old_client.leaf_der());
    ping(&mut first).await.unwrap();

    // Identity never changes in place.
    let e = client.rotate(d.svid(&node("x"))).unwrap_err().to_string();
    assert!(e.contains("node/x") && e.contains("node/c"), "{e}");
}

#[tokio::test]
async fn the_server_id_is_checked() {
    let d = Domain::new(TD);
    let server = d.creds(&node("s"));
    let client = d.creds(&node("c"));
    let (addr, _seen) = echo_server(server.server_config()).await;
    let registry = SpiffeId::registry(TD).unwrap();
    let e = dial(addr, client.client_config(Expect::Id(registry)))
        .await
        .unwrap_err();
    assert!(
        e.contains("server is spiffe://example.org/node/s, expected spiffe://example.org/registry"),
        "{e}"
    );
    dial(addr, client.client_config(Expect::AnyInTrustDomain))
        .await
        .unwrap();
    dial(addr, client.client_config(Expect::Id(node("s")))).await.unwrap();
}

#[tokio::test]
async fn bad_client_certificates_are_refused() {
    let d = Domain::new(TD);
    let foreign = Domain::new(TD);
    let server = d.creds(&node("s"));
    let (addr, mut seen) = echo_server(server.server_config()).await;
    let expect = || Expect::Id(node("s"));

    // Expired, chained to the right CA.
    let expired = Credentials::new(common::expired_svid(d.dir(), &node("c")), &d.ca.bundle_pem()).unwrap();
    assert!(dial(addr, expired.client_config(expect())).await.is_err());
    let e = seen.recv().await.unwrap().unwrap_err();
    assert!(e.contains("expired"), "{e}");

    // From another CA (same trust domain name), trusting the right one.
    let other = Credentials::new(foreign.svid(&node("c")), &d.ca.bundle_pem()).unwrap();
    assert!(dial(addr, other.client_config(expect())).await.is_err());
    assert!(seen.recv().await.unwrap().is_err());

    // Self-signed.
    let selfish = Credentials::new(common::self_signed_svid(&node("c")), &d.ca.bundle_pem()).unwrap();
    assert!(dial(addr, selfish.client_config(expect())).await.is_err());
    assert!(seen.recv().await.unwrap().is_err());

    // Another trust domain, even with its CA in the server's bundle.
    let other_td = Domain::new("other.org");
    let both = format!("{}{}", d.ca.bundle_pem(), other_td.ca.bundle_pem());
    let server2 = Credentials::new(d.svid(&node("s")), &both).unwrap();
    let (addr2, mut seen2) = echo_server(server2.server_config()).await;
    let stranger = Credentials::new(other_td.svid(&SpiffeId::node("other.org", "c").unwrap()), &both).unwrap();
    assert!(
        dial(addr2, stranger.client_config(Expect::Id(node("s"))))
            .await
            .is_err()
    );
    let e = seen2.recv().await.unwrap().unwrap_err();
    assert!(e.contains("not of trust domain example.org"), "{e}");
}

#[tokio::test]
async fn bad_server_certificates_are_refused() {
    let d = Domain::new(TD);
    let foreign = Domain::new(TD);
    let client = d.creds(&node("c"));
    let expect = || Expect::Id(node("s"));

    let expired = Credentials::new(common::expired_svid(d.dir(), &node("s")), &d.ca.bundle_pem()).unwrap();
    let (addr, _s1) = echo_server(expired.server_config()).await;
    let e = dial(addr, client.client_config(expect())).await.unwrap_err();
    assert!(e.contains("certificate expired"), "{e}");

    let other = Credentials::new(foreign.svid(&node("s")), &d.ca.bundle_pem()).unwrap();
    let (addr, _s2) = echo_server(other.server_config()).await;
    let e = dial(addr, client.client_config(expect())).await.unwrap_err();
    // Same CA name, other key: the chain's signature does not verify.
    assert!(e.contains("invalid peer certificate: BadSignature"), "{e}");

    let selfish = Credentials::new(common::self_signed_svid(&node("s")), &d.ca.bundle_pem()).unwrap();
    let (addr, _s3) = echo_server(selfish.server_config()).await;
    assert!(dial(addr, client.client_config(expect())).await.is_err());
}

#[tokio::test]
async fn a_new_bundle_applies_to_existing_configs() {
    let d = Domain::new(TD);
    let foreign = Domain::new(TD);
    let server = d.creds(&node("s"));
    let (addr, _seen) = echo_server(server.server_config()).await;
    let client = Credentials::new(d.svid(&node("c")), &foreign.ca.bundle_pem()).unwrap();
    let config = client.client_config(Expect::Id(node("s")));
    assert!(dial(addr, config.clone()).await.is_err());
    client.set_bundle(&d.ca.bundle_pem()).unwrap();
    assert_eq!(client.bundle_pem(), d.ca.bundle_pem());
    dial(addr, config.clone()).await.unwrap();
    // And a bundle of both CAs (CA rotation) trusts both.
    client
        .set_bundle(&format!("{}{}", foreign.ca.bundle_pem(), d.ca.bundle_pem()))
        .unwrap();
    dial(addr, config).await.unwrap();
    assert!(client.set_bundle("not pem").is_err());
}

#[tokio::test]
async fn joining_pins_the_ca_and_the_registry() {
    let d = Domain::new(TD);
    let registry = d.creds(&SpiffeId::registry(TD).unwrap());
    let (addr, mut seen) = echo_server(registry.server_config()).await;

    let config = Credentials::joining_client_config(&d.ca.fingerprint()).unwrap();
    let (_conn, leaf) = dial(addr, config).await.unwrap();
    assert_eq!(leaf, registry.svid().leaf_der());
    // The joining client showed no certificate.
    assert_eq!(seen.recv().await.unwrap().unwrap(), None);

    let foreign = Domain::new(TD);
    let wrong = Credentials::joining_client_config(&foreign.ca.fingerprint()).unwrap();
    let e = dial(addr, wrong).await.unwrap_err();
    assert!(e.contains("no CA certificate with fingerprint"), "{e}");

    // The right CA, but not the registry.
    let node_server = d.creds(&node("s"));
    let (addr, _s) = echo_server(node_server.server_config()).await;
    let config = Credentials::joining_client_config(&d.ca.fingerprint()).unwrap();
    let e = dial(addr, config).await.unwrap_err();
    assert!(e.contains("expected the registry"), "{e}");

    assert!(Credentials::joining_client_config("sha256:abc").is_err());
    assert!(Credentials::joining_client_config("").is_err());
}
