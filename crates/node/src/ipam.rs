//! Point-to-point address pairs for vWires.
//!
//! The registry leases them ([`lease_pair`], over `ResourceService.AllocateAddresses`): one pair per
//! client, stored once per address, so two nodes wiring clients of one pool at the same instant
//! never get the same address. The chooser itself (`nsm_model::pairs::allocate_pair`) is the
//! registry's.

use ipnet::IpNet;
use nsm_api::nsm::v1::{self as v1, resource_service_client::ResourceServiceClient};
use tonic::transport::Channel;

/// Leases a pair of `pool` for `client` (namespace, name) from the registry: the pair the client
/// already holds in `pool` (asking again is harmless), else `wanted` if it is free or already the
/// client's, else the first free pair. Returns (client's address, peer's address) as /32 (/128)
/// prefixes.
///
/// `wanted` is what the client's last status says it had (adopting an existing vWire after a
/// restart, or rebuilding one whose tunnel went with the old process): passing it keeps the
/// addresses. A wanted pair that is not two distinct addresses of `pool` (the service's pool
/// changed since) is not sent, so it does not fail the request.
///
/// The lease lasts until the client is deleted (the registry releases it then, whether or not a
/// node is running) or the client asks with another pool (its service's CIDR changed): nothing to
/// give back when a vWire is torn down, rebuilt or moved to another endpoint. Errors:
/// `FAILED_PRECONDITION` when the pool is exhausted (the message names it), `NOT_FOUND` when the
/// client does not exist, `INVALID_ARGUMENT` for a bad pool or client name.
pub async fn lease_pair(
    registry: &mut ResourceServiceClient<Channel>,
    client: (&str, &str),
    pool: IpNet,
    wanted: Option<(IpNet, IpNet)>,
) -> Result<(IpNet, IpNet), tonic::Status> {
    let wanted = wanted.filter(|(a, b)| {
        let host = |n: &IpNet| n.prefix_len() == n.max_prefix_len() && pool.contains(&n.addr());
        host(a) && host(b) && a.addr() != b.addr()
    });
    let (src, dst) = wanted.map_or_else(Default::default, |(a, b)| (a.to_string(), b.to_string()));
    let resp = registry
        .allocate_addresses(v1::AllocateAddressesRequest {
            client: Some(v1::ResourceRef {
                kind: v1::Kind::Client as i32,
                namespace: client.0.to_owned(),
                name: client.1.to_owned(),
            }),
            pool: pool.to_string(),
            src_ip_addr: src,
            dst_ip_addr: dst,
        })
        .await?
        .into_inner();
    let lease = resp
        .lease
        .ok_or_else(|| tonic::Status::internal("the registry answered AllocateAddresses without a lease"))?;
    let parse = |s: &str| {
        s.parse::<IpNet>()
            .map_err(|_| tonic::Status::internal(format!("the registry leased {s:?}, which is not an address")))
    };
    Ok((parse(&lease.src_ip_addr)?, parse(&lease.dst_ip_addr)?))
}

/// Gives back the pairs `client` (namespace, name) holds, as the registry does itself when the
/// client is deleted: for a client whose vWire could not be built, so that it holds no addresses
/// another client could use meanwhile.
pub async fn release_pairs(
    registry: &mut ResourceServiceClient<Channel>,
    client: (&str, &str),
) -> Result<(), tonic::Status> {
    registry
        .release_addresses(v1::ReleaseAddressesRequest {
            client: Some(v1::ResourceRef {
                kind: v1::Kind::Client as i32,
                namespace: client.0.to_owned(),
                name: client.1.to_owned(),
            }),
        })
        .await
        .map(drop)
}
