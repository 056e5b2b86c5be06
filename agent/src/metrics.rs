//! `/healthz`, `/readyz` and Prometheus `/metrics` on `--metrics-addr`.
//!
//! Counters the agent increments itself (watch events, reconcile durations) live in
//! [`Metrics`]; values that already exist elsewhere (endpoint count, drop counters in the BPF
//! map, map fill) are asked of the agent's owner at scrape time, so they are never double-booked.
//! A scrape never hangs on a busy owner: after a short wait it serves the last values it got.

use std::{
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            watch_events: Family::default(),
            // 50 µs .. ~1.6 s
            reconcile_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
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
    source: SnapshotSource,
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
    let last = Arc::new(Mutex::new(Snapshot::default()));
    registry.register_collector(Box::new(SnapshotCollector(Arc::clone(&last))));
    let exporter = Arc::new(Exporter {
        registry,
        last,
        source,
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
    if (e.source.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: cluster state not synced yet\n",
        )
    }
}

async fn scrape(State(e): State<Arc<Exporter>>) -> impl IntoResponse {
    match (e.source.snapshot)().await {
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
