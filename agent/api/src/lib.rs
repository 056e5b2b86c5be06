//! The agent's local API: HTTP/1.1 + JSON over a unix socket (mode 0600, root only).
//!
//! The request and response types live here so that the CNI binary, `myelinctl` and the agent
//! share one definition, and so that the CNI binary stays small: this crate only needs serde.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | `POST` | `/v1/ipam` | [`AllocateRequest`] | `201` [`Allocation`] |
//! | `DELETE` | `/v1/ipam?containerId=&ifname=` | | [`ReleaseResponse`] |
//! | `PUT` | `/v1/endpoints` | [`EndpointRequest`] | [`Endpoint`] (live before the answer) |
//! | `GET` | `/v1/endpoints[?containerId=&ifname=]` | | `[`[`Endpoint`]`]` |
//! | `DELETE` | `/v1/endpoints?containerId=&ifname=` | | [`DeleteResponse`] |
//! | `POST` | `/v1/gc` | [`GcRequest`] | [`GcResponse`] |
//! | `GET` | `/v1/status` | | [`Status`] |
//! | `GET` | `/v1/nodes` | | `[`[`NodeSummary`]`]` |
//! | `GET` | `/v1/policies` | | [`PolicyStatus`] |
//! | `POST` | `/v1/policy/explain` | [`ExplainRequest`] | [`PolicyExplanation`] |
//! | `GET` | `/v1/services` | | [`ServiceStatus`] |
//! | `GET` | `/v1/drops` | | `[`[`DropCount`]`]` |
//! | `GET` | `/v1/conntrack` | | `[`[`TrackedFlow`]`]` |
//! | `GET` | `/v1/events[?`[`FlowFilter`]`]` | | newline-delimited [`FlowEvent`]s, streamed until closed |
//! | `GET` | `/v1/flows?last=N[&`[`FlowFilter`]`]` | | [`FlowsResponse`]: the latest events kept |
//!
//! Every request may carry its client's deadline ([`DEADLINE_HEADER`]). Every error is an
//! [`ApiError`] body with a matching HTTP status. DELs that find the agent
//! down are queued in files instead ([`pending`]).

mod client;
mod mac;
pub mod pending;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use serde::{Deserialize, Serialize};

pub use client::{Client, ClientError, decode_response, read_events};
pub use mac::{Mac, ParseMacError};

/// Where the agent listens unless told otherwise (`--socket`, conflist `agentSocket`).
pub const DEFAULT_SOCKET: &str = "/run/myelin/agent.sock";

/// Request header carrying the client's deadline, in milliseconds since the Unix epoch: the
/// agent never carries out a request whose deadline has passed (the client has given up on it;
/// a request can sit in the socket's queue while the agent is stopped). Wall-clock time, not a
/// relative timeout, because only an absolute time survives waiting in that queue; client and
/// agent share the node's clock.
pub const DEADLINE_HEADER: &str = "myelin-deadline";

/// One CNI attachment: the runtime's key for everything ADD creates.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentId {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentId {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    /// The query string that names this attachment (`containerId=...&ifname=...`).
    pub fn to_query(&self) -> String {
        format!(
            "containerId={}&ifname={}",
            client::percent_encode(&self.container_id),
            client::percent_encode(&self.ifname)
        )
    }
}

/// The query string of the routes that name an attachment, as the agent decodes it:
/// `?containerId=..&ifname=..`, both or neither. Beside [`AttachmentId::to_query`] so that the
/// encoding and the decoding have one home (and can be fuzzed against each other).
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentQuery {
    pub container_id: Option<String>,
    pub ifname: Option<String>,
}

impl AttachmentQuery {
    /// The attachment, or `None` when neither key is given (GET /v1/endpoints lists all).
    pub fn optional(self) -> Result<Option<AttachmentId>, ApiError> {
        match (self.container_id, self.ifname) {
            (None, None) => Ok(None),
            (Some(c), Some(i)) => Ok(Some(AttachmentId::new(c, i))),
            _ => Err(ApiError::new(
                ErrorKind::InvalidRequest,
                "give both containerId and ifname, or neither",
            )),
        }
    }

    pub fn required(self) -> Result<AttachmentId, ApiError> {
        self.optional()?.ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidRequest,
                "containerId and ifname are required",
            )
        })
    }
}

/// Prefix of every host-side veth Myelin creates.
pub const HOST_IFNAME_PREFIX: &str = "lxc";

impl AttachmentId {
    /// The host-side name of the attachment's veth: `lxc` + the first 12 hex digits of
    /// sha256("`<containerid>/<ifname>`"), 15 bytes, the most Linux allows. Derived, not
    /// stored, so that DEL and GC find it from the attachment alone.
    pub fn host_ifname(&self) -> String {
        use sha2::{Digest as _, Sha256};
        use std::fmt::Write as _;
        let digest = Sha256::digest(format!("{}/{}", self.container_id, self.ifname));
        let mut name = String::from(HOST_IFNAME_PREFIX);
        for byte in &digest[..6] {
            // Writing into a String cannot fail.
            let _ = write!(name, "{byte:02x}");
        }
        name
    }
}

/// Whether `name` has the shape of [`AttachmentId::host_ifname`]: `lxc` and 12 lower-case hex
/// digits.
pub fn is_host_ifname(name: &str) -> bool {
    name.strip_prefix(HOST_IFNAME_PREFIX).is_some_and(|hex| {
        hex.len() == 12 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

impl std::fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// The Kubernetes pod an attachment belongs to (from CNI_ARGS `K8S_POD_NAMESPACE`/`K8S_POD_NAME`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// `POST /v1/ipam`: reserve an address for an attachment that has none yet.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AllocateRequest {
    #[serde(flatten)]
    pub attachment: AttachmentId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// The address handed to a pod, with what the pod needs to route.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The node-side address every pod routes through; never handed to a pod.
    pub gateway: Ipv4Addr,
    /// The node's pod CIDR, e.g. `10.244.1.0/24`.
    pub pod_cidr: String,
    /// The MTU that fits the path to every other node (tunnel mode: the uplink's minus the
    /// encapsulation), when the agent knows it; the conflist's `mtu` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `DELETE /v1/ipam`: the address released, if the attachment had one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseResponse {
    pub released: Option<Ipv4Addr>,
}

/// `PUT /v1/endpoints`: the interface the plugin created for an allocated address. The agent
/// writes the maps and attaches the programs before it answers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRequest {
    #[serde(flatten)]
    pub attachment: AttachmentId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// CNI_NETNS as the runtime passed it.
    pub netns: String,
    /// That namespace's cookie (`SO_NETNS_COOKIE` of a socket made in it, Linux 5.14+): socket
    /// load balancing (`--cgroup-root`) translates the sockets of the namespaces it knows.
    /// Absent (a plugin that could not read it): the pod's sockets are left to the per-packet
    /// translation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    pub ip: Ipv4Addr,
    /// The pod-side interface's MAC.
    pub mac: Mac,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: Mac,
}

/// Packet counters of one endpoint, seen from the pod: `tx` is what it sent, `rx` what was
/// delivered to it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// A live endpoint, as the agent knows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Small number that keys the endpoint's counters and policy entries in the BPF maps.
    pub id: u32,
    #[serde(flatten)]
    pub attachment: AttachmentId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: Mac,
    /// Security identity (labels of the pod and its namespace).
    pub identity: u32,
    #[serde(default)]
    pub counters: EndpointCounters,
}

/// `DELETE /v1/endpoints`: what was released. Deleting what does not exist is not an error.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// Whether an endpoint existed and was removed.
    pub endpoint: bool,
    pub released: Option<Ipv4Addr>,
}

/// `POST /v1/gc`: everything not listed is released (CNI GC's `cni.dev/valid-attachments`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    pub valid: Vec<AttachmentId>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GcResponse {
    pub removed: Vec<AttachmentId>,
    /// Attachments that could not be removed, with why; the others were removed all the same
    /// (the spec wants GC to remove as much as it can).
    #[serde(default)]
    pub failed: Vec<GcFailure>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GcFailure {
    pub attachment: AttachmentId,
    pub error: String,
}

/// `GET /v1/status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node_name: String,
    pub pod_cidr: String,
    pub gateway: Ipv4Addr,
    pub endpoints: usize,
    /// Addresses still free in the pod CIDR.
    pub free_addresses: u64,
    /// Whether the first full sync of every cluster-state source is in the maps.
    pub ready: bool,
    /// How programs are attached: `tcx` or `tc` (clsact).
    pub attach_mode: String,
    pub version: String,
    /// How this node reaches the others; absent when its Node object gives no InternalIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingInfo>,
    /// Services are translated in eBPF (`--kube-proxy-replacement`); false: left to
    /// kube-proxy. False from older agents.
    #[serde(default)]
    pub kube_proxy_replacement: bool,
    /// How new connections to frontends reached from outside choose their backend
    /// (`--lb-algorithm`): `random` or `maglev`; absent without kube-proxy replacement (and
    /// from older agents). ClusterIPs choose at random either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb_algorithm: Option<String>,
    /// Entries of each Maglev lookup table (`--lb-maglev-table-size`), with `maglev`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    /// Socket-level load balancing (`--cgroup-root`): where its programs are attached; absent
    /// when off (and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_lb: Option<SocketLbInfo>,
    /// The flow log (`myelinctl flows`); absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowLogInfo>,
}

/// Where the socket-level load balancing programs are attached (`Status::socket_lb`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SocketLbInfo {
    /// The cgroup v2 directory (`--cgroup-root`).
    pub cgroup_root: String,
    /// Its cgroup id, as `bpftool cgroup show` and link info report it.
    pub cgroup_id: u64,
    /// Each program attached there, with its kernel id.
    pub programs: Vec<SocketLbProgram>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SocketLbProgram {
    pub name: String,
    pub id: u32,
}

/// How a node reaches the other nodes (`Status::routing`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingInfo {
    /// `tunnel` or `native`.
    pub mode: String,
    /// The device traffic to other nodes and the outside leaves through.
    pub uplink: String,
    /// The node's InternalIP.
    pub node_ip: Ipv4Addr,
    /// The MTU pods get: it fits the path to every other node.
    pub pod_mtu: u32,
    /// The VXLAN port (tunnel mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
    /// Pod traffic leaving the cluster is source-NATed to the node's IP.
    pub masquerade: bool,
    /// Native routing: the uplink's subnet that holds the node's address. Packets for a node
    /// in it go straight to that node as next hop; those for other nodes through the FIB.
    /// Absent in tunnel mode, when no subnet of the uplink holds the address (`--uplink` names
    /// another device), and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_subnet: Option<String>,
}

/// `GET /v1/nodes`: another node of the cluster as this one sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_ip: Option<Ipv4Addr>,
    /// Its pods are routed; when not, why not.
    pub routed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A NetworkPolicy the agent enforces, and the local pods it selects.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    pub namespace: String,
    pub name: String,
    /// The policy isolates the pods it selects for ingress / egress.
    pub ingress: bool,
    pub egress: bool,
    /// Local endpoints it selects.
    pub selects: Vec<PodRef>,
    /// Set while the object's latest version is rejected; `ingress`, `egress` and `selects`
    /// then describe what is in force instead. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<PolicyRejected>,
}

/// Why a policy's latest version was rejected, and what is in force instead.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRejected {
    /// The offending field and what is wrong with it.
    pub reason: String,
    pub in_force: PolicyFallback,
}

/// What a policy whose latest version was rejected enforces: never less than before.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyFallback {
    /// The last good version the agent saw (since it started).
    LastGood,
    /// No good version known: the pods it selects are isolated, with no rules.
    Deny,
    /// As `Deny`, but its podSelector is unusable: every pod of its namespace is isolated.
    DenyNamespace,
}

/// As `myelinctl policies` prints it after the reason.
impl std::fmt::Display for PolicyFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::LastGood => "last good version in force",
            Self::Deny => "selected pods isolated (deny)",
            Self::DenyNamespace => "every pod of the namespace isolated (deny)",
        })
    }
}

/// Most labels an [`ExplainEnd`] may carry (Kubernetes has no limit; a pod with more is rare).
pub const MAX_EXPLAIN_LABELS: usize = 64;

/// `POST /v1/policy/explain`: what NetworkPolicy says of a flow, from the agent's own index,
/// without sending a packet.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExplainRequest {
    pub from: ExplainEnd,
    pub to: ExplainEnd,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The destination port.
    pub port: u16,
}

/// One end of an explained flow: exactly one of an existing pod, a pod that need not exist
/// (its namespace and labels), or an address (a pod's, a node's, or outside the cluster).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExplainEnd {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// With `labels`: a hypothetical pod of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
}

/// The answer of `POST /v1/policy/explain`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyExplanation {
    /// The ends as the agent resolved them: `pod a/web (10.244.0.5)`, `pod in a {app=x}`,
    /// `node 192.168.1.10`, `world 192.0.2.1`.
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    /// Both checks allow it.
    pub allowed: bool,
    /// The source's egress policy.
    pub egress: PolicyCheck,
    /// The destination's ingress policy.
    pub ingress: PolicyCheck,
}

/// One direction's check of an explained flow (or of an event, see [`FlowEvent`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "verdict"
)]
pub enum PolicyCheck {
    /// That end is not a pod: no policy applies to it.
    NotAPod,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Between a pod and its own node: always allowed.
    OwnNode,
    /// Isolated, and these rules admit the flow (every one that does).
    Allowed { rules: Vec<PolicyRule> },
    /// Isolated by these policies, none of whose rules admits the flow.
    Denied { isolated_by: Vec<PolicyName> },
}

impl PolicyCheck {
    pub fn allows(&self) -> bool {
        !matches!(self, Self::Denied { .. })
    }
}

/// `allowed by a/db-from-api ingress[1]`, `default-deny by a/deny-all, a/db-only`.
impl std::fmt::Display for PolicyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn list<T: std::fmt::Display>(items: &[T]) -> String {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
        match self {
            Self::NotAPod => f.write_str("not a pod"),
            Self::NotIsolated => f.write_str("not isolated"),
            Self::OwnNode => f.write_str("own node (always allowed)"),
            Self::Allowed { rules } => write!(f, "allowed by {}", list(rules)),
            Self::Denied { isolated_by } => write!(f, "default-deny by {}", list(isolated_by)),
        }
    }
}

/// A rule of a NetworkPolicy: `demo/backend-from-frontend ingress[0]`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    pub namespace: String,
    pub name: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// Position in the policy's `ingress` or `egress` list.
    pub rule: u32,
}

impl std::fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} {}[{}]",
            self.namespace, self.name, self.direction, self.rule
        )
    }
}

/// A NetworkPolicy: `demo/deny-all`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `GET /v1/policies`: the policies in force on this node. Everything listed is in the maps.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub policies: Vec<PolicySummary>,
    /// Entries in the policy map, and its capacity.
    pub entries: usize,
    pub capacity: usize,
    /// Local pods whose entries did not fit: their new connections are dropped.
    pub incomplete: Vec<PodRef>,
}

/// `GET /v1/services`: the Services this node translates (`--kube-proxy-replacement`), with
/// what the datapath's `lb_services` holds for each.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Off: Services are left to kube-proxy, and none is listed.
    pub kube_proxy_replacement: bool,
    pub services: Vec<ServiceSummary>,
}

/// A Service as this node translates it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSummary {
    pub namespace: String,
    pub name: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalName`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Why it is not translated (headless, ExternalName, no IPv4 ClusterIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_translated: Option<String>,
    /// `sessionAffinity: ClientIP`: its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// `Cluster` or `Local`.
    pub internal_traffic_policy: String,
    pub external_traffic_policy: String,
    pub ports: Vec<ServicePortSummary>,
}

/// One port of a Service: its frontends and its endpoints.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSummary {
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    pub port: u16,
    pub frontends: Vec<FrontendSummary>,
    /// Every endpoint of the port in the Service's IPv4 EndpointSlices.
    pub endpoints: Vec<BackendSummary>,
}

/// An address, port and protocol the datapath translates.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FrontendSummary {
    pub kind: FrontendKind,
    pub address: Ipv4Addr,
    pub port: u16,
    /// A `Local` traffic policy: only this node's endpoints.
    pub local: bool,
    /// The backends it sends to, in slot order. Empty: its connections are refused.
    pub backends: Vec<SocketAddrV4>,
    /// Another Service (`namespace/name`) holds the same address, port and protocol: this
    /// frontend is not translated for this Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    /// This node's InternalIP on the Service's node port.
    NodePort,
    /// An address of `status.loadBalancer.ingress`.
    LoadBalancer,
}

impl std::fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "cluster-ip",
            Self::ExternalIp => "external-ip",
            Self::NodePort => "node-port",
            Self::LoadBalancer => "load-balancer",
        })
    }
}

/// An endpoint of a Service port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendSummary {
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
    /// The endpoint's `nodeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// What an endpoint's conditions make of it. In order of preference.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum BackendState {
    /// Ready: a backend of every frontend whose traffic policy its node fits.
    Ready,
    /// Not ready but serving while it terminates: a backend only while no ready one is.
    ServingTerminating,
    /// Neither: never a backend.
    NotUsed,
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::ServingTerminating => "serving-terminating",
            Self::NotUsed => "not-used",
        })
    }
}

/// Packets dropped for one reason, since the datapath was loaded the first time.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DropCount {
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// A connection conntrack knows, in the direction it was opened.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrackedFlow {
    pub protocol: String,
    pub src: String,
    pub dst: String,
    /// Seconds until the entry expires unless a packet refreshes it.
    pub expires_in: u64,
    pub seen_reply: bool,
    /// Cut by a policy change: its packets are dropped both ways.
    pub denied: bool,
}

/// A datapath event: a dropped packet, or a new connection that policy allowed. The schema is
/// stable (a test pins its field names); fields that do not apply are left out. Fields added
/// since the first version have defaults, so that events of older agents still read.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlowEvent {
    /// When the datapath saw the packet: RFC 3339, UTC, milliseconds.
    #[serde(default)]
    pub time: String,
    /// The node whose datapath saw it.
    #[serde(default)]
    pub node: String,
    /// `drop` or `allowed`.
    pub kind: String,
    /// Why it was dropped (drops only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `ingress` or `egress`, relative to the pod whose policy decided.
    pub direction: String,
    /// Where the datapath saw the packet: `from-pod`, `to-pod`, `from-tunnel`, `from-uplink`,
    /// `to-uplink`.
    #[serde(default)]
    pub point: String,
    pub protocol: String,
    /// `ip:port` (ICMP: `ip`).
    pub src: String,
    pub dst: String,
    /// What each end is: `namespace/name` of a pod, `host` (this node), `remote-node`,
    /// `world`, or `identity N` for an identity this agent cannot name.
    #[serde(default)]
    pub src_name: String,
    #[serde(default)]
    pub dst_name: String,
    /// The pod at each end, when it is one the agent knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<PodRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<PodRef>,
    /// Local endpoint ids (0: not a local pod) and identities.
    pub src_endpoint: u32,
    pub dst_endpoint: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The source's egress check, when this node checked it (the source is a pod of this
    /// node): `allowed` with the rule that admitted the flow, `notIsolated`, `ownNode`, or
    /// `denied` with the policies that isolate the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<PolicyCheck>,
    /// The destination's ingress check, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<PolicyCheck>,
    /// `ip:port` of the Service frontend the connection was addressed to, when the datapath
    /// translated it to `dst` (`--kube-proxy-replacement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl FlowEvent {
    /// The check that decided a policy drop, or the rules that admitted an allowed flow:
    /// `default-deny by a/db-only`, `allowed by a/db-from-api ingress[0], ...`.
    pub fn attribution(&self) -> Option<String> {
        let checks = [&self.egress, &self.ingress];
        if let Some(denied) = checks.iter().copied().flatten().find(|c| !c.allows()) {
            return Some(denied.to_string());
        }
        let rules: Vec<String> = checks
            .iter()
            .copied()
            .flatten()
            .filter_map(|c| match c {
                PolicyCheck::Allowed { rules } => Some(rules.iter().map(ToString::to_string)),
                _ => None,
            })
            .flatten()
            .collect();
        (!rules.is_empty()).then(|| format!("allowed by {}", rules.join(", ")))
    }

    /// The destination port (0 for protocols without ports).
    pub fn dst_port(&self) -> u16 {
        port_of(&self.dst)
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

fn addr_of(endpoint: &str) -> &str {
    endpoint.split_once(':').map_or(endpoint, |(a, _)| a)
}

/// One line as `myelinctl monitor` prints it: time, node, kind, protocol, source -> destination
/// (with what each is), direction, observation point, reason, the policy attribution, and the
/// Service a translated connection was addressed to.
impl std::fmt::Display for FlowEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `2026-01-02T03:04:05.678Z` -> `03:04:05.678`
        let time = self.time.get(11..23).unwrap_or(&self.time);
        write!(
            f,
            "{time} {} {:<7} {:<5} {:<22} -> {:<22} {:<8} {:<11} {}",
            self.node,
            self.kind,
            self.protocol,
            format!("{} ({})", self.src, self.src_name),
            format!("{} ({})", self.dst, self.dst_name),
            self.direction,
            self.point,
            self.reason.as_deref().unwrap_or_default()
        )?;
        if let Some(why) = self.attribution() {
            write!(f, " {why}")?;
        }
        match &self.service {
            Some(service) => write!(f, " (service {service} -> {})", self.dst),
            None => Ok(()),
        }
    }
}

/// Most characters of a filter value (a pod reference, a namespace, an address).
pub const MAX_FILTER_LEN: usize = 253;

/// Which events `GET /v1/events` and `GET /v1/flows` return (query parameters; all that are
/// given must match). Applied by the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlowFilter {
    /// The source: `namespace/name` of a pod, an address, or `host`, `remote-node`, `world`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The destination, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Either end is a pod of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Either end is this pod (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `allowed` or `drop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// The destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl FlowFilter {
    /// Refuses values no event can match for a reason the user should hear about.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("from", &self.from),
            ("to", &self.to),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.len() > MAX_FILTER_LEN)
            {
                return Err(format!(
                    "{name}: must be 1 to {MAX_FILTER_LEN} characters long"
                ));
            }
        }
        if let Some(pod) = &self.pod
            && !pod.contains('/')
        {
            return Err(format!("pod: {pod:?} is not namespace/name"));
        }
        if let Some(v) = &self.verdict
            && v != "allowed"
            && v != "drop"
        {
            return Err(format!("verdict: {v:?} is neither allowed nor drop"));
        }
        Ok(())
    }

    pub fn matches(&self, e: &FlowEvent) -> bool {
        let end =
            |want: &str, endpoint: &str, name: &str| want == name || want == addr_of(endpoint);
        let pod_name =
            |p: &Option<PodRef>| p.as_ref().map(|p| format!("{}/{}", p.namespace, p.name));
        self.from
            .as_deref()
            .is_none_or(|w| end(w, &e.src, &e.src_name))
            && self
                .to
                .as_deref()
                .is_none_or(|w| end(w, &e.dst, &e.dst_name))
            && self.namespace.as_deref().is_none_or(|ns| {
                [&e.src_pod, &e.dst_pod]
                    .iter()
                    .any(|p| p.as_ref().is_some_and(|p| p.namespace == ns))
            })
            && self.pod.as_deref().is_none_or(|want| {
                [&e.src_pod, &e.dst_pod]
                    .iter()
                    .any(|p| pod_name(p).as_deref() == Some(want))
            })
            && self.verdict.as_deref().is_none_or(|v| v == e.kind)
            && self.port.is_none_or(|p| p == e.dst_port())
    }

    /// The query string (with its `?`), or nothing.
    pub fn to_query(&self, last: Option<usize>) -> String {
        let mut parts = Vec::new();
        for (name, value) in [
            ("from", &self.from),
            ("to", &self.to),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("verdict", &self.verdict),
        ] {
            if let Some(v) = value {
                parts.push(format!("{name}={}", percent_encode(v)));
            }
        }
        if let Some(p) = self.port {
            parts.push(format!("port={p}"));
        }
        if let Some(n) = last {
            parts.push(format!("last={n}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `GET /v1/flows?last=N&<FlowFilter>`: the latest events the agent kept, oldest first.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlowsResponse {
    #[serde(flatten)]
    pub log: FlowLogInfo,
    pub flows: Vec<FlowEvent>,
}

/// The agent's flow log: its ring of the latest events and what the datapath lost.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlowLogInfo {
    /// How many events the agent keeps (`--flow-buffer`); 0: none (the ring is off).
    pub capacity: usize,
    /// Events in the ring now (before the filter).
    pub buffered: usize,
    /// Events each CPU may emit per second (`--flow-events-rate`; 0: no limit).
    pub rate_per_cpu: u32,
    /// Events the datapath could not report since it was loaded.
    pub lost: EventsLost,
}

/// Events the datapath did not report, summed over CPUs.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventsLost {
    /// Beyond `--flow-events-rate`.
    pub rate_limited: u64,
    /// The ring buffer between datapath and agent was full.
    pub ring_full: u64,
}

/// Most events `GET /v1/flows` returns at once.
pub const MAX_FLOWS_LAST: usize = 1 << 20;

/// What went wrong, in a form the plugin can map to a CNI error code.

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    InvalidRequest,
    Forbidden,
    NotFound,
    AlreadyExists,
    PoolExhausted,
    NotReady,
    Internal,
    /// The request's deadline passed before the agent got to it: nothing was done.
    DeadlineExceeded,
    /// The body is larger than the agent accepts.
    PayloadTooLarge,
    /// The body did not arrive in time.
    RequestTimeout,
}

impl ErrorKind {
    /// The HTTP status the agent answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::AlreadyExists => 409,
            Self::PoolExhausted => 507,
            Self::NotReady => 503,
            Self::Internal => 500,
            Self::DeadlineExceeded => 504,
            Self::PayloadTooLarge => 413,
            Self::RequestTimeout => 408,
        }
    }
}

/// The body of every error answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_event() -> FlowEvent {
        FlowEvent {
            time: "2026-01-02T03:04:05.678Z".into(),
            node: "node-1".into(),
            kind: "drop".into(),
            reason: Some("policy-denied-ingress".into()),
            direction: "ingress".into(),
            point: "from-pod".into(),
            protocol: "tcp".into(),
            src: "10.0.0.2:40000".into(),
            dst: "10.0.0.3:80".into(),
            src_name: "a/web".into(),
            dst_name: "a/db".into(),
            src_pod: Some(PodRef {
                namespace: "a".into(),
                name: "web".into(),
            }),
            dst_pod: Some(PodRef {
                namespace: "a".into(),
                name: "db".into(),
            }),
            src_endpoint: 1,
            dst_endpoint: 2,
            src_identity: 300,
            dst_identity: 301,
            egress: Some(PolicyCheck::NotIsolated),
            ingress: Some(PolicyCheck::Denied {
                isolated_by: vec![PolicyName {
                    namespace: "a".into(),
                    name: "deny-all".into(),
                }],
            }),
            service: Some("10.96.0.10:80".into()),
        }
    }

    /// The event's JSON is an interface (README, `myelinctl monitor --json`): renaming a field
    /// breaks its users, so this test pins every name.
    #[test]
    fn flow_event_json_field_names_are_stable() {
        let json = serde_json::to_value(full_event()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "time",
            "node",
            "kind",
            "reason",
            "direction",
            "point",
            "protocol",
            "src",
            "dst",
            "srcName",
            "dstName",
            "srcPod",
            "dstPod",
            "srcEndpoint",
            "dstEndpoint",
            "srcIdentity",
            "dstIdentity",
            "egress",
            "ingress",
            "service",
        ];
        let mut keys = keys;
        keys.sort_unstable();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(
            json["egress"],
            serde_json::json!({"verdict": "notIsolated"})
        );
        assert_eq!(
            json["ingress"],
            serde_json::json!({"verdict": "denied", "isolatedBy": [{"namespace": "a", "name": "deny-all"}]})
        );
        assert_eq!(
            json["srcPod"],
            serde_json::json!({"namespace": "a", "name": "web"})
        );
        let back: FlowEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, full_event());
    }

    #[test]
    fn filters_match_pods_names_addresses_verdicts_and_ports() {
        let e = full_event();
        let f = |filter: FlowFilter| filter.matches(&e);
        assert!(f(FlowFilter::default()));
        assert!(f(FlowFilter {
            from: Some("a/web".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            from: Some("10.0.0.2".into()),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            from: Some("a/db".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            to: Some("a/db".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            namespace: Some("a".into()),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            namespace: Some("b".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            pod: Some("a/db".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            verdict: Some("drop".into()),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            verdict: Some("allowed".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            port: Some(80),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            port: Some(40000),
            ..Default::default()
        }));
        let bad = [
            FlowFilter {
                verdict: Some("maybe".into()),
                ..Default::default()
            },
            FlowFilter {
                pod: Some("db".into()),
                ..Default::default()
            },
            FlowFilter {
                from: Some("x".repeat(MAX_FILTER_LEN + 1)),
                ..Default::default()
            },
            FlowFilter {
                to: Some(String::new()),
                ..Default::default()
            },
        ];
        for filter in bad {
            assert!(filter.validate().is_err(), "{filter:?}");
        }
        let q = FlowFilter {
            from: Some("a/web".into()),
            port: Some(80),
            ..Default::default()
        };
        assert_eq!(q.to_query(Some(5)), "?from=a%2Fweb&port=80&last=5");
        assert_eq!(FlowFilter::default().to_query(None), "");
    }

    #[test]
    fn host_ifname_is_lxc_and_12_hex_digits_of_sha256() {
        // `printf abc/eth0 | sha256sum` = 538f587a2365 5f38bbcd...
        let name = AttachmentId::new("abc", "eth0").host_ifname();
        assert_eq!(name, "lxc538f587a2365");
        assert!(is_host_ifname(&name));
        for other in [
            "lxc538f587a236",
            "lxc538f587a2365a",
            "lxc538F587A2365",
            "eth0",
            "myelin_host",
        ] {
            assert!(!is_host_ifname(other), "{other}");
        }
    }

    #[test]
    fn host_ifname_differs_per_container_and_interface() {
        let a = AttachmentId::new("c1", "eth0").host_ifname();
        let b = AttachmentId::new("c2", "eth0").host_ifname();
        let c = AttachmentId::new("c1", "eth1").host_ifname();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, AttachmentId::new("c1", "eth0").host_ifname());
    }

    #[test]
    fn attachment_query_escapes_reserved_characters() {
        let id = AttachmentId::new("abc-1_2.3", "eth&0=x%");
        assert_eq!(id.to_query(), "containerId=abc-1_2.3&ifname=eth%260%3Dx%25");
    }

    #[test]
    fn endpoint_request_is_flat_camel_case_json() {
        let req = EndpointRequest {
            attachment: AttachmentId::new("c1", "eth0"),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web".into(),
            }),
            netns: "/run/netns/p".into(),
            netns_cookie: Some(4097),
            ip: Ipv4Addr::new(10, 244, 0, 2),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            host_ifname: "lxc0123".into(),
            host_ifindex: 7,
            host_mac: Mac([2, 0, 0, 0, 0, 2]),
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["containerId"], "c1");
        assert_eq!(json["hostIfindex"], 7);
        assert_eq!(json["netnsCookie"], 4097);
        assert_eq!(json["pod"]["namespace"], "default");
        let back: EndpointRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn a_policy_summary_without_a_rejection_decodes_as_before() {
        let old = r#"{"namespace":"a","name":"p","ingress":true,"egress":false,"selects":[]}"#;
        let summary: PolicySummary = serde_json::from_str(old).unwrap();
        assert_eq!(summary.rejected, None);
        assert_eq!(serde_json::to_string(&summary).unwrap(), old);
        let rejected = PolicySummary {
            rejected: Some(PolicyRejected {
                reason: "spec.ingress[0].ports[0].port: 70000 is outside 1-65535".into(),
                in_force: PolicyFallback::LastGood,
            }),
            ..summary
        };
        let json = serde_json::to_value(&rejected).unwrap();
        assert_eq!(json["rejected"]["inForce"], "last-good");
        assert_eq!(
            serde_json::from_value::<PolicySummary>(json).unwrap(),
            rejected
        );
    }

    #[test]
    fn a_service_summary_is_camel_case_json_with_kebab_case_states() {
        let summary = ServiceSummary {
            namespace: "default".into(),
            name: "web".into(),
            type_: "NodePort".into(),
            not_translated: None,
            affinity_timeout_seconds: Some(10_800),
            internal_traffic_policy: "Cluster".into(),
            external_traffic_policy: "Local".into(),
            ports: vec![ServicePortSummary {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
                frontends: vec![FrontendSummary {
                    kind: FrontendKind::NodePort,
                    address: Ipv4Addr::new(192, 168, 1, 10),
                    port: 30080,
                    local: true,
                    backends: vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 8080)],
                    taken_by: None,
                }],
                endpoints: vec![BackendSummary {
                    address: Ipv4Addr::new(10, 244, 1, 5),
                    port: 8080,
                    state: BackendState::ServingTerminating,
                    node: Some("node-1".into()),
                }],
            }],
        };
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["type"], "NodePort");
        assert_eq!(json["affinityTimeoutSeconds"], 10_800);
        assert_eq!(json["ports"][0]["frontends"][0]["kind"], "node-port");
        assert_eq!(
            json["ports"][0]["frontends"][0]["backends"][0],
            "10.244.1.5:8080"
        );
        assert_eq!(
            json["ports"][0]["endpoints"][0]["state"],
            "serving-terminating"
        );
        assert!(json.get("notTranslated").is_none());
        assert_eq!(
            serde_json::from_value::<ServiceSummary>(json).unwrap(),
            summary
        );
    }

    #[test]
    fn error_kinds_map_to_distinct_http_statuses() {
        let kinds = [
            ErrorKind::InvalidRequest,
            ErrorKind::Forbidden,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::PoolExhausted,
            ErrorKind::NotReady,
            ErrorKind::Internal,
            ErrorKind::DeadlineExceeded,
            ErrorKind::PayloadTooLarge,
            ErrorKind::RequestTimeout,
        ];
        let mut statuses: Vec<u16> = kinds.iter().map(|k| k.http_status()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!(statuses.len(), kinds.len());
    }
}
