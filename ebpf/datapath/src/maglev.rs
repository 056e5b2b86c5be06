//! Maglev consistent hashing (`--lb-algorithm maglev`): a new connection to a frontend reached
//! from outside takes the backend slot its flow hashes to in the frontend's lookup table, the
//! same on every node (see `myelin_common::maglev`). One lookup, one bounded read; no table
//! (the algorithm is random, a ClusterIP, a table that did not fit) or an entry the slots do
//! not back: `None`, and `crate::lb::choose` picks a random slot as before.

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, btf_maps::HashMap, macros::btf_map};
use myelin_common::{
    lb::{LB_F_EXTERNAL_IP, LB_F_LOAD_BALANCER, LB_F_NODEPORT, LbEntry, LbKey},
    maglev::MaglevTable,
    maps::DEFAULT_MAX_LB_MAGLEV,
};

pub use myelin_common::maglev::flow_hash;

/// Each outside frontend's lookup table, keyed by its slot 0. Written only with
/// `--lb-algorithm maglev`. Capacity: `--max-lb-maglev`.
#[btf_map(name = "lb_maglev")]
static LB_MAGLEV: HashMap<
    LbKey,
    MaglevTable,
    { DEFAULT_MAX_LB_MAGLEV as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The backend slot (`1..=service.count`) the table of `frontend` (a slot 0 key) gives the
/// flow hashing to `hash`, when `frontend` is reached from outside and has a table.
#[inline(always)]
pub fn slot(frontend: &LbKey, service: &LbEntry, hash: u32) -> Option<u16> {
    if service.flags & (LB_F_NODEPORT | LB_F_EXTERNAL_IP | LB_F_LOAD_BALANCER) == 0 {
        return None;
    }
    // SAFETY: a reference into the map's value, read at once (never copied: 32 KiB).
    let table = unsafe { LB_MAGLEV.get(frontend) }?;
    // Sizes are odd primes: `| 1` spares the division by zero its branch.
    let i = (hash % (table.size | 1)) as usize;
    let n = *table.slots.get(i)?;
    // One comparison for 1..=count: 0 wraps to the top.
    (n.wrapping_sub(1) < service.count).then_some(n)
}
