//! Service (v1) and EndpointSlice (discovery.k8s.io/v1) in the slim, validated form the agent
//! translates Services with (`--kube-proxy-replacement`). Only what kube-proxy itself reads is
//! kept: a Service's addresses, ports, type, affinity and traffic policies; a slice's IPv4
//! endpoints, their conditions and nodes, and its ports.
//!
//! An object the API server would refuse (an address that is not one, a port outside 1-65535,
//! an unknown type, protocol or policy, two ports with the same number and protocol or the same
//! name) is rejected as a whole with the field at fault: the index keeps its last good version.
//! Fields the API server leaves to consumers are read as kube-proxy reads them: an endpoint
//! without a `ready` condition is ready, only an endpoint's first address counts, a slice port
//! without a number is ignored.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    objects::{ObjectError, namespaced_name},
    policy::Protocol,
};

/// The label the EndpointSlice controller puts on a slice: the name of its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent, as the API server defaults it.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest affinity timeout the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The most ports one Service or one EndpointSlice may have. The API server caps a slice's
/// ports at 100; a Service with more is refused too, so that one object bounds what it adds.
pub const MAX_PORTS: usize = 100;
/// The most endpoints of one EndpointSlice (the API server's own cap).
pub const MAX_SLICE_ENDPOINTS: usize = 1_000;

/// `spec.type`. LoadBalancer is translated as its ClusterIP and NodePort parts; ExternalName
/// is a DNS name, never translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }

    /// Whether the Service has node ports (and `externalTrafficPolicy` applies to it).
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

/// `internalTrafficPolicy` or `externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrafficPolicy {
    /// Every ready endpoint of the cluster.
    #[default]
    Cluster,
    /// Only the endpoints on the node the traffic arrived at.
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }

    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
            Some("Local") => Ok(TrafficPolicy::Local),
            Some(other) => Err(format!("{other:?} is not Cluster or Local")),
        }
    }
}

/// One entry of a Service's `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty for a Service's only, unnamed port. EndpointSlice ports carry the same name.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// NodePort and LoadBalancer Services (absent when the cluster allocates none).
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub type_: ServiceType,
    /// `clusterIP: None`: DNS only, never translated.
    pub headless: bool,
    /// `spec.clusterIPs` (or `spec.clusterIP`), IPv4 only; IPv6 families are not translated.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`, IPv4 only.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`, IPv4 only, as kube-proxy takes them: the addresses
    /// a load balancer sends to the nodes unchanged (`ipMode: Proxy` ones are left out: that
    /// load balancer proxies to the node ports itself).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds; `None` without affinity.
    pub affinity_timeout_s: Option<u32>,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort`: the port on every node where a load balancer asks whether
    /// the node has a local endpoint (LoadBalancer Services with `externalTrafficPolicy:
    /// Local`; the API server allocates it). Served by the agent as kube-proxy serves it.
    pub health_check_node_port: Option<u16>,
}

/// How a Service or a slice is wrong: the field and the problem.
fn invalid(
    kind: &'static str,
    namespace: &str,
    name: &str,
    field: String,
    problem: String,
) -> ObjectError {
    ObjectError::Invalid {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        field,
        problem,
    }
}

/// An IP address field: `Some` for IPv4, `None` for IPv6 (not translated), an error otherwise.
fn ip_field(value: &str) -> Result<Option<Ipv4Addr>, String> {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(format!("{value:?} is not an IP address")),
    }
}

fn port_number(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{value} is outside 1-65535"))
}

impl ServiceInfo {
    pub fn from_k8s(service: &Service) -> Result<Self, ObjectError> {
        let (namespace, name) = namespaced_name("Service", &service.metadata)?;
        let bad = |field: &str, problem: String| {
            invalid("Service", &namespace, &name, field.to_string(), problem)
        };
        let default_spec = Default::default();
        let spec = service.spec.as_ref().unwrap_or(&default_spec);
        let type_ = match spec.type_.as_deref() {
            None | Some("ClusterIP") => ServiceType::ClusterIp,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => {
                return Err(bad(
                    "spec.type",
                    format!("{other:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
                ));
            }
        };
        // clusterIPs[0] is clusterIP when both are set; the directory source may give either.
        let (field, addresses) = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
            (_, Some(ip)) if !ip.is_empty() => ("spec.clusterIP", vec![ip.clone()]),
            _ => ("spec.clusterIP", Vec::new()),
        };
        let headless = addresses.first().is_some_and(|ip| ip == "None");
        let mut cluster_ips = Vec::new();
        if !headless {
            for (i, ip) in addresses.iter().enumerate() {
                let at = if field == "spec.clusterIPs" {
                    format!("{field}[{i}]")
                } else {
                    field.to_string()
                };
                cluster_ips.extend(ip_field(ip).map_err(|p| bad(&at, p))?);
            }
        }
        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            external_ips
                .extend(ip_field(ip).map_err(|p| bad(&format!("spec.externalIPs[{i}]"), p))?);
        }
        let mut load_balancer_ips = Vec::new();
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, entry) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue;
            };
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            load_balancer_ips.extend(
                ip_field(ip)
                    .map_err(|p| bad(&format!("status.loadBalancer.ingress[{i}].ip"), p))?,
            );
        }
        let given_ports = spec.ports.as_deref().unwrap_or_default();
        if given_ports.len() > MAX_PORTS {
            return Err(bad(
                "spec.ports",
                format!("{} ports, more than {MAX_PORTS}", given_ports.len()),
            ));
        }
        let mut ports: Vec<ServicePort> = Vec::with_capacity(given_ports.len());
        for (i, p) in given_ports.iter().enumerate() {
            let at = |field: &str| format!("spec.ports[{i}].{field}");
            let port = ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::parse(p.protocol.as_deref())
                    .map_err(|e| bad(&at("protocol"), e))?,
                port: port_number(p.port).map_err(|e| bad(&at("port"), e))?,
                node_port: match p.node_port {
                    None | Some(0) => None,
                    Some(n) => Some(port_number(n).map_err(|e| bad(&at("nodePort"), e))?),
                },
            };
            if let Some(j) = ports
                .iter()
                .position(|q| q.port == port.port && q.protocol == port.protocol)
            {
                return Err(bad(
                    &at("port"),
                    format!(
                        "{}/{} is spec.ports[{j}] already",
                        port.port,
                        port.protocol.as_str()
                    ),
                ));
            }
            if let Some(j) = ports.iter().position(|q| q.name == port.name) {
                // Backends are found by port name: two ports of one name would share them.
                return Err(bad(
                    &at("name"),
                    format!("{:?} is the name of spec.ports[{j}] already", port.name),
                ));
            }
            ports.push(port);
        }
        let affinity_timeout_s = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                Some(match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT_S,
                    Some(t) => u32::try_from(t)
                        .ok()
                        .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                        .ok_or_else(|| {
                            bad(
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT_S}"),
                            )
                        })?,
                })
            }
            Some(other) => {
                return Err(bad(
                    "spec.sessionAffinity",
                    format!("{other:?} is not None or ClientIP"),
                ));
            }
        };
        let internal_traffic_policy = TrafficPolicy::parse(spec.internal_traffic_policy.as_deref())
            .map_err(|p| bad("spec.internalTrafficPolicy", p))?;
        let external_traffic_policy = TrafficPolicy::parse(spec.external_traffic_policy.as_deref())
            .map_err(|p| bad("spec.externalTrafficPolicy", p))?;
        let health_check_node_port = match spec.health_check_node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(n).map_err(|e| bad("spec.healthCheckNodePort", e))?),
        };
        Ok(Self {
            namespace,
            name,
            type_,
            headless,
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            affinity_timeout_s,
            internal_traffic_policy,
            external_traffic_policy,
            health_check_node_port,
        })
    }
}

/// `addressType`: only IPv4 slices are translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    Ipv4,
    /// IPv6 or FQDN: kept so that the slice is known, its endpoints are not.
    Other,
}

/// An endpoint's conditions, as kube-proxy reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    /// Absent means ready (the API: "consumers should interpret this unknown state as ready").
    pub ready: bool,
    /// Ready, whether or not terminating; absent means serving.
    pub serving: bool,
    pub terminating: bool,
}

/// One endpoint of a slice: its first address (the only one the API gives a meaning to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub address: Ipv4Addr,
    pub conditions: Conditions,
    pub node_name: Option<String>,
}

/// A port of a slice: the backend port of the Service port with the same name and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label: the Service in the same namespace it serves.
    pub service: Option<String>,
    pub address_type: AddressType,
    /// Empty unless `address_type` is IPv4.
    pub endpoints: Vec<SliceEndpoint>,
    /// Ports with a number (a port without one serves no Service port).
    pub ports: Vec<SlicePort>,
}

impl EndpointSliceInfo {
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Self, ObjectError> {
        let (namespace, name) = namespaced_name("EndpointSlice", &slice.metadata)?;
        let bad = |field: String, problem: String| {
            invalid("EndpointSlice", &namespace, &name, field, problem)
        };
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::Ipv4,
            "IPv6" | "FQDN" => AddressType::Other,
            other => {
                return Err(bad(
                    "addressType".into(),
                    format!("{other:?} is not IPv4, IPv6 or FQDN"),
                ));
            }
        };
        if slice.endpoints.len() > MAX_SLICE_ENDPOINTS {
            return Err(bad(
                "endpoints".into(),
                format!(
                    "{} endpoints, more than {MAX_SLICE_ENDPOINTS}",
                    slice.endpoints.len()
                ),
            ));
        }
        let mut endpoints = Vec::new();
        if address_type == AddressType::Ipv4 {
            for (i, e) in slice.endpoints.iter().enumerate() {
                let Some(first) = e.addresses.first() else {
                    return Err(bad(format!("endpoints[{i}].addresses"), "is empty".into()));
                };
                let address = first.parse::<Ipv4Addr>().map_err(|_| {
                    bad(
                        format!("endpoints[{i}].addresses[0]"),
                        format!("{first:?} is not an IPv4 address"),
                    )
                })?;
                let c = e.conditions.as_ref();
                endpoints.push(SliceEndpoint {
                    address,
                    conditions: Conditions {
                        ready: c.and_then(|c| c.ready).unwrap_or(true),
                        serving: c.and_then(|c| c.serving).unwrap_or(true),
                        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    },
                    node_name: e.node_name.clone(),
                });
            }
        }
        let given_ports = slice.ports.as_deref().unwrap_or_default();
        if given_ports.len() > MAX_PORTS {
            return Err(bad(
                "ports".into(),
                format!("{} ports, more than {MAX_PORTS}", given_ports.len()),
            ));
        }
        let mut ports = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, p) in given_ports.iter().enumerate() {
            let protocol = Protocol::parse(p.protocol.as_deref())
                .map_err(|e| bad(format!("ports[{i}].protocol"), e))?;
            let Some(number) = p.port.filter(|n| *n != 0) else {
                continue;
            };
            let port = port_number(number).map_err(|e| bad(format!("ports[{i}].port"), e))?;
            let port_name = p.name.clone().unwrap_or_default();
            if !seen.insert((port_name.clone(), protocol)) {
                return Err(bad(
                    format!("ports[{i}].name"),
                    format!("{port_name:?}/{} is listed twice", protocol.as_str()),
                ));
            }
            ports.push(SlicePort {
                name: port_name,
                protocol,
                port,
            });
        }
        Ok(Self {
            namespace,
            name,
            service,
            address_type,
            endpoints,
            ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::{endpoint_slice, service};

    fn rejection(result: Result<impl std::fmt::Debug, ObjectError>) -> String {
        result.expect_err("rejected").to_string()
    }

    #[test]
    fn a_service_keeps_what_translation_needs_with_the_api_defaults() {
        let s = ServiceInfo::from_k8s(&service(
            "default",
            "web",
            "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}",
        ))
        .unwrap();
        assert_eq!(s.type_, ServiceType::ClusterIp);
        assert_eq!(s.cluster_ips, [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            s.ports,
            [ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None
            }]
        );
        assert!(!s.headless);
        assert_eq!(s.affinity_timeout_s, None);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
    }

    #[test]
    fn client_ip_affinity_defaults_to_three_hours() {
        let s = |spec: &str| ServiceInfo::from_k8s(&service("default", "web", spec));
        let default = s("spec: {clusterIP: 10.96.0.10, sessionAffinity: ClientIP}").unwrap();
        assert_eq!(default.affinity_timeout_s, Some(10_800));
        let set = s("spec: {clusterIP: 10.96.0.10, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}}").unwrap();
        assert_eq!(set.affinity_timeout_s, Some(60));
        assert!(
            rejection(s("spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}}"))
                .contains("spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is outside 1-86400")
        );
    }

    #[test]
    fn headless_and_ipv6_addresses_are_kept_out_and_dual_stack_keeps_its_ipv4() {
        let s = |spec: &str| ServiceInfo::from_k8s(&service("default", "web", spec)).unwrap();
        let headless = s("spec: {clusterIP: None, clusterIPs: [None]}");
        assert!(headless.headless);
        assert!(headless.cluster_ips.is_empty());
        let dual = s(
            "spec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.10], externalIPs: ['2001:db8::1', 192.0.2.7]}",
        );
        assert_eq!(dual.cluster_ips, [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(dual.external_ips, [Ipv4Addr::new(192, 0, 2, 7)]);
    }

    #[test]
    fn load_balancer_ingress_addresses_are_kept_unless_the_load_balancer_proxies() {
        let s = ServiceInfo::from_k8s(&service(
            "default",
            "web",
            "spec: {type: LoadBalancer, clusterIP: 10.96.0.10}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.7}, {ip: 203.0.113.8, ipMode: Proxy}, {hostname: lb.example}, {ip: '2001:db8::7'}, {ip: 203.0.113.9, ipMode: VIP}]}}",
        ))
        .unwrap();
        assert_eq!(
            s.load_balancer_ips,
            [Ipv4Addr::new(203, 0, 113, 7), Ipv4Addr::new(203, 0, 113, 9)]
        );
        assert!(
            rejection(ServiceInfo::from_k8s(&service(
                "default",
                "web",
                "spec: {type: LoadBalancer}\nstatus: {loadBalancer: {ingress: [{ip: nope}]}}",
            )))
            .contains("status.loadBalancer.ingress[0].ip: \"nope\" is not an IP address")
        );
    }

    #[test]
    fn the_health_check_node_port_is_kept_and_checked() {
        let s = |spec: &str| ServiceInfo::from_k8s(&service("default", "web", spec));
        let local = s(
            "spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32100}",
        )
        .unwrap();
        assert_eq!(local.health_check_node_port, Some(32100));
        assert_eq!(
            s("spec: {type: LoadBalancer}")
                .unwrap()
                .health_check_node_port,
            None
        );
        assert!(
            rejection(s("spec: {type: LoadBalancer, healthCheckNodePort: 70000}"))
                .contains("spec.healthCheckNodePort: 70000 is outside 1-65535")
        );
    }

    #[test]
    fn a_malformed_service_is_rejected_naming_object_and_field() {
        for (spec, expected) in [
            (
                "{clusterIP: 10.96.0.300}",
                "Service default/web: spec.clusterIP: \"10.96.0.300\" is not an IP address",
            ),
            (
                "{clusterIPs: [10.96.0.1, nope]}",
                "spec.clusterIPs[1]: \"nope\" is not an IP address",
            ),
            ("{externalIPs: [x]}", "spec.externalIPs[0]"),
            ("{type: Ingress}", "spec.type: \"Ingress\" is not ClusterIP"),
            (
                "{ports: [{port: 0}]}",
                "spec.ports[0].port: 0 is outside 1-65535",
            ),
            (
                "{ports: [{port: 80, protocol: ICMP}]}",
                "spec.ports[0].protocol: unknown protocol",
            ),
            (
                "{type: NodePort, ports: [{port: 80, nodePort: 70000}]}",
                "spec.ports[0].nodePort: 70000",
            ),
            (
                "{ports: [{name: a, port: 80}, {name: b, port: 80}]}",
                "spec.ports[1].port: 80/TCP is spec.ports[0] already",
            ),
            (
                "{ports: [{name: a, port: 80}, {name: a, port: 81}]}",
                "spec.ports[1].name: \"a\" is the name of spec.ports[0] already",
            ),
            (
                "{sessionAffinity: Cookie}",
                "spec.sessionAffinity: \"Cookie\"",
            ),
            (
                "{internalTrafficPolicy: Nearby}",
                "spec.internalTrafficPolicy: \"Nearby\" is not Cluster or Local",
            ),
            (
                "{externalTrafficPolicy: local}",
                "spec.externalTrafficPolicy",
            ),
        ] {
            let message = rejection(ServiceInfo::from_k8s(&service(
                "default",
                "web",
                &format!("spec: {spec}"),
            )));
            assert!(message.contains(expected), "{spec}: {message}");
            assert!(message.starts_with("Service default/web"), "{message}");
        }
        let too_many: Vec<String> = (1..=101)
            .map(|p| format!("{{name: p{p}, port: {p}}}"))
            .collect();
        let message = rejection(ServiceInfo::from_k8s(&service(
            "default",
            "web",
            &format!("spec: {{ports: [{}]}}", too_many.join(", ")),
        )));
        assert!(message.contains("101 ports, more than 100"), "{message}");
        // TCP and UDP on one port are two ports.
        let dns = ServiceInfo::from_k8s(&service(
            "kube-system",
            "dns",
            "spec: {ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}",
        ))
        .unwrap();
        assert_eq!(dns.ports.len(), 2);
    }

    #[test]
    fn slice_conditions_default_as_kube_proxy_reads_them() {
        let slice = EndpointSliceInfo::from_k8s(&endpoint_slice(
            "default",
            "web-abc",
            Some("web"),
            r#"
addressType: IPv4
endpoints:
- addresses: [10.244.1.2]
  nodeName: node-1
- addresses: [10.244.1.3, 10.244.1.99]
  conditions: {ready: false, serving: true, terminating: true}
ports: [{name: http, port: 8080}, {name: none}]
"#,
        ))
        .unwrap();
        assert_eq!(slice.service.as_deref(), Some("web"));
        let [unknown, terminating] = &slice.endpoints[..] else {
            panic!("{slice:?}")
        };
        assert_eq!(
            unknown.conditions,
            Conditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(unknown.node_name.as_deref(), Some("node-1"));
        assert_eq!(
            terminating.address,
            Ipv4Addr::new(10, 244, 1, 3),
            "the first address only"
        );
        assert_eq!(
            terminating.conditions,
            Conditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        assert_eq!(
            slice.ports,
            [SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080
            }],
            "a port without a number serves nothing"
        );
    }

    #[test]
    fn ipv6_slices_are_known_without_endpoints() {
        let slice = EndpointSliceInfo::from_k8s(&endpoint_slice(
            "default",
            "web-v6",
            Some("web"),
            "addressType: IPv6\nendpoints: [{addresses: ['fd00::5']}]\nports: [{name: http, port: 8080}]",
        ))
        .unwrap();
        assert_eq!(slice.address_type, AddressType::Other);
        assert!(slice.endpoints.is_empty());
    }

    #[test]
    fn a_malformed_slice_is_rejected_naming_object_and_field() {
        for (body, expected) in [
            ("addressType: IPv5\nendpoints: []", "addressType: \"IPv5\""),
            (
                "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: ['fd00::1']}]",
                "endpoints[1].addresses[0]: \"fd00::1\" is not an IPv4 address",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: []}]",
                "endpoints[0].addresses: is empty",
            ),
            (
                "addressType: IPv4\nendpoints: []\nports: [{port: 65536}]",
                "ports[0].port: 65536 is outside 1-65535",
            ),
            (
                "addressType: IPv4\nendpoints: []\nports: [{port: 80, protocol: GRE}]",
                "ports[0].protocol",
            ),
            (
                "addressType: IPv4\nendpoints: []\nports: [{name: a, port: 80}, {name: a, port: 81}]",
                "ports[1].name",
            ),
        ] {
            let message = rejection(EndpointSliceInfo::from_k8s(&endpoint_slice(
                "default",
                "web-abc",
                Some("web"),
                body,
            )));
            assert!(
                message.starts_with("EndpointSlice default/web-abc: "),
                "{message}"
            );
            assert!(message.contains(expected), "{body}: {message}");
        }
        let many: Vec<String> = (0..1001)
            .map(|i| format!("{{addresses: [10.0.{}.{}]}}", i / 250, i % 250))
            .collect();
        let message = rejection(EndpointSliceInfo::from_k8s(&endpoint_slice(
            "default",
            "big",
            Some("web"),
            &format!("addressType: IPv4\nendpoints: [{}]", many.join(", ")),
        )));
        assert!(
            message.contains("1001 endpoints, more than 1000"),
            "{message}"
        );
    }
}
