//! Echo servers that stay up, and short probes run many at once: what a reachability matrix
//! needs.
//!
//! [`crate::traffic`] runs one exchange at a time against a server started for it, and waits
//! long enough for any allowed exchange. A policy matrix sends more than a hundred probes per
//! case and every denied one can only time out, so here the servers live as long as the test,
//! every probe runs at once on its own thread, and the timeout is short.

use std::{
    fmt,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{
    Error, Result,
    netns::Netns,
    traffic::{Host, ping_within, tcp_round_trip, token, udp_round_trip},
};

/// How often idle server threads look at their stop flag; also the longest a drop waits.
const STOP_POLL: Duration = Duration::from_millis(50);

/// What a probe asks of its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// A line echoed over a new TCP connection to this port.
    Tcp(u16),
    /// A datagram echoed from this UDP port.
    Udp(u16),
    /// An ICMP echo request answered by the destination's kernel.
    Ping,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Tcp(port) => write!(f, "tcp/{port}"),
            Service::Udp(port) => write!(f, "udp/{port}"),
            Service::Ping => f.write_str("ping"),
        }
    }
}

/// TCP and UDP echo servers on fixed ports inside one network namespace, until dropped. A TCP
/// connection gets every line it sends echoed, for as long as it stays open.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServers {
    /// Binds TCP and UDP `ports` on every address of `netns`. The sockets are created inside
    /// the namespace and stay in it, so the threads serving them need not enter it.
    pub fn start(netns: &Netns, ports: &[u16]) -> Result<Self> {
        let bound = netns.run(|| -> io::Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
            let mut listeners = Vec::new();
            let mut sockets = Vec::new();
            for &port in ports {
                listeners.push(TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?);
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                socket.set_read_timeout(Some(STOP_POLL))?;
                sockets.push(socket);
            }
            Ok((listeners, sockets))
        })?;
        let (listeners, sockets) = bound.map_err(Error::io(format!(
            "binding echo servers on ports {ports:?} in {}",
            netns.name()
        )))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for listener in listeners {
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || serve_tcp(&listener, &stop)));
        }
        for socket in sockets {
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || serve_udp(&socket, &stop)));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            // A server thread that panicked has said why on stderr already.
            let _ = t.join();
        }
    }
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            match readable(listener, STOP_POLL) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    eprintln!("echo server: waiting for connections failed: {e}");
                    return;
                }
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    scope.spawn(move || echo_lines(&stream, stop));
                }
                // The client gave up between poll and accept: nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    eprintln!("echo server: accept failed: {e}");
                    return;
                }
            }
        }
    });
}

/// Echoes every line until the peer closes, the connection fails, or `stop`.
fn echo_lines(stream: &TcpStream, stop: &AtomicBool) {
    if stream.set_read_timeout(Some(STOP_POLL)).is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // A timeout leaves what was read so far in `line`; the next call appends to it.
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                let mut writer = stream;
                if writer.write_all(&line).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                // A lost answer is what UDP allows; the client sends again.
                let _ = socket.send_to(&buf[..n], peer);
            }
            Err(e) if is_timeout(&e) => {}
            // An ICMP error about an earlier answer: the next datagram is unaffected.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                eprintln!("echo server: receiving failed: {e}");
                return;
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Whether `socket` becomes readable (for a listener: has a connection to accept) in `timeout`.
fn readable(socket: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd that lives across the call; the fd is open while `socket` is.
    let n = unsafe { libc::poll(&mut fd, 1, millis) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

/// One probe: `service` of `to`, asked from `from`.
#[derive(Clone, Copy)]
pub struct ProbeOf<'a> {
    pub from: &'a (dyn Host + Sync),
    pub to: &'a (dyn Host + Sync),
    pub service: Service,
}

/// How a socket probe talks to its destination: [`tcp_round_trip`] or [`udp_round_trip`].
type RoundTrip = fn(SocketAddr, &[u8], Duration) -> io::Result<Duration>;

/// A TCP or UDP probe: its index among all probes, where it goes and how.
type SocketProbe = (usize, SocketAddr, RoundTrip);

/// Runs every probe at once and returns their outcomes in order: `Err` says why a probe got no
/// answer within `timeout`. TCP and UDP probes run on threads spawned by a thread that entered
/// the source's namespace (new threads start in their creator's namespace); pings are `ping`
/// processes.
pub fn probe_all(probes: &[ProbeOf<'_>], timeout: Duration) -> Result<Vec<Result<(), String>>> {
    let mut outcomes: Vec<Result<(), String>> = vec![Ok(()); probes.len()];
    // Socket probes grouped by source namespace: one setns per source, not per probe.
    let mut by_source: Vec<(&Netns, Vec<SocketProbe>)> = Vec::new();
    let mut pings = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        let (port, round_trip): (u16, RoundTrip) = match p.service {
            Service::Tcp(port) => (port, tcp_round_trip),
            Service::Udp(port) => (port, udp_round_trip),
            Service::Ping => {
                pings.push(i);
                continue;
            }
        };
        let probe = (i, SocketAddr::from((p.to.ip(), port)), round_trip);
        let netns = p.from.netns();
        match by_source.iter_mut().find(|(n, _)| n.name() == netns.name()) {
            Some((_, list)) => list.push(probe),
            None => by_source.push((netns, vec![probe])),
        }
    }
    thread::scope(|scope| -> Result<()> {
        let mut sources = Vec::new();
        for (netns, socket_probes) in &by_source {
            sources.push(scope.spawn(move || {
                netns.run(|| {
                    thread::scope(|inner| {
                        let running: Vec<_> = socket_probes
                            .iter()
                            .map(|&(i, addr, round_trip)| {
                                let outcome = inner.spawn(move || {
                                    round_trip(addr, &token(), timeout)
                                        .map(drop)
                                        .map_err(|e| e.to_string())
                                });
                                (i, outcome)
                            })
                            .collect();
                        running
                            .into_iter()
                            .map(|(i, t)| (i, join(t)))
                            .collect::<Vec<_>>()
                    })
                })
            }));
        }
        let pinging: Vec<_> = pings
            .iter()
            .map(|&i| {
                let p = probes[i];
                let outcome = scope.spawn(move || {
                    ping_within(p.from, p.to, timeout)
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
                (i, outcome)
            })
            .collect();
        for source in sources {
            for (i, outcome) in join(source)? {
                outcomes[i] = outcome;
            }
        }
        for (i, outcome) in pinging {
            outcomes[i] = join(outcome);
        }
        Ok(())
    })?;
    Ok(outcomes)
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_read_like_port_specs() {
        assert_eq!(Service::Tcp(80).to_string(), "tcp/80");
        assert_eq!(Service::Udp(81).to_string(), "udp/81");
        assert_eq!(Service::Ping.to_string(), "ping");
    }
}
