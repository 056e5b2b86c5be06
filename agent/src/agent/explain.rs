//! `POST /v1/policy/explain`: NetworkPolicy's verdict on a flow, from the agent's index
//! (`myelin_cluster::explain`), for pods that exist, pods that do not (labels), and addresses.

use std::net::Ipv4Addr;

use myelin_api::{
    ApiError, ErrorKind, ExplainEnd, ExplainRequest, MAX_EXPLAIN_LABELS, PodRef, PolicyCheck,
    PolicyExplanation, PolicyName, PolicyRule,
};
use myelin_cluster::{
    ContainerPort, Labels, Protocol,
    explain::{self, Check, FlowEnd, direction_name},
};

use super::Agent;
use crate::datapath::DatapathOps;

/// Kubernetes' limits: a qualified name with a DNS subdomain prefix, a value of 63.
const MAX_LABEL_KEY: usize = 317;
const MAX_LABEL_VALUE: usize = 63;
const MAX_NAME: usize = 253;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, message)
}

/// An end as resolved: the policy view of it, the node it is on (pods) or is (nodes), and how
/// to name it in the answer.
struct Resolved {
    kind: Kind,
    described: String,
}

enum Kind {
    Pod {
        labels: myelin_cluster::IdentityLabels,
        addr: Option<Ipv4Addr>,
        ports: Vec<ContainerPort>,
        node: Option<String>,
    },
    Node {
        addr: Ipv4Addr,
        name: String,
    },
    World {
        addr: Ipv4Addr,
    },
}

impl Resolved {
    /// The policy view, `own` saying whether a node end is the node of the pod at `other`.
    fn end(&self, other: &Resolved) -> FlowEnd {
        match &self.kind {
            Kind::Pod {
                labels,
                addr,
                ports,
                ..
            } => FlowEnd::Pod {
                labels: labels.clone(),
                addr: *addr,
                ports: ports.clone(),
            },
            Kind::Node { addr, name } => FlowEnd::Node {
                addr: *addr,
                own: matches!(&other.kind, Kind::Pod { node: Some(n), .. } if n == name),
            },
            Kind::World { addr } => FlowEnd::World { addr: *addr },
        }
    }
}

fn bounded(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > max {
        return Err(invalid(format!(
            "{what} must be 1 to {max} characters, not {}",
            s.len()
        )));
    }
    Ok(())
}

impl<D: DatapathOps> Agent<D> {
    pub fn explain(&self, req: &ExplainRequest) -> Result<PolicyExplanation, ApiError> {
        let protocol = Protocol::parse(Some(req.protocol.to_ascii_uppercase().as_str()))
            .map_err(|e| invalid(format!("protocol: {e}")))?;
        if req.port == 0 {
            return Err(invalid("port must be 1 to 65535"));
        }
        let from = self.resolve("from", &req.from)?;
        let to = self.resolve("to", &req.to)?;
        let answer = explain::explain(
            &self.index,
            &from.end(&to),
            &to.end(&from),
            protocol,
            req.port,
        );
        Ok(PolicyExplanation {
            from: from.described,
            to: to.described,
            protocol: protocol.as_str().to_string(),
            port: req.port,
            allowed: answer.allowed,
            egress: to_api(answer.egress),
            ingress: to_api(answer.ingress),
        })
    }

    fn resolve(&self, side: &str, end: &ExplainEnd) -> Result<Resolved, ApiError> {
        let given = [
            end.pod.is_some(),
            end.labels.is_some() || end.namespace.is_some(),
            end.ip.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(format!(
                "{side}: give exactly one of a pod, a namespace with labels, or an address"
            )));
        }
        if let Some(pod) = &end.pod {
            return self.resolve_pod(side, pod);
        }
        if let Some(ip) = end.ip {
            return Ok(self.resolve_addr(ip));
        }
        let namespace = end.namespace.as_deref().unwrap_or_default();
        bounded(&format!("{side}: the namespace"), namespace, 63)?;
        let labels: Labels = end.labels.clone().unwrap_or_default();
        if labels.len() > MAX_EXPLAIN_LABELS {
            return Err(invalid(format!(
                "{side}: at most {MAX_EXPLAIN_LABELS} labels, not {}",
                labels.len()
            )));
        }
        for (k, v) in &labels {
            bounded(&format!("{side}: a label key"), k, MAX_LABEL_KEY)?;
            if v.len() > MAX_LABEL_VALUE {
                return Err(invalid(format!(
                    "{side}: the value of label {k} is longer than {MAX_LABEL_VALUE} characters"
                )));
            }
        }
        Ok(Resolved {
            described: format!("pod in {namespace} {{{}}}", join_labels(&labels)),
            kind: Kind::Pod {
                labels: self.index.identity_labels(namespace, &labels),
                addr: None,
                ports: Vec::new(),
                node: None,
            },
        })
    }

    fn resolve_pod(&self, side: &str, pod: &PodRef) -> Result<Resolved, ApiError> {
        bounded(&format!("{side}: the namespace"), &pod.namespace, 63)?;
        bounded(&format!("{side}: the pod name"), &pod.name, MAX_NAME)?;
        let local = self
            .endpoints
            .iter()
            .find(|r| r.pod.as_ref() == Some(pod))
            .map(|r| r.ip);
        let info = self.index.pod(&pod.namespace, &pod.name);
        if let Some(info) = info
            && info.host_network
        {
            // A host-network pod is its node, as far as policy is concerned.
            let Some(ip) = info.ip else {
                return Err(invalid(format!(
                    "{side}: {}/{} is a host-network pod without an address yet",
                    pod.namespace, pod.name
                )));
            };
            return Ok(self.resolve_addr(ip));
        }
        let addr = local.or(info.and_then(|i| i.ip));
        if info.is_none() && local.is_none() {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "{side}: no pod {}/{} is known to this agent (use labels for a pod that does \
                     not exist)",
                    pod.namespace, pod.name
                ),
            ));
        }
        Ok(Resolved {
            described: match addr {
                Some(a) => format!("pod {}/{} ({a})", pod.namespace, pod.name),
                None => format!("pod {}/{} (no address yet)", pod.namespace, pod.name),
            },
            kind: Kind::Pod {
                labels: self
                    .index
                    .identity_labels_of_pod(&pod.namespace, &pod.name)
                    .as_ref()
                    .clone(),
                addr,
                ports: info.map(|i| i.ports.clone()).unwrap_or_default(),
                node: addr.and_then(|a| self.node_of_pod_addr(a)),
            },
        })
    }

    fn resolve_addr(&self, ip: Ipv4Addr) -> Resolved {
        let own_addrs = [
            Some(self.ipam.gateway()),
            self.routing.as_ref().map(|r| r.node_ip),
        ];
        if own_addrs.contains(&Some(ip)) {
            return Resolved {
                described: format!("node {} ({ip})", self.node_name),
                kind: Kind::Node {
                    addr: ip,
                    name: self.node_name.clone(),
                },
            };
        }
        if let Some(node) = self.index.nodes().find(|n| n.addresses.contains(&ip)) {
            return Resolved {
                described: format!("node {} ({ip})", node.name),
                kind: Kind::Node {
                    addr: ip,
                    name: node.name.clone(),
                },
            };
        }
        let local = self.endpoints.iter().find(|r| r.ip == ip);
        if let Some(r) = local {
            let name = r.pod.as_ref().map_or_else(
                || "(no pod)".into(),
                |p| format!("{}/{}", p.namespace, p.name),
            );
            let info = r
                .pod
                .as_ref()
                .and_then(|p| self.index.pod(&p.namespace, &p.name));
            return Resolved {
                described: format!("pod {name} ({ip})"),
                kind: Kind::Pod {
                    labels: self.pod_identity_labels(r).as_ref().clone(),
                    addr: Some(ip),
                    ports: info.map(|i| i.ports.clone()).unwrap_or_default(),
                    node: Some(self.node_name.clone()),
                },
            };
        }
        if let Some(p) = self
            .index
            .pods()
            .find(|p| !p.host_network && p.ip == Some(ip))
        {
            return Resolved {
                described: format!("pod {}/{} ({ip})", p.namespace, p.name),
                kind: Kind::Pod {
                    labels: self
                        .index
                        .identity_labels_of_pod(&p.namespace, &p.name)
                        .as_ref()
                        .clone(),
                    addr: Some(ip),
                    ports: p.ports.clone(),
                    node: self.node_of_pod_addr(ip),
                },
            };
        }
        Resolved {
            described: format!("world {ip}"),
            kind: Kind::World { addr: ip },
        }
    }

    /// The node whose pod CIDR holds `addr`: this one, or another from its Node object.
    fn node_of_pod_addr(&self, addr: Ipv4Addr) -> Option<String> {
        if self.ipam.cidr().contains(&addr) {
            return Some(self.node_name.clone());
        }
        self.index
            .nodes()
            .find(|n| n.pod_cidr.is_some_and(|c| c.contains(&addr)))
            .map(|n| n.name.clone())
    }
}

fn join_labels(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The API's form of a check.
pub fn to_api(check: Check) -> PolicyCheck {
    match check {
        Check::NotAPod => PolicyCheck::NotAPod,
        Check::NotIsolated => PolicyCheck::NotIsolated,
        Check::OwnNode => PolicyCheck::OwnNode,
        Check::Allowed { rules } => PolicyCheck::Allowed {
            rules: rules
                .into_iter()
                .map(|r| PolicyRule {
                    namespace: r.namespace,
                    name: r.name,
                    direction: direction_name(r.direction).to_string(),
                    rule: r.index,
                })
                .collect(),
        },
        Check::Denied { isolated_by } => PolicyCheck::Denied {
            isolated_by: isolated_by
                .into_iter()
                .map(|p| PolicyName {
                    namespace: p.namespace,
                    name: p.name,
                })
                .collect(),
        },
    }
}
