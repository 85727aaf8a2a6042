//! `nsmctl` against a real `nsm registry` process: the design document's commands, every kind's
//! verbs, apply -f with ours and upstream's CRDs, output formats, and bad input.

use std::io::Write;
use std::process::{Command, Stdio};

use nsm_api::registry::{self as reg, network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient};
use nsm_testing::{NsmRegistry, sibling_binary};

const NSMCTL: &str = env!("CARGO_BIN_EXE_nsmctl");

struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn registry() -> NsmRegistry {
    NsmRegistry::start(&sibling_binary(NSMCTL, "nsm").unwrap(), &[]).unwrap()
}

fn nsmctl(r: &NsmRegistry, args: &[&str]) -> Out {
    nsmctl_stdin(r, args, "")
}

fn nsmctl_stdin(r: &NsmRegistry, args: &[&str], stdin: &str) -> Out {
    let mut child = Command::new(NSMCTL)
        .args(args)
        .env("NSM_REGISTRY", r.url())
        .env("NSM_CONFIG", r.admin_config())
        .env_remove("NSM_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
fn ok(o: Out) -> String {
    assert!(o.ok, "expected success, got {:?}:\n{}{}", o.code, o.stdout, o.stderr);
    o.stdout
}

#[track_caller]
fn fails(o: Out, needle: &str) -> String {
    assert!(
        !o.ok && o.code != Some(0),
        "expected failure, got success:\n{}",
        o.stdout
    );
    assert!(o.stderr.contains(needle), "stderr lacks {needle:?}:\n{}", o.stderr);
    o.stderr
}

#[test]
fn design_document_commands_and_every_verb() {
    let r = registry();
    // The design document's commands, exactly as written.
    assert_eq!(
        ok(nsmctl(
            &r,
            &["ns", "create", "istio-namespace", "--namespace=istio-system"]
        ))
        .trim(),
        "networkservice/istio-namespace created"
    );
    assert_eq!(
        ok(nsmctl(&r, &["endpoint", "create", "vm-endpoint", "--address=10.0.0.5"])).trim(),
        "endpoint/vm-endpoint created"
    );
    ok(nsmctl(
        &r,
        &[
            "node",
            "create",
            "edge-1",
            "--address",
            "192.0.2.20",
            "--labels",
            "zone=edge",
        ],
    ));
    ok(nsmctl(
        &r,
        &[
            "ns",
            "create",
            "orders",
            "--type",
            "vl3",
            "--cidr",
            "172.16.0.0/16",
            "--payload",
            "ip",
            "--match",
            "app=web -> version=v2; fallthrough",
            "--match",
            "-> version=v1",
            "--labels",
            "team=shop",
        ],
    ));
    ok(nsmctl(
        &r,
        &[
            "endpoint",
            "create",
            "orders-v2",
            "--service",
            "orders",
            "--url",
            "tcp://192.0.2.30:5001",
            "--labels",
            "version=v2",
            "--node",
            "edge-1",
        ],
    ));

    // get: tables, -A, -l, names.
    let t = ok(nsmctl(&r, &["get", "ns", "-A"]));
    assert!(t.starts_with("NAMESPACE"), "{t}");
    assert!(
        t.contains("istio-system") && t.contains("istio-namespace") && t.contains("172.16.0.0/16"),
        "{t}"
    );
    let t = ok(nsmctl(&r, &["ns", "get"]));
    assert!(
        t.contains("orders") && !t.contains("istio-namespace"),
        "only the default namespace: {t}"
    );
    let t = ok(nsmctl(&r, &["get", "ns", "-A", "-l", "team=shop"]));
    assert!(t.contains("orders") && !t.contains("istio"), "{t}");
    let t = ok(nsmctl(&r, &["get", "endpoints"]));
    assert!(
        t.contains("vm-endpoint") && t.contains("10.0.0.5") && t.contains("orders-v2"),
        "{t}"
    );
    let t = ok(nsmctl(&r, &["get", "nodes"]));
    assert!(t.contains("edge-1") && t.contains("zone=edge"), "{t}");

    // json / yaml.
    let j: serde_json::Value = serde_json::from_str(&ok(nsmctl(&r, &["get", "ns", "orders", "-o", "json"]))).unwrap();
    assert_eq!(j["kind"], "NetworkService");
    assert_eq!(j["spec"]["type"], "vl3");
    assert_eq!(j["spec"]["matches"][0]["sourceSelector"]["app"], "web");
    assert_eq!(j["spec"]["matches"][0]["fallthrough"], true);
    let j: serde_json::Value = serde_json::from_str(&ok(nsmctl(&r, &["get", "endpoints", "-o", "json"]))).unwrap();
    assert_eq!(j["items"].as_array().unwrap().len(), 2);
    let y = ok(nsmctl(
        &r,
        &["get", "ns", "istio-namespace", "-n", "istio-system", "-o", "yaml"],
    ));
    assert!(
        y.contains("apiVersion: nsm.dev/v1") && y.contains("namespace: istio-system"),
        "{y}"
    );
    // What get -o yaml prints applies back unchanged.
    let back = ok(nsmctl_stdin(&r, &["apply", "-f", "-"], &y));
    assert_eq!(back.trim(), "networkservice/istio-namespace unchanged");

    // describe shows relations.
    let d = ok(nsmctl(&r, &["describe", "ns", "orders"]));
    assert!(
        d.contains("Type:") && d.contains("vl3") && d.contains("Endpoints:") && d.contains("orders-v2"),
        "{d}"
    );
    assert!(d.contains("app=web -> version=v2; fallthrough"), "{d}");
    let d = ok(nsmctl(&r, &["node", "describe", "edge-1"]));
    assert!(d.contains("default/orders-v2"), "{d}");
    let d = ok(nsmctl(&r, &["describe", "endpoint", "vm-endpoint"]));
    assert!(
        d.contains("10.0.0.5") && d.contains("Expires:") && d.contains("never"),
        "{d}"
    );

    // delete.
    assert_eq!(
        ok(nsmctl(&r, &["delete", "endpoint", "orders-v2"])).trim(),
        "endpoint/orders-v2 deleted"
    );
    ok(nsmctl(&r, &["node", "delete", "edge-1"]));
    let t = nsmctl(&r, &["get", "nodes"]);
    assert!(
        t.ok && t.stdout.is_empty() && t.stderr.contains("No node resources found"),
        "{}",
        t.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nsmctl_and_upstream_api_see_each_other() {
    let r = registry();
    ok(nsmctl(
        &r,
        &[
            "endpoint",
            "create",
            "gw",
            "-n",
            "istio-system",
            "--service",
            "istio-namespace",
            "--url",
            "tcp://192.0.2.7:5001",
        ],
    ));
    let ch = r.channel().await.unwrap();
    let mut c = NetworkServiceEndpointRegistryClient::new(ch);
    let q = reg::NetworkServiceEndpoint {
        network_service_names: vec!["istio-namespace.istio-system".into()],
        ..Default::default()
    };
    let mut s = c
        .find(reg::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(q),
            watch: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.message()
            .await
            .unwrap()
            .unwrap()
            .network_service_endpoint
            .unwrap()
            .name,
        "gw.istio-system"
    );

    c.register(reg::NetworkServiceEndpoint {
        name: "nse-icmp-1".into(),
        network_service_names: vec!["icmp-responder".into()],
        url: "tcp://192.0.2.9:5001".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let t = ok(nsmctl(&r, &["get", "nse"]));
    assert!(
        t.contains("nse-icmp-1") && t.contains("icmp-responder") && t.contains("in "),
        "expiring registration: {t}"
    );
}

const MANIFEST: &str = "\
# upstream's CRDs ...
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: nse-composition
spec:
  payload: ETHERNET
  matches:
    - source_selector:
        app: firewall
      routes:
        - destination_selector:
            app: nse-kernel
---
apiVersion: networkservicemesh.io/v1
kind: NetworkServiceEndpoint
metadata:
  name: nse-kernel-1
  namespace: ns-a
spec:
  network_service_names:
    - nse-composition.default
  network_service_labels:
    nse-composition.default:
      labels:
        app: nse-kernel
  url: tcp://192.0.2.40:5001
---
# ... and ours, in one file
apiVersion: nsm.dev/v1
kind: Node
metadata:
  name: host-b
spec:
  address: 198.51.100.2
";

#[test]
fn apply_accepts_upstream_crds_and_ours() {
    let r = registry();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, MANIFEST).unwrap();
    let f = file.to_str().unwrap();
    let out = ok(nsmctl(&r, &["apply", "-f", f]));
    assert_eq!(
        out,
        "networkservice/nse-composition created\nendpoint/nse-kernel-1 created\nnode/host-b created\n"
    );
    let out = ok(nsmctl(&r, &["apply", "-f", f]));
    assert_eq!(
        out,
        "networkservice/nse-composition unchanged\nendpoint/nse-kernel-1 unchanged\nnode/host-b unchanged\n"
    );
    let j: serde_json::Value =
        serde_json::from_str(&ok(nsmctl(&r, &["get", "ns", "nse-composition", "-o", "json"]))).unwrap();
    assert_eq!(j["spec"]["payload"], "ETHERNET");
    assert_eq!(
        j["spec"]["matches"][0]["routes"][0]["destinationSelector"]["app"],
        "nse-kernel"
    );
    let t = ok(nsmctl(&r, &["get", "endpoint", "-n", "ns-a"]));
    assert!(
        t.contains("nse-kernel-1") && t.contains("nse-composition.default"),
        "{t}"
    );
    // --dry-run writes nothing.
    let changed = MANIFEST.replace("198.51.100.2", "198.51.100.3");
    let out = ok(nsmctl_stdin(&r, &["apply", "-f", "-", "--dry-run"], &changed));
    assert!(out.contains("node/host-b configured (dry run)"), "{out}");
    assert!(ok(nsmctl(&r, &["get", "node", "host-b", "-o", "json"])).contains("198.51.100.2"));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let r = registry();
    fails(
        nsmctl(&r, &["ns", "create", "p", "--cidr", "10.0.0.1/8"]),
        "spec.cidr: \"10.0.0.1/8\" has host bits set; did you mean 10.0.0.0/8?",
    );
    fails(nsmctl(&r, &["ns", "create", "p", "--cidr", "banana"]), "spec.cidr");
    fails(nsmctl(&r, &["ns", "create", "Bad_Name"]), "metadata.name");
    fails(nsmctl(&r, &["ns", "create", "p", "--match", "app=web"]), "--match");
    fails(nsmctl(&r, &["ns", "create", "p", "--labels", "novalue"]), "--labels");
    fails(nsmctl(&r, &["ns", "create", "p", "--payload", "udp"]), "--payload");
    fails(
        nsmctl(&r, &["endpoint", "create", "e", "--address", "10.0.0.300"]),
        "spec.address",
    );
    fails(nsmctl(&r, &["endpoint", "create", "e"]), "spec: an endpoint needs");
    fails(
        nsmctl(&r, &["node", "create", "n", "--address", "10.0.0.300"]),
        "spec.address",
    );
    fails(nsmctl(&r, &["get", "gadgets"]), "unknown kind \"gadgets\"");
    fails(
        nsmctl(&r, &["delete", "ns", "nope"]),
        "networkservice \"default/nope\" not found",
    );
    fails(nsmctl(&r, &["describe", "node", "nope"]), "node \"nope\" not found");
    ok(nsmctl(&r, &["node", "create", "n", "--address", "192.0.2.1"]));
    fails(
        nsmctl(&r, &["node", "create", "n", "--address", "192.0.2.2"]),
        "node \"n\" already exists",
    );

    // A bad document anywhere in a file: line and column reported, nothing applied.
    let bad = format!(
        "{MANIFEST}---\napiVersion: nsm.dev/v1\nkind: NetworkService\nmetadata:\n  name: x\nspec:\n  cidr: 10.0.0.0/8\n  colour: red\n"
    );
    // `colour` is the 8th line after the manifest (separator, 6 lines, then it), column 3.
    let line = MANIFEST.lines().count() + 8;
    let err = fails(
        nsmctl_stdin(&r, &["apply", "-f", "-"], &bad),
        &format!("line {line}, column 3"),
    );
    assert!(err.contains("colour"), "{err}");
    let bad = MANIFEST.replace("198.51.100.2", "198.51.100.999");
    fails(
        nsmctl_stdin(&r, &["apply", "-f", "-"], &bad),
        "document 3 (node/host-b): spec.address",
    );
    fails(
        nsmctl_stdin(
            &r,
            &["apply", "-f", "-"],
            "apiVersion: v9\nkind: Pod\nmetadata: {name: a}\n",
        ),
        "unknown apiVersion \"v9\"",
    );
    let t = ok(nsmctl(&r, &["get", "ns", "-A", "-o", "json"]));
    assert!(
        !t.contains("nse-composition"),
        "nothing of a rejected file is applied: {t}"
    );

    // Unreachable registry: the URL and a hint.
    let mut dead = registry();
    dead.kill9();
    fails(nsmctl(&dead, &["get", "ns"]), "cannot reach tcp://127.0.0.1:");
    let o = Command::new(NSMCTL)
        .args(["--registry", "http://x", "get", "ns"])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("invalid URL \"http://x\""));
}

#[test]
fn completions() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(NSMCTL).args(["completion", shell]).output().unwrap();
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("nsmctl"));
    }
}

/// The registry's TCP listener with mutual TLS: SPIFFE-shaped certificates from one CA get in;
/// no certificate, another CA's certificate, plain text, or an untrusted server do not.
#[test]
fn mutual_tls() {
    let r = registry();
    assert!(r.log().contains("(mutual TLS)"), "{}", r.log());
    let other = NsmRegistry::start(&sibling_binary(NSMCTL, "nsm").unwrap(), &["--domain", "other.example"]).unwrap();
    let other_ca = other.data_dir().join("ca").join("ca.pem");
    let other_ca = other_ca.to_str().unwrap();
    // The admin config works; overriding its CA with another domain's distrusts the registry.
    ok(nsmctl(&r, &["get", "nodes"]));
    let o = nsmctl(&r, &["--tls-ca", other_ca, "get", "nodes"]);
    assert!(
        !o.ok,
        "a server the client does not trust must be refused: {}",
        o.stdout
    );
    // Another domain's admin is refused by this registry.
    let o = nsmctl(
        &r,
        &["--config", other.admin_config().to_str().unwrap(), "get", "nodes"],
    );
    assert!(!o.ok, "a certificate of another CA must be refused: {}", o.stdout);
    // Plaintext gets nothing.
    let o = nsmctl(&r, &["--insecure", "get", "nodes"]);
    assert!(!o.ok, "plain text must be refused: {}", o.stdout);
    fails(
        nsmctl(&r, &["--tls-ca", "/nonexistent.pem", "get", "nodes"]),
        "cannot read /nonexistent.pem",
    );
    fails(
        nsmctl(&r, &["--config", "/nonexistent.config", "get", "nodes"]),
        "--config /nonexistent.config",
    );
}

/// Clients (declarative vWires) are resources too: created, listed with their status, described,
/// applied, deleted; a bad client is refused by field.
#[test]
fn clients_as_resources() {
    let r = registry();
    // Declared directly in the registry (what a node daemon does on `nsmctl client create`).
    let doc = "apiVersion: nsm.dev/v1\nkind: Client\nmetadata: {name: orders-vwire}\nspec:\n  networkService: orders\n  endpoint: vm-endpoint\n  netns: /var/run/netns/pod-1\n  node: node-a\n";
    assert_eq!(
        ok(nsmctl_stdin(&r, &["apply", "-f", "-"], doc)).trim(),
        "client/orders-vwire created"
    );
    let t = ok(nsmctl(&r, &["get", "clients"]));
    assert!(
        t.contains("orders-vwire") && t.contains("vm-endpoint") && t.contains("node-a") && t.contains("Pending"),
        "{t}"
    );
    let d = ok(nsmctl(&r, &["describe", "client", "orders-vwire"]));
    assert!(d.contains("/var/run/netns/pod-1"), "{d}");
    assert!(
        d.contains("Pending: waiting for node node-a") && d.contains("Interface:") && d.contains("nsm-1"),
        "{d}"
    );
    let y = ok(nsmctl(&r, &["get", "client", "orders-vwire", "-o", "yaml"]));
    assert!(
        y.contains("kind: Client") && y.contains("networkService: orders"),
        "{y}"
    );
    assert_eq!(
        ok(nsmctl_stdin(&r, &["apply", "-f", "-"], &y)).trim(),
        "client/orders-vwire unchanged"
    );

    let bad = |spec: &str| format!("apiVersion: nsm.dev/v1\nkind: Client\nmetadata: {{name: c2}}\nspec: {spec}\n");
    fails(
        nsmctl_stdin(
            &r,
            &["apply", "-f", "-"],
            &bad("{networkService: orders, netns: relative/path}"),
        ),
        "spec.netns",
    );
    fails(
        nsmctl_stdin(
            &r,
            &["apply", "-f", "-"],
            &bad("{networkService: orders, netns: /x, interface: way-too-long-ifname}"),
        ),
        "spec.interface",
    );
    fails(
        nsmctl_stdin(&r, &["apply", "-f", "-"], &bad("{networkService: Bad, netns: /x}")),
        "spec.networkService",
    );
    // `client create` goes to the node daemon: none here, and the error says so.
    fails(
        nsmctl(
            &r,
            &[
                "client",
                "create",
                "c3",
                "--service",
                "orders",
                "--node",
                "unix:///nonexistent/nsm.sock",
            ],
        ),
        "is `nsm node` running on this host?",
    );
    assert_eq!(
        ok(nsmctl(&r, &["delete", "vwire", "orders-vwire"])).trim(),
        "client/orders-vwire deleted"
    );
}

/// `nsmctl get … | head`: a reader that goes away ends nsmctl quietly, with success.
#[test]
fn closed_stdout_is_not_an_error() {
    let r = registry();
    ok(nsmctl(&r, &["ns", "create", "a"]));
    let mut child = Command::new(NSMCTL)
        .args(["--registry", &r.url(), "get", "ns", "-o", "yaml"])
        .env("NSM_CONFIG", r.admin_config())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The help names every kind the CLI accepts (nsm_model::Kind), by spellings that parse to it.
#[test]
fn help_names_every_kind() {
    use nsm_model::Kind;
    let help = |args: &[&str]| {
        let o = Command::new(NSMCTL).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let top = help(&["--help"]);
    for words in ["network services", "endpoints", "nodes", "clients", "prefixes"] {
        assert!(top.contains(words), "nsmctl --help lacks {words:?}:\n{top}");
    }
    for verb in ["get", "describe", "delete"] {
        let h = help(&[verb, "--help"]);
        for kind in Kind::ALL {
            assert!(h.contains(kind.noun()), "nsmctl {verb} --help lacks {kind}:\n{h}");
        }
        for (word, kind) in [
            ("ns", Kind::NetworkService),
            ("netsvc", Kind::NetworkService),
            ("ep", Kind::Endpoint),
            ("nse", Kind::Endpoint),
            ("vwire", Kind::Client),
        ] {
            assert!(h.contains(word), "nsmctl {verb} --help lacks {word:?}:\n{h}");
            assert_eq!(word.parse::<Kind>().unwrap(), kind);
        }
    }
}
