//! The node's own API for workloads on its host: `CreateClient` over the unix socket, where the
//! caller's network namespace is learned from the socket's peer credentials (as upstream's clients
//! hand their namespace to the node through the same socket).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nsm_api::nsm::v1::{self as v1, node_service_server::NodeService, resource_service_client::ResourceServiceClient};
use nsm_model::pb;
use tonic::transport::Channel;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

/// Serves `nsm.v1.NodeService`.
pub(crate) struct LocalApi {
    /// The registry the client is created in.
    pub(crate) registry: ResourceServiceClient<Channel>,
    /// This node's name.
    pub(crate) node: String,
}

fn netns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A lasting path for the network namespace of process `pid`: its name under /run/netns if it has
/// one, else `/proc/P/ns/net` of the longest-lived other process in it (a pod's first process), so
/// the path outlives the short-lived caller.
pub(crate) fn lasting_netns_of(pid: i32) -> Result<PathBuf, String> {
    let id = netns_id(Path::new(&format!("/proc/{pid}/ns/net")))
        .ok_or_else(|| format!("cannot read the network namespace of process {pid}"))?;
    if netns_id(Path::new("/proc/1/ns/net")) == Some(id) {
        return Err("the caller runs in the host's network namespace; give --netns".into());
    }
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if netns_id(&e.path()) == Some(id) {
                    return Ok(e.path());
                }
            }
        }
    }
    let mut others: Vec<i32> = std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != pid && netns_id(Path::new(&format!("/proc/{p}/ns/net"))) == Some(id))
        .collect();
    others.sort_unstable();
    others
        .first()
        .map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
        .ok_or_else(|| "the caller's network namespace has no name and no other process; give --netns".into())
}

#[tonic::async_trait]
impl NodeService for LocalApi {
    async fn create_client(&self, req: Request<v1::CreateRequest>) -> Result<Response<pb::Resource>, Status> {
        let caller = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid());
        let mut resource = req
            .into_inner()
            .resource
            .ok_or_else(|| Status::invalid_argument("resource: missing"))?;
        let Some(pb::resource::Kind::Client(client)) = resource.kind.as_mut() else {
            return Err(Status::invalid_argument(
                "resource: only clients are created through a node",
            ));
        };
        let spec = client.spec.get_or_insert_with(Default::default);
        if !spec.node.is_empty() && spec.node != self.node {
            return Err(Status::invalid_argument(format!(
                "spec.node: {:?} is not this node ({:?})",
                spec.node, self.node
            )));
        }
        spec.node = self.node.clone();
        if spec.netns.is_empty() {
            let pid = caller.ok_or_else(|| {
                Status::failed_precondition("spec.netns: not given, and the caller is not on this node's unix socket")
            })?;
            spec.netns = lasting_netns_of(pid)
                .map_err(|e| Status::failed_precondition(format!("spec.netns: {e}")))?
                .display()
                .to_string();
        }
        let created = self
            .registry
            .clone()
            .create(v1::CreateRequest {
                resource: Some(resource),
            })
            .await?;
        Ok(Response::new(created.into_inner()))
    }
}
