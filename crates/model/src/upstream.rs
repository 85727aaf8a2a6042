//! How nsm resources appear through upstream's registry API, and upstream's find-by-example.
//!
//! Upstream names are flat; ours are namespaced. A resource in namespace `default` keeps its bare
//! name upstream; one in any other namespace appears as `name.namespace` (the way Kubernetes DNS
//! qualifies a service). Resource names contain no dots, so the mapping is unambiguous both ways.
//! An interdomain suffix `@domain` comes after all of that (`name.namespace@domain`).
//!
//! Service references inside an endpoint are stored relative to the endpoint's namespace, so the
//! same rule qualifies them (`orders` in namespace `shop` is `orders.shop` upstream).

use std::collections::HashMap;

use crate::DEFAULT_NAMESPACE;
use crate::pb::{self, registry};
use crate::validate::{self, ValidationError};

/// Splits `name[.namespace][@domain]` into (namespace, name, domain).
pub fn parse_name(field: &str, s: &str) -> Result<(String, String, Option<String>), ValidationError> {
    let (target, domain) = match s.split_once('@') {
        Some((t, d)) if !d.is_empty() => (t, Some(d.to_owned())),
        Some(_) => {
            return Err(ValidationError::new(
                field,
                format!("{s:?} has an empty domain after '@'"),
            ));
        }
        None => (s, None),
    };
    let (name, namespace) = target.split_once('.').unwrap_or((target, DEFAULT_NAMESPACE));
    validate::name(field, name)?;
    validate::namespace(field, namespace)?;
    Ok((namespace.to_owned(), name.to_owned(), domain))
}

/// The upstream name of a resource.
pub fn name_of(namespace: &str, name: &str) -> String {
    if namespace.is_empty() || namespace == DEFAULT_NAMESPACE {
        name.to_owned()
    } else {
        format!("{name}.{namespace}")
    }
}

/// A service reference held by a resource in `namespace`, in upstream form.
pub fn qualify(reference: &str, namespace: &str) -> String {
    match reference.split_once('.') {
        Some((name, ns)) => name_of(ns, name),
        None => name_of(namespace, reference),
    }
}

/// An upstream service name, relative to `namespace` (bare when it lives there).
pub fn relative(field: &str, upstream: &str, namespace: &str) -> Result<String, ValidationError> {
    let (ns, name, _) = parse_name(field, upstream)?;
    Ok(if ns == namespace { name } else { format!("{name}.{ns}") })
}

fn meta(m: &Option<pb::ObjectMeta>) -> (&str, &str) {
    m.as_ref().map_or(("", ""), |m| (m.namespace.as_str(), m.name.as_str()))
}

/// A network service as upstream's `registry.NetworkService`.
pub fn ns_to_upstream(ns: &pb::NetworkService) -> registry::NetworkService {
    let (namespace, name) = meta(&ns.metadata);
    let spec = ns.spec.clone().unwrap_or_default();
    registry::NetworkService {
        name: name_of(namespace, name),
        payload: spec.payload,
        matches: spec.matches,
        path_ids: spec.path_ids,
    }
}

/// Builds the resource an upstream Register stores, keeping what upstream cannot express (type,
/// pool, labels) from the existing resource.
pub fn ns_from_upstream(
    up: &registry::NetworkService,
    existing: Option<&pb::NetworkService>,
) -> Result<pb::NetworkService, ValidationError> {
    let (namespace, name, _) = parse_name("name", &up.name)?;
    let mut out = existing.cloned().unwrap_or_default();
    let m = out.metadata.get_or_insert_with(Default::default);
    m.name = name;
    m.namespace = namespace;
    let spec = out.spec.get_or_insert_with(Default::default);
    spec.payload = validate::payload("payload", &up.payload)?.to_owned();
    spec.matches = up.matches.clone();
    spec.path_ids = up.path_ids.clone();
    Ok(out)
}

/// An endpoint as upstream's `registry.NetworkServiceEndpoint`. The endpoint's own labels apply to
/// every service it offers, on top of per-service labels.
pub fn nse_to_upstream(ep: &pb::Endpoint) -> registry::NetworkServiceEndpoint {
    let (namespace, name) = meta(&ep.metadata);
    let labels = ep.metadata.as_ref().map(|m| &m.labels);
    let spec = ep.spec.clone().unwrap_or_default();
    let mut service_labels: HashMap<String, registry::NetworkServiceLabels> = HashMap::new();
    let mut names = Vec::with_capacity(spec.network_services.len());
    for s in &spec.network_services {
        let q = qualify(s, namespace);
        names.push(q.clone());
        if let Some(l) = labels.filter(|l| !l.is_empty()) {
            service_labels
                .entry(q)
                .or_default()
                .labels
                .extend(l.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    for (s, l) in spec.service_labels {
        service_labels
            .entry(qualify(&s, namespace))
            .or_default()
            .labels
            .extend(l.labels);
    }
    registry::NetworkServiceEndpoint {
        name: name_of(namespace, name),
        network_service_names: names,
        network_service_labels: service_labels,
        url: spec.url,
        expiration_time: spec.expiration_time,
        initial_registration_time: spec.initial_registration_time,
        path_ids: spec.path_ids,
    }
}

/// Builds the endpoint an upstream Register stores. Fields upstream cannot express (address,
/// node, own labels) are kept from the existing endpoint. Expiry is the caller's business.
pub fn nse_from_upstream(
    up: &registry::NetworkServiceEndpoint,
    existing: Option<&pb::Endpoint>,
) -> Result<pb::Endpoint, ValidationError> {
    let (namespace, name, _) = parse_name("name", &up.name)?;
    validate::url("url", &up.url)?;
    let mut out = existing.cloned().unwrap_or_default();
    let m = out.metadata.get_or_insert_with(Default::default);
    m.name = name;
    m.namespace = namespace.clone();
    let own_labels = m.labels.clone();
    let spec = out.spec.get_or_insert_with(Default::default);
    spec.network_services = up
        .network_service_names
        .iter()
        .enumerate()
        .map(|(i, s)| relative(&format!("network_service_names[{i}]"), s, &namespace))
        .collect::<Result<_, _>>()?;
    spec.service_labels = HashMap::new();
    for (s, l) in &up.network_service_labels {
        validate::selector(&format!("network_service_labels[{s}]"), &l.labels)?;
        // Drop what the endpoint's own labels already say, so the round trip is exact.
        let extra: HashMap<_, _> = l
            .labels
            .iter()
            .filter(|(k, v)| own_labels.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let key = relative(&format!("network_service_labels[{s}]"), s, &namespace)?;
        spec.service_labels
            .insert(key, registry::NetworkServiceLabels { labels: extra });
    }
    spec.url = up.url.clone();
    spec.expiration_time = up.expiration_time;
    spec.initial_registration_time = up.initial_registration_time;
    spec.path_ids = up.path_ids.clone();
    Ok(out)
}

fn is_subset(small: &HashMap<String, String>, big: &HashMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// Upstream find-by-example for network services: `name` and `payload` exact when set, `matches`
/// equal as a whole when set (sdk matchutils semantics).
pub fn match_ns(query: &registry::NetworkService, item: &registry::NetworkService) -> bool {
    (query.name.is_empty() || query.name == item.name)
        && (query.payload.is_empty() || query.payload == item.payload)
        && (query.matches.is_empty() || query.matches == item.matches)
}

/// Upstream find-by-example for endpoints: `name` exact, `network_service_names` a subset,
/// `network_service_labels` a per-service subset, `url` a substring, `expiration_time` equal to
/// the second (sdk matchutils semantics).
pub fn match_nse(query: &registry::NetworkServiceEndpoint, item: &registry::NetworkServiceEndpoint) -> bool {
    (query.name.is_empty() || query.name == item.name)
        && query
            .network_service_names
            .iter()
            .all(|n| item.network_service_names.contains(n))
        && query.network_service_labels.iter().all(|(svc, want)| {
            item.network_service_labels
                .get(svc)
                .is_some_and(|have| is_subset(&want.labels, &have.labels))
        })
        && (query.url.is_empty() || item.url.contains(&query.url))
        && query
            .expiration_time
            .is_none_or(|q| item.expiration_time.is_some_and(|i| i.seconds == q.seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ns: &str, name: &str, services: &[&str], labels: &[(&str, &str)]) -> pb::Endpoint {
        pb::Endpoint {
            metadata: Some(pb::ObjectMeta {
                name: name.into(),
                namespace: ns.into(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            }),
            spec: Some(pb::EndpointSpec {
                network_services: services.iter().map(|s| s.to_string()).collect(),
                url: "tcp://10.0.0.1:5001".into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(name_of("default", "a"), "a");
        assert_eq!(
            name_of("istio-system", "istio-namespace"),
            "istio-namespace.istio-system"
        );
        assert_eq!(parse_name("n", "a").unwrap(), ("default".into(), "a".into(), None));
        assert_eq!(
            parse_name("n", "a.b@cluster2").unwrap(),
            ("b".into(), "a".into(), Some("cluster2".into()))
        );
        assert!(parse_name("name", "A").is_err());
        assert!(parse_name("name", "a@").is_err());
    }

    #[test]
    fn endpoint_round_trip_and_labels() {
        let e = ep("shop", "e1", &["orders", "pay.default"], &[("app", "x")]);
        let up = nse_to_upstream(&e);
        assert_eq!(up.name, "e1.shop");
        assert_eq!(up.network_service_names, ["orders.shop", "pay"]);
        assert_eq!(up.network_service_labels["orders.shop"].labels["app"], "x");
        let back = nse_from_upstream(&up, Some(&e)).unwrap();
        assert_eq!(back.spec.as_ref().unwrap().network_services, ["orders", "pay.default"]);
        assert!(
            back.spec
                .as_ref()
                .unwrap()
                .service_labels
                .values()
                .all(|l| l.labels.is_empty())
        );
        assert_eq!(nse_to_upstream(&back), up);
    }

    #[test]
    fn find_by_example() {
        let item = nse_to_upstream(&ep("default", "e1", &["a", "b"], &[("app", "x"), ("v", "1")]));
        let mut q = registry::NetworkServiceEndpoint::default();
        assert!(match_nse(&q, &item), "empty query matches all");
        q.network_service_names = vec!["b".into()];
        assert!(match_nse(&q, &item));
        q.network_service_names = vec!["b".into(), "c".into()];
        assert!(!match_nse(&q, &item), "query services must be a subset");
        q.network_service_names.clear();
        q.url = "10.0.0".into();
        assert!(match_nse(&q, &item), "url is a substring match");
        q.name = "e".into();
        assert!(!match_nse(&q, &item), "name is exact");
        q.name = "e1".into();
        q.network_service_labels.insert(
            "a".into(),
            registry::NetworkServiceLabels {
                labels: [("app".to_string(), "x".to_string())].into(),
            },
        );
        assert!(match_nse(&q, &item));
        q.network_service_labels.insert(
            "a".into(),
            registry::NetworkServiceLabels {
                labels: [("app".to_string(), "y".to_string())].into(),
            },
        );
        assert!(!match_nse(&q, &item));
    }
}
