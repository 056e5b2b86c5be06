//! The kernel side as the agent drives it: loads the embedded object with its maps pinned under
//! `<bpffs>/myelin/`, attaches the two TC programs to each endpoint's host-side veth (and the
//! tunnel's and the uplink's programs to those devices), and owns the typed handles of every
//! map.
//!
//! Attachments outlive the agent: tcx links are pinned under `<bpffs>/myelin/links/`, and
//! clsact filters live in the interface's qdisc. A restarted agent loads fresh programs and swaps
//! them into the existing attachments atomically (`bpf_link_update`, or a netlink replace), so
//! pods keep their datapath while the agent is down or upgrading. Other programs' tcx links and
//! clsact filters on the same devices are left alone (see [`clsact`]).

pub mod clsact;
pub mod conntrack;
pub mod counters;
#[cfg(test)]
pub mod fake;
pub mod lb;
pub mod maglev;
pub mod nat;
pub mod sock;
pub mod table;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use myelin_common::{
    EndpointCounters, EndpointInfo, IpcacheEntry, Ipv4Key, PolicyEntry, PolicyKey,
    config::{DatapathConfig, FEATURE_SERVICES, FEATURES_GLOBAL},
    event::EventBudget,
    lb::{LbEntry, LbKey},
    maglev::MaglevTable,
    maps,
    nat::MasqExclude,
    sock::SockLbClient,
};
use tracing::{debug, info, warn};

pub use self::counters::Counters;
use self::table::{ApplyHooks, Diff, KernelHash, KernelLpm, Reconciler, TableError, Tables};
use self::{
    conntrack::{ConntrackTable, Expiring as _, Fill},
    lb::{LbAffinityTable, LbFlowTable},
    nat::{Masquerade, NatTable},
};
use crate::desired::DesiredState;

/// The datapath object built by build.rs (ebpf/datapath, bpfel-unknown-none, with BTF).
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/myelin-datapath"));

const FROM_CONTAINER: &str = "from_container";
const TO_CONTAINER: &str = "to_container";
const FROM_TUNNEL: &str = "from_tunnel";
const TO_TUNNEL: &str = "to_tunnel";
const FROM_UPLINK: &str = "from_uplink";
const TO_UPLINK: &str = "to_uplink";
/// Tail-called by `from_container` for packets to a Service's frontend; never attached.
const FROM_CONTAINER_LB: &str = "from_container_lb";
const NODEPORT_IN: &str = "nodeport_in";

/// Under the pin dir: the tcx links of the node's devices (the uplink, the tunnel), one per
/// program, named `<ifname>-<program>`. Apart from `links/`, whose pins belong to pods.
const DEVICE_LINKS: &str = "device-links";

/// The names of every program Myelin attaches: a tc filter running another is someone else's.
const ATTACHED_PROGRAMS: [&str; 6] = [
    FROM_CONTAINER,
    TO_CONTAINER,
    FROM_TUNNEL,
    TO_TUNNEL,
    FROM_UPLINK,
    TO_UPLINK,
];

/// The uplink's programs and their hooks.
const UPLINK_HOOKS: [(&str, TcAttachType); 2] = [
    (FROM_UPLINK, TcAttachType::Ingress),
    (TO_UPLINK, TcAttachType::Egress),
];

/// The datapath's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// tc ingress of the host veth: what the pod sends.
    FromContainer,
    /// tc egress of the host veth: what the node delivers to the pod.
    ToContainer,
    /// tc ingress of `myelin_vxlan`: what other nodes send through the tunnel.
    FromTunnel,
    /// tc egress of `myelin_vxlan`: what the node's stack routes into the tunnel.
    ToTunnel,
    /// tc ingress of the uplink: replies to masqueraded flows.
    FromUplink,
    /// tc egress of the uplink: pods' traffic leaving the cluster, masqueraded.
    ToUplink,
    /// Attached nowhere: `from_uplink` and `from_tunnel` jump into it (a tail call through
    /// the `tail_calls` map) with packets to node ports and external IPs. Loaded only with
    /// Services.
    NodePortIn,
}

impl Program {
    pub const ALL: [Program; 7] = [
        Program::FromContainer,
        Program::ToContainer,
        Program::FromTunnel,
        Program::ToTunnel,
        Program::FromUplink,
        Program::ToUplink,
        Program::NodePortIn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Program::FromContainer => FROM_CONTAINER,
            Program::ToContainer => TO_CONTAINER,
            Program::FromTunnel => FROM_TUNNEL,
            Program::ToTunnel => TO_TUNNEL,
            Program::FromUplink => FROM_UPLINK,
            Program::ToUplink => TO_UPLINK,
            Program::NodePortIn => NODEPORT_IN,
        }
    }
}

/// How the datapath reaches other nodes (`DatapathConfig`'s routing fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    /// `CONFIG_F_TUNNEL`, `CONFIG_F_NATIVE`, `CONFIG_F_MASQUERADE`.
    pub flags: u32,
    pub node_ip: std::net::Ipv4Addr,
    pub tunnel_ifindex: u32,
    pub uplink_ifindex: u32,
    /// The uplink's subnet holding `node_ip`: native routing sends packets for a node in it
    /// straight to that node, without a FIB lookup (see `DatapathConfig::uplink_net`).
    pub uplink_subnet: Option<ipnet::Ipv4Net>,
}

impl Routing {
    /// The subnet whose nodes native routing sends to straight: `uplink_subnet` in native mode.
    pub fn direct_subnet(&self) -> Option<ipnet::Ipv4Net> {
        self.uplink_subnet
            .filter(|_| self.flags & myelin_common::config::CONFIG_F_NATIVE != 0)
    }
}

impl Default for Routing {
    /// One node: nothing to route, nothing to masquerade.
    fn default() -> Self {
        Self {
            flags: 0,
            node_ip: std::net::Ipv4Addr::UNSPECIFIED,
            tunnel_ifindex: 0,
            uplink_ifindex: 0,
            uplink_subnet: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("preparing the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing the embedded eBPF object: {0}")]
    Object(#[source] aya_obj::ParseError),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to {ifname} ({direction}): {source}")]
    Attach {
        ifname: String,
        direction: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("detaching from {ifname}: {source}")]
    Detach {
        ifname: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("--attach-mode tcx needs Linux 6.6 or newer; use --attach-mode tc")]
    TcxUnsupported,
    #[error(transparent)]
    Clsact(#[from] clsact::ClsactError),
    #[error(transparent)]
    Table(#[from] TableError),
}

/// How programs are attached to pod interfaces.
///
/// Classic tc is the default because of what attaching costs: the kernel swaps a device's tcx
/// program list and waits for an RCU grace period, holding the RTNL lock, for every program
/// attached or detached. Measured on a 2-CPU kernel 6.18 VM (`cargo xtask bench`, CNI scenario):
/// ADD p50 32 ms with tcx against 5.7 ms with clsact (bridge+host-local: 12.5 ms), and pod
/// churn 16 against 99 pods/s. Packets take the same path through the same programs either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// A clsact qdisc with direct-action filters (any kernel Myelin supports).
    Tc,
    /// tcx links (Linux 6.6+), pinned under `<bpffs>/myelin/links/`.
    Tcx,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Tc => "tc",
        }
    }
}

/// Capacities of the maps whose size depends on the cluster (each has an agent flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub conntrack: u32,
    /// The NAT table (two entries per masqueraded flow).
    pub nat: u32,
    /// Services' frontend and backend slots.
    pub lb_slots: u32,
    /// Services' connections (two entries per translated connection).
    pub lb_flows: u32,
    /// Session affinity: one entry per client and frontend.
    pub lb_affinity: u32,
    /// Maglev's lookup tables: one per frontend reached from outside.
    pub lb_maglev: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            endpoints: maps::DEFAULT_MAX_ENDPOINTS,
            ipcache: maps::DEFAULT_MAX_IPCACHE,
            policy: maps::DEFAULT_MAX_POLICY,
            conntrack: maps::DEFAULT_MAX_CONNTRACK,
            nat: maps::DEFAULT_MAX_NAT,
            lb_slots: maps::DEFAULT_MAX_LB_SLOTS,
            lb_flows: maps::DEFAULT_MAX_LB_FLOWS,
            lb_affinity: maps::DEFAULT_MAX_LB_AFFINITY,
            lb_maglev: maps::DEFAULT_MAX_LB_MAGLEV,
        }
    }
}

/// The features the programs are loaded with. One that is off is not in the programs the
/// kernel runs at all: the verifier skips its code (a constant it knows, see
/// `myelin_common::config::FEATURES_GLOBAL`), which keeps the load, and so a node's start, short.
/// Its `CONFIG_F_*` flag, where it has one, then cannot turn it on until the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Services in eBPF (`--kube-proxy-replacement`).
    pub services: bool,
}

impl Default for Features {
    /// Everything: what tests of the programs load.
    fn default() -> Self {
        Self { services: true }
    }
}

impl Features {
    fn bits(self) -> u32 {
        if self.services { FEATURE_SERVICES } else { 0 }
    }
}

/// The operations the agent needs from the kernel; [`Datapath`] is the real one, and
/// `fake::FakeDatapath` the in-memory twin for unit tests of the agent's logic.
pub trait DatapathOps: Send {
    /// Attaches the programs to a host-side veth (idempotent; replaces older programs).
    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError>;
    /// Detaches them (succeeds if nothing is attached or the interface is gone).
    fn detach(&mut self, ifname: &str) -> Result<(), DatapathError>;
    /// Makes the maps hold `desired`, writing only the difference. When anything policy
    /// depends on changed, bumps the policy revision so tracked connections get re-checked.
    fn apply(&mut self, desired: &DesiredState) -> Result<Diff, DatapathError>;
    /// Capacity of the policy map (the computation marks endpoints that do not fit).
    fn policy_capacity(&self) -> usize;
    /// Which events the datapath emits (`myelin_common::config::EVENTS_*`).
    fn set_event_mask(&mut self, mask: u32) -> Result<(), DatapathError>;
    /// How other nodes are reached.
    fn set_routing(&mut self, routing: Routing) -> Result<(), DatapathError>;
    fn endpoint_counters(&self, id: u32) -> EndpointCounters;
    /// The endpoint entry the maps hold for an address.
    fn endpoint(&self, ip: std::net::Ipv4Addr) -> Option<EndpointInfo>;
    /// Every endpoint the maps hold (what an earlier agent left, right after loading).
    fn endpoints_in_maps(&self) -> Vec<EndpointInfo>;
    /// Drops per reason: (reason, packets, bytes).
    fn drops(&self) -> Vec<(myelin_common::DropReason, u64, u64)>;
    /// Fill of each map the agent writes: (name, entries, capacity).
    fn map_usage(&self) -> Vec<(&'static str, usize, u32)>;
    fn mode(&self) -> AttachMode;
    /// The frontends the last [`Self::apply`] could not write to `lb_services` (a full map),
    /// with the error.
    fn services_unwritten(&self) -> Option<&table::Unwritten> {
        None
    }
    /// The frontends whose Maglev tables the last [`Self::apply`] could not write to
    /// `lb_maglev` (a full map), with the error: they choose their backends at random.
    fn maglev_unwritten(&self) -> Option<&table::Unwritten> {
        None
    }
    /// The network namespace cookie `sock_lb_pods` holds for the endpoint `id` at `ip` (what an
    /// earlier agent wrote, right after loading): how an endpoint rebuilt from the kernel keeps
    /// its socket-level load balancing.
    fn sock_client_cookie(&self, _ip: [u8; 4], _id: u32) -> Option<u64> {
        None
    }
}

/// The reconciled maps over the kernel's maps.
pub type KernelTables = Tables<
    KernelHash<Ipv4Key, EndpointInfo>,
    KernelHash<u32, EndpointInfo>,
    KernelLpm<Ipv4Key, IpcacheEntry>,
    KernelLpm<PolicyKey, PolicyEntry>,
    KernelLpm<Ipv4Key, MasqExclude>,
    KernelHash<LbKey, LbEntry>,
    KernelHash<LbKey, MaglevTable>,
>;

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    mode: AttachMode,
    /// The kernel has tcx (Linux 6.6+): the node's devices get tcx links (see
    /// [`Datapath::attach_device`]).
    device_tcx: bool,
    pub tables: KernelTables,
    pub counters: Counters,
    config: ConfigCell,
    events: Option<RingBuf<MapData>>,
    /// The events' per-CPU rate limit and loss counters (`myelin_common::event::EventBudget`).
    event_budget: Option<PerCpuArray<MapData, EventBudget>>,
    /// The tables the datapath fills and collectors empty: (map, capacity, fill).
    collected: [(&'static str, u32, Fill); 4],
    /// The socket programs are attached (`--cgroup-root`): connected UDP sockets they gave a
    /// backend that goes are destroyed.
    socket_lb: bool,
    /// `sock_lb_pods`: the pods' network namespaces the socket programs translate.
    sock_clients: Reconciler<u64, SockLbClient, KernelHash<u64, SockLbClient>>,
    /// The `lb_flows` of UDP flows were checked against `lb_services` after the first apply of
    /// a synced cluster state (see `forget_udp_flows`).
    udp_flows_checked: bool,
}

/// The one-entry `config` array and the value last written to it.
struct ConfigCell {
    map: Array<MapData, DatapathConfig>,
    value: DatapathConfig,
}

impl ConfigCell {
    fn write(&mut self, value: DatapathConfig) -> Result<(), TableError> {
        self.map
            .set(0, value, 0)
            .map_err(|source| TableError::Map {
                map: maps::CONFIG,
                source,
            })?;
        self.value = value;
        Ok(())
    }
}

/// What the kernel datapath does around the tables: zeroed counters for new endpoints, and a
/// new policy revision after every change.
struct KernelHooks<'a> {
    counters: &'a mut Counters,
    config: &'a mut ConfigCell,
}

impl ApplyHooks for KernelHooks<'_> {
    fn sync_counters(&mut self, ids: &BTreeSet<u32>) -> Result<(), TableError> {
        self.counters.sync_endpoints(ids)
    }

    fn policy_changed(&mut self) -> Result<(), TableError> {
        self.config.write(DatapathConfig {
            policy_revision: self.config.value.policy_revision.wrapping_add(1),
            ..self.config.value
        })
    }
}

impl Datapath {
    /// Loads the programs, reusing maps pinned by an earlier agent when their layout still
    /// matches (a map whose layout changed with an upgrade is replaced; the reconciler refills it).
    pub fn load(
        bpffs: &Path,
        mode: AttachMode,
        limits: Limits,
        features: Features,
    ) -> Result<Self, DatapathError> {
        // First: a start refused for the kernel must leave the pins of the agent before it (and
        // the maps its programs still run on) as they are.
        if mode == AttachMode::Tcx && KernelVersion::current().is_ok_and(|v| v < tcx_since()) {
            return Err(DatapathError::TcxUnsupported);
        }
        let pin_dir = bpffs.join("myelin");
        for dir in [
            pin_dir.clone(),
            pin_dir.join("links"),
            pin_dir.join(DEVICE_LINKS),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|source| DatapathError::PinDir { path: dir, source })?;
        }
        let sizes: BTreeMap<&'static str, u32> = [
            (maps::ENDPOINTS, limits.endpoints),
            (maps::ENDPOINTS_BY_IF, limits.endpoints),
            // Indexed by endpoint id, from 1.
            (maps::COUNTERS, limits.endpoints + 1),
            (maps::IPCACHE, limits.ipcache),
            (maps::POLICY, limits.policy),
            (maps::CONNTRACK, limits.conntrack),
            (maps::SNAT, limits.nat),
            // Node addresses and pod CIDRs, which the ipcache holds too.
            (maps::MASQ_EXCLUDE, limits.ipcache),
            (maps::LB_SERVICES, limits.lb_slots),
            (maps::LB_FLOWS, limits.lb_flows),
            (maps::LB_AFFINITY, limits.lb_affinity),
            (maps::LB_MAGLEV, limits.lb_maglev),
            // One entry per socket translated by the socket programs.
            (maps::LB_REVERSE_SK, limits.lb_flows),
            // One per endpoint's network namespace.
            (maps::SOCK_LB_PODS, limits.endpoints),
        ]
        .into_iter()
        .collect();
        drop_incompatible_pins(&pin_dir, &sizes)?;

        let mut loader = EbpfLoader::new();
        let bits = features.bits();
        loader.override_global(FEATURES_GLOBAL, &bits, true);
        for name in maps::PINNED {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;
        // The Services' programs, reached only by tail calls, only with Services.
        let tail_targets: &[&'static str] = if features.services {
            &[FROM_CONTAINER_LB]
        } else {
            &[]
        };
        let programs = Program::ALL
            .into_iter()
            .filter(|p| features.services || *p != Program::NodePortIn)
            .map(Program::name);
        for name in programs.chain(tail_targets.iter().copied()) {
            // The verifier's time: most of a node's start-up, and so of its join time.
            let started = std::time::Instant::now();
            let program = classifier(&mut ebpf, name)?;
            program.load().map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
            // What the verifier walked: the figure to watch when the programs grow.
            let instructions = program
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
                .unwrap_or(0);
            debug!(
                program = name,
                ms = started.elapsed().as_millis() as u64,
                instructions,
                "program verified and loaded"
            );
        }
        // In a pinned map an earlier agent filled: the programs it left attached jump into
        // this agent's from now on.
        fill_tail_calls(&mut ebpf, features)?;
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(DatapathError::Missing(name));
        let tables = Tables::new(
            KernelHash::new(maps::ENDPOINTS, take(maps::ENDPOINTS)?)?,
            KernelHash::new(maps::ENDPOINTS_BY_IF, take(maps::ENDPOINTS_BY_IF)?)?,
            KernelLpm::new(maps::IPCACHE, take(maps::IPCACHE)?)?,
            KernelLpm::new(maps::POLICY, take(maps::POLICY)?)?,
            KernelLpm::new(maps::MASQ_EXCLUDE, take(maps::MASQ_EXCLUDE)?)?,
            KernelHash::new(maps::LB_SERVICES, take(maps::LB_SERVICES)?)?,
            KernelHash::new(maps::LB_MAGLEV, take(maps::LB_MAGLEV)?)?,
        )?;
        let sock_clients = Reconciler::new(KernelHash::new(
            maps::SOCK_LB_PODS,
            take(maps::SOCK_LB_PODS)?,
        )?)?;
        let counters = Counters::new(take(maps::COUNTERS)?, take(maps::DROPS)?)?;
        let aya_err = |map: &'static str| move |source| TableError::Map { map, source };
        let map = Array::try_from(take(maps::CONFIG)?).map_err(aya_err(maps::CONFIG))?;
        // Keep the revision an earlier agent left: resetting it could make stale conntrack
        // entries look current.
        let value = map.get(&0, 0).map_err(aya_err(maps::CONFIG))?;
        let config = ConfigCell { map, value };
        let events = Some(RingBuf::try_from(take(maps::EVENTS)?).map_err(aya_err(maps::EVENTS))?);
        let event_budget = Some(
            PerCpuArray::try_from(take(maps::EVENT_BUDGET)?)
                .map_err(aya_err(maps::EVENT_BUDGET))?,
        );
        info!(pin_dir = %pin_dir.display(), mode = mode.as_str(), "datapath loaded");
        Ok(Self {
            ebpf,
            pin_dir,
            mode,
            device_tcx: kernel_has_tcx(),
            tables,
            counters,
            config,
            events,
            event_budget,
            collected: [
                (maps::CONNTRACK, limits.conntrack, Fill::default()),
                (maps::SNAT, limits.nat, Fill::default()),
                (maps::LB_FLOWS, limits.lb_flows, Fill::default()),
                (maps::LB_AFFINITY, limits.lb_affinity, Fill::default()),
            ],
            socket_lb: false,
            sock_clients,
            udp_flows_checked: false,
        })
    }

    /// Starts the threads that remove expired conntrack, NAT and Service connection and
    /// affinity entries every `interval` (and count what is left, for
    /// [`DatapathOps::map_usage`]).
    pub fn spawn_collectors(&self, interval: std::time::Duration) -> io::Result<()> {
        let [
            (_, _, conntrack),
            (_, _, nat),
            (_, _, lb_flows),
            (_, _, lb_affinity),
        ] = &self.collected;
        conntrack::spawn_collector::<ConntrackTable>(
            ConntrackTable::pin_path(&self.pin_dir),
            interval,
            conntrack.clone(),
        )?;
        conntrack::spawn_collector::<NatTable>(
            NatTable::pin_path(&self.pin_dir),
            interval,
            nat.clone(),
        )?;
        conntrack::spawn_collector::<LbFlowTable>(
            LbFlowTable::pin_path(&self.pin_dir),
            interval,
            lb_flows.clone(),
        )?;
        conntrack::spawn_collector::<LbAffinityTable>(
            LbAffinityTable::pin_path(&self.pin_dir),
            interval,
            lb_affinity.clone(),
        )
    }

    /// Tells the datapath which addresses are this node's pods' (native routing delivers
    /// packets for them from the uplink; masquerading translates theirs).
    pub fn set_pod_cidr(&mut self, pod_cidr: ipnet::Ipv4Net) -> Result<(), DatapathError> {
        Ok(self.config.write(DatapathConfig {
            pod_cidr: pod_cidr.network().octets(),
            pod_cidr_mask: pod_cidr.netmask().octets(),
            ..self.config.value
        })?)
    }

    /// Tells masquerading whose packets it translates and which ports it hands out; it runs
    /// once routing has `CONFIG_F_MASQUERADE` and the node's address (`set_routing`).
    pub fn set_masquerade(&mut self, masquerade: Masquerade) -> Result<(), DatapathError> {
        let (pod_cidr, pod_cidr_mask) = masquerade.pod_cidr_words();
        Ok(self.config.write(DatapathConfig {
            pod_cidr,
            pod_cidr_mask,
            nat_port_min: masquerade.ports.min,
            nat_port_max: masquerade.ports.max,
            ..self.config.value
        })?)
    }

    /// Hands the events ring buffer to its reader (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Hands the events' rate limit and loss counters to the flow log (once).
    pub fn take_event_budget(&mut self) -> Option<PerCpuArray<MapData, EventBudget>> {
        self.event_budget.take()
    }

    /// How many events each CPU may emit per second (0: no limit).
    pub fn set_events_rate(&mut self, rate: u32) -> Result<(), DatapathError> {
        Ok(self.config.write(DatapathConfig {
            events_rate: rate,
            ..self.config.value
        })?)
    }

    /// Runs one packet through a program without sending it anywhere (`BPF_PROG_TEST_RUN`),
    /// as if it arrived on interface `ifindex` of the current network namespace. Returns the
    /// TC verdict and the packet as the program left it. Used by the datapath tests.
    pub fn test_run(
        &mut self,
        program: Program,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<(i32, Vec<u8>), DatapathError> {
        let (verdict, out, _) = self.test_run_marked(program, packet, ifindex, 0)?;
        Ok((verdict, out))
    }

    /// [`Datapath::test_run`] for a packet carrying `skb->mark` `mark`; also returns the mark
    /// the program left.
    pub fn test_run_marked(
        &mut self,
        program: Program,
        packet: &[u8],
        ifindex: u32,
        mark: u32,
    ) -> Result<(i32, Vec<u8>, u32), DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        // `struct __sk_buff` (uapi): only a few fields may be set; mark is at offset 8,
        // ifindex at 40.
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; 192];
        let mut out = vec![0u8; packet.len() + 256];
        let name = program.name();
        let prog = classifier(&mut self.ebpf, name)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
        out.truncate(result.data_size_out as usize);
        let mark_out = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
        Ok((result.return_value as i32, out, mark_out))
    }

    /// Runs one packet through a program `repeat` times in a row in the kernel
    /// (`BPF_PROG_TEST_RUN` with a repeat count) and returns the mean run time the kernel
    /// measured, its timer's own cost included. Every run starts from the packet the previous
    /// one left: for a program that rewrites what it checks (`from_container` rewrites the
    /// source MAC it checks against the endpoint's), only `repeat` 1 times the intended path.
    pub fn time_run(
        &mut self,
        program: Program,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<std::time::Duration, DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let name = program.name();
        let prog = classifier(&mut self.ebpf, name)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
        Ok(result.duration)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Socket-level load balancing: attaches the socket programs to `root` for this network
    /// namespace's sockets, replacing the programs of links an earlier agent pinned for it and
    /// detaching those of any other cgroup (see [`sock`]).
    pub fn attach_socket_lb(
        &mut self,
        root: &sock::CgroupRoot,
    ) -> Result<sock::Attached, sock::SockLbError> {
        let attached = sock::attach(&mut self.ebpf, &self.pin_dir, root)?;
        self.socket_lb = true;
        Ok(attached)
    }

    /// Detaches the socket programs an earlier agent attached (`--cgroup-root` no longer
    /// given); returns how many links went.
    pub fn detach_socket_lb(&mut self) -> Result<usize, sock::SockLbError> {
        self.socket_lb = false;
        sock::detach(&mut self.ebpf, &self.pin_dir)
    }

    /// Whether applying `desired` changes the Services' slots: not when it hands over the slots
    /// already written (a pod's change), without a walk of them.
    fn services_change(&self, desired: &DesiredState) -> bool {
        !self.tables.lb_services_applied(&desired.lb_services)
            && *self.tables.lb_services.current() != *desired.lb_services
    }

    /// Removes, on a thread of its own (a walk of `lb_flows`: up to `--max-lb-flows` entries),
    /// the per-packet translations of `stale` UDP flows, between frontend-backend pairs the map
    /// no longer holds: their next datagram gets a backend that is there.
    fn forget_udp_flows(&self, stale: lb::StaleUdpFlows) {
        let pin = LbFlowTable::pin_path(&self.pin_dir);
        let spawned = std::thread::Builder::new()
            .name("lb-udp-forget".into())
            .spawn(move || {
                let forgotten =
                    LbFlowTable::open(&pin).and_then(|mut t| t.forget_udp_flows(&stale));
                match forgotten {
                    Ok(0) => {}
                    Ok(entries) => info!(
                        entries,
                        "forgot the translations of UDP flows to backends their frontends left"
                    ),
                    Err(e) => warn!(
                        "forgetting UDP flows to removed backends failed: {e}; they keep their \
                         backend until they are idle for the UDP lifetime"
                    ),
                }
            });
        if let Err(e) = spawned {
            warn!("forgetting UDP flows to removed backends: no thread: {e}");
        }
    }

    fn link_pin(&self, ifname: &str, direction: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifname}-{direction}"))
    }

    /// Attaches the tunnel's programs to `ifname` (`myelin_vxlan`), replacing earlier ones.
    pub fn attach_tunnel(&mut self, ifname: &str) -> Result<(), DatapathError> {
        for (program, hook) in [
            (FROM_TUNNEL, TcAttachType::Ingress),
            (TO_TUNNEL, TcAttachType::Egress),
        ] {
            self.attach_device(ifname, program, hook)?;
        }
        debug!(ifname, "tunnel programs attached");
        Ok(())
    }

    fn device_link_pin(&self, ifname: &str, program: &str) -> PathBuf {
        self.pin_dir
            .join(DEVICE_LINKS)
            .join(format!("{ifname}-{program}"))
    }

    /// Attaches `program` to `hook` of one of the node's devices (the uplink, the tunnel),
    /// attached once per agent start, unlike pods' veths (see [`AttachMode`]). On a kernel with
    /// tcx it is a tcx link, pinned under `<pin dir>/device-links/` and appended after the
    /// device's other tcx programs: a packet then skips the classic tc layer (`tcf_classify`,
    /// `cls_bpf`) that a clsact filter costs it, on the two hooks every packet between nodes
    /// crosses on the uplink. A device whose hook carries someone else's clsact filters keeps
    /// Myelin's program as a clsact filter beside them, in the order they have (a tcx program
    /// runs before every clsact filter, and its verdict would end the hook before theirs). So
    /// does a kernel without tcx. Either way, what an earlier agent attached the other way is
    /// removed: the program never runs twice on a packet.
    fn attach_device(
        &mut self,
        ifname: &str,
        program: &'static str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        let pin = self.device_link_pin(ifname, program);
        // (Handle 0 is a priority's filter list, not a filter.)
        let foreign = clsact::filters(ifname, hook)?
            .iter()
            .any(|f| f.handle != 0 && !ATTACHED_PROGRAMS.iter().any(|p| f.runs(p)));
        if self.device_tcx && !foreign {
            let prog = classifier(&mut self.ebpf, program)?;
            let attached = attach_tcx(prog, ifname, &pin, hook).or_else(|_| {
                // A link pinned for a device that is gone (the tunnel device is recreated when
                // its settings change): start a new one.
                remove_pin(&pin)?;
                attach_tcx(prog, ifname, &pin, hook)
            });
            attached.map_err(|source| DatapathError::Attach {
                ifname: ifname.to_string(),
                direction: clsact::hook_name(hook),
                source,
            })?;
            clsact::detach(ifname, hook, program)?;
        } else {
            clsact::ensure_qdisc(ifname)?;
            clsact::attach(classifier(&mut self.ebpf, program)?, program, ifname, hook)?;
            // After the filter is in place: no packet goes through without the program.
            remove_pin(&pin).map_err(|source| DatapathError::Detach {
                ifname: ifname.to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Removes `program` from `hook` of `ifname`, however it was attached, and nothing else.
    fn detach_device(
        &mut self,
        ifname: &str,
        program: &str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        // Removing the pin drops the link's last reference: the kernel detaches it.
        remove_pin(&self.device_link_pin(ifname, program)).map_err(|source| {
            DatapathError::Detach {
                ifname: ifname.to_string(),
                source,
            }
        })?;
        clsact::detach(ifname, hook, program)?;
        Ok(())
    }

    /// `(ifname, program)` of the device links pinned under `device-links/` for one of
    /// `programs`.
    fn device_links(&self, programs: &[&str]) -> Vec<(String, String)> {
        let Ok(dir) = fs::read_dir(self.pin_dir.join(DEVICE_LINKS)) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                programs.iter().find_map(|program| {
                    let ifname = name.strip_suffix(program)?.strip_suffix('-')?;
                    Some((ifname.to_string(), program.to_string()))
                })
            })
            .collect()
    }

    /// Attaches the uplink programs to `ifname`, replacing earlier ones: `from_uplink` (replies
    /// to masqueraded flows, and in native routing the packets for this node's pods) and, when
    /// `masquerade`, `to_uplink`; without, an earlier agent's `to_uplink` is removed. tcx links
    /// where the kernel has them, whatever `--attach-mode` (see [`Datapath::attach_device`]).
    pub fn attach_uplink(&mut self, ifname: &str, masquerade: bool) -> Result<(), DatapathError> {
        for (program, hook) in UPLINK_HOOKS {
            if program == TO_UPLINK && !masquerade {
                self.detach_device(ifname, program, hook)?;
            } else {
                self.attach_device(ifname, program, hook)?;
            }
        }
        debug!(ifname, masquerade, "uplink programs attached");
        Ok(())
    }

    /// Removes the uplink programs from `ifname` (with `--masquerade=false` in tunnel mode,
    /// those an earlier agent attached), and nothing else there.
    pub fn detach_uplink(&mut self, ifname: &str) -> Result<(), DatapathError> {
        for (program, hook) in UPLINK_HOOKS {
            self.detach_device(ifname, program, hook)?;
        }
        Ok(())
    }

    /// Removes the uplink programs from every device of the node but `keep`: those an earlier
    /// agent left on a device that is no longer the uplink (`--uplink` changed, the InternalIP
    /// moved to another device, the Node lost its InternalIP), which would otherwise go on
    /// translating and delivering there. Returns the devices it cleaned.
    pub fn detach_uplink_elsewhere(
        &mut self,
        keep: Option<&str>,
    ) -> Result<Vec<String>, DatapathError> {
        let interfaces = nix::net::if_::if_nameindex().map_err(|e| DatapathError::Detach {
            ifname: "(every interface)".into(),
            source: Box::new(e),
        })?;
        let mut cleaned = Vec::new();
        // Links of a device that is gone went with it; their pins are only files now.
        for (ifname, program) in self.device_links(&[FROM_UPLINK, TO_UPLINK]) {
            if keep == Some(ifname.as_str()) {
                continue;
            }
            remove_pin(&self.device_link_pin(&ifname, &program)).map_err(|source| {
                DatapathError::Detach {
                    ifname: ifname.clone(),
                    source,
                }
            })?;
            if nix::net::if_::if_nametoindex(ifname.as_str()).is_ok() && !cleaned.contains(&ifname)
            {
                cleaned.push(ifname);
            }
        }
        for iface in interfaces.iter() {
            let name = iface.name().to_string_lossy().into_owned();
            if keep == Some(name.as_str()) {
                continue;
            }
            let mut found = false;
            for (program, hook) in UPLINK_HOOKS {
                // A device without a clsact qdisc has no filter of ours.
                let Ok(filters) = clsact::filters(&name, hook) else {
                    continue;
                };
                if filters.iter().any(|f| f.runs(program)) {
                    clsact::detach(&name, hook, program)?;
                    found = true;
                }
            }
            if found && !cleaned.contains(&name) {
                cleaned.push(name);
            }
        }
        Ok(cleaned)
    }

    fn attach_programs(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let failed = |direction| {
            let ifname = ifname.to_string();
            move |source| DatapathError::Attach {
                ifname,
                direction,
                source,
            }
        };
        if self.mode == AttachMode::Tc {
            clsact::ensure_qdisc(ifname)?;
            for (program, hook) in [
                (FROM_CONTAINER, TcAttachType::Ingress),
                (TO_CONTAINER, TcAttachType::Egress),
            ] {
                clsact::attach(classifier(&mut self.ebpf, program)?, program, ifname, hook)?;
            }
        } else {
            // Each tcx attach waits in the kernel for an RCU grace period, holding the RTNL
            // lock (the device's program list is swapped, and the old one must be unused):
            // about 14 ms per direction on a 2-CPU VM, most of an ADD's time.
            for (program, direction, attach_type) in [
                (FROM_CONTAINER, "ingress", TcAttachType::Ingress),
                (TO_CONTAINER, "egress", TcAttachType::Egress),
            ] {
                let pin = self.link_pin(ifname, direction);
                attach_tcx(
                    classifier(&mut self.ebpf, program)?,
                    ifname,
                    &pin,
                    attach_type,
                )
                .map_err(failed(direction))?;
            }
        }
        debug!(ifname, "programs attached");
        Ok(())
    }

    fn detach_programs(&mut self, ifname: &str) -> Result<(), DatapathError> {
        for (program, direction, attach_type) in [
            (FROM_CONTAINER, "ingress", TcAttachType::Ingress),
            (TO_CONTAINER, "egress", TcAttachType::Egress),
        ] {
            // Removing the pin drops the link's last reference; the kernel then detaches it
            // in the background instead of making us wait for an RCU grace period.
            match fs::remove_file(self.link_pin(ifname, direction)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DatapathError::Detach {
                        ifname: ifname.to_string(),
                        source: e.into(),
                    });
                }
            }
            if self.mode == AttachMode::Tc {
                clsact::detach(ifname, attach_type, program)?;
            }
        }
        debug!(ifname, "programs detached");
        Ok(())
    }

    /// Link pins whose interface is not in `keep` (leftovers of endpoints deleted while the
    /// agent was down); removes them.
    pub fn remove_stale_link_pins(&self, keep: &dyn Fn(&str) -> bool) -> usize {
        let Ok(dir) = fs::read_dir(self.pin_dir.join("links")) else {
            return 0;
        };
        let mut removed = 0;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ifname = name.rsplit_once('-').map_or(name.as_str(), |(i, _)| i);
            if !keep(ifname) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl DatapathOps for Datapath {
    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_programs(ifname)
    }

    fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.detach_programs(ifname)
    }

    fn apply(&mut self, desired: &DesiredState) -> Result<Diff, DatapathError> {
        let services_change = self.services_change(desired);
        // The UDP pairs before a change of the Services' slots: what UDP flows and the sockets
        // the socket programs connected may have lost. TCP is left to drain, and nothing is
        // walked for it (a set of every backend, rebuilt twice per change, cost milliseconds
        // per EndpointSlice update at 10,000 Services).
        let udp_before = services_change.then(|| lb::udp_pairs(self.tables.lb_services.current()));
        let mut hooks = KernelHooks {
            counters: &mut self.counters,
            config: &mut self.config,
        };
        let diff = self.tables.apply(desired, &mut hooks)?;
        // After the endpoints: a pod's sockets are translated once its packets can flow.
        let diff = diff + self.sock_clients.apply(&desired.sock_clients)?;
        // What the map holds now, not what was desired: a full map keeps a changed frontend's
        // old backends.
        let first_check = !desired.keep_policy_state && !self.udp_flows_checked;
        let udp_after = (first_check || udp_before.is_some())
            .then(|| lb::udp_pairs(self.tables.lb_services.current()));
        let mut gone = BTreeSet::new();
        if let (Some(before), Some(after)) = (&udp_before, &udp_after) {
            // Backends no UDP frontend sends to any more: a client that reconnects gets another.
            if self.socket_lb {
                gone = sock::udp_backends(before)
                    .difference(&sock::udp_backends(after))
                    .copied()
                    .collect();
            }
        }
        if let Some(after) = udp_after {
            if first_check {
                // The first apply of a synced cluster state: flows to backends that went while
                // no agent ran, or before a restart's first sync, are found against all the map
                // holds.
                self.udp_flows_checked = true;
                self.forget_udp_flows(lb::StaleUdpFlows::NotTo(after));
            } else if let Some(before) = udp_before {
                let stale: BTreeSet<lb::UdpPair> = before.difference(&after).copied().collect();
                if !stale.is_empty() {
                    self.forget_udp_flows(lb::StaleUdpFlows::To(stale));
                }
            }
        }
        if !gone.is_empty() {
            match sock::destroy_connected(&self.ebpf, &gone, &desired.sock_netns) {
                Ok(0) => {}
                Ok(destroyed) => info!(
                    destroyed,
                    backends = gone.len(),
                    "destroyed the UDP sockets the socket programs had connected to removed backends"
                ),
                Err(e) => warn!(
                    "destroying sockets connected to removed backends failed: {e}; they keep \
                     their backend until they close"
                ),
            }
        }
        Ok(diff)
    }

    fn policy_capacity(&self) -> usize {
        use self::table::MapBackend as _;
        self.tables.policy.map().capacity() as usize
    }

    fn set_event_mask(&mut self, mask: u32) -> Result<(), DatapathError> {
        Ok(self.config.write(DatapathConfig {
            events: mask,
            ..self.config.value
        })?)
    }

    fn set_routing(&mut self, routing: Routing) -> Result<(), DatapathError> {
        Ok(self.config.write(DatapathConfig {
            flags: routing.flags,
            node_ip: routing.node_ip.octets(),
            tunnel_ifindex: routing.tunnel_ifindex,
            uplink_ifindex: routing.uplink_ifindex,
            uplink_net: routing
                .uplink_subnet
                .map_or([0; 4], |s| s.network().octets()),
            uplink_mask: routing
                .uplink_subnet
                .map_or([0; 4], |s| s.netmask().octets()),
            ..self.config.value
        })?)
    }

    fn endpoint_counters(&self, id: u32) -> EndpointCounters {
        self.counters.endpoint(id)
    }

    fn endpoint(&self, ip: std::net::Ipv4Addr) -> Option<EndpointInfo> {
        self.tables.endpoint(ip)
    }

    fn endpoints_in_maps(&self) -> Vec<EndpointInfo> {
        self.tables
            .endpoints_by_if
            .current()
            .values()
            .copied()
            .collect()
    }

    fn drops(&self) -> Vec<(myelin_common::DropReason, u64, u64)> {
        self.counters
            .drops()
            .into_iter()
            .map(|(r, c)| (r, c.packets, c.bytes))
            .collect()
    }

    fn services_unwritten(&self) -> Option<&table::Unwritten> {
        self.tables.lb_unwritten.as_ref()
    }

    fn maglev_unwritten(&self) -> Option<&table::Unwritten> {
        self.tables.lb_maglev_unwritten.as_ref()
    }

    fn sock_client_cookie(&self, ip: [u8; 4], id: u32) -> Option<u64> {
        self.sock_clients
            .current()
            .iter()
            .find(|(_, c)| c.ip == ip && c.endpoint == id)
            .map(|(cookie, _)| *cookie)
    }

    fn map_usage(&self) -> Vec<(&'static str, usize, u32)> {
        use self::table::MapBackend as _;
        let mut usage = self.tables.usage();
        usage.push((
            maps::SOCK_LB_PODS,
            self.sock_clients.current().len(),
            self.sock_clients.map().capacity(),
        ));
        usage.extend(
            self.collected
                .iter()
                .map(|(map, capacity, fill)| (*map, fill.get(), *capacity)),
        );
        usage
    }

    fn mode(&self) -> AttachMode {
        self.mode
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock conntrack lifetimes are on (the datapath reads it
/// at tick resolution, `bpf_ktime_get_coarse_ns`).
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The first kernel with tcx.
fn tcx_since() -> KernelVersion {
    KernelVersion::new(6, 6, 0)
}

/// Whether the running kernel is known to have tcx (Linux 6.6+).
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= tcx_since())
}

/// Removes a link's pin (which detaches the link, unless something else holds it); no pin is
/// no error.
fn remove_pin(pin: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Attaches `prog` to `ifname` with a tcx link pinned at `pin`, or swaps it into the link
/// already pinned there (an earlier agent's) atomically.
fn attach_tcx(
    prog: &mut SchedClassifier,
    ifname: &str,
    pin: &Path,
    attach_type: TcAttachType,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => {
            // The pin keeps the link; dropping our handle only closes a file descriptor.
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
            let id = prog.attach_to_link(link)?;
            drop(prog.take_link(id)?);
        }
        Err(_) => {
            let id = prog.attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )?;
            let link = FdLink::try_from(prog.take_link(id)?)?;
            link.pin(pin)?;
        }
    }
    Ok(())
}

/// Points `tail_calls` at its programs (`myelin_common::maps::TAIL_*`), or, without Services,
/// empties it (no program jumps then; an earlier agent's programs are let go).
fn fill_tail_calls(ebpf: &mut Ebpf, features: Features) -> Result<(), DatapathError> {
    let targets = [
        (maps::TAIL_FROM_CONTAINER_LB, FROM_CONTAINER_LB),
        (maps::TAIL_FROM_CONTAINER, FROM_CONTAINER),
        (maps::TAIL_NODEPORT_IN, NODEPORT_IN),
    ];
    let fds = targets
        .into_iter()
        .filter(|_| features.services)
        .map(|(index, name)| {
            let error = |source| DatapathError::Program {
                program: name,
                source,
            };
            let fd = classifier(ebpf, name)?
                .fd()
                .map_err(error)?
                .try_clone()
                .map_err(|e| error(e.into()))?;
            Ok((index, fd))
        })
        .collect::<Result<Vec<_>, DatapathError>>()?;
    let aya_err = |source| TableError::Map {
        map: maps::TAIL_CALLS,
        source,
    };
    let map = ebpf
        .map_mut(maps::TAIL_CALLS)
        .ok_or(DatapathError::Missing(maps::TAIL_CALLS))?;
    let mut calls = ProgramArray::try_from(map).map_err(aya_err)?;
    if !features.services {
        for index in 0..maps::TAIL_SLOTS {
            match calls.clear_index(&index) {
                Ok(()) => {}
                // Empty already.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(aya_err(e).into()),
            }
        }
    }
    for (index, fd) in &fds {
        calls.set(*index, fd, 0).map_err(aya_err)?;
    }
    Ok(())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
}

/// Removes pinned maps whose key size, value size or capacity differ from what this agent's
/// object declares, so that the loader creates them afresh instead of handing the programs a
/// map of the wrong shape.
fn drop_incompatible_pins(
    pin_dir: &Path,
    sizes: &BTreeMap<&'static str, u32>,
) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(OBJECT).map_err(DatapathError::Object)?;
    for name in maps::PINNED {
        let pin = pin_dir.join(name);
        let Ok(existing) = MapData::from_pin(&pin) else {
            continue;
        };
        let Some(declared) = object.maps.get(name) else {
            continue;
        };
        let Ok(info) = existing.info() else { continue };
        let max_entries = sizes.get(name).copied().unwrap_or(declared.max_entries());
        if info.key_size() != declared.key_size()
            || info.value_size() != declared.value_size()
            || info.max_entries() != max_entries
        {
            warn!(
                map = name,
                "pinned map has another layout or capacity than this agent's; replacing it"
            );
            fs::remove_file(&pin).map_err(|source| DatapathError::PinDir { path: pin, source })?;
        }
    }
    Ok(())
}
