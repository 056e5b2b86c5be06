//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `tests/fuzz` with the pinned nightly and
//! runs each for a bounded time. Corpora, logs and the inputs of failures go under
//! `target/fuzz`; the seeds committed in `tests/fuzz/seeds/<target>` are read, never written.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use myelin_tests::progress::step;

use crate::{exec, setup};

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The cargo-fuzz crate, relative to the workspace root.
const FUZZ_DIR: &str = "tests/fuzz";

/// One fuzz target: a `[[bin]]` of `tests/fuzz/Cargo.toml`.
struct Target {
    name: &'static str,
    /// libFuzzer's `-max_len`, when the input surface has a size bound of its own.
    max_len: Option<usize>,
}

/// The directory source reads files of up to this size (`--max-object-file-size`'s default):
/// its targets get inputs up to the same size, so that what is slow at that size is found.
const OBJECT_FILE_CAP: usize = 16 << 20;

const TARGETS: &[Target] = &[
    Target {
        name: "cni_config",
        max_len: None,
    },
    Target {
        name: "cni_env",
        max_len: None,
    },
    Target {
        name: "api_decode",
        max_len: None,
    },
    Target {
        name: "dir_documents",
        max_len: Some(OBJECT_FILE_CAP),
    },
    Target {
        name: "policy",
        max_len: Some(OBJECT_FILE_CAP),
    },
];

/// An input that takes longer than this (seconds) is a failure: every target parses in
/// microseconds, and what takes seconds here stalls the plugin or the agent in production.
const INPUT_TIMEOUT_SECS: u32 = 10;
/// Memory beyond this (MiB, libFuzzer's default made explicit) is a failure: an agent that
/// needs gigabytes for one input can be taken down by it.
const RSS_LIMIT_MB: u32 = 2048;

/// Installs cargo-fuzz unless this version is there (`cargo xtask setup`). It builds with the
/// stable toolchain.
pub fn install_cargo_fuzz() -> Result<()> {
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    let found = Command::new("cargo-fuzz")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.as_deref() == Some(wanted.as_str()) {
        println!("    present");
        return Ok(());
    }
    println!(
        "    found {}; installing (about a minute on 2 cores)",
        found.as_deref().unwrap_or("none")
    );
    exec::run(exec::cargo(&[
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Builds the targets (all, or `only`), then runs each for `seconds`. Fails on the first target
/// that finds a crash, a timeout or an out-of-memory, naming the input it saved.
pub fn fuzz(seconds: u32, only: Option<&str>) -> Result<()> {
    let targets: Vec<&Target> = match only {
        None => TARGETS.iter().collect(),
        Some(name) => match TARGETS.iter().find(|t| t.name == name) {
            Some(target) => vec![target],
            None => bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let work = &Work {
        dir: exec::target_dir()?.join("fuzz"),
        nightly: setup::ebpf_nightly()?,
    };
    step("cargo fmt --check (tests/fuzz)", || {
        exec::run(exec::cargo(&[
            "fmt",
            "--manifest-path",
            &format!("{FUZZ_DIR}/Cargo.toml"),
            "--check",
        ]))
    })?;
    step(&format!("cargo fuzz build ({})", work.nightly), || {
        let mut build = cargo_fuzz("build", work);
        if let [target] = targets[..] {
            build.arg(target.name);
        }
        exec::run(build)
    })?;
    // Every target runs even when one fails: each failure is a finding of its own.
    let total = targets.len();
    let failures: Vec<String> = targets
        .into_iter()
        .filter_map(|target| {
            step(&format!("fuzz {} for {seconds}s", target.name), || {
                run(target, seconds, work)
            })
            .err()
            .map(|e| format!("{e:#}"))
        })
        .collect();
    if failures.is_empty() {
        return Ok(());
    }
    for failure in &failures {
        eprintln!("error: {failure}");
    }
    bail!("{} of {total} fuzz targets failed", failures.len())
}

/// Where the fuzz runs keep their files (`target/fuzz`), and the nightly that builds them.
struct Work {
    dir: PathBuf,
    nightly: String,
}

/// `cargo +nightly fuzz <command>` with the options every invocation shares.
fn cargo_fuzz(command: &str, work: &Work) -> Command {
    let mut cmd = exec::cargo(&[&format!("+{}", work.nightly), "fuzz", command]);
    // All of it is safe Rust: what a sanitizer would add is already caught by Rust's own checks
    // (bounds, overflow with debug assertions, which cargo-fuzz turns on), and address
    // sanitizing would cost build time and runs on two cores (see the README).
    cmd.args([
        "--fuzz-dir",
        FUZZ_DIR,
        "--sanitizer",
        "none",
        "--target-dir",
    ])
    .arg(work.dir.join("build"));
    cmd
}

fn run(target: &Target, seconds: u32, work: &Work) -> Result<()> {
    let corpus = work.dir.join("corpus").join(target.name);
    let artifacts = work.dir.join("artifacts").join(target.name);
    let log_path = work.dir.join("logs").join(format!("{}.log", target.name));
    for dir in [&corpus, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::create_dir_all(log_path.parent().unwrap_or(&work.dir))?;
    let seeds = exec::workspace_root()
        .join(FUZZ_DIR)
        .join("seeds")
        .join(target.name);

    let mut cmd = cargo_fuzz("run", work);
    // New inputs go into the first corpus directory; the seeds are only read.
    cmd.arg(target.name).arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    if let Some(max_len) = target.max_len {
        cmd.arg(format!("-max_len={max_len}"));
    }
    // libFuzzer reports every new coverage point: that goes to the log, a summary here.
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", myelin_tests::describe(&cmd)))?;
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() {
        println!("    {}", summary(&output));
        return Ok(());
    }
    for line in failure_excerpt(&output) {
        println!("    | {line}");
    }
    let Some(input) = saved_input(&output) else {
        bail!(
            "fuzz target {} failed ({status}) without saving an input; log: {}",
            target.name,
            log_path.display()
        );
    };
    let mut replay = cargo_fuzz("run", work);
    replay.arg(target.name).arg(&input);
    bail!(
        "fuzz target {} found a {}: the input is {}; replay it with `{}`, then make it a \
         regression test (see the README); log: {}",
        target.name,
        kind_of(&input),
        input.display(),
        myelin_tests::describe(&replay),
        log_path.display()
    )
}

/// libFuzzer's last status line (`#N DONE cov: .. ft: .. corp: ..`) and its run count.
fn summary(output: &str) -> String {
    let status = output
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains("cov:"))
        .unwrap_or_default();
    let done = output
        .lines()
        .rev()
        .find(|l| l.starts_with("Done "))
        .unwrap_or_default();
    format!("{} | {}", status.trim(), done.trim())
}

/// What the terminal shows of a failed run: the panic's message and libFuzzer's verdict; the
/// backtraces stay in the log.
fn failure_excerpt(output: &str) -> Vec<&str> {
    let lines: Vec<&str> = output.lines().collect();
    let mut excerpt = Vec::new();
    if let Some(start) = lines.iter().position(|l| l.contains(" panicked at ")) {
        excerpt.extend(
            lines[start..]
                .iter()
                .take_while(|l| !l.starts_with("stack backtrace:") && !l.starts_with("note: "))
                .take(12),
        );
    }
    excerpt.extend(lines.iter().filter(|l| l.contains("ERROR: libFuzzer:")));
    excerpt
}

/// The input libFuzzer wrote: `... Test unit written to <path>`.
fn saved_input(output: &str) -> Option<PathBuf> {
    output.lines().rev().find_map(|line| {
        let (_, path) = line.split_once("Test unit written to ")?;
        Some(PathBuf::from(path.trim()))
    })
}

/// libFuzzer names the input after what happened: `crash-`, `timeout-`, `oom-`, `leak-`.
fn kind_of(input: &Path) -> &'static str {
    let name = input.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name.split('-').next() {
        Some("timeout") => "timeout",
        Some("oom") => "out-of-memory",
        _ => "crash",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRASH: &str = "INFO: Seed: 1\n\
        thread '<unnamed>' (9) panicked at fuzz_targets/x.rs:3:5:\n\
        assertion failed: ok\n\
        stack backtrace:\n   0: frame\n\
        ==1234== ERROR: libFuzzer: deadly signal\n\
        artifact_prefix='/w/target/fuzz/artifacts/x/'; Test unit written to /w/target/fuzz/artifacts/x/crash-0a1b\n\
        Base64: AAE=\n";

    #[test]
    fn finds_the_saved_input_and_what_it_is() {
        let input = saved_input(CRASH).unwrap();
        assert_eq!(
            input,
            PathBuf::from("/w/target/fuzz/artifacts/x/crash-0a1b")
        );
        assert_eq!(kind_of(&input), "crash");
        assert_eq!(kind_of(Path::new("/a/timeout-99")), "timeout");
        assert_eq!(kind_of(Path::new("/a/oom-12")), "out-of-memory");
        assert_eq!(saved_input("Done 12 runs in 1 second(s)\n"), None);
    }

    #[test]
    fn shows_the_panic_and_the_verdict_without_the_backtrace() {
        assert_eq!(
            failure_excerpt(CRASH),
            [
                "thread '<unnamed>' (9) panicked at fuzz_targets/x.rs:3:5:",
                "assertion failed: ok",
                "==1234== ERROR: libFuzzer: deadly signal",
            ]
        );
        let timeout = "#5 NEW cov: 1\n==7== ERROR: libFuzzer: timeout after 10 seconds\n";
        assert_eq!(
            failure_excerpt(timeout),
            ["==7== ERROR: libFuzzer: timeout after 10 seconds"]
        );
    }

    #[test]
    fn summarizes_the_last_status_line() {
        let output = "#2 INITED cov: 10 ft: 11 corp: 1/1b\n#900 DONE cov: 80 ft: 90 corp: 7/99b\n\
            Done 900 runs in 2 second(s)\n";
        assert_eq!(
            summary(output),
            "#900 DONE cov: 80 ft: 90 corp: 7/99b | Done 900 runs in 2 second(s)"
        );
    }

    #[test]
    fn target_names_are_the_fuzz_crates_binaries() {
        let manifest =
            fs::read_to_string(exec::workspace_root().join(FUZZ_DIR).join("Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{}\"", target.name)),
                "{} is not a [[bin]] of {FUZZ_DIR}",
                target.name
            );
        }
        assert_eq!(manifest.matches("[[bin]]").count(), TARGETS.len());
    }
}
