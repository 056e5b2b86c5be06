//! From the agent's state to the content every map should have: a pure function, so the whole
//! of NetworkPolicy semantics is unit-tested here, and the datapath only looks things up.
//!
//! - `endpoints`, `endpoints_by_if`: one entry per live local endpoint, with its identity and
//!   isolation flags.
//! - `ipcache`: every pod and node address (/32), plus every prefix a policy names.
//! - `policy`: for each local endpoint selected by a policy, one entry per (peer identity,
//!   protocol, port block) its rules allow, carrying the number of the first rule (in policy
//!   order) that gives it (see [`RuleIds`]).
//! - `masq_exclude`: the destinations pods reach with their own address (see [`masq_exclude`]).

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
    lb::{LbEntry, LbKey},
    nat::{MASQ_EXCLUDE_CONFIGURED, MASQ_EXCLUDE_NODE, MASQ_EXCLUDE_POD_CIDR, MasqExclude},
    policy::{POLICY_F_ALLOW, PREFIX_ANY_PORT, PREFIX_ANY_PROTOCOL, PREFIX_FULL},
    sock::SockLbClient,
};

use myelin_cluster::{
    ClusterIndex, ContainerPort, Identities, IdentityLabels,
    policy::{Peer, PortMatch, PortSpec, Protocol, Rule},
};

pub mod nodes;
pub mod rule_ids;
pub mod services;

pub use self::{nodes::Nodes, rule_ids::RuleIds};
use crate::endpoint::EndpointRecord;

/// What the maps should hold, computed by the agent from its endpoints and the cluster index.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DesiredState {
    pub endpoints: BTreeMap<Ipv4Key, EndpointInfo>,
    pub endpoints_by_if: BTreeMap<u32, EndpointInfo>,
    /// Endpoint ids that must have a counters entry.
    pub counter_ids: BTreeSet<u32>,
    pub ipcache: BTreeMap<LpmKey<Ipv4Key>, IpcacheEntry>,
    pub policy: BTreeMap<LpmKey<PolicyKey>, PolicyEntry>,
    pub masq_exclude: BTreeMap<LpmKey<Ipv4Key>, MasqExclude>,
    /// Services' frontends and their backends' slots (`--kube-proxy-replacement`; see
    /// `myelin_common::lb`). Empty when Services are left to kube-proxy. Shared with the
    /// translation it comes from, so that a state computed for a pod's change hands over the
    /// same slots, which the reconciler then knows to be applied already.
    pub lb_services: Arc<BTreeMap<LbKey, LbEntry>>,
    /// The live endpoints' network namespaces whose sockets the socket programs translate
    /// (`sock_lb_pods`: cookie -> the pod's address and endpoint id). A namespace with two
    /// Myelin interfaces is one client: the one with the higher endpoint id.
    pub sock_clients: BTreeMap<u64, SockLbClient>,
    /// The same namespaces' paths (CNI_NETNS), where sockets the socket programs connected to
    /// a backend that is gone are found again.
    pub sock_netns: BTreeMap<u64, String>,
    /// Maglev's lookup tables of the frontends reached from outside (`--lb-algorithm maglev`;
    /// empty otherwise), computed from `lb_services`' slots and shared the same way.
    pub lb_maglev: Arc<services::maglev::Tables>,
    /// Leave the ipcache, policy and masq_exclude maps as they are (the cluster state is not
    /// known yet).
    pub keep_policy_state: bool,
}

/// A key of an LPM trie: the prefix length in bits, then the data it applies to. Ordered (unlike
/// aya's packed `Key`), so that desired contents can live in a `BTreeMap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LpmKey<K> {
    pub prefix_len: u32,
    pub data: K,
}

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

/// The address and identity of every (not host-network) pod of the index that has an address:
/// the largest part of the ipcache, which only changes with the index or the identities, so
/// the agent keeps it between computations.
pub fn pod_hosts(index: &ClusterIndex, identities: &Identities) -> BTreeMap<Ipv4Addr, u32> {
    index
        .pods()
        .filter(|p| !p.host_network)
        .filter_map(|pod| {
            let ip = pod.ip?;
            let labels = index.pod_identity_labels(&pod.namespace, &pod.name)?;
            Some((ip, identities.get(labels)?))
        })
        .collect()
}

pub struct Inputs<'a> {
    pub node_name: &'a str,
    /// This node's pod CIDR (IPAM's, which `--pod-cidr` may give without a Node object).
    pub pod_cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub endpoints: Vec<LocalEndpoint<'a>>,
    pub index: &'a ClusterIndex,
    pub identities: &'a Identities,
    /// [`pod_hosts`] of `index` and `identities`.
    pub pod_hosts: &'a BTreeMap<Ipv4Addr, u32>,
    /// The other nodes: what their addresses and pod CIDRs are behind.
    pub nodes: &'a Nodes,
    /// Capacity of the policy map: endpoints whose entries do not fit are marked incomplete.
    pub policy_capacity: usize,
    /// `--non-masquerade-cidrs`.
    pub non_masquerade_cidrs: &'a [Ipv4Net],
    /// The numbers of the index's policy rules, synced with `index`.
    pub rule_ids: &'a RuleIds,
}

pub fn compute(inputs: &Inputs<'_>) -> DesiredState {
    let egress_ports = EgressNamedPorts::build(inputs);
    let prefixes = PolicyPrefixes::collect(inputs.index, egress_ports.addresses());
    let mut desired = DesiredState {
        ipcache: ipcache(inputs, &prefixes),
        masq_exclude: masq_exclude(inputs.index, inputs.pod_cidr, inputs.non_masquerade_cidrs),
        ..DesiredState::default()
    };

    let mut per_endpoint: Vec<(u32, u32, BTreeMap<LpmKey<PolicyKey>, u32>)> = Vec::new();
    for ep in inputs.endpoints.iter().filter(|e| e.live) {
        let mut flags = 0;
        // Key -> rule number. Policies come in (namespace, name) order and rules in order, so
        // the first rule to give a key is the one it keeps.
        let mut entries = BTreeMap::new();
        for policy in inputs.index.policies().filter(|p| p.selects(&ep.labels)) {
            let ids = inputs.rule_ids.of(policy);
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
                for (i, rule) in rules.iter().enumerate() {
                    let peers =
                        peer_identities(rule, &policy.namespace, inputs.identities, &prefixes);
                    let ctx = RuleContext {
                        endpoint_id: ep.record.id,
                        rule: ids.get(direction, i),
                        direction,
                        peers: &peers,
                        own_ports: ep.ports,
                        egress_ports: &egress_ports,
                        prefixes: &prefixes,
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
            desired.policy.extend(entries.into_iter().map(|(k, rule)| {
                let entry = PolicyEntry {
                    flags: POLICY_F_ALLOW,
                    rule,
                };
                (k, entry)
            }));
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
        if let Some(cookie) = r.netns_cookie {
            let client = SockLbClient {
                ip: info.ip,
                endpoint: r.id,
            };
            let kept = desired.sock_clients.entry(cookie).or_insert(client);
            if kept.endpoint <= r.id {
                *kept = client;
                desired.sock_netns.insert(cookie, r.netns.clone());
            }
        }
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
    // Later inserts win: pods of the index, then nodes, then local pods (their addresses come
    // from CNI, not from a status the API may lag on), then the gateway.
    let mut hosts: BTreeMap<Ipv4Addr, u32> = inputs.pod_hosts.clone();
    for node in inputs.index.nodes() {
        let id = if node.name == inputs.node_name {
            identity::HOST
        } else {
            identity::REMOTE_NODE
        };
        for ip in &node.addresses {
            hosts.insert(*ip, id);
        }
    }
    for ep in &inputs.endpoints {
        hosts.insert(ep.record.ip, ep.identity);
    }
    hosts.insert(inputs.gateway, identity::HOST);

    // Every entry carries the node it is behind, if any, so that one lookup gives the datapath
    // both the identity and where to send the packet.
    let behind = |net: Ipv4Net| inputs.nodes.behind(net).map_or([0; 4], |n| n.ip.octets());
    let mut out = BTreeMap::new();
    for node in &inputs.nodes.remote {
        out.insert(
            prefix_key(node.pod_cidr),
            IpcacheEntry {
                node: node.ip.octets(),
                ..IpcacheEntry::WORLD
            },
        );
    }
    for (prefix, id) in &prefixes.ids {
        out.insert(
            prefix_key(*prefix),
            IpcacheEntry {
                identity: identity::WORLD,
                cidr_identity: *id,
                node: behind(*prefix),
                _pad: 0,
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
                node: behind(Ipv4Net::from(ip)),
                _pad: 0,
            },
        );
    }
    out
}

/// The destinations a pod reaches with its own address, whatever `--masquerade` says: every
/// pod CIDR of the cluster (this node's too), every node's InternalIP, and
/// `--non-masquerade-cidrs`. Taken from every Node object, also those routing leaves out (an
/// overlapping or address-less node's pods are still the cluster's). Where a prefix is there for
/// several reasons, the configured one is shown.
pub fn masq_exclude(
    index: &ClusterIndex,
    pod_cidr: Ipv4Net,
    configured: &[Ipv4Net],
) -> BTreeMap<LpmKey<Ipv4Key>, MasqExclude> {
    let entry = |reason| MasqExclude { reason };
    let mut out = BTreeMap::new();
    out.insert(prefix_key(pod_cidr), entry(MASQ_EXCLUDE_POD_CIDR));
    for node in index.nodes() {
        if let Some(cidr) = node.pod_cidr {
            out.insert(prefix_key(cidr), entry(MASQ_EXCLUDE_POD_CIDR));
        }
        for ip in &node.addresses {
            out.insert(host_key(*ip), entry(MASQ_EXCLUDE_NODE));
        }
    }
    for net in configured {
        out.insert(prefix_key(*net), entry(MASQ_EXCLUDE_CONFIGURED));
    }
    out
}

fn prefix_key(net: Ipv4Net) -> LpmKey<Ipv4Key> {
    LpmKey {
        prefix_len: u32::from(net.prefix_len()),
        data: Ipv4Key {
            addr: net.network().octets(),
        },
    }
}

/// Every prefix named by a policy's ipBlock (cidr and except), plus the /32 of every pod that
/// needs an identity of its own (see [`EgressNamedPorts`]), each with an identity.
struct PolicyPrefixes {
    ids: BTreeMap<Ipv4Net, u32>,
}

impl PolicyPrefixes {
    fn collect(index: &ClusterIndex, hosts: impl Iterator<Item = Ipv4Addr>) -> Self {
        let mut nets: BTreeSet<Ipv4Net> = hosts.map(Ipv4Net::from).collect();
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
            let hash = myelin_cluster::identity::fnv1a(net.to_string().as_bytes()) as u32;
            let mut id = identity::CIDR_FLAG | hash;
            while !used.insert(id) {
                id = identity::CIDR_FLAG | id.wrapping_add(1);
            }
            ids.insert(net, id);
        }
        Self { ids }
    }

    /// The identity of an address that has a /32 of its own.
    fn host(&self, ip: Ipv4Addr) -> Option<u32> {
        self.ids.get(&Ipv4Net::from(ip)).copied()
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

/// Where the named ports of egress rules lead. A named port is a property of the destination
/// pod, but policy entries are keyed by identity: when every pod of an identity gives a name the
/// same numbers (the usual case), the entries are written for the identity; when pods sharing
/// labels disagree, each of them gets a /32 policy prefix, hence an identity of its own (its
/// ipcache `cidr_identity`), and the entries are written per pod.
///
/// An ipBlock peer selects addresses, so a named port behind one is resolved per pod: every pod
/// inside the block of an egress rule with named ports gets a /32 prefix, and the rule's
/// entries are written for the pods its blocks hold.
#[derive(Default)]
struct EgressNamedPorts {
    by_name: BTreeMap<(String, Protocol), BTreeMap<u32, NamedTargets>>,
    /// Pods inside the ipBlocks of egress rules with named ports, with the numbers each name
    /// has in them.
    in_blocks: BTreeMap<(String, Protocol), PodsPorts>,
}

/// Pod addresses and the numbers a port name has in each.
type PodsPorts = Vec<(Ipv4Addr, BTreeSet<u16>)>;

/// One pod's address (if known) and the numbers a port name has in it.
type PodNamedPorts = (Option<Ipv4Addr>, BTreeSet<u16>);

enum NamedTargets {
    /// Every pod of the identity: these ports.
    Uniform(BTreeSet<u16>),
    /// Per pod address.
    PerPod(PodsPorts),
}

impl EgressNamedPorts {
    fn build(inputs: &Inputs<'_>) -> Self {
        let in_use: BTreeSet<(String, Protocol)> = inputs
            .index
            .policies()
            .flat_map(|p| p.egress.iter().flatten())
            .flat_map(|r| r.ports.iter().flatten())
            .filter_map(|s| match &s.port {
                PortMatch::Named(name) => Some((name.clone(), s.protocol)),
                _ => None,
            })
            .collect();
        if in_use.is_empty() {
            return Self::default();
        }
        let blocks: Vec<Ipv4Net> = inputs
            .index
            .policies()
            .flat_map(|p| p.egress.iter().flatten())
            .filter(|r| {
                r.ports
                    .iter()
                    .flatten()
                    .any(|s| matches!(s.port, PortMatch::Named(_)))
            })
            .flat_map(|r| r.peers.iter().flatten())
            .filter_map(|peer| match peer {
                Peer::IpBlock { cidr, .. } => Some(*cidr),
                Peer::Pods { .. } => None,
            })
            .collect();
        // Local pods' addresses come from CNI; the API's podIP may lag or be absent.
        let local: BTreeMap<(&str, &str), Ipv4Addr> = inputs
            .endpoints
            .iter()
            .filter_map(|e| {
                let pod = e.record.pod.as_ref()?;
                Some(((pod.namespace.as_str(), pod.name.as_str()), e.record.ip))
            })
            .collect();
        let mut by_name = BTreeMap::new();
        let mut in_blocks = BTreeMap::new();
        for (name, protocol) in in_use {
            let held: PodsPorts = inputs
                .index
                .pods()
                .filter(|pod| !pod.host_network)
                .filter_map(|pod| {
                    let ip = local
                        .get(&(pod.namespace.as_str(), pod.name.as_str()))
                        .copied()
                        .or(pod.ip)?;
                    let ports = named(&pod.ports, &name, protocol);
                    (!ports.is_empty() && blocks.iter().any(|b| b.contains(&ip)))
                        .then_some((ip, ports))
                })
                .collect();
            if !held.is_empty() {
                in_blocks.insert((name.clone(), protocol), held);
            }
            let mut per_identity: BTreeMap<u32, Vec<PodNamedPorts>> = BTreeMap::new();
            for pod in inputs.index.pods() {
                let Some(id) = inputs
                    .index
                    .pod_identity_labels(&pod.namespace, &pod.name)
                    .and_then(|l| inputs.identities.get(l))
                else {
                    continue;
                };
                let ip = local
                    .get(&(pod.namespace.as_str(), pod.name.as_str()))
                    .copied()
                    .or(pod.ip);
                per_identity
                    .entry(id)
                    .or_default()
                    .push((ip, named(&pod.ports, &name, protocol)));
            }
            let targets = per_identity
                .into_iter()
                .map(|(id, pods)| {
                    let agree = pods.windows(2).all(|w| w[0].1 == w[1].1);
                    let targets = if agree {
                        NamedTargets::Uniform(
                            pods.into_iter().next().map(|p| p.1).unwrap_or_default(),
                        )
                    } else {
                        NamedTargets::PerPod(
                            pods.into_iter()
                                .filter_map(|(ip, ports)| Some((ip?, ports)))
                                .collect(),
                        )
                    };
                    (id, targets)
                })
                .collect();
            by_name.insert((name, protocol), targets);
        }
        Self { by_name, in_blocks }
    }

    /// Pod addresses that need a /32 identity of their own.
    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.by_name
            .values()
            .flat_map(|targets| targets.values())
            .flat_map(|t| match t {
                NamedTargets::Uniform(_) => &[][..],
                NamedTargets::PerPod(pods) => pods.as_slice(),
            })
            .chain(self.in_blocks.values().flatten())
            .map(|(ip, _)| *ip)
    }
}

fn named(ports: &[ContainerPort], name: &str, protocol: Protocol) -> BTreeSet<u16> {
    ports
        .iter()
        .filter(|p| p.name == name && p.protocol == protocol)
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
    /// The rule's number, which its entries carry.
    rule: u32,
    direction: Direction,
    peers: &'a [u32],
    own_ports: &'a [ContainerPort],
    egress_ports: &'a EgressNamedPorts,
    prefixes: &'a PolicyPrefixes,
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

    /// Adds a key, unless an earlier rule gave it already.
    fn put(&self, out: &mut BTreeMap<LpmKey<PolicyKey>, u32>, key: LpmKey<PolicyKey>) {
        out.entry(key).or_insert(self.rule);
    }

    fn entries(&self, rule: &Rule, out: &mut BTreeMap<LpmKey<PolicyKey>, u32>) {
        let Some(specs) = &rule.ports else {
            for id in self.peers {
                self.put(out, self.key(*id, 0, 0, PREFIX_ANY_PROTOCOL));
            }
            return;
        };
        for PortSpec { protocol, port } in specs {
            let proto = protocol.number();
            match port {
                PortMatch::Any => {
                    for id in self.peers {
                        self.put(out, self.key(*id, proto, 0, PREFIX_ANY_PORT));
                    }
                }
                PortMatch::Range { from, to } => {
                    for (base, bits) in port_blocks(*from, *to) {
                        for id in self.peers {
                            self.put(out, self.key(*id, proto, base, PREFIX_ANY_PORT + bits));
                        }
                    }
                }
                PortMatch::Named(name) if self.direction == Direction::Ingress => {
                    for port in named(self.own_ports, name, *protocol) {
                        for id in self.peers {
                            self.put(out, self.key(*id, proto, port, PREFIX_FULL));
                        }
                    }
                }
                PortMatch::Named(name) => {
                    let key = (name.clone(), *protocol);
                    // ipBlock peers: the pods their blocks hold, each by its /32.
                    for peer in rule.peers.iter().flatten() {
                        let Peer::IpBlock { cidr, except } = peer else {
                            continue;
                        };
                        let held = self.egress_ports.in_blocks.get(&key).into_iter().flatten();
                        for (ip, ports) in held.filter(|(ip, _)| {
                            cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
                        }) {
                            let Some(host) = self.prefixes.host(*ip) else {
                                continue;
                            };
                            for port in ports {
                                self.put(out, self.key(host, proto, *port, PREFIX_FULL));
                            }
                        }
                    }
                    let Some(by_identity) = self.egress_ports.by_name.get(&key) else {
                        continue;
                    };
                    let wanted =
                        |id: &u32| self.peers == [identity::ANY] || self.peers.contains(id);
                    for (id, targets) in by_identity.iter().filter(|(id, _)| wanted(id)) {
                        match targets {
                            NamedTargets::Uniform(ports) => {
                                for port in ports {
                                    self.put(out, self.key(*id, proto, *port, PREFIX_FULL));
                                }
                            }
                            NamedTargets::PerPod(pods) => {
                                for (ip, ports) in pods {
                                    let Some(host) = self.prefixes.host(*ip) else {
                                        continue;
                                    };
                                    for port in ports {
                                        self.put(out, self.key(host, proto, *port, PREFIX_FULL));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
