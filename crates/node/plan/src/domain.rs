//! The node's typed domain: what arrives as strings in prost messages is converted once, at the
//! edge, into these.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use nsm_model::pb;

/// A client's phase, as its status reports it.
pub type Phase = pb::client_status::Phase;

/// A client (declarative vWire) by namespace and name: the key of every per-client map and of
/// the work queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    /// The client's namespace.
    pub namespace: String,
    /// The client's name.
    pub name: String,
}

impl ClientKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ClientKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `client` (empty parts when it has no metadata).
    pub fn of(client: &pb::Client) -> Self {
        client.metadata.as_ref().map_or_else(Default::default, |m| ClientKey {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
        })
    }

    /// The client's upstream (flat) name: `name` in `default`, else `name.namespace`.
    pub fn upstream(&self) -> String {
        nsm_model::upstream::name_of(&self.namespace, &self.name)
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A data-plane mechanism, by its upstream name (api:pkg/api/networkservice/mechanisms; see
/// shared/reference/nsm-upstream.md §1.7). The names are what goes on the wire and into statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MechanismKind {
    /// A veth pair between two namespaces of one host (upstream's `KERNEL`).
    Kernel,
    /// A kernel VXLAN tunnel between two nodes, unencrypted.
    Vxlan,
    /// A WireGuard tunnel between two nodes (kernel or userspace).
    WireGuard,
}

impl MechanismKind {
    /// The upstream name.
    pub const fn as_str(self) -> &'static str {
        match self {
            MechanismKind::Kernel => "KERNEL",
            MechanismKind::Vxlan => "VXLAN",
            MechanismKind::WireGuard => "WIREGUARD",
        }
    }

    /// Whether it carries traffic encrypted.
    pub const fn encrypted(self) -> bool {
        matches!(self, MechanismKind::WireGuard)
    }
}

impl fmt::Display for MechanismKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mechanism name this node does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mechanism {0:?} (known: KERNEL, VXLAN, WIREGUARD)")]
pub struct UnknownMechanism(pub String);

impl FromStr for MechanismKind {
    type Err = UnknownMechanism;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "KERNEL" => Ok(MechanismKind::Kernel),
            "VXLAN" => Ok(MechanismKind::Vxlan),
            "WIREGUARD" => Ok(MechanismKind::WireGuard),
            other => Err(UnknownMechanism(other.to_owned())),
        }
    }
}

/// The encryption a vWire asks for (`spec.encryption` of its client, else of its service).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    /// Only WIREGUARD is offered; a node that cannot build it fails the vWire.
    Required,
    /// WIREGUARD first, VXLAN if the endpoint's node does not build it.
    Preferred,
    /// VXLAN only.
    #[default]
    None,
}

impl Encryption {
    /// The stronger of the client's setting and its service's: the service's is a floor that a
    /// client may raise, never lower (a client asking `none` of a `required` service gets
    /// WIREGUARD or nothing).
    pub fn effective(client: &str, service: &str) -> Encryption {
        let parse = |s: &str| match s {
            "required" => Encryption::Required,
            "preferred" => Encryption::Preferred,
            _ => Encryption::None,
        };
        let rank = |e: Encryption| match e {
            Encryption::None => 0,
            Encryption::Preferred => 1,
            Encryption::Required => 2,
        };
        let (c, s) = (parse(client), parse(service));
        if rank(c) >= rank(s) { c } else { s }
    }

    /// Whether a cross-node vWire built with `mechanism` may stand under this setting.
    pub fn allows(self, mechanism: MechanismKind) -> bool {
        match self {
            Encryption::Required => mechanism.encrypted(),
            Encryption::Preferred => true,
            Encryption::None => !mechanism.encrypted(),
        }
    }
}

/// The two addresses of a point-to-point vWire: the client's (`src`) and the far end's (`dst`),
/// host prefixes (/32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    /// The client's address.
    pub src: IpNet,
    /// The far end's address.
    pub dst: IpNet,
}

impl Pair {
    /// The pair a status lists, if it lists one that parses.
    pub fn of_status(st: &pb::ClientStatus) -> Option<Pair> {
        Some(Pair {
            src: st.src_ip_addrs.first()?.parse().ok()?,
            dst: st.dst_ip_addrs.first()?.parse().ok()?,
        })
    }
}

/// Why a client is not Ready: its phase (`Pending` or `Failed`) and the reason its status shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    /// `Pending` (waits for something that may come) or `Failed` (cannot be built as asked).
    pub phase: Phase,
    /// What the status says.
    pub reason: String,
}

impl NotReady {
    /// Waits for something that may come (a service, an endpoint, a node).
    pub fn pending(reason: impl Into<String>) -> Self {
        NotReady {
            phase: Phase::Pending,
            reason: reason.into(),
        }
    }

    /// Cannot be built as asked.
    pub fn failed(reason: impl Into<String>) -> Self {
        NotReady {
            phase: Phase::Failed,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_names_round_trip() {
        for m in [MechanismKind::Kernel, MechanismKind::Vxlan, MechanismKind::WireGuard] {
            assert_eq!(m.as_str().parse::<MechanismKind>(), Ok(m));
        }
        assert_eq!("MEMIF".parse::<MechanismKind>(), Err(UnknownMechanism("MEMIF".into())));
    }

    #[test]
    fn encryption_is_the_clients_else_the_services() {
        assert_eq!(Encryption::effective("", "required"), Encryption::Required);
        assert_eq!(Encryption::effective("none", "required"), Encryption::Required);
        assert_eq!(Encryption::effective("none", "preferred"), Encryption::Preferred);
        assert_eq!(Encryption::effective("required", "none"), Encryption::Required);
        assert_eq!(Encryption::effective("preferred", "required"), Encryption::Required);
        assert_eq!(Encryption::effective("preferred", ""), Encryption::Preferred);
        assert_eq!(Encryption::effective("", ""), Encryption::None);
        assert!(!Encryption::Required.allows(MechanismKind::Vxlan));
        assert!(Encryption::Required.allows(MechanismKind::WireGuard));
        assert!(Encryption::Preferred.allows(MechanismKind::Vxlan));
        assert!(!Encryption::None.allows(MechanismKind::WireGuard));
    }

    #[test]
    fn keys_print_and_name_upstream() {
        let k = ClientKey::new("tenant", "c1");
        assert_eq!(k.to_string(), "tenant/c1");
        assert_eq!(k.upstream(), "c1.tenant");
        assert_eq!(ClientKey::new("default", "c1").upstream(), "c1");
    }
}
