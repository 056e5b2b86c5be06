//! Scenario 4e: a pod reaching a ClusterIP. New connections per second and TCP
//! request/response (1 flow) through a Service with 1, 1,000 and 10,000 Services in the
//! datapath: Myelin's eBPF translation (`--kube-proxy-replacement`) against kube-proxy's
//! iptables and nftables modes, written in kube-proxy's shapes (the variants are
//! `myelin_tests::bench::services`), and the agent's memory with the most Services.

use std::time::Instant;

use anyhow::Result;
use myelin_tests::{
    RunPrefix,
    bench::services::{BACKENDS, CLUSTER_IP, Proxy, SERVICE_PORT, ServicePath, TARGET_PORT},
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, count, number, repetitions},
    rotated,
};

pub const ID: &str = "services";
pub const TITLE: &str = "4e. Services (ClusterIP)";

pub const KUBE_PROXY_IPTABLES: &str = "kube-proxy-iptables";
pub const KUBE_PROXY_NFTABLES: &str = "kube-proxy-nftables";
pub const MYELIN: &str = "myelin";

const VARIANTS: [(&str, Proxy); 3] = [
    (KUBE_PROXY_IPTABLES, Proxy::KubeProxyIptables),
    (KUBE_PROXY_NFTABLES, Proxy::KubeProxyNftables),
    (MYELIN, Proxy::Myelin),
];

/// The Service count the goals are set at.
pub const GOAL_SERVICES: usize = 10_000;

/// The metric of new connections per second with `services` Services.
pub fn crr_metric(services: usize) -> String {
    format!("svc_crr_{services}")
}

/// The metric of request/response with `services` Services.
pub fn rr_metric(services: usize) -> String {
    format!("svc_rr_{services}")
}

/// The metric of backend changes with `services` Services.
pub fn change_metric(services: usize) -> String {
    format!("svc_change_{services}")
}

/// The figure of the agent's memory with `services` Services.
pub fn memory_figure(services: usize) -> String {
    format!("agent VmRSS with {} Services", count(services))
}

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        format!(
            "every variant is one node namespace plugged into a switch (the node at \
             192.168.100.10, pods in 10.244.0.0/24) with a client pod and {BACKENDS} backend \
             pods, and the same Services: the measured one, {CLUSTER_IP}:{SERVICE_PORT}/TCP -> \
             the backends' port {TARGET_PORT}, in the middle of the list, and the others with \
             {BACKENDS} backends each at addresses no pod has. Nothing listens on the \
             ClusterIP: before a variant is measured, a connection to it must be answered"
        ),
        "kube-proxy-iptables: the rules kube-proxy's iptables mode writes (nat PREROUTING and \
         OUTPUT -> KUBE-SERVICES, one rule per Service port -> KUBE-SVC-* with a KUBE-MARK-MASQ \
         rule for traffic from outside the cluster CIDR and one `statistic --mode random` rule \
         per backend -> KUBE-SEP-* with the hairpin mark and the DNAT; KUBE-POSTROUTING \
         masquerades marked traffic), loaded with iptables-legacy-restore (the nf_tables \
         backend took over a minute at 10,000 Services); pods through the reference ptp plugin, \
         so every packet passes the node's netfilter hooks"
            .into(),
        "kube-proxy-nftables: the table kube-proxy's nftables mode writes (a `service-ips` \
         verdict map of address . protocol . port, a chain per Service port choosing a backend \
         with `numgen random mod n` in a verdict map, a chain per endpoint with the DNAT, the \
         masquerade mark), loaded with `nft -f`; pods through ptp"
            .into(),
        "myelin: the release build's agent with --kube-proxy-replacement, --routing-mode \
         native and --cgroup-root on a cgroup of the bench's own, watching the Services and \
         their EndpointSlices in a test API server (the Kubernetes source, as on a cluster); the \
         pods through Myelin. The bench moves itself into that cgroup while it measures \
         Myelin's connections, so the client pod's sockets are translated at connect() \
         (socket-level load balancing, as on a node where the chart's default cgroupRoot holds \
         the pods' processes); the backend change is timed per packet as before"
            .into(),
        format!(
            "connection rate: a new TCP connection per 1-byte request/response to the \
             ClusterIP, closed with a reset, client and servers on one CPU, for {} s; \
             request/response: one connection, one byte each way, {} s after 0.2 s of warm-up",
            s.crr.as_secs_f64(),
            s.rr.as_secs_f64()
        ),
        format!(
            "the variants are built once per Service count; {}; in each, every variant runs \
             once per measurement in a rotating order, and ratios are taken pair by pair",
            repetitions(s.service_reps)
        ),
        format!(
            "backend change: the measured Service loses all its endpoints, then gets them back, \
             {} times each way per variant; the time runs from handing the change over to the \
             first new connection that the datapath treats the new way (refused, answered: \
             connections are tried one after the other). Myelin gets an EndpointSlice update \
             in the test API server its agent watches, so its figure covers the watch, the \
             agent and the maps; the baselines get the rules kube-proxy writes for the change \
             (iptables mode: its partial sync through iptables-legacy-restore --noflush, the \
             nat table's KUBE-SERVICES rewritten whole, the Service's chains rewritten or \
             deleted, a REJECT in the filter table while it has no endpoints; nftables mode: \
             its element moved between service-ips and no-endpoint-services in one nft \
             transaction), so theirs leave out kube-proxy's watch and its sync period \
             (minSyncPeriod, 1 s by default)",
            s.service_changes
        ),
    ];
    let order: Vec<usize> = (0..VARIANTS.len()).collect();
    for &services in &s.service_counts {
        let mut crr = with_ratios(Metric::new(
            &crr_metric(services),
            &format!(
                "New connections to a ClusterIP, {} Services",
                count(services)
            ),
            "connections/s",
            Shape::Repeated,
        ));
        let mut rr = with_ratios(Metric::new(
            &rr_metric(services),
            &format!(
                "TCP request/response through a ClusterIP, {} Services",
                count(services)
            ),
            "round trips/s",
            Shape::Repeated,
        ));
        let mut change = Metric::new(
            &change_metric(services),
            &format!(
                "Backend change to the datapath using it, {} Services",
                count(services)
            ),
            "ms",
            Shape::Distribution,
        );
        let measured = measure(ctx, out, services, &order, &mut crr, &mut rr, &mut change);
        // What a failed size measured so far is reported with it.
        out.metrics.push(crr);
        out.metrics.push(rr);
        out.metrics.push(change);
        measured?;
    }
    Ok(())
}

/// Builds every variant with `services` Services, then measures them repetition by
/// repetition.
fn measure(
    ctx: &Context<'_>,
    out: &mut ScenarioReport,
    services: usize,
    order: &[usize],
    crr: &mut Metric,
    rr: &mut Metric,
    change: &mut Metric,
) -> Result<()> {
    let s = ctx.settings;
    let mut paths = Vec::with_capacity(VARIANTS.len());
    for (name, proxy) in VARIANTS {
        ctx.check()?;
        let run = RunPrefix::new();
        let started = Instant::now();
        let mut path = ServicePath::build(&run, proxy, services, Some(ctx.binaries.clone()))?;
        path.measure_in_cgroup(true);
        println!(
            "    {name}: {} Services, built and answering in {:.1} s (resources named {}-*)",
            count(services),
            started.elapsed().as_secs_f64(),
            run.as_str()
        );
        if let Some((rss, _)) = path.agent_memory_kib()? {
            out.add_figure(&memory_figure(services), rss as f64 / 1024.0, "MiB");
        }
        paths.push(path);
    }
    for rep in 0..s.service_reps {
        let progress = format!(
            "[{} Services {}/{}]",
            count(services),
            rep + 1,
            s.service_reps
        );
        for i in rotated(order, rep) {
            ctx.check()?;
            let (name, path) = (VARIANTS[i].0, &paths[i]);
            let run = path.connection_rate(s.crr)?;
            println!(
                "    {progress} crr {name:<20} {:>10} connections/s",
                number(run.rate())
            );
            crr.push(name, run.rate());
        }
        for i in rotated(order, rep) {
            ctx.check()?;
            let (name, path) = (VARIANTS[i].0, &paths[i]);
            let value = path.request_response(s.rr)?;
            println!(
                "    {progress} rr  {name:<20} {:>10} round trips/s",
                number(value)
            );
            rr.push(name, value);
        }
    }
    for i in rotated(order, 0) {
        ctx.check()?;
        let (name, path) = (VARIANTS[i].0, &paths[i]);
        let mut taken = Vec::with_capacity(2 * s.service_changes);
        let slow_before = path.agent_slow_lines().len();
        for _ in 0..s.service_changes {
            for serving in [false, true] {
                let took = path.backend_change(serving)?;
                taken.push(took.as_secs_f64() * 1000.0);
                change.push(name, took.as_secs_f64() * 1000.0);
            }
        }
        // What the agent said about itself meanwhile: a slow change is explained, not guessed.
        for line in path.agent_slow_lines().iter().skip(slow_before).take(10) {
            println!("    [{} Services] agent: {line}", count(services));
        }
        taken.sort_by(f64::total_cmp);
        println!(
            "    [{} Services] backend change {name:<20} p50 {:.1} ms, max {:.1} ms ({} changes)",
            count(services),
            taken[taken.len() / 2],
            taken[taken.len() - 1],
            taken.len()
        );
    }
    Ok(())
}

fn with_ratios(metric: Metric) -> Metric {
    metric
        .ratio(MYELIN, KUBE_PROXY_IPTABLES)
        .ratio(MYELIN, KUBE_PROXY_NFTABLES)
}
