//! `cargo xtask <command>`: sets up a machine, builds, runs every test tier, runs the demo.
//!
//! It orchestrates and does not hide the build: each step is a plain command (`apt-get`,
//! `rustup`, `cargo ...`) printed as `==> step` with its output streamed and its time.

mod bench;
mod exec;
mod fuzz;
mod image;
mod manifests;
mod report;
mod setup;

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use myelin_tests::{Binaries, progress::step};

use crate::report::{Report, TestCounts};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Myelin's automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (apt packages, the eBPF nightly, bpf-linker, cargo-fuzz, clippy,
    /// rustfmt, the chart's Python tools in target/python-tools).
    /// Idempotent: takes seconds when everything is there. Needs root on Linux.
    Setup,
    /// Build the workspace binaries: myelin, myelin-agent (with its eBPF object), myelinctl.
    Build {
        /// Build with the release profile (into target/release).
        #[arg(long)]
        release: bool,
    },
    /// Setup, format check, clippy, build, then every test tier in one `cargo test`, then every
    /// fuzz target for a few seconds.
    Test,
    /// Setup, build, then the demo: three pods on one node, connectivity and eBPF counters.
    Demo,
    /// Setup, release build, then every benchmark scenario: Myelin against a bare veth pair and
    /// the reference bridge and ptp plugins, CNI latency, agent footprint, policy scale, pod
    /// to pod across nodes against the kernel's VXLAN as Flannel builds it and plain routes,
    /// and masquerading to the world against an iptables MASQUERADE rule.
    /// Writes target/bench/report.json and report.md.
    Bench {
        /// Fewer repetitions and shorter runs (about 5 minutes of measuring on two cores, a
        /// minute of it across nodes and 20 s masquerading, plus the release build when it is
        /// not current): what CI affords.
        #[arg(long)]
        quick: bool,
        /// Run only these scenarios (comma-separated ids: same_node, cni, add_under_load, agent, policy,
        /// kubernetes, cross_node, masquerade, services, monitor); the report lists the others as
        /// not run.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Setup, build the fuzz targets (tests/fuzz) with the pinned nightly, then run each for a
    /// while. Corpora and failing inputs go under target/fuzz; fails when a target finds a
    /// crash, a timeout or an out-of-memory, naming the input.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Run only this target (cni_config, cni_env, api_decode, dir_documents, policy).
        #[arg(long)]
        target: Option<String>,
    },
    /// Render manifests/install.yaml from the Helm chart (manifests/helm/myelin) with Helm.
    Manifests,
    /// Build the release binaries and write Myelin's container image as an OCI image layout
    /// tarball (load it with `ctr images import`).
    Image {
        /// Where to write the tarball. Default: target/image/myelin.tar.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Setup => setup::setup().map(|()| ExitCode::SUCCESS),
        Command::Build { release } => build(release).map(|()| ExitCode::SUCCESS),
        Command::Test => test(),
        Command::Demo => demo(),
        Command::Bench { quick, only } => bench::bench(quick, &only),
        Command::Fuzz { seconds, target } => setup::setup()
            .and_then(|()| fuzz::fuzz(seconds, target.as_deref()))
            .map(|()| ExitCode::SUCCESS),
        Command::Manifests => manifests::manifests().map(|()| ExitCode::SUCCESS),
        Command::Image { output } => image::image(output).map(|()| ExitCode::SUCCESS),
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn build(release: bool) -> Result<()> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    let title = format!("cargo {}", args.join(" "));
    step(&title, || exec::run(exec::cargo(&args)))?;
    let profile = if release { "release" } else { "debug" };
    println!(
        "    binaries in {}",
        exec::target_dir()?.join(profile).display()
    );
    Ok(())
}

/// How long `cargo xtask test` runs each fuzz target: with the build, the fuzz step stays
/// within about four minutes on two cores.
const TEST_FUZZ_SECONDS: u32 = 10;

fn test() -> Result<ExitCode> {
    let mut report = Report::default();
    let mut counts = TestCounts::default();
    // Without the tools nothing else can run, and without binaries no root test can.
    if report.step("setup", setup::setup) {
        // Format and lint findings fail the run but do not stop the tests.
        report.step("cargo fmt --all --check", || {
            exec::run(exec::cargo(&["fmt", "--all", "--check"]))
        });
        report.step(
            "cargo clippy --workspace --all-targets -- -D warnings",
            || {
                exec::run(exec::cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))
            },
        );
        if report.step("cargo build", || exec::run(exec::cargo(&["build"]))) {
            let bin_dir = exec::target_dir()?.join("debug");
            report.step("cargo test --workspace --no-fail-fast", || {
                let mut tests = exec::cargo(&["test", "--workspace", "--no-fail-fast"]);
                tests.env(myelin_tests::BIN_DIR_ENV, &bin_dir);
                exec::run_counting_tests(tests, &mut counts)
            });
        }
        report.step(
            &format!("cargo xtask fuzz --seconds {TEST_FUZZ_SECONDS}"),
            || fuzz::fuzz(TEST_FUZZ_SECONDS, None),
        );
    }
    report.print_summary(&counts);
    Ok(if report.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Set by the Ctrl-C handler; the demo checks it between steps and then cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn demo() -> Result<ExitCode> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    setup::setup()?;
    build(false)?;
    let binaries = Binaries::new(exec::target_dir()?.join("debug"));
    match myelin_tests::demo::run(binaries, &INTERRUPTED) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(myelin_tests::Error::Interrupted) => {
            eprintln!("interrupted; everything the demo created has been removed");
            Ok(ExitCode::from(130))
        }
        Err(e) => bail!("demo failed: {e:?}"),
    }
}
