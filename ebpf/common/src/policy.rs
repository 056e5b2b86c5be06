//! Policy entries: what an endpoint may exchange with whom.
//!
//! One LPM trie. The key puts the parts that always match exactly first (endpoint, peer
//! identity, direction) and the parts that can be wildcards last (protocol, then port), so that
//! "any protocol", "any port of a protocol" and port ranges are prefixes:
//!
//! ```text
//! | endpoint_id (32) | identity (32) | direction (8) | protocol (8) | dport (16, network order) |
//! |<------------------ always exact: 72 bits ------------------>|
//! prefix 72: any protocol and port   prefix 80: any port of `protocol`
//! prefix 80+k: a power-of-two aligned port block   prefix 96: one port
//! ```
//!
//! A packet costs at most three lookups per direction (its peer's identity, its CIDR identity,
//! and the `ANY` identity), whatever the number of rules. A port range becomes at most 30 aligned
//! blocks. Presence of an entry means "allowed": Kubernetes NetworkPolicy has no deny rules.

use crate::user_pod;

/// Traffic direction, from the local endpoint's point of view.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// The key data (the trie's key is this plus a prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    /// Peer identity, or `identity::ANY`.
    pub identity: u32,
    pub direction: u8,
    /// IP protocol number (`proto::IPPROTO_*`).
    pub protocol: u8,
    /// Destination port in network byte order, so that the trie's bit order is the port's.
    pub dport: [u8; 2],
}

/// Prefix length of a key that matches any protocol and port.
pub const PREFIX_ANY_PROTOCOL: u32 = 72;
/// Prefix length of a key that matches any port of one protocol.
pub const PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of a key that matches exactly one port.
pub const PREFIX_FULL: u32 = 96;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    /// `POLICY_F_*` bits.
    pub flags: u32,
    /// The rule that wrote the entry: a number the agent gives each (namespace, policy,
    /// direction, rule index) while the rule exists, never reused while the agent runs; where
    /// several rules give the same key, the first in that order. 0: none. The datapath copies
    /// it into the events of the flows the entry admits (flow attribution).
    pub rule: u32,
}

/// The entry allows the traffic (the only kind of entry NetworkPolicy needs).
pub const POLICY_F_ALLOW: u32 = 1;

const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(PREFIX_FULL as usize == core::mem::size_of::<PolicyKey>() * 8);
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 8);

user_pod!(PolicyKey, PolicyEntry);
