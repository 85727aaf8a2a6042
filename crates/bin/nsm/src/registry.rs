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
    /// Serve TCP in plaintext and treat every caller as an admin: for tests and benchmarks that
    /// measure without TLS only. Without it, TCP is mutual TLS with the domain's identities.
    #[arg(long, env = "NSM_INSECURE")]
    insecure: bool,
    /// The domain CA's certificate (PEM), to bring your own (a corporate intermediate, or the CA
    /// shared by the registries of an etcd-backed domain). Default: the CA this registry created
    /// in --data-dir/ca on its first start.
    #[arg(long, env = "NSM_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, env = "NSM_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of the SVIDs of nodes and of the registry itself; each is renewed halfway through.
    #[arg(long, env = "NSM_SVID_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    svid_ttl: Duration,
    /// URL (repeatable) nodes and nsmctl reach this registry at, written into join tokens and the
    /// admin config. Default: the tcp:// listeners (which then must name an address, not 0.0.0.0).
    #[arg(long = "advertise-url", env = "NSM_ADVERTISE_URL", value_delimiter = ',')]
    advertise_url: Vec<String>,
    /// Group (name or number) that owns the unix socket (mode 0660) and whose members are admins
    /// on it, besides root and the registry's own user.
    #[arg(long, env = "NSM_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// CA (PEM) that etcd's certificate must chain to: talk to etcd over TLS.
    #[arg(long, env = "NSM_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "NSM_ETCD_CERT", requires = "etcd_key", requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long, env = "NSM_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Lifetime of an upstream endpoint registration that is not refreshed (upstream: 1m).
    #[arg(long, env = "NSM_EXPIRE_PERIOD", default_value = "1m", value_parser = humantime::parse_duration)]
    default_expiration: Duration,
}

async fn open_store(args: &Args) -> anyhow::Result<Arc<dyn Store>> {
    if args.store == "embedded" {
        crate::private_dir(&args.data_dir, "--data-dir")?;
        let path = args.data_dir.join("registry.redb");
        let store = nsm_store_redb::RedbStore::open(&path)
            .with_context(|| format!("cannot open the embedded store {}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot make {} private (0600)", path.display()))?;
        }
        return Ok(Arc::new(store));
    }
    if let Some(list) = args.store.strip_prefix("etcd://") {
        let endpoints: Vec<String> = list.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        if endpoints.is_empty() {
            bail!("--store: etcd:// needs at least one HOST:PORT");
        }
        let tls = match &args.etcd_ca {
            Some(ca) => Some(
                nsm_store_etcd::EtcdTls::from_files(ca, args.etcd_cert.as_deref(), args.etcd_key.as_deref())
                    .context("--etcd-ca/--etcd-cert/--etcd-key")?,
            ),
            None => None,
        };
        let store = nsm_store_etcd::EtcdStore::connect_with(&endpoints, tls)
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
    crate::private_dir(&args.data_dir, "--data-dir")?;
    let group = args.socket_group.as_deref().map(group_id).transpose()?;
    let unix = nsm_transport::UnixOptions { mode: 0o660, group };
    // Bind everything first: a bad address stops start-up before anything is served.
    let mut listeners = Vec::new();
    for url in &urls {
        listeners.push(Listener::bind_with(url, unix).await?);
    }
    let started = std::time::Instant::now();
    let trust_domain = args.domain.clone().unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
    let identity = if args.insecure {
        tracing::warn!("--insecure: TCP is plaintext and every caller is an admin; never run a domain like this");
        None
    } else {
        Some(domain_identity(&args, &trust_domain, &listeners)?)
    };
    let store = open_store(&args).await?;
    let config = Config {
        default_expiration: args.default_expiration,
        domain: Some(trust_domain.clone()),
        security: identity.as_ref().map(|i| i.security.clone()),
        unix: nsm_registry::UnixPolicy {
            own_uid: nix::unistd::geteuid().as_raw(),
            group,
        },
    };
    let registry = Registry::start(store, config)
        .await
        .context("cannot load the registry's state")?;
    let routes = registry.routes().await;
    let security = match &identity {
        Some(i) => {
            tokio::spawn(rotate_own(i.security.clone(), i.credentials.clone(), i.ips.clone()));
            nsm_transport::ServerSecurity::Mtls(i.credentials.clone())
        }
        None => nsm_transport::ServerSecurity::Insecure,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for l in listeners {
        let mode = match (l.url(), &identity) {
            (Url::Unix(_), _) => " (peer credentials)",
            (Url::Tcp(_), Some(_)) => " (mutual TLS)",
            (Url::Tcp(_), None) => " (plaintext, --insecure)",
        };
        tracing::info!(url = %l.url(), mode, "serving");
        println!("nsm registry serving on {}{mode}", l.url());
        let mut rx = stop_rx.clone();
        let routes = routes.clone();
        servers.push(tokio::spawn(l.serve_secure(routes, security.clone(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }
    if let Some(i) = &identity {
        println!(
            "domain {trust_domain}: CA {} ; admin config {}",
            i.security.ca.fingerprint(),
            args.data_dir.join(ADMIN_CONFIG).display()
        );
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

/// The trust domain of a registry started without `--domain`.
const DEFAULT_TRUST_DOMAIN: &str = "nsm.local";
/// The admin's client configuration, in the data directory.
pub(crate) const ADMIN_CONFIG: &str = "admin.config";

pub(crate) fn group_id(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(grp)) => Ok(grp.gid.as_raw()),
        Ok(None) => bail!("--socket-group: no group named {g:?}"),
        Err(e) => bail!("--socket-group {g:?}: {e}"),
    }
}

/// What a registry with identities runs on.
struct DomainIdentity {
    security: nsm_registry::Security,
    credentials: nsm_identity::Credentials,
    /// Its own addresses, in its SVID so that stock TLS clients can check it by address.
    ips: Vec<std::net::IpAddr>,
}

fn domain_identity(args: &Args, trust_domain: &str, listeners: &[Listener]) -> anyhow::Result<DomainIdentity> {
    use nsm_identity::{Ca, Credentials, SpiffeId};
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Ca::from_files(cert, key, trust_domain).context("--ca-cert/--ca-key")?,
        _ => {
            let dir = args.data_dir.join("ca");
            let (ca, created) = Ca::load_or_create(&dir, trust_domain)
                .with_context(|| format!("the domain CA in {}", dir.display()))?;
            if created {
                tracing::info!(dir = %dir.display(), fingerprint = %ca.fingerprint(), "created the domain CA");
            }
            ca
        }
    };
    let mut advertise = args.advertise_url.clone();
    for u in &advertise {
        let _: Url = u.parse().context("--advertise-url")?;
    }
    if advertise.is_empty() {
        for l in listeners {
            if let Url::Tcp(addr) = l.url() {
                if addr.ip().is_unspecified() {
                    bail!(
                        "--listen {}: a registry listening on every address must say where it is reached: give --advertise-url tcp://ADDRESS:{}",
                        l.url(),
                        addr.port()
                    );
                }
                advertise.push(l.url().to_string());
            }
        }
    }
    let mut ips: Vec<std::net::IpAddr> = advertise
        .iter()
        .filter_map(|u| match u.parse::<Url>() {
            Ok(Url::Tcp(a)) => Some(a.ip()),
            _ => None,
        })
        .collect();
    ips.sort();
    ips.dedup();
    let id = SpiffeId::registry(trust_domain)?;
    let svid = ca.issue_new(&id, args.svid_ttl, &ips)?;
    let credentials = Credentials::new(svid, &ca.bundle_pem())?;
    write_admin_config(&args.data_dir.join(ADMIN_CONFIG), &ca, &advertise)?;
    Ok(DomainIdentity {
        security: nsm_registry::Security {
            ca: std::sync::Arc::new(ca),
            advertise,
            svid_ttl: args.svid_ttl,
        },
        credentials,
        ips,
    })
}

/// Writes the admin's config on the first start, and again when its certificate is past half its
/// life, the CA changed or the registry's URLs did.
fn write_admin_config(path: &std::path::Path, ca: &nsm_identity::Ca, advertise: &[String]) -> anyhow::Result<()> {
    use nsm_identity::{ClientConfig, SpiffeId};
    if let Ok(existing) = ClientConfig::load(path) {
        let fresh = existing
            .svid()
            .is_ok_and(|s| s.renew_at() > std::time::SystemTime::now());
        if fresh && existing.ca_bundle == ca.bundle_pem() && existing.registries == advertise {
            return Ok(());
        }
    }
    let id = SpiffeId::admin(ca.trust_domain(), "admin")?;
    let svid = ca.issue_new(&id, nsm_registry::DEFAULT_USER_TTL, &[])?;
    ClientConfig::new(advertise.to_vec(), &svid, &ca.bundle_pem())
        .save(path)
        .with_context(|| format!("writing the admin config {}", path.display()))?;
    tracing::info!(path = %path.display(), "wrote the admin config");
    Ok(())
}

/// Renews the registry's own SVID halfway through its life, for ever.
async fn rotate_own(
    security: nsm_registry::Security,
    credentials: nsm_identity::Credentials,
    ips: Vec<std::net::IpAddr>,
) {
    loop {
        let at = credentials.svid().renew_at();
        let wait = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let id = credentials.id();
        match security
            .ca
            .issue_new(&id, security.svid_ttl, &ips)
            .and_then(|svid| credentials.rotate(svid))
        {
            Ok(()) => tracing::info!(id = %id, "renewed the registry's SVID"),
            Err(e) => {
                tracing::error!(error = %e, "renewing the registry's SVID; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}
