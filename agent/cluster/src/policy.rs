//! NetworkPolicy (networking.k8s.io/v1) in the slim, validated form the agent computes with.
//!
//! Validation happens on the way into the index: a policy with an invalid CIDR, a port outside
//! 1-65535, an endPort below its port, an unknown protocol or an invalid selector is rejected
//! as a whole (logged with its name and the reason) and never enforced; the other policies
//! stay enforced.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use myelin_common::proto::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::objects::Labels;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("NetworkPolicy {namespace}/{name} rejected: {reason}")]
pub struct PolicyError {
    pub namespace: String,
    pub name: String,
    pub reason: String,
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

    fn from_k8s(s: &LabelSelector) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for e in s.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            let needs_values = |op: &str| {
                if values.is_empty() {
                    Err(format!(
                        "selector operator {op} on {:?} needs values",
                        e.key
                    ))
                } else {
                    Ok(())
                }
            };
            let no_values = |op: &str| {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "selector operator {op} on {:?} takes no values",
                        e.key
                    ))
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
                op => return Err(format!("unknown selector operator {op:?}")),
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

    pub fn from_k8s(np: &NetworkPolicy) -> Result<Self, PolicyError> {
        let name = np.metadata.name.clone().unwrap_or_default();
        let namespace = np.metadata.namespace.clone().unwrap_or_default();
        let reject = |reason: String| PolicyError {
            namespace: namespace.clone(),
            name: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(reject("metadata.name is missing".into()));
        }
        if namespace.is_empty() {
            return Err(reject("metadata.namespace is missing".into()));
        }
        let spec = np.spec.clone().unwrap_or_default();
        Self::from_spec(namespace.clone(), name.clone(), &spec).map_err(reject)
    }

    fn from_spec(
        namespace: String,
        name: String,
        spec: &NetworkPolicySpec,
    ) -> Result<Self, String> {
        // An absent podSelector selects every pod of the namespace, like an empty one.
        let pod_selector = spec
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()
            .map_err(|e| format!("spec.podSelector: {e}"))?
            .unwrap_or_default();
        let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
        let egress_rules = spec.egress.as_deref().unwrap_or_default();
        // Without policyTypes (absent or empty): Ingress always, Egress when there are egress
        // rules (the API server's defaulting).
        let (isolates_ingress, isolates_egress) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for t in types {
                    if t != "Ingress" && t != "Egress" {
                        return Err(format!("unknown policyType {t:?}"));
                    }
                }
                (
                    types.iter().any(|t| t == "Ingress"),
                    types.iter().any(|t| t == "Egress"),
                )
            }
            _ => (true, !egress_rules.is_empty()),
        };
        let ingress = ingress_rules
            .iter()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()));
        let egress = egress_rules
            .iter()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()));
        Ok(Self {
            namespace,
            name,
            pod_selector,
            ingress: isolates_ingress
                .then(|| Rule::parse_all(ingress, "ingress"))
                .transpose()?,
            egress: isolates_egress
                .then(|| Rule::parse_all(egress, "egress"))
                .transpose()?,
        })
    }
}

impl Rule {
    /// Parses the rules of one direction (`what` names it in errors).
    fn parse_all<'a>(
        raw: impl Iterator<
            Item = (
                Option<&'a Vec<NetworkPolicyPeer>>,
                Option<&'a Vec<NetworkPolicyPort>>,
            ),
        >,
        what: &str,
    ) -> Result<Vec<Rule>, String> {
        raw.enumerate()
            .map(|(i, (peers, ports))| {
                Rule::parse(peers, ports).map_err(|e| format!("spec.{what}[{i}]: {e}"))
            })
            .collect()
    }

    fn parse(
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
    ) -> Result<Self, String> {
        let peers = match peers {
            Some(list) if !list.is_empty() => Some(
                list.iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        Peer::parse(p)
                            .map_err(|e| format!("peer {i}: {e}"))
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
                    .map(|(i, p)| PortSpec::parse(p).map_err(|e| format!("port {i}: {e}")))
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
    fn parse(p: &NetworkPolicyPeer) -> Result<Option<Self>, String> {
        if let Some(block) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(
                    "ipBlock cannot be combined with podSelector or namespaceSelector".into(),
                );
            }
            let cidr: IpNet = block
                .cidr
                .parse()
                .map_err(|_| format!("ipBlock.cidr {:?} is not a CIDR", block.cidr))?;
            let mut except = Vec::new();
            for e in block.except.iter().flatten() {
                let net: IpNet = e
                    .parse()
                    .map_err(|_| format!("ipBlock.except {e:?} is not a CIDR"))?;
                if !cidr.contains(&net) {
                    return Err(format!("ipBlock.except {e} is not inside cidr {cidr}"));
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
            return Err("a peer needs podSelector, namespaceSelector or ipBlock".into());
        }
        let namespaces = p
            .namespace_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()
            .map_err(|e| format!("namespaceSelector: {e}"))?;
        let pods = p
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()
            .map_err(|e| format!("podSelector: {e}"))?;
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
    fn parse(p: &NetworkPolicyPort) -> Result<Self, String> {
        let protocol = Protocol::parse(p.protocol.as_deref())?;
        let valid = |n: i32, what: &str| -> Result<u16, String> {
            u16::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} {n} is outside 1-65535"))
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortMatch::Any,
            (None, Some(_)) => return Err("endPort needs a numeric port".into()),
            (Some(IntOrString::Int(n)), end) => {
                let from = valid(*n, "port")?;
                let to = match end {
                    Some(e) => valid(e, "endPort")?,
                    None => from,
                };
                if to < from {
                    return Err(format!("endPort {to} is below port {from}"));
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
                Err(_) => return Err(format!("port name {s:?} is not a valid port name")),
            },
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err("endPort cannot be used with a named port".into());
            }
        };
        Ok(Self { protocol, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::policy;

    fn parse(yaml: &str) -> Result<PolicyInfo, PolicyError> {
        PolicyInfo::from_k8s(&policy(yaml))
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
    fn invalid_policies_are_rejected_with_their_name_and_reason() {
        for (spec, needle) in [
            ("ingress: [{ports: [{port: 0}]}]", "outside 1-65535"),
            ("ingress: [{ports: [{port: 70000}]}]", "outside 1-65535"),
            (
                "ingress: [{ports: [{port: 90, endPort: 80}]}]",
                "below port",
            ),
            (
                "ingress: [{ports: [{protocol: ICMP, port: 1}]}]",
                "unknown protocol",
            ),
            (
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
                "not a CIDR",
            ),
            (
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
                "not inside",
            ),
            (
                "ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: Is}]}}]}]",
                "operator",
            ),
            (
                "ingress: [{ports: [{port: http, endPort: 90}]}]",
                "named port",
            ),
        ] {
            let err = parse(&format!("{HEAD}spec: {{podSelector: {{}}, {spec}}}")).unwrap_err();
            assert_eq!((err.namespace.as_str(), err.name.as_str()), ("ns", "p"));
            assert!(err.reason.contains(needle), "{spec}: {err}");
            assert!(err.to_string().contains("ns/p"));
        }
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
