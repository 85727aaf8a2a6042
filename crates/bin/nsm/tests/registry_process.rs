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
    let mut c = client(url).await;
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
