//! Hostile input from an authenticated peer (issue 18): a node holding a valid identity sends the
//! endpoint's node requests that would have it touch what it does not own. Each is refused with a
//! clear error, and the endpoint's namespace and its host's — links, addresses, routes of every
//! table, nft rules — are exactly as before.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{NSM, NodeProc, node_args, nsmctl, nsmctl_in, ok, phase, two_hosts, wait_client};
use nsm_api::connection::{Connection, Mechanism, Path as ConnPath, PathSegment};
use nsm_api::connectioncontext::{ConnectionContext, IpContext};
use nsm_api::networkservice::{NetworkServiceRequest, network_service_client::NetworkServiceClient};
use nsm_identity::{Credentials, Expect, SpiffeId, Svid};
use nsm_testbed::Testbed;
use nsm_testing::NsmRegistry;

/// Everything of a namespace an attack could change.
fn state(bed: &Testbed, ns: &str) -> String {
    let mut out = String::new();
    for cmd in [
        &["ip", "-o", "link", "show"][..],
        &["ip", "-o", "addr", "show"],
        &["ip", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
        &["nft", "list", "ruleset"],
    ] {
        let o = bed.exec(ns, cmd);
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    // Counters and timers move by themselves; what matters is what exists.
    out.lines()
        .filter(|l| !l.contains("expires"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_node_cannot_make_the_endpoint_node_touch_what_it_does_not_own() {
    let bed = two_hosts("hard").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "192.0.2.11", &[]));
    let b = NodeProc::start_with(&registry.url(), "node-b", &node_args(&bed, "h2", "192.0.2.12", &[]));
    ok(nsmctl(&registry, &["ns", "create", "plain", "--cidr", "10.73.0.0/24"]));
    ok(nsmctl(
        &registry,
        &[
            "ns",
            "create",
            "secret",
            "--cidr",
            "10.74.0.0/24",
            "--encryption",
            "required",
        ],
    ));
    ok(nsmctl(
        &registry,
        &[
            "endpoint",
            "create",
            "ep",
            "--service",
            "plain,secret",
            "--node",
            "node-b",
            "--netns",
            &path("svc"),
        ],
    ));
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c1", "--service", "plain"],
    ));
    let c1 = wait_client(&registry, &a, "c1", "Ready", |j| phase(j) == "Ready");
    // The service's encryption is a floor: a client asking for none still gets WIREGUARD.
    ok(nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c2", "--service", "secret", "--encryption", "none"],
    ));
    let c2 = wait_client(&registry, &a, "c2", "Ready", |j| phase(j) == "Ready");
    assert_eq!(c2["status"]["mechanism"], "WIREGUARD", "{c2:#}");

    // node-a's identity, talking to node-b's TCP API directly.
    let (svid, bundle) = Svid::load(&a.data_dir().join("identity")).unwrap().unwrap();
    let key = svid.key_pkcs8_der().to_vec();
    let node_b = ok(nsmctl(&registry, &["get", "node", "node-b", "-o", "json"]));
    let node_b: serde_json::Value = serde_json::from_str(&node_b).unwrap();
    let url = node_b["spec"]["url"].as_str().unwrap().to_owned();
    let ch = nsm_transport::connect_secure(
        &url,
        Duration::from_secs(5),
        &nsm_transport::ClientSecurity::Mtls {
            credentials: Credentials::new(svid, &bundle).unwrap(),
            expect: Expect::Id(SpiffeId::node("nsm.local", "node-b").unwrap()),
        },
    )
    .await
    .unwrap();
    let mut api = NetworkServiceClient::new(ch);
    let (sa, sb) = ("spiffe://nsm.local/node/node-a", "spiffe://nsm.local/node/node-b");
    let uid = |j: &serde_json::Value| j["metadata"]["uid"].as_str().unwrap().to_owned();
    let request = |client: &str, id: &str, service: &str, src: &str, dst: &str, mechanism: &str| {
        let exp = SystemTime::now() + Duration::from_secs(600);
        let seg = |name: &str, token: String| PathSegment {
            name: name.into(),
            id: id.into(),
            token,
            expires: None,
            metrics: Default::default(),
        };
        let sub = format!("spiffe://nsm.local/ns/default/client/{client}");
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: service.into(),
                network_service_endpoint_name: "ep".into(),
                context: Some(ConnectionContext {
                    ip_context: Some(IpContext {
                        src_ip_addrs: vec![src.into()],
                        dst_ip_addrs: vec![dst.into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                path: Some(ConnPath {
                    index: 1,
                    path_segments: vec![
                        seg(client, nsm_policy::sign(&sub, sa, exp, &key).unwrap()),
                        seg("node-a", nsm_policy::sign(sa, sb, exp, &key).unwrap()),
                    ],
                }),
                ..Default::default()
            }),
            mechanism_preferences: vec![Mechanism {
                cls: "REMOTE".into(),
                r#type: mechanism.into(),
                parameters: [
                    ("src_ip".to_string(), "192.0.2.11".to_string()),
                    ("vni".to_string(), "4242".to_string()),
                ]
                .into(),
            }],
        }
    };
    let before = (state(&bed, "svc"), state(&bed, "h2"));
    let (u1, u2) = (uid(&c1), uid(&c2));
    #[rustfmt::skip]
    let attacks: &[(&str, NetworkServiceRequest, tonic::Code, &str)] = &[
        ("a default route as an address", request("c1", &u1, "plain", "0.0.0.0/0", "10.73.0.2/32", "VXLAN"),
            tonic::Code::InvalidArgument, "not a single address"),
        ("a prefix as the peer", request("c1", &u1, "plain", "10.73.0.1/32", "192.0.2.0/24", "VXLAN"),
            tonic::Code::InvalidArgument, "not a single address"),
        ("loopback", request("c1", &u1, "plain", "127.0.0.1/32", "10.73.0.2/32", "VXLAN"),
            tonic::Code::InvalidArgument, "cannot be a vWire's address"),
        ("addresses outside the service's pool", request("c1", &u1, "plain", "192.0.2.12/32", "192.0.2.11/32", "VXLAN"),
            tonic::Code::PermissionDenied, "pool 10.73.0.0/24"),
        ("plaintext for a required service", request("c2", &u2, "secret", "10.74.0.1/32", "10.74.0.2/32", "VXLAN"),
            tonic::Code::PermissionDenied, "requires encryption"),
        ("another client's service", request("c1", &u1, "secret", "10.74.0.1/32", "10.74.0.2/32", "VXLAN"),
            tonic::Code::PermissionDenied, "the client asks for"),
    ];
    for (what, req, code, needle) in attacks {
        let e = api.request(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), *code, "{what}: {e:?}");
        assert!(e.message().contains(needle), "{what}: {}", e.message());
    }
    let after = (state(&bed, "svc"), state(&bed, "h2"));
    assert_eq!(before.0, after.0, "the endpoint's namespace changed");
    assert_eq!(before.1, after.1, "the endpoint node's host changed");
    // The vWires stand as they were.
    assert!(bed.ping("pod", common::dst_of(&c1).parse().unwrap(), 2));
    assert!(bed.ping("pod", common::dst_of(&c2).parse().unwrap(), 2));
    drop((a, b));
    bed.down().await.unwrap();
}
