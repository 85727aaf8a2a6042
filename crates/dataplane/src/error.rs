//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// What went wrong, naming the kernel object and the operation, so a log line alone says what to
/// look at (`create veth nsm-1/nsm-e1 in /run/netns/x: File exists (os error 17)`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataplaneError {
    /// A namespace-level operation (open, create, delete, enter, sysctl) failed.
    #[error("{op} {path}: {source}", path = .path.display())]
    Namespace {
        /// The operation, e.g. `create netns`.
        op: &'static str,
        /// The namespace file (or sysctl file) concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a network namespace (a plain file, another namespace type…).
    #[error("{path} is not a network namespace ({found})", path = .path.display())]
    NotANetns {
        /// The path that was opened.
        path: PathBuf,
        /// What it turned out to be.
        found: String,
    },
    /// A netlink request failed.
    #[error("{op} {object} in {ns}: {source}", ns = .ns.display())]
    Netlink {
        /// The operation, e.g. `create veth`.
        op: &'static str,
        /// The object, e.g. `nsm-1/nsm-e1` or `192.0.2.1/32 on nsm-1`.
        object: String,
        /// The namespace whose netlink socket sent the request.
        ns: PathBuf,
        /// The error the kernel (or the netlink library) returned.
        #[source]
        source: io::Error,
    },
    /// The link an operation needs does not exist in that namespace.
    #[error("{op} {name} in {ns}: no such link", ns = .ns.display())]
    LinkNotFound {
        /// The operation that needed the link.
        op: &'static str,
        /// The link name.
        name: String,
        /// The namespace that was searched.
        ns: PathBuf,
    },
    /// An `nft` run failed (or `nft` is not installed).
    #[error("{op} in {ns}: {detail}", ns = .ns.display())]
    Nft {
        /// The operation.
        op: &'static str,
        /// The namespace it ran in.
        ns: PathBuf,
        /// The object to change did not exist.
        not_found: bool,
        /// `nft`'s own message.
        detail: String,
    },
    /// A `bpf(2)` call failed; a program the verifier rejected carries the verifier's log.
    #[error("{op}: {source}{}", if .log.is_empty() { String::new() } else { format!("; verifier: {}", .log) })]
    Bpf {
        /// The operation, e.g. `load bpf program`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
        /// The verifier's log (empty unless a program was rejected).
        log: String,
    },
    /// An argument was rejected before anything was sent to the kernel.
    #[error("{op}: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// Why the argument is invalid.
        reason: String,
    },
}

impl DataplaneError {
    /// The OS error number behind this error, if there is one (e.g. `libc::EEXIST` = 17), so callers
    /// can branch on kernel semantics without parsing text.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Namespace { source, .. } | Self::Netlink { source, .. } | Self::Bpf { source, .. } => {
                source.raw_os_error()
            }
            Self::LinkNotFound { .. } => Some(nix::libc::ENODEV),
            Self::NotANetns { .. } | Self::InvalidArgument { .. } | Self::Nft { .. } => None,
        }
    }

    /// True when the object the operation named does not exist (a missing namespace or link).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::LinkNotFound { .. } => true,
            Self::Namespace { source, .. } | Self::Netlink { source, .. } => {
                source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(nix::libc::ENODEV)
            }
            Self::Nft { not_found, .. } => *not_found,
            _ => false,
        }
    }

    /// True when a port to bind is taken (`EADDRINUSE`).
    pub fn is_addr_in_use(&self) -> bool {
        self.raw_os_error() == Some(nix::libc::EADDRINUSE)
    }

    /// True when the object to create already exists (`EEXIST`).
    pub fn is_already_exists(&self) -> bool {
        self.raw_os_error() == Some(nix::libc::EEXIST)
    }
}

/// Turns an rtnetlink error into an `io::Error` carrying the kernel's errno when there is one.
pub(crate) fn netlink_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) if msg.code.is_some() => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// The errno of an rtnetlink error, if the kernel sent one.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}
