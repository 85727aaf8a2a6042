//! Errors of the WireGuard data plane.

use std::io;

/// What can go wrong setting up or running a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// A key is not 32 bytes of standard base64 (what `wg genkey`/`wg pubkey` print).
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// The configuration is inconsistent (empty name, zero MTU, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Creating or configuring the TUN device failed.
    #[error("TUN device {name}: {op}: {source}")]
    Tun {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Creating or binding the UDP socket failed.
    #[error("UDP socket {addr}: {op}: {source}")]
    Udp {
        addr: std::net::SocketAddr,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Entering a network namespace failed.
    #[error("network namespace: {0}")]
    Netns(#[from] nsm_dataplane::DataplaneError),
    /// Starting a data-plane thread failed.
    #[error("spawn data-plane thread: {0}")]
    Thread(#[source] io::Error),
}
