//! Every branch of [`plan`], table by table: a registry view, a client, what stands, what the
//! kernel shows, and the decision expected.

use std::collections::{HashMap, HashSet};

use nsm_model::pb::registry;

use super::*;

const ME: &str = "node-a";

fn meta(ns: &str, name: &str) -> Option<pb::ObjectMeta> {
    Some(pb::ObjectMeta {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ..Default::default()
    })
}

fn service(name: &str, f: impl FnOnce(&mut pb::NetworkServiceSpec)) -> pb::Resource {
    let mut spec = pb::NetworkServiceSpec::default();
    f(&mut spec);
    pb::Resource {
        kind: Some(pb::resource::Kind::NetworkService(pb::NetworkService {
            metadata: meta("default", name),
            spec: Some(spec),
        })),
    }
}

fn endpoint(name: &str, f: impl FnOnce(&mut pb::EndpointSpec)) -> pb::Resource {
    let mut spec = pb::EndpointSpec::default();
    f(&mut spec);
    pb::Resource {
        kind: Some(pb::resource::Kind::Endpoint(pb::Endpoint {
            metadata: meta("default", name),
            spec: Some(spec),
        })),
    }
}

/// An endpoint of `svc` in namespace `netns` on `node`, with `labels`.
fn ep_on(name: &str, svc: &str, node: &str, netns: &str, labels: &[(&str, &str)]) -> pb::Resource {
    endpoint(name, |s| {
        s.network_services = vec![svc.into()];
        s.node = node.into();
        s.netns = netns.into();
        if !labels.is_empty() {
            s.service_labels.insert(
                svc.into(),
                registry::NetworkServiceLabels {
                    labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
                },
            );
        }
    })
}

fn node(name: &str, address: &str, url: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Node(pb::Node {
            metadata: meta("", name),
            spec: Some(pb::NodeSpec {
                address: address.into(),
                url: url.into(),
                ..Default::default()
            }),
        })),
    }
}

fn view(items: Vec<pb::Resource>) -> View {
    let mut v = View::default();
    for r in items {
        v.apply(r, false);
    }
    v
}

fn client(svc: &str, f: impl FnOnce(&mut pb::ClientSpec)) -> pb::Client {
    let mut spec = pb::ClientSpec {
        network_service: svc.into(),
        node: ME.into(),
        netns: "/run/netns/pod".into(),
        interface: "nsm-1".into(),
        ..Default::default()
    };
    f(&mut spec);
    pb::Client {
        metadata: meta("default", "c1"),
        spec: Some(spec),
        status: None,
    }
}

fn ready(c: &mut pb::Client, endpoint: &str, mechanism: &str, src: &str, dst: &str) {
    c.status = Some(pb::ClientStatus {
        phase: Phase::Ready as i32,
        endpoint: endpoint.into(),
        mechanism: mechanism.into(),
        src_ip_addrs: vec![src.into()],
        dst_ip_addrs: vec![dst.into()],
        ..Default::default()
    });
}

fn pair(src: &str, dst: &str) -> Pair {
    Pair {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
    }
}

fn standing(endpoint: &str, remote: bool, mechanism: MechanismKind) -> Standing {
    Standing {
        endpoint: endpoint.into(),
        netns: "/run/netns/pod".into(),
        interface: "nsm-1".into(),
        pair: pair("169.254.100.1/32", "169.254.100.2/32"),
        remote,
        route: None,
        nat: false,
        mechanism,
        refreshed: None,
        uid: "uid-c1".into(),
    }
}

fn up(addrs: &[&str]) -> Observed {
    Observed {
        lower_up: true,
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

/// One case: the inputs that vary, everything else as `run` sets it.
struct Case<'a> {
    view: View,
    client: pb::Client,
    standing: Option<Standing>,
    observed: Option<Observed>,
    rr: usize,
    gone: &'a [&'a str],
}

impl<'a> Case<'a> {
    fn new(view: View, client: pb::Client) -> Self {
        Case {
            view,
            client,
            standing: None,
            observed: None,
            rr: 0,
            gone: &[],
        }
    }
    fn standing(mut self, s: Standing, o: Option<Observed>) -> Self {
        self.standing = Some(s);
        self.observed = o;
        self
    }
    fn observed(mut self, o: Observed) -> Self {
        self.observed = Some(o);
        self
    }
    fn rr(mut self, rr: usize) -> Self {
        self.rr = rr;
        self
    }
    fn gone(mut self, gone: &'a [&'a str]) -> Self {
        self.gone = gone;
        self
    }
    fn run(&self, mono: Instant) -> Decision {
        let gone: HashSet<&str> = self.gone.iter().copied().collect();
        let exists = |p: &str| !gone.contains(p);
        plan(&Input {
            me: Me {
                name: ME,
                underlay: "192.0.2.1".parse().unwrap(),
            },
            client: &self.client,
            view: &self.view,
            standing: self.standing.as_ref(),
            observed: self.observed.as_ref(),
            rr: self.rr,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            mono,
            refresh_after: Duration::from_secs(15),
            netns_exists: &exists,
        })
    }
}

fn not_ready(d: &Decision) -> (Phase, &str) {
    match d {
        Decision::NotReady(nr) => (nr.phase, nr.reason.as_str()),
        other => panic!("expected NotReady, got {other:?}"),
    }
}

fn target_of(d: &Decision) -> &Target {
    match d {
        Decision::Keep(t) | Decision::Refresh(t) | Decision::Build(t, _) | Decision::Rebuild(t, _, _) => t,
        Decision::Adopt { target, .. } | Decision::Heal { target, .. } => target,
        other => panic!("expected a target, got {other:?}"),
    }
}

fn local_ep(name: &str) -> pb::Resource {
    ep_on(name, "svc", ME, &format!("/run/netns/{name}"), &[])
}

#[test]
fn not_this_nodes_client_is_torn_down() {
    let c = client("svc", |s| s.node = "node-b".into());
    assert_eq!(Case::new(View::default(), c).run(Instant::now()), Decision::TearDown);
}

#[test]
fn pending_and_failed_before_an_endpoint_is_chosen() {
    let expired = endpoint("old", |s| {
        s.network_services = vec!["svc".into()];
        s.netns = "/run/netns/old".into();
        s.node = ME.into();
        s.expiration_time = Some(prost_types_ts(10));
    });
    let cases: Vec<(&str, Case<'_>, Phase, &str)> = vec![
        (
            "a service name that does not parse",
            Case::new(View::default(), client("a.b.c", |_| {})),
            Phase::Failed,
            "spec.networkService",
        ),
        (
            "no such service and no pinned endpoint",
            Case::new(View::default(), client("svc", |_| {})),
            Phase::Pending,
            "network service \"svc\" not found",
        ),
        (
            "no endpoint offers the service",
            Case::new(view(vec![service("svc", |_| {})]), client("svc", |_| {})),
            Phase::Pending,
            "no live endpoint for network service \"svc\"",
        ),
        (
            "the only endpoint's registration expired",
            Case::new(view(vec![service("svc", |_| {}), expired]), client("svc", |_| {})),
            Phase::Pending,
            "no live endpoint",
        ),
        (
            "the only endpoint's namespace on this node is gone",
            Case::new(
                view(vec![service("svc", |_| {}), local_ep("e1")]),
                client("svc", |_| {}),
            )
            .gone(&["/run/netns/e1"]),
            Phase::Pending,
            "no live endpoint",
        ),
        (
            "the pinned endpoint does not exist",
            Case::new(View::default(), client("svc", |s| s.endpoint = "nope".into())),
            Phase::Pending,
            "endpoint \"nope\" not found",
        ),
        (
            "the pinned endpoint offers other services",
            Case::new(
                view(vec![ep_on("e1", "other", ME, "/run/netns/e1", &[])]),
                client("svc", |s| s.endpoint = "e1".into()),
            ),
            Phase::Failed,
            "endpoint \"e1\" does not offer network service \"svc\" (it offers other)",
        ),
        (
            "an endpoint with neither namespace nor address",
            Case::new(
                view(vec![endpoint("e1", |_| {})]),
                client("svc", |s| s.endpoint = "e1".into()),
            ),
            Phase::Failed,
            "has neither a network namespace nor an address",
        ),
        (
            "an endpoint address that is not an IP address",
            Case::new(
                view(vec![endpoint("e1", |s| s.address = "vm.example".into())]),
                client("svc", |s| s.endpoint = "e1".into()),
            ),
            Phase::Failed,
            "address \"vm.example\" is not an IP address",
        ),
        (
            "the endpoint's node is not registered",
            Case::new(
                view(vec![
                    service("svc", |_| {}),
                    ep_on("e1", "svc", "node-b", "/run/netns/e1", &[]),
                ]),
                client("svc", |_| {}),
            ),
            Phase::Pending,
            "node \"node-b\" of endpoint \"e1\" is not registered",
        ),
        (
            "the endpoint's node advertises no URL",
            Case::new(
                view(vec![
                    service("svc", |_| {}),
                    ep_on("e1", "svc", "node-b", "/run/netns/e1", &[]),
                    node("node-b", "192.0.2.2", ""),
                ]),
                client("svc", |_| {}),
            ),
            Phase::Pending,
            "node \"node-b\" advertises no URL",
        ),
        (
            "the endpoint's node has no underlay address",
            Case::new(
                view(vec![
                    service("svc", |_| {}),
                    ep_on("e1", "svc", "node-b", "/run/netns/e1", &[]),
                    node("node-b", "", "tcp://192.0.2.2:5001"),
                ]),
                client("svc", |_| {}),
            ),
            Phase::Failed,
            "node \"node-b\" has no underlay address",
        ),
        (
            "a service CIDR that does not parse",
            Case::new(
                view(vec![service("svc", |s| s.cidr = "bogus".into()), local_ep("e1")]),
                client("svc", |_| {}),
            ),
            Phase::Failed,
            "the service's CIDR does not parse",
        ),
        (
            "an IPv6 pool for an IPv4 address endpoint",
            Case::new(
                view(vec![endpoint("vm", |s| s.address = "10.0.0.5".into())]),
                client("svc", |s| s.endpoint = "vm".into()),
            )
            .rr(0),
            Phase::Failed,
            "",
        ),
    ];
    for (what, case, phase, reason) in cases {
        let mut case = case;
        if what.starts_with("an IPv6 pool") {
            case.view.apply(service("svc", |s| s.cidr = "fd00::/64".into()), false);
        }
        let d = case.run(Instant::now());
        let (p, r) = not_ready(&d);
        assert_eq!(p, phase, "{what}: {r}");
        assert!(r.contains(reason), "{what}: {r:?} lacks {reason:?}");
        if what.starts_with("an IPv6 pool") {
            assert!(r.contains("other IP family"), "{what}: {r}");
        }
    }
}

fn prost_types_ts(secs: i64) -> ::prost_types::Timestamp {
    ::prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

#[test]
fn a_vl3_service_is_left_to_the_member_planner() {
    let v = view(vec![
        service("mesh", |s| s.r#type = pb::ServiceType::Vl3 as i32),
        service("web", |s| {
            s.r#type = pb::ServiceType::Vl3 as i32;
            s.vl3 = "mesh".into();
        }),
    ]);
    for (svc, vl3) in [("mesh", "mesh"), ("web", "mesh")] {
        let d = Case::new(v.clone(), client(svc, |_| {})).run(Instant::now());
        assert_eq!(
            d,
            Decision::Member {
                service: svc.into(),
                vl3: vl3.into()
            }
        );
    }
}

#[test]
fn selection_follows_matches_then_round_robin_and_stays_while_eligible() {
    let v = view(vec![
        service("svc", |s| {
            s.matches = vec![
                registry::Match {
                    source_selector: HashMap::from([("app".into(), "web".into())]),
                    routes: vec![registry::Destination {
                        destination_selector: HashMap::from([("version".into(), "v2".into())]),
                        weight: 0,
                    }],
                    fallthrough: false,
                    metadata: None,
                },
                registry::Match::default(),
            ];
        }),
        ep_on("e1", "svc", ME, "/run/netns/e1", &[("version", "v1")]),
        ep_on("e2", "svc", ME, "/run/netns/e2", &[("version", "v2")]),
        ep_on("e3", "svc", ME, "/run/netns/e3", &[("version", "v2")]),
    ]);
    let web = |rr| {
        let mut c = client("svc", |_| {});
        c.metadata.as_mut().unwrap().labels.insert("app".into(), "web".into());
        Case::new(v.clone(), c).rr(rr)
    };
    let now = Instant::now();
    // (case, endpoint picked, whether the counter was used)
    let cases = [
        (web(0), "e2", true),
        (web(1), "e3", true),
        (web(2), "e2", true),
        // Not app=web: the second match takes every endpoint.
        (Case::new(v.clone(), client("svc", |_| {})).rr(2), "e3", true),
        // e3 stands and is eligible: kept whatever the counter says.
        (
            web(0).standing(standing("e3", false, MechanismKind::Kernel), Some(up(&[]))),
            "e3",
            false,
        ),
        // e1 stands but app=web clients may only have v2: healed to the counter's pick.
        (
            web(1).standing(standing("e1", false, MechanismKind::Kernel), Some(up(&[]))),
            "e3",
            true,
        ),
        // e2's namespace is gone: not live.
        (web(0).gone(&["/run/netns/e2"]), "e3", true),
    ];
    for (i, (case, endpoint, rr_used)) in cases.into_iter().enumerate() {
        let d = case.run(now);
        let t = target_of(&d);
        assert_eq!((t.endpoint.as_str(), t.rr_used), (endpoint, rr_used), "case {i}: {d:?}");
    }
}

#[test]
fn far_ends() {
    let b_url = "tcp://192.0.2.2:5001";
    let v = view(vec![
        service("svc", |_| {}),
        node("node-b", "192.0.2.2", b_url),
        ep_on("local", "svc", ME, "/run/netns/local", &[]),
        ep_on("there", "svc", "node-b", "/run/netns/there", &[]),
        endpoint("vm", |s| s.address = "10.0.0.5".into()),
        endpoint("me", |s| s.address = "192.0.2.1".into()),
        endpoint("server", |s| s.address = "192.0.2.2".into()),
    ]);
    let cases = [
        (
            "local",
            Far::Local {
                netns: "/run/netns/local".into(),
            },
        ),
        (
            "there",
            Far::Remote {
                node: "node-b".into(),
                url: b_url.into(),
                underlay: "192.0.2.2".parse().unwrap(),
                target: None,
            },
        ),
        (
            "vm",
            Far::Gateway {
                target: "10.0.0.5".parse().unwrap(),
                nat: true,
            },
        ),
        (
            "me",
            Far::Gateway {
                target: "192.0.2.1".parse().unwrap(),
                nat: false,
            },
        ),
        (
            "server",
            Far::Remote {
                node: "node-b".into(),
                url: b_url.into(),
                underlay: "192.0.2.2".parse().unwrap(),
                target: Some("192.0.2.2".parse().unwrap()),
            },
        ),
    ];
    for (ep, far) in cases {
        let d = Case::new(v.clone(), client("svc", |s| s.endpoint = ep.into())).run(Instant::now());
        assert_eq!(target_of(&d).far, far, "{ep}");
        assert!(matches!(d, Decision::Build(..)), "{ep}: {d:?}");
    }
}

#[test]
fn what_stands_is_kept_refreshed_rebuilt_or_healed() {
    let b_url = "tcp://192.0.2.2:5001";
    let v = view(vec![
        service("svc", |_| {}),
        service("enc", |s| s.encryption = "required".into()),
        node("node-b", "192.0.2.2", b_url),
        local_ep("e1"),
        local_ep("e2"),
        ep_on("far", "svc", "node-b", "/run/netns/far", &[]),
        ep_on("far-enc", "enc", "node-b", "/run/netns/far", &[]),
    ]);
    let now = Instant::now();
    let refreshed = |ago: u64| {
        let mut s = standing("far", true, MechanismKind::Vxlan);
        s.refreshed = Some(now - Duration::from_secs(ago));
        s
    };
    let mut moved = standing("e1", false, MechanismKind::Kernel);
    moved.netns = "/run/netns/elsewhere".into();
    let mut was_local = standing("far", false, MechanismKind::Kernel);
    was_local.remote = false;
    let mut enc_vxlan = standing("far-enc", true, MechanismKind::Vxlan);
    enc_vxlan.refreshed = Some(now);
    let mut replaced = standing("e1", false, MechanismKind::Kernel);
    replaced.uid = "uid-of-an-earlier-c1".into();
    let ok = Some(up(&["169.254.100.1/32"]));
    let pinned = |ep: &str| client(if ep == "far-enc" { "enc" } else { "svc" }, |s| s.endpoint = ep.into());
    let cases: Vec<(&str, Case<'_>, &str)> = vec![
        (
            "local, up",
            Case::new(v.clone(), pinned("e1")).standing(standing("e1", false, MechanismKind::Kernel), ok.clone()),
            "keep",
        ),
        (
            "remote, never refreshed",
            Case::new(v.clone(), pinned("far")).standing(standing("far", true, MechanismKind::Vxlan), ok.clone()),
            "refresh",
        ),
        (
            "remote, refreshed 20 s ago",
            Case::new(v.clone(), pinned("far")).standing(refreshed(20), ok.clone()),
            "refresh",
        ),
        (
            "remote, refreshed 5 s ago",
            Case::new(v.clone(), pinned("far")).standing(refreshed(5), ok.clone()),
            "keep",
        ),
        (
            "gone from the kernel",
            Case::new(v.clone(), pinned("e1")).standing(standing("e1", false, MechanismKind::Kernel), None),
            "build",
        ),
        (
            "down",
            Case::new(v.clone(), pinned("e1"))
                .standing(standing("e1", false, MechanismKind::Kernel), Some(Observed::default())),
            "build",
        ),
        (
            "pinned to another endpoint",
            Case::new(v.clone(), pinned("e2")).standing(standing("e1", false, MechanismKind::Kernel), ok.clone()),
            "heal",
        ),
        (
            "the workload moved",
            Case::new(v.clone(), pinned("e1")).standing(moved, ok.clone()),
            "rebuild Workload",
        ),
        (
            "the far end moved to another node",
            Case::new(v.clone(), pinned("far")).standing(was_local, ok.clone()),
            "rebuild Path",
        ),
        (
            "encryption now required",
            Case::new(v.clone(), pinned("far-enc")).standing(enc_vxlan, ok.clone()),
            "rebuild Encryption",
        ),
    ];
    for (what, case, expected) in cases {
        let d = case.run(now);
        let got = match &d {
            Decision::Keep(_) => "keep".to_owned(),
            Decision::Refresh(_) => "refresh".to_owned(),
            Decision::Build(..) => "build".to_owned(),
            Decision::Heal { from, .. } => {
                assert_eq!(from, "e1");
                "heal".to_owned()
            }
            Decision::Rebuild(_, _, why) => format!("rebuild {why:?}"),
            other => format!("{other:?}"),
        };
        assert_eq!(got, expected, "{what}");
    }
}

#[test]
fn an_earlier_runs_vwire_is_adopted_only_when_the_kernel_has_it_as_the_status_says() {
    let v = view(vec![
        service("svc", |_| {}),
        node("node-b", "192.0.2.2", "tcp://192.0.2.2:5001"),
        local_ep("e1"),
        ep_on("far", "svc", "node-b", "/run/netns/far", &[]),
    ]);
    let (src, dst) = ("169.254.100.7/32", "169.254.100.8/32");
    let was = |ep: &str, mech: &str| {
        let mut c = client("svc", |s| s.endpoint = ep.into());
        ready(&mut c, ep, mech, src, dst);
        c
    };
    let now = Instant::now();
    let cases: Vec<(&str, Case<'_>, Option<MechanismKind>)> = vec![
        (
            "veth with its address",
            Case::new(v.clone(), was("e1", "KERNEL")).observed(up(&[src])),
            Some(MechanismKind::Kernel),
        ),
        (
            "VXLAN with its address",
            Case::new(v.clone(), was("far", "VXLAN")).observed(up(&[src])),
            Some(MechanismKind::Vxlan),
        ),
        (
            "WIREGUARD: its tunnel went with the old process",
            Case::new(v.clone(), was("far", "WIREGUARD")).observed(up(&[src])),
            None,
        ),
        (
            "another address",
            Case::new(v.clone(), was("e1", "KERNEL")).observed(up(&["169.254.100.9/32"])),
            None,
        ),
        (
            "down",
            Case::new(v.clone(), was("e1", "KERNEL")).observed(Observed {
                lower_up: false,
                addresses: vec![src.parse().unwrap()],
            }),
            None,
        ),
        ("not there", Case::new(v.clone(), was("e1", "KERNEL")), None),
        (
            "status for another endpoint",
            Case::new(v.clone(), was("e1", "KERNEL")).observed(up(&[src])),
            Some(MechanismKind::Kernel),
        ),
    ];
    for (what, mut case, adopted) in cases {
        if what.starts_with("status for another") {
            case.client.spec.as_mut().unwrap().endpoint = "far".into();
        }
        let d = case.run(now);
        match (adopted, &d) {
            (
                Some(m),
                Decision::Adopt {
                    allocation, mechanism, ..
                },
            ) => {
                assert_eq!((*mechanism, allocation.wanted), (m, Some(pair(src, dst))), "{what}");
            }
            (None, Decision::Build(_, alloc)) => {
                // Rebuilding keeps the status's pair when the status was for this endpoint.
                assert_eq!(alloc.wanted, Some(pair(src, dst)), "{what}");
            }
            (Some(_), Decision::Build(_, alloc)) if what.starts_with("status for another") => {
                assert_eq!(alloc.wanted, None, "{what}: a status for another endpoint is no claim");
            }
            _ => panic!("{what}: {d:?}"),
        }
    }
}

#[test]
fn allocation_from_the_services_pool_wants_the_last_pair_only_if_it_fits() {
    let v = view(vec![service("svc", |s| s.cidr = "10.60.0.0/24".into()), local_ep("e1")]);
    let now = Instant::now();
    let mut inside = client("svc", |_| {});
    ready(&mut inside, "e1", "KERNEL", "10.60.0.5/32", "10.60.0.6/32");
    let mut outside = client("svc", |_| {});
    ready(&mut outside, "e1", "KERNEL", "169.254.100.1/32", "169.254.100.2/32");
    let mut failed = inside.clone();
    failed.status.as_mut().unwrap().phase = Phase::Failed as i32;
    let cases = [
        (inside, Some(pair("10.60.0.5/32", "10.60.0.6/32"))),
        (outside, None),
        (failed, None),
    ];
    for (c, wanted) in cases {
        match Case::new(v.clone(), c).run(now) {
            Decision::Build(_, a) => {
                assert_eq!(a.pool, "10.60.0.0/24".parse::<IpNet>().unwrap());
                assert_eq!(a.wanted, wanted);
            }
            d => panic!("{d:?}"),
        }
    }
    // No CIDR: the default pool.
    let v = view(vec![service("svc", |_| {}), local_ep("e1")]);
    match Case::new(v, client("svc", |_| {})).run(now) {
        Decision::Build(_, a) => assert_eq!(a.pool.to_string(), DEFAULT_POOL),
        d => panic!("{d:?}"),
    }
}

#[test]
fn only_what_can_be_adopted_or_stands_is_looked_at() {
    let mut c = client("svc", |_| {});
    assert_eq!(observe(&c, None), None, "a new client: nothing to look at");
    ready(&mut c, "e1", "KERNEL", "169.254.100.1/32", "169.254.100.2/32");
    assert_eq!(observe(&c, None), Some(("/run/netns/pod", "nsm-1")));
    c.status.as_mut().unwrap().mechanism = "WIREGUARD".into();
    assert_eq!(observe(&c, None), None, "a WIREGUARD tunnel is never adopted");
    let mut s = standing("e1", false, MechanismKind::Kernel);
    s.interface = "nsm-9".into();
    assert_eq!(observe(&c, Some(&s)), Some(("/run/netns/pod", "nsm-9")));
}

#[test]
fn the_status_path_names_every_hop() {
    let key = ClientKey::new("default", "c1");
    let me = Me {
        name: ME,
        underlay: "192.0.2.1".parse().unwrap(),
    };
    let mut t = Target {
        service: "svc".into(),
        endpoint: "e1".into(),
        far: Far::Local {
            netns: "/run/netns/e1".into(),
        },
        encryption: Encryption::None,
        rr_used: false,
    };
    assert_eq!(t.path(&key, &me), ["c1", ME, "e1"]);
    t.far = Far::Remote {
        node: "node-b".into(),
        url: String::new(),
        underlay: "192.0.2.2".parse().unwrap(),
        target: None,
    };
    assert_eq!(t.path(&key, &me), ["c1", ME, "node-b", "e1"]);
}
