//! Events on the `events` ring buffer: drops and policy verdicts, with the 5-tuple, both
//! endpoints and identities, and the reason. Off unless the agent enables them
//! (`DatapathConfig::events`), so they cost nothing by default.

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
    pub _pad: [u8; 6],
}

pub const EVENT_DROP: u8 = 1;
pub const EVENT_ALLOWED: u8 = 2;

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 56);

user_pod!(FlowEvent);
