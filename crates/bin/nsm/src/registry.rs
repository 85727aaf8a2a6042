//! `nsm registry`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nsm_registry::{Config, Kind, Registry};
use nsm_store::Store;
use nsm_transport::{Listener, Url};

/// Flags of `nsm registry`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Where to serve (repeatable): tcp://HOST:PORT or unix:///PATH.
    #[arg(long = "listen", env = "NSM_LISTEN_ON", value_delimiter = ',',
          default_values_t = ["tcp://127.0.0.1:5002".to_string(), "unix:///var/run/nsm/registry.sock".to_string()])]
    listen: Vec<String>,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "NSM_DATA_DIR", default_value = "/var/lib/nsm/registry")]
    data_dir: PathBuf,
    /// Store backend: `embedded` (redb in --data-dir) or `etcd://HOST:PORT[,HOST:PORT…]`.
    #[arg(long, env = "NSM_STORE", default_value = "embedded")]
    store: String,
    /// This registry's domain: names `x@DOMAIN` are served as local names.
    #[arg(long, env = "NSM_DOMAIN")]
    domain: Option<String>,
    /// Server certificate (PEM) for TCP listeners; with --tls-key, TCP is served over TLS.
    #[arg(long, env = "NSM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "NSM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS (needs --tls-cert).
    #[arg(long, env = "NSM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Lifetime of an upstream endpoint registration that is not refreshed (upstream: 1m).
    #[arg(long, env = "NSM_EXPIRE_PERIOD", default_value = "1m", value_parser = humantime::parse_duration)]
    default_expiration: Duration,
}

async fn open_store(args: &Args) -> anyhow::Result<Arc<dyn Store>> {
    if args.store == "embedded" {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
        let path = args.data_dir.join("registry.redb");
        let store = nsm_store_redb::RedbStore::open(&path)
            .with_context(|| format!("cannot open the embedded store {}", path.display()))?;
        return Ok(Arc::new(store));
    }
    if let Some(list) = args.store.strip_prefix("etcd://") {
        let endpoints: Vec<String> = list.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        if endpoints.is_empty() {
            bail!("--store: etcd:// needs at least one HOST:PORT");
        }
        let store = nsm_store_etcd::EtcdStore::connect(&endpoints)
            .await
            .with_context(|| format!("cannot connect to etcd at {list}"))?;
        return Ok(Arc::new(store));
    }
    bail!(
        "--store: {:?} is neither `embedded` nor `etcd://HOST:PORT[,…]`",
        args.store
    )
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.default_expiration.is_zero() {
        bail!("--default-expiration must be longer than zero");
    }
    let urls: Vec<Url> = args
        .listen
        .iter()
        .map(|u| u.parse().with_context(|| "--listen".to_string()))
        .collect::<anyhow::Result<_>>()?;
    if urls.is_empty() {
        bail!("--listen: give at least one URL");
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            nsm_transport::ServerTls::from_files(cert, key, args.tls_client_ca.as_deref())
                .context("--tls-cert/--tls-key/--tls-client-ca")?,
        ),
        _ => None,
    };
    // Bind everything first: a bad address stops start-up before anything is served.
    let mut listeners = Vec::new();
    for url in &urls {
        listeners.push(Listener::bind(url).await?);
    }
    let started = std::time::Instant::now();
    let store = open_store(&args).await?;
    let config = Config {
        default_expiration: args.default_expiration,
        domain: args.domain.clone(),
    };
    let registry = Registry::start(store, config)
        .await
        .context("cannot load the registry's state")?;
    let routes = registry.routes().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for l in listeners {
        let tls = matches!(l.url(), Url::Tcp(_)).then(|| tls.clone()).flatten();
        let mode = if tls.is_some() {
            if args.tls_client_ca.is_some() {
                " (mutual TLS)"
            } else {
                " (TLS)"
            }
        } else {
            ""
        };
        tracing::info!(url = %l.url(), tls = tls.is_some(), "serving");
        println!("nsm registry serving on {}{mode}", l.url());
        let mut rx = stop_rx.clone();
        let routes = routes.clone();
        servers.push(tokio::spawn(l.serve(routes, tls, async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }
    tracing::info!(
        backend = registry.backend(),
        services = registry.count(Kind::NetworkService),
        endpoints = registry.count(Kind::Endpoint),
        nodes = registry.count(Kind::Node),
        ready_after_ms = started.elapsed().as_millis() as u64,
        "registry ready"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = futures::future::select_all(servers.iter_mut()) => {
            let (res, _, _) = r;
            res??;
            bail!("a listener stopped unexpectedly");
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    for s in servers {
        s.await??;
    }
    Ok(())
}
