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

/// Every `myelin_*` name a Grafana query of the dashboard uses.
fn dashboard_metric_names(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if let ("expr" | "query", serde_json::Value::String(q)) = (key.as_str(), v) {
                    let mut rest = q.as_str();
                    while let Some(at) = rest.find("myelin_") {
                        let name: String = rest[at..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        rest = &rest[at + name.len()..];
                        out.insert(name);
                    }
                }
                dashboard_metric_names(v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                dashboard_metric_names(v, out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_agent_serves() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/grafana/myelin-flows.json"
    );
    let text = std::fs::read_to_string(path).expect("manifests/grafana/myelin-flows.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().map_or(0, Vec::len);
    assert!(panels >= 5, "{panels} panels");
    let mut queried = std::collections::BTreeSet::new();
    dashboard_metric_names(&dashboard, &mut queried);
    for wanted in [
        "myelin_flows_total",
        "myelin_drops_total",
        "myelin_policy_drops_total",
        "myelin_namespace_flows_total",
        "myelin_flow_events_lost_total",
    ] {
        assert!(queried.contains(wanted), "the dashboard shows {wanted}");
    }

    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("grafana"))?;
    let (status, body) = node.metrics_get("/metrics")?;
    assert_eq!(status, 200);
    // A family is declared even before it has a series: `# TYPE myelin_flows counter`.
    let families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let served = |name: &str| {
        families.iter().any(|f| {
            name == *f
                || ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(f))
        })
    };
    let missing: Vec<&String> = queried.iter().filter(|n| !served(n)).collect();
    assert!(missing.is_empty(), "not served: {missing:?}\n{body}");
    Ok(())
}
