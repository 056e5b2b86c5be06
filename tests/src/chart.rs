//! Myelin's Helm chart and the Python tools that render and check it: Helm's own library
//! (helm-sdkpy) and the Kubernetes OpenAPI schemas (kubernetes-validate), which
//! `cargo xtask setup` installs into a venv in the target dir. Used by `cargo xtask manifests`
//! and by tests/tests/manifests.rs; the Python side is manifests/tools/chart_tools.py.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result, process};

/// Paths relative to the workspace root.
pub const CHART_DIR: &str = "manifests/helm/myelin";
pub const INSTALL_YAML: &str = "manifests/install.yaml";
pub const TOOLS_REQUIREMENTS: &str = "manifests/tools/requirements.txt";
const TOOLS_SCRIPT: &str = "manifests/tools/chart_tools.py";

/// install.yaml is the chart rendered as this release in this namespace, which every cluster
/// has; `helm install myelin ... --namespace kube-system` gives the same objects.
pub const RELEASE: &str = "myelin";
pub const NAMESPACE: &str = "kube-system";

/// Kubernetes versions every rendered object is validated against: the chart's floor
/// (Chart.yaml `kubeVersion`) and the newest the installed schemas know.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.30", "latest"];

/// Loading Helm's library alone takes a few seconds on a busy machine.
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// What install.yaml starts with, before Helm's output.
const INSTALL_YAML_HEADER: &str = "\
# Myelin: `kubectl apply -f manifests/install.yaml`.
# Rendered by `cargo xtask manifests` with Helm (helm-sdkpy) from manifests/helm/myelin and its
# default values, as release \"myelin\" in namespace kube-system. Do not edit: change the chart
# and render again; tests/tests/manifests.rs fails when this file and the chart disagree.
";

/// The workspace root (this crate sits directly in it).
pub fn workspace_root() -> PathBuf {
    let tests_crate = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests_crate.parent().unwrap_or(tests_crate).to_path_buf()
}

/// The venv `cargo xtask setup` installs the tools into.
pub fn tools_venv(target_dir: &Path) -> PathBuf {
    target_dir.join("python-tools")
}

/// The target dir of the running executable: `<target>/debug/deps/<test>` or
/// `<target>/debug/xtask`.
fn target_dir_of_current_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(Error::io("locating the running executable"))?;
    let mut dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.pop();
    Ok(dir)
}

/// A message of `helm lint`. Helm's JSON carries no text for it, only where and how bad.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LintMessage {
    pub severity: String,
    pub path: String,
}

impl LintMessage {
    /// Whether `helm lint --strict` would fail on it (anything above INFO).
    pub fn fails_strict_lint(&self) -> bool {
        self.severity != "INFO"
    }
}

/// An object that does not validate against the schemas of one Kubernetes version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SchemaViolation {
    pub object: String,
    pub version: String,
    pub error: String,
}

/// The venv's Python, running manifests/tools/chart_tools.py.
#[derive(Debug, Clone)]
pub struct ChartTools {
    python: PathBuf,
    root: PathBuf,
}

impl ChartTools {
    /// The tools in `<target_dir>/python-tools`; missing tools are an error telling how to
    /// install them.
    pub fn in_target_dir(target_dir: &Path) -> Result<Self> {
        let python = tools_venv(target_dir).join("bin/python");
        if !python.is_file() {
            return Err(Error::MissingBinary {
                path: python,
                hint: "the chart's Python tools (helm-sdkpy, kubernetes-validate) are not \
                       installed: run `cargo xtask setup`"
                    .into(),
            });
        }
        Ok(Self {
            python,
            root: workspace_root(),
        })
    }

    /// The tools in the target dir this executable was built into.
    pub fn from_current_exe() -> Result<Self> {
        Self::in_target_dir(&target_dir_of_current_exe()?)
    }

    /// The chart rendered by Helm with `values` over its defaults, as `helm template` prints
    /// it (`---` and `# Source:` before each object).
    pub fn render(&self, values: &Value) -> Result<String> {
        let mut cmd = self.command("render");
        cmd.arg(self.root.join(CHART_DIR))
            .args([
                "--release",
                RELEASE,
                "--namespace",
                NAMESPACE,
                "--values-json",
            ])
            .arg(values.to_string());
        Ok(process::run_ok(cmd, TOOL_TIMEOUT)?.stdout_text())
    }

    /// What manifests/install.yaml must hold: a header and the chart with its default values.
    pub fn render_install_yaml(&self) -> Result<String> {
        Ok(format!(
            "{INSTALL_YAML_HEADER}{}",
            self.render(&Value::Object(Default::default()))?
        ))
    }

    /// `helm lint` of the chart.
    pub fn lint(&self) -> Result<Vec<LintMessage>> {
        let mut cmd = self.command("lint");
        cmd.arg(self.root.join(CHART_DIR));
        let out = process::run_ok(cmd, TOOL_TIMEOUT)?;
        serde_json::from_slice(&out.stdout).map_err(Error::json("parsing helm lint's messages"))
    }

    /// Every object of the YAML stream `manifests` that does not validate (strictly: unknown
    /// fields are violations) against the schemas of each of [`KUBERNETES_VERSIONS`]. A
    /// stream without objects is a violation too.
    pub fn validate(&self, manifests: &str) -> Result<Vec<SchemaViolation>> {
        let mut cmd = self.command("validate");
        for version in KUBERNETES_VERSIONS {
            cmd.args(["--kubernetes-version", version]);
        }
        let command = process::describe(&cmd);
        let out = process::run(cmd, manifests.as_bytes(), TOOL_TIMEOUT)?;
        if !out.status.success() {
            return Err(Error::CommandFailed {
                command,
                status: out.status.to_string(),
                stderr: out.stderr_text().trim().to_string(),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(Error::json("parsing the schema violations"))
    }

    fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(self.root.join(TOOLS_SCRIPT))
            .arg(subcommand)
            .current_dir(&self.root);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_fail_with_the_setup_hint() {
        let dir = tempfile::tempdir().unwrap();
        let err = ChartTools::in_target_dir(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cargo xtask setup"), "{msg}");
        assert!(msg.contains("python-tools/bin/python"), "{msg}");
    }

    #[test]
    fn only_info_passes_strict_lint() {
        let message = |severity: &str| LintMessage {
            severity: severity.into(),
            path: "Chart.yaml".into(),
        };
        assert!(!message("INFO").fails_strict_lint());
        assert!(message("WARNING").fails_strict_lint());
        assert!(message("ERROR").fails_strict_lint());
    }
}
