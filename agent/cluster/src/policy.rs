//! NetworkPolicy (networking.k8s.io/v1) in the slim, validated form the agent computes with.
//!
//! Validation happens on the way into the index: a policy with an invalid CIDR, a port outside
//! 1-65535, an endPort below its port, an unknown protocol, policy type or selector operator is
//! rejected as a whole, never half-enforced. A rejection names the offending field and keeps
//! what could be read of the policy (its pod selector, the directions it isolates), so that
//! the index can fail closed with it ([`crate::index`]).

use std::{fmt, net::IpAddr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use myelin_common::proto::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::objects::{Labels, ObjectError};

/// A NetworkPolicy that cannot be enforced as written, with what could be read of it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("NetworkPolicy {}/{} rejected: {reason}", deny.namespace, deny.name)]
pub struct PolicyRejection {
    /// The offending field and what is wrong with it, such as
    /// `spec.ingress[0].ports[0].port: 70000 is outside 1-65535`.
    pub reason: String,
    /// What failing closed means for this policy: the pods it selects isolated in the
    /// directions it declares, with no rules (both directions when `policyTypes` is unusable).
    /// Boxed: rejections travel in `Result`s, which should stay small.
    pub deny: Box<PolicyInfo>,
    /// `spec.podSelector` itself is unusable: `deny` selects every pod of the namespace.
    pub whole_namespace: bool,
}

/// A field of a policy and what is wrong with it. The path grows on the way up, from `port`
/// to `spec.ingress[0].ports[0].port`.
#[derive(Debug, Clone)]
struct Invalid {
    /// Empty while the problem is with the element being parsed as a whole.
    field: String,
    problem: String,
}

impl Invalid {
    fn at(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A problem with the element being parsed as a whole.
    fn here(problem: impl Into<String>) -> Self {
        Self::at("", problem)
    }

    /// The same problem, seen from `parent`.
    fn within(self, parent: impl fmt::Display) -> Self {
        let field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        Self { field, ..self }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// IP protocols a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
        }
    }

    /// As Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// As a container port or a policy port spells it; absent means TCP.
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

/// A label selector requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| match r {
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }

    fn from_k8s(s: &LabelSelector) -> Result<Self, Invalid> {
        let mut requirements = Vec::new();
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let values = e.values.clone().unwrap_or_default();
            let field = format!("matchExpressions[{i}]");
            let needs_values = |op: &str| {
                if values.is_empty() {
                    Err(Invalid::at("values", format!("operator {op} needs values")).within(&field))
                } else {
                    Ok(())
                }
            };
            let no_values = |op: &str| {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err(
                        Invalid::at("values", format!("operator {op} takes no values"))
                            .within(&field),
                    )
                }
            };
            requirements.push(match e.operator.as_str() {
                "In" => {
                    needs_values("In")?;
                    Requirement::In(e.key.clone(), values)
                }
                "NotIn" => {
                    needs_values("NotIn")?;
                    Requirement::NotIn(e.key.clone(), values)
                }
                "Exists" => {
                    no_values("Exists")?;
                    Requirement::Exists(e.key.clone())
                }
                "DoesNotExist" => {
                    no_values("DoesNotExist")?;
                    Requirement::DoesNotExist(e.key.clone())
                }
                op => {
                    return Err(Invalid::at(
                        "operator",
                        format!(
                            "unknown operator {op:?} (expected In, NotIn, Exists or DoesNotExist)"
                        ),
                    )
                    .within(&field));
                }
            });
        }
        Ok(Self {
            match_labels: s.match_labels.clone().unwrap_or_default(),
            requirements,
        })
    }
}

/// Who a rule talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods. `namespaces: None` means the policy's own namespace; `pods: None` means every pod
    /// of the selected namespaces.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` but not in any `except`.
    IpBlock { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

/// A port of a rule: a number or range, or a container port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port of the protocol.
    Any,
    /// `from..=to` (one port when equal).
    Range { from: u16, to: u16 },
    /// A named container port of the destination pod.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// One ingress or egress rule. `None` fields mean "everything" (absent or empty in the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `Some` when the policy isolates the pods it selects for ingress (policyTypes).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl PolicyInfo {
    /// Whether the policy applies to a pod with these identity labels (same namespace, pod
    /// selector matches).
    pub fn selects(&self, pod: &super::IdentityLabels) -> bool {
        self.namespace == pod.namespace && self.pod_selector.matches(&pod.pod_labels)
    }

    /// A policy Myelin cannot enforce as written is an [`ObjectError::InvalidPolicy`] carrying
    /// what failing closed means for it; one without a name or namespace cannot even be
    /// told apart from the others.
    pub fn from_k8s(np: &NetworkPolicy) -> Result<Self, ObjectError> {
        let kind = "NetworkPolicy";
        let name = np
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(ObjectError::NoName { kind })?;
        let namespace = np
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ObjectError::NoNamespace {
                kind,
                name: name.clone(),
            })?;
        let spec = np.spec.clone().unwrap_or_default();
        Ok(Self::from_spec(namespace, name, &spec)?)
    }

    fn from_spec(
        namespace: String,
        name: String,
        spec: &NetworkPolicySpec,
    ) -> Result<Self, PolicyRejection> {
        let reject =
            |invalid: Invalid, pod_selector: Option<Selector>, isolates: Option<(bool, bool)>| {
                // Fail closed: a selector that cannot be read selects the whole namespace, and
                // unreadable policy types isolate both directions.
                let (ingress, egress) = isolates.unwrap_or((true, true));
                PolicyRejection {
                    reason: invalid.to_string(),
                    whole_namespace: pod_selector.is_none(),
                    deny: Box::new(PolicyInfo {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        pod_selector: pod_selector.unwrap_or_default(),
                        ingress: ingress.then(Vec::new),
                        egress: egress.then(Vec::new),
                    }),
                }
            };
        // An absent podSelector selects every pod of the namespace, like an empty one.
        let pod_selector = spec
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()
            .map_err(|e| e.within("spec.podSelector"));
        let isolates = isolated_directions(spec);
        let pod_selector = match pod_selector {
            Ok(selector) => selector.unwrap_or_default(),
            Err(invalid) => return Err(reject(invalid, None, isolates.ok())),
        };
        let (isolates_ingress, isolates_egress) = match isolates {
            Ok(directions) => directions,
            Err(invalid) => return Err(reject(invalid, Some(pod_selector), None)),
        };
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()));
        let egress = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()));
        // Only the rules of the directions the policy isolates are read (and can be invalid).
        let rules = isolates_ingress
            .then(|| Rule::parse_all(ingress, "spec.ingress", "from"))
            .transpose()
            .and_then(|ingress| {
                let egress = isolates_egress
                    .then(|| Rule::parse_all(egress, "spec.egress", "to"))
                    .transpose()?;
                Ok((ingress, egress))
            });
        match rules {
            Ok((ingress, egress)) => Ok(Self {
                namespace,
                name,
                pod_selector,
                ingress,
                egress,
            }),
            Err(invalid) => Err(reject(
                invalid,
                Some(pod_selector),
                Some((isolates_ingress, isolates_egress)),
            )),
        }
    }
}

/// Which directions a policy isolates. Without policyTypes (absent or empty): Ingress always,
/// Egress when there are egress rules (the API server's defaulting).
fn isolated_directions(spec: &NetworkPolicySpec) -> Result<(bool, bool), Invalid> {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    return Err(Invalid::at(
                        format!("spec.policyTypes[{i}]"),
                        format!("unknown policy type {t:?} (expected Ingress or Egress)"),
                    ));
                }
            }
            Ok((
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ))
        }
        _ => Ok((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))),
    }
}

impl Rule {
    /// Parses the rules of one direction: `what` is its field (`spec.ingress`), `peers_field`
    /// the field of its peers (`from` or `to`).
    fn parse_all<'a>(
        raw: impl Iterator<
            Item = (
                Option<&'a Vec<NetworkPolicyPeer>>,
                Option<&'a Vec<NetworkPolicyPort>>,
            ),
        >,
        what: &str,
        peers_field: &str,
    ) -> Result<Vec<Rule>, Invalid> {
        raw.enumerate()
            .map(|(i, (peers, ports))| {
                Rule::parse(peers, ports, peers_field).map_err(|e| e.within(format!("{what}[{i}]")))
            })
            .collect()
    }

    fn parse(
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        peers_field: &str,
    ) -> Result<Self, Invalid> {
        let peers = match peers {
            Some(list) if !list.is_empty() => Some(
                list.iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        Peer::parse(p)
                            .map_err(|e| e.within(format!("{peers_field}[{i}]")))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        let ports = match ports {
            Some(list) if !list.is_empty() => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, p)| PortSpec::parse(p).map_err(|e| e.within(format!("ports[{i}]"))))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        Ok(Self { peers, ports })
    }
}

impl Peer {
    /// `Ok(None)` for a peer that cannot match IPv4 traffic (an IPv6 ipBlock): Myelin's
    /// datapath is IPv4-only, so such a peer allows nothing, which is what it means for IPv4.
    fn parse(p: &NetworkPolicyPeer) -> Result<Option<Self>, Invalid> {
        if let Some(block) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(Invalid::here(
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ));
            }
            let cidr: IpNet = block.cidr.parse().map_err(|_| {
                Invalid::at("ipBlock.cidr", format!("{:?} is not a CIDR", block.cidr))
            })?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let field = || format!("ipBlock.except[{i}]");
                let net: IpNet = e
                    .parse()
                    .map_err(|_| Invalid::at(field(), format!("{e:?} is not a CIDR")))?;
                if !cidr.contains(&net) {
                    return Err(Invalid::at(
                        field(),
                        format!("{e} is not inside cidr {cidr}"),
                    ));
                }
                if let IpNet::V4(v4) = net {
                    except.push(v4.trunc());
                }
            }
            return Ok(match cidr {
                IpNet::V4(v4) => Some(Peer::IpBlock {
                    cidr: v4.trunc(),
                    except,
                }),
                IpNet::V6(_) => None,
            });
        }
        if p.pod_selector.is_none() && p.namespace_selector.is_none() {
            return Err(Invalid::here(
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
        }
        let namespaces = p
            .namespace_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()
            .map_err(|e| e.within("namespaceSelector"))?;
        let pods = p
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()
            .map_err(|e| e.within("podSelector"))?;
        Ok(Some(Peer::Pods { namespaces, pods }))
    }

    /// Whether this peer's ipBlock contains `addr` (false for pod peers).
    pub fn block_contains(&self, addr: IpAddr) -> bool {
        match (self, addr) {
            (Peer::IpBlock { cidr, except }, IpAddr::V4(a)) => {
                cidr.contains(&a) && !except.iter().any(|e| e.contains(&a))
            }
            _ => false,
        }
    }
}

impl PortSpec {
    fn parse(p: &NetworkPolicyPort) -> Result<Self, Invalid> {
        let protocol =
            Protocol::parse(p.protocol.as_deref()).map_err(|e| Invalid::at("protocol", e))?;
        let valid = |n: i32, field: &str| -> Result<u16, Invalid> {
            u16::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Invalid::at(field, format!("{n} is outside 1-65535")))
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortMatch::Any,
            (None, Some(_)) => return Err(Invalid::at("endPort", "needs a numeric port")),
            (Some(IntOrString::Int(n)), end) => {
                let from = valid(*n, "port")?;
                let to = match end {
                    Some(e) => valid(e, "endPort")?,
                    None => from,
                };
                if to < from {
                    return Err(Invalid::at("endPort", format!("{to} is below port {from}")));
                }
                PortMatch::Range { from, to }
            }
            (Some(IntOrString::String(s)), None) => match s.parse::<i32>() {
                // A numeric string is a number, as the API server's conversion treats it.
                Ok(n) => {
                    let n = valid(n, "port")?;
                    PortMatch::Range { from: n, to: n }
                }
                Err(_) if !s.is_empty() && s.len() <= 15 => PortMatch::Named(s.clone()),
                Err(_) => {
                    return Err(Invalid::at(
                        "port",
                        format!("{s:?} is not a valid port name"),
                    ));
                }
            },
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err(Invalid::at("endPort", "cannot be used with a named port"));
            }
        };
        Ok(Self { protocol, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::policy;

    fn parse(yaml: &str) -> Result<PolicyInfo, ObjectError> {
        PolicyInfo::from_k8s(&policy(yaml))
    }

    fn rejection(spec: &str) -> PolicyRejection {
        match parse(&format!("{HEAD}spec: {spec}")) {
            Err(ObjectError::InvalidPolicy(r)) => r,
            other => panic!("{spec}: not rejected: {other:?}"),
        }
    }

    const HEAD: &str = "kind: NetworkPolicy\nmetadata: {name: p, namespace: ns}\n";

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
        let p = parse(&format!("{HEAD}spec: {{podSelector: {{}}}}")).unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
        let p = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{}}]}}"
        ))
        .unwrap();
        assert!(p.ingress.is_some());
        assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
        let p = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress]}}"
        ))
        .unwrap();
        assert_eq!(p.ingress, None);
        assert_eq!(p.egress, Some(vec![]));
        // An empty list is defaulted like an absent one (the API server does the same).
        let p = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: []}}"
        ))
        .unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
    }

    #[test]
    fn empty_peer_and_port_lists_mean_everything() {
        let p = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [], ports: []}}]}}"
        ))
        .unwrap();
        assert_eq!(
            p.ingress.unwrap(),
            vec![Rule {
                peers: None,
                ports: None
            }]
        );
    }

    #[test]
    fn ports_numbers_ranges_names_and_protocols() {
        let p = parse(&format!(
            "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - {{port: 80}}\n    - {{protocol: UDP, port: 53, endPort: 60}}\n    - {{protocol: SCTP, port: http}}\n    - {{protocol: UDP}}\n"
        ))
        .unwrap();
        let ports = p.ingress.unwrap()[0].ports.clone().unwrap();
        assert_eq!(
            ports,
            vec![
                PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range { from: 80, to: 80 }
                },
                PortSpec {
                    protocol: Protocol::Udp,
                    port: PortMatch::Range { from: 53, to: 60 }
                },
                PortSpec {
                    protocol: Protocol::Sctp,
                    port: PortMatch::Named("http".into())
                },
                PortSpec {
                    protocol: Protocol::Udp,
                    port: PortMatch::Any
                },
            ]
        );
    }

    #[test]
    fn a_rejection_names_the_policy_and_the_offending_field() {
        for (spec, reason) in [
            (
                "{podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
                "spec.ingress[0].ports[0].port: 0 is outside 1-65535",
            ),
            (
                "{podSelector: {}, ingress: [{}, {ports: [{port: 80}, {port: 70000}]}]}",
                "spec.ingress[1].ports[1].port: 70000 is outside 1-65535",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: 80, endPort: 70000}]}]}",
                "spec.ingress[0].ports[0].endPort: 70000 is outside 1-65535",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort: 80 is below port 90",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort: needs a numeric port",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}",
                "spec.ingress[0].ports[0].endPort: cannot be used with a named port",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: a-very-long-port-name}]}]}",
                "spec.ingress[0].ports[0].port: \"a-very-long-port-name\" is not a valid port name",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{protocol: ICMP, port: 1}]}]}",
                "spec.ingress[0].ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
            ),
            (
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
                "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not a CIDR",
            ),
            (
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 11.0.0.0/16]}}]}]}",
                "spec.ingress[0].from[0].ipBlock.except[1]: 11.0.0.0/16 is not inside cidr 10.0.0.0/8",
            ),
            (
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "spec.ingress[0].from[0]: ipBlock cannot be combined with podSelector or namespaceSelector",
            ),
            (
                "{podSelector: {}, egress: [{to: [{podSelector: {}}, {}]}]}",
                "spec.egress[0].to[1]: a peer needs podSelector, namespaceSelector or ipBlock",
            ),
            (
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: Is}]}}]}]}",
                "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator: unknown operator \"Is\" (expected In, NotIn, Exists or DoesNotExist)",
            ),
            (
                "{podSelector: {}, ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]}]}",
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].values: operator In needs values",
            ),
            (
                "{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}",
                "spec.podSelector.matchExpressions[0].values: operator Exists takes no values",
            ),
            (
                "{podSelector: {}, policyTypes: [Ingress, Sideways]}",
                "spec.policyTypes[1]: unknown policy type \"Sideways\" (expected Ingress or Egress)",
            ),
        ] {
            let r = rejection(spec);
            assert_eq!(r.reason, reason, "{spec}");
            assert_eq!(
                (r.deny.namespace.as_str(), r.deny.name.as_str()),
                ("ns", "p")
            );
            assert_eq!(
                r.to_string(),
                format!("NetworkPolicy ns/p rejected: {reason}")
            );
        }
    }

    #[test]
    fn a_rejection_isolates_the_pods_it_selects_in_the_directions_it_declares() {
        let deny = |pod_selector: Selector, ingress: bool, egress: bool| PolicyInfo {
            namespace: "ns".into(),
            name: "p".into(),
            pod_selector,
            ingress: ingress.then(Vec::new),
            egress: egress.then(Vec::new),
        };
        let db = Selector {
            match_labels: [("app".to_string(), "db".to_string())].into(),
            requirements: vec![],
        };
        let bad_port = "ports: [{port: 70000}]";
        for (spec, expected) in [
            // Defaulted policy types: Ingress, plus Egress because there are egress rules.
            (
                format!("{{podSelector: {{matchLabels: {{app: db}}}}, egress: [{{{bad_port}}}]}}"),
                deny(db.clone(), true, true),
            ),
            (
                format!("{{podSelector: {{matchLabels: {{app: db}}}}, ingress: [{{{bad_port}}}]}}"),
                deny(db.clone(), true, false),
            ),
            (
                format!(
                    "{{podSelector: {{matchLabels: {{app: db}}}}, policyTypes: [Egress], egress: [{{{bad_port}}}]}}"
                ),
                deny(db.clone(), false, true),
            ),
            // Unusable policy types: both directions.
            (
                "{podSelector: {matchLabels: {app: db}}, policyTypes: [Ingres]}".to_string(),
                deny(db.clone(), true, true),
            ),
            // Unusable pod selector: every pod of the namespace.
            (
                "{podSelector: {matchExpressions: [{key: app, operator: Equals, values: [db]}]}, policyTypes: [Egress]}"
                    .to_string(),
                deny(Selector::default(), false, true),
            ),
        ] {
            let r = rejection(&spec);
            assert_eq!(*r.deny, expected, "{spec}");
            assert_eq!(r.whole_namespace, r.reason.starts_with("spec.podSelector"), "{spec}");
        }
    }

    #[test]
    fn invalid_rules_of_a_direction_the_policy_does_not_isolate_are_ignored() {
        let p = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress], ingress: [{{ports: [{{port: 70000}}]}}]}}"
        ))
        .unwrap();
        assert_eq!(p.ingress, None);
    }

    #[test]
    fn a_policy_without_name_or_namespace_is_not_a_rejection() {
        assert_eq!(
            parse("kind: NetworkPolicy\nmetadata: {namespace: ns}\nspec: {podSelector: {}}")
                .unwrap_err(),
            ObjectError::NoName {
                kind: "NetworkPolicy"
            }
        );
        assert!(matches!(
            parse("kind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}"),
            Err(ObjectError::NoNamespace { .. })
        ));
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let labels: Labels = [("app", "web"), ("tier", "front")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sel = |yaml: &str| Selector::from_k8s(&serde_yaml::from_str(yaml).unwrap()).unwrap();
        assert!(sel("{}").matches(&labels));
        assert!(sel("{matchLabels: {app: web}}").matches(&labels));
        assert!(!sel("{matchLabels: {app: db}}").matches(&labels));
        assert!(
            sel("{matchExpressions: [{key: app, operator: In, values: [web, db]}]}")
                .matches(&labels)
        );
        assert!(
            !sel("{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}")
                .matches(&labels)
        );
        assert!(
            sel("{matchExpressions: [{key: zone, operator: NotIn, values: [a]}]}").matches(&labels)
        );
        assert!(sel("{matchExpressions: [{key: tier, operator: Exists}]}").matches(&labels));
        assert!(!sel("{matchExpressions: [{key: tier, operator: DoesNotExist}]}").matches(&labels));
        assert!(
            !sel("{matchLabels: {app: web}, matchExpressions: [{key: zone, operator: Exists}]}")
                .matches(&labels)
        );
    }

    #[test]
    fn ipv6_blocks_match_nothing_and_except_is_honoured() {
        let p = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 'fd00::/8'}}}}, {{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}}}]}}]}}"
        ))
        .unwrap();
        let peers = p.ingress.unwrap()[0].peers.clone().unwrap();
        assert_eq!(peers.len(), 1);
        assert!(peers[0].block_contains("10.2.0.1".parse().unwrap()));
        assert!(!peers[0].block_contains("10.1.0.1".parse().unwrap()));
    }
}
