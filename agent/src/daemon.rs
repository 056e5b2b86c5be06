//! The agent process: wires the source, the agent logic, the datapath, the API socket and the
//! metrics endpoint together, and runs until SIGTERM/SIGINT. This is the process edge, so
//! errors are `anyhow` with context.
//!
//! Start order matters: the pod CIDR must be known before IPAM opens; the node device and the
//! datapath must be ready before the API accepts the first CNI ADD; the maps are restored
//! before anything is served, so a restarted agent never answers with stale state.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use myelin_cluster::{Change, ClusterIndex, Kind};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    agent::{Agent, SystemInterfaces},
    api, bpffs,
    config::AgentConfig,
    datapath::Datapath,
    endpoint::EndpointStore,
    events,
    ipam::Ipam,
    metrics::{self, KindLabel, Metrics},
    netconf,
    source::{
        SourceEvent, SourceSpec,
        dir::DirSource,
        kubernetes::{self, KubernetesSource},
    },
};

/// How often expired conntrack entries are removed (the LRU map also evicts when full).
const CONNTRACK_GC_INTERVAL: Duration = Duration::from_secs(30);

/// How often the queue of DELs that found the agent down is looked at again: a DEL that raced
/// the agent's start is queued after the startup pass.
const PENDING_DELETES_INTERVAL: Duration = Duration::from_secs(5);

/// How long to wait for a pod CIDR before saying so again.
const CIDR_WAIT_REPORT: Duration = Duration::from_secs(10);

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let node_name = config.node_name();
    info!(node = node_name, source = ?config.source, "starting myelin-agent {}", env!("CARGO_PKG_VERSION"));
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.state_dir.display()
        )
    })?;

    let (tx, mut rx) = mpsc::channel::<SourceEvent>(64);
    match &config.source {
        SourceSpec::Dir(path) => {
            if !path.is_dir() {
                bail!("--source dir:{}: not a directory", path.display());
            }
            let source = DirSource::new(path.clone());
            tokio::spawn(async move {
                if let Err(e) = source.run(tx).await {
                    error!("directory source stopped: {e}");
                }
            });
        }
        SourceSpec::Kubernetes => {
            let client = kubernetes::client(config.kubeconfig.as_deref())
                .await
                .context("configuring the Kubernetes client")?;
            tokio::spawn(KubernetesSource::new(client).run(tx));
        }
    }

    let metrics = Metrics::default();
    // Initial state: take what the source has until the pod CIDR is known.
    let mut index = ClusterIndex::default();
    let mut synced = false;
    let ipam_path = config.state_dir.join("ipam.json");
    // Kubernetes mode: the Node object is authoritative, but a restarted agent that cannot get
    // it (API server down, or hanging) keeps serving its pods with the CIDR it persisted.
    let fallback_cidr = match config.source {
        SourceSpec::Kubernetes => {
            Ipam::persisted_cidr(&ipam_path).context("reading the persisted pod CIDR")?
        }
        SourceSpec::Dir(_) => None,
    };
    let pod_cidr = loop {
        if let Some(cidr) = pod_cidr(&config, &index, &node_name) {
            break cidr;
        }
        if synced && let SourceSpec::Dir(path) = &config.source {
            bail!(
                "no pod CIDR: pass --pod-cidr or give Node {node_name} a spec.podCIDR in {}",
                path.display()
            );
        }
        let unavailable = match tokio::time::timeout(CIDR_WAIT_REPORT, rx.recv()).await {
            Ok(Some(SourceEvent::Changes(changes))) => {
                for change in changes {
                    count_event(&metrics, &change);
                    index.apply(change);
                }
                false
            }
            Ok(Some(SourceEvent::Synced)) => {
                synced = true;
                false
            }
            Ok(Some(SourceEvent::Unavailable)) => true,
            Ok(None) => bail!("the cluster-state source stopped before the first sync"),
            Err(_) => {
                warn!(node = node_name, "still waiting for the node's pod CIDR");
                true
            }
        };
        if unavailable && let Some(cidr) = fallback_cidr {
            warn!(
                %cidr,
                "cluster state unavailable: serving with the pod CIDR persisted in {}; Node {node_name}'s spec.podCIDR is checked against it once listed",
                ipam_path.display()
            );
            break cidr;
        }
    };
    info!(%pod_cidr, "pod CIDR");

    let ipam = Ipam::open(ipam_path, pod_cidr).context("opening IPAM state")?;
    let endpoints = EndpointStore::open(
        config.state_dir.join("endpoints.json"),
        config.max_endpoints,
    )
    .context("opening endpoint state")?;
    netconf::setup_node(ipam.gateway())
        .await
        .context("setting up the node's network")?;
    bpffs::ensure_mounted(&config.bpffs)?;
    let mut datapath = Datapath::load(&config.bpffs, config.attach_mode, config.limits())
        .context("loading the eBPF datapath")?;
    let (events, _) = tokio::sync::broadcast::channel(events::STREAM_BUFFER);
    if let Some(ring) = datapath.take_events() {
        tokio::spawn(events::read(ring, events.clone()));
    }
    let removed = datapath
        .remove_stale_link_pins(&|ifname| endpoints.iter().any(|r| r.host_ifname == ifname));
    if removed > 0 {
        info!(
            removed,
            "removed link pins of endpoints deleted while the agent was down"
        );
    }

    let mut agent = Agent::new(
        node_name.clone(),
        ipam,
        endpoints,
        index,
        datapath,
        Box::new(SystemInterfaces),
    )
    .with_pending_deletes(myelin_api::pending::dir_for(&config.socket));
    if matches!(config.source, SourceSpec::Kubernetes) {
        agent = agent.expecting_pod_objects();
    }
    agent.restore().context("restoring endpoints")?;
    // Before the API opens: an ADD must not find an endpoint whose pod is already gone.
    let carried_out = agent.process_pending_deletes();
    if carried_out > 0 {
        info!(
            carried_out,
            "carried out the DELs queued while the agent was down"
        );
    }
    if synced {
        agent
            .set_synced()
            .context("writing the maps for the synced cluster state")?;
    }
    let agent = Arc::new(Mutex::new(agent));

    let listener = api::bind(&config.socket)?;
    let api_task = tokio::spawn(api::serve(
        listener,
        api::router(api::ApiState {
            agent: Arc::clone(&agent),
            events,
        }),
    ));
    info!(socket = %config.socket.display(), "API listening");

    let metrics_task = config.metrics_addr.0.map(|addr| {
        let agent = Arc::clone(&agent);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let snapshot = Box::new(move || api_lock(&agent).metrics_snapshot());
            if let Err(e) = metrics::serve(addr, metrics, snapshot).await {
                error!(%addr, "metrics endpoint failed: {e}");
            }
        })
    });

    // The Node's CIDR last reported as differing from the one in use, to say so once.
    let mut reported_cidr = None;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut conntrack_gc = tokio::time::interval(CONNTRACK_GC_INTERVAL);
    let mut pending_deletes = tokio::time::interval(PENDING_DELETES_INTERVAL);
    loop {
        tokio::select! {
            _ = pending_deletes.tick() => {
                api_lock(&agent).process_pending_deletes();
            }
            _ = conntrack_gc.tick() => match api_lock(&agent).gc_conntrack() {
                Ok(0) => {}
                Ok(n) => debug!(removed = n, "conntrack garbage collected"),
                Err(e) => warn!("conntrack garbage collection failed: {e}"),
            },
            event = rx.recv() => match event {
                Some(SourceEvent::Changes(changes)) => {
                    let started = Instant::now();
                    let mut agent = api_lock(&agent);
                    for change in &changes {
                        count_event(&metrics, change);
                    }
                    if let Err(e) = agent.apply_cluster_changes(changes) {
                        error!("updating the datapath after a cluster change failed: {e}");
                    }
                    metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
                    let listed = agent.index().node(&node_name).and_then(|n| n.pod_cidr);
                    drop(agent);
                    report_cidr_mismatch(pod_cidr, listed, &mut reported_cidr);
                }
                Some(SourceEvent::Synced) => match api_lock(&agent).set_synced() {
                    Ok(diff) => info!(written = diff.writes(), "cluster state synced"),
                    Err(e) => error!("writing the maps for the synced cluster state failed: {e}"),
                },

                // The source has logged it and retries; the agent goes on with its last state.
                Some(SourceEvent::Unavailable) => {}
                None => {
                    warn!("the cluster-state source stopped; keeping the last state");
                    // Keep serving: endpoints still work. Wait for a signal only.
                    tokio::select! {
                        _ = sigterm.recv() => {}
                        _ = sigint.recv() => {}
                    }
                    break;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    info!("shutting down; pods keep their datapath (programs and maps stay pinned)");
    api_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

fn api_lock<D>(agent: &Mutex<Agent<D>>) -> std::sync::MutexGuard<'_, Agent<D>> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

fn count_event(metrics: &Metrics, change: &Change) {
    let kind = match change {
        Change::Apply(o) => o.kind(),
        Change::Delete { kind, .. } | Change::Replace { kind, .. } => *kind,
    };
    metrics
        .watch_events
        .get_or_create(&KindLabel {
            kind: Kind::as_str(kind),
        })
        .inc();
}

/// Says when the Node object's pod CIDR differs from the one IPAM serves (the agent started
/// with its persisted CIDR while the API server was down, and the Node changed meanwhile):
/// existing pods keep their addresses; a restart adopts the Node's CIDR once they are gone.
fn report_cidr_mismatch(in_use: Ipv4Net, listed: Option<Ipv4Net>, reported: &mut Option<Ipv4Net>) {
    match listed {
        Some(listed) if listed != in_use && *reported != Some(listed) => {
            error!(
                %in_use, %listed,
                "the Node's spec.podCIDR differs from the pod CIDR in use; restart the agent \
                 once this node's pods are deleted to adopt it"
            );
            *reported = Some(listed);
        }
        _ => {}
    }
}

/// The pod CIDR: `--pod-cidr` (directory source), else the Node object's spec.podCIDR.
fn pod_cidr(config: &AgentConfig, index: &ClusterIndex, node_name: &str) -> Option<Ipv4Net> {
    if let (Some(cidr), SourceSpec::Dir(_)) = (config.pod_cidr, &config.source) {
        return Some(cidr);
    }
    index.node(node_name).and_then(|n| n.pod_cidr)
}
