//! `cargo xtask demo`: two nodes running myelin-agent in tunnel mode, joined by an underlay
//! router; an embedded cluster of three pods created through the real `myelin` plugin, on both
//! nodes; a connectivity matrix (ping and TCP between every ordered pair, on one node and
//! across the tunnel) and the eBPF per-endpoint counters before and after; then an embedded
//! Service (`--kube-proxy-replacement`: no kube-proxy anywhere) with three replicas on both
//! nodes, load-balanced by the datapath, then one replica taken out of its EndpointSlice; then
//! an embedded NetworkPolicy, the matrix again with the verdicts it implies, the drop counters that prove
//! the datapath denied the rest, an excerpt of the drop events and `policy explain`'s answer for
//! every pair (checked against the traffic); then every pod is deleted
//! and everything removed, also on failure or Ctrl-C (the guards do that).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use myelin_api::{DropCount, EndpointCounters};

use crate::{
    Error, Result,
    bins::Binaries,
    cluster::{self, ClusterSummary},
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay},
    policy_lab::{policy_names, wait_for_policies},
    progress::step,
    run::RunPrefix,
    services::{
        Answer, Backend, BackendServers, Protocol, ServicePort, ask_many, ask_until,
        cluster_ip_service, endpoint_slice, tally,
    },
    sweep::sweep_leftovers,
    traffic::{Host, ping, tcp_echo},
};

/// The demo cluster: a namespace and three labelled pods, each naming its node (`node0`,
/// `node1`).
pub const CLUSTER_YAML: &str = include_str!("demo/cluster.yaml");

/// The NetworkPolicy the demo applies after the open matrix.
pub const POLICY_YAML: &str = include_str!("demo/policy.yaml");

/// The demo's Service: `demo/api`, this ClusterIP, port 80 to its replicas' 8080.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SERVICE_PORT: ServicePort<'static> = ServicePort {
    name: "http",
    protocol: Protocol::Tcp,
    port: 80,
    target_port: 8080,
};
/// The Service's replicas: name and node index.
const REPLICAS: [(&str, usize); 3] = [("api-0", 0), ("api-1", 1), ("api-2", 1)];
/// New connections the frontend opens to the Service per look.
const SERVICE_QUESTIONS: usize = 30;

/// How many drop events the demo shows.
const EVENT_EXCERPT: usize = 8;

/// What a check should do: whether ping and TCP pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    ping: bool,
    tcp: bool,
}

impl Expected {
    const CONNECTED: Expected = Expected {
        ping: true,
        tcp: true,
    };
}

/// What [`POLICY_YAML`] implies, written out from its rules: backend takes only frontend, on
/// TCP 8080 (a rule with ports: no ping); db takes only backend, anything (no ports: ping
/// too); frontend is selected by no policy and takes everyone.
fn expected_under_policy(from: &str, to: &str) -> Expected {
    match (from, to) {
        ("frontend", "backend") => Expected {
            ping: false,
            tcp: true,
        },
        (_, "backend") => Expected {
            ping: false,
            tcp: false,
        },
        ("backend", "db") => Expected::CONNECTED,
        (_, "db") => Expected {
            ping: false,
            tcp: false,
        },
        _ => Expected::CONNECTED,
    }
}

/// How many nodes the demo runs.
const NODES: usize = 2;

/// Runs the demo with the binaries in `binaries`; stops early with [`Error::Interrupted`] once
/// `interrupted` is set (the caller's Ctrl-C handler).
pub fn run(binaries: Binaries, interrupted: &AtomicBool) -> Result<()> {
    sweep_leftovers()?.print_if_any();
    let summary = cluster::summarize(CLUSTER_YAML)?;
    let run = RunPrefix::new();
    let underlay = Underlay::Router {
        route_pod_cidrs: false,
    };
    let mut spec = ClusterSpec::new(NODES, underlay).agent_args(&[
        "--routing-mode",
        "tunnel",
        "--kube-proxy-replacement=true",
    ]);
    spec.binaries = Some(binaries);
    spec.echo_agent_logs_on_drop = false;
    let title = format!(
        "start {NODES} nodes (network namespaces {}-node*, each running myelin-agent in tunnel \
         mode) behind an underlay router",
        run.as_str()
    );
    let cluster = step(&title, || Cluster::start(&run, spec))?;
    for i in cluster.node_indexes() {
        let node = cluster.node(i);
        println!(
            "    {:<6} InternalIP {:<14} pod CIDR {}",
            node.name(),
            cluster.node_ip(i).to_string(),
            node.pod_cidr()
        );
    }
    let demo = Demo {
        cluster: &cluster,
        interrupted,
    };
    let outcome = demo.run(&summary);
    if let Err(e) = &outcome
        && !matches!(e, Error::Interrupted)
    {
        for i in cluster.node_indexes() {
            let node = cluster.node(i);
            println!(
                "--- agent log of {} ({}) ---\n{}--- end of agent log ---",
                node.name(),
                node.agent_log_path().display(),
                node.agent_log()
            );
        }
    }
    step("stop the agents and remove the nodes", || {
        drop(cluster);
        Ok::<_, Error>(())
    })?;
    outcome
}

struct Demo<'a> {
    cluster: &'a Cluster,
    interrupted: &'a AtomicBool,
}

/// A demo pod and the port its TCP check uses (its first declared container port).
struct DemoPod {
    pod: ClusterPod,
    tcp_port: u16,
}

impl DemoPod {
    /// `frontend (node0)`.
    fn label(&self, demo: &Demo<'_>) -> String {
        format!(
            "{} on {}",
            self.pod.name(),
            demo.cluster.node(self.pod.node()).name()
        )
    }
}

impl Demo<'_> {
    fn run(&self, summary: &ClusterSummary) -> Result<()> {
        let pods = step(
            "create the pods (CNI ADD through the myelin plugin)",
            || self.create_pods(summary),
        )?;
        for p in &pods {
            println!("    {:<20} {}", p.label(self), p.pod.ip());
        }
        self.show_nodes()?;
        let before = self.counters()?;
        let matrix = step(
            "connectivity: ping and TCP between every ordered pair",
            || self.connectivity(&pods),
        )?;
        print!("{}", matrix.render());
        let after = self.counters()?;
        println!("==> eBPF per-endpoint counters (GET /v1/endpoints), before -> after");
        print!("{}", render_counters(&pods, &before, &after));
        // The same counters straight from the kernel: the per-CPU slot of the first pod's
        // endpoint id (the map is an array indexed by endpoint id).
        let node = self.cluster.node(pods[0].pod.node());
        if let Some(first) = node.endpoints()?.into_iter().min_by_key(|e| e.id) {
            let key = first.id.to_ne_bytes();
            println!(
                "==> bpftool map lookup pinned {} key {} {} {} {}   ({}'s endpoint id {})",
                node.pinned_map("counters").display(),
                key[0],
                key[1],
                key[2],
                key[3],
                first.pod.as_ref().map_or("?", |p| p.name.as_str()),
                first.id
            );
            for line in node.lookup_map_text("counters", &key)?.lines() {
                println!("    {line}");
            }
        }
        let mut unexpected: Vec<String> = matrix
            .unexpected(|_| Expected::CONNECTED)
            .iter()
            .map(|c| format!("without policy: {} -> {}", c.from, c.to))
            .collect();
        unexpected.extend(self.service_step(&pods)?);
        let (with_policy, explained) = self.policy_step(&pods)?;
        unexpected.extend(explained);
        unexpected.extend(
            with_policy
                .unexpected(|c| expected_under_policy(&c.from, &c.to))
                .iter()
                .map(|c| format!("with the policy: {} -> {}", c.from, c.to)),
        );
        step("delete the pods (CNI DEL)", || self.delete_pods(pods))?;
        // Two per pair of each matrix, the Service's two looks, and policy explain's answer
        // for every pair under the policy.
        let checks =
            2 * (matrix.checks.len() + with_policy.checks.len()) + 2 + with_policy.checks.len();
        if unexpected.is_empty() {
            println!("==> all {checks} checks as expected");
            Ok(())
        } else {
            Err(Error::Demo(format!(
                "{} pairs did not do what was expected: {}",
                unexpected.len(),
                unexpected.join(", ")
            )))
        }
    }

    /// Applies [`POLICY_YAML`], shows the matrix under it, the drops that enforced it and an
    /// excerpt of the drop events.
    fn policy_step(&self, pods: &[DemoPod]) -> Result<(Matrix, Vec<String>)> {
        println!("==> NetworkPolicy (given to every node's agent)");
        for line in POLICY_YAML.lines().filter(|l| !l.starts_with('#')) {
            println!("    {line}");
        }
        // Opened before the policy is written: the datapath reports events only while a stream
        // is open, and the wait for the policy below gives the agents time to open them.
        let (tx, events) = mpsc::channel();
        for i in self.cluster.node_indexes() {
            let stream = self.cluster.node(i).client();
            let tx = tx.clone();
            thread::spawn(move || {
                stream.events(&myelin_api::FlowFilter::default(), |e| {
                    e.kind != "drop" || tx.send(e).is_ok()
                })
            });
        }
        step("apply it and wait until every agent enforces it", || {
            let objects = serde_yaml::Deserializer::from_str(POLICY_YAML)
                .map(|doc| {
                    serde::Deserialize::deserialize(doc).map_err(|source| Error::Yaml {
                        context: "parsing the demo policy".into(),
                        source,
                    })
                })
                .collect::<Result<Vec<serde_json::Value>>>()?;
            self.cluster.apply("policy", &objects)?;
            let valid: BTreeMap<String, bool> = policy_names(POLICY_YAML)?
                .into_iter()
                .map(|n| (n, false))
                .collect();
            for i in self.cluster.node_indexes() {
                wait_for_policies(self.cluster.node(i), &valid)?;
            }
            Ok::<_, Error>(())
        })?;
        println!(
            "    {:<8} {:<32} {:<8} SELECTS",
            "NODE", "POLICY", "INGRESS"
        );
        for i in self.cluster.node_indexes() {
            let node = self.cluster.node(i);
            let status = node
                .client()
                .policies()
                .map_err(Error::api("GET /v1/policies"))?;
            for p in &status.policies {
                let selects: Vec<&str> = p.selects.iter().map(|s| s.name.as_str()).collect();
                println!(
                    "    {:<8} {:<32} {:<8} {}",
                    node.name(),
                    format!("{}/{}", p.namespace, p.name),
                    p.ingress,
                    selects.join(",")
                );
            }
        }
        let drops_before = self.drops()?;
        let matrix = step(
            "connectivity under the policy: ping and TCP between every ordered pair",
            || self.connectivity(pods),
        )?;
        print!(
            "{}",
            matrix.render_against(|c| expected_under_policy(&c.from, &c.to))
        );
        let drops_after = self.drops()?;
        println!(
            "==> drops counted by the datapaths during that matrix (GET /v1/drops, both nodes)"
        );
        print!("{}", render_drops(&drops_before, &drops_after));
        println!(
            "==> drop events (as `myelinctl monitor --drops` shows them), the first {EVENT_EXCERPT}"
        );
        for e in events.try_iter().take(EVENT_EXCERPT) {
            println!("    {e}");
        }
        let disagreements = self.explain_step(pods, &matrix)?;
        Ok((matrix, disagreements))
    }

    /// `myelinctl policy explain` for every TCP pair of the matrix under the policy: the rule
    /// that admits it or the policies that isolate its destination, from node0's agent without
    /// a packet sent. Returns the pairs where it disagrees with what the traffic did.
    fn explain_step(&self, pods: &[DemoPod], matrix: &Matrix) -> Result<Vec<String>> {
        println!(
            "==> why: `myelinctl policy explain --from <pod> --to <pod> --port <port>/TCP` (node0), every TCP pair"
        );
        let client = self.cluster.node(0).client();
        let mut disagreements = Vec::new();
        for c in &matrix.checks {
            let pod_of = |name: &str| pods.iter().find(|p| p.pod.name() == name);
            let (Some(from), Some(to)) = (pod_of(&c.from), pod_of(&c.to)) else {
                continue;
            };
            let end = |p: &DemoPod| myelin_api::ExplainEnd {
                pod: Some(myelin_api::PodRef {
                    namespace: p.pod.namespace().into(),
                    name: p.pod.name().into(),
                }),
                ..Default::default()
            };
            let answer = client
                .explain(&myelin_api::ExplainRequest {
                    from: end(from),
                    to: end(to),
                    protocol: "TCP".into(),
                    port: to.tcp_port,
                })
                .map_err(Error::api("POST /v1/policy/explain"))?;
            let why = if answer.ingress.allows() && !answer.egress.allows() {
                format!("egress: {}", answer.egress)
            } else {
                format!("ingress: {}", answer.ingress)
            };
            println!(
                "    {:<10} -> {:<10} {:>5}/TCP  {:<8} {why}",
                c.from,
                c.to,
                to.tcp_port,
                if answer.allowed { "ALLOWED" } else { "DENIED" }
            );
            if answer.allowed != c.tcp.is_ok() {
                disagreements.push(format!(
                    "policy explain says {} -> {} is {} but the traffic {}",
                    c.from,
                    c.to,
                    if answer.allowed { "allowed" } else { "denied" },
                    if c.tcp.is_ok() {
                        "passed"
                    } else {
                        "was dropped"
                    }
                ));
            }
        }
        Ok(disagreements)
    }

    /// Every node's drop counters, added up by reason.
    fn drops(&self) -> Result<Vec<DropCount>> {
        let mut total: BTreeMap<String, DropCount> = BTreeMap::new();
        for i in self.cluster.node_indexes() {
            let drops = self
                .cluster
                .node(i)
                .client()
                .drops()
                .map_err(Error::api("GET /v1/drops"))?;
            for d in drops {
                let sum = total.entry(d.reason.clone()).or_insert(DropCount {
                    reason: d.reason.clone(),
                    packets: 0,
                    bytes: 0,
                });
                sum.packets += d.packets;
                sum.bytes += d.bytes;
            }
        }
        Ok(total.into_values().collect())
    }

    /// How node0 sees the others, and how it reaches them (`myelinctl status`, `nodes`).
    fn show_nodes(&self) -> Result<()> {
        let first = self.cluster.node(0);
        let client = first.client();
        let status = client.status().map_err(Error::api("GET /v1/status"))?;
        if let Some(r) = status.routing {
            println!(
                "==> {} reaches the other nodes: {} mode through {} ({}), pod MTU {}, VXLAN \
                 port {}",
                first.name(),
                r.mode,
                r.uplink,
                r.node_ip,
                r.pod_mtu,
                r.tunnel_port.map_or("-".to_string(), |p| p.to_string())
            );
        }
        println!("==> myelinctl nodes (on {})", first.name());
        let nodes = client.nodes().map_err(Error::api("GET /v1/nodes"))?;
        println!(
            "    {:<8} {:<16} {:<16} STATUS",
            "NODE", "POD CIDR", "INTERNAL IP"
        );
        for n in nodes {
            println!(
                "    {:<8} {:<16} {:<16} {}",
                n.name,
                n.pod_cidr.unwrap_or_default(),
                n.internal_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                if n.routed {
                    "routed".to_string()
                } else {
                    format!("not routed: {}", n.reason.unwrap_or_default())
                }
            );
        }
        Ok(())
    }

    /// Three replicas of `api` behind a ClusterIP: the frontend's new connections spread over
    /// them, across both nodes; then api-2 leaves the EndpointSlice and gets no more. Returns
    /// what did not go as expected.
    fn service_step(&self, pods: &[DemoPod]) -> Result<Vec<String>> {
        let frontend = pods
            .iter()
            .find(|p| p.pod.name() == "frontend")
            .ok_or_else(|| Error::Demo("the demo cluster has no frontend pod".into()))?;
        let replicas = step(
            "Service demo/api: three replicas (CNI ADD), their EndpointSlice and the Service",
            || -> Result<Vec<ClusterPod>> {
                let replicas = REPLICAS
                    .iter()
                    .map(|(name, node)| {
                        self.cluster.add_pod(*node, "demo", name, &[("app", "api")])
                    })
                    .collect::<Result<Vec<_>>>()?;
                for r in &replicas {
                    self.cluster.wait_until_every_node_knows(r.ip())?;
                }
                Ok(replicas)
            },
        )?;
        let hosts: Vec<&dyn Host> = replicas.iter().map(|r| r as &dyn Host).collect();
        let servers = BackendServers::start(&hosts, SERVICE_PORT.target_port)?;
        let frontend_addr = std::net::SocketAddrV4::new(SERVICE_IP, SERVICE_PORT.port);
        let apply = |members: &[&ClusterPod]| {
            let backends: Vec<Backend> = members
                .iter()
                .map(|r| Backend::ready(r.ip(), self.cluster.node(r.node()).name()))
                .collect();
            self.cluster.apply(
                "service-api",
                &[
                    cluster_ip_service(
                        "demo",
                        "api",
                        SERVICE_IP,
                        &[SERVICE_PORT],
                        serde_json::json!({}),
                    ),
                    endpoint_slice("demo", "api-1", "api", &[SERVICE_PORT], &backends),
                ],
            )
        };
        let all: Vec<&ClusterPod> = replicas.iter().collect();
        apply(&all)?;
        ask_until(
            &frontend.pod,
            frontend_addr,
            Protocol::Tcp,
            Duration::from_secs(10),
            |a| matches!(a, Answer::Backend(_)),
        )?;
        let mut unexpected = Vec::new();
        let mut look = |title: &str, members: &[&ClusterPod]| -> Result<()> {
            println!(
                "==> {title}: {SERVICE_QUESTIONS} new connections from the frontend to {frontend_addr}"
            );
            let answers = tally(&ask_many(
                &frontend.pod,
                frontend_addr,
                Protocol::Tcp,
                SERVICE_QUESTIONS,
            )?)?;
            for r in &replicas {
                let at = std::net::SocketAddrV4::new(r.ip(), SERVICE_PORT.target_port);
                let n = answers.get(&at).copied().unwrap_or(0);
                let member = members.iter().any(|m| m.ip() == r.ip());
                println!(
                    "    {:<6} on {:<6} {:<15} {:>3} connections{}",
                    r.name(),
                    self.cluster.node(r.node()).name(),
                    at.to_string(),
                    n,
                    if member {
                        ""
                    } else {
                        "   (not in the EndpointSlice)"
                    }
                );
                if member != (n > 0) {
                    unexpected.push(format!("{title}: {} took {n} connections", r.name()));
                }
            }
            Ok(())
        };
        look("load-balanced by the datapath", &all)?;
        println!("==> myelinctl services (node0)");
        for line in self.cluster.node(0).myelinctl(&["services"])?.lines() {
            println!("    {line}");
        }
        let remaining: Vec<&ClusterPod> = replicas.iter().take(2).collect();
        apply(&remaining)?;
        // Until no new connection reaches the replica that left (the agents take a moment).
        let gone = std::net::SocketAddrV4::new(replicas[2].ip(), SERVICE_PORT.target_port);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && tally(&ask_many(&frontend.pod, frontend_addr, Protocol::Tcp, 10)?)?
                .contains_key(&gone)
        {
            thread::sleep(Duration::from_millis(200));
        }
        look("api-2 taken out of the EndpointSlice", &remaining)?;
        self.cluster.remove_applied("service-api")?;
        drop(servers);
        for r in replicas {
            self.cluster.delete_pod(r)?;
        }
        Ok(unexpected)
    }

    fn check_interrupted(&self) -> Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn create_pods(&self, summary: &ClusterSummary) -> Result<Vec<DemoPod>> {
        for (name, labels) in &summary.namespaces {
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self.cluster.add_namespace(name, &labels)?;
        }
        let mut pods = Vec::new();
        for p in &summary.pods {
            self.check_interrupted()?;
            let node = self
                .cluster
                .node_indexes()
                .into_iter()
                .find(|i| self.cluster.node(*i).name() == p.node)
                .ok_or_else(|| {
                    Error::Demo(format!("pod {} is on an unknown node {}", p.name, p.node))
                })?;
            let labels: Vec<(&str, &str)> = p
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let pod = self.cluster.add_pod(node, &p.namespace, &p.name, &labels)?;
            pods.push(DemoPod {
                pod,
                tcp_port: p.tcp_ports.first().copied().unwrap_or(0),
            });
        }
        for p in &pods {
            self.cluster.wait_until_every_node_knows(p.pod.ip())?;
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
        let mut all = BTreeMap::new();
        for i in self.cluster.node_indexes() {
            for e in self.cluster.node(i).endpoints()? {
                all.insert(e.ip, e.counters);
            }
        }
        Ok(all)
    }

    fn delete_pods(&self, pods: Vec<DemoPod>) -> Result<()> {
        for p in pods {
            self.cluster.delete_pod(p.pod)?;
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
    fn outcome(&self) -> Expected {
        Expected {
            ping: self.ping.is_ok(),
            tcp: self.tcp.is_ok(),
        }
    }
}

struct Matrix {
    names: Vec<String>,
    checks: Vec<Check>,
}

impl Matrix {
    /// Checks whose ping or TCP outcome differs from `expect`.
    fn unexpected(&self, expect: impl Fn(&Check) -> Expected) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.outcome() != expect(c))
            .collect()
    }

    /// Rows are senders, columns receivers; each cell is `ping tcp` round trips in ms. Every
    /// failure is listed, with why.
    fn render(&self) -> String {
        self.render_against(|_| Expected::CONNECTED)
    }

    /// Like [`Self::render`], but failures that `expect` predicts are marked `✗` without
    /// comment, and only unexpected outcomes are listed (marked `!`).
    fn render_against(&self, expect: impl Fn(&Check) -> Expected) -> String {
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
                        |c| {
                            let e = expect(c);
                            format!("{} {}", mark(&c.ping, e.ping), mark(&c.tcp, e.tcp))
                        },
                    );
                out.push_str(&format!("{cell:<CELL$}"));
            }
            out.push('\n');
        }
        out.push_str(
            "    cells: ping and TCP (connect + echo) round trip in ms; ✗ denied; ! not as expected\n",
        );
        for c in &self.checks {
            let e = expect(c);
            let surprises = [("ping", &c.ping, e.ping), ("TCP", &c.tcp, e.tcp)]
                .into_iter()
                .filter(|(_, outcome, expected)| outcome.is_ok() != *expected);
            for (what, outcome, _) in surprises {
                let detail = match outcome {
                    Ok(_) => "passed, expected to be denied".to_string(),
                    Err(e) => e.clone(),
                };
                out.push_str(&format!("    ! {} -> {} {what}: {detail}\n", c.from, c.to));
            }
        }
        out
    }
}

/// `✓ 0.050` for a round trip, `✗` for a failure, with `!` when that was not `expected`.
fn mark(outcome: &std::result::Result<Duration, String>, expected: bool) -> String {
    let surprise = if outcome.is_ok() == expected { "" } else { "!" };
    match outcome {
        Ok(rtt) => format!("✓ {:.3}{surprise}", rtt.as_secs_f64() * 1000.0),
        Err(_) => format!("✗{surprise}"),
    }
}

/// Reasons whose counters moved between `before` and `after`, with how much.
fn render_drops(before: &[DropCount], after: &[DropCount]) -> String {
    let mut out = format!("    {:<24} {:>8} {:>8}\n", "REASON", "PACKETS", "BYTES");
    let mut any = false;
    for a in after {
        let b = before.iter().find(|b| b.reason == a.reason);
        let packets = a.packets.saturating_sub(b.map_or(0, |b| b.packets));
        let bytes = a.bytes.saturating_sub(b.map_or(0, |b| b.bytes));
        if packets > 0 {
            any = true;
            out.push_str(&format!("    {:<24} {packets:>+8} {bytes:>+8}\n", a.reason));
        }
    }
    if !any {
        out.push_str("    (none)\n");
    }
    out
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
    fn the_embedded_cluster_has_three_pods_with_ports_on_both_nodes() {
        let summary = cluster::summarize(CLUSTER_YAML).unwrap();
        let pods: Vec<_> = summary
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.node.as_str(), p.tcp_ports.clone()))
            .collect();
        assert_eq!(
            pods,
            vec![
                ("frontend", "node0", vec![80]),
                ("backend", "node1", vec![8080]),
                ("db", "node0", vec![5432])
            ]
        );
        assert_eq!(summary.namespaces[0].0, "demo");
    }

    #[test]
    fn matrix_marks_each_pair_and_explains_failures() {
        let matrix = Matrix {
            names: vec!["a".into(), "b".into()],
            checks: vec![check("a", "b", true), check("b", "a", false)],
        };
        let text = matrix.render();
        assert!(text.contains("✓ 0.050 ✓ 0.250"), "{text}");
        assert!(text.contains("✗! ✗!"), "{text}");
        assert!(text.contains("! b -> a ping: timed out"), "{text}");
        let unexpected = matrix.unexpected(|_| Expected::CONNECTED);
        assert_eq!(unexpected.len(), 1);
        assert_eq!(
            (unexpected[0].from.as_str(), unexpected[0].to.as_str()),
            ("b", "a")
        );
        // A policy that denies b -> a makes the same matrix all expected, and says nothing
        // more about the denial than its mark.
        let denies_b_to_a = |c: &Check| Expected {
            ping: c.from == "a",
            tcp: c.from == "a",
        };
        assert!(matrix.unexpected(denies_b_to_a).is_empty());
        let text = matrix.render_against(denies_b_to_a);
        assert!(
            text.contains("✗ ✗") && !text.contains("✗!") && !text.contains("! b -> a"),
            "{text}"
        );
    }

    #[test]
    fn the_embedded_policy_names_two_policies_of_the_demo_namespace() {
        let names: Vec<String> = policy_names(POLICY_YAML).unwrap().into_iter().collect();
        assert_eq!(
            names,
            vec!["demo/backend-from-frontend", "demo/db-from-backend"]
        );
    }

    #[test]
    fn under_the_policy_only_the_frontend_reaches_the_backend_and_only_by_tcp() {
        let pods = ["frontend", "backend", "db"];
        let mut table = Vec::new();
        for from in pods {
            for to in pods.iter().filter(|to| **to != from) {
                let e = expected_under_policy(from, to);
                table.push(format!("{from}->{to}:{}{}", e.ping as u8, e.tcp as u8));
            }
        }
        assert_eq!(
            table.join(" "),
            "frontend->backend:01 frontend->db:00 backend->frontend:11 backend->db:11 \
             db->frontend:11 db->backend:00"
        );
    }

    #[test]
    fn drops_show_only_reasons_that_moved() {
        let count = |reason: &str, packets, bytes| DropCount {
            reason: reason.into(),
            packets,
            bytes,
        };
        let before = [
            count("policy-denied-ingress", 2, 120),
            count("malformed", 1, 60),
        ];
        let after = [
            count("policy-denied-ingress", 7, 420),
            count("malformed", 1, 60),
        ];
        let text = render_drops(&before, &after);
        assert!(
            text.contains("policy-denied-ingress") && text.contains("+5"),
            "{text}"
        );
        assert!(!text.contains("malformed"), "{text}");
        assert!(render_drops(&after, &after).contains("(none)"));
    }
}
