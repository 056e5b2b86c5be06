//! Health check node ports (`spec.healthCheckNodePort`), served as kube-proxy serves them, so
//! that a cloud load balancer in front of a LoadBalancer Service with `externalTrafficPolicy:
//! Local` sends only to nodes that have a ready endpoint of it (the others drop such traffic).
//!
//! On every node, `GET` (any path) on the Service's health check port answers
//!
//! ```text
//! 200 {"service":{"namespace":"demo","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}
//! ```
//!
//! with the number of the Service's ready endpoints on this node, or `503` when there are none
//! or the agent has not synced the cluster state yet. Only with `--kube-proxy-replacement`
//! (otherwise kube-proxy serves them). The owner publishes the wanted state after each sync
//! ([`compute`]); [`run`] opens and closes one small HTTP server per port to match it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use myelin_cluster::{
    ClusterIndex,
    service::{ServiceType, TrafficPolicy},
};
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::http::{ServerLimits, serve};

/// One health check port: the Service it answers for and its ready endpoints on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// What the health check ports should answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChecks {
    /// The agent has synced the cluster state: before that, every port answers 503.
    pub synced: bool,
    pub ports: BTreeMap<u16, HealthCheck>,
    /// Ports two Services claim: the first (by namespace and name) keeps it; the others, as
    /// `namespace/name`, with the port.
    pub contested: Vec<(String, u16)>,
}

/// The health check ports of the LoadBalancer Services with `externalTrafficPolicy: Local`,
/// each with its ready endpoints on `node_name`.
pub fn compute(index: &ClusterIndex, node_name: &str, synced: bool) -> HealthChecks {
    let mut checks = HealthChecks {
        synced,
        ..Default::default()
    };
    for s in index.services() {
        let Some(port) = s.health_check_node_port else {
            continue;
        };
        if s.type_ != ServiceType::LoadBalancer || s.external_traffic_policy != TrafficPolicy::Local
        {
            continue;
        }
        if checks.ports.contains_key(&port) {
            checks
                .contested
                .push((format!("{}/{}", s.namespace, s.name), port));
            continue;
        }
        let local: BTreeSet<Ipv4Addr> = index
            .endpoint_slices_of(&s.namespace, &s.name)
            .flat_map(|slice| slice.endpoints.iter())
            .filter(|e| e.conditions.ready && e.node_name.as_deref() == Some(node_name))
            .map(|e| e.address)
            .collect();
        checks.ports.insert(
            port,
            HealthCheck {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                local_endpoints: local.len(),
            },
        );
    }
    checks
}

/// The body kube-proxy answers with (`pkg/proxy/healthcheck`), field for field.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    service: ServiceName,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName {
    namespace: String,
    name: String,
}

/// A health check server's bounds: load balancers ask once every few seconds.
fn limits() -> ServerLimits {
    ServerLimits {
        max_connections: 32,
        header_timeout: Duration::from_secs(5),
        max_header_bytes: 8 * 1024,
    }
}

/// Keeps one server per wanted port until `wanted` closes. A port that cannot be bound (in
/// use) is logged once and tried again at the next change.
pub async fn run(mut wanted: watch::Receiver<Arc<HealthChecks>>) {
    let mut servers: BTreeMap<u16, (String, JoinHandle<()>)> = BTreeMap::new();
    let mut reported: BTreeSet<(u16, String)> = BTreeSet::new();
    loop {
        let checks = Arc::clone(&wanted.borrow_and_update());
        for (service, port) in &checks.contested {
            if reported.insert((*port, format!("contested by {service}"))) {
                warn!(
                    port,
                    "healthCheckNodePort {port} of Service {service} is another Service's: not served for it"
                );
            }
        }
        servers.retain(|port, (service, task)| {
            let keep = checks
                .ports
                .get(port)
                .is_some_and(|c| *service == format!("{}/{}", c.namespace, c.name));
            if !keep {
                task.abort();
                info!(port, "health check node port of Service {service} closed");
            }
            keep
        });
        for (port, check) in &checks.ports {
            if servers.contains_key(port) {
                continue;
            }
            let service = format!("{}/{}", check.namespace, check.name);
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(
                        port,
                        "serving the health check node port of Service {service}"
                    );
                    let app = Router::new()
                        .fallback(answer)
                        .with_state((*port, wanted.clone()));
                    let task = tokio::spawn(serve(listener, limits(), move |_| app.clone()));
                    servers.insert(*port, (service, task));
                }
                Err(e) => {
                    if reported.insert((*port, e.to_string())) {
                        warn!(
                            port,
                            "cannot serve the health check node port {port} of Service {service}: {e}"
                        );
                    }
                }
            }
        }
        if wanted.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in servers {
        task.abort();
    }
}

async fn answer(
    State((port, wanted)): State<(u16, watch::Receiver<Arc<HealthChecks>>)>,
) -> Response {
    let checks = Arc::clone(&wanted.borrow());
    let Some(check) = checks.ports.get(&port) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no such health check\n").into_response();
    };
    let healthy = checks.synced;
    let status = if healthy && check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (
        status,
        Json(Answer {
            service: ServiceName {
                namespace: check.namespace.clone(),
                name: check.name.clone(),
            },
            local_endpoints: check.local_endpoints,
            service_proxy_healthy: healthy,
        }),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("x-load-balancing-endpoint-weight"),
        HeaderValue::from(check.local_endpoints),
    );
    response
}

#[cfg(test)]
mod tests {
    use myelin_cluster::{
        Change, Object, ServiceInfo,
        builders::{endpoint_slice, service},
        service::EndpointSliceInfo,
    };

    use super::*;

    fn index(objects: &[(&str, &str)], slices: &[&str]) -> ClusterIndex {
        let mut index = ClusterIndex::default();
        for (name, spec) in objects {
            let info = ServiceInfo::from_k8s(&service("demo", name, spec)).unwrap();
            index.apply(Change::Apply(Object::Service(info)));
        }
        for (i, yaml) in slices.iter().enumerate() {
            let slice = endpoint_slice("demo", &format!("web-{i}"), Some("web"), yaml);
            let info = EndpointSliceInfo::from_k8s(&slice).unwrap();
            index.apply(Change::Apply(Object::EndpointSlice(info)));
        }
        index
    }

    const LOCAL_LB: &str = "spec: {type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, healthCheckNodePort: 32100, ports: [{port: 80, nodePort: 30080}]}";

    #[test]
    fn a_port_counts_the_ready_endpoints_on_this_node_only() {
        let index = index(
            &[("web", LOCAL_LB)],
            &[
                "addressType: IPv4\nendpoints: [{addresses: [10.244.0.5], nodeName: node-a}, {addresses: [10.244.0.6], nodeName: node-a, conditions: {ready: false}}, {addresses: [10.244.1.5], nodeName: node-b}]\nports: [{port: 8080}]",
                "addressType: IPv4\nendpoints: [{addresses: [10.244.0.7], nodeName: node-a}, {addresses: [10.244.0.5], nodeName: node-a}]\nports: [{port: 8080}]",
            ],
        );
        let a = compute(&index, "node-a", true);
        assert_eq!(
            a.ports[&32100].local_endpoints, 2,
            "10.244.0.5 (twice) and .7"
        );
        assert_eq!(a.ports[&32100].name, "web");
        assert_eq!(
            compute(&index, "node-b", true).ports[&32100].local_endpoints,
            1
        );
        assert_eq!(
            compute(&index, "node-c", true).ports[&32100].local_endpoints,
            0
        );
    }

    #[test]
    fn only_local_load_balancers_get_a_port_and_a_port_has_one_service() {
        let cluster = "spec: {type: LoadBalancer, clusterIP: 10.96.0.11, healthCheckNodePort: 32101, ports: [{port: 80, nodePort: 30081}]}";
        let node_port = "spec: {type: NodePort, clusterIP: 10.96.0.12, externalTrafficPolicy: Local, healthCheckNodePort: 32102, ports: [{port: 80, nodePort: 30082}]}";
        let twin = "spec: {type: LoadBalancer, clusterIP: 10.96.0.13, externalTrafficPolicy: Local, healthCheckNodePort: 32100, ports: [{port: 80, nodePort: 30083}]}";
        let index = index(
            &[
                ("web", LOCAL_LB),
                ("cluster", cluster),
                ("np", node_port),
                ("zz-twin", twin),
            ],
            &[],
        );
        let checks = compute(&index, "node-a", false);
        assert_eq!(checks.ports.keys().copied().collect::<Vec<_>>(), [32100]);
        assert_eq!(checks.ports[&32100].name, "web");
        assert_eq!(checks.contested, [("demo/zz-twin".to_string(), 32100)]);
        assert!(!checks.synced);
    }
}
