//! The directory source: every `*.yaml`/`*.yml` file under a directory holds Kubernetes objects
//! (several per file, separated by `---`; `kind: List` is expanded). Changes are picked up while
//! the agent runs (inotify, debounced). A file that does not parse is reported with its path and
//! ignored: the objects it held at its last good version stay in force.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::SourceEvent;
use myelin_cluster::{Change, Kind, Object, documents::parse_documents};

/// How long a burst of file events is allowed to settle before rescanning (editors write a file
/// in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

impl DirSource {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            last_good: BTreeMap::new(),
        }
    }

    /// Reads every file; returns one `Replace` per kind, and the errors of files that were
    /// skipped (their last good objects are used instead).
    pub fn scan(&mut self) -> Result<(Vec<Change>, Vec<DirError>), DirError> {
        let mut files = Vec::new();
        collect_yaml_files(&self.root, &mut files)?;
        files.sort();
        let mut errors = Vec::new();
        let mut current = BTreeMap::new();
        for path in files {
            match parse_file(&path) {
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
            Kind::ALL.into_iter().map(|k| (k, Vec::new())).collect();

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

    /// Scans once, reports, then rescans on every change under the directory until the
    /// receiver is dropped.
    pub async fn run(mut self, tx: mpsc::Sender<SourceEvent>) -> Result<(), DirError> {
        let (fs_tx, mut fs_rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Our own scan opens and reads every file: access events would make every scan
                // trigger the next one.
                if let Ok(e) = &event
                    && matches!(e.kind, notify::EventKind::Access(_))
                {
                    return;
                }
                let _ = fs_tx.send(event);
            })
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

        self.rescan(&tx).await;
        if tx.send(SourceEvent::Synced).await.is_err() {
            return Ok(());
        }
        while fs_rx.recv().await.is_some() {
            // Let the burst settle, then drain it.
            tokio::time::sleep(DEBOUNCE).await;
            while fs_rx.try_recv().is_ok() {}
            debug!(root = %self.root.display(), "directory changed; rescanning");
            if !self.rescan(&tx).await {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Returns false when the agent stopped listening.
    async fn rescan(&mut self, tx: &mpsc::Sender<SourceEvent>) -> bool {
        match self.scan() {
            Ok((changes, errors)) => {
                for e in errors {
                    error!(
                        "ignoring invalid cluster state file (its last good version stays in force): {e}"
                    );
                }
                tx.send(SourceEvent::Changes(changes)).await.is_ok()
            }
            Err(e) => {
                error!("scanning the cluster state directory failed: {e}");
                true
            }
        }
    }
}

fn collect_yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DirError> {
    let io_err = |source| DirError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err)?;
        if file_type.is_dir() {
            collect_yaml_files(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml")
            // Editors' swap and backup files start with a dot.
            && !entry.file_name().to_string_lossy().starts_with('.')
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses one file; any invalid document makes the whole file invalid, so a half-edited file
/// never applies half of its objects.
pub fn parse_file(path: &Path) -> Result<(Vec<Object>, Vec<String>), DirError> {
    let text = fs::read_to_string(path).map_err(|source| DirError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_documents(&text).map_err(|(doc, message)| DirError::Invalid {
        path: path.to_owned(),
        doc,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut source = DirSource::new(dir.path().to_owned());
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
        let mut source = DirSource::new(dir.path().to_owned());
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

    #[tokio::test]
    async fn changes_are_picked_up_while_running() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.yaml"),
            "kind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(DirSource::new(dir.path().to_owned()).run(tx));
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
        drop(rx);
        task.abort();
    }
}
