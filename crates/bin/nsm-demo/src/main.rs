//! `nsm-demo`: the demo that `nsm demo` runs. The `nsm` binary execs this one (found next to it,
//! else on PATH) with the arguments it was given, so the daemons' binary does not carry the test
//! bed; the demo in turn runs `nsm registry` and `nsm node` from the `nsm` binary.
#![forbid(unsafe_code)]

mod demo;

use clap::Parser;

/// Show the mesh working, on this machine (root): a test bed of namespaces with three hosts
/// running nsm and a VM without it, a registry and a node daemon per host, the design document's
/// nsmctl commands for vWires and a vL3 network, and proof that traffic flows (ping, TCP, DNS,
/// counters). Keeps it up until Ctrl-C, then removes all of it; `--down` removes what a killed demo
/// left.
#[derive(Parser)]
#[command(name = "nsm-demo", version, args_override_self = true)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `nsm_testbed=debug`.
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Async worker threads. Default: one less than the CPUs (at least one).
    #[arg(long, env = "NSM_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(flatten)]
    args: demo::Args,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let workers = cli.worker_threads.unwrap_or(cpus.saturating_sub(1)).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(demo::run(cli.args))
}
