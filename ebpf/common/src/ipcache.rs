//! The ipcache: which identity an address belongs to.
//!
//! An LPM trie keyed by IPv4 prefix. Pod and node addresses are /32 entries; every prefix that
//! a policy's `ipBlock` names (its `cidr` and each `except`) is an entry of its own. Because a
//! pod's /32 is more specific than any policy prefix, the pod entry also carries the identity of
//! the most specific policy prefix containing it (`cidr_identity`): that is how `ipBlock` rules
//! apply to pod addresses too, at the cost of one lookup. Addresses with no entry belong to
//! `WORLD`.

use crate::user_pod;

/// Reserved identities. Pod identities are derived from labels (from 256); CIDR identities have
/// the top bit set.
pub mod identity {
    /// Wildcard in policy keys ("any peer"); never an address's identity.
    pub const ANY: u32 = 0;
    /// The local node: its traffic to its own pods is always allowed (kubelet probes).
    pub const HOST: u32 = 1;
    /// Anything outside the cluster.
    pub const WORLD: u32 = 2;
    /// Other nodes of the cluster.
    pub const REMOTE_NODE: u32 = 3;
    /// First identity derived from labels.
    pub const FIRST_POD: u32 = 256;
    /// Identities of policy CIDR prefixes carry this bit.
    pub const CIDR_FLAG: u32 = 1 << 31;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheEntry {
    /// Identity of the address (a pod's, a node's, or `WORLD` for a bare prefix).
    pub identity: u32,
    /// Identity of the most specific policy prefix containing the address, or `WORLD`.
    pub cidr_identity: u32,
    /// For an address behind another node of the cluster (its pods, its pod CIDR, the node
    /// itself): that node's InternalIP, where the tunnel leads or native routing sends the
    /// packet. Zero for local and outside addresses.
    pub node: [u8; 4],
    pub _pad: u32,
}

impl IpcacheEntry {
    /// An address with no entry: outside the cluster.
    pub const WORLD: Self = Self {
        identity: identity::WORLD,
        cidr_identity: identity::WORLD,
        node: [0; 4],
        _pad: 0,
    };
}

const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 16);

user_pod!(IpcacheEntry);
