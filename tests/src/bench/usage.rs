//! What a process costs: resident memory and CPU time, from /proc.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Error, Result};

/// Memory and CPU of one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM`: the peak of `VmRSS` so far, KiB.
    pub peak_rss_kib: u64,
    /// User plus system CPU time since the process started (`utime + stime`).
    pub cpu: Duration,
}

impl Usage {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn of(pid: u32) -> Result<Self> {
        let read = |file: &str| {
            let path = format!("/proc/{pid}/{file}");
            fs::read_to_string(&path).map_err(Error::io(format!("reading {path}")))
        };
        let status = read("status")?;
        let stat = read("stat")?;
        let invalid = |what: &str| Error::Io {
            context: format!("/proc/{pid}: {what}"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        };
        let (rss_kib, peak_rss_kib) =
            parse_memory(&status).ok_or_else(|| invalid("no VmRSS/VmHWM in status"))?;
        let ticks = parse_cpu_ticks(&stat).ok_or_else(|| invalid("unparsable stat"))?;
        Ok(Self {
            rss_kib,
            peak_rss_kib,
            cpu: ticks_to_duration(ticks),
        })
    }
}

/// The pid of the `myelin-agent` serving `socket` (its `--socket` argument). The harness starts
/// agents without handing out their pids; every agent has a socket of its own, so the socket
/// names exactly one.
pub fn agent_pid(socket: &Path) -> Result<u32> {
    let entries = fs::read_dir("/proc").map_err(Error::io("listing /proc"))?;
    let wanted: Vec<&[u8]> = vec![b"--socket", socket.as_os_str().as_encoded_bytes()];
    for entry in entries.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we look: unreadable ones are not ours.
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args
            .first()
            .map(|exe| PathBuf::from(String::from_utf8_lossy(exe).into_owned()))
            .is_some_and(|exe| exe.file_name().is_some_and(|n| n == "myelin-agent"));
        if is_agent && args.windows(2).any(|pair| pair == wanted.as_slice()) {
            return Ok(pid);
        }
    }
    Err(Error::Io {
        context: format!(
            "no myelin-agent with --socket {} is running",
            socket.display()
        ),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// `(VmRSS, VmHWM)` in KiB from `/proc/<pid>/status`.
fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let rest = status.lines().find_map(|l| l.strip_prefix(name))?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// `utime + stime` (fields 14 and 15) in clock ticks from `/proc/<pid>/stat`. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted after its `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = stat.rsplit_once(')')?.1;
    let mut fields = after_name.split_whitespace();
    // After the name come field 3 (state) onwards: utime is field 14, the 12th of these.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second)
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_fields_are_read_in_kib() {
        let status = "Name:\tmyelin-agent\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nThreads:\t4\n";
        assert_eq!(parse_memory(status), Some((40960, 51200)));
        assert_eq!(parse_memory("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn cpu_ticks_are_counted_after_a_name_with_spaces() {
        let stat = "4242 (my agent) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 4 0 \
                    100 200000000 10000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn own_usage_is_readable_and_plausible() {
        let usage = Usage::of(std::process::id()).unwrap();
        assert!(
            usage.rss_kib > 0 && usage.peak_rss_kib >= usage.rss_kib,
            "{usage:?}"
        );
    }

    #[test]
    fn no_agent_serves_a_socket_nobody_uses() {
        let err = agent_pid(Path::new("/nonexistent/myelin-bench.sock")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/myelin-bench.sock"),
            "{err}"
        );
    }
}
