//! Network namespaces: checking that `CNI_NETNS` really is one, and running code inside it.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    thread,
};

use nix::sched::{CloneFlags, setns};

// NS_GET_NSTYPE from <linux/nsfs.h>: _IO(0xb7, 0x3). Answers the CLONE_NEW* type of an nsfs fd.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

/// The calling thread's own network namespace.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot open network namespace {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a network namespace", path.display())]
    NotNetNs {
        path: PathBuf,
        #[source]
        source: Option<nix::Error>,
    },
    #[error("{} is the plugin's own network namespace, not a pod's", path.display())]
    PluginsOwn { path: PathBuf },
    #[error("cannot enter network namespace {}", path.display())]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in network namespace {} panicked", path.display())]
    ThreadPanicked { path: PathBuf },
}

/// An open, verified network namespace. Holding the fd keeps the namespace alive while the
/// plugin works in it, even if the runtime unmounts its path meanwhile.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Opens `path` and checks, with `NS_GET_NSTYPE`, that it is a network namespace and not the
    /// one this thread runs in (configuring the node's own namespace as a pod would break it).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetNsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetNsError::Open {
            path: path.clone(),
            source,
        })?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd we own; on any file that
        // is not an nsfs inode the kernel answers ENOTTY.
        let kind = unsafe { ns_get_nstype(file.as_raw_fd()) };
        match kind {
            Ok(kind) if kind == CloneFlags::CLONE_NEWNET.bits() => {}
            Ok(_) => return Err(NetNsError::NotNetNs { path, source: None }),
            Err(e) => {
                return Err(NetNsError::NotNetNs {
                    path,
                    source: Some(e),
                });
            }
        }
        let own = File::open(OWN_NETNS).and_then(|f| f.metadata());
        let this = file.metadata();
        if let (Ok(own), Ok(this)) = (own, this)
            && own.dev() == this.dev()
            && own.ino() == this.ino()
        {
            return Err(NetNsError::PluginsOwn { path });
        }
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a new thread that has entered this namespace. `setns` changes only the
    /// calling thread, so the caller's thread stays where it is, and the worker thread, which
    /// exits afterwards, never carries the pod's namespace into other work.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetNsError::Enter {
                            path: self.path.clone(),
                            source,
                        }
                    })?;
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(NetNsError::ThreadPanicked {
                        path: self.path.clone(),
                    })
                })
        })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_network_namespace() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = NetNs::open(file.path()).unwrap_err();
        assert!(matches!(err, NetNsError::NotNetNs { .. }), "{err}");
    }

    #[test]
    fn an_absent_path_cannot_be_opened() {
        let err = NetNs::open("/nonexistent/myelin-netns").unwrap_err();
        assert!(matches!(err, NetNsError::Open { .. }), "{err}");
    }

    #[test]
    fn another_namespace_type_is_rejected() {
        // The mount namespace of this process: an nsfs file of the wrong type.
        let err = NetNs::open("/proc/self/ns/mnt").unwrap_err();
        assert!(
            matches!(err, NetNsError::NotNetNs { source: None, .. }),
            "{err}"
        );
    }

    #[test]
    fn the_plugins_own_namespace_is_rejected() {
        let err = NetNs::open("/proc/thread-self/ns/net").unwrap_err();
        assert!(matches!(err, NetNsError::PluginsOwn { .. }), "{err}");
    }
}
