//! Services as their clients see them: servers in backend pods that answer with the address of
//! the pod they run in, clients that ask a frontend (a ClusterIP and a port) which backend
//! answered, and the Service and EndpointSlice objects the cluster holds.
//!
//! A client's question is one TCP connection (the server writes its pod's address and closes)
//! or one UDP datagram (answered with the address), so every question is a new connection and
//! goes through backend selection. The answer also names the address and port the backend saw
//! the question come from ([`ask_seen`]): the client's own, or a node's that translated it.

use std::{
    collections::BTreeMap,
    io::{self, Read as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Error, Result, cluster, traffic::Host};

/// How often a server thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// The ClusterIP the Services tests give their `web` Service.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The `web` Service's TCP port.
pub const WEB_TCP: ServicePort<'static> = ServicePort {
    name: "http",
    protocol: Protocol::Tcp,
    port: 80,
    target_port: 8080,
};
/// The same port number over UDP, to another target port: a frontend of its own.
pub const WEB_UDP: ServicePort<'static> = ServicePort {
    name: "dns",
    protocol: Protocol::Udp,
    port: 80,
    target_port: 9090,
};
/// Long enough for every agent to see a change (they read the directory within a second).
pub const CONVERGE: Duration = Duration::from_secs(5);

/// How long a question may take before it counts as unanswered: well above a round trip here,
/// well below TCP's first SYN retransmission (1 s), so a refusal is told from silence.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(800);
/// UDP questions are sent this many times before they count as unanswered.
const UDP_TRIES: u32 = 3;

/// The protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// What a client got when it asked a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The backend with this address answered, on this port.
    Backend(SocketAddrV4),
    /// The connection was refused (TCP reset, ICMP port unreachable).
    Refused,
    /// Nothing came back in time.
    Silence,
    /// An ICMP network or host unreachable came back: the address is routed nowhere (a
    /// ClusterIP before the agents have its Service, on a node without a default route).
    Unreachable,
}

/// Servers answering with their pod's address and their port, on TCP and UDP `port`, in each
/// backend pod, until dropped.
pub struct BackendServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServers {
    pub fn start(backends: &[&dyn Host], port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Self {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for backend in backends {
            let ip = SocketAddrV4::new(backend.ip(), port);
            let bound = backend
                .netns()
                .run(|| -> io::Result<(TcpListener, UdpSocket)> {
                    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                    listener.set_nonblocking(true)?;
                    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                    socket.set_read_timeout(Some(STOP_POLL))?;
                    Ok((listener, socket))
                })?;
            let (listener, socket) = bound.map_err(Error::io(format!(
                "binding port {port} in {}",
                backend.label()
            )))?;
            let tcp_stop = Arc::clone(&stop);
            servers
                .threads
                .push(thread::spawn(move || serve_tcp(&listener, ip, &tcp_stop)));
            let udp_stop = Arc::clone(&stop);
            servers
                .threads
                .push(thread::spawn(move || serve_udp(&socket, ip, &udp_stop)));
        }
        Ok(servers)
    }
}

impl Drop for BackendServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `<backend address:port> <client address:port as seen>`.
fn answer_to(ip: SocketAddrV4, peer: SocketAddr) -> String {
    format!("{ip} {peer}\n")
}

fn serve_tcp(listener: &TcpListener, ip: SocketAddrV4, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                // The client reads until the server closes.
                let _ = io::Write::write_all(&mut stream, answer_to(ip, peer).as_bytes());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                eprintln!("backend server {ip}: accept failed: {e}");
                return;
            }
        }
    }
}

fn serve_udp(socket: &UdpSocket, ip: SocketAddrV4, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(answer_to(ip, peer).as_bytes(), peer);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => {
                eprintln!("backend server {ip}: receiving failed: {e}");
                return;
            }
        }
    }
}

/// `from` asks `frontend` once, on a new connection.
pub fn ask(from: &dyn Host, frontend: SocketAddrV4, protocol: Protocol) -> Result<Answer> {
    Ok(ask_many(from, frontend, protocol, 1)?[0])
}

/// `from` asks `frontend` `times` times, each on a new connection (a new source port).
pub fn ask_many(
    from: &dyn Host,
    frontend: SocketAddrV4,
    protocol: Protocol,
    times: usize,
) -> Result<Vec<Answer>> {
    Ok(ask_many_seen(from, frontend, protocol, times)?
        .into_iter()
        .map(|(answer, _)| answer)
        .collect())
}

/// [`ask_many`], each answer with the address the backend saw the question come from (`None`
/// when no backend answered).
pub fn ask_many_seen(
    from: &dyn Host,
    frontend: SocketAddrV4,
    protocol: Protocol,
    times: usize,
) -> Result<Vec<(Answer, Option<SocketAddrV4>)>> {
    let answers = from.netns().run(|| {
        (0..times)
            .map(|_| match protocol {
                Protocol::Tcp => ask_tcp(frontend),
                Protocol::Udp => ask_udp(frontend),
            })
            .collect::<io::Result<Vec<_>>>()
    })?;
    answers.map_err(|e| Error::Traffic {
        what: format!("{} asking {protocol:?} {frontend}: {e}", from.label()),
    })
}

/// `from` asks `frontend` once: the answer, and where the backend saw it come from.
pub fn ask_seen(
    from: &dyn Host,
    frontend: SocketAddrV4,
    protocol: Protocol,
) -> Result<(Answer, Option<SocketAddrV4>)> {
    Ok(ask_many_seen(from, frontend, protocol, 1)?[0])
}

/// How many of `answers` each backend gave; any other answer is an error naming it.
pub fn tally(answers: &[Answer]) -> Result<BTreeMap<SocketAddrV4, usize>> {
    let mut by_backend = BTreeMap::new();
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Answer::Backend(ip) => *by_backend.entry(*ip).or_insert(0) += 1,
            other => {
                return Err(Error::Traffic {
                    what: format!("question {i} of {} got {other:?}", answers.len()),
                });
            }
        }
    }
    Ok(by_backend)
}

type Seen = (Answer, Option<SocketAddrV4>);

fn ask_tcp(frontend: SocketAddrV4) -> io::Result<Seen> {
    let unanswered = |answer| Ok((answer, None));
    let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(frontend), ANSWER_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return unanswered(Answer::Refused);
        }
        Err(e) if is_timeout(&e) => return unanswered(Answer::Silence),
        Err(e) if is_unreachable(&e) => return unanswered(Answer::Unreachable),
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut text = String::new();
    match stream.read_to_string(&mut text) {
        Ok(_) => parse_answer(&text),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => unanswered(Answer::Refused),
        Err(e) if is_timeout(&e) => unanswered(Answer::Silence),
        Err(e) => Err(e),
    }
}

fn ask_udp(frontend: SocketAddrV4) -> io::Result<Seen> {
    ask_on(&connected_udp(frontend)?)
}

/// A UDP socket connected to `frontend` (so that an ICMP port unreachable comes back as
/// ECONNREFUSED), in the namespace of the calling thread.
pub fn connected_udp(frontend: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(frontend)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT / UDP_TRIES))?;
    Ok(socket)
}

/// Asks once on a socket of [`connected_udp`]: the same flow every time.
pub fn ask_connected_udp(socket: &UdpSocket) -> io::Result<Answer> {
    ask_on(socket).map(|(answer, _)| answer)
}

fn ask_on(socket: &UdpSocket) -> io::Result<Seen> {
    let mut buf = [0u8; 64];
    for _ in 0..UDP_TRIES {
        socket.send(b"?")?;
        match socket.recv(&mut buf) {
            Ok(n) => return parse_answer(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Ok((Answer::Refused, None));
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) if is_unreachable(&e) => return Ok((Answer::Unreachable, None)),
            Err(e) => return Err(e),
        }
    }
    Ok((Answer::Silence, None))
}

/// `<backend> <client as seen>` (see `answer_to`).
fn parse_answer(text: &str) -> io::Result<Seen> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answer {text:?} is not two addresses"),
        )
    };
    let (backend, peer) = text.trim().split_once(' ').ok_or_else(bad)?;
    let backend = backend.parse().map_err(|_| bad())?;
    let peer = peer.parse().map_err(|_| bad())?;
    Ok((Answer::Backend(backend), Some(peer)))
}

fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable
    )
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Asks until `done` holds for the answer, failing after `within`: the agents take a moment to
/// see a change.
pub fn ask_until(
    from: &dyn Host,
    frontend: SocketAddrV4,
    protocol: Protocol,
    within: Duration,
    done: impl Fn(Answer) -> bool,
) -> Result<Answer> {
    let deadline = Instant::now() + within;
    loop {
        let answer = ask(from, frontend, protocol)?;
        if done(answer) {
            return Ok(answer);
        }
        if Instant::now() > deadline {
            return Err(Error::Traffic {
                what: format!(
                    "{} asking {protocol:?} {frontend}: still {answer:?} after {within:?}",
                    from.label()
                ),
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A port of a Service, and the port its backends listen on.
#[derive(Debug, Clone, Copy)]
pub struct ServicePort<'a> {
    pub name: &'a str,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
}

/// A Service of type ClusterIP with `ports`, as the API server stores it (the ClusterIP
/// allocated); `spec` is merged into its spec (`sessionAffinity`, `internalTrafficPolicy`, ...).
pub fn cluster_ip_service(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[ServicePort<'_>],
    spec: Value,
) -> Value {
    let mut full = json!({
        "type": "ClusterIP",
        "clusterIP": cluster_ip.to_string(),
        "clusterIPs": [cluster_ip.to_string()],
        "ports": ports.iter().map(|p| json!({
            "name": p.name,
            "protocol": p.protocol.as_str(),
            "port": p.port,
            "targetPort": p.target_port,
        })).collect::<Vec<_>>(),
    });
    if let (Some(full), Value::Object(extra)) = (full.as_object_mut(), spec) {
        full.extend(extra);
    }
    cluster::service_object(namespace, name, full)
}

/// A backend as an EndpointSlice lists it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub node: String,
    pub ready: bool,
    /// Shutting down; it still serves (`serving` is `ready || terminating`).
    pub terminating: bool,
}

impl Backend {
    /// A running, ready backend on `node`.
    pub fn ready(ip: Ipv4Addr, node: &str) -> Self {
        Self {
            ip,
            node: node.to_string(),
            ready: true,
            terminating: false,
        }
    }

    /// A backend shutting down that still serves (graceful termination).
    pub fn terminating(ip: Ipv4Addr, node: &str) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(ip, node)
        }
    }

    /// Neither ready nor serving (failing its readiness probe).
    pub fn unready(ip: Ipv4Addr, node: &str) -> Self {
        Self {
            ready: false,
            ..Self::ready(ip, node)
        }
    }
}

/// The EndpointSlice the endpointslice controller writes for Service `service`: its ports by
/// the Service ports' names, with the target ports.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[ServicePort<'_>],
    backends: &[Backend],
) -> Value {
    let endpoints = backends
        .iter()
        .map(|b| cluster::slice_endpoint(&b.ip.to_string(), b.ready, b.terminating, &b.node))
        .collect();
    let ports: Vec<(&str, u16, &str)> = ports
        .iter()
        .map(|p| (p.name, p.target_port, p.protocol.as_str()))
        .collect();
    cluster::endpoint_slice_object(namespace, name, service, endpoints, &ports)
}

/// How a client process asks a frontend ([`ask_from_process`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketQuestion {
    /// `connect()`, `getpeername()`, read the answer until the server closes.
    Tcp,
    /// `connect()` a UDP socket, `getpeername()`, `send()`, `recvfrom()`.
    ConnectedUdp,
    /// `sendto()` on an unconnected UDP socket, `recvfrom()`.
    UnconnectedUdp,
}

impl SocketQuestion {
    fn as_str(self) -> &'static str {
        match self {
            SocketQuestion::Tcp => "tcp",
            SocketQuestion::ConnectedUdp => "udp-connected",
            SocketQuestion::UnconnectedUdp => "udp",
        }
    }
}

/// What a client process saw for one question: the answer (the backend's address and port),
/// the peer `getpeername()` reported, the source `recvfrom()` reported, or the error (an errno
/// name such as `ECONNREFUSED`, or `timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SocketAnswer {
    pub answer: Option<SocketAddrV4>,
    pub peer: Option<SocketAddrV4>,
    pub source: Option<SocketAddrV4>,
    pub error: Option<String>,
    /// How long the question took, in milliseconds.
    pub millis: u64,
}

/// The client: one process asking `times` times, each on a new socket, printing one JSON list.
/// A process, not a thread of the harness: the socket programs act on the sockets of
/// processes in a cgroup, and a thread cannot be moved into one alone.
const SOCKET_CLIENT: &str = r#"
import errno, json, socket, sys, time
mode, host, port, times = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def addr(a):
    return "%s:%d" % (a[0], a[1])
out = []
for _ in range(times):
    r = {}
    start = time.monotonic()
    try:
        if mode == "tcp":
            s = socket.create_connection((host, port), timeout=0.8)
            r["peer"] = addr(s.getpeername())
            data = b""
            while True:
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
            r["answer"] = data.decode().strip()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.8)
            if mode == "udp-connected":
                s.connect((host, port))
                r["peer"] = addr(s.getpeername())
                s.send(b"?")
            else:
                s.sendto(b"?", (host, port))
            data, source = s.recvfrom(64)
            r["answer"] = data.decode().strip()
            r["source"] = addr(source)
        s.close()
    except socket.timeout:
        r["error"] = "timeout"
    except OSError as e:
        r["error"] = errno.errorcode.get(e.errno, str(e))
    r["millis"] = int((time.monotonic() - start) * 1000)
    out.append(r)
print(json.dumps(out))
"#;

/// Asks `frontend` `times` times from a new process in `from`'s network namespace, moved into
/// `cgroup` when given (see [`crate::cgroup::TestCgroup`]).
pub fn ask_from_process(
    from: &dyn Host,
    cgroup: Option<&crate::cgroup::TestCgroup>,
    question: SocketQuestion,
    frontend: SocketAddrV4,
    times: usize,
) -> Result<Vec<SocketAnswer>> {
    let mut cmd = from.netns().command("python3")?;
    if let Some(cgroup) = cgroup {
        cgroup.enter(&mut cmd)?;
    }
    cmd.arg("-c")
        .arg(SOCKET_CLIENT)
        .arg(question.as_str())
        .arg(frontend.ip().to_string())
        .arg(frontend.port().to_string())
        .arg(times.to_string());
    let out = crate::process::run_ok(cmd, Duration::from_secs(5 + 2 * times as u64))?;
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).map_err(Error::json(format!(
        "parsing the answers {} got from {frontend}",
        from.label()
    )))?;
    // An answer is `<backend> <client as the backend saw it>`: the first address names it.
    let address = |v: &Value, key: &str| -> Option<SocketAddrV4> {
        v.get(key)
            .and_then(Value::as_str)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
    };
    Ok(listed
        .iter()
        .map(|v| SocketAnswer {
            answer: address(v, "answer"),
            peer: address(v, "peer"),
            source: address(v, "source"),
            error: v.get("error").and_then(Value::as_str).map(str::to_string),
            millis: v.get("millis").and_then(Value::as_u64).unwrap_or(0),
        })
        .collect())
}

/// A client process that connects a UDP socket to a frontend, asks once, then keeps the socket
/// and waits for up to 10 s for an error on it (`ECONNABORTED` when the socket is destroyed).
const HELD_UDP_CLIENT: &str = r#"
import errno, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.8)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"?")
print(s.recv(64).decode().strip(), flush=True)
s.settimeout(0.2)
result = "timeout"
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        s.recv(64)
    except socket.timeout:
        continue
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e))
        break
print(result, flush=True)
"#;

/// A connected UDP socket held by a client process ([`HELD_UDP_CLIENT`]), in `from`'s network
/// namespace and, when given, in `cgroup`.
pub struct HeldUdpClient {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// The backend that answered its question.
    pub backend: SocketAddrV4,
}

impl HeldUdpClient {
    pub fn start(
        from: &dyn Host,
        cgroup: Option<&crate::cgroup::TestCgroup>,
        frontend: SocketAddrV4,
    ) -> Result<Self> {
        use std::io::BufRead as _;
        let mut cmd = from.netns().command("python3")?;
        if let Some(cgroup) = cgroup {
            cgroup.enter(&mut cmd)?;
        }
        cmd.arg("-c")
            .arg(HELD_UDP_CLIENT)
            .arg(frontend.ip().to_string())
            .arg(frontend.port().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: "python3 (held UDP client)".into(),
            source,
        })?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().transpose().ok().flatten().unwrap_or_default();
        let backend = match first.split_whitespace().next().unwrap_or_default().parse() {
            Ok(backend) => backend,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Traffic {
                    what: format!("a held UDP client to {frontend} got no answer: {first:?}"),
                });
            }
        };
        Ok(Self {
            child,
            lines,
            backend,
        })
    }

    /// What happened to its socket: the error name it got (`ECONNABORTED`), or `timeout` when
    /// nothing did within its 10 s.
    pub fn outcome(mut self) -> Result<String> {
        let line = self.lines.next().transpose().ok().flatten();
        let _ = self.child.wait();
        line.ok_or_else(|| Error::Traffic {
            what: "a held UDP client ended without saying what happened".into(),
        })
    }
}

impl Drop for HeldUdpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections `node`'s `lb_flows` holds from `client` to `frontend`: those `from_container`
/// translated per packet (the socket programs write none).
pub fn lb_flows_from(node: &crate::Node, client: Ipv4Addr, frontend: Ipv4Addr) -> Result<usize> {
    let octets = |v: &Value| -> Vec<u64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let wanted = |ip: Ipv4Addr| -> Vec<u64> { ip.octets().iter().map(|o| u64::from(*o)).collect() };
    let (client, frontend) = (wanted(client), wanted(frontend));
    Ok(node
        .dump_map("lb_flows")?
        .iter()
        .map(|e| &e["formatted"]["key"])
        .filter(|k| octets(&k["saddr"]) == client && octets(&k["daddr"]) == frontend)
        .count())
}
