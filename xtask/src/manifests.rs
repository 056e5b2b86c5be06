//! `cargo xtask manifests`: renders manifests/install.yaml from the chart with Helm itself
//! (through the Python tools `cargo xtask setup` installs).

use std::fs;

use anyhow::{Context, Result};
use myelin_tests::{chart, progress::step};

use crate::exec;

pub fn manifests() -> Result<()> {
    let tools = chart::ChartTools::in_target_dir(&exec::target_dir()?)?;
    let path = chart::workspace_root().join(chart::INSTALL_YAML);
    let rendered = step(
        &format!(
            "helm: render {} into {}",
            chart::CHART_DIR,
            chart::INSTALL_YAML
        ),
        || tools.render_install_yaml(),
    )?;
    if fs::read_to_string(&path).ok().as_deref() == Some(rendered.as_str()) {
        println!("    unchanged");
        return Ok(());
    }
    fs::write(&path, rendered).with_context(|| format!("writing {}", path.display()))?;
    println!("    updated {}", path.display());
    Ok(())
}
