//! Making sure `--bpffs` is a BPF filesystem. Machines without systemd (and node namespaces in
//! tests) often have none mounted; like Cilium, the agent mounts one rather than failing.

use std::{io, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use tracing::info;

#[derive(Debug, thiserror::Error)]
#[error("mounting a BPF filesystem at {path}: {source}")]
pub struct BpffsError {
    path: String,
    #[source]
    source: io::Error,
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts a bpffs at `path` unless one is there already.
pub fn ensure_mounted(path: &Path) -> Result<(), BpffsError> {
    if is_bpffs(path) {
        return Ok(());
    }
    let err = |source: io::Error| BpffsError {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| err(e.into()))?;
    info!(path = %path.display(), "mounted a BPF filesystem");
    Ok(())
}
