//! cgroup v2 directories of a test's own, for the socket-level load balancing tests: the agent
//! attaches its socket programs to one (`--cgroup-root`) and the test moves the client
//! *processes* it starts into it. Never the machine's root cgroup or its cgroup2 mount itself:
//! only a child named with the run's prefix (`<mount>/myelin-t<pid>-<n>-<what>`), removed on
//! drop (also in a panic) and by the sweeper when a killed run left it.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{Signal, kill},
        statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs},
    },
    unistd::Pid,
};

use crate::{Error, Result, RunPrefix, process};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` on hybrid hosts (these machines), else
/// `/sys/fs/cgroup` on unified ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| statfs(p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC))
        .ok_or_else(|| Error::Io {
            context: "no cgroup2 mount at /sys/fs/cgroup/unified or /sys/fs/cgroup".into(),
            source: std::io::ErrorKind::NotFound.into(),
        })
}

/// A child cgroup of the cgroup2 mount, removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// `<cgroup2 mount>/<run>-<what>`.
    pub fn create(run: &RunPrefix, what: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(run.name(what));
        fs::create_dir(&path).map_err(Error::io(format!("creating cgroup {}", path.display())))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s process move itself into this cgroup before it executes its program, so
    /// that everything it runs is in the cgroup from its first instruction. Add it after the
    /// namespace is entered or before, either works: cgroup and network namespace are
    /// independent.
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| Error::Cluster(format!("{} holds a NUL", self.path.display())))?;
        // SAFETY: between fork and exec only open, write and close on a path prepared before
        // the fork: no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Moves this whole process (every thread: cgroup v2 moves processes, not threads) into
    /// the cgroup until the guard drops, which moves it back where it was. For a harness whose
    /// own threads are the clients (the benchmarks'). The guard borrows the cgroup, so it
    /// drops first; the cgroup's drop never kills the harness itself in any case.
    pub fn move_this_process_in(&self) -> Result<ProcessInside<'_>> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(Error::io("reading /proc/self/cgroup"))?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| Error::Cluster("/proc/self/cgroup has no cgroup v2 line".into()))?;
        let back = cgroup2_mount()?.join(relative.trim_start_matches('/'));
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, "0").map_err(Error::io(format!("writing {}", procs.display())))?;
        Ok(ProcessInside {
            _cgroup: self,
            back,
        })
    }

    /// The programs attached to this cgroup, as `bpftool cgroup show` lists them: (attach
    /// type, program name, program id).
    pub fn attached_programs(&self) -> Result<Vec<(String, String, u64)>> {
        let mut cmd = Command::new("bpftool");
        cmd.args(["-j", "cgroup", "show"]).arg(&self.path);
        let out = process::run_ok(cmd, Duration::from_secs(10))?;
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        let listed: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(Error::json(format!(
                "parsing `bpftool cgroup show {}`",
                self.path.display()
            )))?;
        Ok(listed
            .iter()
            .map(|p| {
                let text = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                let id = p.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
                (text("attach_type"), text("name"), id)
            })
            .collect())
    }
}

/// This process inside a [`TestCgroup`] (see [`TestCgroup::move_this_process_in`]).
#[derive(Debug)]
pub struct ProcessInside<'a> {
    _cgroup: &'a TestCgroup,
    back: PathBuf,
}

impl Drop for ProcessInside<'_> {
    fn drop(&mut self) {
        let procs = self.back.join("cgroup.procs");
        if let Err(e) = fs::write(&procs, "0") {
            eprintln!(
                "cleanup: moving the harness back to {}: {e}",
                procs.display()
            );
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// The cgroup v1 hierarchies of a hybrid host (`/sys/fs/cgroup/<controller>`), where runc also
/// makes a container's cgroup, and leaves the parents it made on the way (a test's cgroup
/// name under each) when it removes the container's.
pub fn v1_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| statfs(p).is_ok_and(|s| s.filesystem_type() == CGROUP_SUPER_MAGIC))
        .collect()
}

/// Kills the processes still in the cgroup and its children (only processes a test moved
/// there, or containers runc placed there: the cgroup is the run's own) and removes them,
/// children first; `rmdir` fails while a cgroup holds any. The same name in each cgroup v1
/// hierarchy goes too (see [`v1_hierarchies`]).
pub(crate) fn remove(path: &Path) -> Result<()> {
    let twins: Vec<PathBuf> = match path.file_name() {
        Some(name) => v1_hierarchies().into_iter().map(|h| h.join(name)).collect(),
        None => Vec::new(),
    };
    for cgroup in std::iter::once(path.to_path_buf()).chain(twins) {
        remove_tree(&cgroup)?;
    }
    Ok(())
}

fn remove_tree(path: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(path) {
        for child in entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        {
            remove_tree(&child.path())?;
        }
    }
    remove_one(path)
}

fn remove_one(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        let own = std::process::id() as i32;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if pid == own {
                // A guard that could not move the harness back: out to the mount's root.
                let root = path.parent().map(|p| p.join("cgroup.procs"));
                if let Some(root) = root {
                    let _ = fs::write(root, "0");
                }
                continue;
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io(format!("removing cgroup {}", path.display()))(e)),
        }
    }
}
