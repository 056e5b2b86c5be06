//! In-memory datapath for unit tests of the agent's logic: the same [`Tables`] over fake maps,
//! applied through the same code as the kernel's, and a record of attachments.

use std::collections::BTreeSet;

use myelin_common::{
    EndpointCounters, EndpointInfo, IpcacheEntry, Ipv4Key, PolicyEntry, PolicyKey,
    lb::{LbEntry, LbKey},
    maglev::MaglevTable,
    nat::MasqExclude,
};

use super::{
    AttachMode, DatapathError, DatapathOps, Routing,
    table::{ApplyHooks, Diff, FakeMap, LpmKey, TableError, Tables},
};
use crate::desired::DesiredState;

pub type FakeTables = Tables<
    FakeMap<Ipv4Key, EndpointInfo>,
    FakeMap<u32, EndpointInfo>,
    FakeMap<LpmKey<Ipv4Key>, IpcacheEntry>,
    FakeMap<LpmKey<PolicyKey>, PolicyEntry>,
    FakeMap<LpmKey<Ipv4Key>, MasqExclude>,
    FakeMap<LbKey, LbEntry>,
    FakeMap<LbKey, MaglevTable>,
>;

pub struct FakeDatapath {
    pub tables: FakeTables,
    pub state: FakeState,
    pub attached: BTreeSet<String>,
    /// Interface names whose attach fails (to test rollback).
    pub fail_attach: BTreeSet<String>,
}

/// What the fake records of the hooks around the tables.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Bumped like the real datapath's policy revision.
    pub revision: u32,
    pub event_mask: u32,
    pub routing: Routing,
    pub counter_ids: BTreeSet<u32>,
}

impl ApplyHooks for FakeState {
    fn sync_counters(&mut self, ids: &BTreeSet<u32>) -> Result<(), TableError> {
        self.counter_ids = ids.clone();
        Ok(())
    }

    fn policy_changed(&mut self) -> Result<(), TableError> {
        self.revision += 1;
        Ok(())
    }
}

impl FakeDatapath {
    pub fn new(capacity: u32) -> Self {
        Self {
            tables: Tables::new(
                FakeMap::new("endpoints", capacity),
                FakeMap::new("endpoints_by_if", capacity),
                FakeMap::new("ipcache", 4096),
                FakeMap::new("policy", 4096),
                FakeMap::new("masq_exclude", 4096),
                FakeMap::new("lb_services", 4096),
                FakeMap::new("lb_maglev", 4096),
            )
            .expect("fake maps cannot fail"),
            state: FakeState::default(),
            attached: BTreeSet::new(),
            fail_attach: BTreeSet::new(),
        }
    }
}

impl FakeDatapath {
    /// With an `lb_services` of `capacity` slots.
    pub fn with_lb_capacity(mut self, capacity: u32) -> Self {
        self.tables.lb_services =
            super::table::Reconciler::new(FakeMap::new("lb_services", capacity))
                .expect("fake maps cannot fail");
        self
    }
}

impl FakeDatapath {
    /// With an `lb_maglev` of `capacity` tables.
    pub fn with_maglev_capacity(mut self, capacity: u32) -> Self {
        self.tables.lb_maglev =
            super::maglev::MaglevReconciler::new(FakeMap::new("lb_maglev", capacity))
                .expect("fake maps cannot fail");
        self
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
        Ok(self.tables.apply(desired, &mut self.state)?)
    }

    fn policy_capacity(&self) -> usize {
        4096
    }

    fn set_event_mask(&mut self, mask: u32) -> Result<(), DatapathError> {
        self.state.event_mask = mask;
        Ok(())
    }

    fn set_routing(&mut self, routing: Routing) -> Result<(), DatapathError> {
        self.state.routing = routing;
        Ok(())
    }

    fn endpoint_counters(&self, _id: u32) -> EndpointCounters {
        EndpointCounters::default()
    }

    fn endpoint(&self, ip: std::net::Ipv4Addr) -> Option<EndpointInfo> {
        self.tables.endpoint(ip)
    }

    fn endpoints_in_maps(&self) -> Vec<EndpointInfo> {
        self.tables
            .endpoints_by_if
            .current()
            .values()
            .copied()
            .collect()
    }

    fn drops(&self) -> Vec<(myelin_common::DropReason, u64, u64)> {
        Vec::new()
    }

    fn map_usage(&self) -> Vec<(&'static str, usize, u32)> {
        self.tables.usage()
    }

    fn services_unwritten(&self) -> Option<&super::table::Unwritten> {
        self.tables.lb_unwritten.as_ref()
    }

    fn maglev_unwritten(&self) -> Option<&super::table::Unwritten> {
        self.tables.lb_maglev_unwritten.as_ref()
    }

    fn mode(&self) -> AttachMode {
        AttachMode::Tc
    }
}
