//! Builds the eBPF datapath (`ebpf/datapath`) for `bpfel-unknown-none` with the pinned nightly
//! and bpf-linker, with BTF, into OUT_DIR; `src/datapath` embeds it with
//! `include_bytes_aligned!`. Same recipe as aya-build, but quiet: the nested build's output is
//! shown only when it fails, instead of being replayed as warnings on every build.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Same compiler as bpf-linker's LLVM (22): a newer nightly emits bitcode it cannot read.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const TARGET: &str = "bpfel-unknown-none";
/// The eBPF crate's binary: the object file the agent embeds.
const OBJECT: &str = "myelin-datapath";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let ebpf_dir = manifest_dir.join("../ebpf/datapath");
    let common_dir = manifest_dir.join("../ebpf/common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }

    let target_dir = out_dir.join("ebpf-target");
    let output = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "cargo", "build"])
        .args(["--package", "myelin-ebpf", "--bin", OBJECT, "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        // BTF, so that maps are BTF maps and bpftool prints named fields.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        // The outer cargo's compiler settings must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .output()
        .context("running `rustup run nightly-2026-05-20 cargo build` for the eBPF datapath")?;
    if !output.status.success() {
        bail!(
            "building the eBPF datapath failed ({}):\n{}\n\
             It needs the {EBPF_TOOLCHAIN} toolchain with rust-src and bpf-linker 0.13 built \
             against LLVM 22: `cargo xtask setup` installs them.",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let object = target_dir.join(TARGET).join("release").join(OBJECT);
    fs::copy(&object, out_dir.join(OBJECT))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
