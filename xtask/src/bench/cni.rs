//! Scenario 2: CNI ADD and DEL latency and sustained pod churn, Myelin against bridge with
//! host-local, driven identically: the same driver, the same sandboxes, the same order.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use myelin_tests::{
    Node, NodeSpec, RunPrefix,
    bench::{
        cni::{CniDriver, CniPlugin, ReferenceNode, ReferencePlugin, Sandbox},
        stats::percentile,
    },
};

use super::{
    Context,
    report::{Metric, ScenarioReport, Shape, number, repetitions},
    rotated,
};

pub const ID: &str = "cni";
pub const TITLE: &str = "2. CNI ADD/DEL latency and pod churn";

pub const MYELIN: &str = "myelin";
pub const BRIDGE: &str = "bridge+host-local";
/// Myelin with `--attach-mode tcx`: a tcx attach or detach waits for an RCU grace period under
/// the RTNL lock, a clsact filter (the default) does not; the variant shows what that costs.
pub const MYELIN_TCX: &str = "myelin (tcx)";

pub const ADD: &str = "add";
pub const DEL: &str = "del";
pub const ADD_DEL: &str = "add_del";
pub const ADD_P50: &str = "add_p50";
pub const CHURN: &str = "churn";

pub fn run(ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    let s = ctx.settings;
    out.method = vec![
        "each call is the plugin's process from spawn to exit, run inside the node's namespace \
         with the CNI environment and config on stdin, as a runtime runs it"
            .into(),
        format!(
            "latency: per repetition and plugin, ADD of {} pods one after another, then DEL of \
             each; {}, plugins in rotating order, one untimed ADD/DEL first",
            s.cni_pods,
            repetitions(s.cni_reps)
        ),
        format!(
            "churn: {} pods, {} workers each taking the next pod, ADD then DEL; pods/s over the \
             whole batch; {}",
            s.churn_pods,
            s.churn_workers,
            repetitions(s.churn_reps)
        ),
        "sandboxes (pod namespaces) are created before timing, as a runtime's are before it \
         calls the plugin"
            .into(),
    ];
    let run = RunPrefix::new();
    println!("    resources named {}-*", run.as_str());
    let mut spec = NodeSpec::new("cni");
    spec.binaries = Some(ctx.binaries.clone());
    spec.echo_agent_log_on_drop = false;
    let node = Node::start(&run, spec.clone())?;
    let myelin = CniPlugin::myelin(&node)?;
    let mut tcx_spec = spec;
    tcx_spec.name = "cni-tcx".into();
    let tcx_node = Node::start(&run, tcx_spec.agent_args(&["--attach-mode", "tcx"]))?;
    let myelin_tcx = CniPlugin::myelin(&tcx_node)?;
    let bridge_node = ReferenceNode::start(&run, ReferencePlugin::Bridge, "10.245.3.0/24")?;
    let drivers = [
        (MYELIN, CniDriver::new(node.netns(), &myelin)),
        (BRIDGE, bridge_node.driver()),
        (MYELIN_TCX, CniDriver::new(tcx_node.netns(), &myelin_tcx)),
    ];
    let order = [0, 1, 2];
    let count = s.churn_pods.max(s.cni_pods);
    println!("    creating {count} pod sandboxes");
    let sandboxes = (0..count)
        .map(|i| Sandbox::create(&run, "default", &format!("pod-{i}")))
        .collect::<myelin_tests::Result<Vec<_>>>()?;

    let mut add = Metric::new(ADD, "CNI ADD", "ms", Shape::Distribution);
    let mut del = Metric::new(DEL, "CNI DEL", "ms", Shape::Distribution);
    let mut add_del = Metric::new(
        ADD_DEL,
        "CNI ADD + DEL of one pod",
        "ms",
        Shape::Distribution,
    );
    let mut add_p50 = Metric::new(ADD_P50, "CNI ADD p50 per repetition", "ms", Shape::Repeated)
        .ratio(MYELIN, BRIDGE)
        .ratio(MYELIN_TCX, BRIDGE);
    let mut churn = Metric::new(CHURN, "Pod churn (ADD then DEL)", "pods/s", Shape::Repeated)
        .ratio(MYELIN, BRIDGE)
        .ratio(MYELIN_TCX, BRIDGE);
    let measured = (|| -> Result<()> {
        for (_, driver) in &drivers {
            // The first call on a node pays for cold caches; no pod of a cluster does.
            let (attachment, _) = driver.add(&sandboxes[0])?;
            driver.del(&sandboxes[0], &attachment)?;
        }
        for rep in 0..s.cni_reps {
            for i in rotated(&order, rep) {
                ctx.check()?;
                let (name, driver) = &drivers[i];
                let (adds, dels) = add_then_delete(driver, &sandboxes[..s.cni_pods])?;
                let p50 = percentile(&adds, 0.5).unwrap_or(f64::NAN);
                println!(
                    "    [{}/{}] latency {:<17} ADD p50 {} ms, DEL p50 {} ms",
                    rep + 1,
                    s.cni_reps,
                    name,
                    number(p50),
                    number(percentile(&dels, 0.5).unwrap_or(f64::NAN))
                );
                add_p50.push(name, p50);
                for (a, d) in adds.iter().zip(&dels) {
                    add.push(name, *a);
                    del.push(name, *d);
                    add_del.push(name, a + d);
                }
            }
        }
        for rep in 0..s.churn_reps {
            for i in rotated(&order, rep) {
                ctx.check()?;
                let (name, driver) = &drivers[i];
                let rate = churn_rate(driver, &sandboxes[..s.churn_pods], s.churn_workers)?;
                println!(
                    "    [{}/{}] churn   {:<17} {} pods/s",
                    rep + 1,
                    s.churn_reps,
                    name,
                    number(rate)
                );
                churn.push(name, rate);
            }
        }
        Ok(())
    })();
    out.metrics.extend([add, del, add_del, add_p50, churn]);
    measured
}

/// ADD every sandbox, then DEL every one; the latencies in ms, in sandbox order.
fn add_then_delete(driver: &CniDriver<'_>, sandboxes: &[Sandbox]) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut attachments = Vec::with_capacity(sandboxes.len());
    let mut adds = Vec::with_capacity(sandboxes.len());
    for sandbox in sandboxes {
        let (attachment, took) = driver.add(sandbox)?;
        adds.push(ms(took));
        attachments.push(attachment);
    }
    let mut dels = Vec::with_capacity(sandboxes.len());
    for (sandbox, attachment) in sandboxes.iter().zip(&attachments) {
        dels.push(ms(driver.del(sandbox, attachment)?));
    }
    Ok((adds, dels))
}

/// Pods per second through ADD then DEL, `workers` at a time.
fn churn_rate(driver: &CniDriver<'_>, sandboxes: &[Sandbox], workers: usize) -> Result<f64> {
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(sandbox) = sandboxes.get(i) else {
                        return;
                    };
                    let cycle = driver
                        .add(sandbox)
                        .and_then(|(attachment, _)| driver.del(sandbox, &attachment));
                    if let Err(e) = cycle {
                        // The others run out the queue; the first failure is the report.
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(anyhow!("{e:?}"));
                        next.store(sandboxes.len(), Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.context("pod churn"));
    }
    Ok(sandboxes.len() as f64 / elapsed.as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
