//! A pod reaching a ClusterIP: Myelin's translation in eBPF against kube-proxy's two
//! datapaths, written here in the shapes kube-proxy writes them (no kube-proxy binary is
//! available): its iptables mode (`KUBE-SERVICES` -> `KUBE-SVC-*` -> `KUBE-SEP-*` chains, a
//! `statistic` match per backend) and its nftables mode (one verdict map of every Service,
//! `numgen random` over the backends). Every variant is one node namespace on a switch
//! ([`Underlay::Switch`], node 0: 192.168.100.10, pods in 10.244.0.0/24) with a client pod and
//! [`BACKENDS`] backend pods on it, and the same `count` Services:
//!
//! - the measured Service, [`CLUSTER_IP`]:[`SERVICE_PORT`]/TCP -> the backend pods' port
//!   [`TARGET_PORT`], placed in the middle of the Service list (kube-proxy's `KUBE-SERVICES`
//!   chain is walked rule by rule; the middle is the average position);
//! - `count - 1` other Services with [`BACKENDS`] backends each at addresses no pod has, so that
//!   every datapath holds `count` Services of [`BACKENDS`] backends.
//!
//! The baselines' pods come from the reference `ptp` plugin (a default route via the node, the
//! node forwarding), so that every packet to a ClusterIP passes the node's netfilter hooks, as
//! on a kube-proxy node. Myelin's agent runs with `--kube-proxy-replacement` and watches the
//! Services and EndpointSlices in a test API server, as on a cluster.
//!
//! A backend change ([`ServicePath::backend_change`]) takes the measured Service from all its
//! endpoints to none or back, the way each proxy gets it: an EndpointSlice update in the API
//! server for Myelin; for the baselines, the rules kube-proxy writes for that change (its
//! iptables mode's partial sync, its nftables mode's transaction), loaded by the bench itself,
//! so their figures leave out kube-proxy's watch and its sync period.

use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    cni::BenchPod,
    cpus::flow_cpu,
    cross_node::{CLUSTER_CIDR, PtpNode},
    iptables,
    tcp::{ConnectionRun, EchoServer, tcp_crr_to, tcp_rr_to},
};
use crate::{
    Binaries, Error, Result, RunPrefix,
    cgroup::{ProcessInside, TestCgroup},
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay},
    netns::Netns,
    node::AgentSource,
    process,
    services::{Backend, Protocol, ServicePort, cluster_ip_service, endpoint_slice},
    traffic::Host,
};

/// The node's index in the network.
const NODE: usize = 0;
/// The measured Service's address.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// Backends of every Service; the measured Service's are real pods.
pub const BACKENDS: usize = 10;
/// Services per file of Myelin's cluster directory: far below the agent's object file limit
/// (16 MiB) at about 2 KB per Service and its EndpointSlice.
const SERVICES_PER_FILE: usize = 1_000;
/// How long the agent may take to have every Service in its maps.
const SERVICES_READY: Duration = Duration::from_secs(120);
const RULES_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a backend change may take to show in the datapath before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection attempt while waiting for a change: an answer or a refusal comes at once, so
/// this only bounds a packet lost on the way.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(50);
/// Between connection attempts while waiting for a change: the figures' resolution.
const POLL_PAUSE: Duration = Duration::from_millis(1);
/// kube-proxy's iptables mode through the legacy (x_tables) backend: it loads a ruleset as one
/// table blob, in seconds at 10,000 Services, where the nf_tables backend (this machine's
/// `iptables`) took more than a minute. Both evaluate the rules one by one.
const IPTABLES_RESTORE: &str = "iptables-legacy-restore";

const PORT: ServicePort<'static> = ServicePort {
    name: "http",
    protocol: Protocol::Tcp,
    port: SERVICE_PORT,
    target_port: TARGET_PORT,
};

/// What translates the pod's connections to the ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    KubeProxyIptables,
    KubeProxyNftables,
    Myelin,
}

/// One Service of the set: its address and its backends.
struct BenchService {
    name: String,
    cluster_ip: Ipv4Addr,
    backends: Vec<Ipv4Addr>,
}

/// `count` Services; the measured one, with `real_backends`, in the middle.
fn service_set(count: usize, real_backends: &[Ipv4Addr]) -> Vec<BenchService> {
    let measured = count / 2;
    (0..count)
        .map(|i| {
            if i == measured {
                return BenchService {
                    name: "measured".into(),
                    cluster_ip: CLUSTER_IP,
                    backends: real_backends.to_vec(),
                };
            }
            let n = u32::try_from(i).unwrap_or(u32::MAX);
            // 10.96.1.0 upwards: clear of CLUSTER_IP (10.96.0.10).
            let cluster_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + n);
            // 10.245.0.0/16 upwards: no pod has these addresses.
            let first = u32::from(Ipv4Addr::new(10, 245, 0, 0)) + n * BACKENDS as u32;
            BenchService {
                name: format!("svc-{i}"),
                cluster_ip,
                backends: (0..BACKENDS as u32)
                    .map(|j| Ipv4Addr::from(first + j))
                    .collect(),
            }
        })
        .collect()
}

/// kube-proxy's iptables mode for `services` (`iptables-restore` input), as
/// `pkg/proxy/iptables/proxier.go` writes it: the nat table's PREROUTING and OUTPUT jump to
/// `KUBE-SERVICES`, which holds one rule per Service port to its `KUBE-SVC-*` chain; that
/// chain marks traffic from outside the cluster CIDR for masquerading, then picks a backend
/// with `statistic --mode random` rules (probability 1/n, 1/(n-1), ..., the last
/// unconditional) that jump to `KUBE-SEP-*` chains, each marking hairpin traffic and DNATing.
fn kube_proxy_iptables_rules(services: &[BenchService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    // Services without endpoints are rejected in the filter table, as kube-proxy does.
    let _ = writeln!(
        chains,
        "*filter\n\
         :KUBE-SERVICES - [0:0]\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         COMMIT"
    );
    let _ = writeln!(chains, "*nat");
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully"
    );
    for (i, svc) in services.iter().enumerate() {
        rules.push_str(&kube_services_rule(i, svc));
    }
    for (i, svc) in services.iter().enumerate() {
        service_chains(i, svc, &mut chains, &mut rules);
    }
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// `KUBE-SVC-*` of the `i`th Service.
fn svc_chain(i: usize) -> String {
    format!("KUBE-SVC-{i:016X}")
}

/// `KUBE-SEP-*` of the `i`th Service's `j`th endpoint.
fn sep_chain(i: usize, j: usize) -> String {
    format!("KUBE-SEP-{i:012X}{j:04X}")
}

/// The `i`th Service's rule in the nat table's `KUBE-SERVICES` (none without endpoints).
fn kube_services_rule(i: usize, svc: &BenchService) -> String {
    if svc.backends.is_empty() {
        return String::new();
    }
    format!(
        "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"default/{name}:http cluster IP\" \
         -m tcp --dport {SERVICE_PORT} -j {chain}\n",
        ip = svc.cluster_ip,
        name = svc.name,
        chain = svc_chain(i)
    )
}

/// The `i`th Service's `KUBE-SVC-*` and `KUBE-SEP-*` chains: declarations into `chains`,
/// rules into `rules`.
fn service_chains(i: usize, svc: &BenchService, chains: &mut String, rules: &mut String) {
    let svc_chain = svc_chain(i);
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let comment = format!("default/{}:http", svc.name);
    let _ = writeln!(
        rules,
        "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {ip}/32 -p tcp -m comment --comment \
         \"{comment} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ",
        ip = svc.cluster_ip
    );
    let n = svc.backends.len();
    for (j, backend) in svc.backends.iter().enumerate() {
        let sep_chain = sep_chain(i, j);
        let _ = writeln!(chains, ":{sep_chain} - [0:0]");
        let to = format!("{backend}:{TARGET_PORT}");
        let statistic = if j + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / (n - j) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{comment} -> {to}\"{statistic} -j {sep_chain}\n\
             -A {sep_chain} -s {backend}/32 -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ\n\
             -A {sep_chain} -p tcp -m comment --comment \"{comment}\" -m tcp -j DNAT \
             --to-destination {to}"
        );
    }
}

/// What kube-proxy's iptables mode writes (`iptables-restore --noflush`, its partial sync)
/// when the `measured`th of `services` gets `backends` (all its endpoints or none): the
/// filter table's `KUBE-SERVICES` with a reject rule for a Service without endpoints, the nat
/// table's `KUBE-SERVICES` rewritten whole, and the Service's own chains rewritten, or
/// deleted with its endpoints'.
fn kube_proxy_iptables_change(
    services: &[BenchService],
    measured: usize,
    backends: &[Ipv4Addr],
) -> String {
    let svc = &services[measured];
    let changed = BenchService {
        name: svc.name.clone(),
        cluster_ip: svc.cluster_ip,
        backends: backends.to_vec(),
    };
    let mut text = String::from("*filter\n:KUBE-SERVICES - [0:0]\n");
    if backends.is_empty() {
        let _ = writeln!(
            text,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"default/{name}:http has no \
             endpoints\" -m tcp --dport {SERVICE_PORT} -j REJECT --reject-with icmp-port-unreachable",
            ip = changed.cluster_ip,
            name = changed.name
        );
    }
    text.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut chains = String::new();
    let mut rules = String::new();
    for (i, s) in services.iter().enumerate() {
        rules.push_str(&kube_services_rule(
            i,
            if i == measured { &changed } else { s },
        ));
    }
    // Every chain the Service ever had is declared (so flushed) first; those it no longer
    // needs are deleted after the rules that stopped jumping to them.
    let _ = writeln!(chains, ":{} - [0:0]", svc_chain(measured));
    for j in 0..svc.backends.len().max(backends.len()) {
        let _ = writeln!(chains, ":{} - [0:0]", sep_chain(measured, j));
    }
    let mut deletions = String::new();
    if backends.is_empty() {
        for j in 0..svc.backends.len() {
            let _ = writeln!(deletions, "-X {}", sep_chain(measured, j));
        }
        let _ = writeln!(deletions, "-X {}", svc_chain(measured));
    } else {
        let mut ignored = String::new();
        service_chains(measured, &changed, &mut ignored, &mut rules);
    }
    text.push_str(&chains);
    text.push_str(&rules);
    text.push_str(&deletions);
    text.push_str("COMMIT\n");
    text
}

/// kube-proxy's nftables mode for `services` (`nft -f` input), as
/// `pkg/proxy/nftables/proxier.go` writes it: one `kube-proxy` table whose `services` chain
/// looks the destination up in the `service-ips` verdict map (address . protocol . port), a
/// chain per Service port that marks traffic from outside the cluster CIDR and picks a backend
/// with `numgen random mod n` in a verdict map, and a chain per endpoint that DNATs.
fn kube_proxy_nft_rules(services: &[BenchService]) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "table ip kube-proxy {{\n\
         \tchain mark-for-masquerade {{ mark set mark or 0x4000; }}\n\
         \tchain masquerading {{\n\
         \t\tmark and 0x4000 == 0 return\n\
         \t\tmark set mark xor 0x4000\n\
         \t\tmasquerade fully-random\n\
         \t}}\n\
         \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}\n\
         \tchain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}\n\
         \tchain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; }}\n\
         \tchain reject-chain {{ reject; }}\n\
         \tmap no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tchain endpoints-check {{ ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }}\n\
         \tchain filter-forward {{ type filter hook forward priority -110; policy accept; ct state new jump endpoints-check; }}\n\
         \tchain filter-output {{ type filter hook output priority -110; policy accept; ct state new jump endpoints-check; }}"
    );
    let mut elements = Vec::with_capacity(services.len());
    for (i, svc) in services.iter().enumerate() {
        let svc_chain = nft_service_chain(i, svc);
        elements.push(format!(
            "{} . tcp . {SERVICE_PORT} : goto {svc_chain}",
            svc.cluster_ip
        ));
        let mut picks = Vec::with_capacity(svc.backends.len());
        for (j, backend) in svc.backends.iter().enumerate() {
            let ep_chain = format!(
                "endpoint-{i:08X}{j:04X}-default/{}/tcp/http__{backend}/{TARGET_PORT}",
                svc.name
            );
            let _ = writeln!(
                text,
                "\tchain {ep_chain} {{\n\
                 \t\tip saddr {backend} jump mark-for-masquerade\n\
                 \t\tmeta l4proto tcp dnat to {backend}:{TARGET_PORT}\n\
                 \t}}"
            );
            picks.push(format!("{j} : goto {ep_chain}"));
        }
        let _ = writeln!(
            text,
            "\tchain {svc_chain} {{\n\
             \t\tip daddr {ip} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
             \t\tnumgen random mod {n} vmap {{ {picks} }}\n\
             \t}}",
            ip = svc.cluster_ip,
            n = svc.backends.len(),
            picks = picks.join(", ")
        );
    }
    let _ = writeln!(
        text,
        "\tmap service-ips {{\n\
         \t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\
         \t\telements = {{ {} }}\n\
         \t}}\n\
         \tchain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; }}\n\
         }}",
        elements.join(",\n\t\t\t")
    );
    text
}

/// The chain of the `i`th Service in kube-proxy's nftables mode.
fn nft_service_chain(i: usize, svc: &BenchService) -> String {
    format!("service-{i:08X}-default/{}/tcp/http", svc.name)
}

/// What kube-proxy's nftables mode writes (`nft -f`, one transaction) when the `measured`th
/// of `services` loses all its endpoints (`serving` false: its `service-ips` element gives way
/// to one in `no-endpoint-services` that rejects) or gets them back (the other way round; its
/// chains stayed).
fn kube_proxy_nft_change(services: &[BenchService], measured: usize, serving: bool) -> String {
    let svc = &services[measured];
    let key = format!("{} . tcp . {SERVICE_PORT}", svc.cluster_ip);
    let to_service = format!("{key} : goto {}", nft_service_chain(measured, svc));
    let to_reject = format!("{key} : goto reject-chain");
    let (from, from_map, to, to_map) = if serving {
        (
            key.clone(),
            "no-endpoint-services",
            to_service,
            "service-ips",
        )
    } else {
        (
            key.clone(),
            "service-ips",
            to_reject,
            "no-endpoint-services",
        )
    };
    format!(
        "delete element ip kube-proxy {from_map} {{ {from} }}\n\
         add element ip kube-proxy {to_map} {{ {to} }}\n"
    )
}

/// A client pod, backend pods with servers, and `count` Services on one node, translated by
/// one [`Proxy`].
pub struct ServicePath {
    proxy: Proxy,
    count: usize,
    /// Every Service in the datapath, as first written; the measured one at `measured`.
    services: Vec<BenchService>,
    measured: usize,
    /// Servers go before the pods they run in.
    servers: Vec<EchoServer>,
    /// Measure Myelin with the harness in its `--cgroup-root` ([`Self::measure_in_cgroup`]).
    in_cgroup: bool,
    variant: Variant,
}

/// Fields drop in order: pods before their node, the node before the network.
enum Variant {
    Baseline {
        client: BenchPod,
        backends: Vec<BenchPod>,
        node: PtpNode,
    },
    Myelin {
        client: ClusterPod,
        backends: Vec<ClusterPod>,
        cluster: Box<Cluster>,
        /// The agent's `--cgroup-root`: the harness moves in while it measures, so that the
        /// client pod's sockets are translated at `connect()`, as on a node where the chart's
        /// default `cgroupRoot` holds the pods' processes.
        cgroup: TestCgroup,
    },
}

impl ServicePath {
    /// A network of its own with one node, `count` Services translated by `proxy`, and the
    /// pods. `binaries`: Myelin's, none for the harness's own ([`Binaries::from_env`]).
    pub fn build(
        run: &RunPrefix,
        proxy: Proxy,
        count: usize,
        binaries: Option<Binaries>,
    ) -> Result<Self> {
        let variant = match proxy {
            Proxy::KubeProxyIptables | Proxy::KubeProxyNftables => Self::baseline(run)?,
            Proxy::Myelin => Self::myelin(run, binaries)?,
        };
        let mut path = Self {
            proxy,
            count,
            services: Vec::new(),
            measured: 0,
            servers: Vec::new(),
            in_cgroup: false,
            variant,
        };
        let cpu = flow_cpu(0);
        let backends: Vec<&dyn Host> = path.backends();
        let servers = backends
            .iter()
            .map(|b| EchoServer::start(*b, TARGET_PORT, cpu))
            .collect::<Result<Vec<_>>>()?;
        let real: Vec<Ipv4Addr> = backends.iter().map(|b| b.ip()).collect();
        path.servers = servers;
        let services = service_set(count, &real);
        path.measured = services
            .iter()
            .position(|s| s.cluster_ip == CLUSTER_IP)
            .unwrap_or_default();
        match &path.variant {
            Variant::Baseline { node, .. } => match proxy {
                Proxy::KubeProxyIptables => iptables::restore_with(
                    IPTABLES_RESTORE,
                    node.node.netns(),
                    &kube_proxy_iptables_rules(&services),
                )?,
                _ => nft_load(node.node.netns(), &kube_proxy_nft_rules(&services))?,
            },
            Variant::Myelin { cluster, .. } => write_services(cluster, &services)?,
        }
        path.services = services;
        path.wait_until_translated()?;
        Ok(path)
    }

    fn baseline(run: &RunPrefix) -> Result<Variant> {
        let node = PtpNode::build(run, NODE)?;
        let client = node.add_pod(run, "client")?;
        let backends = (0..BACKENDS)
            .map(|i| node.add_pod(run, &format!("web-{i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Variant::Baseline {
            client,
            backends,
            node,
        })
    }

    fn myelin(run: &RunPrefix, binaries: Option<Binaries>) -> Result<Variant> {
        let cgroup = TestCgroup::create(run, "svc-bench")?;
        let root = cgroup.path().display().to_string();
        let mut spec = ClusterSpec::new(1, Underlay::Switch)
            .agent_args(&[
                "--routing-mode",
                "native",
                "--kube-proxy-replacement=true",
                "--cgroup-root",
                &root,
            ])
            .source(AgentSource::Kubernetes);
        spec.binaries = binaries;
        spec.echo_agent_logs_on_drop = false;
        let cluster = Box::new(Cluster::start(run, spec)?);
        let client = cluster.add_pod(NODE, "default", "client", &[("app", "client")])?;
        let backends = (0..BACKENDS)
            .map(|i| cluster.add_pod(NODE, "default", &format!("web-{i}"), &[("app", "web")]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Variant::Myelin {
            client,
            backends,
            cluster,
            cgroup,
        })
    }

    pub fn proxy(&self) -> Proxy {
        self.proxy
    }

    /// Services in the datapath.
    pub fn services(&self) -> usize {
        self.count
    }

    pub fn client(&self) -> &dyn Host {
        match &self.variant {
            Variant::Baseline { client, .. } => client,
            Variant::Myelin { client, .. } => client,
        }
    }

    fn backends(&self) -> Vec<&dyn Host> {
        match &self.variant {
            Variant::Baseline { backends, .. } => backends.iter().map(|b| b as &dyn Host).collect(),
            Variant::Myelin { backends, .. } => backends.iter().map(|b| b as &dyn Host).collect(),
        }
    }

    /// The node's namespace, where the translation happens.
    pub fn node_netns(&self) -> &Netns {
        match &self.variant {
            Variant::Baseline { node, .. } => node.node.netns(),
            Variant::Myelin { cluster, .. } => cluster.node(NODE).netns(),
        }
    }

    /// The agent's memory (VmRSS, VmHWM in KiB); `None` for the baselines.
    pub fn agent_memory_kib(&self) -> Result<Option<(u64, u64)>> {
        match &self.variant {
            Variant::Baseline { .. } => Ok(None),
            Variant::Myelin { cluster, .. } => cluster.node(NODE).agent_memory_kib().map(Some),
        }
    }

    /// The lines of the agent's log that say it was slow (an apply over its threshold, a turn
    /// that held everything else up); empty for the baselines.
    pub fn agent_slow_lines(&self) -> Vec<String> {
        match &self.variant {
            Variant::Baseline { .. } => Vec::new(),
            Variant::Myelin { cluster, .. } => cluster
                .node(NODE)
                .agent_log()
                .lines()
                .filter(|l| l.contains("was slow") || l.contains("was busy"))
                .map(str::to_string)
                .collect(),
        }
    }

    /// The measured frontend.
    pub fn frontend(&self) -> SocketAddrV4 {
        SocketAddrV4::new(CLUSTER_IP, SERVICE_PORT)
    }

    /// Waits until a connection to the frontend is answered: nothing listens on the ClusterIP,
    /// so only a translated connection is. Proves the variant translates before it is measured.
    fn wait_until_translated(&self) -> Result<()> {
        let deadline = Instant::now() + SERVICES_READY;
        let frontend = self.frontend();
        loop {
            let answered = self.client().netns().run(|| -> io::Result<()> {
                let mut stream =
                    TcpStream::connect_timeout(&frontend.into(), Duration::from_millis(500))?;
                stream.set_read_timeout(Some(Duration::from_millis(500)))?;
                stream.write_all(&[1])?;
                stream.read_exact(&mut [0u8; 1])
            })?;
            match answered {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(Error::Traffic {
                        what: format!(
                            "{:?} with {} Services: {} gets no answer from {frontend} after \
                             {SERVICES_READY:?}: {e}",
                            self.proxy,
                            self.count,
                            self.client().label()
                        ),
                    });
                }
            }
        }
    }

    /// Gives the measured Service all its endpoints (`serving`) or none, the way the proxy
    /// gets the change (see the module's documentation), and returns how long it took until
    /// the datapath used it: until a new connection to the frontend is answered (`serving`)
    /// or refused. The clock starts before the change is handed over.
    pub fn backend_change(&self, serving: bool) -> Result<Duration> {
        let backends: Vec<Ipv4Addr> = if serving {
            self.services[self.measured].backends.clone()
        } else {
            Vec::new()
        };
        let started = Instant::now();
        match &self.variant {
            Variant::Myelin { cluster, .. } => {
                let api = cluster.api_server().ok_or_else(|| Error::Traffic {
                    what: "Myelin's Services path has no API server".into(),
                })?;
                let node = cluster.node(NODE).name();
                let backends: Vec<Backend> = backends
                    .iter()
                    .map(|ip| Backend::ready(*ip, node))
                    .collect();
                let svc = &self.services[self.measured];
                api.apply(endpoint_slice(
                    "default",
                    &format!("{}-1", svc.name),
                    &svc.name,
                    &[PORT],
                    &backends,
                ))?;
            }
            Variant::Baseline { node, .. } => match self.proxy {
                Proxy::KubeProxyIptables => iptables::restore_with(
                    IPTABLES_RESTORE,
                    node.node.netns(),
                    &kube_proxy_iptables_change(&self.services, self.measured, &backends),
                )?,
                _ => nft_load(
                    node.node.netns(),
                    &kube_proxy_nft_change(&self.services, self.measured, serving),
                )?,
            },
        }
        self.wait_for(serving, started)?;
        Ok(started.elapsed())
    }

    /// Tries new connections to the frontend, one after the other, until one is answered
    /// (`serving`) or one fails.
    fn wait_for(&self, serving: bool, started: Instant) -> Result<()> {
        let frontend = self.frontend();
        let seen = self.client().netns().run(|| {
            loop {
                let answered = (|| -> io::Result<()> {
                    let mut stream = TcpStream::connect_timeout(&frontend.into(), ATTEMPT_TIMEOUT)?;
                    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
                    stream.write_all(&[1])?;
                    stream.read_exact(&mut [0u8; 1])
                })()
                .is_ok();
                if answered == serving {
                    return true;
                }
                if started.elapsed() > CHANGE_TIMEOUT {
                    return false;
                }
                // Leaves the CPUs to what carries the change out (on two CPUs a tight loop
                // here would slow the proxy it measures).
                std::thread::sleep(POLL_PAUSE);
            }
        })?;
        if seen {
            Ok(())
        } else {
            Err(Error::Traffic {
                what: format!(
                    "{:?} with {} Services: {frontend} still {} {CHANGE_TIMEOUT:?} after its \
                     endpoints changed",
                    self.proxy,
                    self.count,
                    if serving { "fails" } else { "answers" }
                ),
            })
        }
    }

    /// New connections per second to the frontend (connect, one byte each way, reset), client
    /// and servers on one CPU.
    pub fn connection_rate(&self, duration: Duration) -> Result<ConnectionRun> {
        let before = self.per_packet_translations()?;
        let inside = self.socket_lb()?;
        let run = tcp_crr_to(
            self.client(),
            &[self.frontend()],
            flow_cpu(0),
            duration,
            u64::MAX,
        )?;
        drop(inside);
        // Measured at the socket means no connection went through the per-packet path.
        if self.in_cgroup
            && let (Some(before), Some(after)) = (before, self.per_packet_translations()?)
            && after > before
        {
            return Err(Error::Traffic {
                what: format!(
                    "Myelin's client was to be translated at connect(), but {} of its {} \
                     connections were translated per packet (lb_flows entries)",
                    (after - before) / 2,
                    run.connections
                ),
            });
        }
        Ok(run)
    }

    /// Myelin's: the entries of `lb_flows` (two per connection translated per packet).
    fn per_packet_translations(&self) -> Result<Option<usize>> {
        match &self.variant {
            Variant::Myelin { cluster, .. } if self.in_cgroup => {
                Ok(Some(cluster.node(NODE).dump_map("lb_flows")?.len()))
            }
            _ => Ok(None),
        }
    }

    /// Round trips per second of one connection to the frontend.
    pub fn request_response(&self, duration: Duration) -> Result<f64> {
        let _inside = self.socket_lb()?;
        tcp_rr_to(self.client(), self.frontend(), flow_cpu(0), duration)
    }

    /// Measures Myelin's connections with the whole harness process moved into the agent's
    /// `--cgroup-root`, so that the client pod's sockets are translated at `connect()`
    /// (socket-level load balancing, as on a node with the chart's default `cgroupRoot`);
    /// otherwise they are translated per packet. Only for a harness that starts no process
    /// while it measures (the bench): a child started meanwhile would be born in the cgroup,
    /// which is emptied (its processes killed) when the path drops. Not for `cargo test`,
    /// whose tests share the process.
    pub fn measure_in_cgroup(&mut self, on: bool) {
        self.in_cgroup = on;
    }

    /// With [`Self::measure_in_cgroup`], Myelin's: the harness in the agent's `--cgroup-root`
    /// until the guard drops.
    fn socket_lb(&self) -> Result<Option<ProcessInside<'_>>> {
        match &self.variant {
            Variant::Myelin { cgroup, .. } if self.in_cgroup => {
                cgroup.move_this_process_in().map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// `nft -f -` of `rules` in `node`.
fn nft_load(node: &Netns, rules: &str) -> Result<()> {
    let mut cmd = node.command("nft")?;
    cmd.args(["-f", "-"]);
    process::run_ok_with_input(cmd, rules.as_bytes(), RULES_TIMEOUT).map(drop)
}

/// The Services and their EndpointSlices into the API server (all at once), or into the cluster
/// directory, [`SERVICES_PER_FILE`] per file.
fn write_services(cluster: &Cluster, services: &[BenchService]) -> Result<()> {
    if let Some(api) = cluster.api_server() {
        return api.store_all(
            services
                .iter()
                .flat_map(|svc| service_objects(cluster, svc)),
        );
    }
    for (k, chunk) in services.chunks(SERVICES_PER_FILE).enumerate() {
        let objects: Vec<Value> = chunk
            .iter()
            .flat_map(|svc| service_objects(cluster, svc))
            .collect();
        cluster.apply(&format!("services-{k}"), &objects)?;
    }
    Ok(())
}

/// A Service and its EndpointSlice, every backend ready on the node.
fn service_objects(cluster: &Cluster, svc: &BenchService) -> [Value; 2] {
    let backends: Vec<Backend> = svc
        .backends
        .iter()
        .map(|ip| Backend::ready(*ip, cluster.node(NODE).name()))
        .collect();
    [
        cluster_ip_service("default", &svc.name, svc.cluster_ip, &[PORT], json!({})),
        endpoint_slice(
            "default",
            &format!("{}-1", svc.name),
            &svc.name,
            &[PORT],
            &backends,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root_test;

    /// Builds `proxy`'s path with a few Services (building waits until the ClusterIP answers)
    /// and carries both kinds of traffic through it.
    fn translates(proxy: Proxy) -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let path = ServicePath::build(&run, proxy, 5, None)?;
        let rate = path.connection_rate(Duration::from_millis(300))?;
        assert!(rate.rate() > 10.0, "{proxy:?}: {rate:?}");
        let rr = path.request_response(Duration::from_millis(300))?;
        assert!(rr > 100.0, "{proxy:?}: {rr} round trips/s");
        // Endpoints gone, then back: refused, then answered again (each wait fails otherwise).
        for serving in [false, true, false, true] {
            let took = path.backend_change(serving)?;
            assert!(took < CHANGE_TIMEOUT, "{proxy:?}: {took:?}");
        }
        Ok(())
    }

    #[test]
    fn kube_proxys_iptables_rules_translate_a_cluster_ip() -> Result<()> {
        translates(Proxy::KubeProxyIptables)
    }

    #[test]
    fn kube_proxys_nftables_rules_translate_a_cluster_ip() -> Result<()> {
        translates(Proxy::KubeProxyNftables)
    }

    #[test]
    fn myelin_translates_a_cluster_ip() -> Result<()> {
        translates(Proxy::Myelin)
    }

    #[test]
    fn the_iptables_rules_walk_every_service_and_pick_backends_with_falling_odds() {
        let services = service_set(
            3,
            &[Ipv4Addr::new(10, 244, 0, 5), Ipv4Addr::new(10, 244, 0, 6)],
        );
        assert_eq!(services[1].cluster_ip, CLUSTER_IP);
        let rules = kube_proxy_iptables_rules(&services);
        assert_eq!(rules.matches("-A KUBE-SERVICES -d").count(), 3);
        assert!(rules.contains("--probability 0.50000000000 -j KUBE-SEP-000000000001"));
        assert!(rules.contains("--to-destination 10.244.0.6:8080"));
        assert_eq!(
            rules.matches("--mode random").count(),
            2 * (BACKENDS - 1) + 1
        );
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn kube_proxys_iptables_change_rewrites_kube_services_and_the_services_chains() {
        let real = [Ipv4Addr::new(10, 244, 0, 5), Ipv4Addr::new(10, 244, 0, 6)];
        let services = service_set(3, &real);
        let none = kube_proxy_iptables_change(&services, 1, &[]);
        assert_eq!(none.matches("-A KUBE-SERVICES -d").count(), 3, "{none}");
        assert!(none.contains("has no endpoints\" -m tcp --dport 80 -j REJECT"));
        assert!(none.contains("-X KUBE-SEP-0000000000010001\n-X KUBE-SVC-0000000000000001\n"));
        let back = kube_proxy_iptables_change(&services, 1, &real);
        assert!(!back.contains("REJECT") && !back.contains("-X "));
        assert!(back.contains("--to-destination 10.244.0.6:8080"));
        assert!(
            !back.contains("10.245.0.0:8080"),
            "only the measured Service's chains"
        );
    }

    #[test]
    fn kube_proxys_nft_change_moves_the_service_between_maps() {
        let services = service_set(3, &[Ipv4Addr::new(10, 244, 0, 5)]);
        let none = kube_proxy_nft_change(&services, 1, false);
        assert!(
            none.starts_with("delete element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 }")
        );
        assert!(
            none.contains("no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }")
        );
        let back = kube_proxy_nft_change(&services, 1, true);
        assert!(back.contains("service-ips { 10.96.0.10 . tcp . 80 : goto service-00000001-"));
    }

    #[test]
    fn the_nft_rules_map_every_service_and_pick_backends_by_numgen() {
        let services = service_set(2, &[Ipv4Addr::new(10, 244, 0, 5)]);
        let rules = kube_proxy_nft_rules(&services);
        assert_eq!(rules.matches(". tcp . 80 : goto service-").count(), 2);
        assert!(rules.contains("numgen random mod 1 vmap { 0 : goto endpoint-"));
        assert!(rules.contains(&format!("numgen random mod {BACKENDS} vmap")));
    }
}
