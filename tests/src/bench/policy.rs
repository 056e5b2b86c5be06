//! NetworkPolicies for policy-scale benchmarks, and knowing when the agent enforces them.
//!
//! The rules allow the client on ports the benchmark never uses, so that every one of them is
//! a real entry (a rule naming a label no pod has would compile to nothing) and none of them
//! matches the measured traffic; one more rule allows the measured port.

use std::{
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Error, Node, Result};

/// First port of the generated rules: far above the ports the benchmarks measure on.
pub const FIRST_RULE_PORT: u16 = 20_000;
/// The most rules [`rules_policy`] can generate from [`FIRST_RULE_PORT`].
pub const MAX_RULES: usize = (u16::MAX - FIRST_RULE_PORT) as usize + 1;

/// Ingress to pods labelled `server` from pods labelled `client`: `rules` rules each allowing
/// one TCP port from [`FIRST_RULE_PORT`] up, then one rule per port in `allowed_ports` (the
/// measured ones). Compiles to `rules + allowed_ports.len()` policy map entries for each
/// selected pod (one client identity).
pub fn rules_policy(
    namespace: &str,
    name: &str,
    server: (&str, &str),
    client: (&str, &str),
    rules: usize,
    allowed_ports: &[u16],
) -> Value {
    let rule = |port: u16| {
        json!({
            "from": [{ "podSelector": { "matchLabels": { client.0: client.1 } } }],
            "ports": [{ "protocol": "TCP", "port": port }],
        })
    };
    let ingress: Vec<Value> = (0..rules.min(MAX_RULES))
        .filter_map(|i| u16::try_from(i).ok())
        .map(|i| rule(FIRST_RULE_PORT + i))
        .chain(allowed_ports.iter().map(|p| rule(*p)))
        .collect();
    network_policy(namespace, name, server, ingress)
}

/// Selects pods labelled `server` for ingress and allows nothing: with no other policy, every
/// new connection to them is dropped.
pub fn deny_ingress_policy(namespace: &str, name: &str, server: (&str, &str)) -> Value {
    network_policy(namespace, name, server, Vec::new())
}

fn network_policy(namespace: &str, name: &str, server: (&str, &str), ingress: Vec<Value>) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "podSelector": { "matchLabels": { server.0: server.1 } },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    })
}

/// Polls the agent of `node` (`GET /v1/policies`) until its policy map holds `expected`
/// entries and no pod's entries were left out for lack of room; returns how long that took.
/// The agent counts what it wrote to the kernel map, so the datapath enforces the new state
/// once the count matches.
pub fn wait_for_policy_entries(
    node: &Node,
    expected: usize,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let status = node
            .client()
            .policies()
            .map_err(Error::api(format!("GET /v1/policies on {}", node.name())))?;
        if status.entries == expected && status.incomplete.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(Error::Cluster(format!(
                "the policy map of the agent on {} holds {} entries (pods left out: {:?}), not \
                 {expected}, {timeout:?} after the change",
                node.name(),
                status.entries,
                status.incomplete
            )));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_allow_distinct_ports_then_the_measured_one() {
        let p = rules_policy(
            "bench",
            "rules",
            ("app", "server"),
            ("app", "client"),
            3,
            &[11111, 7000],
        );
        assert_eq!(p["kind"], "NetworkPolicy");
        assert_eq!(p["spec"]["podSelector"]["matchLabels"]["app"], "server");
        let ports: Vec<u64> = p["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["ports"][0]["port"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, vec![20_000, 20_001, 20_002, 11111, 7000]);
        assert_eq!(
            p["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"],
            "client"
        );
        let many = rules_policy("b", "r", ("a", "s"), ("a", "c"), 10_000, &[11111]);
        assert_eq!(many["spec"]["ingress"].as_array().unwrap().len(), 10_001);
    }

    #[test]
    fn deny_policy_isolates_without_rules() {
        let p = deny_ingress_policy("bench", "deny", ("app", "server"));
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(p["spec"]["ingress"], json!([]));
    }
}
