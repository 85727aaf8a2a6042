//! The document form of resources: what `nsmctl apply -f` reads and `-o yaml|json` prints.
//!
//! Two families are accepted on input:
//! - our own, `apiVersion: nsm.dev/v1`, kinds `NetworkService`, `Endpoint`, `Node`, camelCase
//!   fields (what `nsmctl get -o yaml` prints, so output can be applied back);
//! - upstream's CRDs, `apiVersion: networkservicemesh.io/v1`, kinds `NetworkService` and
//!   `NetworkServiceEndpoint`, whose `spec` is the upstream registry message with its snake_case
//!   field names (as in upstream's deployment examples).
//!
//! Unknown fields are errors, reported with the line and column in the file.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::kind::Kind;
use crate::pb::{self, registry};
use crate::upstream;

/// Our apiVersion.
pub const API_VERSION: &str = "nsm.dev/v1";
/// Upstream's CRD apiVersion.
pub const UPSTREAM_API_VERSION: &str = "networkservicemesh.io/v1";

/// Object metadata. Server-set fields are printed, and ignored when applied back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataDoc {
    /// Name.
    pub name: String,
    /// Namespace (empty for nodes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Server-assigned unique id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Store revision of the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Creation time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

/// One upstream match rule. Accepts both our camelCase and upstream's snake_case spellings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchDoc {
    /// Labels the client's request must carry.
    #[serde(default, alias = "source_selector", skip_serializing_if = "BTreeMap::is_empty")]
    pub source_selector: BTreeMap<String, String>,
    /// Candidate endpoint selectors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<DestinationDoc>,
    /// Try the next match when this one selects no endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallthrough: bool,
    /// Forwarder-selection labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<LabelsDoc>,
}

/// A route of a match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationDoc {
    /// Labels the endpoint must carry for the service.
    #[serde(default, alias = "destination_selector", skip_serializing_if = "BTreeMap::is_empty")]
    pub destination_selector: BTreeMap<String, String>,
    /// Upstream weight (carried, not used for selection — as upstream).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// `{labels: {...}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsDoc {
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Spec of a network service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkServiceSpecDoc {
    /// IP or ETHERNET.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub payload: String,
    /// vwire or vl3.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub service_type: String,
    /// Address pool.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cidr: String,
    /// Endpoint selection rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchDoc>,
    /// vL3: length of each router's prefix.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prefix_len: u32,
    /// The vL3 this service's members join.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vl3: String,
    /// Services this one's members may reach on the vL3 ("*" = all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach: Vec<String>,
    /// vL3: member DNS name template.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dns_template: String,
    /// Cross-node vWires: required, preferred or none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encryption: String,
}

/// Spec of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpecDoc {
    /// Services offered (relative to the endpoint's namespace, or `name.namespace`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_services: Vec<String>,
    /// Extra labels per service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// NetworkService API URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Host address (VM / physical server).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Node it lives on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Network namespace file of the workload it lives in (on `node`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    /// Registration expiry, RFC 3339 (set by upstream registrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<String>,
    /// First registration, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_registration_time: Option<String>,
}

/// Spec of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpecDoc {
    /// Underlay address.
    pub address: String,
    /// NetworkService API of its daemon.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
}

/// Spec of a prefix lease (written by the registry's prefix server).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefixSpecDoc {
    /// The vL3.
    pub network_service: String,
    /// The prefix.
    pub prefix: String,
    /// The node whose router holds it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// The service whose members are addressed from it.
    pub member_service: String,
}

/// Spec of a client (a declarative vWire).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientSpecDoc {
    /// The network service asked for.
    pub network_service: String,
    /// A pinned endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// The workload's network namespace file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    /// Interface name in the workload.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
    /// The node whose daemon reconciles it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Cross-node encryption (required, preferred, none); overrides the service's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encryption: String,
}

/// Observed state of a client (printed; ignored when applied).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatusDoc {
    /// Pending, Ready or Failed.
    #[serde(default)]
    pub phase: String,
    /// Why it is not Ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Selected endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// Mechanism.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mechanism: String,
    /// Client addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_ip_addrs: Vec<String>,
    /// Peer addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_ip_addrs: Vec<String>,
    /// Connection id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connection_id: String,
    /// Path segment names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    /// Destinations routed through the vWire beyond the peer (an address endpoint's host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// vL3: the member's DNS name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dns_name: String,
    /// vL3: DNS servers pushed with the connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    /// vL3: search domains pushed with the connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_domains: Vec<String>,
    /// MTU of the interface.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtu: u32,
    /// Counters.
    #[serde(default)]
    pub rx_bytes: u64,
    /// Counters.
    #[serde(default)]
    pub tx_bytes: u64,
    /// Counters.
    #[serde(default)]
    pub rx_packets: u64,
    /// Counters.
    #[serde(default)]
    pub tx_packets: u64,
    /// When observed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
}

/// A client document: spec and, on output, status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientDoc {
    /// `nsm.dev/v1`.
    pub api_version: String,
    /// `Client`.
    pub kind: String,
    /// Metadata.
    pub metadata: MetadataDoc,
    /// Spec.
    pub spec: ClientSpecDoc,
    /// Status (output only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClientStatusDoc>,
}

/// The phase name of a client status.
pub fn phase_name(phase: i32) -> &'static str {
    match pb::client_status::Phase::try_from(phase) {
        Ok(pb::client_status::Phase::Ready) => "Ready",
        Ok(pb::client_status::Phase::Failed) => "Failed",
        _ => "Pending",
    }
}

/// A whole document of one of our kinds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Doc<S> {
    /// `nsm.dev/v1`.
    pub api_version: String,
    /// The kind.
    pub kind: String,
    /// Metadata.
    pub metadata: MetadataDoc,
    /// Spec.
    #[serde(default)]
    pub spec: S,
}

/// Any of our documents, for output.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Document {
    /// A network service.
    NetworkService(Doc<NetworkServiceSpecDoc>),
    /// An endpoint.
    Endpoint(Doc<EndpointSpecDoc>),
    /// A node.
    Node(Doc<NodeSpecDoc>),
    /// A client (boxed: its status makes it much larger than the others).
    Client(Box<ClientDoc>),
    /// A prefix lease.
    Prefix(Doc<PrefixSpecDoc>),
}

/// A protobuf timestamp in a document: RFC 3339, or upstream's `{seconds, nanos}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum TimestampDoc {
    Text(String),
    Proto {
        seconds: i64,
        #[serde(default)]
        nanos: i32,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamMeta {
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpstreamDoc<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: UpstreamMeta,
    #[serde(default)]
    spec: S,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamNsSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    matches: Vec<MatchDoc>,
    #[serde(default)]
    path_ids: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamNseSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    network_service_names: Vec<String>,
    #[serde(default)]
    network_service_labels: BTreeMap<String, LabelsDoc>,
    #[serde(default)]
    url: String,
    #[serde(default)]
    expiration_time: Option<TimestampDoc>,
    #[serde(default)]
    initial_registration_time: Option<TimestampDoc>,
    #[serde(default)]
    path_ids: Vec<String>,
}

/// A document that could not be read, located in its file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct DocumentError {
    /// 1-based line in the whole input.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

fn rfc3339(ts: &prost_types::Timestamp) -> Option<String> {
    crate::to_system_time(ts).map(|t| humantime::format_rfc3339_millis(t).to_string())
}

fn parse_time(field: &str, t: &TimestampDoc) -> Result<prost_types::Timestamp, String> {
    match t {
        TimestampDoc::Text(s) => humantime::parse_rfc3339_weak(s)
            .map(prost_types::Timestamp::from)
            .map_err(|e| format!("{field}: {s:?} is not an RFC 3339 time: {e}")),
        TimestampDoc::Proto { seconds, nanos } => Ok(prost_types::Timestamp {
            seconds: *seconds,
            nanos: *nanos,
        }),
    }
}

fn to_map(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn from_map(m: BTreeMap<String, String>) -> HashMap<String, String> {
    m.into_iter().collect()
}

fn meta_doc(m: Option<&pb::ObjectMeta>) -> MetadataDoc {
    let m = m.cloned().unwrap_or_default();
    MetadataDoc {
        name: m.name,
        namespace: m.namespace,
        labels: to_map(&m.labels),
        uid: m.uid,
        resource_version: (m.resource_version != 0).then(|| m.resource_version.to_string()),
        creation_timestamp: m.creation_timestamp.as_ref().and_then(rfc3339),
    }
}

fn meta_pb(m: MetadataDoc) -> pb::ObjectMeta {
    // Server-set fields are ignored on input: the registry owns them.
    pb::ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: from_map(m.labels),
        ..Default::default()
    }
}

fn match_doc(m: &registry::Match) -> MatchDoc {
    MatchDoc {
        source_selector: to_map(&m.source_selector),
        routes: m
            .routes
            .iter()
            .map(|r| DestinationDoc {
                destination_selector: to_map(&r.destination_selector),
                weight: r.weight,
            })
            .collect(),
        fallthrough: m.fallthrough,
        metadata: m.metadata.as_ref().map(|md| LabelsDoc {
            labels: to_map(&md.labels),
        }),
    }
}

fn match_pb(m: MatchDoc) -> registry::Match {
    registry::Match {
        source_selector: from_map(m.source_selector),
        routes: m
            .routes
            .into_iter()
            .map(|r| registry::Destination {
                destination_selector: from_map(r.destination_selector),
                weight: r.weight,
            })
            .collect(),
        fallthrough: m.fallthrough,
        metadata: m.metadata.map(|md| registry::Metadata {
            labels: from_map(md.labels),
        }),
    }
}

/// The service type as documents spell it.
pub fn service_type_name(t: i32) -> &'static str {
    match pb::ServiceType::try_from(t) {
        Ok(pb::ServiceType::Vl3) => "vl3",
        _ => "vwire",
    }
}

/// Parses a service type spelling.
pub fn parse_service_type(field: &str, s: &str) -> Result<pb::ServiceType, crate::ValidationError> {
    match s.to_ascii_lowercase().as_str() {
        "" => Ok(pb::ServiceType::Unspecified),
        "vwire" => Ok(pb::ServiceType::Vwire),
        "vl3" => Ok(pb::ServiceType::Vl3),
        _ => Err(crate::ValidationError::new(
            field,
            format!("{s:?} is not a service type (expected vwire or vl3)"),
        )),
    }
}

/// A resource as a document.
pub fn to_document(resource: &pb::Resource) -> Option<Document> {
    use pb::resource::Kind as R;
    let kind = Kind::of(resource)?;
    let header = |metadata| (API_VERSION.to_owned(), kind.name().to_owned(), metadata);
    Some(match resource.kind.as_ref()? {
        R::NetworkService(ns) => {
            let (api_version, kind, metadata) = header(meta_doc(ns.metadata.as_ref()));
            let s = ns.spec.clone().unwrap_or_default();
            Document::NetworkService(Doc {
                api_version,
                kind,
                metadata,
                spec: NetworkServiceSpecDoc {
                    payload: s.payload,
                    service_type: service_type_name(s.r#type).to_owned(),
                    cidr: s.cidr,
                    matches: s.matches.iter().map(match_doc).collect(),
                    prefix_len: s.prefix_len,
                    vl3: s.vl3,
                    reach: s.reach,
                    dns_template: s.dns_template,
                    encryption: s.encryption,
                },
            })
        }
        R::Prefix(p) => {
            let (api_version, kind, metadata) = header(meta_doc(p.metadata.as_ref()));
            let s = p.spec.clone().unwrap_or_default();
            Document::Prefix(Doc {
                api_version,
                kind,
                metadata,
                spec: PrefixSpecDoc {
                    network_service: s.network_service,
                    prefix: s.prefix,
                    node: s.node,
                    member_service: s.member_service,
                },
            })
        }
        R::Endpoint(ep) => {
            let (api_version, kind, metadata) = header(meta_doc(ep.metadata.as_ref()));
            let s = ep.spec.clone().unwrap_or_default();
            Document::Endpoint(Doc {
                api_version,
                kind,
                metadata,
                spec: EndpointSpecDoc {
                    network_services: s.network_services,
                    service_labels: s
                        .service_labels
                        .into_iter()
                        .map(|(k, v)| (k, to_map(&v.labels)))
                        .collect(),
                    url: s.url,
                    address: s.address,
                    node: s.node,
                    netns: s.netns,
                    expiration_time: s.expiration_time.as_ref().and_then(rfc3339),
                    initial_registration_time: s.initial_registration_time.as_ref().and_then(rfc3339),
                },
            })
        }
        R::Node(n) => {
            let (api_version, kind, metadata) = header(meta_doc(n.metadata.as_ref()));
            let s = n.spec.clone().unwrap_or_default();
            Document::Node(Doc {
                api_version,
                kind,
                metadata,
                spec: NodeSpecDoc {
                    address: s.address,
                    url: s.url,
                },
            })
        }
        R::Client(c) => {
            let (api_version, kind, metadata) = header(meta_doc(c.metadata.as_ref()));
            let s = c.spec.clone().unwrap_or_default();
            let status = c.status.as_ref().map(|st| ClientStatusDoc {
                phase: phase_name(st.phase).to_owned(),
                reason: st.reason.clone(),
                endpoint: st.endpoint.clone(),
                mechanism: st.mechanism.clone(),
                src_ip_addrs: st.src_ip_addrs.clone(),
                dst_ip_addrs: st.dst_ip_addrs.clone(),
                connection_id: st.connection_id.clone(),
                path: st.path.clone(),
                routes: st.routes.clone(),
                dns_name: st.dns_name.clone(),
                dns_servers: st.dns_servers.clone(),
                search_domains: st.search_domains.clone(),
                mtu: st.mtu,
                rx_bytes: st.rx_bytes,
                tx_bytes: st.tx_bytes,
                rx_packets: st.rx_packets,
                tx_packets: st.tx_packets,
                updated: st.updated.as_ref().and_then(rfc3339),
            });
            Document::Client(Box::new(ClientDoc {
                api_version,
                kind,
                metadata,
                spec: ClientSpecDoc {
                    network_service: s.network_service,
                    endpoint: s.endpoint,
                    netns: s.netns,
                    interface: s.interface,
                    node: s.node,
                    encryption: s.encryption,
                },
                status,
            }))
        }
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

fn yaml_error(e: &serde_norway::Error, first_line: usize) -> DocumentError {
    let (line, column) = e
        .location()
        .map_or((first_line, 1), |l| (first_line + l.line() - 1, l.column()));
    // serde_norway appends " at line X column Y" relative to the document; drop it, we give our own.
    let message = e.to_string();
    let message = match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message,
    };
    DocumentError { line, column, message }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, first_line: usize) -> Result<T, DocumentError> {
    serde_norway::from_str(text).map_err(|e| yaml_error(&e, first_line))
}

/// Splits a YAML stream into documents, each with the 1-based line it starts on.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---#") {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Reads every document of a YAML (or JSON) stream into resources. Nothing is validated beyond
/// the document's shape; run [`crate::validate::resource`] on each before use.
pub fn parse_documents(text: &str) -> Result<Vec<pb::Resource>, DocumentError> {
    let mut out = Vec::new();
    for (first_line, doc) in split_documents(text) {
        let header: Header = parse(&doc, first_line)?;
        let at = |message: String| DocumentError {
            line: first_line,
            column: 1,
            message,
        };
        let api_version = header.api_version.ok_or_else(|| at("apiVersion: missing".into()))?;
        let kind = header.kind.ok_or_else(|| at("kind: missing".into()))?;
        let resource = match (api_version.as_str(), kind.as_str()) {
            (API_VERSION, "NetworkService") => {
                let d: Doc<NetworkServiceSpecDoc> = parse(&doc, first_line)?;
                let service_type =
                    parse_service_type("spec.type", &d.spec.service_type).map_err(|e| at(e.to_string()))?;
                pb::resource::Kind::NetworkService(pb::NetworkService {
                    metadata: Some(meta_pb(d.metadata)),
                    spec: Some(pb::NetworkServiceSpec {
                        payload: d.spec.payload,
                        r#type: service_type as i32,
                        cidr: d.spec.cidr,
                        matches: d.spec.matches.into_iter().map(match_pb).collect(),
                        path_ids: Vec::new(),
                        prefix_len: d.spec.prefix_len,
                        vl3: d.spec.vl3,
                        reach: d.spec.reach,
                        dns_template: d.spec.dns_template,
                        encryption: d.spec.encryption,
                    }),
                })
            }
            (API_VERSION, "Endpoint") => {
                let d: Doc<EndpointSpecDoc> = parse(&doc, first_line)?;
                let time = |field: &str, t: Option<String>| {
                    t.map(|s| parse_time(field, &TimestampDoc::Text(s)))
                        .transpose()
                        .map_err(at)
                };
                pb::resource::Kind::Endpoint(pb::Endpoint {
                    metadata: Some(meta_pb(d.metadata)),
                    spec: Some(pb::EndpointSpec {
                        network_services: d.spec.network_services,
                        service_labels: d
                            .spec
                            .service_labels
                            .into_iter()
                            .map(|(k, v)| (k, registry::NetworkServiceLabels { labels: from_map(v) }))
                            .collect(),
                        url: d.spec.url,
                        address: d.spec.address,
                        node: d.spec.node,
                        netns: d.spec.netns,
                        expiration_time: time("spec.expirationTime", d.spec.expiration_time)?,
                        initial_registration_time: time(
                            "spec.initialRegistrationTime",
                            d.spec.initial_registration_time,
                        )?,
                        path_ids: Vec::new(),
                    }),
                })
            }
            (API_VERSION, "Node") => {
                let d: Doc<NodeSpecDoc> = parse(&doc, first_line)?;
                pb::resource::Kind::Node(pb::Node {
                    metadata: Some(meta_pb(d.metadata)),
                    spec: Some(pb::NodeSpec {
                        address: d.spec.address,
                        url: d.spec.url,
                        ..Default::default()
                    }),
                })
            }
            (API_VERSION, "Client") => {
                let d: ClientDoc = parse(&doc, first_line)?;
                pb::resource::Kind::Client(pb::Client {
                    metadata: Some(meta_pb(d.metadata)),
                    spec: Some(pb::ClientSpec {
                        network_service: d.spec.network_service,
                        endpoint: d.spec.endpoint,
                        netns: d.spec.netns,
                        interface: d.spec.interface,
                        node: d.spec.node,
                        encryption: d.spec.encryption,
                    }),
                    // Status belongs to the node daemon; what a document says of it is ignored.
                    status: None,
                })
            }
            (UPSTREAM_API_VERSION, "NetworkService") => {
                let d: UpstreamDoc<UpstreamNsSpec> = parse(&doc, first_line)?;
                check_spec_name(&d.spec.name, &d.metadata.name).map_err(at)?;
                let up = registry::NetworkService {
                    name: d.metadata.name.clone(),
                    payload: d.spec.payload,
                    matches: d.spec.matches.into_iter().map(match_pb).collect(),
                    path_ids: d.spec.path_ids,
                };
                let mut ns = upstream::ns_from_upstream(&up, None).map_err(|e| at(format!("metadata.{e}")))?;
                let m = ns.metadata.get_or_insert_with(Default::default);
                m.namespace = d.metadata.namespace;
                m.labels = from_map(d.metadata.labels);
                pb::resource::Kind::NetworkService(ns)
            }
            (UPSTREAM_API_VERSION, "NetworkServiceEndpoint") => {
                let d: UpstreamDoc<UpstreamNseSpec> = parse(&doc, first_line)?;
                check_spec_name(&d.spec.name, &d.metadata.name).map_err(at)?;
                let time = |field: &str, t: &Option<TimestampDoc>| {
                    t.as_ref().map(|t| parse_time(field, t)).transpose().map_err(at)
                };
                let up = registry::NetworkServiceEndpoint {
                    name: d.metadata.name.clone(),
                    network_service_names: d.spec.network_service_names,
                    network_service_labels: d
                        .spec
                        .network_service_labels
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                k,
                                registry::NetworkServiceLabels {
                                    labels: from_map(v.labels),
                                },
                            )
                        })
                        .collect(),
                    url: d.spec.url,
                    expiration_time: time("spec.expiration_time", &d.spec.expiration_time)?,
                    initial_registration_time: time(
                        "spec.initial_registration_time",
                        &d.spec.initial_registration_time,
                    )?,
                    path_ids: d.spec.path_ids,
                };
                let mut ep = upstream::nse_from_upstream(&up, None).map_err(|e| at(format!("spec.{e}")))?;
                // In a CRD the namespace is the object's; service names are as upstream wrote them
                // (bare = same namespace), which is exactly our relative form.
                let m = ep.metadata.get_or_insert_with(Default::default);
                m.namespace = d.metadata.namespace;
                m.labels = from_map(d.metadata.labels);
                if let Some(spec) = ep.spec.as_mut() {
                    spec.network_services = up.network_service_names.clone();
                    spec.service_labels = up.network_service_labels.clone();
                }
                pb::resource::Kind::Endpoint(ep)
            }
            (API_VERSION | UPSTREAM_API_VERSION, other) => {
                return Err(at(format!("kind: unknown kind {other:?} for apiVersion {api_version}")));
            }
            (other, _) => {
                return Err(at(format!(
                    "apiVersion: unknown apiVersion {other:?} (expected {API_VERSION} or {UPSTREAM_API_VERSION})"
                )));
            }
        };
        out.push(pb::Resource { kind: Some(resource) });
    }
    Ok(out)
}

fn check_spec_name(spec_name: &str, meta_name: &str) -> Result<(), String> {
    if !spec_name.is_empty() && spec_name != meta_name {
        return Err(format!(
            "spec.name {spec_name:?} differs from metadata.name {meta_name:?}"
        ));
    }
    Ok(())
}

/// Human-friendly age of a timestamp ("5m", "3h", "2d"), as kubectl prints it.
pub fn age(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = ts.and_then(crate::to_system_time) else {
        return "-".into();
    };
    let d = SystemTime::now().duration_since(t).unwrap_or(Duration::ZERO).as_secs();
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        7200..=172_799 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_crds_and_our_kinds() {
        let text = "\
# an upstream example
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: nse-composition
  namespace: ns-x
spec:
  payload: ETHERNET
  matches:
    - source_selector:
        app: firewall
      routes:
        - destination_selector:
            app: nse-kernel
      fallthrough: true
---
apiVersion: networkservicemesh.io/v1
kind: NetworkServiceEndpoint
metadata:
  name: nse-1
spec:
  network_service_names: [nse-composition]
  network_service_labels:
    nse-composition:
      labels: {app: nse-kernel}
  url: tcp://10.0.0.1:5001
  expiration_time: {seconds: 1900000000}
---
apiVersion: nsm.dev/v1
kind: Node
metadata: {name: host-a}
spec: {address: 192.0.2.10}
";
        let r = parse_documents(text).unwrap();
        assert_eq!(r.len(), 3);
        let Some(pb::resource::Kind::NetworkService(ns)) = &r[0].kind else {
            panic!()
        };
        assert_eq!(ns.metadata.as_ref().unwrap().namespace, "ns-x");
        let spec = ns.spec.as_ref().unwrap();
        assert_eq!(spec.payload, "ETHERNET");
        assert_eq!(spec.matches[0].source_selector["app"], "firewall");
        assert!(spec.matches[0].fallthrough);
        let Some(pb::resource::Kind::Endpoint(ep)) = &r[1].kind else {
            panic!()
        };
        let spec = ep.spec.as_ref().unwrap();
        assert_eq!(spec.network_services, ["nse-composition"]);
        assert_eq!(spec.expiration_time.unwrap().seconds, 1_900_000_000);
        assert!(matches!(r[2].kind, Some(pb::resource::Kind::Node(_))));
    }

    #[test]
    fn errors_carry_line_and_column() {
        let text = "apiVersion: nsm.dev/v1\nkind: Node\nmetadata: {name: a}\nspec: {address: 192.0.2.1}\n---\napiVersion: nsm.dev/v1\nkind: NetworkService\nmetadata:\n  name: x\nspec:\n  cidr: 10.0.0.0/8\n  colour: red\n";
        let e = parse_documents(text).unwrap_err();
        assert_eq!(e.line, 12, "{e}");
        assert!(e.message.contains("colour"), "{e}");
        let e = parse_documents("apiVersion: nsm.dev/v1\nkind: Gadget\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.message.contains("unknown kind \"Gadget\""), "{e}");
        let e = parse_documents("kind: Node\nmetadata: [1\n").unwrap_err();
        // The unclosed flow sequence is noticed where the input ends.
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn output_applies_back() {
        let text = "apiVersion: nsm.dev/v1\nkind: NetworkService\nmetadata:\n  name: orders\n  namespace: shop\n  labels: {team: a}\nspec:\n  payload: IP\n  type: vl3\n  cidr: 172.16.0.0/16\n";
        let r = parse_documents(text).unwrap();
        let out = serde_norway::to_string(&to_document(&r[0]).unwrap()).unwrap();
        assert_eq!(parse_documents(&out).unwrap(), r);
    }
}
