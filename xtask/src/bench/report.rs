//! What a bench run found, and its two renderings: `report.json` with every raw sample, and
//! `report.md` with a table per scenario and the goals.

use std::{fmt::Write as _, time::Duration};

use myelin_tests::bench::stats::{Summary, paired_ratios, percentile};
use serde_json::{Value, json};

use super::goals::{Goal, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quick,
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

/// The machine a run came from.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub kernel: String,
    pub memory_gib: f64,
    /// `/proc/loadavg` when the run started and ended: other work on a shared machine shows
    /// here.
    pub load_at_start: String,
    pub load_at_end: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Measured,
    Failed(String),
    /// Left out on request (`--only`).
    Skipped,
}

/// How a metric's samples are summarised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One sample per repetition: median and spread (min-max).
    Repeated,
    /// Many samples of one quantity (latencies): p50, p99, max.
    Distribution,
}

/// One quantity measured for several variants (datapaths, plugins, rule counts).
#[derive(Debug, Clone)]
pub struct Metric {
    pub id: String,
    pub title: String,
    pub unit: &'static str,
    pub shape: Shape,
    /// Variants in the order they were first measured, with their samples in measuring order
    /// (for [`Shape::Repeated`], sample r is repetition r).
    pub series: Vec<(String, Vec<f64>)>,
    /// (numerator, denominator) variants, divided repetition by repetition.
    pub ratios: Vec<(String, String)>,
}

impl Metric {
    pub fn new(id: &str, title: &str, unit: &'static str, shape: Shape) -> Self {
        Self {
            id: id.to_string(),
            title: title.to_string(),
            unit,
            shape,
            series: Vec::new(),
            ratios: Vec::new(),
        }
    }

    pub fn push(&mut self, variant: &str, value: f64) {
        match self.series.iter_mut().find(|(name, _)| name == variant) {
            Some((_, samples)) => samples.push(value),
            None => self.series.push((variant.to_string(), vec![value])),
        }
    }

    pub fn ratio(mut self, numerator: &str, denominator: &str) -> Self {
        self.ratios
            .push((numerator.to_string(), denominator.to_string()));
        self
    }

    pub fn samples(&self, variant: &str) -> &[f64] {
        self.series
            .iter()
            .find(|(name, _)| name == variant)
            .map_or(&[], |(_, samples)| samples.as_slice())
    }

    pub fn ratio_samples(&self, numerator: &str, denominator: &str) -> Vec<f64> {
        paired_ratios(self.samples(numerator), self.samples(denominator))
    }
}

/// A single measured value (a memory reading, a sync time).
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Debug, Clone)]
pub struct ScenarioReport {
    pub id: &'static str,
    pub title: String,
    pub status: Status,
    /// How it was measured: tools, settings, caveats.
    pub method: Vec<String>,
    pub metrics: Vec<Metric>,
    pub figures: Vec<Figure>,
}

impl ScenarioReport {
    pub fn new(id: &'static str, title: &str) -> Self {
        Self {
            id,
            title: title.to_string(),
            status: Status::Measured,
            method: Vec::new(),
            metrics: Vec::new(),
            figures: Vec::new(),
        }
    }

    pub fn metric(&self, id: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.id == id)
    }

    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }

    pub fn add_figure(&mut self, name: &str, value: f64, unit: impl Into<String>) {
        self.figures.push(Figure {
            name: name.to_string(),
            value,
            unit: unit.into(),
        });
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub mode: Mode,
    /// UTC, when the run started.
    pub date: String,
    pub commit: String,
    pub machine: Machine,
    /// The settings of this mode, as `name: value` lines.
    pub settings: Vec<(String, String)>,
    pub duration: Duration,
    pub scenarios: Vec<ScenarioReport>,
}

impl BenchReport {
    pub fn scenario(&self, id: &str) -> Option<&ScenarioReport> {
        self.scenarios.iter().find(|s| s.id == id)
    }

    pub fn to_json(&self, goals: &[Goal]) -> Value {
        json!({
            "mode": self.mode.name(),
            "date": self.date,
            "commit": self.commit,
            "duration_seconds": self.duration.as_secs_f64(),
            "machine": {
                "cpus": self.machine.cpus,
                "model": self.machine.model,
                "kernel": self.machine.kernel,
                "memory_gib": self.machine.memory_gib,
                "load_at_start": self.machine.load_at_start,
                "load_at_end": self.machine.load_at_end,
            },
            "settings": self.settings.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect::<serde_json::Map<_, _>>(),
            "goals": goals.iter().map(goal_json).collect::<Vec<_>>(),
            "scenarios": self.scenarios.iter().map(scenario_json).collect::<Vec<_>>(),
        })
    }

    pub fn to_markdown(&self, goals: &[Goal]) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Myelin benchmark report ({} run)\n", self.mode.name());
        let m = &self.machine;
        let _ = writeln!(
            md,
            "- date: {}\n- commit: {}\n- machine: {} CPUs ({}), {:.1} GiB, kernel {}\n\
             - load average at start / end: {} / {}\n- duration: {}\n",
            self.date,
            self.commit,
            m.cpus,
            m.model,
            m.memory_gib,
            m.kernel,
            m.load_at_start,
            m.load_at_end,
            myelin_tests::progress::format_duration(self.duration)
        );
        md.push_str("## Goals\n\n| goal | target | measured | verdict |\n|---|---|---|---|\n");
        for g in goals {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                g.name,
                g.target,
                g.measured,
                g.verdict.text()
            );
        }
        md.push_str("\n## Settings\n\n");
        for (k, v) in &self.settings {
            let _ = writeln!(md, "- {k}: {v}");
        }
        for s in &self.scenarios {
            scenario_markdown(&mut md, s);
        }
        md
    }
}

fn goal_json(g: &Goal) -> Value {
    json!({
        "goal": g.name,
        "target": g.target,
        "measured": g.measured,
        "verdict": g.verdict.text(),
    })
}

fn status_json(status: &Status) -> Value {
    match status {
        Status::Measured => json!({ "status": "measured" }),
        Status::Failed(error) => json!({ "status": "failed", "error": error }),
        Status::Skipped => json!({ "status": "skipped" }),
    }
}

fn scenario_json(s: &ScenarioReport) -> Value {
    let mut value = json!({
        "id": s.id,
        "title": s.title,
        "method": s.method,
        "metrics": s.metrics.iter().map(metric_json).collect::<Vec<_>>(),
        "figures": s.figures.iter().map(|f| json!({
            "name": f.name, "value": f.value, "unit": f.unit,
        })).collect::<Vec<_>>(),
    });
    if let (Value::Object(obj), Value::Object(status)) = (&mut value, status_json(&s.status)) {
        obj.extend(status);
    }
    value
}

fn metric_json(m: &Metric) -> Value {
    let variants: Vec<Value> = m
        .series
        .iter()
        .map(|(name, samples)| {
            let mut v = json!({ "variant": name, "samples": samples });
            if let Value::Object(obj) = &mut v {
                obj.extend(summary_fields(m.shape, samples));
            }
            v
        })
        .collect();
    let ratios: Vec<Value> = m
        .ratios
        .iter()
        .map(|(num, den)| {
            let samples = m.ratio_samples(num, den);
            let mut v = json!({ "ratio": format!("{num} / {den}"), "samples": samples });
            if let Value::Object(obj) = &mut v {
                obj.extend(summary_fields(Shape::Repeated, &samples));
            }
            v
        })
        .collect();
    json!({
        "id": m.id,
        "title": m.title,
        "unit": m.unit,
        "shape": match m.shape { Shape::Repeated => "repeated", Shape::Distribution => "distribution" },
        "variants": variants,
        "ratios": ratios,
    })
}

fn summary_fields(shape: Shape, samples: &[f64]) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    match shape {
        Shape::Repeated => {
            if let Some(s) = Summary::of(samples) {
                fields.insert("median".into(), s.median.into());
                fields.insert("min".into(), s.min.into());
                fields.insert("max".into(), s.max.into());
                fields.insert("p25".into(), s.p25.into());
                fields.insert("p75".into(), s.p75.into());
            }
        }
        Shape::Distribution => {
            for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
                if let Some(v) = percentile(samples, q) {
                    fields.insert(name.into(), v.into());
                }
            }
        }
    }
    fields
}

fn scenario_markdown(md: &mut String, s: &ScenarioReport) {
    let _ = writeln!(md, "\n## {}\n", s.title);
    match &s.status {
        Status::Measured => {}
        Status::Failed(error) => {
            let _ = writeln!(
                md,
                "**FAILED** (figures below, if any, are what was measured before the \
                 failure):\n\n```\n{}\n```\n",
                error.trim()
            );
        }
        Status::Skipped => {
            md.push_str("Not run in this run (left out with `--only`).\n\n");
        }
    }
    for line in &s.method {
        let _ = writeln!(md, "- {line}");
    }
    if !s.method.is_empty() {
        md.push('\n');
    }
    for m in &s.metrics {
        metric_markdown(md, m);
    }
    if !s.figures.is_empty() {
        md.push_str("| figure | value |\n|---|---|\n");
        for f in &s.figures {
            let _ = writeln!(md, "| {} | {} {} |", f.name, number(f.value), f.unit);
        }
        md.push('\n');
    }
}

fn metric_markdown(md: &mut String, m: &Metric) {
    let _ = writeln!(md, "### {} ({})\n", m.title, m.unit);
    match m.shape {
        Shape::Repeated => {
            md.push_str("| variant | median | spread (min – max) | n |\n|---|---|---|---|\n");
            for (name, samples) in &m.series {
                let _ = writeln!(md, "| {name} | {} |", repeated_cells(samples, number));
            }
        }
        Shape::Distribution => {
            md.push_str("| variant | p50 | p99 | max | n |\n|---|---|---|---|---|\n");
            for (name, samples) in &m.series {
                let cell = |q| percentile(samples, q).map_or("–".into(), number);
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {} | {} |",
                    cell(0.5),
                    cell(0.99),
                    cell(1.0),
                    samples.len()
                );
            }
        }
    }
    if !m.ratios.is_empty() {
        md.push_str(
            "\n| ratio, pair by pair | median | spread (min – max) | n |\n|---|---|---|---|\n",
        );
        for (num, den) in &m.ratios {
            let samples = m.ratio_samples(num, den);
            let _ = writeln!(
                md,
                "| {num} / {den} | {} |",
                repeated_cells(&samples, |v| format!("{v:.3}"))
            );
        }
    }
    md.push('\n');
}

fn repeated_cells(samples: &[f64], fmt: impl Fn(f64) -> String) -> String {
    match Summary::of(samples) {
        Some(s) => format!(
            "{} | {} – {} | {}",
            fmt(s.median),
            fmt(s.min),
            fmt(s.max),
            s.n
        ),
        None => "– | – | 0".to_string(),
    }
}

/// `1 repetition`, `3 repetitions`.
pub fn repetitions(n: usize) -> String {
    if n == 1 {
        "1 repetition".into()
    } else {
        format!("{} repetitions", count(n))
    }
}

/// A count with thousands separators: `20,000`.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    grouped
}

/// Thousands separated above 1,000, three significant digits below.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let abs = v.abs();
    if abs >= 1000.0 {
        // Rounded to a whole number first; `as` saturates, and no figure here nears 2^64.
        let grouped = count(abs.round() as usize);
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.fract() == 0.0 {
        // Counts: no decimals to suggest a precision they do not have.
        format!("{v:.0}")
    } else if abs >= 100.0 {
        format!("{v:.1}")
    } else if abs >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Verdict {
    pub fn text(&self) -> String {
        match self {
            Verdict::Pass => "pass".into(),
            Verdict::FallShort => "fall-short".into(),
            Verdict::NotMeasured(why) => format!("not measured ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> BenchReport {
        let mut scenario = ScenarioReport::new("same_node", "Same-node pod to pod");
        scenario.method.push("one-byte ping-pong".into());
        let mut rr = Metric::new(
            "tcp_rr_1",
            "TCP request/response, 1 flow",
            "round trips/s",
            Shape::Repeated,
        )
        .ratio("myelin", "bare");
        for (bare, myelin) in [(100.0, 98.0), (200.0, 190.0), (150.0, 150.0)] {
            rr.push("bare", bare);
            rr.push("myelin", myelin);
        }
        scenario.metrics.push(rr);
        let mut add = Metric::new("add", "CNI ADD", "ms", Shape::Distribution);
        for v in 1..=100 {
            add.push("myelin", f64::from(v));
        }
        scenario.metrics.push(add);
        scenario.add_figure("agent RSS", 40960.0, "KiB");
        let mut failed = ScenarioReport::new("policy", "Policy scale");
        failed.status = Status::Failed("iperf3: no answer".into());
        BenchReport {
            mode: Mode::Quick,
            date: "2026-05-21T10:00:00Z".into(),
            commit: "abc123".into(),
            machine: Machine {
                cpus: 2,
                model: "Xeon".into(),
                kernel: "6.18".into(),
                memory_gib: 23.5,
                load_at_start: "0.1".into(),
                load_at_end: "0.2".into(),
            },
            settings: vec![("reps".into(), "3".into())],
            duration: Duration::from_secs(200),
            scenarios: vec![scenario, failed],
        }
    }

    #[test]
    fn json_holds_raw_samples_summaries_and_pairwise_ratios() {
        let report = sample_report();
        let json = report.to_json(&[]);
        let rr = &json["scenarios"][0]["metrics"][0];
        assert_eq!(rr["variants"][0]["variant"], "bare");
        assert_eq!(rr["variants"][0]["samples"], json!([100.0, 200.0, 150.0]));
        assert_eq!(rr["variants"][0]["median"], 150.0);
        assert_eq!(rr["ratios"][0]["samples"], json!([0.98, 0.95, 1.0]));
        assert_eq!(rr["ratios"][0]["median"], 0.98);
        let add = &json["scenarios"][0]["metrics"][1];
        assert_eq!(add["variants"][0]["p50"], 50.0);
        assert_eq!(add["variants"][0]["p99"], 99.0);
        assert_eq!(json["scenarios"][1]["status"], "failed");
        assert_eq!(json["scenarios"][1]["error"], "iperf3: no answer");
        assert_eq!(json["mode"], "quick");
        assert_eq!(json["machine"]["cpus"], 2);
    }

    #[test]
    fn markdown_has_a_table_per_metric_and_marks_failures() {
        let report = sample_report();
        let goals = vec![Goal {
            name: "RR",
            target: ">= 0.97 x bare".into(),
            measured: "0.980".into(),
            verdict: Verdict::Pass,
        }];
        let md = report.to_markdown(&goals);
        assert!(
            md.contains("| RR | >= 0.97 x bare | 0.980 | pass |"),
            "{md}"
        );
        assert!(md.contains("| bare | 150 | 100 – 200 | 3 |"), "{md}");
        assert!(
            md.contains("| myelin / bare | 0.980 | 0.950 – 1.000 | 3 |"),
            "{md}"
        );
        assert!(md.contains("| myelin | 50 | 99 | 100 | 100 |"), "{md}");
        assert!(md.contains("| agent RSS | 40,960 KiB |"), "{md}");
        assert!(
            md.contains("**FAILED**") && md.contains("iperf3: no answer"),
            "{md}"
        );
        assert!(md.contains("quick run"));
    }

    #[test]
    fn numbers_read_naturally() {
        assert_eq!(number(1_234_567.8), "1,234,568");
        assert_eq!(number(-4321.0), "-4,321");
        assert_eq!(number(123.456), "123.5");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(12.345), "12.35");
        assert_eq!(number(0.97123), "0.971");
        assert_eq!(count(0), "0");
        assert_eq!(count(100), "100");
        assert_eq!(count(20_000), "20,000");
        assert_eq!(repetitions(1), "1 repetition");
        assert_eq!(repetitions(50), "50 repetitions");
    }
}
