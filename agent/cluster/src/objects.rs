//! The Kubernetes objects the agent uses, in the slim form it keeps: converted on the way in
//! by both sources (Kubernetes watches and the directory of YAML), keeping only what the
//! datapath needs (labels, IPs, pod CIDR, container ports). At 20,000 pods these records are
//! what dominates the agent's memory.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};

use crate::{
    policy::{PolicyInfo, PolicyRejection, Protocol},
    service::{EndpointSliceInfo, ServiceInfo},
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
    InvalidPolicy(#[from] PolicyRejection),
    /// A field the API server would have refused.
    #[error("{kind} {namespace}/{name}: {field}: {problem}")]
    Invalid {
        kind: &'static str,
        namespace: String,
        name: String,
        field: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
}

impl Kind {
    /// Every kind the agent can watch.
    pub const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::EndpointSlice,
    ];
    /// What the agent needs for pods, nodes and policy; Services only with
    /// `--kube-proxy-replacement` (see [`Kind::used`]).
    pub const WITHOUT_SERVICES: [Kind; 4] =
        [Kind::Node, Kind::Namespace, Kind::Pod, Kind::NetworkPolicy];

    /// The kinds an agent uses: Services and EndpointSlices only when it translates Services.
    /// Without it they are neither watched nor read, so an agent that leaves Services to
    /// kube-proxy needs no permission on them, keeps no memory for them, and a malformed
    /// Service in its directory source changes nothing.
    pub fn used(translates_services: bool) -> &'static [Kind] {
        if translates_services {
            &Kind::ALL
        } else {
            &Kind::WITHOUT_SERVICES
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
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
    /// A NetworkPolicy that cannot be enforced as written: the index fails closed with it.
    RejectedNetworkPolicy(PolicyRejection),
    Service(ServiceInfo),
    EndpointSlice(EndpointSliceInfo),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::NetworkPolicy(_) | Object::RejectedNetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    /// A NetworkPolicy as both sources hand it to the index: a policy that cannot be enforced
    /// is still an object (a rejection), never a reason to drop what the index holds for it.
    pub fn from_network_policy(np: &NetworkPolicy) -> Result<Self, ObjectError> {
        match PolicyInfo::from_k8s(np) {
            Ok(policy) => Ok(Object::NetworkPolicy(policy)),
            Err(ObjectError::InvalidPolicy(rejection)) => {
                Ok(Object::RejectedNetworkPolicy(rejection))
            }
            Err(e) => Err(e),
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

/// `metadata.namespace` and `metadata.name` of a namespaced object, both required.
pub(crate) fn namespaced_name(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(String, String), ObjectError> {
    let name = meta.name.clone().ok_or(ObjectError::NoName { kind })?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or_else(|| ObjectError::NoNamespace {
            kind,
            name: name.clone(),
        })?;
    Ok((namespace, name))
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
        let (namespace, name) = namespaced_name("Pod", &pod.metadata)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{builders::*, index::ClusterIndex};

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
}
