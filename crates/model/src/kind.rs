//! Resource kinds and how users spell them.

use std::fmt;
use std::str::FromStr;

use crate::pb;
use crate::validate::ValidationError;

/// A resource kind of the nsm.v1 API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A network service (upstream `NetworkService`).
    NetworkService,
    /// An endpoint providing network services (upstream `NetworkServiceEndpoint`).
    Endpoint,
    /// A host running (or reachable by) an nsm-node daemon. Cluster-scoped.
    Node,
    /// A declarative vWire: a workload asking for a network service.
    Client,
    /// A prefix of a vL3 pool leased to a node's router (written by the registry's prefix server).
    Prefix,
}

impl Kind {
    /// Every kind, in display order.
    pub const ALL: [Kind; 5] = [
        Kind::NetworkService,
        Kind::Endpoint,
        Kind::Node,
        Kind::Client,
        Kind::Prefix,
    ];

    /// The document `kind:` of this resource.
    pub fn name(self) -> &'static str {
        match self {
            Kind::NetworkService => "NetworkService",
            Kind::Endpoint => "Endpoint",
            Kind::Node => "Node",
            Kind::Client => "Client",
            Kind::Prefix => "Prefix",
        }
    }

    /// Lower-case name used in messages ("networkservice \"default/x\" not found").
    pub fn noun(self) -> &'static str {
        match self {
            Kind::NetworkService => "networkservice",
            Kind::Endpoint => "endpoint",
            Kind::Node => "node",
            Kind::Client => "client",
            Kind::Prefix => "prefix",
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// The store key prefix of this kind ("/nsm/v1/endpoints/").
    pub fn key_prefix(self) -> &'static str {
        match self {
            Kind::NetworkService => "/nsm/v1/networkservices/",
            Kind::Endpoint => "/nsm/v1/endpoints/",
            Kind::Node => "/nsm/v1/nodes/",
            Kind::Client => "/nsm/v1/clients/",
            Kind::Prefix => "/nsm/v1/prefixes/",
        }
    }

    /// The store key of one resource.
    pub fn key(self, namespace: &str, name: &str) -> String {
        if self.namespaced() {
            format!("{}{namespace}/{name}", self.key_prefix())
        } else {
            format!("{}{name}", self.key_prefix())
        }
    }

    /// The protobuf enum value.
    pub fn to_pb(self) -> pb::Kind {
        match self {
            Kind::NetworkService => pb::Kind::NetworkService,
            Kind::Endpoint => pb::Kind::Endpoint,
            Kind::Node => pb::Kind::Node,
            Kind::Client => pb::Kind::Client,
            Kind::Prefix => pb::Kind::Prefix,
        }
    }

    /// From the protobuf enum value (as carried on the wire).
    pub fn from_pb(value: i32) -> Result<Kind, ValidationError> {
        match pb::Kind::try_from(value) {
            Ok(pb::Kind::NetworkService) => Ok(Kind::NetworkService),
            Ok(pb::Kind::Endpoint) => Ok(Kind::Endpoint),
            Ok(pb::Kind::Node) => Ok(Kind::Node),
            Ok(pb::Kind::Client) => Ok(Kind::Client),
            Ok(pb::Kind::Prefix) => Ok(Kind::Prefix),
            _ => Err(ValidationError::new(
                "kind",
                format!("unknown or unspecified kind {value}"),
            )),
        }
    }

    /// The kind of a resource.
    pub fn of(resource: &pb::Resource) -> Option<Kind> {
        match resource.kind.as_ref()? {
            pb::resource::Kind::NetworkService(_) => Some(Kind::NetworkService),
            pb::resource::Kind::Endpoint(_) => Some(Kind::Endpoint),
            pb::resource::Kind::Node(_) => Some(Kind::Node),
            pb::resource::Kind::Client(_) => Some(Kind::Client),
            pb::resource::Kind::Prefix(_) => Some(Kind::Prefix),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noun())
    }
}

impl FromStr for Kind {
    type Err = ValidationError;

    /// Accepts the spellings kubectl users expect: singular, plural, short and document names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ns" | "networkservice" | "networkservices" | "netsvc" | "netsvcs" | "service" | "services" => {
                Ok(Kind::NetworkService)
            }
            "endpoint" | "endpoints" | "ep" | "nse" | "nses" | "networkserviceendpoint" | "networkserviceendpoints" => {
                Ok(Kind::Endpoint)
            }
            "node" | "nodes" | "no" => Ok(Kind::Node),
            "client" | "clients" | "vwire" | "vwires" => Ok(Kind::Client),
            "prefix" | "prefixes" => Ok(Kind::Prefix),
            other => Err(ValidationError::new(
                "kind",
                format!("unknown kind {other:?} (expected networkservice|ns, endpoint|nse, node, client, prefix)"),
            )),
        }
    }
}

/// Metadata accessors over the oneof wrapper.
pub fn meta(resource: &pb::Resource) -> Option<&pb::ObjectMeta> {
    match resource.kind.as_ref()? {
        pb::resource::Kind::NetworkService(r) => r.metadata.as_ref(),
        pb::resource::Kind::Endpoint(r) => r.metadata.as_ref(),
        pb::resource::Kind::Node(r) => r.metadata.as_ref(),
        pb::resource::Kind::Client(r) => r.metadata.as_ref(),
        pb::resource::Kind::Prefix(r) => r.metadata.as_ref(),
    }
}

/// Mutable metadata of a resource, created empty if missing.
pub fn meta_mut(resource: &mut pb::Resource) -> Option<&mut pb::ObjectMeta> {
    Some(match resource.kind.as_mut()? {
        pb::resource::Kind::NetworkService(r) => r.metadata.get_or_insert_with(Default::default),
        pb::resource::Kind::Endpoint(r) => r.metadata.get_or_insert_with(Default::default),
        pb::resource::Kind::Node(r) => r.metadata.get_or_insert_with(Default::default),
        pb::resource::Kind::Client(r) => r.metadata.get_or_insert_with(Default::default),
        pb::resource::Kind::Prefix(r) => r.metadata.get_or_insert_with(Default::default),
    })
}
