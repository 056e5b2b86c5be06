//! Shared by the root tests: throwaway network namespaces, `ip -j` inspection, the plugin
//! binary run inside a "node" namespace, and a fake agent on a unix socket.
//!
//! Every namespace is named `myelin-t<pid>-<n>-<role>` and removed by a guard, also on panic;
//! leftovers of earlier runs (whose pid is gone) are swept before the first one is created.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
};

use myelin_api::{
    AllocateRequest, Allocation, ApiError, AttachmentId, DeleteResponse, Endpoint, EndpointRequest,
    ErrorKind, GcRequest, GcResponse, ReleaseResponse, Status,
};
use serde_json::Value;

const NETNS_DIR: &str = "/run/netns";
const PREFIX: &str = "myelin-t";

/// Whether root tests run. Without root they fail with the reason, unless the developer opted
/// out with `MYELIN_SKIP_ROOT_TESTS=1` (CI never sets it).
pub fn root_tests_enabled(test: &str) -> bool {
    if std::env::var_os("MYELIN_SKIP_ROOT_TESTS").is_some_and(|v| v == "1") {
        eprintln!(
            "skipping {test}: MYELIN_SKIP_ROOT_TESTS=1 (it needs root and network namespaces)"
        );
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root to create network namespaces; run as root or set MYELIN_SKIP_ROOT_TESTS=1"
    );
    let ip = Command::new("ip").arg("-V").output();
    assert!(
        ip.is_ok_and(|o| o.status.success()),
        "{test} needs the `ip` command (iproute2)"
    );
    true
}

/// Runs `cmd`, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A network namespace that exists for the guard's lifetime.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(role: &str) -> Self {
        static SWEEP: Once = Once::new();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        SWEEP.call_once(sweep_leftovers);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &name]));
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    pub fn open(&self) -> myelin_cni::netns::NetNs {
        myelin_cni::netns::NetNs::open(self.path())
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.name))
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        sh(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -j -n <ns> <args>`, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let text = sh(Command::new("ip").args(["-j", "-n", &self.name]).args(args));
        if text.trim().is_empty() {
            return Value::Array(Vec::new());
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {text}"))
    }

    /// The link named `name`, or `None`.
    pub fn link(&self, name: &str) -> Option<Value> {
        let links = self.ip_json(&["link", "show"]);
        links
            .as_array()?
            .iter()
            .find(|l| l["ifname"] == name)
            .cloned()
    }

    /// The names of all links but `lo`.
    pub fn link_names(&self) -> BTreeSet<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .filter(|n| n != "lo")
            .collect()
    }

    /// `(address, prefixlen)` of the IPv4 addresses on `dev`.
    pub fn ipv4_addresses(&self, dev: &str) -> Vec<(String, u64)> {
        let json = self.ip_json(&["-4", "addr", "show", "dev", dev]);
        json.as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| {
                (
                    a["local"].as_str().unwrap_or_default().to_string(),
                    a["prefixlen"].as_u64().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The IPv4 main-table routes, each as `dst|gateway|dev|scope`, sorted.
    pub fn ipv4_routes(&self) -> Vec<String> {
        let json = self.ip_json(&["-4", "route", "show", "table", "main"]);
        let mut routes: Vec<String> = json
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let field = |k: &str| r[k].as_str().unwrap_or("").to_string();
                format!(
                    "{}|{}|{}|{}",
                    field("dst"),
                    field("gateway"),
                    field("dev"),
                    field("scope")
                )
            })
            .collect();
        routes.sort();
        routes
    }

    /// IPv4 neighbours of `dev` as `ip -> (lladdr, states)`.
    pub fn ipv4_neighbours(&self, dev: &str) -> BTreeMap<String, (String, Vec<String>)> {
        let json = self.ip_json(&["-4", "neigh", "show", "dev", dev]);
        json.as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let states = n["state"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
                (
                    n["dst"].as_str().unwrap_or_default().to_string(),
                    (n["lladdr"].as_str().unwrap_or_default().to_string(), states),
                )
            })
            .collect()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs the real `myelin` binary inside `node`, as a runtime would, with `vars` as its CNI
/// environment and `stdin` as its configuration.
pub fn run_plugin(node: &TestNetns, vars: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.path().display()))
        .arg(env!("CARGO_BIN_EXE_myelin"));
    run_with_stdin(cmd, vars, stdin)
}

/// Runs the real `myelin` binary where the test runs (only for inputs it must reject before
/// touching any network namespace).
pub fn run_plugin_here(vars: &[(&str, &str)], stdin: &str) -> Output {
    run_with_stdin(Command::new(env!("CARGO_BIN_EXE_myelin")), vars, stdin)
}

fn run_with_stdin(mut cmd: Command, vars: &[(&str, &str)], stdin: &str) -> Output {
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning the plugin");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("writing the plugin's stdin");
    child.wait_with_output().expect("waiting for the plugin")
}

/// The error object a failed run printed, checked for shape.
pub fn error_of(out: &Output) -> Value {
    assert!(!out.status.success(), "expected failure, got {out:?}");
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not an error object ({e}): {out:?}"));
    assert!(json["code"].is_u64(), "{json}");
    assert!(json["msg"].is_string(), "{json}");
    assert!(json["cniVersion"].is_string(), "{json}");
    json
}

/// The JSON a successful run printed.
pub fn success_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "plugin failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout not JSON ({e}): {out:?}"))
}

/// How the fake agent behaves and what it holds.
#[derive(Default)]
pub struct AgentState {
    pub fail_put_endpoint: bool,
    pub ready: bool,
    pub free_addresses: u64,
    /// Attachment -> allocated address.
    pub allocations: BTreeMap<AttachmentId, std::net::Ipv4Addr>,
    pub endpoints: BTreeMap<AttachmentId, Endpoint>,
    /// `METHOD path` of every request, in order.
    pub requests: Vec<String>,
    pub put_requests: Vec<EndpointRequest>,
    next_host: u8,
}

/// An in-test agent answering the JSON API on a unix socket, one request per connection.
pub struct FakeAgent {
    pub socket: PathBuf,
    pub state: Arc<Mutex<AgentState>>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

pub const GATEWAY: &str = "10.244.1.1";
pub const POD_CIDR: &str = "10.244.1.0/24";

impl FakeAgent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("binding the fake agent");
        let state = Arc::new(Mutex::new(AgentState {
            ready: true,
            free_addresses: 250,
            ..AgentState::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        serve(conn, &state);
                    }
                }
            })
        };
        Self {
            socket,
            state,
            stop,
            server: Some(server),
            _dir: dir,
        }
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("agent state").requests.clone()
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&mut AgentState) -> T) -> T {
        f(&mut self.state.lock().expect("agent state"))
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

fn serve(conn: UnixStream, state: &Mutex<AgentState>) {
    let mut reader = BufReader::new(&conn);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; content_length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let (status, answer) = {
        let mut state = state.lock().expect("agent state");
        state.requests.push(format!("{method} {target}"));
        handle(&mut state, &method, &target, &body)
    };
    let reason = if status < 300 { "OK" } else { "Error" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = (&conn).write_all(response.as_bytes());
}

/// `containerId=..&ifname=..` (test ids contain only unreserved characters: no decoding).
fn attachment_of(target: &str) -> Option<AttachmentId> {
    let query = target.split_once('?')?.1;
    let mut container_id = None;
    let mut ifname = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("containerId", v)) => container_id = Some(v.to_string()),
            Some(("ifname", v)) => ifname = Some(v.to_string()),
            _ => {}
        }
    }
    Some(AttachmentId::new(container_id?, ifname?))
}

fn api_error(kind: ErrorKind, message: &str) -> (u16, String) {
    let body = serde_json::to_string(&ApiError::new(kind, message)).expect("encoding");
    (kind.http_status(), body)
}

fn json<T: serde::Serialize>(status: u16, value: &T) -> (u16, String) {
    (status, serde_json::to_string(value).expect("encoding"))
}

fn handle(state: &mut AgentState, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("POST", "/v1/ipam") => {
            let Ok(req) = serde_json::from_slice::<AllocateRequest>(body) else {
                return api_error(ErrorKind::InvalidRequest, "bad allocate body");
            };
            if state.allocations.contains_key(&req.attachment) {
                return api_error(ErrorKind::AlreadyExists, "attachment has an address");
            }
            state.next_host += 1;
            let ip = std::net::Ipv4Addr::new(10, 244, 1, 1 + state.next_host);
            state.allocations.insert(req.attachment, ip);
            json(
                201,
                &Allocation {
                    ip,
                    gateway: GATEWAY.parse().expect("gateway"),
                    pod_cidr: POD_CIDR.into(),
                    mtu: None,
                },
            )
        }
        ("DELETE", "/v1/ipam") => {
            let Some(id) = attachment_of(target) else {
                return api_error(ErrorKind::InvalidRequest, "no attachment");
            };
            let released = state.allocations.remove(&id);
            json(200, &ReleaseResponse { released })
        }
        ("PUT", "/v1/endpoints") => {
            let Ok(req) = serde_json::from_slice::<EndpointRequest>(body) else {
                return api_error(ErrorKind::InvalidRequest, "bad endpoint body");
            };
            state.put_requests.push(req.clone());
            if state.fail_put_endpoint {
                return api_error(ErrorKind::Internal, "attaching programs failed (test)");
            }
            let endpoint = Endpoint {
                id: state.endpoints.len() as u32 + 1,
                attachment: req.attachment.clone(),
                pod: req.pod,
                netns: req.netns,
                ip: req.ip,
                mac: req.mac,
                host_ifname: req.host_ifname,
                host_ifindex: req.host_ifindex,
                host_mac: req.host_mac,
                identity: 1000,
                counters: Default::default(),
            };
            state.endpoints.insert(req.attachment, endpoint.clone());
            json(200, &endpoint)
        }
        ("GET", "/v1/endpoints") => {
            let found: Vec<&Endpoint> = match attachment_of(target) {
                Some(id) => state.endpoints.get(&id).into_iter().collect(),
                None => state.endpoints.values().collect(),
            };
            json(200, &found)
        }
        ("DELETE", "/v1/endpoints") => {
            let Some(id) = attachment_of(target) else {
                return api_error(ErrorKind::InvalidRequest, "no attachment");
            };
            let endpoint = state.endpoints.remove(&id).is_some();
            let released = state.allocations.remove(&id);
            json(200, &DeleteResponse { endpoint, released })
        }
        ("POST", "/v1/gc") => {
            let Ok(req) = serde_json::from_slice::<GcRequest>(body) else {
                return api_error(ErrorKind::InvalidRequest, "bad gc body");
            };
            let valid: BTreeSet<AttachmentId> = req.valid.into_iter().collect();
            let removed: Vec<AttachmentId> = state
                .allocations
                .keys()
                .filter(|id| !valid.contains(*id))
                .cloned()
                .collect();
            for id in &removed {
                state.allocations.remove(id);
                state.endpoints.remove(id);
            }
            json(
                200,
                &GcResponse {
                    removed,
                    failed: vec![],
                },
            )
        }
        ("GET", "/v1/status") => json(
            200,
            &Status {
                node_name: "test-node".into(),
                pod_cidr: POD_CIDR.into(),
                gateway: GATEWAY.parse().expect("gateway"),
                endpoints: state.endpoints.len(),
                free_addresses: state.free_addresses,
                ready: state.ready,
                attach_mode: "tcx".into(),
                version: "test".into(),
                routing: None,
                kube_proxy_replacement: false,
                lb_algorithm: None,
                maglev_table_size: None,
                socket_lb: None,
                flows: None,
            },
        ),
        _ => api_error(ErrorKind::NotFound, "no such route"),
    }
}

/// A network configuration for the plugin.
pub fn netconf(version: &str, socket: &str, extra: Value) -> String {
    let mut conf = serde_json::json!({
        "cniVersion": version, "name": "myelin", "type": "myelin", "agentSocket": socket
    });
    if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
        conf.extend(extra.clone());
    }
    conf.to_string()
}
