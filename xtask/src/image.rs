//! `cargo xtask image`: Myelin's container image as an OCI image layout tarball, built from
//! the release binaries without a Docker engine, loadable with `ctr images import`.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use myelin_tests::{Binaries, oci, progress::step};

use crate::exec;

pub fn image(output: Option<PathBuf>) -> Result<()> {
    step(
        "cargo build --release -p myelin-agent -p myelin-cni",
        || {
            exec::run(exec::cargo(&[
                "build",
                "--release",
                "-p",
                "myelin-agent",
                "-p",
                "myelin-cni",
            ]))
        },
    )?;
    let target = exec::target_dir()?;
    let output = output.unwrap_or_else(|| target.join("image").join("myelin.tar"));
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let reference = oci::default_image_reference();
    let binaries = Binaries::new(target.join("release"));
    step(&format!("OCI image {reference}"), || {
        oci::write_myelin_image(&output, &reference, &binaries)
            .with_context(|| format!("writing {}", output.display()))
    })?;
    println!("    {}", output.display());
    println!(
        "    load it on a node with `ctr -n k8s.io images import {}`",
        output.display()
    );
    Ok(())
}
