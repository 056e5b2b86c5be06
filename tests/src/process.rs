//! Running helper programs (ip, bpftool, ctr, the CNI plugin) with a deadline, so that a hung
//! child fails a test instead of hanging the whole run.

use std::{
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// What a finished child left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// From spawn to exit.
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// `program arg1 arg2 ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with `stdin` as its standard input, capturing stdout and stderr; kills it when
/// it runs longer than `timeout`. A non-zero exit is not an error here (see [`run_ok`]).
pub fn run(mut cmd: Command, stdin: &[u8], timeout: Duration) -> Result<Output> {
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

    // Feed stdin and drain both pipes on their own threads: a child that blocks writing a full
    // pipe, or that never reads its input, must not block us.
    let feeder = child.stdin.take().map(|mut pipe| {
        let data = stdin.to_vec();
        // A child that exits without reading its input closes the pipe: not our failure.
        thread::spawn(move || drop(pipe.write_all(&data)))
    });
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let status = wait_with_deadline(&mut child, started + timeout)
        .map_err(Error::io(format!("waiting for `{command}`")))?;
    let elapsed = started.elapsed();
    let Some(status) = status else {
        // Kill errors mean it exited in the meantime; either way it is reaped below.
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Timeout { command, timeout });
    };
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

/// Like [`run`] with no input, but a non-zero exit is an error carrying the child's stderr.
pub fn run_ok(cmd: Command, timeout: Duration) -> Result<Output> {
    run_ok_with_input(cmd, &[], timeout)
}

/// [`run`] with `stdin`, failing on a non-zero exit with the command and its stderr.
pub fn run_ok_with_input(cmd: Command, stdin: &[u8], timeout: Duration) -> Result<Output> {
    let command = describe(&cmd);
    let output = run(cmd, stdin, timeout)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::CommandFailed {
            command,
            status: output.status.to_string(),
            stderr: output.stderr_text().trim().to_string(),
        })
    }
}

/// Waits until the child exits (and reaps it) or the deadline passes (`Ok(None)`, still
/// running). The exit is awaited on a pidfd, which becomes readable the moment the child exits,
/// so that timings taken around a call (a CNI ADD of a few milliseconds) are not rounded up to
/// a polling interval; no signal handling is involved.
pub fn wait_with_deadline(
    child: &mut Child,
    deadline: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    let pidfd = pidfd_open(child)?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        if unsafe { libc::poll(&mut poll, 1, millis) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A pidfd for our unreaped child (so its pid cannot have been reused).
fn pidfd_open(child: &Child) -> std::io::Result<OwnedFd> {
    let invalid = |what| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let pid = libc::pid_t::try_from(child.id()).map_err(|_| invalid("pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(raw).map_err(|_| invalid("pidfd out of range"))?;
    // SAFETY: the syscall just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Reads `pipe` to its end on a thread of its own; what was read before an error is kept.
pub(crate) fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            // A read error ends the capture; what was read so far is still useful.
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_feeds_stdin() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let out = run(cmd, b"hello", Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn kills_children_that_overrun_their_deadline() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = run(cmd, b"", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn times_a_short_child_without_polling_granularity() {
        // `true` exits within a millisecond or two; a 5 ms polling loop would never report
        // less than 5 ms.
        let fastest = (0..5)
            .map(|_| {
                run(Command::new("true"), b"", Duration::from_secs(10))
                    .unwrap()
                    .elapsed
            })
            .min()
            .unwrap();
        assert!(fastest < Duration::from_millis(5), "{fastest:?}");
    }

    #[test]
    fn run_ok_reports_the_failing_command_and_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken >&2; exit 1"]);
        let err = run_ok(cmd, Duration::from_secs(10)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c") && msg.contains("broken"), "{msg}");
    }
}
