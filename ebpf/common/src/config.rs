//! Node-wide datapath settings, in a one-entry array the agent writes.

use crate::user_pod;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Bumped by the agent whenever policy-relevant state changes (policy entries, identities,
    /// isolation): conntrack entries checked under an older revision are re-checked.
    pub policy_revision: u32,
    /// `EVENTS_*` bits: which events go to the `events` ring buffer.
    pub events: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// The node's InternalIP: the source address of masqueraded traffic and the local end of
    /// the tunnel. Zero when the node has none yet.
    pub node_ip: [u8; 4],
    /// ifindex of `myelin_vxlan` (tunnel mode), 0 otherwise.
    pub tunnel_ifindex: u32,
    /// ifindex of the uplink (the device holding the node's InternalIP), 0 when unknown.
    pub uplink_ifindex: u32,
    /// This node's pod CIDR (network address and mask): masquerading translates packets whose
    /// source it holds, and native routing delivers packets from the uplink whose destination
    /// it holds straight into the pod. A mask compare rather than an endpoint lookup keeps the
    /// node's own traffic, tunnel packets included, at no map lookup on the uplink. All zero:
    /// unknown.
    pub pod_cidr: [u8; 4],
    pub pod_cidr_mask: [u8; 4],
    /// The ports masquerading allocates from, inclusive, host byte order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// Events each CPU may emit per second (`--flow-events-rate`); beyond it they are counted
    /// in `event_budget` as rate-limited and not emitted. 0: no limit.
    pub events_rate: u32,
    /// The uplink's subnet that holds `node_ip` (network address and mask), in native routing:
    /// a node in it is the next hop of the agent's route to its pods, so its pods' packets go
    /// to it through `bpf_redirect_neigh` without a FIB lookup; other nodes' go through the
    /// FIB. All zero: every node through the FIB.
    pub uplink_net: [u8; 4],
    pub uplink_mask: [u8; 4],
}

/// Pods on other nodes are reached through the VXLAN tunnel (`--routing-mode tunnel`).
pub const CONFIG_F_TUNNEL: u32 = 1;
/// Pods on other nodes are reached unencapsulated through the uplink (`--routing-mode native`).
pub const CONFIG_F_NATIVE: u32 = 2;
/// Pod traffic leaving the cluster is source-NATed to `node_ip` (`--masquerade`).
pub const CONFIG_F_MASQUERADE: u32 = 4;

/// Services are translated in eBPF (`--kube-proxy-replacement`; see `crate::lb`).
pub const CONFIG_F_SERVICES: u32 = 8;
/// `skb->mark` of a pod's packet that `from_container` routed to a pod on another node through
/// the uplink itself (native routing, masquerading on): `to_uplink`, the first program on the
/// uplink's egress, takes it as "not to be masqueraded", skips its lookup and clears the mark,
/// so nothing after it sees the mark. Never set on packets that go to the node's stack (where
/// marks steer routing and netfilter) or to another device.
pub const MARK_ROUTED_TO_NODE: u32 = 0x6d79_0001;

/// The name of the datapath's read-only global that holds its `FEATURE_*` bits, set by the
/// agent when it loads the programs. Being constant for the verifier, it lets it skip the code
/// of a feature that is off altogether: that code costs no verification time at load (a node's
/// start, and so its join time), where a `CONFIG_F_*` flag would leave every path to be checked.
pub const FEATURES_GLOBAL: &str = "MYELIN_FEATURES";
/// Services in eBPF (translation and translation back) are in the programs: the agent loads
/// them with it under `--kube-proxy-replacement`. `CONFIG_F_SERVICES` still turns them on.
pub const FEATURE_SERVICES: u32 = 1;

/// Emit an event for every dropped packet.
pub const EVENTS_DROPS: u32 = 1;
/// Emit an event for every new connection that policy allowed.
pub const EVENTS_VERDICTS: u32 = 2;

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 48);

user_pod!(DatapathConfig);
