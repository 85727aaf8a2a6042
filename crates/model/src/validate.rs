//! Validation and normalisation of resources. Every error names the field and the reason, so the
//! CLI and the gRPC status can tell the user exactly what to fix.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::DEFAULT_NAMESPACE;
use crate::kind::Kind;
use crate::pb;

/// A rejected field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// Path of the field, e.g. `spec.cidr`.
    pub field: String,
    /// Why it was rejected.
    pub reason: String,
}

impl ValidationError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ValidationError>;

fn is_dns_label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// A resource name: lower-case letters, digits and '-', starting and ending alphanumeric, at most
/// 253 characters. Dots are not allowed because upstream names carry the namespace after a dot.
pub fn name(field: &str, s: &str) -> Result<()> {
    dns_label(field, s, 253)
}

/// A namespace: like a name, at most 63 characters.
pub fn namespace(field: &str, s: &str) -> Result<()> {
    dns_label(field, s, 63)
}

fn dns_label(field: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("{s:?} is longer than {max} characters"),
        ));
    }
    if let Some(c) = s.chars().find(|c| !is_dns_label_char(*c)) {
        return Err(ValidationError::new(
            field,
            format!("{s:?} contains {c:?}; only lower-case letters, digits and '-' are allowed"),
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(ValidationError::new(
            field,
            format!("{s:?} must start and end with a letter or digit"),
        ));
    }
    Ok(())
}

fn label_part(field: &str, what: &str, s: &str, allow_empty: bool) -> Result<()> {
    if s.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(ValidationError::new(field, format!("{what} must not be empty")))
        };
    }
    if s.len() > 63 {
        return Err(ValidationError::new(
            field,
            format!("{what} {s:?} is longer than 63 characters"),
        ));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if let Some(c) = s.chars().find(|c| !ok_char(*c)) {
        return Err(ValidationError::new(field, format!("{what} {s:?} contains {c:?}")));
    }
    let first = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let last = s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first || !last {
        return Err(ValidationError::new(
            field,
            format!("{what} {s:?} must start and end with a letter or digit"),
        ));
    }
    Ok(())
}

/// Labels as Kubernetes defines them: key `[prefix/]name`, value up to 63 characters.
pub fn labels(field: &str, labels: &HashMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("{} labels; at most {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        let f = format!("{field}[{k}]");
        let name = match k.split_once('/') {
            Some((prefix, name)) => {
                if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(|p| dns_label("", p, 63).is_ok()) {
                    return Err(ValidationError::new(
                        &f,
                        format!("key prefix {prefix:?} must be a DNS subdomain"),
                    ));
                }
                name
            }
            None => k.as_str(),
        };
        label_part(&f, "key", name, false)?;
        label_part(&f, "value", v, true)?;
    }
    Ok(())
}

/// Labels (or selector entries) one map may hold: every label is carried on every copy of a
/// resource, in every watch event to every node, so a map is bounded like Kubernetes' practice.
pub const MAX_LABELS: usize = 64;
/// A selector key: a DNS-subdomain prefix (253), `/` and a name (63).
const MAX_SELECTOR_KEY: usize = 317;
/// A selector value: upstream templates (`{{.nodeName}}`) are longer than label values.
const MAX_SELECTOR_VALUE: usize = 1024;

/// Selector maps of upstream `matches` and per-service labels: keys must be non-empty; values may
/// be upstream templates such as `{{.nodeName}}`, so only control characters are refused.
pub fn selector(field: &str, map: &HashMap<String, String>) -> Result<()> {
    if map.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("{} entries; at most {MAX_LABELS}", map.len()),
        ));
    }
    for (k, v) in map {
        if k.is_empty() {
            return Err(ValidationError::new(field, "label keys must not be empty"));
        }
        if k.len() > MAX_SELECTOR_KEY || v.len() > MAX_SELECTOR_VALUE {
            return Err(ValidationError::new(
                format!("{field}[{k}]"),
                format!("keys are at most {MAX_SELECTOR_KEY} bytes and values {MAX_SELECTOR_VALUE}"),
            ));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(ValidationError::new(
                format!("{field}[{k}]"),
                "contains control characters",
            ));
        }
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (as given to `--labels` or `-l`).
pub fn parse_labels(field: &str, s: &str) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| ValidationError::new(field, format!("{part:?} is not key=value")))?;
        if out.insert(k.trim().to_owned(), v.trim().to_owned()).is_some() {
            return Err(ValidationError::new(field, format!("key {:?} given twice", k.trim())));
        }
    }
    labels(field, &out)?;
    Ok(out)
}

/// An address pool: a network in CIDR notation with no host bits set.
pub fn cidr(field: &str, s: &str) -> Result<IpNet> {
    let net: IpNet = s
        .parse()
        .map_err(|_| ValidationError::new(field, format!("{s:?} is not a CIDR such as 10.60.0.0/16 or fd00::/64")))?;
    if net.trunc() != net {
        return Err(ValidationError::new(
            field,
            format!("{s:?} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

/// An IP address (v4 or v6).
pub fn ip(field: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| ValidationError::new(field, format!("{s:?} is not an IP address")))
}

/// A host's address on the network — what nodes tunnel to or route and masquerade towards: not
/// unspecified, loopback, multicast or broadcast (each would point a node at itself or at
/// everyone).
pub fn host_ip(field: &str, s: &str) -> Result<IpAddr> {
    let a = ip(field, s)?;
    let bad =
        a.is_unspecified() || a.is_loopback() || a.is_multicast() || matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
    if bad {
        return Err(ValidationError::new(
            field,
            format!("{a} is unspecified, loopback, multicast or broadcast: not a host's address"),
        ));
    }
    Ok(a)
}

/// An address pool of a service: a CIDR that is not every address (`0.0.0.0/0`, `::/0`) and
/// overlaps neither loopback nor multicast — addresses from it are put on interfaces and routed.
pub fn pool_cidr(field: &str, s: &str) -> Result<IpNet> {
    let net = cidr(field, s)?;
    if net.prefix_len() == 0 {
        return Err(ValidationError::new(
            field,
            format!("{net} is every address; give a pool such as 10.60.0.0/16"),
        ));
    }
    let reserved: [IpNet; 4] = [
        "127.0.0.0/8".parse().expect("literal"),
        "224.0.0.0/4".parse().expect("literal"),
        "::1/128".parse().expect("literal"),
        "ff00::/8".parse().expect("literal"),
    ];
    if let Some(r) = reserved
        .iter()
        .find(|r| r.contains(&net.network()) || net.contains(&r.network()))
    {
        return Err(ValidationError::new(
            field,
            format!("{net} overlaps {r} (loopback or multicast)"),
        ));
    }
    Ok(net)
}

/// Upstream payloads; returns the canonical upper-case spelling.
pub fn payload(field: &str, s: &str) -> Result<&'static str> {
    match s.to_ascii_uppercase().as_str() {
        "" | "IP" => Ok("IP"),
        "ETHERNET" => Ok("ETHERNET"),
        _ => Err(ValidationError::new(
            field,
            format!("{s:?} is not a payload (expected IP or ETHERNET)"),
        )),
    }
}

/// Endpoint URLs as upstream uses them: `tcp://host:port`, `unix:///path`, `inode://dev/ino`.
pub fn url(field: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Ok(());
    }
    let (scheme, rest) = s.split_once("://").ok_or_else(|| {
        ValidationError::new(
            field,
            format!("{s:?} is not a URL (expected tcp://host:port or unix:///path)"),
        )
    })?;
    match scheme {
        "tcp" => {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| ValidationError::new(field, format!("{s:?} has no port")))?;
            if host.is_empty() {
                return Err(ValidationError::new(field, format!("{s:?} has no host")));
            }
            port.parse::<u16>()
                .map_err(|_| ValidationError::new(field, format!("{s:?} has an invalid port")))?;
            Ok(())
        }
        "unix" if rest.starts_with('/') => Ok(()),
        "unix" => Err(ValidationError::new(
            field,
            format!("{s:?}: unix socket paths must be absolute (unix:///path)"),
        )),
        "inode" => Ok(()),
        other => Err(ValidationError::new(
            field,
            format!("unsupported URL scheme {other:?} (expected tcp, unix or inode)"),
        )),
    }
}

/// A reference to a network service from a resource in `namespace`: `name` (same namespace) or
/// `name.namespace`.
pub fn service_ref(field: &str, s: &str) -> Result<()> {
    match s.split_once('.') {
        Some((n, ns)) => {
            name(field, n)?;
            namespace(field, ns)
        }
        None => name(field, s),
    }
}

fn check_meta(kind: Kind, meta: &mut pb::ObjectMeta) -> Result<()> {
    name("metadata.name", &meta.name)?;
    if kind.namespaced() {
        if meta.namespace.is_empty() {
            meta.namespace = DEFAULT_NAMESPACE.to_owned();
        }
        namespace("metadata.namespace", &meta.namespace)?;
    } else {
        meta.namespace.clear();
    }
    labels("metadata.labels", &meta.labels)
}

/// The interface a client gets when it names none (upstream's conventional name).
pub const DEFAULT_INTERFACE: &str = "nsm-1";

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or white space.
pub fn interface(field: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 15 {
        return Err(ValidationError::new(
            field,
            format!("{s:?} must be 1 to 15 characters (a Linux interface name)"),
        ));
    }
    if s == "."
        || s == ".."
        || s.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(ValidationError::new(
            field,
            format!("{s:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// Validates a resource and fills defaults (namespace, payload, service type) in place.
pub fn resource(resource: &mut pb::Resource) -> Result<Kind> {
    use pb::resource::Kind as R;
    let kind = Kind::of(resource).ok_or_else(|| ValidationError::new("resource", "no resource given"))?;
    match resource.kind.as_mut().expect("checked above") {
        R::NetworkService(ns) => {
            check_meta(kind, ns.metadata.get_or_insert_with(Default::default))?;
            let spec = ns.spec.get_or_insert_with(Default::default);
            spec.payload = payload("spec.payload", &spec.payload)?.to_owned();
            if spec.r#type == pb::ServiceType::Unspecified as i32 {
                spec.r#type = pb::ServiceType::Vwire as i32;
            }
            pb::ServiceType::try_from(spec.r#type)
                .map_err(|_| ValidationError::new("spec.type", format!("unknown service type {}", spec.r#type)))?;
            if !spec.cidr.is_empty() {
                spec.cidr = pool_cidr("spec.cidr", &spec.cidr)?.to_string();
            }
            vl3_fields(spec)?;
            encryption("spec.encryption", &spec.encryption)?;
            for (i, m) in spec.matches.iter().enumerate() {
                selector(&format!("spec.matches[{i}].sourceSelector"), &m.source_selector)?;
                for (j, r) in m.routes.iter().enumerate() {
                    selector(
                        &format!("spec.matches[{i}].routes[{j}].destinationSelector"),
                        &r.destination_selector,
                    )?;
                }
            }
        }
        R::Endpoint(ep) => {
            check_meta(kind, ep.metadata.get_or_insert_with(Default::default))?;
            let spec = ep.spec.get_or_insert_with(Default::default);
            for (i, s) in spec.network_services.iter().enumerate() {
                service_ref(&format!("spec.networkServices[{i}]"), s)?;
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = spec.network_services.iter().find(|s| !seen.insert(s.as_str())) {
                return Err(ValidationError::new(
                    "spec.networkServices",
                    format!("{dup:?} listed twice"),
                ));
            }
            for (svc, l) in &spec.service_labels {
                service_ref(&format!("spec.serviceLabels[{svc}]"), svc)?;
                selector(&format!("spec.serviceLabels[{svc}]"), &l.labels)?;
            }
            url("spec.url", &spec.url)?;
            if !spec.address.is_empty() {
                spec.address = host_ip("spec.address", &spec.address)?.to_string();
            }
            if !spec.node.is_empty() {
                name("spec.node", &spec.node)?;
            }
            if !spec.netns.is_empty() {
                if !spec.netns.starts_with('/') {
                    return Err(ValidationError::new(
                        "spec.netns",
                        format!("{:?} must be an absolute path to a network namespace file", spec.netns),
                    ));
                }
                if spec.node.is_empty() {
                    return Err(ValidationError::new(
                        "spec.netns",
                        "an endpoint in a namespace needs spec.node",
                    ));
                }
            }
            if spec.address.is_empty()
                && spec.url.is_empty()
                && spec.node.is_empty()
                && spec.network_services.is_empty()
            {
                return Err(ValidationError::new(
                    "spec",
                    "an endpoint needs at least one of address, url, node or networkServices",
                ));
            }
        }
        R::Client(c) => {
            check_meta(kind, c.metadata.get_or_insert_with(Default::default))?;
            let spec = c.spec.get_or_insert_with(Default::default);
            if spec.network_service.is_empty() {
                return Err(ValidationError::new(
                    "spec.networkService",
                    "a client must name a network service",
                ));
            }
            service_ref("spec.networkService", &spec.network_service)?;
            if !spec.endpoint.is_empty() {
                service_ref("spec.endpoint", &spec.endpoint)?;
            }
            if !spec.netns.starts_with('/') {
                return Err(ValidationError::new(
                    "spec.netns",
                    format!("{:?} must be an absolute path to a network namespace file", spec.netns),
                ));
            }
            if spec.interface.is_empty() {
                spec.interface = DEFAULT_INTERFACE.to_owned();
            }
            interface("spec.interface", &spec.interface)?;
            if !spec.node.is_empty() {
                name("spec.node", &spec.node)?;
            }
            encryption("spec.encryption", &spec.encryption)?;
        }
        R::Prefix(p) => {
            check_meta(kind, p.metadata.get_or_insert_with(Default::default))?;
            let spec = p.spec.get_or_insert_with(Default::default);
            service_ref("spec.networkService", &spec.network_service)?;
            spec.prefix = cidr("spec.prefix", &spec.prefix)?.to_string();
            if !spec.node.is_empty() {
                name("spec.node", &spec.node)?;
            }
            service_ref("spec.memberService", &spec.member_service)?;
        }
        R::Node(node) => {
            check_meta(kind, node.metadata.get_or_insert_with(Default::default))?;
            let spec = node.spec.get_or_insert_with(Default::default);
            // Empty until its daemon registers it (`nsmctl node create` before the node joins).
            if !spec.address.is_empty() {
                spec.address = host_ip("spec.address", &spec.address)?.to_string();
            }
            url("spec.url", &spec.url)?;
        }
    }
    Ok(kind)
}

/// The values of an `encryption` setting (empty: unset).
pub const ENCRYPTION_VALUES: [&str; 3] = ["required", "preferred", "none"];

/// An `encryption` setting: empty or one of [`ENCRYPTION_VALUES`].
pub fn encryption(field: &str, s: &str) -> Result<()> {
    if s.is_empty() || ENCRYPTION_VALUES.contains(&s) {
        return Ok(());
    }
    Err(ValidationError::new(
        field,
        format!("{s:?} must be one of {}", ENCRYPTION_VALUES.join(", ")),
    ))
}

/// The default DNS name of a vL3 member.
pub const DEFAULT_DNS_TEMPLATE: &str = "{client}.{service}.";

/// The prefix length routers lease from a vL3 pool when the service says none: upstream's /24
/// (NSM_CLIENT_PREFIX_LEN) for IPv4; /112 (65,536 addresses) for IPv6.
pub fn default_prefix_len(pool: &ipnet::IpNet) -> u32 {
    if pool.addr().is_ipv4() { 24 } else { 112 }
}

/// The vL3 fields of a network service: a vL3 needs a pool whose prefixes leave room for a router
/// and a member; a service on a vL3 takes that vL3's pool and carries none of its own.
fn vl3_fields(spec: &mut pb::NetworkServiceSpec) -> Result<()> {
    let is_vl3 = spec.r#type == pb::ServiceType::Vl3 as i32;
    if !spec.vl3.is_empty() {
        service_ref("spec.vl3", &spec.vl3)?;
        if !spec.cidr.is_empty() {
            return Err(ValidationError::new(
                "spec.cidr",
                "a service on a vL3 takes its addresses from the vL3's pool; give no cidr",
            ));
        }
        if spec.prefix_len != 0 || !spec.dns_template.is_empty() {
            return Err(ValidationError::new(
                "spec.vl3",
                "prefixLen and dnsTemplate belong to the vL3 itself, not to a service on it",
            ));
        }
        spec.r#type = pb::ServiceType::Vl3 as i32;
    } else if is_vl3 {
        let pool = if spec.cidr.is_empty() {
            return Err(ValidationError::new(
                "spec.cidr",
                "a vL3 needs an address pool (e.g. 172.16.0.0/16)",
            ));
        } else {
            cidr("spec.cidr", &spec.cidr)?
        };
        if spec.prefix_len == 0 {
            spec.prefix_len = default_prefix_len(&pool);
        }
        let max = u32::from(pool.max_prefix_len()) - 2;
        if spec.prefix_len < u32::from(pool.prefix_len()) || spec.prefix_len > max {
            return Err(ValidationError::new(
                "spec.prefixLen",
                format!(
                    "/{} must lie between the pool's /{} and /{max} (a prefix holds the router and at least one member)",
                    spec.prefix_len,
                    pool.prefix_len()
                ),
            ));
        }
        if spec.dns_template.is_empty() {
            spec.dns_template = DEFAULT_DNS_TEMPLATE.to_owned();
        }
        let rest = spec
            .dns_template
            .replace("{client}", "a")
            .replace("{service}", "b")
            .replace("{namespace}", "c");
        if rest.contains(['{', '}']) || rest.split('.').any(|l| l.len() > 63) || rest.starts_with('.') {
            return Err(ValidationError::new(
                "spec.dnsTemplate",
                format!(
                    "{:?}: use {{client}}, {{service}} and {{namespace}} in dot-separated labels",
                    spec.dns_template
                ),
            ));
        }
    } else if spec.prefix_len != 0 || !spec.dns_template.is_empty() || !spec.reach.is_empty() {
        return Err(ValidationError::new(
            "spec.type",
            "prefixLen, dnsTemplate and reach apply to vL3 services only",
        ));
    }
    for (i, r) in spec.reach.iter().enumerate() {
        if r != "*" {
            service_ref(&format!("spec.reach[{i}]"), r)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("n", "istio-namespace").is_ok());
        assert!(name("n", "").unwrap_err().reason.contains("empty"));
        assert!(name("n", "Bad").unwrap_err().reason.contains("'B'"));
        assert!(name("n", "a.b").unwrap_err().reason.contains("'.'"));
        assert!(name("n", "-a").is_err());
        assert!(namespace("n", &"a".repeat(64)).is_err());
    }

    #[test]
    fn encryption_values() {
        for v in ["", "required", "preferred", "none"] {
            assert!(encryption("spec.encryption", v).is_ok(), "{v}");
        }
        let e = encryption("spec.encryption", "always").unwrap_err();
        assert_eq!(e.field, "spec.encryption");
        assert!(e.reason.contains("required, preferred, none"), "{e}");
    }

    #[test]
    fn cidrs() {
        assert_eq!(cidr("c", "10.60.0.0/16").unwrap().to_string(), "10.60.0.0/16");
        let e = cidr("spec.cidr", "10.60.0.1/16").unwrap_err();
        assert_eq!(e.field, "spec.cidr");
        assert!(e.reason.contains("did you mean 10.60.0.0/16"), "{e}");
        assert!(cidr("c", "10.0.0.0/33").is_err());
        assert!(cidr("c", "fd00::/64").is_ok());
    }

    #[test]
    fn label_parsing() {
        let l = parse_labels("l", "app=web, tier=backend").unwrap();
        assert_eq!(l["app"], "web");
        assert!(parse_labels("l", "app").unwrap_err().reason.contains("key=value"));
        assert!(parse_labels("l", "a=1,a=2").unwrap_err().reason.contains("twice"));
        assert!(parse_labels("l", "example.com/app=x").is_ok());
        assert!(parse_labels("l", "app=has space").is_err());
    }

    #[test]
    fn urls() {
        assert!(url("u", "tcp://10.0.0.1:5002").is_ok());
        assert!(url("u", "unix:///run/nsm.sock").is_ok());
        assert!(url("u", "tcp://10.0.0.1").is_err());
        assert!(url("u", "http://x:1").is_err());
    }
}

#[cfg(test)]
mod hostile_addresses {
    use super::*;

    #[test]
    fn label_maps_are_bounded() {
        let many: HashMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(
            labels("metadata.labels", &many)
                .unwrap_err()
                .reason
                .contains("at most 64")
        );
        assert!(
            selector("spec.matches[0].sourceSelector", &many)
                .unwrap_err()
                .reason
                .contains("at most 64")
        );
        let long: HashMap<String, String> = [("k".to_string(), "v".repeat(MAX_SELECTOR_VALUE + 1))].into();
        let e = selector("s", &long).unwrap_err();
        assert_eq!(e.field, "s[k]");
        let fine: HashMap<String, String> = (0..MAX_LABELS).map(|i| (format!("k{i}"), "v".to_string())).collect();
        labels("metadata.labels", &fine).unwrap();
        selector("s", &fine).unwrap();
    }

    #[test]
    fn host_addresses_and_pools() {
        for ok_addr in ["10.0.0.5", "192.0.2.10", "fd00::1"] {
            host_ip("spec.address", ok_addr).unwrap();
        }
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
        ] {
            let e = host_ip("spec.address", bad).unwrap_err();
            assert_eq!(e.field, "spec.address");
            assert!(e.reason.contains("not a host's address"), "{bad}: {}", e.reason);
        }
        for ok_pool in ["10.60.0.0/16", "169.254.100.0/24", "fd00::/64"] {
            pool_cidr("spec.cidr", ok_pool).unwrap();
        }
        for (bad, why) in [
            ("0.0.0.0/0", "every address"),
            ("::/0", "every address"),
            ("127.0.0.0/24", "overlaps 127.0.0.0/8"),
            ("64.0.0.0/2", "overlaps 127.0.0.0/8"),
            ("224.1.0.0/16", "overlaps 224.0.0.0/4"),
            ("ff02::/16", "overlaps ff00::/8"),
        ] {
            let e = pool_cidr("spec.cidr", bad).unwrap_err();
            assert!(e.reason.contains(why), "{bad}: {}", e.reason);
        }
    }
}
