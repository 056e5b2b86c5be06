//! The local API (see `myelin_api` for the table of routes): HTTP/1.1 + JSON on a unix socket
//! with mode 0600, served only to root peers (checked with SO_PEERCRED on every connection,
//! because a socket's mode alone does not stop a process that inherited an open descriptor).
//!
//! Handlers hand their work to the agent's owner ([`AgentHandle`]) with the client's deadline.
//! Bodies are bounded in size ([`MAX_BODY`], 413 beyond) and in time ([`BODY_TIMEOUT`], 408);
//! connections in number and idle time (`http`).

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{FromRequest, FromRequestParts, Query, Request, State},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use myelin_api::{
    AllocateRequest, ApiError, AttachmentQuery, DEADLINE_HEADER, EndpointRequest, ErrorKind,
    FlowFilter, GcRequest, MAX_FLOWS_LAST,
};
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;
use tracing::{debug, warn};

use crate::{
    datapath::{DatapathOps, conntrack::ConntrackTable},
    events::{EventSender, FlowLog},
    http::{self, ServerLimits},
    owner::{AgentHandle, Deadline},
};

/// Largest request body: a GC request listing every attachment of a full node stays far below.
pub const MAX_BODY: usize = 1024 * 1024;
/// How long a request's body may take to arrive once its headers have.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Event streams open at once (`myelinctl monitor`); each holds a connection for as long as it
/// runs.
const MAX_EVENT_STREAMS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listening on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An [`ApiError`] as an HTTP answer.
pub struct ErrorResponse(ApiError);

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<ApiError> for ErrorResponse {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

fn invalid(message: impl Into<String>) -> ErrorResponse {
    ErrorResponse(ApiError::new(ErrorKind::InvalidRequest, message))
}

type ApiResult<T> = Result<Json<T>, ErrorResponse>;

/// The client's deadline ([`DEADLINE_HEADER`]), or [`Deadline::DEFAULT`] from now.
pub struct ClientDeadline(pub Deadline);

impl<S: Send + Sync> FromRequestParts<S> for ClientDeadline {
    type Rejection = ErrorResponse;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(DEADLINE_HEADER) else {
            return Ok(Self(Deadline::after(Deadline::DEFAULT)));
        };
        let millis: u64 = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                invalid(format!(
                    "{DEADLINE_HEADER} must be milliseconds since the Unix epoch"
                ))
            })?;
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
        Ok(Self(Deadline::at(at)))
    }
}

/// A JSON body, read within the state's body timeout ([`BODY_TIMEOUT`]) and [`MAX_BODY`].
pub struct BoundedJson<T>(pub T);

impl<T: DeserializeOwned, D> FromRequest<ApiState<D>> for BoundedJson<T>
where
    ApiState<D>: Send + Sync,
{
    type Rejection = ErrorResponse;

    async fn from_request(req: Request, state: &ApiState<D>) -> Result<Self, Self::Rejection> {
        let body = req.into_body();
        let timeout = state.body_timeout;
        let bytes = tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY))
            .await
            .map_err(|_| {
                ErrorResponse(ApiError::new(
                    ErrorKind::RequestTimeout,
                    format!("the request body did not arrive within {timeout:?}"),
                ))
            })?
            .map_err(|e| {
                // to_bytes fails only on a body over the limit or a broken connection.
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                if too_large {
                    ErrorResponse(ApiError::new(
                        ErrorKind::PayloadTooLarge,
                        format!("request bodies are limited to {MAX_BODY} bytes"),
                    ))
                } else {
                    invalid(format!("reading the request body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Self)
            .map_err(|e| invalid(format!("invalid request body: {e}")))
    }
}

/// What the API handlers share.
pub struct ApiState<D> {
    pub agent: AgentHandle<D>,
    pub events: EventSender,
    /// Where the conntrack map is pinned (listing reads it without the owner).
    pub conntrack_pin: PathBuf,
    pub event_streams: Arc<AtomicUsize>,
    pub body_timeout: Duration,
    /// The latest events (`GET /v1/flows`).
    pub flow_log: Arc<FlowLog>,
}

impl<D> Clone for ApiState<D> {
    fn clone(&self) -> Self {
        Self {
            agent: self.agent.clone(),
            events: self.events.clone(),
            conntrack_pin: self.conntrack_pin.clone(),
            event_streams: Arc::clone(&self.event_streams),
            body_timeout: self.body_timeout,
            flow_log: Arc::clone(&self.flow_log),
        }
    }
}

impl<D> ApiState<D> {
    pub fn new(agent: AgentHandle<D>, events: EventSender, conntrack_pin: PathBuf) -> Self {
        Self {
            agent,
            events,
            conntrack_pin,
            event_streams: Arc::default(),
            body_timeout: BODY_TIMEOUT,
            flow_log: Arc::new(FlowLog::new(0, 0, None)),
        }
    }

    pub fn with_flow_log(mut self, flow_log: Arc<FlowLog>) -> Self {
        self.flow_log = flow_log;
        self
    }
}

pub fn router<D: DatapathOps + 'static>(state: ApiState<D>) -> Router {
    Router::new()
        .route("/v1/ipam", post(allocate::<D>).delete(release::<D>))
        .route(
            "/v1/endpoints",
            put(put_endpoint::<D>)
                .get(list_endpoints::<D>)
                .delete(delete_endpoint::<D>),
        )
        .route("/v1/gc", post(gc::<D>))
        .route("/v1/status", get(status::<D>))
        .route("/v1/nodes", get(nodes::<D>))
        .route("/v1/policies", get(policies::<D>))
        .route("/v1/policy/explain", post(explain::<D>))
        .route("/v1/services", get(services::<D>))
        .route("/v1/drops", get(drops::<D>))
        .route("/v1/conntrack", get(conntrack::<D>))
        .route("/v1/events", get(events::<D>))
        .route("/v1/flows", get(flows::<D>))
        .fallback(|| async {
            ErrorResponse(ApiError::new(ErrorKind::NotFound, "no such API route"))
        })
        .with_state(state)
}

async fn allocate<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    BoundedJson(req): BoundedJson<AllocateRequest>,
) -> Result<(StatusCode, Json<myelin_api::Allocation>), ErrorResponse> {
    let allocation = s.agent.allocate(deadline, req).await?;
    Ok((StatusCode::CREATED, Json(allocation)))
}

async fn release<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    Query(q): Query<AttachmentQuery>,
) -> ApiResult<myelin_api::ReleaseResponse> {
    Ok(Json(s.agent.release(deadline, q.required()?).await?))
}

async fn put_endpoint<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    BoundedJson(req): BoundedJson<EndpointRequest>,
) -> ApiResult<myelin_api::Endpoint> {
    Ok(Json(s.agent.put_endpoint(deadline, req).await?))
}

async fn list_endpoints<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    Query(q): Query<AttachmentQuery>,
) -> ApiResult<Vec<myelin_api::Endpoint>> {
    let filter = q.optional()?;
    let list = s
        .agent
        .read(deadline, move |a| a.endpoints(filter.as_ref()))
        .await?;
    Ok(Json(list))
}

async fn delete_endpoint<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    Query(q): Query<AttachmentQuery>,
) -> ApiResult<myelin_api::DeleteResponse> {
    Ok(Json(
        s.agent.delete_endpoint(deadline, q.required()?).await?,
    ))
}

async fn gc<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    BoundedJson(req): BoundedJson<GcRequest>,
) -> ApiResult<myelin_api::GcResponse> {
    Ok(Json(s.agent.gc(deadline, req).await?))
}

async fn status<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
) -> ApiResult<myelin_api::Status> {
    let mut status = s.agent.read(deadline, |a| a.status()).await?;
    status.flows = Some(s.flow_log.info());
    Ok(Json(status))
}

/// `GET /v1/flows`' query besides the filter: how many of the latest events.
#[derive(serde::Deserialize)]
struct LastQuery {
    last: Option<usize>,
}

fn valid_filter(filter: &FlowFilter) -> Result<(), ErrorResponse> {
    filter
        .validate()
        .map_err(|e| ErrorResponse(ApiError::new(ErrorKind::InvalidRequest, e)))
}

/// A query string that does not parse is the client's mistake, said in the API's error body.
fn parse_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ErrorResponse> {
    serde_urlencoded_query(query.unwrap_or_default())
        .map_err(|e| ErrorResponse(ApiError::new(ErrorKind::InvalidRequest, e)))
}

fn serde_urlencoded_query<T: DeserializeOwned>(query: &str) -> Result<T, String> {
    Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|e| format!("invalid query string: {e}"))?,
    )
    .map(|Query(q)| q)
    .map_err(|e| format!("invalid query: {}", e.body_text()))
}

/// The latest events the agent kept that match the filter, oldest first.
async fn flows<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    uri: axum::http::Uri,
) -> ApiResult<myelin_api::FlowsResponse> {
    let filter: FlowFilter = parse_query(uri.query())?;
    valid_filter(&filter)?;
    let last = parse_query::<LastQuery>(uri.query())?.last.unwrap_or(100);
    if !(1..=MAX_FLOWS_LAST).contains(&last) {
        return Err(ErrorResponse(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("last: must be between 1 and {MAX_FLOWS_LAST}"),
        )));
    }
    Ok(Json(myelin_api::FlowsResponse {
        log: s.flow_log.info(),
        flows: s.flow_log.last(&filter, last),
    }))
}

async fn nodes<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
) -> ApiResult<Vec<myelin_api::NodeSummary>> {
    Ok(Json(
        s.agent.run(deadline, |a| Ok(a.node_summaries())).await?,
    ))
}

async fn policies<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
) -> ApiResult<myelin_api::PolicyStatus> {
    Ok(Json(s.agent.read(deadline, |a| a.policies()).await?))
}

async fn explain<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    BoundedJson(req): BoundedJson<myelin_api::ExplainRequest>,
) -> ApiResult<myelin_api::PolicyExplanation> {
    Ok(Json(s.agent.run(deadline, move |a| a.explain(&req)).await?))
}

async fn services<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
) -> ApiResult<myelin_api::ServiceStatus> {
    Ok(Json(
        s.agent.run(deadline, |a| Ok(a.service_status())).await?,
    ))
}

async fn drops<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
) -> ApiResult<Vec<myelin_api::DropCount>> {
    Ok(Json(s.agent.read(deadline, |a| a.drops()).await?))
}

/// Reads the conntrack map on a blocking thread: a full table is 131,072 lookups.
async fn conntrack<D: DatapathOps + 'static>(
    State(s): State<ApiState<D>>,
) -> ApiResult<Vec<myelin_api::TrackedFlow>> {
    let pin = s.conntrack_pin.clone();
    let flows = tokio::task::spawn_blocking(move || {
        ConntrackTable::open(&pin).and_then(|t| t.flows(usize::MAX))
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
    .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    Ok(Json(flows))
}

/// Turns datapath events off again when the last stream closes.
struct EventsGuard<D: DatapathOps + 'static> {
    state: ApiState<D>,
}

impl<D: DatapathOps + 'static> Drop for EventsGuard<D> {
    fn drop(&mut self) {
        let left = self.state.event_streams.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 {
            let agent = self.state.agent.clone();
            tokio::spawn(async move {
                let off = agent
                    .run(Deadline::after(Deadline::DEFAULT), |a| {
                        a.set_events(false).map_err(ApiError::from)
                    })
                    .await;
                if let Err(e) = off {
                    warn!(error = %e, "turning datapath events off failed");
                }
            });
        }
    }
}

/// Newline-delimited JSON events until the client goes away.
async fn events<D: DatapathOps + 'static>(
    State(state): State<ApiState<D>>,
    ClientDeadline(deadline): ClientDeadline,
    uri: axum::http::Uri,
) -> Result<Response, ErrorResponse> {
    let filter: FlowFilter = parse_query(uri.query())?;
    valid_filter(&filter)?;
    if state.event_streams.fetch_add(1, Ordering::SeqCst) >= MAX_EVENT_STREAMS {
        state.event_streams.fetch_sub(1, Ordering::SeqCst);
        return Err(ErrorResponse(ApiError::new(
            ErrorKind::NotReady,
            format!("{MAX_EVENT_STREAMS} event streams are open already"),
        )));
    }
    let guard = EventsGuard {
        state: state.clone(),
    };
    let rx = state.events.subscribe();
    state
        .agent
        .run(deadline, |a| a.set_events(true).map_err(ApiError::from))
        .await?;
    let stream = futures::stream::unfold((rx, guard), move |(mut rx, guard)| {
        let filter = filter.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(event) if !filter.matches(&event) => continue,
                    Ok(event) => {
                        let mut line = serde_json::to_vec(&event).unwrap_or_default();
                        line.push(b'\n');
                        return Some((Ok::<_, std::convert::Infallible>(line), (rx, guard)));
                    }
                    // A slow reader misses events rather than slowing the agent down.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Binds the socket: creates its directory (0700) if missing, removes a stale socket (the
/// caller holds the agent's lock, so no live agent owns it) and restricts the socket to its
/// owner (0600).
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    let err = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        private_dir(dir).map_err(err)?;
    }
    match fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Creates `dir` (and its parents) with mode 0700. A directory that exists keeps its mode, but
/// one that others can enter is reported: the socket is 0600 either way.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                warn!(
                    dir = %dir.display(),
                    "the socket's directory is open to other users; Myelin's own is 0700"
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(e) => Err(e),
    }
}

/// Serves `app` to root peers and a 403 to everyone else, until the task is dropped.
pub async fn serve(listener: UnixListener, app: Router, limits: ServerLimits) {
    let forbidden = Router::new().fallback(|| async {
        ErrorResponse(ApiError::new(
            ErrorKind::Forbidden,
            "the myelin agent API is for root only",
        ))
    });
    http::serve(listener, limits, move |stream| {
        if stream.peer_cred().is_ok_and(|c| c.uid() == 0) {
            app.clone()
        } else {
            warn!(peer = ?stream.peer_cred().ok(), "refused an API request from a non-root peer");
            forbidden.clone()
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::UnixStream,
    };

    use super::*;
    use crate::owner::testing::{fake_owner, free_addresses};

    struct Server {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        agent: AgentHandle<crate::datapath::fake::FakeDatapath>,
        _source: tokio::sync::mpsc::Sender<crate::source::SourceEvent>,
    }

    fn start(limits: ServerLimits, body_timeout: Duration) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run").join("agent.sock");
        let (agent, source) = fake_owner(false);
        let (events, _) = tokio::sync::broadcast::channel(4);
        let mut state = ApiState::new(agent.clone(), events, dir.path().join("ct"));
        state.body_timeout = body_timeout;
        let listener = bind(&socket).unwrap();
        tokio::spawn(serve(listener, router(state), limits));
        Server {
            _dir: dir,
            socket,
            agent,
            _source: source,
        }
    }

    fn default_server() -> Server {
        start(ServerLimits::default(), BODY_TIMEOUT)
    }

    /// Sends `raw` and reads until the server closes or `wait` passes.
    async fn exchange(socket: &Path, raw: &[u8], wait: Duration) -> (String, bool) {
        let mut conn = UnixStream::connect(socket).await.unwrap();
        conn.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let closed = tokio::time::timeout(wait, conn.read_to_end(&mut out))
            .await
            .is_ok();
        (String::from_utf8_lossy(&out).into_owned(), closed)
    }

    fn post(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
        format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{extra_headers}\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn the_socket_and_its_new_directory_are_private() {
        let s = default_server();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&s.socket), 0o600);
        assert_eq!(mode(s.socket.parent().unwrap()), 0o700);
    }

    #[tokio::test]
    async fn an_oversized_body_is_answered_413_and_nothing_is_done() {
        let s = default_server();
        let free = free_addresses(&s.agent).await;
        let huge = format!(
            r#"{{"containerId":"{}","ifname":"eth0"}}"#,
            "c".repeat(MAX_BODY)
        );
        let (answer, _) = exchange(
            &s.socket,
            &post("/v1/ipam", "", &huge),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("payloadTooLarge"), "{answer}");
        assert_eq!(free_addresses(&s.agent).await, free);
    }

    #[tokio::test]
    async fn a_body_that_never_arrives_is_answered_408() {
        let s = start(ServerLimits::default(), Duration::from_millis(200));
        let head = "POST /v1/ipam HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{\"contai";
        let started = Instant::now();
        let (answer, _) = exchange(&s.socket, head.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn unfinished_headers_and_idle_connections_are_closed() {
        let limits = ServerLimits {
            header_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        };
        let s = start(limits, BODY_TIMEOUT);
        // Never finishes its headers.
        let (_, closed) = exchange(
            &s.socket,
            b"GET /v1/status HTTP/1.1\r\nHost:",
            Duration::from_secs(3),
        )
        .await;
        assert!(closed, "a half-sent request is not kept open");
        // Says nothing at all.
        let (_, closed) = exchange(&s.socket, b"", Duration::from_secs(3)).await;
        assert!(closed, "a silent connection is not kept open");
        // Kept alive after an answer, then idle.
        let (answer, closed) = exchange(
            &s.socket,
            b"GET /v1/status HTTP/1.1\r\nHost: a\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(closed, "an idle kept-alive connection is closed");
    }

    #[tokio::test]
    async fn idle_connections_at_the_cap_make_room_for_a_request() {
        let limits = ServerLimits {
            max_connections: 4,
            ..ServerLimits::default()
        };
        let s = start(limits, BODY_TIMEOUT);
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(UnixStream::connect(&s.socket).await.unwrap());
        }
        let started = Instant::now();
        let (answer, _) = exchange(
            &s.socket,
            b"GET /v1/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_is_refused_and_a_malformed_deadline_is_a_bad_request() {
        let s = default_server();
        let free = free_addresses(&s.agent).await;
        let body = r#"{"containerId":"c1","ifname":"eth0"}"#;
        let past = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            - 1000;
        let (answer, _) = exchange(
            &s.socket,
            &post("/v1/ipam", &format!("{DEADLINE_HEADER}: {past}\r\n"), body),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        assert_eq!(free_addresses(&s.agent).await, free);
        let (answer, _) = exchange(
            &s.socket,
            &post("/v1/ipam", &format!("{DEADLINE_HEADER}: soon\r\n"), body),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        // Without a deadline the agent's default applies.
        let (answer, _) = exchange(
            &s.socket,
            &post("/v1/ipam", "", body),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    }

    #[tokio::test]
    async fn services_are_listed_and_say_whether_kube_proxy_is_replaced() {
        let s = default_server();
        let (answer, _) = exchange(
            &s.socket,
            b"GET /v1/services HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let status: myelin_api::ServiceStatus = serde_json::from_str(body).unwrap();
        assert_eq!(status, myelin_api::ServiceStatus::default());
    }
}
