//! Listening and dialing for nsm's gRPC services.
//!
//! Endpoints are named by URLs as upstream names them: `tcp://HOST:PORT` and `unix:///PATH`.
//! A server binds every listener before it serves any, so a bad address fails start-up with a
//! message naming it instead of leaving a half-started daemon.
//!
//! Security (DESIGN.md §6): [`Listener::serve_secure`] and [`connect_secure`] speak mutual TLS
//! checked by SPIFFE ID ([`ServerSecurity`], [`ClientSecurity`], with credentials from
//! `nsm-identity` that rotate in place), and hand every request the [`Peer`] its connection proved.
//! Unix sockets stay local to the host, are not wrapped in TLS, and identify callers by the kernel's
//! peer credentials and the socket's file mode ([`UnixOptions`]). [`connect`] is plaintext
//! [`connect_secure`]: for unix sockets, and servers started with `--insecure`.
#![forbid(unsafe_code)]

mod secure;

pub use secure::{
    ClientSecurity, MAX_HANDSHAKES, Peer, ServerSecurity, UnixOptions, connect_lazy_secure, connect_secure,
};

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tonic::transport::Channel;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URL is not `tcp://HOST:PORT` or `unix:///PATH`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Binding the listener failed.
    #[error("cannot listen on {url}: {source}")]
    Bind {
        /// The URL.
        url: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process already serves this unix socket.
    #[error("cannot listen on {0}: another process is serving it")]
    InUse(String),
    /// Connecting failed.
    #[error("cannot reach {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// TLS material could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server stopped with an error.
    #[error("server on {url} failed: {source}")]
    Serve {
        /// The URL.
        url: String,
        /// The error.
        source: tonic::transport::Error,
    },
}

/// Where a gRPC server listens or a client dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// `tcp://HOST:PORT`; `HOST` is an IP address or `localhost`.
    Tcp(SocketAddr),
    /// `unix:///PATH`.
    Unix(PathBuf),
}

impl FromStr for Url {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| TransportError::InvalidUrl {
            url: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("unix socket paths must be absolute (unix:///path)"));
            }
            return Ok(Url::Unix(PathBuf::from(path)));
        }
        let Some(hostport) = s.strip_prefix("tcp://") else {
            return Err(bad("expected tcp://HOST:PORT or unix:///PATH"));
        };
        let hostport = hostport.trim_end_matches('/');
        let hostport = match hostport.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}"),
            None => hostport.to_owned(),
        };
        hostport
            .parse()
            .map(Url::Tcp)
            .map_err(|_| bad("expected an IP address and a port, e.g. tcp://127.0.0.1:5002"))
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Url::Tcp(addr) => write!(f, "tcp://{addr}"),
            Url::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// A bound listener, not yet serving.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener, Url),
    /// Unix socket (the file is removed when the server stops).
    Unix(UnixListener, Url),
}

impl Listener {
    /// Binds `url`. A unix socket file left over from a dead process is replaced; one that a live
    /// process still answers on is refused. A unix socket gets mode 0660 ([`UnixOptions`]'s default).
    pub async fn bind(url: &Url) -> Result<Listener, TransportError> {
        Listener::bind_with(url, UnixOptions::default()).await
    }

    /// [`Listener::bind`] without touching a unix socket's mode.
    pub(crate) async fn bind_plain(url: &Url) -> Result<Listener, TransportError> {
        let bind_err = |source| TransportError::Bind {
            url: url.to_string(),
            source,
        };
        match url {
            Url::Tcp(addr) => {
                let l = TcpListener::bind(addr).await.map_err(bind_err)?;
                let actual = Url::Tcp(l.local_addr().map_err(bind_err)?);
                Ok(Listener::Tcp(l, actual))
            }
            Url::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(bind_err)?;
                }
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(TransportError::InUse(url.to_string()));
                    }
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                let l = UnixListener::bind(path).map_err(bind_err)?;
                Ok(Listener::Unix(l, url.clone()))
            }
        }
    }

    /// The URL actually bound (with the real port when port 0 was asked for).
    pub fn url(&self) -> &Url {
        match self {
            Listener::Tcp(_, u) | Listener::Unix(_, u) => u,
        }
    }
}

/// Dials `url` in plaintext and waits until connected (up to `timeout`), so that an unreachable
/// server is reported at once and by name.
pub async fn connect(url: &str, timeout: Duration) -> Result<Channel, TransportError> {
    connect_secure(url, timeout, &ClientSecurity::Insecure).await
}

/// "outer: inner: innermost" for errors whose Display hides their cause.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            "tcp://127.0.0.1:5002".parse::<Url>().unwrap(),
            Url::Tcp("127.0.0.1:5002".parse().unwrap())
        );
        assert_eq!(
            "tcp://localhost:1".parse::<Url>().unwrap().to_string(),
            "tcp://127.0.0.1:1"
        );
        assert_eq!(
            "unix:///run/x.sock".parse::<Url>().unwrap().to_string(),
            "unix:///run/x.sock"
        );
        assert!("unix://rel.sock".parse::<Url>().is_err());
        assert!("http://x:1".parse::<Url>().is_err());
        assert!("tcp://example.com:1".parse::<Url>().is_err());
    }

    #[tokio::test]
    async fn refuses_a_live_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let url = Url::Unix(dir.path().join("s.sock"));
        let _live = Listener::bind(&url).await.unwrap();
        assert!(matches!(Listener::bind(&url).await, Err(TransportError::InUse(_))));
    }
}
