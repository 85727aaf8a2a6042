//! Printing resources: kubectl-style tables, JSON, YAML and `describe`.

use anyhow::bail;
use clap::ValueEnum;
use comfy_table::{Table, presets};
use nsm_api::nsm::v1;
use nsm_model::document::{self, Document, age};
use nsm_model::{Kind, kind, pb, upstream, validate};

use crate::{Ctx, GetOpts, reference};

/// Standard output was closed by its reader (`nsmctl get … | head`): `main` exits quietly.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// `println!` that returns the write error instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!("{}\n", format_args!($($t)*)))
            .map_err(stdout_error)?
    };
}

/// `print!` counterpart of [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!($($t)*)).map_err(stdout_error)?
    };
}

/// Output format.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Human-readable columns.
    Table,
    /// JSON (a list is `{"items": [...]}`).
    Json,
    /// YAML (a list is a multi-document stream that `apply -f` accepts).
    Yaml,
}

fn doc(r: &pb::Resource) -> anyhow::Result<Document> {
    document::to_document(r).ok_or_else(|| anyhow::anyhow!("the registry returned an empty resource"))
}

fn qualified(r: &pb::Resource) -> String {
    let kind = Kind::of(r).map_or("resource", Kind::noun);
    let m = kind::meta(r).cloned().unwrap_or_default();
    format!("{kind}/{}", m.name)
}

/// Prints the result of a create/delete/apply: `kind/name verb`, or the object with -o.
pub(crate) fn print_changed(format: Format, r: &pb::Resource, verb: &str) -> anyhow::Result<()> {
    match format {
        Format::Table => outln!("{} {verb}", qualified(r)),
        _ => print_one(format, r)?,
    }
    Ok(())
}

/// Prints a plain value as JSON or YAML (answers that are not resources: tokens, users).
pub(crate) fn print_value(format: Format, v: &serde_json::Value) -> anyhow::Result<()> {
    match format {
        Format::Yaml => out!("{}", serde_norway::to_string(v)?),
        _ => outln!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

fn print_one(format: Format, r: &pb::Resource) -> anyhow::Result<()> {
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&doc(r)?)?),
        Format::Yaml => out!("{}", serde_norway::to_string(&doc(r)?)?),
        Format::Table => table(std::slice::from_ref(r), false)?,
    }
    Ok(())
}

fn none_if_empty(s: &str) -> String {
    if s.is_empty() { "<none>".into() } else { s.to_owned() }
}

fn joined(v: &[String]) -> String {
    if v.is_empty() { "<none>".into() } else { v.join(",") }
}

fn label_string(m: &std::collections::HashMap<String, String>) -> String {
    let mut l: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    joined(&l)
}

fn expires(ts: Option<&prost_types::Timestamp>) -> String {
    match ts.and_then(nsm_model::to_system_time) {
        None => "never".into(),
        Some(t) => match t.duration_since(std::time::SystemTime::now()) {
            Ok(d) => format!("in {}s", d.as_secs()),
            Err(_) => "expired".into(),
        },
    }
}

/// `Ready`, `Pending: why`, `Failed: why`.
fn status_text(st: &pb::ClientStatus) -> String {
    let phase = document::phase_name(st.phase);
    if st.reason.is_empty() {
        phase.to_owned()
    } else if st.phase == pb::client_status::Phase::Unspecified as i32 {
        format!("Pending: {}", st.reason)
    } else {
        format!("{phase}: {}", st.reason)
    }
}

fn table(items: &[pb::Resource], all_namespaces: bool) -> anyhow::Result<()> {
    let Some(kind) = items.first().and_then(Kind::of) else {
        return Ok(());
    };
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    let ns_col = all_namespaces && kind.namespaced();
    let mut header: Vec<&str> = Vec::new();
    if ns_col {
        header.push("NAMESPACE");
    }
    match kind {
        Kind::NetworkService => header.extend(["NAME", "TYPE", "PAYLOAD", "CIDR", "MATCHES", "AGE"]),
        Kind::Endpoint => header.extend(["NAME", "SERVICES", "ADDRESS", "URL", "NODE", "EXPIRES", "AGE"]),
        Kind::Node => header.extend(["NAME", "ADDRESS", "LABELS", "AGE"]),
        Kind::Client => header.extend(["NAME", "SERVICE", "ENDPOINT", "NODE", "STATUS", "ADDRESS", "AGE"]),
        Kind::Prefix => header.extend(["NAME", "VL3", "PREFIX", "NODE", "MEMBERS OF", "AGE"]),
    }
    t.set_header(header);
    for r in items {
        let m = kind::meta(r).cloned().unwrap_or_default();
        let mut row: Vec<String> = Vec::new();
        if ns_col {
            row.push(m.namespace.clone());
        }
        row.push(m.name.clone());
        match &r.kind {
            Some(pb::resource::Kind::NetworkService(ns)) => {
                let s = ns.spec.clone().unwrap_or_default();
                row.extend([
                    document::service_type_name(s.r#type).to_owned(),
                    s.payload,
                    if s.vl3.is_empty() {
                        none_if_empty(&s.cidr)
                    } else {
                        format!("<vl3 {}>", s.vl3)
                    },
                    s.matches.len().to_string(),
                ]);
            }
            Some(pb::resource::Kind::Endpoint(ep)) => {
                let s = ep.spec.clone().unwrap_or_default();
                row.extend([
                    if s.network_services.is_empty() && !s.address.is_empty() {
                        "<any pinned>".to_owned()
                    } else {
                        joined(&s.network_services)
                    },
                    none_if_empty(&s.address),
                    none_if_empty(&s.url),
                    none_if_empty(&s.node),
                    expires(s.expiration_time.as_ref()),
                ]);
            }
            Some(pb::resource::Kind::Node(n)) => {
                row.extend([n.spec.clone().unwrap_or_default().address, label_string(&m.labels)]);
            }
            Some(pb::resource::Kind::Client(c)) => {
                let s = c.spec.clone().unwrap_or_default();
                let st = c.status.clone().unwrap_or_default();
                let endpoint = if st.endpoint.is_empty() {
                    s.endpoint.clone()
                } else {
                    st.endpoint.clone()
                };
                row.extend([
                    s.network_service,
                    none_if_empty(&endpoint),
                    none_if_empty(&s.node),
                    status_text(&st),
                    joined(&st.src_ip_addrs),
                ]);
            }
            Some(pb::resource::Kind::Prefix(p)) => {
                let s = p.spec.clone().unwrap_or_default();
                row.extend([s.network_service, s.prefix, none_if_empty(&s.node), s.member_service]);
            }
            None => {}
        }
        row.push(age(m.creation_timestamp.as_ref()));
        t.add_row(row);
    }
    // The borderless style still pads cells by one space; drop the leading one, as kubectl prints.
    let text = t.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect();
    outln!("{}", lines.join("\n"));
    Ok(())
}

/// `get`: one resource, or a list (optionally followed by a watch).
pub(crate) async fn get(ctx: &mut Ctx, kind: Kind, opts: &GetOpts) -> anyhow::Result<()> {
    let selector = match &opts.selector {
        Some(s) => validate::parse_labels("--selector", s)?,
        None => Default::default(),
    };
    if let Some(name) = &opts.name {
        let r = ctx
            .client
            .get(v1::GetRequest {
                r#ref: Some(reference(ctx, kind, name)),
            })
            .await?
            .into_inner();
        return print_one(ctx.format, &r);
    }
    let namespace = if opts.all_namespaces || !kind.namespaced() {
        String::new()
    } else {
        ctx.namespace.clone()
    };
    if opts.watch {
        return watch(ctx, kind, namespace, selector, opts.all_namespaces).await;
    }
    let list = ctx
        .client
        .list(v1::ListRequest {
            kind: kind.to_pb() as i32,
            namespace: namespace.clone(),
            label_selector: selector,
        })
        .await?
        .into_inner();
    match ctx.format {
        Format::Table if list.items.is_empty() => {
            if kind.namespaced() && !opts.all_namespaces {
                eprintln!("No {kind} resources found in namespace {namespace:?}.");
            } else {
                eprintln!("No {kind} resources found.");
            }
        }
        Format::Table => table(&list.items, opts.all_namespaces)?,
        Format::Json => {
            let docs: Vec<Document> = list.items.iter().map(doc).collect::<anyhow::Result<_>>()?;
            outln!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "items": docs }))?
            );
        }
        Format::Yaml => {
            for (i, r) in list.items.iter().enumerate() {
                if i > 0 {
                    outln!("---");
                }
                out!("{}", serde_norway::to_string(&doc(r)?)?);
            }
        }
    }
    Ok(())
}

async fn watch(
    ctx: &mut Ctx,
    kind: Kind,
    namespace: String,
    selector: std::collections::HashMap<String, String>,
    all_namespaces: bool,
) -> anyhow::Result<()> {
    use v1::watch_event::Type;
    let mut stream = ctx
        .client
        .watch(v1::WatchRequest {
            kind: kind.to_pb() as i32,
            namespace,
            label_selector: selector,
        })
        .await?
        .into_inner();
    while let Some(ev) = stream.message().await? {
        let Some(r) = ev.resource else { continue };
        let what = match Type::try_from(ev.r#type) {
            Ok(Type::Initial) => "",
            Ok(Type::Added) => "ADDED ",
            Ok(Type::Modified) => "MODIFIED ",
            Ok(Type::Deleted) => "DELETED ",
            Err(_) => "? ",
        };
        match ctx.format {
            Format::Table => {
                let m = kind::meta(&r).cloned().unwrap_or_default();
                let name = if all_namespaces && kind.namespaced() {
                    format!("{}/{}", m.namespace, m.name)
                } else {
                    m.name
                };
                outln!("{what}{kind}/{name} (revision {})", ev.revision);
            }
            Format::Json => outln!(
                "{}",
                serde_json::to_string(&serde_json::json!({"type": what.trim(), "object": doc(&r)?}))?
            ),
            Format::Yaml => {
                outln!("---");
                out!(
                    "{}",
                    serde_norway::to_string(&serde_json::json!({"type": what.trim(), "object": doc(&r)?}))?
                );
            }
        }
    }
    bail!("the registry ended the watch")
}

/// `describe`: every field, in words, plus what refers to the resource.
pub(crate) async fn describe(ctx: &mut Ctx, kind: Kind, name: &str) -> anyhow::Result<()> {
    let r = ctx
        .client
        .get(v1::GetRequest {
            r#ref: Some(reference(ctx, kind, name)),
        })
        .await?
        .into_inner();
    if ctx.format != Format::Table {
        return print_one(ctx.format, &r);
    }
    let m = kind::meta(&r).cloned().unwrap_or_default();
    let mut lines: Vec<(String, String)> = vec![("Name".into(), m.name.clone())];
    if kind.namespaced() {
        lines.push(("Namespace".into(), m.namespace.clone()));
    }
    lines.push(("Kind".into(), kind.name().into()));
    lines.push(("Labels".into(), label_string(&m.labels)));
    lines.push(("UID".into(), m.uid.clone()));
    let created = m
        .creation_timestamp
        .as_ref()
        .and_then(nsm_model::to_system_time)
        .map_or("-".into(), |t| {
            format!(
                "{} ({} ago)",
                humantime::format_rfc3339_seconds(t),
                age(m.creation_timestamp.as_ref())
            )
        });
    lines.push(("Created".into(), created));
    lines.push(("Resource version".into(), m.resource_version.to_string()));
    let all = |kind: Kind| v1::ListRequest {
        kind: kind.to_pb() as i32,
        namespace: String::new(),
        label_selector: Default::default(),
    };
    match &r.kind {
        Some(pb::resource::Kind::NetworkService(ns)) => {
            let s = ns.spec.clone().unwrap_or_default();
            lines.push(("Type".into(), document::service_type_name(s.r#type).into()));
            lines.push(("Payload".into(), s.payload.clone()));
            lines.push(("CIDR".into(), none_if_empty(&s.cidr)));
            lines.push(("Encryption".into(), encryption_text(&s.encryption)));
            if s.r#type == pb::ServiceType::Vl3 as i32 && s.vl3.is_empty() {
                lines.push(("Prefix length".into(), format!("/{}", s.prefix_len)));
                lines.push(("DNS names".into(), s.dns_template.clone()));
            }
            if !s.vl3.is_empty() {
                lines.push(("On vL3".into(), s.vl3.clone()));
            }
            if s.r#type == pb::ServiceType::Vl3 as i32 {
                lines.push((
                    "Reaches".into(),
                    if s.reach.is_empty() {
                        "its own members and the vL3's shared members".into()
                    } else {
                        format!("its own and the vL3's shared members, and {}", s.reach.join(", "))
                    },
                ));
            }
            let up = upstream::name_of(&m.namespace, &m.name);
            lines.push(("Upstream name".into(), up.clone()));
            if s.matches.is_empty() {
                lines.push(("Matches".into(), "<none> (any endpoint offering the service)".into()));
            }
            for (i, mt) in s.matches.iter().enumerate() {
                let dst: Vec<String> = mt
                    .routes
                    .iter()
                    .map(|r| label_string(&r.destination_selector))
                    .collect();
                lines.push((
                    format!("Match {}", i + 1),
                    format!(
                        "{} -> {}{}",
                        label_string(&mt.source_selector),
                        joined(&dst),
                        if mt.fallthrough { "; fallthrough" } else { "" }
                    ),
                ));
            }
            let eps = ctx.client.list(all(Kind::Endpoint)).await?.into_inner().items;
            let offering: Vec<String> = eps
                .iter()
                .filter_map(|e| match &e.kind {
                    Some(pb::resource::Kind::Endpoint(ep)) => {
                        let u = upstream::nse_to_upstream(ep);
                        u.network_service_names.contains(&up).then_some(u.name)
                    }
                    _ => None,
                })
                .collect();
            lines.push(("Endpoints".into(), joined(&offering)));
        }
        Some(pb::resource::Kind::Endpoint(ep)) => {
            let s = ep.spec.clone().unwrap_or_default();
            lines.push((
                "Services".into(),
                if s.network_services.is_empty() && !s.address.is_empty() {
                    "<any service a client pins this endpoint for>".into()
                } else {
                    joined(&s.network_services)
                },
            ));
            for (svc, l) in &s.service_labels {
                lines.push((format!("Labels for {svc}"), label_string(&l.labels)));
            }
            lines.push(("Address".into(), none_if_empty(&s.address)));
            lines.push(("URL".into(), none_if_empty(&s.url)));
            lines.push(("Node".into(), none_if_empty(&s.node)));
            lines.push(("Netns".into(), none_if_empty(&s.netns)));
            lines.push(("Expires".into(), expires(s.expiration_time.as_ref())));
            let first = s
                .initial_registration_time
                .as_ref()
                .and_then(nsm_model::to_system_time)
                .map_or("-".into(), |t| humantime::format_rfc3339_seconds(t).to_string());
            lines.push(("First registered".into(), first));
            lines.push(("Upstream name".into(), upstream::name_of(&m.namespace, &m.name)));
        }
        Some(pb::resource::Kind::Client(c)) => {
            let s = c.spec.clone().unwrap_or_default();
            let st = c.status.clone().unwrap_or_default();
            lines.push(("Network service".into(), s.network_service));
            lines.push(("Pinned endpoint".into(), none_if_empty(&s.endpoint)));
            lines.push(("Netns".into(), s.netns));
            lines.push(("Interface".into(), s.interface));
            lines.push(("Node".into(), none_if_empty(&s.node)));
            lines.push((
                "Encryption".into(),
                if s.encryption.is_empty() {
                    "<service's>".into()
                } else {
                    s.encryption.clone()
                },
            ));
            let status = if c.status.is_none() && s.node.is_empty() {
                "Pending: no node assigned (give --node, or create it through the workload's node daemon)".into()
            } else if c.status.is_none() {
                format!("Pending: waiting for node {}", s.node)
            } else {
                status_text(&st)
            };
            lines.push(("Status".into(), status));
            lines.push(("Endpoint".into(), none_if_empty(&st.endpoint)));
            lines.push(("Mechanism".into(), none_if_empty(&st.mechanism)));
            lines.push(("Addresses".into(), joined(&st.src_ip_addrs)));
            lines.push(("Peer addresses".into(), joined(&st.dst_ip_addrs)));
            lines.push(("Routes".into(), joined(&st.routes)));
            if !st.dns_name.is_empty() {
                lines.push(("DNS name".into(), st.dns_name.clone()));
                lines.push(("DNS servers".into(), joined(&st.dns_servers)));
                lines.push(("Search domains".into(), joined(&st.search_domains)));
            }
            lines.push(("MTU".into(), if st.mtu == 0 { "-".into() } else { st.mtu.to_string() }));
            lines.push(("Connection".into(), none_if_empty(&st.connection_id)));
            lines.push((
                "Path".into(),
                if st.path.is_empty() {
                    "<none>".into()
                } else {
                    st.path.join(" -> ")
                },
            ));
            lines.push(("RX".into(), format!("{} bytes, {} packets", st.rx_bytes, st.rx_packets)));
            lines.push(("TX".into(), format!("{} bytes, {} packets", st.tx_bytes, st.tx_packets)));
        }
        Some(pb::resource::Kind::Node(n)) => {
            let spec = n.spec.clone().unwrap_or_default();
            lines.push(("Address".into(), spec.address));
            lines.push(("URL".into(), none_if_empty(&spec.url)));
            let started = spec
                .started
                .as_ref()
                .and_then(nsm_model::to_system_time)
                .map_or("-".into(), |t| humantime::format_rfc3339_seconds(t).to_string());
            lines.push(("Daemon started".into(), started));
            lines.push(("WireGuard key".into(), none_if_empty(&spec.wireguard_public_key)));
            lines.push(("WireGuard backend".into(), none_if_empty(&spec.wireguard_backend)));
            let eps = ctx.client.list(all(Kind::Endpoint)).await?.into_inner().items;
            let on: Vec<String> = eps
                .iter()
                .filter_map(|e| match &e.kind {
                    Some(pb::resource::Kind::Endpoint(ep)) if ep.spec.as_ref().is_some_and(|s| s.node == m.name) => {
                        kind::meta(e).map(|em| format!("{}/{}", em.namespace, em.name))
                    }
                    _ => None,
                })
                .collect();
            lines.push(("Endpoints".into(), joined(&on)));
        }
        Some(pb::resource::Kind::Prefix(p)) => {
            let s = p.spec.clone().unwrap_or_default();
            lines.push(("vL3".into(), s.network_service));
            lines.push(("Prefix".into(), s.prefix));
            lines.push((
                "Node".into(),
                if s.node.is_empty() {
                    "<none> (an upstream prefix client: released when its stream ends)".into()
                } else {
                    s.node
                },
            ));
            lines.push(("Members of".into(), s.member_service));
        }
        None => {}
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    for (k, v) in lines {
        outln!("{:width$}{v}", format!("{k}:"));
    }
    Ok(())
}

/// A service's encryption setting as printed (unset = none).
fn encryption_text(e: &str) -> String {
    if e.is_empty() { "none".into() } else { e.into() }
}
