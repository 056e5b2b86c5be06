//! The one owner of the agent's state: a thread of its own runs every API request, cluster
//! change and periodic job on the [`Agent`] in turn, so nothing else ever holds it.
//!
//! - API requests come through an [`AgentHandle`] and go first: a burst of cluster changes never
//!   makes an ADD wait behind it for more than the batch being applied.
//! - Every request carries its client's [`Deadline`]. One whose deadline passed, or whose client
//!   is gone, is never carried out; one whose client went away while it ran is undone (an
//!   address nobody will use is released at once).
//! - Work that can take long and needs none of the state runs elsewhere: conntrack GC and
//!   listing (`datapath::conntrack`), the directory source's reads and parses, the events ring.
//! - An ADD that waits for its Pod object is woken by the owner when pods arrive (a `watch`
//!   channel), without polling and without holding anything.

use std::{
    future::Future,
    thread,
    time::{Duration, Instant, SystemTime},
};

use ipnet::Ipv4Net;
use myelin_api::{
    AllocateRequest, Allocation, ApiError, AttachmentId, DeleteResponse, Endpoint, EndpointRequest,
    ErrorKind, GcRequest, GcResponse, PodRef, ReleaseResponse,
};
use myelin_cluster::{Change, Kind};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::{
    agent::Agent,
    datapath::DatapathOps,
    links::{EndpointAlias, LinkRemoved, Links},
    metrics::{KindLabel, Metrics, Snapshot},
    routing::NodeNetwork,
    source::SourceEvent,
};

/// A turn of the owner (a request, a cluster change, a periodic job) that holds everything
/// else up for this long is logged.
const SLOW_TURN: Duration = Duration::from_millis(100);

/// A point in time by which the client wants its answer (`myelin_api::DEADLINE_HEADER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(SystemTime);

impl Deadline {
    /// The deadline of a client that did not send one.
    pub const DEFAULT: Duration = Duration::from_secs(30);

    pub fn after(timeout: Duration) -> Self {
        Self(SystemTime::now() + timeout)
    }

    pub fn at(time: SystemTime) -> Self {
        Self(time)
    }

    pub fn passed(&self) -> bool {
        SystemTime::now() >= self.0
    }

    pub fn remaining(&self) -> Duration {
        self.0
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

fn deadline_exceeded() -> ApiError {
    ApiError::new(
        ErrorKind::DeadlineExceeded,
        "the request's deadline passed before the agent got to it; nothing was done",
    )
}

fn stopped() -> ApiError {
    ApiError::new(ErrorKind::NotReady, "the agent is shutting down")
}

/// A unit of work for the owner.
type Job<D> = Box<dyn FnOnce(&mut Agent<D>) + Send>;

/// API requests waiting for the owner; a full queue makes callers wait (within their deadline)
/// rather than grow without bound.
const JOB_QUEUE: usize = 256;

/// How long an ADD waits for its Pod object to reach the watch (see `Agent::awaits_pod`).
const POD_WAIT: Duration = Duration::from_secs(2);

/// How long a scrape waits for fresh values before it serves the last ones.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// The way in to the owner. Cheap to clone.
pub struct AgentHandle<D> {
    jobs: mpsc::Sender<Job<D>>,
    pods: watch::Receiver<u64>,
    ready: watch::Receiver<bool>,
    links: Option<Links>,
}

impl<D> Clone for AgentHandle<D> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
            pods: self.pods.clone(),
            ready: self.ready.clone(),
            links: self.links.clone(),
        }
    }
}

impl<D: DatapathOps + 'static> AgentHandle<D> {
    /// Runs `f` on the owner, unless `deadline` passes or the caller goes away first.
    pub async fn run<R: Send + 'static>(
        &self,
        deadline: Deadline,
        f: impl FnOnce(&mut Agent<D>) -> Result<R, ApiError> + Send + 'static,
    ) -> Result<R, ApiError> {
        self.run_with_undo(deadline, f, |_, _| {}).await
    }

    /// Like [`Self::run`]; if the caller is gone by the time `f` succeeded (its deadline
    /// passed, its connection closed), `undo` reverts what `f` did, on the owner.
    pub async fn run_with_undo<R: Send + 'static>(
        &self,
        deadline: Deadline,
        f: impl FnOnce(&mut Agent<D>) -> Result<R, ApiError> + Send + 'static,
        undo: impl FnOnce(&mut Agent<D>, R) + Send + 'static,
    ) -> Result<R, ApiError> {
        let (tx, rx) = oneshot::channel();
        let job: Job<D> = Box::new(move |agent| {
            if tx.is_closed() {
                return;
            }
            if deadline.passed() {
                let _ = tx.send(Err(deadline_exceeded()));
                return;
            }
            if let Err(Ok(value)) = tx.send(f(agent)) {
                undo(agent, value);
            }
        });
        within(deadline, self.jobs.send(job))
            .await?
            .map_err(|_| stopped())?;
        within(deadline, rx).await?.map_err(|_| stopped())?
    }

    /// Runs a read-only `f` on the owner.
    pub async fn read<R: Send + 'static>(
        &self,
        deadline: Deadline,
        f: impl FnOnce(&Agent<D>) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        self.run(deadline, move |a| Ok(f(a))).await
    }

    pub async fn allocate(
        &self,
        deadline: Deadline,
        req: AllocateRequest,
    ) -> Result<Allocation, ApiError> {
        let id = req.attachment.clone();
        self.run_with_undo(
            deadline,
            move |a| a.allocate(&req),
            move |a, allocation| {
                warn!(attachment = %id, ip = %allocation.ip, "the client gave up on an allocation; releasing it");
                if let Err(e) = a.release(&id) {
                    warn!(attachment = %id, error = %e, "releasing an abandoned allocation failed");
                }
            },
        )
        .await
    }

    /// Creates the endpoint once the Pod object is known (or after [`POD_WAIT`]), then names
    /// the attachment in the veth's alias so that the kernel alone can tell whose it is.
    pub async fn put_endpoint(
        &self,
        deadline: Deadline,
        req: EndpointRequest,
    ) -> Result<Endpoint, ApiError> {
        if let Some(pod) = &req.pod {
            self.wait_for_pod(deadline, pod).await?;
        }
        let alias = EndpointAlias {
            attachment: req.attachment.clone(),
            pod: req.pod.clone(),
        };
        let index = req.host_ifindex;
        let id = req.attachment.clone();
        let endpoint = self
            .run_with_undo(
                deadline,
                move |a| a.put_endpoint(&req),
                move |a, _| {
                    warn!(attachment = %id, "the client gave up on an endpoint; removing it");
                    if let Err(e) = a.delete_endpoint(&id) {
                        warn!(attachment = %id, error = %e, "removing an abandoned endpoint failed");
                    }
                },
            )
            .await?;
        if let (Some(links), Some(text)) = (&self.links, alias.encode())
            && let Err(e) = links.set_alias(index, &text).await
        {
            warn!(ifindex = index, error = %e, "naming the endpoint in its veth's alias failed");
        }
        Ok(endpoint)
    }

    /// Waits, holding nothing, until the source has shown `pod` or [`POD_WAIT`] has passed.
    /// After that the endpoint starts without labels and gets its identity when the object
    /// arrives: a pod the API server never lists (not a Kubernetes pod) still gets its network.
    async fn wait_for_pod(&self, deadline: Deadline, pod: &PodRef) -> Result<(), ApiError> {
        let started = Instant::now();
        let until = tokio::time::Instant::now() + POD_WAIT.min(deadline.remaining());
        let mut arrivals = self.pods.clone();
        loop {
            arrivals.borrow_and_update();
            let wanted = pod.clone();
            if !self.read(deadline, move |a| a.awaits_pod(&wanted)).await? {
                break;
            }
            tokio::select! {
                changed = arrivals.changed() => if changed.is_err() { return Err(stopped()) },
                () = tokio::time::sleep_until(until) => {
                    warn!(
                        pod = %format_args!("{}/{}", pod.namespace, pod.name),
                        "no Pod object after {POD_WAIT:?}: the endpoint starts without labels \
                         and gets its identity when the object arrives"
                    );
                    return Ok(());
                }
            }
        }
        let waited = started.elapsed();
        if waited >= Duration::from_millis(5) {
            info!(
                pod = %format_args!("{}/{}", pod.namespace, pod.name),
                waited_ms = waited.as_millis() as u64,
                "waited for the Pod object before creating the endpoint"
            );
        }
        Ok(())
    }

    pub async fn release(
        &self,
        deadline: Deadline,
        id: AttachmentId,
    ) -> Result<ReleaseResponse, ApiError> {
        self.run(deadline, move |a| a.release(&id)).await
    }

    pub async fn delete_endpoint(
        &self,
        deadline: Deadline,
        id: AttachmentId,
    ) -> Result<DeleteResponse, ApiError> {
        self.run(deadline, move |a| a.delete_endpoint(&id)).await
    }

    pub async fn gc(&self, deadline: Deadline, req: GcRequest) -> Result<GcResponse, ApiError> {
        self.run(deadline, move |a| a.gc(&req)).await
    }

    /// Whether the first full sync of every source is in the maps (no round trip).
    pub fn ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Values for a scrape, or `None` if the owner does not answer in time.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        self.read(Deadline::after(SNAPSHOT_WAIT), |a| a.metrics_snapshot())
            .await
            .ok()
    }
}

/// `fut` within the deadline, or the deadline error.
async fn within<T>(deadline: Deadline, fut: impl Future<Output = T>) -> Result<T, ApiError> {
    tokio::time::timeout(deadline.remaining(), fut)
        .await
        .map_err(|_| deadline_exceeded())
}

/// How the owner's periodic work is paced, and what it reports.
pub struct Settings {
    pub node_name: String,
    /// The pod CIDR IPAM serves (to say when the Node object disagrees).
    pub pod_cidr: Ipv4Net,
    /// How often the DEL queue is looked at (DELs that raced the agent's start).
    pub pending_deletes_interval: Duration,
    /// Grace period and sweep interval of `Agent::sweep`.
    pub endpoint_gc_interval: Duration,
    pub metrics: Metrics,
}

/// What the owner listens to besides API requests.
pub struct Inputs {
    pub source: mpsc::Receiver<SourceEvent>,
    pub link_removals: Option<mpsc::Receiver<LinkRemoved>>,
    /// An IPv4 address was added or removed (`links::watch_address_changes`): the uplink's
    /// subnets, and the routes that depend on them, are taken again.
    pub address_changes: Option<mpsc::Receiver<()>>,
    /// For the sweep (listing) and for deleting orphan veths; `None` in tests without a node.
    pub links: Option<Links>,
    /// Routing to other nodes, when this node has an InternalIP: its routes follow the nodes.
    pub network: Option<NodeNetwork>,
}

/// Starts the owner on a thread of its own; it runs until every handle is dropped.
pub fn spawn<D: DatapathOps + 'static>(
    agent: Agent<D>,
    inputs: Inputs,
    settings: Settings,
) -> std::io::Result<(AgentHandle<D>, thread::JoinHandle<()>)> {
    let (jobs_tx, jobs) = mpsc::channel(JOB_QUEUE);
    let (pods_tx, pods) = watch::channel(0);
    let (ready_tx, ready) = watch::channel(agent.is_synced());
    let handle = AgentHandle {
        jobs: jobs_tx,
        pods,
        ready,
        links: inputs.links.clone(),
    };
    let thread = thread::Builder::new()
        .name("myelin-owner".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!("starting the owner's runtime failed: {e}");
                    return;
                }
            };
            let owner = Owner {
                agent,
                jobs,
                inputs,
                settings,
                pods: pods_tx,
                ready: ready_tx,
                reported_cidr: None,
            };
            runtime.block_on(owner.run());
        })?;
    Ok((handle, thread))
}

struct Owner<D> {
    agent: Agent<D>,
    jobs: mpsc::Receiver<Job<D>>,
    inputs: Inputs,
    settings: Settings,
    pods: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    /// The Node's CIDR last reported as differing from the one in use, to say so once.
    reported_cidr: Option<Ipv4Net>,
}

impl<D: DatapathOps> Owner<D> {
    async fn run(mut self) {
        let mut pending_deletes = tokio::time::interval(self.settings.pending_deletes_interval);
        let mut sweep = tokio::time::interval(self.settings.endpoint_gc_interval);
        // The first tick of an interval is immediate: the start already did both.
        pending_deletes.tick().await;
        sweep.tick().await;
        // Also what changed on the uplink since the start found it, before the watch began.
        self.follow_uplink_addresses().await;
        let mut source_open = true;
        loop {
            let turn = tokio::select! {
                biased;
                job = self.jobs.recv() => match job {
                    Some(job) => {
                        let started = Instant::now();
                        job(&mut self.agent);
                        (started, "an API request")
                    }
                    None => break,
                },
                removed = recv(&mut self.inputs.link_removals) => match removed {
                    Some(r) => {
                        let started = Instant::now();
                        self.agent.link_removed(r.index, &r.name, started);
                        (started, "an interface removal")
                    }
                    None => {
                        self.inputs.link_removals = None;
                        continue;
                    }
                },
                changed = recv(&mut self.inputs.address_changes) => match changed {
                    Some(()) => {
                        let started = Instant::now();
                        self.follow_uplink_addresses().await;
                        (started, "an address change")
                    }
                    None => {
                        self.inputs.address_changes = None;
                        continue;
                    }
                },
                event = self.inputs.source.recv(), if source_open => match event {
                    Some(event) => {
                        let started = Instant::now();
                        self.on_source_event(event);
                        self.route_nodes().await;
                        (started, "a cluster change")
                    }
                    None => {
                        warn!("the cluster-state source stopped; keeping the last state");
                        source_open = false;
                        continue;
                    }
                },
                _ = pending_deletes.tick() => {
                    let started = Instant::now();
                    self.agent.process_pending_deletes();
                    (started, "the pending deletes")
                }
                _ = sweep.tick() => {
                    let started = Instant::now();
                    self.sweep().await;
                    (started, "the endpoint sweep")
                }
            };
            // Everything else waits while one turn runs: a long one is worth a line.
            let (started, what) = turn;
            let took = started.elapsed();
            if took >= SLOW_TURN {
                warn!(
                    ms = took.as_millis() as u64,
                    "the agent was busy with {what}"
                );
            }
        }
        info!("the agent's owner stopped");
    }

    fn on_source_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Changes(changes) => {
                let started = Instant::now();
                for change in &changes {
                    count_event(&self.settings.metrics, change);
                }
                if let Err(e) = self.agent.apply_cluster_changes(changes) {
                    error!("updating the datapath after a cluster change failed: {e}");
                }
                self.settings
                    .metrics
                    .reconcile_seconds
                    .observe(started.elapsed().as_secs_f64());
                // Wake ADDs waiting for their Pod object.
                self.pods.send_modify(|generation| *generation += 1);
                self.report_cidr_mismatch();
            }
            SourceEvent::Synced => match self.agent.set_synced() {
                Ok(diff) => {
                    info!(written = diff.writes(), "cluster state synced");
                    self.ready.send_replace(true);
                    self.pods.send_modify(|generation| *generation += 1);
                    // A full list (the first, or one after the watch expired) leaves its pages
                    // and decoded objects free in the allocator.
                    crate::memory::release_free();
                }
                Err(e) => error!("writing the maps for the synced cluster state failed: {e}"),
            },
            // The source has logged it and retries; the agent goes on with its last state.
            SourceEvent::Unavailable => {}
        }
    }

    /// Brings the routes to other nodes in line with the index (a no-op when the nodes did not
    /// change). Not before the first full sync: until then the index may hold only part of the
    /// nodes, and the routes a restarted agent finds are what carries the pods' traffic.
    async fn route_nodes(&mut self) {
        if !self.agent.is_synced() {
            return;
        }
        if let Some(network) = self.inputs.network.as_mut()
            && let Some(routing) = network.sync(self.agent.nodes()).await
            && let Err(e) = self.agent.set_routing(routing)
        {
            error!("writing this node's new address into the datapath config failed: {e}");
        }
    }

    /// The uplink's subnets after an address change: native routing's direct next hops in the
    /// datapath, and the routes to nodes on them.
    async fn follow_uplink_addresses(&mut self) {
        let Some(network) = self.inputs.network.as_mut() else {
            return;
        };
        if let Some(routing) = network.refresh_uplink_subnets().await
            && let Err(e) = self.agent.set_routing(routing)
        {
            error!("writing the uplink's new subnet into the datapath config failed: {e}");
        }
        self.route_nodes().await;
    }

    async fn sweep(&mut self) {
        let Some(links) = self.inputs.links.clone() else {
            return;
        };
        let listed = match links.list().await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listing the node's interfaces for the endpoint sweep failed");
                return;
            }
        };
        let report = self
            .agent
            .sweep(&listed, Instant::now(), self.settings.endpoint_gc_interval);
        for link in report.delete_links {
            if let Err(e) = links.delete(link.index).await {
                warn!(ifname = link.name, error = %e, "removing an orphan veth failed");
            }
        }
    }

    /// Says when the Node object's pod CIDR differs from the one IPAM serves (the agent started
    /// with its persisted CIDR while the API server was down, and the Node changed meanwhile):
    /// existing pods keep their addresses; a restart adopts the Node's CIDR once they are gone.
    fn report_cidr_mismatch(&mut self) {
        let in_use = self.settings.pod_cidr;
        let listed = self
            .agent
            .index()
            .node(&self.settings.node_name)
            .and_then(|n| n.pod_cidr);
        if let Some(listed) = listed
            && listed != in_use
            && self.reported_cidr != Some(listed)
        {
            error!(
                %in_use, %listed,
                "the Node's spec.podCIDR differs from the pod CIDR in use; restart the agent \
                 once this node's pods are deleted to adopt it"
            );
            self.reported_cidr = Some(listed);
        }
    }
}

/// The next message of an optional receiver; pending forever without one.
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub fn count_event(metrics: &Metrics, change: &Change) {
    let kind = match change {
        Change::Apply(o) => o.kind(),
        Change::Delete { kind, .. } | Change::Replace { kind, .. } => *kind,
    };
    metrics
        .watch_events
        .get_or_create(&KindLabel {
            kind: Kind::as_str(kind),
        })
        .inc();
}

#[cfg(test)]
pub(crate) mod testing {
    //! An owner over the fake datapath, for tests of the owner and of the API.
    use tokio::sync::mpsc;

    use super::*;
    use crate::{
        agent::Interfaces, datapath::fake::FakeDatapath, endpoint::EndpointStore, ipam::Ipam,
    };

    /// Every interface "exists" with ifindex 7.
    pub struct AnyInterface;

    impl Interfaces for AnyInterface {
        fn index_of(&self, _: &str) -> Option<u32> {
            Some(7)
        }
    }

    /// A synced agent on 10.0.0.0/24, its owner, and the source channel that feeds it.
    pub fn fake_owner(
        expecting_pod_objects: bool,
    ) -> (AgentHandle<FakeDatapath>, mpsc::Sender<SourceEvent>) {
        let mut agent = Agent::new(
            "node-1".into(),
            Ipam::in_memory("10.0.0.0/24".parse().unwrap()).unwrap(),
            EndpointStore::in_memory(16),
            myelin_cluster::ClusterIndex::default(),
            FakeDatapath::new(16),
            Box::new(AnyInterface),
        );
        if expecting_pod_objects {
            agent = agent.expecting_pod_objects();
        }
        agent.set_synced().unwrap();
        let (tx, rx) = mpsc::channel(16);
        let (handle, _) = spawn(
            agent,
            Inputs {
                source: rx,
                link_removals: None,
                address_changes: None,
                links: None,
                network: None,
            },
            Settings {
                node_name: "node-1".into(),
                pod_cidr: "10.0.0.0/24".parse().unwrap(),
                pending_deletes_interval: Duration::from_secs(3600),
                endpoint_gc_interval: Duration::from_secs(3600),
                metrics: Metrics::default(),
            },
        )
        .unwrap();
        (handle, tx)
    }

    pub async fn free_addresses(h: &AgentHandle<FakeDatapath>) -> u64 {
        h.read(Deadline::after(Duration::from_secs(5)), |a| {
            a.status().free_addresses
        })
        .await
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use myelin_cluster::{Object, PodInfo, builders};

    use super::{testing::*, *};

    fn alloc(c: &str) -> AllocateRequest {
        AllocateRequest {
            attachment: AttachmentId::new(c, "eth0"),
            pod: None,
        }
    }

    /// Holds the owner busy for `d`, as a stopped (SIGSTOP) or wedged agent would be.
    fn stall(h: &AgentHandle<crate::datapath::fake::FakeDatapath>, d: Duration) {
        let h = h.clone();
        tokio::spawn(async move {
            h.run(Deadline::after(Duration::from_secs(30)), move |_| {
                thread::sleep(d);
                Ok(())
            })
            .await
        });
    }

    #[tokio::test]
    async fn a_request_whose_deadline_passes_in_the_queue_is_never_carried_out() {
        let (h, _source) = fake_owner(false);
        let free = free_addresses(&h).await;
        stall(&h, Duration::from_millis(600));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let err = h
            .allocate(Deadline::after(Duration::from_millis(200)), alloc("a"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::DeadlineExceeded);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "answered at the deadline"
        );
        // Once the owner gets to it, the allocation is skipped: no address is kept, and a
        // retry of the same ADD is not refused as existing.
        assert_eq!(free_addresses(&h).await, free);
        h.allocate(Deadline::after(Duration::from_secs(5)), alloc("a"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_on_arrival_is_refused() {
        let (h, _source) = fake_owner(false);
        let free = free_addresses(&h).await;
        let past = Deadline::at(SystemTime::now() - Duration::from_secs(1));
        let err = h.allocate(past, alloc("a")).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::DeadlineExceeded);
        assert_eq!(free_addresses(&h).await, free);
    }

    #[tokio::test]
    async fn an_allocation_whose_client_gave_up_while_it_ran_is_released() {
        let (h, _source) = fake_owner(false);
        let free = free_addresses(&h).await;
        let req = alloc("slow");
        let id = req.attachment.clone();
        let err = h
            .run_with_undo(
                Deadline::after(Duration::from_millis(100)),
                move |a| {
                    thread::sleep(Duration::from_millis(300));
                    a.allocate(&req)
                },
                move |a, _| {
                    a.release(&id).unwrap();
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::DeadlineExceeded);
        assert_eq!(free_addresses(&h).await, free, "the address went back");
    }

    #[tokio::test]
    async fn an_add_waiting_for_its_pod_is_woken_by_its_arrival() {
        let (h, source) = fake_owner(true);
        let pod = PodRef {
            namespace: "default".into(),
            name: "web".into(),
        };
        let waiter = {
            let h = h.clone();
            let pod = pod.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                h.wait_for_pod(Deadline::after(Duration::from_secs(10)), &pod)
                    .await
                    .unwrap();
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiter.is_finished(), "it waits for the object");
        let (info, _) =
            PodInfo::from_k8s(&builders::pod("default", "web", &[("app", "web")], None)).unwrap();
        source
            .send(SourceEvent::Changes(vec![Change::Apply(Object::Pod(info))]))
            .await
            .unwrap();
        let waited = waiter.await.unwrap();
        assert!(
            waited >= Duration::from_millis(150) && waited < POD_WAIT,
            "woken by the arrival, not by the timeout: {waited:?}"
        );
    }
}
