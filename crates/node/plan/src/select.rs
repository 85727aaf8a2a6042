//! Endpoint selection, sans-IO: upstream's `matches` semantics over client labels and endpoint
//! labels (sdk `matchutils.MatchEndpoint`, see docs/REGISTRY.md), then round robin.

use std::collections::HashMap;

use nsm_model::pb::registry;

/// A candidate endpoint: its upstream name and its labels for the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Upstream name.
    pub name: String,
    /// Destination labels for the requested service.
    pub labels: HashMap<String, String>,
}

/// Renders upstream's `{{.key}}` templates in a selector value from the client's labels.
fn render(value: &str, client: &HashMap<String, String>) -> String {
    let mut out = value.to_owned();
    for (k, v) in client {
        out = out.replace(&format!("{{{{.{k}}}}}"), v);
    }
    out
}

fn subset(
    selector: &HashMap<String, String>,
    labels: &HashMap<String, String>,
    client: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| {
        labels
            .get(k)
            .is_some_and(|have| *have == *v || *have == render(v, client))
    })
}

/// The endpoints the service's matches allow for a client with `client_labels`, in input order.
/// No matches: every candidate. A match applies when its source selector is a subset of the
/// client's labels; its candidates are the endpoints matching any of its routes; an empty result
/// falls through to the next match only if the match says `fallthrough`.
pub fn eligible(
    matches: &[registry::Match],
    client_labels: &HashMap<String, String>,
    candidates: &[Candidate],
) -> Vec<Candidate> {
    if matches.is_empty() {
        return candidates.to_vec();
    }
    for m in matches {
        if !subset(&m.source_selector, client_labels, client_labels) {
            continue;
        }
        if m.routes.is_empty() {
            return candidates.to_vec();
        }
        let found: Vec<Candidate> = candidates
            .iter()
            .filter(|c| {
                m.routes
                    .iter()
                    .any(|r| subset(&r.destination_selector, &c.labels, client_labels))
            })
            .cloned()
            .collect();
        if found.is_empty() && m.fallthrough {
            continue;
        }
        return found;
    }
    Vec::new()
}

/// Picks the `counter`-th eligible candidate (round robin across calls).
pub fn round_robin(eligible: &[Candidate], counter: usize) -> Option<&Candidate> {
    if eligible.is_empty() {
        None
    } else {
        eligible.get(counter % eligible.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn cand(name: &str, l: &[(&str, &str)]) -> Candidate {
        Candidate {
            name: name.into(),
            labels: labels(l),
        }
    }

    fn rule(src: &[(&str, &str)], dst: &[(&str, &str)], fallthrough: bool) -> registry::Match {
        registry::Match {
            source_selector: labels(src),
            routes: vec![registry::Destination {
                destination_selector: labels(dst),
                weight: 0,
            }],
            fallthrough,
            metadata: None,
        }
    }

    #[test]
    fn matches_in_order_with_fallthrough_and_templates() {
        let c = [
            cand("v1", &[("version", "v1")]),
            cand("v2", &[("version", "v2")]),
            cand("n1", &[("node", "a")]),
        ];
        let web = labels(&[("app", "web"), ("nodeName", "a")]);
        let other = labels(&[("app", "db")]);
        let rules = vec![
            rule(&[("app", "web")], &[("version", "v3")], true),
            rule(&[], &[("version", "v1")], false),
        ];
        assert_eq!(
            eligible(&rules, &web, &c),
            vec![c[0].clone()],
            "v3 finds nothing: fall through to v1"
        );
        let rules = vec![
            rule(&[("app", "web")], &[("version", "v3")], false),
            rule(&[], &[("version", "v1")], false),
        ];
        assert!(eligible(&rules, &web, &c).is_empty(), "no fallthrough: nothing");
        assert_eq!(
            eligible(&rules, &other, &c),
            vec![c[0].clone()],
            "source selector does not apply"
        );
        let rules = vec![rule(&[], &[("node", "{{.nodeName}}")], false)];
        assert_eq!(
            eligible(&rules, &web, &c),
            vec![c[2].clone()],
            "templates render from client labels"
        );
        assert_eq!(eligible(&[], &web, &c).len(), 3);
    }

    #[test]
    fn round_robin_cycles() {
        let c = [cand("a", &[]), cand("b", &[])];
        assert_eq!(round_robin(&c, 0).unwrap().name, "a");
        assert_eq!(round_robin(&c, 1).unwrap().name, "b");
        assert_eq!(round_robin(&c, 2).unwrap().name, "a");
        assert!(round_robin(&[], 0).is_none());
    }
}
