//! Scenario 3: what the agent costs: resident memory and CPU with 200 local endpoints (pods as
//! namespaces, added through the plugin), and with 5,000 and 20,000 remote pods in its index
//! (Kubernetes mode, against the test API server).

use std::{thread, time::Instant};

use anyhow::Result;
use myelin_tests::{
    Node, NodeSpec, RunPrefix,
    bench::{
        cni::{CniDriver, CniPlugin, Sandbox},
        footprint::measure_remote_index,
        usage::{Usage, agent_pid},
    },
    cluster::{namespace_object, pod_object},
};

use super::{
    Context,
    report::{ScenarioReport, count},
};

pub const ID: &str = "agent";
pub const TITLE: &str = "3. Agent footprint";

/// The index size the memory goal is set for.
pub const GOAL_REMOTE_PODS: usize = 20_000;

/// The name of the resident-memory figure with `pods` remote pods.
pub fn rss_figure(pods: usize) -> String {
    format!("RSS with {} remote pods", count(pods))
}

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        "RSS is VmRSS, peak is VmHWM, CPU is utime + stime, all from /proc/<agent pid>".into(),
        format!(
            "local: agent with the directory source; a Pod object per endpoint (20 distinct \
             app labels), then {} pods added through the plugin one by one; idle CPU over {} s",
            s.local_endpoints,
            s.idle.as_secs_f64()
        ),
        format!(
            "remote: agent in Kubernetes mode against the test API server holding generated \
             pods shaped like a real cluster's (one namespace per 10 pods, 110 pods per remote \
             node); figures once synced and idle for {} s",
            s.idle.as_secs_f64()
        ),
    ];
    local_endpoints(ctx, out)?;
    for &pods in &s.remote_pods {
        ctx.check()?;
        let run = RunPrefix::new();
        println!(
            "    {} remote pods (resources named {}-*)",
            count(pods),
            run.as_str()
        );
        let f = measure_remote_index(&run, pods, (pods / 10).max(1), s.idle)?;
        let label = count(pods);
        out.add_figure(&rss_figure(pods), mib(f.usage.rss_kib), "MiB");
        out.add_figure(
            &format!("peak RSS with {label} remote pods"),
            mib(f.usage.peak_rss_kib),
            "MiB",
        );
        out.add_figure(
            &format!("first sync of {label} remote pods"),
            f.initial_sync.as_secs_f64(),
            "s",
        );
        out.add_figure(
            &format!("agent CPU from start to synced, {label} remote pods"),
            f.sync_cpu.as_secs_f64(),
            "s",
        );
        out.add_figure(
            &format!("idle CPU with {label} remote pods"),
            f.idle_cpu_share * 100.0,
            "% of a core",
        );
        println!(
            "    synced in {:.1} s, RSS {:.1} MiB (peak {:.1} MiB)",
            f.initial_sync.as_secs_f64(),
            mib(f.usage.rss_kib),
            mib(f.usage.peak_rss_kib)
        );
    }
    Ok(())
}

fn local_endpoints(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let count = ctx.settings.local_endpoints;
    let run = RunPrefix::new();
    println!(
        "    {count} local endpoints (resources named {}-*)",
        run.as_str()
    );
    let mut spec = NodeSpec::new("footprint");
    spec.binaries = Some(ctx.binaries.clone());
    spec.echo_agent_log_on_drop = false;
    let node = Node::start(&run, spec)?;
    let mut objects = vec![namespace_object("bench", &[("team", "bench")])];
    for i in 0..count {
        let app = format!("app-{}", i % 20);
        objects.push(pod_object(
            node.name(),
            "bench",
            &format!("ep-{i}"),
            &[("app", &app)],
            &[8080],
        ));
    }
    node.cluster().write("pods", &objects)?;
    let pid = agent_pid(&node.socket())?;
    let before = Usage::of(pid)?;

    let plugin = CniPlugin::myelin(&node)?;
    let driver = CniDriver::new(node.netns(), &plugin);
    let sandboxes = (0..count)
        .map(|i| Sandbox::create(&run, "bench", &format!("ep-{i}")))
        .collect::<myelin_tests::Result<Vec<_>>>()?;
    for sandbox in &sandboxes {
        ctx.check()?;
        driver.add(sandbox)?;
    }
    let with_endpoints = Usage::of(pid)?;
    let endpoints = node.endpoints()?.len();
    anyhow::ensure!(
        endpoints == count,
        "the agent reports {endpoints} endpoints after {count} ADDs"
    );
    let idle_started = Instant::now();
    thread::sleep(ctx.settings.idle);
    let idle = Usage::of(pid)?;
    let idle_share = idle.cpu.saturating_sub(with_endpoints.cpu).as_secs_f64()
        / idle_started.elapsed().as_secs_f64();

    out.add_figure("RSS with no endpoints", mib(before.rss_kib), "MiB");
    out.add_figure(
        &format!("RSS with {count} local endpoints"),
        mib(with_endpoints.rss_kib),
        "MiB",
    );
    out.add_figure(
        &format!("peak RSS with {count} local endpoints"),
        mib(idle.peak_rss_kib),
        "MiB",
    );
    out.add_figure(
        "agent CPU per endpoint ADD",
        with_endpoints.cpu.saturating_sub(before.cpu).as_secs_f64() * 1000.0 / count as f64,
        "ms",
    );
    out.add_figure(
        &format!("idle CPU with {count} local endpoints"),
        idle_share * 100.0,
        "% of a core",
    );
    println!(
        "    RSS {:.1} MiB -> {:.1} MiB with {count} endpoints",
        mib(before.rss_kib),
        mib(with_endpoints.rss_kib)
    );
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
