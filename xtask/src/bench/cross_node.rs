//! Scenario 4c: pod to pod across two nodes. TCP request/response (1 and 8 flows) and stream,
//! Myelin's tunnel mode against the kernel's own VXLAN as Flannel builds it, Myelin's native
//! mode against plain kernel routes, and the two nodes talking directly over the switch as the
//! ceiling of both (the variants are `myelin_tests::bench::cross_node`); then the time from a
//! node joining a running cluster to the first answer from a pod on it.

use std::time::Duration;

use anyhow::{Result, ensure};
use myelin_tests::{
    RunPrefix,
    bench::{
        cross_node::{Baseline, CrossNodePair, RoutingMode},
        iperf3::tcp_stream,
        tcp::tcp_rr,
    },
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, number, repetitions},
    rotated,
};

pub const ID: &str = "cross_node";
pub const TITLE: &str = "4c. Cross-node pod to pod";

pub const BARE: &str = "bare";
pub const KERNEL_VXLAN: &str = "kernel-vxlan";
pub const MYELIN_TUNNEL: &str = "myelin-tunnel";
pub const PLAIN_ROUTES: &str = "plain-routes";
pub const MYELIN_NATIVE: &str = "myelin-native";

/// What connects a variant's two nodes.
#[derive(Clone, Copy)]
enum Datapath {
    Baseline(Baseline),
    Myelin(RoutingMode),
}

const VARIANTS: [(&str, Datapath); 5] = [
    (BARE, Datapath::Baseline(Baseline::Bare)),
    (KERNEL_VXLAN, Datapath::Baseline(Baseline::KernelVxlan)),
    (MYELIN_TUNNEL, Datapath::Myelin(RoutingMode::Tunnel)),
    (PLAIN_ROUTES, Datapath::Baseline(Baseline::PlainRoutes)),
    (MYELIN_NATIVE, Datapath::Myelin(RoutingMode::Native)),
];
/// Myelin against the baseline of its mode: their pods must have the same MTU.
const COMPARED: [(&str, &str); 2] = [(MYELIN_TUNNEL, KERNEL_VXLAN), (MYELIN_NATIVE, PLAIN_ROUTES)];

pub const RR_1: &str = "tcp_rr_1";
pub const RR_8: &str = "tcp_rr_8";
pub const STREAM: &str = "tcp_stream";
/// Node join: from the Node object written to the first answer from the new node's pod.
pub const JOIN: &str = "node_join";
/// Node join: from the new node's agent ready to that answer.
pub const JOIN_AFTER_READY: &str = "node_join_after_ready";
/// Node join: from the Node object written to the new node's agent ready.
pub const JOIN_AGENT_READY: &str = "node_join_agent_ready";

const RR_PORT: u16 = 11111;
const STREAM_PORT: u16 = 5201;

#[derive(Clone, Copy)]
enum Traffic {
    Rr(usize),
    Stream,
}

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        "every variant is two node namespaces plugged into one switch (an underlay namespace \
         with a Linux bridge; node addresses 192.168.100.10 and .11, MTU 1500), built for it \
         alone; the client is on node 0, the server on node 1, node i's pods are in \
         10.244.<i>.0/24"
            .into(),
        "bare: the client and server run in the node namespaces themselves and talk over the \
         switch, the ceiling of both modes (through the switch, not one veth pair, because \
         every variant crosses it: it plays the physical network, which no CNI removes)"
            .into(),
        "kernel-vxlan, as Flannel's vxlan backend builds it: pods through the reference bridge \
         plugin as Flannel's CNI plugin configures it (cni0, gateway, MTU 1450, hairpin, \
         host-local), a flannel.1 VXLAN device (VNI 1, port 8472, nolearning, MTU 1450, the \
         node's 10.244.<i>.0/32), and per remote node a permanent neighbour entry, a permanent \
         FDB entry to its address and a route to its pod CIDR via its 10.244.<j>.0 onlink; no \
         masquerade rules (flanneld's --ip-masq concerns traffic leaving the cluster network)"
            .into(),
        "plain-routes: pods through the reference ptp plugin with host-local, and on each node \
         a route to the other node's pod CIDR via its address (Flannel's host-gw shape)"
            .into(),
        "myelin-tunnel and myelin-native: the release build's agents in a two-node cluster with \
         --routing-mode tunnel or native, watching the test API server; pods through the \
         plugin. Pod MTUs: 1450 in tunnel mode and for kernel-vxlan, 1500 for the others \
         (checked before measuring), so the stream figures of the tunnels over bare also count \
         their smaller segments"
            .into(),
        format!(
            "request/response: one byte each way over a TCP connection, blocking write and \
             read on both sides, {} s per run after 0.2 s of warm-up; 8 flows are 8 \
             connections to 8 server threads, summed. Stream: iperf3, one TCP stream, {} s per \
             run. Each flow's client and server are pinned to one CPU, as on one node",
            s.rr.as_secs_f64(),
            s.stream_seconds
        ),
        format!(
            "{}; in each, every variant runs once per measurement in a rotating order, and \
             ratios are taken pair by pair",
            repetitions(s.cross_reps)
        ),
        format!(
            "node join: in each Myelin cluster (two nodes, pods running), a third node joins as \
             Cluster::add_node does it: its Node object is applied to the API server (t0, as \
             kubelet registers a node), its agent starts, and once it is ready a pod is added \
             to it; the client pod on node 0 then pings that pod every 10 ms until the first \
             answer. The figure is t0 to that answer: everything Myelin does for a join (the \
             other agents taking in the node, the new agent's start and first sync, the pod's \
             ADD and the other agents learning its address), nothing a real cluster adds \
             around it (scheduling, image pulls). Then the pod and the node leave again. {} per \
             mode, the modes in rotating order; p99 by nearest rank (with fewer than 100 \
             joins, the slowest)",
            repetitions(s.join_reps)
        ),
    ];

    let mut pairs = Vec::with_capacity(VARIANTS.len());
    for (name, datapath) in VARIANTS {
        ctx.check()?;
        // A prefix per variant: every variant names its network and nodes alike.
        let run = RunPrefix::new();
        println!("    {name}: resources named {}-*", run.as_str());
        pairs.push(match datapath {
            Datapath::Baseline(baseline) => CrossNodePair::baseline(&run, baseline)?,
            Datapath::Myelin(mode) => {
                CrossNodePair::myelin(&run, mode, Some(ctx.binaries.clone()))?
            }
        });
    }
    for (myelin, baseline) in COMPARED {
        let (m, b) = (pairs[index(myelin)].mtus()?, pairs[index(baseline)].mtus()?);
        ensure!(
            m == b,
            "{myelin}: pod MTUs are {m:?}, but {b:?} for {baseline}: the comparison would not \
             be fair"
        );
    }

    let mut metrics = [
        (
            Traffic::Rr(1),
            with_ratios(Metric::new(
                RR_1,
                "TCP request/response, 1 flow",
                "round trips/s",
                Shape::Repeated,
            )),
        ),
        (
            Traffic::Rr(8),
            with_ratios(Metric::new(
                RR_8,
                "TCP request/response, 8 flows",
                "round trips/s",
                Shape::Repeated,
            )),
        ),
        (
            Traffic::Stream,
            with_ratios(Metric::new(STREAM, "TCP stream", "Gbit/s", Shape::Repeated)),
        ),
    ];
    let order: Vec<usize> = (0..VARIANTS.len()).collect();
    let measured = (|| -> Result<()> {
        for rep in 0..s.cross_reps {
            for (traffic, metric) in &mut metrics {
                for i in rotated(&order, rep) {
                    ctx.check()?;
                    let (name, pair) = (VARIANTS[i].0, &pairs[i]);
                    let (client, server) = (pair.client(), pair.server());
                    let value = match *traffic {
                        Traffic::Rr(flows) => tcp_rr(client, server, RR_PORT, flows, s.rr)?,
                        Traffic::Stream => {
                            tcp_stream(client, server, STREAM_PORT, s.stream_seconds)? / 1e9
                        }
                    };
                    println!(
                        "    [{}/{}] {:<10} {:<13} {:>10} {}",
                        rep + 1,
                        s.cross_reps,
                        metric.id,
                        name,
                        number(value),
                        metric.unit
                    );
                    metric.push(name, value);
                }
            }
        }
        Ok(())
    })();
    out.metrics.extend(metrics.into_iter().map(|(_, m)| m));
    measured?;

    let mut join = Metric::new(
        JOIN,
        "Node join: Node object written to the first answer from its pod",
        "ms",
        Shape::Distribution,
    );
    let mut after_ready = Metric::new(
        JOIN_AFTER_READY,
        "Node join: new agent ready to the first answer from its pod",
        "ms",
        Shape::Distribution,
    );
    let mut agent_ready = Metric::new(
        JOIN_AGENT_READY,
        "Node join: Node object written to the new agent ready",
        "ms",
        Shape::Distribution,
    );
    let myelin: Vec<usize> = (0..VARIANTS.len())
        .filter(|i| matches!(VARIANTS[*i].1, Datapath::Myelin(_)))
        .collect();
    let joined = (|| -> Result<()> {
        for rep in 0..s.join_reps {
            for i in rotated(&myelin, rep) {
                ctx.check()?;
                let name = VARIANTS[i].0;
                let t = pairs[i].time_node_join()?;
                println!(
                    "    [{}/{}] node join {:<13} agent ready {} ms, pod added {} ms, first \
                     answer {} ms",
                    rep + 1,
                    s.join_reps,
                    name,
                    number(ms(t.agent_ready)),
                    number(ms(t.pod_added)),
                    number(ms(t.first_reply))
                );
                join.push(name, ms(t.first_reply));
                after_ready.push(name, ms(t.first_reply_after_ready()));
                agent_ready.push(name, ms(t.agent_ready));
            }
        }
        Ok(())
    })();
    out.metrics.extend([join, after_ready, agent_ready]);
    joined
}

fn with_ratios(metric: Metric) -> Metric {
    metric
        .ratio(MYELIN_TUNNEL, KERNEL_VXLAN)
        .ratio(MYELIN_NATIVE, PLAIN_ROUTES)
        .ratio(KERNEL_VXLAN, BARE)
        .ratio(MYELIN_TUNNEL, BARE)
        .ratio(PLAIN_ROUTES, BARE)
        .ratio(MYELIN_NATIVE, BARE)
}

fn index(name: &str) -> usize {
    VARIANTS
        .iter()
        .position(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no variant {name}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
