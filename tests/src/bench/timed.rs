//! Running a child and timing it to the microsecond.
//!
//! The harness's [`crate::process::run`] notices a child's exit by polling every 5 ms, which is
//! fine for a deadline but would add up to 5 ms to a CNI call that takes 20. Here the exit is
//! awaited on a pidfd, which becomes readable the moment the child exits, with the deadline as
//! the poll timeout.

use std::{
    io::{self, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Output, Result, describe};

/// Runs `cmd` with `stdin` as its input; `elapsed` runs from just before the spawn to the exit,
/// so process creation is included, as it is for a container runtime calling a plugin. A child
/// still running at `timeout` is killed and the call fails.
pub fn run_timed(mut cmd: Command, stdin: &[u8], timeout: Duration) -> Result<Output> {
    let command = describe(&cmd);
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    // Drained on threads: a child that fills a pipe must not stall, nor must one that never
    // reads its input (the feeder thread then gets EPIPE and ends).
    let feeder = child.stdin.take().map(|mut pipe| {
        let data = stdin.to_vec();
        thread::spawn(move || drop(pipe.write_all(&data)))
    });
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let exited = wait_for_exit(&child, timeout)
        .map_err(Error::io(format!("waiting for `{command}` to exit")))?;
    let elapsed = started.elapsed();
    if !exited {
        // A kill error means it exited meanwhile; either way it is reaped here.
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Timeout { command, timeout });
    }
    let status = child
        .wait()
        .map_err(Error::io(format!("reaping `{command}`")))?;
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    })
}

/// Whether `child` exited within `timeout` (it is not reaped: `wait` does that).
fn wait_for_exit(child: &Child, timeout: Duration) -> io::Result<bool> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; the pid is our
    // unreaped child, so it cannot have been reused.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(raw)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pidfd out of range"))?;
    // SAFETY: the syscall just returned this fd to us and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        match ready {
            1.. => return Ok(true),
            0 if left.is_zero() => return Ok(false),
            0 => {}
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            // What was read before an error is still worth showing.
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_a_short_child_without_polling_granularity() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo err >&2"]);
        let out = run_timed(cmd, b"in", Duration::from_secs(10)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"in");
        assert_eq!(out.stderr, b"err\n");
        // `sh -c` takes about a millisecond; 5 ms polling would never report below 5 ms.
        let mut fast = Vec::new();
        for _ in 0..5 {
            fast.push(
                run_timed(Command::new("true"), b"", Duration::from_secs(10))
                    .unwrap()
                    .elapsed,
            );
        }
        assert!(
            fast.iter().min().unwrap() < &Duration::from_millis(5),
            "{fast:?}"
        );
    }

    #[test]
    fn kills_a_child_at_its_deadline() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = run_timed(cmd, b"", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
