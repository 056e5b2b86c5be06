//! Events on the `events` ring buffer: drops and policy verdicts, with the 5-tuple, both
//! endpoints and identities, the reason, where the datapath saw the packet and the policy rules
//! that admitted it. Off unless the agent enables them (`DatapathConfig::events`), and limited
//! per CPU (`DatapathConfig::events_rate`, [`EventBudget`]) so that a flood of new flows or
//! drops never turns into a flood of events.

use crate::user_pod;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    /// `EVENT_*`.
    pub kind: u8,
    /// `DropReason` for drops, 0 for verdicts.
    pub reason: u8,
    /// `Direction` of the check that decided (for drops by policy) or of the packet relative to
    /// the endpoint whose interface saw it.
    pub direction: u8,
    pub protocol: u8,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub src_endpoint: u32,
    pub dst_endpoint: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// A connection translated from a Service's frontend (with `--kube-proxy-replacement`):
    /// the frontend the client addressed, whose backend `daddr`/`dport` are. Zero otherwise.
    pub service_addr: [u8; 4],
    /// Host byte order.
    pub service_port: u16,
    /// `ObservationPoint`: which program saw the packet.
    pub point: u8,
    pub _pad: u8,
    /// `PolicyEntry::rule` of the entry that admitted the flow under the source's egress
    /// policy, 0 when no entry did (not isolated, not a local pod, its own node, or denied).
    pub egress_rule: u32,
    /// The same for the destination's ingress policy.
    pub ingress_rule: u32,
    pub _reserved: u32,
}

pub const EVENT_DROP: u8 = 1;
pub const EVENT_ALLOWED: u8 = 2;

/// Where the datapath saw the packet of an event: the program that emitted it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObservationPoint {
    /// `from_container`: a packet a pod sent (host veth, tc ingress).
    FromPod = 1,
    /// `to_container`: a packet the node's stack delivers to a pod (host veth, tc egress).
    ToPod = 2,
    /// `from_tunnel`: a packet from another node, decapsulated (`myelin_vxlan`, tc ingress).
    FromTunnel = 3,
    /// `from_uplink` / `nodeport_in`: a packet arriving on the uplink (native routing, node
    /// ports, masquerading's replies).
    FromUplink = 4,
    /// `to_uplink`: a packet leaving through the uplink (masquerading); also a new connection
    /// `from_container` sends to a pod on another node through the uplink (native routing).
    ToUplink = 5,
    /// A new connection `from_container` sends into the tunnel, to a pod on another node.
    ToTunnel = 6,
    /// A new connection `from_container` hands to the node's stack: to the node itself, a
    /// host-network process, or out of the cluster (masqueraded on the uplink, if on).
    ToStack = 7,
    /// The socket programs (`--cgroup-root`): a socket of the node or of one of its pods given
    /// a Service's backend at `connect()` or `sendmsg()`, before any packet (the source port is
    /// not chosen yet: 0).
    Socket = 8,
}

impl ObservationPoint {
    pub const ALL: [ObservationPoint; 8] = [
        ObservationPoint::FromPod,
        ObservationPoint::ToPod,
        ObservationPoint::FromTunnel,
        ObservationPoint::FromUplink,
        ObservationPoint::ToUplink,
        ObservationPoint::ToTunnel,
        ObservationPoint::ToStack,
        ObservationPoint::Socket,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| *p as u8 == v)
    }

    /// The name events show.
    pub fn name(self) -> &'static str {
        match self {
            ObservationPoint::FromPod => "from-pod",
            ObservationPoint::ToPod => "to-pod",
            ObservationPoint::FromTunnel => "from-tunnel",
            ObservationPoint::FromUplink => "from-uplink",
            ObservationPoint::ToUplink => "to-uplink",
            ObservationPoint::ToTunnel => "to-tunnel",
            ObservationPoint::ToStack => "to-stack",
            ObservationPoint::Socket => "socket",
        }
    }
}

/// One CPU's slot of `event_budget`: a fixed one-second window of at most
/// `DatapathConfig::events_rate` events, and the events lost on that CPU since the map was
/// created (the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// `bpf_ktime_get_ns` at which the current window started.
    pub window_start_ns: u64,
    /// Events emitted in the current window.
    pub sent: u64,
    /// Events not emitted because the window's budget was spent.
    pub rate_limited: u64,
    /// Events not emitted because the ring buffer was full (the agent reads too slowly).
    pub ring_full: u64,
}

/// Length of a rate-limit window.
pub const EVENT_WINDOW_NS: u64 = 1_000_000_000;

/// A CPU wakes the agent for every this many events it puts in the ring (a power of two), and
/// not for the others: the agent also drains the ring every [`EVENT_DRAIN_INTERVAL_MS`], so an
/// event waits at most that long, and a busy node pays one wakeup per batch instead of one per
/// event (the kernel's default wakes the reader whenever the ring was empty, which a reader
/// that keeps up always finds it).
pub const EVENT_WAKEUP_EVERY: u64 = 64;

/// How often the agent drains the events ring whether or not it was woken.
pub const EVENT_DRAIN_INTERVAL_MS: u64 = 100;

const _: () = assert!(EVENT_WAKEUP_EVERY.is_power_of_two());

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);
const _: () = assert!(core::mem::size_of::<FlowEvent>().is_multiple_of(8));
const _: () = assert!(core::mem::size_of::<EventBudget>() == 32);

user_pod!(FlowEvent, EventBudget);
