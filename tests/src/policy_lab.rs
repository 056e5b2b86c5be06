//! The NetworkPolicy lab: one node, namespaces `a` (`team: a`) and `b` (`team: b`) with pods
//! `web`, `api` and `db` in each, TCP and UDP echo servers on ports 80 and 81 in every pod and on
//! the node, and the reachability matrix between all of them, probed at once.
//!
//! Every Namespace and Pod object has a file of its own in the node's cluster dir, so that a
//! test can relabel one by rewriting its file while traffic runs. The policies under test are
//! one more file, which [`PolicyLab::apply`] replaces and then waits for: the agent's
//! `GET /v1/policies` lists a policy only once its map entries are written, and says which
//! ones it rejected (each still in force, as its last good version or as a deny).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    Error, Result,
    cluster::namespace_object,
    cni::Pod,
    node::{Node, NodeSpec},
    probe::{EchoServers, ProbeOf, Service, probe_all},
    run::RunPrefix,
    traffic::{Host, TRAFFIC_TIMEOUT},
};

/// The ports every pod and the node serve, on TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];

/// The first try of every probe: a denied probe costs this much, and all run at once. An
/// allowed exchange crosses two veths in well under a millisecond; a probe expected to pass
/// that fails this fast gets a second try with [`TRAFFIC_TIMEOUT`], so that only a real
/// denial, not a loaded machine, fails it.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// How long the agent may take to put a new set of policies in force (debounce, scan, maps).
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster-dir file holding the policies of the current case.
const POLICY_FILE: &str = "policies";

/// A pod of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabPod {
    pub namespace: &'static str,
    pub app: &'static str,
}

impl LabPod {
    pub const fn new(namespace: &'static str, app: &'static str) -> Self {
        Self { namespace, app }
    }

    /// The six pods, namespace by namespace.
    pub const ALL: [LabPod; 6] = [
        LabPod::new("a", "web"),
        LabPod::new("a", "api"),
        LabPod::new("a", "db"),
        LabPod::new("b", "web"),
        LabPod::new("b", "api"),
        LabPod::new("b", "db"),
    ];

    /// `app: <app>`, and `tier: front` for web, `tier: back` for api and db.
    pub fn labels(self) -> Vec<(&'static str, &'static str)> {
        let tier = if self.app == "web" { "front" } else { "back" };
        vec![("app", self.app), ("tier", tier)]
    }

    /// Container ports as the Pod object declares them. The names are what named-port rules
    /// resolve, per destination pod: `http` is TCP 80 on web but TCP 81 on api, `alt` is UDP 81
    /// on web but UDP 80 on api, and db has neither.
    fn container_ports(self) -> Value {
        match self.app {
            "web" => json!([
                {"name": "http", "containerPort": 80, "protocol": "TCP"},
                {"name": "alt", "containerPort": 81, "protocol": "UDP"},
            ]),
            "api" => json!([
                {"name": "http", "containerPort": 81, "protocol": "TCP"},
                {"name": "alt", "containerPort": 80, "protocol": "UDP"},
            ]),
            _ => json!([
                {"name": "sql", "containerPort": 80, "protocol": "TCP"},
            ]),
        }
    }
}

impl fmt::Display for LabPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.app)
    }
}

/// One end of a probe: a pod, or the node itself (its gateway address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LabHost {
    Pod(LabPod),
    Node,
}

impl LabHost {
    /// The six pods, then the node.
    pub fn all() -> impl Iterator<Item = LabHost> {
        LabPod::ALL
            .into_iter()
            .map(LabHost::Pod)
            .chain([LabHost::Node])
    }

    pub fn is_node(self) -> bool {
        self == LabHost::Node
    }

    pub fn is_pod(self) -> bool {
        !self.is_node()
    }

    /// The pod `namespace/app`.
    pub fn is(self, namespace: &str, app: &str) -> bool {
        matches!(self, LabHost::Pod(p) if p.namespace == namespace && p.app == app)
    }

    /// A pod of `namespace`.
    pub fn in_namespace(self, namespace: &str) -> bool {
        matches!(self, LabHost::Pod(p) if p.namespace == namespace)
    }

    /// A pod with `app: <app>`, in either namespace.
    pub fn has_app(self, app: &str) -> bool {
        matches!(self, LabHost::Pod(p) if p.app == app)
    }
}

impl fmt::Display for LabHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabHost::Pod(p) => p.fmt(f),
            LabHost::Node => f.write_str("node"),
        }
    }
}

/// One cell of the matrix: `service` of `to`, asked from `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub from: LabHost,
    pub to: LabHost,
    pub service: Service,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} {}", self.from, self.to, self.service)
    }
}

/// The services of a matrix: TCP and UDP on [`PORTS`], and ping when asked for.
pub fn services(with_ping: bool) -> Vec<Service> {
    let mut all: Vec<Service> = PORTS
        .iter()
        .map(|&p| Service::Tcp(p))
        .chain(PORTS.iter().map(|&p| Service::Udp(p)))
        .collect();
    if with_ping {
        all.push(Service::Ping);
    }
    all
}

/// Every ordered pair of distinct hosts (six pods and the node) times `services`.
pub fn full_matrix(with_ping: bool) -> Vec<Probe> {
    let services = services(with_ping);
    let mut probes = Vec::new();
    for from in LabHost::all() {
        for to in LabHost::all().filter(|to| *to != from) {
            for &service in &services {
                probes.push(Probe { from, to, service });
            }
        }
    }
    probes
}

pub struct PolicyLab {
    // Dropped in this order: servers, then pods (their namespaces), then the node.
    servers: Vec<EchoServers>,
    pods: BTreeMap<LabPod, Pod>,
    node: Node,
}

impl PolicyLab {
    /// Starts the node, writes the namespaces and pods into its cluster dir, adds the pods
    /// through CNI (after their objects, as a cluster would), and starts the echo servers.
    pub fn start(run: &RunPrefix) -> Result<Self> {
        Self::start_with(run, NodeSpec::new("policy"))
    }

    /// [`PolicyLab::start`] with a node of this spec (more agent flags).
    pub fn start_with(run: &RunPrefix, spec: NodeSpec) -> Result<Self> {
        let node = Node::start(run, spec)?;
        let mut lab = Self {
            servers: Vec::new(),
            pods: BTreeMap::new(),
            node,
        };
        for namespace in ["a", "b"] {
            lab.set_namespace_labels(namespace, &[("team", namespace)])?;
        }
        for pod in LabPod::ALL {
            lab.set_pod_labels(pod, &pod.labels())?;
        }
        for pod in LabPod::ALL {
            let added = lab.node.add_pod(pod.namespace, pod.app)?;
            lab.pods.insert(pod, added);
        }
        let mut servers = vec![EchoServers::start(lab.node.netns(), &PORTS)?];
        for pod in lab.pods.values() {
            servers.push(EchoServers::start(pod.netns(), &PORTS)?);
        }
        lab.servers = servers;
        Ok(lab)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn pod(&self, pod: LabPod) -> &Pod {
        // Every LabPod is added in `start`, which fails otherwise.
        &self.pods[&pod]
    }

    pub fn host(&self, host: LabHost) -> &(dyn Host + Sync) {
        match host {
            LabHost::Pod(p) => self.pod(p),
            LabHost::Node => &self.node,
        }
    }

    /// What the agent's `policy explain` says of a probe (`None` for ping: NetworkPolicy ports
    /// name TCP, UDP and SCTP only). Pods are named, the node is its gateway address.
    pub fn explain(&self, probe: &Probe) -> Result<Option<myelin_api::PolicyExplanation>> {
        let (protocol, port) = match probe.service {
            Service::Tcp(port) => ("TCP", port),
            Service::Udp(port) => ("UDP", port),
            Service::Ping => return Ok(None),
        };
        let end = |host: LabHost| match host {
            LabHost::Pod(p) => myelin_api::ExplainEnd {
                pod: Some(myelin_api::PodRef {
                    namespace: p.namespace.into(),
                    name: self.pod(p).name().into(),
                }),
                ..Default::default()
            },
            LabHost::Node => myelin_api::ExplainEnd {
                ip: Some(self.node.gateway()),
                ..Default::default()
            },
        };
        let req = myelin_api::ExplainRequest {
            from: end(probe.from),
            to: end(probe.to),
            protocol: protocol.into(),
            port,
        };
        let answer = self
            .node
            .client()
            .explain(&req)
            .map_err(Error::api(format!("policy explain of {probe}")))?;
        Ok(Some(answer))
    }

    /// `<ip of pod>/32`, for ipBlock peers.
    pub fn cidr_of(&self, pod: LabPod) -> String {
        format!("{}/32", self.pod(pod).ip())
    }

    /// Rewrites the pod's object with exactly `labels`; returns when the file was in place.
    pub fn set_pod_labels(&self, pod: LabPod, labels: &[(&str, &str)]) -> Result<Instant> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
            .collect();
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": pod.app, "namespace": pod.namespace, "labels": labels },
            "spec": {
                "nodeName": self.node.name(),
                "containers": [{
                    "name": "app",
                    "image": "busybox",
                    "ports": pod.container_ports(),
                }],
            },
        });
        self.node
            .cluster()
            .write(&format!("pod-{}-{}", pod.namespace, pod.app), &[object])?;
        Ok(Instant::now())
    }

    /// Rewrites the namespace's object with `labels` (plus `kubernetes.io/metadata.name`, which
    /// Kubernetes always sets); returns when the file was in place.
    pub fn set_namespace_labels(
        &self,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<Instant> {
        self.node.cluster().write(
            &format!("namespace-{namespace}"),
            &[namespace_object(namespace, labels)],
        )?;
        Ok(Instant::now())
    }

    /// Replaces the policies in force with the NetworkPolicy documents in `yaml` and waits until
    /// the agent lists exactly those, the ones in `rejected` (`namespace/name` of policies the
    /// agent must refuse) as rejected and the others not. Unless it is empty, what it waits for
    /// must differ from what the agent lists now, or the wait could end before the agent read
    /// the file: a new set of rules needs new policy names.
    pub fn apply(&self, yaml: &str, rejected: &[&str]) -> Result<()> {
        let mut expected: PolicyListing = policy_names(yaml)?
            .into_iter()
            .map(|n| (n, false))
            .collect();
        for name in rejected {
            match expected.get_mut(*name) {
                Some(is_rejected) => *is_rejected = true,
                None => {
                    return Err(Error::Cluster(format!(
                        "{name} is listed as rejected but is not among the policies written"
                    )));
                }
            }
        }
        if !expected.is_empty() && policies_in_force(&self.node)? == expected {
            return Err(Error::Cluster(format!(
                "the agent lists {expected:?} already: give the new set new names, or the wait \
                 for it could end before the agent read it"
            )));
        }
        self.node.cluster().write_yaml(POLICY_FILE, yaml)?;
        wait_for_policies(&self.node, &expected)
    }

    /// The last `lines` lines of the agent's log.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        agent_log_tail(&self.node, lines)
    }

    /// Runs `probes` at once with `timeout` each.
    pub fn probe(&self, probes: &[Probe], timeout: Duration) -> Result<Vec<Result<(), String>>> {
        let of: Vec<ProbeOf<'_>> = probes
            .iter()
            .map(|p| ProbeOf {
                from: self.host(p.from),
                to: self.host(p.to),
                service: p.service,
            })
            .collect();
        probe_all(&of, timeout)
    }

    /// Probes the full matrix and compares it with `expect` (true: the probe must pass).
    pub fn check(&self, expect: impl Fn(&Probe) -> bool, with_ping: bool) -> Result<MatrixCheck> {
        self.check_probes(full_matrix(with_ping), expect, with_ping)
    }

    /// Runs `probes` at once and compares them with `expect` (true: the probe must pass).
    /// Probes that were expected to pass and did not get a second, patient try. `with_ping`
    /// says whether the rendered matrix has a ping column.
    pub fn check_probes(
        &self,
        probes: Vec<Probe>,
        expect: impl Fn(&Probe) -> bool,
        with_ping: bool,
    ) -> Result<MatrixCheck> {
        let mut outcomes = self.probe(&probes, PROBE_TIMEOUT)?;
        let retry: Vec<usize> = (0..probes.len())
            .filter(|&i| expect(&probes[i]) && outcomes[i].is_err())
            .collect();
        let again: Vec<Probe> = retry.iter().map(|&i| probes[i]).collect();
        for (i, outcome) in retry.iter().zip(self.probe(&again, TRAFFIC_TIMEOUT)?) {
            outcomes[*i] = outcome;
        }
        Ok(MatrixCheck {
            cells: probes
                .into_iter()
                .zip(outcomes)
                .map(|(probe, outcome)| Cell {
                    expected: expect(&probe),
                    probe,
                    outcome,
                })
                .collect(),
            with_ping,
            retried: again,
        })
    }
}

/// The policies an agent has in force: `namespace/name` -> whether the latest version of the
/// policy was rejected (it is then in force as its last good version, or as a deny).
pub type PolicyListing = BTreeMap<String, bool>;

/// The policies `node`'s agent enforces now.
pub fn policies_in_force(node: &Node) -> Result<PolicyListing> {
    let status = node
        .client()
        .policies()
        .map_err(Error::api("GET /v1/policies"))?;
    Ok(status
        .policies
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.rejected.is_some()))
        .collect())
}

/// Polls `node`'s `GET /v1/policies` until the policies in force are exactly `expected`; the
/// agent lists a policy only once its map entries are written.
pub fn wait_for_policies(node: &Node, expected: &PolicyListing) -> Result<()> {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let in_force = policies_in_force(node)?;
        if &in_force == expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Traffic {
                what: format!(
                    "the agent did not put the policies in force within {APPLY_TIMEOUT:?}: \
                     expected {expected:?}, in force {in_force:?} (true: rejected)\n\
                     --- agent log (tail) ---\n{}",
                    agent_log_tail(node, 40)
                ),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of `node`'s agent log.
pub fn agent_log_tail(node: &Node, lines: usize) -> String {
    let log = node.agent_log();
    let all: Vec<&str> = log.lines().collect();
    let mut tail = all[all.len().saturating_sub(lines)..].join("\n");
    tail.push('\n');
    tail
}

/// `namespace/name` of every NetworkPolicy in a multi-document YAML text.
pub fn policy_names(yaml: &str) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let object: Value = serde::Deserialize::deserialize(doc).map_err(|source| Error::Yaml {
            context: "parsing the policies of a case".into(),
            source,
        })?;
        if object.is_null() || object["kind"] != "NetworkPolicy" {
            continue;
        }
        let meta = &object["metadata"];
        match (meta["namespace"].as_str(), meta["name"].as_str()) {
            (Some(namespace), Some(name)) => names.insert(format!("{namespace}/{name}")),
            _ => {
                return Err(Error::Cluster(format!(
                    "a NetworkPolicy of the case has no namespace or name: {meta}"
                )));
            }
        };
    }
    Ok(names)
}

/// One probed cell and what it should have done.
pub struct Cell {
    pub probe: Probe,
    pub expected: bool,
    pub outcome: Result<(), String>,
}

impl Cell {
    pub fn passed(&self) -> bool {
        self.outcome.is_ok()
    }

    pub fn as_expected(&self) -> bool {
        self.passed() == self.expected
    }
}

/// A probed matrix against its expectation.
pub struct MatrixCheck {
    pub cells: Vec<Cell>,
    with_ping: bool,
    /// Probes expected to pass that needed their second try.
    pub retried: Vec<Probe>,
}

impl MatrixCheck {
    pub fn mismatches(&self) -> Vec<&Cell> {
        self.cells.iter().filter(|c| !c.as_expected()).collect()
    }

    /// Rows are sources, columns destinations; a cell has one mark per service: `+` passed
    /// and expected to, `-` denied and expected to be, `D` denied but expected to pass, `A`
    /// passed but expected to be denied. Then every mismatch with the probe's error.
    pub fn render(&self) -> String {
        let services = services(self.with_ping);
        let width = services.len() + 3;
        let mut out = format!("{:<10}", "from \\ to");
        for to in LabHost::all() {
            out.push_str(&format!("{:<width$}", to.to_string()));
        }
        out.push('\n');
        for from in LabHost::all() {
            out.push_str(&format!("{:<10}", from.to_string()));
            for to in LabHost::all() {
                let marks: String = services
                    .iter()
                    .map(|&service| {
                        let probe = Probe { from, to, service };
                        match self.cells.iter().find(|c| c.probe == probe) {
                            None => ' ',
                            Some(c) => match (c.expected, c.passed()) {
                                (true, true) => '+',
                                (false, false) => '-',
                                (true, false) => 'D',
                                (false, true) => 'A',
                            },
                        }
                    })
                    .collect();
                out.push_str(&format!("{marks:<width$}"));
            }
            out.push('\n');
        }
        let legend: Vec<String> = services.iter().map(Service::to_string).collect();
        out.push_str(&format!(
            "marks per cell: {}; + passed, - denied (both as expected), D denied but expected \
             to pass, A passed but expected to be denied\n",
            legend.join(" ")
        ));
        for c in self.mismatches() {
            let what = match &c.outcome {
                Ok(()) => "passed, expected denied".to_string(),
                Err(e) => format!("denied, expected to pass: {e}"),
            };
            out.push_str(&format!("  {}: {what}\n", c.probe));
        }
        out
    }
}

/// A NetworkPolicy document; `spec` is its spec in YAML, as users write it.
pub fn policy(namespace: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|line| format!("  {line}\n")).collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

/// The pod's `namespace/name` as events name it.
pub fn name_of(lab: &PolicyLab, pod: LabPod) -> String {
    format!("{}/{}", pod.namespace, lab.pod(pod).name())
}

/// What the node's flow log holds for `filter` (the latest `last`).
pub fn flows(
    lab: &PolicyLab,
    filter: &myelin_api::FlowFilter,
    last: usize,
) -> Result<myelin_api::FlowsResponse> {
    lab.node()
        .client()
        .flows(filter, last)
        .map_err(Error::api("GET /v1/flows"))
}

/// The filter that picks a pod-to-pod TCP or UDP probe's events; `None` for other probes.
pub fn filter_of(lab: &PolicyLab, probe: &Probe) -> Option<myelin_api::FlowFilter> {
    let (LabHost::Pod(from), LabHost::Pod(to)) = (probe.from, probe.to) else {
        return None;
    };
    let port = match probe.service {
        Service::Tcp(p) | Service::Udp(p) => p,
        Service::Ping => return None,
    };
    Some(myelin_api::FlowFilter {
        from: Some(name_of(lab, from)),
        to: Some(name_of(lab, to)),
        port: Some(port),
        ..Default::default()
    })
}

/// Whether an event's check agrees with `policy explain`'s: the rule it names is one of those
/// that admit the flow, the policies it names are exactly those that isolate the pod.
fn agrees(event: Option<&myelin_api::PolicyCheck>, explained: &myelin_api::PolicyCheck) -> bool {
    use myelin_api::PolicyCheck;
    match (event, explained) {
        (
            Some(PolicyCheck::Allowed { rules: named }),
            PolicyCheck::Allowed { rules: admitting },
        ) => named.len() == 1 && admitting.contains(&named[0]),
        (Some(event), explained) => event == explained,
        (None, _) => false,
    }
}

/// Checks the latest event of a probe against `policy explain`'s answer for it; `Err` says
/// what differs.
pub fn check_attribution(
    probe: &Probe,
    explained: &myelin_api::PolicyExplanation,
    events: &[myelin_api::FlowEvent],
) -> std::result::Result<(), String> {
    let protocol = match probe.service {
        Service::Tcp(_) => "tcp",
        _ => "udp",
    };
    let kind = if explained.allowed { "allowed" } else { "drop" };
    let Some(event) = events
        .iter()
        .rev()
        .find(|e| e.kind == kind && e.protocol == protocol)
    else {
        return Err(format!("{probe}: no {kind} event; the log has {events:#?}"));
    };
    // Both checks of an allowed flow; of a drop, the one that dropped it (the other may not
    // have been made).
    let egress_decided = explained.allowed || !explained.egress.allows();
    let ingress_decided = explained.allowed || explained.egress.allows();
    let mut wrong = Vec::new();
    if egress_decided && !agrees(event.egress.as_ref(), &explained.egress) {
        wrong.push(format!(
            "egress: event {:?}, explain {:?}",
            event.egress, explained.egress
        ));
    }
    if ingress_decided && !agrees(event.ingress.as_ref(), &explained.ingress) {
        wrong.push(format!(
            "ingress: event {:?}, explain {:?}",
            event.ingress, explained.ingress
        ));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("{probe}: {} ({event})", wrong.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_matrix_covers_every_ordered_pair_of_distinct_hosts() {
        let probes = full_matrix(false);
        // 7 hosts (6 pods and the node), 42 ordered pairs, 4 services.
        assert_eq!(probes.len(), 7 * 6 * 4);
        assert!(probes.iter().all(|p| p.from != p.to));
        let distinct: BTreeSet<_> = probes.iter().collect();
        assert_eq!(distinct.len(), probes.len());
        assert_eq!(full_matrix(true).len(), 7 * 6 * 5);
    }

    #[test]
    fn policy_names_are_read_from_every_document() {
        let yaml = "kind: NetworkPolicy\nmetadata: {name: p1, namespace: a}\n---\n\
                    kind: Namespace\nmetadata: {name: a}\n---\n\
                    kind: NetworkPolicy\nmetadata: {name: p2, namespace: b}\n";
        let names = policy_names(yaml).unwrap();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["a/p1".to_string(), "b/p2".to_string()]
        );
        assert!(policy_names("").unwrap().is_empty());
        assert!(policy_names("kind: NetworkPolicy\nmetadata: {name: p}\n").is_err());
    }

    #[test]
    fn the_rendered_diff_marks_and_lists_each_mismatch() {
        let probe = |from, to, service| Probe { from, to, service };
        let web = LabHost::Pod(LabPod::new("a", "web"));
        let db = LabHost::Pod(LabPod::new("a", "db"));
        let check = MatrixCheck {
            cells: vec![
                Cell {
                    probe: probe(web, db, Service::Tcp(80)),
                    expected: true,
                    outcome: Err("timed out".into()),
                },
                Cell {
                    probe: probe(web, db, Service::Tcp(81)),
                    expected: false,
                    outcome: Ok(()),
                },
                Cell {
                    probe: probe(web, db, Service::Udp(80)),
                    expected: false,
                    outcome: Err("timed out".into()),
                },
                Cell {
                    probe: probe(web, db, Service::Udp(81)),
                    expected: true,
                    outcome: Ok(()),
                },
            ],
            with_ping: false,
            retried: vec![],
        };
        assert_eq!(check.mismatches().len(), 2);
        let text = check.render();
        assert!(text.contains("DA-+"), "{text}");
        assert!(
            text.contains("a/web -> a/db tcp/80: denied, expected to pass: timed out"),
            "{text}"
        );
        assert!(
            text.contains("a/web -> a/db tcp/81: passed, expected denied"),
            "{text}"
        );
    }
}
