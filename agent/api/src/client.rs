//! A blocking HTTP/1.1 client for the agent's unix socket.
//!
//! Hand-rolled on `std` because the CNI binary runs once per pod and must start fast and stay
//! small: one request per connection, `Connection: close`, JSON bodies.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    AllocateRequest, Allocation, ApiError, AttachmentId, DeleteResponse, DropCount, Endpoint,
    EndpointRequest, ExplainRequest, FlowEvent, FlowFilter, FlowsResponse, GcRequest, GcResponse,
    NodeSummary, PolicyExplanation, PolicyStatus, ReleaseResponse, ServiceStatus, Status,
    TrackedFlow,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections on the socket: the agent is not running (yet).
    #[error("the myelin agent is not reachable at {}: {source}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the myelin agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("talking to the myelin agent failed: {0}")]
    Io(#[source] io::Error),
    #[error("the myelin agent sent an invalid answer: {0}")]
    Protocol(String),
    #[error("the myelin agent refused the request ({status}): {error}")]
    Api {
        status: u16,
        #[source]
        error: ApiError,
    },
}

impl ClientError {
    /// True when the agent could not be reached at all or did not answer in time: the caller
    /// may try again later (CNI error code 11).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout(_))
    }

    /// The agent's own error, when it answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Self::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Client for the agent socket. Cheap to construct; every call opens its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// The default timeout bounds a whole request; endpoint creation attaches programs, which
    /// takes milliseconds, so this only trips when the agent is wedged.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn allocate(&self, req: &AllocateRequest) -> Result<Allocation, ClientError> {
        self.request("POST", "/v1/ipam", Some(req))
    }

    pub fn release(&self, id: &AttachmentId) -> Result<ReleaseResponse, ClientError> {
        self.request::<(), _>("DELETE", &format!("/v1/ipam?{}", id.to_query()), None)
    }

    pub fn put_endpoint(&self, req: &EndpointRequest) -> Result<Endpoint, ClientError> {
        self.request("PUT", "/v1/endpoints", Some(req))
    }

    pub fn endpoints(&self) -> Result<Vec<Endpoint>, ClientError> {
        self.request::<(), _>("GET", "/v1/endpoints", None)
    }

    /// The endpoint of one attachment, if the agent has it.
    pub fn endpoint(&self, id: &AttachmentId) -> Result<Option<Endpoint>, ClientError> {
        let found: Vec<Endpoint> =
            self.request::<(), _>("GET", &format!("/v1/endpoints?{}", id.to_query()), None)?;
        Ok(found.into_iter().next())
    }

    pub fn delete_endpoint(&self, id: &AttachmentId) -> Result<DeleteResponse, ClientError> {
        self.request::<(), _>("DELETE", &format!("/v1/endpoints?{}", id.to_query()), None)
    }

    pub fn gc(&self, req: &GcRequest) -> Result<GcResponse, ClientError> {
        self.request("POST", "/v1/gc", Some(req))
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        self.request::<(), _>("GET", "/v1/status", None)
    }

    pub fn nodes(&self) -> Result<Vec<NodeSummary>, ClientError> {
        self.request::<(), _>("GET", "/v1/nodes", None)
    }

    pub fn policies(&self) -> Result<PolicyStatus, ClientError> {
        self.request::<(), _>("GET", "/v1/policies", None)
    }

    pub fn explain(&self, req: &ExplainRequest) -> Result<PolicyExplanation, ClientError> {
        self.request("POST", "/v1/policy/explain", Some(req))
    }

    pub fn services(&self) -> Result<ServiceStatus, ClientError> {
        self.request::<(), _>("GET", "/v1/services", None)
    }

    pub fn drops(&self) -> Result<Vec<DropCount>, ClientError> {
        self.request::<(), _>("GET", "/v1/drops", None)
    }

    pub fn conntrack(&self) -> Result<Vec<TrackedFlow>, ClientError> {
        self.request::<(), _>("GET", "/v1/conntrack", None)
    }

    /// The latest `last` events the agent kept that match `filter`, oldest first.
    pub fn flows(&self, filter: &FlowFilter, last: usize) -> Result<FlowsResponse, ClientError> {
        let path = format!("/v1/flows{}", filter.to_query(Some(last)));
        self.request::<(), _>("GET", &path, None)
    }

    /// Streams the datapath events that match `filter` to `on_event` until it returns false or
    /// the agent closes the stream.
    pub fn events(
        &self,
        filter: &FlowFilter,
        on_event: impl FnMut(FlowEvent) -> bool,
    ) -> Result<(), ClientError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        // HTTP/1.0: the agent streams the body and closes at the end, no chunking to undo.
        stream
            .write_all(
                format!(
                    "GET /v1/events{} HTTP/1.0\r\nHost: myelin-agent\r\n\r\n",
                    filter.to_query(None)
                )
                .as_bytes(),
            )
            .map_err(ClientError::Io)?;
        read_events(BufReader::new(stream), on_event)
    }

    fn request<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)
                .map_err(|e| ClientError::Protocol(format!("encoding request: {e}")))?,
            None => Vec::new(),
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(ClientError::Io)?;

        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: myelin-agent\r\nConnection: close\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n{}: {}\r\n",
            body.len(),
            crate::DEADLINE_HEADER,
            deadline_ms(self.timeout),
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str("\r\n");
        let mut raw = request.into_bytes();
        raw.extend_from_slice(&body);
        stream.write_all(&raw).map_err(|e| self.io_error(e))?;

        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .map_err(|e| self.io_error(e))?;
        decode_response(&answer, path)
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout(self.timeout)
            }
            // The agent went away between accept and answer (restart): same as unreachable.
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source: e,
                }
            }
            _ => ClientError::Io(e),
        }
    }
}

/// An answer to a request for `path`, read to its end: the decoded body of a 2xx answer, the
/// agent's [`ApiError`] otherwise. Pure, so that it can be fuzzed without a socket.
pub fn decode_response<R: DeserializeOwned>(raw: &[u8], path: &str) -> Result<R, ClientError> {
    let (status, body) = parse_response(raw)?;
    if (200..300).contains(&status) {
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("decoding answer to {path}: {e}")))
    } else {
        let error = serde_json::from_slice::<ApiError>(&body).map_err(|_| {
            ClientError::Protocol(format!(
                "status {status} with body {:?}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        Err(ClientError::Api { status, error })
    }
}

/// The event stream after the request: the HTTP/1.0 head, then one JSON [`FlowEvent`] per line
/// to `on_event` until it returns false or the stream ends. Separate from the socket so that
/// it can be fuzzed.
pub fn read_events(
    mut reader: impl BufRead,
    mut on_event: impl FnMut(FlowEvent) -> bool,
) -> Result<(), ClientError> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(ClientError::Io)? == 0 {
            return Err(ClientError::Protocol(
                "the agent closed the event stream".into(),
            ));
        }
        if line.starts_with("HTTP/") && !line.contains(" 200 ") {
            return Err(ClientError::Protocol(format!(
                "event stream refused: {}",
                line.trim()
            )));
        }
        if line == "\r\n" {
            break;
        }
    }
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(ClientError::Io)? == 0 {
            return Ok(());
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let event = serde_json::from_str(trimmed)
            .map_err(|e| ClientError::Protocol(format!("bad event {trimmed:?}: {e}")))?;
        if !on_event(event) {
            return Ok(());
        }
    }
}

/// Now plus `timeout`, in milliseconds since the Unix epoch ([`crate::DEADLINE_HEADER`]).
fn deadline_ms(timeout: Duration) -> u128 {
    (std::time::SystemTime::now() + timeout)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Splits an HTTP/1.1 answer into status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let protocol = |m: &str| ClientError::Protocol(m.to_string());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| protocol("answer has no header terminator"))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| protocol("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {status_line:?}")))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| protocol("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| protocol("malformed chunked body"))?
    } else if let Some(len) = content_length {
        rest.get(..len)
            .ok_or_else(|| protocol("body shorter than content-length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixListener, thread};

    use super::*;
    use crate::ErrorKind;

    #[test]
    fn parses_content_length_and_chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(raw).unwrap(), (200, b"{}".to_vec()));
        let raw = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (201, b"[1,2]".to_vec()));
    }

    #[test]
    fn rejects_truncated_answers() {
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n"),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}"),
            Err(ClientError::Protocol(_))
        ));
    }

    #[test]
    fn event_streams_are_read_line_by_line_after_the_head() {
        let event = r#"{"kind":"drop","reason":"policy","direction":"ingress","protocol":"tcp","src":"10.0.0.2:1","dst":"10.0.0.3:80","srcEndpoint":1,"dstEndpoint":2,"srcIdentity":256,"dstIdentity":257}"#;
        let stream = format!("HTTP/1.0 200 OK\r\ncontent-type: x\r\n\r\n{event}\n\n{event}\n");
        let mut kinds = Vec::new();
        read_events(stream.as_bytes(), |e| {
            kinds.push(e.kind);
            true
        })
        .unwrap();
        assert_eq!(kinds, ["drop", "drop"]);
        let refused = read_events(&b"HTTP/1.0 403 Forbidden\r\n\r\n"[..], |_| true);
        assert!(
            matches!(refused, Err(ClientError::Protocol(_))),
            "{refused:?}"
        );
        let garbage = read_events(&b"HTTP/1.0 200 OK\r\n\r\n{nope\n"[..], |_| true);
        assert!(
            matches!(garbage, Err(ClientError::Protocol(_))),
            "{garbage:?}"
        );
    }

    #[test]
    fn answers_decode_into_the_body_or_the_agents_error() {
        let ok: ReleaseResponse = decode_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"released\":null}",
            "/v1/ipam",
        )
        .unwrap();
        assert_eq!(ok, ReleaseResponse { released: None });
        let err = decode_response::<ReleaseResponse>(
            b"HTTP/1.1 404 Not Found\r\n\r\n{\"kind\":\"notFound\",\"message\":\"x\"}",
            "/v1/ipam",
        )
        .unwrap_err();
        assert_eq!(err.api_error().map(|e| e.kind), Some(ErrorKind::NotFound));
        let err =
            decode_response::<ReleaseResponse>(b"HTTP/1.1 500 X\r\n\r\n<html>", "/").unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    }

    #[test]
    fn missing_socket_is_unavailable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = Client::new(dir.path().join("absent.sock"))
            .status()
            .unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }

    #[test]
    fn agent_errors_come_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = r#"{"kind":"poolExhausted","message":"no free address in 10.0.0.0/30"}"#;
            write!(
                conn,
                "HTTP/1.1 507 Insufficient Storage\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            req
        });
        let err = Client::new(&path)
            .allocate(&AllocateRequest {
                attachment: AttachmentId::new("c", "eth0"),
                pod: None,
            })
            .unwrap_err();
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /v1/ipam HTTP/1.1\r\n"), "{req}");
        // The deadline is now plus the client's timeout.
        let deadline: u128 = req
            .lines()
            .find_map(|l| l.strip_prefix("myelin-deadline: "))
            .expect("a deadline header")
            .parse()
            .unwrap();
        let now = deadline_ms(Duration::ZERO);
        let timeout = Client::DEFAULT_TIMEOUT.as_millis();
        assert!(
            deadline > now + timeout - 5_000 && deadline <= now + timeout,
            "{req}"
        );
        assert!(
            req.ends_with(r#"{"containerId":"c","ifname":"eth0"}"#),
            "{req}"
        );
        assert_eq!(err.api_error().unwrap().kind, ErrorKind::PoolExhausted);
        assert!(!err.is_unavailable());
    }
}
