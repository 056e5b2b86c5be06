//! Local endpoints: one per pod interface on this node.
//!
//! The datapath finds an endpoint two ways, hence two maps with the same value type:
//! by the host-side interface a packet arrived on (`endpoints_by_if`, "who sent this?") and by
//! IPv4 address (`endpoints`, "is the destination a pod on this node?").

use crate::user_pod;

/// An IPv4 address as it appears on the wire. A byte array rather than a `u32` so that the
/// map key has one obvious byte order and `bpftool map dump` prints `[10, 244, 0, 5]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Key {
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth in the node's network namespace; `bpf_redirect_peer` to
    /// it delivers straight into the pod.
    pub ifindex: u32,
    /// Agent-assigned endpoint id; keys the counters.
    pub id: u32,
    /// Security identity of the pod (labels of the pod and of its namespace).
    pub identity: u32,
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
    pub ip: [u8; 4],
    /// MAC of the pod's interface: destination MAC of packets delivered to the pod, and the only
    /// source MAC the pod may send with.
    pub mac: [u8; 6],
    /// MAC of the host-side veth: the gateway's MAC as the pod sees it, so the source MAC of
    /// packets delivered to the pod.
    pub host_mac: [u8; 6],
}

/// The pod is isolated for ingress: some policy selecting it has policyType Ingress.
pub const ENDPOINT_F_INGRESS_ISOLATED: u32 = 1;
/// The pod is isolated for egress.
pub const ENDPOINT_F_EGRESS_ISOLATED: u32 = 2;
/// Some of the pod's policy entries did not fit in the policy map: new connections are dropped.
pub const ENDPOINT_F_POLICY_INCOMPLETE: u32 = 4;

/// Per-endpoint packet counters, per CPU. Seen from the pod: `tx` is what it sent, `rx` what was
/// delivered to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Ipv4Key>() == 4);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 32);
const _: () = assert!(core::mem::size_of::<EndpointCounters>() == 32);

user_pod!(Ipv4Key, EndpointInfo, EndpointCounters);
