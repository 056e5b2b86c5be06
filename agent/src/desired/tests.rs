//! NetworkPolicy semantics, checked on the computed maps with a model of the datapath's
//! lookups (the same three LPM lookups per direction as `ebpf/datapath/src/policy.rs`). The
//! same cases run with real traffic through the real programs in `tests/tests/policy.rs`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerPort as K8sPort, Pod};
use myelin_api::{AttachmentId, Mac, PodRef};

use super::*;
use myelin_cluster::{
    Change, NamespaceInfo, Object, PodInfo, PolicyInfo,
    builders::{self, policy},
};

use myelin_common::proto::{IPPROTO_SCTP as SCTP, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP};

use crate::endpoint::EndpointRecord;

/// A single-node cluster where every pod is a local endpoint.
struct Cluster {
    index: ClusterIndex,
    records: Vec<EndpointRecord>,
    node_ip: Ipv4Addr,
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

impl Cluster {
    fn new() -> Self {
        let mut index = ClusterIndex::default();
        let (node, _) = myelin_cluster::NodeInfo::from_k8s(&builders::node(
            "node-1",
            Some("10.0.0.0/24"),
            "192.168.1.10",
        ))
        .unwrap();
        index.apply(Change::Apply(Object::Node(node)));
        Self {
            index,
            records: Vec::new(),
            node_ip: Ipv4Addr::new(192, 168, 1, 10),
        }
    }

    fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) -> &mut Self {
        let ns = NamespaceInfo::from_k8s(&builders::namespace(name, labels)).unwrap();
        self.index.apply(Change::Apply(Object::Namespace(ns)));
        self
    }

    /// A pod with an address and container ports `name:port/proto`.
    fn pod(
        &mut self,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        ip: &str,
        ports: &[(&str, i32, &str)],
    ) -> &mut Self {
        let mut p: Pod = builders::pod(ns, name, labels, Some(ip));
        if let Some(spec) = p.spec.as_mut() {
            spec.containers = vec![Container {
                name: "c".into(),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, port, proto)| K8sPort {
                            name: Some(n.to_string()),
                            container_port: *port,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }];
        }
        let (info, _) = PodInfo::from_k8s(&p).unwrap();
        self.index.apply(Change::Apply(Object::Pod(info)));
        let id = self.records.len() as u32 + 1;
        self.records.push(EndpointRecord {
            id,
            attachment: AttachmentId::new(name, "eth0"),
            pod: Some(PodRef {
                namespace: ns.into(),
                name: name.into(),
            }),
            netns: String::new(),
            netns_cookie: Some(8192 + u64::from(id)),
            ip: ip.parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, id as u8]),
            host_ifname: format!("lxc{id}"),
            host_ifindex: 100 + id,
            host_mac: Mac([2, 0, 0, 0, 1, id as u8]),
        });
        self
    }

    /// A pod on another node (in the index only, not a local endpoint).
    fn remote_pod(&mut self, ns: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> &mut Self {
        let (info, _) = PodInfo::from_k8s(&builders::pod(ns, name, labels, Some(ip))).unwrap();
        self.index.apply(Change::Apply(Object::Pod(info)));
        self
    }

    fn policy(&mut self, yaml: &str) -> &mut Self {
        let p = PolicyInfo::from_k8s(&policy(yaml)).unwrap();
        self.index.apply(Change::Apply(Object::NetworkPolicy(p)));
        self
    }

    /// A policy Myelin rejects, handed to the index as a source hands it.
    fn rejected_policy(&mut self, yaml: &str) -> &mut Self {
        let object = Object::from_network_policy(&policy(yaml)).unwrap();
        assert!(
            matches!(object, Object::RejectedNetworkPolicy(_)),
            "not rejected: {yaml}"
        );
        self.index.apply(Change::Apply(object));
        self
    }

    fn compute_with_capacity(&self, capacity: usize) -> DesiredState {
        let identities = Identities::compute(self.index.label_sets().cloned());
        let endpoints = self
            .records
            .iter()
            .map(|r| {
                let pod = r.pod.as_ref().unwrap();
                let info = self.index.pod(&pod.namespace, &pod.name).unwrap();
                let labels = self.index.identity_labels_of_pod(&pod.namespace, &pod.name);

                LocalEndpoint {
                    record: r,
                    identity: identities.get(&labels).unwrap(),
                    labels,
                    ports: &info.ports,
                    live: true,
                }
            })
            .collect();
        let mut rule_ids = RuleIds::default();
        rule_ids.sync(&self.index);
        compute(&Inputs {
            rule_ids: &rule_ids,
            node_name: "node-1",
            pod_cidr: "10.0.0.0/24".parse().unwrap(),
            gateway: GATEWAY,
            endpoints,
            index: &self.index,
            identities: &identities,
            pod_hosts: &pod_hosts(&self.index, &identities),
            nodes: &Nodes::of(&self.index, "node-1", "10.0.0.0/24".parse().unwrap()),
            policy_capacity: capacity,
            non_masquerade_cidrs: &[],
        })
    }

    fn compute(&self) -> DesiredState {
        self.compute_with_capacity(1 << 20)
    }
}

/// Longest-prefix match over `bits` of `key` (as the kernel's LPM trie does).
fn lpm<V: Copy>(entries: impl Iterator<Item = (u32, Vec<u8>, V)>, key: &[u8]) -> Option<V> {
    let bit = |b: &[u8], i: usize| (b[i / 8] >> (7 - i % 8)) & 1;
    entries
        .filter(|(len, data, _)| (0..*len as usize).all(|i| bit(data, i) == bit(key, i)))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, v)| v)
}

fn policy_bytes(k: &PolicyKey) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&k.endpoint_id.to_ne_bytes());
    b.extend_from_slice(&k.identity.to_ne_bytes());
    b.extend_from_slice(&[k.direction, k.protocol]);
    b.extend_from_slice(&k.dport);
    b
}

/// The datapath's decision, modelled on the computed maps.
struct Model<'a>(&'a DesiredState);

impl Model<'_> {
    fn ipcache(&self, ip: Ipv4Addr) -> IpcacheEntry {
        lpm(
            self.0
                .ipcache
                .iter()
                .map(|(k, v)| (k.prefix_len, k.data.addr.to_vec(), *v)),
            &ip.octets(),
        )
        .unwrap_or(IpcacheEntry::WORLD)
    }

    fn allows(&self, ep: u32, dir: Direction, peer: IpcacheEntry, proto: u8, port: u16) -> bool {
        self.admitting_rule(ep, dir, peer, proto, port).is_some()
    }

    /// The rule number of the entry that allows the traffic, looked up as the datapath does.
    fn admitting_rule(
        &self,
        ep: u32,
        dir: Direction,
        peer: IpcacheEntry,
        proto: u8,
        port: u16,
    ) -> Option<u32> {
        let lookup = |identity: u32| {
            let key = PolicyKey {
                endpoint_id: ep,
                identity,
                direction: dir as u8,
                protocol: proto,
                dport: port.to_be_bytes(),
            };
            lpm(
                self.0
                    .policy
                    .iter()
                    .map(|(k, v)| (k.prefix_len, policy_bytes(&k.data), *v)),
                &policy_bytes(&key),
            )
            .map(|e| e.rule)
        };
        lookup(peer.identity)
            .or_else(|| {
                (peer.cidr_identity != peer.identity)
                    .then(|| lookup(peer.cidr_identity))
                    .flatten()
            })
            .or_else(|| lookup(identity::ANY))
    }

    fn endpoint(&self, ip: Ipv4Addr) -> Option<&EndpointInfo> {
        self.0.endpoints.get(&Ipv4Key { addr: ip.octets() })
    }

    /// Whether a new connection `src -> dst:port/proto` is allowed.
    fn connects(&self, src: &str, dst: &str, proto: u8, port: u16) -> bool {
        let (src, dst): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        let (s, d) = (self.ipcache(src), self.ipcache(dst));
        if let Some(ep) = self.endpoint(src)
            && ep.flags & ENDPOINT_F_EGRESS_ISOLATED != 0
            && d.identity != identity::HOST
            && (ep.flags & ENDPOINT_F_POLICY_INCOMPLETE != 0
                || !self.allows(ep.id, Direction::Egress, d, proto, port))
        {
            return false;
        }
        if let Some(ep) = self.endpoint(dst)
            && ep.flags & ENDPOINT_F_INGRESS_ISOLATED != 0
            && s.identity != identity::HOST
            && (ep.flags & ENDPOINT_F_POLICY_INCOMPLETE != 0
                || !self.allows(ep.id, Direction::Ingress, s, proto, port))
        {
            return false;
        }
        true
    }
}

/// Two namespaces (`a` labelled team=a, `b` labelled team=b), pods web/api/db in each.
fn two_namespaces() -> Cluster {
    let mut c = Cluster::new();
    c.namespace("a", &[("team", "a")])
        .namespace("b", &[("team", "b")]);
    for (ns, base) in [("a", 10), ("b", 20)] {
        for (i, app) in ["web", "api", "db"].iter().enumerate() {
            c.pod(
                ns,
                app,
                &[("app", app)],
                &format!("10.0.0.{}", base + i),
                &[("http", 80, "TCP"), ("alt", 81, "TCP"), ("dns", 53, "UDP")],
            );
        }
    }
    c
}

const A_WEB: &str = "10.0.0.10";
const A_API: &str = "10.0.0.11";
const A_DB: &str = "10.0.0.12";
const B_WEB: &str = "10.0.0.20";
const B_DB: &str = "10.0.0.22";

#[test]
fn without_policies_everything_is_allowed_and_nothing_is_isolated() {
    let d = two_namespaces().compute();
    assert!(d.policy.is_empty());
    assert!(d.endpoints.values().all(|e| e.flags == 0));
    let m = Model(&d);
    assert!(m.connects(A_WEB, B_DB, TCP, 5432));
}

#[test]
fn a_policy_isolates_only_the_pods_it_selects() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: deny-db, namespace: a}\nspec: {podSelector: {matchLabels: {app: db}}}");
    let d = c.compute();
    let m = Model(&d);
    assert!(!m.connects(A_WEB, A_DB, TCP, 80));
    assert!(
        m.connects(A_DB, A_WEB, TCP, 80),
        "egress is not isolated by an ingress policy"
    );
    assert!(
        m.connects(A_WEB, A_API, TCP, 80),
        "unselected pods allow everything"
    );
}

#[test]
fn policies_are_additive_and_allow_all_wins() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: only-api, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]");
    let d = c.compute();
    assert!(!Model(&d).connects(A_WEB, A_DB, TCP, 80));
    assert!(Model(&d).connects(A_API, A_DB, TCP, 80));
    c.policy("kind: NetworkPolicy\nmetadata: {name: all, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{}]");
    let d = c.compute();
    assert!(Model(&d).connects(A_WEB, A_DB, TCP, 80));
    assert!(Model(&d).connects(B_WEB, A_DB, UDP, 9999));
}

#[test]
fn entries_name_the_first_rule_in_policy_order_that_gives_them() {
    let mut c = two_namespaces();
    // Both give the same entries; `p1` comes first. `p2`'s second rule adds one of its own.
    c.policy("kind: NetworkPolicy\nmetadata: {name: p2, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}, {from: [{podSelector: {matchLabels: {app: web}}}]}]");
    c.policy("kind: NetworkPolicy\nmetadata: {name: p1, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    let mut ids = RuleIds::default();
    ids.sync(&c.index);
    let db = m.endpoint(A_DB.parse().unwrap()).unwrap().id;
    let rule_from = |src: &str| {
        let peer = m.ipcache(src.parse().unwrap());
        m.admitting_rule(db, Direction::Ingress, peer, TCP, 80)
            .and_then(|n| ids.rule(n))
            .map(|r| r.to_string())
    };
    assert_eq!(rule_from(A_API).as_deref(), Some("a/p1 ingress[0]"));
    assert_eq!(rule_from(A_WEB).as_deref(), Some("a/p2 ingress[1]"));
    assert_eq!(rule_from(B_WEB), None);
    assert!(d.policy.values().all(|e| e.rule != 0));
}

#[test]
fn a_connection_needs_egress_at_the_source_and_ingress_at_the_destination() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: web-egress, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]");
    c.policy("kind: NetworkPolicy\nmetadata: {name: db-ingress, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(
        !m.connects(A_WEB, A_DB, TCP, 80),
        "egress allows, ingress does not"
    );
    assert!(
        !m.connects(A_WEB, A_API, TCP, 80),
        "ingress allows (not isolated), egress does not"
    );
    assert!(m.connects(A_API, A_DB, TCP, 80));
}

#[test]
fn pod_selector_alone_means_the_policys_namespace() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(A_WEB, A_DB, TCP, 80));
    assert!(
        !m.connects(B_WEB, A_DB, TCP, 80),
        "same labels, other namespace"
    );
}

#[test]
fn namespace_selector_alone_means_every_pod_of_those_namespaces() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(B_WEB, A_DB, TCP, 80));
    assert!(m.connects(B_DB, A_DB, TCP, 80));
    assert!(
        !m.connects(A_WEB, A_DB, TCP, 80),
        "own namespace not selected"
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and_in_two_peers_is_or() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: and, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: web}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(B_WEB, A_DB, TCP, 80));
    assert!(!m.connects(B_DB, A_DB, TCP, 80));
    assert!(!m.connects(A_WEB, A_DB, TCP, 80));

    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: or, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}, {podSelector: {matchLabels: {app: web}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(B_DB, A_DB, TCP, 80));
    assert!(m.connects(A_WEB, A_DB, TCP, 80));
    assert!(!m.connects(A_API, A_DB, TCP, 80));
}

#[test]
fn empty_selectors_select_everything_in_their_scope() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(A_WEB, A_DB, TCP, 1));
    assert!(!m.connects(B_WEB, A_DB, TCP, 1));
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]");
    let d = c.compute();
    assert!(Model(&d).connects(B_WEB, A_DB, TCP, 1));
}

#[test]
fn ports_numbers_ranges_and_protocols_are_distinct() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 1999}, {protocol: SCTP}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(A_WEB, A_DB, TCP, 80));
    assert!(!m.connects(A_WEB, A_DB, TCP, 81));
    assert!(
        !m.connects(A_WEB, A_DB, UDP, 80),
        "a TCP rule never allows UDP"
    );
    for port in [1000, 1001, 1500, 1024, 1999] {
        assert!(m.connects(A_WEB, A_DB, UDP, port), "{port}");
    }
    assert!(!m.connects(A_WEB, A_DB, UDP, 999));
    assert!(!m.connects(A_WEB, A_DB, UDP, 2000));
    assert!(
        !m.connects(A_WEB, A_DB, TCP, 1500),
        "a UDP range never allows TCP"
    );
    assert!(m.connects(A_WEB, A_DB, SCTP, 7));
    assert!(
        !m.connects(A_WEB, A_DB, 1, 0),
        "ICMP needs a rule without ports"
    );
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    let mut c = Cluster::new();
    c.namespace("a", &[]);
    c.pod("a", "client", &[("app", "client")], "10.0.0.10", &[]);
    c.pod(
        "a",
        "s1",
        &[("app", "server"), ("v", "1")],
        "10.0.0.11",
        &[("http", 8080, "TCP")],
    );
    c.pod(
        "a",
        "s2",
        &[("app", "server"), ("v", "2")],
        "10.0.0.12",
        &[("http", 9090, "TCP")],
    );
    c.policy("kind: NetworkPolicy\nmetadata: {name: in, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{ports: [{port: http}]}]");
    c.policy("kind: NetworkPolicy\nmetadata: {name: out, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: http}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects("10.0.0.10", "10.0.0.11", TCP, 8080));
    assert!(!m.connects("10.0.0.10", "10.0.0.11", TCP, 9090));
    assert!(m.connects("10.0.0.10", "10.0.0.12", TCP, 9090));
    assert!(!m.connects("10.0.0.10", "10.0.0.12", TCP, 8080));
    assert!(!m.connects("10.0.0.10", "10.0.0.12", UDP, 9090));
}

#[test]
fn egress_named_ports_behind_an_ip_block_resolve_for_the_pods_it_holds() {
    let mut c = Cluster::new();
    c.namespace("a", &[]);
    c.pod("a", "client", &[("app", "client")], "10.0.0.10", &[]);
    c.pod(
        "a",
        "s1",
        &[("app", "s1")],
        "10.0.0.11",
        &[("http", 8080, "TCP")],
    );
    c.pod(
        "a",
        "s2",
        &[("app", "s2")],
        "10.0.0.12",
        &[("http", 9090, "TCP")],
    );
    // Outside the block, and in its except.
    c.pod(
        "a",
        "s3",
        &[("app", "s3")],
        "10.0.1.13",
        &[("http", 8080, "TCP")],
    );
    c.pod(
        "a",
        "s4",
        &[("app", "s4")],
        "10.0.0.4",
        &[("http", 8080, "TCP")],
    );
    c.policy("kind: NetworkPolicy\nmetadata: {name: out, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.0/30, 10.0.0.4/32]}}], ports: [{port: http}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects("10.0.0.10", "10.0.0.11", TCP, 8080));
    assert!(!m.connects("10.0.0.10", "10.0.0.11", TCP, 9090));
    assert!(m.connects("10.0.0.10", "10.0.0.12", TCP, 9090));
    assert!(!m.connects("10.0.0.10", "10.0.0.12", UDP, 9090));
    assert!(
        !m.connects("10.0.0.10", "10.0.1.13", TCP, 8080),
        "outside the block"
    );
    assert!(
        !m.connects("10.0.0.10", "10.0.0.4", TCP, 8080),
        "in an except"
    );
}

#[test]
fn egress_named_ports_resolve_per_pod_even_among_pods_sharing_labels() {
    let mut c = Cluster::new();
    c.namespace("a", &[]);
    c.pod("a", "client", &[("app", "client")], "10.0.0.10", &[]);
    // Same labels, hence one identity, but "http" means different numbers.
    c.pod(
        "a",
        "s1",
        &[("app", "server")],
        "10.0.0.11",
        &[("http", 80, "TCP")],
    );
    c.pod(
        "a",
        "s2",
        &[("app", "server")],
        "10.0.0.12",
        &[("http", 81, "TCP")],
    );
    c.pod(
        "a",
        "s3",
        &[("app", "other")],
        "10.0.0.13",
        &[("http", 82, "TCP")],
    );
    c.policy("kind: NetworkPolicy\nmetadata: {name: out, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: http}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects("10.0.0.10", "10.0.0.11", TCP, 80));
    assert!(!m.connects("10.0.0.10", "10.0.0.11", TCP, 81));
    assert!(m.connects("10.0.0.10", "10.0.0.12", TCP, 81));
    assert!(!m.connects("10.0.0.10", "10.0.0.12", TCP, 80));
    assert!(
        m.connects("10.0.0.10", "10.0.0.13", TCP, 82),
        "a uniform identity still works"
    );
    assert!(!m.connects("10.0.0.10", "10.0.0.13", TCP, 80));
    // An ipBlock covering the per-pod addresses still selects them.
    c.policy("kind: NetworkPolicy\nmetadata: {name: block, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.8/29}}], ports: [{port: 9000}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects("10.0.0.10", "10.0.0.12", TCP, 9000));
    assert!(m.connects("10.0.0.10", "10.0.0.12", TCP, 81));
}

#[test]
fn ip_blocks_apply_to_pod_addresses_with_except() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.16/28, except: [10.0.0.22/32]}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(
        m.connects(B_WEB, A_DB, TCP, 80),
        "10.0.0.20 is in the block"
    );
    assert!(!m.connects(B_DB, A_DB, TCP, 80), "10.0.0.22 is excepted");
    assert!(!m.connects(A_WEB, A_DB, TCP, 80), "10.0.0.10 is outside");
}

#[test]
fn an_excepted_address_is_allowed_when_another_rule_allows_it() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: block, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.16/28]}}]}]");
    c.policy("kind: NetworkPolicy\nmetadata: {name: narrow, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.20/30}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(
        m.connects(B_WEB, A_DB, TCP, 80),
        "20 is excepted by one rule, allowed by the other"
    );
    assert!(m.connects(B_DB, A_DB, TCP, 9), "22 too");
    assert!(
        !m.connects("10.0.0.17", A_DB, TCP, 9),
        "17 is excepted and in no other rule"
    );
    assert!(
        m.connects(A_WEB, A_DB, TCP, 9),
        "10 is in the first rule's cidr, not excepted"
    );
}

#[test]
fn ip_blocks_cover_addresses_outside_the_cluster() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [169.254.0.0/16]}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects(A_WEB, "8.8.8.8", UDP, 53));
    assert!(!m.connects(A_WEB, "169.254.169.254", TCP, 80));
    assert!(
        m.connects(A_WEB, A_DB, TCP, 80),
        "0.0.0.0/0 covers pods too"
    );
}

#[test]
fn the_node_and_its_pods_always_reach_each_other() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: lockdown, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}");
    let d = c.compute();
    let m = Model(&d);
    let node = c.node_ip.to_string();
    assert!(m.connects(&node, A_DB, TCP, 8080));
    assert!(m.connects(&GATEWAY.to_string(), A_DB, TCP, 8080));
    assert!(m.connects(A_DB, &node, TCP, 10250));
    assert!(m.connects(A_DB, &GATEWAY.to_string(), UDP, 53));
    assert!(!m.connects(A_DB, "8.8.8.8", UDP, 53));
    assert!(!m.connects(A_WEB, A_DB, TCP, 80));
}

#[test]
fn remote_pods_have_identities_in_the_ipcache() {
    let mut c = two_namespaces();
    c.remote_pod("a", "remote-api", &[("app", "api")], "10.1.0.5");
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(m.connects("10.1.0.5", A_DB, TCP, 80));
    assert_eq!(
        m.ipcache("10.1.0.5".parse().unwrap()).identity,
        m.ipcache(A_API.parse().unwrap()).identity
    );
    assert!(
        !m.connects("10.1.0.6", A_DB, TCP, 80),
        "unknown address is world"
    );
}

#[test]
fn egress_isolation_without_rules_denies_everything() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]");
    let d = c.compute();
    let m = Model(&d);
    assert!(!m.connects(A_WEB, A_DB, TCP, 80));
    assert!(!m.connects(A_WEB, "1.1.1.1", UDP, 53));
    assert!(
        m.connects(A_DB, A_WEB, TCP, 80),
        "ingress of web is not isolated"
    );
}

#[test]
fn a_rejected_edit_leaves_the_last_good_rules_in_force() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}]}]");
    let good = c.compute();
    // The edit would let web in too, on a port that does not exist.
    c.rejected_policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}, {podSelector: {matchLabels: {app: web}}}], ports: [{port: 70000}]}]");
    let d = c.compute();
    assert_eq!(d, good, "the maps are those of the last good version");
    let m = Model(&d);
    assert!(m.connects(A_API, A_DB, TCP, 80), "still allowed");
    assert!(!m.connects(A_WEB, A_DB, TCP, 80), "still denied");
    assert!(!m.connects(A_API, A_DB, TCP, 81), "still denied");
}

#[test]
fn a_new_policy_that_cannot_be_enforced_isolates_the_pods_it_selects() {
    let mut c = two_namespaces();
    c.rejected_policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 70000}]}]");
    let d = c.compute();
    let m = Model(&d);
    assert!(
        !m.connects(A_WEB, A_DB, TCP, 80),
        "the broken rule allows nothing"
    );
    assert!(!m.connects(A_API, A_DB, UDP, 53));
    assert!(!m.connects(B_WEB, A_DB, TCP, 80));
    assert!(
        m.connects(A_DB, A_WEB, TCP, 80),
        "egress is not declared, so not isolated"
    );
    assert!(
        m.connects(A_WEB, A_API, TCP, 80),
        "pods it does not select are untouched"
    );
    let db = &d.endpoints[&Ipv4Key {
        addr: A_DB.parse::<Ipv4Addr>().unwrap().octets(),
    }];
    assert_eq!(db.flags, ENDPOINT_F_INGRESS_ISOLATED);
    assert!(
        d.policy.keys().all(|k| k.data.endpoint_id != db.id),
        "no entry allows anything to db"
    );
}

#[test]
fn a_new_policy_whose_pod_selector_cannot_be_read_isolates_its_whole_namespace() {
    let mut c = two_namespaces();
    c.rejected_policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [db]}]}\n  ingress: [{}]");
    let d = c.compute();
    let m = Model(&d);
    for pod in [A_WEB, A_API, A_DB] {
        assert!(!m.connects(B_WEB, pod, TCP, 80), "{pod}");
    }
    assert!(!m.connects(A_WEB, A_API, TCP, 80));
    assert!(
        m.connects(A_WEB, B_DB, TCP, 80),
        "other namespaces are untouched"
    );
}

#[test]
fn policy_entries_per_packet_lookup_do_not_grow_with_rules() {
    // 500 rules for one destination: the model still answers with the three lookups; and the
    // entry count grows linearly in rules, not in rules x rules.
    let mut c = two_namespaces();
    let ports: String = (1..=500)
        .map(|p| format!("{{port: {}}},", 10000 + p))
        .collect();
    c.policy(&format!(
        "kind: NetworkPolicy\nmetadata: {{name: p, namespace: a}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{ports}]}}]"
    ));
    let d = c.compute();
    assert_eq!(d.policy.len(), 500);
    assert!(Model(&d).connects(A_WEB, A_DB, TCP, 10250));
    assert!(!Model(&d).connects(A_WEB, A_DB, TCP, 10501));
}

#[test]
fn endpoints_that_do_not_fit_the_policy_map_are_marked_incomplete() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 80}, {port: 81}]}]");
    let d = c.compute_with_capacity(3);
    let incomplete: Vec<_> = d
        .endpoints
        .values()
        .filter(|e| e.flags & ENDPOINT_F_POLICY_INCOMPLETE != 0)
        .collect();
    assert_eq!(incomplete.len(), 2, "three isolated pods, room for one");
    assert!(d.policy.len() <= 3);
    let m = Model(&d);
    let complete = ["10.0.0.10", "10.0.0.11", "10.0.0.12"]
        .iter()
        .filter(|ip| m.connects(B_WEB, ip, TCP, 80))
        .count();
    assert_eq!(complete, 1);
}

#[test]
fn port_ranges_split_into_aligned_blocks() {
    assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
    assert_eq!(
        port_blocks(1000, 1999).len(),
        7,
        "1000-7, 1008-23, 1024-1535, 1536-1791, 1792-1919, 1920-83, 1984-99"
    );
    let all = port_blocks(1, 65535);
    assert_eq!(all.len(), 16);
    // Every port in range is covered exactly once, nothing outside is.
    let covered = |p: u32| {
        all.iter()
            .filter(|(b, bits)| {
                let size = 1u32 << (16 - bits);
                p >= u32::from(*b) && p < u32::from(*b) + size
            })
            .count()
    };
    assert_eq!(covered(0), 0);
    for p in [1, 2, 3, 1024, 65535] {
        assert_eq!(covered(p), 1, "{p}");
    }
}

#[test]
fn recomputing_unchanged_state_gives_the_same_maps() {
    let mut c = two_namespaces();
    c.policy("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.16/28}}]}]");
    assert_eq!(c.compute(), c.compute());
    let by_ip: BTreeMap<_, _> = c.compute().ipcache.into_iter().collect();
    assert!(by_ip.len() > 6);
}

#[test]
fn pods_keep_their_address_to_every_pod_cidr_node_and_configured_cidr() {
    let mut index = ClusterIndex::default();
    for (name, cidr, ip) in [
        ("node-2", Some("10.0.1.0/24"), "192.168.1.11"),
        // Routing leaves an overlapping node out; its pods are still the cluster's.
        ("overlapping", Some("10.0.0.0/16"), "192.168.1.12"),
        ("no-cidr", None, "192.168.1.13"),
    ] {
        let (node, _) =
            myelin_cluster::NodeInfo::from_k8s(&builders::node(name, cidr, ip)).unwrap();
        index.apply(Change::Apply(Object::Node(node)));
    }
    let configured = [
        "172.16.0.0/12".parse().unwrap(),
        "10.0.1.0/24".parse().unwrap(),
    ];
    // This node's CIDR comes from IPAM: `--pod-cidr` needs no Node object.
    let excluded = masq_exclude(&index, "10.0.0.0/24".parse().unwrap(), &configured);
    let got: Vec<(String, u32)> = excluded
        .iter()
        .map(|(k, v)| {
            let net = Ipv4Net::new(Ipv4Addr::from(k.data.addr), k.prefix_len as u8).unwrap();
            (net.to_string(), v.reason)
        })
        .collect();
    let want: Vec<(String, u32)> = [
        ("10.0.0.0/16", MASQ_EXCLUDE_POD_CIDR),
        ("10.0.0.0/24", MASQ_EXCLUDE_POD_CIDR),
        ("10.0.1.0/24", MASQ_EXCLUDE_CONFIGURED),
        ("172.16.0.0/12", MASQ_EXCLUDE_CONFIGURED),
        ("192.168.1.11/32", MASQ_EXCLUDE_NODE),
        ("192.168.1.12/32", MASQ_EXCLUDE_NODE),
        ("192.168.1.13/32", MASQ_EXCLUDE_NODE),
    ]
    .iter()
    .map(|(n, r)| (n.to_string(), *r))
    .collect();
    // Keys sort by prefix length first.
    let mut got = got;
    got.sort();
    assert_eq!(got, want);
    assert!(
        Cluster::new()
            .compute()
            .masq_exclude
            .contains_key(&prefix_key("192.168.1.10/32".parse().unwrap())),
        "compute() includes it"
    );
}

#[test]
fn every_endpoint_with_a_namespace_cookie_is_a_socket_client_and_only_those() {
    let mut c = two_namespaces();
    // An endpoint of an older agent's file: no cookie, left to the per-packet path.
    c.records[1].netns_cookie = None;
    c.records[2].netns = "/run/netns/db".into();
    let d = c.compute();
    let expected: BTreeMap<u64, SockLbClient> = c
        .records
        .iter()
        .filter_map(|r| {
            let client = SockLbClient {
                ip: r.ip.octets(),
                endpoint: r.id,
            };
            Some((r.netns_cookie?, client))
        })
        .collect();
    assert_eq!(d.sock_clients, expected);
    assert_eq!(d.sock_clients.len(), c.records.len() - 1);
    let db = c.records[2].netns_cookie.unwrap();
    assert_eq!(d.sock_netns[&db], "/run/netns/db");
    assert_eq!(
        d.sock_netns.keys().collect::<Vec<_>>(),
        d.sock_clients.keys().collect::<Vec<_>>()
    );
}

#[test]
fn a_namespace_with_two_interfaces_is_one_socket_client() {
    let mut c = two_namespaces();
    let shared = c.records[0].netns_cookie;
    c.records[3].netns_cookie = shared;
    c.records[3].netns = "/run/netns/shared".into();
    let d = c.compute();
    let client = d.sock_clients[&shared.unwrap()];
    assert_eq!(
        (client.ip, client.endpoint),
        (c.records[3].ip.octets(), c.records[3].id)
    );
    assert_eq!(d.sock_netns[&shared.unwrap()], "/run/netns/shared");
    assert_eq!(d.sock_clients.len(), c.records.len() - 1);
}
