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
}

/// Emit an event for every dropped packet.
pub const EVENTS_DROPS: u32 = 1;
/// Emit an event for every new connection that policy allowed.
pub const EVENTS_VERDICTS: u32 = 2;

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 8);

user_pod!(DatapathConfig);
