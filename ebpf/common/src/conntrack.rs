//! Connection tracking: replies to allowed connections are allowed, and a flow is checked
//! against policy once, on its first packet.
//!
//! Entries are keyed by the flow's original direction; a packet is a reply when its reversed
//! tuple has an entry. ICMP echo uses the identifier as source port and 0 as destination port,
//! and only an echo *reply* is ever looked up reversed, so an echo request is never taken for a
//! reply. Each entry remembers the policy revision it was checked under: after a policy change
//! the next packet re-checks the flow, so established connections that the new policy no longer
//! allows are cut, and the others go on. A cut flow keeps its entry, marked denied: its packets
//! in either direction are dropped until it expires or a later policy allows it again.
//! Forgetting it instead would let the peer's next packet (a retransmission) open the same flow
//! in the other direction, and the cut side's packets would pass as its replies.

use crate::user_pod;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network byte order (ICMP echo: the identifier).
    pub sport: u16,
    /// Network byte order (ICMP echo: 0).
    pub dport: u16,
    pub protocol: u8,
    // Scalars, not a `[u8; 3]`: zeroing an array makes the BPF backend call memset.
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Read on every packet of a flow, written rarely: the lifetime is extended at most once per
/// [`timeout::REFRESH`] and the flags only when they change, so that the two CPUs a
/// conversation runs on do not bounce the entry's cache line between them on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, at tick resolution) after which the entry
    /// is dead.
    pub expires_ns: u64,
    /// Policy revision the flow was last allowed under (see `DatapathConfig`).
    pub revision: u32,
    /// `CT_F_*` bits.
    pub flags: u32,
}

/// A packet in the reply direction was seen.
pub const CT_F_SEEN_REPLY: u32 = 1;
/// TCP: a FIN or RST was seen; the entry expires soon.
pub const CT_F_CLOSING: u32 = 2;
/// The flow entered the pod from the node's stack (e.g. after a Service DNAT): its replies go
/// back through the stack, so that the reverse translation happens.
pub const CT_F_FROM_STACK: u32 = 4;
/// Policy no longer allows the flow (cut by a policy change): its packets are dropped, both
/// ways, as denied by the destination's ingress policy...
pub const CT_F_DENIED_INGRESS: u32 = 8;
/// ...or by the source's egress policy.
pub const CT_F_DENIED_EGRESS: u32 = 16;

/// The flow was translated from a Service's frontend to a backend (see `crate::lb`): its replies
/// are translated back from the `in` entry of `lb_flows`.
pub const CT_F_SERVICE: u32 = 32;
/// The flow came in through the uplink to a NodePort or external IP frontend (see
/// `crate::lb`) and was delivered to a backend on this node: its replies leave through the
/// uplink again, to the client, once translated back (the frontend may be the node's own
/// address, which the node's stack refuses as the source of a packet it forwards).
pub const CT_F_NODEPORT: u32 = 64;

/// Lifetimes, refreshed by every packet.
pub mod timeout {
    const SECOND: u64 = 1_000_000_000;
    /// TCP after the reply direction was seen.
    pub const TCP_ESTABLISHED: u64 = 6 * 3600 * SECOND;
    /// TCP before any reply (a SYN that may never be answered).
    pub const TCP_OPENING: u64 = 60 * SECOND;
    /// TCP after FIN or RST.
    pub const TCP_CLOSING: u64 = 10 * SECOND;
    pub const UDP: u64 = 60 * SECOND;
    pub const OTHER: u64 = 30 * SECOND;
    /// How stale a lifetime may get before a packet writes the new one.
    pub const REFRESH: u64 = SECOND;
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 16);

user_pod!(CtKey, CtEntry);
