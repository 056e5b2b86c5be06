//! What the API and the metrics show of the agent's state.

use std::{net::SocketAddrV4, sync::Arc};

use myelin_api::{
    AttachmentId, BackendSummary, DropCount, Endpoint, FrontendSummary, PodRef, PolicyFallback,
    PolicyRejected, PolicyStatus, PolicySummary, ServicePortSummary, ServiceStatus, ServiceSummary,
    Status,
};
use myelin_cluster::{IdentityLabels, index::Fallback};
use myelin_common::endpoint::ENDPOINT_F_POLICY_INCOMPLETE;

use super::{Agent, LbAlgorithm};
use crate::{datapath::DatapathOps, endpoint::EndpointRecord};

impl<D: DatapathOps> Agent<D> {
    pub fn endpoints(&self, filter: Option<&AttachmentId>) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter(|r| filter.is_none_or(|f| *f == r.attachment))
            .map(|r| self.to_api(r))
            .collect()
    }

    pub(super) fn to_api(&self, r: &EndpointRecord) -> Endpoint {
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
            routing: self.routing.clone(),
            kube_proxy_replacement: self.translates_services,
            lb_algorithm: self.translates_services.then(|| {
                let algorithm = if self.maglev.table_size.is_some() {
                    LbAlgorithm::Maglev
                } else {
                    LbAlgorithm::Random
                };
                algorithm.as_str().to_string()
            }),
            maglev_table_size: self.maglev.table_size,
            socket_lb: self.socket_lb.clone(),
            // The API fills it in: the flow log is not the agent's.
            flows: None,
        }
    }

    /// The other nodes: routed, or why not.
    pub fn node_summaries(&mut self) -> Vec<myelin_api::NodeSummary> {
        let own = self.node_name.clone();
        let routing = self.nodes().clone();
        self.index
            .nodes()
            .filter(|n| n.name != own)
            .map(|n| {
                let reason = routing
                    .skipped
                    .iter()
                    .find(|(name, _)| *name == n.name)
                    .map(|(_, why)| why.to_string());
                myelin_api::NodeSummary {
                    name: n.name.clone(),
                    pod_cidr: n.pod_cidr.map(|c| c.to_string()),
                    internal_ip: n.addresses.first().copied(),
                    routed: routing.remote.iter().any(|r| r.name == n.name),
                    reason,
                }
            })
            .collect()
    }

    /// The policies in force, with the local pods each selects and, for a policy whose latest
    /// version was rejected, why and what is in force instead.
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
                .indexed_policies()
                .map(|indexed| {
                    let p = &indexed.in_force;
                    PolicySummary {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        ingress: p.ingress.is_some(),
                        egress: p.egress.is_some(),
                        selects: pods
                            .iter()
                            .filter(|(_, labels, _)| p.selects(labels))
                            .map(|(pod, _, _)| pod.clone())
                            .collect(),
                        rejected: indexed.rejected.as_ref().map(|r| PolicyRejected {
                            reason: r.reason.clone(),
                            in_force: match r.fallback {
                                Fallback::LastGood => PolicyFallback::LastGood,
                                Fallback::Deny => PolicyFallback::Deny,
                                Fallback::DenyNamespace => PolicyFallback::DenyNamespace,
                            },
                        }),
                    }
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

    /// Every Service this node translates, with its frontends, the backends each sends to
    /// and every endpoint's state; nothing when Services are left to kube-proxy.
    pub fn service_status(&mut self) -> ServiceStatus {
        let translates = self.translates_services;
        let services = self
            .services()
            .services
            .values()
            .map(|s| ServiceSummary {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                type_: s.type_.as_str().to_string(),
                not_translated: s.not_translated.map(str::to_string),
                affinity_timeout_seconds: s.affinity_timeout_s,
                internal_traffic_policy: s.internal_traffic_policy.as_str().to_string(),
                external_traffic_policy: s.external_traffic_policy.as_str().to_string(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePortSummary {
                        name: p.port.name.clone(),
                        protocol: p.port.protocol.as_str().to_string(),
                        port: p.port.port,
                        frontends: p
                            .frontends
                            .iter()
                            .map(|f| FrontendSummary {
                                kind: f.kind,
                                address: f.addr,
                                port: f.port,
                                local: f.local,
                                backends: f
                                    .backends
                                    .iter()
                                    .map(|(addr, port)| SocketAddrV4::new(*addr, *port))
                                    .collect(),
                                taken_by: f.taken_by.clone(),
                            })
                            .collect(),
                        endpoints: p
                            .endpoints
                            .iter()
                            .map(|b| BackendSummary {
                                address: b.addr,
                                port: b.port,
                                state: b.condition,
                                node: b.node.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        ServiceStatus {
            kube_proxy_replacement: translates,
            services,
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

    /// Values for the metrics endpoint.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let translated = &self.services.1;
        crate::metrics::Snapshot {
            ready: self.synced,
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            free_addresses: self.ipam.free(),
            pods_indexed: self.index.pod_count(),
            policies_rejected: self.index.rejected_policy_count(),
            // The translation as of the last computation of the maps, which follows every
            // change of the index.
            services: translated
                .services
                .values()
                .filter(|s| s.not_translated.is_none())
                .count(),
            frontends_without_backend: translated
                .services
                .values()
                .flat_map(|s| &s.ports)
                .flat_map(|p| &p.frontends)
                .filter(|f| f.backends.is_empty() && f.taken_by.is_none())
                .count(),
            frontends_unwritten: self
                .datapath
                .services_unwritten()
                .map_or(0, |u| u.frontends.len()),
            maglev_unwritten: self
                .datapath
                .maglev_unwritten()
                .map_or(0, |u| u.frontends.len()),
            socket_lb: self.socket_lb.is_some(),
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
