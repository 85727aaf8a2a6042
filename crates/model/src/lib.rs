//! nsm's resource model, independent of any transport or store.
//!
//! - [`validate`]: the rules for names, labels, addresses and pools, with errors that name the
//!   offending field.
//! - [`kind`]: the resource kinds and their CLI spellings.
//! - [`upstream`]: how namespaced nsm resources appear as upstream (flat-named) registry objects,
//!   and upstream's find-by-example matching.
//! - [`document`]: the YAML/JSON form used by `nsmctl apply -f` and `-o yaml|json`, including
//!   upstream's `networkservicemesh.io/v1` CRD documents.
//! - [`pairs`]: choosing a vWire's point-to-point address pair from a pool.
#![forbid(unsafe_code)]

pub mod document;
pub mod kind;
pub mod pairs;
pub mod upstream;
pub mod validate;

pub use kind::Kind;
pub use validate::ValidationError;

/// The namespace a namespaced resource lands in when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Convenience re-exports of the nsm.v1 protobuf types this crate works on.
pub mod pb {
    pub use nsm_api::nsm::v1::*;
    pub use nsm_api::registry;
}

/// Current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

/// A protobuf timestamp as a `SystemTime` (None for out-of-range values).
pub fn to_system_time(ts: &prost_types::Timestamp) -> Option<std::time::SystemTime> {
    std::time::SystemTime::try_from(*ts).ok()
}
