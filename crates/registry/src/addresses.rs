//! vWire address pairs: `ResourceService.AllocateAddresses`, `ReleaseAddresses` and
//! `ListAddressLeases`.
//!
//! A client (vWire) leases one point-to-point pair of host addresses from a pool (its service's
//! `cidr`, or [`pairs::DEFAULT_POOL`]). Pools overlap (every service without a CIDR shares the
//! default one; two services may name overlapping CIDRs), so a lease is stored once per *address*:
//! the key `/nsm/leases/v1/addresses/<addr>` holds the whole [`pb::AddressLease`], and it is only
//! ever created with [`Condition::Absent`]. The store itself therefore refuses a second lease of an
//! address, also between registries sharing one etcd. The keys live outside the resource root
//! (`/nsm/v1/`), so the resource view does not follow them; allocation reads the store itself.
//!
//! A pair is two keys, written one after the other. A pair whose two keys both hold its record is
//! *complete*; one that has only one (a request in flight, or one interrupted by a crash) still
//! keeps its address from everybody else, and its client's next request clears it. Every
//! allocation ends by reading the store again after its writes and answering with the client's
//! complete pair that was completed first, giving back any other: two requests for one client
//! racing on two registries thus agree on one pair (whichever writes second reads the first's).
//!
//! **Clients that hold addresses without a lease** (made Ready before the registry leased pairs,
//! or wired by a node daemon that still picks pairs itself): the addresses in every other client's
//! status count as taken, at every allocation. They are not leased at start-up instead: a
//! one-shot migration would not cover a node daemon of the previous version that keeps writing
//! such statuses during a rolling upgrade, it would have to guess each pair's pool from the
//! client's service (which may have changed), and it could only hand an address that two clients
//! already share (what the old race produced) to one of them. A status stops counting when its
//! client goes, or when the node reports the leased pair in it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_model::{Kind, ValidationError, pairs, pb, validate};
use nsm_store::{Condition, KeyValue, PutOptions, Revision, StoreError};
use prost::Message;

use crate::{Registry, RegistryError, Result};

/// Root of the address leases in the store: one key per leased address.
const ROOT: &str = "/nsm/leases/v1/addresses/";

/// Rounds of choose-and-lease before giving up with `Conflict`; each lost round means another
/// client took an address first, so this bounds only pathological contention.
const LEASE_ROUNDS: usize = 1024;

/// A client: (namespace, name).
pub(crate) type ClientKey = (String, String);

/// A point-to-point pair: (client's address, peer's address), host prefixes.
pub(crate) type Pair = (IpNet, IpNet);

fn key_of(addr: IpAddr) -> String {
    format!("{ROOT}{addr}")
}

/// One pair as found in the store.
struct Held {
    client: ClientKey,
    pair: Pair,
    lease: pb::AddressLease,
    /// Its keys present, with their revisions.
    keys: Vec<(String, Revision)>,
    /// The revision at which its second key was written; None while it has one key only.
    completed: Option<Revision>,
}

/// Every lease in the store at one instant.
struct Leases {
    held: Vec<Held>,
    /// Every address with a key and who holds it (None: an undecodable record, which still keeps
    /// its address from everybody).
    holders: BTreeMap<IpAddr, Option<ClientKey>>,
}

impl Leases {
    fn from_store(kvs: Vec<KeyValue>) -> Leases {
        let mut by_pair: BTreeMap<(ClientKey, IpAddr, IpAddr), Held> = BTreeMap::new();
        let mut holders = BTreeMap::new();
        for kv in kvs {
            let Some(addr) = kv.key.strip_prefix(ROOT).and_then(|a| a.parse::<IpAddr>().ok()) else {
                tracing::warn!(key = %kv.key, "not an address lease key; ignored");
                continue;
            };
            let Some((client, pair, lease)) = decode(&kv).filter(|(_, p, _)| p.0.addr() == addr || p.1.addr() == addr)
            else {
                tracing::warn!(key = %kv.key, "undecodable address lease; its address stays taken");
                holders.insert(addr, None);
                continue;
            };
            holders.insert(addr, Some(client.clone()));
            let h = by_pair
                .entry((client.clone(), pair.0.addr(), pair.1.addr()))
                .or_insert_with(|| Held {
                    client,
                    pair,
                    lease,
                    keys: Vec::new(),
                    completed: None,
                });
            h.keys.push((kv.key.clone(), kv.mod_revision));
            if h.keys.len() == 2 {
                h.completed = Some(h.keys.iter().map(|(_, r)| *r).max().unwrap_or_default());
            }
        }
        Leases {
            held: by_pair.into_values().collect(),
            holders,
        }
    }

    /// The client's complete pair within `pool` that was completed first.
    fn kept(&self, client: &ClientKey, pool: IpNet) -> Option<&Held> {
        self.held
            .iter()
            .filter(|h| {
                h.client == *client && pairs::is_host(pool, h.pair.0.addr()) && pairs::is_host(pool, h.pair.1.addr())
            })
            .filter_map(|h| Some((h.completed?, h)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, h)| h)
    }

    fn of<'a>(&'a self, client: &'a ClientKey) -> impl Iterator<Item = &'a Held> + 'a {
        self.held.iter().filter(move |h| h.client == *client)
    }
}

fn decode(kv: &KeyValue) -> Option<(ClientKey, Pair, pb::AddressLease)> {
    let lease = pb::AddressLease::decode(kv.value.as_slice()).ok()?;
    let c = lease.client.as_ref()?;
    let pair = (lease.src_ip_addr.parse().ok()?, lease.dst_ip_addr.parse().ok()?);
    Some(((c.namespace.clone(), c.name.clone()), pair, lease))
}

fn client_ref(client: &ClientKey) -> pb::ResourceRef {
    pb::ResourceRef {
        kind: pb::Kind::Client as i32,
        namespace: client.0.clone(),
        name: client.1.clone(),
    }
}

/// The client a request names (`field`): kind Client or unspecified, a valid name, the default
/// namespace when none is given.
pub(crate) fn client_of(field: &str, r: Option<pb::ResourceRef>) -> Result<ClientKey> {
    let r = r.ok_or_else(|| ValidationError::new(field, "missing"))?;
    if r.kind != pb::Kind::Unspecified as i32 && r.kind != pb::Kind::Client as i32 {
        return Err(ValidationError::new(format!("{field}.kind"), "address pairs are leased to clients only").into());
    }
    validate::name(&format!("{field}.name"), &r.name)?;
    let namespace = if r.namespace.is_empty() {
        nsm_model::DEFAULT_NAMESPACE.to_owned()
    } else {
        validate::namespace(&format!("{field}.namespace"), &r.namespace)?;
        r.namespace
    };
    Ok((namespace, r.name))
}

/// One address of a wanted pair: `addr/32` (`/128`) or a bare address, a host of `pool`.
fn wanted_addr(field: &str, s: &str, pool: IpNet) -> Result<IpNet> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| ValidationError::new(field, format!("{s:?} is not an address such as 10.60.0.1/32")))?,
        ),
    };
    if net.prefix_len() != net.max_prefix_len() {
        return Err(ValidationError::new(
            field,
            format!("{s:?} is not a host address (/{})", net.max_prefix_len()),
        )
        .into());
    }
    if !pairs::is_host(pool, net.addr()) {
        return Err(ValidationError::new(field, format!("{s:?} is not a host address of the pool {pool}")).into());
    }
    Ok(net)
}

/// The wanted pair of a request: both addresses or neither, distinct hosts of `pool`.
pub(crate) fn wanted_of(src: &str, dst: &str, pool: IpNet) -> Result<Option<Pair>> {
    match (src.is_empty(), dst.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => {
            Err(ValidationError::new("dst_ip_addr", "give both addresses of the wanted pair, or neither").into())
        }
        (true, false) => {
            Err(ValidationError::new("src_ip_addr", "give both addresses of the wanted pair, or neither").into())
        }
        (false, false) => {
            let a = wanted_addr("src_ip_addr", src, pool)?;
            let b = wanted_addr("dst_ip_addr", dst, pool)?;
            if a.addr() == b.addr() {
                return Err(ValidationError::new("dst_ip_addr", format!("{dst:?} is the source address too")).into());
            }
            Ok(Some((a, b)))
        }
    }
}

impl Registry {
    async fn read_leases(&self) -> Result<Leases> {
        let (kvs, _) = self.inner.store.list(ROOT).await?;
        Ok(Leases::from_store(kvs))
    }

    /// The addresses in the statuses of every client but `except` (from the view's index).
    fn status_addresses(&self, except: &ClientKey) -> HashSet<IpAddr> {
        let except = Kind::Client.key(&except.0, &except.1);
        let state = self.inner.cache.state.read();
        state
            .client_addresses
            .iter()
            .filter(|(k, _)| **k != except)
            .flat_map(|(_, addrs)| addrs.iter().copied())
            .collect()
    }

    /// NotFound unless the client exists in the store (not the view: read after the lease's
    /// writes, this is what keeps a lease from outliving a concurrent delete of its client).
    async fn check_client(&self, client: &ClientKey) -> Result<()> {
        match self.inner.store.get(&Kind::Client.key(&client.0, &client.1)).await? {
            Some(_) => Ok(()),
            None => Err(RegistryError::NotFound {
                kind: Kind::Client,
                name: format!("{}/{}", client.0, client.1),
            }),
        }
    }

    /// Deletes the keys of `held` that still hold what was read.
    async fn drop_keys(&self, held: &Held) {
        for (key, revision) in &held.keys {
            match self.inner.store.delete(key, Condition::ModRevision(*revision)).await {
                Ok(_) | Err(StoreError::NotFound(_) | StoreError::Conflict { .. }) => {}
                Err(e) => tracing::warn!(key = %key, error = %e, "releasing an address lease"),
            }
        }
    }

    /// Leases `pair` to `lease.client`: both keys, or neither. False if an address is taken.
    async fn try_pair(&self, lease: &pb::AddressLease, pair: Pair) -> Result<bool> {
        let value = lease.encode_to_vec();
        let create = PutOptions {
            condition: Condition::Absent,
            expires_at: None,
        };
        // Both keys are written at once: the store commits concurrent writes together (one
        // fsync on the embedded store), which halves what a lease costs a vWire's set-up.
        let (first, second) = (key_of(pair.0.addr()), key_of(pair.1.addr()));
        let (a, b) = tokio::join!(
            self.inner.store.put(&first, value.clone(), create),
            self.inner.store.put(&second, value, create)
        );
        let (a, b) = match (a, b) {
            (Ok(_), Ok(_)) => return Ok(true),
            (a, b) => (a, b),
        };
        // One of them was refused (or failed): the other, if written, goes again.
        for (key, written) in [(&first, &a), (&second, &b)] {
            if let Ok(kv) = written {
                let _ = self
                    .inner
                    .store
                    .delete(key, Condition::ModRevision(kv.mod_revision))
                    .await;
            }
        }
        for r in [a, b] {
            match r {
                Ok(_) | Err(StoreError::AlreadyExists(_) | StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Leases a pair of `pool` to `client` (see the module documentation). Returns the lease and
    /// whether this call made it.
    pub(crate) async fn allocate_addresses(
        &self,
        client: ClientKey,
        pool: IpNet,
        wanted: Option<Pair>,
    ) -> Result<(pb::AddressLease, bool)> {
        self.check_client(&client).await?;
        // Read once: statuses change at the pace of vWires being wired, not of these rounds.
        let statuses = self.status_addresses(&client);
        let mut made: Option<Pair> = None;
        for _ in 0..LEASE_ROUNDS {
            let leases = self.read_leases().await?;
            let kept = leases.kept(&client, pool);
            // Everything else the client holds goes: another pool's pair (its service changed), a
            // pair left half-written, the loser of a race between two of its own requests.
            for h in leases.of(&client) {
                if kept.is_none_or(|k| k.pair != h.pair) {
                    self.drop_keys(h).await;
                }
            }
            if let Some(k) = kept {
                let created = made == Some(k.pair);
                if created {
                    tracing::info!(client = %format!("{}/{}", client.0, client.1), %pool, src = %k.pair.0, dst = %k.pair.1, "leased an address pair");
                }
                return Ok((k.lease.clone(), created));
            }
            if let Some(p) = made.take() {
                // Ours was there when written and is gone now: a racing request of the same client
                // took it back. Start over.
                tracing::debug!(src = %p.0, dst = %p.1, "a fresh address lease was given back by a concurrent request");
            }
            let mut used: HashSet<IpAddr> = leases
                .holders
                .iter()
                .filter(|(_, holder)| holder.as_ref() != Some(&client))
                .map(|(a, _)| *a)
                .collect();
            used.extend(&statuses);
            // Requests served at once by this registry would all pick the first free pair and
            // all but one lose the write, round after round: a pair being written is skipped
            // by the others (the store still decides, between registries too).
            let choice = {
                let mut in_flight = self.inner.addresses_in_flight.lock();
                used.extend(in_flight.iter());
                let free = |p: &Pair| !used.contains(&p.0.addr()) && !used.contains(&p.1.addr());
                let choice = match wanted.filter(free) {
                    Some(w) => w,
                    None => pairs::allocate_pair(pool, &used).ok_or_else(|| RegistryError::PoolExhausted {
                        pool,
                        leased: leases.holders.keys().filter(|a| pool.contains(*a)).count(),
                        in_statuses: statuses
                            .iter()
                            .filter(|a| pool.contains(*a) && !leases.holders.contains_key(a))
                            .count(),
                    })?,
                };
                in_flight.extend([choice.0.addr(), choice.1.addr()]);
                choice
            };
            let lease = pb::AddressLease {
                client: Some(client_ref(&client)),
                pool: pool.to_string(),
                src_ip_addr: choice.0.to_string(),
                dst_ip_addr: choice.1.to_string(),
                creation_timestamp: Some(nsm_model::now_timestamp()),
            };
            let written = self.try_pair(&lease, choice).await;
            {
                let mut in_flight = self.inner.addresses_in_flight.lock();
                in_flight.remove(&choice.0.addr());
                in_flight.remove(&choice.1.addr());
            }
            if written? {
                made = Some(choice);
                if let Err(e) = self.check_client(&client).await {
                    // Deleted meanwhile: its delete may have released before we wrote.
                    self.release_addresses(&client).await?;
                    return Err(e);
                }
            }
        }
        Err(RegistryError::Conflict {
            kind: Kind::Client,
            name: format!("{}/{} (address pair of {pool})", client.0, client.1),
        })
    }

    /// Gives back everything `client` holds; returns what it held (one entry per pair).
    pub(crate) async fn release_addresses(&self, client: &ClientKey) -> Result<Vec<pb::AddressLease>> {
        let leases = self.read_leases().await?;
        let mut out = Vec::new();
        for h in leases.of(client) {
            self.drop_keys(h).await;
            tracing::info!(client = %format!("{}/{}", client.0, client.1), src = %h.pair.0, dst = %h.pair.1, "released an address pair");
            out.push(h.lease.clone());
        }
        Ok(out)
    }

    /// Every lease (one per pair, half-written ones included), of clients in `namespace` (empty:
    /// all), ordered by address.
    pub(crate) async fn address_leases(&self, namespace: &str) -> Result<Vec<pb::AddressLease>> {
        let mut held: Vec<Held> = self
            .read_leases()
            .await?
            .held
            .into_iter()
            .filter(|h| namespace.is_empty() || h.client.0 == namespace)
            .collect();
        held.sort_by_key(|h| (h.pair.0.addr(), h.pair.1.addr()));
        Ok(held.into_iter().map(|h| h.lease).collect())
    }

    /// Gives back the leases of clients that no longer exist: a registry that stopped between
    /// deleting a client and releasing its pair leaves them. Leases are read before clients, so a
    /// lease made meanwhile (always after its client exists) is never taken for an orphan.
    pub(crate) async fn sweep_address_leases(&self) -> Result<usize> {
        let leases = self.read_leases().await?;
        if leases.held.is_empty() {
            return Ok(0);
        }
        let prefix = Kind::Client.key_prefix();
        let (clients, _) = self.inner.store.list(prefix).await?;
        let existing: HashSet<ClientKey> = clients
            .iter()
            .filter_map(|kv| {
                let (ns, name) = kv.key.strip_prefix(prefix)?.split_once('/')?;
                Some((ns.to_owned(), name.to_owned()))
            })
            .collect();
        let mut n = 0;
        for h in leases.held.iter().filter(|h| !existing.contains(&h.client)) {
            self.drop_keys(h).await;
            tracing::info!(client = %format!("{}/{}", h.client.0, h.client.1), src = %h.pair.0, dst = %h.pair.1, "released the address pair of a client that is gone");
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(addr: &str, client: &str, pair: (&str, &str), revision: Revision) -> KeyValue {
        let lease = pb::AddressLease {
            client: Some(client_ref(&("default".into(), client.into()))),
            pool: "10.0.0.0/24".into(),
            src_ip_addr: pair.0.into(),
            dst_ip_addr: pair.1.into(),
            creation_timestamp: None,
        };
        KeyValue {
            key: key_of(addr.parse().unwrap()),
            value: lease.encode_to_vec(),
            create_revision: revision,
            mod_revision: revision,
        }
    }

    #[test]
    fn pairs_complete_half_written_and_the_first_completed_is_kept() {
        let c: ClientKey = ("default".into(), "c".into());
        let pool: IpNet = "10.0.0.0/24".parse().unwrap();
        let l = Leases::from_store(vec![
            kv("10.0.0.1", "c", ("10.0.0.1/32", "10.0.0.2/32"), 7),
            kv("10.0.0.2", "c", ("10.0.0.1/32", "10.0.0.2/32"), 9),
            kv("10.0.0.3", "c", ("10.0.0.3/32", "10.0.0.4/32"), 5),
            kv("10.0.0.4", "c", ("10.0.0.3/32", "10.0.0.4/32"), 8),
            kv("10.0.0.5", "c", ("10.0.0.5/32", "10.0.0.6/32"), 1),
            kv("10.0.0.9", "other", ("10.0.0.9/32", "10.0.0.10/32"), 2),
            KeyValue {
                key: key_of("10.0.0.11".parse().unwrap()),
                value: b"garbage".to_vec(),
                create_revision: 3,
                mod_revision: 3,
            },
        ]);
        assert_eq!(l.held.len(), 4);
        let k = l.kept(&c, pool).unwrap();
        assert_eq!(
            k.pair.0.to_string(),
            "10.0.0.3/32",
            "completed at 8, before the other at 9"
        );
        assert!(l.kept(&c, "10.1.0.0/24".parse().unwrap()).is_none());
        assert_eq!(l.holders.len(), 7);
        assert_eq!(l.holders[&"10.0.0.11".parse::<IpAddr>().unwrap()], None);
        assert_eq!(l.of(&c).count(), 3);
    }

    #[test]
    fn wanted_pairs() {
        let pool: IpNet = "10.0.0.0/29".parse().unwrap();
        assert_eq!(wanted_of("", "", pool).unwrap(), None);
        let p = wanted_of("10.0.0.3/32", "10.0.0.4", pool).unwrap().unwrap();
        assert_eq!(
            (p.0.to_string(), p.1.to_string()),
            ("10.0.0.3/32".into(), "10.0.0.4/32".into())
        );
        for (s, d, field) in [
            ("10.0.0.1/32", "", "dst_ip_addr"),
            ("", "10.0.0.1/32", "src_ip_addr"),
            ("10.0.0.9/32", "10.0.0.1/32", "src_ip_addr"),
            ("10.0.0.1/32", "10.0.0.7/32", "dst_ip_addr"),
            ("10.0.0.1/30", "10.0.0.2/32", "src_ip_addr"),
            ("x", "10.0.0.2/32", "src_ip_addr"),
            ("10.0.0.1/32", "10.0.0.1/32", "dst_ip_addr"),
        ] {
            match wanted_of(s, d, pool) {
                Err(RegistryError::Invalid(e)) => assert_eq!(e.field, field, "{s} {d}: {e}"),
                other => panic!("{s} {d}: {:?}", other.map(|_| ())),
            }
        }
    }
}
