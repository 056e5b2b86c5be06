//! The local API (see `myelin_api` for the table of routes): HTTP/1.1 + JSON on a unix socket
//! with mode 0600, served only to root peers (checked with SO_PEERCRED on every connection,
//! because a socket's mode alone does not stop a process that inherited an open descriptor).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{FromRef, Query, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use myelin_api::{
    AllocateRequest, ApiError, AttachmentQuery, EndpointRequest, ErrorKind, GcRequest, PodRef,
};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::{agent::Agent, datapath::DatapathOps, events::EventSender};

pub type SharedAgent<D> = Arc<Mutex<Agent<D>>>;

#[derive(Debug, thiserror::Error)]
#[error("listening on {path}: {source}")]
pub struct ListenError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// An [`ApiError`] as an HTTP answer.
struct ErrorResponse(ApiError);

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

impl From<JsonRejection> for ErrorResponse {
    fn from(e: JsonRejection) -> Self {
        Self(ApiError::new(ErrorKind::InvalidRequest, e.body_text()))
    }
}

type ApiResult<T> = Result<Json<T>, ErrorResponse>;

fn lock<D>(agent: &SharedAgent<D>) -> std::sync::MutexGuard<'_, Agent<D>> {
    // A panic while holding the lock leaves consistent state (every operation rolls back on
    // error before returning), so a poisoned lock is still usable.
    agent
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the API handlers share.
pub struct ApiState<D> {
    pub agent: SharedAgent<D>,
    pub events: EventSender,
}

impl<D> Clone for ApiState<D> {
    fn clone(&self) -> Self {
        Self {
            agent: Arc::clone(&self.agent),
            events: self.events.clone(),
        }
    }
}

impl<D> FromRef<ApiState<D>> for SharedAgent<D> {
    fn from_ref(state: &ApiState<D>) -> Self {
        Arc::clone(&state.agent)
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
        .route("/v1/policies", get(policies::<D>))
        .route("/v1/drops", get(drops::<D>))
        .route("/v1/conntrack", get(conntrack::<D>))
        .route("/v1/events", get(events::<D>))
        .fallback(|| async {
            ErrorResponse(ApiError::new(ErrorKind::NotFound, "no such API route"))
        })
        .with_state(state)
}

async fn allocate<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
    body: Result<Json<AllocateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<myelin_api::Allocation>), ErrorResponse> {
    let Json(req) = body?;
    let allocation = lock(&agent).allocate(&req)?;
    Ok((StatusCode::CREATED, Json(allocation)))
}

async fn release<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
    Query(q): Query<AttachmentQuery>,
) -> ApiResult<myelin_api::ReleaseResponse> {
    let id = q.required()?;
    Ok(Json(lock(&agent).release(&id)?))
}

async fn put_endpoint<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
    body: Result<Json<EndpointRequest>, JsonRejection>,
) -> ApiResult<myelin_api::Endpoint> {
    let Json(req) = body?;
    if let Some(pod) = &req.pod {
        wait_for_pod(&agent, pod).await;
    }
    Ok(Json(lock(&agent).put_endpoint(&req)?))
}

/// How long an ADD waits for its Pod object to reach the agent's watch.
const POD_WAIT: Duration = Duration::from_secs(2);
const POD_POLL: Duration = Duration::from_millis(5);

/// Waits, without holding the agent, until the source has shown `pod` or [`POD_WAIT`] has
/// passed (see `Agent::awaits_pod`). After that the endpoint starts without labels and gets
/// its identity when the object arrives, as before: a pod the API server never lists (not a
/// Kubernetes pod) must still get its network.
async fn wait_for_pod<D: DatapathOps>(agent: &SharedAgent<D>, pod: &PodRef) {
    let started = Instant::now();
    while lock(agent).awaits_pod(pod) {
        if started.elapsed() >= POD_WAIT {
            warn!(
                pod = %format_args!("{}/{}", pod.namespace, pod.name),
                "no Pod object after {POD_WAIT:?}: the endpoint starts without labels and \
                 gets its identity when the object arrives"
            );
            return;
        }
        tokio::time::sleep(POD_POLL).await;
    }
    let waited = started.elapsed();
    if waited >= POD_POLL {
        info!(
            pod = %format_args!("{}/{}", pod.namespace, pod.name),
            waited_ms = waited.as_millis() as u64,
            "waited for the Pod object before creating the endpoint"
        );
    }
}

async fn list_endpoints<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
    Query(q): Query<AttachmentQuery>,
) -> ApiResult<Vec<myelin_api::Endpoint>> {
    let filter = q.optional()?;
    Ok(Json(lock(&agent).endpoints(filter.as_ref())))
}

async fn delete_endpoint<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
    Query(q): Query<AttachmentQuery>,
) -> ApiResult<myelin_api::DeleteResponse> {
    let id = q.required()?;
    Ok(Json(lock(&agent).delete_endpoint(&id)?))
}

async fn gc<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
    body: Result<Json<GcRequest>, JsonRejection>,
) -> ApiResult<myelin_api::GcResponse> {
    let Json(req) = body?;
    Ok(Json(lock(&agent).gc(&req)?))
}

async fn status<D: DatapathOps>(State(agent): State<SharedAgent<D>>) -> Json<myelin_api::Status> {
    Json(lock(&agent).status())
}

async fn policies<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
) -> Json<myelin_api::PolicyStatus> {
    Json(lock(&agent).policies())
}

async fn drops<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
) -> Json<Vec<myelin_api::DropCount>> {
    Json(lock(&agent).drops())
}

async fn conntrack<D: DatapathOps>(
    State(agent): State<SharedAgent<D>>,
) -> ApiResult<Vec<myelin_api::TrackedFlow>> {
    Ok(Json(lock(&agent).conntrack()?))
}

/// Turns datapath events off again when the last stream closes.
struct EventsGuard<D: DatapathOps> {
    state: ApiState<D>,
}

impl<D: DatapathOps> Drop for EventsGuard<D> {
    fn drop(&mut self) {
        // This stream's receiver is still counted while the guard drops.
        if self.state.events.receiver_count() <= 1
            && let Err(e) = lock(&self.state.agent).set_events(false)
        {
            warn!(error = %e, "turning datapath events off failed");
        }
    }
}

/// Newline-delimited JSON events until the client goes away.
async fn events<D: DatapathOps + 'static>(
    State(state): State<ApiState<D>>,
) -> Result<Response, ErrorResponse> {
    let rx = state.events.subscribe();
    lock(&state.agent)
        .set_events(true)
        .map_err(ApiError::from)?;
    let guard = EventsGuard { state };
    let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        loop {
            match rx.recv().await {
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
    });
    Ok((
        [("content-type", "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Binds the socket: removes a stale one, creates the directory (0700) and restricts the socket
/// to its owner (0600).
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    let err = |source| ListenError {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
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

/// Serves `app` to root peers and a 403 to everyone else, until the task is dropped.
pub async fn serve(listener: UnixListener, app: Router) {
    let forbidden = Router::new().fallback(|| async {
        ErrorResponse(ApiError::new(
            ErrorKind::Forbidden,
            "the myelin agent API is for root only",
        ))
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "accepting an API connection failed");
                continue;
            }
        };
        let peer_is_root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
        let service = if peer_is_root {
            app.clone()
        } else {
            warn!(peer = ?stream.peer_cred().ok(), "refused an API request from a non-root peer");
            forbidden.clone()
        };
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(e) = conn.await {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}
