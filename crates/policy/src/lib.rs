//! Zero-trust authorization over a request's path, as upstream Network Service Mesh does it.
//!
//! Every hop of a request signs a path token (an ES256 JWT, `sub` = itself, `aud` = the next hop)
//! with its X.509-SVID's key and records it in its own path segment ([`sign`]). A server checks the
//! path with Rego policies ([`PolicySet`]). regorus has no `io.jwt.*` builtins, so tokens are
//! decoded and verified here, in Rust ([`path_input`]), and the policies see the claims as plain
//! data: they stay pure logic, and a refusal names the policy that made it.
#![forbid(unsafe_code)]

mod error;
mod input;
mod policy;
mod token;

pub use error::PolicyError;
pub use input::{PathInput, SegmentInput, path_input};
pub use policy::{PolicySet, Refusal};
pub use token::{Claims, DEFAULT_TOKEN_LIFETIME, decode, sign, verify};
