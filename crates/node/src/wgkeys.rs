//! WireGuard keys bound to identities (docs/SECURITY.md): the key a node offers or answers with in
//! a WIREGUARD mechanism must be the one it publishes in its Node — which only that node may
//! write, the registry's rules see to it. A rotation publishes the new key as it starts using it;
//! the other side's view may lag the mechanism by the registry's round trip, so a key that is not
//! (yet) the published one is waited for, briefly, before it is refused.

use std::time::Duration;

use crate::cache::Cache;
use crate::{NodeError, Result};

/// How long a key that differs from the published one is given to show up in the view.
const PUBLISH_WAIT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(25);

fn published(cache: &Cache, node: &str) -> String {
    cache
        .snapshot()
        .node(node)
        .and_then(|n| n.spec.as_ref())
        .map(|s| s.wireguard_public_key.clone())
        .unwrap_or_default()
}

/// Ok once node `node` publishes `key`; `PermissionDenied` naming both keys if it does not within
/// [`PUBLISH_WAIT`].
pub(crate) async fn check(cache: &Cache, node: &str, key: &str, field: &str) -> Result<()> {
    check_within(cache, node, key, field, PUBLISH_WAIT).await
}

async fn check_within(cache: &Cache, node: &str, key: &str, field: &str, wait: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let current = published(cache, node);
        if current == key {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let shown = if current.is_empty() { "none".to_owned() } else { current };
            return Err(NodeError::PermissionDenied(format!(
                "{field}: node {node} uses WireGuard key {key}, but its Node publishes {shown} (rule: a node's WireGuard key is the one it publishes)"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_model::pb;

    fn node(name: &str, key: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Node(pb::Node {
                metadata: Some(pb::ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                spec: Some(pb::NodeSpec {
                    wireguard_public_key: key.into(),
                    ..Default::default()
                }),
            })),
        }
    }

    #[tokio::test]
    async fn keys_must_be_the_published_ones() {
        let check = |c: &Cache, n: &'static str, k: &'static str, f: &'static str| {
            let c = c.clone();
            async move { check_within(&c, n, k, f, Duration::from_millis(300)).await }
        };
        let cache = Cache::default();
        cache.apply(node("x", "KEY-1"), false);
        check(&cache, "x", "KEY-1", "f").await.unwrap();
        // Another key is refused once the wait is over, naming both keys and the rule.
        let e = check(&cache, "x", "EVIL", "mechanism.parameters.src_public_key")
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, NodeError::PermissionDenied(_)), "{e:?}");
        assert!(
            msg.contains("EVIL") && msg.contains("KEY-1") && msg.contains("src_public_key"),
            "{msg}"
        );
        // A node that publishes none, or is unknown, has no key to use.
        assert!(check(&cache, "nobody", "KEY-1", "f").await.is_err());
        // A rotation: the new key is accepted as soon as the view has it.
        let c = cache.clone();
        let waiting = tokio::spawn(async move { check_within(&c, "x", "KEY-2", "f", PUBLISH_WAIT).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        cache.apply(node("x", "KEY-2"), false);
        waiting.await.unwrap().unwrap();
    }
}
