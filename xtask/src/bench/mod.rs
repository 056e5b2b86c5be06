//! `cargo xtask bench [--quick]`: Myelin against its baselines, measured in the same run on
//! the same machine, written to `target/bench/report.json` (every raw sample) and
//! `target/bench/report.md` (a table per scenario, the goals with pass or fall-short).
//!
//! Variants are interleaved repetition by repetition in a rotating order (A B C, B C A, ...)
//! and compared pair by pair, so that the drift of a shared machine cancels out of the ratios.
//! A scenario that fails is reported as failed with what it measured so far; the run goes on.

mod add_under_load;
mod agent;
mod cni;
mod cross_node;
mod goals;
mod kubernetes;
mod machine;
mod masquerade;
mod monitor;
mod policy;
mod report;
mod same_node;
mod services;

use std::{
    fs,
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use myelin_tests::{BIN_DIR_ENV, Binaries, progress::step, sweep_leftovers};

use self::report::{BenchReport, Mode, ScenarioReport, Status};
use crate::{INTERRUPTED, exec, setup};

/// How much of everything a mode measures.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// Same-node repetitions per variant.
    pub reps: usize,
    /// Length of one request/response run (after a 0.2 s warm-up).
    pub rr: Duration,
    /// Length of one iperf3 run.
    pub stream_seconds: u32,
    /// Echo requests per flood ping run.
    pub pings: u32,
    /// Pods added then deleted one by one per CNI latency repetition.
    pub cni_pods: usize,
    pub cni_reps: usize,
    pub churn_pods: usize,
    pub churn_workers: usize,
    pub churn_reps: usize,
    pub local_endpoints: usize,
    /// Remote pods in the agent's index (the 5,000 and 20,000).
    pub remote_pods: Vec<usize>,
    /// How long the agent idles before its idle CPU is read.
    pub idle: Duration,
    /// Rules selecting the destination pod.
    pub policy_rules: Vec<usize>,
    pub policy_reps: usize,
    pub crr: Duration,
    /// Policy-change-to-enforcement repetitions with new connections, and with a running flow.
    pub enforcement_reps: usize,
    pub running_flow_reps: usize,
    /// ADD under load: cluster size, conntrack entries, ADDs per phase, repetitions, and how
    /// often the load makes the agent relist.
    pub load_pods: usize,
    pub load_conntrack: usize,
    pub load_adds: usize,
    pub load_reps: usize,
    pub load_relist_every: Duration,
    pub watch_pods: usize,
    pub watch_namespaces: usize,
    pub label_changes: usize,
    /// Cross-node repetitions per variant (request/response and stream).
    pub cross_reps: usize,
    /// Node joins per routing mode.
    pub join_reps: usize,
    /// Masquerade repetitions per variant (new connections and request/response), each on
    /// freshly built variants.
    pub masq_reps: usize,
    /// Services in the datapath, one measurement series per count.
    pub service_counts: Vec<usize>,
    /// Services repetitions per variant and count (the variants are built once per count).
    pub service_reps: usize,
    /// Backend changes per variant and count, each way (all endpoints gone, back).
    pub service_changes: usize,
    /// Flow monitoring repetitions per variant.
    pub monitor_reps: usize,
}

impl Settings {
    pub fn new(mode: Mode) -> Self {
        let full = mode == Mode::Full;
        Self {
            mode,
            reps: if full { 6 } else { 3 },
            rr: Duration::from_secs(if full { 5 } else { 1 }),
            stream_seconds: if full { 10 } else { 3 },
            pings: if full { 50_000 } else { 20_000 },
            cni_pods: if full { 50 } else { 20 },
            cni_reps: if full { 5 } else { 2 },
            churn_pods: 200,
            churn_workers: 4,
            churn_reps: if full { 3 } else { 1 },
            local_endpoints: 200,
            remote_pods: vec![5_000, 20_000],
            idle: Duration::from_secs(if full { 10 } else { 3 }),
            policy_rules: vec![0, 100, 1_000, 10_000],
            policy_reps: if full { 4 } else { 2 },
            crr: Duration::from_secs(if full { 3 } else { 1 }),
            enforcement_reps: if full { 50 } else { 10 },
            running_flow_reps: if full { 5 } else { 1 },
            load_pods: 5_000,
            load_conntrack: 100_000,
            load_adds: if full { 100 } else { 30 },
            load_reps: if full { 3 } else { 1 },
            load_relist_every: Duration::from_secs(2),
            watch_pods: 5_000,
            watch_namespaces: 500,
            label_changes: 1_000,
            cross_reps: if full { 4 } else { 2 },
            join_reps: if full { 20 } else { 4 },
            masq_reps: if full { 4 } else { 2 },
            service_counts: vec![1, 1_000, 10_000],
            service_reps: if full { 4 } else { 2 },
            service_changes: if full { 25 } else { 5 },
            monitor_reps: if full { 6 } else { 3 },
        }
    }

    /// `name: value` lines for the report.
    fn describe(&self) -> Vec<(String, String)> {
        let secs = |d: Duration| format!("{} s", d.as_secs_f64());
        let list = |v: &[usize]| {
            v.iter()
                .map(|n| report::count(*n))
                .collect::<Vec<_>>()
                .join(", ")
        };
        [
            ("same-node repetitions", self.reps.to_string()),
            ("request/response run", secs(self.rr)),
            ("iperf3 run", format!("{} s", self.stream_seconds)),
            ("ping run", format!("{} echo requests (flood)", self.pings)),
            (
                "CNI latency",
                format!("{} pods; repetitions: {}", self.cni_pods, self.cni_reps),
            ),
            (
                "pod churn",
                format!(
                    "{} pods, {} in parallel; repetitions: {}",
                    self.churn_pods, self.churn_workers, self.churn_reps
                ),
            ),
            ("local endpoints", self.local_endpoints.to_string()),
            ("remote pods", list(&self.remote_pods)),
            ("agent idle window", secs(self.idle)),
            ("policy rules", list(&self.policy_rules)),
            ("policy repetitions", self.policy_reps.to_string()),
            ("connection-rate run", secs(self.crr)),
            (
                "policy enforcement repetitions",
                format!(
                    "{} with new connections, {} with a running flow",
                    self.enforcement_reps, self.running_flow_reps
                ),
            ),
            (
                "ADD under load",
                format!(
                    "{} pods, {} conntrack entries, {} ADDs per phase, relist every {}; \
                     repetitions: {}",
                    report::count(self.load_pods),
                    report::count(self.load_conntrack),
                    self.load_adds,
                    secs(self.load_relist_every),
                    self.load_reps
                ),
            ),
            (
                "watch latency",
                format!(
                    "{} label changes, {} pods in {} namespaces",
                    report::count(self.label_changes),
                    report::count(self.watch_pods),
                    report::count(self.watch_namespaces)
                ),
            ),
            ("cross-node repetitions", self.cross_reps.to_string()),
            ("node joins per routing mode", self.join_reps.to_string()),
            ("masquerade repetitions", self.masq_reps.to_string()),
            ("Services in the datapath", list(&self.service_counts)),
            ("Services repetitions", self.service_reps.to_string()),
            (
                "Services backend changes, each way",
                self.service_changes.to_string(),
            ),
            ("flow monitoring repetitions", self.monitor_reps.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// What every scenario gets.
pub struct Context<'a> {
    pub settings: &'a Settings,
    pub binaries: Binaries,
    interrupted: &'a AtomicBool,
}

impl Context<'_> {
    /// Fails with [`Interrupted`] once Ctrl-C was pressed; scenarios call it between
    /// measurements, and their guards then remove everything.
    pub fn check(&self) -> Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(Interrupted.into());
        }
        Ok(())
    }
}

/// Ctrl-C was pressed.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// The order of `items` for repetition `rep`: rotated by one each time, so that every variant
/// runs first, second, ... equally often.
pub fn rotated<T: Clone>(items: &[T], rep: usize) -> Vec<T> {
    let mut order = items.to_vec();
    if !order.is_empty() {
        let shift = rep % order.len();
        order.rotate_left(shift);
    }
    order
}

/// Every scenario, in running order: id, title, function.
const SCENARIOS: [(&str, &str, Scenario); 10] = [
    (same_node::ID, same_node::TITLE, same_node::run),
    (cni::ID, cni::TITLE, cni::run),
    (
        add_under_load::ID,
        add_under_load::TITLE,
        add_under_load::run,
    ),
    (agent::ID, agent::TITLE, agent::run),
    (policy::ID, policy::TITLE, policy::run),
    (kubernetes::ID, kubernetes::TITLE, kubernetes::run),
    (cross_node::ID, cross_node::TITLE, cross_node::run),
    (masquerade::ID, masquerade::TITLE, masquerade::run),
    (services::ID, services::TITLE, services::run),
    (monitor::ID, monitor::TITLE, monitor::run),
];

/// Runs every scenario, or those named in `only`.
pub fn bench(quick: bool, only: &[String]) -> Result<ExitCode> {
    let started = Instant::now();
    if let Some(unknown) = only
        .iter()
        .find(|id| !SCENARIOS.iter().any(|(known, ..)| known == id))
    {
        let known: Vec<&str> = SCENARIOS.iter().map(|(id, ..)| *id).collect();
        bail!(
            "no scenario {unknown:?}; the scenarios are {}",
            known.join(", ")
        );
    }
    let settings = Settings::new(if quick { Mode::Quick } else { Mode::Full });
    step("setup", setup::setup)?;
    step("cargo build --release", || {
        exec::run(exec::cargo(&["build", "--release"]))
    })?;
    let target = exec::target_dir()?;
    let bin_dir = target.join("release");
    // The harness finds the binaries under test through this variable (the Kubernetes
    // fixture starts its nodes from it).
    // SAFETY: no other thread exists yet: the Ctrl-C handler's thread starts below, and every
    // step so far ran child processes only.
    unsafe { std::env::set_var(BIN_DIR_ENV, &bin_dir) };
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    step("sweep leftovers of earlier runs", || {
        sweep_leftovers().map(|r| r.print_if_any())
    })
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let machine = machine::describe();
    let mut report = BenchReport {
        mode: settings.mode,
        date: machine::utc_now(),
        commit: machine::git_commit(),
        machine,
        settings: {
            let mut lines = settings.describe();
            let selected = if only.is_empty() {
                "all".to_string()
            } else {
                format!("only {}", only.join(", "))
            };
            lines.push(("scenarios".into(), selected));
            lines
        },
        duration: Duration::ZERO,
        scenarios: Vec::new(),
    };
    let ctx = Context {
        settings: &settings,
        binaries: Binaries::new(&bin_dir),
        interrupted: &INTERRUPTED,
    };
    for (id, title, run) in SCENARIOS {
        let mut scenario = ScenarioReport::new(id, title);
        if !only.is_empty() && !only.iter().any(|o| o == id) {
            scenario.status = Status::Skipped;
            report.scenarios.push(scenario);
            continue;
        }
        let outcome = step(title, || run(&ctx, &mut scenario));
        if let Err(e) = outcome {
            if e.is::<Interrupted>() || ctx.interrupted.load(Ordering::Relaxed) {
                eprintln!("interrupted; everything the benchmark created has been removed");
                return Ok(ExitCode::from(130));
            }
            eprintln!("error: {e:#}");
            scenario.status = Status::Failed(format!("{e:#}"));
        }
        report.scenarios.push(scenario);
    }
    report.machine.load_at_end = machine::load_average();
    report.duration = started.elapsed();

    let goals = goals::evaluate(&report);
    let dir = target.join("bench");
    write_report(&dir, &report, &goals)?;
    print_summary(&report, &goals, &dir);
    let failed = report
        .scenarios
        .iter()
        .filter(|s| matches!(s.status, Status::Failed(_)))
        .count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

type Scenario = fn(&Context<'_>, &mut ScenarioReport) -> Result<()>;

fn write_report(dir: &Path, report: &BenchReport, goals: &[goals::Goal]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&report.to_json(goals))?;
    let json_path = dir.join("report.json");
    fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = dir.join("report.md");
    fs::write(&md_path, report.to_markdown(goals))
        .with_context(|| format!("writing {}", md_path.display()))?;
    Ok(())
}

fn print_summary(report: &BenchReport, goals: &[goals::Goal], dir: &Path) {
    println!("==> summary ({} run)", report.mode.name());
    for s in &report.scenarios {
        let (mark, note) = match &s.status {
            Status::Measured => ("✓", String::new()),
            Status::Failed(e) => ("✗", format!(": {}", e.lines().next().unwrap_or_default())),
            Status::Skipped => ("-", ": not run (--only)".to_string()),
        };
        println!("    {mark} {}{note}", s.title);
    }
    println!("==> goals");
    for g in goals {
        println!(
            "    {:<11} {} ({}; target {})",
            g.verdict.text(),
            g.name,
            g.measured,
            g.target
        );
    }
    println!(
        "    report: {} and {}",
        dir.join("report.md").display(),
        dir.join("report.json").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_gives_every_variant_every_position() {
        let items = ["a", "b", "c"];
        assert_eq!(rotated(&items, 0), ["a", "b", "c"]);
        assert_eq!(rotated(&items, 1), ["b", "c", "a"]);
        assert_eq!(rotated(&items, 2), ["c", "a", "b"]);
        assert_eq!(rotated(&items, 3), ["a", "b", "c"]);
        assert!(rotated::<u8>(&[], 5).is_empty());
    }

    #[test]
    fn quick_mode_measures_less_of_the_same_things() {
        let quick = Settings::new(Mode::Quick);
        let full = Settings::new(Mode::Full);
        assert!(quick.reps < full.reps && quick.rr <= full.rr);
        assert!(quick.cross_reps < full.cross_reps && quick.join_reps < full.join_reps);
        assert!(quick.masq_reps < full.masq_reps && quick.crr <= full.crr);
        // What the issues name stays the same in both modes.
        assert_eq!(quick.churn_pods, 200);
        assert_eq!(quick.policy_rules, full.policy_rules);
        assert_eq!(quick.remote_pods, full.remote_pods);
    }
}
