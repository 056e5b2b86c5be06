use myelin_common::event::EVENT_ALLOWED;

use super::*;

fn pod(namespace: &str, name: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Endpoint 1 is a/web (10.0.0.2, not isolated), endpoint 2 a/db (10.0.0.3, isolated for
/// ingress by a/db-only and a/deny-all); rule 7 is a/db-only ingress[1]; 10.0.1.9 is b/api on
/// another node.
fn names() -> FlowNames {
    let policy = |name: &str| PolicyRef {
        namespace: "a".into(),
        name: name.into(),
    };
    FlowNames {
        node: "node-1".into(),
        endpoints: [
            (
                1,
                LocalPod {
                    pod: Some(pod("a", "web")),
                    ip: Ipv4Addr::new(10, 0, 0, 2),
                    isolated_ingress: vec![],
                    isolated_egress: vec![],
                },
            ),
            (
                2,
                LocalPod {
                    pod: Some(pod("a", "db")),
                    ip: Ipv4Addr::new(10, 0, 0, 3),
                    isolated_ingress: vec![policy("db-only"), policy("deny-all")],
                    isolated_egress: vec![],
                },
            ),
        ]
        .into(),
        pods: Arc::new([(Ipv4Addr::new(10, 0, 1, 9), pod("b", "api"))].into()),
        rules: Arc::new(
            [(
                7,
                RuleRef {
                    namespace: "a".into(),
                    name: "db-only".into(),
                    direction: Direction::Ingress,
                    index: 1,
                },
            )]
            .into(),
        ),
    }
}

fn raw() -> RawEvent {
    RawEvent {
        kind: EVENT_ALLOWED,
        direction: Direction::Egress as u8,
        protocol: IPPROTO_TCP,
        saddr: [10, 0, 0, 2],
        daddr: [10, 0, 0, 3],
        sport: 40000,
        dport: 80,
        src_endpoint: 1,
        dst_endpoint: 2,
        src_identity: 300,
        dst_identity: 301,
        point: ObservationPoint::FromPod as u8,
        ingress_rule: 7,
        ..Default::default()
    }
}

#[test]
fn an_allowed_flow_names_its_pods_and_the_rule_that_admitted_it() {
    let e = to_api(&raw(), &names(), 0);
    assert_eq!((e.kind.as_str(), e.reason.as_deref()), ("allowed", None));
    assert_eq!(
        (e.src_name.as_str(), e.dst_name.as_str()),
        ("a/web", "a/db")
    );
    assert_eq!((e.node.as_str(), e.point.as_str()), ("node-1", "from-pod"));
    assert_eq!(e.egress, Some(PolicyCheck::NotIsolated));
    assert_eq!(
        e.attribution().as_deref(),
        Some("allowed by a/db-only ingress[1]")
    );
    assert_eq!(
        (e.src.as_str(), e.dst.as_str()),
        ("10.0.0.2:40000", "10.0.0.3:80")
    );
    assert_eq!(e.time, "1970-01-01T00:00:00.000Z");
    let line = e.to_string();
    assert!(
        line.contains("10.0.0.2:40000 (a/web)")
            && line.ends_with("allowed by a/db-only ingress[1]"),
        "{line}"
    );
}

#[test]
fn a_policy_drop_names_the_policies_that_isolate_the_end_that_dropped_it() {
    let e = to_api(
        &RawEvent {
            kind: EVENT_DROP,
            reason: DropReason::PolicyDeniedIngress as u8,
            direction: Direction::Ingress as u8,
            saddr: [10, 0, 1, 9],
            src_endpoint: 0,
            src_identity: 400,
            ingress_rule: 0,
            point: ObservationPoint::FromTunnel as u8,
            ..raw()
        },
        &names(),
        0,
    );
    assert_eq!(e.reason.as_deref(), Some("policy-denied-ingress"));
    assert_eq!(e.src_name, "b/api");
    assert_eq!(e.egress, None, "the source's node checks its egress");
    assert_eq!(
        e.attribution().as_deref(),
        Some("default-deny by a/db-only, a/deny-all")
    );
    assert_eq!(e.point, "from-tunnel");
}

#[test]
fn ends_that_are_not_pods_are_named_by_identity() {
    let e = to_api(
        &RawEvent {
            saddr: [192, 0, 2, 1],
            src_endpoint: 0,
            src_identity: identity::WORLD,
            daddr: [10, 0, 0, 1],
            dst_endpoint: 0,
            dst_identity: identity::HOST,
            protocol: IPPROTO_ICMP,
            ..raw()
        },
        &names(),
        0,
    );
    assert_eq!(
        (e.src_name.as_str(), e.dst_name.as_str()),
        ("world", "host")
    );
    assert_eq!((e.src_pod.as_ref(), e.dst.as_str()), (None, "10.0.0.1"));
    assert_eq!((e.egress.as_ref(), e.ingress.as_ref()), (None, None));
}

#[test]
fn a_translated_connection_names_its_service() {
    let translated = to_api(
        &RawEvent {
            service_addr: [10, 96, 0, 10],
            service_port: 443,
            ..raw()
        },
        &names(),
        0,
    );
    assert_eq!(translated.service.as_deref(), Some("10.96.0.10:443"));
    assert!(
        translated
            .to_string()
            .ends_with("(service 10.96.0.10:443 -> 10.0.0.3:80)"),
        "{translated}"
    );
}

#[test]
fn times_are_rfc3339_utc_with_milliseconds() {
    assert_eq!(wall_time(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        wall_time(123_456_789, 1_700_000_000_000_000_000),
        "2023-11-14T22:13:20.123Z"
    );
    assert_eq!(
        wall_time(0, 951_782_400_000_000_000),
        "2000-02-29T00:00:00.000Z"
    );
}

#[test]
fn the_flow_log_keeps_the_latest_events_and_filters_them() {
    let log = FlowLog::new(3, 0, None);
    let names = names();
    for port in 1..=5 {
        log.push(&to_api(
            &RawEvent {
                dport: port,
                ..raw()
            },
            &names,
            0,
        ));
    }
    let ports = |events: Vec<myelin_api::FlowEvent>| -> Vec<u16> {
        events.iter().map(|e| e.dst_port()).collect()
    };
    assert_eq!(ports(log.last(&FlowFilter::default(), 10)), [3, 4, 5]);
    assert_eq!(ports(log.last(&FlowFilter::default(), 2)), [4, 5]);
    let port_4 = FlowFilter {
        port: Some(4),
        ..FlowFilter::default()
    };
    assert_eq!(ports(log.last(&port_4, 10)), [4]);
    assert_eq!(log.info().buffered, 3);
    let off = FlowLog::new(0, 0, None);
    off.push(&to_api(&raw(), &names, 0));
    assert!(off.last(&FlowFilter::default(), 10).is_empty());
}
