//! A local cluster of several nodes: each node is a [`Node`] (a network namespace running the
//! real agent), joined to the others through an underlay namespace that plays the physical
//! network, with one more namespace, the world, standing for the internet.
//!
//! ```text
//! Underlay::Switch                                 one L2 segment, 192.168.100.0/24
//!   <run>-underlay: bridge "switch"  (192.168.100.2 on it only to serve the API server)
//!     port node0 ─── eth0 192.168.100.10  <run>-node0   default via 192.168.100.1
//!     port node1 ─── eth0 192.168.100.11  <run>-node1   default via 192.168.100.1
//!     port world ─── eth0 192.168.100.1   <run>-world   (the subnet only)
//!
//! Underlay::Router { route_pod_cidrs }             two subnets and the world's, routed
//!   <run>-underlay: ip_forward=1; with route_pod_cidrs, 10.244.<i>.0/24 via node i
//!     bridge subnet1 192.168.1.1 (the API server's address)
//!       port node0 ─── eth0 192.168.1.10  <run>-node0   default via 192.168.1.1
//!       port node2 ─── eth0 192.168.1.12  <run>-node2   default via 192.168.1.1
//!     bridge subnet2 192.168.2.1
//!       port node1 ─── eth0 192.168.2.11  <run>-node1   default via 192.168.2.1
//!     port world 203.0.113.1 ─── eth0 203.0.113.10  <run>-world
//!                                  192.168.1.0/24 and 192.168.2.0/24 via 203.0.113.1, no more
//! ```
//!
//! - Node `i` is named `node<i>` (namespace `<run>-node<i>`, its pods `<run>-node<i>-<ns>-<pod>`),
//!   has the pod CIDR `10.244.<i>.0/24`, and its uplink is `eth0` (the device holding its
//!   InternalIP), whose peer `node<i>` is a bridge port in the underlay. Indexes are never
//!   reused: a node that joins after one left gets a new index (and address).
//! - The underlay and the world are a [`Network`], which benchmarks also build for their
//!   baselines' nodes, so that those cross the same network as Myelin's.
//! - The world has routes to the node addresses only, never to a pod CIDR: pod traffic reaches
//!   it, and is answered, only once it carries a node's address (masquerade).
//! - Every node's agent sees the same cluster state, as Kubernetes would show it: the Node
//!   objects (pod CIDR, InternalIP, Hostname), the namespaces, every pod (labels,
//!   `spec.nodeName`, and once its ADD succeeded `status.podIP`/`podIPs`/`hostIP`), and what a
//!   test [`apply`](Cluster::apply)s. With [`AgentSource::ClusterDir`] the same files are in every
//!   node's cluster dir, one object per file (`node_<name>.yaml`, `namespace_<name>.yaml`,
//!   `pod_<namespace>_<name>.yaml`, `applied_<name>.yaml`; `_` is in no Kubernetes name, so
//!   these never collide); with [`AgentSource::Kubernetes`] they are in one test API server that
//!   listens in the underlay (on the router's 192.168.1.1, or on 192.168.100.2 given to the
//!   switch for it) and every agent watches.
//!
//! Every namespace carries the run's prefix; dropping the cluster (also in a panic) stops the
//! agents and removes every namespace, and the sweeper removes what a killed run left, as for
//! single nodes.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, TcpListener},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    AGENT_READY_TIMEOUT, Error, Node, NodeSpec, Pod, Result, RunPrefix,
    apiserver::ApiServer,
    bins::Binaries,
    cluster::{namespace_object, node_object_at, pod_object, running_pod_status},
    netns::Netns,
    node::AgentSource,
    traffic::{Host, NetnsHost},
};

/// Most nodes a cluster can have over its life: node `i`'s address ends in `10 + i`.
pub const MAX_NODES: usize = 200;
/// How long every agent may take to take in a change of the cluster state (the directory
/// source waits 100 ms for writes to settle; a watch is faster).
pub const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The shape of the physical network between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underlay {
    /// One L2 segment, 192.168.100.0/24: a Linux bridge with every node and the world on it.
    /// The world (.1) is the nodes' default gateway.
    Switch,
    /// Two subnets, 192.168.1.0/24 and 192.168.2.0/24 (node `i` on the first when `i` is even),
    /// each a bridge whose `.1` is the underlay namespace routing between them and the world's
    /// 203.0.113.0/24. Nodes on different subnets share no L2 segment: native routing then
    /// needs the router to know the pod CIDRs, which `route_pod_cidrs` gives it.
    Router { route_pod_cidrs: bool },
}

const SWITCH: &str = "switch";
const SWITCH_WORLD: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const SWITCH_API_SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
/// The router's bridges and its address on each (`.1` of the subnet).
const ROUTER_SUBNETS: [(&str, Ipv4Addr); 2] = [
    ("subnet1", Ipv4Addr::new(192, 168, 1, 1)),
    ("subnet2", Ipv4Addr::new(192, 168, 2, 1)),
];
const ROUTER_WORLD_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const ROUTER_WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Every subnet here is a /24.
const PREFIX_LEN: u8 = 24;

impl Underlay {
    /// Node `index`'s InternalIP.
    pub fn node_ip(self, index: usize) -> Result<Ipv4Addr> {
        let host = (index < MAX_NODES)
            .then(|| u8::try_from(10 + index).ok())
            .flatten()
            .ok_or_else(|| Error::Cluster(format!("a cluster has at most {MAX_NODES} nodes")))?;
        Ok(match self {
            Underlay::Switch => Ipv4Addr::new(192, 168, 100, host),
            Underlay::Router { .. } => {
                let [a, b, c, _] = self.router_subnet(index).1.octets();
                Ipv4Addr::new(a, b, c, host)
            }
        })
    }

    pub fn world_ip(self) -> Ipv4Addr {
        match self {
            Underlay::Switch => SWITCH_WORLD,
            Underlay::Router { .. } => ROUTER_WORLD,
        }
    }

    /// Where the API server listens in the Kubernetes variant: an address of the underlay
    /// namespace that every node reaches.
    fn api_server_ip(self) -> Ipv4Addr {
        match self {
            Underlay::Switch => SWITCH_API_SERVER,
            Underlay::Router { .. } => ROUTER_SUBNETS[0].1,
        }
    }

    /// The bridge node `index` is plugged into, and its default gateway.
    fn attachment(self, index: usize) -> (&'static str, Ipv4Addr) {
        match self {
            Underlay::Switch => (SWITCH, SWITCH_WORLD),
            Underlay::Router { .. } => self.router_subnet(index),
        }
    }

    fn router_subnet(self, index: usize) -> (&'static str, Ipv4Addr) {
        ROUTER_SUBNETS[index % ROUTER_SUBNETS.len()]
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub underlay: Underlay,
    /// Where every agent reads the cluster state: its cluster dir (each holding the same
    /// objects), or the one test API server.
    pub source: AgentSource,
    /// Flags for every agent, after the harness's own (e.g. `--routing-mode tunnel`).
    pub agent_args: Vec<String>,
    pub binaries: Option<Binaries>,
    /// Print every agent's log when its node goes (libtest shows it for failing tests only).
    pub echo_agent_logs_on_drop: bool,
}

impl ClusterSpec {
    pub fn new(nodes: usize, underlay: Underlay) -> Self {
        Self {
            nodes,
            underlay,
            source: AgentSource::ClusterDir,
            agent_args: Vec::new(),
            binaries: None,
            echo_agent_logs_on_drop: true,
        }
    }

    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn source(mut self, source: AgentSource) -> Self {
        self.source = source;
        self
    }
}

/// The internet: a namespace on the underlay with routes to the node addresses only.
pub struct World {
    netns: Netns,
    ip: Ipv4Addr,
}

impl Host for World {
    fn label(&self) -> String {
        format!("the world ({})", self.ip)
    }
    fn netns(&self) -> &Netns {
        &self.netns
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// The physical network between nodes: the underlay namespace (a switch, or a router between
/// two subnets) with the world on it, into which node namespaces are plugged. A [`Cluster`]
/// plugs its Myelin nodes into one; a benchmark's baselines plug plain node namespaces into
/// another of the same shape, so that both cross the same network.
pub struct Network {
    world: World,
    underlay: Netns,
    shape: Underlay,
}

impl Network {
    /// The namespaces `<run>-underlay` and `<run>-world`, wired as `shape` draws them.
    pub fn build(run: &RunPrefix, shape: Underlay) -> Result<Self> {
        let underlay = Netns::create(run.name("underlay"))?;
        let world = World {
            netns: Netns::create(run.name("world"))?,
            ip: shape.world_ip(),
        };
        // From here on dropping the network removes whatever was made when a step fails.
        let network = Self {
            world,
            underlay,
            shape,
        };
        network.wire()?;
        Ok(network)
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn shape(&self) -> Underlay {
        self.shape
    }

    /// Plugs `netns` in as node `index`: its `eth0` on the node's bridge, with the node's
    /// address and a default route via the bridge's gateway. Returns that address.
    pub fn plug(&self, netns: &Netns, index: usize) -> Result<Ipv4Addr> {
        let ip = self.shape.node_ip(index)?;
        let (bridge, gateway) = self.shape.attachment(index);
        let port = underlay_port(index);
        let u = &self.underlay;
        u.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        u.ip(&["link", "set", &port, "master", bridge, "up"])?;
        netns.ip(&["addr", "add", &cidr(ip), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        Ok(ip)
    }

    /// The router's route to a node's pod CIDR, when the underlay routes pod CIDRs.
    pub fn route_pod_cidr(&self, pod_cidr: &str, node_ip: Ipv4Addr) -> Result<()> {
        if self.routes_pod_cidrs() {
            self.underlay
                .ip(&["route", "add", pod_cidr, "via", &node_ip.to_string()])?;
        }
        Ok(())
    }

    /// Forgets node `index`: the route to its pod CIDR, and its port if still there (removing
    /// a namespace takes its end of the pair with it, but asynchronously).
    pub fn unplug(&self, index: usize, pod_cidr: &str) -> Result<()> {
        if self.routes_pod_cidrs() {
            self.underlay.ip(&["route", "del", pod_cidr])?;
        }
        let port = underlay_port(index);
        // The node's namespace is gone, and with it its end of the pair; the kernel takes the
        // underlay's end away in the background (namespace cleanup runs in a work queue), so
        // it may vanish between the listing and the delete: only one still there is an error.
        if self.underlay.link_names()?.contains(&port)
            && let Err(e) = self.underlay.ip(&["link", "del", &port])
            && self.underlay.link_names()?.contains(&port)
        {
            return Err(e);
        }
        Ok(())
    }

    /// An address of the underlay namespace that every node reaches, for a server there (the
    /// test API server): the router's on the first subnet, or one given to the switch for it.
    fn server_address(&self) -> Result<Ipv4Addr> {
        let ip = self.shape.api_server_ip();
        if self.shape == Underlay::Switch {
            self.underlay
                .ip(&["addr", "add", &cidr(ip), "dev", SWITCH])?;
        }
        Ok(ip)
    }

    fn routes_pod_cidrs(&self) -> bool {
        matches!(
            self.shape,
            Underlay::Router {
                route_pod_cidrs: true
            }
        )
    }

    /// The bridges, the router's addresses and forwarding, and the world on the underlay.
    fn wire(&self) -> Result<()> {
        let (u, world) = (&self.underlay, self.world.netns.name());
        u.ip(&[
            "link", "add", "world", "type", "veth", "peer", "name", "eth0", "netns", world,
        ])?;
        match self.shape {
            Underlay::Switch => {
                u.ip(&["link", "add", SWITCH, "type", "bridge"])?;
                u.ip(&["link", "set", SWITCH, "up"])?;
                u.ip(&["link", "set", "world", "master", SWITCH, "up"])?;
            }
            Underlay::Router { .. } => {
                // A fresh namespace does not forward; the router is the one place that must.
                self.underlay
                    .run(|| fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
                    .map_err(Error::io("enabling forwarding in the underlay"))?;
                for (bridge, router_ip) in ROUTER_SUBNETS {
                    u.ip(&["link", "add", bridge, "type", "bridge"])?;
                    u.ip(&["addr", "add", &cidr(router_ip), "dev", bridge])?;
                    u.ip(&["link", "set", bridge, "up"])?;
                }
                u.ip(&["addr", "add", &cidr(ROUTER_WORLD_SIDE), "dev", "world"])?;
                u.ip(&["link", "set", "world", "up"])?;
            }
        }
        let w = &self.world.netns;
        w.ip(&["addr", "add", &cidr(self.world.ip), "dev", "eth0"])?;
        w.ip(&["link", "set", "eth0", "up"])?;
        if let Underlay::Router { .. } = self.shape {
            // The node subnets only: nothing for the pod CIDRs, like a host on the internet.
            for (_, router_ip) in ROUTER_SUBNETS {
                let [a, b, c, _] = router_ip.octets();
                let subnet = format!("{a}.{b}.{c}.0/{PREFIX_LEN}");
                w.ip(&[
                    "route",
                    "add",
                    &subnet,
                    "via",
                    &ROUTER_WORLD_SIDE.to_string(),
                ])?;
            }
        }
        Ok(())
    }
}

/// A pod added through [`Cluster::add_pod`]: the sandbox after its ADD, and its node.
pub struct ClusterPod {
    pod: Pod,
    node: usize,
}

impl ClusterPod {
    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// The index of the node it runs on.
    pub fn node(&self) -> usize {
        self.node
    }

    pub fn name(&self) -> &str {
        self.pod.name()
    }

    pub fn namespace(&self) -> &str {
        self.pod.sandbox().namespace()
    }
}

impl Host for ClusterPod {
    fn label(&self) -> String {
        format!("{} on node{}", self.pod.label(), self.node)
    }
    fn netns(&self) -> &Netns {
        self.pod.netns()
    }
    fn ip(&self) -> Ipv4Addr {
        self.pod.ip()
    }
}

/// A node that [`Cluster::add_node_timed`] added.
#[derive(Debug, Clone, Copy)]
pub struct JoinedNode {
    pub index: usize,
    /// When its Node object was shown to every agent (written to each cluster dir, or applied
    /// to the API server), as kubelet registering the node does.
    pub node_object_written: Instant,
    /// When its own agent reported ready (its first full sync is in its maps).
    pub agent_ready: Instant,
}

/// The cluster; dropping it stops every agent and removes every namespace it created.
pub struct Cluster {
    // Fields drop in this order: the nodes (their agents signalled all at once in `drop`)
    // before the API server they watch, and before the underlay their uplinks hang from.
    /// By index; `None` once the node left.
    nodes: Vec<Option<Node>>,
    server: Option<ApiServer>,
    /// What every agent sees, by file stem (see the module's documentation).
    state: Mutex<BTreeMap<String, Vec<Value>>>,
    network: Network,
    /// Node addresses by index, also of nodes that left.
    node_ips: Vec<Ipv4Addr>,
    run: RunPrefix,
    binaries: Binaries,
    source: AgentSource,
    agent_args: Vec<String>,
    echo_agent_logs_on_drop: bool,
}

impl Cluster {
    /// Builds the underlay and the world, creates and wires every node, writes the cluster
    /// state, then starts every agent side by side and waits until each is ready.
    pub fn start(run: &RunPrefix, spec: ClusterSpec) -> Result<Self> {
        if spec.nodes == 0 || spec.nodes > MAX_NODES {
            return Err(Error::Cluster(format!(
                "a cluster has 1 to {MAX_NODES} nodes, not {}",
                spec.nodes
            )));
        }
        let binaries = match spec.binaries {
            Some(b) => b,
            None => Binaries::from_env()?,
        };
        // Fail on a missing binary before creating anything.
        binaries.agent()?;
        binaries.plugin()?;
        let network = Network::build(run, spec.underlay)?;
        // From here on the cluster's own drop removes whatever was made when a step fails.
        let mut cluster = Self {
            nodes: Vec::new(),
            server: None,
            state: Mutex::new(BTreeMap::new()),
            network,
            node_ips: Vec::new(),
            run: run.clone(),
            binaries,
            source: spec.source,
            agent_args: spec.agent_args,
            echo_agent_logs_on_drop: spec.echo_agent_logs_on_drop,
        };
        if cluster.source == AgentSource::Kubernetes {
            cluster.server = Some(cluster.start_api_server()?);
        }
        cluster.put(
            &namespace_stem("default"),
            vec![namespace_object("default", &[])],
        )?;
        for index in 0..spec.nodes {
            cluster.create_node(index)?;
        }
        for index in 0..spec.nodes {
            cluster.put_node_object(index)?;
        }
        // Agents start in about half a second each, mostly waiting: side by side, not in turn.
        for node in cluster.nodes.iter_mut().flatten() {
            node.spawn_agent()?;
        }
        for node in cluster.nodes.iter_mut().flatten() {
            node.wait_until_ready(AGENT_READY_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// Node `index`. Panics when the cluster never had it or it left, like slice indexing.
    pub fn node(&self, index: usize) -> &Node {
        match self.nodes.get(index) {
            Some(Some(node)) => node,
            _ => panic!("{}", no_such_node(index)),
        }
    }

    /// Node `index`, e.g. to stop or restart its agent. Panics like [`Cluster::node`].
    pub fn node_mut(&mut self, index: usize) -> &mut Node {
        match self.nodes.get_mut(index) {
            Some(Some(node)) => node,
            _ => panic!("{}", no_such_node(index)),
        }
    }

    /// The indexes of the nodes in the cluster now.
    pub fn node_indexes(&self) -> Vec<usize> {
        self.live_nodes().map(|(index, _)| index).collect()
    }

    /// Node `index`'s InternalIP, also after it left. Panics when the cluster never had it.
    pub fn node_ip(&self, index: usize) -> Ipv4Addr {
        match self.node_ips.get(index) {
            Some(ip) => *ip,
            None => panic!("{}", no_such_node(index)),
        }
    }

    /// Node `index` as the underlay sees it: its namespace with its InternalIP (a [`Node`] as
    /// a [`Host`] is its pod gateway instead).
    pub fn node_on_underlay(&self, index: usize) -> NetnsHost<'_> {
        NetnsHost {
            netns: self.node(index).netns(),
            ip: self.node_ip(index),
        }
    }

    pub fn world(&self) -> &World {
        self.network.world()
    }

    /// The namespace playing the physical network (bridges, and the router's routes).
    pub fn underlay(&self) -> &Netns {
        self.network.underlay()
    }

    pub fn underlay_shape(&self) -> Underlay {
        self.network.shape()
    }

    /// The API server every agent watches, with [`AgentSource::Kubernetes`].
    pub fn api_server(&self) -> Option<&ApiServer> {
        self.server.as_ref()
    }

    /// Adds a pod to node `node` as Kubernetes does: the Pod object as the scheduler leaves it
    /// (labels, `spec.nodeName`) goes to every agent, the node's runtime runs ADD through the
    /// real plugin, then the object gets the status kubelet reports (`podIP`, `podIPs`,
    /// `hostIP`). The namespace's object is created, without labels, if the cluster has none.
    pub fn add_pod(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<ClusterPod> {
        let host = self.live_node(node)?;
        if !self.lock_state().contains_key(&namespace_stem(namespace)) {
            self.add_namespace(namespace, &[])?;
        }
        let stem = pod_stem(namespace, name);
        let mut object = pod_object(host.name(), namespace, name, labels, &[]);
        self.put(&stem, vec![object.clone()])?;
        let pod = match host.add_pod(namespace, name) {
            Ok(pod) => pod,
            Err(e) => {
                if let Err(cleanup) = self.remove(&stem) {
                    eprintln!("cleanup of pod {namespace}/{name}'s object: {cleanup}");
                }
                return Err(e);
            }
        };
        object["status"] = running_pod_status(pod.ip(), self.node_ip(node));
        self.put(&stem, vec![object])?;
        Ok(ClusterPod { pod, node })
    }

    /// DEL through the plugin on the pod's node (none when the node left), then its object
    /// goes from every agent's view; the sandbox goes with `pod`.
    pub fn delete_pod(&self, pod: ClusterPod) -> Result<()> {
        let stem = pod_stem(pod.namespace(), pod.name());
        let deleted = match self.nodes.get(pod.node) {
            Some(Some(node)) => node.delete_pod(pod.pod),
            _ => Ok(()),
        };
        let removed = self.remove(&stem);
        deleted.and(removed)
    }

    /// Gives a pod new labels in every agent's view, as `kubectl label` does.
    pub fn set_pod_labels(&self, pod: &ClusterPod, labels: &[(&str, &str)]) -> Result<()> {
        let stem = pod_stem(pod.namespace(), pod.name());
        let mut objects = self.lock_state().get(&stem).cloned().unwrap_or_default();
        for object in &mut objects {
            object["metadata"]["labels"] = labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        self.put(&stem, objects)
    }

    /// Takes a pod's object out of node `node`'s view only (directory source): that node's
    /// watch has not shown the pod yet, as happens for a moment with every new pod.
    pub fn forget_pod_on(&self, node: usize, pod: &ClusterPod) -> Result<()> {
        self.live_node(node)?
            .cluster()
            .remove(&pod_stem(pod.namespace(), pod.name()))
    }

    /// Creates or relabels a Namespace object.
    pub fn add_namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        self.put(&namespace_stem(name), vec![namespace_object(name, labels)])
    }

    /// Gives every agent `objects` (NetworkPolicies, ...) under `name`; applying the same name
    /// again replaces them (objects left out are deleted). Namespaces go through
    /// [`Cluster::add_namespace`], pods through [`Cluster::add_pod`].
    pub fn apply(&self, name: &str, objects: &[Value]) -> Result<()> {
        self.put(&applied_stem(name), objects.to_vec())
    }

    /// Deletes what [`Cluster::apply`] gave under `name`.
    pub fn remove_applied(&self, name: &str) -> Result<()> {
        self.remove(&applied_stem(name))
    }

    /// A node joins: created, wired, given the cluster state, its Node object shown to every
    /// agent, its agent started and ready. Returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        self.add_node_timed().map(|joined| joined.index)
    }

    /// [`Cluster::add_node`], saying when the steps that the rest of the cluster sees happened.
    pub fn add_node_timed(&mut self) -> Result<JoinedNode> {
        let index = self.nodes.len();
        self.create_node(index)?;
        let joined = self.put_node_object(index).and_then(|()| {
            let node_object_written = Instant::now();
            self.node_mut(index).start_agent()?;
            Ok(JoinedNode {
                index,
                node_object_written,
                agent_ready: Instant::now(),
            })
        });
        if joined.is_err()
            && let Err(cleanup) = self.remove_node(index)
        {
            eprintln!("cleanup of node{index}, which failed to join: {cleanup}");
        }
        joined
    }

    /// Node `index` changes its InternalIP to `ip` (on the same subnet), as when a machine gets
    /// a new address: its `eth0` and default route, the router's route to its pod CIDR, then its
    /// Node object in every agent's view. Its own agent keeps running.
    pub fn readdress_node(&mut self, index: usize, ip: Ipv4Addr) -> Result<()> {
        let old = self.node_ip(index);
        let (_, gateway) = self.network.shape().attachment(index);
        let pod_cidr = pod_cidr(index);
        let netns = self.live_node(index)?.netns();
        // Old first: removing a primary address takes its secondaries with it.
        netns.ip(&["addr", "del", &cidr(old), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &cidr(ip), "dev", "eth0"])?;
        netns.ip(&["route", "replace", "default", "via", &gateway.to_string()])?;
        if self.network.routes_pod_cidrs() {
            self.network
                .underlay()
                .ip(&["route", "replace", &pod_cidr, "via", &ip.to_string()])?;
        }
        self.announce_internal_ip(index, ip)
    }

    /// Node `index`'s Node object gives `ip` as its InternalIP from now on; unlike
    /// [`Cluster::readdress_node`], its devices are left as they are (the caller puts `ip` on
    /// its uplink, beside the old address or in its place, before or after).
    pub fn announce_internal_ip(&mut self, index: usize, ip: Ipv4Addr) -> Result<()> {
        self.live_node(index)?;
        self.node_ips[index] = ip;
        self.put_node_object(index)
    }

    /// A node leaves: its agent stops and its namespace goes, then its Node object and its
    /// pods' objects go from every other agent's view (as once the control plane gave up on
    /// it), and the underlay forgets it (its port, the route to its pod CIDR).
    pub fn remove_node(&mut self, index: usize) -> Result<()> {
        let Some(node) = self.nodes.get_mut(index).and_then(Option::take) else {
            return Err(Error::Cluster(no_such_node(index)));
        };
        let name = node.name().to_string();
        let pod_cidr = node.pod_cidr().to_string();
        drop(node);
        let its_pods: Vec<String> = self
            .lock_state()
            .iter()
            .filter(|(_, objects)| {
                objects
                    .iter()
                    .any(|o| o["kind"] == "Pod" && o["spec"]["nodeName"] == name.as_str())
            })
            .map(|(stem, _)| stem.clone())
            .collect();
        for stem in its_pods {
            self.remove(&stem)?;
        }
        self.remove(&node_stem(&name))?;
        self.network.unplug(index, &pod_cidr)
    }

    /// Waits until `done` holds for every node (in turn), for at most [`PROPAGATION_TIMEOUT`]
    /// in all; `what` says what was awaited in the error.
    pub fn wait_for_every_node(
        &self,
        what: &str,
        done: impl Fn(&Node) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + PROPAGATION_TIMEOUT;
        for (index, node) in self.live_nodes() {
            while !done(node)? {
                if Instant::now() >= deadline {
                    return Err(Error::Cluster(format!(
                        "node{index}: {what} did not happen within {PROPAGATION_TIMEOUT:?}"
                    )));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Waits until every node's pinned ipcache holds `ip` (a pod's or a node's address).
    pub fn wait_until_every_node_knows(&self, ip: Ipv4Addr) -> Result<()> {
        self.wait_for_every_node(&format!("learning {ip} (ipcache)"), |node| {
            Ok(ipcache_identity(node, ip)?.is_some())
        })
    }

    /// Waits until no node's pinned ipcache holds `ip` any more.
    pub fn wait_until_no_node_knows(&self, ip: Ipv4Addr) -> Result<()> {
        self.wait_for_every_node(&format!("forgetting {ip} (ipcache)"), |node| {
            Ok(ipcache_identity(node, ip)?.is_none())
        })
    }

    fn live_nodes(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| Some((index, node.as_ref()?)))
    }

    fn live_node(&self, index: usize) -> Result<&Node> {
        match self.nodes.get(index) {
            Some(Some(node)) => Ok(node),
            _ => Err(Error::Cluster(no_such_node(index))),
        }
    }

    fn start_api_server(&self) -> Result<ApiServer> {
        let ip = self.network.server_address()?;
        let listener = self
            .network
            .underlay()
            .run(|| TcpListener::bind((ip, 0)))?
            .map_err(Error::io(format!(
                "binding the test API server to {ip} in the underlay"
            )))?;
        ApiServer::serve(listener)
    }

    /// Node `index` with its namespace wired to the underlay and its source filled, its agent
    /// not started; it is in `self.nodes` (as `None` when a step failed).
    fn create_node(&mut self, index: usize) -> Result<()> {
        let ip = self.network.shape().node_ip(index)?;
        self.node_ips.push(ip);
        self.nodes.push(None);
        let mut spec = NodeSpec::new(node_name(index))
            .pod_cidr(pod_cidr(index))
            .source(self.source);
        spec.binaries = Some(self.binaries.clone());
        spec.echo_agent_log_on_drop = self.echo_agent_logs_on_drop;
        spec.agent_args = self.agent_args.clone();
        let node = Node::create(&self.run, spec)?;
        match &self.server {
            None => {
                let dir = node.cluster();
                // Node::create's own Node object has no addresses; this cluster's Node
                // objects are in node_<name>.yaml like every other object.
                dir.remove("node")?;
                for (stem, objects) in self.lock_state().iter() {
                    dir.write(stem, objects)?;
                }
            }
            Some(server) => server.write_kubeconfig(&node.kubeconfig())?,
        }
        self.wire(&node, index)?;
        self.nodes[index] = Some(node);
        Ok(())
    }

    /// The node plugged into the network; last, the route to its pod CIDR on the router, so
    /// that nothing else is left when a step fails.
    fn wire(&self, node: &Node, index: usize) -> Result<()> {
        let ip = self.network.plug(node.netns(), index)?;
        self.network.route_pod_cidr(node.pod_cidr(), ip)
    }

    fn put_node_object(&self, index: usize) -> Result<()> {
        let name = node_name(index);
        let object = node_object_at(&name, &pod_cidr(index), self.node_ip(index));
        self.put(&node_stem(&name), vec![object])
    }

    /// Shows `objects` to every agent under `stem`, in place of what it held.
    fn put(&self, stem: &str, objects: Vec<Value>) -> Result<()> {
        // Held while writing: writes of one stem never interleave (they share a temp file).
        let mut state = self.lock_state();
        match &self.server {
            None => {
                for (_, node) in self.live_nodes() {
                    node.cluster().write(stem, &objects)?;
                }
            }
            Some(server) => {
                for object in &objects {
                    server.apply(object.clone())?;
                }
                let previous = state.get(stem).into_iter().flatten();
                for stale in previous.filter(|old| !objects.iter().any(|o| same_object(o, old))) {
                    server.delete_object(stale)?;
                }
            }
        }
        state.insert(stem.to_string(), objects);
        Ok(())
    }

    /// Takes what `stem` held out of every agent's view.
    fn remove(&self, stem: &str) -> Result<()> {
        let mut state = self.lock_state();
        let Some(objects) = state.remove(stem) else {
            return Ok(());
        };
        match &self.server {
            None => {
                for (_, node) in self.live_nodes() {
                    node.cluster().remove(stem)?;
                }
            }
            Some(server) => {
                for object in &objects {
                    server.delete_object(object)?;
                }
            }
        }
        Ok(())
    }

    fn lock_state(&self) -> MutexGuard<'_, BTreeMap<String, Vec<Value>>> {
        // Every change to the map is one insert or remove: a panic elsewhere cannot leave it
        // half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every agent gets SIGTERM now, so that they stop side by side; each node's own drop
        // then waits for its agent.
        for (_, node) in self.live_nodes() {
            node.signal_agent_to_stop();
        }
    }
}

/// The identity `node`'s pinned ipcache holds for `ip`/32; `None`: no entry.
pub fn ipcache_identity(node: &Node, ip: Ipv4Addr) -> Result<Option<u32>> {
    let octets: Vec<Value> = ip.octets().iter().map(|o| (*o).into()).collect();
    Ok(node
        .dump_map("ipcache")?
        .iter()
        // bpftool puts the BTF-decoded entry under "formatted" when it also prints raw bytes.
        .map(|e| e.get("formatted").unwrap_or(e))
        .find(|e| {
            e["key"]["prefix_len"] == 32 && e["key"]["data"]["addr"].as_array() == Some(&octets)
        })
        .and_then(|e| e["value"]["identity"].as_u64())
        .and_then(|identity| u32::try_from(identity).ok()))
}

fn node_name(index: usize) -> String {
    format!("node{index}")
}

/// Node `index`'s pod CIDR; a benchmark's baselines give their nodes the same.
pub(crate) fn pod_cidr(index: usize) -> String {
    format!("10.244.{index}.0/24")
}

/// Node `index`'s end of its uplink pair, a bridge port in the underlay.
fn underlay_port(index: usize) -> String {
    format!("node{index}")
}

fn cidr(ip: Ipv4Addr) -> String {
    format!("{ip}/{PREFIX_LEN}")
}

fn no_such_node(index: usize) -> String {
    format!("the cluster has no node{index} (never added, or removed)")
}

fn node_stem(name: &str) -> String {
    format!("node_{name}")
}

fn namespace_stem(name: &str) -> String {
    format!("namespace_{name}")
}

fn pod_stem(namespace: &str, name: &str) -> String {
    format!("pod_{namespace}_{name}")
}

fn applied_stem(name: &str) -> String {
    format!("applied_{name}")
}

/// The same object for the API server: kind, namespace and name.
fn same_object(a: &Value, b: &Value) -> bool {
    let key = |o: &Value| {
        (
            o["apiVersion"].clone(),
            o["kind"].clone(),
            o["metadata"]["namespace"].clone(),
            o["metadata"]["name"].clone(),
        )
    };
    key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_nodes_alternate_between_the_two_subnets() {
        let router = Underlay::Router {
            route_pod_cidrs: false,
        };
        let ips: Vec<Ipv4Addr> = (0..3).map(|i| router.node_ip(i).unwrap()).collect();
        assert_eq!(
            ips,
            [
                Ipv4Addr::new(192, 168, 1, 10),
                Ipv4Addr::new(192, 168, 2, 11),
                Ipv4Addr::new(192, 168, 1, 12),
            ]
        );
        assert_eq!(
            router.attachment(1),
            ("subnet2", Ipv4Addr::new(192, 168, 2, 1))
        );
        assert_eq!(
            Underlay::Switch.node_ip(2).unwrap(),
            Ipv4Addr::new(192, 168, 100, 12)
        );
        assert_eq!(Underlay::Switch.attachment(7).1, SWITCH_WORLD);
    }

    #[test]
    fn node_addresses_end_at_max_nodes() {
        assert!(Underlay::Switch.node_ip(MAX_NODES - 1).is_ok());
        assert!(Underlay::Switch.node_ip(MAX_NODES).is_err());
        assert!(Underlay::Switch.node_ip(usize::MAX).is_err());
    }

    #[test]
    fn stems_of_different_pods_never_collide() {
        // `-` is in names, `_` is in none.
        assert_ne!(pod_stem("a-b", "c"), pod_stem("a", "b-c"));
    }

    #[test]
    fn objects_are_the_same_by_kind_namespace_and_name() {
        let a = pod_object("n", "ns", "p", &[("app", "x")], &[]);
        let relabelled = pod_object("n", "ns", "p", &[("app", "y")], &[]);
        let other = pod_object("n", "ns2", "p", &[], &[]);
        assert!(same_object(&a, &relabelled));
        assert!(!same_object(&a, &other));
        assert!(!same_object(&a, &namespace_object("p", &[])));
    }
}
