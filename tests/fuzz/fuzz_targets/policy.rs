//! NetworkPolicy validation (`PolicyInfo::from_k8s`). The first byte picks the input: even, the
//! rest is text decoded as the Kubernetes source does (JSON) and as the directory source does
//! (YAML); odd, the rest is a structured policy built with `arbitrary`, which reaches every
//! port, CIDR and selector case without having to guess the schema's spelling.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use libfuzzer_sys::fuzz_target;
use myelin_cluster::{IdentityLabels, PolicyInfo};
use myelin_fuzz::check_accepted_policy;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(np) = serde_json::from_slice::<NetworkPolicy>(rest) {
            let _ = validate(&np);
        }
        if let Ok(np) = std::str::from_utf8(rest)
            .map_err(|_| ())
            .and_then(|text| serde_yaml::from_str::<NetworkPolicy>(text).map_err(|_| ()))
        {
            let _ = validate(&np);
        }
    } else if let Ok(policy) = Policy::arbitrary_take_rest(Unstructured::new(rest)) {
        let np = policy.to_k8s();
        let result = validate(&np);
        // What the API server would send for the same object validates the same way.
        let json = serde_json::to_vec(&np).expect("policies encode");
        let decoded: NetworkPolicy = serde_json::from_slice(&json).expect("and decode");
        assert_eq!(PolicyInfo::from_k8s(&decoded), result);
        policy.check_ports(&result);
    }
});

fn validate(np: &NetworkPolicy) -> Result<PolicyInfo, myelin_cluster::ObjectError> {
    let result = PolicyInfo::from_k8s(np);
    if let Ok(policy) = &result {
        check_accepted_policy(policy);
        // Selection must not panic whatever the selectors hold.
        let pod = IdentityLabels {
            namespace: policy.namespace.clone(),
            pod_labels: BTreeMap::from([("app".into(), "web".into())]),
            namespace_labels: BTreeMap::new(),
        };
        let _ = policy.selects(&pod);
    }
    result
}

#[derive(Arbitrary, Debug)]
struct Policy {
    name: Option<String>,
    namespace: Option<String>,
    pod_selector: Option<Selector>,
    policy_types: Option<Vec<Choice<PolicyType>>>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

/// A likely value or an arbitrary string.
#[derive(Arbitrary, Debug)]
enum Choice<T> {
    Known(T),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PolicyType {
    Ingress,
    Egress,
}

/// Spelled as the API spells them.
#[allow(clippy::upper_case_acronyms)]
#[derive(Arbitrary, Debug)]
enum Protocol {
    TCP,
    UDP,
    SCTP,
}

#[derive(Arbitrary, Debug)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Arbitrary, Debug)]
struct Selector {
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<Requirement>>,
}

#[derive(Arbitrary, Debug)]
struct Requirement {
    key: String,
    operator: Choice<Operator>,
    values: Option<Vec<String>>,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    peers: Option<Vec<Peer>>,
    ports: Option<Vec<Port>>,
}

#[derive(Arbitrary, Debug)]
struct Peer {
    ip_block: Option<(Cidr, Option<Vec<Cidr>>)>,
    namespace_selector: Option<Selector>,
    pod_selector: Option<Selector>,
}

#[derive(Arbitrary, Debug)]
enum Cidr {
    V4([u8; 4], u8),
    V6(u128, u8),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Port {
    protocol: Option<Choice<Protocol>>,
    port: Option<PortValue>,
    end_port: Option<i32>,
}

#[derive(Arbitrary, Debug)]
enum PortValue {
    Int(i32),
    /// A number near the valid range, spelled as a string (the API server's conversion reads it
    /// as a number).
    NumericString(i32),
    Name(String),
}

fn text<T: std::fmt::Debug>(choice: &Choice<T>) -> String {
    match choice {
        Choice::Known(known) => format!("{known:?}"),
        Choice::Other(other) => other.clone(),
    }
}

impl Selector {
    fn to_k8s(&self) -> LabelSelector {
        LabelSelector {
            match_labels: self.match_labels.clone(),
            match_expressions: self.match_expressions.as_ref().map(|list| {
                list.iter()
                    .map(|r| LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: text(&r.operator),
                        values: r.values.clone(),
                    })
                    .collect()
            }),
        }
    }
}

impl Cidr {
    fn to_k8s(&self) -> String {
        match self {
            Cidr::V4(octets, prefix) => {
                format!("{}/{}", std::net::Ipv4Addr::from(*octets), prefix % 40)
            }
            Cidr::V6(bits, prefix) => {
                format!("{}/{}", std::net::Ipv6Addr::from(*bits), prefix % 140)
            }
            Cidr::Text(text) => text.clone(),
        }
    }
}

impl Port {
    fn to_k8s(&self) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: self.protocol.as_ref().map(text),
            port: self.port.as_ref().map(|p| match p {
                PortValue::Int(n) => IntOrString::Int(*n),
                PortValue::NumericString(n) => IntOrString::String(n.to_string()),
                PortValue::Name(name) => IntOrString::String(name.clone()),
            }),
            end_port: self.end_port,
        }
    }

    /// A number the API server would refuse; the policy holding it must be rejected.
    fn out_of_range(&self) -> bool {
        let bad = |n: i32| !(1..=65535).contains(&n);
        match &self.port {
            Some(PortValue::Int(n) | PortValue::NumericString(n)) => {
                bad(*n) || self.end_port.is_some_and(|e| bad(e) || e < *n)
            }
            _ => false,
        }
    }
}

impl Peer {
    fn to_k8s(&self) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            ip_block: self.ip_block.as_ref().map(|(cidr, except)| IPBlock {
                cidr: cidr.to_k8s(),
                except: except
                    .as_ref()
                    .map(|list| list.iter().map(Cidr::to_k8s).collect()),
            }),
            namespace_selector: self.namespace_selector.as_ref().map(Selector::to_k8s),
            pod_selector: self.pod_selector.as_ref().map(Selector::to_k8s),
        }
    }
}

impl Policy {
    fn to_k8s(&self) -> NetworkPolicy {
        let peers = |r: &Rule| {
            r.peers
                .as_ref()
                .map(|list| list.iter().map(Peer::to_k8s).collect())
        };
        let ports = |r: &Rule| {
            r.ports
                .as_ref()
                .map(|list| list.iter().map(Port::to_k8s).collect())
        };
        NetworkPolicy {
            metadata: ObjectMeta {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: self.pod_selector.as_ref().map(Selector::to_k8s),
                policy_types: self
                    .policy_types
                    .as_ref()
                    .map(|types| types.iter().map(text).collect()),
                ingress: self.ingress.as_ref().map(|rules| {
                    rules
                        .iter()
                        .map(|r| NetworkPolicyIngressRule {
                            from: peers(r),
                            ports: ports(r),
                        })
                        .collect()
                }),
                egress: self.egress.as_ref().map(|rules| {
                    rules
                        .iter()
                        .map(|r| NetworkPolicyEgressRule {
                            to: peers(r),
                            ports: ports(r),
                        })
                        .collect()
                }),
            }),
        }
    }

    /// An accepted policy was given no port outside 1-65535 and no range that ends below its
    /// start, in the directions it enforces (rules of the others are never read).
    fn check_ports(&self, result: &Result<PolicyInfo, myelin_cluster::ObjectError>) {
        let Ok(accepted) = result else {
            return;
        };
        let enforced = [
            (accepted.ingress.is_some(), &self.ingress),
            (accepted.egress.is_some(), &self.egress),
        ];
        let rules = enforced
            .into_iter()
            .filter_map(|(enforced, rules)| rules.as_ref().filter(|_| enforced))
            .flatten();
        for port in rules.flat_map(|r| r.ports.iter().flatten()) {
            assert!(!port.out_of_range(), "accepted {port:?}");
        }
    }
}
