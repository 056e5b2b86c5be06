//! Node-wide settings (`config`), the `events` ring buffer and its per-CPU rate limit.

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{Array, PerCpuArray, RingBuf},
    helpers::generated::bpf_ktime_get_ns,
    macros::btf_map,
};
use myelin_common::{
    config::{CONFIG_F_TUNNEL, DatapathConfig, EVENTS_DROPS, EVENTS_VERDICTS, FEATURE_SERVICES},
    event::{
        EVENT_ALLOWED, EVENT_DROP, EVENT_WAKEUP_EVERY, EVENT_WINDOW_NS, EventBudget, FlowEvent,
        ObservationPoint,
    },
    maps::EVENTS_BYTES,
};

use crate::{packet::Flow, policy::Peers};

#[btf_map(name = "config")]
static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map(name = "events")]
static EVENTS: RingBuf<FlowEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

#[btf_map(name = "event_budget")]
static EVENT_BUDGET: PerCpuArray<EventBudget, 1> = PerCpuArray::new();

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
#[derive(Clone, Copy)]
pub struct Verdict {
    pub reason: u8,
    pub direction: u8,
    pub src_endpoint: u32,
    pub dst_endpoint: u32,
    pub peers: Peers,
    pub ifindex: u32,
    /// `ObservationPoint` of the program.
    pub point: u8,
    /// The Service frontend the flow was translated from (address, port in network order),
    /// zero when it was not.
    pub service: ([u8; 4], u16),
}

#[inline(always)]
fn emit(config: &DatapathConfig, kind: u8, flow: &Flow, v: &Verdict) {
    output(
        config,
        FlowEvent {
            timestamp_ns: 0,
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
            point: v.point,
            _pad: 0,
            egress_rule: v.peers.egress_rule,
            ingress_rule: v.peers.ingress_rule,
            _reserved: 0,
        },
    );
}

/// Puts `event` (its time stamped here) in the ring, within this CPU's budget.
#[inline(always)]
pub fn output(config: &DatapathConfig, mut event: FlowEvent) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot. A tc program (softirq) may interrupt a socket program (process
    // context, migration disabled) on the same CPU between its read and write of a count: the
    // count is then off by one, nothing worse (plain integers, no pointer in the slot).
    let budget = unsafe { &mut *budget };
    // A fixed one-second window per CPU: no lock, no division, one map lookup per event.
    if config.events_rate != 0 {
        if now.wrapping_sub(budget.window_start_ns) >= EVENT_WINDOW_NS {
            budget.window_start_ns = now;
            budget.sent = 0;
        }
        if budget.sent >= u64::from(config.events_rate) {
            budget.rate_limited += 1;
            return;
        }
    }
    budget.sent = budget.sent.wrapping_add(1);
    // The first event of each batch wakes the agent, the others wait for its next drain.
    let wakeup = if budget.sent & (EVENT_WAKEUP_EVERY - 1) == 1 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    event.timestamp_ns = now;
    // A full ring drops the event, never the packet; the loss is counted.
    if EVENTS.output(&event, u64::from(wakeup)).is_err() {
        budget.ring_full += 1;
    }
}

#[inline(always)]
pub fn drop_event(config: &DatapathConfig, flow: &Flow, v: &Verdict) {
    if config.events & EVENTS_DROPS != 0 {
        emit(config, EVENT_DROP, flow, v);
    }
}

#[inline(always)]
pub fn allowed_event(config: &DatapathConfig, flow: &Flow, v: &Verdict) {
    if config.events & EVENTS_VERDICTS != 0 {
        // A new connection a pod opens is shown where it goes, when not to a pod of this node:
        // into the tunnel or out of the uplink (a pod on another node, from the ipcache entry
        // policy looked up), else to the node's stack.
        if v.point == ObservationPoint::FromPod as u8 && v.dst_endpoint == 0 {
            let point = if v.peers.dst.node == [0; 4] {
                ObservationPoint::ToStack
            } else if config.flags & CONFIG_F_TUNNEL != 0 {
                ObservationPoint::ToTunnel
            } else {
                ObservationPoint::ToUplink
            };
            let v = Verdict {
                point: point as u8,
                ..*v
            };
            emit(config, EVENT_ALLOWED, flow, &v);
            return;
        }
        emit(config, EVENT_ALLOWED, flow, v);
    }
}
