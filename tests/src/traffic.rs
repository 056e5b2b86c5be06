//! Real traffic between namespaces: ping, TCP echo and UDP echo, each bounded in time, and
//! servers that tell the client which source address they saw (for NAT).
//!
//! Servers and clients are std sockets on threads that entered the right namespace
//! ([`Netns::run`]); only ping is a child process.

use std::{
    io::{self, BufRead, BufReader, Read as _, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Result, netns::Netns, process};

/// How long one exchange may take. Everything here crosses veths on one machine, where a round
/// trip takes well under a millisecond; the margin is for a loaded 2-core machine.
pub const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(2);

/// Something that can send and receive: a pod, a node, a bare namespace.
pub trait Host {
    /// For messages: `frontend (10.244.0.2)`.
    fn label(&self) -> String;
    fn netns(&self) -> &Netns;
    fn ip(&self) -> Ipv4Addr;
}

/// A namespace and one of its addresses, for namespaces that are neither pod nor node.
pub struct NetnsHost<'a> {
    pub netns: &'a Netns,
    pub ip: Ipv4Addr,
}

impl Host for NetnsHost<'_> {
    fn label(&self) -> String {
        format!("{} ({})", self.netns.name(), self.ip)
    }
    fn netns(&self) -> &Netns {
        self.netns
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// One ICMP echo (`ping -c1 -W1`) from `from` to `to`; returns the round trip ping reports.
pub fn ping(from: &dyn Host, to: &dyn Host) -> Result<Duration> {
    ping_within(from, to, Duration::from_secs(1))
}

/// One ICMP echo from `from` to `to` that waits at most `timeout` for the reply.
pub fn ping_within(from: &dyn Host, to: &dyn Host, timeout: Duration) -> Result<Duration> {
    let mut cmd = from.netns().command("ping")?;
    // iputils takes fractions of a second for -W.
    let wait = format!("-W{:.3}", timeout.as_secs_f64());
    cmd.args(["-n", "-c1", &wait, &to.ip().to_string()]);
    let out = process::run(cmd, &[], Duration::from_secs(5))?;
    let text = out.stdout_text();
    if !out.status.success() {
        return Err(Error::Traffic {
            what: format!(
                "ping from {} to {} failed: {}{}",
                from.label(),
                to.label(),
                text.trim(),
                out.stderr_text().trim()
            ),
        });
    }
    Ok(parse_ping_time(&text).unwrap_or(out.elapsed))
}

/// `... time=0.045 ms` from ping's reply line.
fn parse_ping_time(output: &str) -> Option<Duration> {
    let after = output.split("time=").nth(1)?;
    let ms: f64 = after.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1000.0))
}

/// A TCP server in `to` (port 0: any free port) accepts one connection from `from`, which
/// sends a line and expects it back. Returns the time from connect to the echoed line.
pub fn tcp_echo(from: &dyn Host, to: &dyn Host, port: u16) -> Result<Duration> {
    exchange(from, to, port, "TCP", serve_tcp_once, tcp_client)
}

/// A UDP server in `to` echoes datagrams; the client in `from` sends one and resends until the
/// echo arrives or [`TRAFFIC_TIMEOUT`] passes. Returns the round trip of the answered datagram.
pub fn udp_echo(from: &dyn Host, to: &dyn Host, port: u16) -> Result<Duration> {
    exchange(from, to, port, "UDP", serve_udp, udp_client)
}

/// The source address a TCP server in `to` saw when `from` connected: `from`'s own address,
/// or the one a NAT on the way put in its place (pod traffic leaving the cluster shows its
/// node's address once masqueraded). The server answers the client's line with it.
pub fn tcp_source_seen(from: &dyn Host, to: &dyn Host, port: u16) -> Result<SocketAddrV4> {
    exchange(
        from,
        to,
        port,
        "TCP",
        serve_tcp_once_telling_source,
        tcp_source_client,
    )
}

/// Like [`tcp_source_seen`] for UDP: the server echoes the datagram followed by the source
/// address it came from.
pub fn udp_source_seen(from: &dyn Host, to: &dyn Host, port: u16) -> Result<SocketAddrV4> {
    exchange(
        from,
        to,
        port,
        "UDP",
        serve_udp_telling_source,
        udp_source_client,
    )
}

/// How much [`tcp_bulk`] sends.
pub const BULK_BYTES: usize = 1 << 20;

/// `from` sends [`BULK_BYTES`] over one TCP connection to a server in `to`, which answers with
/// how many it received: a transfer of many full-size segments, where a wrong MTU on the path
/// shows (small exchanges fit any path). Returns the time it took.
pub fn tcp_bulk(from: &dyn Host, to: &dyn Host, port: u16) -> Result<Duration> {
    exchange(from, to, port, "TCP", serve_tcp_count, tcp_bulk_client)
}

type Server = fn(u16, mpsc::Sender<io::Result<u16>>, &AtomicBool) -> io::Result<()>;
type Client<T> = fn(SocketAddr, &[u8]) -> io::Result<T>;

/// Starts `server` inside `to`, waits until it listens, runs `client` inside `from`, then
/// stops the server and reports whichever side failed.
fn exchange<T: Send>(
    from: &dyn Host,
    to: &dyn Host,
    port: u16,
    protocol: &str,
    server: Server,
    client: Client<T>,
) -> Result<T> {
    let failed = |stage: &str, detail: String| Error::Traffic {
        what: format!(
            "{protocol} from {} to {} port {port}: {stage}: {detail}",
            from.label(),
            to.label()
        ),
    };
    let stop = AtomicBool::new(false);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_netns = to.netns();
    thread::scope(|scope| {
        let stop = &stop;
        let serving = scope.spawn(move || server_netns.run(move || server(port, ready_tx, stop)));
        let bound = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(bound)) => bound,
            Ok(Err(e)) => return Err(failed("server could not listen", e.to_string())),
            // The server thread ended before listening (or hangs): its own result says why.
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                let why = match join(serving) {
                    Err(e) => format!("{e:?}"),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "it ended without listening".to_string(),
                };
                return Err(failed("server did not start", why));
            }
        };
        let message = token();
        let addr = SocketAddr::from((to.ip(), bound));
        let client_result = from.netns().run(|| client(addr, &message));
        stop.store(true, Ordering::Relaxed);
        let server_result = join(serving);
        let answer = client_result?.map_err(|e| failed("client", e.to_string()))?;
        server_result?.map_err(|e| failed("server", e.to_string()))?;
        Ok(answer)
    })
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A line no earlier exchange sent, so that a stale answer cannot pass for this one.
pub(crate) fn token() -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "myelin-echo {} {}\n",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

fn serve_tcp_once(
    port: u16,
    ready: mpsc::Sender<io::Result<u16>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    serve_one_tcp_connection(port, ready, stop, false)
}

fn serve_tcp_once_telling_source(
    port: u16,
    ready: mpsc::Sender<io::Result<u16>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    serve_one_tcp_connection(port, ready, stop, true)
}

/// Echoes one line of one connection, followed by a line with the connection's source address
/// when `tell_source`. Gives up when the client is done (`stop`) or after twice the traffic
/// timeout.
fn serve_one_tcp_connection(
    port: u16,
    ready: mpsc::Sender<io::Result<u16>>,
    stop: &AtomicBool,
    tell_source: bool,
) -> io::Result<()> {
    let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(|l| l.local_addr().map(|a| (l, a.port())))
    {
        Ok((listener, bound)) => {
            // The receiver only goes away when the caller gave up already.
            let _ = ready.send(Ok(bound));
            listener
        }
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    let deadline = Instant::now() + 2 * TRAFFIC_TIMEOUT;
    let (mut stream, source) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection arrived",
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TRAFFIC_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new(&stream).read_until(b'\n', &mut line)?;
    if tell_source {
        line.extend_from_slice(format!("{source}\n").as_bytes());
    }
    stream.write_all(&line)
}

/// Reads one connection to its end and answers with the number of bytes, as a line.
fn serve_tcp_count(
    port: u16,
    ready: mpsc::Sender<io::Result<u16>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
    listener.set_nonblocking(true)?;
    let _ = ready.send(listener.local_addr().map(|a| a.port()));
    let deadline = Instant::now() + 5 * TRAFFIC_TIMEOUT;
    let (mut stream, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection arrived",
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(5 * TRAFFIC_TIMEOUT))?;
    let received = io::copy(&mut (&stream).take(2 * BULK_BYTES as u64), &mut io::sink())?;
    stream.write_all(format!("{received}\n").as_bytes())
}

fn tcp_bulk_client(addr: SocketAddr, _: &[u8]) -> io::Result<Duration> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, TRAFFIC_TIMEOUT)?;
    stream.set_read_timeout(Some(5 * TRAFFIC_TIMEOUT))?;
    stream.set_write_timeout(Some(5 * TRAFFIC_TIMEOUT))?;
    (&stream).write_all(&vec![b'm'; BULK_BYTES])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim() != BULK_BYTES.to_string() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the server received {} of {BULK_BYTES} bytes", line.trim()),
        ));
    }
    Ok(started.elapsed())
}

fn tcp_client(addr: SocketAddr, message: &[u8]) -> io::Result<Duration> {
    tcp_round_trip(addr, message, TRAFFIC_TIMEOUT)
}

/// Sends `message`, expects it echoed and then the line with the source the server saw.
fn tcp_source_client(addr: SocketAddr, message: &[u8]) -> io::Result<SocketAddrV4> {
    let stream = TcpStream::connect_timeout(&addr, TRAFFIC_TIMEOUT)?;
    stream.set_read_timeout(Some(TRAFFIC_TIMEOUT))?;
    stream.set_write_timeout(Some(TRAFFIC_TIMEOUT))?;
    (&stream).write_all(message)?;
    let mut reader = BufReader::new(&stream);
    let mut echoed = Vec::new();
    reader.read_until(b'\n', &mut echoed)?;
    check_echo(message, &echoed)?;
    let mut source = Vec::new();
    reader.read_until(b'\n', &mut source)?;
    parse_source(&source)
}

/// A `<ipv4>:<port>` line from a server that tells the source it saw.
fn parse_source(line: &[u8]) -> io::Result<SocketAddrV4> {
    let text = String::from_utf8_lossy(line);
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the server's source line is not an IPv4 address and port: {text:?}"),
        )
    })
}

/// Connects to `addr`, sends `message` (one line) and expects it echoed, all within `timeout`.
pub(crate) fn tcp_round_trip(
    addr: SocketAddr,
    message: &[u8],
    timeout: Duration,
) -> io::Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    // What the connect left of the budget; never zero, which would mean "no timeout".
    let rest = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(rest))?;
    stream.set_write_timeout(Some(rest))?;
    stream.write_all(message)?;
    let mut echoed = Vec::new();
    BufReader::new(&stream).read_until(b'\n', &mut echoed)?;
    let rtt = started.elapsed();
    check_echo(message, &echoed)?;
    Ok(rtt)
}

fn serve_udp(port: u16, ready: mpsc::Sender<io::Result<u16>>, stop: &AtomicBool) -> io::Result<()> {
    serve_udp_datagrams(port, ready, stop, false)
}

fn serve_udp_telling_source(
    port: u16,
    ready: mpsc::Sender<io::Result<u16>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    serve_udp_datagrams(port, ready, stop, true)
}

/// Echoes every datagram until `stop`, followed by a line with its source address when
/// `tell_source`.
fn serve_udp_datagrams(
    port: u16,
    ready: mpsc::Sender<io::Result<u16>>,
    stop: &AtomicBool,
    tell_source: bool,
) -> io::Result<()> {
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        .and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(10)))
                .map(|()| s)
        })
        .and_then(|s| s.local_addr().map(|a| (s, a.port())))
    {
        Ok((socket, bound)) => {
            let _ = ready.send(Ok(bound));
            socket
        }
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    let deadline = Instant::now() + 2 * TRAFFIC_TIMEOUT;
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut answer = buf[..n].to_vec();
                if tell_source {
                    answer.extend_from_slice(format!("{peer}\n").as_bytes());
                }
                socket.send_to(&answer, peer)?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn udp_client(addr: SocketAddr, message: &[u8]) -> io::Result<Duration> {
    udp_round_trip(addr, message, TRAFFIC_TIMEOUT)
}

/// Expects the echo of `message` followed by the line with the source the server saw.
fn udp_source_client(addr: SocketAddr, message: &[u8]) -> io::Result<SocketAddrV4> {
    let (_, answer) = udp_exchange(addr, message, TRAFFIC_TIMEOUT)?;
    let (echoed, source) = answer.split_at(message.len().min(answer.len()));
    check_echo(message, echoed)?;
    parse_source(source)
}

/// Sends `message` to `addr` and resends until its echo arrives or `timeout` passes.
pub(crate) fn udp_round_trip(
    addr: SocketAddr,
    message: &[u8],
    timeout: Duration,
) -> io::Result<Duration> {
    let (rtt, answer) = udp_exchange(addr, message, timeout)?;
    check_echo(message, &answer)?;
    Ok(rtt)
}

/// The source ports UDP exchanges take, one after the other: below the kernel's ephemeral range
/// (32768-60999 by default) and Kubernetes' node ports (30000-32767).
const UDP_SOURCE_PORTS: std::ops::Range<u16> = 10_000..30_000;

static NEXT_UDP_SOURCE_PORT: AtomicU16 = AtomicU16::new(UDP_SOURCE_PORTS.start);

/// A UDP socket on a source port no other exchange of this process had lately (the ports go
/// round every 20,000 exchanges), so that every exchange is a flow of its own. With ports the
/// kernel picks at random, a probe now and then reused an earlier probe's tuple within
/// conntrack's UDP lifetime (the policy truth table probes 60 UDP pod pairs 32 times in 30 s:
/// about one reuse per run among 28,232 ports): it continued that flow and made no flow-log
/// event of its own, and the pods' latest event, checked against `policy explain`, was one
/// made under the case before. TCP's `connect` skips a tuple still in use or in TIME_WAIT.
fn fresh_udp_socket() -> io::Result<UdpSocket> {
    let span = UDP_SOURCE_PORTS.end - UDP_SOURCE_PORTS.start;
    for _ in 0..64 {
        let taken = NEXT_UDP_SOURCE_PORT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(UDP_SOURCE_PORTS.start + (p - UDP_SOURCE_PORTS.start + 1) % span)
            })
            .unwrap_or_else(|p| p);
        match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, taken)) {
            Ok(socket) => return Ok(socket),
            // A server of the namespace has it: the next one.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    }
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
}

/// Sends `message` to `addr` and resends until an answer arrives or `timeout` passes; returns
/// the round trip and the answer.
fn udp_exchange(
    addr: SocketAddr,
    message: &[u8],
    timeout: Duration,
) -> io::Result<(Duration, Vec<u8>)> {
    let socket = fresh_udp_socket()?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(200).min(timeout)))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let sent = Instant::now();
        socket.send(message)?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok((sent.elapsed(), buf[..n].to_vec())),
            // No answer yet: UDP may lose a datagram; send again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no echo within {timeout:?}"),
    ))
}

fn check_echo(sent: &[u8], echoed: &[u8]) -> io::Result<()> {
    if sent == echoed {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "echo mismatch: sent {:?}, got {:?}",
                String::from_utf8_lossy(sent),
                String::from_utf8_lossy(echoed)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_round_trip_of_a_ping_reply() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
                   64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.045 ms\n";
        assert_eq!(parse_ping_time(out), Some(Duration::from_micros(45)));
        assert_eq!(parse_ping_time("1 packets transmitted, 0 received"), None);
    }

    #[test]
    fn tokens_are_distinct_lines() {
        let (a, b) = (token(), token());
        assert_ne!(a, b);
        assert!(a.ends_with(b"\n") && a.iter().filter(|&&c| c == b'\n').count() == 1);
    }

    #[test]
    fn source_lines_parse_as_ipv4_socket_addresses() {
        assert_eq!(
            parse_source(b"192.168.1.10:40000\n").unwrap(),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 40000)
        );
        assert!(parse_source(b"").is_err());
        assert!(parse_source(b"[::1]:80\n").is_err());
    }

    #[test]
    fn udp_exchanges_take_ports_of_their_own_and_step_over_taken_ones() {
        let held = fresh_udp_socket().unwrap();
        let held_port = held.local_addr().unwrap().port();
        assert!(UDP_SOURCE_PORTS.contains(&held_port));
        // The port after it is taken by another socket: the next exchange steps over it (other
        // tests of this process may take ports in between, never the same ones).
        let next = held_port + 1;
        let blocker = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, next));
        let ports: Vec<u16> = (0..3)
            .map(|_| fresh_udp_socket().unwrap().local_addr().unwrap().port())
            .collect();
        assert!(ports.iter().all(|p| UDP_SOURCE_PORTS.contains(p)));
        assert!(!ports.contains(&held_port));
        if blocker.is_ok() {
            assert!(!ports.contains(&next));
        }
        assert!(ports.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn echo_mismatch_is_an_error() {
        assert!(check_echo(b"a\n", b"a\n").is_ok());
        assert!(check_echo(b"a\n", b"b\n").is_err());
    }
}
