//! Acting as an unprivileged user from inside a root test process.

use std::{io, thread};

use crate::{Error, Result};

/// uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;

/// Runs `f` on a dedicated thread with nobody's credentials (uid and gid 65534, no
/// supplementary groups, so no capabilities).
///
/// Raw syscalls on purpose: glibc's `setuid()` and friends change every thread of the process,
/// which would drop root for the whole test binary, while the kernel keeps credentials per
/// thread. The thread ends with `f`, so the changed credentials never run anything else.
pub fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name("as-nobody".into())
            .spawn_scoped(scope, move || {
                drop_to_nobody()
                    .map_err(Error::io("dropping this thread's credentials to nobody"))?;
                Ok(f())
            })
            .map_err(Error::io("starting a thread"))?;
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn drop_to_nobody() -> io::Result<()> {
    let id = libc::c_long::from(NOBODY);
    let no_groups = std::ptr::null::<libc::gid_t>();
    // SAFETY: plain syscalls with integer arguments (and an empty group list) that only change
    // the calling thread's credentials. Groups and gid first: after setresuid the thread may
    // no longer change them.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            0 as libc::c_long,
            no_groups,
        ))?;
        check(libc::syscall(libc::SYS_setresgid, id, id, id))?;
        check(libc::syscall(libc::SYS_setresuid, id, id, id))
    }
}

fn check(syscall_result: libc::c_long) -> io::Result<()> {
    if syscall_result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
