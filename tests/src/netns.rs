//! Network namespaces: every simulated node and pod is one.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
    sync::Mutex,
    thread,
    time::Duration,
};

use nix::sched::CloneFlags;

use crate::{
    Error, Result,
    process::{self, Output},
    sweep::NETNS_DIR,
};

/// A named network namespace (`ip netns add`), loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: impl Into<String>) -> Result<Self> {
        // `ip netns add` sets up the shared /run/netns mount on first use; two of those racing
        // each other can fail, and tests create namespaces from many threads.
        static CREATE: Mutex<()> = Mutex::new(());
        let name = name.into();
        {
            let _serial = CREATE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            ip(&["netns", "add", &name])?;
        }
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what CNI_NETNS and `nsenter --net=` take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <name> <args>`, failing on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a fresh thread that has entered this namespace. `setns` only changes the
    /// calling thread, and that thread ends with `f`, so no other code ever runs in the wrong
    /// namespace. A panic in `f` is passed on.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.open()?;
        thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                        Error::EnterNetns {
                            name: self.name.clone(),
                            source,
                        }
                    })?;
                    drop(file);
                    Ok(f())
                })
                .map_err(Error::io("starting a thread"))?;
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A command that starts inside this namespace (network only: unlike `ip netns exec` it
    /// keeps the caller's /sys and mounts, which the agent's bpffs and containerd need).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let fd: OwnedFd = self.open()?.into();
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs between fork and exec and only makes the setns syscall (no
        // allocation, no locks) on an fd opened before the fork; the fd is close-on-exec and
        // lives as long as the Command that owns the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Names of the links in this namespace (`ip -j link`).
    pub fn link_names(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-j", "link", "show"])?;
        let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).map_err(
            Error::json(format!("parsing `ip -j link` in {}", self.name)),
        )?;
        Ok(links
            .iter()
            .filter_map(|l| l.get("ifname").and_then(|n| n.as_str()))
            .map(str::to_string)
            .collect())
    }

    /// The ifindex of the link `name` in this namespace, `None` when there is none: a device
    /// deleted and created again under the same name gets a new one.
    pub fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let out = self.ip(&["-j", "link", "show"])?;
        let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).map_err(
            Error::json(format!("parsing `ip -j link` in {}", self.name)),
        )?;
        Ok(links
            .iter()
            .find(|l| l.get("ifname").and_then(|n| n.as_str()) == Some(name))
            .and_then(|l| l.get("ifindex")?.as_u64())
            .and_then(|i| u32::try_from(i).ok()))
    }

    fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).map_err(Error::io(format!("opening {}", path.display())))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// `ip <args>` with a deadline, failing on a non-zero exit.
pub fn ip(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    process::run_ok(cmd, Duration::from_secs(10))
}
