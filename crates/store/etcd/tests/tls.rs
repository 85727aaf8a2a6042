//! The etcd store over TLS, against a real etcd that requires client certificates: the store
//! works with the right CA and certificate, and every wrong setup fails with a message that says
//! what is wrong.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use nsm_store::{PutOptions, Store, StoreError, WatchEvent};
use nsm_store_etcd::{EtcdStore, EtcdTls, EtcdTlsError};
use nsm_testing::{Etcd, TestPki};

struct Setup {
    etcd: Etcd,
    pki: TestPki,
    dir: tempfile::TempDir,
}

/// A TLS etcd, with `ca.pem`, `registry.pem` and `registry.key` (a client certificate from the
/// same CA) written to a temp dir.
fn setup() -> Setup {
    let pki = TestPki::new().unwrap();
    let etcd = Etcd::start_tls_with_pki(&pki).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path(), &["registry"]).unwrap();
    Setup { etcd, pki, dir }
}

impl Setup {
    fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn client_tls(&self) -> EtcdTls {
        EtcdTls::from_files(
            &self.file("ca.pem"),
            Some(&self.file("registry.pem")),
            Some(&self.file("registry.key")),
        )
        .unwrap()
    }
}

async fn connect_err(endpoints: &[String], tls: Option<EtcdTls>) -> StoreError {
    EtcdStore::connect_with(endpoints, tls)
        .await
        .expect_err("connection must be refused")
}

#[tokio::test]
async fn put_get_watch_with_client_certificate() {
    let s = setup();
    // Both spellings of the endpoint: bare (dialed as https) and an explicit https URL.
    for endpoint in [s.etcd.endpoint(), s.etcd.client_url()] {
        let store = EtcdStore::connect_with(&[endpoint], Some(s.client_tls()))
            .await
            .unwrap();
        let mut watch = store.watch("tls/", 0).await.unwrap();
        let put = store
            .put("tls/a", b"one".to_vec(), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(store.get("tls/a").await.unwrap(), Some(put.clone()));
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch event within 10 s")
            .expect("stream open")
            .unwrap();
        assert_eq!(event, WatchEvent::Put(put));
        store.delete("tls/a", nsm_store::Condition::None).await.unwrap();
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let s = setup();
    let tls = EtcdTls::from_files(&s.file("ca.pem"), None, None).unwrap();
    let err = connect_err(&[s.etcd.endpoint()], Some(tls)).await;
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(msg.contains(&s.etcd.endpoint()), "{msg}");
    assert!(
        msg.contains("requires a client certificate, and none is configured"),
        "{msg}"
    );
}

#[tokio::test]
async fn client_trusting_another_ca_is_refused() {
    let s = setup();
    let other = TestPki::new().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let (ca, _) = other.write(other_dir.path(), &[]).unwrap();
    // A client certificate etcd would accept, but the server's certificate is not trusted.
    let tls = EtcdTls::from_files(&ca, Some(&s.file("registry.pem")), Some(&s.file("registry.key"))).unwrap();
    let err = connect_err(&[s.etcd.endpoint()], Some(tls)).await;
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(msg.contains(&s.etcd.endpoint()), "{msg}");
    assert!(msg.contains("invalid peer certificate"), "{msg}");

    // And a client certificate from another CA is refused by etcd.
    let foreign = other.issue("intruder").unwrap();
    let tls = EtcdTls {
        ca_pem: s.pki.ca_pem().as_bytes().to_vec(),
        identity: Some((foreign.cert.into_bytes(), foreign.key.into_bytes())),
    };
    let err = connect_err(&[s.etcd.endpoint()], Some(tls)).await;
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("rejected the client certificate"), "{err}");
}

#[tokio::test]
async fn plain_client_on_tls_port_is_refused() {
    let s = setup();
    let err = connect_err(&[s.etcd.endpoint()], None).await;
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    // The scheme contradicting the TLS choice is refused before dialing.
    let err = connect_err(&[format!("http://{}", s.etcd.endpoint())], Some(s.client_tls())).await;
    assert!(err.to_string().contains("plain HTTP but TLS is configured"), "{err}");
    let err = connect_err(&[s.etcd.client_url()], None).await;
    assert!(err.to_string().contains("no TLS settings"), "{err}");
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new().unwrap();
    let (ca, pairs) = pki.write(dir.path(), &["registry"]).unwrap();
    let (cert, key) = &pairs[0];
    let missing = dir.path().join("no-such-ca.pem");

    let err = EtcdTls::from_files(&missing, None, None).unwrap_err();
    assert!(matches!(err, EtcdTlsError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains("CA certificate"),
        "{msg}"
    );

    let err = EtcdTls::from_files(&ca, Some(cert), Some(&dir.path().join("nope.key"))).unwrap_err();
    assert!(err.to_string().contains("nope.key"), "{err}");

    // Certificate and key swapped.
    let err = EtcdTls::from_files(&ca, Some(key), Some(cert)).unwrap_err();
    assert!(matches!(err, EtcdTlsError::NotPem { .. }), "{err:?}");
    assert!(err.to_string().contains(&key.display().to_string()), "{err}");
    let err = EtcdTls::from_files(key, None, None).unwrap_err();
    assert!(err.to_string().contains(&key.display().to_string()), "{err}");

    let err = EtcdTls::from_files(&ca, Some(cert), None).unwrap_err();
    assert!(matches!(err, EtcdTlsError::Unpaired { .. }), "{err:?}");
    assert!(err.to_string().contains(&cert.display().to_string()), "{err}");
    let err = EtcdTls::from_files(&ca, None, Some(key)).unwrap_err();
    assert!(err.to_string().contains(&key.display().to_string()), "{err}");

    let ok = EtcdTls::from_files(&ca, Some(cert), Some(key)).unwrap();
    assert_eq!(ok.ca_pem, std::fs::read(&ca).unwrap());
    assert!(ok.identity.is_some());
    assert!(Path::new(&ca).exists());
}
