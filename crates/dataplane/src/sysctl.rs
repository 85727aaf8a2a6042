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

/// Turns forwarding on for one IP family in `ns`, leaving the other as it is (a gateway must not
/// switch off what the host's administrator switched on).
pub fn enable_ip_forwarding(ns: &NetNs, v6: bool) -> Result<()> {
    let file = if v6 {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    } else {
        "/proc/sys/net/ipv4/ip_forward"
    };
    ns.run(move || {
        std::fs::write(file, "1\n").map_err(|source| DataplaneError::Namespace {
            op: "write sysctl",
            path: Path::new(file).to_path_buf(),
            source,
        })
    })?
}

/// Writes one sysctl (`net.ipv6.conf.default.accept_dad`) inside `ns`.
pub fn write_sysctl(ns: &NetNs, key: &str, value: &str) -> Result<()> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = format!("{value}\n");
    ns.run(move || {
        std::fs::write(&file, value).map_err(|source| DataplaneError::Namespace {
            op: "write sysctl",
            path: Path::new(&file).to_path_buf(),
            source,
        })
    })?
}

/// IPv4 datagrams `ns`'s stack has forwarded since it was created (`Ip: ForwDatagrams` of
/// `/proc/net/snmp`): shows whether a router namespace's traffic takes its stack.
pub fn ipv4_forwarded(ns: &NetNs) -> Result<u64> {
    const FILE: &str = "/proc/thread-self/net/snmp";
    let text = ns.run(|| std::fs::read_to_string(FILE))?;
    let bad = |source: std::io::Error| DataplaneError::Namespace {
        op: "read IP counters",
        path: Path::new(FILE).to_path_buf(),
        source,
    };
    let text = text.map_err(bad)?;
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let found = ip.next().zip(ip.next()).and_then(|(names, values)| {
        let i = names.split_whitespace().position(|n| n == "ForwDatagrams")?;
        values.split_whitespace().nth(i)?.parse().ok()
    });
    found.ok_or_else(|| bad(std::io::Error::other("no Ip: ForwDatagrams counter")))
}

/// Reads one sysctl (`net.ipv4.conf.all.rp_filter`) inside `ns`, trimmed.
pub fn read_sysctl(ns: &NetNs, key: &str) -> Result<String> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.run(move || {
        std::fs::read_to_string(&file)
            .map(|v| v.trim().to_owned())
            .map_err(|source| DataplaneError::Namespace {
                op: "read sysctl",
                path: Path::new(&file).to_path_buf(),
                source,
            })
    })?
}
