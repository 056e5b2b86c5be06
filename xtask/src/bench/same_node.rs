//! Scenario 1: two pods on one node, request/response (1 and 8 flows), stream throughput and
//! ICMP echo round-trip time, over a bare veth pair (the ceiling), the reference bridge and ptp plugins with host-local,
//! and Myelin. Every pod except the bare pair's is created through the same CNI driver.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use myelin_tests::{
    Node, NodeSpec, RunPrefix,
    bench::{
        cni::{PodPair, ReferencePlugin},
        iperf3::tcp_stream,
        ping::icmp_rtt_us,
        program_cost,
        stats::Summary,
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

/// Figure: Myelin's extra time per packet over the bare pair (see [`extra_ns_per_packet`]).
pub const EXTRA_PER_PACKET: &str = "time per packet beyond the bare pair (1-flow request/response)";
/// Figure: the mean run time of Myelin's `from_container` in the program-cost run.
pub const PROGRAM_COST: &str = "from_container run time";
const FROM_CONTAINER: &str = "from_container";

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
    measured?;
    if let Some(extra) = out.metric(RR_1).and_then(extra_ns_per_packet) {
        out.add_figure(EXTRA_PER_PACKET, extra, "ns per packet");
    }
    ctx.check()?;
    program_cost_run(&pairs[3], s.rr, out)
}

/// What a packet spends in Myelin beyond the bare pair, from the 1-flow round-trip rates: a
/// round trip is two packets, so `(1/myelin - 1/bare) / 2` per repetition, the median of those.
/// Set beside the program's own run time, it splits the gap into the program and the rest
/// (the tc hook and the switch into the other pod).
fn extra_ns_per_packet(rr: &Metric) -> Option<f64> {
    let extra: Vec<f64> = rr
        .samples(MYELIN)
        .iter()
        .zip(rr.samples(BARE))
        .filter(|(m, b)| **m > 0.0 && **b > 0.0)
        .map(|(m, b)| (1.0 / m - 1.0 / b) / 2.0 * 1e9)
        .collect();
    Summary::of(&extra).map(|s| s.median)
}

/// What Myelin's program costs per packet, from the kernel's run-time statistics during one
/// more 1-flow request/response run. A run of its own: the statistics add two clock reads to
/// every program run, which must not weigh on the runs the ratios come from.
fn program_cost_run(pair: &PodPair, run_for: Duration, out: &mut ScenarioReport) -> Result<()> {
    let node = pair
        .myelin_node()
        .context("Myelin's pair has no Myelin node")?;
    let map = node.pinned_map("endpoints");
    let (rate, costs) = program_cost::measure(&map, &[FROM_CONTAINER], || {
        tcp_rr(&pair.client, &pair.server, RR_PORT, 1, run_for)
    })?;
    let from = &costs[0];
    ensure!(
        from.runs > 0,
        "{FROM_CONTAINER} did not run while {} round trips/s went through it",
        number(rate)
    );
    println!(
        "    {FROM_CONTAINER}: {} ns per packet over {} packets (bpf_stats)",
        number(from.ns_per_run),
        number(from.runs as f64)
    );
    out.method.push(format!(
        "program cost: one more 1-flow request/response run on Myelin's pair with the \
         kernel's BPF run-time statistics on (BPF_ENABLE_STATS, off again after the run), \
         its own run because the statistics add two clock reads to every program run; \
         {FROM_CONTAINER}'s run time over its runs (every packet a pod sends)"
    ));
    out.add_figure(PROGRAM_COST, from.ns_per_run, "ns per packet");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extra_time_per_packet_is_half_the_round_trip_difference_pair_by_pair() {
        let mut rr = Metric::new(RR_1, "rr", "round trips/s", Shape::Repeated);
        // Round trips of 10 against 8 us and 20 against 16 us: 1 and 2 us more per packet,
        // median 1.5 us. The third sample has no bare partner and is left out.
        for (myelin, bare) in [(100_000.0, 125_000.0), (50_000.0, 62_500.0)] {
            rr.push(MYELIN, myelin);
            rr.push(BARE, bare);
        }
        rr.push(MYELIN, 1.0);
        let extra = extra_ns_per_packet(&rr).expect("two pairs");
        assert!((extra - 1_500.0).abs() < 1e-6, "{extra}");
        assert_eq!(
            extra_ns_per_packet(&Metric::new(RR_1, "rr", "", Shape::Repeated)),
            None
        );
    }
}
