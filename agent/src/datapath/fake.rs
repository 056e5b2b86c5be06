//! In-memory datapath for unit tests of the agent's logic: the same reconcilers over fake maps,
//! and a record of attachments.

use std::collections::BTreeSet;

use myelin_common::{
    EndpointCounters, EndpointInfo, IpcacheEntry, Ipv4Key, PolicyEntry, PolicyKey,
};

use super::{
    AttachMode, DatapathError, DatapathOps, DesiredState,
    table::{Diff, FakeMap, LpmKey, Reconciler},
};

pub struct FakeDatapath {
    pub endpoints: Reconciler<Ipv4Key, EndpointInfo, FakeMap<Ipv4Key, EndpointInfo>>,
    pub endpoints_by_if: Reconciler<u32, EndpointInfo, FakeMap<u32, EndpointInfo>>,
    pub ipcache: Reconciler<LpmKey<Ipv4Key>, IpcacheEntry, FakeMap<LpmKey<Ipv4Key>, IpcacheEntry>>,
    pub policy: Reconciler<LpmKey<PolicyKey>, PolicyEntry, FakeMap<LpmKey<PolicyKey>, PolicyEntry>>,
    /// Bumped like the real datapath's policy revision.
    pub revision: u32,
    pub event_mask: u32,
    pub counter_ids: BTreeSet<u32>,
    pub attached: BTreeSet<String>,
    /// Interface names whose attach fails (to test rollback).
    pub fail_attach: BTreeSet<String>,
}

impl FakeDatapath {
    pub fn new(capacity: u32) -> Self {
        Self {
            endpoints: Reconciler::new(FakeMap::new("endpoints", capacity)).expect("fake map"),
            endpoints_by_if: Reconciler::new(FakeMap::new("endpoints_by_if", capacity))
                .expect("fake map"),
            ipcache: Reconciler::new(FakeMap::new("ipcache", 4096)).expect("fake map"),
            policy: Reconciler::new(FakeMap::new("policy", 4096)).expect("fake map"),
            revision: 0,
            event_mask: 0,
            counter_ids: BTreeSet::new(),
            attached: BTreeSet::new(),
            fail_attach: BTreeSet::new(),
        }
    }
}

impl DatapathOps for FakeDatapath {
    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        if self.fail_attach.contains(ifname) {
            return Err(DatapathError::Attach {
                ifname: ifname.to_string(),
                direction: "ingress",
                source: "injected failure".into(),
            });
        }
        self.attached.insert(ifname.to_string());
        Ok(())
    }

    fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attached.remove(ifname);
        Ok(())
    }

    fn apply(&mut self, desired: &DesiredState) -> Result<Diff, DatapathError> {
        self.counter_ids = desired.counter_ids.clone();
        let mut diff = Diff::default();
        if !desired.keep_policy_state {
            diff = self.ipcache.apply(&desired.ipcache)? + self.policy.apply(&desired.policy)?;
        }
        let diff = diff
            + self.endpoints.apply(&desired.endpoints)?
            + self.endpoints_by_if.apply(&desired.endpoints_by_if)?;
        if !diff.is_empty() {
            self.revision += 1;
        }
        Ok(diff)
    }

    fn policy_capacity(&self) -> usize {
        4096
    }

    fn gc_conntrack(&mut self) -> Result<usize, DatapathError> {
        Ok(0)
    }

    fn conntrack(
        &self,
    ) -> Result<
        Vec<(
            myelin_common::conntrack::CtKey,
            myelin_common::conntrack::CtEntry,
        )>,
        DatapathError,
    > {
        Ok(Vec::new())
    }

    fn set_event_mask(&mut self, mask: u32) -> Result<(), DatapathError> {
        self.event_mask = mask;
        Ok(())
    }

    fn endpoint_counters(&self, _id: u32) -> EndpointCounters {
        EndpointCounters::default()
    }

    fn endpoint(&self, ip: std::net::Ipv4Addr) -> Option<EndpointInfo> {
        self.endpoints
            .current()
            .get(&Ipv4Key { addr: ip.octets() })
            .copied()
    }

    fn drops(&self) -> Vec<(myelin_common::DropReason, u64, u64)> {
        Vec::new()
    }

    fn map_usage(&self) -> Vec<(&'static str, usize, u32)> {
        vec![("endpoints", self.endpoints.current().len(), 16)]
    }

    fn mode(&self) -> AttachMode {
        AttachMode::Tcx
    }
}
