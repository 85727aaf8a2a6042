//! `nsm`: the nsm daemons.
//!
//! - `nsm registry` — the registry of a domain (upstream registry API + nsm.v1 resources).
//! - `nsm node` — the nsm-node daemon of a host.
//! - `nsm demo` — the vWire and vL3 scenarios on a test bed (root): runs the `nsm-demo` binary,
//!   so this one does not carry the test bed.
#![forbid(unsafe_code)]

mod node;
mod registry;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Show the mesh working, on this machine (root): a test bed of namespaces with three hosts
    /// running nsm and a VM without it, a registry and a node daemon per host, the design
    /// document's nsmctl commands for vWires and a vL3 network, and proof that traffic flows (ping,
    /// TCP, DNS, counters). Keeps it up until Ctrl-C, then removes all of it; `--down` removes what
    /// a killed demo left. Runs the nsm-demo binary (`nsm demo --help` shows its options).
    #[command(disable_help_flag = true)]
    Demo {
        /// The demo's arguments, passed to nsm-demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_fd_limit();
    if let Command::Demo { args } = cli.command {
        // The global options given on the command line go along (those from the environment do
        // by themselves).
        let mut forward = Vec::new();
        if matches.value_source("log_level") == Some(ValueSource::CommandLine) {
            forward.extend([OsString::from("--log-level"), cli.log_level.into()]);
        }
        if let Some(n) = cli.worker_threads
            && matches.value_source("worker_threads") == Some(ValueSource::CommandLine)
        {
            forward.extend([OsString::from("--worker-threads"), n.to_string().into()]);
        }
        forward.extend(args);
        return demo(forward);
    }
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
            Command::Demo { .. } => unreachable!("nsm demo runs nsm-demo"),
        }
    })
}

/// `nsm demo ARGS`: replaces this process with `nsm-demo ARGS` (same pid, so signals reach the
/// demo), found next to this executable, else on PATH; it runs the daemons with this executable.
fn demo(args: Vec<OsString>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the nsm binary")?;
    let Some(program) = find_demo(&exe) else {
        if args.iter().any(|a| a == "--help" || a == "-h") {
            let mut cmd = Cli::command();
            if let Some(demo) = cmd.find_subcommand_mut("demo") {
                println!("{}", demo.render_long_help());
            }
        }
        bail!(
            "nsm demo needs the nsm-demo binary (cargo build -p nsm-demo) next to {} or on PATH",
            exe.display()
        );
    };
    let err = std::process::Command::new(&program)
        .arg0("nsm demo")
        .args(args)
        .env("NSM_BIN", &exe)
        .exec();
    Err(err).with_context(|| format!("running {}", program.display()))
}

/// `nsm-demo` next to `exe`, else the first on PATH.
fn find_demo(exe: &Path) -> Option<PathBuf> {
    let next_to = exe.with_file_name("nsm-demo");
    if next_to.is_file() {
        return Some(next_to);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nsm-demo"))
        .find(|p| p.is_file())
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

/// Creates `dir` (and its parents) if missing and makes it 0700: a daemon's data directory holds
/// keys and state that only the daemon reads.
pub(crate) fn private_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {flag} {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {flag} {} private (0700)", dir.display()))
}
