//! The HTTP/1.1 server under the agent's API socket and its metrics endpoint, bounded so that no
//! client can stall the agent or exhaust it:
//! - a cap on open connections; at the cap, the connection that has gone longest without a
//!   request in flight is closed to make room (idle and half-sent ones go first, a request
//!   being served is never cut), so leaked or hostile idle connections cannot lock a CNI ADD out;
//! - a deadline for a request's headers, which also closes connections left idle, and a cap on
//!   their size;
//! - an accept loop that backs off when the process runs out of file descriptors, and logs
//!   once per interval, not once per attempt.
//!
//! Request bodies are bounded where they are read (`api::BoundedJson`).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::Request, response::Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener, UnixStream},
    sync::oneshot,
};
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// Bounds of one server.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From the first byte a connection may send (or from the end of its last answer, for a
    /// kept-alive one) to the end of the request's headers.
    pub header_timeout: Duration,
    /// Largest request head hyper buffers.
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
        }
    }
}

impl ServerLimits {
    /// The defaults, with a connection cap that keeps a quarter of the process's file
    /// descriptors for everything else the agent opens, however low its limit is set.
    pub fn within_fd_limit() -> Self {
        let mut limits = Self::default();
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } == 0 {
            let cap = usize::try_from(rlim.rlim_cur / 4).unwrap_or(usize::MAX);
            limits.max_connections = limits.max_connections.min(cap.max(4));
        }
        limits
    }
}

/// The first and the longest pause after an accept that failed for lack of resources.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line about failing accepts per this interval.
const ACCEPT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// A listening socket the server accepts from.
pub trait Listener: Send + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Listener for UnixListener {
    type Conn = UnixStream;

    async fn accept(&mut self) -> io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Conn = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<tokio::net::TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Whether an accept error means the process or the system ran out of something: waiting is
/// the only remedy, and retrying at once would spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The open connections: for each, since when it has had no request in flight (`None` while
/// one is), and how to close it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, Slot>,
}

struct Slot {
    in_flight: usize,
    idle_since: Instant,
    close: Option<oneshot::Sender<()>>,
}

type Shared = Arc<Mutex<Connections>>;

fn lock(c: &Shared) -> std::sync::MutexGuard<'_, Connections> {
    // A panic while holding this lock leaves bookkeeping at worst stale, never unsafe.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connections {
    fn register(&mut self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Slot {
                in_flight: 0,
                idle_since: Instant::now(),
                close: Some(tx),
            },
        );
        (id, rx)
    }

    /// Closes the connection idle the longest; false if every one has a request in flight.
    fn evict_idlest(&mut self) -> bool {
        let idlest = self
            .open
            .iter()
            .filter(|(_, s)| s.in_flight == 0 && s.close.is_some())
            .min_by_key(|(_, s)| s.idle_since)
            .map(|(id, _)| *id);
        match idlest.and_then(|id| self.open.get_mut(&id)?.close.take()) {
            Some(close) => {
                let _ = close.send(());
                true
            }
            None => false,
        }
    }

    fn request_started(&mut self, id: u64) {
        if let Some(s) = self.open.get_mut(&id) {
            s.in_flight += 1;
        }
    }

    fn request_done(&mut self, id: u64) {
        if let Some(s) = self.open.get_mut(&id) {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.idle_since = Instant::now();
        }
    }
}

/// Serves connections until the task is dropped; `route` picks the app for each connection
/// (the API refuses non-root peers with another one).
pub async fn serve<L: Listener>(
    mut listener: L,
    limits: ServerLimits,
    route: impl Fn(&L::Conn) -> Router + Send + 'static,
) {
    let connections: Shared = Arc::default();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failures_unreported = 0u64;
    let mut last_report: Option<Instant> = None;
    loop {
        // At the cap, make room by closing the idlest connection; if all are busy, wait for
        // one to finish (new clients wait in the kernel's queue meanwhile).
        loop {
            let room = {
                let mut c = lock(&connections);
                c.open.len() < limits.max_connections || c.evict_idlest()
            };
            if room {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let conn = match listener.accept().await {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF_MIN;
                conn
            }
            Err(e) => {
                failures_unreported += 1;
                if last_report.is_none_or(|t| t.elapsed() >= ACCEPT_REPORT_INTERVAL) {
                    warn!(
                        error = %e, failures = failures_unreported,
                        "accepting connections fails; backing off"
                    );
                    failures_unreported = 0;
                    last_report = Some(Instant::now());
                }
                if is_resource_exhaustion(&e) {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
                continue;
            }
        };
        let (id, closed) = lock(&connections).register();
        let app = tracked(route(&conn), Arc::clone(&connections), id);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes);
        let registry = Arc::clone(&connections);
        tokio::spawn(async move {
            let served =
                builder.serve_connection(TokioIo::new(conn), TowerToHyperService::new(app));
            tokio::select! {
                result = served => if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                },
                _ = closed => debug!("closed an idle connection to make room"),
            }
            lock(&registry).open.remove(&id);
        });
    }
}

/// `app`, with every request counted as in flight on connection `id` until its response body
/// is done (an event stream stays in flight for as long as it streams).
fn tracked(
    app: Router,
    connections: Shared,
    id: u64,
) -> tower::util::BoxCloneSyncService<Request<Incoming>, Response, std::convert::Infallible> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let connections = Arc::clone(&connections);
        async move {
            lock(&connections).request_started(id);
            let guard = InFlight { connections, id };
            let response = app.oneshot(req.map(Body::new)).await?;
            Ok(response.map(|body| {
                Body::new(GuardedBody {
                    inner: body,
                    _guard: guard,
                })
            }))
        }
    }))
}

/// Marks the request done when the response body is finished or dropped.
struct InFlight {
    connections: Shared,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.connections).request_done(self.id);
    }
}

struct GuardedBody {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A listener whose every accept fails as a process out of file descriptors sees it.
    struct Exhausted(Arc<AtomicUsize>);

    impl Listener for Exhausted {
        type Conn = tokio::net::UnixStream;

        async fn accept(&mut self) -> io::Result<Self::Conn> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        }
    }

    #[tokio::test]
    async fn out_of_file_descriptors_the_accept_loop_backs_off_instead_of_spinning() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(serve(
            Exhausted(Arc::clone(&attempts)),
            ServerLimits::default(),
            |_| Router::new(),
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.abort();
        // 10 ms doubling to 1 s: a handful of attempts in 2 s, where a spinning loop makes
        // millions.
        let n = attempts.load(Ordering::Relaxed);
        assert!((3..=12).contains(&n), "{n} accept attempts in 2 s");
    }

    #[test]
    fn eviction_picks_the_longest_idle_connection_and_never_a_busy_one() {
        let mut c = Connections::default();
        let (busy, mut busy_rx) = c.register();
        let (old, mut old_rx) = c.register();
        let (new, mut new_rx) = c.register();
        c.request_started(busy);
        // "old" went idle before "new".
        c.open.get_mut(&old).unwrap().idle_since = Instant::now() - Duration::from_secs(5);
        assert!(c.evict_idlest());
        assert!(old_rx.try_recv().is_ok(), "the idlest one is closed");
        assert!(new_rx.try_recv().is_err());
        assert!(c.evict_idlest());
        assert!(new_rx.try_recv().is_ok());
        assert!(!c.evict_idlest(), "only a busy connection is left");
        assert!(busy_rx.try_recv().is_err());
        c.request_done(busy);
        assert!(c.evict_idlest());
        let _ = new;
    }
}
