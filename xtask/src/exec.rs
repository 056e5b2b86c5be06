//! Running cargo and other tools with their output streamed.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use myelin_tests::describe;

use crate::report::TestCounts;

pub fn workspace_root() -> &'static Path {
    // xtask/ sits directly in the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// `cargo <args>` in the workspace root. The rustup proxy that started this xtask set
/// RUSTUP_TOOLCHAIN, so the same toolchain builds everything.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error naming the command.
pub fn run(mut cmd: Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(&cmd));
    }
    Ok(())
}

/// Like [`run`] for `cargo test`: stdout is passed through line by line and its
/// `test result:` lines are added up in `counts`.
pub fn run_counting_tests(mut cmd: Command, counts: &mut TestCounts) -> Result<()> {
    let command = describe(&cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{command}`"))?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.with_context(|| format!("reading the output of `{command}`"))?;
            println!("{line}");
            counts.add_line(&line);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{command}`"))?;
    if !status.success() {
        bail!("`{command}` failed ({status})");
    }
    Ok(())
}

/// The workspace's target dir, as cargo resolves it (CARGO_TARGET_DIR, config, default).
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo(&["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}
