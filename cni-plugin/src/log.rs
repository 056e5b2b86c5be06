//! The optional log file (`logFile`). stdout belongs to the CNI protocol, so logs never go there.

use std::{
    fmt::Display,
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

/// Appends one line per event. Without `logFile`, or if it cannot be opened, lines are dropped:
/// a log problem must never fail a pod's networking.
pub struct Log {
    file: Option<File>,
    /// Says which invocation a line belongs to: many plugin processes append to one file.
    context: String,
}

impl Log {
    /// Opens `path` for appending. A failure is reported once on stderr (the runtime keeps it in
    /// its own log) and logging is off for this invocation.
    pub fn open(path: Option<&Path>, context: String) -> Self {
        let file = path.and_then(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .inspect_err(|e| {
                    eprintln!("myelin: cannot open log file {}: {e}", path.display());
                })
                .ok()
        });
        Self { file, context }
    }

    pub fn line(&self, message: impl Display) {
        let Some(mut file) = self.file.as_ref() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "{}.{:03} myelin[{}] {}: {message}\n",
            now.as_secs(),
            now.subsec_millis(),
            std::process::id(),
            self.context
        );
        // One write per line: with O_APPEND, lines of concurrent invocations do not interleave.
        // A failed log write is not worth failing the command for.
        let _ = file.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_appended_with_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        std::fs::write(&path, "earlier\n").unwrap();
        let log = Log::open(Some(&path), "ADD c1/eth0".into());
        log.line("allocated 10.0.0.2");
        log.line(format_args!("created {}", "lxc1"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "earlier");
        assert!(
            lines[1].ends_with("ADD c1/eth0: allocated 10.0.0.2"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].ends_with("ADD c1/eth0: created lxc1"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn an_unopenable_log_file_disables_logging() {
        let log = Log::open(Some(Path::new("/nonexistent-dir/cni.log")), "DEL".into());
        log.line("dropped");
        assert!(log.file.is_none());
    }
}
