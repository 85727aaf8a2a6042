use super::*;
use crate::domain::{MechanismKind, Pair, Phase};

const ME: &str = "node-a";

fn vl3_view(prefixes: &[(&str, &str, &str)]) -> View {
    let mut v = View::default();
    v.apply(
        pb::Resource {
            kind: Some(pb::resource::Kind::NetworkService(pb::NetworkService {
                metadata: Some(pb::ObjectMeta {
                    namespace: "default".into(),
                    name: "mesh".into(),
                    ..Default::default()
                }),
                spec: Some(pb::NetworkServiceSpec {
                    r#type: pb::ServiceType::Vl3 as i32,
                    cidr: "172.16.0.0/16".into(),
                    prefix_len: 24,
                    dns_template: "{client}.{service}.".into(),
                    ..Default::default()
                }),
            })),
        },
        false,
    );
    for (i, (prefix, node, member)) in prefixes.iter().enumerate() {
        v.apply(
            pb::Resource {
                kind: Some(pb::resource::Kind::Prefix(pb::Prefix {
                    metadata: Some(pb::ObjectMeta {
                        namespace: "default".into(),
                        name: format!("mesh-{i}"),
                        ..Default::default()
                    }),
                    spec: Some(pb::PrefixSpec {
                        network_service: "mesh".into(),
                        prefix: (*prefix).into(),
                        node: (*node).into(),
                        member_service: (*member).into(),
                    }),
                })),
            },
            false,
        );
    }
    v
}

fn member(previous: Option<&str>) -> pb::Client {
    pb::Client {
        metadata: Some(pb::ObjectMeta {
            namespace: "default".into(),
            name: "web".into(),
            ..Default::default()
        }),
        spec: Some(pb::ClientSpec {
            network_service: "mesh".into(),
            node: ME.into(),
            netns: "/run/netns/web".into(),
            interface: "nsm-1".into(),
            ..Default::default()
        }),
        status: previous.map(|p| pb::ClientStatus {
            phase: Phase::Ready as i32,
            src_ip_addrs: vec![p.into()],
            ..Default::default()
        }),
    }
}

fn run(
    view: &View,
    client: &pb::Client,
    used: &[&str],
    standing: Option<&Standing>,
    observed: Option<&Observed>,
) -> MemberDecision {
    let used: HashSet<IpAddr> = used.iter().map(|a| a.parse().unwrap()).collect();
    plan_member(&MemberInput {
        node: ME,
        client,
        service: "mesh",
        vl3: "mesh",
        view,
        used: &used,
        standing,
        observed,
    })
}

fn addr_of(d: &MemberDecision) -> String {
    match d {
        MemberDecision::Keep(m) | MemberDecision::Adopt(m) | MemberDecision::Build(m) | MemberDecision::Rebuild(m) => {
            m.addr.to_string()
        }
        other => panic!("expected a membership, got {other:?}"),
    }
}

#[test]
fn refusals() {
    let v = vl3_view(&[]);
    let mut pinned = member(None);
    pinned.spec.as_mut().unwrap().endpoint = "e1".into();
    match run(&v, &pinned, &[], None, None) {
        MemberDecision::NotReady(nr) => {
            assert_eq!(nr.phase, Phase::Failed);
            assert!(nr.reason.contains("no endpoint can be pinned"), "{}", nr.reason);
        }
        d => panic!("{d:?}"),
    }
    match run(&View::default(), &member(None), &[], None, None) {
        MemberDecision::NotReady(nr) => {
            assert_eq!(nr.phase, Phase::Pending);
            assert!(nr.reason.contains("which does not exist"), "{}", nr.reason);
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn addresses_come_from_own_leases_keep_the_last_one_and_ask_for_a_lease_when_none_is_free() {
    let own = vl3_view(&[("172.16.3.0/24", ME, "mesh"), ("172.16.4.0/24", "node-b", "mesh")]);
    let none = vl3_view(&[("172.16.4.0/24", "node-b", "mesh")]);
    // (view, previous address, used, expected address or the lease asked for)
    let cases: [(&View, Option<&str>, &[&str], &str); 6] = [
        (&own, None, &[], "172.16.3.1"),
        (&own, None, &["172.16.3.1"], "172.16.3.2"),
        (&own, Some("172.16.3.9/32"), &[], "172.16.3.9"),
        // Its last address is another client's now: a free one.
        (&own, Some("172.16.3.9/32"), &["172.16.3.9"], "172.16.3.1"),
        // No lease of this node: ask for the prefix that held its last address.
        (&none, Some("172.16.7.9/32"), &[], "lease 172.16.7.0/24"),
        (&none, None, &[], "lease any"),
    ];
    for (i, (v, prev, used, want)) in cases.into_iter().enumerate() {
        let got = match run(v, &member(prev), used, None, None) {
            MemberDecision::Lease { wanted, .. } => {
                format!("lease {}", wanted.map_or("any".into(), |w| w.to_string()))
            }
            d => addr_of(&d),
        };
        assert_eq!(got, want, "case {i}");
    }
}

#[test]
fn what_stands_is_kept_adopted_rebuilt_or_built() {
    let v = vl3_view(&[("172.16.3.0/24", ME, "mesh")]);
    let c = member(Some("172.16.3.1/32"));
    let w = |src: &str| Standing {
        endpoint: "mesh".into(),
        netns: "/run/netns/web".into(),
        interface: "nsm-1".into(),
        pair: Pair {
            src: src.parse().unwrap(),
            dst: "172.16.3.0/32".parse().unwrap(),
        },
        remote: false,
        route: Some("172.16.0.0/16".parse().unwrap()),
        nat: false,
        mechanism: MechanismKind::Kernel,
        refreshed: None,
        uid: String::new(),
    };
    let up = |a: &str| Observed {
        lower_up: true,
        addresses: vec![a.parse().unwrap()],
    };
    let (same, moved) = (w("172.16.3.1/32"), w("172.16.3.5/32"));
    let mut replaced = w("172.16.3.1/32");
    replaced.uid = "an-earlier-client".into();
    let down = Observed::default();
    let cases: [(Option<&Standing>, Option<&Observed>, &str); 7] = [
        (Some(&same), Some(&up("172.16.3.1/32")), "keep"),
        (Some(&replaced), Some(&up("172.16.3.1/32")), "rebuild"),
        (Some(&same), Some(&down), "build"),
        (Some(&moved), Some(&up("172.16.3.5/32")), "rebuild"),
        (None, Some(&up("172.16.3.1/32")), "adopt"),
        (None, Some(&up("172.16.3.8/32")), "build"),
        (None, None, "build"),
    ];
    for (i, (s, o, want)) in cases.into_iter().enumerate() {
        let got = match run(&v, &c, &[], s, o) {
            MemberDecision::Keep(_) => "keep",
            MemberDecision::Adopt(_) => "adopt",
            MemberDecision::Build(_) => "build",
            MemberDecision::Rebuild(_) => "rebuild",
            d => panic!("{d:?}"),
        };
        assert_eq!(got, want, "case {i}");
    }
}

#[test]
fn names_and_search_domains() {
    assert_eq!(dns_name("{client}.{service}.", "web", "istio", "x"), "web.istio.");
    assert_eq!(
        dns_name("{client}.{namespace}.svc", "web", "istio", "ns"),
        "web.ns.svc."
    );
    assert_eq!(
        search_domain("{client}.{service}.", "istio", "x").as_deref(),
        Some("istio.")
    );
    assert_eq!(search_domain("{service}-{client}.", "istio", "x"), None);
}

#[test]
fn addresses_skip_the_gateway_and_used_ones() {
    let p: IpNet = "172.16.3.0/24".parse().unwrap();
    let mut used = HashSet::new();
    assert_eq!(free_address(p, &used), Some("172.16.3.1".parse().unwrap()));
    used.insert("172.16.3.1".parse().unwrap());
    assert_eq!(free_address(p, &used), Some("172.16.3.2".parse().unwrap()));
    let tiny: IpNet = "172.16.4.0/31".parse().unwrap();
    used.insert("172.16.4.1".parse().unwrap());
    assert_eq!(free_address(tiny, &used), None);
    let v6: IpNet = "fd00::/120".parse().unwrap();
    assert_eq!(
        gateway_of(v6).to_string(),
        "fd00::1/128",
        "not the Subnet-Router anycast address"
    );
    assert_eq!(free_address(v6, &HashSet::new()), Some("fd00::2".parse().unwrap()));
    assert_eq!(gateway_of(p).to_string(), "172.16.3.0/32");
}
