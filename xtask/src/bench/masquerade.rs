//! Scenario 4d: a pod reaching the world through its node's masquerade. New connections per
//! second and TCP request/response (1 flow), Myelin's eBPF SNAT on the uplink against an
//! iptables MASQUERADE rule in a node whose pod runs on the reference ptp plugin, and against
//! the same rule on Myelin's own pod datapath with its SNAT off (the variants are
//! `myelin_tests::bench::masquerade`).

use anyhow::{Result, ensure};
use myelin_tests::{
    RunPrefix,
    bench::{
        masquerade::{
            CRR_DESTINATIONS, CRR_PER_DESTINATION, MYELIN_NAT_PORTS, MasqueradePath, Masquerader,
        },
        tcp::tcp_rr,
    },
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, count, number, repetitions},
    rotated,
};

pub const ID: &str = "masquerade";
pub const TITLE: &str = "4d. Masquerade to the world";

pub const PTP_IPTABLES: &str = "ptp-iptables";
pub const MYELIN_IPTABLES: &str = "myelin-iptables";
pub const MYELIN: &str = "myelin";

const VARIANTS: [(&str, Masquerader); 3] = [
    (PTP_IPTABLES, Masquerader::PtpIptables),
    (MYELIN_IPTABLES, Masquerader::MyelinIptables),
    (MYELIN, Masquerader::Myelin),
];

/// New connections per second, pod to the world.
pub const CRR: &str = "masq_crr";
/// TCP request/response, 1 flow, pod to the world.
pub const RR_1: &str = "masq_rr_1";
/// The most connections one connection-rate run opened to one world port.
pub const MOST_PER_DESTINATION: &str = "most connections to one world port in a run";

const CRR_PORT: u16 = 7000;
const RR_PORT: u16 = 11111;

#[derive(Clone, Copy)]
enum Traffic {
    Crr,
    Rr,
}

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    let nat_ports = usize::from(MYELIN_NAT_PORTS.end() - MYELIN_NAT_PORTS.start()) + 1;
    out.method = vec![
        "every variant is one node namespace plugged into a switch (an underlay namespace with \
         a Linux bridge; the node at 192.168.100.10, MTU 1500, pods in 10.244.0.0/24) with the \
         world (192.168.100.1) on the same switch; the world has no route to any pod CIDR, so \
         only a connection that leaves the node with the node's address is answered. The \
         client is a pod on the node, the servers run in the world"
            .into(),
        "ptp-iptables, masquerading as clusters built on iptables do it: the pod through the \
         reference ptp plugin with host-local (a default route via the node), the node \
         forwarding, and one rule `-t nat -A POSTROUTING -s 10.244.0.0/24 ! -d 10.244.0.0/16 \
         -j MASQUERADE` (plain MASQUERADE keeps the pod's port when it can; Flannel and \
         Calico add --random-fully)"
            .into(),
        "myelin-iptables: the release build's agent with --masquerade=false (no to_uplink; \
         native routing's from_uplink stays) and the same rule: iptables' translation on Myelin's own pod datapath. \
         myelin: Myelin's eBPF SNAT (to_uplink and from_uplink on the uplink), no iptables \
         rule, so netfilter tracks nothing in the node. Both with --routing-mode native \
         (masquerading is the same in both modes; native gives pods the uplink's MTU, as ptp \
         does; checked equal before measuring)"
            .into(),
        "every variant is built anew for each repetition (empty NAT and conntrack tables), and \
         before it is measured one TCP connection shows that the world sees the node's \
         address, translated by what the variant claims: the MASQUERADE rule's packet count \
         and the pod's own port, or a port of Myelin's NAT range"
            .into(),
        format!(
            "connection rate: a new TCP connection per 1-byte request/response, closed with a \
             reset (no TIME_WAIT), one client on the servers' CPU, for {} s. A masquerading \
             node gives out ports per remote (address, port): Myelin picks them at random from \
             {}-{} ({} ports, above the node's ip_local_port_range) and holds each 10 s after \
             the reset; iptables keeps the pod's port and its conntrack entry 10 s. To one world port, thousands of \
             connections a second would exhaust Myelin's range within a second and measure \
             dropped SYNs; so the connections go to {} world ports in turn, at most {} to each \
             in a run (a run that reaches {} connections ends early, and the rate is what it \
             achieved): at most {:.0} % of a remote's NAT ports are ever taken, as on a node \
             whose pods talk to many remotes, and at most half of Myelin's NAT table (131,072 \
             entries, two per connection), so its LRU never evicts. The figure below gives the \
             most any run opened to one port",
            s.crr.as_secs_f64(),
            MYELIN_NAT_PORTS.start(),
            MYELIN_NAT_PORTS.end(),
            count(nat_ports),
            CRR_DESTINATIONS,
            count(CRR_PER_DESTINATION as usize),
            count(usize::from(CRR_DESTINATIONS) * CRR_PER_DESTINATION as usize),
            100.0 * CRR_PER_DESTINATION as f64 / nat_ports as f64
        ),
        format!(
            "request/response: one connection, one byte each way, blocking write and read on \
             both sides, {} s after 0.2 s of warm-up, client and server pinned to one CPU",
            s.rr.as_secs_f64()
        ),
        format!(
            "{}; in each, every variant runs once per measurement in a rotating order, and \
             ratios are taken pair by pair",
            repetitions(s.masq_reps)
        ),
    ];

    let mut metrics = [
        (
            Traffic::Crr,
            with_ratios(Metric::new(
                CRR,
                "New connections to the world",
                "connections/s",
                Shape::Repeated,
            )),
        ),
        (
            Traffic::Rr,
            with_ratios(Metric::new(
                RR_1,
                "TCP request/response to the world, 1 flow",
                "round trips/s",
                Shape::Repeated,
            )),
        ),
    ];
    let mut most_per_destination = 0;
    let order: Vec<usize> = (0..VARIANTS.len()).collect();
    let measured = (|| -> Result<()> {
        for rep in 0..s.masq_reps {
            let progress = format!("[{}/{}]", rep + 1, s.masq_reps);
            let mut paths = Vec::with_capacity(VARIANTS.len());
            for (name, masquerader) in VARIANTS {
                ctx.check()?;
                // A prefix per variant: every variant names its network and node alike.
                let run = RunPrefix::new();
                let path = MasqueradePath::build(&run, masquerader, Some(ctx.binaries.clone()))?;
                let seen = path.check_translation()?;
                println!(
                    "    {progress} {name}: resources named {}-*; {} reaches the world as {seen}",
                    run.as_str(),
                    path.pod().label()
                );
                paths.push(path);
            }
            let mtus = paths
                .iter()
                .map(MasqueradePath::pod_mtu)
                .collect::<myelin_tests::Result<Vec<_>>>()?;
            ensure!(
                mtus.windows(2).all(|w| w[0] == w[1]),
                "pod MTUs differ between the variants ({mtus:?}): the comparison would not be \
                 fair"
            );
            for (traffic, metric) in &mut metrics {
                for i in rotated(&order, rep) {
                    ctx.check()?;
                    let (name, path) = (VARIANTS[i].0, &paths[i]);
                    let (value, note) = match traffic {
                        Traffic::Crr => {
                            let run = path.connection_rate(CRR_PORT, s.crr)?;
                            let per_port = run.connections.div_ceil(CRR_DESTINATIONS.into());
                            most_per_destination = most_per_destination.max(per_port);
                            (
                                run.rate(),
                                format!(
                                    " ({} connections in {:.2} s)",
                                    count(run.connections as usize),
                                    run.elapsed.as_secs_f64()
                                ),
                            )
                        }
                        Traffic::Rr => (
                            tcp_rr(path.pod(), path.world(), RR_PORT, 1, s.rr)?,
                            String::new(),
                        ),
                    };
                    println!(
                        "    {progress} {:<9} {:<15} {:>10} {}{note}",
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
    if most_per_destination > 0 {
        out.add_figure(
            MOST_PER_DESTINATION,
            most_per_destination as f64,
            format!(
                "connections (at most {} allowed; {} NAT ports per remote)",
                count(CRR_PER_DESTINATION as usize),
                count(nat_ports)
            ),
        );
    }
    measured
}

fn with_ratios(metric: Metric) -> Metric {
    metric
        .ratio(MYELIN, PTP_IPTABLES)
        .ratio(MYELIN, MYELIN_IPTABLES)
        .ratio(MYELIN_IPTABLES, PTP_IPTABLES)
}
