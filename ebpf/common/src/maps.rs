//! Names of the datapath's maps. The object declares each map under this name (so it is also
//! the kernel's map name, at most 15 bytes) and the agent pins it at `<bpffs>/myelin/<name>`,
//! where `bpftool map dump pinned` finds it and where it survives agent restarts.

pub const ENDPOINTS: &str = "endpoints";
pub const ENDPOINTS_BY_IF: &str = "endpoints_by_if";
pub const COUNTERS: &str = "counters";
pub const DROPS: &str = "drops";
pub const IPCACHE: &str = "ipcache";
pub const POLICY: &str = "policy";
pub const CONNTRACK: &str = "conntrack";
pub const CONFIG: &str = "config";
pub const EVENTS: &str = "events";
/// Per CPU: the events rate limit's window and the events lost (see `event::EventBudget`).
pub const EVENT_BUDGET: &str = "event_budget";
pub const SNAT: &str = "snat";
pub const MASQ_EXCLUDE: &str = "masq_exclude";
pub const LB_SERVICES: &str = "lb_services";
pub const LB_FLOWS: &str = "lb_flows";
pub const LB_AFFINITY: &str = "lb_affinity";
pub const LB_MAGLEV: &str = "lb_maglev";
pub const LB_REVERSE_SK: &str = "lb_reverse_sk";
pub const SOCK_LB: &str = "sock_lb";
/// The node's pods' network namespaces whose sockets the socket programs translate.
pub const SOCK_LB_PODS: &str = "sock_lb_pods";

/// The programs `bpf_tail_call` jumps to, at the `TAIL_*` indices. Pinned like the others: a
/// program array loses its entries when no file or pin holds it any more, and the attached
/// programs must keep translating while the agent is down; a new agent puts its programs in.
pub const TAIL_CALLS: &str = "tail_calls";
/// `tail_calls`: `from_container_lb`, which translates a pod's packet to a Service's frontend.
pub const TAIL_FROM_CONTAINER_LB: u32 = 0;
/// `tail_calls`: `from_container`, which `from_container_lb` hands the translated packet back to.
pub const TAIL_FROM_CONTAINER: u32 = 1;
/// `tail_calls`: `nodeport_in`, where `from_uplink` and `from_tunnel` send packets to node
/// ports, external IPs and load balancers' addresses, and what may be replies to them.
pub const TAIL_NODEPORT_IN: u32 = 2;
/// `tail_calls`' size.
pub const TAIL_SLOTS: u32 = 3;

/// Every map the agent pins.
pub const PINNED: [&str; 20] = [
    ENDPOINTS,
    ENDPOINTS_BY_IF,
    COUNTERS,
    DROPS,
    IPCACHE,
    POLICY,
    CONNTRACK,
    CONFIG,
    EVENTS,
    EVENT_BUDGET,
    SNAT,
    MASQ_EXCLUDE,
    LB_SERVICES,
    LB_FLOWS,
    LB_AFFINITY,
    LB_MAGLEV,
    LB_REVERSE_SK,
    SOCK_LB,
    SOCK_LB_PODS,
    TAIL_CALLS,
];

/// Default capacities (each has an agent flag).
pub const DEFAULT_MAX_ENDPOINTS: u32 = 1024;
pub const DEFAULT_MAX_IPCACHE: u32 = 65_536;
pub const DEFAULT_MAX_POLICY: u32 = 65_536;
pub const DEFAULT_MAX_CONNTRACK: u32 = 131_072;
/// Two entries per masqueraded flow.
pub const DEFAULT_MAX_NAT: u32 = 131_072;
/// Frontend slots: one per frontend (a Service's address, port and protocol) plus one per
/// backend of it.
pub const DEFAULT_MAX_LB_SLOTS: u32 = 131_072;
/// Two entries per translated connection.
pub const DEFAULT_MAX_LB_FLOWS: u32 = 131_072;
pub const DEFAULT_MAX_LB_AFFINITY: u32 = 65_536;
/// Maglev lookup tables (`--lb-algorithm maglev`): one per frontend reached from outside, 32 KiB
/// each, allocated as they are written (`BPF_F_NO_PREALLOC`): at most 128 MiB.
pub const DEFAULT_MAX_LB_MAGLEV: u32 = 4096;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

const _: () = {
    let mut i = 0;
    while i < PINNED.len() {
        assert!(
            PINNED[i].len() <= 15,
            "kernel map names hold at most 15 bytes"
        );
        i += 1;
    }
};
