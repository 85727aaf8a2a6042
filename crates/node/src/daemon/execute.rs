//! Carrying out a vWire decision: allocate, build (through the mechanism modules), adopt,
//! refresh, tear down. Every build is all or nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use nsm_api::connection::{Connection, Mechanism, Path as ConnPath, PathSegment};
use nsm_api::connectioncontext::{ConnectionContext, IpContext};
use nsm_api::nsm::v1;
use nsm_dataplane::LinkStats;
use nsm_model::pb;
use nsm_node_plan::client::{Allocation, Decision, Far, Target};
use nsm_node_plan::{ClientKey, Encryption, MechanismKind, NotReady, Pair};

use super::reconciler::{Failure, Reconciler, Wired, failed};
use nsm_mechanisms::kernel::{self, VETH_MTU, Veth};
use nsm_mechanisms::{ClientEnd, Tunnel, peer_link};

impl Reconciler {
    /// Carries out `decision` for client `key`; the status to report.
    pub(crate) async fn execute(
        &self,
        key: &ClientKey,
        client: &pb::Client,
        decision: Decision,
        stats: LinkStats,
    ) -> Result<v1::ClientStatus, Failure> {
        let (target, allocation, replace) = match decision {
            Decision::TearDown | Decision::Member { .. } => unreachable!("reconcile handles these"),
            Decision::NotReady(nr) => return Err(nr.into()),
            Decision::Keep(t) => {
                let w = self.state.lock().wired.get(key).cloned().expect("it stands");
                return Ok(self.ready_status(key, client, &t, &w, stats));
            }
            Decision::Refresh(t) => {
                let w = self.refresh(key).await?;
                return Ok(self.ready_status(key, client, &t, &w, stats));
            }
            Decision::Adopt {
                target,
                allocation,
                mechanism,
            } => {
                // The registry is told the pair (a vWire built before leases existed has none);
                // one it gives to another client is not kept.
                let pair = allocation.wanted.expect("an adopted vWire has its pair");
                let leased = match self.lease(key, &target.service, allocation).await {
                    Ok(p) => p,
                    // A registry that cannot lease now (or not at all: an older one) does not stop
                    // a vWire that forwards from being kept; the registry counts the addresses of
                    // Ready statuses as taken.
                    Err(f) if f.transient => {
                        tracing::warn!(client = %key, reason = %f.not_ready.reason, "adopting without a lease");
                        pair
                    }
                    Err(f) => return Err(f),
                };
                if leased == pair {
                    let w = self.adopt(key, client, &target, pair, mechanism).await?;
                    return Ok(self.ready_status(key, client, &target, &w, stats));
                }
                tracing::warn!(client = %key, had = ?pair, leased = ?leased, "the vWire's addresses are another client's; rebuilding it");
                let spec = client.spec.clone().unwrap_or_default();
                if let Some(route) = target.far.route().filter(|_| target.far.nat()) {
                    self.gateway.unmasquerade(pair.src.addr(), route.addr()).await;
                }
                kernel::remove(&spec.netns, &spec.interface).await.map_err(failed)?;
                (target, allocation, false)
            }
            Decision::Build(t, a) => (t, a, false),
            Decision::Rebuild(t, a, why) => {
                tracing::info!(client = %key, ?why, "rebuilding the vWire");
                (t, a, true)
            }
            Decision::Heal {
                target,
                allocation,
                from,
            } => {
                tracing::info!(client = %key, %from, to = %target.endpoint, "healing the vWire to another endpoint");
                (target, allocation, true)
            }
        };
        if replace {
            // First: the new vWire takes the same interface name.
            self.teardown(key).await;
        }
        let (pair, created) = self.lease_and_create(key, client, &target, allocation).await?;
        let built = match created {
            Ok(created) => self.build(key, client, &target, pair, created).await,
            Err(e) => Err(e),
        };
        let w = match built {
            Ok(w) => w,
            Err(e) => {
                self.release(key).await;
                return Err(failed(e));
            }
        };
        self.set_wired(key, &w);
        tracing::info!(client = %key, endpoint = %target.endpoint, src = %pair.src, dst = %pair.dst, mechanism = %w.mechanism, "vWire ready");
        let stats = kernel::observe(&w.netns, &w.interface, false)
            .await
            .map(|(_, s, _)| s)
            .unwrap_or_default();
        Ok(self.ready_status(key, client, &target, &w, stats))
    }

    /// The client's pair of addresses from the registry, which leases each address to one
    /// client only: the pair it holds in the pool, else the wanted one if free, else the first free
    /// pair. A registry that does not answer is a blip: what stands is kept and the client retried.
    async fn lease(&self, key: &ClientKey, service: &str, a: Allocation) -> Result<Pair, Failure> {
        let wanted = a.wanted.map(|p| (p.src, p.dst));
        match crate::ipam::lease_pair(&mut self.registry.clone(), (&key.namespace, &key.name), a.pool, wanted).await {
            Ok((src, dst)) => Ok(Pair { src, dst }),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(NotReady::failed(format!(
                "address pool {} of {service:?} is exhausted: {}",
                a.pool,
                s.message()
            ))
            .into()),
            Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound) => {
                Err(NotReady::failed(s.message()).into())
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => Err(Failure {
                not_ready: NotReady::pending(
                    "the registry does not lease vWire addresses (AllocateAddresses); it is older than this node",
                ),
                transient: true,
            }),
            Err(s) => Err(Failure {
                not_ready: NotReady::pending(format!("registry: {}", s.message())),
                transient: true,
            }),
        }
    }

    /// Gives back the addresses of a client whose vWire could not be built, so that it holds none
    /// another client could use meanwhile.
    async fn release(&self, key: &ClientKey) {
        if let Err(s) = crate::ipam::release_pairs(&mut self.registry.clone(), (&key.namespace, &key.name)).await {
            tracing::debug!(client = %key, error = %s.message(), "giving back the addresses of a vWire that was not built");
        }
    }

    /// Leases the vWire's addresses and, for a veth vWire, creates the pair meanwhile (it needs no
    /// addresses): a set-up waits for the longer of the two, not for both. A pair created for
    /// addresses that could not be leased is deleted again.
    async fn lease_and_create(
        &self,
        key: &ClientKey,
        client: &pb::Client,
        target: &Target,
        a: Allocation,
    ) -> Result<(Pair, crate::Result<Option<kernel::Created>>), Failure> {
        let far = match &target.far {
            Far::Local { netns } => netns.clone(),
            Far::Gateway { nat, target: addr } => {
                if *nat && let Err(e) = self.gateway.ensure(*addr).await {
                    return Err(failed(e));
                }
                self.gateway.host_path()
            }
            Far::Remote { .. } => return Ok((self.lease(key, &target.service, a).await?, Ok(None))),
        };
        let spec = client.spec.clone().unwrap_or_default();
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let peer = peer_link(&uid);
        let (leased, created) = tokio::join!(
            self.lease(key, &target.service, a),
            kernel::create(&spec.netns, &spec.interface, &far, &peer, VETH_MTU)
        );
        match leased {
            Ok(pair) => Ok((pair, created.map(Some).map_err(Into::into))),
            Err(f) => {
                if let Ok(c) = created {
                    c.abandon(&spec.interface).await;
                }
                Err(f)
            }
        }
    }

    /// Builds a vWire towards `target`'s far end (a veth pair `created` already): all or nothing.
    async fn build(
        &self,
        key: &ClientKey,
        client: &pb::Client,
        target: &Target,
        pair: Pair,
        created: Option<kernel::Created>,
    ) -> crate::Result<Wired> {
        let spec = client.spec.clone().unwrap_or_default();
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let mut w = Wired {
            netns: spec.netns.clone(),
            interface: spec.interface.clone(),
            endpoint: target.endpoint.clone(),
            pair,
            mtu: VETH_MTU,
            remote: None,
            refreshed: None,
            route: target.far.route(),
            nat: target.far.nat(),
            mechanism: MechanismKind::Kernel,
            wg_id: None,
            uid: uid.clone(),
            monitor_id: super::reconciler::monitor_id(client),
        };
        fn veth(w: &Wired) -> Veth<'_> {
            Veth {
                netns: &w.netns,
                interface: &w.interface,
                pair: w.pair,
                mtu: w.mtu,
                route: w.route,
            }
        }
        match &target.far {
            Far::Local { .. } | Far::Gateway { .. } => {
                created.expect("created with the lease").configure(&veth(&w)).await?;
            }
            Far::Remote { url, underlay, .. } => {
                let conn = self.connection(key, &uid, &target.service, &target.endpoint, client, pair);
                let prefs = self.offers(&uid, target.encryption)?;
                let wired = self
                    .wire_remote(&w, &uid, url, *underlay, conn, prefs, target.encryption)
                    .await;
                if let Some(wg) = &self.tunnels.wireguard {
                    // The ports offered for a WIREGUARD end are its tunnel's now, or free again
                    // (refused, or another mechanism chosen).
                    wg.unclaim(&nsm_mechanisms::wireguard::client_end_id(&uid));
                }
                let (accepted, kind, connected) = wired?;
                w.mtu = connected.mtu;
                w.mechanism = kind;
                w.wg_id = connected.wg_id;
                w.remote = Some((url.clone(), accepted));
                w.refreshed = Some(Instant::now());
            }
        }
        // The route beyond the peer came with the end (the veth's `configure`, a tunnel's
        // `connect`); a gateway vWire's NAT pair is the last step.
        let masqueraded = match w.nat_route() {
            Some(route) => self.gateway.masquerade(w.pair.src.addr(), route.addr()).await,
            None => Ok(()),
        };
        if let Err(e) = masqueraded {
            self.unwire(&w).await;
            return Err(e.into());
        }
        Ok(w)
    }

    /// The mechanisms this node offers the endpoint's node for connection `uid`, in order of
    /// preference: WIREGUARD when encryption is required or preferred, VXLAN unless it is
    /// required.
    fn offers(&self, uid: &str, encryption: Encryption) -> crate::Result<Vec<Mechanism>> {
        let mut offers = Vec::new();
        if encryption != Encryption::None {
            match &self.tunnels.wireguard {
                Some(wg) => offers.push(Tunnel::offer(wg.as_ref(), uid)?),
                None if encryption == Encryption::Required => {
                    return Err(crate::NodeError::Precondition(format!(
                        "encryption required, but WIREGUARD is disabled on node {:?} (--no-wireguard)",
                        self.config.name
                    )));
                }
                None => {}
            }
        }
        if encryption != Encryption::Required {
            offers.push(self.tunnels.vxlan.offer(uid)?);
        }
        Ok(offers)
    }

    /// Builds a cross-node vWire: the endpoint's node first (so a refusal leaves nothing here),
    /// then this end, with the mechanism the endpoint's node chose.
    #[allow(clippy::too_many_arguments)]
    async fn wire_remote(
        &self,
        w: &Wired,
        uid: &str,
        url: &str,
        underlay: IpAddr,
        conn: Connection,
        prefs: Vec<Mechanism>,
        encryption: Encryption,
    ) -> crate::Result<(Connection, MechanismKind, nsm_mechanisms::Connected)> {
        let accepted = self.peers.request(url, conn, prefs).await.map_err(|e| {
            if encryption == Encryption::Required {
                crate::NodeError::Precondition(format!(
                    "encryption required, but the endpoint's node did not accept WIREGUARD: {e}"
                ))
            } else {
                e
            }
        })?;
        let answer = accepted.mechanism.clone().unwrap_or_default();
        let built = async {
            let kind = answer
                .r#type
                .parse::<MechanismKind>()
                .ok()
                .filter(|k| match k {
                    MechanismKind::WireGuard => true,
                    MechanismKind::Vxlan => encryption != Encryption::Required,
                    MechanismKind::Kernel => false,
                })
                .ok_or_else(|| {
                    crate::NodeError::Precondition(format!(
                        "the endpoint's node chose mechanism {:?}, which this vWire does not allow",
                        answer.r#type
                    ))
                })?;
            let tunnel = self.tunnels.get(kind).ok_or_else(|| {
                crate::NodeError::Precondition(format!("the endpoint's node chose {kind}, which is disabled here"))
            })?;
            let end = ClientEnd {
                id: uid,
                netns: &w.netns,
                interface: &w.interface,
                pair: w.pair,
                route: w.route,
                peer_underlay: underlay,
            };
            Ok::<_, crate::NodeError>((kind, tunnel.connect(&end, &answer).await?))
        }
        .await;
        match built {
            Ok((kind, connected)) => Ok((accepted, kind, connected)),
            Err(e) => {
                self.peers.close(url, accepted).await;
                Err(e)
            }
        }
    }

    /// Re-requests a standing vWire's far end (the endpoint's node forgets connections that are
    /// not); the request carries this node's current WireGuard key, so a rotation reaches the
    /// peer. A WIREGUARD end whose peer answers with a new key takes it in place; one answered
    /// with another port (the key file was lost, the port was taken) is built anew.
    async fn refresh(&self, key: &ClientKey) -> Result<Wired, Failure> {
        let mut w = self.state.lock().wired.get(key).cloned().expect("it stands");
        let Some((url, conn)) = w.remote.clone() else {
            return Ok(w);
        };
        let mut offer = conn.clone();
        if let (Some(wg), Some(_)) = (&self.tunnels.wireguard, &w.wg_id) {
            wg.offer_current_key(&mut offer);
        }
        let prefs = offer.mechanism.clone().into_iter().collect();
        match self.peers.request(&url, offer, prefs).await {
            Ok(c) => {
                let changed = match (&self.tunnels.wireguard, &w.wg_id) {
                    (Some(wg), Some(id)) => !wg.refreshed(id, &conn, &c).await,
                    _ => false,
                };
                w.remote = Some((url, c));
                w.refreshed = Some(Instant::now());
                self.set_wired(key, &w);
                if changed {
                    self.teardown(key).await;
                    return Err(
                        NotReady::pending("the endpoint's node changed its WireGuard key or port; rebuilding").into(),
                    );
                }
            }
            Err(e) => tracing::warn!(client = %key, error = %e, "refreshing the remote end failed"),
        }
        Ok(w)
    }

    /// Takes over a vWire that an earlier run built (the kernel has it as the status says): the
    /// far end on another node is asked for again, a gateway's NAT pair put back.
    async fn adopt(
        &self,
        key: &ClientKey,
        client: &pb::Client,
        target: &Target,
        pair: Pair,
        mechanism: MechanismKind,
    ) -> Result<Wired, Failure> {
        let spec = client.spec.clone().unwrap_or_default();
        let uid = client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let mtu = client.status.as_ref().map_or(0, |st| st.mtu);
        let mut w = Wired {
            netns: spec.netns.clone(),
            interface: spec.interface.clone(),
            endpoint: target.endpoint.clone(),
            pair,
            mtu: if mtu == 0 { VETH_MTU } else { mtu },
            remote: None,
            refreshed: None,
            route: target.far.route(),
            nat: target.far.nat(),
            mechanism,
            wg_id: None,
            uid: uid.clone(),
            monitor_id: super::reconciler::monitor_id(client),
        };
        if let Far::Remote { url, .. } = &target.far {
            let conn = self.connection(key, &uid, &target.service, &target.endpoint, client, pair);
            let prefs = vec![self.tunnels.vxlan.offer(&uid).map_err(failed)?];
            let accepted = self
                .peers
                .request(url, conn, prefs)
                .await
                .map_err(|e| Failure::from(NotReady::pending(e.to_string())))?;
            w.remote = Some((url.clone(), accepted));
            w.refreshed = Some(Instant::now());
        }
        if let Some(route) = w.nat_route() {
            self.gateway
                .masquerade(pair.src.addr(), route.addr())
                .await
                .map_err(failed)?;
        }
        self.set_wired(key, &w);
        Ok(w)
    }

    /// The upstream connection this node asks the endpoint's node for.
    fn connection(
        &self,
        key: &ClientKey,
        uid: &str,
        service: &str,
        endpoint: &str,
        client: &pb::Client,
        pair: Pair,
    ) -> Connection {
        let expires = Some(prost_types::Timestamp::from(
            SystemTime::now() + self.config.remote_lifetime,
        ));
        let seg = |name: String| PathSegment {
            name,
            id: uid.to_owned(),
            token: String::new(),
            expires,
            metrics: HashMap::new(),
        };
        Connection {
            id: uid.to_owned(),
            network_service: service.to_owned(),
            // Chosen by the endpoint's node from the request's preferences.
            mechanism: None,
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec![pair.src.to_string()],
                    dst_ip_addrs: vec![pair.dst.to_string()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            labels: client.metadata.as_ref().map(|m| m.labels.clone()).unwrap_or_default(),
            path: Some(ConnPath {
                index: 1,
                path_segments: vec![seg(key.upstream()), seg(self.config.name.clone())],
            }),
            network_service_endpoint_name: endpoint.to_owned(),
            payload: "IP".into(),
            state: 0,
        }
    }

    /// A Ready vWire's status.
    fn ready_status(
        &self,
        key: &ClientKey,
        client: &pb::Client,
        t: &Target,
        w: &Wired,
        stats: LinkStats,
    ) -> v1::ClientStatus {
        v1::ClientStatus {
            phase: nsm_node_plan::Phase::Ready as i32,
            reason: String::new(),
            endpoint: t.endpoint.clone(),
            mechanism: w.mechanism.as_str().into(),
            src_ip_addrs: vec![w.pair.src.to_string()],
            dst_ip_addrs: vec![w.pair.dst.to_string()],
            connection_id: client.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default(),
            path: t.path(key, &self.me()),
            rx_bytes: stats.rx_bytes,
            tx_bytes: stats.tx_bytes,
            rx_packets: stats.rx_packets,
            tx_packets: stats.tx_packets,
            updated: None,
            mtu: w.mtu,
            routes: w.route.iter().map(ToString::to_string).collect(),
            ..Default::default()
        }
    }
}
