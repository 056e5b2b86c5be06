//! The agent's HTTP endpoints on `--metrics-addr`, as a Prometheus scraper and the kubelet's
//! probes see them: `/healthz`, `/readyz` and `/metrics` tracking the node's real state.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use myelin_tests::{Error, Node, NodeSpec, Result, root_test, traffic::ping};

/// Where the harness has every agent serve them, inside its node's namespace.
const ADDR: &str = "127.0.0.1:9962";

/// One HTTP/1.0 GET from inside the node's namespace: (status code, body).
fn get(node: &Node, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {ADDR}\r\n\r\n");
    let response = node.netns().run(|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect(ADDR)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?;
    let response = response.map_err(Error::io(format!("GET {path} from {ADDR}")))?;
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

/// The samples of a Prometheus text exposition: `name{labels}` -> value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn scrape(node: &Node) -> Result<BTreeMap<String, f64>> {
    let (status, body) = get(node, "/metrics")?;
    assert_eq!(status, 200, "{body}");
    Ok(samples(&body))
}

#[test]
fn probes_and_metrics_follow_the_node() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    assert_eq!(get(&node, "/healthz")?.0, 200);
    assert_eq!(get(&node, "/readyz")?.0, 200, "the agent is synced");
    assert_eq!(get(&node, "/nothing-here")?.0, 404);

    let empty = scrape(&node)?;
    assert_eq!(empty.get("myelin_ready"), Some(&1.0));
    assert_eq!(empty.get("myelin_endpoints"), Some(&0.0));
    let free = empty["myelin_ipam_free_addresses"];
    assert_eq!(free, node.status()?.free_addresses as f64);

    let a = node.add_pod("default", "a")?;
    let b = node.add_pod("default", "b")?;
    let two = scrape(&node)?;
    assert_eq!(two.get("myelin_endpoints"), Some(&2.0));
    assert_eq!(two.get("myelin_ipam_free_addresses"), Some(&(free - 2.0)));
    for map in ["endpoints", "endpoints_by_if"] {
        assert_eq!(
            two.get(&format!("myelin_map_entries{{map=\"{map}\"}}")),
            Some(&2.0),
            "{map}: {two:?}"
        );
        assert!(
            two.get(&format!("myelin_map_capacity{{map=\"{map}\"}}"))
                .is_some_and(|c| *c >= 2.0)
        );
    }
    ping(&a, &b)?;

    node.delete_pod(a)?;
    node.delete_pod(b)?;
    let after = scrape(&node)?;
    assert_eq!(after.get("myelin_endpoints"), Some(&0.0));
    assert_eq!(after.get("myelin_ipam_free_addresses"), Some(&free));
    Ok(())
}
