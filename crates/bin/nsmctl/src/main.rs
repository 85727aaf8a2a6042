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
use nsm_api::nsm::v1::identity_service_client::IdentityServiceClient;
use nsm_api::nsm::v1::resource_service_client::ResourceServiceClient;
use nsm_model::{Kind, pb, validate};
use tonic::transport::Channel;

use crate::output::Format;

/// The nsm command line: manage network services, endpoints, nodes and clients (vWires) of a
/// registry, and list the vL3 prefixes it leases.
#[derive(Parser)]
#[command(name = "nsmctl", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Configuration to act with: registry URLs, CA bundle, certificate and key (the registry
    /// writes its admin's to DATA_DIR/admin.config; `nsmctl user create` writes users'). Default:
    /// ~/.config/nsm/config, else /var/lib/nsm/registry/admin.config when readable.
    #[arg(long, global = true, env = "NSM_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Registry to talk to: tcp://HOST:PORT or unix:///PATH (default: the config's, else
    /// tcp://127.0.0.1:5002). A unix socket needs no certificate: the registry checks the caller's
    /// uid.
    #[arg(long, global = true, env = "NSM_REGISTRY")]
    registry: Option<String>,
    /// Talk plaintext TCP to a registry started with --insecure.
    #[arg(long, global = true, env = "NSM_INSECURE")]
    insecure: bool,
    /// CA bundle (PEM) to verify the registry with, instead of the config's.
    #[arg(long, global = true, env = "NSM_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM, an SVID of the domain) instead of the config's (with --tls-key).
    #[arg(long, global = true, env = "NSM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "NSM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
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
    /// Nodes: hosts running the nsm-node daemon (cluster-scoped). `create` prints the one-time
    /// join token the node's daemon starts with; `token NAME` issues a new one.
    Node {
        #[command(subcommand)]
        verb: NodeVerb,
    },
    /// Clients: declarative vWires from a workload to a network service (alias: vwire).
    #[command(alias = "vwire")]
    Client {
        #[command(subcommand)]
        verb: Verb<ClientCreate>,
    },
    /// Users scoped to namespaces (admins only): `nsmctl user create alice -n tenant-a --role edit`
    /// writes alice's config file.
    User {
        #[command(subcommand)]
        verb: UserVerb,
    },
    /// Workload identities: `nsmctl workload issue my-nse -n tenant-a --kind nse --dir DIR`
    /// writes an SVID (`spiffe://<domain>/ns/tenant-a/nse/my-nse`), its key and the trust bundle
    /// for an upstream NSC or NSE to present to the registry and nodes.
    Workload {
        #[command(subcommand)]
        verb: WorkloadVerb,
    },
    /// Who the registry takes this nsmctl for.
    Whoami,
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

#[derive(Subcommand)]
enum NodeVerb {
    #[command(flatten)]
    Common(Verb<NodeCreate>),
    /// Issue a new one-time join token for an existing node (the previous one stops working).
    Token {
        /// The node.
        name: String,
        /// How long it can be redeemed.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        token_ttl: Duration,
    },
}

#[derive(Subcommand)]
enum WorkloadVerb {
    /// Issue an SVID for a workload of the namespace of -n (admins, or users with edit or admin
    /// there): nsmctl generates the key, the registry signs. Writes DIR/svid.pem (certificate
    /// chain), DIR/svid.key (0600) and DIR/bundle.pem (the CA to trust).
    Issue {
        /// The workload's name.
        name: String,
        /// Its kind, the ID's path segment before the name (pod, nse, nsc, …).
        #[arg(long, default_value = "workload")]
        kind: String,
        /// Lifetime (at most 24h; the workload renews it with IdentityService/Renew).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Directory to write the files to (created 0700).
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum UserVerb {
    /// Create a user (or change its grant) with the role in the namespaces of -n (comma-separated),
    /// and write its config file: nsmctl generates the key, the registry signs its certificate.
    Create(UserCreate),
    /// List the users and their grants.
    Get,
    /// Delete users: their certificates are refused from then on.
    Delete {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
struct UserCreate {
    /// The user's name.
    name: String,
    /// admin: everything in its namespaces; edit: create, change and delete services, endpoints and
    /// clients there; view: read.
    #[arg(long, default_value = "edit", value_parser = PossibleValuesParser::new(["admin", "edit", "view"]))]
    role: String,
    /// Where to write its config (mode 0600). Default: ./NAME.config.
    #[arg(long, short = 'f')]
    file: Option<std::path::PathBuf>,
    /// Lifetime of its certificate.
    #[arg(long, default_value = "720h", value_parser = humantime::parse_duration)]
    ttl: Duration,
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
    /// Underlay address of the host (its daemon sets it when it starts).
    #[arg(long)]
    address: Option<String>,
    /// Labels: k=v,k2=v2.
    #[arg(long)]
    labels: Option<String>,
    /// How long the printed join token can be redeemed (`nsm node --join TOKEN`), once.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
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
    /// None when talking to an --insecure registry, which issues no identities.
    identity: Option<IdentityServiceClient<Channel>>,
    pub(crate) namespace: String,
    pub(crate) format: Format,
    /// The URL dialed.
    registry: String,
    /// What nsmctl authenticated with, if anything (unused over a unix socket).
    #[allow(dead_code)]
    credentials: Option<nsm_identity::Credentials>,
}

impl Ctx {
    fn identity(&mut self) -> anyhow::Result<&mut IdentityServiceClient<Channel>> {
        self.identity
            .as_mut()
            .context("--insecure: the registry issues no identities (it has no CA)")
    }
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
            NodeVerb::Common(Verb::Create(c)) => {
                let r = pb::resource::Kind::Node(pb::Node {
                    metadata: meta(&c.name, "", labels(&c.labels)?),
                    spec: Some(pb::NodeSpec {
                        address: c.address.unwrap_or_default(),
                        ..Default::default()
                    }),
                });
                let created = ctx
                    .client
                    .create(v1::CreateRequest {
                        resource: Some(pb::Resource { kind: Some(r) }),
                    })
                    .await?
                    .into_inner();
                if ctx.format == Format::Table {
                    output::print_changed(ctx.format, &created, "created")?;
                }
                if ctx.identity.is_none() {
                    // An --insecure registry issues no identities: the node starts with --insecure.
                    return if ctx.format == Format::Table {
                        Ok(())
                    } else {
                        output::print_changed(ctx.format, &created, "created")
                    };
                }
                join_token(&mut ctx, &c.name, c.token_ttl).await
            }
            NodeVerb::Common(other) => verb_common(&mut ctx, Kind::Node, other).await,
            NodeVerb::Token { name, token_ttl } => join_token(&mut ctx, &name, token_ttl).await,
        },
        Command::User { verb } => users(&mut ctx, verb).await,
        Command::Workload {
            verb: WorkloadVerb::Issue { name, kind, ttl, dir },
        } => {
            let key = nsm_identity::KeyAndCsr::generate()?;
            let namespace = ctx.namespace.clone();
            let svid = ctx
                .identity()?
                .issue_workload(v1::IssueWorkloadRequest {
                    namespace,
                    name,
                    kind,
                    csr: key.csr_der.clone(),
                    ttl_seconds: ttl.as_secs().max(1),
                })
                .await?
                .into_inner();
            nsm_identity::Svid::from_pem(&svid.certificate_chain, &key.key_pem)?
                .save(&dir, &svid.trust_bundle)
                .with_context(|| format!("writing to {}", dir.display()))?;
            match ctx.format {
                Format::Table => println!(
                    "{} issued, expires {}; written to {}/svid.pem, svid.key, bundle.pem",
                    svid.spiffe_id,
                    svid.expires.map(|e| e.to_string()).unwrap_or_default(),
                    dir.display()
                ),
                _ => output::print_value(
                    ctx.format,
                    &serde_json::json!({"spiffeId": svid.spiffe_id, "dir": dir,
                        "expires": svid.expires.map(|e| e.to_string())}),
                )?,
            }
            Ok(())
        }
        Command::Whoami => {
            let me = ctx.identity()?.who_am_i(v1::WhoAmIRequest {}).await?.into_inner();
            match ctx.format {
                Format::Table => {
                    println!("{}", me.identity);
                    if !me.spiffe_id.is_empty() {
                        println!("{}", me.spiffe_id);
                    }
                }
                _ => output::print_value(
                    ctx.format,
                    &serde_json::json!({
                        "identity": me.identity, "spiffeId": me.spiffe_id
                    }),
                )?,
            }
            Ok(())
        }
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

/// The config file to use: --config / NSM_CONFIG, else the user's, else the local registry's
/// admin config when this user can read it.
fn config_path(cli: &Cli) -> Option<std::path::PathBuf> {
    if let Some(p) = &cli.config {
        return Some(p.clone());
    }
    let home = std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config/nsm/config"));
    [home, Some(std::path::PathBuf::from(DEFAULT_ADMIN_CONFIG))]
        .into_iter()
        .flatten()
        .find(|p| std::fs::File::open(p).is_ok())
}

/// The registry's admin config where a registry with default flags writes it.
const DEFAULT_ADMIN_CONFIG: &str = "/var/lib/nsm/registry/admin.config";

async fn connect(cli: &Cli) -> anyhow::Result<Ctx> {
    use nsm_identity::{ClientConfig, Credentials, Expect, SpiffeId, Svid};
    let config = match config_path(cli) {
        Some(p) => Some(ClientConfig::load(&p).with_context(|| format!("--config {}", p.display()))?),
        None => None,
    };
    let registry = cli
        .registry
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.registries.first().cloned()))
        .unwrap_or_else(|| "tcp://127.0.0.1:5002".to_owned());
    // A bad URL is reported as such, before any question of identity.
    let unix = matches!(registry.parse::<nsm_transport::Url>()?, nsm_transport::Url::Unix(_));
    let credentials = match (&cli.tls_cert, &cli.tls_key, &config) {
        (Some(cert), Some(key), _) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let ca = match (&cli.tls_ca, &config) {
                (Some(ca), _) => read(ca)?,
                (None, Some(c)) => c.ca_bundle.clone(),
                (None, None) => bail!("--tls-cert needs --tls-ca (the CA to verify the registry with)"),
            };
            Some(Credentials::new(
                Svid::from_pem(&read(cert)?, &read(key)?).context("--tls-cert/--tls-key")?,
                &ca,
            )?)
        }
        (_, _, Some(c)) => {
            let creds = c.credentials()?;
            if let Some(ca) = &cli.tls_ca {
                creds.set_bundle(
                    &std::fs::read_to_string(ca).with_context(|| format!("cannot read {}", ca.display()))?,
                )?;
            }
            Some(creds)
        }
        _ => None,
    };
    // A unix socket is not wrapped in TLS: the registry judges the caller's uid.
    let security = if unix || cli.insecure {
        nsm_transport::ClientSecurity::Insecure
    } else {
        let Some(credentials) = credentials.clone() else {
            bail!(
                "no identity to reach {registry} with: give --config FILE (a registry writes its admin's to \
                 DATA_DIR/admin.config; `nsmctl user create` writes users'), or --insecure for a registry \
                 started with --insecure"
            );
        };
        let expect = Expect::Id(SpiffeId::registry(&credentials.trust_domain())?);
        nsm_transport::ClientSecurity::Mtls { credentials, expect }
    };
    let channel = nsm_transport::connect_secure(&registry, Duration::from_secs(5), &security)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (set --registry or NSM_REGISTRY; is `nsm registry` running?)"))?;
    Ok(Ctx {
        client: ResourceServiceClient::new(channel.clone()),
        identity: (!cli.insecure).then(|| IdentityServiceClient::new(channel)),
        namespace: cli.namespace.clone(),
        format: cli.output,
        registry,
        credentials,
    })
}

/// Prints a new join token for `node`.
async fn join_token(ctx: &mut Ctx, node: &str, ttl: Duration) -> anyhow::Result<()> {
    let t = ctx
        .identity()?
        .create_join_token(v1::CreateJoinTokenRequest {
            node: node.to_owned(),
            ttl_seconds: ttl.as_secs().max(1),
        })
        .await?
        .into_inner();
    match ctx.format {
        Format::Table => {
            println!(
                "join token for node {node} (single use, valid for {}):\n{}\n\non the node:  nsm node --join TOKEN --underlay-address ADDRESS …  (or NSM_JOIN_TOKEN=TOKEN)",
                humantime::format_duration(ttl),
                t.join_token
            );
            Ok(())
        }
        _ => output::print_value(
            ctx.format,
            &serde_json::json!({ "joinToken": t.join_token, "expires": t.expires.map(|e| e.to_string()) }),
        ),
    }
}

async fn users(ctx: &mut Ctx, verb: UserVerb) -> anyhow::Result<()> {
    match verb {
        UserVerb::Create(c) => {
            validate::name("NAME", &c.name)?;
            let namespaces: Vec<String> = ctx.namespace.split(',').map(|n| n.trim().to_owned()).collect();
            let file = c
                .file
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(format!("{}.config", c.name)));
            let key = nsm_identity::KeyAndCsr::generate()?;
            let out = ctx
                .identity()?
                .create_user(v1::CreateUserRequest {
                    user: Some(v1::User {
                        name: c.name.clone(),
                        namespaces: namespaces.clone(),
                        role: c.role.clone(),
                        creation_timestamp: None,
                    }),
                    csr: key.csr_der.clone(),
                    ttl_seconds: c.ttl.as_secs().max(1),
                })
                .await?
                .into_inner();
            let svid = out.svid.context("the registry answered without a certificate")?;
            let cert = nsm_identity::Svid::from_pem(&svid.certificate_chain, &key.key_pem)?;
            let registries = if svid.registries.is_empty() {
                vec![ctx.registry.clone()]
            } else {
                svid.registries.clone()
            };
            nsm_identity::ClientConfig::new(registries, &cert, &svid.trust_bundle)
                .save(&file)
                .with_context(|| format!("writing {}", file.display()))?;
            match ctx.format {
                Format::Table => println!(
                    "user/{} created ({} in {}); config written to {} — give it to the user: nsmctl --config {} …",
                    c.name,
                    c.role,
                    namespaces.join(","),
                    file.display(),
                    file.display()
                ),
                _ => output::print_value(
                    ctx.format,
                    &serde_json::json!({ "user": c.name, "role": c.role, "namespaces": namespaces,
                        "spiffeId": svid.spiffe_id, "config": file }),
                )?,
            }
            Ok(())
        }
        UserVerb::Get => {
            let list = ctx.identity()?.list_users(v1::ListUsersRequest {}).await?.into_inner();
            match ctx.format {
                Format::Table => {
                    println!("{:<24} {:<6} NAMESPACES", "NAME", "ROLE");
                    for u in list.users {
                        println!("{:<24} {:<6} {}", u.name, u.role, u.namespaces.join(","));
                    }
                    Ok(())
                }
                _ => output::print_value(
                    ctx.format,
                    &serde_json::Value::Array(
                        list.users
                            .iter()
                            .map(|u| serde_json::json!({"name": u.name, "role": u.role, "namespaces": u.namespaces}))
                            .collect(),
                    ),
                ),
            }
        }
        UserVerb::Delete { names } => {
            let mut failed = 0;
            for name in names {
                match ctx
                    .identity()?
                    .delete_user(v1::DeleteUserRequest { name: name.clone() })
                    .await
                {
                    Ok(_) => println!("user/{name} deleted"),
                    Err(s) => {
                        failed += 1;
                        eprintln!("Error: {}", s.message());
                    }
                }
            }
            if failed > 0 {
                bail!(Reported);
            }
            Ok(())
        }
    }
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
