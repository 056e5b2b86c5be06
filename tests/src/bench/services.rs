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
//! on a kube-proxy node. Myelin's agent runs with `--kube-proxy-replacement` and the Services
//! and EndpointSlices in its cluster directory.

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
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay},
    netns::Netns,
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
        let svc_chain = format!("KUBE-SVC-{i:016X}");
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let comment = format!("default/{}:http", svc.name);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" \
             -m tcp --dport {SERVICE_PORT} -j {svc_chain}\n\
             -A {svc_chain} ! -s {CLUSTER_CIDR} -d {ip}/32 -p tcp -m comment --comment \
             \"{comment} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ",
            ip = svc.cluster_ip
        );
        let n = svc.backends.len();
        for (j, backend) in svc.backends.iter().enumerate() {
            let sep_chain = format!("KUBE-SEP-{i:012X}{j:04X}");
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
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
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
         \tchain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; }}"
    );
    let mut elements = Vec::with_capacity(services.len());
    for (i, svc) in services.iter().enumerate() {
        let svc_chain = format!("service-{i:08X}-default/{}/tcp/http", svc.name);
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

/// A client pod, backend pods with servers, and `count` Services on one node, translated by
/// one [`Proxy`].
pub struct ServicePath {
    proxy: Proxy,
    count: usize,
    /// Servers go before the pods they run in.
    servers: Vec<EchoServer>,
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
            servers: Vec::new(),
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
        let mut spec = ClusterSpec::new(1, Underlay::Switch).agent_args(&[
            "--routing-mode",
            "native",
            "--kube-proxy-replacement=true",
        ]);
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

    /// New connections per second to the frontend (connect, one byte each way, reset), client
    /// and servers on one CPU.
    pub fn connection_rate(&self, duration: Duration) -> Result<ConnectionRun> {
        tcp_crr_to(
            self.client(),
            &[self.frontend()],
            flow_cpu(0),
            duration,
            u64::MAX,
        )
    }

    /// Round trips per second of one connection to the frontend.
    pub fn request_response(&self, duration: Duration) -> Result<f64> {
        tcp_rr_to(self.client(), self.frontend(), flow_cpu(0), duration)
    }
}

/// `nft -f -` of `rules` in `node`.
fn nft_load(node: &Netns, rules: &str) -> Result<()> {
    let mut cmd = node.command("nft")?;
    cmd.args(["-f", "-"]);
    process::run_ok_with_input(cmd, rules.as_bytes(), RULES_TIMEOUT).map(drop)
}

/// The Services and their EndpointSlices into the cluster directory, [`SERVICES_PER_FILE`] per
/// file.
fn write_services(cluster: &Cluster, services: &[BenchService]) -> Result<()> {
    for (k, chunk) in services.chunks(SERVICES_PER_FILE).enumerate() {
        let objects: Vec<Value> = chunk
            .iter()
            .flat_map(|svc| {
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
            })
            .collect();
        cluster.apply(&format!("services-{k}"), &objects)?;
    }
    Ok(())
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
    fn the_nft_rules_map_every_service_and_pick_backends_by_numgen() {
        let services = service_set(2, &[Ipv4Addr::new(10, 244, 0, 5)]);
        let rules = kube_proxy_nft_rules(&services);
        assert_eq!(rules.matches(". tcp . 80 : goto service-").count(), 2);
        assert!(rules.contains("numgen random mod 1 vmap { 0 : goto endpoint-"));
        assert!(rules.contains(&format!("numgen random mod {BACKENDS} vmap")));
    }
}
