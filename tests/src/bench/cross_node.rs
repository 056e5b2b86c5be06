//! Pod to pod across two nodes: the datapaths Myelin's cross-node figures are compared with,
//! and Myelin itself, built alike so that only the datapath differs. Every variant is two node
//! namespaces plugged into a [`Network`] of one shape, one switch ([`Underlay::Switch`], as
//! Myelin's clusters here use it); node 0 holds the client, node 1 the server; node `i`'s pods
//! are in `10.244.<i>.0/24`, as in a [`Cluster`].
//!
//! - [`Baseline::Bare`], the ceiling: the client and the server run in the node namespaces
//!   themselves and talk over the switch. Over the switch rather than one veth pair between
//!   the nodes, because every other variant crosses it: it plays the physical network, which
//!   no CNI can take out of the path, and a ceiling without it would count against every
//!   datapath a hop that none of them has a say in.
//! - [`Baseline::KernelVxlan`], the kernel's own VXLAN as Flannel's `vxlan` backend builds it:
//!   pods through the reference `bridge` plugin configured as Flannel's CNI plugin delegates to
//!   it; a `flannel.1` device (VNI 1, on `eth0` from the node's address, port 8472, no
//!   learning, the uplink's MTU less 50) holding the node's `10.244.<i>.0/32`; and for every
//!   other node a permanent neighbour entry for its `10.244.<j>.0` with the MAC of its
//!   `flannel.1`, a permanent FDB entry sending that MAC to its node address, and
//!   `10.244.<j>.0/24 via 10.244.<j>.0 dev flannel.1 onlink`. No masquerade rules: flanneld's
//!   `--ip-masq` only concerns traffic leaving the cluster network, and its iptables rules would
//!   put conntrack and NAT hooks on the pod-to-pod path; without them this is the fastest a
//!   Flannel cluster can be.
//! - [`Baseline::PlainRoutes`], native routing by the kernel: pods through the reference `ptp`
//!   plugin, and on each node a route to every other node's pod CIDR via that node's address
//!   (what Flannel's `host-gw` backend or a BGP-based CNI programs on one L2 segment).
//! - Myelin ([`CrossNodePair::myelin`]): a [`Cluster`] of two nodes in tunnel or native mode,
//!   its agents watching the test API server, pods through the real plugin.
//!
//! Baseline nodes forward (`net.ipv4.ip_forward=1`, which every Kubernetes node has); no
//! variant has iptables rules.

use std::{
    fs,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tempfile::TempDir;

use super::cni::{BenchPod, CniDriver, CniPlugin, ReferencePlugin, Sandbox, link_mtu};
use crate::{
    AgentSource, Binaries, Error, Result, RunPrefix,
    multinode::{Cluster, ClusterPod, ClusterSpec, Network, Underlay, pod_cidr},
    netns::Netns,
    process,
    traffic::Host,
};

/// Every node's pod CIDR lies in it; pods route it to their gateway, as Flannel's pods do.
pub(crate) const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Flannel's VXLAN device, `flannel.<VNI>` with its default VNI.
pub const FLANNEL_DEVICE: &str = "flannel.1";
const FLANNEL_VNI: &str = "1";
/// The kernel's VXLAN port, which flanneld keeps when none is configured (Myelin's
/// `--tunnel-port` defaults to it too).
const VXLAN_PORT: &str = "8472";
/// What VXLAN adds to a packet; Flannel takes it off the uplink's MTU for its device and pods.
const VXLAN_OVERHEAD: u32 = 50;
/// How often [`CrossNodePair::time_node_join`] probes (ping's `-i`): its figure's resolution.
const JOIN_PROBE_INTERVAL: &str = "0.01";
/// How long a joining node's pod may take to answer before the join counts as failed.
const JOIN_GIVE_UP: Duration = Duration::from_secs(10);

/// The kernel datapaths Myelin is compared with across nodes (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Bare,
    KernelVxlan,
    PlainRoutes,
}

/// Myelin's `--routing-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMode {
    Tunnel,
    Native,
}

impl RoutingMode {
    pub fn flag(self) -> &'static str {
        match self {
            RoutingMode::Tunnel => "tunnel",
            RoutingMode::Native => "native",
        }
    }
}

/// A baseline's node: a namespace plugged into the network, with its address there.
pub struct BaselineNode {
    netns: Netns,
    ip: Ipv4Addr,
    index: usize,
}

impl BaselineNode {
    /// The namespace `<run>-node<index>`, plugged into `network` as node `index`.
    pub(crate) fn plug(run: &RunPrefix, network: &Network, index: usize) -> Result<Self> {
        let netns = Netns::create(run.name(&format!("node{index}")))?;
        let ip = network.plug(&netns, index)?;
        Ok(Self { netns, ip, index })
    }

    /// `net.ipv4.ip_forward=1`, as on every Kubernetes node.
    pub(crate) fn forward(&self) -> Result<()> {
        self.netns
            .run(|| fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .map_err(Error::io(format!(
                "enabling forwarding in {}",
                self.netns.name()
            )))
    }
}

/// Node `index` of a switch of its own, forwarding, whose pods come from the reference `ptp`
/// plugin with host-local and a default route via the node: every pod packet that leaves the
/// pod passes the node's routing and netfilter hooks (masquerading's and Services' baselines).
/// Fields drop in order: the node before the network.
pub(crate) struct PtpNode {
    pub node: BaselineNode,
    pub network: Network,
    plugin: CniPlugin,
    /// host-local's state.
    _ipam: TempDir,
}

impl PtpNode {
    pub(crate) fn build(run: &RunPrefix, index: usize) -> Result<Self> {
        // Locals drop in reverse: on a failed step the node goes before the network.
        let network = Network::build(run, Underlay::Switch)?;
        let node = BaselineNode::plug(run, &network, index)?;
        node.forward()?;
        let ipam = tempfile::Builder::new()
            .prefix(&format!("{}-", run.name("ipam")))
            .tempdir()
            .map_err(Error::io("creating host-local's temp dir"))?;
        let plugin = CniPlugin::reference(
            ReferencePlugin::Ptp,
            &pod_cidr(index),
            &ipam.path().join(format!("node{index}")),
        )
        .configured(|config| {
            config["ipam"]["routes"] = json!([{ "dst": "0.0.0.0/0" }]);
        });
        Ok(Self {
            node,
            network,
            plugin,
            _ipam: ipam,
        })
    }

    /// A pod `name` (namespace `default`) on the node, through the plugin.
    pub(crate) fn add_pod(&self, run: &RunPrefix, name: &str) -> Result<BenchPod> {
        let sandbox = Sandbox::create(run, "default", name)?;
        BenchPod::attach(&CniDriver::new(self.node.netns(), &self.plugin), sandbox)
    }
}

impl Host for BaselineNode {
    fn label(&self) -> String {
        format!("node{} ({})", self.index, self.ip)
    }
    fn netns(&self) -> &Netns {
        &self.netns
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// A client on node 0 and a server on node 1, connected by one of the datapaths compared.
pub struct CrossNodePair {
    variant: Variant,
}

/// Fields drop in order: the pods before the nodes, the nodes before the network.
enum Variant {
    Baseline {
        /// (client, server); none for the bare nodes, whose processes run in the nodes.
        pods: Option<(BenchPod, BenchPod)>,
        nodes: [BaselineNode; 2],
        /// Held for its namespaces: the switch the nodes hang from.
        _network: Network,
        /// host-local's state, of both nodes.
        _ipam: TempDir,
    },
    Myelin {
        client: ClusterPod,
        server: ClusterPod,
        cluster: Box<Cluster>,
    },
}

/// Times from a joining node's Node object being written.
#[derive(Debug, Clone, Copy)]
pub struct JoinTimes {
    /// Its agent reported ready.
    pub agent_ready: Duration,
    /// Its first pod was added: ADD done, the Pod object carries its address.
    pub pod_added: Duration,
    /// The client pod on node 0 had the first answer from that pod.
    pub first_reply: Duration,
}

impl JoinTimes {
    /// From the new agent being ready to the first answer.
    pub fn first_reply_after_ready(&self) -> Duration {
        self.first_reply.saturating_sub(self.agent_ready)
    }
}

impl CrossNodePair {
    /// Two nodes on a network of their own, connected by `baseline`.
    pub fn baseline(run: &RunPrefix, baseline: Baseline) -> Result<Self> {
        // Locals drop in reverse: on a failed step the pods go first, the network last.
        let network = Network::build(run, Underlay::Switch)?;
        let nodes = [
            BaselineNode::plug(run, &network, 0)?,
            BaselineNode::plug(run, &network, 1)?,
        ];
        let ipam = tempfile::Builder::new()
            .prefix(&format!("{}-", run.name("ipam")))
            .tempdir()
            .map_err(Error::io("creating host-local's temp dir"))?;
        let pods = match baseline {
            Baseline::Bare => None,
            Baseline::KernelVxlan => {
                let mtu = flannel_vxlan(&nodes)?;
                Some(add_pods(run, &nodes, |index| {
                    flannel_bridge(index, mtu, ipam.path())
                })?)
            }
            Baseline::PlainRoutes => {
                for (node, other) in [(&nodes[0], &nodes[1]), (&nodes[1], &nodes[0])] {
                    node.forward()?;
                    node.netns.ip(&[
                        "route",
                        "add",
                        &pod_cidr(other.index),
                        "via",
                        &other.ip.to_string(),
                    ])?;
                }
                Some(add_pods(run, &nodes, |index| {
                    routed_ptp(index, ipam.path())
                })?)
            }
        };
        Ok(Self {
            variant: Variant::Baseline {
                pods,
                nodes,
                _network: network,
                _ipam: ipam,
            },
        })
    }

    /// Myelin: a cluster of two nodes in `mode` over one switch, a pod on each, both known
    /// to both agents. `binaries`: none for the harness's own ([`Binaries::from_env`]).
    pub fn myelin(run: &RunPrefix, mode: RoutingMode, binaries: Option<Binaries>) -> Result<Self> {
        let mut spec = ClusterSpec::new(2, Underlay::Switch)
            .agent_args(&["--routing-mode", mode.flag()])
            // As a cluster runs: a joining node reaches the agents through a watch, without
            // the directory source's debounce.
            .source(AgentSource::Kubernetes);
        spec.binaries = binaries;
        // A failed start carries the agent's log in its error; a benchmark prints no more.
        spec.echo_agent_logs_on_drop = false;
        let cluster = Box::new(Cluster::start(run, spec)?);
        let client = cluster.add_pod(0, "default", "client", &[("app", "client")])?;
        let server = cluster.add_pod(1, "default", "server", &[("app", "server")])?;
        for pod in [&client, &server] {
            cluster.wait_until_every_node_knows(pod.ip())?;
        }
        Ok(Self {
            variant: Variant::Myelin {
                client,
                server,
                cluster,
            },
        })
    }

    /// On node 0: the client pod, or the node itself for the bare nodes.
    pub fn client(&self) -> &dyn Host {
        match &self.variant {
            Variant::Baseline {
                pods: Some((client, _)),
                ..
            } => client,
            Variant::Baseline { nodes, .. } => &nodes[0],
            Variant::Myelin { client, .. } => client,
        }
    }

    /// On node 1: the server pod, or the node itself for the bare nodes.
    pub fn server(&self) -> &dyn Host {
        match &self.variant {
            Variant::Baseline {
                pods: Some((_, server)),
                ..
            } => server,
            Variant::Baseline { nodes, .. } => &nodes[1],
            Variant::Myelin { server, .. } => server,
        }
    }

    /// The MTUs of the client's and the server's `eth0`: figures of two datapaths compare
    /// only when these are equal.
    pub fn mtus(&self) -> Result<(u32, u32)> {
        Ok((
            link_mtu(self.client().netns(), "eth0")?,
            link_mtu(self.server().netns(), "eth0")?,
        ))
    }

    /// Myelin only: a third node joins the running cluster, a pod is added to it, and the
    /// client pod on node 0 pings that pod every 10 ms until it answers; then the pod and the
    /// node go again, leaving the cluster as it was (nodes keep their indexes, so a later
    /// join gets a new one). Times are from the new Node object being written.
    pub fn time_node_join(&mut self) -> Result<JoinTimes> {
        let Variant::Myelin {
            client, cluster, ..
        } = &mut self.variant
        else {
            return Err(Error::Cluster(
                "only Myelin's pair has a cluster that nodes join".into(),
            ));
        };
        let joined = cluster.add_node_timed()?;
        let since = |t: Instant| t.saturating_duration_since(joined.node_object_written);
        let measured = (|| -> Result<JoinTimes> {
            let pod = cluster.add_pod(joined.index, "default", "joiner", &[("app", "joiner")])?;
            let pod_added = Instant::now();
            let answered = first_answer(&*client, &pod);
            let deleted = cluster.delete_pod(pod);
            let first_reply = answered?;
            deleted?;
            Ok(JoinTimes {
                agent_ready: since(joined.agent_ready),
                pod_added: since(pod_added),
                first_reply: since(first_reply),
            })
        })();
        let removed = cluster.remove_node(joined.index);
        let times = measured?;
        removed?;
        Ok(times)
    }
}

/// A client pod on node 0 and a server pod on node 1, each added through `plugin(node)`.
fn add_pods(
    run: &RunPrefix,
    nodes: &[BaselineNode; 2],
    plugin: impl Fn(usize) -> CniPlugin,
) -> Result<(BenchPod, BenchPod)> {
    let attach = |node: &BaselineNode, role: &str| {
        let plugin = plugin(node.index);
        let sandbox = Sandbox::create(run, "default", &format!("node{}-{role}", node.index))?;
        BenchPod::attach(&CniDriver::new(&node.netns, &plugin), sandbox)
    };
    Ok((attach(&nodes[0], "client")?, attach(&nodes[1], "server")?))
}

/// The `bridge` plugin as Flannel's CNI plugin runs it for kube-flannel's conflist: bridge
/// `cni0` with the gateway address, the VXLAN device's MTU, hairpin mode, the default route
/// and a route to the cluster network in the pod, host-local on the node's subnet; no
/// masquerade (see the module's documentation).
fn flannel_bridge(index: usize, mtu: u32, ipam: &std::path::Path) -> CniPlugin {
    CniPlugin::reference(
        ReferencePlugin::Bridge,
        &pod_cidr(index),
        &ipam.join(format!("node{index}")),
    )
    .configured(|config| {
        config["name"] = "cbr0".into();
        config["bridge"] = "cni0".into();
        config["mtu"] = mtu.into();
        config["hairpinMode"] = true.into();
        config["isDefaultGateway"] = true.into();
        config["ipam"]["routes"] = json!([{ "dst": CLUSTER_CIDR }]);
    })
}

/// The `ptp` plugin with host-local on the node's subnet and a route to the cluster network in
/// the pod (other nodes' pods are beyond the node's own subnet).
fn routed_ptp(index: usize, ipam: &std::path::Path) -> CniPlugin {
    CniPlugin::reference(
        ReferencePlugin::Ptp,
        &pod_cidr(index),
        &ipam.join(format!("node{index}")),
    )
    .configured(|config| {
        config["ipam"]["routes"] = json!([{ "dst": CLUSTER_CIDR }]);
    })
}

/// Flannel's VXLAN on every node, then on every node the entries for every other one, in the
/// order flanneld adds them (the route last: without the neighbour entry the kernel would
/// resolve the next hop itself). Returns the device's MTU.
fn flannel_vxlan(nodes: &[BaselineNode; 2]) -> Result<u32> {
    let mut mtu = 0;
    let mut macs = Vec::with_capacity(nodes.len());
    for node in nodes {
        node.forward()?;
        mtu = link_mtu(&node.netns, "eth0")? - VXLAN_OVERHEAD;
        node.netns.ip(&[
            "link",
            "add",
            FLANNEL_DEVICE,
            "mtu",
            &mtu.to_string(),
            "type",
            "vxlan",
            "id",
            FLANNEL_VNI,
            "local",
            &node.ip.to_string(),
            "dev",
            "eth0",
            "dstport",
            VXLAN_PORT,
            "nolearning",
        ])?;
        // A /32, so that no broadcast or subnet route comes with it; it is the node's source
        // address towards other nodes' pods.
        node.netns.ip(&[
            "addr",
            "add",
            &format!("{}/32", subnet_address(node.index)),
            "dev",
            FLANNEL_DEVICE,
        ])?;
        node.netns.ip(&["link", "set", FLANNEL_DEVICE, "up"])?;
        macs.push(link_mac(&node.netns, FLANNEL_DEVICE)?);
    }
    for node in nodes {
        for (other, mac) in nodes.iter().zip(&macs) {
            if other.index == node.index {
                continue;
            }
            let next_hop = subnet_address(other.index);
            node.netns.ip(&[
                "neigh",
                "replace",
                &next_hop,
                "lladdr",
                mac,
                "dev",
                FLANNEL_DEVICE,
                "nud",
                "permanent",
            ])?;
            bridge(
                &node.netns,
                &[
                    "fdb",
                    "replace",
                    mac,
                    "dev",
                    FLANNEL_DEVICE,
                    "dst",
                    &other.ip.to_string(),
                    "self",
                    "permanent",
                ],
            )?;
            node.netns.ip(&[
                "route",
                "replace",
                &pod_cidr(other.index),
                "via",
                &next_hop,
                "dev",
                FLANNEL_DEVICE,
                "onlink",
            ])?;
        }
    }
    Ok(mtu)
}

/// The first address of node `index`'s pod CIDR (`10.244.<i>.0`), which Flannel gives its
/// VXLAN device and other nodes use as the next hop to its pods.
fn subnet_address(index: usize) -> String {
    let cidr = pod_cidr(index);
    cidr.split('/').next().unwrap_or(&cidr).to_string()
}

fn link_mac(netns: &Netns, dev: &str) -> Result<String> {
    let out = netns.ip(&["-j", "link", "show", dev])?;
    let links: Value = serde_json::from_slice(&out.stdout).map_err(Error::json(format!(
        "parsing `ip -j link show {dev}` in {}",
        netns.name()
    )))?;
    links[0]["address"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Traffic {
            what: format!("no MAC address for {dev} in {}: {links}", netns.name()),
        })
}

/// iproute2's `bridge <args>` in `netns`.
fn bridge(netns: &Netns, args: &[&str]) -> Result<()> {
    let mut cmd = netns.command("bridge")?;
    cmd.args(args);
    process::run_ok(cmd, Duration::from_secs(10)).map(drop)
}

/// Pings `to` from `from` every [`JOIN_PROBE_INTERVAL`] until the first answer, and returns
/// when it came (to within the probe interval and ping's exit).
fn first_answer(from: &dyn Host, to: &dyn Host) -> Result<Instant> {
    let deadline = Instant::now() + JOIN_GIVE_UP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut cmd = from.netns().command("ping")?;
        // With -w, `-c 1` means one answer: ping keeps sending every interval until it has
        // one or the deadline (whole seconds) passes.
        cmd.args(["-n", "-q", "-c", "1", "-i", JOIN_PROBE_INTERVAL, "-w"])
            .arg(left.as_secs().max(1).to_string())
            .arg(to.ip().to_string());
        let out = process::run(cmd, &[], left + Duration::from_secs(5))?;
        if out.status.success() {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(Error::Traffic {
                what: format!(
                    "{} did not answer {} within {JOIN_GIVE_UP:?} of joining: {}{}",
                    to.label(),
                    from.label(),
                    out.stdout_text().trim(),
                    out.stderr_text().trim()
                ),
            });
        }
        // ping also ends early on an error the network reports (no route yet): probe again.
        thread::sleep(Duration::from_millis(10));
    }
}

/// Root checks that each variant carries traffic from node 0 to node 1 the way it claims:
/// otherwise the figures would compare something else.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bench::tcp::tcp_rr,
        root_test,
        traffic::{ping, tcp_bulk},
    };

    /// A ping, a megabyte (full-size segments: a wrong MTU on the path shows), and a short
    /// request/response run; returns its round trips per second.
    fn carries_traffic(pair: &CrossNodePair) -> Result<f64> {
        ping(pair.client(), pair.server())?;
        tcp_bulk(pair.client(), pair.server(), 0)?;
        tcp_rr(
            pair.client(),
            pair.server(),
            11111,
            1,
            Duration::from_millis(300),
        )
    }

    fn baseline_nodes(pair: &CrossNodePair) -> &[BaselineNode; 2] {
        match &pair.variant {
            Variant::Baseline { nodes, .. } => nodes,
            Variant::Myelin { .. } => panic!("not a baseline"),
        }
    }

    fn tx_packets(netns: &Netns, dev: &str) -> Result<u64> {
        let out = netns.ip(&["-j", "-s", "link", "show", dev])?;
        let links: Value = serde_json::from_slice(&out.stdout)
            .map_err(Error::json(format!("parsing `ip -j -s link show {dev}`")))?;
        Ok(links[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .unwrap_or_default())
    }

    /// The device and next hop node 0 sends the server's packets to.
    fn route_to_server(pair: &CrossNodePair) -> Result<String> {
        let node = &baseline_nodes(pair)[0];
        let server = pair.server().ip().to_string();
        Ok(node.netns.ip(&["route", "get", &server])?.stdout_text())
    }

    fn in_pod_cidr(ip: Ipv4Addr, index: usize) -> bool {
        let [a, b, c, _] = ip.octets();
        format!("{a}.{b}.{c}.0/24") == pod_cidr(index)
    }

    #[test]
    fn the_bare_nodes_talk_over_the_switch() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let pair = CrossNodePair::baseline(&run, Baseline::Bare)?;
        assert_eq!(pair.client().ip(), Underlay::Switch.node_ip(0)?);
        assert_eq!(pair.server().ip(), Underlay::Switch.node_ip(1)?);
        let rate = carries_traffic(&pair)?;
        assert!(rate > 100.0, "{rate} round trips/s");
        assert_eq!(pair.mtus()?, (1500, 1500));
        Ok(())
    }

    #[test]
    fn kernel_vxlan_carries_pod_traffic_through_flannel_1_both_ways() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let pair = CrossNodePair::baseline(&run, Baseline::KernelVxlan)?;
        assert!(
            in_pod_cidr(pair.client().ip(), 0),
            "{}",
            pair.client().label()
        );
        assert!(
            in_pod_cidr(pair.server().ip(), 1),
            "{}",
            pair.server().label()
        );
        let route = route_to_server(&pair)?;
        assert!(
            route.contains("via 10.244.1.0 dev flannel.1"),
            "node 0 routes the server's pod CIDR into the tunnel: {route}"
        );
        let nodes = baseline_nodes(&pair);
        let before = [
            tx_packets(&nodes[0].netns, FLANNEL_DEVICE)?,
            tx_packets(&nodes[1].netns, FLANNEL_DEVICE)?,
        ];
        let rate = carries_traffic(&pair)?;
        assert!(rate > 100.0, "{rate} round trips/s");
        // Every request went out through node 0's device, every answer through node 1's.
        let min = (rate * 0.3) as u64;
        for (node, before) in nodes.iter().zip(before) {
            let sent = tx_packets(&node.netns, FLANNEL_DEVICE)? - before;
            assert!(
                sent > min,
                "{}: {sent} packets through flannel.1",
                node.label()
            );
        }
        assert_eq!(pair.mtus()?, (1450, 1450));
        Ok(())
    }

    #[test]
    fn plain_routes_carry_pod_traffic_via_the_other_node_unencapsulated() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let pair = CrossNodePair::baseline(&run, Baseline::PlainRoutes)?;
        assert!(
            in_pod_cidr(pair.client().ip(), 0),
            "{}",
            pair.client().label()
        );
        assert!(
            in_pod_cidr(pair.server().ip(), 1),
            "{}",
            pair.server().label()
        );
        let route = route_to_server(&pair)?;
        let node1 = Underlay::Switch.node_ip(1)?;
        assert!(
            route.contains(&format!("via {node1} dev eth0")),
            "node 0 routes the server's pod CIDR to node 1: {route}"
        );
        let nodes = baseline_nodes(&pair);
        let before = tx_packets(&nodes[0].netns, "eth0")?;
        let rate = carries_traffic(&pair)?;
        assert!(rate > 100.0, "{rate} round trips/s");
        let sent = tx_packets(&nodes[0].netns, "eth0")? - before;
        assert!(sent > (rate * 0.3) as u64, "{sent} packets out of node 0");
        assert_eq!(pair.mtus()?, (1500, 1500));
        Ok(())
    }

    /// Myelin's pair carries traffic, and a node joining its cluster is timed from its Node
    /// object to its pod's first answer; it leaves again, so the next join works alike.
    #[test]
    fn a_node_joining_myelins_cluster_is_timed_until_its_pod_answers() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let mut pair = CrossNodePair::myelin(&run, RoutingMode::Tunnel, None)?;
        assert!(
            in_pod_cidr(pair.client().ip(), 0),
            "{}",
            pair.client().label()
        );
        assert!(
            in_pod_cidr(pair.server().ip(), 1),
            "{}",
            pair.server().label()
        );
        let rate = carries_traffic(&pair)?;
        assert!(rate > 100.0, "{rate} round trips/s");
        assert_eq!(pair.mtus()?, (1450, 1450));
        for _ in 0..2 {
            let t = pair.time_node_join()?;
            assert!(
                t.agent_ready <= t.pod_added && t.pod_added <= t.first_reply,
                "{t:?}"
            );
            assert!(t.first_reply < JOIN_GIVE_UP, "{t:?}");
        }
        // Its own prefix: every variant names its network and nodes alike.
        let bare = CrossNodePair::baseline(&RunPrefix::new(), Baseline::Bare);
        let err = bare?.time_node_join().expect_err("no cluster to join");
        assert!(err.to_string().contains("only Myelin"), "{err}");
        Ok(())
    }
}
