//! A simulated node: a network namespace running the real `myelin-agent`, with its own state
//! dir, socket, bpffs and cluster dir under a temp dir.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, OpenOptions},
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Stdio},
    sync::atomic::{AtomicU8, Ordering},
    thread,
    time::{Duration, Instant},
};

use myelin_api::{AttachmentId, Client, Endpoint, Status};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tempfile::TempDir;

use crate::{
    Error, Result,
    bins::Binaries,
    cluster::{self, ClusterDir},
    metrics::METRICS_ADDR,
    netns::Netns,
    process::{self, wait_with_deadline},
    run::RunPrefix,
    sweep,
    traffic::Host,
};

/// How long the agent may take from start to `ready`.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping agent may take to exit on SIGTERM before it is killed.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Kubernetes node name (`--node-name`); also part of the namespace name.
    pub name: String,
    pub pod_cidr: String,
    /// Written to the cluster dir as `cluster.yaml`; holds the Node object. Without it the
    /// harness writes a Node object of its own.
    pub cluster_yaml: Option<String>,
    pub binaries: Option<Binaries>,
    /// Print the agent's log when the node is dropped. On for tests (libtest shows it only
    /// for failing ones), off for the demo.
    pub echo_agent_log_on_drop: bool,
    /// More agent flags, after the harness's own (e.g. `--attach-mode tc`).
    pub agent_args: Vec<String>,
    /// The agent's limit of open files (RLIMIT_NOFILE), when not the harness's own.
    pub agent_fd_limit: Option<u64>,
    /// Where the agent reads the cluster state.
    pub source: AgentSource,
}

/// Where a node's agent reads the cluster state from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentSource {
    /// `--source dir:<node dir>/cluster --pod-cidr <its CIDR>`: the YAML in [`Node::cluster`].
    #[default]
    ClusterDir,
    /// `--source kubernetes --kubeconfig <node dir>/kubeconfig` ([`Node::kubeconfig`], written
    /// by whoever runs the API server); the pod CIDR comes from the Node object.
    Kubernetes,
}

impl NodeSpec {
    /// A node with a pod CIDR of its own, `10.244.<n>.0/24`. Nodes are separate namespaces, so
    /// overlapping CIDRs would work too; distinct ones keep logs unambiguous.
    pub fn new(name: impl Into<String>) -> Self {
        static NEXT: AtomicU8 = AtomicU8::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self {
            name: name.into(),
            pod_cidr: format!("10.244.{n}.0/24"),
            cluster_yaml: None,
            binaries: None,
            echo_agent_log_on_drop: true,
            agent_args: Vec::new(),
            agent_fd_limit: None,
            source: AgentSource::ClusterDir,
        }
    }

    pub fn source(mut self, source: AgentSource) -> Self {
        self.source = source;
        self
    }

    /// Adds agent flags.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Starts the agent with at most `limit` open files.
    pub fn agent_fd_limit(mut self, limit: u64) -> Self {
        self.agent_fd_limit = Some(limit);
        self
    }

    pub fn pod_cidr(mut self, cidr: impl Into<String>) -> Self {
        self.pod_cidr = cidr.into();
        self
    }
}

pub struct Node {
    name: String,
    pod_cidr: String,
    run: RunPrefix,
    binaries: Binaries,
    netns: Netns,
    dir: TempDir,
    agent: Option<Child>,
    status_at_start: Option<Status>,
    echo_agent_log_on_drop: bool,
    agent_args: Vec<String>,
    agent_fd_limit: Option<u64>,
    source: AgentSource,
}

/// What the agent must reach before a start counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentUp {
    /// `ready`: the first full sync of every kind is in the maps.
    Ready,
    /// Its API answers, synced or not (an API server may be down).
    Serving,
}

impl Node {
    /// Creates the namespace and dirs, starts the agent inside the namespace and waits until it
    /// reports `ready`.
    pub fn start(run: &RunPrefix, spec: NodeSpec) -> Result<Self> {
        let mut node = Self::create(run, spec)?;
        node.start_agent()?;
        Ok(node)
    }

    /// Creates the namespace, the dirs and the cluster dir's Node object, without the agent:
    /// the caller can wire the namespace (an uplink, routes) or fill a source first, then
    /// [`start_agent`](Self::start_agent).
    pub fn create(run: &RunPrefix, spec: NodeSpec) -> Result<Self> {
        let binaries = match spec.binaries {
            Some(b) => b,
            None => Binaries::from_env()?,
        };
        // Fail on a missing binary before creating anything.
        binaries.agent()?;
        binaries.plugin()?;
        let scoped = run.name(&spec.name);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{scoped}-"))
            .tempdir()
            .map_err(Error::io("creating the node's temp dir"))?;
        let netns = Netns::create(&scoped)?;
        let node = Self {
            name: spec.name,
            pod_cidr: spec.pod_cidr,
            run: run.clone(),
            binaries,
            netns,
            dir,
            agent: None,
            status_at_start: None,
            echo_agent_log_on_drop: spec.echo_agent_log_on_drop,
            agent_args: spec.agent_args,
            agent_fd_limit: spec.agent_fd_limit,
            source: spec.source,
        };
        for sub in ["state", "bpffs", "cluster"] {
            let path = node.dir.path().join(sub);
            fs::create_dir(&path).map_err(Error::io(format!("creating {}", path.display())))?;
        }
        match spec.cluster_yaml {
            Some(yaml) => node.cluster().write_yaml("cluster", &yaml)?,
            None => node
                .cluster()
                .write("node", &[cluster::node_object(&node.name, &node.pod_cidr)])?,
        }
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    pub(crate) fn run_prefix(&self) -> &RunPrefix {
        &self.run
    }

    pub(crate) fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn bpffs(&self) -> PathBuf {
        self.dir.path().join("bpffs")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn cluster(&self) -> ClusterDir {
        ClusterDir::new(self.dir.path().join("cluster"))
    }

    /// The kubeconfig the agent reads with [`AgentSource::Kubernetes`].
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn agent_log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// A client for the agent's socket; the timeout is generous for a loaded machine yet keeps
    /// a wedged agent from hanging a test.
    pub fn client(&self) -> Client {
        Client::new(self.socket()).with_timeout(Duration::from_secs(10))
    }

    /// `myelinctl <args>` against this node's agent, as an operator runs it: its stdout.
    pub fn myelinctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = std::process::Command::new(self.binaries.ctl()?);
        cmd.arg("--socket").arg(self.socket()).args(args);
        Ok(process::run_ok(cmd, Duration::from_secs(10))?.stdout_text())
    }

    pub fn status(&self) -> Result<Status> {
        self.client()
            .status()
            .map_err(Error::api(format!("GET /v1/status on {}", self.name)))
    }

    pub fn endpoints(&self) -> Result<Vec<Endpoint>> {
        self.client()
            .endpoints()
            .map_err(Error::api(format!("GET /v1/endpoints on {}", self.name)))
    }

    /// Starts the agent (again) with this node's dirs and waits until it is ready.
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

    /// Starts the agent without waiting for it: several nodes' agents then start side by
    /// side, and [`wait_until_ready`](Self::wait_until_ready) waits for each.
    pub fn spawn_agent(&mut self) -> Result<()> {
        if self.agent.is_some() {
            return Err(self.agent_error("started while the agent runs".into()));
        }
        let cmd = self.sourced_agent_command()?;
        self.agent = Some(spawn_agent(cmd)?);
        Ok(())
    }

    /// Waits until a running agent reports `ready`.
    pub fn wait_until_ready(&mut self, timeout: Duration) -> Result<Status> {
        self.wait_for_agent(AgentUp::Ready, timeout)
    }

    /// The agent as [`Node::start_agent`] runs it: this node's flags and source.
    fn sourced_agent_command(&self) -> Result<std::process::Command> {
        let mut cmd = self.agent_command()?;
        match self.source {
            AgentSource::ClusterDir => cmd
                .arg("--source")
                .arg(format!("dir:{}", self.dir.path().join("cluster").display()))
                .arg("--pod-cidr")
                .arg(&self.pod_cidr),
            AgentSource::Kubernetes => cmd
                .arg("--source")
                .arg("kubernetes")
                .arg("--kubeconfig")
                .arg(self.kubeconfig()),
        };
        cmd.args(&self.agent_args);
        Ok(cmd)
    }

    /// Runs one more agent exactly as [`Node::start_agent`] would, while this node's agent
    /// runs, and returns how it ended (it is killed after `timeout`); its output goes to the
    /// agent log too.
    pub fn run_second_agent(&self, timeout: Duration) -> Result<process::Output> {
        process::run(self.sourced_agent_command()?, &[], timeout)
    }

    /// The flags [`NodeSpec::agent_args`] added; they apply from the next agent start.
    pub fn agent_args_mut(&mut self) -> &mut Vec<String> {
        &mut self.agent_args
    }

    /// The running agent's pid.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// `myelin-agent` in this node's namespace with this node's name, dirs, socket and metrics
    /// address, its output appended to the agent log; the caller adds the source. Only the
    /// flags given here configure it: `MYELIN_*` of the caller's environment are removed.
    fn agent_command(&self) -> Result<std::process::Command> {
        let log_path = self.agent_log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(Error::io("duplicating the log file handle"))?;
        let dir = self.dir.path();
        let mut cmd = self.netns.command(self.binaries.agent()?)?;
        cmd.arg("--node-name")
            .arg(&self.name)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpffs")
            .arg(dir.join("bpffs"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--metrics-addr")
            .arg(METRICS_ADDR)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // The log is a file read by people: no colour escapes.
            .env("NO_COLOR", "1")
            // Ctrl-C in a terminal reaches only the harness, which then stops the agent in
            // order instead of both dying at once.
            .process_group(0);
        if let Some(limit) = self.agent_fd_limit {
            // SAFETY: only the setrlimit syscall between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // The agent reads MYELIN_<FLAG> from the environment: only our flags may configure it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MYELIN_") {
                cmd.env_remove(key);
            }
        }
        Ok(cmd)
    }

    fn wait_for_agent(&mut self, until: AgentUp, timeout: Duration) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let client = Client::new(self.socket()).with_timeout(Duration::from_secs(2));
        loop {
            if let Some(agent) = self.agent.as_mut()
                && let Ok(Some(status)) = agent.try_wait()
            {
                self.agent = None;
                return Err(self.agent_error(format!("exited ({status}) before it was up")));
            }
            let last = match client.status() {
                Ok(status) if status.ready || until == AgentUp::Serving => {
                    self.status_at_start = Some(status.clone());
                    return Ok(status);
                }
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

    /// Stops the agent the way a DaemonSet rollout does: SIGTERM, then SIGKILL after a grace
    /// period. Pods must keep working meanwhile.
    pub fn stop_agent(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        // ESRCH: it already exited; wait below reaps it.
        let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        let exited = wait_with_deadline(&mut agent, deadline)
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

    /// Sends the agent SIGTERM without waiting; [`Node::stop_agent`] (or the drop) reaps it.
    pub(crate) fn signal_agent_to_stop(&self) {
        if let Some(agent) = &self.agent {
            // ESRCH: it already exited.
            let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
        }
    }

    /// Kills the agent with SIGKILL, as an OOM kill or a node's crash would, and reaps it.
    pub fn kill_agent(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        let _ = agent.kill();
        agent
            .wait()
            .map_err(Error::io("reaping the killed agent"))?;
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
            node: self.name.clone(),
            reason,
            log: self.agent_log(),
        }
    }

    /// The gateway address the agent put on the node (`myelin_host`); pods route through it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.status_at_start
            .as_ref()
            .map_or(Ipv4Addr::UNSPECIFIED, |s| s.gateway)
    }

    /// Where the agent pins a map.
    pub fn pinned_map(&self, name: &str) -> PathBuf {
        self.bpffs().join("myelin").join(name)
    }

    /// `bpftool -j map dump pinned <bpffs>/myelin/<name>`.
    pub fn dump_map(&self, name: &str) -> Result<Vec<serde_json::Value>> {
        let out = self.bpftool_dump(name, true)?;
        serde_json::from_slice(&out).map_err(Error::json(format!("parsing the dump of {name}")))
    }

    /// `bpftool map dump pinned <bpffs>/myelin/<name>` as bpftool prints it.
    pub fn dump_map_text(&self, name: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.bpftool_dump(name, false)?).into_owned())
    }

    /// `bpftool map lookup pinned <map> key <bytes>`, as bpftool prints it.
    pub fn lookup_map_text(&self, name: &str, key: &[u8]) -> Result<String> {
        let mut cmd = std::process::Command::new("bpftool");
        cmd.args(["map", "lookup", "pinned"])
            .arg(self.pinned_map(name))
            .arg("key")
            .args(key.iter().map(u8::to_string));
        let out = process::run_ok(cmd, Duration::from_secs(10))?.stdout;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn bpftool_dump(&self, name: &str, json: bool) -> Result<Vec<u8>> {
        let mut cmd = std::process::Command::new("bpftool");
        if json {
            cmd.arg("-j");
        }
        cmd.args(["map", "dump", "pinned"])
            .arg(self.pinned_map(name));
        Ok(process::run_ok(cmd, Duration::from_secs(10))?.stdout)
    }

    /// The links in the node's namespace; unlike [`Node::footprint`], also while the agent is
    /// down.
    pub fn links(&self) -> Result<BTreeSet<String>> {
        Ok(self.netns.link_names()?.into_iter().collect())
    }

    /// Everything pods leave on a node, to compare before and after an operation.
    pub fn footprint(&self) -> Result<Footprint> {
        let map_keys = |name: &str| -> Result<BTreeSet<String>> {
            Ok(self
                .dump_map(name)?
                .iter()
                .map(|entry| entry["key"].to_string())
                .collect())
        };
        Ok(Footprint {
            links: self.links()?,
            endpoints: self
                .endpoints()?
                .into_iter()
                .map(|e| (e.attachment, e.ip))
                .collect(),
            free_addresses: self.status()?.free_addresses,
            endpoints_map: map_keys("endpoints")?,
            endpoints_by_if_map: map_keys("endpoints_by_if")?,
        })
    }
}

impl Host for Node {
    fn label(&self) -> String {
        format!("node {} ({})", self.name, self.gateway())
    }
    fn netns(&self) -> &Netns {
        &self.netns
    }
    fn ip(&self) -> Ipv4Addr {
        self.gateway()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.stop_agent() {
            eprintln!("cleanup of node {}: {e}", self.name);
        }
        if self.echo_agent_log_on_drop || thread::panicking() {
            eprintln!(
                "--- agent log of node {} ({}) ---\n{}--- end of agent log ---",
                self.name,
                self.agent_log_path().display(),
                self.agent_log()
            );
        }
        // The bpffs the agent mounted; the namespace and dir go when the fields drop.
        if let Err(e) = sweep::unmount_all_under(self.dir.path()) {
            eprintln!("cleanup of node {}: {e}", self.name);
        }
    }
}

/// What pods leave behind on a node: links in its namespace, the agent's endpoints and free
/// addresses, and the entries of the pinned endpoint maps (keys as bpftool prints them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    pub links: BTreeSet<String>,
    pub endpoints: BTreeMap<AttachmentId, Ipv4Addr>,
    pub free_addresses: u64,
    pub endpoints_map: BTreeSet<String>,
    pub endpoints_by_if_map: BTreeSet<String>,
}

/// Spawns an agent command from [`Node::agent_command`].
fn spawn_agent(mut cmd: std::process::Command) -> Result<Child> {
    let command = process::describe(&cmd);
    cmd.spawn()
        .map_err(|source| Error::Spawn { command, source })
}
