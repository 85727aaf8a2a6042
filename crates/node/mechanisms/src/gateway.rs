//! The gateway to an address endpoint (a VM or server without nsm): the client's veth ends in
//! this host's namespace, forwarding is on for the family, and an nftables pair `(client
//! address . endpoint address)` in table `inet nsm` is masqueraded, so the endpoint sees this
//! node's underlay address and needs no route to the pool. Nothing of the host is touched until
//! the first gateway vWire of a family.

use std::net::IpAddr;
use std::sync::Arc;

use nsm_dataplane::NetNs;

use crate::Result;

/// The host namespace's gateway state.
pub struct Gateway {
    host: Arc<NetNs>,
    /// Families (IPv4, IPv6) for which forwarding and the NAT table are set up.
    ready: tokio::sync::Mutex<[bool; 2]>,
}

impl Gateway {
    pub fn new(host: Arc<NetNs>) -> Self {
        Gateway {
            host,
            ready: Default::default(),
        }
    }

    /// Turns on forwarding for `target`'s family and creates the NAT table, once per family.
    pub async fn ensure(&self, target: IpAddr) -> Result<()> {
        let family = usize::from(target.is_ipv6());
        let mut ready = self.ready.lock().await;
        if ready[family] {
            return Ok(());
        }
        nsm_dataplane::enable_ip_forwarding(&self.host, target.is_ipv6())?;
        nsm_dataplane::ensure_masquerade(&self.host).await?;
        ready[family] = true;
        Ok(())
    }

    /// Masquerades `src` towards `target` (idempotent).
    pub async fn masquerade(&self, src: IpAddr, target: IpAddr) -> Result<()> {
        self.ensure(target).await?;
        Ok(nsm_dataplane::add_masquerade(&self.host, src, target).await?)
    }

    /// Takes `src`'s pair to `target` out of the NAT table.
    pub async fn unmasquerade(&self, src: IpAddr, target: IpAddr) {
        if let Err(e) = nsm_dataplane::remove_masquerade(&self.host, src, target).await {
            tracing::warn!(%src, %target, error = %e, "removing the NAT pair");
        }
    }

    /// The host namespace's path, where a gateway veth ends.
    pub fn host_path(&self) -> String {
        self.host.path().display().to_string()
    }
}
