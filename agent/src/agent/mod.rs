//! The agent's logic, free of I/O choices: IPAM, endpoints, the cluster index and identities,
//! turned into the desired datapath state and handed to a [`DatapathOps`]. The API server and
//! the sources call into it under one lock; unit tests drive it with the fake datapath.

use std::{
    collections::{BTreeSet, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use myelin_api::{
    AllocateRequest, Allocation, ApiError, AttachmentId, DeleteResponse, DropCount, Endpoint,
    EndpointRequest, ErrorKind, GcFailure, GcRequest, GcResponse, PodRef, PolicyStatus,
    PolicySummary, ReleaseResponse, Status, TrackedFlow, pending,
};
use myelin_common::{
    config::{EVENTS_DROPS, EVENTS_VERDICTS},
    conntrack::{CT_F_DENIED_EGRESS, CT_F_DENIED_INGRESS, CT_F_SEEN_REPLY},
    endpoint::ENDPOINT_F_POLICY_INCOMPLETE,
    identity,
};

use myelin_cluster::{Change, ClusterIndex, Identities, IdentityLabels, Labels};
use tracing::{info, warn};

use crate::{
    datapath::{DatapathError, DatapathOps, table::Diff},
    desired::{self, DesiredState, Inputs, LocalEndpoint},
    endpoint::{EndpointRecord, EndpointStore, EndpointStoreError},
    ipam::{Ipam, IpamError},
};

/// Looks up interfaces in the agent's network namespace (the node's).
pub trait Interfaces: Send {
    fn index_of(&self, ifname: &str) -> Option<u32>;
}

/// The real lookup: `if_nametoindex`.
pub struct SystemInterfaces;

impl Interfaces for SystemInterfaces {
    fn index_of(&self, ifname: &str) -> Option<u32> {
        nix::net::if_::if_nametoindex(ifname).ok()
    }
}

pub struct Agent<D> {
    node_name: String,
    ipam: Ipam,
    endpoints: EndpointStore,
    /// Endpoints whose host interface vanished while the agent was down: kept (their address
    /// stays reserved until DEL) but left out of the maps, since their ifindex may be reused.
    vanished: HashSet<AttachmentId>,
    index: ClusterIndex,
    identities: Identities,
    /// What `identities` was computed from: the index's label-set generation and the label
    /// sets of the local endpoints.
    identity_inputs: Option<(u64, Vec<Arc<IdentityLabels>>)>,
    datapath: D,
    interfaces: Box<dyn Interfaces>,
    /// Where the plugin queues DELs that found the agent down (`myelin_api::pending`).
    pending_deletes: Option<PathBuf>,
    /// The cluster-state source has an object for every pod (Kubernetes): an ADD for a pod it
    /// has not shown yet waits for it (see [`Agent::awaits_pod`]).
    pod_objects_expected: bool,
    synced: bool,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorKind::Internal, e.to_string())
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, msg)
}

impl From<IpamError> for ApiError {
    fn from(e: IpamError) -> Self {
        let kind = match e {
            IpamError::AlreadyAllocated { .. } => ErrorKind::AlreadyExists,
            IpamError::Exhausted(_) => ErrorKind::PoolExhausted,
            _ => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<EndpointStoreError> for ApiError {
    fn from(e: EndpointStoreError) -> Self {
        let kind = match e {
            EndpointStoreError::Full(_) => ErrorKind::PoolExhausted,
            EndpointStoreError::Persist(_) => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<DatapathError> for ApiError {
    fn from(e: DatapathError) -> Self {
        internal(e)
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl<D: DatapathOps> Agent<D> {
    pub fn new(
        node_name: String,
        ipam: Ipam,
        endpoints: EndpointStore,
        index: ClusterIndex,
        datapath: D,
        interfaces: Box<dyn Interfaces>,
    ) -> Self {
        Self {
            node_name,
            ipam,
            endpoints,
            vanished: HashSet::new(),
            index,
            identities: Identities::default(),
            identity_inputs: None,
            datapath,
            interfaces,
            pending_deletes: None,
            pod_objects_expected: false,
            synced: false,
        }
    }

    /// Every pod has an object in the cluster-state source (Kubernetes): see
    /// [`Agent::awaits_pod`].
    pub fn expecting_pod_objects(mut self) -> Self {
        self.pod_objects_expected = true;
        self
    }

    /// Whether an endpoint for `pod` should wait before it is created: the source has an object
    /// for every pod, is synced, and has not shown this one yet. The runtime can be faster than
    /// the watch; an endpoint created now would start with no labels, so that policies that
    /// select the pod would not isolate it from its first packet, as NetworkPolicy requires of
    /// pods created after the policy.
    pub fn awaits_pod(&self, pod: &PodRef) -> bool {
        self.pod_objects_expected
            && self.synced
            && self.index.pod(&pod.namespace, &pod.name).is_none()
    }

    /// Takes the DELs the plugin queues in `dir` while the agent is down.
    pub fn with_pending_deletes(mut self, dir: PathBuf) -> Self {
        self.pending_deletes = Some(dir);
        self
    }

    /// Carries out every queued DEL: removes the endpoint, releases the address, then the
    /// record. A record that fails stays for the next round; one that cannot be read is
    /// reported and removed (nothing can be done with it). Returns how many were carried out.
    pub fn process_pending_deletes(&mut self) -> usize {
        let Some(dir) = self.pending_deletes.clone() else {
            return 0;
        };
        let entries = match pending::list(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the queue of DELs");
                return 0;
            }
        };
        let mut done = 0;
        for entry in entries {
            match entry {
                pending::Entry::Delete { path, id } => {
                    if self.carry_out_pending_delete(&id, &path) {
                        done += 1;
                    }
                }
                pending::Entry::Unreadable { path, error } => {
                    warn!(record = %path.display(), %error, "removing an unreadable queued DEL");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        done
    }

    fn carry_out_pending_delete(&mut self, id: &AttachmentId, record: &Path) -> bool {
        match self.delete_endpoint(id) {
            Ok(deleted) => {
                info!(
                    attachment = %id, endpoint = deleted.endpoint, released = ?deleted.released,
                    "carried out a DEL queued while the agent was down"
                );
                if let Err(e) = std::fs::remove_file(record) {
                    warn!(record = %record.display(), error = %e, "cannot remove a queued DEL");
                }
                true
            }
            Err(e) => {
                warn!(attachment = %id, error = %e, "a queued DEL failed; trying again later");
                false
            }
        }
    }

    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    pub fn index(&self) -> &ClusterIndex {
        &self.index
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    /// Marks the cluster-state sources as fully listed: the agent is ready, and the maps are
    /// brought fully in line with the cluster state (see [`Self::restore`]).
    pub fn set_synced(&mut self) -> Result<Diff, DatapathError> {
        self.synced = true;
        self.recompute_identities();
        self.sync_datapath()
    }

    /// After a (re)start: re-attaches the programs of every endpoint whose interface still
    /// exists and writes the endpoints' entries. Until the cluster state is synced, the
    /// identities, isolation flags, ipcache and policy entries an earlier agent left in the
    /// pinned maps stay as they are: an agent restarted while the API server is down must not
    /// forget the policies it enforced.
    pub fn restore(&mut self) -> Result<(), DatapathError> {
        let records: Vec<EndpointRecord> = self.endpoints.iter().cloned().collect();
        for r in records {
            if self.interfaces.index_of(&r.host_ifname) == Some(r.host_ifindex) {
                self.datapath.attach(&r.host_ifname)?;
            } else {
                warn!(
                    attachment = %r.attachment, ifname = r.host_ifname,
                    "interface of endpoint vanished while the agent was down; \
                     its address stays reserved until CNI DEL"
                );
                self.vanished.insert(r.attachment.clone());
            }
        }
        self.recompute_identities();
        let diff = self.sync_datapath()?;
        info!(
            endpoints = self.endpoints.len(),
            written = diff.writes(),
            "state restored"
        );
        Ok(())
    }

    /// Applies a batch of changes from a cluster-state source, then brings the maps in line
    /// once; returns what the maps changed.
    pub fn apply_cluster_changes(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
    ) -> Result<Diff, DatapathError> {
        let mut changed = false;
        for change in changes {
            changed |= self.index.apply(change);
        }
        if !changed {
            return Ok(Diff::default());
        }
        self.recompute_identities();
        self.sync_datapath()
    }

    fn pod_identity_labels(&self, r: &EndpointRecord) -> Arc<IdentityLabels> {
        match &r.pod {
            Some(p) => self.index.identity_labels_of_pod(&p.namespace, &p.name),
            None => Arc::new(self.index.identity_labels("", &Labels::new())),
        }
    }

    /// Renumbers identities when the set of label sets changed: a label change that moves a
    /// pod to an existing set, the common case, costs nothing here.
    fn recompute_identities(&mut self) {
        let mut endpoint_sets: Vec<Arc<IdentityLabels>> = self
            .endpoints
            .iter()
            .map(|r| self.pod_identity_labels(r))
            .collect();
        endpoint_sets.sort();
        endpoint_sets.dedup();
        let inputs = (self.index.label_sets_generation(), endpoint_sets);
        if self.identity_inputs.as_ref() == Some(&inputs) {
            return;
        }
        let sets = self
            .index
            .label_sets()
            .cloned()
            .chain(inputs.1.iter().cloned());
        self.identities = Identities::compute(sets);
        self.identity_inputs = Some(inputs);
    }

    fn identity_of(&self, r: &EndpointRecord) -> u32 {
        // Before the first sync the maps hold the last agent's identities; report those.
        if !self.synced
            && let Some(current) = self.datapath.endpoint(r.ip)
        {
            return current.identity;
        }
        self.identities
            .get(&self.pod_identity_labels(r))
            .unwrap_or(identity::ANY)
    }

    pub fn desired_state(&self) -> DesiredState {
        let endpoints = self
            .endpoints
            .iter()
            .map(|r| {
                let labels = self.pod_identity_labels(r);
                let ports = r
                    .pod
                    .as_ref()
                    .and_then(|p| self.index.pod(&p.namespace, &p.name))
                    .map(|p| p.ports.as_slice())
                    .unwrap_or_default();
                LocalEndpoint {
                    record: r,
                    identity: self.identities.get(&labels).unwrap_or(identity::ANY),
                    labels,
                    ports,
                    live: !self.vanished.contains(&r.attachment),
                }
            })
            .collect();
        desired::compute(&Inputs {
            node_name: &self.node_name,
            gateway: self.ipam.gateway(),
            endpoints,
            index: &self.index,
            identities: &self.identities,
            policy_capacity: self.datapath.policy_capacity(),
        })
    }

    fn sync_datapath(&mut self) -> Result<Diff, DatapathError> {
        let mut desired = self.desired_state();
        if !self.synced {
            // Keep what the maps say about endpoints the kernel already knows; new endpoints
            // get what the (partial) cluster state says.
            desired.keep_policy_state = true;
            for info in desired
                .endpoints
                .values_mut()
                .chain(desired.endpoints_by_if.values_mut())
            {
                if let Some(current) = self.datapath.endpoint(Ipv4Addr::from(info.ip))
                    && current.ifindex == info.ifindex
                {
                    info.identity = current.identity;
                    info.flags = current.flags;
                }
            }
        }
        self.datapath.apply(&desired)
    }

    pub fn allocate(&mut self, req: &AllocateRequest) -> Result<Allocation, ApiError> {
        // A DEL of the same attachment queued while the agent was down, and not carried out
        // yet, came before this ADD: it goes first, or it would later delete the new endpoint.
        if let Some(record) = self
            .pending_deletes
            .as_deref()
            .and_then(|dir| pending::find(dir, &req.attachment))
            && !self.carry_out_pending_delete(&req.attachment, &record)
        {
            return Err(ApiError::new(
                ErrorKind::Internal,
                format!(
                    "a DEL of {} queued while the agent was down could not be carried out; \
                     see the agent's log",
                    req.attachment
                ),
            ));
        }
        let ip = self.ipam.allocate(&req.attachment)?;
        info!(attachment = %req.attachment, %ip, "address allocated");
        Ok(Allocation {
            ip,
            gateway: self.ipam.gateway(),
            pod_cidr: self.ipam.cidr().to_string(),
        })
    }

    /// Releases an address. Refused while an endpoint uses it: DELETE the endpoint instead.
    pub fn release(&mut self, id: &AttachmentId) -> Result<ReleaseResponse, ApiError> {
        if self.endpoints.get(id).is_some() {
            return Err(invalid(format!(
                "{id} has a live endpoint: delete the endpoint, which releases its address"
            )));
        }
        Ok(ReleaseResponse {
            released: self.ipam.release(id)?,
        })
    }

    pub fn put_endpoint(&mut self, req: &EndpointRequest) -> Result<Endpoint, ApiError> {
        let id = &req.attachment;
        if self.endpoints.get(id).is_some() {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!("{id} already has an endpoint"),
            ));
        }
        match self.ipam.get(id) {
            Some(ip) if ip == req.ip => {}
            Some(ip) => {
                return Err(invalid(format!("{id} was allocated {ip}, not {}", req.ip)));
            }
            None => return Err(invalid(format!("{id} has no allocated address"))),
        }
        if !valid_ifname(&req.host_ifname) {
            return Err(invalid(format!(
                "hostIfname {:?} is not a valid interface name",
                req.host_ifname
            )));
        }
        if let Some(other) = self
            .endpoints
            .iter()
            .find(|r| r.host_ifname == req.host_ifname || r.host_ifindex == req.host_ifindex)
        {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "interface {} is already endpoint {}",
                    req.host_ifname, other.attachment
                ),
            ));
        }
        match self.interfaces.index_of(&req.host_ifname) {
            Some(index) if index == req.host_ifindex => {}
            found => {
                return Err(invalid(format!(
                    "interface {} has ifindex {found:?} in the agent's network namespace, not {}",
                    req.host_ifname, req.host_ifindex
                )));
            }
        }

        let record = EndpointRecord {
            id: self.endpoints.free_id()?,
            attachment: id.clone(),
            pod: req.pod.clone(),
            netns: req.netns.clone(),
            ip: req.ip,
            mac: req.mac,
            host_ifname: req.host_ifname.clone(),
            host_ifindex: req.host_ifindex,
            host_mac: req.host_mac,
        };
        self.endpoints.insert(record.clone());
        self.vanished.remove(id);
        self.recompute_identities();
        // Maps first, then the programs: the first packet must find its endpoint.
        let started = std::time::Instant::now();
        let mut maps_done = started;
        let result = self
            .sync_datapath()
            .map_err(ApiError::from)
            .and_then(|_| {
                maps_done = std::time::Instant::now();
                Ok(self.datapath.attach(&record.host_ifname)?)
            })
            .and_then(|()| Ok(self.endpoints.save()?));
        if let Err(e) = result {
            self.rollback_endpoint(&record);
            return Err(e);
        }
        info!(
            attachment = %id, ip = %record.ip, ifname = record.host_ifname, endpoint = record.id,
            maps_us = (maps_done - started).as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "endpoint created"
        );

        Ok(self.to_api(&record))
    }

    fn rollback_endpoint(&mut self, record: &EndpointRecord) {
        self.endpoints.remove(&record.attachment);
        if let Err(e) = self.datapath.detach(&record.host_ifname) {
            warn!(error = %e, "rollback: detaching programs failed");
        }
        self.recompute_identities();
        if let Err(e) = self.sync_datapath() {
            warn!(error = %e, "rollback: restoring the maps failed");
        }
    }

    /// Removes an attachment's endpoint (programs, map entries) and releases its address.
    /// Deleting what does not exist succeeds.
    pub fn delete_endpoint(&mut self, id: &AttachmentId) -> Result<DeleteResponse, ApiError> {
        let removed = self.endpoints.remove(id);
        if let Some(r) = &removed {
            self.vanished.remove(id);
            self.recompute_identities();
            let result = self
                .sync_datapath()
                .map_err(ApiError::from)
                .and_then(|_| Ok(self.datapath.detach(&r.host_ifname)?))
                .and_then(|()| Ok(self.endpoints.save()?));
            if let Err(e) = result {
                // Put it back so that a retried DEL finds it.
                self.endpoints.insert(r.clone());
                self.recompute_identities();
                let _ = self.sync_datapath();
                return Err(e);
            }
        }
        let released = self.ipam.release(id)?;
        if removed.is_some() || released.is_some() {
            info!(attachment = %id, ?released, "endpoint deleted");
        }
        Ok(DeleteResponse {
            endpoint: removed.is_some(),
            released,
        })
    }

    /// CNI GC: releases every endpoint and address whose attachment is not in `valid`.
    pub fn gc(&mut self, req: &GcRequest) -> Result<GcResponse, ApiError> {
        let valid: BTreeSet<&AttachmentId> = req.valid.iter().collect();
        let mut doomed: BTreeSet<AttachmentId> = self
            .endpoints
            .iter()
            .map(|r| r.attachment.clone())
            .filter(|a| !valid.contains(a))
            .collect();
        doomed.extend(
            self.ipam
                .allocations()
                .map(|(a, _)| a.clone())
                .filter(|a| !valid.contains(a)),
        );
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        for id in doomed {
            match self.delete_endpoint(&id) {
                Ok(_) => removed.push(id),
                Err(e) => {
                    warn!(attachment = %id, error = %e, "GC: could not remove the attachment");
                    failed.push(GcFailure {
                        attachment: id,
                        error: e.to_string(),
                    });
                }
            }
        }
        Ok(GcResponse { removed, failed })
    }

    pub fn endpoints(&self, filter: Option<&AttachmentId>) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter(|r| filter.is_none_or(|f| *f == r.attachment))
            .map(|r| self.to_api(r))
            .collect()
    }

    fn to_api(&self, r: &EndpointRecord) -> Endpoint {
        let c = self.datapath.endpoint_counters(r.id);
        Endpoint {
            id: r.id,
            attachment: r.attachment.clone(),
            pod: r.pod.clone(),
            netns: r.netns.clone(),
            ip: r.ip,
            mac: r.mac,
            host_ifname: r.host_ifname.clone(),
            host_ifindex: r.host_ifindex,
            host_mac: r.host_mac,
            identity: self.identity_of(r),
            counters: myelin_api::EndpointCounters {
                rx_packets: c.rx_packets,
                rx_bytes: c.rx_bytes,
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
            },
        }
    }

    pub fn status(&self) -> Status {
        Status {
            node_name: self.node_name.clone(),
            pod_cidr: self.ipam.cidr().to_string(),
            gateway: self.ipam.gateway(),
            endpoints: self.endpoints.len(),
            free_addresses: self.ipam.free(),
            ready: self.synced,
            attach_mode: self.datapath.mode().as_str().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.ipam.gateway()
    }

    /// The policies in force, with the local pods each selects.
    pub fn policies(&self) -> PolicyStatus {
        let pods: Vec<(PodRef, Arc<IdentityLabels>, u32)> = self
            .endpoints
            .iter()
            .filter_map(|r| {
                let pod = r.pod.clone()?;
                let flags = self.datapath.endpoint(r.ip).map_or(0, |e| e.flags);
                Some((pod, self.pod_identity_labels(r), flags))
            })
            .collect();
        let usage = self.datapath.map_usage();
        let (entries, capacity) = usage
            .iter()
            .find(|(name, _, _)| *name == myelin_common::maps::POLICY)
            .map_or((0, 0), |(_, e, c)| (*e, *c as usize));
        PolicyStatus {
            policies: self
                .index
                .policies()
                .map(|p| PolicySummary {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    ingress: p.ingress.is_some(),
                    egress: p.egress.is_some(),
                    selects: pods
                        .iter()
                        .filter(|(_, labels, _)| p.selects(labels))
                        .map(|(pod, _, _)| pod.clone())
                        .collect(),
                })
                .collect(),
            entries,
            capacity,
            incomplete: pods
                .iter()
                .filter(|(_, _, flags)| flags & ENDPOINT_F_POLICY_INCOMPLETE != 0)
                .map(|(pod, _, _)| pod.clone())
                .collect(),
        }
    }

    pub fn drops(&self) -> Vec<DropCount> {
        self.datapath
            .drops()
            .into_iter()
            .map(|(reason, packets, bytes)| DropCount {
                reason: reason.name().to_string(),
                packets,
                bytes,
            })
            .collect()
    }

    pub fn conntrack(&self) -> Result<Vec<TrackedFlow>, ApiError> {
        let now = crate::datapath::monotonic_ns();
        Ok(self
            .datapath
            .conntrack()?
            .into_iter()
            .filter(|(_, e)| e.expires_ns > now)
            .map(|(k, e)| {
                let protocol = crate::events::protocol_name(k.protocol);
                let endpoint = |addr: [u8; 4], port: u16| {
                    crate::events::endpoint(Ipv4Addr::from(addr), u16::from_be(port), k.protocol)
                };
                TrackedFlow {
                    protocol,
                    src: endpoint(k.saddr, k.sport),
                    dst: endpoint(k.daddr, k.dport),
                    expires_in: (e.expires_ns - now) / 1_000_000_000,
                    seen_reply: e.flags & CT_F_SEEN_REPLY != 0,
                    denied: e.flags & (CT_F_DENIED_INGRESS | CT_F_DENIED_EGRESS) != 0,
                }
            })
            .collect())
    }

    /// Turns datapath events on (while someone watches) or off.
    pub fn set_events(&mut self, on: bool) -> Result<(), DatapathError> {
        let mask = if on {
            EVENTS_DROPS | EVENTS_VERDICTS
        } else {
            0
        };
        self.datapath.set_event_mask(mask)
    }

    /// Removes expired conntrack entries.
    pub fn gc_conntrack(&mut self) -> Result<usize, DatapathError> {
        self.datapath.gc_conntrack()
    }

    /// Values for the metrics endpoint.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            ready: self.synced,
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            free_addresses: self.ipam.free(),
            pods_indexed: self.index.pod_count(),
            drops: self
                .datapath
                .drops()
                .into_iter()
                .map(|(r, p, b)| (r.name(), p, b))
                .collect(),
            maps: self.datapath.map_usage(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use myelin_api::Mac;
    use myelin_common::{Ipv4Key, endpoint::ENDPOINT_F_INGRESS_ISOLATED};

    use myelin_cluster::{Object, PodInfo, builders};

    use super::*;
    use crate::datapath::{fake::FakeDatapath, table::LpmKey};

    /// Interfaces that "exist" in the test: name -> ifindex.
    struct FakeInterfaces(HashMap<String, u32>);

    impl Interfaces for FakeInterfaces {
        fn index_of(&self, ifname: &str) -> Option<u32> {
            self.0.get(ifname).copied()
        }
    }

    /// A synced agent (cluster state known), as in normal operation.
    fn agent_with(interfaces: &[(&str, u32)], cidr: &str) -> Agent<FakeDatapath> {
        let mut agent = unsynced_agent_with(interfaces, cidr);
        agent.set_synced().unwrap();
        agent
    }

    fn unsynced_agent_with(interfaces: &[(&str, u32)], cidr: &str) -> Agent<FakeDatapath> {
        Agent::new(
            "node-1".into(),
            Ipam::in_memory(cidr.parse().unwrap()).unwrap(),
            EndpointStore::in_memory(16),
            ClusterIndex::default(),
            FakeDatapath::new(16),
            Box::new(FakeInterfaces(
                interfaces
                    .iter()
                    .map(|(n, i)| (n.to_string(), *i))
                    .collect(),
            )),
        )
    }

    fn agent() -> Agent<FakeDatapath> {
        agent_with(&[("lxca", 10), ("lxcb", 11)], "10.244.0.0/24")
    }

    fn att(c: &str) -> AttachmentId {
        AttachmentId::new(c, "eth0")
    }

    fn add(
        agent: &mut Agent<FakeDatapath>,
        c: &str,
        ifname: &str,
        ifindex: u32,
    ) -> Result<Endpoint, ApiError> {
        let alloc = agent.allocate(&AllocateRequest {
            attachment: att(c),
            pod: None,
        })?;
        agent.put_endpoint(&EndpointRequest {
            attachment: att(c),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: c.into(),
            }),
            netns: format!("/run/netns/{c}"),
            ip: alloc.ip,
            mac: Mac([2, 0, 0, 0, 0, 1]),
            host_ifname: ifname.into(),
            host_ifindex: ifindex,
            host_mac: Mac([2, 0, 0, 0, 0, 2]),
        })
    }

    #[test]
    fn endpoint_is_in_both_maps_and_attached_before_put_returns() {
        let mut a = agent();
        let ep = add(&mut a, "a", "lxca", 10).unwrap();
        let dp = a.datapath();
        assert!(dp.attached.contains("lxca"));
        let by_ip = dp.tables.endpoints.map().entries[&Ipv4Key {
            addr: ep.ip.octets(),
        }];
        assert_eq!(by_ip.ifindex, 10);
        assert_eq!(by_ip.id, ep.id);
        assert_eq!(dp.tables.endpoints_by_if.map().entries[&10], by_ip);
        assert!(dp.state.counter_ids.contains(&ep.id));
        assert_ne!(ep.identity, 0);
    }

    #[test]
    fn delete_removes_everything_and_is_idempotent() {
        let mut a = agent();
        let free = a.status().free_addresses;
        let ep = add(&mut a, "a", "lxca", 10).unwrap();
        let del = a.delete_endpoint(&att("a")).unwrap();
        assert!(del.endpoint);
        assert_eq!(del.released, Some(ep.ip));
        let dp = a.datapath();
        assert!(dp.attached.is_empty());
        assert!(dp.tables.endpoints.map().entries.is_empty());
        assert!(dp.tables.endpoints_by_if.map().entries.is_empty());
        assert!(dp.state.counter_ids.is_empty());
        assert_eq!(a.status().free_addresses, free);
        assert_eq!(
            a.delete_endpoint(&att("a")).unwrap(),
            DeleteResponse::default()
        );
    }

    #[test]
    fn dels_queued_while_the_agent_was_down_are_carried_out_once_and_before_a_new_add() {
        let queue = tempfile::tempdir().unwrap();
        let mut a = agent().with_pending_deletes(queue.path().to_path_buf());
        let free = a.status().free_addresses;
        add(&mut a, "a", "lxca", 10).unwrap();
        add(&mut a, "b", "lxcb", 11).unwrap();
        // Nothing queued: nothing happens.
        assert_eq!(a.process_pending_deletes(), 0);

        // "a" was deleted while the agent was down; a record nobody can read sits beside it.
        pending::enqueue(queue.path(), &att("a")).unwrap();
        std::fs::write(queue.path().join("garbage.json"), "not json").unwrap();
        assert_eq!(a.process_pending_deletes(), 1);
        assert_eq!(a.endpoints(None).len(), 1, "b stays");
        assert_eq!(
            a.status().free_addresses,
            free - 1,
            "a's address is free again"
        );
        assert!(
            pending::list(queue.path()).unwrap().is_empty(),
            "records are gone"
        );
        assert_eq!(a.process_pending_deletes(), 0);

        // A DEL of "b" queued after the agent's pass (it raced the start), then "b" added
        // again before the next pass: the ADD carries the DEL out first (without it, "b"
        // would be refused as existing), and no later pass deletes the new endpoint.
        pending::enqueue(queue.path(), &att("b")).unwrap();
        let again = add(&mut a, "b", "lxcb", 11).unwrap();
        assert!(pending::find(queue.path(), &att("b")).is_none());
        assert_eq!(a.process_pending_deletes(), 0);
        assert_eq!(a.endpoints(Some(&att("b"))), vec![again]);
        assert_eq!(a.status().free_addresses, free - 1, "no address leaked");
        assert!(a.endpoints(Some(&att("a"))).is_empty());
    }

    #[test]
    fn endpoint_needs_a_matching_allocation_and_interface() {
        let mut a = agent();
        let alloc = a
            .allocate(&AllocateRequest {
                attachment: att("a"),
                pod: None,
            })
            .unwrap();
        let mut req = EndpointRequest {
            attachment: att("a"),
            pod: None,
            netns: "/run/netns/a".into(),
            ip: Ipv4Addr::new(10, 244, 0, 200),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            host_ifname: "lxca".into(),
            host_ifindex: 10,
            host_mac: Mac([2, 0, 0, 0, 0, 2]),
        };
        assert_eq!(
            a.put_endpoint(&req).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
        req.ip = alloc.ip;
        req.host_ifindex = 99;
        assert_eq!(
            a.put_endpoint(&req).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
        req.host_ifindex = 10;
        a.put_endpoint(&req).unwrap();
        assert_eq!(
            a.put_endpoint(&req).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn failed_attach_leaves_no_endpoint_and_no_map_entry() {
        let mut a = agent();
        a.datapath.fail_attach.insert("lxca".into());
        let err = add(&mut a, "a", "lxca", 10).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Internal);
        assert!(a.endpoints(None).is_empty());
        assert!(a.datapath().tables.endpoints.map().entries.is_empty());
        assert!(a.datapath().state.counter_ids.is_empty());
        // The address stays allocated until the plugin's rollback releases it.
        assert!(a.release(&att("a")).unwrap().released.is_some());
    }

    #[test]
    fn release_is_refused_while_an_endpoint_uses_the_address() {
        let mut a = agent();
        add(&mut a, "a", "lxca", 10).unwrap();
        assert_eq!(
            a.release(&att("a")).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
    }

    #[test]
    fn exhausted_pool_is_reported_as_such() {
        let mut a = agent_with(&[("lxca", 10), ("lxcb", 11)], "10.0.0.0/30");
        add(&mut a, "a", "lxca", 10).unwrap();
        assert_eq!(
            add(&mut a, "b", "lxcb", 11).unwrap_err().kind,
            ErrorKind::PoolExhausted
        );
    }

    #[test]
    fn gc_releases_everything_not_listed() {
        let mut a = agent();
        add(&mut a, "a", "lxca", 10).unwrap();
        add(&mut a, "b", "lxcb", 11).unwrap();
        a.allocate(&AllocateRequest {
            attachment: att("orphan"),
            pod: None,
        })
        .unwrap();
        let gc = a
            .gc(&GcRequest {
                valid: vec![att("a")],
            })
            .unwrap();
        assert_eq!(gc.removed, vec![att("b"), att("orphan")]);
        assert_eq!(a.endpoints(None).len(), 1);
        assert!(a.datapath().attached.contains("lxca"));
        assert!(!a.datapath().attached.contains("lxcb"));
    }

    #[test]
    fn an_add_awaits_its_pod_only_from_a_synced_source_that_has_objects_for_pods() {
        let web = PodRef {
            namespace: "default".into(),
            name: "web".into(),
        };
        // The directory source, or none: pods need no object.
        assert!(!agent().awaits_pod(&web));
        // Kubernetes before the first sync: what is missing may just not be listed yet, and
        // the API server may be down; the agent serves its pods as they are.
        let mut a = unsynced_agent_with(&[], "10.244.0.0/24").expecting_pod_objects();
        assert!(!a.awaits_pod(&web));
        a.set_synced().unwrap();
        assert!(a.awaits_pod(&web), "synced, and the object has not come");
        let (pod, _) =
            PodInfo::from_k8s(&builders::pod("default", "web", &[("app", "web")], None)).unwrap();
        a.apply_cluster_changes([Change::Apply(Object::Pod(pod))])
            .unwrap();
        assert!(!a.awaits_pod(&web), "the object is in");
    }

    #[test]
    fn label_change_updates_the_endpoint_identity_in_the_maps() {
        let mut a = agent();
        let ep = add(&mut a, "a", "lxca", 10).unwrap();
        let key = Ipv4Key {
            addr: ep.ip.octets(),
        };
        let before = a.datapath().tables.endpoints.map().entries[&key].identity;
        let (pod, _) =
            PodInfo::from_k8s(&builders::pod("default", "a", &[("app", "web")], None)).unwrap();
        let diff = a
            .apply_cluster_changes([Change::Apply(Object::Pod(pod.clone()))])
            .unwrap();
        assert_eq!(
            diff.updated, 3,
            "both endpoint maps and the ipcache carry the identity"
        );
        let after = a.datapath().tables.endpoints.map().entries[&key].identity;
        assert_ne!(before, after);
        // The same event again changes nothing and writes nothing.
        let writes = a.datapath().tables.endpoints.map().writes;
        assert!(
            a.apply_cluster_changes([Change::Apply(Object::Pod(pod))])
                .unwrap()
                .is_empty()
        );
        assert_eq!(a.datapath().tables.endpoints.map().writes, writes);
    }

    #[test]
    fn before_the_first_sync_the_maps_keep_their_policy_state() {
        let mut a = unsynced_agent_with(&[("lxca", 10), ("lxcb", 11)], "10.244.0.0/24");
        // What an earlier agent left: an isolated endpoint with some identity, and policy.
        let ep = add(&mut a, "a", "lxca", 10).unwrap();
        let key = Ipv4Key {
            addr: ep.ip.octets(),
        };
        let mut left = a.datapath().tables.endpoints.current()[&key];
        left.identity = 4242;
        left.flags = ENDPOINT_F_INGRESS_ISOLATED;
        let mut restarted = unsynced_agent_with(&[("lxca", 10), ("lxcb", 11)], "10.244.0.0/24");
        restarted
            .datapath
            .tables
            .endpoints
            .apply(&[(key, left)].into())
            .unwrap();
        let policy_key = LpmKey {
            prefix_len: 72,
            data: myelin_common::PolicyKey {
                endpoint_id: ep.id,
                identity: 7,
                direction: 0,
                protocol: 0,
                dport: [0; 2],
            },
        };
        let allow = myelin_common::PolicyEntry { flags: 1 };
        restarted
            .datapath
            .tables
            .policy
            .apply(&[(policy_key, allow)].into())
            .unwrap();
        restarted.endpoints.insert(crate::endpoint::EndpointRecord {
            id: ep.id,
            attachment: att("a"),
            pod: ep.pod.clone(),
            netns: ep.netns.clone(),
            ip: ep.ip,
            mac: ep.mac,
            host_ifname: ep.host_ifname.clone(),
            host_ifindex: ep.host_ifindex,
            host_mac: ep.host_mac,
        });
        restarted.ipam.allocate(&att("a")).unwrap();

        restarted.restore().unwrap();
        let dp = restarted.datapath();
        assert_eq!(
            dp.tables.endpoints.current()[&key].identity,
            4242,
            "identity kept"
        );
        assert_eq!(
            dp.tables.endpoints.current()[&key].flags,
            ENDPOINT_F_INGRESS_ISOLATED
        );
        assert_eq!(dp.tables.policy.current().len(), 1, "policy entries kept");
        assert_eq!(
            restarted.endpoints(None)[0].identity,
            4242,
            "the API reports the kept one"
        );

        restarted.set_synced().unwrap();
        let dp = restarted.datapath();
        assert_ne!(dp.tables.endpoints.current()[&key].identity, 4242);
        assert_eq!(
            dp.tables.endpoints.current()[&key].flags,
            0,
            "no policy selects it"
        );
        assert!(dp.tables.policy.current().is_empty());
    }

    #[test]
    fn restore_reattaches_live_endpoints_and_skips_vanished_ones() {
        let mut store = EndpointStore::in_memory(16);
        store.insert(crate::endpoint::record(1, "a", [10, 244, 0, 2]));
        store.insert(crate::endpoint::record(2, "b", [10, 244, 0, 3]));
        let mut ipam = Ipam::in_memory("10.244.0.0/24".parse().unwrap()).unwrap();
        ipam.allocate(&att("a")).unwrap();
        ipam.allocate(&att("b")).unwrap();
        // Only "a"'s interface still exists, with the recorded ifindex.
        let mut a = Agent::new(
            "n".into(),
            ipam,
            store,
            ClusterIndex::default(),
            FakeDatapath::new(16),
            Box::new(FakeInterfaces([("lxca".to_string(), 101)].into())),
        );
        a.restore().unwrap();
        let dp = a.datapath();
        assert_eq!(dp.attached, BTreeSet::from(["lxca".to_string()]));
        assert_eq!(
            dp.tables
                .endpoints_by_if
                .map()
                .entries
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![101]
        );
        // The vanished endpoint keeps its address until DEL.
        assert_eq!(a.status().endpoints, 2);
        a.delete_endpoint(&att("b")).unwrap();
        assert_eq!(a.status().endpoints, 1);
    }
}
