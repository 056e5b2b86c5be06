//! Services in eBPF (`--kube-proxy-replacement`): a packet to a Service's frontend (a ClusterIP,
//! an external IP, a node's address on a NodePort) is translated to one of its backends before
//! policy sees it, so that policy is checked against the backend pod and its port, as upstream
//! NetworkPolicy specifies.
//!
//! `lb_services` holds every frontend as consecutive slots, Cilium's layout:
//!
//! ```text
//! {frontend addr, port, proto, slot 0}  -> {count = n, flags, affinity timeout}  (the service)
//! {frontend addr, port, proto, slot 1..n} -> {backend addr, backend port}        (its backends)
//! ```
//!
//! so finding a frontend is one hash lookup and choosing a backend one more, whatever the number
//! of Services and backends. A frontend with `count` 0 has no usable backend: its connections
//! are refused at once. The agent writes the backend slots before the service slot that makes
//! them visible, and shrinks a service by writing its new count first.
//!
//! `lb_flows` (LRU) remembers, per connection, which backend it was given, both ways, as the
//! masquerading table does (see `crate::nat`):
//!
//! ```text
//! out: {client, frontend, client port, frontend port, proto, LB_OUT} -> {backend, backend port}
//! in:  {backend, client, backend port, client port, proto, LB_IN}    -> {frontend, frontend port}
//! ```
//!
//! The `out` entry keeps a connection on its backend while backends come and go; the `in` entry
//! turns the backend's replies back into the frontend's. The translated flow's conntrack entry
//! carries `CT_F_SERVICE`, so only replies of translated flows look `in` up.
//!
//! `lb_affinity` (LRU): `sessionAffinity: ClientIP`, the backend a client was last given for a
//! frontend, and when.

use crate::user_pod;

/// A frontend's slot: slot 0 is the service, slots `1..=count` its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbKey {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad0: u8,
    pub slot: u16,
    pub _pad1: u16,
}

/// Slot 0: the service (`count`, `flags`, `affinity_timeout_s`); slots `1..=count`: a backend
/// (`backend`, `backend_port`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbEntry {
    pub backend: [u8; 4],
    /// Network byte order.
    pub backend_port: u16,
    /// Slot 0: how many backend slots follow.
    pub count: u16,
    /// Slot 0: `LB_F_*` bits.
    pub flags: u32,
    /// Slot 0: `sessionAffinity: ClientIP`'s timeout, seconds (0: no affinity).
    pub affinity_timeout_s: u32,
}

/// `internalTrafficPolicy: Local` (ClusterIP) or `externalTrafficPolicy: Local` (NodePort,
/// external IPs): the agent lists only this node's backends in the slots.
pub const LB_F_LOCAL: u32 = 1;
/// A NodePort frontend (the node's address): reached from outside through the uplink.
pub const LB_F_NODEPORT: u32 = 2;
/// An external IP frontend.
pub const LB_F_EXTERNAL_IP: u32 = 4;
/// A load balancer's address (`status.loadBalancer.ingress`): served as an external IP.
pub const LB_F_LOAD_BALANCER: u32 = 8;

/// The key of a client's packet, before translation.
pub const LB_OUT: u8 = crate::nat::NAT_OUT;
/// The key of a backend's reply, before translation back.
pub const LB_IN: u8 = crate::nat::NAT_IN;

/// `lb_flows`' key: a packet's tuple as it carries it, direction [`LB_OUT`] or [`LB_IN`]. The
/// masquerading table's key: both tables hold translation pairs of the same shape.
pub type LbFlowKey = crate::nat::NatKey;

/// `lb_flows`' value: what the packet's destination (`out`) or source (`in`) becomes, with
/// conntrack's lifetime and `CT_F_SEEN_REPLY`/`CT_F_CLOSING`. The masquerading table's value.
pub type LbFlow = crate::nat::NatEntry;

/// `lb_affinity`'s key: a client and a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbAffinityKey {
    pub client: [u8; 4],
    pub frontend: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// `lb_affinity`'s value: the backend the client was given, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinity {
    pub used_ns: u64,
    pub backend: [u8; 4],
    /// Network byte order.
    pub backend_port: u16,
    /// The slot the backend was last found in: where the datapath looks for it first (one
    /// lookup), before a bounded look through the slots.
    pub slot: u16,
}

const _: () = assert!(core::mem::size_of::<LbKey>() == 12);
const _: () = assert!(core::mem::size_of::<LbEntry>() == 16);
const _: () = assert!(core::mem::size_of::<LbAffinityKey>() == 12);
const _: () = assert!(core::mem::size_of::<LbAffinity>() == 16);

user_pod!(LbKey, LbEntry, LbAffinityKey, LbAffinity);
