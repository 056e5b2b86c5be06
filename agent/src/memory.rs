//! Giving back to the kernel memory the allocator holds but no longer uses.

/// Returns the free pages of every malloc arena to the kernel (glibc's `malloc_trim(0)`): after
/// a burst of allocation, such as the first sync of a large cluster (list pages, objects
/// decoded, converted into the index, then dropped), glibc keeps the freed memory in its arenas
/// for reuse, and it counts in the agent's resident memory until then. A no-op with other C
/// libraries.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it walks the allocator's own free lists under its
    // locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
