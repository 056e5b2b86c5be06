//! The agent's HTTP endpoints on `--metrics-addr` (`/healthz`, `/readyz`, `/metrics`), reached
//! from inside its node's namespace as a Prometheus scraper or the kubelet's probes would.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use crate::{Error, Node, Result};

/// Where the harness has every agent serve them, inside its node's namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9962";

impl Node {
    /// One HTTP/1.0 GET of `path` on the agent's metrics address: (status code, body).
    pub fn metrics_get(&self, path: &str) -> Result<(u16, String)> {
        let request = format!("GET {path} HTTP/1.0\r\nHost: {METRICS_ADDR}\r\n\r\n");
        let response = self.netns().run(|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect(METRICS_ADDR)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })?;
        let response = response.map_err(Error::io(format!("GET {path} from {METRICS_ADDR}")))?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| Error::Traffic {
                what: format!("GET {path}: no status line in {head:?}"),
            })?;
        Ok((status, body.to_string()))
    }
}

/// The samples of a Prometheus text exposition: `name{labels}` -> value.
pub fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}
