//! `cargo xtask setup`: brings a fresh Debian 12 machine to what the build and the tests need,
//! installing only what is missing, and saying what it does.

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};
use myelin_tests::{chart, progress::step};

use crate::{exec, fuzz};

/// Debian packages the build (llvm-22-dev for bpf-linker) and the root tests need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "iptables",
    // kube-proxy's nftables mode, the Services benchmark's second baseline.
    "nftables",
    "iperf3",
    "sockperf",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    // libfuzzer-sys builds libFuzzer from its C++ source for the fuzz targets.
    "g++",
    // The venv of the chart's Python tools (Debian's python3 needs python3-venv for it).
    "python3",
    "python3-venv",
];

/// Names the nightly that builds the eBPF crate (pinned there: its LLVM must be bpf-linker's).
const EBPF_TOOLCHAIN_FILE: &str = "ebpf/datapath/rust-toolchain.toml";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker links against this LLVM; its build looks for llvm-config on PATH.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn setup() -> Result<()> {
    if std::env::consts::OS != "linux" {
        bail!(
            "Myelin builds and tests on Linux only (this is {})",
            std::env::consts::OS
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "setup needs root: it installs Debian packages, and the tests create network \
             namespaces and load BPF programs"
        );
    }
    step("apt packages", apt_packages)?;
    let nightly = ebpf_nightly()?;
    step(
        &format!("rust toolchain {nightly} with rust-src ({EBPF_TOOLCHAIN_FILE})"),
        || install_ebpf_nightly(&nightly),
    )?;
    step("clippy and rustfmt for stable", stable_components)?;
    step(&format!("bpf-linker {BPF_LINKER_VERSION}"), bpf_linker)?;
    step(
        &format!("cargo-fuzz {}", fuzz::CARGO_FUZZ_VERSION),
        fuzz::install_cargo_fuzz,
    )?;
    step(
        "Python tools for the chart (helm-sdkpy, kubernetes-validate)",
        chart_tools,
    )
}

fn apt_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("    all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    println!("    missing: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    exec::run(apt(&["update"]))?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    exec::run(install)?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

/// Packages dpkg does not report as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits non-zero when it does not know a package; stdout still lists the rest.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\\n")
        .args(APT_PACKAGES)
        .output()
        .context("running dpkg-query")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !listed
                .lines()
                .any(|line| line.split_whitespace().eq([*pkg, "installed"]))
        })
        .collect())
}

/// The channel `EBPF_TOOLCHAIN_FILE` pins (it also builds the fuzz targets: cargo-fuzz needs a
/// nightly).
pub fn ebpf_nightly() -> Result<String> {
    let path = chart::workspace_root().join(EBPF_TOOLCHAIN_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    file.get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{} names no toolchain.channel", path.display()))
}

fn install_ebpf_nightly(nightly: &str) -> Result<()> {
    let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"]))?;
    let has_toolchain = toolchains.lines().any(|l| l.starts_with(nightly));
    let has_src = has_toolchain
        && stdout(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            nightly,
        ]))?
        .lines()
        .any(|l| l.starts_with("rust-src"));
    if has_src {
        println!("    present");
        return Ok(());
    }
    let mut install = Command::new("rustup");
    install.args([
        "toolchain",
        "install",
        nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]);
    exec::run(install)
}

fn stable_components() -> Result<()> {
    let installed = stdout(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "stable",
    ]))?;
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(&format!("{c}-"))))
        .collect();
    if missing.is_empty() {
        println!("    present");
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add", "--toolchain", "stable"])
        .args(&missing);
    exec::run(add)
}

fn bpf_linker() -> Result<()> {
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    let found = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.as_deref() == Some(wanted.as_str()) {
        println!("    present");
        return Ok(());
    }
    println!(
        "    found {}; installing (about 2 minutes on 2 cores)",
        found.as_deref().unwrap_or("none")
    );
    let path = std::env::var("PATH").unwrap_or_default();
    let mut install = exec::cargo(&[
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    install.env("PATH", format!("{LLVM_BIN}:{path}"));
    exec::run(install)
}

fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", myelin_tests::describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            myelin_tests::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A venv in the target dir with exactly the pinned requirements, so that Debian's Python is
/// left alone. Recreated whenever the requirements file changes; a copy of it in the venv
/// records what was installed.
fn chart_tools() -> Result<()> {
    let venv = chart::tools_venv(&exec::target_dir()?);
    let requirements_path = chart::workspace_root().join(chart::TOOLS_REQUIREMENTS);
    let requirements = fs::read_to_string(&requirements_path)
        .with_context(|| format!("reading {}", requirements_path.display()))?;
    let installed_record = venv.join("requirements.installed");
    let python = venv.join("bin/python");
    if python.is_file() && fs::read_to_string(&installed_record).ok() == Some(requirements.clone())
    {
        println!("    present in {}", venv.display());
        return Ok(());
    }
    let mut create = Command::new("python3");
    create.args(["-m", "venv", "--clear"]).arg(&venv);
    exec::run(create)?;
    // helm-sdkpy says it needs Python 3.12; it works on Debian 12's 3.11.
    let mut install = Command::new(&python);
    install
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--ignore-requires-python",
            "-r",
        ])
        .arg(&requirements_path);
    exec::run(install)?;
    fs::write(&installed_record, &requirements)
        .with_context(|| format!("writing {}", installed_record.display()))
}
