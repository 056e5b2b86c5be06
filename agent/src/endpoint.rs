//! The node's endpoints (one per pod interface), persisted in `<state-dir>/endpoints.json` so
//! that a restarted agent re-attaches its programs and rewrites its maps.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use myelin_api::{AttachmentId, Mac, PodRef};
use serde::{Deserialize, Serialize};

use crate::persist::{self, PersistError};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub id: u32,
    #[serde(flatten)]
    pub attachment: AttachmentId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub netns: String,
    /// The network namespace's cookie, as the plugin read it (`EndpointRequest::netns_cookie`):
    /// socket load balancing translates this namespace's sockets. Absent in files of agents
    /// before it, and for an endpoint rebuilt from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: Mac,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointStoreError {
    #[error("all {0} endpoint ids are in use: raise --max-endpoints")]
    Full(u32),
    #[error(transparent)]
    Persist(#[from] PersistError),
}

#[derive(Debug)]
pub struct EndpointStore {
    by_attachment: BTreeMap<AttachmentId, EndpointRecord>,
    max_endpoints: u32,
    path: Option<PathBuf>,
}

impl EndpointStore {
    #[cfg(test)]
    pub fn in_memory(max_endpoints: u32) -> Self {
        Self {
            by_attachment: BTreeMap::new(),
            max_endpoints,
            path: None,
        }
    }

    pub fn open(path: PathBuf, max_endpoints: u32) -> Result<Self, EndpointStoreError> {
        let records: Vec<EndpointRecord> = persist::load(&path)?.unwrap_or_default();
        Ok(Self {
            by_attachment: records
                .into_iter()
                .map(|r| (r.attachment.clone(), r))
                .collect(),
            max_endpoints,
            path: Some(path),
        })
    }

    pub fn get(&self, attachment: &AttachmentId) -> Option<&EndpointRecord> {
        self.by_attachment.get(attachment)
    }

    pub fn iter(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.by_attachment.values()
    }

    pub fn len(&self) -> usize {
        self.by_attachment.len()
    }

    /// The smallest endpoint id not in use (ids key the counters; 0 is never used).
    pub fn free_id(&self) -> Result<u32, EndpointStoreError> {
        let used: std::collections::BTreeSet<u32> = self.iter().map(|r| r.id).collect();
        (1..=self.max_endpoints)
            .find(|id| !used.contains(id))
            .ok_or(EndpointStoreError::Full(self.max_endpoints))
    }

    /// Records an endpoint in memory only; [`Self::save`] makes it durable.
    pub fn insert(&mut self, record: EndpointRecord) {
        self.by_attachment.insert(record.attachment.clone(), record);
    }

    pub fn remove(&mut self, attachment: &AttachmentId) -> Option<EndpointRecord> {
        self.by_attachment.remove(attachment)
    }

    pub fn save(&self) -> Result<(), EndpointStoreError> {
        if let Some(path) = &self.path {
            let records: Vec<&EndpointRecord> = self.iter().collect();
            persist::store(path, &records)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn record(id: u32, container: &str, ip: [u8; 4]) -> EndpointRecord {
    EndpointRecord {
        id,
        attachment: AttachmentId::new(container, "eth0"),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: container.into(),
        }),
        netns: format!("/run/netns/{container}"),
        netns_cookie: Some(4096 + u64::from(id)),
        ip: Ipv4Addr::from(ip),
        mac: Mac([2, 0, 0, 0, 0, id as u8]),
        host_ifname: format!("lxc{container}"),
        host_ifindex: 100 + id,
        host_mac: Mac([2, 0, 0, 0, 1, id as u8]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_smallest_first() {
        let mut store = EndpointStore::in_memory(3);
        store.insert(record(1, "a", [10, 0, 0, 2]));
        store.insert(record(2, "b", [10, 0, 0, 3]));
        assert_eq!(store.free_id().unwrap(), 3);
        store.remove(&AttachmentId::new("a", "eth0"));
        assert_eq!(store.free_id().unwrap(), 1);
    }

    #[test]
    fn running_out_of_ids_is_an_error() {
        let mut store = EndpointStore::in_memory(1);
        store.insert(record(1, "a", [10, 0, 0, 2]));
        assert!(matches!(store.free_id(), Err(EndpointStoreError::Full(1))));
    }

    #[test]
    fn endpoints_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.json");
        let mut store = EndpointStore::open(path.clone(), 8).unwrap();
        store.insert(record(1, "a", [10, 0, 0, 2]));
        store.save().unwrap();
        let store = EndpointStore::open(path, 8).unwrap();
        assert_eq!(
            store.get(&AttachmentId::new("a", "eth0")),
            Some(&record(1, "a", [10, 0, 0, 2]))
        );
    }
}
