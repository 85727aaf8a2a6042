//! Zero trust against real processes (docs/SECURITY.md): a registry with its CA, nodes that join
//! with one-time tokens, namespaced users, and callers that try what they may not — each refusal
//! checked to have changed nothing.

mod common;

use std::path::Path;

use common::{NSM, NodeProc, nsmctl, ok};
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use nsm_api::registry::{self as reg, network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient};
use nsm_identity::{ClientConfig, Credentials, Expect, SpiffeId, Svid};
use nsm_model::pb;
use nsm_testing::NsmRegistry;

fn ctl_as(registry: &NsmRegistry, config: &Path, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(nsm_testing::sibling_binary(NSM, "nsmctl").unwrap())
        .args(args)
        .env("NSM_REGISTRY", registry.url())
        .env("NSM_CONFIG", config)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A channel to the registry from a stock TLS client (tonic's own, as any gRPC stack is) presenting
/// the workload SVID in `dir` and verifying the registry by its address with the CA bundle there.
async fn stock_tls_channel(registry: &NsmRegistry, dir: &Path) -> tonic::transport::Channel {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("bundle.pem")))
        .identity(tonic::transport::Identity::from_pem(read("svid.pem"), read("svid.key")))
        .domain_name("127.0.0.1");
    tonic::transport::Endpoint::from_shared(registry.url().replace("tcp://", "https://"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A channel to the registry as the holder of the SVID stored in `identity_dir`.
async fn as_holder(registry: &NsmRegistry, identity_dir: &Path) -> tonic::transport::Channel {
    let (svid, bundle) = Svid::load(identity_dir).unwrap().expect("an identity");
    let credentials = Credentials::new(svid, &bundle).unwrap();
    let expect = Expect::Id(SpiffeId::registry(&credentials.trust_domain()).unwrap());
    nsm_transport::connect_secure(
        &registry.url(),
        std::time::Duration::from_secs(5),
        &nsm_transport::ClientSecurity::Mtls { credentials, expect },
    )
    .await
    .unwrap()
}

fn client_of(node: &str, name: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Client(pb::Client {
            metadata: Some(pb::ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            spec: Some(pb::ClientSpec {
                network_service: "s".into(),
                netns: "/var/run/netns/nowhere".into(),
                node: node.into(),
                ..Default::default()
            }),
            status: None,
        })),
    }
}

#[tokio::test]
async fn identities_tokens_users_and_refusals() {
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let admin = registry.admin_config();
    // The admin config: 0600, and it works; the data directory 0700, the database 0600.
    let mode_of =
        |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
    assert_eq!(mode_of(&admin), 0o600);
    assert_eq!(mode_of(&registry.data_dir()), 0o700);
    assert_eq!(mode_of(&registry.data_dir().join("registry.redb")), 0o600);
    assert_eq!(mode_of(&registry.data_dir().join("ca/ca.key")), 0o600);
    assert!(ok(nsmctl(&registry, &["whoami"])).contains("spiffe://nsm.local/admin/admin"));

    // Plaintext to the mTLS port gets nothing.
    let (good, _, err) = ctl_as(&registry, &admin, &["--insecure", "get", "ns"]);
    assert!(!good, "plaintext worked: {err}");
    // Another domain's admin (a CA this registry does not know) is refused.
    let other = NsmRegistry::start(Path::new(NSM), &["--domain", "other.example"]).unwrap();
    let (good, _, err) = ctl_as(&registry, &other.admin_config(), &["get", "ns"]);
    assert!(!good, "a foreign CA's certificate was accepted");
    assert!(!err.is_empty());

    // Join tokens: malformed and foreign ones refused with clear errors, nothing created.
    let foreign: serde_json::Value = serde_json::from_str(&ok(ctl_as(
        &other,
        &other.admin_config(),
        &["node", "create", "n9", "-o", "json"],
    )))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start_node = |token: &str, data: &Path| {
        std::process::Command::new(NSM)
            .args([
                "node",
                "--join",
                token,
                "--registry",
                &registry.url(),
                "--underlay-address",
                "192.0.2.9",
            ])
            .arg("--data-dir")
            .arg(data)
            .args([
                "--listen",
                &format!("unix://{}/x.sock", data.display()),
                "--no-wireguard",
            ])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let out = start_node("nsmjoin1.garbage", &dir.path().join("a"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--join"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = start_node(foreign["joinToken"].as_str().unwrap(), &dir.path().join("b"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") || err.contains("fingerprint") || err.contains("CA"),
        "{err}"
    );
    assert!(!dir.path().join("b/identity/svid.pem").exists());
    assert!(!ok(nsmctl(&registry, &["get", "nodes"])).contains("n9"));

    // An expired token, and an expired certificate of this very domain, are refused too.
    let short: serde_json::Value = serde_json::from_str(&ok(nsmctl(
        &registry,
        &["node", "create", "n5", "--token-ttl", "1s", "-o", "json"],
    )))
    .unwrap();
    let (ca, _) = nsm_identity::Ca::load_or_create(&registry.data_dir().join("ca"), "nsm.local").unwrap();
    let old = ca
        .issue_new(
            &SpiffeId::admin("nsm.local", "old").unwrap(),
            std::time::Duration::from_secs(1),
            &[],
        )
        .unwrap();
    let old_config = dir.path().join("old.config");
    ClientConfig::new(vec![registry.url()], &old, &ca.bundle_pem())
        .save(&old_config)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = start_node(short["joinToken"].as_str().unwrap(), &dir.path().join("e"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("e/identity/svid.pem").exists());
    let (good, _, err) = ctl_as(&registry, &old_config, &["get", "ns"]);
    assert!(!good, "an expired certificate was accepted");
    assert!(!err.is_empty());

    // A node joins with a token; the same token a second time is refused; a restart rejoins
    // without one.
    let mut n1 = NodeProc::start(&registry.url(), "n1");
    assert!(
        common::eventually(10, || async { n1.log().contains("node registered") }).await,
        "{}",
        n1.log()
    );
    assert_eq!(mode_of(&n1.data_dir()), 0o700);
    assert_eq!(mode_of(&n1.data_dir().join("identity/svid.key")), 0o600);
    let token = ok(nsmctl(&registry, &["node", "token", "n1", "-o", "json"]));
    let token: serde_json::Value = serde_json::from_str(&token).unwrap();
    let t = token["joinToken"].as_str().unwrap().to_owned();
    let fingerprint = nsm_identity::JoinToken::decode(&t).unwrap().ca_fingerprint;
    let join = || async {
        let ch = nsm_transport::connect_secure(
            &registry.url(),
            std::time::Duration::from_secs(5),
            &nsm_transport::ClientSecurity::Joining {
                ca_fingerprint: fingerprint.clone(),
            },
        )
        .await
        .unwrap();
        let csr = nsm_identity::KeyAndCsr::generate().unwrap().csr_der;
        nsm_api::nsm::v1::identity_service_client::IdentityServiceClient::new(ch)
            .join(v1::JoinRequest { token: t.clone(), csr })
            .await
    };
    let first = join().await.unwrap().into_inner();
    assert_eq!(first.spiffe_id, "spiffe://nsm.local/node/n1");
    let second = join().await.unwrap_err();
    assert_eq!(second.code(), tonic::Code::PermissionDenied);
    assert!(second.message().contains("not valid"), "{}", second.message());
    // The token's owner, a node holding no identity, cannot start with the spent token.
    let out = start_node(&t, &dir.path().join("d"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));
    assert!(!dir.path().join("d/identity/svid.pem").exists());
    n1.kill9();
    let before = n1.log().matches("joined the domain").count();
    n1.launch();
    assert!(
        common::eventually(10, || async { n1.log().matches("node registered").count() >= 2 }).await,
        "{}",
        n1.log()
    );
    assert_eq!(
        n1.log().matches("joined the domain").count(),
        before,
        "rejoined with a token"
    );

    // A node acts only for what is placed on it.
    let mut as_n1 = ResourceServiceClient::new(as_holder(&registry, &n1.data_dir().join("identity")).await);
    let e = as_n1
        .create(v1::CreateRequest {
            resource: Some(client_of("n2", "foreign")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("node n1") && e.message().contains("rule"),
        "{}",
        e.message()
    );
    ok(nsmctl(&registry, &["ns", "create", "s"]));
    // The admin creates a client placed on n2; n1 may neither write its status, nor take it over,
    // nor delete it, nor lease its addresses.
    let mut as_admin = ResourceServiceClient::new(registry.channel().await.unwrap());
    as_admin
        .create(v1::CreateRequest {
            resource: Some(client_of("n2", "c2")),
        })
        .await
        .unwrap();
    let r = v1::ResourceRef {
        kind: v1::Kind::Client as i32,
        namespace: "default".into(),
        name: "c2".into(),
    };
    let status = as_n1
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(r.clone()),
            status: Some(pb::ClientStatus {
                phase: pb::client_status::Phase::Ready as i32,
                reason: "forged".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let takeover = as_n1
        .apply(v1::ApplyRequest {
            resource: Some(client_of("n1", "c2")),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(takeover.code(), tonic::Code::PermissionDenied);
    let delete = as_n1
        .delete(v1::DeleteRequest { r#ref: Some(r.clone()) })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), tonic::Code::PermissionDenied);
    let lease = as_n1
        .allocate_addresses(v1::AllocateAddressesRequest {
            client: Some(r.clone()),
            pool: "169.254.100.0/24".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(lease.code(), tonic::Code::PermissionDenied);
    let token = tonic::Request::new(v1::CreateJoinTokenRequest {
        node: "n1".into(),
        ttl_seconds: 60,
    });
    let e = nsm_api::nsm::v1::identity_service_client::IdentityServiceClient::new(
        as_holder(&registry, &n1.data_dir().join("identity")).await,
    )
    .create_join_token(token)
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // Nothing changed.
    let got = as_admin
        .get(v1::GetRequest { r#ref: Some(r) })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::resource::Kind::Client(c)) = got.kind else {
        panic!()
    };
    assert_eq!(c.spec.unwrap().node, "n2");
    assert!(c.status.is_none_or(|s| s.reason != "forged"));

    // Nodes find each other by URL and address: no Node may claim another's (n1 is at 192.0.2.1).
    let dup = nsmctl(&registry, &["node", "create", "dup", "--address", "192.0.2.1"]);
    assert!(!dup.0 && dup.2.contains("is node \"n1\"'s already"), "{dup:?}");
    assert!(!ok(nsmctl(&registry, &["get", "nodes"])).contains("dup"));

    // A deleted node is revoked: its certificate, still unexpired, is refused, and it cannot
    // bring its Node back.
    ok(nsmctl(&registry, &["delete", "node", "n1"]));
    let e = as_n1
        .apply(v1::ApplyRequest {
            resource: Some(pb::Resource {
                kind: Some(pb::resource::Kind::Node(pb::Node {
                    metadata: Some(pb::ObjectMeta {
                        name: "n1".into(),
                        ..Default::default()
                    }),
                    spec: None,
                })),
            }),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("does not exist"), "{}", e.message());
    assert!(!ok(nsmctl(&registry, &["get", "nodes"])).contains("n1 "));

    // Users: alice edits tenant-a and nothing else; deleting her revokes her certificate.
    let alice = dir.path().join("alice.config");
    ok(nsmctl(
        &registry,
        &[
            "user",
            "create",
            "alice",
            "-n",
            "tenant-a",
            "--role",
            "edit",
            "-f",
            alice.to_str().unwrap(),
        ],
    ));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&alice).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(ClientConfig::load(&alice).is_ok());
    ok(ctl_as(&registry, &alice, &["ns", "create", "a1", "-n", "tenant-a"]));
    ok(nsmctl(&registry, &["ns", "create", "b1", "-n", "tenant-b"]));
    for args in [
        &["ns", "create", "b2", "-n", "tenant-b"][..],
        &[
            "endpoint",
            "create",
            "meta",
            "-n",
            "tenant-a",
            "--address",
            "169.254.169.254",
        ],
        &[
            "endpoint",
            "create",
            "host",
            "-n",
            "tenant-a",
            "--service",
            "a1",
            "--node",
            "n1",
            "--netns",
            "/proc/1/ns/net",
        ],
        &[
            "endpoint",
            "create",
            "mitm",
            "-n",
            "tenant-a",
            "--service",
            "b1.tenant-b",
            "--url",
            "tcp://192.0.2.9:5001",
        ],
        &["get", "ns", "-n", "tenant-b"],
        &["delete", "ns", "b1", "-n", "tenant-b"],
        &["get", "nodes"],
        &["get", "ns", "-A"],
        &["node", "create", "evil"],
        &["user", "create", "mallory", "-n", "tenant-b"],
    ] {
        let (good, _, err) = ctl_as(&registry, &alice, args);
        assert!(!good, "alice could {args:?}");
        assert!(err.contains("alice") && err.contains("may not"), "{args:?}: {err}");
    }
    let all = ok(nsmctl(&registry, &["get", "ns", "-A"]));
    assert!(all.contains("b1") && !all.contains("b2"), "{all}");
    assert!(!ok(nsmctl(&registry, &["get", "nodes"])).contains("evil"));
    assert!(!ok(nsmctl(&registry, &["user", "get"])).contains("mallory"));
    // alice mints workload identities in her namespace only.
    let alice_wl = dir.path().join("alice-wl");
    let aw = alice_wl.to_str().unwrap();
    ok(ctl_as(
        &registry,
        &alice,
        &["workload", "issue", "w1", "-n", "tenant-a", "--dir", aw],
    ));
    let (good, _, err) = ctl_as(
        &registry,
        &alice,
        &["workload", "issue", "w2", "-n", "tenant-b", "--dir", aw],
    );
    assert!(!good && err.contains("alice") && err.contains("may not"), "{err}");
    ok(nsmctl(&registry, &["user", "delete", "alice"]));
    let (good, _, err) = ctl_as(&registry, &alice, &["get", "ns", "-n", "tenant-a"]);
    assert!(!good && err.contains("does not exist"), "{err}");

    // A workload identity from the domain CA (`nsmctl workload issue`), presented by a stock TLS
    // client built from upstream's protos that verifies the registry by its address: upstream's
    // registry API works, in the workload's namespace only.
    let wl = dir.path().join("nse-1");
    let issued = ok(nsmctl(
        &registry,
        &[
            "workload",
            "issue",
            "nse-1",
            "-n",
            "tenant-a",
            "--kind",
            "nse",
            "--dir",
            wl.to_str().unwrap(),
        ],
    ));
    assert!(issued.contains("spiffe://nsm.local/ns/tenant-a/nse/nse-1"), "{issued}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(wl.join("svid.key")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let upstream_channel = || stock_tls_channel(&registry, &wl);
    let mut upstream = NetworkServiceEndpointRegistryClient::new(upstream_channel().await);
    let nse = |name: &str, service: &str| reg::NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: vec![service.into()],
        url: "tcp://192.0.2.50:5001".into(),
        ..Default::default()
    };
    upstream
        .register(nse("upstream-nse.tenant-a", "a1.tenant-a"))
        .await
        .unwrap();
    assert!(ok(nsmctl(&registry, &["get", "endpoints", "-n", "tenant-a"])).contains("upstream-nse"));
    for (name, service) in [("x.tenant-b", "b1.tenant-b"), ("y.tenant-a", "b1.tenant-b"), ("z", "s")] {
        let e = upstream.register(nse(name, service)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{name}: {e:?}");
    }
    assert!(!ok(nsmctl(&registry, &["get", "endpoints", "-A"])).contains("x "));
    // A workload leases vL3 prefixes of its own namespace's vL3s only.
    ok(nsmctl(
        &registry,
        &[
            "ns",
            "create",
            "v3",
            "-n",
            "tenant-b",
            "--type",
            "vl3",
            "--cidr",
            "10.90.0.0/16",
        ],
    ));
    let mut ipam = nsm_api::ipam::ipam_client::IpamClient::new(upstream_channel().await);
    let mut r = tonic::Request::new(futures::stream::iter(vec![nsm_api::ipam::PrefixRequest::default()]));
    r.metadata_mut()
        .insert("nsm-network-service", "v3.tenant-b".parse().unwrap());
    let e = ipam.manage_prefixes(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("own namespace"), "{}", e.message());
    assert!(!ok(nsmctl(&registry, &["get", "prefixes", "-n", "tenant-b"])).contains("10.90."));
    // Minting identities is the admins' (and the namespace's users'): not a workload's.
    let e = nsm_api::nsm::v1::identity_service_client::IdentityServiceClient::new(upstream_channel().await)
        .issue_workload(v1::IssueWorkloadRequest {
            namespace: "tenant-a".into(),
            name: "more".into(),
            kind: "nse".into(),
            csr: nsm_identity::KeyAndCsr::generate().unwrap().csr_der,
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}

/// A request path as the client's node stamps it for the endpoint's node `to`: the client's
/// segment and the node's, signed with the node's key (`key`), with these audiences.
fn path(id: &str, node: &str, key: &[u8], client_aud: &str, node_aud: &str, sub: &str) -> nsm_api::connection::Path {
    let exp = std::time::SystemTime::now() + std::time::Duration::from_secs(600);
    let seg = |name: &str, token: String| nsm_api::connection::PathSegment {
        name: name.into(),
        id: id.into(),
        token,
        expires: None,
        metrics: Default::default(),
    };
    nsm_api::connection::Path {
        index: 1,
        path_segments: vec![
            seg(
                "c1.default",
                nsm_policy::sign("spiffe://nsm.local/ns/default/client/c1", client_aud, exp, key).unwrap(),
            ),
            seg(node, nsm_policy::sign(sub, node_aud, exp, key).unwrap()),
        ],
    }
}

#[tokio::test]
async fn path_tokens_and_policies_guard_the_endpoint_node() {
    use nsm_api::connection::{Connection, Mechanism};
    use nsm_api::connectioncontext::{ConnectionContext, IpContext};
    use nsm_api::networkservice::{NetworkServiceRequest, network_service_client::NetworkServiceClient};
    let registry = NsmRegistry::start(Path::new(NSM), &[]).unwrap();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("no_forbidden.rego"),
        "package nsm\n\ndefault valid := false\n\nvalid if input.service != \"forbidden\"\n",
    )
    .unwrap();
    let port_x = common::free_port();
    let port_y = common::free_port();
    let mut x = NodeProc::start_with(
        &registry.url(),
        "x",
        &[
            "--underlay-address".into(),
            "192.0.2.1".into(),
            "--listen".into(),
            format!("tcp://127.0.0.1:{port_x}"),
        ],
    );
    let mut y = NodeProc::start_with(
        &registry.url(),
        "y",
        &[
            "--underlay-address".into(),
            "192.0.2.2".into(),
            "--listen".into(),
            format!("tcp://127.0.0.1:{port_y}"),
            "--policy-dir".into(),
            policies.path().display().to_string(),
        ],
    );
    for n in [&mut x, &mut y] {
        assert!(
            common::eventually(10, || async { n.log().contains("node registered") }).await,
            "{}",
            n.log()
        );
    }
    let (svid, bundle) = Svid::load(&x.data_dir().join("identity")).unwrap().unwrap();
    let key = svid.key_pkcs8_der().to_vec();
    let credentials = Credentials::new(svid, &bundle).unwrap();
    let ch = nsm_transport::connect_secure(
        &format!("tcp://127.0.0.1:{port_y}"),
        std::time::Duration::from_secs(5),
        &nsm_transport::ClientSecurity::Mtls {
            credentials,
            expect: Expect::Id(SpiffeId::node("nsm.local", "y").unwrap()),
        },
    )
    .await
    .unwrap();
    let mut y_api = NetworkServiceClient::new(ch);
    // The client x asks for: on x, so its uid is the connection's id.
    let mut admin = ResourceServiceClient::new(registry.channel().await.unwrap());
    let created = admin
        .create(v1::CreateRequest {
            resource: Some(client_of("x", "c1")),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::resource::Kind::Client(c1)) = created.kind else {
        panic!()
    };
    let uid = c1.metadata.unwrap().uid;
    let uid = uid.as_str();
    let (sx, sy) = ("spiffe://nsm.local/node/x", "spiffe://nsm.local/node/y");
    let request_as = |id: &str, service: &str, p: nsm_api::connection::Path| NetworkServiceRequest {
        connection: Some(Connection {
            id: id.into(),
            network_service: service.into(),
            network_service_endpoint_name: "ep.default".into(),
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec!["169.254.100.1/32".into()],
                    dst_ip_addrs: vec!["169.254.100.2/32".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            path: Some(p),
            ..Default::default()
        }),
        mechanism_preferences: vec![Mechanism {
            cls: "REMOTE".into(),
            r#type: "VXLAN".into(),
            parameters: [
                ("src_ip".to_string(), "192.0.2.1".to_string()),
                ("vni".to_string(), "4242".to_string()),
            ]
            .into(),
        }],
    };
    let request = |service: &str, p: nsm_api::connection::Path| request_as(uid, service, p);
    // A well-stamped request passes every policy: what stops it is the endpoint that does not exist.
    let e = y_api
        .request(request("s", path(uid, "x", &key, sx, sy, sx)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // x may ask only for its own client's connection: not under another id, not for a client
    // placed on another node.
    let e = y_api
        .request(request_as(
            "someone-elses-connection",
            "s",
            path("someone-elses-connection", "x", &key, sx, sy, sx),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not the client's"), "{}", e.message());
    admin
        .create(v1::CreateRequest {
            resource: Some(client_of("y", "c9")),
        })
        .await
        .unwrap();
    let mut on_y = path(uid, "x", &key, sx, sy, sx);
    on_y.path_segments[0].token = nsm_policy::sign(
        "spiffe://nsm.local/ns/default/client/c9",
        sx,
        std::time::SystemTime::now() + std::time::Duration::from_secs(600),
        &key,
    )
    .unwrap();
    let e = y_api.request(request("s", on_y)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("placed on node \"y\""), "{}", e.message());
    // Without a client segment (index 0, the caller's segment alone).
    let mut alone = path(uid, "x", &key, sx, sy, sx);
    alone.path_segments.remove(0);
    alone.index = 0;
    let e = y_api.request(request("s", alone)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Tampered: the node's token with its payload changed (the signature no longer fits).
    let mut tampered = path(uid, "x", &key, sx, sy, sx);
    let t = &mut tampered.path_segments[1].token;
    let parts: Vec<&str> = t.split('.').collect();
    let forged = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        format!(r#"{{"sub":"{sx}","aud":["{sy}"],"exp":9999999999,"iat":1}}"#),
    );
    *t = format!("{}.{forged}.{}", parts[0], parts[2]);
    let e = y_api.request(request("s", tampered)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("prev_token_signed"), "{}", e.message());
    // Replayed: a genuine token of x's that was addressed to another node.
    let e = y_api
        .request(request("s", path(uid, "x", &key, sx, "spiffe://nsm.local/node/z", sx)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("tokens_chained"), "{}", e.message());
    // Claiming to be another node in its own segment.
    let e = y_api
        .request(request(
            "s",
            path(
                uid,
                "x",
                &key,
                "spiffe://nsm.local/node/w",
                sy,
                "spiffe://nsm.local/node/w",
            ),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // No tokens at all.
    let mut bare = path(uid, "x", &key, sx, sy, sx);
    for s in &mut bare.path_segments {
        s.token.clear();
    }
    let e = y_api.request(request("s", bare)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A signer certificate in the metadata that is not the caller's: the admin's (valid, of the
    // domain), and garbage.
    let admin_leaf = ClientConfig::load(&registry.admin_config())
        .unwrap()
        .svid()
        .unwrap()
        .leaf_der()
        .to_vec();
    for (der, needle) in [
        (admin_leaf, "not the caller's"),
        (b"garbage".to_vec(), "nsm-token-signer-bin"),
    ] {
        let mut r = tonic::Request::new(request("s", path(uid, "x", &key, sx, sy, sx)));
        r.metadata_mut()
            .insert_bin("nsm-token-signer-bin", tonic::metadata::MetadataValue::from_bytes(&der));
        let e = y_api.request(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(needle), "{}", e.message());
    }
    // The operator's Rego policy, for a client of x that asks for the forbidden service.
    let mut forbidden = client_of("x", "c2");
    if let Some(pb::resource::Kind::Client(c)) = &mut forbidden.kind {
        c.spec.as_mut().unwrap().network_service = "forbidden".into();
    }
    let created = admin
        .create(v1::CreateRequest {
            resource: Some(forbidden),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::resource::Kind::Client(c2)) = created.kind else {
        panic!()
    };
    let uid2 = c2.metadata.unwrap().uid;
    let mut p2 = path(&uid2, "x", &key, sx, sy, sx);
    p2.path_segments[0].token = nsm_policy::sign(
        "spiffe://nsm.local/ns/default/client/c2",
        sx,
        std::time::SystemTime::now() + std::time::Duration::from_secs(600),
        &key,
    )
    .unwrap();
    let e = y_api.request(request_as(&uid2, "forbidden", p2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("policy no_forbidden refused"), "{}", e.message());
    // Over TCP a node may call nothing but NetworkService.
    let ch = nsm_transport::connect_secure(
        &format!("tcp://127.0.0.1:{port_y}"),
        std::time::Duration::from_secs(5),
        &nsm_transport::ClientSecurity::Mtls {
            credentials: Credentials::new(Svid::load(&x.data_dir().join("identity")).unwrap().unwrap().0, &bundle)
                .unwrap(),
            expect: Expect::Id(SpiffeId::node("nsm.local", "y").unwrap()),
        },
    )
    .await
    .unwrap();
    let e = nsm_api::nsm::v1::node_service_client::NodeServiceClient::new(ch)
        .create_client(v1::CreateRequest {
            resource: Some(client_of("y", "sneaky")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // y built nothing and registered nothing for any of it.
    assert!(!ok(nsmctl(&registry, &["get", "clients"])).contains("sneaky"));
    assert!(!y.log().contains("remote vWire end ready"), "{}", y.log());
}

/// Identities rotate under traffic: with 4 s SVIDs the registry and both nodes renew every ~2 s,
/// while an encrypted cross-node vWire carries 20 pings/s — none is lost, refreshes (new path
/// tokens, signed with the new keys) keep succeeding, and a vWire made afterwards, over fresh
/// handshakes with the rotated certificates, comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_under_traffic_loses_nothing() {
    use common::{endpoint_in, node_args, phase, two_hosts, wait_client};
    let bed = two_hosts("rot").await;
    let path = |n: &str| bed.netns_path(n).display().to_string();
    let registry = NsmRegistry::start(Path::new(NSM), &["--svid-ttl", "4s"]).unwrap();
    let a = NodeProc::start_with(&registry.url(), "node-a", &node_args(&bed, "h1", "192.0.2.11", &[]));
    let b = NodeProc::start_with(&registry.url(), "node-b", &node_args(&bed, "h2", "192.0.2.12", &[]));
    ok(nsmctl(
        &registry,
        &[
            "ns",
            "create",
            "secure",
            "--cidr",
            "10.71.0.0/24",
            "--encryption",
            "required",
        ],
    ));
    endpoint_in(&registry, "ep", "secure", &path("svc"), "node-b");
    let first_svid = std::fs::read_to_string(a.data_dir().join("identity/svid.pem")).unwrap();
    ok(common::nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c1", "--service", "secure"],
    ));
    let j = wait_client(&registry, &a, "c1", "Ready", |j| phase(j) == "Ready");
    assert_eq!(j["status"]["mechanism"], "WIREGUARD", "{j:#}");
    let dst = common::dst_of(&j);
    // 12 s at 20 pings/s: several renewals of every identity in the domain.
    let o = bed.exec("pod", &["ping", "-q", "-i", "0.05", "-c", "240", "-W", "1", &dst]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("240 packets transmitted, 240 received"),
        "{out}\nnode-a:\n{}",
        a.log()
    );
    for (who, log, needle) in [
        ("node-a", a.log(), "renewed the node's SVID"),
        ("node-b", b.log(), "renewed the node's SVID"),
        ("registry", registry.log(), "renewed the registry's SVID"),
    ] {
        let n = log.matches(needle).count();
        assert!(n >= 3, "{who} renewed {n} times:\n{log}");
    }
    assert_ne!(
        std::fs::read_to_string(a.data_dir().join("identity/svid.pem")).unwrap(),
        first_svid,
        "the renewed SVID is stored"
    );
    assert_eq!(
        a.log().matches("refreshing the remote end failed").count(),
        0,
        "refreshes across the renewals:\n{}",
        a.log()
    );
    assert_eq!(phase(&common::client_json(&registry, "c1")), "Ready");
    // Fresh connections with the rotated certificates: a second vWire comes up.
    ok(nsmctl(&registry, &["ns", "create", "plain", "--cidr", "10.72.0.0/24"]));
    endpoint_in(&registry, "ep2", "plain", &path("svc"), "node-b");
    ok(common::nsmctl_in(
        &registry,
        &path("pod"),
        &a,
        &["client", "create", "c2", "--service", "plain"],
    ));
    let j = wait_client(&registry, &a, "c2", "Ready", |j| phase(j) == "Ready");
    assert!(bed.ping("pod", common::dst_of(&j).parse().unwrap(), 2));
    drop((a, b));
    bed.down().await.unwrap();
}
