//! `cargo xtask demo`: one node running myelin-agent with an embedded cluster, three pods
//! created through the real `myelin` plugin, a connectivity matrix (ping and TCP between every
//! ordered pair) and the eBPF per-endpoint counters before and after; then every pod is
//! deleted and everything removed, also on failure or Ctrl-C (the guards do that).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use myelin_api::EndpointCounters;

use crate::{
    Error, Result,
    bins::Binaries,
    cluster::{self, ClusterSummary},
    cni::Pod,
    node::{Node, NodeSpec},
    progress::step,
    run::RunPrefix,
    sweep::sweep_leftovers,
    traffic::{Host, ping, tcp_echo},
};

/// The demo cluster: one Node (whose name and pod CIDR the demo node takes), a namespace and
/// three labelled pods.
pub const CLUSTER_YAML: &str = include_str!("demo/cluster.yaml");

/// Runs the demo with the binaries in `binaries`; stops early with [`Error::Interrupted`] once
/// `interrupted` is set (the caller's Ctrl-C handler).
pub fn run(binaries: Binaries, interrupted: &AtomicBool) -> Result<()> {
    sweep_leftovers()?.print_if_any();
    let summary = cluster::summarize(CLUSTER_YAML)?;
    let mut spec = NodeSpec::from_cluster_yaml(CLUSTER_YAML)?;
    spec.binaries = Some(binaries);
    spec.echo_agent_log_on_drop = false;
    let run = RunPrefix::new();
    let title = format!(
        "start node {} (myelin-agent, pod CIDR {}) in network namespace {}",
        summary.node_name,
        summary.pod_cidr,
        run.name(&summary.node_name)
    );
    let node = step(&title, || Node::start(&run, spec))?;
    let demo = Demo {
        node: &node,
        interrupted,
    };
    let outcome = demo.run(&summary);
    if let Err(e) = &outcome
        && !matches!(e, Error::Interrupted)
    {
        println!(
            "--- agent log ({}) ---\n{}--- end of agent log ---",
            node.agent_log_path().display(),
            node.agent_log()
        );
    }
    step("stop the agent and remove the node", || {
        drop(node);
        Ok::<_, Error>(())
    })?;
    outcome
}

struct Demo<'a> {
    node: &'a Node,
    interrupted: &'a AtomicBool,
}

/// A demo pod and the port its TCP check uses (its first declared container port).
struct DemoPod {
    pod: Pod,
    tcp_port: u16,
}

impl Demo<'_> {
    fn run(&self, summary: &ClusterSummary) -> Result<()> {
        let pods = step(
            "create the pods (CNI ADD through the myelin plugin)",
            || self.create_pods(summary),
        )?;
        for p in &pods {
            println!("    {:<10} {}", p.pod.name(), p.pod.ip());
        }
        let before = self.counters()?;
        let matrix = step(
            "connectivity: ping and TCP between every ordered pair",
            || self.connectivity(&pods),
        )?;
        print!("{}", matrix.render());
        let after = self.counters()?;
        println!("==> eBPF per-endpoint counters (GET /v1/endpoints), before -> after");
        print!("{}", render_counters(&pods, &before, &after));
        println!(
            "==> bpftool map dump pinned {}",
            self.node.pinned_map("counters").display()
        );
        for line in self.node.dump_map_text("counters")?.lines() {
            println!("    {line}");
        }
        // A NetworkPolicy step belongs here: write the policy into the cluster dir, then run
        // `connectivity` again and check it against the verdicts the policy implies.
        let unexpected = matrix.unexpected(|_| true);
        step("delete the pods (CNI DEL)", || self.delete_pods(pods))?;
        if unexpected.is_empty() {
            println!("==> all {} checks passed", matrix.checks.len() * 2);
            Ok(())
        } else {
            Err(Error::Demo(format!(
                "{} of {} pairs did not connect: {}",
                unexpected.len(),
                matrix.checks.len(),
                unexpected
                    .iter()
                    .map(|c| format!("{} -> {}", c.from, c.to))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }

    fn check_interrupted(&self) -> Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn create_pods(&self, summary: &ClusterSummary) -> Result<Vec<DemoPod>> {
        let mut pods = Vec::new();
        for p in &summary.pods {
            self.check_interrupted()?;
            let pod = self.node.add_pod(&p.namespace, &p.name)?;
            pods.push(DemoPod {
                pod,
                tcp_port: p.tcp_ports.first().copied().unwrap_or(0),
            });
        }
        Ok(pods)
    }

    fn connectivity(&self, pods: &[DemoPod]) -> Result<Matrix> {
        let mut checks = Vec::new();
        for from in pods {
            for to in pods.iter().filter(|p| p.pod.ip() != from.pod.ip()) {
                self.check_interrupted()?;
                let ping = ping(&from.pod, &to.pod).map_err(|e| e.to_string());
                let tcp = tcp_echo(&from.pod, &to.pod, to.tcp_port).map_err(|e| e.to_string());
                // A Ctrl-C also kills the ping child: report the interruption, not a failure.
                self.check_interrupted()?;
                checks.push(Check {
                    from: from.pod.name().to_string(),
                    to: to.pod.name().to_string(),
                    ping,
                    tcp,
                });
            }
        }
        Ok(Matrix {
            names: pods.iter().map(|p| p.pod.name().to_string()).collect(),
            checks,
        })
    }

    fn counters(&self) -> Result<BTreeMap<Ipv4Addr, EndpointCounters>> {
        Ok(self
            .node
            .endpoints()?
            .into_iter()
            .map(|e| (e.ip, e.counters))
            .collect())
    }

    fn delete_pods(&self, pods: Vec<DemoPod>) -> Result<()> {
        for p in pods {
            self.node.delete_pod(p.pod)?;
        }
        Ok(())
    }
}

/// The outcome of ping and TCP from one pod to another.
struct Check {
    from: String,
    to: String,
    ping: std::result::Result<Duration, String>,
    tcp: std::result::Result<Duration, String>,
}

impl Check {
    fn connected(&self) -> bool {
        self.ping.is_ok() && self.tcp.is_ok()
    }
}

struct Matrix {
    names: Vec<String>,
    checks: Vec<Check>,
}

impl Matrix {
    /// Checks whose outcome differs from `expect_connected` (true: both ping and TCP pass).
    fn unexpected(&self, expect_connected: impl Fn(&Check) -> bool) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.connected() != expect_connected(c))
            .collect()
    }

    /// Rows are senders, columns receivers; each cell is `ping tcp` round trips in ms.
    fn render(&self) -> String {
        const CELL: usize = 20;
        let mut out = format!("    {:<12}", "from \\ to");
        for name in &self.names {
            out.push_str(&format!("{name:<CELL$}"));
        }
        out.push('\n');
        for from in &self.names {
            out.push_str(&format!("    {from:<12}"));
            for to in &self.names {
                let cell = self
                    .checks
                    .iter()
                    .find(|c| &c.from == from && &c.to == to)
                    .map_or_else(
                        || "·".to_string(),
                        |c| format!("{} {}", mark(&c.ping), mark(&c.tcp)),
                    );
                out.push_str(&format!("{cell:<CELL$}"));
            }
            out.push('\n');
        }
        out.push_str("    cells: ping and TCP (connect + echo) round trip in ms\n");
        for c in self.checks.iter().filter(|c| !c.connected()) {
            for e in [&c.ping, &c.tcp]
                .into_iter()
                .filter_map(|r| r.as_ref().err())
            {
                out.push_str(&format!("    ✗ {} -> {}: {e}\n", c.from, c.to));
            }
        }
        out
    }
}

fn mark(outcome: &std::result::Result<Duration, String>) -> String {
    match outcome {
        Ok(rtt) => format!("✓ {:.3}", rtt.as_secs_f64() * 1000.0),
        Err(_) => "✗".to_string(),
    }
}

fn render_counters(
    pods: &[DemoPod],
    before: &BTreeMap<Ipv4Addr, EndpointCounters>,
    after: &BTreeMap<Ipv4Addr, EndpointCounters>,
) -> String {
    let mut out = format!(
        "    {:<10} {:<12} {:>12} {:>16} {:>12} {:>16}\n",
        "pod", "ip", "rx packets", "rx bytes", "tx packets", "tx bytes"
    );
    for p in pods {
        let ip = p.pod.ip();
        let b = before.get(&ip).copied().unwrap_or_default();
        let a = after.get(&ip).copied().unwrap_or_default();
        let cell = |b: u64, a: u64| format!("{b} -> {a}");
        out.push_str(&format!(
            "    {:<10} {:<12} {:>12} {:>16} {:>12} {:>16}\n",
            p.pod.name(),
            ip.to_string(),
            cell(b.rx_packets, a.rx_packets),
            cell(b.rx_bytes, a.rx_bytes),
            cell(b.tx_packets, a.tx_packets),
            cell(b.tx_bytes, a.tx_bytes),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(from: &str, to: &str, ok: bool) -> Check {
        let outcome = |ms| {
            if ok {
                Ok(Duration::from_micros(ms))
            } else {
                Err("timed out".to_string())
            }
        };
        Check {
            from: from.into(),
            to: to.into(),
            ping: outcome(50),
            tcp: outcome(250),
        }
    }

    #[test]
    fn the_embedded_cluster_has_a_node_and_three_pods_with_ports() {
        let summary = cluster::summarize(CLUSTER_YAML).unwrap();
        assert_eq!(summary.node_name, "demo-node");
        let pods: Vec<_> = summary
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.tcp_ports.clone()))
            .collect();
        assert_eq!(
            pods,
            vec![
                ("frontend", vec![80]),
                ("backend", vec![8080]),
                ("db", vec![5432])
            ]
        );
    }

    #[test]
    fn matrix_marks_each_pair_and_explains_failures() {
        let matrix = Matrix {
            names: vec!["a".into(), "b".into()],
            checks: vec![check("a", "b", true), check("b", "a", false)],
        };
        let text = matrix.render();
        assert!(text.contains("✓ 0.050 ✓ 0.250"), "{text}");
        assert!(text.contains("✗ ✗"), "{text}");
        assert!(text.contains("✗ b -> a: timed out"), "{text}");
        let unexpected = matrix.unexpected(|_| true);
        assert_eq!(unexpected.len(), 1);
        assert_eq!(
            (unexpected[0].from.as_str(), unexpected[0].to.as_str()),
            ("b", "a")
        );
        // A policy that denies b -> a makes the same matrix all expected.
        assert!(matrix.unexpected(|c| c.from == "a").is_empty());
    }
}
