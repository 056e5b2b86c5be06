//! One CNI driver for every plugin a benchmark compares: Myelin and the reference `bridge` and
//! `ptp` plugins with `host-local` IPAM. Each plugin runs exactly as a container runtime runs
//! it, inside the node's network namespace with the CNI environment and the network config on
//! stdin, and every call is timed the same way (spawn to exit, see [`process::run`]), so that the
//! figures differ only by what the plugins do.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    Error, REFERENCE_PLUGIN_DIR, Result, cni::result_ip, netns::Netns, node::Node, process,
    run::RunPrefix, traffic::Host,
};

/// Every plugin call must end well within this.
const CNI_TIMEOUT: Duration = Duration::from_secs(30);
/// What a runtime's plugins see as PATH (they look for `ip`, `iptables`, ...).
const PLUGIN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The reference plugins (containernetworking-plugins 1.1.1) speak CNI up to 1.0.0.
const REFERENCE_CNI_VERSION: &str = "1.0.0";

/// The reference plugins a benchmark compares Myelin with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferencePlugin {
    /// Pods on a Linux bridge in the node: same-node traffic is switched, never routed.
    Bridge,
    /// A veth pair per pod with host routes: same-node traffic is routed by the node's stack
    /// (and so passes its FORWARD chain).
    Ptp,
}

impl ReferencePlugin {
    pub fn name(self) -> &'static str {
        match self {
            ReferencePlugin::Bridge => "bridge",
            ReferencePlugin::Ptp => "ptp",
        }
    }
}

/// A plugin as a runtime knows it: the binary, CNI_PATH for its delegates, the network config.
#[derive(Debug, Clone)]
pub struct CniPlugin {
    binary: PathBuf,
    cni_path: String,
    config: Value,
}

impl CniPlugin {
    /// The `myelin` plugin talking to `node`'s agent, configured as the node's conflist says.
    pub fn myelin(node: &Node) -> Result<Self> {
        Ok(Self {
            binary: node.binaries().plugin()?,
            cni_path: format!("{}:{REFERENCE_PLUGIN_DIR}", node.binaries().dir().display()),
            config: node.cni_config(),
        })
    }

    /// `plugin` with host-local handing out `subnet`, its state kept in `ipam_dir`. No
    /// masquerading: pod-to-pod traffic on one node never needs it, and it would add NAT rules.
    pub fn reference(plugin: ReferencePlugin, subnet: &str, ipam_dir: &Path) -> Self {
        let mut config = json!({
            "cniVersion": REFERENCE_CNI_VERSION,
            "name": format!("bench-{}", plugin.name()),
            "type": plugin.name(),
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "dataDir": ipam_dir,
            },
        });
        if plugin == ReferencePlugin::Bridge {
            // The bridge lives in the node's namespace; the gateway address on it makes the
            // node reachable, as a cluster configures it.
            config["bridge"] = "bench0".into();
            config["isGateway"] = true.into();
        }
        Self {
            binary: Path::new(REFERENCE_PLUGIN_DIR).join(plugin.name()),
            cni_path: REFERENCE_PLUGIN_DIR.to_string(),
            config,
        }
    }

    /// The same plugin with `edit` applied to its network config (the keys a cluster sets
    /// beyond [`CniPlugin::reference`]'s, such as the MTU or routes).
    pub(crate) fn configured(mut self, edit: impl FnOnce(&mut Value)) -> Self {
        edit(&mut self.config);
        self
    }
}

/// What a runtime creates before ADD: the pod's network namespace; its name is also the
/// container id. `namespace`/`name` are the Kubernetes pod's (CNI_ARGS).
pub struct Sandbox {
    netns: Netns,
    namespace: String,
    name: String,
}

impl Sandbox {
    /// A namespace named `<run>-<name>`.
    pub fn create(run: &RunPrefix, namespace: &str, name: &str) -> Result<Self> {
        Ok(Self {
            netns: Netns::create(run.name(name))?,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn container_id(&self) -> &str {
        self.netns.name()
    }
}

/// A successful ADD: the pod's address and the result the plugin printed (DEL gets it back as
/// prevResult, as runtimes send it).
#[derive(Debug, Clone)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    result: Value,
}

/// Runs one plugin inside one node's namespace.
pub struct CniDriver<'a> {
    node: &'a Netns,
    plugin: &'a CniPlugin,
}

impl<'a> CniDriver<'a> {
    pub fn new(node: &'a Netns, plugin: &'a CniPlugin) -> Self {
        Self { node, plugin }
    }

    /// ADD `sandbox` (interface `eth0`); returns the attachment and how long the plugin took.
    pub fn add(&self, sandbox: &Sandbox) -> Result<(Attachment, Duration)> {
        let (out, elapsed) = self.call("ADD", sandbox, &self.plugin.config)?;
        let result: Value = serde_json::from_str(&out).map_err(Error::json(format!(
            "ADD result of {}: {out}",
            sandbox.name
        )))?;
        let ip = result_ip(&result).ok_or_else(|| Error::Cni {
            command: "ADD".into(),
            what: format!("returned no ips[0].address for {}", sandbox.name),
            output: out.clone(),
        })?;
        Ok((Attachment { ip, result }, elapsed))
    }

    /// DEL what [`add`](Self::add) created; returns how long the plugin took.
    pub fn del(&self, sandbox: &Sandbox, attachment: &Attachment) -> Result<Duration> {
        let mut config = self.plugin.config.clone();
        config["prevResult"] = attachment.result.clone();
        self.call("DEL", sandbox, &config)
            .map(|(_, elapsed)| elapsed)
    }

    fn call(&self, command: &str, sandbox: &Sandbox, config: &Value) -> Result<(String, Duration)> {
        let mut cmd = self.node.command(&self.plugin.binary)?;
        cmd.env_clear()
            .env("PATH", PLUGIN_PATH)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", sandbox.container_id())
            .env("CNI_NETNS", sandbox.netns.path())
            .env("CNI_IFNAME", "eth0")
            // As containerd sends them: the reference plugins refuse keys they do not know
            // unless told to ignore them.
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    sandbox.namespace, sandbox.name
                ),
            )
            .env("CNI_PATH", &self.plugin.cni_path);
        let out = process::run(cmd, config.to_string().as_bytes(), CNI_TIMEOUT)?;
        let stdout = out.stdout_text();
        if !out.status.success() {
            return Err(Error::Cni {
                command: command.into(),
                what: format!(
                    "failed for {} ({})",
                    sandbox.name,
                    self.plugin.binary.display()
                ),
                output: format!(
                    "exit: {}\nstdout: {}\nstderr: {}",
                    out.status,
                    stdout.trim(),
                    out.stderr_text().trim()
                ),
            });
        }
        Ok((stdout, out.elapsed))
    }
}

/// A node running a reference plugin: its namespace and the temp dir holding host-local's
/// state. Removing the namespace removes the bridge and every host-side veth with it.
pub struct ReferenceNode {
    plugin: CniPlugin,
    netns: Netns,
    // Dropped last: host-local's files go with it.
    _dir: TempDir,
}

impl ReferenceNode {
    pub fn start(run: &RunPrefix, plugin: ReferencePlugin, subnet: &str) -> Result<Self> {
        let name = run.name(&format!("{}-node", plugin.name()));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .map_err(Error::io("creating the reference node's temp dir"))?;
        Ok(Self {
            plugin: CniPlugin::reference(plugin, subnet, &dir.path().join("ipam")),
            netns: Netns::create(name)?,
            _dir: dir,
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn driver(&self) -> CniDriver<'_> {
        CniDriver::new(&self.netns, &self.plugin)
    }
}

/// A pod that traffic runs between: its namespace and address. Dropping it removes the
/// namespace, and with it the pod's end of whatever connects it.
pub struct BenchPod {
    netns: Netns,
    ip: Ipv4Addr,
    name: String,
}

impl BenchPod {
    /// ADD through `driver`; the pod keeps its sandbox's namespace.
    pub fn attach(driver: &CniDriver<'_>, sandbox: Sandbox) -> Result<Self> {
        let (attachment, _) = driver.add(&sandbox)?;
        Ok(Self {
            ip: attachment.ip,
            name: sandbox.name,
            netns: sandbox.netns,
        })
    }
}

impl Host for BenchPod {
    fn label(&self) -> String {
        format!("pod {} ({})", self.name, self.ip)
    }
    fn netns(&self) -> &Netns {
        &self.netns
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// Two pods on one node, connected by one of the datapaths a benchmark compares. Fields drop
/// in order: the pods before the node that connects them.
pub struct PodPair {
    pub client: BenchPod,
    pub server: BenchPod,
    node: PairNode,
}

enum PairNode {
    /// The bare veth pair needs no node.
    None,
    Reference(ReferenceNode),
    Myelin(Box<Node>),
}

/// Addresses of the bare veth pair (a range no node hands out).
const BARE_CLIENT: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 245, 0, 1), 24);
const BARE_SERVER: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 245, 0, 2), 24);

impl PodPair {
    /// The ceiling: two namespaces joined by one veth pair, nothing in between.
    pub fn bare_veth(run: &RunPrefix) -> Result<Self> {
        let client = Netns::create(run.name("bare-client"))?;
        let server = Netns::create(run.name("bare-server"))?;
        client.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            server.name(),
        ])?;
        for (netns, (ip, len)) in [(&client, BARE_CLIENT), (&server, BARE_SERVER)] {
            netns.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
            netns.ip(&["link", "set", "eth0", "up"])?;
        }
        Ok(Self {
            client: BenchPod {
                netns: client,
                ip: BARE_CLIENT.0,
                name: "bare-client".into(),
            },
            server: BenchPod {
                netns: server,
                ip: BARE_SERVER.0,
                name: "bare-server".into(),
            },
            node: PairNode::None,
        })
    }

    /// A node running `plugin` with host-local on `subnet`, and two pods added through it.
    pub fn reference(run: &RunPrefix, plugin: ReferencePlugin, subnet: &str) -> Result<Self> {
        let node = ReferenceNode::start(run, plugin, subnet)?;
        let driver = node.driver();
        let client = BenchPod::attach(
            &driver,
            Sandbox::create(run, "default", &format!("{}-client", plugin.name()))?,
        )?;
        let server = BenchPod::attach(
            &driver,
            Sandbox::create(run, "default", &format!("{}-server", plugin.name()))?,
        )?;
        Ok(Self {
            client,
            server,
            node: PairNode::Reference(node),
        })
    }

    /// Two pods added through the `myelin` plugin on `node`, which the pair then owns.
    pub fn myelin(run: &RunPrefix, node: Node) -> Result<Self> {
        let plugin = CniPlugin::myelin(&node)?;
        let driver = CniDriver::new(node.netns(), &plugin);
        let client = BenchPod::attach(&driver, Sandbox::create(run, "default", "myelin-client")?)?;
        let server = BenchPod::attach(&driver, Sandbox::create(run, "default", "myelin-server")?)?;
        Ok(Self {
            client,
            server,
            node: PairNode::Myelin(Box::new(node)),
        })
    }

    /// The namespace of the node between the pods (none for the bare veth pair).
    pub fn node_netns(&self) -> Option<&Netns> {
        match &self.node {
            PairNode::None => None,
            PairNode::Reference(node) => Some(node.netns()),
            PairNode::Myelin(node) => Some(node.netns()),
        }
    }

    /// The Myelin node between the pods, if this is Myelin's pair.
    pub fn myelin_node(&self) -> Option<&Node> {
        match &self.node {
            PairNode::Myelin(node) => Some(node),
            _ => None,
        }
    }

    /// The pods' interface MTUs (client, server): a benchmark compares datapaths only when
    /// they are equal.
    pub fn mtus(&self) -> Result<(u32, u32)> {
        Ok((
            link_mtu(&self.client.netns, "eth0")?,
            link_mtu(&self.server.netns, "eth0")?,
        ))
    }
}

/// The MTU of `dev` in `netns`.
pub(crate) fn link_mtu(netns: &Netns, dev: &str) -> Result<u32> {
    let out = netns.ip(&["-j", "link", "show", dev])?;
    let links: Value = serde_json::from_slice(&out.stdout).map_err(Error::json(format!(
        "parsing `ip -j link show {dev}` in {}",
        netns.name()
    )))?;
    links[0]["mtu"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| Error::Traffic {
            what: format!("no MTU for {dev} in {}: {links}", netns.name()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_configs_are_what_the_plugins_expect() {
        let bridge = CniPlugin::reference(ReferencePlugin::Bridge, "10.9.0.0/24", Path::new("/x"));
        assert_eq!(bridge.config["cniVersion"], "1.0.0");
        assert_eq!(bridge.config["type"], "bridge");
        assert_eq!(bridge.config["bridge"], "bench0");
        assert_eq!(bridge.config["ipMasq"], false);
        assert_eq!(bridge.config["ipam"]["type"], "host-local");
        assert_eq!(bridge.config["ipam"]["dataDir"], "/x");
        assert_eq!(
            bridge.config["ipam"]["ranges"][0][0]["subnet"],
            "10.9.0.0/24"
        );
        assert_eq!(bridge.binary, Path::new("/usr/lib/cni/bridge"));

        let ptp = CniPlugin::reference(ReferencePlugin::Ptp, "10.9.1.0/24", Path::new("/y"));
        assert_eq!(ptp.config["type"], "ptp");
        assert!(ptp.config.get("bridge").is_none());
        assert_eq!(ptp.cni_path, "/usr/lib/cni");
    }
}
