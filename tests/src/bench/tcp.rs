//! One-byte TCP request/response traffic of our own: the round-trip rate over long-lived
//! connections, the connection rate (one new connection per request, so that every transaction
//! is a new flow and pays the policy lookup), and traffic that notices the moment a policy
//! change stops it, as a running flow or as new connections.
//!
//! sockperf, the Debian tool for ping-pong, cannot send fewer than 14 bytes and sleeps two
//! seconds in every TCP client run before it starts; these loops send exactly one byte each
//! way with blocking calls (a write and a read per side and round trip, as sockperf's).
//!
//! Sockets belong to the namespace they were created in: the server's listener is created by a
//! thread inside the server's namespace and then served from an ordinary thread; clients run on
//! a thread inside the client's namespace ([`Netns::run`]).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::cpus::{flow_cpu, pin_current_thread};
use crate::{Error, Result, traffic::Host};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A one-byte answer takes microseconds here; this long without one means the traffic is
/// stopped. TCP retransmits a lost segment after 200 ms at the earliest, so a single loss is not
/// mistaken for a stop only if this is longer.
const BLOCKED_AFTER: Duration = Duration::from_millis(300);
/// Answers the traffic must have had before the change, so that it really runs.
const WARM_ANSWERS: u64 = 100;
const WARM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a server thread waiting for input looks at its stop flag.
const SERVER_POLL: Duration = Duration::from_millis(50);
/// How long a flow runs before its round trips count: connection set-up and cold caches stay
/// out of the figure.
const RR_WARM_UP: Duration = Duration::from_millis(200);
/// A round trip this slow means the server stopped answering.
const RR_STALL: Duration = Duration::from_secs(5);

/// A TCP server that answers every byte with one byte, on the given CPU (the client of the same
/// flow shares it). Stops on drop.
///
/// The accepting thread serves each connection itself, as netperf's `TCP_CRR` server does: a
/// connection-rate run then measures the path, not the creation of a thread per connection
/// (that was about half of every connection's time here: 50 us per connection over loopback
/// with a thread each, 26 us served in place). A connection still open when another one waits
/// to be accepted is handed to a thread of its own, so concurrent clients are all served.
pub struct EchoServer {
    addr: SocketAddrV4,
    cpu: usize,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(host: &dyn Host, port: u16, cpu: usize) -> Result<Self> {
        let addr = SocketAddrV4::new(host.ip(), port);
        let listener = host
            .netns()
            .run(move || TcpListener::bind(addr))?
            .map_err(Error::io(format!("binding {addr} in {}", host.label())))?;
        listener
            .set_nonblocking(true)
            .map_err(Error::io("making the echo listener non-blocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let acceptor = thread::Builder::new()
            .name(format!("echo-{port}"))
            .spawn(move || {
                // Connection threads inherit this thread's CPU. Unpinned is still a server.
                let _ = pin_current_thread(cpu);
                accept_connections(&listener, &flag);
            })
            .map_err(Error::io("starting the echo server's thread"))?;
        Ok(Self {
            addr,
            cpu,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            // It only polls and accepts; it ends within one poll.
            let _ = acceptor.join();
        }
    }
}

fn accept_connections(listener: &TcpListener, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener, SERVER_POLL) {
            continue;
        }
        // The connection went away before we took it, or a transient failure: poll again.
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        if let Served::Interrupted(stream) = echo(stream, stop, Some(listener)) {
            let stop = Arc::clone(stop);
            // A connection that cannot get a thread is closed by dropping it; the client sees
            // that as an error.
            let _ = thread::Builder::new()
                .name("echo-conn".into())
                .spawn(move || echo(stream, &stop, None));
        }
    }
}

/// How [`echo`] left a connection.
enum Served {
    /// The peer closed it, it broke, or the server stops.
    Done,
    /// Another connection waits on the listener: this one still needs serving.
    Interrupted(TcpStream),
}

/// Round trips between two looks at the listener while serving a busy connection in place: a
/// poll every 64 round trips costs the flow nothing measurable and bounds a second client's
/// wait.
const LISTENER_CHECK_EVERY: u32 = 64;

/// Answers byte by byte until the peer closes, the connection breaks, or the server stops; or,
/// serving on the accepting thread (`listener`), until another connection waits there.
fn echo(mut stream: TcpStream, stop: &AtomicBool, listener: Option<&TcpListener>) -> Served {
    let ready = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(SERVER_POLL)));
    if ready.is_err() {
        return Served::Done;
    }
    let someone_waits = || listener.is_some_and(|l| readable(l, Duration::ZERO));
    let mut byte = [0u8; 1];
    let mut answered = 0u32;
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut byte) {
            Ok(0) => return Served::Done,
            Ok(_) => {
                if stream.write_all(&byte).is_err() {
                    return Served::Done;
                }
                answered = answered.wrapping_add(1);
                if answered.is_multiple_of(LISTENER_CHECK_EVERY) && someone_waits() {
                    return Served::Interrupted(stream);
                }
            }
            Err(e) if is_timeout(&e) => {
                if someone_waits() {
                    return Served::Interrupted(stream);
                }
            }
            Err(_) => return Served::Done,
        }
    }
    Served::Done
}

/// Aggregate round trips per second of `flows` parallel connections from `client` to
/// `server` (flow `i` to port `base_port + i`, client and server on flow `i`'s CPU), each
/// sending one byte and awaiting one byte back, over and over, for `duration` after a warm-up.
pub fn tcp_rr(
    client: &dyn Host,
    server: &dyn Host,
    base_port: u16,
    flows: usize,
    duration: Duration,
) -> Result<f64> {
    let mut servers = Vec::with_capacity(flows);
    for flow in 0..flows {
        let port = u16::try_from(flow)
            .ok()
            .and_then(|f| base_port.checked_add(f))
            .ok_or_else(|| Error::Traffic {
                what: format!("flow {flow} does not fit above port {base_port}"),
            })?;
        servers.push(EchoServer::start(server, port, flow_cpu(flow))?);
    }
    let netns = client.netns();
    let rates: Vec<Result<io::Result<f64>>> = thread::scope(|scope| {
        let running: Vec<_> = servers
            .iter()
            .enumerate()
            .map(|(flow, s)| {
                let addr = s.addr;
                scope.spawn(move || netns.run(move || rr_flow(addr, flow_cpu(flow), duration)))
            })
            .collect();
        running.into_iter().map(join).collect()
    });
    let mut total = 0.0;
    for (flow, rate) in rates.into_iter().enumerate() {
        total += rate?.map_err(|e| Error::Traffic {
            what: format!(
                "request/response flow {flow} from {} to {}: {e}",
                client.label(),
                server.label()
            ),
        })?;
    }
    Ok(total)
}

/// Round trips per second of one connection from `client` to `addr` (a server started
/// elsewhere, or an address translated to one: a Service), client pinned to `cpu`.
pub fn tcp_rr_to(
    client: &dyn Host,
    addr: SocketAddrV4,
    cpu: usize,
    duration: Duration,
) -> Result<f64> {
    client
        .netns()
        .run(|| rr_flow(addr, cpu, duration))?
        .map_err(|e| Error::Traffic {
            what: format!("request/response from {} to {addr}: {e}", client.label()),
        })
}

fn rr_flow(server: SocketAddrV4, cpu: usize, duration: Duration) -> io::Result<f64> {
    pin_current_thread(cpu)?;
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(server), CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(RR_STALL))?;
    reset_on_close(&stream)?;
    let mut byte = [1u8];
    let warm_until = Instant::now() + RR_WARM_UP;
    while Instant::now() < warm_until {
        round_trip(&mut stream, &mut byte)?;
    }
    let started = Instant::now();
    let mut round_trips = 0u64;
    loop {
        // Reading the clock costs little, but not nothing: every 16th round trip is enough.
        for _ in 0..16 {
            round_trip(&mut stream, &mut byte)?;
        }
        round_trips += 16;
        let elapsed = started.elapsed();
        if elapsed >= duration {
            return Ok(round_trips as f64 / elapsed.as_secs_f64());
        }
    }
}

fn round_trip(stream: &mut TcpStream, byte: &mut [u8; 1]) -> io::Result<()> {
    stream.write_all(byte.as_slice())?;
    stream.read_exact(byte.as_mut_slice())
}

/// New connections per second from `client` to `server` over `duration`: connect, one byte
/// each way, close with a reset (so that neither side keeps TIME_WAIT state that would run
/// the client out of ports). The client runs on the server's CPU.
pub fn tcp_crr(client: &dyn Host, server: &EchoServer, duration: Duration) -> Result<f64> {
    tcp_crr_spread(client, std::slice::from_ref(server), duration, u64::MAX).map(|r| r.rate())
}

/// What a connection-rate run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionRun {
    pub connections: u64,
    pub elapsed: Duration,
}

impl ConnectionRun {
    /// Connections per second.
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

/// Like [`tcp_crr`], with connection `i` to `servers[i % n]`, for `duration` or until every
/// server had `per_server` connections, whichever comes first: for paths where each
/// destination has a budget of connections (a NAT's ports per remote address and port). The
/// client runs on the first server's CPU.
pub fn tcp_crr_spread(
    client: &dyn Host,
    servers: &[EchoServer],
    duration: Duration,
    per_server: u64,
) -> Result<ConnectionRun> {
    let addrs: Vec<SocketAddrV4> = servers.iter().map(|s| s.addr).collect();
    let Some(cpu) = servers.first().map(|s| s.cpu) else {
        return Err(Error::Traffic {
            what: "a connection-rate run needs a server".into(),
        });
    };
    tcp_crr_to(client, &addrs, cpu, duration, per_server)
}

/// Like [`tcp_crr_spread`], to addresses (servers started elsewhere, or addresses translated
/// to them: a Service), the client pinned to `cpu`.
pub fn tcp_crr_to(
    client: &dyn Host,
    addrs: &[SocketAddrV4],
    cpu: usize,
    duration: Duration,
    per_addr: u64,
) -> Result<ConnectionRun> {
    let Some(first) = addrs.first().copied() else {
        return Err(Error::Traffic {
            what: "a connection-rate run needs an address".into(),
        });
    };
    let budget = per_addr.saturating_mul(addrs.len() as u64);
    let run = client.netns().run(|| -> io::Result<ConnectionRun> {
        pin_current_thread(cpu)?;
        let started = Instant::now();
        let mut connections = 0u64;
        for addr in addrs.iter().cycle() {
            if connections >= budget || started.elapsed() >= duration {
                break;
            }
            let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(*addr), CONNECT_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            stream.write_all(&[1])?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer)?;
            reset_on_close(&stream)?;
            connections += 1;
        }
        Ok(ConnectionRun {
            connections,
            elapsed: started.elapsed(),
        })
    })?;
    run.map_err(|e| {
        let to = match addrs.len() {
            1 => first.to_string(),
            n => format!("{n} ports of {} from {}", first.ip(), first.port()),
        };
        Error::Traffic {
            what: format!("connection rate from {} to {to}: {e}", client.label()),
        }
    })
}

/// Runs one-byte request/response traffic from `client` to `server` as one long connection,
/// calls `change` once it runs, and returns the time from the start of `change` to the last
/// answer: the request after it went unanswered for [`BLOCKED_AFTER`], so that is when the
/// change stopped the flow (to within one round trip). `None`: still answered `wait` after
/// the change.
pub fn time_until_flow_stops(
    client: &dyn Host,
    server: &EchoServer,
    wait: Duration,
    change: impl FnOnce() -> Result<()>,
) -> Result<Option<Duration>> {
    until_unanswered(client, server, wait, change, running_flow)
}

/// Like [`time_until_flow_stops`], but every request is a new connection (connect, one byte
/// each way, reset), so the time is until the first connection that gets no answer.
pub fn time_until_connections_fail(
    client: &dyn Host,
    server: &EchoServer,
    wait: Duration,
    change: impl FnOnce() -> Result<()>,
) -> Result<Option<Duration>> {
    until_unanswered(client, server, wait, change, new_connections)
}

/// Runs `traffic` on a thread in `client`'s namespace, calls `change` once it has had
/// [`WARM_ANSWERS`] answers, and waits up to `wait` for it to go unanswered.
fn until_unanswered(
    client: &dyn Host,
    server: &EchoServer,
    wait: Duration,
    change: impl FnOnce() -> Result<()>,
    traffic: fn(SocketAddrV4, &Flow) -> io::Result<FlowEnd>,
) -> Result<Option<Duration>> {
    let flow = Flow::default();
    let netns = client.netns();
    let (cpu, server) = (server.cpu, server.addr);
    let failed = |what: String| Error::Traffic {
        what: format!("traffic from {} to {server}: {what}", client.label()),
    };
    thread::scope(|scope| {
        let running = scope.spawn(|| {
            netns.run(|| {
                pin_current_thread(cpu)?;
                traffic(server, &flow)
            })
        });
        let warm_deadline = Instant::now() + WARM_TIMEOUT;
        while flow.answers.load(Ordering::Relaxed) < WARM_ANSWERS {
            if running.is_finished() || Instant::now() > warm_deadline {
                flow.stop.store(true, Ordering::Relaxed);
                let why = match join(running) {
                    Ok(Ok(FlowEnd::Unanswered)) => "went unanswered before the change".to_string(),
                    Ok(Ok(FlowEnd::Stopped)) => {
                        format!("fewer than {WARM_ANSWERS} answers within {WARM_TIMEOUT:?}")
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("{e:?}"),
                };
                return Err(failed(why));
            }
            thread::sleep(Duration::from_millis(1));
        }
        let changed_at = flow.nanos_since_start();
        if let Err(e) = change() {
            flow.stop.store(true, Ordering::Relaxed);
            let _ = join(running);
            return Err(e);
        }
        let deadline = Instant::now() + wait + BLOCKED_AFTER;
        while !running.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        flow.stop.store(true, Ordering::Relaxed);
        match join(running)? {
            Ok(FlowEnd::Unanswered) => {
                let last = flow.last_answer_nanos.load(Ordering::Relaxed);
                Ok(Some(Duration::from_nanos(last.saturating_sub(changed_at))))
            }
            Ok(FlowEnd::Stopped) => Ok(None),
            Err(e) => Err(failed(e.to_string())),
        }
    })
}

/// What the traffic thread and the caller share.
struct Flow {
    started: Instant,
    stop: AtomicBool,
    answers: AtomicU64,
    /// Since `started`.
    last_answer_nanos: AtomicU64,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            answers: AtomicU64::new(0),
            last_answer_nanos: AtomicU64::new(0),
        }
    }
}

impl Flow {
    fn nanos_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn answered(&self) {
        self.last_answer_nanos
            .store(self.nanos_since_start(), Ordering::Relaxed);
        self.answers.fetch_add(1, Ordering::Relaxed);
    }
}

enum FlowEnd {
    /// No answer for [`BLOCKED_AFTER`].
    Unanswered,
    /// The caller stopped it while it was still answered.
    Stopped,
}

/// One connection, one byte each way, over and over.
fn running_flow(server: SocketAddrV4, flow: &Flow) -> io::Result<FlowEnd> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(server), CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(BLOCKED_AFTER))?;
    // A blocked connection is abandoned with a reset rather than left retransmitting.
    reset_on_close(&stream)?;
    let mut answer = [0u8; 1];
    while !flow.stop.load(Ordering::Relaxed) {
        stream.write_all(&[1])?;
        match stream.read(&mut answer) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            Ok(_) => flow.answered(),
            Err(e) if is_timeout(&e) => return Ok(FlowEnd::Unanswered),
            Err(e) => return Err(e),
        }
    }
    Ok(FlowEnd::Stopped)
}

/// A new connection per byte each way, over and over.
fn new_connections(server: SocketAddrV4, flow: &Flow) -> io::Result<FlowEnd> {
    let mut answer = [0u8; 1];
    while !flow.stop.load(Ordering::Relaxed) {
        let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(server), BLOCKED_AFTER) {
            Ok(stream) => stream,
            Err(e) if is_timeout(&e) => return Ok(FlowEnd::Unanswered),
            Err(e) => return Err(e),
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(BLOCKED_AFTER))?;
        reset_on_close(&stream)?;
        stream.write_all(&[1])?;
        match stream.read(&mut answer) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            Ok(_) => flow.answered(),
            Err(e) if is_timeout(&e) => return Ok(FlowEnd::Unanswered),
            Err(e) => return Err(e),
        }
    }
    Ok(FlowEnd::Stopped)
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Whether `listener` has a connection waiting, within `timeout`.
fn readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd on a live socket, count 1.
    unsafe { libc::poll(&mut poll, 1, millis) > 0 }
}

/// SO_LINGER with a zero timeout: closing sends a reset and leaves no TIME_WAIT behind.
fn reset_on_close(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a pointer to a linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
