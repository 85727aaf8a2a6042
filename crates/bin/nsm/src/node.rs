//! `nsm node`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// Flags of `nsm node`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Node name (also its Node resource; clients name it in spec.node). Default: the name in
    /// the join token, or in the identity the node holds.
    #[arg(long, env = "NSM_NAME")]
    name: Option<String>,
    /// Registry to follow: tcp://HOST:PORT or unix:///PATH. Default: the join token's, or the
    /// one the node joined through (tcp://127.0.0.1:5002 with --insecure).
    #[arg(long, env = "NSM_REGISTRY_URL")]
    registry: Option<String>,
    /// One-time join token (`nsmctl node create NAME` prints it): the node redeems it for its
    /// identity, which it keeps in --data-dir/identity and renews; later starts need no token.
    #[arg(long, env = "NSM_JOIN_TOKEN", hide_env_values = true)]
    join: Option<String>,
    /// No identity: plaintext TCP to the registry and other nodes, for a registry started with
    /// --insecure (tests and benchmarks that measure without TLS only).
    #[arg(long, env = "NSM_INSECURE", conflicts_with = "join")]
    insecure: bool,
    /// Group (name or number) whose members may use the node's unix socket (mode 0660), besides
    /// root and the daemon's own user.
    #[arg(long, env = "NSM_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Directory of the operator's Rego policies (`*.rego`, `package nsm`, a boolean `valid`),
    /// checked on every request of another node together with upstream's defaults (valid,
    /// unexpired, chained path tokens; the caller's token signed by the caller). A file named as a
    /// default replaces it.
    #[arg(long, env = "NSM_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// The host's underlay address, where tunnels to it end.
    #[arg(long, env = "NSM_TUNNEL_IP")]
    underlay_address: IpAddr,
    /// Where to serve the NetworkService API (repeatable): tcp://HOST:PORT or unix:///PATH. Other
    /// nodes reach this one over TCP for cross-node vWires (upstream's nsmgr port is 5001).
    #[arg(long = "listen", env = "NSM_LISTEN_ON", value_delimiter = ',',
          default_values_t = ["unix:///var/run/nsm/nsm.sock".to_string()])]
    listen: Vec<String>,
    /// URL other nodes reach this one at (default: the first tcp:// listener).
    #[arg(long, env = "NSM_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// The host's network namespace, where tunnels leave on the underlay (default: the daemon's).
    #[arg(long)]
    host_netns: Option<PathBuf>,
    /// MTU of the underlay; tunnelled vWires get it less the encapsulation overhead.
    #[arg(long, default_value_t = 1500)]
    underlay_mtu: u32,
    /// State directory (created if missing).
    #[arg(long, env = "NSM_DATA_DIR", default_value = "/var/lib/nsm/node")]
    data_dir: PathBuf,
    /// UDP ports (FIRST-LAST) for the ends of encrypted (WIREGUARD) vWires, one per vWire, on the
    /// underlay address (the default range starts at WireGuard's usual port, 51820).
    #[arg(long, env = "NSM_WIREGUARD_PORTS", default_value = "51820-52819", value_parser = port_range)]
    wireguard_ports: std::ops::RangeInclusive<u16>,
    /// Build no WIREGUARD vWires: refuse them as an endpoint's node (a client that requires
    /// encryption fails, one that prefers it gets VXLAN) and offer only VXLAN as a client's.
    #[arg(long)]
    no_wireguard: bool,
    /// Where WIREGUARD vWires run. Nodes of either kind connect to each other.
    #[arg(long, env = "NSM_WIREGUARD_BACKEND", value_enum, default_value_t = Backend::Auto)]
    wireguard_backend: Backend,
    /// Lanes per userspace WIREGUARD vWire (1-16, or `auto`: one per CPU, at most 8): each
    /// lane is a WireGuard session of its own with a TUN queue, UDP port and two threads, so one
    /// vWire's flows are encrypted on several cores. Both nodes of a vWire use the fewer lanes of
    /// the two; a kernel end or a stock WireGuard peer gets one. Each lane of each end takes a port
    /// of --wireguard-ports (a crowded range gives fewer lanes) and two threads, hence one by
    /// default: raise it on hosts with spare cores and few, heavy vWires.
    #[arg(long, env = "NSM_WIREGUARD_LANES", default_value = "1", value_parser = lanes)]
    wireguard_lanes: usize,
    /// How long the node's WireGuard key is used before a new one replaces it (counted from when
    /// the key file was written, so restarts do not postpone it); 0: never. Every WIREGUARD vWire
    /// moves to the new key: a userspace end without a gap in traffic, a kernel end after one
    /// refresh round trip and a handshake. SIGUSR1 rotates the key at once.
    #[arg(long, env = "NSM_WIREGUARD_KEY_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    wireguard_key_lifetime: Duration,
    /// How often every vWire is checked against the kernel, its counters refreshed into its
    /// client's status and its remote end re-requested (at most 40s: remote ends expire after
    /// 120 s without a refresh). Changes in the registry and removed named namespaces are acted on
    /// at once, and clients that are not Ready are retried every 2 s, whatever this says.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// How long an end this node built for another node's client lives without a refresh: the
    /// ends of a client node that went away go after it. Client nodes refresh every --resync, so
    /// it must be more than twice that. Ends an earlier daemon left (their client deleted while
    /// this one was down, say) get it as their grace at start-up.
    #[arg(long, env = "NSM_REMOTE_LIFETIME", default_value = "120s", value_parser = humantime::parse_duration)]
    remote_lifetime: Duration,
    /// DNS servers (IP or IP:PORT, repeatable) to which vL3 routers forward names they do not
    /// know. Default: the nameservers of /etc/resolv.conf.
    #[arg(long, value_delimiter = ',')]
    dns_forward: Vec<String>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(n) = &args.name {
        nsm_model::validate::name("--name", n)?;
    }
    if args.resync.is_zero() || args.resync > nsm_node::MAX_RESYNC {
        anyhow::bail!(
            "--resync {}: must be longer than zero and at most {} (remote ends expire without a refresh)",
            humantime::format_duration(args.resync),
            humantime::format_duration(nsm_node::MAX_RESYNC)
        );
    }
    if args.remote_lifetime <= args.resync * 2 {
        anyhow::bail!(
            "--remote-lifetime {}: must be more than twice --resync ({}), or ends expire between refreshes",
            humantime::format_duration(args.remote_lifetime),
            humantime::format_duration(args.resync)
        );
    }
    crate::private_dir(&args.data_dir, "--data-dir")?;
    let (credentials, name, registry) = if args.insecure {
        tracing::warn!("--insecure: plaintext TCP to the registry and other nodes; never run a domain like this");
        let name = args.name.clone().context("--name: required with --insecure")?;
        let registry = args.registry.clone().unwrap_or_else(|| "tcp://127.0.0.1:5002".into());
        (None, name, registry)
    } else {
        let joined = nsm_node::identity::establish(
            &args.data_dir,
            args.name.as_deref(),
            args.registry.as_deref(),
            args.join.as_deref(),
        )
        .await?;
        (Some(joined.credentials), joined.name, joined.registry)
    };
    let socket_group = args
        .socket_group
        .as_deref()
        .map(crate::registry::group_id)
        .transpose()?;
    let mut policies = nsm_policy::PolicySet::server_defaults();
    if let Some(dir) = &args.policy_dir {
        policies.add_dir(dir).context("--policy-dir")?;
        tracing::info!(dir = %dir.display(), policies = ?policies.names(), "policies loaded");
    }
    let mut listeners = Vec::new();
    for l in &args.listen {
        let url: nsm_transport::Url = l.parse().context("--listen")?;
        listeners.push(
            nsm_transport::Listener::bind_with(
                &url,
                nsm_transport::UnixOptions {
                    mode: 0o660,
                    group: socket_group,
                },
            )
            .await?,
        );
    }
    let advertise = match args.advertise_url {
        Some(u) => Some(u),
        None => listeners
            .iter()
            .map(|l| l.url().clone())
            .find(|u| matches!(u, nsm_transport::Url::Tcp(_)))
            .map(|u| u.to_string()),
    };
    if args.underlay_mtu < 1280 {
        anyhow::bail!("--underlay-mtu must be at least 1280");
    }
    let dns_forward = if args.dns_forward.is_empty() {
        nsm_dns::resolv_conf_nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    } else {
        args.dns_forward
            .iter()
            .map(|s| {
                s.parse::<std::net::SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
                    .with_context(|| format!("--dns-forward {s:?}: expected IP or IP:PORT"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    // SIGUSR1: rotate the WireGuard key now (an operator's `kill -USR1`).
    let rotate = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let notify = rotate.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            notify.notify_one();
        }
    });
    let config = nsm_node::Config {
        dns_forward,
        name,
        registry,
        underlay: args.underlay_address,
        credentials,
        socket_group,
        policies,
        resync: args.resync,
        remote_lifetime: args.remote_lifetime,
        url: advertise,
        host_netns: args.host_netns,
        underlay_mtu: args.underlay_mtu,
        data_dir: args.data_dir,
        wireguard_ports: (!args.no_wireguard).then_some(args.wireguard_ports),
        wireguard_key_lifetime: (!args.wireguard_key_lifetime.is_zero()).then_some(args.wireguard_key_lifetime),
        wireguard_rotate: Some(rotate.clone()),
        wireguard_backend: match args.wireguard_backend {
            Backend::Auto => nsm_node::WireGuardBackend::Auto,
            Backend::Kernel => nsm_node::WireGuardBackend::Kernel,
            Backend::Userspace => nsm_node::WireGuardBackend::Userspace,
        },
        wireguard_lanes: args.wireguard_lanes,
    };
    for l in &listeners {
        println!("nsm node {} serving on {}", config.name, l.url());
    }
    println!("nsm node {} following {}", config.name, config.registry);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    nsm_node::run(config, listeners, shutdown).await?;
    Ok(())
}

/// `auto` (one lane per CPU, at most 8) or a count of 1 to `MAX_WIREGUARD_LANES`.
fn lanes(s: &str) -> Result<usize, String> {
    if s == "auto" {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        return Ok(cpus.clamp(1, 8));
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=nsm_node::MAX_WIREGUARD_LANES).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: expected `auto` or 1-{}", nsm_node::MAX_WIREGUARD_LANES)),
    }
}

/// `FIRST-LAST` (or one port).
fn port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected FIRST-LAST ports"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected FIRST-LAST ports"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: expected 1 <= FIRST <= LAST"));
    }
    Ok(a..=b)
}

/// `--wireguard-backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// The kernel's WireGuard when it has it (checked at start by creating a link), else userspace.
    Auto,
    /// The kernel's WireGuard; the daemon does not start without it.
    Kernel,
    /// nsm's own tunnel: a TUN device per vWire, served by this process.
    Userspace,
}

#[cfg(test)]
mod tests {
    use super::lanes;

    #[test]
    fn lane_counts() {
        assert_eq!(lanes("1"), Ok(1));
        assert_eq!(lanes("16"), Ok(nsm_node::MAX_WIREGUARD_LANES));
        let auto = lanes("auto").unwrap();
        assert!((1..=8).contains(&auto), "{auto}");
        for bad in ["0", "17", "x", "", "-1"] {
            let e = lanes(bad).unwrap_err();
            assert!(e.contains("expected `auto` or 1-16"), "{bad}: {e}");
        }
    }
}
