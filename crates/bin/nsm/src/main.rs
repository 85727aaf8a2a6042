//! `nsm`: the nsm daemons.
//!
//! - `nsm registry` — the registry of a domain (upstream registry API + nsm.v1 resources).
//! - `nsm node` — the nsm-node daemon of a host.
//! - `nsm demo` — the hybrid-cloud vWire scenario on a test bed (root).

mod demo;
mod node;
mod registry;

use clap::{Parser, Subcommand};

/// nsm — a Network Service Mesh.
#[derive(Parser)]
#[command(name = "nsm", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `nsm_registry=debug`.
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
    /// Async worker threads. Default: one less than the CPUs (at least one), which leaves a core
    /// to the store's writer thread; on 2 cores this halves Find latency under load.
    #[arg(long, env = "NSM_WORKER_THREADS", global = true)]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry of a domain: upstream's NetworkService/NetworkServiceEndpoint registry
    /// services and the nsm.v1 resource API, on an embedded durable store or etcd.
    Registry(registry::Args),
    /// Run the nsm-node daemon of this host: registers the node and builds the vWires (clients)
    /// assigned to it in the kernel, reporting their status.
    Node(node::Args),
    /// Show the mesh working, on this machine (root): a test bed of namespaces with two hosts and a
    /// VM, a registry and two node daemons, the design document's nsmctl commands, and proof that
    /// traffic flows (ping, TCP, counters). Keeps it up until Ctrl-C, then removes all of it;
    /// `--down` removes what a killed demo left.
    Demo(demo::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_fd_limit();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let workers = cli.worker_threads.unwrap_or(cpus.saturating_sub(1)).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Registry(args) => registry::run(args).await,
            Command::Node(args) => node::run(args).await,
            Command::Demo(args) => demo::run(args).await,
        }
    })
}

/// Lifts the soft limit on open files to the hard one: a node daemon keeps two descriptors per
/// workload namespace (the namespace and its netlink socket) and a registry one per connection,
/// so the usual soft 1,024 would stop a node at about 500 workloads.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open files limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}
