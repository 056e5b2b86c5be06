//! Scenario 4b: the Kubernetes path. Time from an API event to the agent's map update over
//! label changes of a local pod, and the agent's memory with 5,000 pods in 500 namespaces in
//! its index; measured by the test API server fixture's own measurement.

use anyhow::Result;
use myelin_tests::{RunPrefix, apiserver::measure_watch_latency_and_memory};

use super::{
    Context,
    report::{ScenarioReport, count},
};

pub const ID: &str = "kubernetes";
pub const TITLE: &str = "4b. Kubernetes API event to map update";

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        format!(
            "agent in Kubernetes mode against the test API server holding {} generated pods in \
             {} namespaces; one local pod added through the plugin",
            count(s.watch_pods),
            count(s.watch_namespaces)
        ),
        format!(
            "{} label changes of that pod through the API server, each timed from the server \
             storing it to the agent serving the pod's new identity (written to the endpoint \
             map before it is served; the map is checked against it at the end)",
            count(s.label_changes)
        ),
        "the fixture returns p50, p99 and max, not its raw samples".into(),
    ];
    let run = RunPrefix::new();
    println!("    resources named {}-*", run.as_str());
    let f =
        measure_watch_latency_and_memory(&run, s.watch_pods, s.watch_namespaces, s.label_changes)?;
    println!("    {f}");
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    out.add_figure("API event to map update, p50", ms(f.p50), "ms");
    out.add_figure("API event to map update, p99", ms(f.p99), "ms");
    out.add_figure("API event to map update, max", ms(f.max), "ms");
    out.add_figure("first sync", f.initial_sync.as_secs_f64(), "s");
    out.add_figure("agent RSS once synced", mib(f.rss_synced_kib), "MiB");
    out.add_figure(
        "agent RSS after the label changes",
        mib(f.rss_after_changes_kib),
        "MiB",
    );
    out.add_figure("agent peak RSS", mib(f.rss_peak_kib), "MiB");
    Ok(())
}
