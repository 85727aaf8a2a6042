//! The registry as a node sees it: services, endpoints, nodes and vL3 prefix leases, kept from
//! the registry's watch streams (a reflector, as controllers keep one) so that deciding what a
//! client needs asks the registry nothing. Values are shared (`Arc`), so a snapshot of the view
//! for a batch of decisions costs a pointer copy per resource.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use nsm_model::{Kind, pb};

/// A namespaced name (`namespace`, `name`); cluster-scoped kinds have an empty namespace.
type Name = (String, String);

/// Services, endpoints, nodes and prefix leases by name.
#[derive(Clone, Debug, Default)]
pub struct View {
    services: BTreeMap<Name, Arc<pb::NetworkService>>,
    endpoints: BTreeMap<Name, Arc<pb::Endpoint>>,
    nodes: BTreeMap<String, Arc<pb::Node>>,
    prefixes: BTreeMap<Name, Arc<pb::Prefix>>,
}

fn name_of(meta: Option<&pb::ObjectMeta>) -> Name {
    meta.map_or_else(Default::default, |m| (m.namespace.clone(), m.name.clone()))
}

impl View {
    /// Whether the view keeps resources of `kind`.
    pub fn keeps(kind: Kind) -> bool {
        matches!(kind, Kind::NetworkService | Kind::Endpoint | Kind::Node | Kind::Prefix)
    }

    /// Takes in one resource: added or changed, or `deleted`. Kinds the view does not keep are
    /// ignored. Returns whether the view changed.
    pub fn apply(&mut self, resource: pb::Resource, deleted: bool) -> bool {
        use pb::resource::Kind as K;
        fn put<K: Ord, V: PartialEq>(m: &mut BTreeMap<K, Arc<V>>, k: K, v: V, deleted: bool) -> bool {
            if deleted {
                return m.remove(&k).is_some();
            }
            if m.get(&k).is_some_and(|old| **old == v) {
                return false;
            }
            m.insert(k, Arc::new(v));
            true
        }
        match resource.kind {
            Some(K::NetworkService(s)) => put(&mut self.services, name_of(s.metadata.as_ref()), s, deleted),
            Some(K::Endpoint(e)) => put(&mut self.endpoints, name_of(e.metadata.as_ref()), e, deleted),
            Some(K::Node(n)) => {
                let name = n.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
                put(&mut self.nodes, name, n, deleted)
            }
            Some(K::Prefix(p)) => put(&mut self.prefixes, name_of(p.metadata.as_ref()), p, deleted),
            _ => false,
        }
    }

    /// Replaces everything of `kind` by `items` (a full listing: what it lacks was deleted).
    pub fn replace(&mut self, kind: Kind, items: impl IntoIterator<Item = pb::Resource>) {
        match kind {
            Kind::NetworkService => self.services.clear(),
            Kind::Endpoint => self.endpoints.clear(),
            Kind::Node => self.nodes.clear(),
            Kind::Prefix => self.prefixes.clear(),
            Kind::Client => return,
        }
        for r in items {
            self.apply(r, false);
        }
    }

    /// The network service `namespace`/`name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&pb::NetworkService> {
        self.services
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(AsRef::as_ref)
    }

    /// Every network service.
    pub fn services(&self) -> impl Iterator<Item = &pb::NetworkService> {
        self.services.values().map(AsRef::as_ref)
    }

    /// Every endpoint, in name order.
    pub fn endpoints(&self) -> impl Iterator<Item = &pb::Endpoint> {
        self.endpoints.values().map(AsRef::as_ref)
    }

    /// The node `name`.
    pub fn node(&self, name: &str) -> Option<&pb::Node> {
        self.nodes.get(name).map(AsRef::as_ref)
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = &pb::Node> {
        self.nodes.values().map(AsRef::as_ref)
    }

    /// The node whose underlay address is `addr`, if one is registered with it.
    pub fn node_at(&self, addr: IpAddr) -> Option<&pb::Node> {
        self.nodes()
            .find(|n| n.spec.as_ref().and_then(|s| s.address.parse::<IpAddr>().ok()) == Some(addr))
    }

    /// Every vL3 prefix lease.
    pub fn prefixes(&self) -> impl Iterator<Item = &pb::Prefix> {
        self.prefixes.values().map(AsRef::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str, address: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Endpoint(pb::Endpoint {
                metadata: Some(pb::ObjectMeta {
                    namespace: "default".into(),
                    name: name.into(),
                    ..Default::default()
                }),
                spec: Some(pb::EndpointSpec {
                    address: address.into(),
                    ..Default::default()
                }),
            })),
        }
    }

    #[test]
    fn applies_changes_and_deletions_and_says_whether_anything_changed() {
        let mut v = View::default();
        assert!(v.apply(endpoint("e1", "10.0.0.1"), false));
        assert!(!v.apply(endpoint("e1", "10.0.0.1"), false), "the same resource again");
        assert!(v.apply(endpoint("e1", "10.0.0.2"), false));
        assert_eq!(v.endpoints().count(), 1);
        assert!(v.apply(endpoint("e1", ""), true));
        assert!(!v.apply(endpoint("e1", ""), true));
        assert_eq!(v.endpoints().count(), 0);
    }

    #[test]
    fn replace_drops_what_the_listing_lacks() {
        let mut v = View::default();
        v.apply(endpoint("e1", "10.0.0.1"), false);
        v.apply(endpoint("e2", "10.0.0.2"), false);
        v.replace(Kind::Endpoint, [endpoint("e2", "10.0.0.2")]);
        let names: Vec<_> = v
            .endpoints()
            .map(|e| e.metadata.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, ["e2"]);
    }
}
