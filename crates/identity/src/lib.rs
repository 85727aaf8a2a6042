//! SPIFFE identities for nsm (DESIGN.md §6): every node, admin, user and workload of a domain holds
//! a short-lived X.509 SVID issued by the domain's CA, and every TCP connection is mutual TLS that
//! checks SPIFFE IDs rather than host names.
//!
//! - [`SpiffeId`] and [`Role`]: `spiffe://<domain>/node/<name>`, `/admin/<name>`, `/user/<name>`,
//!   `/ns/<namespace>/client/<name>`, `/registry`.
//! - [`Ca`]: the domain CA — created in the registry's data directory, or the operator's own — and
//!   what it issues from a CSR ([`Ca::issue`]); the private key of an SVID never leaves its holder.
//! - [`Svid`] and [`KeyAndCsr`]: one holder's certificate chain and key, stored 0600.
//! - [`Credentials`]: an SVID and trust bundle that rotate in place; the rustls configurations built
//!   from them pick the current certificate at each handshake, so rotation drops no connection.
//! - [`ClientConfig`]: the file that lets `nsmctl` act as someone (admin, user).
//! - [`JoinToken`]: what `nsmctl node create` prints and `nsm node --join` redeems.
#![forbid(unsafe_code)]

mod ca;
mod config;
mod error;
mod join;
mod spiffe;
mod svid;
mod tls;

pub use ca::{Ca, Issued};
pub use config::ClientConfig;
pub use error::IdentityError;
pub use join::JoinToken;
pub use spiffe::{Role, SpiffeId};
pub use svid::{KeyAndCsr, Svid, peer_id};
pub use tls::{Credentials, Expect};
