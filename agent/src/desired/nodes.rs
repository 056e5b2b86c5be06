//! The other nodes of the cluster as routing sees them: each node's pod CIDR and the address
//! its traffic goes to (its InternalIP). A node that cannot be routed is left out, with why:
//! no pod CIDR, no InternalIP, or a pod CIDR that overlaps another node's (then neither is
//! routed: sending a pod's packets to the wrong node would be worse than not sending them).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use myelin_cluster::ClusterIndex;

/// A node whose pods this node reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    pub ip: Ipv4Addr,
}

/// Why a node is not routed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skipped {
    NoPodCidr,
    NoInternalIp,
    /// Its pod CIDR overlaps this node's.
    OverlapsThisNode(Ipv4Net),
    Overlaps {
        other: String,
        cidr: Ipv4Net,
    },
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::NoPodCidr => f.write_str("no spec.podCIDR"),
            Skipped::NoInternalIp => f.write_str("no InternalIP in status.addresses"),
            Skipped::OverlapsThisNode(cidr) => {
                write!(f, "its pod CIDR overlaps this node's ({cidr})")
            }
            Skipped::Overlaps { other, cidr } => {
                write!(f, "its pod CIDR overlaps Node {other}'s ({cidr})")
            }
        }
    }
}

/// This node's view of the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nodes {
    /// Routed nodes, by pod CIDR (disjoint, in address order).
    pub remote: Vec<RemoteNode>,
    pub skipped: Vec<(String, Skipped)>,
    /// This node's InternalIP, when its Node object gives one.
    pub own_ip: Option<Ipv4Addr>,
}

impl Nodes {
    /// The routing view of `index` from node `own` (whose pod CIDR in use is `own_cidr`).
    pub fn of(index: &ClusterIndex, own: &str, own_cidr: Ipv4Net) -> Self {
        let mut out = Nodes::default();
        let mut candidates = Vec::new();
        for node in index.nodes() {
            if node.name == own {
                out.own_ip = node.addresses.first().copied();
                continue;
            }
            let (Some(pod_cidr), Some(ip)) = (node.pod_cidr, node.addresses.first().copied())
            else {
                let why = if node.pod_cidr.is_none() {
                    Skipped::NoPodCidr
                } else {
                    Skipped::NoInternalIp
                };
                out.skipped.push((node.name.clone(), why));
                continue;
            };
            if pod_cidr.contains(&own_cidr) || own_cidr.contains(&pod_cidr) {
                out.skipped
                    .push((node.name.clone(), Skipped::OverlapsThisNode(pod_cidr)));
                continue;
            }
            candidates.push(RemoteNode {
                name: node.name.clone(),
                pod_cidr,
                ip,
            });
        }
        // Sorted by network then prefix, a CIDR that contains others comes right before them:
        // every node overlapping one before it is found against the widest reach so far.
        candidates.sort_by_key(|n| (n.pod_cidr.network(), n.pod_cidr.prefix_len()));
        let mut overlapping = vec![false; candidates.len()];
        let mut widest: Option<usize> = None;
        for i in 0..candidates.len() {
            if let Some(w) = widest
                && candidates[w]
                    .pod_cidr
                    .contains(&candidates[i].pod_cidr.network())
            {
                overlapping[i] = true;
                overlapping[w] = true;
                let (a, b) = (&candidates[w], &candidates[i]);
                out.skipped.push((
                    b.name.clone(),
                    Skipped::Overlaps {
                        other: a.name.clone(),
                        cidr: b.pod_cidr,
                    },
                ));
                out.skipped.push((
                    a.name.clone(),
                    Skipped::Overlaps {
                        other: b.name.clone(),
                        cidr: a.pod_cidr,
                    },
                ));
            }
            let reaches_further = widest.is_none_or(|w| {
                candidates[i].pod_cidr.broadcast() > candidates[w].pod_cidr.broadcast()
            });
            if reaches_further {
                widest = Some(i);
            }
        }
        out.skipped.sort();
        out.skipped.dedup();
        out.remote = candidates
            .into_iter()
            .zip(overlapping)
            .filter_map(|(n, bad)| (!bad).then_some(n))
            .collect();
        out
    }

    /// The node whose pod CIDR contains `net`, or whose InternalIP `net` is.
    pub fn behind(&self, net: Ipv4Net) -> Option<&RemoteNode> {
        let at = self
            .remote
            .partition_point(|n| n.pod_cidr.network() <= net.network());
        let by_cidr = at
            .checked_sub(1)
            .map(|i| &self.remote[i])
            .filter(|n| n.pod_cidr.contains(&net));
        by_cidr.or_else(|| {
            (net.prefix_len() == 32)
                .then(|| self.remote.iter().find(|n| n.ip == net.addr()))
                .flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use myelin_cluster::{Change, NodeInfo, Object, builders};

    use super::*;

    fn index(nodes: &[(&str, Option<&str>, Option<&str>)]) -> ClusterIndex {
        let mut index = ClusterIndex::default();
        for (name, cidr, ip) in nodes {
            let mut node = builders::node(name, *cidr, ip.unwrap_or("192.0.2.1"));
            if ip.is_none()
                && let Some(status) = node.status.as_mut()
            {
                status.addresses = None;
            }
            let (info, _) = NodeInfo::from_k8s(&node).unwrap();
            index.apply(Change::Apply(Object::Node(info)));
        }
        index
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn nodes_with_a_pod_cidr_and_an_internal_ip_are_routed_the_others_say_why_not() {
        let index = index(&[
            ("self", Some("10.244.0.0/24"), Some("192.168.1.10")),
            ("b", Some("10.244.1.0/24"), Some("192.168.1.11")),
            ("c", None, Some("192.168.1.12")),
            ("d", Some("10.244.3.0/24"), None),
        ]);
        let nodes = Nodes::of(&index, "self", net("10.244.0.0/24"));
        assert_eq!(nodes.own_ip, Some("192.168.1.10".parse().unwrap()));
        assert_eq!(
            nodes.remote,
            vec![RemoteNode {
                name: "b".into(),
                pod_cidr: net("10.244.1.0/24"),
                ip: "192.168.1.11".parse().unwrap()
            }]
        );
        assert_eq!(
            nodes.skipped,
            vec![
                ("c".into(), Skipped::NoPodCidr),
                ("d".into(), Skipped::NoInternalIp)
            ]
        );
    }

    #[test]
    fn overlapping_pod_cidrs_route_neither_node_and_name_both() {
        let index = index(&[
            ("self", Some("10.244.0.0/24"), Some("192.168.1.10")),
            ("wide", Some("10.244.8.0/21"), Some("192.168.1.11")),
            ("inside", Some("10.244.9.0/24"), Some("192.168.1.12")),
            ("fine", Some("10.244.1.0/24"), Some("192.168.1.13")),
            ("mine", Some("10.244.0.0/16"), Some("192.168.1.14")),
        ]);
        let nodes = Nodes::of(&index, "self", net("10.244.0.0/24"));
        let routed: Vec<&str> = nodes.remote.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(routed, ["fine"]);
        let text: Vec<String> = nodes
            .skipped
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        assert!(
            text.contains(&"inside: its pod CIDR overlaps Node wide's (10.244.9.0/24)".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"wide: its pod CIDR overlaps Node inside's (10.244.8.0/21)".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"mine: its pod CIDR overlaps this node's (10.244.0.0/16)".to_string()),
            "{text:?}"
        );
    }

    #[test]
    fn an_address_is_behind_the_node_whose_pod_cidr_holds_it_or_whose_address_it_is() {
        let index = index(&[
            ("b", Some("10.244.1.0/24"), Some("192.168.1.11")),
            ("c", Some("10.244.2.0/24"), Some("192.168.1.12")),
        ]);
        let nodes = Nodes::of(&index, "self", net("10.244.0.0/24"));
        let behind = |s: &str| nodes.behind(net(s)).map(|n| n.name.as_str());
        assert_eq!(behind("10.244.1.7/32"), Some("b"));
        assert_eq!(behind("10.244.2.0/24"), Some("c"));
        assert_eq!(behind("10.244.2.128/25"), Some("c"));
        assert_eq!(behind("192.168.1.12/32"), Some("c"));
        assert_eq!(behind("10.244.0.5/32"), None, "this node's own pods");
        assert_eq!(behind("10.244.0.0/16"), None, "wider than any node's CIDR");
        assert_eq!(behind("8.8.8.8/32"), None);
    }
}
