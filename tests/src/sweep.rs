//! Removing what earlier runs left behind when they were killed before their guards ran:
//! network namespaces and temp dirs named `myelin-t<pid>-...` whose pid is gone, the mounts
//! under those dirs (bpffs, containerd snapshots) and the processes still using them (agents,
//! containerd, shims, containers), and cgroups of the socket-level load balancing tests
//! (`<cgroup2 mount>/myelin-t<pid>-...`, with the client processes left in them).

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Error, Result, cgroup, process, run::NAME_PREFIX};

/// Where `ip netns add` puts its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub namespaces: Vec<String>,
    pub dirs: Vec<PathBuf>,
    pub processes: Vec<i32>,
    pub mounts: Vec<PathBuf>,
    pub cgroups: Vec<PathBuf>,
}

impl SweepReport {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.dirs.is_empty()
            && self.processes.is_empty()
            && self.mounts.is_empty()
            && self.cgroups.is_empty()
    }

    pub fn print_if_any(&self) {
        if !self.is_empty() {
            eprintln!(
                "swept leftovers of earlier runs: {} namespaces {:?}, {} processes, {} mounts, \
                 {} dirs {:?}, {} cgroups {:?}",
                self.namespaces.len(),
                self.namespaces,
                self.processes.len(),
                self.mounts.len(),
                self.dirs.len(),
                self.dirs,
                self.cgroups.len(),
                self.cgroups
            );
        }
    }
}

/// The pid in a name made by this harness (`myelin-t<pid>-...`), if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

fn is_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// A name of ours whose creating process no longer exists.
fn is_leftover(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| pid != std::process::id() && !is_alive(pid))
}

pub fn sweep_leftovers() -> Result<SweepReport> {
    let netns_dir = Path::new(NETNS_DIR);
    let temp_dir = std::env::temp_dir();
    let namespaces = leftover_entries(netns_dir)?;
    let dirs: Vec<PathBuf> = leftover_entries(&temp_dir)?
        .into_iter()
        .map(|name| temp_dir.join(name))
        .collect();
    let mut report = SweepReport::default();
    // A test's cgroup holds only the client processes it moved there: they go with it.
    // runc leaves the parents of a container's cgroup in the v1 hierarchies of a hybrid host.
    let v1 = cgroup::v1_hierarchies();
    for root in cgroup::cgroup2_mount().into_iter().chain(v1) {
        for name in leftover_entries(&root)? {
            let path = root.join(name);
            cgroup::remove(&path)?;
            report.cgroups.push(path);
        }
    }
    if namespaces.is_empty() && dirs.is_empty() {
        return Ok(report);
    }

    // Processes first: a live agent would keep its bpffs busy and a shim its rootfs mount.
    let netns_inodes: HashSet<(u64, u64)> = namespaces
        .iter()
        .filter_map(|name| fs::metadata(netns_dir.join(name)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    report.processes = kill_processes_using(&netns_inodes, &dirs)?;

    for dir in &dirs {
        report.mounts.extend(unmount_all_under(dir)?);
    }
    for name in namespaces {
        delete_netns(&name)?;
        report.namespaces.push(name);
    }
    for dir in dirs {
        remove_tree(&dir)?;
        report.dirs.push(dir);
    }
    Ok(report)
}

fn leftover_entries(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()))(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_leftover(name))
        .collect();
    names.sort();
    Ok(names)
}

/// Kills (SIGKILL) every process that lives in one of the namespaces, mentions one of the dirs
/// on its command line (agent, containerd, shims) or has its root under one (containers), and
/// waits for them to be gone.
pub(crate) fn kill_processes_using(
    netns_inodes: &HashSet<(u64, u64)>,
    dirs: &[PathBuf],
) -> Result<Vec<i32>> {
    let own = std::process::id() as i32;
    let dir_texts: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let mut killed = Vec::new();
    let proc_entries = fs::read_dir("/proc").map_err(Error::io("listing /proc"))?;
    for entry in proc_entries.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let proc_dir = entry.path();
        // Processes may exit while we look: every read below tolerates that.
        let in_netns = fs::metadata(proc_dir.join("ns/net"))
            .is_ok_and(|m| netns_inodes.contains(&(m.dev(), m.ino())));
        let cmdline = fs::read(proc_dir.join("cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        let mentions_dir = dir_texts.iter().any(|d| cmdline.contains(d.as_str()));
        let rooted_in_dir = fs::read_link(proc_dir.join("root"))
            .is_ok_and(|root| dirs.iter().any(|d| root.starts_with(d)));
        if in_netns || mentions_dir || rooted_in_dir {
            // ESRCH: it exited on its own meanwhile.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.push(pid);
        }
    }
    // They are not our children: wait until the kernel (or their reaper) is done with them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|pid| is_running(*pid)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    Ok(killed)
}

/// Present and not a zombie.
fn is_running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Lazily unmounts every mount point under `dir`, deepest first, and returns them.
pub(crate) fn unmount_all_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(Error::io("reading mountinfo"))?;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in &points {
        match nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH) {
            // EINVAL: already gone through an unmount of a parent or a stacked mount.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => {
                return Err(Error::io(format!("unmounting {}", point.display()))(
                    std::io::Error::from(e),
                ));
            }
        }
    }
    Ok(points)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn delete_netns(name: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "delete", name]);
    process::run_ok(cmd, Duration::from_secs(10)).map(drop)
}

/// `remove_dir_all` where missing is fine.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_names_of_ours() {
        assert_eq!(owner_pid("myelin-t4242-7-node"), Some(4242));
        assert_eq!(owner_pid("myelin-t4242"), None);
        assert_eq!(owner_pid("myelin-tx-1"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }

    #[test]
    fn names_of_live_processes_are_not_leftovers() {
        assert!(!is_leftover(&format!(
            "{NAME_PREFIX}{}-1-x",
            std::process::id()
        )));
        // pid 1 always exists.
        assert!(!is_leftover(&format!("{NAME_PREFIX}1-1-x")));
        assert!(!is_leftover("unrelated"));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/tmp/plain"), "/tmp/plain");
        assert_eq!(
            unescape_mount_path(r"/tmp/back\134slash"),
            r"/tmp/back\slash"
        );
    }
}
