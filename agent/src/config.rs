//! `myelin-agent`'s flags. Every flag can also be set from the environment as
//! `MYELIN_<FLAG>` (e.g. `MYELIN_NODE_NAME`), which is how the DaemonSet configures it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use ipnet::Ipv4Net;

use myelin_common::maglev::MAGLEV_TABLE_SIZES;

pub use crate::desired::services::maglev::LbAlgorithm;
use crate::{
    datapath::{AttachMode, nat::NatPorts},
    source::SourceSpec,
};

/// `--routing-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingMode {
    /// VXLAN in collect-metadata mode (`myelin_vxlan`), the sender's identity in the VNI.
    Tunnel,
    /// Plain IP through the uplink (`bpf_fib_lookup` + `bpf_redirect_neigh`).
    Native,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "myelin-agent",
    version,
    about = "Myelin node agent: IPAM, eBPF datapath and cluster state for the pods of one node"
)]
pub struct AgentConfig {
    /// Name of this node (its Kubernetes Node object). Default: the host name.
    #[arg(long, env = "MYELIN_NODE_NAME")]
    pub node_name: Option<String>,

    /// Where IPAM allocations and endpoints are persisted.
    #[arg(long, env = "MYELIN_STATE_DIR", default_value = "/var/lib/myelin")]
    pub state_dir: PathBuf,

    /// A BPF filesystem (mounted there if it is not one); maps and links are pinned under
    /// `<bpffs>/myelin/`.
    #[arg(long, env = "MYELIN_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// The local API socket (the CNI plugin's `agentSocket`).
    #[arg(long, env = "MYELIN_SOCKET", default_value = myelin_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Cluster state: `kubernetes` (watch the API server) or `dir:<path>` (YAML files).
    #[arg(long, env = "MYELIN_SOURCE", default_value = "kubernetes")]
    pub source: SourceSpec,

    /// Kubeconfig for `--source kubernetes`. Default: the in-cluster service account, or
    /// $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "MYELIN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The node's pod CIDR. Directory source only (default: the Node object's spec.podCIDR);
    /// with the Kubernetes source the Node object is authoritative.
    #[arg(long, env = "MYELIN_POD_CIDR")]
    pub pod_cidr: Option<Ipv4Net>,

    /// Health (`/healthz`, `/readyz`) and Prometheus (`/metrics`) endpoint; `off` disables it.
    #[arg(long, env = "MYELIN_METRICS_ADDR", default_value = "0.0.0.0:9962")]
    pub metrics_addr: MetricsAddr,

    /// Capacity of the endpoint maps: the most pods this node can run.
    #[arg(long, env = "MYELIN_MAX_ENDPOINTS", default_value_t = myelin_common::maps::DEFAULT_MAX_ENDPOINTS)]
    pub max_endpoints: u32,

    /// Capacity of the ipcache: pod and node addresses of the whole cluster, plus policy CIDRs.
    #[arg(long, env = "MYELIN_MAX_IPCACHE", default_value_t = myelin_common::maps::DEFAULT_MAX_IPCACHE)]
    pub max_ipcache: u32,

    /// Capacity of the policy map (entries: endpoint x peer identity x port block). A pod whose
    /// entries do not fit has its new connections dropped (reason policy-incomplete).
    #[arg(long, env = "MYELIN_MAX_POLICY_ENTRIES", default_value_t = myelin_common::maps::DEFAULT_MAX_POLICY)]
    pub max_policy_entries: u32,

    /// Capacity of the conntrack table (least recently used flows are evicted when full).
    #[arg(long, env = "MYELIN_MAX_CONNTRACK", default_value_t = myelin_common::maps::DEFAULT_MAX_CONNTRACK)]
    pub max_conntrack: u32,

    /// Capacity of the NAT table: two entries per masqueraded flow (least recently used flows
    /// are evicted when full).
    #[arg(long, env = "MYELIN_MAX_NAT", default_value_t = myelin_common::maps::DEFAULT_MAX_NAT)]
    pub max_nat: u32,

    /// Capacity of the Services table (`lb_services`): one slot per frontend (a Service's
    /// address, port and protocol) plus one per backend of it.
    #[arg(long, env = "MYELIN_MAX_LB_SLOTS", default_value_t = myelin_common::maps::DEFAULT_MAX_LB_SLOTS)]
    pub max_lb_slots: u32,

    /// Capacity of the table of Service connections (`lb_flows`): two entries per connection
    /// translated to a backend (least recently used connections are evicted when full). Also
    /// the capacity of `lb_reverse_sk`, one entry per socket the socket programs translated
    /// (`--cgroup-root`).
    #[arg(long, env = "MYELIN_MAX_LB_FLOWS", default_value_t = myelin_common::maps::DEFAULT_MAX_LB_FLOWS)]
    pub max_lb_flows: u32,

    /// Capacity of the session affinity table (`lb_affinity`): one entry per client and
    /// frontend with `sessionAffinity: ClientIP` (least recently used evicted when full).
    #[arg(long, env = "MYELIN_MAX_LB_AFFINITY", default_value_t = myelin_common::maps::DEFAULT_MAX_LB_AFFINITY)]
    pub max_lb_affinity: u32,

    /// How programs are attached to pod interfaces (see `AttachMode` for why tc is the
    /// default).
    #[arg(long, env = "MYELIN_ATTACH_MODE", value_enum, default_value = "tc")]
    pub attach_mode: AttachMode,

    /// Grace period after which the agent releases what nothing claims, and how often it looks:
    /// an address allocated without an endpoint (a plugin killed or timed out between its two
    /// calls), an endpoint whose veth vanished without a CNI DEL, a Myelin veth no endpoint
    /// claims. Must exceed the time one ADD takes. `ms`, `s`, `m` or `h`.
    #[arg(long, env = "MYELIN_ENDPOINT_GC_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub endpoint_gc_interval: Duration,

    /// How often expired conntrack entries are removed (the LRU map also evicts the least
    /// recently used when full). The walk runs on a thread of its own and paces itself.
    #[arg(long, env = "MYELIN_CONNTRACK_GC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub conntrack_gc_interval: Duration,

    /// Datapath events the agent keeps for `myelinctl flows` (the latest ones). With a
    /// buffer the datapath reports events all the time (within `--flow-events-rate`); 0 turns
    /// the buffer off, and events are then reported only while `myelinctl monitor` runs.
    #[arg(long, env = "MYELIN_FLOW_BUFFER", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub flow_buffer: u32,

    /// Events each CPU's datapath may report per second; beyond it they are counted as lost
    /// (`myelinctl flows`, `myelin_flow_events_lost_total`), never queued. 0: no limit.
    #[arg(long, env = "MYELIN_FLOW_EVENTS_RATE", default_value_t = 1000)]
    pub flow_events_rate: u32,

    /// Largest file the directory source reads: a byte count, or one with a binary suffix
    /// (`512Ki`, `16Mi`, `1Gi`). A larger file is reported and ignored, its last good objects
    /// stay in force. While a file is parsed it can take up to about 90 times its size in
    /// memory (one huge document; a file of many small documents takes a few times its size).
    #[arg(long, env = "MYELIN_MAX_OBJECT_FILE_SIZE", default_value = "16Mi", value_parser = parse_byte_size)]
    pub max_object_file_size: u64,

    /// How pods on other nodes are reached: `tunnel` (VXLAN, over any IP underlay) or `native`
    /// (unencapsulated through the uplink: the nodes share an L2 segment, or the underlay
    /// routes the pod CIDRs).
    #[arg(
        long,
        env = "MYELIN_ROUTING_MODE",
        value_enum,
        default_value = "tunnel"
    )]
    pub routing_mode: RoutingMode,

    /// UDP port of the VXLAN tunnel (tunnel mode); the same on every node.
    #[arg(long, env = "MYELIN_TUNNEL_PORT", default_value_t = 8472)]
    pub tunnel_port: u16,

    /// The device through which traffic leaves the node for other nodes and the outside.
    /// Default: the device holding the node's InternalIP (from its Node object).
    #[arg(long, env = "MYELIN_UPLINK")]
    pub uplink: Option<String>,

    /// Source-NAT pod traffic to destinations outside the cluster to the node's InternalIP,
    /// in eBPF on the uplink (no iptables). `true` or `false`.
    #[arg(long, env = "MYELIN_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    pub masquerade: bool,

    /// Destinations pods reach with their own address, in addition to the cluster's pod CIDRs
    /// and node addresses (which are never masqueraded). Comma-separated CIDRs.
    #[arg(long, env = "MYELIN_NON_MASQUERADE_CIDRS", value_delimiter = ',')]
    pub non_masquerade_cidrs: Vec<Ipv4Net>,

    /// Source ports masquerading hands out, `MIN-MAX`. Default: above the node's
    /// `net.ipv4.ip_local_port_range` (61000-65535 with Linux's default), which the node never
    /// picks for its own connections.
    #[arg(long, env = "MYELIN_NAT_PORT_RANGE")]
    pub nat_port_range: Option<NatPorts>,

    /// Translate Services in eBPF instead of leaving them to kube-proxy: the agent watches
    /// Services and EndpointSlices and gives the datapath every Service's frontends and
    /// backends. `false` (the default): traffic to Services goes through the node's stack and
    /// kube-proxy, as without this flag. `true` or `false`.
    #[arg(long, env = "MYELIN_KUBE_PROXY_REPLACEMENT", default_value_t = false, action = clap::ArgAction::Set)]
    pub kube_proxy_replacement: bool,

    /// Socket-level load balancing (with `--kube-proxy-replacement`): a cgroup v2 directory
    /// (the host's cgroup2 mount, or a cgroup below it) to which the agent attaches programs
    /// that translate a Service's address to a backend at `connect()` and `sendmsg()` for the
    /// sockets of the node's network namespace (the node's processes, host-network pods) in
    /// that cgroup, so their connections pay nothing per packet. Unset (the default): no
    /// socket programs, and those an earlier agent attached are detached.
    #[arg(long, env = "MYELIN_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// How a new connection's backend is chosen (needs `--kube-proxy-replacement`). `random`
    /// (the default): a random backend. `maglev`: on frontends reached from outside the cluster
    /// (node ports, external IPs, load balancers' addresses), Maglev consistent hashing of the
    /// client's address and port, the frontend's port and the protocol, so that every node
    /// sends the same client connection to the same backend, and removing a backend moves only
    /// (nearly) the connections that were on it. ClusterIPs stay random.
    #[arg(
        long,
        env = "MYELIN_LB_ALGORITHM",
        value_enum,
        default_value = "random"
    )]
    pub lb_algorithm: LbAlgorithm,

    /// Entries of each Maglev lookup table (M), one of 251, 509, 1021, 2039, 4093, 8191, 16381
    /// (primes). A backend's share of the flows is within about N/M of even (N backends): keep
    /// M above 100 x N. Every table takes 32 KiB in the kernel whatever M is, so the default is
    /// the largest.
    #[arg(long, env = "MYELIN_LB_MAGLEV_TABLE_SIZE", default_value_t = myelin_common::maglev::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = parse_maglev_table_size)]
    pub lb_maglev_table_size: u32,

    /// Capacity of the Maglev table map (`lb_maglev`): one table per frontend reached from
    /// outside (a Service port's node port, each external IP and load balancer address), 32 KiB
    /// each, allocated only as tables are written. A frontend whose table does not fit chooses
    /// at random.
    #[arg(long, env = "MYELIN_MAX_LB_MAGLEV", default_value_t = myelin_common::maps::DEFAULT_MAX_LB_MAGLEV)]
    pub max_lb_maglev: u32,

    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive).
    #[arg(long, env = "MYELIN_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// `--metrics-addr`: an `address:port`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{s:?} is not an address:port ({e}); use `off` to disable"))
    }
}

/// One of [`MAGLEV_TABLE_SIZES`].
pub fn parse_maglev_table_size(s: &str) -> Result<u32, String> {
    let allowed = || {
        MAGLEV_TABLE_SIZES
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    s.parse::<u32>()
        .ok()
        .filter(|m| MAGLEV_TABLE_SIZES.contains(m))
        .ok_or_else(|| {
            format!(
                "{s:?} is not a Maglev table size: use one of {} (primes)",
                allowed()
            )
        })
}

/// Flags that parse but do not go together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--lb-algorithm maglev needs --kube-proxy-replacement=true: without it, Services are \
         left to kube-proxy and Myelin chooses no backend"
    )]
    MaglevWithoutServices,
}

/// `500ms`, `30s`, `1m`, `2h`: a whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use a number and ms, s, m or h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(d)
}

/// `1048576`, `512Ki`, `16Mi`, `1Gi`: a whole number of bytes, or of binary units.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)]
        .into_iter()
        .find_map(|(suffix, unit)| s.strip_suffix(suffix).map(|d| (d, unit)))
        .unwrap_or((s, 1));
    digits
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            format!("{s:?} is not a size: use a positive byte count, or one with Ki, Mi or Gi")
        })
}

impl AgentConfig {
    /// What the flags cannot say on their own: combinations that make no sense.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.lb_algorithm == LbAlgorithm::Maglev && !self.kube_proxy_replacement {
            return Err(ConfigError::MaglevWithoutServices);
        }
        Ok(())
    }

    pub fn limits(&self) -> crate::datapath::Limits {
        crate::datapath::Limits {
            endpoints: self.max_endpoints,
            ipcache: self.max_ipcache,
            policy: self.max_policy_entries,
            conntrack: self.max_conntrack,
            nat: self.max_nat,
            lb_slots: self.max_lb_slots,
            lb_flows: self.max_lb_flows,
            lb_affinity: self.max_lb_affinity,
            lb_maglev: self.max_lb_maglev,
        }
    }

    pub fn features(&self) -> crate::datapath::Features {
        crate::datapath::Features {
            services: self.kube_proxy_replacement,
        }
    }

    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn defaults_match_the_documented_interface() {
        let c = AgentConfig::try_parse_from(["myelin-agent"]).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/myelin"));
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf"));
        assert_eq!(c.socket, PathBuf::from("/run/myelin/agent.sock"));
        assert_eq!(c.source, SourceSpec::Kubernetes);
        assert_eq!(c.metrics_addr.0, Some("0.0.0.0:9962".parse().unwrap()));
        assert_eq!(c.attach_mode, AttachMode::Tc);
        assert_eq!(c.kubeconfig, None);
        assert_eq!(c.endpoint_gc_interval, Duration::from_secs(60));
        assert_eq!(c.routing_mode, RoutingMode::Tunnel);
        assert_eq!(c.tunnel_port, 8472);
        assert!(c.masquerade);
        assert!(c.non_masquerade_cidrs.is_empty());
        assert_eq!(c.nat_port_range, None);
        assert_eq!(c.max_nat, 131_072);
        assert_eq!(
            (c.max_lb_slots, c.max_lb_flows, c.max_lb_affinity),
            (131_072, 131_072, 65_536)
        );
        assert_eq!(c.uplink, None);
        assert_eq!(c.max_object_file_size, 16 << 20);
        assert!(!c.kube_proxy_replacement, "Services are left to kube-proxy");
        assert_eq!(c.cgroup_root, None, "no socket-level load balancing");
        assert_eq!((c.flow_buffer, c.flow_events_rate), (4096, 1000));
        assert_eq!(c.lb_algorithm, LbAlgorithm::Random);
        assert_eq!((c.lb_maglev_table_size, c.max_lb_maglev), (16_381, 4096));
        assert_eq!(c.check(), Ok(()));
    }

    #[test]
    fn maglev_takes_a_prime_table_size_and_needs_kube_proxy_replacement() {
        let c = AgentConfig::try_parse_from([
            "myelin-agent",
            "--kube-proxy-replacement=true",
            "--lb-algorithm",
            "maglev",
            "--lb-maglev-table-size",
            "1021",
        ])
        .unwrap();
        assert_eq!(
            (c.lb_algorithm, c.lb_maglev_table_size),
            (LbAlgorithm::Maglev, 1021)
        );
        assert_eq!(c.check(), Ok(()));
        for bad in ["1000", "1024", "0", "65521", "x", "", "16381 "] {
            let flag = format!("--lb-maglev-table-size={bad}");
            let e = AgentConfig::try_parse_from(["myelin-agent", flag.as_str()])
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains("251, 509, 1021, 2039, 4093, 8191, 16381"),
                "{bad:?}: {e}"
            );
        }
        assert!(AgentConfig::try_parse_from(["myelin-agent", "--lb-algorithm", "hash"]).is_err());
        let alone =
            AgentConfig::try_parse_from(["myelin-agent", "--lb-algorithm", "maglev"]).unwrap();
        assert_eq!(alone.check(), Err(ConfigError::MaglevWithoutServices));
        let env = |id: &str| {
            AgentConfig::command()
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env("lb_algorithm").as_deref(), Some("MYELIN_LB_ALGORITHM"));
        assert_eq!(
            env("lb_maglev_table_size").as_deref(),
            Some("MYELIN_LB_MAGLEV_TABLE_SIZE")
        );
        assert_eq!(
            env("max_lb_maglev").as_deref(),
            Some("MYELIN_MAX_LB_MAGLEV")
        );
    }

    #[test]
    fn kube_proxy_replacement_is_a_flag_and_an_env_var() {
        let on = AgentConfig::try_parse_from(["myelin-agent", "--kube-proxy-replacement", "true"])
            .unwrap();
        assert!(on.kube_proxy_replacement);
        let off = AgentConfig::try_parse_from(["myelin-agent", "--kube-proxy-replacement=false"])
            .unwrap();
        assert!(!off.kube_proxy_replacement);
        assert!(
            AgentConfig::try_parse_from(["myelin-agent", "--kube-proxy-replacement", "yes"])
                .is_err()
        );
        let env = AgentConfig::command()
            .get_arguments()
            .find(|a| a.get_id() == "kube_proxy_replacement")
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned());
        assert_eq!(env.as_deref(), Some("MYELIN_KUBE_PROXY_REPLACEMENT"));
    }

    #[test]
    fn cgroup_root_is_a_path_flag_and_an_env_var() {
        let c = AgentConfig::try_parse_from(["myelin-agent", "--cgroup-root", "/sys/fs/cgroup"])
            .unwrap();
        assert_eq!(c.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup")));
        let env = AgentConfig::command()
            .get_arguments()
            .find(|a| a.get_id() == "cgroup_root")
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned());
        assert_eq!(env.as_deref(), Some("MYELIN_CGROUP_ROOT"));
    }

    #[test]
    fn durations_need_a_unit_and_must_not_be_zero() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "60", "1.5s", "-1s", "0s", "1d", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_byte_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_byte_size("512Ki"), Ok(512 << 10));
        assert_eq!(parse_byte_size("16Mi"), Ok(16 << 20));
        assert_eq!(parse_byte_size("1Gi"), Ok(1 << 30));
        for bad in [
            "",
            "0",
            "Mi",
            "16M",
            "16MB",
            "1.5Mi",
            "-1",
            " 16Mi",
            "99999999999Gi",
        ] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_parse_and_bad_values_are_rejected() {
        let c = AgentConfig::try_parse_from([
            "myelin-agent",
            "--source",
            "dir:/tmp/c",
            "--pod-cidr",
            "10.1.0.0/24",
            "--metrics-addr",
            "off",
            "--kubeconfig",
            "/etc/myelin/kubeconfig",
        ])
        .unwrap();
        assert_eq!(c.kubeconfig, Some("/etc/myelin/kubeconfig".into()));
        assert_eq!(c.source, SourceSpec::Dir("/tmp/c".into()));
        assert_eq!(c.pod_cidr, Some("10.1.0.0/24".parse().unwrap()));
        assert_eq!(c.metrics_addr.0, None);
        assert!(AgentConfig::try_parse_from(["myelin-agent", "--pod-cidr", "10.1.0.0"]).is_err());
        assert!(AgentConfig::try_parse_from(["myelin-agent", "--source", "etcd"]).is_err());
        let c = AgentConfig::try_parse_from([
            "myelin-agent",
            "--routing-mode",
            "native",
            "--masquerade",
            "false",
            "--non-masquerade-cidrs",
            "10.0.0.0/8,192.168.0.0/16",
            "--nat-port-range",
            "40000-49999",
        ])
        .unwrap();
        assert_eq!(
            c.nat_port_range.map(|p| (p.min, p.max)),
            Some((40000, 49999))
        );
        assert_eq!(c.routing_mode, RoutingMode::Native);
        assert!(!c.masquerade);
        assert_eq!(c.non_masquerade_cidrs.len(), 2);
        assert!(AgentConfig::try_parse_from(["myelin-agent", "--routing-mode", "bgp"]).is_err());
    }
}
