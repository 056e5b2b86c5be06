//! Builds the eBPF datapath (`ebpf/datapath`) for `bpfel-unknown-none` with the pinned nightly
//! and bpf-linker, with BTF, into OUT_DIR; `src/datapath` embeds it with
//! `include_bytes_aligned!`. Same recipe as aya-build, but quiet: the nested build's output is
//! shown only when it fails, instead of being replayed as warnings on every build.
//!
//! The nightly is the one `ebpf/datapath/rust-toolchain.toml` names. `rustup run` takes it
//! explicitly (as aya-build does): the outer cargo's rustup sets `RUSTUP_TOOLCHAIN` to stable,
//! which would otherwise win over the file.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

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
    let toolchain = toolchain_channel(&ebpf_dir.join("rust-toolchain.toml"))?;

    let target_dir = out_dir.join("ebpf-target");
    let output = Command::new("rustup")
        .args(["run", &toolchain, "cargo", "build"])
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
        .with_context(|| {
            format!("running `rustup run {toolchain} cargo build` for the eBPF datapath")
        })?;
    if !output.status.success() {
        bail!(
            "building the eBPF datapath failed ({}):\n{}\n\
             It needs the {toolchain} toolchain with rust-src and bpf-linker 0.13 built \
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

/// `toolchain.channel` of a rust-toolchain.toml.
fn toolchain_channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    file.get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{} names no toolchain.channel", path.display()))
}
