//! Which CPU a flow runs on.
//!
//! Both ends of a flow share one CPU. On a two-core machine shared with builds, unpinned
//! ping-pong figures swung threefold between runs with the scheduler's placement (a wakeup on
//! the other core costs more than the whole datapath); pinned, a figure is the CPU cost of the
//! traffic, which is what a datapath changes. Flow `i` uses CPU `cpus - 1 - i % cpus`, so
//! several flows spread over every core.

use std::{io, thread};

/// The CPU flow `flow` runs on.
pub fn flow_cpu(flow: usize) -> usize {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    cpus - 1 - flow % cpus
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: writes the bit for `cpu` inside `set` (an index beyond the set panics).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid and its size is passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_spread_over_every_cpu_starting_from_the_last() {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(flow_cpu(0), cpus - 1);
        let used: std::collections::BTreeSet<usize> = (0..cpus).map(flow_cpu).collect();
        assert_eq!(used.len(), cpus);
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let cpu = flow_cpu(0);
        let allowed = thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            // SAFETY: plain data, filled in by the kernel below.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: pid 0 is this thread; the set's size is passed.
            let rc = unsafe {
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
            };
            assert_eq!(rc, 0);
            // SAFETY: counts bits of a valid set.
            unsafe { libc::CPU_COUNT(&set) }
        })
        .join()
        .unwrap();
        assert_eq!(allowed, 1);
    }
}
