//! TEST FIXTURE: a stand-in for the Kubernetes API server, for testing the agent's Kubernetes
//! source where no real cluster can run. It is not a Kubernetes implementation: it stores
//! objects as given (no validation beyond kind, name and namespace, no defaulting, no auth).
//!
//! What it does implement is the list/watch protocol, as kube-rs's watcher uses it, on the real
//! paths and with the real JSON:
//! - `GET /api/v1/nodes`, `/api/v1/namespaces`, `/api/v1/pods`, `/api/v1/services`,
//!   `/apis/networking.k8s.io/v1/networkpolicies` and
//!   `/apis/discovery.k8s.io/v1/endpointslices` (cluster-wide);
//! - LIST with `limit` and `continue` (pages of one consistent snapshot) and
//!   `metadata.resourceVersion`;
//! - WATCH (`watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`) as a
//!   chunked stream of `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` lines, from a bounded event
//!   history; a resourceVersion older than the history gets a watch `ERROR` event holding a
//!   `410 Expired` Status, exactly as the real server answers;
//! - one global resourceVersion counter for every kind.
//!
//! Simplifications a client cannot rely on: `resourceVersion=0` on a watch replays the event
//! history instead of the current objects, and a list always answers with the latest state.
//!
//! And the controls a test needs: create/update/delete objects, compact the history, drop every
//! open watch connection, stop and restart the server, answer the next requests with HTTP
//! errors or garbage, bulk-generate realistic pods, and write a kubeconfig pointing at it, so
//! that `kube::Client` reaches it exactly as it would reach a real cluster.
//!
//! Plain HTTP on a `TcpListener` the caller may provide: an agent under test runs inside a
//! node's network namespace, so the listener is created by a thread inside that namespace
//! ([`crate::Netns::run`]) and handed to [`ApiServer::serve`].

mod generate;
mod http;
mod kubernetes_node;
mod store;

use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    io::{self, BufReader, BufWriter, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use self::store::{ListError, ObjectKey, Store, status_object};
pub use self::{
    generate::generated_cluster,
    kubernetes_node::{
        KubernetesNode, WatchFigures, endpoint_map_identity, measure_watch_latency_and_memory,
    },
};
use crate::{Error, Result};

/// Events kept for watches to resume from; the real watch cache keeps fewer, and tests that
/// need a watch to expire call [`ApiServer::compact`].
const DEFAULT_HISTORY: usize = 100_000;
/// How often an idle watch gets a BOOKMARK (the real server sends one about every minute).
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// A watch without `timeoutSeconds` ends after this, like the real server's request timeout.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often a stopped acceptor is noticed; accepting is polled so that `stop` needs no
/// connection to itself (which would have to come from the listener's namespace).
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// The kinds this server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Node,
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Node,
        Resource::Namespace,
        Resource::Pod,
        Resource::NetworkPolicy,
        Resource::Service,
        Resource::EndpointSlice,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Node => "Node",
            Resource::Namespace => "Namespace",
            Resource::Pod => "Pod",
            Resource::NetworkPolicy => "NetworkPolicy",
            Resource::Service => "Service",
            Resource::EndpointSlice => "EndpointSlice",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::NetworkPolicy => "networking.k8s.io/v1",
            Resource::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The cluster-wide collection path.
    pub fn path(self) -> &'static str {
        match self {
            Resource::Node => "/api/v1/nodes",
            Resource::Namespace => "/api/v1/namespaces",
            Resource::Pod => "/api/v1/pods",
            Resource::NetworkPolicy => "/apis/networking.k8s.io/v1/networkpolicies",
            Resource::Service => "/api/v1/services",
            Resource::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Resource::Node | Resource::Namespace)
    }

    fn from_path(path: &str) -> Option<Self> {
        let path = path.strip_suffix('/').unwrap_or(path);
        Self::ALL.into_iter().find(|r| r.path() == path)
    }

    fn of_object(object: &Value) -> Option<Self> {
        let kind = object["kind"].as_str()?;
        let api_version = object["apiVersion"].as_str().unwrap_or("v1");
        Self::ALL
            .into_iter()
            .find(|r| r.kind() == kind && r.api_version() == api_version)
    }
}

/// How the next requests fail ([`ApiServer::inject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP error with a Status body (500, 503, 429, 403, ...).
    Status(u16),
    /// `200 OK` with a body that is not JSON (a watch gets a stream holding a garbage line).
    Garbage,
}

/// What the server did for one resource, for tests to tell a relist from a resumed watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceStats {
    /// LIST requests answered (every page counts).
    pub lists: u64,
    /// WATCH requests started.
    pub watches: u64,
    pub bookmarks: u64,
    /// Watches answered with `410 Gone`.
    pub expired: u64,
    /// Requests answered with an injected fault.
    pub faults: u64,
}

struct State {
    store: Store,
    faults: VecDeque<Fault>,
    bookmark_interval: Option<Duration>,
    /// Bumped to end every open watch abruptly: a dropped connection, or the server stopping.
    watch_epoch: u64,
    stats: BTreeMap<Resource, ResourceStats>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every write, on dropped watches and on stop.
    changed: Condvar,
    /// Every open connection, so that stopping the server can cut them.
    connections: Mutex<BTreeMap<u64, TcpStream>>,
    next_connection: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread cannot leave the store half-written (every write is
        // one call), so the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connections(&self) -> MutexGuard<'_, BTreeMap<u64, TcpStream>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

/// The test API server. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<Acceptor>,
}

impl ApiServer {
    /// Serves on 127.0.0.1 with a free port, in the calling thread's network namespace.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(Error::io("binding the test API server to 127.0.0.1"))?;
        Self::serve(listener)
    }

    /// Serves on `listener` (created wherever the caller needs it, e.g. in a node's namespace).
    pub fn serve(listener: TcpListener) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(Error::io("reading the listener's address"))?;
        let mut server = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    store: Store::new(DEFAULT_HISTORY),
                    faults: VecDeque::new(),
                    bookmark_interval: Some(DEFAULT_BOOKMARK_INTERVAL),
                    watch_epoch: 0,
                    stats: BTreeMap::new(),
                }),
                changed: Condvar::new(),
                connections: Mutex::new(BTreeMap::new()),
                next_connection: AtomicU64::new(0),
            }),
            addr,
            acceptor: None,
        };
        server.resume(listener)?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn is_running(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Stops like a crashed API server: the port is closed (connections are refused) and every
    /// open connection is cut. The objects stay, like etcd's.
    pub fn stop(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.stop.store(true, Ordering::SeqCst);
            // The acceptor only sleeps and accepts; it ends within one poll.
            let _ = acceptor.thread.join();
        }
        self.end_watches();
        for stream in self.shared.connections().values() {
            // Already closed by the client: nothing to cut.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Serves again on the same address, bound in the calling thread's network namespace.
    pub fn restart(&mut self) -> Result<()> {
        let listener = TcpListener::bind(self.addr).map_err(Error::io(format!(
            "binding the test API server to {} again",
            self.addr
        )))?;
        self.resume(listener)
    }

    /// Serves again on `listener`, which must have this server's address (clients were given
    /// it in their kubeconfig).
    pub fn resume(&mut self, listener: TcpListener) -> Result<()> {
        let addr = listener
            .local_addr()
            .map_err(Error::io("reading the listener's address"))?;
        if addr != self.addr {
            return Err(Error::Io {
                context: format!("the test API server serves {}, not {addr}", self.addr),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        if self.is_running() {
            return Err(Error::Io {
                context: format!("the test API server on {addr} is already running"),
                source: io::Error::from(io::ErrorKind::AddrInUse),
            });
        }
        listener
            .set_nonblocking(true)
            .map_err(Error::io("making the listener non-blocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(&self.shared);
        let stop_flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("apiserver-{}", addr.port()))
            .spawn(move || accept_connections(&shared, &listener, &stop_flag))
            .map_err(Error::io("starting the test API server's thread"))?;
        self.acceptor = Some(Acceptor { stop, thread });
        Ok(())
    }

    /// Cuts every open watch mid-stream, as a network failure or a load balancer would; the
    /// server keeps serving, so clients resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.end_watches();
    }

    fn end_watches(&self) {
        self.shared.lock().watch_epoch += 1;
        self.shared.changed.notify_all();
    }

    /// A kubeconfig whose current context points at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "myelin-test", "cluster": { "server": self.url() } }],
            "users": [{ "name": "myelin-test", "user": {} }],
            "contexts": [{
                "name": "myelin-test",
                "context": { "cluster": "myelin-test", "user": "myelin-test" },
            }],
            "current-context": "myelin-test",
        });
        let yaml = serde_yaml::to_string(&config).map_err(|source| Error::Yaml {
            context: "encoding the kubeconfig".into(),
            source,
        })?;
        fs::write(path, yaml).map_err(Error::io(format!("writing {}", path.display())))
    }

    /// Creates or replaces an object (as `kubectl apply` would); returns its resourceVersion.
    pub fn apply(&self, object: Value) -> Result<u64> {
        let (resource, key) = object_key(&object)?;
        let rv = self.shared.lock().store.put(resource, key, object);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Changes a stored object in place; fails when it does not exist.
    pub fn update(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<u64> {
        let key = (namespace.to_string(), name.to_string());
        let rv = {
            let mut state = self.shared.lock();
            let mut object = state
                .store
                .get(resource, &key)
                .ok_or_else(|| not_found(resource, namespace, name))?;
            change(&mut object);
            state.store.put(resource, key, object)
        };
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Replaces an object's labels.
    pub fn set_labels(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<u64> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
            .collect();
        self.update(resource, namespace, name, |object| {
            object["metadata"]["labels"] = Value::Object(labels);
        })
    }

    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Result<u64> {
        let key = (namespace.to_string(), name.to_string());
        let rv = self
            .shared
            .lock()
            .store
            .delete(resource, &key)
            .ok_or_else(|| not_found(resource, namespace, name))?;
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Deletes the stored object with `object`'s kind, namespace and name.
    pub fn delete_object(&self, object: &Value) -> Result<u64> {
        let (resource, (namespace, name)) = object_key(object)?;
        self.delete(resource, &namespace, &name)
    }

    /// Forgets all past events and list snapshots: a watch resuming from before now gets
    /// `410 Gone` and must relist. Open watches are up to date and carry on.
    pub fn compact(&self) {
        self.shared.lock().store.compact();
    }

    /// Every watch ends, and resuming from any version handed out so far answers 410 Gone:
    /// every client lists every kind again, as after an API server's restart with compaction.
    pub fn expire_watches(&self) {
        self.shared.lock().store.expire_all();
        self.end_watches();
    }

    /// `None` disables bookmarks: watches then resume from their last event's version.
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        self.shared.lock().bookmark_interval = interval;
        self.shared.changed.notify_all();
    }

    /// Answers the next `requests` LIST or WATCH requests with `fault`.
    pub fn inject(&self, fault: Fault, requests: usize) {
        self.shared
            .lock()
            .faults
            .extend(std::iter::repeat_n(fault, requests));
    }

    /// Injected faults not yet served.
    pub fn pending_faults(&self) -> usize {
        self.shared.lock().faults.len()
    }

    pub fn stats(&self, resource: Resource) -> ResourceStats {
        self.shared
            .lock()
            .stats
            .get(&resource)
            .copied()
            .unwrap_or_default()
    }

    /// Stores many objects (e.g. a [`generated_cluster`]) under one lock, one resourceVersion
    /// per object as if each had been created on its own.
    pub fn store_all(&self, objects: impl IntoIterator<Item = Value>) -> Result<()> {
        let keyed = objects
            .into_iter()
            .map(|o| object_key(&o).map(|(r, k)| (r, k, o)))
            .collect::<Result<Vec<_>>>()?;
        {
            let mut state = self.shared.lock();
            for (resource, key, object) in keyed {
                state.store.put(resource, key, object);
            }
        }
        self.shared.changed.notify_all();
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn not_found(resource: Resource, namespace: &str, name: &str) -> Error {
    Error::Cluster(format!(
        "the test API server has no {} {namespace}/{name}",
        resource.kind()
    ))
}

/// Which collection an object belongs to and its key; refuses what a real server would.
fn object_key(object: &Value) -> Result<(Resource, ObjectKey)> {
    let invalid = |what: &str| Error::Cluster(format!("test API server: {what}: {object}"));
    let resource = Resource::of_object(object)
        .ok_or_else(|| invalid("not a kind it serves (kind and apiVersion)"))?;
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("no metadata.name"))?;
    let namespace = if resource.namespaced() {
        object["metadata"]["namespace"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("no metadata.namespace"))?
    } else {
        ""
    };
    Ok((resource, (namespace.to_string(), name.to_string())))
}

fn accept_connections(shared: &Arc<Shared>, listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
                // Registered here, before the thread runs, so that `stop` (which joins this
                // thread first) finds every connection it must cut.
                let registered = stream.try_clone().map(|clone| {
                    shared.connections().insert(id, clone);
                });
                if registered.is_err() {
                    continue;
                }
                let for_thread = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("apiserver-conn-{id}"))
                    .spawn(move || {
                        // A connection error is the client's or the test's doing (a cut
                        // connection); the client sees it, there is nobody else to tell.
                        let _ = serve_connection(&for_thread, stream);
                        for_thread.connections().remove(&id);
                    });
                if spawned.is_err() {
                    shared.connections().remove(&id);
                }
            }
            // Nothing to accept, or a transient failure (out of fds): poll again.
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // Watch events are small writes that must leave at once: event latency is measured.
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    loop {
        let request = match http::read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                write_status(&mut writer, 400, "BadRequest", &e.to_string())?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let keep_open = respond(shared, &mut writer, &request)?;
        if !keep_open || request.close {
            writer.get_ref().shutdown(Shutdown::Both)?;
            return Ok(());
        }
    }
}

fn write_status(w: &mut impl Write, code: u16, reason: &str, message: &str) -> io::Result<()> {
    http::write_response(
        w,
        code,
        status_object(code, reason, message).to_string().as_bytes(),
    )
}

/// The Status `reason` the real server uses with each code.
fn status_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        410 => "Expired",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

/// Answers one request; `false` when the connection must be closed.
fn respond(shared: &Shared, w: &mut impl Write, request: &http::Request) -> io::Result<bool> {
    if request.method != "GET" {
        write_status(
            w,
            405,
            "MethodNotAllowed",
            "the test API server only serves GET (list and watch)",
        )?;
        return Ok(true);
    }
    let Some(resource) = Resource::from_path(&request.path) else {
        write_status(
            w,
            404,
            "NotFound",
            &format!("the test API server does not serve {}", request.path),
        )?;
        return Ok(true);
    };
    // Answering unfiltered would silently give a client objects it did not ask for.
    if request.query.contains_key("labelSelector") || request.query.contains_key("fieldSelector") {
        write_status(
            w,
            400,
            "BadRequest",
            "label and field selectors are not implemented by the test API server",
        )?;
        return Ok(true);
    }
    let watch = matches!(
        request.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let fault = {
        let mut state = shared.lock();
        let fault = state.faults.pop_front();
        if fault.is_some() {
            state.stats.entry(resource).or_default().faults += 1;
        }
        fault
    };
    match fault {
        Some(Fault::Status(code)) => {
            write_status(w, code, status_reason(code), "injected by the test")?;
            Ok(true)
        }
        Some(Fault::Garbage) if watch => {
            http::write_stream_head(w)?;
            http::write_chunk(w, b"<html>this is not a watch event</html>\n")?;
            http::write_last_chunk(w)?;
            Ok(true)
        }
        Some(Fault::Garbage) => {
            http::write_response(w, 200, b"<html>this is not a list</html>")?;
            Ok(true)
        }
        None if watch => serve_watch(shared, w, resource, &request.query),
        None => serve_list(shared, w, resource, &request.query),
    }
}

fn serve_list(
    shared: &Shared,
    w: &mut impl Write,
    resource: Resource,
    query: &BTreeMap<String, String>,
) -> io::Result<bool> {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => {
            write_status(w, 400, "BadRequest", "limit is not a number")?;
            return Ok(true);
        }
    };
    let token = query.get("continue").filter(|t| !t.is_empty());
    let page = {
        let mut state = shared.lock();
        state.stats.entry(resource).or_default().lists += 1;
        state.store.list(resource, limit, token.map(String::as_str))
    };
    match page {
        Ok(body) => http::write_response(w, 200, body.as_bytes())?,
        Err(ListError::Expired) => write_status(
            w,
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        )?,
        Err(ListError::InvalidContinue) => {
            write_status(w, 400, "BadRequest", "invalid continue parameter")?;
        }
    }
    Ok(true)
}

/// What an open watch does next.
enum WatchStep {
    Events(Vec<Arc<str>>),
    Bookmark(u64),
    /// The watch fell behind the history window.
    Expired(String),
    /// `timeoutSeconds` passed: end the stream cleanly.
    TimedOut,
    /// The test dropped the connection or stopped the server.
    Cut,
}

fn serve_watch(
    shared: &Shared,
    w: &mut impl Write,
    resource: Resource,
    query: &BTreeMap<String, String>,
) -> io::Result<bool> {
    let Some(Ok(mut cursor)) = query.get("resourceVersion").map(|v| v.parse::<u64>()) else {
        write_status(
            w,
            400,
            "BadRequest",
            "the test API server needs a numeric resourceVersion to watch from",
        )?;
        return Ok(true);
    };
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(seconds)) => Duration::from_secs(seconds),
        Some(Err(_)) => {
            write_status(w, 400, "BadRequest", "timeoutSeconds is not a number")?;
            return Ok(true);
        }
    };
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let deadline = Instant::now() + timeout;
    let epoch = {
        let mut state = shared.lock();
        state.stats.entry(resource).or_default().watches += 1;
        state.watch_epoch
    };
    // Like the real server: the stream starts, and an expired version is its first event.
    http::write_stream_head(w)?;
    let mut next_bookmark: Option<Instant> = None;
    loop {
        let step = {
            let mut state = shared.lock();
            loop {
                if state.watch_epoch != epoch {
                    break WatchStep::Cut;
                }
                match state.store.events_after(resource, cursor) {
                    Err(too_old) => {
                        state.stats.entry(resource).or_default().expired += 1;
                        break WatchStep::Expired(too_old.event_line());
                    }
                    Ok((lines, current)) if !lines.is_empty() => {
                        cursor = current;
                        break WatchStep::Events(lines);
                    }
                    Ok((_, current)) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break WatchStep::TimedOut;
                        }
                        let interval = state.bookmark_interval.filter(|_| bookmarks);
                        let mut wake = deadline;
                        if let Some(interval) = interval {
                            let due = *next_bookmark.get_or_insert(now + interval);
                            if now >= due {
                                next_bookmark = Some(now + interval);
                                cursor = current;
                                state.stats.entry(resource).or_default().bookmarks += 1;
                                break WatchStep::Bookmark(current);
                            }
                            wake = wake.min(due);
                        }
                        state = shared
                            .changed
                            .wait_timeout(state, wake - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        };
        match step {
            WatchStep::Events(lines) => http::write_chunk(w, lines.concat().as_bytes())?,
            WatchStep::Bookmark(rv) => {
                let line = json!({
                    "type": "BOOKMARK",
                    "object": {
                        "kind": resource.kind(),
                        "apiVersion": resource.api_version(),
                        "metadata": { "resourceVersion": rv.to_string() },
                    },
                });
                http::write_chunk(w, format!("{line}\n").as_bytes())?;
            }
            WatchStep::Expired(line) => {
                http::write_chunk(w, line.as_bytes())?;
                http::write_last_chunk(w)?;
                return Ok(true);
            }
            WatchStep::TimedOut => {
                http::write_last_chunk(w)?;
                return Ok(true);
            }
            // No last chunk: the client sees the stream break off.
            WatchStep::Cut => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, Read};

    use super::*;

    fn get(server: &ApiServer, target: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        write!(stream, "GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let code = response[9..12].parse().unwrap();
        (code, response)
    }

    fn body_json(response: &str) -> Value {
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn lists_on_the_real_paths_with_kind_and_version() {
        let server = ApiServer::start().unwrap();
        server
            .apply(crate::cluster::namespace_object("team", &[]))
            .unwrap();
        let (code, response) = get(&server, "/api/v1/namespaces?limit=500");
        assert_eq!(code, 200, "{response}");
        let list = body_json(&response);
        assert_eq!(list["kind"], "NamespaceList");
        assert_eq!(list["metadata"]["resourceVersion"], "1");
        assert_eq!(list["items"][0]["metadata"]["name"], "team");
        for path in [
            "/apis/networking.k8s.io/v1/networkpolicies",
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ] {
            assert_eq!(get(&server, path).0, 200, "{path}");
        }
        let (code, response) = get(&server, "/api/v1/configmaps");
        assert_eq!(code, 404);
        assert_eq!(body_json(&response)["kind"], "Status");
        let (code, _) = get(&server, "/api/v1/pods?labelSelector=app%3Dweb");
        assert_eq!(code, 400);
    }

    #[test]
    fn a_watch_streams_events_and_ends_at_its_timeout() {
        let server = ApiServer::start().unwrap();
        server.set_bookmark_interval(None);
        server
            .apply(crate::cluster::namespace_object("a", &[]))
            .unwrap();
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        write!(
            stream,
            "GET /api/v1/namespaces?watch=true&resourceVersion=0&timeoutSeconds=1 HTTP/1.1\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            reader.read_line(&mut head).unwrap();
        }
        assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
        let mut size = String::new();
        reader.read_line(&mut size).unwrap();
        let mut event = String::new();
        reader.read_line(&mut event).unwrap();
        let event: Value = serde_json::from_str(&event).unwrap();
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["metadata"]["name"], "a");
        // Then the stream ends cleanly after timeoutSeconds.
        let mut rest = String::new();
        reader.read_line(&mut rest).unwrap();
        rest.clear();
        reader.read_line(&mut rest).unwrap();
        assert_eq!(rest, "0\r\n");
    }

    #[test]
    fn injected_faults_answer_the_next_requests_only() {
        let server = ApiServer::start().unwrap();
        server.inject(Fault::Status(503), 1);
        server.inject(Fault::Garbage, 1);
        let (code, response) = get(&server, "/api/v1/pods");
        assert_eq!(code, 503);
        assert_eq!(body_json(&response)["reason"], "ServiceUnavailable");
        let (code, response) = get(&server, "/api/v1/pods");
        assert_eq!(code, 200);
        assert!(response.contains("this is not a list"));
        assert_eq!(get(&server, "/api/v1/pods").0, 200);
        assert_eq!(server.stats(Resource::Pod).faults, 2);
        assert_eq!(server.pending_faults(), 0);
    }

    #[test]
    fn a_stopped_server_refuses_connections_and_restarts_on_its_address() {
        let mut server = ApiServer::start().unwrap();
        let addr = server.addr();
        server.stop();
        assert!(TcpStream::connect(addr).is_err());
        server.restart().unwrap();
        assert_eq!(get(&server, "/api/v1/nodes").0, 200);
    }

    #[test]
    fn objects_without_a_name_or_namespace_are_refused() {
        let server = ApiServer::start().unwrap();
        assert!(
            server
                .apply(json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p"}}))
                .is_err()
        );
        assert!(
            server
                .apply(json!({"kind": "Node", "apiVersion": "v1", "metadata": {}}))
                .is_err()
        );
        assert!(
            server
                .apply(json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "s"}}))
                .is_err()
        );
        assert!(server.delete(Resource::Pod, "default", "missing").is_err());
    }
}
