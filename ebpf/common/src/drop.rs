//! Why the datapath dropped a packet: one list shared by the programs, the drop counters, the
//! events and the CLI.

/// Stored as the index of the `drops` per-CPU array, so values are small and stable: add new
/// reasons at the end, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A packet arrived on an interface that has no endpoint entry (stale attachment).
    NoEndpoint = 1,
    /// A pod sent with a source IPv4 address that is not its own.
    SpoofedSourceIp = 2,
    /// A pod sent with a source MAC that is not its own.
    SpoofedSourceMac = 3,
    /// A header was truncated or invalid.
    Malformed = 4,
    /// No policy allows the connection into the destination pod.
    PolicyDeniedIngress = 5,
    /// No policy allows the connection out of the source pod.
    PolicyDeniedEgress = 6,
    /// A new connection could not be tracked (conntrack map insert failed).
    ConntrackFull = 7,
    /// The pod's policy entries did not all fit in the policy map; new connections of a pod
    /// whose policy is incomplete are dropped rather than allowed by accident.
    PolicyIncomplete = 8,
    /// A packet from the tunnel without a tunnel key, or whose outer source is not a node of
    /// the cluster: nobody else may claim a source identity.
    TunnelPeerUnknown = 9,
    /// A packet routed into the tunnel whose destination is behind no node.
    TunnelNoNode = 10,
    /// Masquerading found no free port for a new flow to that remote address and port (or, for
    /// SCTP, whose checksum covers the ports, the pod's own port was taken).
    NatPortExhausted = 11,
    /// A new connection to a Service frontend that has no usable backend: refused (TCP reset,
    /// ICMP port unreachable) rather than left to time out.
    NoServiceBackend = 12,
    /// A reply of a translated connection whose translation is gone (evicted from `lb_flows`):
    /// it cannot be turned back into the frontend's.
    ServiceTranslationLost = 13,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 13] = [
        DropReason::NoEndpoint,
        DropReason::SpoofedSourceIp,
        DropReason::SpoofedSourceMac,
        DropReason::Malformed,
        DropReason::PolicyDeniedIngress,
        DropReason::PolicyDeniedEgress,
        DropReason::ConntrackFull,
        DropReason::PolicyIncomplete,
        DropReason::TunnelPeerUnknown,
        DropReason::TunnelNoNode,
        DropReason::NatPortExhausted,
        DropReason::NoServiceBackend,
        DropReason::ServiceTranslationLost,
    ];
    /// Capacity of the `drops` array: room for reasons added later.
    pub const MAX: u32 = 64;

    pub const fn from_u32(v: u32) -> Option<Self> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u32 == v {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// Stable name used in metrics labels, events and `myelinctl`.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoEndpoint => "no-endpoint",
            DropReason::SpoofedSourceIp => "spoofed-source-ip",
            DropReason::SpoofedSourceMac => "spoofed-source-mac",
            DropReason::Malformed => "malformed",
            DropReason::PolicyDeniedIngress => "policy-denied-ingress",
            DropReason::PolicyDeniedEgress => "policy-denied-egress",
            DropReason::ConntrackFull => "conntrack-full",
            DropReason::PolicyIncomplete => "policy-incomplete",
            DropReason::TunnelPeerUnknown => "tunnel-peer-unknown",
            DropReason::TunnelNoNode => "tunnel-no-node",
            DropReason::NatPortExhausted => "nat-port-exhausted",
            DropReason::NoServiceBackend => "no-service-backend",
            DropReason::ServiceTranslationLost => "service-translation-lost",
        }
    }
}

/// Per-CPU packet and byte count of one drop reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<DropCounter>() == 16);
const _: () = assert!((DropReason::ALL.len() as u32) < DropReason::MAX);

crate::user_pod!(DropCounter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_index() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_u32(r as u32), Some(r));
        }
        assert_eq!(DropReason::from_u32(0), None);
    }
}
