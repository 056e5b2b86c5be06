//! Why a flow is allowed or dropped, answered from the index alone: which NetworkPolicy rules
//! admit it, or which policies isolate an end that none of their rules admits it to.
//!
//! This is NetworkPolicy's semantics written once more, directly over the policy objects rather
//! than over identities and map keys, so that it can check the datapath (a test compares the two
//! on every case of the policy truth tables) and so that `myelinctl policy explain` can answer
//! for pods that do not exist yet. The rules it follows are the datapath's:
//!
//! - only pods are isolated; a policy isolates the pods it selects in the directions of its
//!   `policyTypes` (`PolicyInfo::ingress`/`egress` are `Some`);
//! - an isolated direction allows what one of the isolating policies' rules admits: a rule
//!   without peers admits every peer, a pod peer admits pods (never nodes or the world), an
//!   ipBlock admits addresses (pods' too) inside `cidr` and outside every `except`; a rule
//!   without ports admits every port, a named port is the destination pod's container port;
//! - traffic between a pod and its own node is always allowed, both ways.

use std::{fmt, net::Ipv4Addr};

use myelin_common::Direction;
use serde::{Serialize, Serializer, ser::SerializeStruct};

use crate::{
    ClusterIndex, ContainerPort, IdentityLabels, PolicyInfo, Protocol,
    policy::{Peer, PortMatch, Rule},
};

/// A rule of a policy: `demo/backend-from-frontend ingress[0]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub namespace: String,
    pub name: String,
    pub direction: Direction,
    /// Position of the rule in the policy's `ingress` or `egress` list.
    pub index: u32,
}

/// `"ingress"` or `"egress"`.
pub fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {}[{}]",
            self.namespace,
            self.name,
            direction_name(self.direction),
            self.index
        )
    }
}

impl Serialize for RuleRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("RuleRef", 4)?;
        st.serialize_field("namespace", &self.namespace)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("direction", direction_name(self.direction))?;
        st.serialize_field("rule", &self.index)?;
        st.end()
    }
}

/// A policy: `demo/deny-all`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl From<&PolicyInfo> for PolicyRef {
    fn from(p: &PolicyInfo) -> Self {
        Self {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        }
    }
}

/// One end of a flow, as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowEnd {
    /// A pod (not host-network), existing or hypothetical: its identity labels, its address
    /// when it has one (ipBlocks match it), its container ports (named ports).
    Pod {
        labels: IdentityLabels,
        addr: Option<Ipv4Addr>,
        ports: Vec<ContainerPort>,
    },
    /// A node (and its host-network pods). `own` when it is the node of the pod at the other
    /// end: that pair is always allowed.
    Node { addr: Ipv4Addr, own: bool },
    /// Anything else: outside the cluster.
    World { addr: Ipv4Addr },
}

impl FlowEnd {
    fn pod_labels(&self) -> Option<&IdentityLabels> {
        match self {
            FlowEnd::Pod { labels, .. } => Some(labels),
            _ => None,
        }
    }

    fn addr(&self) -> Option<Ipv4Addr> {
        match self {
            FlowEnd::Pod { addr, .. } => *addr,
            FlowEnd::Node { addr, .. } | FlowEnd::World { addr } => Some(*addr),
        }
    }

    fn is_own_node(&self) -> bool {
        matches!(self, FlowEnd::Node { own: true, .. })
    }
}

/// What one direction's check says: the source's egress policy, or the destination's ingress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "verdict"
)]
pub enum Check {
    /// This end is not a pod: no policy applies to it.
    NotAPod,
    /// No policy selects this pod for this direction: everything is allowed.
    NotIsolated,
    /// The other end is the pod's own node: always allowed.
    OwnNode,
    /// Isolated, and these rules admit the flow (every one that does, in policy order).
    Allowed { rules: Vec<RuleRef> },
    /// Isolated by these policies, and none of their rules admits the flow.
    Denied { isolated_by: Vec<PolicyRef> },
}

impl Check {
    pub fn allows(&self) -> bool {
        !matches!(self, Check::Denied { .. })
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::NotAPod => f.write_str("not a pod"),
            Check::NotIsolated => f.write_str("not isolated"),
            Check::OwnNode => f.write_str("own node (always allowed)"),
            Check::Allowed { rules } => {
                f.write_str("allowed by ")?;
                write_list(f, rules)
            }
            Check::Denied { isolated_by } => {
                f.write_str("default-deny by ")?;
                write_list(f, isolated_by)
            }
        }
    }
}

fn write_list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// The answer for one flow: the source's egress check, then the destination's ingress check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub allowed: bool,
    pub egress: Check,
    pub ingress: Check,
}

/// Explains a flow from `from` to `to`'s `port`/`protocol`.
pub fn explain(
    index: &ClusterIndex,
    from: &FlowEnd,
    to: &FlowEnd,
    protocol: Protocol,
    port: u16,
) -> Explanation {
    let egress = check(index, Direction::Egress, from, to, to, protocol, port);
    let ingress = check(index, Direction::Ingress, to, from, to, protocol, port);
    Explanation {
        allowed: egress.allows() && ingress.allows(),
        egress,
        ingress,
    }
}

/// The policies that isolate a pod with these labels in `direction`, in policy order.
pub fn isolating<'a>(
    index: &'a ClusterIndex,
    pod: &'a IdentityLabels,
    direction: Direction,
) -> impl Iterator<Item = &'a PolicyInfo> + 'a {
    index
        .policies()
        .filter(move |p| rules_of(p, direction).is_some() && p.selects(pod))
}

fn rules_of(policy: &PolicyInfo, direction: Direction) -> Option<&Vec<Rule>> {
    match direction {
        Direction::Ingress => policy.ingress.as_ref(),
        Direction::Egress => policy.egress.as_ref(),
    }
}

/// The check of `subject`'s policy for `direction` against `peer`; `dst` is the flow's
/// destination (whose container ports named ports are).
fn check(
    index: &ClusterIndex,
    direction: Direction,
    subject: &FlowEnd,
    peer: &FlowEnd,
    dst: &FlowEnd,
    protocol: Protocol,
    port: u16,
) -> Check {
    let Some(labels) = subject.pod_labels() else {
        return Check::NotAPod;
    };
    // In policy order: the index keeps policies sorted by namespace and name.
    let policies: Vec<&PolicyInfo> = isolating(index, labels, direction).collect();
    if policies.is_empty() {
        return Check::NotIsolated;
    }
    if peer.is_own_node() {
        return Check::OwnNode;
    }
    let dst_ports = match dst {
        FlowEnd::Pod { ports, .. } => ports.as_slice(),
        _ => &[],
    };
    let mut rules = Vec::new();
    for policy in &policies {
        for (i, rule) in rules_of(policy, direction)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if peer_matches(rule, &policy.namespace, peer)
                && port_matches(rule, dst_ports, protocol, port)
            {
                rules.push(RuleRef {
                    namespace: policy.namespace.clone(),
                    name: policy.name.clone(),
                    direction,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                });
            }
        }
    }
    if rules.is_empty() {
        Check::Denied {
            isolated_by: policies.into_iter().map(PolicyRef::from).collect(),
        }
    } else {
        Check::Allowed { rules }
    }
}

fn peer_matches(rule: &Rule, policy_namespace: &str, peer: &FlowEnd) -> bool {
    let Some(peers) = &rule.peers else {
        return true;
    };
    peers.iter().any(|p| match p {
        Peer::Pods { namespaces, pods } => peer.pod_labels().is_some_and(|l| {
            let namespace_ok = match namespaces {
                None => l.namespace == policy_namespace,
                Some(sel) => sel.matches(&l.namespace_labels),
            };
            namespace_ok && pods.as_ref().is_none_or(|sel| sel.matches(&l.pod_labels))
        }),
        Peer::IpBlock { .. } => peer.addr().is_some_and(|a| p.block_contains(a.into())),
    })
}

fn port_matches(rule: &Rule, dst_ports: &[ContainerPort], protocol: Protocol, port: u16) -> bool {
    let Some(specs) = &rule.ports else {
        return true;
    };
    specs
        .iter()
        .filter(|s| s.protocol == protocol)
        .any(|s| match &s.port {
            PortMatch::Any => true,
            PortMatch::Range { from, to } => (*from..=*to).contains(&port),
            PortMatch::Named(name) => dst_ports
                .iter()
                .any(|c| &c.name == name && c.protocol == protocol && c.port == port),
        })
}

#[cfg(test)]
mod tests;
