//! Scenario 4f: what watching flows costs the datapath. TCP request/response (1 flow) and new
//! connections per second between two pods of one node, a NetworkPolicy admitting the client
//! (so that every new connection is a policy verdict with its rule): with the datapath's
//! events off (`--flow-buffer 0`, nothing streaming), with the flow log on (the default:
//! events always on, within `--flow-events-rate`, kept in the agent's ring), and with events
//! off in the flow log but `myelinctl monitor` streaming them.

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use myelin_tests::{
    Node, NodeSpec, RunPrefix,
    bench::{
        cni::{BenchPod, CniDriver, CniPlugin, Sandbox},
        cpus::flow_cpu,
        policy::{rules_policy, wait_for_policy_entries},
        tcp::{EchoServer, tcp_crr, tcp_rr},
        usage::Usage,
    },
    cluster::{namespace_object, pod_object},
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, number, repetitions},
    rotated,
};

pub const ID: &str = "monitor";
pub const TITLE: &str = "4f. Flow monitoring";

/// Events off: `--flow-buffer 0` and nothing streaming.
pub const EVENTS_OFF: &str = "events-off";
/// The default: the flow log keeps the datapath's events on.
pub const FLOW_LOG: &str = "flow-log";
/// `--flow-buffer 0` with `myelinctl monitor` streaming.
pub const MONITOR: &str = "monitor";

/// TCP request/response, 1 flow.
pub const RR: &str = "monitor_rr";
/// New connections per second.
pub const CRR: &str = "monitor_crr";
/// The agent's CPU time per second of the connection-rate run.
pub const AGENT_CPU: &str = "monitor_agent_cpu";

const NAMESPACE: &str = "bench";
const SERVER: (&str, &str) = ("app", "server");
const CLIENT: (&str, &str) = ("app", "client");
const RR_PORT: u16 = 11111;
const CRR_PORT: u16 = 7000;
/// How long `myelinctl monitor` gets to open its stream before the measurement (the agent
/// turns the datapath's events on when the first stream opens).
const MONITOR_ATTACH: Duration = Duration::from_millis(500);

/// One node's pods and echo server.
struct Setup {
    node: Node,
    client: BenchPod,
    server: BenchPod,
    echo: EchoServer,
}

impl Setup {
    fn start(ctx: &Context<'_>, run: &RunPrefix, name: &str, flow_buffer: bool) -> Result<Self> {
        let mut spec = NodeSpec::new(name);
        spec.binaries = Some(ctx.binaries.clone());
        spec.echo_agent_log_on_drop = false;
        if !flow_buffer {
            spec.agent_args.extend(["--flow-buffer".into(), "0".into()]);
        }
        let node = Node::start(run, spec)?;
        // Pod names (and their sandboxes' namespaces) of their own on each node.
        let (client_name, server_name) = (format!("{name}-client"), format!("{name}-server"));
        node.cluster().write(
            "pods",
            &[
                namespace_object(NAMESPACE, &[]),
                pod_object(node.name(), NAMESPACE, &client_name, &[CLIENT], &[]),
                pod_object(
                    node.name(),
                    NAMESPACE,
                    &server_name,
                    &[SERVER],
                    &[RR_PORT, CRR_PORT],
                ),
            ],
        )?;
        let plugin = CniPlugin::myelin(&node)?;
        let driver = CniDriver::new(node.netns(), &plugin);
        let client = BenchPod::attach(&driver, Sandbox::create(run, NAMESPACE, &client_name)?)?;
        let server = BenchPod::attach(&driver, Sandbox::create(run, NAMESPACE, &server_name)?)?;
        node.cluster().write(
            "allow",
            &[rules_policy(
                NAMESPACE,
                "allow",
                SERVER,
                CLIENT,
                0,
                &[RR_PORT, CRR_PORT],
            )],
        )?;
        wait_for_policy_entries(&node, 2, Duration::from_secs(30))?;
        let echo = EchoServer::start(&server, CRR_PORT, flow_cpu(0))?;
        Ok(Self {
            node,
            client,
            server,
            echo,
        })
    }

    /// Events the datapath left unreported (rate limit, full ring) since it was loaded.
    fn lost(&self) -> Result<(u64, u64)> {
        let status = self.node.status()?;
        Ok(status
            .flows
            .map_or((0, 0), |f| (f.lost.rate_limited, f.lost.ring_full)))
    }
}

/// `myelinctl monitor` against `node`'s agent, its output thrown away; killed on drop.
struct Monitor(Child);

impl Monitor {
    fn attach(ctx: &Context<'_>, node: &Node) -> Result<Self> {
        let child = Command::new(ctx.binaries.ctl()?)
            .arg("--socket")
            .arg(node.socket())
            .arg("monitor")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting myelinctl monitor")?;
        thread::sleep(MONITOR_ATTACH);
        let mut monitor = Self(child);
        ensure!(
            monitor.0.try_wait()?.is_none(),
            "myelinctl monitor ended at once"
        );
        Ok(monitor)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        "two Myelin nodes (release build, directory source), each with a client and a server \
         pod added through the myelin plugin and a NetworkPolicy admitting the client to the \
         server's ports: every new connection is a policy verdict, an event naming its rule \
         when events are on"
            .into(),
        format!(
            "{EVENTS_OFF}: the first node, --flow-buffer 0 and nothing streaming: the datapath \
             emits no event. {FLOW_LOG}: the second node with the defaults (--flow-buffer 4096, \
             --flow-events-rate 1000 per CPU): events always on, read, named and kept in the \
             agent's ring. {MONITOR}: the first node while `myelinctl monitor` streams every \
             event (its output thrown away), attached {} ms before the measurement and \
             detached after it",
            MONITOR_ATTACH.as_millis()
        ),
        format!(
            "request/response: one connection, one byte each way, {} s after 0.2 s of warm-up; \
             connection rate: a new TCP connection per 1-byte request/response, closed with a \
             reset, {} s",
            s.rr.as_secs_f64(),
            s.crr.as_secs_f64()
        ),
        format!(
            "{}; in each, the three variants run in a rotating order and ratios to {EVENTS_OFF} \
             are taken pair by pair",
            repetitions(s.monitor_reps)
        ),
    ];
    let run = RunPrefix::new();
    println!("    resources named {}-*", run.as_str());
    let quiet = Setup::start(ctx, &run, "mon-off", false)?;
    let logged = Setup::start(ctx, &run, "mon-log", true)?;

    let mut rr = Metric::new(
        RR,
        "TCP request/response, 1 flow",
        "round trips/s",
        Shape::Repeated,
    )
    .ratio(FLOW_LOG, EVENTS_OFF)
    .ratio(MONITOR, EVENTS_OFF);
    let mut crr = Metric::new(
        CRR,
        "New connections (a policy verdict each)",
        "connections/s",
        Shape::Repeated,
    )
    .ratio(FLOW_LOG, EVENTS_OFF)
    .ratio(MONITOR, EVENTS_OFF);
    let mut agent_ms = Metric::new(
        AGENT_CPU,
        "The agent's CPU time during the connection-rate run",
        "ms/s",
        Shape::Repeated,
    );
    let variants = [EVENTS_OFF, FLOW_LOG, MONITOR];
    let measured = (|| -> Result<()> {
        for rep in 0..s.monitor_reps {
            for variant in rotated(&variants, rep) {
                ctx.check()?;
                let setup = if variant == FLOW_LOG { &logged } else { &quiet };
                let _monitor = if variant == MONITOR {
                    Some(Monitor::attach(ctx, &setup.node)?)
                } else {
                    None
                };
                let rate = tcp_rr(&setup.client, &setup.server, RR_PORT, 1, s.rr)?;
                rr.push(variant, rate);
                let pid = setup.node.agent_pid().context("the agent's pid")?;
                let before = Usage::of(pid)?.cpu;
                let connections = tcp_crr(&setup.client, &setup.echo, s.crr)?;
                let agent_cpu = Usage::of(pid)?.cpu.saturating_sub(before);
                crr.push(variant, connections);
                agent_ms.push(
                    variant,
                    agent_cpu.as_secs_f64() * 1000.0 / s.crr.as_secs_f64(),
                );
                println!(
                    "    [{}/{}] {variant:<11} {:>9} round trips/s {:>9} connections/s",
                    rep + 1,
                    s.monitor_reps,
                    number(rate),
                    number(connections)
                );
            }
        }
        Ok(())
    })();
    for (name, setup) in [(FLOW_LOG, &logged), (MONITOR, &quiet)] {
        if let Ok((rate_limited, ring_full)) = setup.lost() {
            out.add_figure(
                &format!("{name}: events over the rate limit, whole run"),
                rate_limited as f64,
                "events",
            );
            out.add_figure(
                &format!("{name}: events lost to a full ring, whole run"),
                ring_full as f64,
                "events",
            );
        }
    }
    out.metrics.extend([rr, crr, agent_ms]);
    measured
}
