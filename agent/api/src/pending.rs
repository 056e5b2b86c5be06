//! DELs that came while the agent was down.
//!
//! A runtime that gets an error from DEL retries it, and until one succeeds the pod cannot
//! finish terminating: an agent that is down (upgrading, crashed) would hold every pod deletion
//! on the node hostage. So when nothing listens on the agent's socket, the plugin deletes the
//! veth itself (which takes the programs with it), records the attachment here and succeeds;
//! the agent removes the endpoint and releases the address of every record before it serves
//! again, and also when a record turns up later (a DEL that raced the agent's start), at the
//! latest when the same attachment is added again.
//!
//! One JSON file ([`AttachmentId`]) per attachment, in `pending-deletes/` beside the socket,
//! written to a temporary name and renamed into place, so that a reader never sees half a record.

use std::{
    fmt::Write as _,
    fs, io,
    path::{Path, PathBuf},
};

use crate::AttachmentId;

const DIR: &str = "pending-deletes";
const SUFFIX: &str = ".json";
const TEMP_SUFFIX: &str = ".tmp";

/// The queue of the agent listening on `socket`.
pub fn dir_for(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(DIR),
        _ => PathBuf::from(DIR),
    }
}

/// The record of `id` in `dir`. Container ids and interface names may share characters with
/// any separator, so both are hex-encoded: the name is unique per attachment.
pub fn path_of(dir: &Path, id: &AttachmentId) -> PathBuf {
    dir.join(format!(
        "{}-{}{SUFFIX}",
        hex(&id.container_id),
        hex(&id.ifname)
    ))
}

fn hex(s: &str) -> String {
    s.bytes()
        .fold(String::with_capacity(s.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Records that `id` was deleted while the agent was down; returns the record's path.
pub fn enqueue(dir: &Path, id: &AttachmentId) -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    // Only root reads the queue (it names containers): the directory is 0700 even when an
    // earlier version or a person created it otherwise.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let path = path_of(dir, id);
    let mut temp = path.clone().into_os_string();
    temp.push(format!(".{}{TEMP_SUFFIX}", std::process::id()));
    let json = serde_json::to_vec(id).map_err(io::Error::other)?;
    fs::write(&temp, json)?;
    match fs::rename(&temp, &path) {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// A record read back, or the file that could not be.
pub enum Entry {
    Delete { path: PathBuf, id: AttachmentId },
    Unreadable { path: PathBuf, error: String },
}

/// Every record in `dir` (none when it does not exist), in name order. Temporary files of
/// a write in progress are skipped.
pub fn list(dir: &Path) -> io::Result<Vec<Entry>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(SUFFIX)))
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|path| match read(&path) {
            Ok(id) => Entry::Delete { path, id },
            Err(error) => Entry::Unreadable { path, error },
        })
        .collect())
}

/// The record of `id`, if one is pending.
pub fn find(dir: &Path, id: &AttachmentId) -> Option<PathBuf> {
    let path = path_of(dir, id);
    path.exists().then_some(path)
}

fn read(path: &Path) -> Result<AttachmentId, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    decode(&bytes)
}

/// The attachment a record's content names. Records sit in a directory other processes can
/// write to, so their content is input like any other (and fuzzed as such).
pub fn decode(record: &[u8]) -> Result<AttachmentId, String> {
    serde_json::from_slice(record).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_sits_beside_the_socket() {
        assert_eq!(
            dir_for(Path::new("/run/myelin/agent.sock")),
            PathBuf::from("/run/myelin/pending-deletes")
        );
        assert_eq!(dir_for(Path::new("agent.sock")), PathBuf::from(DIR));
    }

    #[test]
    fn the_queue_directory_is_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("pending-deletes");
        fs::create_dir(&queue).unwrap();
        fs::set_permissions(&queue, fs::Permissions::from_mode(0o755)).unwrap();
        enqueue(&queue, &AttachmentId::new("c", "eth0")).unwrap();
        let mode = fs::metadata(&queue).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn records_round_trip_and_names_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let a = AttachmentId::new("a.b", "c");
        let b = AttachmentId::new("a", "b.c");
        assert_ne!(path_of(dir.path(), &a), path_of(dir.path(), &b));
        enqueue(dir.path(), &a).unwrap();
        let path_b = enqueue(dir.path(), &b).unwrap();
        // Enqueuing twice keeps one record.
        enqueue(dir.path(), &b).unwrap();
        // A write in progress and a broken record.
        fs::write(dir.path().join("x.json.1.tmp"), "{").unwrap();
        fs::write(dir.path().join("broken.json"), "{").unwrap();

        let mut ids = Vec::new();
        let mut unreadable = Vec::new();
        for entry in list(dir.path()).unwrap() {
            match entry {
                Entry::Delete { id, .. } => ids.push(id),
                Entry::Unreadable { path, .. } => unreadable.push(path),
            }
        }
        ids.sort();
        assert_eq!(ids, vec![b.clone(), a.clone()]);
        assert_eq!(unreadable, vec![dir.path().join("broken.json")]);
        assert_eq!(find(dir.path(), &b), Some(path_b));
        assert_eq!(find(dir.path(), &AttachmentId::new("z", "eth0")), None);
        assert!(list(&dir.path().join("missing")).unwrap().is_empty());
    }
}
