//! Cluster state as the agent needs it: a pure in-memory index of slim Node, Namespace and Pod
//! records, fed by changes from either source (Kubernetes watches or a directory of YAML).
//!
//! Objects are converted on the way in and keep only what the datapath uses (labels, IPs, pod
//! CIDR, container ports): at 20,000 pods the index is what dominates the agent's memory.

pub mod identity;
pub mod policy;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};

pub use self::{
    identity::{Identities, IdentityLabels},
    policy::{PolicyError, PolicyInfo, Protocol},
};

pub type Labels = BTreeMap<String, String>;

/// The label Kubernetes puts on every namespace (1.21+); added here when a source omits it, so
/// that `namespaceSelector` on it works the same from a directory as from a cluster.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("{kind} has no metadata.name")]
    NoName { kind: &'static str },
    #[error("{kind} {name} has no metadata.namespace")]
    NoNamespace { kind: &'static str, name: String },
    #[error(transparent)]
    InvalidPolicy(#[from] PolicyError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Namespace,
    Pod,
    NetworkPolicy,
}

impl Kind {
    /// Every kind the agent watches.
    pub const ALL: [Kind; 4] = [Kind::Node, Kind::Namespace, Kind::Pod, Kind::NetworkPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// A named container port: policies can name a port instead of giving its number, so these
/// are the only container ports the agent keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `status.podIP`, when assigned and IPv4.
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `spec.podCIDR`, when set and a valid IPv4 CIDR.
    pub pod_cidr: Option<Ipv4Net>,
    /// InternalIP addresses.
    pub addresses: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Node(NodeInfo),
    Namespace(NamespaceInfo),
    Pod(PodInfo),
    NetworkPolicy(PolicyInfo),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }
}

/// One change to the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An object was added or modified.
    Apply(Object),
    /// An object was deleted. `namespace` is empty for cluster-scoped kinds.
    Delete {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// The full current list of one kind (initial list, relist after a watch expired, or a
    /// directory rescan): everything of that kind not in the list is gone.
    Replace { kind: Kind, objects: Vec<Object> },
}

/// Warnings about fields that were present but unusable; the object is still indexed.
pub type Warnings = Vec<String>;

impl NodeInfo {
    pub fn from_k8s(node: &Node) -> Result<(Self, Warnings), ObjectError> {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or(ObjectError::NoName { kind: "Node" })?;
        let mut warnings = Vec::new();
        let pod_cidr = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| match c.parse::<Ipv4Net>() {
                Ok(net) => Some(net.trunc()),
                Err(_) => {
                    warnings.push(format!(
                        "Node {name}: spec.podCIDR {c:?} is not an IPv4 CIDR"
                    ));
                    None
                }
            });
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .collect();
        Ok((
            Self {
                name,
                pod_cidr,
                addresses,
            },
            warnings,
        ))
    }
}

impl NamespaceInfo {
    pub fn from_k8s(ns: &Namespace) -> Result<Self, ObjectError> {
        let name = ns
            .metadata
            .name
            .clone()
            .ok_or(ObjectError::NoName { kind: "Namespace" })?;
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        // The API server sets this label to the namespace's name on every namespace and
        // refuses other values; objects from the directory source get the same.
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Ok(Self { name, labels })
    }
}

impl PodInfo {
    pub fn from_k8s(pod: &Pod) -> Result<(Self, Warnings), ObjectError> {
        let name = pod
            .metadata
            .name
            .clone()
            .ok_or(ObjectError::NoName { kind: "Pod" })?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .ok_or_else(|| ObjectError::NoNamespace {
                kind: "Pod",
                name: name.clone(),
            })?;
        let mut warnings = Vec::new();
        // A pod that has terminated (phase Succeeded or Failed) no longer holds its address:
        // the runtime tore its sandbox down and the address may already be another pod's.
        let terminated = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
        let ip = pod
            .status
            .as_ref()
            .filter(|_| !terminated)
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => Some(v4),
                Ok(IpAddr::V6(_)) => None,
                Err(_) => {
                    warnings.push(format!(
                        "Pod {namespace}/{name}: status.podIP {ip:?} is not an IP address"
                    ));
                    None
                }
            });
        let spec = pod.spec.as_ref();
        // Named ports come from the containers and from sidecars (init containers with
        // restartPolicy Always, which run alongside them).
        let sidecars = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default()
            .iter()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        let ports = spec
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .chain(sidecars)
            .flat_map(|c| c.ports.as_deref().unwrap_or_default())
            .filter_map(|p| {
                let port_name = p.name.clone()?;
                let port = u16::try_from(p.container_port).ok().filter(|p| *p > 0);
                let protocol = Protocol::parse(p.protocol.as_deref());
                match (port, protocol) {
                    (Some(port), Ok(protocol)) => Some(ContainerPort {
                        name: port_name,
                        port,
                        protocol,
                    }),
                    (None, _) => {
                        warnings.push(format!(
                            "Pod {namespace}/{name}: containerPort {} is out of range",
                            p.container_port
                        ));
                        None
                    }
                    (_, Err(e)) => {
                        warnings.push(format!("Pod {namespace}/{name}: port {port_name:?}: {e}"));
                        None
                    }
                }
            })
            .collect();
        Ok((
            Self {
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                ip,
                host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
                ports,
                namespace,
                name,
            },
            warnings,
        ))
    }
}

/// The index itself. Every mutation reports whether anything changed, so that callers only
/// recompute the desired datapath state when it can differ.
#[derive(Debug, Default, Clone)]
pub struct ClusterIndex {
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<(String, String), PodInfo>,
    policies: BTreeMap<(String, String), PolicyInfo>,
    label_sets: LabelSets,
}

/// The identity labels of every (non host-network) pod, kept up to date as pods and namespaces
/// change, and interned: pods with the same labels share one allocation. This is what makes a
/// change cost proportional to what it touches rather than to the cluster's size.
#[derive(Debug, Default, Clone)]
struct LabelSets {
    by_pod: HashMap<(String, String), Arc<IdentityLabels>>,
    /// Each distinct set with the number of pods that have it.
    counts: HashMap<Arc<IdentityLabels>, usize>,
    /// Bumped whenever a set appears or disappears (identities must then be renumbered).
    generation: u64,
}

impl LabelSets {
    fn set(&mut self, pod: (String, String), labels: Option<IdentityLabels>) {
        if let Some(old) = self.by_pod.remove(&pod) {
            self.release(&old);
        }
        let Some(labels) = labels else { return };
        let shared = match self.counts.get_key_value(&labels) {
            Some((existing, _)) => Arc::clone(existing),
            None => {
                self.generation += 1;
                Arc::new(labels)
            }
        };
        *self.counts.entry(Arc::clone(&shared)).or_default() += 1;
        self.by_pod.insert(pod, shared);
    }

    fn release(&mut self, labels: &Arc<IdentityLabels>) {
        if let Some(n) = self.counts.get_mut(labels) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(labels);
                self.generation += 1;
            }
        }
    }
}

impl ClusterIndex {
    pub fn apply(&mut self, change: Change) -> bool {
        let touched = match &change {
            Change::Apply(Object::Pod(p)) => Touched::Pod(p.namespace.clone(), p.name.clone()),
            Change::Delete {
                kind: Kind::Pod,
                namespace,
                name,
            } => Touched::Pod(namespace.clone(), name.clone()),
            Change::Apply(Object::Namespace(n)) => Touched::Namespace(n.name.clone()),
            Change::Delete {
                kind: Kind::Namespace,
                name,
                ..
            } => Touched::Namespace(name.clone()),
            Change::Replace {
                kind: Kind::Pod | Kind::Namespace,
                ..
            } => Touched::All,
            _ => Touched::Nothing,
        };
        let changed = self.apply_objects(change);
        if changed {
            self.refresh_label_sets(touched);
        }
        changed
    }

    fn refresh_label_sets(&mut self, touched: Touched) {
        let pods: Vec<(String, String)> = match touched {
            Touched::Nothing => return,
            Touched::Pod(ns, name) => vec![(ns, name)],
            Touched::Namespace(ns) => self
                .pods
                .range((ns.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == ns)
                .map(|(k, _)| k.clone())
                .collect(),
            Touched::All => {
                self.label_sets = LabelSets {
                    generation: self.label_sets.generation + 1,
                    ..LabelSets::default()
                };
                self.pods.keys().cloned().collect()
            }
        };
        for key in pods {
            let labels = self
                .pods
                .get(&key)
                .filter(|p| !p.host_network)
                .map(|p| self.identity_labels(&p.namespace, &p.labels));
            self.label_sets.set(key, labels);
        }
    }

    /// The interned identity labels of a pod in the index (`None` for host-network pods).
    pub fn pod_identity_labels(&self, namespace: &str, name: &str) -> Option<&Arc<IdentityLabels>> {
        self.label_sets
            .by_pod
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// Every distinct label set of the index's pods.
    pub fn label_sets(&self) -> impl Iterator<Item = &Arc<IdentityLabels>> {
        self.label_sets.counts.keys()
    }

    /// Changes whenever a label set appears or disappears.
    pub fn label_sets_generation(&self) -> u64 {
        self.label_sets.generation
    }

    fn apply_objects(&mut self, change: Change) -> bool {
        match change {
            Change::Apply(object) => self.upsert(object),
            Change::Delete {
                kind,
                namespace,
                name,
            } => match kind {
                Kind::Node => self.nodes.remove(&name).is_some(),
                Kind::Namespace => self.namespaces.remove(&name).is_some(),
                Kind::Pod => self.pods.remove(&(namespace, name)).is_some(),
                Kind::NetworkPolicy => self.policies.remove(&(namespace, name)).is_some(),
            },
            Change::Replace { kind, objects } => {
                let of_kind = objects.into_iter().filter(|o| o.kind() == kind);
                match kind {
                    Kind::Node => replace_all(
                        &mut self.nodes,
                        of_kind.filter_map(|o| match o {
                            Object::Node(n) => Some((n.name.clone(), n)),
                            _ => None,
                        }),
                    ),
                    Kind::Namespace => replace_all(
                        &mut self.namespaces,
                        of_kind.filter_map(|o| match o {
                            Object::Namespace(n) => Some((n.name.clone(), n)),
                            _ => None,
                        }),
                    ),
                    Kind::Pod => replace_all(
                        &mut self.pods,
                        of_kind.filter_map(|o| match o {
                            Object::Pod(p) => Some(((p.namespace.clone(), p.name.clone()), p)),
                            _ => None,
                        }),
                    ),
                    Kind::NetworkPolicy => replace_all(
                        &mut self.policies,
                        of_kind.filter_map(|o| match o {
                            Object::NetworkPolicy(p) => {
                                Some(((p.namespace.clone(), p.name.clone()), p))
                            }
                            _ => None,
                        }),
                    ),
                }
            }
        }
    }

    fn upsert(&mut self, object: Object) -> bool {
        match object {
            Object::Node(n) => replace(&mut self.nodes, n.name.clone(), n),
            Object::Namespace(n) => replace(&mut self.namespaces, n.name.clone(), n),
            Object::Pod(p) => replace(&mut self.pods, (p.namespace.clone(), p.name.clone()), p),
            Object::NetworkPolicy(p) => {
                replace(&mut self.policies, (p.namespace.clone(), p.name.clone()), p)
            }
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyInfo> {
        self.policies.values()
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &NamespaceInfo> {
        self.namespaces.values()
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    /// A namespace's labels; a namespace the index has not seen still has its name label.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        match self.namespaces.get(namespace) {
            Some(ns) => ns.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())]),
        }
    }

    /// What a pod's identity is made of.
    pub fn identity_labels(&self, namespace: &str, pod_labels: &Labels) -> IdentityLabels {
        IdentityLabels {
            namespace: namespace.to_string(),
            pod_labels: pod_labels.clone(),
            namespace_labels: self.namespace_labels(namespace),
        }
    }

    /// The identity labels of a pod by name: from its object when the index has it, else (the
    /// CNI ADD came before the watch event) its namespace with no pod labels yet.
    pub fn identity_labels_of_pod(&self, namespace: &str, name: &str) -> Arc<IdentityLabels> {
        match self.pod_identity_labels(namespace, name) {
            Some(l) => Arc::clone(l),
            None => Arc::new(self.identity_labels(namespace, &Labels::new())),
        }
    }
}

/// Which pods' identity labels a change can affect.
enum Touched {
    Nothing,
    Pod(String, String),
    Namespace(String),
    All,
}

fn replace_all<K: Ord, V: PartialEq>(
    map: &mut BTreeMap<K, V>,
    entries: impl Iterator<Item = (K, V)>,
) -> bool {
    let new: BTreeMap<K, V> = entries.collect();
    let changed = *map != new;
    *map = new;
    changed
}

fn replace<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    match map.get(&key) {
        Some(existing) if *existing == value => false,
        _ => {
            map.insert(key, value);
            true
        }
    }
}

#[cfg(test)]
pub(crate) mod builders {
    //! Object builders for tests: real Kubernetes objects, no mocks.
    use k8s_openapi::{
        api::core::v1::{
            Container, ContainerPort as K8sPort, Namespace, Node, NodeAddress, NodeSpec,
            NodeStatus, Pod, PodSpec, PodStatus,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    pub fn labels(pairs: &[(&str, &str)]) -> super::Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn pod(ns: &str, name: &str, pod_labels: &[(&str, &str)], ip: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(labels(pod_labels)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![K8sPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: ip.map(|ip| PodStatus {
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
        }
    }

    pub fn namespace(name: &str, ns_labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels(ns_labels)),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    pub fn node(name: &str, pod_cidr: Option<&str>, internal_ip: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: pod_cidr.map(Into::into),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: internal_ip.into(),
                }]),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{builders::*, *};

    fn apply_pod(index: &mut ClusterIndex, pod: &Pod) -> bool {
        let (info, _) = PodInfo::from_k8s(pod).unwrap();
        index.apply(Change::Apply(Object::Pod(info)))
    }

    #[test]
    fn pod_fields_are_extracted() {
        let (p, warnings) =
            PodInfo::from_k8s(&pod("default", "web", &[("app", "web")], Some("10.0.0.5"))).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(p.ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(p.labels, labels(&[("app", "web")]));
        assert_eq!(
            p.ports,
            vec![ContainerPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp
            }]
        );
    }

    #[test]
    fn pod_without_ip_is_indexed_without_one() {
        let (p, warnings) = PodInfo::from_k8s(&pod("default", "web", &[], None)).unwrap();
        assert_eq!(p.ip, None);
        assert!(warnings.is_empty());
    }

    #[test]
    fn a_terminated_pod_no_longer_holds_its_address() {
        for (phase, holds) in [
            ("Pending", true),
            ("Running", true),
            ("Succeeded", false),
            ("Failed", false),
        ] {
            let mut p = pod("default", "job", &[], Some("10.0.0.5"));
            if let Some(status) = p.status.as_mut() {
                status.phase = Some(phase.into());
            }
            let (p, _) = PodInfo::from_k8s(&p).unwrap();
            assert_eq!(p.ip.is_some(), holds, "{phase}");
        }
    }

    #[test]
    fn sidecar_ports_are_named_ports_too() {
        use k8s_openapi::api::core::v1::{Container, ContainerPort as K8sPort};
        let mut p = pod("default", "web", &[], Some("10.0.0.5"));
        let port = |name: &str, number| K8sPort {
            name: Some(name.into()),
            container_port: number,
            ..Default::default()
        };
        if let Some(spec) = p.spec.as_mut() {
            spec.init_containers = Some(vec![
                Container {
                    name: "proxy".into(),
                    restart_policy: Some("Always".into()),
                    ports: Some(vec![port("metrics", 9090)]),
                    ..Default::default()
                },
                // An ordinary init container has finished before the pod serves anything.
                Container {
                    name: "setup".into(),
                    ports: Some(vec![port("setup", 7000)]),
                    ..Default::default()
                },
            ]);
        }
        let (p, _) = PodInfo::from_k8s(&p).unwrap();
        let names: Vec<&str> = p.ports.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["http", "metrics"]);
    }

    #[test]
    fn malformed_pod_ip_is_a_warning_not_an_error() {
        let (p, warnings) =
            PodInfo::from_k8s(&pod("default", "web", &[], Some("10.0.0.300"))).unwrap();
        assert_eq!(p.ip, None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn pod_without_name_or_namespace_is_rejected() {
        let mut p = pod("default", "web", &[], None);
        p.metadata.namespace = None;
        assert!(matches!(
            PodInfo::from_k8s(&p),
            Err(ObjectError::NoNamespace { .. })
        ));
        p.metadata.name = None;
        assert_eq!(
            PodInfo::from_k8s(&p).unwrap_err(),
            ObjectError::NoName { kind: "Pod" }
        );
    }

    #[test]
    fn node_with_malformed_pod_cidr_keeps_the_rest() {
        let (n, warnings) =
            NodeInfo::from_k8s(&node("n1", Some("10.0.0.0/99"), "192.168.0.1")).unwrap();
        assert_eq!(n.pod_cidr, None);
        assert_eq!(n.addresses, vec![Ipv4Addr::new(192, 168, 0, 1)]);
        assert_eq!(warnings.len(), 1);
        let (n, _) = NodeInfo::from_k8s(&node("n1", None, "192.168.0.1")).unwrap();
        assert_eq!(n.pod_cidr, None);
    }

    #[test]
    fn namespaces_always_carry_their_name_label() {
        let ns = NamespaceInfo::from_k8s(&namespace("team-a", &[("env", "prod")])).unwrap();
        assert_eq!(ns.labels[NAMESPACE_NAME_LABEL], "team-a");
        // A wrong value (the API server would refuse it) is replaced by the name.
        let forged = namespace("team-a", &[(NAMESPACE_NAME_LABEL, "team-b")]);
        let ns = NamespaceInfo::from_k8s(&forged).unwrap();
        assert_eq!(ns.labels[NAMESPACE_NAME_LABEL], "team-a");
        let index = ClusterIndex::default();
        assert_eq!(
            index.namespace_labels("unseen")[NAMESPACE_NAME_LABEL],
            "unseen"
        );
    }

    #[test]
    fn reapplying_an_unchanged_object_is_not_a_change() {
        let mut index = ClusterIndex::default();
        let p = pod("default", "web", &[("app", "web")], Some("10.0.0.5"));
        assert!(apply_pod(&mut index, &p));
        assert!(!apply_pod(&mut index, &p));
        let relabelled = pod("default", "web", &[("app", "api")], Some("10.0.0.5"));
        assert!(apply_pod(&mut index, &relabelled));
    }

    #[test]
    fn replace_drops_objects_missing_from_the_list() {
        let mut index = ClusterIndex::default();
        apply_pod(&mut index, &pod("default", "a", &[], None));
        apply_pod(&mut index, &pod("default", "b", &[], None));
        let (b, _) = PodInfo::from_k8s(&pod("default", "b", &[], None)).unwrap();
        assert!(index.apply(Change::Replace {
            kind: Kind::Pod,
            objects: vec![Object::Pod(b.clone())],
        }));
        assert!(index.pod("default", "a").is_none());
        assert!(index.pod("default", "b").is_some());
        assert!(!index.apply(Change::Replace {
            kind: Kind::Pod,
            objects: vec![Object::Pod(b)],
        }));
    }

    #[test]
    fn pod_seen_before_its_object_gets_labels_once_the_object_arrives() {
        let mut index = ClusterIndex::default();
        let early = index.identity_labels_of_pod("default", "web");
        assert!(early.pod_labels.is_empty());
        apply_pod(&mut index, &pod("default", "web", &[("app", "web")], None));
        let late = index.identity_labels_of_pod("default", "web");
        assert_eq!(late.pod_labels, labels(&[("app", "web")]));
        assert_ne!(early, late);
    }

    #[test]
    fn label_sets_are_shared_counted_and_follow_namespace_changes() {
        let mut index = ClusterIndex::default();
        apply_pod(&mut index, &pod("team", "a", &[("app", "web")], None));
        apply_pod(&mut index, &pod("team", "b", &[("app", "web")], None));
        apply_pod(&mut index, &pod("other", "c", &[("app", "web")], None));
        assert_eq!(index.label_sets().count(), 2);
        let a = index.pod_identity_labels("team", "a").unwrap();
        let b = index.pod_identity_labels("team", "b").unwrap();
        assert!(Arc::ptr_eq(a, b), "equal label sets share one allocation");

        let generation = index.label_sets_generation();
        apply_pod(
            &mut index,
            &pod("team", "b", &[("app", "web")], Some("10.0.0.9")),
        );
        assert_eq!(
            index.label_sets_generation(),
            generation,
            "no new set: same numbering"
        );

        let ns = NamespaceInfo::from_k8s(&namespace("team", &[("env", "prod")])).unwrap();
        index.apply(Change::Apply(Object::Namespace(ns)));
        assert_eq!(
            index.label_sets().count(),
            2,
            "team's set moved, other's stayed"
        );
        let moved = index.pod_identity_labels("team", "a").unwrap();
        assert_eq!(moved.namespace_labels["env"], "prod");
        assert_ne!(index.label_sets_generation(), generation);

        index.apply(Change::Delete {
            kind: Kind::Pod,
            namespace: "other".into(),
            name: "c".into(),
        });
        assert_eq!(index.label_sets().count(), 1);
    }

    #[test]
    fn namespace_label_change_changes_pod_identity_labels() {
        let mut index = ClusterIndex::default();
        apply_pod(&mut index, &pod("team", "web", &[("app", "web")], None));
        let before = index.identity_labels_of_pod("team", "web");
        let ns = NamespaceInfo::from_k8s(&namespace("team", &[("env", "prod")])).unwrap();
        assert!(index.apply(Change::Apply(Object::Namespace(ns))));
        let after = index.identity_labels_of_pod("team", "web");
        assert_eq!(after.namespace_labels["env"], "prod");
        assert_ne!(before, after);
    }
}
