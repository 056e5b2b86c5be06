//! The cluster state fed to the agent's directory source: Kubernetes objects in their own
//! schema, written as YAML files into the node's cluster dir.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use crate::{Error, Result};

/// A directory the agent watches (`--source dir:<path>`).
#[derive(Debug, Clone)]
pub struct ClusterDir {
    path: PathBuf,
}

impl ClusterDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `<stem>.yaml` holding `objects` as a multi-document YAML file.
    pub fn write(&self, stem: &str, objects: &[Value]) -> Result<()> {
        let mut docs = Vec::with_capacity(objects.len());
        for object in objects {
            docs.push(serde_yaml::to_string(object).map_err(|source| Error::Yaml {
                context: format!("encoding {stem}.yaml"),
                source,
            })?);
        }
        self.write_yaml(stem, &docs.join("---\n"))
    }

    /// Writes `<stem>.yaml` as given. Through a temp file and a rename, so that the watching
    /// agent never reads half a file.
    pub fn write_yaml(&self, stem: &str, yaml: &str) -> Result<()> {
        let target = self.path.join(format!("{stem}.yaml"));
        let partial = self.path.join(format!(".{stem}.yaml.partial"));
        fs::write(&partial, yaml).map_err(Error::io(format!("writing {}", partial.display())))?;
        fs::rename(&partial, &target)
            .map_err(Error::io(format!("renaming to {}", target.display())))
    }

    /// Removes `<stem>.yaml`, and with it its objects; a file that is not there is fine.
    pub fn remove(&self, stem: &str) -> Result<()> {
        let target = self.path.join(format!("{stem}.yaml"));
        match fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", target.display()))(e))
            }
            _ => Ok(()),
        }
    }
}

pub fn node_object(name: &str, pod_cidr: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
        "spec": { "podCIDR": pod_cidr, "podCIDRs": [pod_cidr] },
    })
}

/// A Node as the cluster shows it once its kubelet registered: its pod CIDR and its addresses
/// (`InternalIP`, the address other nodes reach it on, and `Hostname`).
pub fn node_object_at(name: &str, pod_cidr: &str, internal_ip: Ipv4Addr) -> Value {
    let mut node = node_object(name, pod_cidr);
    node["status"] = json!({
        "addresses": [
            { "type": "InternalIP", "address": internal_ip.to_string() },
            { "type": "Hostname", "address": name },
        ],
    });
    node
}

pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut labels = label_map(labels);
    // Kubernetes sets this on every namespace; namespace selectors commonly use it.
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": labels },
    })
}

/// A Pod scheduled on `node` with one container exposing `tcp_ports`.
pub fn pod_object(
    node: &str,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    tcp_ports: &[u16],
) -> Value {
    let ports: Vec<Value> = tcp_ports
        .iter()
        .map(|p| json!({ "containerPort": p, "protocol": "TCP" }))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": label_map(labels) },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "busybox", "ports": ports }],
        },
    })
}

/// A Service `namespace/name` with `spec` as given (`clusterIP`, `ports`, `type`, ...).
pub fn service_object(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })
}

/// An endpoint of an EndpointSlice, as the EndpointSlice controller writes it: ready, or
/// terminating (then serving while `ready` is false), on `node`.
pub fn slice_endpoint(address: &str, ready: bool, terminating: bool, node: &str) -> Value {
    json!({
        "addresses": [address],
        "conditions": { "ready": ready, "serving": ready || terminating, "terminating": terminating },
        "nodeName": node,
    })
}

/// An IPv4 EndpointSlice of Service `namespace/service` (its `kubernetes.io/service-name`
/// label) with `endpoints` and `ports` (name, port, protocol).
pub fn endpoint_slice_object(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: Vec<Value>,
    ports: &[(&str, u16, &str)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, protocol)| json!({ "name": n, "port": p, "protocol": protocol }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// The `status` kubelet reports for a running pod: its address and its node's.
pub fn running_pod_status(pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Value {
    json!({
        "phase": "Running",
        "podIP": pod_ip.to_string(),
        "podIPs": [{ "ip": pod_ip.to_string() }],
        "hostIP": host_ip.to_string(),
        "hostIPs": [{ "ip": host_ip.to_string() }],
    })
}

fn label_map(labels: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
        .collect()
}

/// What the harness needs to know about a cluster described in YAML (the demo's embedded one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSummary {
    /// Namespaces with their labels.
    pub namespaces: Vec<(String, Vec<(String, String)>)>,
    pub pods: Vec<PodSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSummary {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`.
    pub node: String,
    pub labels: Vec<(String, String)>,
    pub tcp_ports: Vec<u16>,
}

/// Reads every Namespace and Pod from a multi-document YAML text.
pub fn summarize(yaml: &str) -> Result<ClusterSummary> {
    let mut summary = ClusterSummary {
        namespaces: Vec::new(),
        pods: Vec::new(),
    };
    let labels = |object: &Value| -> Vec<(String, String)> {
        object["metadata"]["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    };
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let object: Value = serde::Deserialize::deserialize(doc).map_err(|source| Error::Yaml {
            context: "parsing cluster YAML".into(),
            source,
        })?;
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        match object["kind"].as_str() {
            Some("Namespace") => summary.namespaces.push((name.to_string(), labels(&object))),
            Some("Pod") => {
                let namespace = object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                let node = object["spec"]["nodeName"]
                    .as_str()
                    .ok_or_else(|| Error::Cluster(format!("Pod {name} has no spec.nodeName")))?
                    .to_string();
                let tcp_ports = object["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                    .filter(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")
                    .filter_map(|p| p["containerPort"].as_u64())
                    .filter_map(|p| u16::try_from(p).ok())
                    .collect();
                summary.pods.push(PodSummary {
                    namespace,
                    name: name.to_string(),
                    node,
                    labels: labels(&object),
                    tcp_ports,
                });
            }
            _ => {}
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_objects_read_back_as_the_same_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterDir::new(dir.path());
        cluster
            .write(
                "cluster",
                &[
                    node_object("n1", "10.244.7.0/24"),
                    namespace_object("demo", &[("team", "a")]),
                    pod_object("n1", "demo", "web", &[("app", "web")], &[80, 8080]),
                ],
            )
            .unwrap();
        let text = fs::read_to_string(dir.path().join("cluster.yaml")).unwrap();
        let summary = summarize(&text).unwrap();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            summary,
            ClusterSummary {
                namespaces: vec![(
                    "demo".into(),
                    vec![
                        pair("kubernetes.io/metadata.name", "demo"),
                        pair("team", "a")
                    ]
                )],
                pods: vec![PodSummary {
                    namespace: "demo".into(),
                    name: "web".into(),
                    node: "n1".into(),
                    labels: vec![pair("app", "web")],
                    tcp_ports: vec![80, 8080],
                }],
            }
        );
        // Only the final file is left, never the partial one.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["cluster.yaml"]);
    }

    #[test]
    fn removing_a_file_takes_its_objects_and_a_missing_file_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterDir::new(dir.path());
        cluster.write("ns", &[namespace_object("x", &[])]).unwrap();
        cluster.remove("ns").unwrap();
        assert!(!dir.path().join("ns.yaml").exists());
        cluster.remove("ns").unwrap();
    }

    #[test]
    fn a_pod_without_a_node_is_rejected() {
        let mut pod = pod_object("n1", "x", "p", &[], &[]);
        pod["spec"]["nodeName"] = Value::Null;
        let yaml = serde_yaml::to_string(&pod).unwrap();
        assert!(summarize(&yaml).is_err());
    }
}
