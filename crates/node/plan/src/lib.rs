//! The node's decisions, sans-IO. For each client the daemon gathers what the decision depends
//! on — the client's spec and last status, the registry as the node sees it ([`view::View`]),
//! what it built and what the kernel shows of that, the time — and [`client::plan`] (or
//! [`vl3::plan_member`] for vL3 members) says what to do: keep, refresh, build, adopt, rebuild,
//! heal to another endpoint, tear down, or not ready with a reason. The daemon carries the
//! decision out. No IO and no clock reads here, so every branch has a table-driven unit test.

#![forbid(unsafe_code)]

pub mod client;
pub mod domain;
pub mod select;
pub mod view;
pub mod vl3;

pub use domain::{ClientKey, Encryption, MechanismKind, NotReady, Pair, Phase};
pub use view::View;
