//! Kernel data-plane primitives for the nsm node daemon: network namespaces, veth pairs, VXLAN
//! links, addresses, routes and sysctls, spoken over rtnetlink (never by running `ip`), and the
//! source NAT of gateway vWires (nftables).
//!
//! Namespaces are per-thread in Linux and a socket stays in the namespace it was created in, so
//! everything that has to happen *inside* a namespace happens on a dedicated OS thread (see
//! [`NetNs::run`]); a [`Netlink`] handle is a socket opened that way and then driven from any task.
//!
//! Also the eBPF program that hands a vL3 router's incoming packets straight to its members
//! ([`fastpath`]), loaded with the raw syscall ([`bpf`]): no compiler or loader library needed.
//!
//! Also the kernel's WireGuard ([`wg_set`], [`wg_get`]) where the kernel has it.
//!
//! Everything here needs `CAP_NET_ADMIN` (and `CAP_SYS_ADMIN` to create or delete namespaces).

pub mod bpf;
mod error;
pub mod fastpath;
mod nat;
mod netlink;
mod netns;
mod sysctl;
mod wireguard;

pub use error::{DataplaneError, Result};
pub use nat::{NAT_TABLE, add_masquerade, ensure_masquerade, nft_script, remove_masquerade};
pub use netlink::{LinkInfo, LinkStats, MAX_LINK_NAME, NeighbourInfo, Netlink, RouteInfo};
pub use netns::{NETNS_RUN_DIR, NetNs, identity as netns_identity, named_path};
pub use sysctl::{enable_ip_forwarding, ipv4_forwarded, read_sysctl, set_ip_forwarding, write_sysctl};
pub use wireguard::{Key as WgKey, WgDevice, WgDeviceUpdate, WgPeer, WgPeerUpdate, wg_get, wg_set};
