//! A [`Node`] whose agent watches the test API server (`--source kubernetes --kubeconfig`). The
//! server listens inside the node's network namespace, where the agent reaches it on
//! 127.0.0.1, and nowhere else.

use std::{
    fmt,
    net::TcpListener,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use myelin_api::{Client, Status};

use super::{ApiServer, Resource, generated_cluster};
use crate::{
    Error, Node, NodeSpec, Pod, Result, RunPrefix,
    cluster::{namespace_object, node_object, pod_object},
    node::AgentSource,
    traffic::Host as _,
};

/// How long one label change may take to reach the agent before the measurement fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two reads of the probe's endpoint while waiting for a change: the resolution
/// of the latency figures, and light enough on the agent's lock not to slow it down.
const POLL_INTERVAL: Duration = Duration::from_micros(250);

/// A node with the test API server inside it and an agent watching that server. Dropping it
/// stops the agent, then the server, then removes the node.
pub struct KubernetesNode {
    server: ApiServer,
    node: Node,
}

impl KubernetesNode {
    /// The node (namespace, dirs), and the API server inside it holding this node's Node
    /// object; the agent is not started, so that a test can fill the server first.
    pub fn create(run: &RunPrefix, spec: NodeSpec) -> Result<Self> {
        let node = Node::create(run, spec.source(AgentSource::Kubernetes))?;
        let listener = node
            .netns()
            .run(|| TcpListener::bind("127.0.0.1:0"))?
            .map_err(Error::io("binding the test API server inside the node"))?;
        let server = ApiServer::serve(listener)?;
        server.apply(node_object(node.name(), node.pod_cidr()))?;
        server.write_kubeconfig(&node.kubeconfig())?;
        Ok(Self { server, node })
    }

    /// [`create`](Self::create), then the agent, ready.
    pub fn start(run: &RunPrefix, spec: NodeSpec) -> Result<Self> {
        let mut this = Self::create(run, spec)?;
        this.start_agent()?;
        Ok(this)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }

    /// The agent's pid while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.node.agent_pid()
    }

    pub fn server(&self) -> &ApiServer {
        &self.server
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.node.kubeconfig()
    }

    /// The API server goes down: connections refused, open watches cut.
    pub fn stop_server(&mut self) {
        self.server.stop();
    }

    /// The API server comes back on its address inside the node.
    pub fn restart_server(&mut self) -> Result<()> {
        let addr = self.server.addr();
        let listener = self
            .node
            .netns()
            .run(|| TcpListener::bind(addr))?
            .map_err(Error::io(format!("binding {addr} inside the node again")))?;
        self.server.resume(listener)
    }

    /// Starts the agent and waits until it is ready.
    pub fn start_agent(&mut self) -> Result<()> {
        self.node.start_agent()
    }

    /// Starts the agent and waits until its API answers, synced or not; returns its status.
    pub fn start_agent_serving(&mut self) -> Result<Status> {
        self.node.start_agent_serving()
    }

    /// Waits until a running agent reports `ready`.
    pub fn wait_until_ready(&mut self, timeout: Duration) -> Result<Status> {
        self.node.wait_until_ready(timeout)
    }

    /// SIGTERM, then SIGKILL after a grace period, as a DaemonSet rollout does.
    pub fn stop_agent(&mut self) -> Result<()> {
        self.node.stop_agent()
    }

    /// The agent's resident and peak resident memory (`VmRSS`, `VmHWM`), in KiB.
    pub fn agent_memory_kib(&self) -> Result<(u64, u64)> {
        self.node.agent_memory_kib()
    }
}

impl Drop for KubernetesNode {
    /// The agent goes before the server, so that it never logs the server's disappearance.
    fn drop(&mut self) {
        if let Err(e) = self.node.stop_agent() {
            eprintln!("cleanup of node {}: {e}", self.node.name());
        }
    }
}

/// What [`measure_watch_latency_and_memory`] found.
#[derive(Debug, Clone)]
pub struct WatchFigures {
    pub pods: usize,
    pub namespaces: usize,
    /// From the agent's start to `ready` (the whole cluster listed and in the maps).
    pub initial_sync: Duration,
    pub label_changes: usize,
    /// From the API server storing a label change to the agent serving the new identity
    /// (which it writes to the endpoint map before answering).
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Agent `VmRSS` once synced, after the label changes, and its peak (`VmHWM`), in KiB.
    pub rss_synced_kib: u64,
    pub rss_after_changes_kib: u64,
    pub rss_peak_kib: u64,
}

impl fmt::Display for WatchFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pods in {} namespaces: initial sync {:?}; API event -> endpoint map over {} \
             label changes: p50 {:?}, p99 {:?}, max {:?}; agent RSS {} KiB synced, {} KiB \
             after the changes, peak {} KiB",
            self.pods,
            self.namespaces,
            self.initial_sync,
            self.label_changes,
            self.p50,
            self.p99,
            self.max,
            self.rss_synced_kib,
            self.rss_after_changes_kib,
            self.rss_peak_kib
        )
    }
}

/// Runs a node whose agent watches the test API server holding `pods` generated pods in
/// `namespaces` namespaces, adds one local pod through the CNI plugin, then changes that pod's
/// labels `label_changes` times through the server, timing each change from the server's write
/// to the agent serving the pod's new identity, and reads the agent's memory.
///
/// The agent's API is polled rather than the pinned map (a `bpftool` run takes milliseconds):
/// the agent writes the map before it lets go of the state the API reads, and the map is
/// checked against the API at the end.
pub fn measure_watch_latency_and_memory(
    run: &RunPrefix,
    pods: usize,
    namespaces: usize,
    label_changes: usize,
) -> Result<WatchFigures> {
    const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
    let mut knode = KubernetesNode::create(run, NodeSpec::new("bench"))?;
    knode
        .server()
        .store_all(generated_cluster(pods, namespaces))?;
    knode.server().apply(namespace_object("bench", &[]))?;
    let labels = |rev: &'static str| [("app", "probe"), ("rev", rev)];
    knode.server().apply(pod_object(
        knode.node().name(),
        "bench",
        "probe",
        &labels("initial"),
        &[],
    ))?;

    let started = Instant::now();
    knode.node_mut().spawn_agent()?;
    knode.wait_until_ready(SYNC_TIMEOUT)?;
    let initial_sync = started.elapsed();
    let (rss_synced_kib, _) = knode.agent_memory_kib()?;

    let probe = knode.node().add_pod("bench", "probe")?;
    let client = knode.node().client();
    let identity = |client: &Client| -> Result<u32> {
        client
            .endpoint(&probe.attachment())
            .map_err(|source| Error::Api {
                context: "reading the probe's endpoint".into(),
                source,
            })?
            .map(|e| e.identity)
            .ok_or_else(|| Error::Cluster("the probe's endpoint vanished".into()))
    };
    let mut current = identity(&client)?;
    let mut samples = Vec::with_capacity(label_changes);
    for i in 0..label_changes {
        // Alternating between two label sets: every change is a new identity.
        let rev = if i % 2 == 0 { "a" } else { "b" };
        let written = Instant::now();
        knode
            .server()
            .set_labels(Resource::Pod, "bench", "probe", &labels(rev))?;
        loop {
            let seen = identity(&client)?;
            if seen != current {
                samples.push(written.elapsed());
                current = seen;
                break;
            }
            if written.elapsed() > CHANGE_TIMEOUT {
                return Err(Error::Cluster(format!(
                    "label change {i} did not reach the agent within {CHANGE_TIMEOUT:?}"
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
    let in_map = endpoint_map_identity(knode.node(), &probe)?;
    if in_map != Some(current) {
        return Err(Error::Cluster(format!(
            "the endpoint map holds identity {in_map:?} for the probe, the agent says {current}"
        )));
    }
    let (rss_after_changes_kib, rss_peak_kib) = knode.agent_memory_kib()?;
    knode.node().delete_pod(probe)?;

    samples.sort();
    let at = |q: f64| {
        let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1));
        samples.get(rank - 1).copied().unwrap_or_default()
    };
    Ok(WatchFigures {
        pods,
        namespaces,
        initial_sync,
        label_changes,
        p50: at(0.50),
        p99: at(0.99),
        max: samples.last().copied().unwrap_or_default(),
        rss_synced_kib,
        rss_after_changes_kib,
        rss_peak_kib,
    })
}

/// The identity the pinned endpoint map holds for `pod`'s address (`None`: no entry).
pub fn endpoint_map_identity(node: &Node, pod: &Pod) -> Result<Option<u32>> {
    let octets: Vec<serde_json::Value> = pod.ip().octets().iter().map(|o| (*o).into()).collect();
    Ok(node
        .dump_map("endpoints")?
        .iter()
        // bpftool puts the BTF-decoded entry under "formatted" when it also prints raw bytes.
        .map(|e| e.get("formatted").unwrap_or(e))
        .find(|e| e["key"]["addr"].as_array() == Some(&octets))
        .and_then(|e| e["value"]["identity"].as_u64())
        .and_then(|identity| u32::try_from(identity).ok()))
}
