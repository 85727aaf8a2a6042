//! Per-namespace sysctls.

use std::path::Path;

use crate::error::{DataplaneError, Result};
use crate::netns::NetNs;

/// Turns IPv4 and IPv6 forwarding on or off in `ns` (what a host or a router namespace needs to
/// pass traffic between its links). `/proc/sys/net` resolves to the namespace of the thread that
/// opens the file, so the writes happen on a thread inside `ns`.
pub fn set_ip_forwarding(ns: &NetNs, v4: bool, v6: bool) -> Result<()> {
    let writes = [
        ("/proc/sys/net/ipv4/ip_forward", v4),
        ("/proc/sys/net/ipv6/conf/all/forwarding", v6),
    ];
    ns.run(move || {
        for (file, on) in writes {
            std::fs::write(file, if on { "1\n" } else { "0\n" }).map_err(|source| DataplaneError::Namespace {
                op: "write sysctl",
                path: Path::new(file).to_path_buf(),
                source,
            })?;
        }
        Ok(())
    })?
}
