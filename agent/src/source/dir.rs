//! The directory source: every `*.yaml`/`*.yml` file under a directory holds Kubernetes objects
//! (several per file, separated by `---`; `kind: List` is expanded). Changes are picked up while
//! the agent runs (inotify, debounced). A file that cannot be used is reported with its path
//! and ignored: the objects it held at its last good version stay in force.
//!
//! Whoever can write into the directory must not be able to stall or exhaust the agent: only
//! regular files are read (a FIFO or a device is refused without being read), each up to a
//! size cap, YAML only up to a nesting depth, and all of it on a thread of its own, away from
//! the runtime that serves the API.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Read as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::SourceEvent;
use myelin_cluster::{Change, Kind, Object, documents::parse_documents_of};

/// How long a burst of file events is allowed to settle before rescanning (editors write a file
/// in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How many directory levels below the root are read: more than any layout kept by hand, and a
/// bound on what one scan walks.
const MAX_DIR_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: not a regular file but a {kind}; only regular files (or symlinks to them) are read"
    )]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{path}: larger than {max_size} bytes (--max-object-file-size)")]
    TooLarge { path: PathBuf, max_size: u64 },
    #[error("{path}: more than {MAX_DIR_DEPTH} directory levels below the source; not read")]
    TooDeep { path: PathBuf },
    #[error("{path}: document {doc}: {message}")]
    Invalid {
        path: PathBuf,
        doc: usize,
        message: String,
    },
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Scans a directory, remembering each file's last good objects.
pub struct DirSource {
    root: PathBuf,
    /// Larger files are refused (`--max-object-file-size`).
    max_file_size: u64,
    /// The kinds read ([`Kind::used`]); objects of others are skipped unread.
    kinds: &'static [Kind],
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

impl DirSource {
    /// A source of every kind; see [`DirSource::reading`].
    pub fn new(root: PathBuf, max_file_size: u64) -> Self {
        Self {
            root,
            max_file_size,
            kinds: &Kind::ALL,
            last_good: BTreeMap::new(),
        }
    }

    /// Reads only objects of `kinds`.
    pub fn reading(mut self, kinds: &'static [Kind]) -> Self {
        self.kinds = kinds;
        self
    }

    /// Reads every file; returns one `Replace` per kind, and the errors of files that were
    /// skipped (their last good objects are used instead).
    pub fn scan(&mut self) -> Result<(Vec<Change>, Vec<DirError>), DirError> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        collect_yaml_files(&self.root, 0, &mut files, &mut errors)?;
        files.sort();
        let mut current = BTreeMap::new();
        for path in files {
            match parse_file(&path, self.max_file_size, self.kinds) {
                Ok((objects, warnings)) => {
                    for w in warnings {
                        warn!(path = %path.display(), "{w}");
                    }
                    current.insert(path, objects);
                }
                Err(e) => {
                    if let Some(previous) = self.last_good.get(&path) {
                        current.insert(path, previous.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.last_good = current;
        // Every kind gets its list, empty or not: a kind whose last object went away must
        // still be replaced (with nothing).
        let mut by_kind: BTreeMap<Kind, Vec<Object>> =
            self.kinds.iter().map(|k| (*k, Vec::new())).collect();

        for object in self.last_good.values().flatten() {
            by_kind
                .entry(object.kind())
                .or_default()
                .push(object.clone());
        }
        let changes = by_kind
            .into_iter()
            .map(|(kind, objects)| Change::Replace { kind, objects })
            .collect();
        Ok((changes, errors))
    }

    /// Runs [`DirSource::run`] on a thread of its own: reading and parsing are blocking work,
    /// and however long a file takes, the runtime that serves the API must not wait for it.
    pub fn spawn(self, tx: mpsc::Sender<SourceEvent>) -> io::Result<()> {
        thread::Builder::new()
            .name("dir-source".into())
            .spawn(move || {
                crate::priority::background_thread();
                if let Err(e) = self.run(tx) {
                    error!("directory source stopped: {e}");
                }
            })
            .map(drop)
    }

    /// Scans once, reports, then rescans on every change under the directory until the
    /// receiver is dropped. Blocks: call it on a thread of its own, never on a runtime worker.
    pub fn run(mut self, tx: mpsc::Sender<SourceEvent>) -> Result<(), DirError> {
        // One pending notice is all a rescan needs; more would only queue up during a scan.
        let (changed_tx, changed_rx) = std_mpsc::sync_channel(1);
        let mut watcher = notify::RecommendedWatcher::new(
            move |event: notify::Result<notify::Event>| {
                // Our own scan opens and reads every file: access events would make every scan
                // trigger the next one.
                if let Ok(e) = &event
                    && matches!(e.kind, notify::EventKind::Access(_))
                {
                    return;
                }
                let _ = changed_tx.try_send(());
            },
            // The scan does not descend into symlinked directories, so neither does the
            // watch: a link to `/` would otherwise put a watch on every directory of the host.
            notify::Config::default().with_follow_symlinks(false),
        )
        .map_err(|source| DirError::Watch {
            path: self.root.clone(),
            source,
        })?;
        watcher
            .watch(&self.root, RecursiveMode::Recursive)
            .map_err(|source| DirError::Watch {
                path: self.root.clone(),
                source,
            })?;

        self.rescan(&tx);
        if tx.blocking_send(SourceEvent::Synced).is_err() {
            return Ok(());
        }
        while changed_rx.recv().is_ok() {
            // Let the burst settle, then drain it.
            thread::sleep(DEBOUNCE);
            while changed_rx.try_recv().is_ok() {}
            debug!(root = %self.root.display(), "directory changed; rescanning");
            if !self.rescan(&tx) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Returns false when the agent stopped listening.
    fn rescan(&mut self, tx: &mpsc::Sender<SourceEvent>) -> bool {
        match self.scan() {
            Ok((changes, errors)) => {
                for e in errors {
                    error!(
                        "ignoring invalid cluster state file (its last good version stays in force): {e}"
                    );
                }
                tx.blocking_send(SourceEvent::Changes(changes)).is_ok()
            }
            Err(e) => {
                error!("scanning the cluster state directory failed: {e}");
                true
            }
        }
    }
}

/// Collects the YAML files under `dir`, which is `depth` levels below the root. Directories
/// reached through symlinks are not entered (a link cannot make the walk loop or leave the
/// tree), but symlinked files are read.
fn collect_yaml_files(
    dir: &Path,
    depth: usize,
    out: &mut Vec<PathBuf>,
    errors: &mut Vec<DirError>,
) -> Result<(), DirError> {
    let io_err = |source| DirError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        // Hidden entries: editors' swap and backup files, and the `..data` and `..<timestamp>`
        // directories of a ConfigMap volume, whose files the volume also links at its top.
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err)?;
        if file_type.is_dir() {
            if depth == MAX_DIR_DEPTH {
                errors.push(DirError::TooDeep { path });
            } else {
                collect_yaml_files(&path, depth + 1, out, errors)?;
            }
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses one file; any invalid document makes the whole file invalid, so a half-edited file
/// never applies half of its objects.
fn parse_file(
    path: &Path,
    max_size: u64,
    kinds: &[Kind],
) -> Result<(Vec<Object>, Vec<String>), DirError> {
    let text = read_regular_file(path, max_size)?;
    parse_documents_of(&text, kinds).map_err(|(doc, message)| DirError::Invalid {
        path: path.to_owned(),
        doc,
        message,
    })
}

/// Reads a regular file (or what a symlink points to) of at most `max_size` bytes. Anything
/// else is refused without being opened for reading: a FIFO would block the read until a
/// writer comes, a device such as /dev/zero never ends, and opening some devices has effects
/// of its own (a watchdog starts counting down).
fn read_regular_file(path: &Path, max_size: u64) -> Result<String, DirError> {
    let io_err = |source| DirError::Io {
        path: path.to_owned(),
        source,
    };
    // O_PATH resolves the path to an inode without opening it; fstat tells what it is.
    let located = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(io_err)?;
    ensure_regular(path, &located)?;
    // Opens that same inode: a rename in between cannot swap in something else. O_NONBLOCK:
    // neither the open nor a read may wait; O_NOCTTY: a terminal never becomes ours. The type
    // is checked once more on the descriptor that is read.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", located.as_raw_fd()))
        .map_err(io_err)?;
    ensure_regular(path, &file)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file at the cap from one beyond it.
    file.take(max_size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > max_size {
        return Err(DirError::TooLarge {
            path: path.to_owned(),
            max_size,
        });
    }
    String::from_utf8(bytes).map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// Refuses anything but a regular file, by the type of the open descriptor (fstat).
fn ensure_regular(path: &Path, file: &File) -> Result<(), DirError> {
    let file_type = file
        .metadata()
        .map_err(|source| DirError::Io {
            path: path.to_owned(),
            source,
        })?
        .file_type();
    let kind = if file_type.is_file() {
        return Ok(());
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(DirError::NotRegularFile {
        path: path.to_owned(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1 << 20;

    #[test]
    fn broken_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        fs::write(
            &file,
            "kind: Namespace\nmetadata: {name: demo}\n---\nkind: Pod\nmetadata: {name: web, namespace: demo}\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("other.yml"),
            "kind: Namespace\nmetadata: {name: other}\n",
        )
        .unwrap();
        let mut source = DirSource::new(dir.path().to_owned(), CAP);
        let (first, errors) = source.scan().unwrap();
        assert!(errors.is_empty());

        fs::write(&file, "kind: Pod\nmetadata: {name: [broken\n").unwrap();
        let (second, errors) = source.scan().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("cluster.yaml"),
            "{}",
            errors[0]
        );
        assert_eq!(first, second, "the last good state stays in force");

        fs::remove_file(&file).unwrap();
        let (third, errors) = source.scan().unwrap();
        assert!(errors.is_empty());
        let pods = third.iter().find_map(|c| match c {
            Change::Replace {
                kind: Kind::Pod,
                objects,
            } => Some(objects.len()),
            _ => None,
        });
        assert_eq!(pods, Some(0), "a deleted file's objects are gone");
    }

    #[test]
    fn every_scan_replaces_every_kind_so_removed_policies_go_away() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        fs::write(
            &file,
            "kind: NetworkPolicy\nmetadata: {name: deny, namespace: default}\nspec: {podSelector: {}}\n",
        )
        .unwrap();
        let mut source = DirSource::new(dir.path().to_owned(), CAP);
        let count = |changes: &[Change], kind: Kind| {
            changes.iter().find_map(|c| match c {
                Change::Replace { kind: k, objects } if *k == kind => Some(objects.len()),
                _ => None,
            })
        };
        let (first, _) = source.scan().unwrap();
        assert_eq!(count(&first, Kind::NetworkPolicy), Some(1));
        fs::write(&file, "kind: Namespace\nmetadata: {name: default}\n").unwrap();
        let (second, _) = source.scan().unwrap();
        for kind in Kind::ALL {
            assert!(count(&second, kind).is_some(), "{kind:?} not replaced");
        }
        assert_eq!(count(&second, Kind::NetworkPolicy), Some(0));
    }

    #[test]
    fn services_are_read_only_by_an_agent_that_translates_them() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("app.yaml"),
            "kind: Namespace\nmetadata: {name: demo}\n---\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.300}\n",
        )
        .unwrap();
        let kinds_replaced = |changes: &[Change]| -> Vec<Kind> {
            changes
                .iter()
                .filter_map(|c| match c {
                    Change::Replace { kind, .. } => Some(*kind),
                    _ => None,
                })
                .collect()
        };
        let mut without = DirSource::new(dir.path().to_owned(), CAP).reading(Kind::used(false));
        let (changes, errors) = without.scan().unwrap();
        assert!(
            errors.is_empty(),
            "the malformed Service is not read: {errors:?}"
        );
        assert_eq!(namespace_names(&changes), ["demo"]);
        assert_eq!(kinds_replaced(&changes), Kind::used(false));

        let mut with = DirSource::new(dir.path().to_owned(), CAP).reading(Kind::used(true));
        let (changes, errors) = with.scan().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().ends_with(
                "document 2: Service demo/web: spec.clusterIP: \"10.96.0.300\" is not an IP address"
            ),
            "{}",
            errors[0]
        );
        assert_eq!(kinds_replaced(&changes), Kind::ALL);
    }

    #[tokio::test]
    async fn changes_are_picked_up_while_running() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.yaml"),
            "kind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        DirSource::new(dir.path().to_owned(), CAP)
            .spawn(tx)
            .unwrap();
        let namespaces = |event: SourceEvent| match event {
            SourceEvent::Changes(changes) => changes.into_iter().find_map(|c| match c {
                Change::Replace {
                    kind: Kind::Namespace,
                    objects,
                } => Some(objects.len()),
                _ => None,
            }),
            _ => None,
        };
        assert_eq!(namespaces(rx.recv().await.unwrap()), Some(1));
        assert!(matches!(rx.recv().await.unwrap(), SourceEvent::Synced));
        fs::write(
            dir.path().join("b.yaml"),
            "kind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("rescan within 5 s")
            .unwrap();
        assert_eq!(namespaces(event), Some(2));
    }

    /// Scans on a thread of its own and fails the test when that takes more than a few seconds:
    /// a regression (an open or a read that blocks, a parse that crawls) fails instead of
    /// hanging the test run.
    fn scan_promptly(source: DirSource) -> (DirSource, Vec<Change>, Vec<DirError>) {
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut source = source;
            let result = source.scan();
            let _ = tx.send((source, result));
        });
        let (source, result) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the scan finished within 5 s");
        let (changes, errors) = result.unwrap();
        (source, changes, errors)
    }

    fn namespace_names(changes: &[Change]) -> Vec<String> {
        let mut names: Vec<String> = changes
            .iter()
            .flat_map(|c| match c {
                Change::Replace { objects, .. } => objects.as_slice(),
                _ => &[],
            })
            .filter_map(|o| match o {
                Object::Namespace(ns) => Some(ns.name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        names
    }

    fn namespace(name: &str) -> String {
        format!("kind: Namespace\nmetadata: {{name: {name}}}\n")
    }

    /// `victim.yaml` (namespace `victim`) is replaced by what `make_hostile` puts at its path,
    /// beside `good.yaml` (namespace `good`). The next scan finishes promptly and reports
    /// `victim.yaml` with `reason`; both namespaces stay, the victim's from its last good
    /// version.
    fn hostile_file_is_refused(make_hostile: impl FnOnce(&Path), reason: &str) {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.yaml");
        fs::write(dir.path().join("good.yaml"), namespace("good")).unwrap();
        fs::write(&victim, namespace("victim")).unwrap();
        let (source, first, errors) = scan_promptly(DirSource::new(dir.path().to_owned(), CAP));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(namespace_names(&first), ["good", "victim"]);

        fs::remove_file(&victim).unwrap();
        make_hostile(&victim);
        let (_, second, errors) = scan_promptly(source);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].contains(&victim.display().to_string()) && messages[0].contains(reason),
            "{} does not name victim.yaml and {reason:?}",
            messages[0]
        );
        assert_eq!(second, first, "the last good objects stay in force");
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        hostile_file_is_refused(
            |path| nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).unwrap(),
            "not a regular file but a FIFO",
        );
    }

    #[test]
    fn device_behind_a_symlink_is_refused_without_reading() {
        hostile_file_is_refused(
            |path| std::os::unix::fs::symlink("/dev/zero", path).unwrap(),
            "not a regular file but a character device",
        );
    }

    #[test]
    fn file_over_the_size_cap_is_refused() {
        // A namespace padded with a comment to `size` bytes.
        let padded = |name: &str, size: u64| {
            let mut text = namespace(name);
            text.push('#');
            text.push_str(&" ".repeat(size as usize - text.len() - 1));
            text.push('\n');
            text
        };
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("at-cap.yaml"), padded("at-cap", CAP)).unwrap();
        let (_, changes, errors) = scan_promptly(DirSource::new(dir.path().to_owned(), CAP));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(namespace_names(&changes), ["at-cap"]);

        hostile_file_is_refused(
            |path| fs::write(path, padded("victim", CAP + 1)).unwrap(),
            &format!("larger than {CAP} bytes"),
        );
    }

    #[test]
    fn deeply_nested_yaml_is_refused() {
        let too_deep = format!(
            "document 1: nesting deeper than {} levels",
            myelin_cluster::documents::MAX_NESTING_DEPTH
        );
        hostile_file_is_refused(
            |path| fs::write(path, "{a: ".repeat(50_000)).unwrap(),
            &too_deep,
        );
        hostile_file_is_refused(
            |path| {
                let block: String = (0..100).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
                fs::write(path, block).unwrap();
            },
            &too_deep,
        );
    }

    #[test]
    fn symlink_to_a_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("real.yaml");
        fs::write(&target, namespace("linked")).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("link.yaml")).unwrap();
        let (_, changes, errors) = scan_promptly(DirSource::new(dir.path().to_owned(), CAP));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(namespace_names(&changes), ["linked"]);
    }

    #[test]
    fn configmap_volume_files_are_read_once() {
        // What kubelet makes of a ConfigMap: the files in a timestamped dot-directory, `..data`
        // linking to it, and a link per file at the top.
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_01_01_00_00_00.123456789");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("cluster.yaml"), namespace("configured")).unwrap();
        std::os::unix::fs::symlink(data.file_name().unwrap(), dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/cluster.yaml", dir.path().join("cluster.yaml")).unwrap();
        let (_, changes, errors) = scan_promptly(DirSource::new(dir.path().to_owned(), CAP));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(namespace_names(&changes), ["configured"]);
    }

    #[test]
    fn directories_below_the_depth_bound_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut deepest_read = dir.path().to_owned();
        for level in 1..=MAX_DIR_DEPTH {
            deepest_read.push(format!("d{level}"));
        }
        let too_deep = deepest_read.join("too-deep");
        fs::create_dir_all(&too_deep).unwrap();
        fs::write(deepest_read.join("read.yaml"), namespace("read")).unwrap();
        fs::write(too_deep.join("unread.yaml"), namespace("unread")).unwrap();
        let (_, changes, errors) = scan_promptly(DirSource::new(dir.path().to_owned(), CAP));
        assert_eq!(namespace_names(&changes), ["read"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(matches!(&errors[0], DirError::TooDeep { path } if *path == too_deep));
    }
}
