//! Test beds: a declarative topology of "hosts", workloads and plain address hosts, built on one
//! machine from network namespaces joined by an underlay bridge, and torn down by exact name, also
//! when a test panics (DESIGN.md §9).
//!
//! Layout (nothing is created in the machine's own namespace):
//!
//! ```text
//!   {prefix}-underlay        bridge `br0` (MTU 1500), one port per host / address host
//!      ├─ hv0 ══ eth0  {prefix}-{host}         192.0.2.11/24, ip_forward on
//!      ├─ hv1 ══ eth0  {prefix}-{host}         192.0.2.12/24, ip_forward on
//!      └─ av0 ══ eth0  {prefix}-{address host} 10.0.0.5/24
//!   {prefix}-{workload}      empty (only `lo`): nsm wires it to its host
//! ```
//!
//! The underlay is one L2 segment. Every /24 that any member's address falls in is reachable
//! *on-link* from every member (a `dev eth0` route, no gateway), so a host on 192.0.2.0/24 reaches
//! an address host on 10.0.0.0/24 directly, as a VM on the same LAN would.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::{IpNet, Ipv4Net};
use nsm_dataplane::{DataplaneError, NetNs, Netlink, set_ip_forwarding};

/// MTU of the underlay links: the common Ethernet default, so VXLAN overhead is visible to tests.
pub const UNDERLAY_MTU: u32 = 1500;
/// Name of the underlay bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Name of the underlay interface inside each host and address host.
pub const UNDERLAY_IFACE: &str = "eth0";
/// Topology name of the underlay namespace (for [`Testbed::netns_path`] and [`Testbed::exec`]).
pub const UNDERLAY: &str = "underlay";

/// A topology to bring up. Names are short (they become part of namespace names) and unique
/// across hosts, workloads and address hosts.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Prefix of every namespace name; unique per run (see [`unique_prefix`]) so parallel tests and
    /// leftovers of a killed run never collide.
    pub prefix: String,
    /// Hosts: namespaces on the underlay where an nsm node would run.
    pub hosts: Vec<HostSpec>,
    /// Workloads: empty namespaces "on" a host, for nsm to connect.
    pub workloads: Vec<WorkloadSpec>,
    /// Machines without nsm (VMs, servers) reachable on the underlay by address.
    pub address_hosts: Vec<AddressHostSpec>,
}

impl Topology {
    /// The namespace names (under `/run/netns`) that [`Testbed::up`] creates for this topology,
    /// so a process that may be killed half-way can record them first and clean up later.
    pub fn netns_names(&self) -> Vec<String> {
        std::iter::once(UNDERLAY)
            .chain(self.hosts.iter().map(|h| h.name.as_str()))
            .chain(self.address_hosts.iter().map(|a| a.name.as_str()))
            .chain(self.workloads.iter().map(|w| w.name.as_str()))
            .map(|n| format!("{}-{n}", self.prefix))
            .collect()
    }
}

/// A host: a namespace on the shared underlay, with IP forwarding on.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Topology name.
    pub name: String,
    /// Its underlay address (a /24 is assumed), e.g. 192.0.2.11.
    pub underlay_addr: Ipv4Addr,
}

/// A workload namespace living on a host; it starts with only `lo` (nsm wires it).
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Topology name.
    pub name: String,
    /// The host it runs on.
    pub host: String,
}

/// A machine without nsm on the underlay, e.g. the VM at 10.0.0.5 of the design document.
#[derive(Debug, Clone)]
pub struct AddressHostSpec {
    /// Topology name.
    pub name: String,
    /// Its underlay address (a /24 is assumed).
    pub addr: Ipv4Addr,
}

/// Why a test bed could not be built or torn down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestbedError {
    /// The topology itself is inconsistent (duplicate names, unknown host…).
    #[error("invalid topology: {0}")]
    InvalidTopology(String),
    /// A step of bringing the bed up failed; what had been built was torn down.
    #[error("{step}: {source}")]
    Step {
        /// What was being built.
        step: String,
        /// The data-plane error.
        #[source]
        source: DataplaneError,
    },
    /// Some namespaces could not be deleted.
    #[error("tear down: {}", .0.join("; "))]
    Teardown(Vec<String>),
}

/// Result alias of this crate.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// A prefix unique to this process and call: `nsmt-PID-N` plus `tag` truncated so names stay short.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).take(6).collect();
    format!("nsmt-{}-{}{tag}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Underlay,
    Host,
    Workload,
    AddressHost,
}

/// A built topology. Dropping it tears it down (best effort); [`Testbed::down`] does the same and
/// reports errors.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    /// Topology name -> (role, namespace handle). Namespace name = `{prefix}-{topology name}`.
    namespaces: BTreeMap<String, (Role, NetNs)>,
    /// Namespace names created, in creation order (deleted in reverse), including half-built ones.
    created: Vec<String>,
    /// Workload -> host.
    workload_hosts: BTreeMap<String, String>,
}

impl Testbed {
    /// Builds the topology; all-or-nothing: on any failure what was built is deleted before the
    /// error is returned. Nothing is created outside the namespaces named `{prefix}-…`.
    pub async fn up(t: Topology) -> Result<Testbed> {
        validate(&t)?;
        let mut tb = Testbed {
            prefix: t.prefix.clone(),
            namespaces: BTreeMap::new(),
            created: Vec::new(),
            workload_hosts: t.workloads.iter().map(|w| (w.name.clone(), w.host.clone())).collect(),
        };
        // On error `tb` is dropped here, which tears down whatever exists.
        tb.build(&t).await?;
        Ok(tb)
    }

    async fn build(&mut self, t: &Topology) -> Result<()> {
        let underlay = self.create_ns(UNDERLAY, Role::Underlay)?;
        let nu = connect(&underlay, UNDERLAY).await?;
        let step = |s: &str| {
            let s = s.to_string();
            move |source| TestbedError::Step { step: s, source }
        };
        nu.create_bridge(UNDERLAY_BRIDGE, UNDERLAY_MTU)
            .await
            .map_err(step("create underlay bridge"))?;
        nu.set_up(UNDERLAY_BRIDGE)
            .await
            .map_err(step("create underlay bridge"))?;

        // Every /24 on the underlay, so each member gets on-link routes to the others.
        let subnets: BTreeSet<Ipv4Net> = t
            .hosts
            .iter()
            .map(|h| h.underlay_addr)
            .chain(t.address_hosts.iter().map(|a| a.addr))
            .map(|a| Ipv4Net::new(a, 24).expect("/24").trunc())
            .collect();

        let members = t
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), h.underlay_addr, Role::Host, format!("hv{i}")))
            .chain(
                t.address_hosts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (a.name.as_str(), a.addr, Role::AddressHost, format!("av{i}"))),
            );
        for (name, addr, role, port) in members {
            let what = format!("underlay link of {name} ({addr})");
            let ns = self.create_ns(name, role)?;
            nu.create_veth(&port, UNDERLAY_IFACE, &ns, UNDERLAY_MTU)
                .await
                .map_err(step(&what))?;
            nu.set_controller(&port, UNDERLAY_BRIDGE).await.map_err(step(&what))?;
            nu.set_up(&port).await.map_err(step(&what))?;
            let nl = connect(&ns, name).await?;
            let own = Ipv4Net::new(addr, 24).expect("/24");
            nl.add_address(UNDERLAY_IFACE, IpNet::V4(own))
                .await
                .map_err(step(&what))?;
            nl.set_up(UNDERLAY_IFACE).await.map_err(step(&what))?;
            for subnet in subnets.iter().filter(|s| **s != own.trunc()) {
                nl.add_route(IpNet::V4(*subnet), None, UNDERLAY_IFACE)
                    .await
                    .map_err(step(&what))?;
            }
            if role == Role::Host {
                set_ip_forwarding(&ns, true, true).map_err(step(&format!("ip forwarding on {name}")))?;
            }
        }
        for w in &t.workloads {
            self.create_ns(&w.name, Role::Workload)?;
        }
        Ok(())
    }

    fn create_ns(&mut self, name: &str, role: Role) -> Result<NetNs> {
        let full = format!("{}-{name}", self.prefix);
        // Recorded only once created: a name that already existed is not ours to delete.
        let ns = NetNs::create(&full).map_err(|source| TestbedError::Step {
            step: format!("create {name}"),
            source,
        })?;
        self.created.push(full);
        let handle = ns.try_clone().map_err(|source| TestbedError::Step {
            step: format!("create {name}"),
            source,
        })?;
        self.namespaces.insert(name.to_string(), (role, handle));
        Ok(ns)
    }

    /// The prefix of every namespace of this bed.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace of host `name`. Panics if there is no such host (a bug in the test).
    pub fn host_ns(&self, name: &str) -> &NetNs {
        self.ns_of(name, Role::Host)
    }

    /// The namespace of workload `name`. Panics if there is no such workload.
    pub fn workload_ns(&self, name: &str) -> &NetNs {
        self.ns_of(name, Role::Workload)
    }

    /// The namespace of address host `name`. Panics if there is no such address host.
    pub fn address_host_ns(&self, name: &str) -> &NetNs {
        self.ns_of(name, Role::AddressHost)
    }

    /// The namespace of any member (or [`UNDERLAY`]). Panics if there is no such member.
    pub fn ns(&self, name: &str) -> &NetNs {
        &self.member(name).1
    }

    /// The host that workload `name` lives on. Panics if there is no such workload.
    pub fn workload_host(&self, name: &str) -> &str {
        self.ns_of(name, Role::Workload);
        self.workload_hosts
            .get(name)
            .map(String::as_str)
            .expect("workload has a host")
    }

    /// `/run/netns/{prefix}-{name}` of any member (or [`UNDERLAY`]), for tools and for nsm's own
    /// configuration. Panics if there is no such member.
    pub fn netns_path(&self, name: &str) -> PathBuf {
        self.member(name).1.path().to_path_buf()
    }

    /// The namespace names (under `/run/netns`) this bed created.
    pub fn netns_names(&self) -> Vec<String> {
        self.created.clone()
    }

    /// Runs `argv` inside member `ns_name`'s namespace (`nsenter --net=PATH -- argv`) and returns
    /// its output. Panics if `nsenter` cannot be started. Test support only: the product never
    /// shells out.
    pub fn exec(&self, ns_name: &str, argv: &[&str]) -> Output {
        let path = self.netns_path(ns_name);
        Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .arg("--")
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("run nsenter --net={} -- {argv:?}: {e}", path.display()))
    }

    /// Sends `count` pings from member `from_ns` to `to` with the system `ping` (0.2 s apart, 1 s
    /// timeout) and says whether any was answered (ping's own exit status). Panics if `ping` is
    /// missing (Debian package `iputils-ping`).
    pub fn ping(&self, from_ns: &str, to: IpAddr, count: u32) -> bool {
        let count = count.max(1).to_string();
        let to = to.to_string();
        let out = self.exec(
            from_ns,
            &["ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "1", &to],
        );
        if out.status.code() == Some(127) {
            panic!(
                "`ping` not found: install iputils-ping ({})",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    /// Tears the bed down: deletes exactly the namespaces it created, by name (their links go with
    /// them). Reports the namespaces that could not be deleted.
    pub async fn down(mut self) -> Result<()> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TestbedError::Teardown(errors))
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        // Close our fds first, so the kernel frees each namespace as soon as its name goes.
        self.namespaces.clear();
        let mut errors = Vec::new();
        for name in std::mem::take(&mut self.created).iter().rev() {
            match NetNs::delete(name) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    }

    fn member(&self, name: &str) -> &(Role, NetNs) {
        self.namespaces
            .get(name)
            .unwrap_or_else(|| panic!("test bed {} has no member {name:?}", self.prefix))
    }

    fn ns_of(&self, name: &str, role: Role) -> &NetNs {
        match self.member(name) {
            (r, ns) if *r == role => ns,
            (r, _) => panic!("member {name:?} of test bed {} is a {r:?}, not a {role:?}", self.prefix),
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("nsm-testbed: {e}");
        }
    }
}

async fn connect(ns: &NetNs, name: &str) -> Result<Netlink> {
    Netlink::connect(ns).await.map_err(|source| TestbedError::Step {
        step: format!("netlink in {name}"),
        source,
    })
}

fn validate(t: &Topology) -> Result<()> {
    let bad = |m: String| Err(TestbedError::InvalidTopology(m));
    if t.prefix.is_empty() || t.prefix.contains(['/', '\0']) {
        return bad(format!("prefix {:?} cannot start a namespace name", t.prefix));
    }
    let mut names = BTreeSet::from([UNDERLAY]);
    let all = t
        .hosts
        .iter()
        .map(|h| &h.name)
        .chain(t.workloads.iter().map(|w| &w.name))
        .chain(t.address_hosts.iter().map(|a| &a.name));
    for n in all {
        if n.is_empty() || n.contains(['/', '\0']) {
            return bad(format!("member name {n:?} cannot be part of a namespace name"));
        }
        if !names.insert(n) {
            return bad(format!("member name {n:?} is used twice (or is reserved)"));
        }
    }
    let mut addrs = BTreeSet::new();
    for a in t
        .hosts
        .iter()
        .map(|h| h.underlay_addr)
        .chain(t.address_hosts.iter().map(|a| a.addr))
    {
        if !addrs.insert(a) {
            return bad(format!("underlay address {a} is used twice"));
        }
    }
    for w in &t.workloads {
        if !t.hosts.iter().any(|h| h.name == w.host) {
            return bad(format!("workload {:?} is on unknown host {:?}", w.name, w.host));
        }
    }
    Ok(())
}
