//! The gRPC API of nsm.
//!
//! The upstream packages (`networkservice`, `connection`, `connectioncontext`, `registry`, `ipam`)
//! are written from upstream's published field tables (api v1.15) so that upstream clients and
//! servers interoperate with ours on the wire; `nsm.v1` holds what upstream lacks.
#![forbid(unsafe_code)]
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// Upstream package `connectioncontext`.
pub mod connectioncontext {
    tonic::include_proto!("connectioncontext");
}

/// Upstream package `connection`.
pub mod connection {
    tonic::include_proto!("connection");
}

/// Upstream package `networkservice`.
pub mod networkservice {
    tonic::include_proto!("networkservice");
}

/// Upstream package `registry`.
pub mod registry {
    tonic::include_proto!("registry");
}

/// Upstream package `ipam` (vL3 prefix server).
pub mod ipam {
    tonic::include_proto!("ipam");
}

/// nsm's own API.
pub mod nsm {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("nsm.v1");
    }
}

/// gRPC service names this crate defines, as health checks and reflection name them.
pub mod service_names {
    /// `registry.NetworkServiceRegistry`.
    pub const NS_REGISTRY: &str = "registry.NetworkServiceRegistry";
    /// `registry.NetworkServiceEndpointRegistry`.
    pub const NSE_REGISTRY: &str = "registry.NetworkServiceEndpointRegistry";
    /// `nsm.v1.ResourceService`.
    pub const RESOURCES: &str = "nsm.v1.ResourceService";
    /// `nsm.v1.IdentityService`.
    pub const IDENTITY: &str = "nsm.v1.IdentityService";
    /// `nsm.v1.NodeService`.
    pub const NODE: &str = "nsm.v1.NodeService";
    /// `networkservice.NetworkService`.
    pub const NETWORK_SERVICE: &str = "networkservice.NetworkService";
    /// Upstream vL3 prefix server.
    pub const IPAM: &str = "ipam.IPAM";
    /// gRPC metadata keys with which a `ManagePrefixes` stream says which vL3 it leases from,
    /// which node's router holds the prefixes (they then outlive the stream) and for which
    /// service's members. Upstream clients send none: one vL3 must then exist, and their prefixes
    /// go back to the pool when the stream ends, as upstream's prefix server does.
    pub const IPAM_VL3_HEADER: &str = "nsm-network-service";
    /// See [`IPAM_VL3_HEADER`].
    pub const IPAM_NODE_HEADER: &str = "nsm-node";
    /// See [`IPAM_VL3_HEADER`].
    pub const IPAM_MEMBER_HEADER: &str = "nsm-member-service";
}
