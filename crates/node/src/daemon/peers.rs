//! Channels to other nodes' NetworkService APIs, one per URL, kept and reused: a refresh or a
//! close does not dial a new connection (nor a TLS handshake). A channel whose node stops
//! answering is dropped and dialled again on the next call. With identities, the node at a URL
//! must prove to be the node the registry lists at that URL (`spiffe://<domain>/node/<name>`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::networkservice::{NetworkServiceRequest, network_service_client::NetworkServiceClient};
use tonic::transport::Channel;

use crate::cache::Cache;
use crate::{NodeError, Result};

/// How long dialling another node may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request to another node may take: building its end takes milliseconds; a node
/// whose host died leaves a half-open connection that would otherwise hold a worker until TCP
/// gives up (minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The pool.
#[derive(Clone)]
pub(crate) struct Peers {
    channels: Arc<parking_lot::Mutex<HashMap<String, NetworkServiceClient<Channel>>>>,
    /// This node's identity; None: `--insecure`.
    credentials: Option<nsm_identity::Credentials>,
    /// The registry's view: which node is at which URL.
    cache: Cache,
}

impl Peers {
    pub(crate) fn new(credentials: Option<nsm_identity::Credentials>, cache: Cache) -> Self {
        Peers {
            channels: Arc::default(),
            credentials,
            cache,
        }
    }

    /// How to reach `url`: as the node the registry lists there.
    fn security(&self, url: &str) -> Result<nsm_transport::ClientSecurity> {
        let Some(credentials) = &self.credentials else {
            return Ok(nsm_transport::ClientSecurity::Insecure);
        };
        Ok(nsm_transport::ClientSecurity::Mtls {
            credentials: credentials.clone(),
            expect: nsm_identity::Expect::Id(self.peer_id(credentials, url)?),
        })
    }

    /// The SPIFFE ID of the node the registry lists at `url`.
    fn peer_id(&self, credentials: &nsm_identity::Credentials, url: &str) -> Result<nsm_identity::SpiffeId> {
        let view = self.cache.snapshot();
        let name = view
            .nodes()
            .find(|n| n.spec.as_ref().is_some_and(|s| s.url == url))
            .and_then(|n| n.metadata.as_ref().map(|m| m.name.clone()))
            .ok_or_else(|| NodeError::Precondition(format!("no node of the registry is at {url}")))?;
        nsm_identity::SpiffeId::node(&credentials.trust_domain(), &name)
            .map_err(|e| NodeError::Precondition(format!("node {name:?} at {url}: {e}")))
    }

    async fn client(&self, url: &str) -> Result<NetworkServiceClient<Channel>> {
        if let Some(c) = self.channels.lock().get(url) {
            return Ok(c.clone());
        }
        let ch = nsm_transport::connect_secure(url, DIAL_TIMEOUT, &self.security(url)?).await?;
        let c = NetworkServiceClient::new(ch);
        self.channels.lock().insert(url.to_owned(), c.clone());
        Ok(c)
    }

    /// Drops the channel to `url` when the call failed for want of a connection.
    fn check(&self, url: &str, s: &tonic::Status) {
        if matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ) {
            self.channels.lock().remove(url);
        }
    }

    /// Requests (or refreshes) a connection at the node at `url`.
    pub(crate) async fn request(&self, url: &str, mut conn: Connection, prefs: Vec<Mechanism>) -> Result<Connection> {
        // Who is at `url`, looked up once: the tokens are addressed to it, its answer checked.
        let peer = match &self.credentials {
            Some(credentials) => Some(self.peer_id(credentials, url)?),
            None => None,
        };
        let signer = match (&self.credentials, &peer) {
            (Some(credentials), Some(id)) => Some(crate::tokens::stamp_client_path(&mut conn, credentials, id)?),
            _ => None,
        };
        let mut req = tonic::Request::new(NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: prefs,
        });
        if let Some(der) = signer {
            req.metadata_mut().insert_bin(
                crate::tokens::SIGNER_CERT,
                tonic::metadata::MetadataValue::from_bytes(&der),
            );
        }
        let mut client = self.client(url).await?;
        match deadline(client.request(req)).await {
            Ok(r) => {
                let answer = r.into_inner();
                if let Some(id) = &peer {
                    self.check_key(id, &answer).await?;
                }
                Ok(answer)
            }
            Err(status) => {
                self.check(url, &status);
                Err(NodeError::Peer {
                    url: url.to_owned(),
                    status,
                })
            }
        }
    }

    /// The endpoint's node answered WIREGUARD with its key: the one it publishes in its Node.
    async fn check_key(&self, id: &nsm_identity::SpiffeId, answer: &Connection) -> Result<()> {
        let Some(m) = answer
            .mechanism
            .as_ref()
            .filter(|m| m.r#type == nsm_mechanisms::wireguard::TYPE)
        else {
            return Ok(());
        };
        let nsm_identity::Role::Node(node) = id.role() else {
            return Ok(());
        };
        let key = m
            .parameters
            .get(nsm_mechanisms::wireguard::DST_PUBLIC_KEY)
            .map_or("", String::as_str);
        let field = format!(
            "the answer's mechanism.parameters.{}",
            nsm_mechanisms::wireguard::DST_PUBLIC_KEY
        );
        crate::wgkeys::check(&self.cache, node, key, &field).await
    }

    /// Closes a connection at the node at `url` (logged, not returned: nothing waits on it).
    pub(crate) async fn close(&self, url: &str, conn: Connection) {
        let result = match self.client(url).await {
            Ok(mut c) => deadline(c.close(conn)).await.map(drop).map_err(|s| {
                self.check(url, &s);
                NodeError::Peer {
                    url: url.to_owned(),
                    status: s,
                }
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(%url, error = %e, "closing the remote end failed");
        }
    }
}

/// `call`, failed with `DeadlineExceeded` if it takes longer than [`CALL_TIMEOUT`] (tonic sends
/// the deadline to the server but does not enforce it against a peer that stopped answering).
async fn deadline<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {CALL_TIMEOUT:?}"
        )))
    })
}
