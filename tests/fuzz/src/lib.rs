//! Invariants the fuzz targets assert on what the parsers accept, shared by the targets that
//! reach the same records (a NetworkPolicy comes from the directory source's YAML and from the
//! Kubernetes API's JSON alike).

use myelin_cluster::policy::{Peer, PolicyInfo, PortMatch, Requirement, Rule, Selector};

/// What validation promises about every policy it lets through.
pub fn check_accepted_policy(p: &PolicyInfo) {
    assert!(!p.name.is_empty() && !p.namespace.is_empty(), "{p:?}");
    check_selector(&p.pod_selector);
    for rule in p.ingress.iter().chain(&p.egress).flatten() {
        check_rule(rule);
    }
}

fn check_rule(rule: &Rule) {
    // Peers may be `Some(vec![])`: a rule whose peers are all IPv6 blocks allows no IPv4 peer.
    for peer in rule.peers.iter().flatten() {
        match peer {
            Peer::Pods { namespaces, pods } => {
                assert!(namespaces.is_some() || pods.is_some(), "{peer:?}");
                namespaces.iter().chain(pods).for_each(check_selector);
            }
            Peer::IpBlock { cidr, except } => {
                assert_eq!(*cidr, cidr.trunc(), "ipBlock kept host bits: {peer:?}");
                for e in except {
                    assert!(cidr.contains(e), "except outside its cidr: {peer:?}");
                }
            }
        }
    }
    // `None` means every port; an empty list would mean none and is never produced.
    assert!(rule.ports.as_ref().is_none_or(|p| !p.is_empty()));
    for spec in rule.ports.iter().flatten() {
        match &spec.port {
            PortMatch::Any => {}
            // u16: at most 65535 by construction.
            PortMatch::Range { from, to } => {
                assert!(*from >= 1 && from <= to, "bad range {spec:?}")
            }
            PortMatch::Named(name) => {
                assert!(
                    !name.is_empty() && name.len() <= 15,
                    "bad port name {spec:?}"
                );
                assert!(name.parse::<i32>().is_err(), "numeric name {spec:?}");
            }
        }
    }
}

fn check_selector(s: &Selector) {
    for r in &s.requirements {
        if let Requirement::In(_, values) | Requirement::NotIn(_, values) = r {
            assert!(!values.is_empty(), "set operator without values: {r:?}");
        }
    }
}
