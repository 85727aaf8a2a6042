//! Mutual TLS with SPIFFE IDs (DESIGN.md §6): every TCP connection is authenticated by the
//! transport, once per connection, and who is at the other end ([`Peer`]) is handed to every request
//! as its tonic connect info, so authorization at the tonic boundary reads it before any handler runs.
//! Unix sockets authenticate by the kernel's peer credentials instead and never carry TLS.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nsm_identity::{Credentials, Expect, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Server};

use crate::{Listener, TransportError, Url, error_chain};

/// How long a TLS handshake may take, on either side, before the connection is dropped: a slow or
/// malicious peer must not hold a task or a dialer forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a server-side connection, established once per connection by the
/// transport and put into every request's extensions (it is the tonic connect info of the
/// connection type).
#[derive(Clone, Debug)]
pub enum Peer {
    /// Mutual TLS; the client certificate was verified and carries this SPIFFE ID.
    Spiffe {
        /// The client's SPIFFE ID.
        id: SpiffeId,
        /// The client's address.
        addr: Option<SocketAddr>,
        /// Its certificate (DER): what a path token of this peer is verified against.
        cert: std::sync::Arc<Vec<u8>>,
    },
    /// TLS without a client certificate (e.g. a node calling Join).
    Anonymous {
        /// The client's address.
        addr: Option<SocketAddr>,
    },
    /// A unix socket; the kernel's SO_PEERCRED.
    Unix {
        /// The client process's user.
        uid: u32,
        /// The client process's group.
        gid: u32,
        /// The client process.
        pid: Option<i32>,
    },
    /// Plaintext TCP (`--insecure`): nothing is known.
    Insecure {
        /// The client's address.
        addr: Option<SocketAddr>,
    },
}

impl Peer {
    /// The peer of the connection a request came on (None when the server was not started by
    /// [`Listener::serve_secure`]).
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&Peer> {
        req.extensions().get::<Peer>()
    }

    /// Like [`Peer::of`], from the extensions of an `http::Request` (for tower layers).
    pub fn from_extensions(e: &http::Extensions) -> Option<&Peer> {
        e.get::<Peer>()
    }
}

/// How a server protects its TCP listeners (unix sockets never use TLS).
#[derive(Clone, Debug)]
pub enum ServerSecurity {
    /// Plaintext (`--insecure`).
    Insecure,
    /// Mutual TLS with these credentials.
    Mtls(Credentials),
}

/// How a client protects its TCP connections (unix sockets never use TLS).
#[derive(Clone, Debug)]
pub enum ClientSecurity {
    /// Plaintext (`--insecure`).
    Insecure,
    /// Mutual TLS: present these credentials, accept a server as `expect` says.
    Mtls {
        /// The client's SVID and trust bundle.
        credentials: Credentials,
        /// Whom to accept as the server.
        expect: Expect,
    },
    /// No SVID yet: trust the registry by the CA fingerprint of a join token.
    Joining {
        /// `sha256:<hex>` of the domain CA certificate.
        ca_fingerprint: String,
    },
}

/// Unix socket options: file mode and group owner.
#[derive(Clone, Copy, Debug)]
pub struct UnixOptions {
    /// The socket file's mode (default 0o660: owner and group may connect).
    pub mode: u32,
    /// The socket file's group (None = leave as created).
    pub group: Option<u32>,
}

impl Default for UnixOptions {
    fn default() -> Self {
        UnixOptions {
            mode: 0o660,
            group: None,
        }
    }
}

/// An accepted connection and who is at its other end.
struct PeerStream<S> {
    inner: S,
    peer: Peer,
}

impl<S> Connected for PeerStream<S> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An accept error that is about one connection (go on at once) or about the process, like running
/// out of file descriptors (pause, or the loop would spin).
async fn after_accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock) {
        tracing::debug!(error = %e, "accept failed");
    } else {
        tracing::warn!(error = %e, "accept failed; pausing accepts for 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The TLS handshake of one accepted connection, and the peer it proved.
async fn handshake(acceptor: TlsAcceptor, tcp: TcpStream, addr: SocketAddr) -> Option<PeerStream<TlsStream>> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%addr, reason = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%addr, reason = "no handshake within 10 s", "TLS handshake failed");
            return None;
        }
    };
    let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => Peer::Anonymous { addr: Some(addr) },
        Some(leaf) => match nsm_identity::peer_id(leaf) {
            Ok(id) => Peer::Spiffe {
                id,
                addr: Some(addr),
                cert: std::sync::Arc::new(leaf.to_vec()),
            },
            Err(e) => {
                // The verifier already refuses such certificates; never let one through as anonymous.
                tracing::debug!(%addr, reason = %e, "TLS client certificate without a SPIFFE ID");
                return None;
            }
        },
    };
    Some(PeerStream { inner: tls, peer })
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// TLS handshakes one listener runs at once; connections beyond it are closed unanswered (a flood
/// of clients that never finish must not take every descriptor).
pub const MAX_HANDSHAKES: usize = 512;

/// Accepted TLS connections: each handshake runs in its own task, so a slow or bad client never
/// stalls the others; dropping the stream (server stopped) aborts handshakes still under way.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl futures::Stream<Item = io::Result<PeerStream<TlsStream>>> + Send {
    futures::stream::unfold(
        (listener, acceptor, JoinSet::new()),
        |(listener, acceptor, mut handshakes)| async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, addr)) => {
                            if handshakes.len() >= MAX_HANDSHAKES {
                                // A flood of connections that never finish their handshake must
                                // not take every descriptor: newcomers wait for the next accept.
                                tracing::debug!(%addr, "too many TLS handshakes under way; connection dropped");
                                continue;
                            }
                            // Without it, Nagle holds a response's second write until the client's
                            // delayed ACK (40 ms) on every small unary call.
                            let _ = tcp.set_nodelay(true);
                            handshakes.spawn(handshake(acceptor.clone(), tcp, addr));
                        }
                        Err(e) => after_accept_error(e).await,
                    },
                    Some(done) = handshakes.join_next() => {
                        if let Ok(Some(stream)) = done {
                            return Some((Ok(stream), (listener, acceptor, handshakes)));
                        }
                    }
                }
            }
        },
    )
}

/// Accepted plaintext TCP connections.
fn tcp_incoming(listener: TcpListener) -> impl futures::Stream<Item = io::Result<PeerStream<TcpStream>>> + Send {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    let peer = Peer::Insecure { addr: Some(addr) };
                    return Some((Ok(PeerStream { inner: tcp, peer }), listener));
                }
                Err(e) => after_accept_error(e).await,
            }
        }
    })
}

fn server_builder() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
}

impl Listener {
    /// Binds `url`; a unix socket gets `unix`'s mode and group right after binding.
    pub async fn bind_with(url: &Url, unix: UnixOptions) -> Result<Listener, TransportError> {
        let listener = Listener::bind_plain(url).await?;
        if let Url::Unix(path) = url {
            let bind_err = |source| TransportError::Bind {
                url: url.to_string(),
                source,
            };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(unix.mode)).map_err(bind_err)?;
            if let Some(gid) = unix.group {
                std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_err)?;
            }
        }
        Ok(listener)
    }

    /// Serves `routes` until `shutdown` resolves. TCP with [`ServerSecurity::Mtls`]: mutual TLS,
    /// [`Peer::Spiffe`] or [`Peer::Anonymous`]; TCP with [`ServerSecurity::Insecure`]:
    /// [`Peer::Insecure`]; unix sockets: [`Peer::Unix`] from the kernel, never TLS.
    pub async fn serve_secure(
        self,
        routes: Routes,
        security: ServerSecurity,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), TransportError> {
        let url = self.url().clone();
        let router = server_builder().add_routes(routes);
        let result = match (self, security) {
            (Listener::Tcp(l, _), ServerSecurity::Mtls(credentials)) => {
                let acceptor = TlsAcceptor::from(credentials.server_config());
                router
                    .serve_with_incoming_shutdown(tls_incoming(l, acceptor), shutdown)
                    .await
            }
            (Listener::Tcp(l, _), ServerSecurity::Insecure) => {
                router.serve_with_incoming_shutdown(tcp_incoming(l), shutdown).await
            }
            (Listener::Unix(l, _), _) => {
                let incoming = futures::StreamExt::map(UnixListenerStream::new(l), |conn| {
                    let conn = conn?;
                    let cred = conn.peer_cred()?;
                    let peer = Peer::Unix {
                        uid: cred.uid(),
                        gid: cred.gid(),
                        pid: cred.pid(),
                    };
                    Ok::<_, io::Error>(PeerStream { inner: conn, peer })
                });
                let r = router.serve_with_incoming_shutdown(incoming, shutdown).await;
                if let Url::Unix(path) = &url {
                    let _ = std::fs::remove_file(path);
                }
                r
            }
        };
        result.map_err(|source| TransportError::Serve {
            url: url.to_string(),
            source,
        })
    }
}

/// The client's TLS configuration for `security`, or None for plaintext.
fn client_config(security: &ClientSecurity) -> Result<Option<Arc<ClientConfig>>, TransportError> {
    Ok(match security {
        ClientSecurity::Insecure => None,
        ClientSecurity::Mtls { credentials, expect } => Some(credentials.client_config(expect.clone())),
        ClientSecurity::Joining { ca_fingerprint } => {
            Some(Credentials::joining_client_config(ca_fingerprint).map_err(|e| TransportError::Tls(e.to_string()))?)
        }
    })
}

/// Dials TCP and does the TLS handshake itself (tonic is given a plain `http://` endpoint, so it
/// adds no TLS of its own): the server is checked by SPIFFE ID, not by name, so the name sent is
/// the address dialed.
type ClientTlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

fn tls_connector(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> impl tower::Service<http::Uri, Response = ClientTlsIo, Error = io::Error, Future: Send> + Send + Clone + 'static {
    let connector = TlsConnector::from(config);
    tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::IpAddress(addr.ip().into());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => Ok(hyper_util::rt::TokioIo::new(tls)),
                Ok(Err(e)) => Err(io::Error::new(
                    e.kind(),
                    format!("TLS handshake failed: {}", tls_reason(&e)),
                )),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake failed: no answer within {HANDSHAKE_TIMEOUT:?}"),
                )),
            }
        }
    })
}

/// The reason of a failed handshake in words: rustls shows a verifier's own reason (the SPIFFE ID
/// checks) only in its Debug form.
fn tls_reason(e: &io::Error) -> String {
    use tokio_rustls::rustls::{CertificateError, Error, OtherError};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(OtherError(reason)))) => {
            format!("invalid peer certificate: {reason}")
        }
        _ => e.to_string(),
    }
}

/// A tonic endpoint for `url`: `http://ADDR` for TCP (tonic adds no TLS of its own: with
/// security, [`tls_connector`] does the handshake), `unix://PATH` for a unix socket.
fn endpoint(url: &str, parsed: &Url) -> Result<Endpoint, TransportError> {
    let uri = match parsed {
        Url::Tcp(addr) => format!("http://{addr}"),
        Url::Unix(path) => format!("unix://{}", path.display()),
    };
    Endpoint::from_shared(uri)
        .map(|e| e.tcp_nodelay(true))
        .map_err(|e| TransportError::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })
}

/// Dials `url` and waits until connected (up to `timeout`), so that an unreachable server is
/// reported at once and by name. `tcp://` URLs use `security`; `unix://` URLs ignore it (the
/// server knows the caller from the kernel). Errors name the URL and give the TLS reason.
pub async fn connect_secure(
    url: &str,
    timeout: Duration,
    security: &ClientSecurity,
) -> Result<Channel, TransportError> {
    let parsed: Url = url.parse()?;
    let endpoint = endpoint(url, &parsed)?.connect_timeout(timeout);
    let connecting = async {
        match (&parsed, client_config(security)?) {
            (Url::Tcp(addr), Some(config)) => endpoint.connect_with_connector(tls_connector(*addr, config)).await,
            _ => endpoint.connect().await,
        }
        .map_err(|e| TransportError::Connect {
            url: url.to_owned(),
            reason: error_chain(&e),
        })
    };
    tokio::time::timeout(timeout, connecting).await.unwrap_or_else(|_| {
        Err(TransportError::Connect {
            url: url.to_owned(),
            reason: format!("no answer within {timeout:?}"),
        })
    })
}

/// A lazily connecting channel to `url` (reconnects by itself, each time with the credentials'
/// current SVID).
pub fn connect_lazy_secure(url: &str, security: &ClientSecurity) -> Result<Channel, TransportError> {
    let parsed: Url = url.parse()?;
    let endpoint = endpoint(url, &parsed)?;
    Ok(match (&parsed, client_config(security)?) {
        (Url::Tcp(addr), Some(config)) => endpoint.connect_with_connector_lazy(tls_connector(*addr, config)),
        _ => endpoint.connect_lazy(),
    })
}
