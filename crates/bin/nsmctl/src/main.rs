//! `nsmctl`: the nsm command line.
//!
//! kubectl habits: `nsmctl <kind> create|get|describe|delete`, the same as `nsmctl get <kind>`,
//! `apply -f FILE|-`, `-n NAMESPACE`, `-o table|json|yaml`. Errors go to stderr with a non-zero
//! exit code; nothing is written when a request is rejected.
#![forbid(unsafe_code)]

mod apply;
mod output;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::PossibleValuesParser;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use nsm_api::nsm::v1;
use nsm_api::nsm::v1::resource_service_client::ResourceServiceClient;
use nsm_model::{Kind, pb, validate};
use tonic::transport::Channel;

use crate::output::Format;

/// The nsm command line: manage network services, endpoints, nodes and clients (vWires) of a
/// registry, and list the vL3 prefixes it leases.
#[derive(Parser)]
#[command(name = "nsmctl", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Registry to talk to: tcp://HOST:PORT or unix:///PATH.
    #[arg(long, global = true, env = "NSM_REGISTRY", default_value = "tcp://127.0.0.1:5002")]
    registry: String,
    /// CA (PEM) to verify the registry's certificate with: connect over TLS.
    #[arg(long, global = true, env = "NSM_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --tls-key and --tls-ca).
    #[arg(long, global = true, env = "NSM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "NSM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Name expected in the registry's certificate (default: the address dialed).
    #[arg(long, global = true, env = "NSM_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Namespace of the resources (ignored for nodes).
    #[arg(short = 'n', long, global = true, env = "NSM_NAMESPACE", default_value = nsm_model::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Network services (alias: networkservice, netsvc).
    #[command(visible_alias = "networkservice", alias = "netsvc")]
    Ns {
        #[command(subcommand)]
        verb: Verb<NsCreate>,
    },
    /// Endpoints: what provides a network service (alias: ep, nse).
    #[command(alias = "ep", alias = "nse")]
    Endpoint {
        #[command(subcommand)]
        verb: Verb<EndpointCreate>,
    },
    /// Nodes: hosts running the nsm-node daemon (cluster-scoped).
    Node {
        #[command(subcommand)]
        verb: Verb<NodeCreate>,
    },
    /// Clients: declarative vWires from a workload to a network service (alias: vwire).
    #[command(alias = "vwire")]
    Client {
        #[command(subcommand)]
        verb: Verb<ClientCreate>,
    },
    /// List resources of a kind, or show one: `nsmctl get ns [NAME]`.
    Get(GetArgs),
    /// Show one resource in detail: `nsmctl describe endpoint NAME`.
    Describe {
        /// ns (networkservice, netsvc), endpoint (ep, nse), node, client (vwire) or prefix;
        /// plurals work too.
        kind: String,
        /// Name.
        name: String,
    },
    /// Delete resources: `nsmctl delete ns NAME…`.
    Delete {
        /// ns (networkservice, netsvc), endpoint (ep, nse), node, client (vwire) or prefix;
        /// plurals work too.
        kind: String,
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Create or update resources from YAML/JSON documents: ours (apiVersion nsm.dev/v1) or
    /// upstream's CRDs (apiVersion networkservicemesh.io/v1, NetworkService and
    /// NetworkServiceEndpoint). Every document is validated before any is written.
    Apply(apply::ApplyArgs),
    /// Print a shell completion script: `nsmctl completion bash > /etc/bash_completion.d/nsmctl`.
    Completion {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum Verb<C: Args> {
    /// Create one.
    Create(C),
    /// List them, or show one.
    Get(GetOpts),
    /// Show one in detail.
    Describe {
        /// Name.
        name: String,
    },
    /// Delete one or more.
    Delete {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
struct GetArgs {
    /// ns (networkservice, netsvc), endpoint (ep, nse), node, client (vwire) or prefix;
    /// plurals work too.
    kind: String,
    #[command(flatten)]
    opts: GetOpts,
}

#[derive(Args)]
struct GetOpts {
    /// Show only this one.
    name: Option<String>,
    /// List across every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Only resources with these labels: k=v,k2=v2.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// After listing, stream changes.
    #[arg(short = 'w', long)]
    watch: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Payload {
    #[value(name = "IP", alias = "ip")]
    Ip,
    #[value(name = "ETHERNET", alias = "ethernet")]
    Ethernet,
}

#[derive(Clone, Copy, ValueEnum)]
enum ServiceType {
    Vwire,
    Vl3,
}

#[derive(Args)]
struct NsCreate {
    /// Name of the network service.
    name: String,
    /// What the service carries.
    #[arg(long, value_enum, default_value_t = Payload::Ip, ignore_case = true)]
    payload: Payload,
    /// vwire: point-to-point links to a selected endpoint; vl3: a virtual L3 network.
    #[arg(long = "type", alias = "kind", value_enum, default_value_t = ServiceType::Vwire)]
    service_type: ServiceType,
    /// Address pool (CIDR) of the service, e.g. 172.16.0.0/16.
    #[arg(long)]
    cidr: Option<String>,
    /// Endpoint selection rule, upstream `matches` style, in order (repeatable):
    /// 'SRC_LABELS -> DST_LABELS[; fallthrough]', e.g. 'app=web -> version=v2'. SRC labels must be
    /// on the client's request; DST labels select endpoints.
    #[arg(long = "match", value_name = "RULE", allow_hyphen_values = true)]
    matches: Vec<String>,
    /// vl3: length of the prefix each node's router leases from the pool (default /24 for IPv4,
    /// /112 for IPv6).
    #[arg(long)]
    prefix_len: Option<u32>,
    /// Put this service on an existing vL3 (`name` in this namespace or `name.namespace`): its
    /// clients become members of that vL3, sharing its address space and routers.
    #[arg(long, value_name = "VL3")]
    vl3: Option<String>,
    /// On a vL3: another service whose members this service's members may reach (repeatable or
    /// comma-separated; `*` = every member). By default a service reaches only its own members
    /// and the vL3's shared members.
    #[arg(long, value_delimiter = ',')]
    reach: Vec<String>,
    /// vl3: DNS name of each member, from {client}, {service} and {namespace}
    /// (default `{client}.{service}.`).
    #[arg(long)]
    dns_template: Option<String>,
    /// Encryption of cross-node vWires to this service: required (WIREGUARD or nothing),
    /// preferred (WIREGUARD, else VXLAN) or none (default).
    #[arg(long, value_parser = PossibleValuesParser::new(validate::ENCRYPTION_VALUES))]
    encryption: Option<String>,
    /// Labels: k=v,k2=v2.
    #[arg(long)]
    labels: Option<String>,
}

#[derive(Args)]
struct EndpointCreate {
    /// Name of the endpoint.
    name: String,
    /// Host address of the endpoint itself (a VM or physical server), e.g. 10.0.0.5.
    #[arg(long)]
    address: Option<String>,
    /// Network service it provides (repeatable or comma-separated; `name` in this namespace or
    /// `name.namespace`). Without any, an address endpoint serves whichever service a client pins
    /// it for.
    #[arg(long = "service", value_delimiter = ',')]
    services: Vec<String>,
    /// URL of its NetworkService API (tcp://HOST:PORT or unix:///PATH).
    #[arg(long)]
    url: Option<String>,
    /// Node it lives on.
    #[arg(long)]
    node: Option<String>,
    /// Network namespace file of the workload it lives in (needs --node).
    #[arg(long)]
    netns: Option<String>,
    /// Labels: k=v,k2=v2 (they select it in network service matches).
    #[arg(long)]
    labels: Option<String>,
}

#[derive(Args)]
struct NodeCreate {
    /// Name of the node.
    name: String,
    /// Underlay address of the host.
    #[arg(long, required = true)]
    address: String,
    /// Labels: k=v,k2=v2.
    #[arg(long)]
    labels: Option<String>,
}

#[derive(Args)]
struct ClientCreate {
    /// Name of the client (vWire).
    name: String,
    /// Network service to connect to (`name` in this namespace or `name.namespace`).
    #[arg(long)]
    service: String,
    /// Pin an endpoint instead of selecting one by the service's matches.
    #[arg(long)]
    endpoint: Option<String>,
    /// The workload's network namespace file (default: the namespace nsmctl runs in, as the node
    /// daemon sees it through its unix socket).
    #[arg(long)]
    netns: Option<String>,
    /// Interface name inside the workload (default: the first of nsm-1, nsm-2, … that no other
    /// client of the workload holds).
    #[arg(long)]
    interface: Option<String>,
    /// The node daemon of the workload's host, which creates and builds the vWire.
    #[arg(long = "node", env = "NSM_NODE", default_value = "unix:///var/run/nsm/nsm.sock")]
    node_url: String,
    /// Encryption if the endpoint is on another node: required, preferred or none (default: the
    /// service's setting).
    #[arg(long, value_parser = PossibleValuesParser::new(validate::ENCRYPTION_VALUES))]
    encryption: Option<String>,
    /// Labels of the request (k=v,…): matched by the service's source selectors.
    #[arg(long)]
    labels: Option<String>,
}

/// Connection to the registry.
pub(crate) struct Ctx {
    pub(crate) client: ResourceServiceClient<Channel>,
    pub(crate) namespace: String,
    pub(crate) format: Format,
}

fn labels(s: &Option<String>) -> anyhow::Result<std::collections::HashMap<String, String>> {
    Ok(match s {
        Some(s) => validate::parse_labels("--labels", s)?,
        None => Default::default(),
    })
}

fn meta(name: &str, namespace: &str, labels: std::collections::HashMap<String, String>) -> Option<pb::ObjectMeta> {
    Some(pb::ObjectMeta {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        labels,
        ..Default::default()
    })
}

/// Parses a `--match` rule.
fn parse_match(rule: &str) -> anyhow::Result<pb::registry::Match> {
    let (body, fallthrough) = match rule.rsplit_once(';') {
        Some((b, flag)) if flag.trim() == "fallthrough" => (b, true),
        Some((_, flag)) => bail!(
            "--match {rule:?}: unknown option {:?} (only 'fallthrough')",
            flag.trim()
        ),
        None => (rule, false),
    };
    let (src, dst) = body
        .split_once("->")
        .with_context(|| format!("--match {rule:?}: expected 'SRC_LABELS -> DST_LABELS'"))?;
    let src = validate::parse_labels("--match (source)", src)?;
    let dst = validate::parse_labels("--match (destination)", dst)?;
    Ok(pb::registry::Match {
        source_selector: src,
        routes: if dst.is_empty() {
            vec![]
        } else {
            vec![pb::registry::Destination {
                destination_selector: dst,
                weight: 0,
            }]
        },
        fallthrough,
        metadata: None,
    })
}

async fn create(ctx: &mut Ctx, resource: pb::Resource) -> anyhow::Result<()> {
    let created = ctx
        .client
        .create(v1::CreateRequest {
            resource: Some(resource),
        })
        .await?
        .into_inner();
    output::print_changed(ctx.format, &created, "created")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completion { shell } = cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "nsmctl", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Apply(args) = &cli.command {
        // Read and check every document before dialing, so a bad file fails fast and offline.
        let docs = apply::read(args, &cli.namespace)?;
        let mut ctx = connect(&cli).await?;
        return apply::run(&mut ctx, args, docs).await;
    }
    if let Command::Client { verb: Verb::Create(c) } = cli.command {
        return create_client(c, &cli.namespace, cli.output).await;
    }
    let mut ctx = connect(&cli).await?;
    let namespace = cli.namespace.clone();
    match cli.command {
        Command::Ns { verb } => match verb {
            Verb::Create(c) => {
                let mut matches = Vec::new();
                for m in &c.matches {
                    matches.push(parse_match(m)?);
                }
                let spec = pb::NetworkServiceSpec {
                    payload: match c.payload {
                        Payload::Ip => "IP",
                        Payload::Ethernet => "ETHERNET",
                    }
                    .into(),
                    r#type: match c.service_type {
                        ServiceType::Vwire => pb::ServiceType::Vwire,
                        ServiceType::Vl3 => pb::ServiceType::Vl3,
                    } as i32,
                    cidr: c.cidr.unwrap_or_default(),
                    matches,
                    path_ids: vec![],
                    prefix_len: c.prefix_len.unwrap_or_default(),
                    vl3: c.vl3.unwrap_or_default(),
                    reach: c.reach,
                    dns_template: c.dns_template.unwrap_or_default(),
                    encryption: c.encryption.unwrap_or_default(),
                };
                let r = pb::resource::Kind::NetworkService(pb::NetworkService {
                    metadata: meta(&c.name, &namespace, labels(&c.labels)?),
                    spec: Some(spec),
                });
                create(&mut ctx, pb::Resource { kind: Some(r) }).await
            }
            other => verb_common(&mut ctx, Kind::NetworkService, other).await,
        },
        Command::Endpoint { verb } => match verb {
            Verb::Create(c) => {
                let spec = pb::EndpointSpec {
                    network_services: c.services,
                    address: c.address.unwrap_or_default(),
                    url: c.url.unwrap_or_default(),
                    node: c.node.unwrap_or_default(),
                    netns: c.netns.unwrap_or_default(),
                    ..Default::default()
                };
                let r = pb::resource::Kind::Endpoint(pb::Endpoint {
                    metadata: meta(&c.name, &namespace, labels(&c.labels)?),
                    spec: Some(spec),
                });
                create(&mut ctx, pb::Resource { kind: Some(r) }).await
            }
            other => verb_common(&mut ctx, Kind::Endpoint, other).await,
        },
        Command::Node { verb } => match verb {
            Verb::Create(c) => {
                let r = pb::resource::Kind::Node(pb::Node {
                    metadata: meta(&c.name, "", labels(&c.labels)?),
                    spec: Some(pb::NodeSpec {
                        address: c.address,
                        ..Default::default()
                    }),
                });
                create(&mut ctx, pb::Resource { kind: Some(r) }).await
            }
            other => verb_common(&mut ctx, Kind::Node, other).await,
        },
        Command::Client { verb } => match verb {
            Verb::Create(_) => unreachable!("handled before dialing the registry"),
            other => verb_common(&mut ctx, Kind::Client, other).await,
        },
        Command::Get(g) => output::get(&mut ctx, g.kind.parse()?, &g.opts).await,
        Command::Describe { kind, name } => output::describe(&mut ctx, kind.parse()?, &name).await,
        Command::Delete { kind, names } => delete(&mut ctx, kind.parse()?, &names).await,
        Command::Apply(_) | Command::Completion { .. } => unreachable!("handled above"),
    }
}

async fn verb_common<C: Args>(ctx: &mut Ctx, kind: Kind, verb: Verb<C>) -> anyhow::Result<()> {
    match verb {
        Verb::Create(_) => unreachable!("create is kind-specific"),
        Verb::Get(opts) => output::get(ctx, kind, &opts).await,
        Verb::Describe { name } => output::describe(ctx, kind, &name).await,
        Verb::Delete { names } => delete(ctx, kind, &names).await,
    }
}

/// `client create` goes to the node daemon of the workload's host, not to the registry: the node
/// learns the caller's namespace from its unix socket and assigns the client to itself.
async fn create_client(c: ClientCreate, namespace: &str, format: Format) -> anyhow::Result<()> {
    let r = pb::resource::Kind::Client(pb::Client {
        metadata: meta(&c.name, namespace, labels(&c.labels)?),
        spec: Some(pb::ClientSpec {
            network_service: c.service,
            endpoint: c.endpoint.unwrap_or_default(),
            netns: c.netns.unwrap_or_default(),
            interface: c.interface.unwrap_or_default(),
            node: String::new(),
            encryption: c.encryption.unwrap_or_default(),
        }),
        status: None,
    });
    let channel = nsm_transport::connect(&c.node_url, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("{e} (set --node or NSM_NODE; is `nsm node` running on this host?)"))?;
    let created = nsm_api::nsm::v1::node_service_client::NodeServiceClient::new(channel)
        .create_client(v1::CreateRequest {
            resource: Some(pb::Resource { kind: Some(r) }),
        })
        .await?
        .into_inner();
    output::print_changed(format, &created, "created")
}

pub(crate) fn reference(ctx: &Ctx, kind: Kind, name: &str) -> v1::ResourceRef {
    v1::ResourceRef {
        kind: kind.to_pb() as i32,
        namespace: ctx.namespace.clone(),
        name: name.to_owned(),
    }
}

async fn delete(ctx: &mut Ctx, kind: Kind, names: &[String]) -> anyhow::Result<()> {
    let mut failed = 0;
    for name in names {
        match ctx
            .client
            .delete(v1::DeleteRequest {
                r#ref: Some(reference(ctx, kind, name)),
            })
            .await
        {
            Ok(r) => output::print_changed(ctx.format, &r.into_inner(), "deleted")?,
            Err(status) => {
                failed += 1;
                eprintln!("Error: {}", status.message());
            }
        }
    }
    if failed > 0 {
        bail!(Reported);
    }
    Ok(())
}

/// An error already printed; only the exit code is left to set.
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("errors reported above")
    }
}

impl std::error::Error for Reported {}

async fn connect(cli: &Cli) -> anyhow::Result<Ctx> {
    let tls = match &cli.tls_ca {
        Some(ca) => {
            let identity = cli.tls_cert.as_deref().zip(cli.tls_key.as_deref());
            Some(nsm_transport::ClientTls::from_files(
                ca,
                identity,
                cli.tls_server_name.clone(),
            )?)
        }
        None if cli.tls_cert.is_some() => bail!("--tls-cert needs --tls-ca (the CA to verify the registry with)"),
        None => None,
    };
    let channel = nsm_transport::connect_with(&cli.registry, Duration::from_secs(5), tls.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("{e} (set --registry or NSM_REGISTRY; is `nsm registry` running?)"))?;
    Ok(Ctx {
        client: ResourceServiceClient::new(channel),
        namespace: cli.namespace.clone(),
        format: cli.output,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`nsmctl get … | head`): not an error of ours.
        Err(e) if e.downcast_ref::<output::StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<Reported>().is_none() {
                match e.downcast_ref::<tonic::Status>() {
                    Some(s) => eprintln!("Error: {} ({:?})", s.message(), s.code()),
                    None => eprintln!("Error: {e:#}"),
                }
            }
            let _ = std::io::stderr().flush();
            ExitCode::FAILURE
        }
    }
}
