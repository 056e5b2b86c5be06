//! From the agent's state to the content every map should have: a pure function, so the whole
//! of NetworkPolicy semantics is unit-tested here, and the datapath only looks things up.
//!
//! - `endpoints`, `endpoints_by_if`: one entry per live local endpoint, with its identity and
//!   isolation flags.
//! - `ipcache`: every pod and node address (/32), plus every prefix a policy names.
//! - `policy`: for each local endpoint selected by a policy, one entry per (peer identity,
//!   protocol, port block) its rules allow.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use myelin_common::{
    Direction, EndpointInfo, IpcacheEntry, Ipv4Key, PolicyEntry, PolicyKey,
    endpoint::{
        ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, ENDPOINT_F_POLICY_INCOMPLETE,
    },
    identity,
    policy::{POLICY_F_ALLOW, PREFIX_ANY_PORT, PREFIX_ANY_PROTOCOL, PREFIX_FULL},
};

use crate::{
    datapath::{DesiredState, table::LpmKey},
    endpoint::EndpointRecord,
    index::{
        ClusterIndex, ContainerPort, Identities, IdentityLabels,
        policy::{Peer, PortMatch, PortSpec, Protocol, Rule},
    },
};

/// A local endpoint with what the computation needs to know about its pod.
pub struct LocalEndpoint<'a> {
    pub record: &'a EndpointRecord,
    pub labels: Arc<IdentityLabels>,
    pub identity: u32,
    /// The pod's container ports (named ports of ingress rules resolve against them).
    pub ports: &'a [ContainerPort],
    /// False when the host interface vanished: no map entries.
    pub live: bool,
}

pub struct Inputs<'a> {
    pub node_name: &'a str,
    pub gateway: Ipv4Addr,
    pub endpoints: Vec<LocalEndpoint<'a>>,
    pub index: &'a ClusterIndex,
    pub identities: &'a Identities,
    /// Capacity of the policy map: endpoints whose entries do not fit are marked incomplete.
    pub policy_capacity: usize,
}

pub fn compute(inputs: &Inputs<'_>) -> DesiredState {
    let prefixes = PolicyPrefixes::collect(inputs.index);
    let mut desired = DesiredState {
        ipcache: ipcache(inputs, &prefixes),
        ..DesiredState::default()
    };

    let egress_ports = if needs_egress_named_ports(inputs.index) {
        PortsByIdentity::build(inputs)
    } else {
        PortsByIdentity::default()
    };
    let mut per_endpoint: Vec<(u32, u32, BTreeSet<LpmKey<PolicyKey>>)> = Vec::new();
    for ep in inputs.endpoints.iter().filter(|e| e.live) {
        let mut flags = 0;
        let mut entries = BTreeSet::new();
        for policy in inputs.index.policies().filter(|p| p.selects(&ep.labels)) {
            let rules = [
                (
                    Direction::Ingress,
                    ENDPOINT_F_INGRESS_ISOLATED,
                    &policy.ingress,
                ),
                (
                    Direction::Egress,
                    ENDPOINT_F_EGRESS_ISOLATED,
                    &policy.egress,
                ),
            ];
            for (direction, flag, rules) in rules {
                let Some(rules) = rules else { continue };
                flags |= flag;
                for rule in rules {
                    let peers =
                        peer_identities(rule, &policy.namespace, inputs.identities, &prefixes);
                    let ctx = RuleContext {
                        endpoint_id: ep.record.id,
                        direction,
                        peers: &peers,
                        own_ports: ep.ports,
                        egress_ports: &egress_ports,
                    };
                    ctx.entries(rule, &mut entries);
                }
            }
        }
        per_endpoint.push((ep.record.id, flags, entries));
    }

    // Fill the policy map endpoint by endpoint; one that does not fit is marked incomplete
    // (its new connections are dropped) instead of being enforced with half its rules.
    let mut endpoint_flags = BTreeMap::new();
    for (id, mut flags, entries) in per_endpoint {
        if desired.policy.len() + entries.len() <= inputs.policy_capacity {
            let allow = PolicyEntry {
                flags: POLICY_F_ALLOW,
            };
            desired
                .policy
                .extend(entries.into_iter().map(|k| (k, allow)));
        } else {
            flags |= ENDPOINT_F_POLICY_INCOMPLETE;
        }
        endpoint_flags.insert(id, flags);
    }

    for ep in &inputs.endpoints {
        let r = ep.record;
        desired.counter_ids.insert(r.id);
        if !ep.live {
            continue;
        }
        let info = EndpointInfo {
            ifindex: r.host_ifindex,
            id: r.id,
            identity: ep.identity,
            flags: endpoint_flags.get(&r.id).copied().unwrap_or(0),
            ip: r.ip.octets(),
            mac: r.mac.0,
            host_mac: r.host_mac.0,
        };
        desired.endpoints.insert(Ipv4Key { addr: info.ip }, info);
        desired.endpoints_by_if.insert(info.ifindex, info);
    }
    desired
}

fn host_key(ip: Ipv4Addr) -> LpmKey<Ipv4Key> {
    LpmKey {
        prefix_len: 32,
        data: Ipv4Key { addr: ip.octets() },
    }
}

fn ipcache(
    inputs: &Inputs<'_>,
    prefixes: &PolicyPrefixes,
) -> BTreeMap<LpmKey<Ipv4Key>, IpcacheEntry> {
    let mut hosts: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    // Local pods first: their addresses come from CNI, not from a status the API may lag on.
    for ep in &inputs.endpoints {
        hosts.insert(ep.record.ip, ep.identity);
    }
    for node in inputs.index.nodes() {
        let id = if node.name == inputs.node_name {
            identity::HOST
        } else {
            identity::REMOTE_NODE
        };
        for ip in &node.addresses {
            hosts.entry(*ip).or_insert(id);
        }
    }
    hosts.insert(inputs.gateway, identity::HOST);
    for pod in inputs.index.pods().filter(|p| !p.host_network) {
        if let Some(ip) = pod.ip
            && let Some(labels) = inputs.index.pod_identity_labels(&pod.namespace, &pod.name)
            && let Some(id) = inputs.identities.get(labels)
        {
            hosts.entry(ip).or_insert(id);
        }
    }

    let mut out = BTreeMap::new();
    for (prefix, id) in &prefixes.ids {
        out.insert(
            LpmKey {
                prefix_len: u32::from(prefix.prefix_len()),
                data: Ipv4Key {
                    addr: prefix.network().octets(),
                },
            },
            IpcacheEntry {
                identity: identity::WORLD,
                cidr_identity: *id,
            },
        );
    }
    for (ip, id) in hosts {
        out.insert(
            host_key(ip),
            IpcacheEntry {
                identity: id,
                // Equal to the identity when no policy prefix covers the address: the
                // datapath then skips the second lookup.
                cidr_identity: prefixes.most_specific(ip).unwrap_or(id),
            },
        );
    }
    out
}

/// Every prefix named by a policy's ipBlock (cidr and except), each with an identity.
struct PolicyPrefixes {
    ids: BTreeMap<Ipv4Net, u32>,
}

impl PolicyPrefixes {
    fn collect(index: &ClusterIndex) -> Self {
        let mut nets = BTreeSet::new();
        for policy in index.policies() {
            for rule in policy.ingress.iter().chain(policy.egress.iter()).flatten() {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::IpBlock { cidr, except } = peer {
                        nets.insert(*cidr);
                        nets.extend(except.iter().copied());
                    }
                }
            }
        }
        // A prefix's identity is derived from the prefix itself, so adding a policy never
        // renumbers the others (and never invalidates their conntrack entries needlessly).
        let mut ids = BTreeMap::new();
        let mut used = BTreeSet::new();
        for net in nets {
            let hash = crate::index::identity::fnv1a(net.to_string().as_bytes()) as u32;
            let mut id = identity::CIDR_FLAG | hash;
            while !used.insert(id) {
                id = identity::CIDR_FLAG | id.wrapping_add(1);
            }
            ids.insert(net, id);
        }
        Self { ids }
    }

    /// The identity of the longest prefix containing `ip`.
    fn most_specific(&self, ip: Ipv4Addr) -> Option<u32> {
        self.ids
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, id)| *id)
    }

    /// Identities of the prefixes an ipBlock selects. A prefix stands for the addresses whose
    /// longest policy prefix it is, so it is selected when it lies inside `cidr` and inside no
    /// `except` (excepts are prefixes of the set too, so an excepted address finds its except
    /// prefix, or a longer one inside it, first).
    fn selected_by(&self, cidr: &Ipv4Net, except: &[Ipv4Net]) -> impl Iterator<Item = u32> + '_ {
        let cidr = *cidr;
        let except = except.to_vec();
        self.ids
            .iter()
            .filter(move |(net, _)| cidr.contains(*net) && !except.iter().any(|e| e.contains(*net)))
            .map(|(_, id)| *id)
    }
}

/// The peer identities of a rule; `[ANY]` when it names no peers (all sources/destinations).
fn peer_identities(
    rule: &Rule,
    policy_namespace: &str,
    identities: &Identities,
    prefixes: &PolicyPrefixes,
) -> Vec<u32> {
    let Some(peers) = &rule.peers else {
        return vec![identity::ANY];
    };
    let mut out = BTreeSet::new();
    for peer in peers {
        match peer {
            Peer::Pods { namespaces, pods } => {
                out.extend(
                    identities
                        .iter()
                        .filter(|(_, l)| match namespaces {
                            None => l.namespace == policy_namespace,
                            Some(sel) => sel.matches(&l.namespace_labels),
                        })
                        .filter(|(_, l)| pods.as_ref().is_none_or(|sel| sel.matches(&l.pod_labels)))
                        .map(|(id, _)| id),
                );
            }
            Peer::IpBlock { cidr, except } => out.extend(prefixes.selected_by(cidr, except)),
        }
    }
    out.into_iter().collect()
}

fn needs_egress_named_ports(index: &ClusterIndex) -> bool {
    index
        .policies()
        .flat_map(|p| p.egress.iter().flatten())
        .flat_map(|r| r.ports.iter().flatten())
        .any(|s| matches!(s.port, PortMatch::Named(_)))
}

/// Container ports of the pods of each identity: named ports of egress rules resolve against
/// the destination pod.
#[derive(Default)]
struct PortsByIdentity(BTreeMap<u32, Vec<ContainerPort>>);

impl PortsByIdentity {
    fn build(inputs: &Inputs<'_>) -> Self {
        let mut map: BTreeMap<u32, Vec<ContainerPort>> = BTreeMap::new();
        for pod in inputs.index.pods() {
            if let Some(labels) = inputs.index.pod_identity_labels(&pod.namespace, &pod.name)
                && let Some(id) = inputs.identities.get(labels)
            {
                map.entry(id).or_default().extend(pod.ports.iter().cloned());
            }
        }
        Self(map)
    }
}

fn named(ports: &[ContainerPort], name: &str, protocol: Protocol) -> BTreeSet<u16> {
    ports
        .iter()
        .filter(|p| p.name.as_deref() == Some(name) && p.protocol == protocol.as_k8s())
        .map(|p| p.port)
        .collect()
}

/// Splits `from..=to` into power-of-two aligned blocks: `(first port, prefix bits of 16)`.
pub fn port_blocks(from: u16, to: u16) -> Vec<(u16, u32)> {
    let (mut start, end) = (u32::from(from), u32::from(to));
    let mut out = Vec::new();
    while start <= end {
        let mut size_log2 = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << size_log2) - 1 > end {
            size_log2 -= 1;
        }
        out.push((start as u16, 16 - size_log2));
        start += 1 << size_log2;
    }
    out
}

struct RuleContext<'a> {
    endpoint_id: u32,
    direction: Direction,
    peers: &'a [u32],
    own_ports: &'a [ContainerPort],
    egress_ports: &'a PortsByIdentity,
}

impl RuleContext<'_> {
    fn key(&self, identity: u32, protocol: u8, port: u16, prefix_len: u32) -> LpmKey<PolicyKey> {
        LpmKey {
            prefix_len,
            data: PolicyKey {
                endpoint_id: self.endpoint_id,
                identity,
                direction: self.direction as u8,
                protocol,
                dport: port.to_be_bytes(),
            },
        }
    }

    fn entries(&self, rule: &Rule, out: &mut BTreeSet<LpmKey<PolicyKey>>) {
        let Some(specs) = &rule.ports else {
            for id in self.peers {
                out.insert(self.key(*id, 0, 0, PREFIX_ANY_PROTOCOL));
            }
            return;
        };
        for PortSpec { protocol, port } in specs {
            let proto = protocol.number();
            match port {
                PortMatch::Any => {
                    for id in self.peers {
                        out.insert(self.key(*id, proto, 0, PREFIX_ANY_PORT));
                    }
                }
                PortMatch::Range { from, to } => {
                    for (base, bits) in port_blocks(*from, *to) {
                        for id in self.peers {
                            out.insert(self.key(*id, proto, base, PREFIX_ANY_PORT + bits));
                        }
                    }
                }
                PortMatch::Named(name) if self.direction == Direction::Ingress => {
                    for port in named(self.own_ports, name, *protocol) {
                        for id in self.peers {
                            out.insert(self.key(*id, proto, port, PREFIX_FULL));
                        }
                    }
                }
                PortMatch::Named(name) => {
                    let by_identity = &self.egress_ports.0;
                    // A named port is a property of the destination pod: resolve it per
                    // destination identity (for "any destination", per pod identity known).
                    let targets: Vec<(u32, &Vec<ContainerPort>)> = if self.peers == [identity::ANY]
                    {
                        by_identity.iter().map(|(id, p)| (*id, p)).collect()
                    } else {
                        self.peers
                            .iter()
                            .filter_map(|id| by_identity.get(id).map(|p| (*id, p)))
                            .collect()
                    };
                    for (id, ports) in targets {
                        for port in named(ports, name, *protocol) {
                            out.insert(self.key(id, proto, port, PREFIX_FULL));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
