//! Scenario 2b: CNI ADD while the agent is busy elsewhere (a conntrack GC walking a full table,
//! relists of a large cluster) against the same agent idle. See
//! `myelin_tests::bench::add_under_load` for how the load is made.

use anyhow::Result;
use myelin_tests::{
    RunPrefix,
    bench::{
        add_under_load::{self, Config},
        stats::percentile,
    },
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, count, repetitions},
};

pub const ID: &str = "add_under_load";
pub const TITLE: &str = "2b. CNI ADD under load";

pub const IDLE: &str = "idle";
pub const LOADED: &str = "loaded";
pub const ADD: &str = "add";
pub const ADD_P99: &str = "add_p99";

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    let config = Config {
        pods: s.load_pods,
        namespaces: s.load_pods / 10,
        conntrack: s.load_conntrack,
        adds: s.load_adds,
        reps: s.load_reps,
        relist_every: s.load_relist_every,
        binaries: Some(ctx.binaries.clone()),
    };
    out.method = vec![
        format!(
            "one node whose agent watches the test API server holding {} generated pods in {} \
             namespaces; {} live flows written into its conntrack map",
            count(config.pods),
            count(config.namespaces),
            count(config.conntrack)
        ),
        format!(
            "per phase a freshly started agent, then {} pods added (timed: the plugin from \
             spawn to exit) and deleted one by one; their Pod objects exist before the agent \
             starts; {}, the two phases in alternating order",
            config.adds,
            repetitions(config.reps)
        ),
        format!(
            "idle: conntrack GC every hour; loaded: conntrack GC every second (every pass walks \
             the whole table) and every {} s every watch is cut and answered 410 Gone, so the \
             agent relists every kind",
            config.relist_every.as_secs_f64()
        ),
    ];
    let run = RunPrefix::new();
    println!("    resources named {}-*", run.as_str());
    let m = add_under_load::measure(&run, &config)?;
    let mut add = Metric::new(ADD, "CNI ADD", "ms", Shape::Distribution);
    let mut p99 = Metric::new(ADD_P99, "CNI ADD p99 per repetition", "ms", Shape::Repeated)
        .ratio(LOADED, IDLE);
    for (variant, phases) in [(IDLE, &m.idle_ms), (LOADED, &m.loaded_ms)] {
        for samples in phases {
            for ms in samples {
                add.push(variant, *ms);
            }
            if let Some(v) = percentile(samples, 0.99) {
                p99.push(variant, v);
            }
        }
    }
    println!(
        "    ADD p99 idle {:.1} ms, loaded {:.1} ms; {} pod lists during the loaded phases",
        percentile(add.samples(IDLE), 0.99).unwrap_or_default(),
        percentile(add.samples(LOADED), 0.99).unwrap_or_default(),
        m.pod_lists
    );
    out.add_figure("pod list pages served while loaded", m.pod_lists as f64, "");
    out.add_figure(
        "conntrack entries at the end",
        m.conntrack_entries as f64,
        "",
    );
    out.metrics.push(add);
    out.metrics.push(p99);
    Ok(())
}
