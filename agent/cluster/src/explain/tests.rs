use std::net::Ipv4Addr;

use super::*;
use crate::{
    Change, Object, PodInfo,
    builders::{namespace, pod, policy},
    objects::NamespaceInfo,
};

/// Namespaces `a` (`team: a`) and `b` (`team: b`), the given policies (YAML documents with
/// their metadata).
fn index(policies: &[&str]) -> ClusterIndex {
    let mut index = ClusterIndex::default();
    for (ns, team) in [("a", "a"), ("b", "b")] {
        let info = NamespaceInfo::from_k8s(&namespace(ns, &[("team", team)])).unwrap();
        index.apply(Change::Apply(Object::Namespace(info)));
    }
    for yaml in policies {
        let object = Object::from_network_policy(&policy(yaml)).unwrap();
        index.apply(Change::Apply(object));
    }
    index
}

/// A pod of `ns` with `app: <app>`, its container port `http` = 8080/TCP, at `ip`.
fn pod_end(index: &mut ClusterIndex, ns: &str, app: &str, ip: &str) -> FlowEnd {
    let (info, _) = PodInfo::from_k8s(&pod(ns, app, &[("app", app)], Some(ip))).unwrap();
    let ports = info.ports.clone();
    index.apply(Change::Apply(Object::Pod(info)));
    FlowEnd::Pod {
        labels: index.identity_labels_of_pod(ns, app).as_ref().clone(),
        addr: Some(ip.parse().unwrap()),
        ports,
    }
}

fn rule(ns: &str, name: &str, direction: Direction, index: u32) -> RuleRef {
    RuleRef {
        namespace: ns.into(),
        name: name.into(),
        direction,
        index,
    }
}

fn policy_ref(ns: &str, name: &str) -> PolicyRef {
    PolicyRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

const DENY_ALL_A: &str = "kind: NetworkPolicy\nmetadata: {name: deny-all, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}";
const DB_FROM_API: &str = "kind: NetworkPolicy\nmetadata: {name: db-from-api, namespace: a}\nspec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 81}]}, {from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}, {port: http}]}]}";
const API_OUT: &str = "kind: NetworkPolicy\nmetadata: {name: api-out, namespace: a}\nspec: {podSelector: {matchLabels: {app: api}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}, {to: [{namespaceSelector: {matchLabels: {team: b}}}], ports: [{protocol: UDP, port: 50, endPort: 60}]}]}";

#[test]
fn a_pod_no_policy_selects_is_not_isolated() {
    let mut index = index(&[DB_FROM_API]);
    let web = pod_end(&mut index, "a", "web", "10.0.0.1");
    let api = pod_end(&mut index, "a", "api", "10.0.0.2");
    let e = explain(&index, &web, &api, Protocol::Tcp, 80);
    assert!(e.allowed);
    assert_eq!(e.egress, Check::NotIsolated);
    assert_eq!(e.ingress, Check::NotIsolated);
}

#[test]
fn an_allowed_flow_names_every_rule_that_admits_it_and_only_those() {
    let mut index = index(&[DB_FROM_API, DENY_ALL_A]);
    let api = pod_end(&mut index, "a", "api", "10.0.0.2");
    let db = pod_end(&mut index, "a", "db", "10.0.0.3");
    let e = explain(&index, &api, &db, Protocol::Tcp, 80);
    // Ingress: db-from-api's second rule; egress: api is isolated by deny-all, which has no
    // rules, so the flow is dropped on the way out.
    assert_eq!(
        e.ingress,
        Check::Allowed {
            rules: vec![rule("a", "db-from-api", Direction::Ingress, 1)]
        }
    );
    assert_eq!(
        e.egress,
        Check::Denied {
            isolated_by: vec![policy_ref("a", "deny-all")]
        }
    );
    assert!(!e.allowed);
    assert_eq!(
        e.egress.to_string(),
        "default-deny by a/deny-all",
        "the monitor's wording"
    );
    assert_eq!(e.ingress.to_string(), "allowed by a/db-from-api ingress[1]");
}

#[test]
fn a_named_port_is_the_destinations_container_port() {
    let mut index = index(&[DB_FROM_API]);
    let api = pod_end(&mut index, "a", "api", "10.0.0.2");
    let db = pod_end(&mut index, "a", "db", "10.0.0.3");
    assert!(
        explain(&index, &api, &db, Protocol::Tcp, 8080).allowed,
        "http = 8080"
    );
    assert!(
        !explain(&index, &api, &db, Protocol::Udp, 8080).allowed,
        "http is TCP"
    );
    assert!(!explain(&index, &api, &db, Protocol::Tcp, 8081).allowed);
    // The web rule is for port 81 only.
    let web = pod_end(&mut index, "a", "web", "10.0.0.1");
    assert!(!explain(&index, &web, &db, Protocol::Tcp, 80).allowed);
    let e = explain(&index, &web, &db, Protocol::Tcp, 81);
    assert_eq!(
        e.ingress,
        Check::Allowed {
            rules: vec![rule("a", "db-from-api", Direction::Ingress, 0)]
        }
    );
}

#[test]
fn ip_blocks_match_addresses_of_pods_nodes_and_the_world_but_not_excepts() {
    let mut index = index(&[API_OUT]);
    let api = pod_end(&mut index, "a", "api", "10.0.0.2");
    let b_db = pod_end(&mut index, "b", "db", "10.2.0.3");
    let in_except = pod_end(&mut index, "b", "web", "10.1.0.9");
    let egress = |to: &FlowEnd, protocol, port| explain(&index, &api, to, protocol, port).egress;
    assert_eq!(
        egress(&b_db, Protocol::Tcp, 5432),
        Check::Allowed {
            rules: vec![rule("a", "api-out", Direction::Egress, 0)]
        }
    );
    // In the except, but b's UDP 50-60 rule admits it by namespace.
    assert!(!egress(&in_except, Protocol::Tcp, 55).allows());
    assert_eq!(
        egress(&in_except, Protocol::Udp, 55),
        Check::Allowed {
            rules: vec![rule("a", "api-out", Direction::Egress, 1)]
        }
    );
    assert!(!egress(&in_except, Protocol::Udp, 61).allows());
    // Both rules admit b/db on UDP 50: both are named, in order.
    assert_eq!(
        egress(&b_db, Protocol::Udp, 50),
        Check::Allowed {
            rules: vec![
                rule("a", "api-out", Direction::Egress, 0),
                rule("a", "api-out", Direction::Egress, 1)
            ]
        }
    );
    let world = FlowEnd::World {
        addr: Ipv4Addr::new(192, 0, 2, 1),
    };
    assert!(!egress(&world, Protocol::Tcp, 80).allows());
    let node = FlowEnd::Node {
        addr: Ipv4Addr::new(10, 3, 0, 1),
        own: false,
    };
    assert!(egress(&node, Protocol::Tcp, 80).allows(), "inside 10/8");
    // A pod peer never matches a node, and a hypothetical pod without an address never
    // matches an ipBlock.
    let nameless = FlowEnd::Pod {
        labels: index.identity_labels("b", &crate::builders::labels(&[("app", "x")])),
        addr: None,
        ports: vec![],
    };
    assert!(!egress(&nameless, Protocol::Tcp, 80).allows());
    assert!(egress(&nameless, Protocol::Udp, 60).allows());
}

#[test]
fn a_pod_and_its_own_node_always_reach_each_other() {
    let mut index = index(&[DENY_ALL_A]);
    let web = pod_end(&mut index, "a", "web", "10.0.0.1");
    let own = FlowEnd::Node {
        addr: Ipv4Addr::new(192, 168, 0, 1),
        own: true,
    };
    let other = FlowEnd::Node {
        addr: Ipv4Addr::new(192, 168, 0, 2),
        own: false,
    };
    let out = explain(&index, &web, &own, Protocol::Tcp, 22);
    assert!(out.allowed);
    assert_eq!(out.egress, Check::OwnNode);
    assert_eq!(out.ingress, Check::NotAPod);
    let back = explain(&index, &own, &web, Protocol::Tcp, 80);
    assert_eq!(back.ingress, Check::OwnNode);
    assert!(!explain(&index, &other, &web, Protocol::Tcp, 80).allowed);
    assert!(!explain(&index, &web, &other, Protocol::Tcp, 80).allowed);
}

#[test]
fn namespace_selectors_and_the_policys_own_namespace() {
    let from_b = "kind: NetworkPolicy\nmetadata: {name: from-b, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: api}}}]}, {from: [{podSelector: {matchLabels: {app: web}}}]}]}";
    let mut index = index(&[from_b]);
    let a_db = pod_end(&mut index, "a", "db", "10.0.0.3");
    let b_api = pod_end(&mut index, "b", "api", "10.2.0.2");
    let b_web = pod_end(&mut index, "b", "web", "10.2.0.1");
    let a_web = pod_end(&mut index, "a", "web", "10.0.0.1");
    let ingress = |from: &FlowEnd| explain(&index, from, &a_db, Protocol::Tcp, 80).ingress;
    assert_eq!(
        ingress(&b_api),
        Check::Allowed {
            rules: vec![rule("a", "from-b", Direction::Ingress, 0)]
        }
    );
    // A podSelector alone means the policy's namespace: b's web is not a's web.
    assert!(!ingress(&b_web).allows());
    assert_eq!(
        ingress(&a_web),
        Check::Allowed {
            rules: vec![rule("a", "from-b", Direction::Ingress, 1)]
        }
    );
}

#[test]
fn an_explanation_serializes_with_stable_field_names() {
    let mut index = index(&[DB_FROM_API]);
    let api = pod_end(&mut index, "a", "api", "10.0.0.2");
    let db = pod_end(&mut index, "a", "db", "10.0.0.3");
    let json = serde_json::to_value(explain(&index, &api, &db, Protocol::Tcp, 80)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "allowed": true,
            "egress": {"verdict": "notIsolated"},
            "ingress": {"verdict": "allowed", "rules": [
                {"namespace": "a", "name": "db-from-api", "direction": "ingress", "rule": 1}
            ]},
        })
    );
}
