//! `nsmctl apply -f`: every document is read and checked (locally, then by the registry as a dry
//! run) before the first one is written, so a bad document in a file changes nothing.

use std::io::Read;

use anyhow::{Context, bail};
use clap::Args;
use nsm_api::nsm::v1;
use nsm_model::{Kind, document, kind, pb, validate};

use crate::{Ctx, Reported, output};

/// Flags of `apply`.
#[derive(Args)]
pub(crate) struct ApplyArgs {
    /// File to read, or `-` for standard input (repeatable).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
    /// Check everything and report what would happen, without writing.
    #[arg(long)]
    dry_run: bool,
}

/// A document with where it came from.
pub(crate) struct Doc {
    origin: String,
    resource: pb::Resource,
}

/// Reads and validates every document of every file.
pub(crate) fn read(args: &ApplyArgs, namespace: &str) -> anyhow::Result<Vec<Doc>> {
    let mut out = Vec::new();
    for file in &args.files {
        let text = if file == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read standard input")?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
        };
        let name = if file == "-" { "<stdin>" } else { file.as_str() };
        let resources = document::parse_documents(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        if resources.is_empty() {
            bail!("{name}: no documents found");
        }
        for (i, mut resource) in resources.into_iter().enumerate() {
            let kind = Kind::of(&resource);
            if let Some(m) = kind::meta_mut(&mut resource)
                && m.namespace.is_empty()
                && kind.is_some_and(Kind::namespaced)
            {
                m.namespace = namespace.to_owned();
            }
            let label = kind::meta(&resource).map_or(String::new(), |m| m.name.clone());
            let origin = format!("{name}: document {} ({}/{label})", i + 1, kind.map_or("?", Kind::noun));
            validate::resource(&mut resource).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
            out.push(Doc { origin, resource });
        }
    }
    Ok(out)
}

/// Applies the documents: a dry run of all first, then the writes.
pub(crate) async fn run(ctx: &mut Ctx, args: &ApplyArgs, docs: Vec<Doc>) -> anyhow::Result<()> {
    let mut failed = false;
    for d in &docs {
        let req = v1::ApplyRequest {
            resource: Some(d.resource.clone()),
            dry_run: true,
        };
        if let Err(s) = ctx.client.apply(req).await {
            eprintln!("Error: {}: {}", d.origin, s.message());
            failed = true;
        }
    }
    if failed {
        eprintln!("Nothing was applied.");
        bail!(Reported);
    }
    for d in docs {
        let req = v1::ApplyRequest {
            resource: Some(d.resource),
            dry_run: args.dry_run,
        };
        let resp = ctx
            .client
            .apply(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", d.origin, s.message()))?
            .into_inner();
        let verb = match v1::ApplyOutcome::try_from(resp.outcome) {
            Ok(v1::ApplyOutcome::Created) => "created",
            Ok(v1::ApplyOutcome::Configured) => "configured",
            _ => "unchanged",
        };
        let verb = if args.dry_run {
            format!("{verb} (dry run)")
        } else {
            verb.to_owned()
        };
        let r = resp.resource.unwrap_or_default();
        output::print_changed(ctx.format, &r, &verb)?;
    }
    Ok(())
}
