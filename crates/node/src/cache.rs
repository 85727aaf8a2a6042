//! The node's copy of the registry (services, endpoints, nodes, vL3 prefixes): kept from the
//! watch streams, repaired from full listings at every resync, read as an immutable snapshot by
//! each decision. Deciding what a client needs therefore asks the registry nothing.

use std::sync::Arc;

use nsm_model::{Kind, pb};
use nsm_node_plan::View;

/// Shared, copy-on-write: a snapshot taken by a decision stays as it was while events change the
/// view.
#[derive(Clone, Default)]
pub(crate) struct Cache(Arc<parking_lot::RwLock<Arc<View>>>);

impl Cache {
    /// The view as it is now.
    pub(crate) fn snapshot(&self) -> Arc<View> {
        self.0.read().clone()
    }

    /// Takes in a watch event; whether the view changed.
    pub(crate) fn apply(&self, resource: pb::Resource, deleted: bool) -> bool {
        Arc::make_mut(&mut self.0.write()).apply(resource, deleted)
    }

    /// Replaces everything of `kind` by a full listing.
    pub(crate) fn replace(&self, kind: Kind, items: Vec<pb::Resource>) {
        Arc::make_mut(&mut self.0.write()).replace(kind, items);
    }

    /// The spec of endpoint `namespace`/`name`, if the view has it.
    pub(crate) fn endpoint(&self, namespace: &str, name: &str) -> Option<pb::EndpointSpec> {
        self.0
            .read()
            .endpoints()
            .find(|e| {
                e.metadata
                    .as_ref()
                    .is_some_and(|m| m.namespace == namespace && m.name == name)
            })
            .and_then(|e| e.spec.clone())
    }
}
