//! Running the real `myelin` CNI plugin exactly as a container runtime does: inside the node's
//! network namespace, with the CNI environment and the network config on stdin.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, process::ExitStatus, time::Duration};

use myelin_api::AttachmentId;
use serde_json::{Value, json};

use crate::{Error, Result, bins::Binaries, netns::Netns, node::Node, process, traffic::Host};

/// Where Debian's reference plugins (`loopback`, `bridge`, `host-local`, ...) live.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// Every plugin call must end well within this; ADD attaches programs, which takes milliseconds.
/// Longer than the plugin's own timeout for the agent (30 s), so that it can answer with code 11.
const CNI_TIMEOUT: Duration = Duration::from_secs(45);

/// What a runtime creates before it calls ADD: the pod's network namespace (the pause
/// container's), a container id and the interface name it wants.
pub struct PodSandbox {
    netns: Netns,
    container_id: String,
    ifname: String,
    namespace: String,
    name: String,
}

impl PodSandbox {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's key for this sandbox's interface.
    pub fn attachment(&self) -> AttachmentId {
        AttachmentId::new(&self.container_id, &self.ifname)
    }
}

/// A sandbox after a successful ADD.
pub struct Pod {
    sandbox: PodSandbox,
    ip: Ipv4Addr,
    result: Value,
}

impl Pod {
    pub fn sandbox(&self) -> &PodSandbox {
        &self.sandbox
    }

    pub fn name(&self) -> &str {
        &self.sandbox.name
    }

    pub fn attachment(&self) -> AttachmentId {
        self.sandbox.attachment()
    }

    /// The CNI result ADD printed.
    pub fn result(&self) -> &Value {
        &self.result
    }

    /// The host side of the pod's veth pair, in the node's namespace: the result's first
    /// interface.
    pub fn host_ifname(&self) -> String {
        self.result["interfaces"][0]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Host for Pod {
    fn label(&self) -> String {
        format!("pod {} ({})", self.sandbox.name, self.ip)
    }
    fn netns(&self) -> &Netns {
        &self.sandbox.netns
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// One plugin invocation: exactly the environment and stdin given, nothing added, so that
/// tests can leave out or break any part of it.
#[derive(Debug, Clone, Default)]
pub struct CniCall {
    env: BTreeMap<String, String>,
    stdin: Vec<u8>,
}

impl CniCall {
    /// Only `CNI_COMMAND`.
    pub fn new(command: &str) -> Self {
        Self::default().env("CNI_COMMAND", command)
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_string(), value.into());
        self
    }

    pub fn without_env(mut self, key: &str) -> Self {
        self.env.remove(key);
        self
    }

    /// The network configuration as stdin.
    pub fn config(self, config: &Value) -> Self {
        self.stdin(config.to_string())
    }

    pub fn stdin(mut self, raw: impl Into<Vec<u8>>) -> Self {
        self.stdin = raw.into();
        self
    }
}

/// What the plugin did.
#[derive(Debug)]
pub struct CniOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From exec to exit.
    pub elapsed: Duration,
}

impl CniOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .map_err(Error::json(format!("plugin stdout is not JSON: {self}")))
    }

    /// The `code` of the CNI error object on stdout, when there is one.
    pub fn error_code(&self) -> Option<u64> {
        serde_json::from_str::<Value>(&self.stdout)
            .ok()?
            .get("code")?
            .as_u64()
    }
}

impl fmt::Display for CniOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {} after {:?}\nstdout: {}\nstderr: {}",
            self.status,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

impl Node {
    /// The network configuration a runtime passes for this node's agent.
    pub fn cni_config(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "myelin",
            "type": "myelin",
            "agentSocket": self.socket(),
        })
    }

    /// A pod network namespace named after this node and the pod (namespace and name: pods of
    /// different namespaces may share a name); the container id is the same unique string.
    pub fn sandbox(&self, namespace: &str, name: &str) -> Result<PodSandbox> {
        let scoped = self
            .run_prefix()
            .name(&format!("{}-{namespace}-{name}", self.name()));
        Ok(PodSandbox {
            netns: Netns::create(&scoped)?,
            container_id: scoped,
            ifname: "eth0".into(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// The full call a runtime makes for `sandbox`, with this node's config on stdin.
    pub fn cni_call(&self, command: &str, sandbox: &PodSandbox) -> CniCall {
        let cni_path = format!("{}:{REFERENCE_PLUGIN_DIR}", self.binaries().dir().display());
        CniCall::new(command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", sandbox.netns.path().display().to_string())
            .env("CNI_IFNAME", &sandbox.ifname)
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    sandbox.namespace, sandbox.name
                ),
            )
            .env("CNI_PATH", cni_path)
            .config(&self.cni_config())
    }

    /// Runs the plugin inside this node's namespace, as the runtime would.
    pub fn cni(&self, call: &CniCall) -> Result<CniOutput> {
        let mut cmd = self.netns().command(self.binaries().plugin()?)?;
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(&call.env);
        let out = process::run(cmd, &call.stdin, CNI_TIMEOUT)?;
        Ok(CniOutput {
            status: out.status,
            stdout: out.stdout_text(),
            stderr: out.stderr_text(),
            elapsed: out.elapsed,
        })
    }

    /// ADD for `sandbox`, which must succeed; the pod's IP is `ips[0].address`.
    pub fn add(&self, sandbox: PodSandbox) -> Result<Pod> {
        let out = self.cni(&self.cni_call("ADD", &sandbox))?;
        let failed = |what: &str| Error::Cni {
            command: "ADD".into(),
            what: format!("{what} for pod {}", sandbox.name),
            output: out.to_string(),
        };
        if !out.success() {
            return Err(failed("failed"));
        }
        let result = out.json()?;
        let ip = result_ip(&result).ok_or_else(|| failed("returned no ips[0].address"))?;
        Ok(Pod {
            sandbox,
            ip,
            result,
        })
    }

    /// A new sandbox plus ADD.
    pub fn add_pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        self.add(self.sandbox(namespace, name)?)
    }

    /// DEL (with the ADD result as prevResult, as runtimes send it), which must succeed; then
    /// the sandbox goes.
    pub fn delete_pod(&self, pod: Pod) -> Result<()> {
        let mut config = self.cni_config();
        config["prevResult"] = pod.result.clone();
        let out = self.cni(&self.cni_call("DEL", &pod.sandbox).config(&config))?;
        if out.success() {
            Ok(())
        } else {
            Err(Error::Cni {
                command: "DEL".into(),
                what: format!("failed for pod {}", pod.sandbox.name),
                output: out.to_string(),
            })
        }
    }
}

/// Runs the `myelin` plugin from `binaries` inside `netns` with exactly `call`'s environment
/// (plus PATH) and stdin.
pub fn run_plugin(binaries: &Binaries, netns: &Netns, call: &CniCall) -> Result<CniOutput> {
    let mut cmd = netns.command(binaries.plugin()?)?;
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(&call.env);
    let out = process::run(cmd, &call.stdin, CNI_TIMEOUT)?;
    Ok(CniOutput {
        status: out.status,
        stdout: out.stdout_text(),
        stderr: out.stderr_text(),
        elapsed: out.elapsed,
    })
}

/// The address of `ips[0]` without its prefix length.
pub fn result_ip(result: &Value) -> Option<Ipv4Addr> {
    let address = result["ips"][0]["address"].as_str()?;
    address.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ip_drops_the_prefix_length() {
        let result = json!({"ips": [{"address": "10.244.1.5/32", "gateway": "10.244.1.1"}]});
        assert_eq!(result_ip(&result), Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(result_ip(&json!({"ips": []})), None);
    }

    #[test]
    fn calls_carry_exactly_the_given_environment() {
        let call = CniCall::new("ADD")
            .env("CNI_IFNAME", "eth0")
            .without_env("CNI_COMMAND")
            .stdin("{");
        assert_eq!(
            call.env.into_iter().collect::<Vec<_>>(),
            vec![("CNI_IFNAME".to_string(), "eth0".to_string())]
        );
        assert_eq!(call.stdin, b"{");
    }
}
