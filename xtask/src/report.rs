//! What `cargo xtask test` ran, how long each step took, and the test counts.

use std::time::Instant;

use anyhow::Result;
use myelin_tests::progress::{format_duration, step};

struct StepRecord {
    title: String,
    elapsed: std::time::Duration,
    error: Option<String>,
}

#[derive(Default)]
pub struct Report {
    steps: Vec<StepRecord>,
}

impl Report {
    /// Runs one step with progress lines; returns whether it passed.
    pub fn step(&mut self, title: &str, f: impl FnOnce() -> Result<()>) -> bool {
        let started = Instant::now();
        let result = step(title, f);
        if let Err(e) = &result {
            eprintln!("error: {e:#}");
        }
        let passed = result.is_ok();
        self.steps.push(StepRecord {
            title: title.to_string(),
            elapsed: started.elapsed(),
            error: result.err().map(|e| format!("{e:#}")),
        });
        passed
    }

    pub fn all_passed(&self) -> bool {
        self.steps.iter().all(|s| s.error.is_none())
    }

    /// One line per step, then the test counts as the last line (CI reads it).
    pub fn print_summary(&self, counts: &TestCounts) {
        println!("==> summary");
        for s in &self.steps {
            let mark = if s.error.is_none() { "✓" } else { "✗" };
            println!(
                "    {mark} {:<56} {:>8}",
                s.title,
                format_duration(s.elapsed)
            );
            if let Some(error) = &s.error {
                println!("      {}", error.lines().next().unwrap_or_default());
            }
        }
        println!(
            "    {} test binaries and doc-test runs reported",
            counts.runs
        );
        println!(
            "tests: {} passed, {} failed, {} skipped",
            counts.passed, counts.failed, counts.ignored
        );
    }
}

/// Sums of libtest's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub runs: u64,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    /// Adds `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; ...`; other lines
    /// are ignored.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.runs += 1;
        let Some((_, fields)) = rest.split_once(". ") else {
            return;
        };
        for field in fields.split(';') {
            let mut words = field.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_libtest_result_lines_and_nothing_else() {
        let mut counts = TestCounts::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 7 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s",
            "test foo ... ok",
        ] {
            counts.add_line(line);
        }
        assert_eq!(
            counts,
            TestCounts {
                runs: 2,
                passed: 10,
                failed: 2,
                ignored: 1
            }
        );
    }

    #[test]
    fn a_failed_step_fails_the_report() {
        let mut report = Report::default();
        assert!(report.step("fine", || Ok(())));
        assert!(report.all_passed());
        assert!(!report.step("broken", || anyhow::bail!("no")));
        assert!(!report.all_passed());
    }
}
