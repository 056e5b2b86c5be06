//! Service translation, checked on the computed `lb_services` slots the way the datapath reads
//! them: slot 0 of the frontend, then slots 1..=count.

use std::net::Ipv4Addr;

use myelin_cluster::{
    Change, ClusterIndex, EndpointSliceInfo, NodeInfo, Object, ServiceInfo, builders,
};
use myelin_common::{
    lb::{LB_F_EXTERNAL_IP, LB_F_LOAD_BALANCER, LB_F_LOCAL, LB_F_NODEPORT, LbKey},
    proto::{IPPROTO_TCP as TCP, IPPROTO_UDP as UDP},
};

use super::*;

/// This node, `node-1` (InternalIP 192.168.1.10), and `node-2`.
struct Cluster {
    index: ClusterIndex,
}

/// What the datapath finds for a frontend: its flags, affinity and backends.
#[derive(Debug, PartialEq, Eq)]
struct Lookup {
    flags: u32,
    affinity_timeout_s: u32,
    backends: Vec<(Ipv4Addr, u16)>,
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

impl Cluster {
    fn new() -> Self {
        let mut index = ClusterIndex::default();
        for (name, address) in [("node-1", "192.168.1.10"), ("node-2", "192.168.1.11")] {
            let (node, _) = NodeInfo::from_k8s(&builders::node(name, None, address)).unwrap();
            index.apply(Change::Apply(Object::Node(node)));
        }
        Self { index }
    }

    /// Service `default/<name>` with `spec` (YAML flow mapping).
    fn service(&mut self, name: &str, spec: &str) -> &mut Self {
        let s = ServiceInfo::from_k8s(&builders::service(
            "default",
            name,
            &format!("spec: {spec}"),
        ))
        .unwrap();
        self.index.apply(Change::Apply(Object::Service(s)));
        self
    }

    /// EndpointSlice `default/<name>` of Service `service`.
    fn slice(&mut self, name: &str, service: &str, body: &str) -> &mut Self {
        let s = EndpointSliceInfo::from_k8s(&builders::endpoint_slice(
            "default",
            name,
            Some(service),
            body,
        ))
        .unwrap();
        self.index.apply(Change::Apply(Object::EndpointSlice(s)));
        self
    }

    fn delete(&mut self, kind: myelin_cluster::Kind, name: &str) -> &mut Self {
        self.index.apply(Change::Delete {
            kind,
            namespace: "default".into(),
            name: name.into(),
        });
        self
    }

    fn translate(&self) -> Services {
        translate(&self.index, "node-1")
    }

    fn lookup(&self, addr: &str, port: u16, protocol: u8) -> Option<Lookup> {
        lookup(&self.translate(), addr, port, protocol)
    }
}

fn lookup(services: &Services, addr: &str, port: u16, protocol: u8) -> Option<Lookup> {
    let key = LbKey {
        addr: ip(addr).octets(),
        port: port.to_be(),
        protocol,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    };
    let service = services.slots.get(&key)?;
    let backends = (1..=service.count)
        .map(|slot| {
            let b = services.slots[&LbKey { slot, ..key }];
            (Ipv4Addr::from(b.backend), u16::from_be(b.backend_port))
        })
        .collect();
    Some(Lookup {
        flags: service.flags,
        affinity_timeout_s: service.affinity_timeout_s,
        backends,
    })
}

fn backends(list: &[(&str, u16)]) -> Vec<(Ipv4Addr, u16)> {
    list.iter().map(|(a, p)| (ip(a), *p)).collect()
}

fn to(list: &[(&str, u16)]) -> Option<Lookup> {
    Some(Lookup {
        flags: 0,
        affinity_timeout_s: 0,
        backends: backends(list),
    })
}

const WEB: &str = "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: http}]}";

/// Endpoints `(address, node, conditions)` on port `http` 8080/TCP.
fn http_slice(endpoints: &[(&str, &str, &str)]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(a, node, conditions)| {
            format!("{{addresses: [{a}], nodeName: {node}, conditions: {conditions}}}")
        })
        .collect();
    format!(
        "addressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 8080}}]",
        endpoints.join(", ")
    )
}

const READY: &str = "{ready: true}";
const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
const NOT_READY: &str = "{ready: false, serving: false}";

#[test]
fn a_cluster_ip_sends_to_the_ready_endpoints_sorted() {
    let mut c = Cluster::new();
    c.service("web", WEB).slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.2.9", "node-2", READY),
            ("10.244.1.5", "node-1", "{}"),
            ("10.244.1.6", "node-1", NOT_READY),
        ]),
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP),
        to(&[("10.244.1.5", 8080), ("10.244.2.9", 8080)]),
        "ready (a missing condition means ready), in address order"
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, UDP),
        None,
        "UDP is another frontend"
    );
}

#[test]
fn terminating_endpoints_serve_only_while_none_is_ready() {
    let mut c = Cluster::new();
    c.service("web", WEB).slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", TERMINATING),
            ("10.244.1.6", "node-1", READY),
        ]),
    );
    assert_eq!(c.lookup("10.96.0.10", 80, TCP), to(&[("10.244.1.6", 8080)]));
    c.slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", TERMINATING),
            ("10.244.1.6", "node-1", NOT_READY),
        ]),
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP),
        to(&[("10.244.1.5", 8080)]),
        "graceful termination: the serving, terminating one"
    );
    c.slice(
        "web-1",
        "web",
        &http_slice(&[(
            "10.244.1.5",
            "node-1",
            "{ready: false, serving: false, terminating: true}",
        )]),
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP),
        to(&[]),
        "none usable: count 0, the datapath refuses"
    );
}

#[test]
fn a_service_without_endpoints_has_a_frontend_with_no_backend() {
    let mut c = Cluster::new();
    c.service("web", WEB);
    assert_eq!(c.lookup("10.96.0.10", 80, TCP), to(&[]));
}

#[test]
fn named_ports_take_the_slice_port_of_the_same_name_and_protocol() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: web}, {name: metrics, port: 9090, targetPort: 9100}]}",
    )
    .slice(
        "web-1",
        "web",
        "addressType: IPv4\nendpoints: [{addresses: [10.244.1.5]}]\nports: [{name: metrics, port: 9100}, {name: http, port: 8080}, {name: http, port: 8081, protocol: UDP}]",
    );
    assert_eq!(c.lookup("10.96.0.10", 80, TCP), to(&[("10.244.1.5", 8080)]));
    assert_eq!(
        c.lookup("10.96.0.10", 9090, TCP),
        to(&[("10.244.1.5", 9100)])
    );
}

#[test]
fn tcp_and_udp_on_one_port_are_separate_frontends_with_their_own_backends() {
    let mut c = Cluster::new();
    c.service(
        "dns",
        "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}",
    )
    .slice(
        "dns-udp",
        "dns",
        "addressType: IPv4\nendpoints: [{addresses: [10.244.1.5]}]\nports: [{name: dns, port: 5353, protocol: UDP}]",
    )
    .slice(
        "dns-tcp",
        "dns",
        "addressType: IPv4\nendpoints: [{addresses: [10.244.1.6]}]\nports: [{name: dns-tcp, port: 5354, protocol: TCP}]",
    );
    assert_eq!(c.lookup("10.96.0.53", 53, UDP), to(&[("10.244.1.5", 5353)]));
    assert_eq!(c.lookup("10.96.0.53", 53, TCP), to(&[("10.244.1.6", 5354)]));
}

#[test]
fn two_slices_of_one_service_are_merged_and_deduplicated() {
    let mut c = Cluster::new();
    c.service("web", WEB)
        .slice(
            "web-1",
            "web",
            &http_slice(&[
                ("10.244.1.5", "node-1", READY),
                ("10.244.2.7", "node-2", NOT_READY),
            ]),
        )
        .slice(
            "web-2",
            "web",
            &http_slice(&[
                ("10.244.2.7", "node-2", READY),
                ("10.244.1.4", "node-1", READY),
            ]),
        );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP),
        to(&[
            ("10.244.1.4", 8080),
            ("10.244.1.5", 8080),
            ("10.244.2.7", 8080)
        ]),
        "an endpoint in two slices counts once, with its best condition"
    );
}

#[test]
fn slices_and_their_service_may_arrive_in_either_order() {
    let slice = http_slice(&[("10.244.1.5", "node-1", READY)]);
    let mut before = Cluster::new();
    before.slice("web-1", "web", &slice);
    assert!(
        before.translate().slots.is_empty(),
        "no Service, no frontend"
    );
    before.service("web", WEB);
    let mut after = Cluster::new();
    after.service("web", WEB).slice("web-1", "web", &slice);
    assert_eq!(before.translate().slots, after.translate().slots);
    assert_eq!(
        after.lookup("10.96.0.10", 80, TCP),
        to(&[("10.244.1.5", 8080)])
    );
    // The Service goes: its frontend with it; its slice alone translates nothing.
    after.delete(myelin_cluster::Kind::Service, "web");
    let translated = after.translate();
    assert!(translated.slots.is_empty());
    assert!(
        translated
            .warnings
            .iter()
            .any(|w| w.contains("EndpointSlice default/web-1")
                && w.contains("Service default/web, which does not exist")),
        "{:?}",
        translated.warnings
    );
}

#[test]
fn a_slice_for_an_unknown_service_changes_no_other_service() {
    let mut c = Cluster::new();
    c.service("web", WEB)
        .slice(
            "web-1",
            "web",
            &http_slice(&[("10.244.1.5", "node-1", READY)]),
        )
        .slice(
            "ghost-1",
            "ghost",
            &http_slice(&[("10.244.1.9", "node-1", READY)]),
        );
    let translated = c.translate();
    assert_eq!(
        lookup(&translated, "10.96.0.10", 80, TCP),
        to(&[("10.244.1.5", 8080)])
    );
    assert_eq!(translated.slots.len(), 2);
}

#[test]
fn ipv6_slices_are_ignored() {
    let mut c = Cluster::new();
    c.service("web", WEB)
        .slice("web-v4", "web", &http_slice(&[("10.244.1.5", "node-1", READY)]))
        .slice(
            "web-v6",
            "web",
            "addressType: IPv6\nendpoints: [{addresses: ['fd00::5']}]\nports: [{name: http, port: 8080}]",
        );
    assert_eq!(c.lookup("10.96.0.10", 80, TCP), to(&[("10.244.1.5", 8080)]));
}

#[test]
fn headless_and_external_name_services_are_not_translated() {
    let mut c = Cluster::new();
    c.service(
        "headless",
        "{clusterIP: None, ports: [{name: http, port: 80}]}",
    )
    .slice(
        "headless-1",
        "headless",
        &http_slice(&[("10.244.1.5", "node-1", READY)]),
    )
    .service("name", "{type: ExternalName, externalName: example.org}");
    let translated = c.translate();
    assert!(translated.slots.is_empty());
    let why: Vec<_> = translated
        .services
        .values()
        .map(|s| s.not_translated)
        .collect();
    assert_eq!(
        why,
        [Some("headless (clusterIP: None)"), Some("ExternalName")]
    );
}

#[test]
fn multiple_ports_and_cluster_ips_are_each_a_frontend() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{clusterIPs: [10.96.0.10, 10.96.0.11], ports: [{name: http, port: 80}, {name: https, port: 443}]}",
    )
    .slice(
        "web-1",
        "web",
        "addressType: IPv4\nendpoints: [{addresses: [10.244.1.5]}]\nports: [{name: http, port: 8080}, {name: https, port: 8443}]",
    );
    for addr in ["10.96.0.10", "10.96.0.11"] {
        assert_eq!(c.lookup(addr, 80, TCP), to(&[("10.244.1.5", 8080)]));
        assert_eq!(c.lookup(addr, 443, TCP), to(&[("10.244.1.5", 8443)]));
    }
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints_for_the_cluster_ip() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, externalIPs: [192.0.2.7], ports: [{name: http, port: 80}]}",
    )
    .slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", READY),
            ("10.244.2.7", "node-2", READY),
        ]),
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP),
        Some(Lookup {
            flags: LB_F_LOCAL,
            affinity_timeout_s: 0,
            backends: backends(&[("10.244.1.5", 8080)]),
        })
    );
    assert_eq!(
        c.lookup("192.0.2.7", 80, TCP),
        Some(Lookup {
            flags: LB_F_EXTERNAL_IP,
            affinity_timeout_s: 0,
            backends: backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]),
        }),
        "the internal policy does not govern external IPs"
    );
    // No ready local endpoint: this node's terminating one, never another node's ready one.
    c.slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", TERMINATING),
            ("10.244.2.7", "node-2", READY),
        ]),
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP).map(|l| l.backends),
        Some(backends(&[("10.244.1.5", 8080)]))
    );
    c.slice(
        "web-1",
        "web",
        &http_slice(&[("10.244.2.7", "node-2", READY)]),
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP).map(|l| l.backends),
        Some(vec![]),
        "no local endpoint: refused, not sent elsewhere"
    );
}

#[test]
fn node_ports_use_this_nodes_address_and_external_traffic_policy() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{type: NodePort, clusterIP: 10.96.0.10, externalIPs: [192.0.2.7], externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}",
    )
    .slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", READY),
            ("10.244.2.7", "node-2", READY),
        ]),
    );
    let both = backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]);
    let local = backends(&[("10.244.1.5", 8080)]);
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP)
            .map(|l| (l.flags, l.backends)),
        Some((0, both)),
        "the external policy does not govern the ClusterIP"
    );
    assert_eq!(
        c.lookup("192.168.1.10", 30080, TCP)
            .map(|l| (l.flags, l.backends)),
        Some((LB_F_NODEPORT | LB_F_LOCAL, local.clone()))
    );
    assert_eq!(
        c.lookup("192.0.2.7", 80, TCP)
            .map(|l| (l.flags, l.backends)),
        Some((LB_F_EXTERNAL_IP | LB_F_LOCAL, local))
    );
    assert_eq!(
        c.lookup("192.168.1.11", 30080, TCP),
        None,
        "another node's address"
    );
}

/// Under `externalTrafficPolicy: Local` a node without a backend of its own drops (its
/// frontend keeps `LB_F_LOCAL` with no slot); a Service without any usable endpoint is refused
/// on every node, as kube-proxy rejects it, so its frontends lose the flag.
#[test]
fn a_local_frontend_keeps_its_flag_only_while_some_node_has_a_backend() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}",
    )
    .slice("web-1", "web", &http_slice(&[("10.244.2.7", "node-2", READY)]));
    assert_eq!(
        c.lookup("192.168.1.10", 30080, TCP)
            .map(|l| (l.flags, l.backends.len())),
        Some((LB_F_NODEPORT | LB_F_LOCAL, 0)),
        "a backend elsewhere only: dropped here"
    );
    c.slice("web-1", "web", &http_slice(&[]));
    assert_eq!(
        c.lookup("192.168.1.10", 30080, TCP)
            .map(|l| (l.flags, l.backends.len())),
        Some((LB_F_NODEPORT, 0)),
        "no endpoint anywhere: refused"
    );
}

/// kube-proxy's `ExternalPolicyLocal`: the policy holds for Services reachable from outside,
/// which a ClusterIP Service is through its external IPs.
#[test]
fn external_traffic_policy_applies_to_a_cluster_ips_external_ips() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{clusterIP: 10.96.0.10, externalIPs: [192.0.2.7], externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}",
    )
    .slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", READY),
            ("10.244.2.7", "node-2", READY),
        ]),
    );
    assert_eq!(
        c.lookup("192.0.2.7", 80, TCP),
        Some(Lookup {
            flags: LB_F_EXTERNAL_IP | LB_F_LOCAL,
            affinity_timeout_s: 0,
            backends: backends(&[("10.244.1.5", 8080)]),
        })
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP)
            .map(|l| (l.flags, l.backends.len())),
        Some((0, 2)),
        "the ClusterIP itself keeps every backend"
    );
    assert_eq!(
        c.lookup("192.168.1.10", 30080, TCP),
        None,
        "a ClusterIP Service has no node port"
    );
}

/// kube-proxy serves a load balancer's addresses like external IPs, under the external
/// traffic policy.
#[test]
fn a_load_balancers_ingress_addresses_are_frontends_under_the_external_policy() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.7}]}}",
    )
    .slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", READY),
            ("10.244.2.7", "node-2", READY),
        ]),
    );
    assert_eq!(
        c.lookup("203.0.113.7", 80, TCP),
        Some(Lookup {
            flags: LB_F_LOAD_BALANCER | LB_F_LOCAL,
            affinity_timeout_s: 0,
            backends: backends(&[("10.244.1.5", 8080)]),
        })
    );
}

#[test]
fn a_load_balancer_is_its_cluster_ip_and_node_ports() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}]}",
    )
    .slice("web-1", "web", &http_slice(&[("10.244.2.7", "node-2", READY)]));
    assert!(c.lookup("10.96.0.10", 80, TCP).is_some());
    assert_eq!(
        c.lookup("192.168.1.10", 30080, TCP).map(|l| l.flags),
        Some(LB_F_NODEPORT)
    );
}

#[test]
fn client_ip_affinity_gives_every_frontend_its_timeout() {
    let mut c = Cluster::new();
    c.service(
        "web",
        "{type: NodePort, clusterIP: 10.96.0.10, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ports: [{name: http, port: 80, nodePort: 30080}]}",
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP)
            .map(|l| l.affinity_timeout_s),
        Some(600)
    );
    assert_eq!(
        c.lookup("192.168.1.10", 30080, TCP)
            .map(|l| l.affinity_timeout_s),
        Some(600)
    );
    c.service(
        "web",
        "{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80}]}",
    );
    assert_eq!(
        c.lookup("10.96.0.10", 80, TCP)
            .map(|l| l.affinity_timeout_s),
        Some(10_800)
    );
}

#[test]
fn a_frontend_two_services_claim_stays_with_the_first_and_the_second_is_named() {
    let mut c = Cluster::new();
    c.service(
        "a",
        "{clusterIP: 10.96.0.10, externalIPs: [192.0.2.7], ports: [{name: http, port: 80}]}",
    )
    .service(
        "b",
        "{clusterIP: 10.96.0.11, externalIPs: [192.0.2.7], ports: [{name: http, port: 80}]}",
    )
    .slice("b-1", "b", &http_slice(&[("10.244.1.5", "node-1", READY)]));
    let translated = c.translate();
    assert_eq!(
        lookup(&translated, "192.0.2.7", 80, TCP).map(|l| l.backends),
        Some(vec![]),
        "Service a's, which has no endpoint"
    );
    assert!(
        translated.warnings.iter().any(|w| w
            .starts_with("Service default/b: frontend 192.0.2.7:80/TCP is Service default/a's")),
        "{:?}",
        translated.warnings
    );
    let b = &translated.services.values().nth(1).unwrap().ports[0];
    let taken: Vec<Option<&str>> = b.frontends.iter().map(|f| f.taken_by.as_deref()).collect();
    assert_eq!(
        taken,
        [None, Some("default/a")],
        "the view says which one is not translated"
    );
}

#[test]
fn backends_beyond_the_cap_are_left_out_with_a_warning_naming_the_service() {
    let mut c = Cluster::new();
    c.service("big", WEB);
    let total = MAX_BACKENDS_PER_FRONTEND + 10;
    // Slices of 1,000 endpoints at most, as the API server allows.
    for (n, chunk) in (0..total).collect::<Vec<_>>().chunks(1000).enumerate() {
        let endpoints: Vec<String> = chunk
            .iter()
            .map(|i| format!("{{addresses: [10.245.{}.{}]}}", i / 250, i % 250 + 1))
            .collect();
        c.slice(
            &format!("big-{n}"),
            "big",
            &format!(
                "addressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 8080}}]",
                endpoints.join(", ")
            ),
        );
    }
    let translated = c.translate();
    let found = lookup(&translated, "10.96.0.10", 80, TCP).unwrap();
    assert_eq!(found.backends.len(), MAX_BACKENDS_PER_FRONTEND);
    assert_eq!(
        found.backends[0],
        (ip("10.245.0.1"), 8080),
        "the first in address order"
    );
    assert!(
        translated
            .warnings
            .iter()
            .any(|w| w.starts_with("Service default/big port 80/TCP: 4106 usable endpoints")),
        "{:?}",
        translated.warnings
    );
}

#[test]
fn an_unchanged_set_keeps_its_slots_and_one_more_backend_adds_one() {
    let mut c = Cluster::new();
    c.service("web", WEB).slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", READY),
            ("10.244.1.7", "node-1", READY),
        ]),
    );
    let before = c.translate().slots;
    assert_eq!(
        c.translate().slots,
        before,
        "the same state, the same slots"
    );
    c.slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", READY),
            ("10.244.1.7", "node-1", READY),
            ("10.244.1.9", "node-1", READY),
        ]),
    );
    let after = c.translate().slots;
    let changed = after
        .iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .count();
    assert_eq!(changed, 2, "slot 0's count and the new slot 3");
}

#[test]
fn the_view_shows_every_endpoint_with_its_condition_and_node() {
    let mut c = Cluster::new();
    c.service("web", WEB).slice(
        "web-1",
        "web",
        &http_slice(&[
            ("10.244.1.5", "node-1", TERMINATING),
            ("10.244.2.7", "node-2", READY),
            ("10.244.2.8", "node-2", NOT_READY),
        ]),
    );
    let translated = c.translate();
    let port = &translated.services.values().next().unwrap().ports[0];
    let seen: Vec<(Ipv4Addr, Condition, Option<&str>)> = port
        .endpoints
        .iter()
        .map(|b| (b.addr, b.condition, b.node.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                ip("10.244.1.5"),
                Condition::ServingTerminating,
                Some("node-1")
            ),
            (ip("10.244.2.7"), Condition::Ready, Some("node-2")),
            (ip("10.244.2.8"), Condition::NotUsed, Some("node-2")),
        ]
    );
    assert_eq!(port.frontends[0].kind, FrontendKind::ClusterIp);
    assert_eq!(
        port.frontends[0].backends,
        backends(&[("10.244.2.7", 8080)])
    );
}

/// After every change of a sequence, the incremental [`update`] of the previous translation
/// equals a full [`translate`]: slots, translations and warnings, for Services coming, going
/// and changing, slices moving between Services, orphan slices, and a frontend two Services
/// claim (where it gives way to the full translation).
#[test]
fn incremental_updates_equal_a_full_translation() {
    use myelin_cluster::{ChangedServices, Kind};
    let mut c = Cluster::new();
    let slice = |ip: &str| {
        format!(
            "addressType: IPv4\nendpoints: [{{addresses: [{ip}], nodeName: node-1}}]\nports: [{{name: http, port: 8080}}]"
        )
    };
    c.service(
        "a",
        "{clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}",
    )
    .slice("a-1", "a", &slice("10.244.1.1"));
    c.index.take_changed_services();
    let mut current = c.translate();
    type Step = Box<dyn Fn(&mut Cluster)>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "a new Service",
            Box::new(|c| {
                c.service(
                    "b",
                    "{clusterIP: 10.96.0.2, ports: [{name: http, port: 80}]}",
                );
            }),
        ),
        (
            "its slice",
            Box::new(move |c| {
                c.slice("b-1", "b", &slice("10.244.1.2"));
            }),
        ),
        (
            "a second slice",
            Box::new(move |c| {
                c.slice("b-2", "b", &slice("10.244.1.3"));
            }),
        ),
        (
            "a slice moves to another Service",
            Box::new(move |c| {
                c.slice("b-2", "a", &slice("10.244.1.3"));
            }),
        ),
        (
            "an orphan slice",
            Box::new(move |c| {
                c.slice("x-1", "x", &slice("10.244.1.9"));
            }),
        ),
        (
            "its Service arrives",
            Box::new(|c| {
                c.service(
                    "x",
                    "{clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}",
                );
            }),
        ),
        (
            "a Service changes its port",
            Box::new(|c| {
                c.service(
                    "a",
                    "{clusterIP: 10.96.0.1, ports: [{name: http, port: 8080}]}",
                );
            }),
        ),
        (
            "a Service goes, its slice stays",
            Box::new(|c| {
                c.delete(Kind::Service, "b");
            }),
        ),
        (
            "a slice goes",
            Box::new(|c| {
                c.delete(Kind::EndpointSlice, "b-1");
            }),
        ),
        (
            "two Services claim one external IP",
            Box::new(|c| {
                c.service("y", "{clusterIP: 10.96.0.10, externalIPs: [10.96.0.1], ports: [{name: http, port: 8080}]}");
            }),
        ),
        (
            "the claim goes away",
            Box::new(|c| {
                c.delete(Kind::Service, "y");
            }),
        ),
        (
            "after the conflict",
            Box::new(move |c| {
                c.slice("a-1", "a", &slice("10.244.1.5"));
            }),
        ),
        (
            "every slice of a Service goes",
            Box::new(|c| {
                c.delete(Kind::EndpointSlice, "a-1")
                    .delete(Kind::EndpointSlice, "b-2");
            }),
        ),
    ];
    let mut incremental = 0;
    for (what, step) in steps {
        step(&mut c);
        let full = c.translate();
        match c.index.take_changed_services() {
            ChangedServices::Some(keys) => {
                if update(&mut current, &c.index, "node-1", &keys) {
                    incremental += 1;
                } else {
                    current = c.translate();
                }
            }
            ChangedServices::All => current = c.translate(),
        }
        assert_eq!(current, full, "after: {what}");
    }
    assert!(
        incremental >= 10,
        "most steps are incremental: {incremental}"
    );
}

#[test]
fn a_node_change_marks_every_service_changed() {
    use myelin_cluster::ChangedServices;
    let mut c = Cluster::new();
    assert_eq!(
        c.index.take_changed_services(),
        ChangedServices::All,
        "nodes"
    );
    c.service(
        "a",
        "{clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}",
    );
    assert_eq!(
        c.index.take_changed_services(),
        ChangedServices::Some([("default".to_string(), "a".to_string())].into())
    );
    let (node, _) = NodeInfo::from_k8s(&builders::node("node-1", None, "192.168.1.20")).unwrap();
    c.index.apply(Change::Apply(Object::Node(node)));
    assert_eq!(c.index.take_changed_services(), ChangedServices::All);
    assert_eq!(
        c.index.take_changed_services(),
        ChangedServices::Some(Default::default()),
        "taken: it starts over"
    );
}
