//! Object builders for tests: real Kubernetes objects, no mocks (the `builders` feature
//! makes them available to other crates' tests).

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort as K8sPort, Namespace, Node, NodeAddress, NodeSpec,
            NodeStatus, Pod, PodSpec, PodStatus, Service,
        },
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub fn labels(pairs: &[(&str, &str)]) -> crate::objects::Labels {
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

/// A NetworkPolicy from YAML, exactly as users write it.
pub fn policy(yaml: &str) -> NetworkPolicy {
    serde_yaml::from_str(yaml).expect("test policy YAML")
}

/// A Service `ns/name` whose `spec` (and anything else but metadata) is `yaml`, as users write
/// it: `"spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}"`.
pub fn service(ns: &str, name: &str, yaml: &str) -> Service {
    let text = format!(
        "kind: Service\napiVersion: v1\nmetadata: {{name: {name}, namespace: {ns}}}\n{yaml}"
    );
    serde_yaml::from_str(&text).expect("test Service YAML")
}

/// An EndpointSlice `ns/name` of Service `service` (its `kubernetes.io/service-name` label),
/// with `yaml` for the rest: `addressType`, `endpoints`, `ports`.
pub fn endpoint_slice(ns: &str, name: &str, service: Option<&str>, yaml: &str) -> EndpointSlice {
    let labels = service
        .map(|s| format!(", labels: {{kubernetes.io/service-name: {s}}}"))
        .unwrap_or_default();
    let text = format!(
        "kind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: {name}, namespace: {ns}{labels}}}\n{yaml}"
    );
    serde_yaml::from_str(&text).expect("test EndpointSlice YAML")
}
