//! Where cluster state comes from: the Kubernetes API (`--source kubernetes`) or a directory of
//! the same objects as YAML (`--source dir:<path>`). Both feed the index with [`Change`]s.

pub mod dir;
pub mod kubernetes;

use std::{path::PathBuf, str::FromStr};

use myelin_cluster::Change;

/// What a source reports to the agent.
#[derive(Debug)]
pub enum SourceEvent {
    Changes(Vec<Change>),
    /// Everything the source watches has been listed once (the agent becomes ready).
    Synced,
    /// Listing or watching failed before the first sync (the API server is down or answers
    /// garbage); the source keeps retrying. A starting agent need not wait for state it cannot
    /// get now: it may go on with what it persisted.
    Unavailable,
}

/// `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Kubernetes,
    Dir(PathBuf),
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kubernetes" => Ok(Self::Kubernetes),
            _ => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => Ok(Self::Dir(PathBuf::from(path))),
                _ => Err(format!(
                    "{s:?} is not a source: use `kubernetes` or `dir:<path>`"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_sources_and_rejects_others() {
        assert_eq!("kubernetes".parse(), Ok(SourceSpec::Kubernetes));
        assert_eq!(
            "dir:/etc/myelin/cluster".parse(),
            Ok(SourceSpec::Dir("/etc/myelin/cluster".into()))
        );
        assert!("dir:".parse::<SourceSpec>().is_err());
        assert!("etcd".parse::<SourceSpec>().is_err());
    }
}
