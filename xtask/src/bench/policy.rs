//! Scenario 4a: policy scale. Request/response and connection rates between two pods with 0,
//! 100, 1,000 and 10,000 rules selecting the destination, on Myelin (NetworkPolicy through the
//! directory source) and with the same rules as an iptables chain in a ptp node's FORWARD
//! path; and the time from a policy change to its enforcement on a running flow, through the
//! directory source and through the Kubernetes source.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use myelin_tests::{
    Node, NodeSpec, RunPrefix,
    apiserver::{KubernetesNode, Resource},
    bench::{
        cni::{BenchPod, CniDriver, CniPlugin, ReferenceNode, ReferencePlugin, Sandbox},
        cpus::flow_cpu,
        iptables,
        policy::{FIRST_RULE_PORT, deny_ingress_policy, rules_policy, wait_for_policy_entries},
        tcp::{EchoServer, tcp_crr, tcp_rr, time_until_connections_fail, time_until_flow_stops},
    },
    cluster::{ClusterDir, namespace_object, pod_object},
    traffic::Host,
};
use serde_json::Value;

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, count, number, repetitions},
    rotated,
};

pub const ID: &str = "policy";
pub const TITLE: &str = "4a. Policy scale and enforcement";

const NAMESPACE: &str = "bench";
const SERVER: (&str, &str) = ("app", "server");
const CLIENT: (&str, &str) = ("app", "client");
const RR_PORT: u16 = 11111;
const CRR_PORT: u16 = 7000;
const ENFORCE_PORT: u16 = 7100;
/// How long the agent may take to compute and write the largest rule set.
const APPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long traffic may go on after a policy change before it counts as not enforced.
const ENFORCE_WAIT: Duration = Duration::from_secs(3);
const MYELIN: &str = "myelin";
const IPTABLES: &str = "iptables";

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        format!(
            "rules: one NetworkPolicy selecting the server pod with N ingress rules, each \
             allowing the client pod on its own TCP port from {FIRST_RULE_PORT} up, plus rules \
             allowing the measured ports; every rule is a policy map entry, none matches the \
             measured traffic"
        ),
        "Myelin: written to the agent's directory source; measured once the policy map holds \
         exactly the expected entries (GET /v1/policies)"
            .into(),
        "iptables: the same rules in a chain the FORWARD chain of a ptp node jumps to for the \
         server's traffic (ptp routes pod to pod through the node; a bridge would bypass \
         iptables), built as iptables policy engines build theirs: ESTABLISHED,RELATED \
         accepted first, then the rules, then a drop. A packet count on the jump proves the \
         traffic passes it"
            .into(),
        format!(
            "request/response: one connection, one byte each way (as in scenario 1), {} s. \
             Both datapaths track connections, so an established flow's packets skip the \
             rules: this shows what rules cost per packet",
            s.rr.as_secs_f64()
        ),
        format!(
            "connection rate: a new TCP connection per 1-byte request/response, closed with a \
             reset, for {} s; every connection is a new flow and pays the rule lookup (Myelin: \
             LPM lookups; iptables: a walk of the chain)",
            s.crr.as_secs_f64()
        ),
        format!(
            "{}; in each, every rule count is applied once in a rotating order and both \
             datapaths are measured with it; ratios to 0 rules are pair by pair",
            repetitions(s.policy_reps)
        ),
        format!(
            "enforcement: the change removes the only policy allowing 1-byte request/response \
             traffic to the server (a deny-all ingress policy stays); the time runs from the \
             change to the traffic's last answer (silence for 300 ms means stopped). Measured \
             for new connections ({} per source) and for a running connection ({} per \
             source); traffic still answered {} s after the change is counted, not \
             timed. The directory source waits 100 ms for file writes to settle before it \
             rescans",
            repetitions(s.enforcement_reps),
            repetitions(s.running_flow_reps),
            ENFORCE_WAIT.as_secs()
        ),
    ];
    let run = RunPrefix::new();
    println!("    resources named {}-*", run.as_str());

    let mut spec = NodeSpec::new("policy");
    spec.binaries = Some(ctx.binaries.clone());
    spec.echo_agent_log_on_drop = false;
    let node = Node::start(&run, spec)?;
    node.cluster().write("pods", &pod_objects(node.name()))?;
    let plugin = CniPlugin::myelin(&node)?;
    let driver = CniDriver::new(node.netns(), &plugin);
    let client = BenchPod::attach(&driver, Sandbox::create(&run, NAMESPACE, "client")?)?;
    let server = BenchPod::attach(&driver, Sandbox::create(&run, NAMESPACE, "server")?)?;

    let ptp = ReferenceNode::start(&run, ReferencePlugin::Ptp, "10.245.4.0/24")?;
    let ipt_client = BenchPod::attach(
        &ptp.driver(),
        Sandbox::create(&run, "default", "ipt-client")?,
    )?;
    let ipt_server = BenchPod::attach(
        &ptp.driver(),
        Sandbox::create(&run, "default", "ipt-server")?,
    )?;
    iptables::hook_forward(ptp.netns(), ipt_server.ip())?;

    let myelin_echo = EchoServer::start(&server, CRR_PORT, flow_cpu(0))?;
    let ipt_echo = EchoServer::start(&ipt_server, CRR_PORT, flow_cpu(0))?;
    let systems = [
        System {
            name: MYELIN,
            client: &client,
            server: &server,
            echo: &myelin_echo,
        },
        System {
            name: IPTABLES,
            client: &ipt_client,
            server: &ipt_server,
            echo: &ipt_echo,
        },
    ];

    let mut rr = Metric::new(
        "policy_rr",
        "TCP request/response with N rules",
        "round trips/s",
        Shape::Repeated,
    );
    let mut crr = Metric::new(
        "policy_crr",
        "New connections with N rules",
        "connections/s",
        Shape::Repeated,
    );
    for system in [MYELIN, IPTABLES] {
        for &n in s.policy_rules.iter().filter(|n| **n > 0) {
            rr = rr.ratio(&variant(system, n), &variant(system, 0));
            crr = crr.ratio(&variant(system, n), &variant(system, 0));
        }
    }
    let mut apply = Metric::new(
        "policy_apply",
        "Myelin: policy file written to all entries in the map",
        "ms",
        Shape::Distribution,
    );
    let mut apply_ipt = Metric::new(
        "policy_apply_iptables",
        "iptables-restore of the chain",
        "ms",
        Shape::Distribution,
    );
    let scale = (|| -> Result<()> {
        let mut chain_checked = false;
        for rep in 0..s.policy_reps {
            for n in rotated(&s.policy_rules, rep) {
                ctx.check()?;
                let took = apply_rules(&node, n)?;
                apply.push(&variant(MYELIN, n), ms(took));
                let started = Instant::now();
                iptables::restore(
                    ptp.netns(),
                    &iptables::chain_rules(
                        ipt_client.ip(),
                        n,
                        FIRST_RULE_PORT,
                        &[RR_PORT, CRR_PORT],
                    ),
                )?;
                apply_ipt.push(&variant(IPTABLES, n), ms(started.elapsed()));
                for system in rotated(&systems, rep) {
                    ctx.check()?;
                    let name = variant(system.name, n);
                    let rate = tcp_rr(system.client, system.server, RR_PORT, 1, s.rr)?;
                    rr.push(&name, rate);
                    let connections = tcp_crr(system.client, system.echo, s.crr)?;
                    crr.push(&name, connections);
                    println!(
                        "    [{}/{}] {:<22} {:>9} round trips/s {:>9} connections/s",
                        rep + 1,
                        s.policy_reps,
                        name,
                        number(rate),
                        number(connections)
                    );
                }
                if n > 0 && !chain_checked {
                    let packets = iptables::packets_through_chain(ptp.netns())?;
                    ensure!(
                        packets > 0,
                        "no packet went through the iptables chain: the baseline measured nothing"
                    );
                    chain_checked = true;
                }
            }
        }
        Ok(())
    })();
    out.metrics.extend([rr, crr, apply, apply_ipt]);
    scale?;

    let mut enforcement = Metric::new(
        "policy_enforcement",
        "Policy change to enforcement",
        "ms",
        Shape::Distribution,
    );
    let enforced = (|| -> Result<()> {
        ctx.check()?;
        apply_rules(&node, 0)?;
        enforce_through_dir(ctx, &node, &client, &server, &mut enforcement, out)?;
        ctx.check()?;
        // Its own run prefix: the Kubernetes node's pods reuse the names `client`/`server`.
        enforce_through_kubernetes(ctx, &RunPrefix::new(), &mut enforcement, out)
    })();
    out.metrics.push(enforcement);
    enforced
}

#[derive(Clone, Copy)]
struct System<'a> {
    name: &'static str,
    client: &'a BenchPod,
    server: &'a BenchPod,
    echo: &'a EchoServer,
}

fn variant(system: &str, rules: usize) -> String {
    format!("{system}, {} rules", count(rules))
}

fn pod_objects(node: &str) -> Vec<Value> {
    vec![
        namespace_object(NAMESPACE, &[]),
        pod_object(node, NAMESPACE, "client", &[CLIENT], &[]),
        pod_object(node, NAMESPACE, "server", &[SERVER], &[RR_PORT, CRR_PORT]),
    ]
}

/// Writes (or, for 0, removes) the rules file and waits until the map holds every entry.
fn apply_rules(node: &Node, rules: usize) -> Result<Duration> {
    let cluster = node.cluster();
    let started = Instant::now();
    let expected = if rules == 0 {
        remove(&cluster, "rules")?;
        0
    } else {
        cluster.write(
            "rules",
            &[rules_policy(
                NAMESPACE,
                "rules",
                SERVER,
                CLIENT,
                rules,
                &[RR_PORT, CRR_PORT],
            )],
        )?;
        rules + 2
    };
    wait_for_policy_entries(node, expected, APPLY_TIMEOUT)?;
    Ok(started.elapsed())
}

fn remove(cluster: &ClusterDir, stem: &str) -> Result<()> {
    let path = cluster.path().join(format!("{stem}.yaml"));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn allow_policy() -> Value {
    rules_policy(NAMESPACE, "allow", SERVER, CLIENT, 0, &[ENFORCE_PORT])
}

/// A way to change policy: put the allowing policy in force, and take it away.
struct PolicyChange<'a> {
    source: &'static str,
    node: &'a Node,
    allow: &'a dyn Fn() -> Result<()>,
    revoke: &'a dyn Fn() -> myelin_tests::Result<()>,
}

/// New connections, then a running flow: the time from revoking the allowing policy until the
/// traffic goes unanswered. Traffic still answered [`ENFORCE_WAIT`] after the change is
/// counted, not timed.
fn measure_enforcement(
    ctx: &Context<'_>,
    change: &PolicyChange<'_>,
    client: &BenchPod,
    server: &EchoServer,
    metric: &mut Metric,
    out: &mut ScenarioReport,
) -> Result<()> {
    let s = ctx.settings;
    for (kind, reps, running) in [
        ("new connections", s.enforcement_reps, false),
        ("running flow", s.running_flow_reps, true),
    ] {
        let variant = format!("{kind}, {}", change.source);
        let mut unenforced = 0;
        for rep in 0..reps {
            ctx.check()?;
            (change.allow)()?;
            wait_for_policy_entries(change.node, 1, APPLY_TIMEOUT)?;
            let took = if running {
                time_until_flow_stops(client, server, ENFORCE_WAIT, change.revoke)?
            } else {
                time_until_connections_fail(client, server, ENFORCE_WAIT, change.revoke)?
            };
            match took {
                Some(took) => metric.push(&variant, ms(took)),
                None => unenforced += 1,
            }
            // Every tenth line is enough to show it moves.
            if rep % 10 == 0 || rep + 1 == reps {
                let result = took.map_or_else(
                    || format!("still answered {ENFORCE_WAIT:?} after the change"),
                    |t| format!("{:.1} ms", ms(t)),
                );
                println!("    [{}/{reps}] enforcement, {variant}: {result}", rep + 1);
            }
        }
        out.add_figure(
            &format!(
                "{variant}: changes not enforced within {} s",
                ENFORCE_WAIT.as_secs()
            ),
            unenforced as f64,
            format!("of {reps}"),
        );
    }
    Ok(())
}

fn enforce_through_dir(
    ctx: &Context<'_>,
    node: &Node,
    client: &BenchPod,
    server: &BenchPod,
    metric: &mut Metric,
    out: &mut ScenarioReport,
) -> Result<()> {
    let cluster = node.cluster();
    cluster.write("deny", &[deny_ingress_policy(NAMESPACE, "deny", SERVER)])?;
    let echo = EchoServer::start(server, ENFORCE_PORT, flow_cpu(0))?;
    let change = PolicyChange {
        source: "directory source",
        node,
        allow: &|| Ok(cluster.write("allow", &[allow_policy()])?),
        revoke: &|| {
            remove(&cluster, "allow").map_err(|e| myelin_tests::Error::Cluster(format!("{e:#}")))
        },
    };
    measure_enforcement(ctx, &change, client, &echo, metric, out)
}

fn enforce_through_kubernetes(
    ctx: &Context<'_>,
    run: &RunPrefix,
    metric: &mut Metric,
    out: &mut ScenarioReport,
) -> Result<()> {
    let mut spec = NodeSpec::new("kube");
    spec.binaries = Some(ctx.binaries.clone());
    spec.echo_agent_log_on_drop = false;
    let mut knode = KubernetesNode::create(run, spec)?;
    let name = knode.node().name().to_string();
    knode.server().store_all(pod_objects(&name))?;
    knode
        .server()
        .apply(deny_ingress_policy(NAMESPACE, "deny", SERVER))?;
    knode.start_agent()?;
    let (node, api) = (knode.node(), knode.server());
    let plugin = CniPlugin::myelin(node)?;
    let driver = CniDriver::new(node.netns(), &plugin);
    let client = BenchPod::attach(&driver, Sandbox::create(run, NAMESPACE, "client")?)?;
    let server = BenchPod::attach(&driver, Sandbox::create(run, NAMESPACE, "server")?)?;
    let echo = EchoServer::start(&server, ENFORCE_PORT, flow_cpu(0))?;
    let change = PolicyChange {
        source: "Kubernetes source",
        node,
        allow: &|| api.apply(allow_policy()).map(drop).map_err(Into::into),
        revoke: &|| {
            api.delete(Resource::NetworkPolicy, NAMESPACE, "allow")
                .map(drop)
        },
    };
    measure_enforcement(ctx, &change, &client, &echo, metric, out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
