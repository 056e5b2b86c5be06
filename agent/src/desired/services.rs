//! Services as the datapath translates them (`--kube-proxy-replacement`): every frontend of
//! every Service with the backends it sends to, as `lb_services` slots (see
//! `myelin_common::lb`). A pure function of the index and this node's name, following
//! kube-proxy's reading of the API:
//!
//! - A Service without a ClusterIP (headless, `clusterIP: None`) or of type ExternalName is not
//!   translated. LoadBalancer is its ClusterIP and NodePort parts, and its load balancer's
//!   addresses (`status.loadBalancer.ingress`, [`LB_F_LOAD_BALANCER`]) as kube-proxy serves
//!   them: as external IPs.
//! - Frontends, per Service port (the protocol is part of every key: TCP and UDP on one port
//!   are two frontends with their own backends): each ClusterIP, each external IP
//!   ([`LB_F_EXTERNAL_IP`]), each load balancer address and, for NodePort and LoadBalancer
//!   Services, this node's InternalIP on the node port ([`LB_F_NODEPORT`]).
//! - Backends: the endpoints of the Service's IPv4 EndpointSlices (label
//!   `kubernetes.io/service-name`, same namespace), on the slice port with the Service port's
//!   name and protocol (the EndpointSlice controller has resolved named target ports). The ready
//!   ones; when none is ready, the serving and terminating ones (graceful termination); none at
//!   all leaves the frontend with count 0, and the datapath refuses its connections.
//! - `internalTrafficPolicy: Local` limits ClusterIP frontends, `externalTrafficPolicy: Local`
//!   (on Services reachable from outside, as kube-proxy reads it: NodePort, LoadBalancer, and
//!   ClusterIP with external IPs) limits node port and external IP frontends, to the endpoints
//!   on this node ([`LB_F_LOCAL`]); the fallback to terminating endpoints is then among this
//!   node's.
//! - `sessionAffinity: ClientIP` gives every frontend of the Service its timeout.
//!
//! Backends are deduplicated (an endpoint in two slices counts once, with its best condition)
//! and sorted by address and port, so that an unchanged set keeps its slots and a change
//! rewrites few. A frontend uses at most [`MAX_BACKENDS_PER_FRONTEND`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use myelin_cluster::{
    ClusterIndex, Protocol,
    service::{AddressType, ServiceInfo, ServicePort, ServiceType, TrafficPolicy},
};
use myelin_common::lb::{
    LB_F_EXTERNAL_IP, LB_F_LOAD_BALANCER, LB_F_LOCAL, LB_F_NODEPORT, LbEntry, LbKey,
};

/// What an endpoint's conditions make of it, and the kinds of frontends: the API's own types,
/// so that what `myelinctl services` shows is what was computed.
pub use myelin_api::{BackendState as Condition, FrontendKind};

pub mod maglev;

/// The most backends one frontend sends to: the first ones in address order. Bounds the slots
/// one Service can take (the map is shared by every Service) well above what a Deployment
/// reaches; a DaemonSet's Service on a larger cluster is cut, with a warning naming it.
pub const MAX_BACKENDS_PER_FRONTEND: usize = 4_096;

/// An endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub condition: Condition,
    pub node: Option<String>,
}

/// An address, port and protocol the datapath translates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Only this node's endpoints (a `Local` traffic policy).
    pub local: bool,
    /// The backends it sends to, in slot order: address and port.
    pub backends: Vec<(Ipv4Addr, u16)>,
    /// Another Service (`namespace/name`) holds the same frontend: this one is not translated.
    pub taken_by: Option<String>,
}

/// One Service port: its frontends and every endpoint it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortTranslation {
    pub port: ServicePort,
    pub frontends: Vec<Frontend>,
    pub endpoints: Vec<Backend>,
}

/// A Service as this node translates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTranslation {
    pub namespace: String,
    pub name: String,
    pub type_: ServiceType,
    pub affinity_timeout_s: Option<u32>,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_traffic_policy: TrafficPolicy,
    /// Why it is not translated (headless, ExternalName, no IPv4 ClusterIP).
    pub not_translated: Option<&'static str>,
    pub ports: Vec<PortTranslation>,
}

/// Every Service's translation, and the slots that carry it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Services {
    pub slots: Arc<BTreeMap<LbKey, LbEntry>>,
    /// Every Service's translation, by namespace and name.
    pub services: BTreeMap<(String, String), ServiceTranslation>,
    /// What could not be translated as written, naming the object: a frontend another Service
    /// holds, backends beyond the cap, an EndpointSlice of a Service that does not exist.
    pub warnings: BTreeSet<String>,
    /// The warnings by the Service they are about (an EndpointSlice's: the Service it names).
    warnings_of: BTreeMap<(String, String), BTreeSet<String>>,
    /// Some frontend is claimed by two Services: [`update`] cannot tell who keeps it.
    contested: bool,
}

impl Services {
    fn collect_warnings(&mut self) {
        self.warnings = self.warnings_of.values().flatten().cloned().collect();
    }
}

/// The translation of every Service of `index`, on node `node_name`.
pub fn translate(index: &ClusterIndex, node_name: &str) -> Services {
    let node_ip = node_ip(index, node_name);
    let mut out = Services::default();
    let mut slots = BTreeMap::new();
    // Which Service holds each frontend: two Services cannot share one (external IPs and the
    // directory source are not checked by an API server); the first in name order keeps it.
    let mut holders: BTreeMap<LbKey, String> = BTreeMap::new();
    for service in index.services() {
        let key = (service.namespace.clone(), service.name.clone());
        let mut translation = translate_service(index, service, node_name, node_ip);
        let id = format!("{}/{}", service.namespace, service.name);
        let mut warnings = cap_warnings(&id, &translation);
        for port in &mut translation.ports {
            let usable = usable_count(&port.endpoints);
            for frontend in &mut port.frontends {
                let key = frontend_key(frontend, port.port.protocol);
                if let Some(holder) = holders.get(&key) {
                    frontend.taken_by = Some(holder.clone());
                    out.contested = true;
                    warnings.insert(format!(
                        "Service {id}: frontend {}:{}/{} is Service {holder}'s already; not translated for {id}",
                        frontend.addr,
                        frontend.port,
                        port.port.protocol.as_str()
                    ));
                    continue;
                }
                holders.insert(key, id.clone());
                write_slots(&mut slots, key, frontend, service, usable > 0);
            }
        }
        if !warnings.is_empty() {
            out.warnings_of.insert(key.clone(), warnings);
        }
        out.services.insert(key, translation);
    }
    out.slots = Arc::new(slots);
    for (namespace, service, slice) in index.endpoint_slices_with_service() {
        if index.service(namespace, service).is_none() {
            out.warnings_of
                .entry((namespace.to_string(), service.to_string()))
                .or_default()
                .insert(orphan_warning(namespace, service, slice));
        }
    }
    out.collect_warnings();
    out
}

/// Brings `services` (a translation of an earlier state of `index`) up to date after changes
/// to the Services in `changed` alone (see `ClusterIndex::take_changed_services`), touching
/// only their translations and slots: a change of one Service of many costs that Service, not
/// all of them. `false` when it cannot (a frontend two Services claim, before or after): then
/// `services` is left half-done and only [`translate`] gives the right answer.
pub fn update(
    services: &mut Services,
    index: &ClusterIndex,
    node_name: &str,
    changed: &BTreeSet<(String, String)>,
) -> bool {
    if services.contested {
        return false;
    }
    let node_ip = node_ip(index, node_name);
    let slots = Arc::make_mut(&mut services.slots);
    for key in changed {
        services.warnings_of.remove(key);
        let Some(old) = services.services.remove(key) else {
            continue;
        };
        for port in &old.ports {
            for frontend in port.frontends.iter().filter(|f| f.taken_by.is_none()) {
                let first = frontend_key(frontend, port.port.protocol);
                let last = LbKey {
                    slot: u16::MAX,
                    _pad1: u16::MAX,
                    ..first
                };
                let gone: Vec<LbKey> = slots.range(first..=last).map(|(k, _)| *k).collect();
                for k in gone {
                    slots.remove(&k);
                }
            }
        }
    }
    for key in changed {
        let (namespace, name) = key;
        let Some(service) = index.service(namespace, name) else {
            let orphans: BTreeSet<String> = index
                .endpoint_slices_of(namespace, name)
                .map(|slice| orphan_warning(namespace, name, &slice.name))
                .collect();
            if !orphans.is_empty() {
                services.warnings_of.insert(key.clone(), orphans);
            }
            continue;
        };
        let translation = translate_service(index, service, node_name, node_ip);
        let warnings = cap_warnings(&format!("{namespace}/{name}"), &translation);
        for port in &translation.ports {
            let usable = usable_count(&port.endpoints);
            for frontend in &port.frontends {
                let slot0 = frontend_key(frontend, port.port.protocol);
                if slots.contains_key(&slot0) {
                    return false;
                }
                write_slots(slots, slot0, frontend, service, usable > 0);
            }
        }
        if !warnings.is_empty() {
            services.warnings_of.insert(key.clone(), warnings);
        }
        services.services.insert(key.clone(), translation);
    }
    services.collect_warnings();
    true
}

/// This node's InternalIP: its node ports' frontend.
fn node_ip(index: &ClusterIndex, node_name: &str) -> Option<Ipv4Addr> {
    index
        .node(node_name)
        .and_then(|n| n.addresses.first().copied())
}

/// A Service port with more usable endpoints than one frontend takes.
fn cap_warnings(id: &str, translation: &ServiceTranslation) -> BTreeSet<String> {
    translation
        .ports
        .iter()
        .filter_map(|port| {
            let usable = usable_count(&port.endpoints);
            (usable > MAX_BACKENDS_PER_FRONTEND).then(|| {
                format!(
                    "Service {id} port {}/{}: {usable} usable endpoints, only the first {MAX_BACKENDS_PER_FRONTEND} in address order are used",
                    port.port.port,
                    port.port.protocol.as_str()
                )
            })
        })
        .collect()
}

fn orphan_warning(namespace: &str, service: &str, slice: &str) -> String {
    format!(
        "EndpointSlice {namespace}/{slice} is labelled for Service {namespace}/{service}, which does not exist: its endpoints are not used"
    )
}

/// Endpoints that could be a backend somewhere (before traffic policies).
fn usable_count(endpoints: &[Backend]) -> usize {
    let ready = endpoints
        .iter()
        .filter(|b| b.condition == Condition::Ready)
        .count();
    if ready > 0 {
        ready
    } else {
        endpoints
            .iter()
            .filter(|b| b.condition == Condition::ServingTerminating)
            .count()
    }
}

fn translate_service(
    index: &ClusterIndex,
    service: &ServiceInfo,
    node_name: &str,
    node_ip: Option<Ipv4Addr>,
) -> ServiceTranslation {
    let not_translated = if service.headless {
        Some("headless (clusterIP: None)")
    } else if service.type_ == ServiceType::ExternalName {
        Some("ExternalName")
    } else if service.cluster_ips.is_empty() {
        Some("no IPv4 ClusterIP")
    } else {
        None
    };
    let mut translation = ServiceTranslation {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        type_: service.type_,
        affinity_timeout_s: service.affinity_timeout_s,
        internal_traffic_policy: service.internal_traffic_policy,
        external_traffic_policy: service.external_traffic_policy,
        not_translated,
        ports: Vec::new(),
    };
    if not_translated.is_some() {
        return translation;
    }
    // Kubernetes applies externalTrafficPolicy to the Services reachable from outside: NodePort
    // and LoadBalancer, and ClusterIP with external IPs (kube-proxy's `ExternallyAccessible`).
    let internal_local = service.internal_traffic_policy == TrafficPolicy::Local;
    let externally_accessible = service.type_.has_node_ports()
        || (service.type_ == ServiceType::ClusterIp && !service.external_ips.is_empty());
    let external_local =
        externally_accessible && service.external_traffic_policy == TrafficPolicy::Local;
    for port in &service.ports {
        let endpoints = endpoints_of(index, service, port);
        let frontend = |kind, addr, number, local| Frontend {
            kind,
            addr,
            port: number,
            local,
            backends: backends_for(&endpoints, local, node_name),
            taken_by: None,
        };
        let mut frontends: Vec<Frontend> = service
            .cluster_ips
            .iter()
            .map(|ip| frontend(FrontendKind::ClusterIp, *ip, port.port, internal_local))
            .collect();
        frontends.extend(
            service
                .external_ips
                .iter()
                .map(|ip| frontend(FrontendKind::ExternalIp, *ip, port.port, external_local)),
        );
        frontends.extend(
            service
                .load_balancer_ips
                .iter()
                .map(|ip| frontend(FrontendKind::LoadBalancer, *ip, port.port, external_local)),
        );
        if service.type_.has_node_ports()
            && let (Some(node_port), Some(ip)) = (port.node_port, node_ip)
        {
            frontends.push(frontend(
                FrontendKind::NodePort,
                ip,
                node_port,
                external_local,
            ));
        }
        translation.ports.push(PortTranslation {
            port: port.clone(),
            frontends,
            endpoints,
        });
    }
    translation
}

/// Every endpoint of `port` in the Service's IPv4 slices, once each (with the best condition
/// any slice gives it), in address and port order.
fn endpoints_of(index: &ClusterIndex, service: &ServiceInfo, port: &ServicePort) -> Vec<Backend> {
    let mut by_address: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
    let slices = index
        .endpoint_slices_of(&service.namespace, &service.name)
        .filter(|s| s.address_type == AddressType::Ipv4);
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let c = endpoint.conditions;
            let condition = if c.ready {
                Condition::Ready
            } else if c.serving && c.terminating {
                Condition::ServingTerminating
            } else {
                Condition::NotUsed
            };
            let backend = Backend {
                addr: endpoint.address,
                port: slice_port.port,
                condition,
                node: endpoint.node_name.clone(),
            };
            by_address
                .entry((backend.addr, backend.port))
                .and_modify(|known| {
                    if backend.condition < known.condition {
                        *known = backend.clone();
                    }
                })
                .or_insert(backend);
        }
    }
    by_address.into_values().collect()
}

/// The backends of a frontend: the ready endpoints (this node's only, when `local`), else the
/// serving and terminating ones among the same, at most [`MAX_BACKENDS_PER_FRONTEND`].
fn backends_for(endpoints: &[Backend], local: bool, node_name: &str) -> Vec<(Ipv4Addr, u16)> {
    let eligible = || {
        endpoints
            .iter()
            .filter(move |b| !local || b.node.as_deref() == Some(node_name))
    };
    let with = |condition| {
        eligible()
            .filter(|b| b.condition == condition)
            .map(|b| (b.addr, b.port))
            .take(MAX_BACKENDS_PER_FRONTEND)
            .collect::<Vec<_>>()
    };
    let ready = with(Condition::Ready);
    if ready.is_empty() {
        with(Condition::ServingTerminating)
    } else {
        ready
    }
}

fn frontend_key(frontend: &Frontend, protocol: Protocol) -> LbKey {
    LbKey {
        addr: frontend.addr.octets(),
        port: frontend.port.to_be(),
        protocol: protocol.number(),
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    }
}

/// Slot 0, the service, and slots 1..=n, its backends. `usable_anywhere`: the port has
/// endpoints that could be backends on some node.
fn write_slots(
    slots: &mut BTreeMap<LbKey, LbEntry>,
    key: LbKey,
    frontend: &Frontend,
    service: &ServiceInfo,
    usable_anywhere: bool,
) {
    let mut flags = match frontend.kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::ExternalIp => LB_F_EXTERNAL_IP,
        FrontendKind::NodePort => LB_F_NODEPORT,
        FrontendKind::LoadBalancer => LB_F_LOAD_BALANCER,
    };
    // Without a backend on any node the policy makes no difference, and a Local frontend is
    // refused like any other rather than dropped as one whose backends are elsewhere
    // (kube-proxy rejects a Service without endpoints whatever its policies).
    if frontend.local && usable_anywhere {
        flags |= LB_F_LOCAL;
    }
    slots.insert(
        key,
        LbEntry {
            // At most MAX_BACKENDS_PER_FRONTEND, far below u16::MAX.
            count: frontend.backends.len() as u16,
            flags,
            affinity_timeout_s: service.affinity_timeout_s.unwrap_or(0),
            ..LbEntry::default()
        },
    );
    for (slot, (addr, port)) in (1u16..).zip(&frontend.backends) {
        slots.insert(
            LbKey { slot, ..key },
            LbEntry {
                backend: addr.octets(),
                backend_port: port.to_be(),
                ..LbEntry::default()
            },
        );
    }
}

#[cfg(test)]
mod tests;
