//! Dropping a packet: always with a reason, always counted.

use aya_ebpf::{
    bindings::TC_ACT_SHOT, btf_maps::PerCpuArray, macros::btf_map, programs::TcContext,
};
use myelin_common::{DropReason, drop::DropCounter};

const MAX_REASONS: usize = DropReason::MAX as usize;

/// Packets and bytes dropped, indexed by [`DropReason`].
#[btf_map(name = "drops")]
static DROPS: PerCpuArray<DropCounter, MAX_REASONS> = PerCpuArray::new();

/// Counts the drop and returns the verdict to hand back to TC.
#[inline(always)]
pub fn drop(ctx: &TcContext, reason: DropReason) -> i32 {
    if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot: only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    TC_ACT_SHOT as i32
}
