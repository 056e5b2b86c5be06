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
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    // Connected, so that an ICMP port unreachable comes back as ECONNREFUSED.
    socket.connect(frontend)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT / UDP_TRIES))?;
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
