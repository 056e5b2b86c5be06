//! Scenario 1: two pods on one node, request/response (1 and 8 flows), stream throughput and
//! ICMP echo round-trip time, over a bare veth pair (the ceiling), the reference bridge and ptp plugins with host-local,
//! and Myelin. Every pod except the bare pair's is created through the same CNI driver.

use anyhow::{Result, ensure};
use myelin_tests::{
    Node, NodeSpec, RunPrefix,
    bench::{
        cni::{PodPair, ReferencePlugin},
        iperf3::tcp_stream,
        ping::icmp_rtt_us,
        tcp::tcp_rr,
    },
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, number, repetitions},
    rotated,
};

pub const ID: &str = "same_node";
pub const TITLE: &str = "1. Same-node pod to pod";

pub const BARE: &str = "bare veth";
pub const BRIDGE: &str = "bridge";
pub const PTP: &str = "ptp";
pub const MYELIN: &str = "myelin";
const VARIANTS: [&str; 4] = [BARE, BRIDGE, PTP, MYELIN];

pub const RR_1: &str = "tcp_rr_1";
pub const RR_8: &str = "tcp_rr_8";
pub const STREAM: &str = "tcp_stream";
pub const PING: &str = "icmp_rtt";

const RR_PORT: u16 = 11111;
const STREAM_PORT: u16 = 5201;

/// One measurement kind.
#[derive(Clone, Copy)]
enum Traffic {
    Rr(usize),
    Stream,
    Ping,
}

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        format!(
            "request/response: one byte each way over a TCP connection, blocking write and \
             read on both sides (a loop of ours: sockperf cannot send under 14 bytes and sleeps \
             2 s in every TCP run), {} s per run after 0.2 s of warm-up; 8 flows are 8 \
             connections to 8 server threads, summed",
            s.rr.as_secs_f64()
        ),
        format!(
            "stream: iperf3, one TCP stream, {} s per run",
            s.stream_seconds
        ),
        format!(
            "ping: a flood ping (iputils `ping -f`, the next request as soon as the reply is \
             in) of {} requests; the run's time over the count is the mean round trip. Lower \
             is better: a ratio above 1 means slower",
            s.pings
        ),
        "each flow's client and server are pinned to one CPU (flows spread over the CPUs); \
         unpinned ping-pong on two shared cores swung threefold with the scheduler's placement, \
         so the goals' reference figures (unpinned) are not comparable in absolute terms"
            .into(),
        format!(
            "{}; in each, every variant runs once per measurement in a rotating order, and \
             ratios are taken pair by pair",
            repetitions(s.reps)
        ),
        "bridge and ptp: containernetworking-plugins with host-local IPAM (no masquerade); \
         Myelin: the release build's plugin and agent"
            .into(),
    ];
    let run = RunPrefix::new();
    println!("    resources named {}-*", run.as_str());
    let pairs = [
        PodPair::bare_veth(&run)?,
        PodPair::reference(&run, ReferencePlugin::Bridge, "10.245.1.0/24")?,
        PodPair::reference(&run, ReferencePlugin::Ptp, "10.245.2.0/24")?,
        myelin_pair(ctx, &run)?,
    ];
    for (variant, pair) in VARIANTS.iter().zip(&pairs) {
        let mtus = pair.mtus()?;
        ensure!(
            mtus == (1500, 1500),
            "{variant}: pod MTUs are {mtus:?}, not 1500 like the others: the comparison \
             would not be fair"
        );
    }
    out.method.push("every variant's pods have MTU 1500".into());

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
        (
            Traffic::Ping,
            with_ratios(Metric::new(
                PING,
                "ICMP echo round trip",
                "µs",
                Shape::Repeated,
            )),
        ),
    ];
    let measured = (|| -> Result<()> {
        for rep in 0..s.reps {
            for (traffic, metric) in &mut metrics {
                for i in rotated(&[0, 1, 2, 3], rep) {
                    ctx.check()?;
                    let pair = &pairs[i];
                    let value = match *traffic {
                        Traffic::Rr(flows) => {
                            tcp_rr(&pair.client, &pair.server, RR_PORT, flows, s.rr)?
                        }
                        Traffic::Stream => {
                            tcp_stream(&pair.client, &pair.server, STREAM_PORT, s.stream_seconds)?
                                / 1e9
                        }
                        Traffic::Ping => icmp_rtt_us(&pair.client, &pair.server, s.pings)?,
                    };
                    println!(
                        "    [{}/{}] {:<11} {:<9} {:>10} {}",
                        rep + 1,
                        s.reps,
                        metric.id,
                        VARIANTS[i],
                        number(value),
                        metric.unit
                    );
                    metric.push(VARIANTS[i], value);
                }
            }
        }
        Ok(())
    })();
    out.metrics.extend(metrics.into_iter().map(|(_, m)| m));
    measured
}

fn with_ratios(metric: Metric) -> Metric {
    metric
        .ratio(MYELIN, BARE)
        .ratio(MYELIN, BRIDGE)
        .ratio(MYELIN, PTP)
        .ratio(BRIDGE, BARE)
        .ratio(PTP, BARE)
}

fn myelin_pair(ctx: &Context<'_>, run: &RunPrefix) -> Result<PodPair> {
    let mut spec = NodeSpec::new("myelin");
    spec.binaries = Some(ctx.binaries.clone());
    spec.echo_agent_log_on_drop = false;
    let node = Node::start(run, spec)?;
    Ok(PodPair::myelin(run, node)?)
}
