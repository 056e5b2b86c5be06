//! Node-wide settings (`config`) and the `events` ring buffer.

use aya_ebpf::{
    Global,
    btf_maps::{Array, RingBuf},
    helpers::generated::bpf_ktime_get_ns,
    macros::btf_map,
};
use myelin_common::{
    config::{DatapathConfig, EVENTS_DROPS, EVENTS_VERDICTS, FEATURE_SERVICES},
    event::{EVENT_ALLOWED, EVENT_DROP, FlowEvent},
    maps::EVENTS_BYTES,
};

use crate::{packet::Flow, policy::Peers};

#[btf_map(name = "config")]
static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map(name = "events")]
static EVENTS: RingBuf<FlowEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// `FEATURE_*` bits (see `myelin_common::config::FEATURES_GLOBAL`): in `.rodata`, which the
/// loader freezes, so the verifier reads it as a constant.
#[unsafe(no_mangle)]
static MYELIN_FEATURES: Global<u32> = Global::new(0);

/// Whether the programs were loaded with Services in eBPF.
#[inline(always)]
pub fn services_loaded() -> bool {
    MYELIN_FEATURES.load() & FEATURE_SERVICES != 0
}

#[inline(always)]
pub fn config() -> DatapathConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// What an event says besides the flow.
pub struct Verdict {
    pub reason: u8,
    pub direction: u8,
    pub src_endpoint: u32,
    pub dst_endpoint: u32,
    pub peers: Peers,
    pub ifindex: u32,
    /// The Service frontend the flow was translated from (address, port in network order),
    /// zero when it was not.
    pub service: ([u8; 4], u16),
}

#[inline(always)]
fn emit(kind: u8, flow: &Flow, v: &Verdict) {
    let event = FlowEvent {
        // SAFETY: plain helper call.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        reason: v.reason,
        direction: v.direction,
        protocol: flow.protocol,
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: u16::from_be(flow.sport),
        dport: u16::from_be(flow.dport),
        src_endpoint: v.src_endpoint,
        dst_endpoint: v.dst_endpoint,
        src_identity: v.peers.src.identity,
        dst_identity: v.peers.dst.identity,
        ifindex: v.ifindex,
        service_addr: v.service.0,
        service_port: u16::from_be(v.service.1),
        _pad: [0; 6],
    };
    // A full ring drops the event, never the packet.
    let _ = EVENTS.output(&event, 0);
}

#[inline(always)]
pub fn drop_event(config: &DatapathConfig, flow: &Flow, v: &Verdict) {
    if config.events & EVENTS_DROPS != 0 {
        emit(EVENT_DROP, flow, v);
    }
}

#[inline(always)]
pub fn allowed_event(config: &DatapathConfig, flow: &Flow, v: &Verdict) {
    if config.events & EVENTS_VERDICTS != 0 {
        emit(EVENT_ALLOWED, flow, v);
    }
}
