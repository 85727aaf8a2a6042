//! Source NAT for gateway vWires: the node masquerades a vWire's traffic to an address endpoint
//! (a VM without nsm) behind its own underlay address, so the VM answers without knowing the
//! mesh's pools. Rules live in one nftables table per namespace, `inet nsm`, holding two sets of
//! `(vWire source, destination)` pairs and one masquerade rule per family; a vWire adds or removes
//! its pair atomically, and the table survives a daemon restart with the vWires it serves.
//!
//! nftables is driven through the `nft` program, as kube-proxy's nftables mode does: its netlink
//! protocol (batched, versioned expressions) is what `libnftables` exists to hide.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::error::{DataplaneError, Result};
use crate::netns::NetNs;

/// The nftables table nsm owns in a namespace.
pub const NAT_TABLE: &str = "nsm";

/// Creates the table, sets and rules if missing (idempotent: existing set elements are kept).
pub async fn ensure_masquerade(ns: &NetNs) -> Result<()> {
    let script = format!(
        "add table inet {t}\n\
         add set inet {t} gw4 {{ type ipv4_addr . ipv4_addr; }}\n\
         add set inet {t} gw6 {{ type ipv6_addr . ipv6_addr; }}\n\
         add chain inet {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {t} postrouting\n\
         add rule inet {t} postrouting ip saddr . ip daddr @gw4 masquerade\n\
         add rule inet {t} postrouting ip6 saddr . ip6 daddr @gw6 masquerade\n",
        t = NAT_TABLE
    );
    nft(ns, "create nat table", script).await
}

/// Masquerades traffic from `src` to `dst` (same family). Idempotent.
pub async fn add_masquerade(ns: &NetNs, src: IpAddr, dst: IpAddr) -> Result<()> {
    let set = set_of(src, dst)?;
    nft(
        ns,
        "add nat element",
        format!("add element inet {NAT_TABLE} {set} {{ {src} . {dst} }}\n"),
    )
    .await
}

/// Stops masquerading `src` → `dst`; true if the pair was there.
pub async fn remove_masquerade(ns: &NetNs, src: IpAddr, dst: IpAddr) -> Result<bool> {
    let set = set_of(src, dst)?;
    match nft(
        ns,
        "delete nat element",
        format!("delete element inet {NAT_TABLE} {set} {{ {src} . {dst} }}\n"),
    )
    .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

fn set_of(src: IpAddr, dst: IpAddr) -> Result<&'static str> {
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => Ok("gw4"),
        (IpAddr::V6(_), IpAddr::V6(_)) => Ok("gw6"),
        _ => Err(DataplaneError::InvalidArgument {
            op: "masquerade",
            reason: format!("{src} and {dst} are of different address families"),
        }),
    }
}

/// Runs `nft -f -` with `script` in `ns` (a child forked from a thread inside `ns` lives there):
/// one transaction, applied whole or not at all.
pub async fn nft_script(ns: &NetNs, op: &'static str, script: String) -> Result<()> {
    nft(ns, op, script).await
}

async fn nft(ns: &NetNs, op: &'static str, script: String) -> Result<()> {
    let out = ns
        .run_async(move || {
            // Debian installs it in /usr/sbin, which a non-login PATH may lack.
            let program = if std::path::Path::new("/usr/sbin/nft").exists() {
                "/usr/sbin/nft"
            } else {
                "nft"
            };
            let mut child = Command::new(program)
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            child.stdin.take().expect("piped").write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .await?;
    let out = out.map_err(|e| DataplaneError::Nft {
        op,
        ns: ns.path().to_path_buf(),
        not_found: false,
        detail: if e.kind() == std::io::ErrorKind::NotFound {
            "the `nft` program is missing: install the nftables package".into()
        } else {
            e.to_string()
        },
    })?;
    if out.status.success() {
        return Ok(());
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(DataplaneError::Nft {
        op,
        ns: ns.path().to_path_buf(),
        not_found: detail.contains("No such file or directory"),
        detail,
    })
}
