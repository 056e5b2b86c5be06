//! Tail calls: code that only some packets need runs as a program of its own, so that the
//! verifier checks it once by itself instead of once for every way through the program it
//! would otherwise be part of (the load of the programs, and so a node's start, stays short).
//!
//! Node ports: `from_uplink` and `from_tunnel` hand packets to node ports and external IPs to
//! `nodeport_in` (see `crate::nodeport`).
//!
//! Services: `from_container` hands a pod's packet to a frontend to `from_container_lb`,
//! which translates it and hands it back to `from_container` (or refuses it). The way back
//! carries what the translation did in [`Handoff`], a per-CPU slot: a tail call runs at once
//! on the CPU that made it, so `from_container` finds the slot as `from_container_lb` left it
//! a moment before, and empties it before anything else can run there.

use aya_ebpf::{
    EbpfContext,
    btf_maps::{PerCpuArray, ProgramArray},
    macros::btf_map,
};
use myelin_common::maps::{
    TAIL_FROM_CONTAINER, TAIL_FROM_CONTAINER_LB, TAIL_NODEPORT_IN, TAIL_SLOTS,
};

/// The programs tail calls go to (`myelin_common::maps::TAIL_*`); the agent fills it in.
#[btf_map(name = "tail_calls")]
static TAIL_CALLS: ProgramArray<{ TAIL_SLOTS as usize }> = ProgramArray::new();

/// What `from_container_lb` did to the packet it hands back.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    /// The pod's host veth the packet came in on: a handoff is only for a packet of it.
    ifindex: u32,
    /// `HANDOFF_*` bits; 0: the slot is empty.
    pub flags: u32,
    /// The frontend the packet was addressed to (for events).
    pub frontend: [u8; 4],
    /// Network byte order.
    pub frontend_port: u16,
    _pad: u16,
}

/// The slot holds a handoff.
const HANDOFF_SET: u32 = 1;
/// The packet was translated to a backend: its conntrack entry gets `CT_F_SERVICE`.
pub const HANDOFF_TRANSLATED: u32 = 2;
/// The backend is the sending pod itself (`lb::HAIRPIN`): its source is `lb::HAIRPIN`.
pub const HANDOFF_HAIRPIN: u32 = 4;

#[btf_map(name = "lb_handoff")]
static HANDOFF: PerCpuArray<Handoff, 1> = PerCpuArray::new();

/// Jumps to `from_container_lb`. Returns only when it could not (not loaded).
#[inline(always)]
pub fn to_translator<C: EbpfContext>(ctx: &C) {
    // SAFETY: the jump target is a program of the same type, given the same context.
    unsafe { TAIL_CALLS.tail_call(ctx, TAIL_FROM_CONTAINER_LB) };
}

/// Jumps to `nodeport_in` (see `crate::nodeport`). Returns only when it could not.
#[inline(always)]
pub fn to_nodeport<C: EbpfContext>(ctx: &C) {
    // SAFETY: as in `to_translator`.
    unsafe { TAIL_CALLS.tail_call(ctx, TAIL_NODEPORT_IN) };
}

/// Hands the packet back to `from_container` with `flags` (`HANDOFF_*`). Returns only when
/// the jump failed, with the slot emptied again.
#[inline(always)]
pub fn hand_back<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    flags: u32,
    (frontend, frontend_port): ([u8; 4], u16),
) {
    let Some(slot) = HANDOFF.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the lookup's pointer, to this CPU's value.
    unsafe {
        *slot = Handoff {
            ifindex,
            flags: flags | HANDOFF_SET,
            frontend,
            frontend_port,
            _pad: 0,
        }
    };
    // SAFETY: as in `to_translator`.
    unsafe { TAIL_CALLS.tail_call(ctx, TAIL_FROM_CONTAINER) };
    // SAFETY: as above.
    unsafe { (*slot).flags = 0 };
}

/// The handoff for a packet of `ifindex`, if the packet comes from `from_container_lb`;
/// the slot is emptied either way.
#[inline(always)]
pub fn take_handoff(ifindex: u32) -> Option<Handoff> {
    let slot = HANDOFF.get_ptr_mut(0)?;
    // SAFETY: the lookup's pointer, to this CPU's value.
    let h = unsafe { *slot };
    if h.flags & HANDOFF_SET == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { (*slot).flags = 0 };
    (h.ifindex == ifindex).then_some(h)
}
