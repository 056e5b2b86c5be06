//! The agent's logic, free of I/O choices: IPAM, endpoints, the cluster index and identities,
//! turned into the desired datapath state and handed to a [`DatapathOps`]. One task owns it
//! (`crate::owner`) and runs every request and every cluster change on it in turn; unit tests
//! drive it with the fake datapath.
//!
//! - `heal`: the agent's files checked against the kernel, at start and periodically.
//! - `view`: what the API and the metrics show.

mod explain;
mod heal;
mod view;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use myelin_api::{
    AllocateRequest, Allocation, ApiError, AttachmentId, DeleteResponse, Endpoint, EndpointRequest,
    ErrorKind, GcFailure, GcRequest, GcResponse, PodRef, ReleaseResponse, pending,
};
use myelin_common::{
    config::{EVENTS_DROPS, EVENTS_VERDICTS},
    identity,
    lb::{LbEntry, LbKey},
};

use ipnet::Ipv4Net;
use myelin_cluster::{Change, ChangedServices, ClusterIndex, Identities, IdentityLabels, Labels};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    datapath::{DatapathError, DatapathOps, table::Diff},
    desired::{
        self, DesiredState, Inputs, LocalEndpoint,
        services::maglev::{self, LbAlgorithm},
    },
    endpoint::{EndpointRecord, EndpointStore, EndpointStoreError},
    events::{FlowNames, LocalPod},
    health::HealthChecks,
    ipam::{Ipam, IpamError},
};

/// A sync of the maps that takes this long is logged with its stages (a backend change is
/// meant to be in use within 100 ms of its EndpointSlice).
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(50);

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

/// Maglev's lookup tables and what they were computed from.
#[derive(Default)]
struct MaglevState {
    /// `--lb-maglev-table-size` with `--lb-algorithm maglev`; `None`: random, no tables.
    table_size: Option<u32>,
    /// The slots the tables were computed from.
    from: Arc<BTreeMap<LbKey, LbEntry>>,
    tables: Arc<maglev::Tables>,
}

pub struct Agent<D> {
    node_name: String,
    ipam: Ipam,
    endpoints: EndpointStore,
    /// Endpoints whose host interface vanished, since when: left out of the maps at once (the
    /// ifindex may be reused), released after the grace period (see [`Agent::sweep`]).
    vanished: HashMap<AttachmentId, Instant>,
    /// Addresses allocated without an endpoint, since when: an ADD in progress, or one whose
    /// plugin died or gave up between the two calls. Released after the grace period.
    unclaimed: HashMap<AttachmentId, Instant>,
    /// Interfaces with a Myelin name that no endpoint claims, since when they were first seen:
    /// removed after the grace period.
    orphan_links: HashMap<u32, (String, Instant)>,
    index: ClusterIndex,
    identities: Identities,
    /// What `identities` was computed from: the index's label-set generation and the label
    /// sets of the local endpoints.
    identity_inputs: Option<(u64, Vec<Arc<IdentityLabels>>)>,
    /// Bumped whenever the index or the identities change: the key of `pod_hosts`.
    cluster_generation: u64,
    /// `desired::pod_hosts` as of `cluster_generation`: recomputing it is most of the cost of
    /// a computation with a large cluster, and an ADD or DEL does not change it.
    pod_hosts: (u64, BTreeMap<Ipv4Addr, u32>),
    /// The other nodes as routing sees them, as of the generation.
    nodes: (u64, desired::Nodes),
    /// The numbers of the policies' rules that policy entries carry (flow attribution).
    rule_ids: desired::RuleIds,
    /// What the events reader needs to name an event's ends and rules, published after every
    /// change to the maps (see [`crate::events::FlowNames`]).
    flow_names: watch::Sender<Arc<FlowNames>>,
    /// Its parts that change only with the cluster: pods by address (as of a generation), and
    /// the rules by number.
    flow_pods: (u64, Arc<HashMap<Ipv4Addr, PodRef>>),
    flow_rules: Arc<HashMap<u32, myelin_cluster::explain::RuleRef>>,
    /// The flow log is on (`--flow-buffer`): the datapath reports events all the time.
    keeps_flows: bool,
    /// `--kube-proxy-replacement`: Services are translated in eBPF. Off, `lb_services` stays
    /// empty and kube-proxy translates them, as before.
    translates_services: bool,
    /// Socket-level load balancing: where its programs are attached (`--cgroup-root`).
    socket_lb: Option<myelin_api::SocketLbInfo>,
    /// Every Service's translation as of the index's services generation: it depends on
    /// Services, EndpointSlices and Nodes alone, so neither an ADD or DEL nor a pod's change
    /// recomputes it.
    services: (u64, desired::services::Services),
    /// The translation's warnings already logged.
    reported_service_warnings: BTreeSet<String>,
    /// The frontends last reported as not fitting in `lb_services`.
    unwritten_services: BTreeSet<([u8; 4], u16, u8)>,
    /// Maglev's lookup tables (`--lb-algorithm maglev`).
    maglev: MaglevState,
    /// The frontends whose Maglev tables were last reported as not fitting in `lb_maglev`.
    unwritten_maglev: BTreeSet<([u8; 4], u16, u8)>,
    /// `--non-masquerade-cidrs`: destinations pods reach with their own address, besides the
    /// cluster's pod CIDRs and nodes.
    non_masquerade_cidrs: Vec<Ipv4Net>,
    datapath: D,
    interfaces: Box<dyn Interfaces>,
    /// Where the plugin queues DELs that found the agent down (`myelin_api::pending`).
    pending_deletes: Option<PathBuf>,
    /// The cluster-state source has an object for every pod (Kubernetes): an ADD for a pod it
    /// has not shown yet waits for it (see [`Agent::awaits_pod`]).
    pod_objects_expected: bool,
    synced: bool,
    /// The MTU pods get (`Allocation::mtu`), when routing sets one.
    pod_mtu: Option<u32>,
    /// How this node reaches the others, for the status.
    routing: Option<myelin_api::RoutingInfo>,
    /// Where the health check node ports' wanted state goes (with `--kube-proxy-replacement`),
    /// and the Services generation and sync state it was last computed at.
    health_checks: Option<(watch::Sender<Arc<HealthChecks>>, Option<HealthChecksAt>)>,
}

/// The Services generation and the sync state health checks were computed at.
type HealthChecksAt = (u64, bool);

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
            vanished: HashMap::new(),
            unclaimed: HashMap::new(),
            orphan_links: HashMap::new(),
            index,
            identities: Identities::default(),
            identity_inputs: None,
            cluster_generation: 1,
            pod_hosts: (0, BTreeMap::new()),
            nodes: (0, desired::Nodes::default()),
            rule_ids: desired::RuleIds::default(),
            flow_names: watch::Sender::new(Arc::default()),
            flow_pods: (0, Arc::default()),
            flow_rules: Arc::default(),
            keeps_flows: false,
            translates_services: false,
            socket_lb: None,
            // Never a generation the index reports: the first call computes.
            services: (u64::MAX, desired::services::Services::default()),
            unwritten_services: BTreeSet::new(),
            maglev: MaglevState::default(),
            unwritten_maglev: BTreeSet::new(),
            reported_service_warnings: BTreeSet::new(),
            non_masquerade_cidrs: Vec::new(),
            datapath,
            interfaces,
            pending_deletes: None,
            pod_objects_expected: false,
            synced: false,
            pod_mtu: None,
            routing: None,
            health_checks: None,
        }
    }

    /// Publishes the health check node ports' wanted state to `tx` after every sync (see
    /// [`crate::health`]).
    pub fn with_health_checks(mut self, tx: watch::Sender<Arc<HealthChecks>>) -> Self {
        self.health_checks = Some((tx, None));
        self
    }

    /// Recomputes the health check ports when the Services or the sync state changed.
    fn publish_health_checks(&mut self) {
        let at = (self.index.services_generation(), self.synced);
        let Some((tx, last)) = &mut self.health_checks else {
            return;
        };
        if *last == Some(at) {
            return;
        }
        *last = Some(at);
        let checks = crate::health::compute(&self.index, &self.node_name, self.synced);
        tx.send_if_modified(|current| {
            if **current == checks {
                return false;
            }
            *current = Arc::new(checks);
            true
        });
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

    /// How this node reaches the others; pods get its MTU unless their conflist says otherwise.
    pub fn with_routing(mut self, routing: Option<myelin_api::RoutingInfo>) -> Self {
        self.pod_mtu = routing.as_ref().map(|r| r.pod_mtu);
        self.routing = routing;
        self
    }

    /// Translates Services in eBPF (`--kube-proxy-replacement`): `lb_services` holds every
    /// Service's frontends and backends.
    pub fn translating_services(mut self) -> Self {
        self.translates_services = true;
        self
    }

    /// How new connections' backends are chosen (`--lb-algorithm`), with Maglev's table size
    /// (`--lb-maglev-table-size`).
    pub fn with_lb_algorithm(mut self, algorithm: LbAlgorithm, table_size: u32) -> Self {
        self.maglev.table_size = (algorithm == LbAlgorithm::Maglev).then_some(table_size);
        self
    }

    /// Maglev's tables for `slots`, computed again only when the slots changed (tables of
    /// unchanged backends are kept); empty unless `--lb-algorithm maglev`.
    fn maglev_tables(&mut self, slots: &Arc<BTreeMap<LbKey, LbEntry>>) -> Arc<maglev::Tables> {
        let m = &mut self.maglev;
        if let Some(size) = m.table_size
            && !Arc::ptr_eq(&m.from, slots)
        {
            m.tables = Arc::new(maglev::tables(slots, size, &m.tables));
            m.from = Arc::clone(slots);
        }
        Arc::clone(&m.tables)
    }

    /// Socket-level load balancing is attached there (`--cgroup-root`), as status shows.
    pub fn with_socket_lb(mut self, socket_lb: Option<myelin_api::SocketLbInfo>) -> Self {
        self.socket_lb = socket_lb;
        self
    }

    /// Destinations pods reach with their own address besides the cluster's
    /// (`--non-masquerade-cidrs`).
    pub fn with_non_masquerade_cidrs(mut self, cidrs: Vec<Ipv4Net>) -> Self {
        self.non_masquerade_cidrs = cidrs;
        self
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

    /// Routing as the datapath's config holds it, after this node's address or its uplink's
    /// subnets changed; status shows the new address and subnet.
    pub fn set_routing(&mut self, routing: crate::datapath::Routing) -> Result<(), DatapathError> {
        self.datapath.set_routing(routing)?;
        if let Some(info) = self.routing.as_mut() {
            info.node_ip = routing.node_ip;
            info.direct_subnet = routing.direct_subnet().map(|s| s.to_string());
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    pub fn index(&self) -> &ClusterIndex {
        &self.index
    }

    /// Whether the first full sync of every source is in the maps.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Marks the cluster-state sources as fully listed: the agent is ready, and the maps are
    /// brought fully in line with the cluster state (see [`Self::restore`]).
    pub fn set_synced(&mut self) -> Result<Diff, DatapathError> {
        self.synced = true;
        self.recompute_identities();
        self.sync_datapath()
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
        self.cluster_generation += 1;
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
    /// pod to an existing set, the common case, costs nothing here, and neither does an
    /// endpoint coming or going whose pod's labels the index knows.
    fn recompute_identities(&mut self) {
        let mut extra_sets: Vec<Arc<IdentityLabels>> = self
            .endpoints
            .iter()
            .map(|r| self.pod_identity_labels(r))
            .filter(|l| !self.index.has_label_set(l))
            .collect();
        extra_sets.sort();
        extra_sets.dedup();
        let inputs = (self.index.label_sets_generation(), extra_sets);
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
        self.cluster_generation += 1;
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

    /// The other nodes as routing sees them.
    pub fn nodes(&mut self) -> &desired::Nodes {
        if self.nodes.0 != self.cluster_generation {
            self.nodes = (
                self.cluster_generation,
                desired::Nodes::of(&self.index, &self.node_name, self.ipam.cidr()),
            );
        }
        &self.nodes.1
    }

    /// Every Service's translation (empty unless Services are translated), as of the latest
    /// cluster state. Its warnings are logged once each, after the first sync (before it, a
    /// slice listed ahead of its Service is no news).
    pub fn services(&mut self) -> &desired::services::Services {
        let generation = self.index.services_generation();
        // Taken even when nothing is translated, so that it never grows.
        let changed = self.index.take_changed_services();
        if self.translates_services && self.services.0 != generation {
            // Only the Services that changed, once there is a translation to start from.
            let updated = match &changed {
                ChangedServices::Some(keys) if self.services.0 != u64::MAX => {
                    desired::services::update(
                        &mut self.services.1,
                        &self.index,
                        &self.node_name,
                        keys,
                    )
                }
                _ => false,
            };
            if !updated {
                self.services.1 = desired::services::translate(&self.index, &self.node_name);
            }
            self.services.0 = generation;
        }
        if self.synced && self.reported_service_warnings != self.services.1.warnings {
            for warning in self
                .services
                .1
                .warnings
                .difference(&self.reported_service_warnings)
            {
                warn!("{warning}");
            }
            self.reported_service_warnings = self.services.1.warnings.clone();
        }
        &self.services.1
    }

    pub fn desired_state(&mut self) -> DesiredState {
        let lb_services = Arc::clone(&self.services().slots);
        let lb_maglev = self.maglev_tables(&lb_services);
        if self.pod_hosts.0 != self.cluster_generation {
            self.pod_hosts = (
                self.cluster_generation,
                desired::pod_hosts(&self.index, &self.identities),
            );
        }
        self.nodes();
        if self.rule_ids.sync(&self.index) {
            self.flow_rules = Arc::new(self.rule_ids.all().clone());
        }
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
                    live: !self.vanished.contains_key(&r.attachment),
                }
            })
            .collect();
        let mut desired = desired::compute(&Inputs {
            node_name: &self.node_name,
            pod_cidr: self.ipam.cidr(),
            gateway: self.ipam.gateway(),
            endpoints,
            index: &self.index,
            identities: &self.identities,
            pod_hosts: &self.pod_hosts.1,
            nodes: &self.nodes.1,
            policy_capacity: self.datapath.policy_capacity(),
            non_masquerade_cidrs: &self.non_masquerade_cidrs,
            rule_ids: &self.rule_ids,
        });
        desired.lb_services = lb_services;
        desired.lb_maglev = lb_maglev;
        desired
    }

    fn sync_datapath(&mut self) -> Result<Diff, DatapathError> {
        let started = Instant::now();
        let mut desired = self.desired_state();
        let computed = started.elapsed();
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
        let result = self.datapath.apply(&desired);
        let written = started.elapsed();
        self.report_unwritten_services();
        self.report_unwritten_maglev();
        self.publish_health_checks();
        self.publish_flow_names();
        let total = started.elapsed();
        let writes = result.as_ref().map(Diff::writes).unwrap_or_default();
        let (desired_us, maps_us, total_us) = (
            computed.as_micros() as u64,
            (written - computed).as_micros() as u64,
            total.as_micros() as u64,
        );
        if total >= SLOW_SYNC {
            warn!(
                desired_us,
                maps_us, total_us, writes, "bringing the maps in line was slow"
            );
        } else {
            debug!(desired_us, maps_us, total_us, writes, "maps in line");
        }
        result
    }

    /// Logs, once per change, the frontends whose Maglev tables do not fit in `lb_maglev`: they
    /// choose their backends at random.
    fn report_unwritten_maglev(&mut self) {
        let now = self.report_unwritten(
            self.datapath.maglev_unwritten(),
            &self.unwritten_maglev,
            "frontends whose Maglev tables do not fit in lb_maglev choose their backends at \
             random; the others use their tables: raise --max-lb-maglev",
            "every Maglev table is in lb_maglev again",
        );
        if let Some(now) = now {
            self.unwritten_maglev = now;
        }
    }

    /// What the events reader names events with, as of now (only while someone reads).
    fn publish_flow_names(&mut self) {
        if self.flow_names.receiver_count() == 0 {
            return;
        }
        if self.flow_pods.0 != self.cluster_generation {
            let pods = self
                .index
                .pods()
                .filter(|p| !p.host_network)
                .filter_map(|p| {
                    let pod = PodRef {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                    };
                    Some((p.ip?, pod))
                })
                .collect();
            self.flow_pods = (self.cluster_generation, Arc::new(pods));
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|r| {
                let labels = self.pod_identity_labels(r);
                let isolating = |direction| {
                    myelin_cluster::explain::isolating(&self.index, &labels, direction)
                        .map(myelin_cluster::explain::PolicyRef::from)
                        .collect()
                };
                let names = LocalPod {
                    pod: r.pod.clone(),
                    ip: r.ip,
                    isolated_ingress: isolating(myelin_common::Direction::Ingress),
                    isolated_egress: isolating(myelin_common::Direction::Egress),
                };
                (r.id, names)
            })
            .collect();
        self.flow_names.send_replace(Arc::new(FlowNames {
            node: self.node_name.clone(),
            endpoints,
            pods: Arc::clone(&self.flow_pods.1),
            rules: Arc::clone(&self.flow_rules),
        }));
    }

    /// The names the events reader needs, kept current by the agent.
    pub fn flow_names(&mut self) -> watch::Receiver<Arc<FlowNames>> {
        let rx = self.flow_names.subscribe();
        self.publish_flow_names();
        rx
    }

    /// The flow log is on: the datapath reports events whether or not anyone streams them.
    pub fn keeping_flows(mut self, on: bool) -> Self {
        self.keeps_flows = on;
        self
    }

    /// Logs, once per change, the Services' frontends that do not fit in `lb_services`: they
    /// are not translated (or keep the backends they had), while the rest are.
    fn report_unwritten_services(&mut self) {
        let now = self.report_unwritten(
            self.datapath.services_unwritten(),
            &self.unwritten_services,
            "Services' frontends that do not fit in lb_services are not translated (or keep \
             their earlier backends); the others are: raise --max-lb-slots",
            "every Service's frontend is in lb_services again",
        );
        if let Some(now) = now {
            self.unwritten_services = now;
        }
    }

    /// Logs `held` (naming the first five frontends) or `clear`, when the frontends a map could
    /// not take differ from `reported`; returns them then.
    fn report_unwritten(
        &self,
        unwritten: Option<&crate::datapath::table::Unwritten>,
        reported: &BTreeSet<([u8; 4], u16, u8)>,
        held: &str,
        clear: &str,
    ) -> Option<BTreeSet<([u8; 4], u16, u8)>> {
        let now: BTreeSet<_> = unwritten
            .map(|u| u.frontends.iter().copied().collect())
            .unwrap_or_default();
        if now == *reported {
            return None;
        }
        match unwritten {
            Some(u) => {
                let names: Vec<String> = u
                    .frontends
                    .iter()
                    .take(5)
                    .map(|&(addr, port, protocol)| {
                        self.service_of_frontend(addr, u16::from_be(port), protocol)
                    })
                    .collect();
                warn!(
                    error = %u.error,
                    frontends = u.frontends.len(),
                    first = %names.join(", "),
                    "{held}"
                );
            }
            None => info!("{clear}"),
        }
        Some(now)
    }

    /// `namespace/name addr:port/PROTO` of a frontend, for the log.
    fn service_of_frontend(&self, addr: [u8; 4], port: u16, protocol: u8) -> String {
        let addr = Ipv4Addr::from(addr);
        let owner = self.services.1.services.values().find(|s| {
            s.ports.iter().any(|p| {
                p.port.protocol.number() == protocol
                    && p.frontends.iter().any(|f| f.addr == addr && f.port == port)
            })
        });
        let proto = match protocol {
            6 => "TCP",
            17 => "UDP",
            132 => "SCTP",
            _ => "?",
        };
        match owner {
            Some(s) => format!("{}/{} {addr}:{port}/{proto}", s.namespace, s.name),
            None => format!("{addr}:{port}/{proto}"),
        }
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
        self.unclaimed
            .insert(req.attachment.clone(), Instant::now());
        info!(attachment = %req.attachment, %ip, "address allocated");
        Ok(Allocation {
            ip,
            gateway: self.ipam.gateway(),
            pod_cidr: self.ipam.cidr().to_string(),
            mtu: self.pod_mtu,
        })
    }

    /// Releases an address. Refused while an endpoint uses it: DELETE the endpoint instead.
    pub fn release(&mut self, id: &AttachmentId) -> Result<ReleaseResponse, ApiError> {
        if self.endpoints.get(id).is_some() {
            return Err(invalid(format!(
                "{id} has a live endpoint: delete the endpoint, which releases its address"
            )));
        }
        let released = self.ipam.release(id)?;
        self.unclaimed.remove(id);
        Ok(ReleaseResponse { released })
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
            netns_cookie: req.netns_cookie,
            ip: req.ip,
            mac: req.mac,
            host_ifname: req.host_ifname.clone(),
            host_ifindex: req.host_ifindex,
            host_mac: req.host_mac,
        };
        self.endpoints.insert(record.clone());
        self.vanished.remove(id);
        let unclaimed_since = self.unclaimed.remove(id);
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
            if let Some(since) = unclaimed_since {
                self.unclaimed.insert(id.clone(), since);
            }
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
        self.unclaimed.remove(id);
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

    /// Turns datapath events on (while someone watches) or off (unless the flow log keeps
    /// them on).
    pub fn set_events(&mut self, watched: bool) -> Result<(), DatapathError> {
        let mask = if watched || self.keeps_flows {
            EVENTS_DROPS | EVENTS_VERDICTS
        } else {
            0
        };
        self.datapath.set_event_mask(mask)
    }
}

#[cfg(test)]
mod tests;
