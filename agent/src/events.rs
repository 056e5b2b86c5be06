//! Datapath events (drops and policy verdicts): read from the `events` ring buffer, named
//! (pods, identities, the policy rules that admitted a flow or the policies that isolate the
//! end that dropped it), kept in the flow log's ring for `GET /v1/flows` (`myelinctl flows`),
//! counted for Prometheus, and fanned out to whoever streams `GET /v1/events`
//! (`myelinctl monitor`).
//!
//! The datapath emits events while a stream is open or the flow log is on (`--flow-buffer`),
//! each CPU at most `--flow-events-rate` per second; what it could not emit is counted in
//! `event_budget` and reported here.

use std::{
    collections::{HashMap, VecDeque},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use myelin_api::{
    EventsLost, FlowFilter, FlowLogInfo, PodRef, PolicyCheck, PolicyName, PolicyRule,
};
use myelin_cluster::explain::{PolicyRef, RuleRef, direction_name};
use myelin_common::{
    Direction, DropReason,
    event::{
        EVENT_DRAIN_INTERVAL_MS, EVENT_DROP, EventBudget, FlowEvent as RawEvent, ObservationPoint,
    },
    identity,
    proto::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};
use tokio::{
    io::unix::AsyncFd,
    sync::{broadcast, watch},
};
use tracing::warn;

use crate::metrics::FlowMetrics;

/// Fan-out of events to API streams.
pub type EventSender = broadcast::Sender<myelin_api::FlowEvent>;

/// Events buffered per slow reader before it starts missing some.
pub const STREAM_BUFFER: usize = 4096;

pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_SCTP => "sctp".into(),
        n => n.to_string(),
    }
}

/// `ip:port`, or `ip` for protocols without ports.
pub fn endpoint(ip: Ipv4Addr, port: u16, protocol: u8) -> String {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => format!("{ip}:{port}"),
        _ => ip.to_string(),
    }
}

/// A local endpoint as events name it.
#[derive(Debug, Clone)]
pub struct LocalPod {
    pub pod: Option<PodRef>,
    pub ip: Ipv4Addr,
    /// The policies that isolate the pod, per direction, in policy order
    /// (`myelin_cluster::explain::isolating`).
    pub isolated_ingress: Vec<PolicyRef>,
    pub isolated_egress: Vec<PolicyRef>,
}

/// What the agent knows to name events with; published by the agent after every change to
/// the maps, so that an event is named from the state its datapath decided on (give or take
/// the change in flight).
#[derive(Debug, Default)]
pub struct FlowNames {
    pub node: String,
    /// Local endpoints by id.
    pub endpoints: HashMap<u32, LocalPod>,
    /// Every pod address the index holds.
    pub pods: Arc<HashMap<Ipv4Addr, PodRef>>,
    /// The rules by the number policy entries carry.
    pub rules: Arc<HashMap<u32, RuleRef>>,
}

impl FlowNames {
    fn pod(&self, endpoint_id: u32, addr: Ipv4Addr) -> Option<PodRef> {
        self.endpoints
            .get(&endpoint_id)
            .filter(|e| e.ip == addr)
            .and_then(|e| e.pod.clone())
            .or_else(|| self.pods.get(&addr).cloned())
    }

    fn rule(&self, id: u32) -> Option<PolicyRule> {
        self.rules.get(&id).map(|r| PolicyRule {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            direction: direction_name(r.direction).to_string(),
            rule: r.index,
        })
    }

    /// The check of a local endpoint's policy in `direction`, as far as the event tells it;
    /// `None` when that end is not a pod of this node (its own node checks it).
    fn check(
        &self,
        endpoint_id: u32,
        direction: Direction,
        rule: u32,
        denied: bool,
    ) -> Option<PolicyCheck> {
        let local = self.endpoints.get(&endpoint_id)?;
        let isolating = match direction {
            Direction::Ingress => &local.isolated_ingress,
            Direction::Egress => &local.isolated_egress,
        };
        if denied {
            return Some(PolicyCheck::Denied {
                isolated_by: isolating
                    .iter()
                    .map(|p| PolicyName {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                    })
                    .collect(),
            });
        }
        if rule != 0 {
            // A rule removed since the event was emitted: nothing to say.
            return self
                .rule(rule)
                .map(|r| PolicyCheck::Allowed { rules: vec![r] });
        }
        Some(if isolating.is_empty() {
            PolicyCheck::NotIsolated
        } else {
            // Isolated, yet allowed without an entry: traffic with its own node.
            PolicyCheck::OwnNode
        })
    }
}

/// What an end of an event is, when not a pod the agent knows.
fn identity_name(id: u32) -> String {
    match id {
        identity::HOST => "host".into(),
        identity::WORLD => "world".into(),
        identity::REMOTE_NODE => "remote-node".into(),
        identity::ANY => "unknown".into(),
        n => format!("identity {n}"),
    }
}

/// `ktime` (CLOCK_MONOTONIC) to the wall clock, as RFC 3339 with milliseconds.
fn wall_time(ktime_ns: u64, monotonic_to_wall_ns: i128) -> String {
    let ns = i128::from(ktime_ns) + monotonic_to_wall_ns;
    let ms = (ns / 1_000_000).max(0) as u64;
    let (secs, ms) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The wall clock minus CLOCK_MONOTONIC, in nanoseconds.
fn monotonic_to_wall() -> i128 {
    use nix::time::{ClockId, clock_gettime};
    let ns = |t: nix::sys::time::TimeSpec| {
        i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
    };
    match (
        clock_gettime(ClockId::CLOCK_REALTIME),
        clock_gettime(ClockId::CLOCK_MONOTONIC),
    ) {
        (Ok(wall), Ok(mono)) => ns(wall) - ns(mono),
        _ => 0,
    }
}

pub fn to_api(
    e: &RawEvent,
    names: &FlowNames,
    monotonic_to_wall_ns: i128,
) -> myelin_api::FlowEvent {
    let drop = e.kind == EVENT_DROP;
    let reason = drop.then(|| DropReason::from_u32(u32::from(e.reason)));
    let (saddr, daddr) = (Ipv4Addr::from(e.saddr), Ipv4Addr::from(e.daddr));
    let (src_pod, dst_pod) = (
        names.pod(e.src_endpoint, saddr),
        names.pod(e.dst_endpoint, daddr),
    );
    let name = |pod: &Option<PodRef>, id: u32| {
        pod.as_ref().map_or_else(
            || identity_name(id),
            |p| format!("{}/{}", p.namespace, p.name),
        )
    };
    // Policy's two checks: a policy drop names the isolating policies of the end that
    // dropped it; the other check, and both of an allowed flow, the rules that admitted it.
    let (egress, ingress) = match reason {
        None => (
            names.check(e.src_endpoint, Direction::Egress, e.egress_rule, false),
            names.check(e.dst_endpoint, Direction::Ingress, e.ingress_rule, false),
        ),
        Some(Some(DropReason::PolicyDeniedEgress)) => (
            names.check(e.src_endpoint, Direction::Egress, 0, true),
            None,
        ),
        Some(Some(DropReason::PolicyDeniedIngress)) => (
            names.check(e.src_endpoint, Direction::Egress, e.egress_rule, false),
            names.check(e.dst_endpoint, Direction::Ingress, 0, true),
        ),
        Some(_) => (None, None),
    };
    myelin_api::FlowEvent {
        time: wall_time(e.timestamp_ns, monotonic_to_wall_ns),
        node: names.node.clone(),
        kind: if drop { "drop" } else { "allowed" }.to_string(),
        reason: reason
            .map(|r| r.map_or_else(|| format!("reason-{}", e.reason), |r| r.name().to_string())),
        direction: if e.direction == Direction::Ingress as u8 {
            "ingress"
        } else {
            "egress"
        }
        .to_string(),
        point: ObservationPoint::from_u8(e.point)
            .map_or_else(|| format!("point-{}", e.point), |p| p.name().to_string()),
        protocol: protocol_name(e.protocol),
        src: endpoint(saddr, e.sport, e.protocol),
        dst: endpoint(daddr, e.dport, e.protocol),
        src_name: name(&src_pod, e.src_identity),
        dst_name: name(&dst_pod, e.dst_identity),
        src_pod,
        dst_pod,
        src_endpoint: e.src_endpoint,
        dst_endpoint: e.dst_endpoint,
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        egress,
        ingress,
        service: (e.service_addr != [0; 4])
            .then(|| endpoint(Ipv4Addr::from(e.service_addr), e.service_port, e.protocol)),
    }
}

/// The latest events (`--flow-buffer`), and what the datapath lost.
pub struct FlowLog {
    capacity: usize,
    rate: u32,
    ring: Mutex<VecDeque<myelin_api::FlowEvent>>,
    budget: Option<PerCpuArray<MapData, EventBudget>>,
}

impl FlowLog {
    pub fn new(
        capacity: usize,
        rate: u32,
        budget: Option<PerCpuArray<MapData, EventBudget>>,
    ) -> Self {
        Self {
            capacity,
            rate,
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            budget,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn push(&self, event: &myelin_api::FlowEvent) {
        if self.capacity == 0 {
            return;
        }
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(event.clone());
        }
    }

    /// The latest `last` events that match `filter`, oldest first.
    pub fn last(&self, filter: &FlowFilter, last: usize) -> Vec<myelin_api::FlowEvent> {
        let Ok(ring) = self.ring.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = ring
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(last)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Events the datapath could not report, summed over CPUs.
    pub fn lost(&self) -> EventsLost {
        let Some(values) = self.budget.as_ref().and_then(|b| b.get(&0, 0).ok()) else {
            return EventsLost::default();
        };
        values
            .iter()
            .fold(EventsLost::default(), |sum, b| EventsLost {
                rate_limited: sum.rate_limited + b.rate_limited,
                ring_full: sum.ring_full + b.ring_full,
            })
    }

    pub fn info(&self) -> FlowLogInfo {
        FlowLogInfo {
            capacity: self.capacity,
            buffered: self.ring.lock().map_or(0, |r| r.len()),
            rate_per_cpu: self.rate,
            lost: self.lost(),
        }
    }
}

/// Where the reader sends what it reads.
pub struct Sinks {
    pub streams: EventSender,
    pub log: Arc<FlowLog>,
    pub names: watch::Receiver<Arc<FlowNames>>,
    pub metrics: FlowMetrics,
}

/// Reads the ring buffer until the process ends, forwarding every event.
pub async fn read(ring: RingBuf<MapData>, sinks: Sinks) {
    // SAFETY: the ring buffer owns its map file descriptor, which stays open and the same for
    // as long as the `AsyncFd` holds the ring buffer.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll the events ring buffer: {e}; no events will be reported");
            return;
        }
    };

    // The datapath wakes this reader once per batch of events (`EVENT_WAKEUP_EVERY` per CPU):
    // the rest are drained on this tick.
    let mut tick = tokio::time::interval(Duration::from_millis(EVENT_DRAIN_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Readiness is cleared before the drain: an event put in the ring after it wakes the
        // next round (or waits for the tick).
        let woken = tokio::select! {
            ready = fd.readable_mut() => Some(ready.map(|mut g| g.clear_ready())),
            _ = tick.tick() => None,
        };
        if let Some(Err(e)) = woken {
            warn!("polling the events ring buffer failed: {e}");
            return;
        }
        drain(fd.get_mut(), &sinks);
    }
}

/// Forwards every event the ring holds.
fn drain(ring: &mut RingBuf<MapData>, sinks: &Sinks) {
    let names = Arc::clone(&sinks.names.borrow());
    let clock = monotonic_to_wall();
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<RawEvent>() {
            continue;
        }
        // SAFETY: the datapath writes whole `FlowEvent` records (checked length above).
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        let event = to_api(&raw, &names, clock);
        sinks.metrics.count(&event);
        sinks.log.push(&event);
        // No receiver is fine: nobody is watching right now.
        let _ = sinks.streams.send(event);
    }
}

#[cfg(test)]
mod tests;
