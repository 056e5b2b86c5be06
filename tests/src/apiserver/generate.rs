//! Bulk cluster state for scale tests: objects shaped like a real cluster's (owner references,
//! managed fields, status conditions), so that what the agent parses and then drops is as large
//! as it would be against a real API server.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::cluster::{namespace_object, node_object, pod_object};

/// Pods per generated node, Kubernetes' default kubelet limit.
const PODS_PER_NODE: usize = 110;

/// `pods` pods spread round-robin over `namespaces` namespaces (`gen-ns-<i>`), scheduled on
/// remote nodes (`gen-node-<i>`, each with a /24 of 10.128.0.0/10 as its pod CIDR), with the
/// namespaces and nodes they need. Label values repeat, as in real deployments, so many pods
/// share an identity. Namespaces, then nodes, then pods.
pub fn generated_cluster(pods: usize, namespaces: usize) -> Vec<Value> {
    let namespaces = namespaces.max(1);
    let nodes = pods.div_ceil(PODS_PER_NODE);
    let mut objects = Vec::with_capacity(namespaces + nodes + pods);
    for i in 0..namespaces {
        objects.push(namespace_object(
            &format!("gen-ns-{i}"),
            &[("team", &format!("team-{}", i % 20)), ("env", "bench")],
        ));
    }
    for n in 0..nodes {
        let mut node = node_object(&format!("gen-node-{n}"), &node_cidr(n));
        node["status"] = json!({
            "addresses": [
                { "type": "InternalIP", "address": node_address(n).to_string() },
                { "type": "Hostname", "address": format!("gen-node-{n}") },
            ],
            "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady" }],
        });
        objects.push(node);
    }
    for p in 0..pods {
        objects.push(realistic_pod(
            &format!("gen-ns-{}", p % namespaces),
            &format!("gen-pod-{p}"),
            p,
        ));
    }
    objects
}

/// 10.128.0.0/10 in /24s: room for 16,384 nodes.
fn node_cidr(node: usize) -> String {
    format!("{}/24", node_subnet(node, 0))
}

fn node_subnet(node: usize, host: u8) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    Ipv4Addr::from(base + ((node as u32) << 8) + u32::from(host))
}

/// Nodes' own addresses, outside every pod CIDR.
fn node_address(node: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(172, 31, 0, 0));
    Ipv4Addr::from(base + node as u32 + 1)
}

/// The `p`th generated pod: a Deployment's replica with the fields a real one carries.
fn realistic_pod(namespace: &str, name: &str, p: usize) -> Value {
    let node = p / PODS_PER_NODE;
    let node_name = format!("gen-node-{node}");
    // .2 onwards: .0 is the network, .1 the node's gateway.
    let ip = node_subnet(node, (p % PODS_PER_NODE) as u8 + 2).to_string();
    let app = format!("app-{}", p % 50);
    let mut pod = pod_object(
        &node_name,
        namespace,
        name,
        &[("app", &app), ("pod-template-hash", "5d8f7c9b6")],
        &[8080],
    );
    let metadata = &mut pod["metadata"];
    metadata["generateName"] = Value::from(format!("{app}-5d8f7c9b6-"));
    metadata["creationTimestamp"] = Value::from("2026-01-01T00:00:00Z");
    metadata["annotations"] = json!({
        "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
        "prometheus.io/scrape": "true",
    });
    metadata["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5d8f7c9b6"),
        "uid": "11111111-2222-4333-8444-555555555555", "controller": true,
        "blockOwnerDeletion": true,
    }]);
    metadata["managedFields"] = json!([
        {
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
            "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": { "f:generateName": {}, "f:labels": { ".": {}, "f:app": {},
                    "f:pod-template-hash": {} }, "f:ownerReferences": { ".": {},
                    "k:{\"uid\":\"11111111-2222-4333-8444-555555555555\"}": {} } },
                "f:spec": { "f:containers": { "k:{\"name\":\"app\"}": { ".": {}, "f:image": {},
                    "f:imagePullPolicy": {}, "f:name": {}, "f:ports": { ".": {},
                    "k:{\"containerPort\":8080,\"protocol\":\"TCP\"}": { ".": {},
                    "f:containerPort": {}, "f:protocol": {} } }, "f:resources": { ".": {},
                    "f:limits": { ".": {}, "f:memory": {} }, "f:requests": { ".": {},
                    "f:cpu": {}, "f:memory": {} } } } }, "f:dnsPolicy": {},
                    "f:restartPolicy": {}, "f:schedulerName": {}, "f:securityContext": {},
                    "f:terminationGracePeriodSeconds": {} },
            },
        },
        {
            "manager": "kubelet", "operation": "Update", "apiVersion": "v1",
            "time": "2026-01-01T00:00:05Z", "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": { "f:status": { "f:conditions": {}, "f:containerStatuses": {},
                "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {},
                "f:startTime": {} } },
        },
    ]);
    let spec = &mut pod["spec"];
    spec["restartPolicy"] = Value::from("Always");
    spec["dnsPolicy"] = Value::from("ClusterFirst");
    spec["schedulerName"] = Value::from("default-scheduler");
    spec["serviceAccountName"] = Value::from("default");
    spec["terminationGracePeriodSeconds"] = Value::from(30);
    spec["tolerations"] = json!([
        { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
          "tolerationSeconds": 300 },
        { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
          "tolerationSeconds": 300 },
    ]);
    spec["volumes"] = json!([{ "name": "kube-api-access", "projected": { "sources": [
        { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
        { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } },
    ] } }]);
    let container = &mut spec["containers"][0];
    container["imagePullPolicy"] = Value::from("IfNotPresent");
    container["resources"] = json!({
        "limits": { "memory": "256Mi" }, "requests": { "cpu": "100m", "memory": "128Mi" },
    });
    container["env"] = json!([
        { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
        { "name": "LOG_LEVEL", "value": "info" },
    ]);
    container["volumeMounts"] = json!([{ "name": "kube-api-access", "readOnly": true,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount" }]);
    let conditions: Vec<Value> = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .iter()
    .map(|t| json!({ "type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:04Z" }))
    .collect();
    pod["status"] = json!({
        "phase": "Running",
        "hostIP": node_address(node).to_string(),
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "startTime": "2026-01-01T00:00:01Z",
        "qosClass": "Burstable",
        "conditions": conditions,
        "containerStatuses": [{
            "name": "app", "ready": true, "started": true, "restartCount": 0,
            "image": "docker.io/library/busybox:1.36",
            "imageID": "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "containerID": format!("containerd://{p:064x}"),
            "state": { "running": { "startedAt": "2026-01-01T00:00:03Z" } },
        }],
    });
    pod
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn generates_every_object_with_unique_pod_ips_inside_their_nodes_cidrs() {
        let objects = generated_cluster(250, 7);
        let count = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).count();
        assert_eq!(count("Namespace"), 7);
        assert_eq!(count("Node"), 3);
        assert_eq!(count("Pod"), 250);
        let pods: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Pod").collect();
        let ips: BTreeSet<&str> = pods
            .iter()
            .map(|p| p["status"]["podIP"].as_str().unwrap())
            .collect();
        assert_eq!(ips.len(), 250);
        let last = pods[249];
        assert_eq!(last["spec"]["nodeName"], "gen-node-2");
        assert_eq!(last["status"]["podIP"], "10.128.2.31");
        assert_eq!(last["metadata"]["namespace"], "gen-ns-4");
        // The bulk that a real pod carries and the agent must drop.
        assert!(last.to_string().len() > 3000, "{}", last.to_string().len());
    }
}
