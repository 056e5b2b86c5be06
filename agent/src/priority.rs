//! Bulk work runs at a lower CPU priority than the owner of the agent's state and the API: the
//! conntrack collector walking a full table, the directory source parsing files, the Kubernetes
//! source decoding a relist of a large cluster. On a node whose CPUs are busy, a CNI ADD then
//! waits for none of them.

use tracing::warn;

/// The nice value of background threads (the agent's own threads stay at 0).
const BACKGROUND_NICE: libc::c_int = 10;

/// Lowers the calling thread's CPU priority (Linux sets nice per thread); one that cannot be
/// lowered runs on at the normal priority.
pub fn background_thread() {
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE)
    };
    if result != 0 {
        warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the priority of a background thread"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_background_thread_is_niced_and_others_are_not() {
        let nice = || {
            // SAFETY: as above.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        };
        let before = nice();
        let inside = std::thread::spawn(move || {
            super::background_thread();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(inside, before + super::BACKGROUND_NICE);
        assert_eq!(nice(), before, "only the calling thread");
    }
}
