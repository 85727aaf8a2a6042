//! `nsm registry` as a real process: durability across `kill -9` on both stores, expiry and
//! shared state through etcd, and start-up errors.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nsm_api::registry::{self as reg, network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient};
use nsm_testing::{Etcd, NsmRegistry};
use tonic::transport::Channel;

const NSM: &str = env!("CARGO_BIN_EXE_nsm");

async fn client(url: &str) -> NetworkServiceEndpointRegistryClient<Channel> {
    NetworkServiceEndpointRegistryClient::new(nsm_testing::channel_to(url).await.unwrap())
}

fn nse(i: usize) -> reg::NetworkServiceEndpoint {
    reg::NetworkServiceEndpoint {
        name: format!("nse-{i}"),
        network_service_names: vec![format!("svc-{}", i % 10)],
        url: format!("tcp://192.0.2.{}:5001", i % 250 + 1),
        ..Default::default()
    }
}

async fn all_names(url: &str) -> Vec<String> {
    names_at(client(url).await).await
}

/// Every endpoint name the registry at the other end of `c` serves, sorted.
async fn names_at(mut c: NetworkServiceEndpointRegistryClient<Channel>) -> Vec<String> {
    let mut s = c
        .find(reg::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(Default::default()),
            watch: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await.unwrap() {
        out.push(r.network_service_endpoint.unwrap().name);
    }
    out.sort();
    out
}

/// Registers `n` endpoints with 32 concurrent clients, then kills the registry with SIGKILL the
/// moment the last acknowledgement arrives; after a restart every acknowledged endpoint is there.
async fn acknowledged_writes_survive_kill9(registry: &mut NsmRegistry, n: usize) {
    let url = registry.url();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (url, next) = (url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(&url).await;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                c.register(nse(i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    registry.restart().unwrap();
    let mut expected: Vec<String> = (0..n).map(|i| format!("nse-{i}")).collect();
    expected.sort();
    assert_eq!(all_names(&registry.url()).await, expected, "log:\n{}", registry.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_kill9() {
    let mut r = NsmRegistry::start(Path::new(NSM), &["--default-expiration", "1h"]).unwrap();
    acknowledged_writes_survive_kill9(&mut r, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_survives_kill9() {
    let etcd = Etcd::start().unwrap();
    let store = format!("etcd://{}", etcd.endpoint());
    let mut r = NsmRegistry::start(Path::new(NSM), &["--store", &store, "--default-expiration", "1h"]).unwrap();
    acknowledged_writes_survive_kill9(&mut r, 300).await;
}

/// Two registries on one etcd share state, and an unrefreshed registration expires through an
/// etcd lease: the watcher on the *other* registry sees the deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_share_etcd_and_expire_through_leases() {
    let etcd = Etcd::start().unwrap();
    let store = format!("etcd://{}", etcd.endpoint());
    let a = NsmRegistry::start(Path::new(NSM), &["--store", &store, "--default-expiration", "3s"]).unwrap();
    let b = NsmRegistry::start(Path::new(NSM), &["--store", &store, "--default-expiration", "3s"]).unwrap();
    let mut wb = client(&b.url()).await;
    let mut watch = wb
        .find(reg::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(Default::default()),
            watch: true,
        })
        .await
        .unwrap()
        .into_inner();
    client(&a.url()).await.register(nse(1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.network_service_endpoint.unwrap().name, first.deleted),
        ("nse-1".into(), false)
    );
    let gone = tokio::time::timeout(Duration::from_secs(15), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (gone.network_service_endpoint.unwrap().name, gone.deleted),
        ("nse-1".into(), true)
    );
    // Each registry follows etcd on its own: the other one converges to the same state shortly.
    let start = std::time::Instant::now();
    while !all_names(&a.url()).await.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "registry a still lists the expired endpoint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn bad_flags_fail_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(NSM)
            .arg("registry")
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run(&["--listen", "http://127.0.0.1:1"]);
    assert!(
        !ok && err.contains("--listen") && err.contains("http://127.0.0.1:1"),
        "{err}"
    );
    let (ok, err) = run(&["--listen", "tcp://127.0.0.1:0", "--store", "mysql://x"]);
    assert!(!ok && err.contains("--store"), "{err}");
    let (ok, err) = run(&["--listen", "tcp://127.0.0.1:0", "--default-expiration", "soon"]);
    assert!(!ok && err.contains("--default-expiration"), "{err}");
    // An occupied port is reported with the URL.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", taken.local_addr().unwrap());
    let (ok, err) = run(&["--listen", &url]);
    assert!(!ok && err.contains(&url), "{err}");
}

/// The registries of an etcd-backed domain: etcd over TLS with a client certificate
/// (`--etcd-ca/--etcd-cert/--etcd-key`), and one CA brought to both (`--ca-cert/--ca-key`), so an
/// identity issued by one is good at the other. A wrong etcd CA file stops start-up by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_share_a_tls_etcd_and_a_brought_ca() {
    let pki = nsm_testing::TestPki::new().unwrap();
    let etcd = Etcd::start_tls_with_pki(&pki).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path(), &["registry"]).unwrap();
    let (ca, _) = nsm_identity::Ca::load_or_create(&dir.path().join("domain-ca"), "nsm.local").unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    let store = format!("etcd://{}", etcd.endpoint());
    let (ca_cert, ca_key) = (p("domain-ca/ca.pem"), p("domain-ca/ca.key"));
    let args = |etcd_ca: &str| -> Vec<String> {
        [
            "--store",
            &store,
            "--etcd-ca",
            etcd_ca,
            "--etcd-cert",
            &p("registry.pem"),
            "--etcd-key",
            &p("registry.key"),
            "--ca-cert",
            &ca_cert,
            "--ca-key",
            &ca_key,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a_args = args(&p("ca.pem"));
    let a = NsmRegistry::start(Path::new(NSM), &a_args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let b = NsmRegistry::start(Path::new(NSM), &a_args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    // One CA: both admin configs carry it, and a's admin is trusted by b.
    let a_cfg = nsm_identity::ClientConfig::load(&a.admin_config()).unwrap();
    assert_eq!(a_cfg.ca_bundle, ca.bundle_pem());
    client(&a.url()).await.register(nse(7)).await.unwrap();
    let credentials = a_cfg.credentials().unwrap();
    let expect = nsm_identity::Expect::Id(nsm_identity::SpiffeId::registry("nsm.local").unwrap());
    let ch = nsm_transport::connect_secure(
        &b.url(),
        Duration::from_secs(5),
        &nsm_transport::ClientSecurity::Mtls { credentials, expect },
    )
    .await
    .unwrap();
    assert_eq!(names_at(NetworkServiceEndpointRegistryClient::new(ch)).await, ["nse-7"]);
    // A wrong etcd CA: start-up fails naming the file.
    let bad = args("/nonexistent/etcd-ca.pem");
    let e = NsmRegistry::start(Path::new(NSM), &bad.iter().map(String::as_str).collect::<Vec<_>>())
        .err()
        .expect("a registry without its etcd CA must not start");
    assert!(e.to_string().contains("/nonexistent/etcd-ca.pem"), "{e}");
}
