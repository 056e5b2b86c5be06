//! `/healthz`, `/readyz` and Prometheus `/metrics` on `--metrics-addr`.
//!
//! Counters the agent increments itself (watch events, reconcile durations) live in
//! [`Metrics`]; values that already exist elsewhere (endpoint count, drop counters in the BPF
//! map, map fill) are asked of the agent's owner at scrape time, so they are never double-booked.
//! A scrape never hangs on a busy owner: after a short wait it serves the last values it got.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::future::BoxFuture;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tracing::{info, warn};

/// Values read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub ready: bool,
    pub endpoints: usize,
    pub identities: usize,
    pub free_addresses: u64,
    pub pods_indexed: usize,
    /// NetworkPolicies whose latest version is rejected (each fails closed).
    pub policies_rejected: usize,
    /// Services translated in eBPF (`--kube-proxy-replacement`).
    pub services: usize,
    /// Their frontends that have no backend (their connections are refused).
    pub frontends_without_backend: usize,
    /// Their frontends that do not fit in `lb_services`.
    pub frontends_unwritten: usize,
    /// Frontends whose Maglev tables do not fit in `lb_maglev`.
    pub maglev_unwritten: usize,
    /// The socket programs are attached (`--cgroup-root`).
    pub socket_lb: bool,
    /// (reason, packets, bytes)
    pub drops: Vec<(&'static str, u64, u64)>,
    /// (map, entries, capacity)
    pub maps: Vec<(&'static str, usize, u32)>,
}

/// Where a scrape gets its values, and whether the agent is ready.
pub struct SnapshotSource {
    pub snapshot: Box<dyn Fn() -> BoxFuture<'static, Option<Snapshot>> + Send + Sync>,
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// The events the datapath could not report (read from its `event_budget` map).
    pub events_lost: Box<dyn Fn() -> myelin_api::EventsLost + Send + Sync>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// What the agent counts itself.
#[derive(Clone)]
pub struct Metrics {
    pub watch_events: Family<KindLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub flows: FlowMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            watch_events: Family::default(),
            // 50 µs .. ~1.6 s
            reconcile_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            flows: FlowMetrics::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub verdict: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

/// Namespaces, and policies, counted under their own name: beyond that many, under `other`,
/// so that the number of series stays bounded whatever the cluster holds.
pub const MAX_LABELED: usize = 100;

/// The label value for the bucket that takes what does not get a series of its own.
pub const OTHER: &str = "other";

/// A bounded set of label values: the first [`MAX_LABELED`] seen get their own.
#[derive(Debug, Default)]
struct BoundedLabels(HashSet<String>);

impl BoundedLabels {
    fn label(&mut self, value: &str) -> String {
        if self.0.contains(value) {
            return value.to_string();
        }
        if self.0.len() < MAX_LABELED {
            self.0.insert(value.to_string());
            return value.to_string();
        }
        OTHER.to_string()
    }
}

/// Counts of the events the datapath reported (so, under load, of those within
/// `--flow-events-rate`; `myelin_flow_events_lost_total` says how many were not).
#[derive(Clone)]
pub struct FlowMetrics {
    /// By verdict (`allowed`, `drop`) and direction.
    pub flows: Family<FlowLabels, Counter>,
    /// By the namespace of the pod whose policy the event concerns (the source's for egress,
    /// the destination's for ingress; `none` when it is not a pod).
    pub by_namespace: Family<NamespaceLabels, Counter>,
    /// Policy drops, once per policy that isolates the end that dropped them.
    pub policy_drops: Family<PolicyLabels, Counter>,
    namespaces: Arc<Mutex<BoundedLabels>>,
    policies: Arc<Mutex<BoundedLabels>>,
}

impl Default for FlowMetrics {
    /// Every verdict and direction, and the `other` buckets, start at 0: the series exist
    /// before the first event, so that rates and dashboards show 0 rather than nothing.
    fn default() -> Self {
        let m = Self {
            flows: Family::default(),
            by_namespace: Family::default(),
            policy_drops: Family::default(),
            namespaces: Arc::default(),
            policies: Arc::default(),
        };
        for verdict in ["allowed", "drop"] {
            for direction in ["ingress", "egress"] {
                let _ = m.flows.get_or_create(&FlowLabels { verdict, direction });
            }
            let _ = m.by_namespace.get_or_create(&NamespaceLabels {
                namespace: OTHER.to_string(),
                verdict,
            });
        }
        let _ = m.policy_drops.get_or_create(&PolicyLabels {
            policy: OTHER.to_string(),
        });
        m
    }
}

impl FlowMetrics {
    pub fn count(&self, e: &myelin_api::FlowEvent) {
        let verdict = if e.kind == "drop" { "drop" } else { "allowed" };
        let ingress = e.direction == "ingress";
        self.flows
            .get_or_create(&FlowLabels {
                verdict,
                direction: if ingress { "ingress" } else { "egress" },
            })
            .inc();
        let pod = if ingress { &e.dst_pod } else { &e.src_pod };
        let namespace = match pod {
            Some(p) => self
                .namespaces
                .lock()
                .map_or_else(|_| OTHER.to_string(), |mut n| n.label(&p.namespace)),
            None => "none".to_string(),
        };
        self.by_namespace
            .get_or_create(&NamespaceLabels { namespace, verdict })
            .inc();
        let denied = [&e.egress, &e.ingress]
            .into_iter()
            .flatten()
            .find_map(|c| match c {
                myelin_api::PolicyCheck::Denied { isolated_by } => Some(isolated_by),
                _ => None,
            });
        for policy in denied.into_iter().flatten() {
            let policy = self
                .policies
                .lock()
                .map_or_else(|_| OTHER.to_string(), |mut p| p.label(&policy.to_string()));
            self.policy_drops
                .get_or_create(&PolicyLabels { policy })
                .inc();
        }
    }
}

/// The events the datapath could not report, read at scrape time.
struct EventsLostCollector(Arc<dyn Fn() -> myelin_api::EventsLost + Send + Sync>);

impl std::fmt::Debug for EventsLostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventsLostCollector")
    }
}

impl Collector for EventsLostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lost = (self.0)();
        let mut family = encoder.encode_descriptor(
            "myelin_flow_events_lost",
            "Datapath events not reported: rate-limited (beyond --flow-events-rate) or \
             ring-full (the agent read too slowly)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (cause, n) in [
            ("rate-limited", lost.rate_limited),
            ("ring-full", lost.ring_full),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("cause", cause)])?)?;
        }
        Ok(())
    }
}

/// The values of the last scrape; the collector encodes them.
struct SnapshotCollector(Arc<Mutex<Snapshot>>);

impl std::fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().map(|s| s.clone()).unwrap_or_default();
        for (name, help, value) in [
            (
                "myelin_ready",
                "1 once the first sync of every source is in the maps",
                i64::from(s.ready),
            ),
            (
                "myelin_endpoints",
                "Local endpoints (pod interfaces)",
                s.endpoints as i64,
            ),
            (
                "myelin_identities",
                "Distinct security identities in the index",
                s.identities as i64,
            ),
            (
                "myelin_ipam_free_addresses",
                "Addresses still free in the pod CIDR",
                s.free_addresses as i64,
            ),
            (
                "myelin_index_pods",
                "Pods in the cluster index",
                s.pods_indexed as i64,
            ),
            (
                "myelin_policies_rejected",
                "NetworkPolicies whose latest version is rejected: each keeps its last good \
                 version in force, or isolates the pods it selects",
                s.policies_rejected as i64,
            ),
            (
                "myelin_services",
                "Services translated in eBPF (--kube-proxy-replacement; 0 without it)",
                s.services as i64,
            ),
            (
                "myelin_service_frontends_without_backend",
                "Frontends of translated Services with no usable endpoint: their connections \
                 are refused (myelinctl services names them)",
                s.frontends_without_backend as i64,
            ),
            (
                "myelin_service_frontends_unwritten",
                "Frontends of Services that do not fit in the lb_services map (--max-lb-slots): \
                 not translated, or still with their earlier backends",
                s.frontends_unwritten as i64,
            ),
            (
                "myelin_service_maglev_tables_unwritten",
                "Frontends reached from outside whose Maglev lookup tables do not fit in the \
                 lb_maglev map (--max-lb-maglev): they choose their backends at random",
                s.maglev_unwritten as i64,
            ),
            (
                "myelin_socket_lb_attached",
                "1 when the socket-level load balancing programs are attached (--cgroup-root; \
                 myelinctl status says where), else 0",
                i64::from(s.socket_lb),
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let mut packets = encoder.encode_descriptor(
            "myelin_drops",
            "Packets dropped by the datapath, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, p, _) in &s.drops {
            ConstCounter::new(*p).encode(packets.encode_family(&[("reason", *reason)])?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "myelin_dropped_bytes",
            "Bytes dropped by the datapath, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, _, b) in &s.drops {
            ConstCounter::new(*b).encode(bytes.encode_family(&[("reason", *reason)])?)?;
        }
        for (name, help, pick) in [
            ("myelin_map_entries", "Entries in each BPF map", 0usize),
            (
                "myelin_map_capacity",
                "Capacity (max_entries) of each BPF map",
                1,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, entries, capacity) in &s.maps {
                let v = if pick == 0 {
                    *entries as i64
                } else {
                    i64::from(*capacity)
                };
                ConstGauge::new(v).encode(family.encode_family(&[("map", *map)])?)?;
            }
        }
        Ok(())
    }
}

struct Exporter {
    registry: Registry,
    last: Arc<Mutex<Snapshot>>,
    snapshot: Box<dyn Fn() -> BoxFuture<'static, Option<Snapshot>> + Send + Sync>,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
}

/// Serves health and metrics until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    source: SnapshotSource,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register(
        "myelin_watch_events",
        "Cluster-state events received, by kind",
        metrics.watch_events.clone(),
    );
    registry.register(
        "myelin_reconcile_duration_seconds",
        "Time to bring the BPF maps in line with a change",
        metrics.reconcile_seconds.clone(),
    );
    registry.register(
        "myelin_flows",
        "Flows the datapath reported: new connections allowed and packets dropped, by verdict \
         and direction",
        metrics.flows.flows.clone(),
    );
    registry.register(
        "myelin_namespace_flows",
        "Flows the datapath reported, by the namespace of the pod whose policy they concern \
         (at most 100 namespaces, the rest as other) and verdict",
        metrics.flows.by_namespace.clone(),
    );
    registry.register(
        "myelin_policy_drops",
        "Packets dropped by policy, by each policy isolating the pod that dropped them (at \
         most 100 policies, the rest as other)",
        metrics.flows.policy_drops.clone(),
    );
    let last = Arc::new(Mutex::new(Snapshot::default()));
    registry.register_collector(Box::new(SnapshotCollector(Arc::clone(&last))));
    registry.register_collector(Box::new(EventsLostCollector(Arc::from(source.events_lost))));
    let exporter = Arc::new(Exporter {
        registry,
        last,
        snapshot: source.snapshot,
        ready: source.ready,
    });

    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state(exporter);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /healthz, /readyz and /metrics");
    crate::http::serve(listener, crate::http::ServerLimits::default(), move |_| {
        app.clone()
    })
    .await;
    Ok(())
}

async fn readyz(State(e): State<Arc<Exporter>>) -> impl IntoResponse {
    if (e.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: cluster state not synced yet\n",
        )
    }
}

async fn scrape(State(e): State<Arc<Exporter>>) -> impl IntoResponse {
    match (e.snapshot)().await {
        Some(fresh) => {
            if let Ok(mut last) = e.last.lock() {
                *last = fresh;
            }
        }
        None => warn!("the agent did not answer in time; serving the last values"),
    }
    let mut body = String::new();
    let result = prometheus_client::encoding::text::encode(&mut body, &e.registry);
    match result {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => {
            warn!("encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "text/plain")],
                String::new(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_frontends_without_backend_are_gauges() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SnapshotCollector(Arc::new(Mutex::new(
            Snapshot {
                services: 3,
                frontends_without_backend: 1,
                frontends_unwritten: 2,
                maglev_unwritten: 1,
                socket_lb: true,
                ..Snapshot::default()
            },
        )))));
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        for line in [
            "myelin_services 3",
            "myelin_service_frontends_without_backend 1",
            "myelin_service_frontends_unwritten 2",
            "myelin_service_maglev_tables_unwritten 1",
            "myelin_socket_lb_attached 1",
        ] {
            assert!(body.lines().any(|l| l == line), "{line}: {body}");
        }
    }

    #[test]
    fn namespaces_and_policies_beyond_the_cap_are_counted_as_other() {
        let m = FlowMetrics::default();
        let event = |ns: &str, policy: &str| myelin_api::FlowEvent {
            time: String::new(),
            node: "n".into(),
            kind: "drop".into(),
            reason: Some("policy-denied-ingress".into()),
            direction: "ingress".into(),
            point: "from-pod".into(),
            protocol: "tcp".into(),
            src: "10.0.0.1:1".into(),
            dst: "10.0.0.2:80".into(),
            src_name: "world".into(),
            dst_name: format!("{ns}/db"),
            src_pod: None,
            dst_pod: Some(myelin_api::PodRef {
                namespace: ns.into(),
                name: "db".into(),
            }),
            src_endpoint: 0,
            dst_endpoint: 1,
            src_identity: 2,
            dst_identity: 300,
            egress: None,
            ingress: Some(myelin_api::PolicyCheck::Denied {
                isolated_by: vec![myelin_api::PolicyName {
                    namespace: ns.into(),
                    name: policy.into(),
                }],
            }),
            service: None,
        };
        for i in 0..MAX_LABELED + 5 {
            m.count(&event(&format!("ns{i}"), "deny"));
        }
        m.count(&event("ns0", "deny"));
        let mut registry = Registry::default();
        registry.register("myelin_namespace_flows", "", m.by_namespace.clone());
        registry.register("myelin_policy_drops", "", m.policy_drops.clone());
        registry.register("myelin_flows", "", m.flows.clone());
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        let series = |prefix: &str| body.lines().filter(|l| l.starts_with(prefix)).count();
        // Each namespace seen, and `other` for both verdicts.
        assert_eq!(
            series("myelin_namespace_flows_total{"),
            MAX_LABELED + 2,
            "{body}"
        );
        assert_eq!(
            series("myelin_policy_drops_total{"),
            MAX_LABELED + 1,
            "{body}"
        );
        for line in [
            r#"myelin_namespace_flows_total{namespace="other",verdict="drop"} 5"#,
            r#"myelin_namespace_flows_total{namespace="ns0",verdict="drop"} 2"#,
            r#"myelin_policy_drops_total{policy="other"} 5"#,
            r#"myelin_flows_total{verdict="drop",direction="ingress"} 106"#,
        ] {
            assert!(body.lines().any(|l| l == line), "{line}: {body}");
        }
    }

    #[test]
    fn rejected_policies_are_a_gauge() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SnapshotCollector(Arc::new(Mutex::new(
            Snapshot {
                policies_rejected: 2,
                ..Snapshot::default()
            },
        )))));
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        assert!(
            body.lines().any(|l| l == "myelin_policies_rejected 2"),
            "{body}"
        );
    }
}
