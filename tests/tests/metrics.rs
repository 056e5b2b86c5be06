//! The agent's HTTP endpoints on `--metrics-addr`, as a Prometheus scraper and the kubelet's
//! probes see them: `/healthz`, `/readyz` and `/metrics` tracking the node's real state.

use std::collections::BTreeMap;

use myelin_tests::{Node, NodeSpec, Result, metrics::samples, root_test, traffic::ping};

fn scrape(node: &Node) -> Result<BTreeMap<String, f64>> {
    let (status, body) = node.metrics_get("/metrics")?;
    assert_eq!(status, 200, "{body}");
    Ok(samples(&body))
}

#[test]
fn probes_and_metrics_follow_the_node() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    assert_eq!(node.metrics_get("/healthz")?.0, 200);
    assert_eq!(node.metrics_get("/readyz")?.0, 200, "the agent is synced");
    assert_eq!(node.metrics_get("/nothing-here")?.0, 404);

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
