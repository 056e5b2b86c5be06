//! A [`Node`] whose agent watches the test API server (`--source kubernetes --kubeconfig`). The
//! server listens inside the node's network namespace, where the agent reaches it on
//! 127.0.0.1, and nowhere else.

use std::{
    fmt, fs,
    net::TcpListener,
    path::PathBuf,
    process::Child,
    thread,
    time::{Duration, Instant},
};

use myelin_api::{Client, Status};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{ApiServer, Resource, generated_cluster};
use crate::{
    AGENT_READY_TIMEOUT, Error, Node, NodeSpec, Pod, Result, RunPrefix,
    cluster::{namespace_object, node_object, pod_object},
    node::spawn_agent,
    process::wait_with_deadline,
    traffic::Host as _,
};

/// How long a stopping agent may take to exit on SIGTERM before it is killed.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one label change may take to reach the agent before the measurement fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two reads of the probe's endpoint while waiting for a change: the resolution
/// of the latency figures, and light enough on the agent's lock not to slow it down.
const POLL_INTERVAL: Duration = Duration::from_micros(250);

/// What the agent must reach before a start counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentUp {
    /// `ready`: the first full list of every kind is in the maps.
    Ready,
    /// Its API answers, synced or not (the API server may be down).
    Serving,
}

/// A node with the test API server inside it and an agent watching that server. Dropping it
/// stops the agent, then the server, then removes the node.
pub struct KubernetesNode {
    // Fields drop in this order: the agent is stopped (in `drop`) before the server goes, and
    // both before the node's namespace and dirs.
    agent: Option<Child>,
    server: ApiServer,
    node: Node,
}

impl KubernetesNode {
    /// The node (namespace, dirs), and the API server inside it holding this node's Node
    /// object; the agent is not started, so that a test can fill the server first.
    pub fn create(run: &RunPrefix, spec: NodeSpec) -> Result<Self> {
        // The harness's Node runs its agent with the directory source only. It is started that
        // way (which creates the namespace and dirs) and stopped at once; `start_agent` then
        // runs the agent on the same state against the API server. Once NodeSpec can choose
        // the source, this is one `Node::start`.
        let mut node = Node::start(run, spec)?;
        node.stop_agent()?;
        let listener = node
            .netns()
            .run(|| TcpListener::bind("127.0.0.1:0"))?
            .map_err(Error::io("binding the test API server inside the node"))?;
        let server = ApiServer::serve(listener)?;
        server.apply(node_object(node.name(), node.pod_cidr()))?;
        let this = Self {
            agent: None,
            server,
            node,
        };
        this.server.write_kubeconfig(&this.kubeconfig())?;
        Ok(this)
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
        self.agent.as_ref().map(Child::id)
    }

    pub fn server(&self) -> &ApiServer {
        &self.server
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.node.dir().join("kubeconfig")
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
        self.spawn_agent()?;
        self.wait_for_agent(AgentUp::Ready, AGENT_READY_TIMEOUT)
            .map(drop)
    }

    /// Starts the agent and waits until its API answers, synced or not; returns its status.
    pub fn start_agent_serving(&mut self) -> Result<Status> {
        self.spawn_agent()?;
        self.wait_for_agent(AgentUp::Serving, AGENT_READY_TIMEOUT)
    }

    /// Waits until a running agent reports `ready`.
    pub fn wait_until_ready(&mut self, timeout: Duration) -> Result<Status> {
        self.wait_for_agent(AgentUp::Ready, timeout)
    }

    fn spawn_agent(&mut self) -> Result<()> {
        if self.agent.is_some() {
            return Err(self.agent_error("started while the agent runs".into()));
        }
        let mut cmd = self.node.agent_command()?;
        cmd.arg("--source")
            .arg("kubernetes")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(self.node.agent_args());
        self.agent = Some(spawn_agent(cmd)?);
        Ok(())
    }

    fn wait_for_agent(&mut self, until: AgentUp, timeout: Duration) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let client = Client::new(self.node.socket()).with_timeout(Duration::from_secs(2));
        loop {
            if let Some(agent) = self.agent.as_mut()
                && let Ok(Some(status)) = agent.try_wait()
            {
                self.agent = None;
                return Err(self.agent_error(format!("exited ({status}) before it was up")));
            }
            let last = match client.status() {
                Ok(status) if status.ready || until == AgentUp::Serving => return Ok(status),
                Ok(status) => format!("answers but is not ready: {status:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(
                    self.agent_error(format!("not {until:?} within {timeout:?} (last: {last})"))
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after a grace period, as a DaemonSet rollout does.
    pub fn stop_agent(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        // ESRCH: it already exited; the wait below reaps it.
        let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
        let exited = wait_with_deadline(&mut agent, Instant::now() + AGENT_STOP_TIMEOUT)
            .map_err(Error::io("waiting for the agent to exit"))?;
        if exited.is_none() {
            let _ = agent.kill();
            agent.wait().map_err(Error::io("reaping the agent"))?;
            return Err(self.agent_error(format!(
                "did not exit within {AGENT_STOP_TIMEOUT:?} of SIGTERM; killed"
            )));
        }
        Ok(())
    }

    /// The agent's resident and peak resident memory (`VmRSS`, `VmHWM`), in KiB.
    pub fn agent_memory_kib(&self) -> Result<(u64, u64)> {
        let Some(agent) = &self.agent else {
            return Err(self.agent_error("is not running".into()));
        };
        let path = format!("/proc/{}/status", agent.id());
        let status = fs::read_to_string(&path).map_err(Error::io(format!("reading {path}")))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| Error::Io {
                    context: format!("no {name} in {path}"),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                })
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    fn agent_error(&self, reason: String) -> Error {
        Error::Agent {
            node: self.node.name().to_string(),
            reason,
            log: self.node.agent_log(),
        }
    }
}

impl Drop for KubernetesNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop_agent() {
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
    knode.spawn_agent()?;
    knode.wait_for_agent(AgentUp::Ready, SYNC_TIMEOUT)?;
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
