//! Masquerading: pod traffic that leaves the cluster through the uplink is source-NATed to the
//! node's InternalIP, in eBPF (`to_uplink` on the uplink's tc egress, `from_uplink` on its
//! ingress), with no iptables rule.
//!
//! The `snat` table holds both directions of every translated flow, as Cilium's SNAT map does:
//!
//! ```text
//! out: {pod, remote, pod port, remote port, proto, NAT_OUT} -> {node_ip, nat port}
//! in:  {remote, node_ip, remote port, nat port, proto, NAT_IN} -> {pod, pod port}
//! ```
//!
//! Each key is a packet's tuple as that packet carries it, so both programs look their packet
//! up with what they just read. A port is taken for a remote (address, port, protocol) when its
//! `in` entry exists: allocation inserts that entry with `BPF_NOEXIST`, so two CPUs can never
//! hand out the same port, and only then the `out` entry. ICMP echo uses the identifier as the
//! pod's port (remote port 0), like conntrack.
//!
//! Both entries of a flow carry the same lifetime, conntrack's ([`crate::conntrack::timeout`],
//! with the same TCP states in `flags`), refreshed together at most once per
//! [`crate::conntrack::timeout::REFRESH`]; a refresh also checks that the other entry is still
//! there and still this flow's (the LRU map can evict one of a pair). The agent removes expired
//! entries; before it does, a new flow that picks an expired flow's port takes it over (the
//! `in` entry overwritten), so a port is free as soon as its flow expires, as in conntrack.
//! Two CPUs taking over the same expired port at the same instant are not excluded; the loser
//! finds its `in` entry taken at its first refresh and moves to another port.

use crate::user_pod;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network byte order (ICMP echo: `out` the identifier, `in` 0).
    pub sport: u16,
    /// Network byte order (ICMP echo: `out` 0, `in` the identifier).
    pub dport: u16,
    pub protocol: u8,
    /// [`NAT_OUT`] or [`NAT_IN`].
    pub direction: u8,
    pub _pad: u16,
}

/// The key of a packet the pod sent, before translation.
pub const NAT_OUT: u8 = 1;
/// The key of a reply as it arrives, addressed to the node.
pub const NAT_IN: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// `bpf_ktime_get_coarse_ns()` after which the agent removes the entry (conntrack's clock).
    pub expires_ns: u64,
    /// What the packet's address becomes: `out` the node's address, `in` the pod's.
    pub addr: [u8; 4],
    /// What its port becomes (network byte order): `out` the NAT port, `in` the pod's port.
    pub port: u16,
    /// conntrack's `CT_F_SEEN_REPLY` and `CT_F_CLOSING`: the flow's lifetime follows them.
    pub flags: u16,
}

/// A prefix whose traffic keeps the pod's address (the value of `masq_exclude`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasqExclude {
    /// `MASQ_EXCLUDE_*`: why the prefix is there, for readers of `bpftool map dump`.
    pub reason: u32,
}

/// A node's pod CIDR (this node's or another's).
pub const MASQ_EXCLUDE_POD_CIDR: u32 = 1;
/// A node's InternalIP.
pub const MASQ_EXCLUDE_NODE: u32 = 2;
/// A prefix of `--non-masquerade-cidrs`.
pub const MASQ_EXCLUDE_CONFIGURED: u32 = 3;

/// How many ports allocation tries for a new flow before it gives up (drop reason
/// `nat-port-exhausted`): the original port, then random ones in the range.
pub const NAT_RETRIES: u32 = 32;

const _: () = assert!(core::mem::size_of::<NatKey>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 16);
const _: () = assert!(core::mem::size_of::<MasqExclude>() == 4);

user_pod!(NatKey, NatEntry, MasqExclude);
