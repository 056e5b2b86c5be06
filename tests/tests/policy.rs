//! NetworkPolicy with real pods and real traffic: the truth table (every case a set of policies
//! and the full expected reachability matrix), replies and conntrack, established connections
//! across a policy change, anti-spoofing, relabelling while traffic runs, and flow events.
//!
//! The world is the policy lab (`myelin_tests::policy_lab`): namespaces `a` (`team: a`) and
//! `b` (`team: b`), pods `web` (`tier: front`), `api` and `db` (`tier: back`) in each, echo
//! servers on TCP and UDP 80 and 81 everywhere, and the node. Every expectation below is
//! written out by hand from the NetworkPolicy semantics, never computed with Myelin's code.
//! SCTP has no kernel support on these machines; its rules are tested with crafted packets in
//! `agent/tests/datapath.rs`.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use myelin_api::{
    FlowEvent, FlowFilter, PodRef, PolicyCheck, PolicyFallback, PolicyName, PolicyRejected,
    PolicyRule,
};
use myelin_tests::{
    Error, Netns, Result, RunPrefix,
    packet::checksum,
    policy_lab::{
        APPLY_TIMEOUT, LabHost, LabPod, PolicyLab, Probe, check_attribution, filter_of, flows,
        policy,
    },
    probe::Service::{self, Ping, Tcp, Udp},
    root_test,
    traffic::{Host, TRAFFIC_TIMEOUT},
};
use socket2::{Domain, Protocol, Socket, Type};

const A_WEB: LabPod = LabPod::new("a", "web");
const A_API: LabPod = LabPod::new("a", "api");
const A_DB: LabPod = LabPod::new("a", "db");
const B_WEB: LabPod = LabPod::new("b", "web");
const B_API: LabPod = LabPod::new("b", "api");

/// Several documents in one file.
fn documents(docs: &[String]) -> String {
    docs.join("---\n")
}

/// One row of the truth table.
struct Case {
    name: &'static str,
    /// The policies in force for this case (names unique to the case).
    policies: fn(&PolicyLab) -> String,
    /// Policies the agent must refuse: `namespace/name`, and what the log line that names it
    /// must also say about the reason (the offending value where it is distinctive).
    rejected: &'static [(&'static str, &'static str)],
    /// Also probe ICMP echo between every pair.
    with_ping: bool,
    /// Whether a probe must pass.
    expect: fn(&Probe) -> bool,
}

fn is_tcp(s: Service) -> bool {
    matches!(s, Tcp(_))
}

fn is_udp(s: Service) -> bool {
    matches!(s, Udp(_))
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "without policies every pod reaches every pod and the node",
            policies: |_| String::new(),
            rejected: &[],
            with_ping: true,
            expect: |_| true,
        },
        Case {
            name: "a policy without policyTypes or rules isolates its pods for ingress only",
            policies: |_| policy("a", "c02-deny-ingress", "podSelector: {}"),
            rejected: &[],
            with_ping: true,
            // Pods of `a` still send anywhere; only the node gets in.
            expect: |p| p.from.is_node() || !p.to.in_namespace("a"),
        },
        Case {
            name: "policyTypes Egress without rules denies all egress but to the node",
            policies: |_| {
                policy(
                    "a",
                    "c03-deny-egress",
                    "podSelector: {}\npolicyTypes: [Egress]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.from.in_namespace("a"),
        },
        Case {
            name: "only the pods a policy selects are isolated",
            policies: |_| {
                policy(
                    "a",
                    "c04-deny-db",
                    "podSelector: {matchLabels: {app: db}}\npolicyTypes: [Ingress]",
                )
            },
            rejected: &[],
            with_ping: false,
            // b/db carries the same labels but lives in another namespace.
            expect: |p| p.from.is_node() || !p.to.is("a", "db"),
        },
        Case {
            name: "a podSelector peer matches pods of the policy's namespace only",
            policies: |_| {
                policy(
                    "a",
                    "c05-db-from-api",
                    "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.to.is("a", "db") || p.from.is_node() || p.from.is("a", "api"),
        },
        Case {
            name: "policies selecting one pod add up",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c06-db-from-api-tcp-80",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{protocol: TCP, port: 80}]",
                    ),
                    policy(
                        "a",
                        "c06-db-from-web-udp-81",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: web}}}]
  ports: [{protocol: UDP, port: 81}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                !p.to.is("a", "db")
                    || p.from.is_node()
                    || (p.from.is("a", "api") && p.service == Tcp(80))
                    || (p.from.is("a", "web") && p.service == Udp(81))
            },
        },
        Case {
            name: "an allow-all rule wins over deny-all and narrower policies",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c07-db-deny",
                        "podSelector: {matchLabels: {app: db}}\npolicyTypes: [Ingress]",
                    ),
                    policy(
                        "a",
                        "c07-db-narrow",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{protocol: TCP, port: 80}]",
                    ),
                    policy(
                        "a",
                        "c07-db-allow-all",
                        "podSelector: {matchLabels: {app: db}}\ningress: [{}]",
                    ),
                    policy(
                        "a",
                        "c07-web-egress-narrow",
                        "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- to: [{podSelector: {matchLabels: {app: db}}}]",
                    ),
                    policy(
                        "a",
                        "c07-web-egress-all",
                        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: true,
            expect: |_| true,
        },
        Case {
            name: "a connection needs egress allowed at its source and ingress at its destination",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c08-web-egress",
                        "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {}}]
  ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 81}]",
                    ),
                    policy(
                        "b",
                        "c08-db-ingress",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{namespaceSelector: {matchLabels: {team: a}}}]
  ports: [{protocol: TCP, port: 81}, {protocol: UDP, port: 81}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            // a/web -> b/db: egress allows tcp/80 and udp/81, ingress tcp/81 and udp/81: only
            // udp/81 is allowed by both.
            expect: |p| {
                let egress = !p.from.is("a", "web")
                    || (p.to.is_pod() && matches!(p.service, Tcp(80) | Udp(81)));
                let ingress = !p.to.is("b", "db")
                    || p.from.is_node()
                    || (p.from.in_namespace("a") && matches!(p.service, Tcp(81) | Udp(81)));
                egress && ingress
            },
        },
        Case {
            name: "a namespaceSelector peer matches every pod of the selected namespaces",
            policies: |_| {
                policy(
                    "a",
                    "c09-db-from-team-b",
                    "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{namespaceSelector: {matchLabels: {team: b}}}]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.to.is("a", "db") || p.from.is_node() || p.from.in_namespace("b"),
        },
        Case {
            name: "namespaceSelector and podSelector in one peer must both match",
            policies: |_| {
                policy(
                    "a",
                    "c10-db-from-b-api",
                    "\
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {team: b}}
    podSelector: {matchLabels: {app: api}}",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.to.is("a", "db") || p.from.is_node() || p.from.is("b", "api"),
        },
        Case {
            name: "namespaceSelector and podSelector in separate peers either match",
            policies: |_| {
                policy(
                    "a",
                    "c11-db-from-b-or-api",
                    "\
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {team: b}}
  - podSelector: {matchLabels: {app: api}}",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                !p.to.is("a", "db")
                    || p.from.is_node()
                    || p.from.in_namespace("b")
                    || p.from.is("a", "api")
            },
        },
        Case {
            name: "an empty podSelector peer matches every pod of the policy's namespace",
            policies: |_| {
                policy(
                    "a",
                    "c12-db-from-namespace",
                    "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {}}]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.to.is("a", "db") || p.from.is_node() || p.from.in_namespace("a"),
        },
        Case {
            name: "an empty namespaceSelector peer matches pods of every namespace, not the node",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c13-web-to-all-pods",
                        "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {}}]",
                    ),
                    policy(
                        "b",
                        "c13-db-from-any-web",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - namespaceSelector: {}
    podSelector: {matchLabels: {app: web}}",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                (!p.from.is("a", "web") || p.to.is_pod())
                    && (!p.to.is("b", "db") || p.from.is_node() || p.from.has_app("web"))
            },
        },
        Case {
            name: "an ipBlock matches pod addresses, for ingress and egress",
            policies: |lab| {
                documents(&[
                    policy(
                        "a",
                        "c14-db-from-b-web-address",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: db}}}}
ingress:
- from:
  - ipBlock:
      cidr: {}",
                            lab.cidr_of(B_WEB)
                        ),
                    ),
                    policy(
                        "b",
                        "c14-api-to-a-web-address",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: api}}}}
policyTypes: [Egress]
egress:
- to:
  - ipBlock:
      cidr: {}",
                            lab.cidr_of(A_WEB)
                        ),
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                (!p.to.is("a", "db") || p.from.is_node() || p.from.is("b", "web"))
                    && (!p.from.is("b", "api") || p.to.is("a", "web"))
            },
        },
        Case {
            name: "ipBlock except carves addresses out of the block",
            policies: |lab| {
                documents(&[
                    policy(
                        "a",
                        "c15-db-from-cidr-except",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: db}}}}
ingress:
- from:
  - ipBlock:
      cidr: {}
      except: [{}, {}]",
                            lab.node().pod_cidr(),
                            lab.cidr_of(B_WEB),
                            lab.cidr_of(B_API)
                        ),
                    ),
                    policy(
                        "a",
                        "c15-web-to-cidr-except",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: web}}}}
policyTypes: [Egress]
egress:
- to:
  - ipBlock:
      cidr: {}
      except: [{}, {}/32]",
                            lab.node().pod_cidr(),
                            lab.cidr_of(A_DB),
                            lab.node().gateway()
                        ),
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                let ingress = !p.to.is("a", "db")
                    || p.from.is_node()
                    || (p.from.is_pod() && !p.from.is("b", "web") && !p.from.is("b", "api"));
                let egress = !p.from.is("a", "web") || (p.to.is_pod() && !p.to.is("a", "db"));
                ingress && egress
            },
        },
        Case {
            name: "an excepted address passes where another rule or policy allows it",
            policies: |lab| {
                documents(&[
                    policy(
                        "a",
                        "c16-db-from-cidr-except",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: db}}}}
ingress:
- from:
  - ipBlock:
      cidr: {}
      except: [{}, {}]
- from:
  - ipBlock:
      cidr: {}
  ports: [{{protocol: TCP, port: 80}}]",
                            lab.node().pod_cidr(),
                            lab.cidr_of(B_WEB),
                            lab.cidr_of(B_API),
                            lab.cidr_of(B_WEB)
                        ),
                    ),
                    policy(
                        "a",
                        "c16-db-from-b-api",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {team: b}}
    podSelector: {matchLabels: {app: api}}
  ports: [{protocol: UDP, port: 81}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                !p.to.is("a", "db")
                    || p.from.is_node()
                    || (p.from.is_pod() && !p.from.is("b", "web") && !p.from.is("b", "api"))
                    || (p.from.is("b", "web") && p.service == Tcp(80))
                    || (p.from.is("b", "api") && p.service == Udp(81))
            },
        },
        Case {
            name: "a numeric port without peers allows that TCP port from anywhere",
            policies: |_| {
                policy(
                    "a",
                    "c17-db-port-81",
                    "podSelector: {matchLabels: {app: db}}\ningress:\n- ports: [{port: 81}]",
                )
            },
            rejected: &[],
            with_ping: false,
            // The protocol defaults to TCP.
            expect: |p| !p.to.is("a", "db") || p.from.is_node() || p.service == Tcp(81),
        },
        Case {
            name: "a named port resolves against each destination pod's container ports",
            policies: |_| {
                policy(
                    "a",
                    "c18-named-http",
                    "podSelector: {}\ningress:\n- ports: [{port: http}]",
                )
            },
            rejected: &[],
            with_ping: false,
            // http is TCP 80 on web, TCP 81 on api, and db has no port of that name.
            expect: |p| {
                !p.to.in_namespace("a")
                    || p.from.is_node()
                    || (p.to.has_app("web") && p.service == Tcp(80))
                    || (p.to.has_app("api") && p.service == Tcp(81))
            },
        },
        Case {
            name: "an egress named port resolves against each destination pod, per protocol",
            policies: |_| {
                policy(
                    "b",
                    "c19-egress-named-alt",
                    "\
podSelector: {}
policyTypes: [Egress]
egress:
- ports: [{protocol: UDP, port: alt}]",
                )
            },
            rejected: &[],
            with_ping: false,
            // alt is UDP 81 on web, UDP 80 on api; db and the node have no such port.
            expect: |p| {
                !p.from.in_namespace("b")
                    || (p.to.has_app("web") && p.service == Udp(81))
                    || (p.to.has_app("api") && p.service == Udp(80))
            },
        },
        Case {
            name: "endPort ranges include both ends and nothing beyond",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c20-db-ranges",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- ports:
  - {protocol: TCP, port: 79, endPort: 80}
  - {protocol: UDP, port: 81, endPort: 90}",
                    ),
                    policy(
                        "b",
                        "c20-web-egress-range",
                        "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- ports: [{protocol: TCP, port: 1, endPort: 80}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                (!p.to.is("a", "db") || p.from.is_node() || matches!(p.service, Tcp(80) | Udp(81)))
                    && (!p.from.is("b", "web") || p.service == Tcp(80))
            },
        },
        Case {
            name: "a TCP rule never allows UDP",
            policies: |_| {
                policy(
                    "a",
                    "c21-db-tcp",
                    "\
podSelector: {matchLabels: {app: db}}
ingress:
- ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 81}]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.to.is("a", "db") || p.from.is_node() || is_tcp(p.service),
        },
        Case {
            name: "a UDP rule never allows TCP",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c22-db-udp-any-port",
                        "podSelector: {matchLabels: {app: db}}\ningress:\n- ports: [{protocol: UDP}]",
                    ),
                    policy(
                        "b",
                        "c22-db-udp-80",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- ports: [{protocol: UDP, port: 80}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                (!p.to.is("a", "db") || p.from.is_node() || is_udp(p.service))
                    && (!p.to.is("b", "db") || p.from.is_node() || p.service == Udp(80))
            },
        },
        Case {
            name: "only rules without ports allow every protocol, ICMP echo included",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c23-db-web-any-api-tcp",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: web}}}]
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{protocol: TCP, port: 80}]",
                    ),
                    policy(
                        "b",
                        "c23-web-egress-ports",
                        "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 80}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: true,
            expect: |p| {
                (!p.to.is("a", "db")
                    || p.from.is_node()
                    || p.from.is("a", "web")
                    || (p.from.is("a", "api") && p.service == Tcp(80)))
                    && (!p.from.is("b", "web") || matches!(p.service, Tcp(80) | Udp(80)))
            },
        },
        Case {
            name: "policyTypes Egress alone ignores the policy's ingress rules",
            policies: |_| {
                policy(
                    "a",
                    "c24-db-egress-only",
                    "\
podSelector: {matchLabels: {app: db}}
policyTypes: [Egress]
ingress:
- from: [{podSelector: {matchLabels: {app: nobody}}}]
egress:
- to: [{podSelector: {matchLabels: {app: api}}}]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| !p.from.is("a", "db") || p.to.is("a", "api"),
        },
        Case {
            name: "policyTypes default to Ingress plus Egress when egress rules exist",
            policies: |_| {
                policy(
                    "a",
                    "c25-api-egress-rules",
                    "\
podSelector: {matchLabels: {app: api}}
egress:
- to: [{podSelector: {matchLabels: {app: db}}}]",
                )
            },
            rejected: &[],
            with_ping: false,
            // No ingress rules: a/api takes nothing but the node's connections.
            expect: |p| {
                (!p.to.is("a", "api") || p.from.is_node())
                    && (!p.from.is("a", "api") || p.to.is("a", "db"))
            },
        },
        Case {
            name: "a pod isolated for egress reaches its node without a rule, and with one",
            policies: |lab| {
                documents(&[
                    policy(
                        "a",
                        "c26-web-to-pods",
                        "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {}}]",
                    ),
                    policy(
                        "a",
                        "c26-api-to-node",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: api}}}}
policyTypes: [Egress]
egress:
- to:
  - ipBlock:
      cidr: {}/32",
                            lab.node().gateway()
                        ),
                    ),
                ])
            },
            rejected: &[],
            with_ping: true,
            expect: |p| {
                (!p.from.is("a", "web") || p.to.is_pod())
                    && (!p.from.is("a", "api") || p.to.is_node())
            },
        },
        Case {
            name: "the node reaches pods isolated both ways, and nothing else passes",
            policies: |_| {
                documents(&[
                    policy(
                        "a",
                        "c27-isolate-a",
                        "podSelector: {}\npolicyTypes: [Ingress, Egress]",
                    ),
                    policy(
                        "b",
                        "c27-isolate-b",
                        "podSelector: {}\npolicyTypes: [Ingress, Egress]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: true,
            expect: |p| p.from.is_node(),
        },
        Case {
            name: "invalid policies are rejected, isolate what they select, and the others stay enforced",
            policies: |_| {
                // Each invalid policy selects b/db and has no good version: it isolates b/db,
                // with no rules (were it ignored, b/db would take everything).
                let db = "podSelector: {matchLabels: {app: db}}";
                documents(&[
                    policy(
                        "a",
                        "c28-db-from-api",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]",
                    ),
                    policy(
                        "b",
                        "c28-bad-cidr",
                        &format!("{db}\ningress:\n- from: [{{ipBlock: {{cidr: 10.0.0.0/33}}}}]"),
                    ),
                    policy(
                        "b",
                        "c28-port-zero",
                        &format!("{db}\ningress:\n- ports: [{{port: 0}}]"),
                    ),
                    policy(
                        "b",
                        "c28-port-too-big",
                        &format!("{db}\ningress:\n- ports: [{{port: 70000}}]"),
                    ),
                    policy(
                        "b",
                        "c28-end-port-below-port",
                        &format!("{db}\ningress:\n- ports: [{{port: 4242, endPort: 4241}}]"),
                    ),
                    policy(
                        "b",
                        "c28-icmp",
                        &format!("{db}\ningress:\n- ports: [{{protocol: ICMP, port: 8}}]"),
                    ),
                    policy(
                        "b",
                        "c28-api-from-web",
                        "\
podSelector: {matchLabels: {app: api}}
ingress:
- from: [{podSelector: {matchLabels: {app: web}}}]",
                    ),
                ])
            },
            rejected: &[
                ("b/c28-bad-cidr", "10.0.0.0/33"),
                ("b/c28-port-zero", "0 is outside"),
                ("b/c28-port-too-big", "70000"),
                ("b/c28-end-port-below-port", "4241"),
                ("b/c28-icmp", "ICMP"),
            ],
            with_ping: false,
            expect: |p| {
                (!p.to.is("a", "db") || p.from.is_node() || p.from.is("a", "api"))
                    && (!p.to.is("b", "api") || p.from.is_node() || p.from.is("b", "web"))
                    && (!p.to.is("b", "db") || p.from.is_node())
            },
        },
        Case {
            name: "matchExpressions select pods and namespaces",
            policies: |_| {
                policy(
                    "b",
                    "c29-back-from-not-b",
                    "\
podSelector:
  matchExpressions: [{key: tier, operator: In, values: [back]}]
ingress:
- from:
  - namespaceSelector:
      matchExpressions: [{key: team, operator: NotIn, values: [b]}]",
                )
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                let back_of_b = p.to.is("b", "api") || p.to.is("b", "db");
                !back_of_b || p.from.is_node() || p.from.in_namespace("a")
            },
        },
        Case {
            name: "ipBlock 0.0.0.0/0 matches pods too, and except of the pod CIDR takes them out",
            policies: |lab| {
                documents(&[
                    policy(
                        "a",
                        "c30-db-from-world-but-pods",
                        &format!(
                            "\
podSelector: {{matchLabels: {{app: db}}}}
ingress:
- from:
  - ipBlock:
      cidr: 0.0.0.0/0
      except: [{}]",
                            lab.node().pod_cidr()
                        ),
                    ),
                    policy(
                        "b",
                        "c30-db-from-world",
                        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{ipBlock: {cidr: 0.0.0.0/0}}]
  ports: [{protocol: UDP, port: 80}]",
                    ),
                ])
            },
            rejected: &[],
            with_ping: false,
            expect: |p| {
                (!p.to.is("a", "db") || p.from.is_node())
                    && (!p.to.is("b", "db") || p.from.is_node() || p.service == Udp(80))
            },
        },
        Case {
            name: "an egress ipBlock that holds the node's address reaches the node",
            policies: |lab| {
                policy(
                    "a",
                    "c31-web-to-pod-cidr",
                    &format!(
                        "\
podSelector: {{matchLabels: {{app: web}}}}
policyTypes: [Egress]
egress:
- to:
  - ipBlock:
      cidr: {}
  ports: [{{protocol: TCP, port: 81}}]",
                        lab.node().pod_cidr()
                    ),
                )
            },
            rejected: &[],
            with_ping: false,
            // The gateway, the node's address, is the pod CIDR's first host address.
            expect: |p| !p.from.is("a", "web") || p.service == Tcp(81),
        },
        Case {
            name: "an egress named port behind an ipBlock resolves for each pod the block holds",
            policies: |lab| {
                policy(
                    "b",
                    "c32-egress-named-ipblock",
                    &format!(
                        "\
podSelector: {{}}
policyTypes: [Egress]
egress:
- to:
  - ipBlock:
      cidr: {}
      except: [{}/32]
  ports: [{{port: http}}]",
                        lab.node().pod_cidr(),
                        lab.pod(A_API).ip()
                    ),
                )
            },
            rejected: &[],
            with_ping: false,
            // http is TCP 80 on web, TCP 81 on api; a/api is excepted; db has no http.
            expect: |p| {
                !p.from.in_namespace("b")
                    || (p.to.has_app("web") && p.service == Tcp(80))
                    || (p.to.is("b", "api") && p.service == Tcp(81))
            },
        },
    ]
}

#[test]
fn policy_truth_table_with_real_traffic() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    let cases = cases();
    let mut failures = Vec::new();
    let started = Instant::now();
    for (n, case) in cases.iter().enumerate() {
        let case_started = Instant::now();
        let yaml = (case.policies)(&lab);
        let rejected: Vec<&str> = case.rejected.iter().map(|(name, _)| *name).collect();
        if let Err(e) = lab.apply(&yaml, &rejected) {
            failures.push(format!("case {}: {}: {e:?}", n + 1, case.name));
            continue;
        }
        // Traffic between a pod and its own node is always allowed (NetworkPolicy's exception
        // to isolation): probes to the node are expected through in every case, and checked.
        let check = lab.check(|p| p.to.is_node() || (case.expect)(p), case.with_ping)?;
        let mut problems = Vec::new();
        if !check.mismatches().is_empty() {
            problems.push(format!(
                "{} of {} probes differ from the expectation:\n{}",
                check.mismatches().len(),
                check.cells.len(),
                check.render()
            ));
        }
        // `policy explain` answers from the agent's index what the datapath did.
        let mut disagreements = Vec::new();
        for cell in &check.cells {
            let Some(answer) = lab.explain(&cell.probe)? else {
                continue;
            };
            if answer.allowed != cell.passed() {
                disagreements.push(format!(
                    "  {}: the datapath {}, policy explain says {}: egress {}; ingress {}",
                    cell.probe,
                    if cell.passed() {
                        "passed it"
                    } else {
                        "dropped it"
                    },
                    if answer.allowed { "allowed" } else { "denied" },
                    answer.egress,
                    answer.ingress
                ));
            }
        }
        // The flow log names, for every pod-to-pod probe, the rule that admitted it or the
        // policies that isolated its destination, as policy explain does. The latest event of
        // the probe's pods and port is this case's (every probe makes one).
        let mut misattributed = Vec::new();
        for cell in &check.cells {
            let Some(filter) = filter_of(&lab, &cell.probe) else {
                continue;
            };
            let Some(answer) = lab.explain(&cell.probe)? else {
                continue;
            };
            let events = flows(&lab, &filter, 20)?.flows;
            if let Err(e) = check_attribution(&cell.probe, &answer, &events) {
                misattributed.push(format!("  {e}"));
            }
        }
        if !misattributed.is_empty() {
            problems.push(format!(
                "the flow log's attribution differs from policy explain on {} probes:\n{}",
                misattributed.len(),
                misattributed.join("\n")
            ));
        }
        if !disagreements.is_empty() {
            problems.push(format!(
                "policy explain disagrees with the datapath on {} probes:\n{}",
                disagreements.len(),
                disagreements.join("\n")
            ));
        }
        let log = lab.node().agent_log();
        for (name, value) in case.rejected {
            let said = format!("NetworkPolicy {name} rejected");
            if !log
                .lines()
                .any(|line| line.contains(&said) && line.contains(value))
            {
                problems.push(format!(
                    "the agent log has no line saying `{said}` that quotes {value:?}"
                ));
            }
        }
        let allowed = check.cells.iter().filter(|c| c.passed()).count();
        eprintln!(
            "case {:>2} {}: {} probes, {allowed} passed, {} mismatches, {} retried, {:.2}s",
            n + 1,
            if problems.is_empty() { "ok  " } else { "FAIL" },
            check.cells.len(),
            check.mismatches().len(),
            check.retried.len(),
            case_started.elapsed().as_secs_f64()
        );
        if !problems.is_empty() {
            failures.push(format!(
                "case {}: {}\n--- policies ---\n{yaml}\n{}\n--- agent log (tail) ---\n{}",
                n + 1,
                case.name,
                problems.join("\n"),
                lab.agent_log_tail(30)
            ));
        }
    }
    eprintln!(
        "{} cases in {:.1}s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    Ok(())
}

/// A probe from `from` to `to`.
fn probe(from: LabPod, to: LabPod, service: Service) -> Probe {
    Probe {
        from: LabHost::Pod(from),
        to: LabHost::Pod(to),
        service,
    }
}

/// Fails with the rendered matrix when any of `probes` differs from `expect`.
fn assert_probes(
    lab: &PolicyLab,
    probes: Vec<Probe>,
    expect: impl Fn(&Probe) -> bool,
    what: &str,
) -> Result<()> {
    let with_ping = probes.iter().any(|p| p.service == Ping);
    let check = lab.check_probes(probes, expect, with_ping)?;
    assert!(
        check.mismatches().is_empty(),
        "{what}:\n{}\n--- agent log (tail) ---\n{}",
        check.render(),
        lab.agent_log_tail(30)
    );
    Ok(())
}

/// Packets the datapath dropped for `reason` so far.
fn drops(lab: &PolicyLab, reason: &str) -> Result<u64> {
    let all = lab
        .node()
        .client()
        .drops()
        .map_err(Error::api("GET /v1/drops"))?;
    Ok(all
        .iter()
        .find(|d| d.reason == reason)
        .map_or(0, |d| d.packets))
}

#[test]
fn replies_and_related_icmp_errors_reach_a_client_isolated_for_ingress() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    lab.apply(
        &policy(
            "a",
            "replies-web-isolated",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Ingress]",
        ),
        &[],
    )?;
    let mut probes = Vec::new();
    for service in [Tcp(80), Udp(80), Ping] {
        probes.push(probe(A_WEB, A_DB, service));
        probes.push(probe(A_DB, A_WEB, service));
    }
    // Nothing new gets into a/web; its own connections get their replies.
    assert_probes(
        &lab,
        probes,
        |p| p.from.is("a", "web"),
        "replies to an ingress-isolated client",
    )?;

    let web = lab.pod(A_WEB);
    let db_ip = lab.pod(A_DB).ip();
    // Nothing listens on port 9 of a/db: its kernel answers UDP with an ICMP port unreachable
    // (an error about the allowed flow) and TCP with a reset (a reply of the flow). Both must
    // reach a/web, whose socket then reports the refusal instead of timing out.
    let closed_port = SocketAddr::from((db_ip, 9));
    let (udp, tcp) = web.netns().run(|| {
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| s.connect(closed_port).map(|()| s))
            .and_then(|s| s.set_read_timeout(Some(TRAFFIC_TIMEOUT)).map(|()| s))
            .and_then(|s| s.send(b"anyone there?\n").map(|_| s))
            .and_then(|s| s.recv(&mut [0u8; 64]));
        let tcp = TcpStream::connect_timeout(&closed_port, TRAFFIC_TIMEOUT);
        (udp.map(drop), tcp.map(drop))
    })?;
    for (what, outcome) in [("UDP", udp), ("TCP", tcp)] {
        match outcome {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => panic!(
                "{what} from a/web to closed port {closed_port}: expected the refusal to come \
                 back, got {other:?}\n--- agent log (tail) ---\n{}",
                lab.agent_log_tail(30)
            ),
        }
    }

    // An echo request is never taken for a reply: a/db sends one with the very id of a/web's
    // tracked echo flow, and a/web, isolated for ingress, must not see it (it would answer).
    const ID: u16 = 0x4d59;
    let web_socket = raw_icmp_socket(web.netns())?;
    let db_socket = raw_icmp_socket(lab.pod(A_DB).netns())?;
    send_echo_request(&web_socket, db_ip, ID, 1)?;
    assert!(
        echo_reply_arrives(&web_socket, db_ip, ID, TRAFFIC_TIMEOUT)?,
        "a/web got no echo reply from a/db to its raw echo request"
    );
    let denied_before = drops(&lab, "policy-denied-ingress")?;
    send_echo_request(&db_socket, web.ip(), ID, 1)?;
    assert!(
        !echo_reply_arrives(&db_socket, web.ip(), ID, Duration::from_millis(500))?,
        "a/db's echo request reached a/web, which is isolated for ingress, because a/web had \
         an echo flow with the same id to a/db"
    );
    assert!(
        drops(&lab, "policy-denied-ingress")? > denied_before,
        "the echo request was not counted as policy-denied-ingress"
    );

    // An ICMP error passes only when the packet it quotes belongs to a tracked flow: a/db
    // sends one about a/web's echoed UDP flow, and one about a flow that never existed.
    let web_ip = web.ip();
    let flow = web.netns().run(|| -> io::Result<u16> {
        let socket = UdpSocket::bind((web_ip, 0))?;
        socket.connect((db_ip, 80))?;
        socket.set_read_timeout(Some(TRAFFIC_TIMEOUT))?;
        socket.send(b"track me\n")?;
        socket.recv(&mut [0u8; 64])?;
        Ok(socket.local_addr()?.port())
    })?;
    let tracked_port = flow.map_err(Error::io("a UDP exchange from a/web with a/db"))?;
    let untracked_port = tracked_port.wrapping_add(1);
    for (port, dport, tracked) in [(tracked_port, 80, true), (untracked_port, 9999, false)] {
        let denied_before = drops(&lab, "policy-denied-ingress")?;
        send_port_unreachable(
            &db_socket,
            (
                SocketAddrV4::new(web_ip, port),
                SocketAddrV4::new(db_ip, dport),
            ),
        )?;
        let wait = if tracked {
            TRAFFIC_TIMEOUT
        } else {
            Duration::from_millis(500)
        };
        assert_eq!(
            port_unreachable_arrives(&web_socket, db_ip, port, wait)?,
            tracked,
            "a port unreachable from a/db quoting a/web:{port} -> a/db:{dport} (a flow that \
             {} tracked) {} a/web",
            if tracked { "is" } else { "is not" },
            if tracked { "did not reach" } else { "reached" },
        );
        if !tracked {
            assert!(
                drops(&lab, "policy-denied-ingress")? > denied_before,
                "the unrelated ICMP error was not counted as policy-denied-ingress"
            );
        }
    }
    Ok(())
}

/// A raw ICMP socket created inside `netns` (root may open one); it stays in that namespace.
fn raw_icmp_socket(netns: &Netns) -> Result<Socket> {
    let socket = netns
        .run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))?
        .map_err(Error::io(format!(
            "opening a raw ICMP socket in {}",
            netns.name()
        )))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(Error::io("setting a read timeout"))?;
    Ok(socket)
}

fn send_echo_request(socket: &Socket, to: Ipv4Addr, id: u16, seq: u16) -> Result<()> {
    let mut packet = vec![8, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(b"myelin policy test");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    socket
        .send_to(&packet, &SocketAddrV4::new(to, 0).into())
        .map_err(Error::io(format!("sending an echo request to {to}")))?;
    Ok(())
}

/// Whether an ICMP message from `from` for which `wanted` (given the ICMP bytes) holds arrives
/// on `socket` within `timeout`.
fn icmp_arrives(
    socket: &Socket,
    from: Ipv4Addr,
    wanted: impl Fn(&[u8]) -> bool,
    timeout: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let n = match (&*socket).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(Error::io("receiving on a raw ICMP socket")(e)),
        };
        // A raw socket gets the IPv4 header too: source at 12..16, ICMP after `ihl` words.
        let packet = &buf[..n];
        if packet.len() < 20 || packet[12..16] != from.octets() {
            continue;
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if packet.get(ihl..).is_some_and(&wanted) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether an echo reply with `id` from `from` arrives on `socket` within `timeout`.
fn echo_reply_arrives(socket: &Socket, from: Ipv4Addr, id: u16, timeout: Duration) -> Result<bool> {
    icmp_arrives(
        socket,
        from,
        |icmp| icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes(),
        timeout,
    )
}

/// Sends a "port unreachable" from `socket` to `quoted.0`'s address, quoting a UDP datagram
/// `quoted.0 -> quoted.1` as the error's offending packet.
fn send_port_unreachable(socket: &Socket, quoted: (SocketAddrV4, SocketAddrV4)) -> Result<()> {
    let (src, dst) = quoted;
    let mut inner = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
    inner.extend_from_slice(&src.ip().octets());
    inner.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&inner);
    inner[10..12].copy_from_slice(&sum.to_be_bytes());
    inner.extend_from_slice(&src.port().to_be_bytes());
    inner.extend_from_slice(&dst.port().to_be_bytes());
    inner.extend_from_slice(&[0, 8, 0, 0]);
    let mut packet = vec![3, 3, 0, 0, 0, 0, 0, 0];
    packet.extend_from_slice(&inner);
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    socket
        .send_to(&packet, &SocketAddrV4::new(*src.ip(), 0).into())
        .map_err(Error::io(format!(
            "sending a port unreachable to {}",
            src.ip()
        )))?;
    Ok(())
}

/// Whether a port unreachable from `from` that quotes source port `port` arrives on `socket`.
fn port_unreachable_arrives(
    socket: &Socket,
    from: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<bool> {
    icmp_arrives(
        socket,
        from,
        // ICMP header (8), quoted IPv4 header (20), then the quoted source port.
        |icmp| icmp.len() >= 30 && icmp[..2] == [3, 3] && icmp[28..30] == port.to_be_bytes(),
        timeout,
    )
}

/// A TCP connection and a connected UDP socket opened from `from` to port 80 of `to`.
struct Flows {
    tcp: TcpStream,
    udp: UdpSocket,
}

impl Flows {
    fn open(lab: &PolicyLab, from: LabPod, to: LabPod) -> Result<Self> {
        let addr = SocketAddr::from((lab.pod(to).ip(), 80));
        let opened = lab.pod(from).netns().run(|| -> io::Result<Flows> {
            let tcp = TcpStream::connect_timeout(&addr, TRAFFIC_TIMEOUT)?;
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            udp.connect(addr)?;
            Ok(Flows { tcp, udp })
        })?;
        opened.map_err(Error::io(format!("connecting {from} to {addr}")))
    }

    /// Sends a line over each and waits up to `timeout` for its echo: (TCP, UDP).
    fn exchange(&self, timeout: Duration) -> (io::Result<()>, io::Result<()>) {
        (self.tcp_exchange(timeout), self.udp_exchange(timeout))
    }

    fn tcp_exchange(&self, timeout: Duration) -> io::Result<()> {
        self.tcp.set_read_timeout(Some(timeout))?;
        (&self.tcp).write_all(Self::LINE)?;
        let mut echoed = Vec::new();
        // One line per exchange: a fresh reader never holds bytes of the next one.
        BufReader::new(&self.tcp).read_until(b'\n', &mut echoed)?;
        Self::check_echo(&echoed)
    }

    fn udp_exchange(&self, timeout: Duration) -> io::Result<()> {
        self.udp.set_read_timeout(Some(timeout))?;
        self.udp.send(Self::LINE)?;
        let mut buf = [0u8; 64];
        let n = self.udp.recv(&mut buf)?;
        Self::check_echo(&buf[..n])
    }

    const LINE: &'static [u8] = b"still there?\n";

    fn check_echo(echoed: &[u8]) -> io::Result<()> {
        if echoed == Self::LINE {
            Ok(())
        } else {
            Err(io::Error::other(format!("echoed {echoed:?}")))
        }
    }
}

#[test]
fn a_policy_change_cuts_established_connections_it_no_longer_allows() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    let doomed = Flows::open(&lab, A_WEB, A_DB)?;
    let kept = Flows::open(&lab, A_API, A_DB)?;
    for (who, flows) in [("a/web", &doomed), ("a/api", &kept)] {
        let (tcp, udp) = flows.exchange(TRAFFIC_TIMEOUT);
        assert!(
            tcp.is_ok() && udp.is_ok(),
            "{who} -> a/db before any policy: tcp {tcp:?}, udp {udp:?}"
        );
    }
    let denied_before = drops(&lab, "policy-denied-ingress")?;

    lab.apply(
        &policy(
            "a",
            "established-db-from-api",
            "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]",
        ),
        &[],
    )?;
    let (tcp, udp) = kept.exchange(TRAFFIC_TIMEOUT);
    assert!(
        tcp.is_ok() && udp.is_ok(),
        "a/api's connections to a/db are still allowed but stopped: tcp {tcp:?}, udp {udp:?}"
    );
    let (tcp, udp) = doomed.exchange(Duration::from_secs(1));
    assert!(
        tcp.is_err() && udp.is_err(),
        "a/web's connections to a/db are no longer allowed but still pass: tcp {tcp:?}, \
         udp {udp:?}\n--- agent log (tail) ---\n{}",
        lab.agent_log_tail(30)
    );
    assert!(
        drops(&lab, "policy-denied-ingress")? > denied_before,
        "the cut connections' packets were not counted as policy-denied-ingress"
    );
    // The connection that is still allowed is still tracked, with its replies seen.
    let local = kept
        .tcp
        .local_addr()
        .map_err(Error::io("reading the kept connection's address"))?;
    let flows = lab
        .node()
        .client()
        .conntrack()
        .map_err(Error::api("GET /v1/conntrack"))?;
    assert!(
        flows.iter().any(|f| f.protocol == "tcp"
            && f.src == local.to_string()
            && f.dst == format!("{}:80", lab.pod(A_DB).ip())
            && f.seen_reply),
        "conntrack does not list the kept connection {local} -> a/db:80: {flows:?}"
    );
    Ok(())
}

#[test]
fn a_policy_that_cannot_be_enforced_never_opens_anything() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    const BAD_PORT: &str = "spec.ingress[0].ports[0].port: 70000 is outside 1-65535";
    let good = policy(
        "a",
        "db-from-api",
        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{port: 80}]",
    );
    // The edit would let a/web in too, on a port that does not exist.
    let broken = policy(
        "a",
        "db-from-api",
        "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}, {podSelector: {matchLabels: {app: web}}}]
  ports: [{port: 70000}]",
    );
    let to_db = || {
        vec![
            probe(A_API, A_DB, Tcp(80)),
            probe(A_WEB, A_DB, Tcp(80)),
            probe(B_API, A_DB, Tcp(80)),
        ]
    };
    let from_api = |p: &Probe| p.from == LabHost::Pod(A_API);
    let rejection = |name: &str| -> Result<Option<PolicyRejected>> {
        let status = lab
            .node()
            .client()
            .policies()
            .map_err(Error::api("GET /v1/policies"))?;
        Ok(status
            .policies
            .into_iter()
            .find(|p| p.namespace == "a" && p.name == name)
            .and_then(|p| p.rejected))
    };

    lab.apply(&good, &[])?;
    assert_probes(&lab, to_db(), from_api, "a/db under its policy")?;

    lab.apply(&broken, &["a/db-from-api"])?;
    assert_probes(
        &lab,
        to_db(),
        from_api,
        "a/db after an edit that cannot be enforced: its last good version must stay in force",
    )?;
    assert_eq!(
        rejection("db-from-api")?,
        Some(PolicyRejected {
            reason: BAD_PORT.into(),
            in_force: PolicyFallback::LastGood,
        })
    );

    // A new policy that cannot be enforced isolates the pod it selects: a/web takes no new
    // connection, and its own connections (egress is not declared) still go out.
    let web_broken = policy(
        "a",
        "web-from-api",
        "\
podSelector: {matchLabels: {app: web}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{port: 70000}]",
    );
    lab.apply(
        &documents(&[broken, web_broken]),
        &["a/db-from-api", "a/web-from-api"],
    )?;
    assert_probes(
        &lab,
        vec![
            probe(A_API, A_WEB, Tcp(80)),
            probe(A_API, A_WEB, Udp(81)),
            probe(B_WEB, A_WEB, Tcp(80)),
            probe(A_WEB, A_API, Tcp(80)),
        ],
        |p| p.from == LabHost::Pod(A_WEB),
        "a/web under a new policy that cannot be enforced",
    )?;
    assert_probes(
        &lab,
        to_db(),
        from_api,
        "a/db still under its last good version",
    )?;
    assert_eq!(
        rejection("web-from-api")?,
        Some(PolicyRejected {
            reason: BAD_PORT.into(),
            in_force: PolicyFallback::Deny,
        })
    );

    let printed = lab.node().myelinctl(&["policies"])?;
    for line in [
        format!("rejected: {BAD_PORT}; last good version in force"),
        format!("rejected: {BAD_PORT}; selected pods isolated (deny)"),
    ] {
        assert!(
            printed.contains(&line),
            "`myelinctl policies` has no {line:?}:\n{printed}"
        );
    }
    // One error each, naming the policy and the field, not one per rescan of the directory
    // (the second policy's file write made the agent read the first again).
    let log = lab.node().agent_log();
    for name in ["a/db-from-api", "a/web-from-api"] {
        let said = format!("NetworkPolicy {name} rejected: {BAD_PORT}");
        let errors = log
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains(&said))
            .count();
        assert_eq!(errors, 1, "`{said}` logged {errors} times:\n{log}");
    }
    Ok(())
}

#[test]
fn a_pod_cannot_send_from_a_forged_address_or_mac() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    // a/db takes connections from b/web only: forging b/web's address would be the way in.
    lab.apply(
        &policy(
            "a",
            "spoof-db-from-b-web",
            "\
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {team: b}}
    podSelector: {matchLabels: {app: web}}",
        ),
        &[],
    )?;
    let attacker = lab.pod(A_WEB);
    let victim_ip = lab.pod(B_WEB).ip();
    // A listener of its own on a/db: it sees whatever arrives, whether it could answer or not.
    const PORT: u16 = 7;
    let listener = lab
        .pod(A_DB)
        .netns()
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)))?
        .map_err(Error::io("binding the listener on a/db"))?;
    listener
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(Error::io("setting a read timeout"))?;
    let target = SocketAddr::from((lab.pod(A_DB).ip(), PORT));
    let send_from = |netns: &Netns, source: Ipv4Addr, payload: &'static [u8]| -> Result<()> {
        netns
            .run(|| {
                let socket = UdpSocket::bind((source, 0))?;
                for _ in 0..5 {
                    socket.send_to(payload, target)?;
                }
                Ok::<_, io::Error>(())
            })?
            .map_err(Error::io(format!("sending from {source} to {target}")))
    };
    let received = |within: Duration| -> Vec<(Vec<u8>, SocketAddr)> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            if let Ok((n, from)) = listener.recv_from(&mut buf) {
                got.push((buf[..n].to_vec(), from));
            }
        }
        got
    };

    // The real b/web gets through: the listener and the policy work.
    send_from(lab.pod(B_WEB).netns(), victim_ip, b"genuine")?;
    let got = received(Duration::from_millis(500));
    assert!(
        got.iter().any(|(payload, _)| payload == b"genuine"),
        "b/web's own datagrams did not reach a/db: {got:?}"
    );

    attacker
        .netns()
        .ip(&["addr", "add", &format!("{victim_ip}/32"), "dev", "eth0"])?;
    let spoofed_before = drops(&lab, "spoofed-source-ip")?;
    send_from(attacker.netns(), victim_ip, b"forged")?;
    let got = received(Duration::from_millis(500));
    assert!(
        got.is_empty(),
        "datagrams from a/web with b/web's address as source reached a/db: {got:?}"
    );
    let spoofed = drops(&lab, "spoofed-source-ip")? - spoofed_before;
    assert!(
        spoofed >= 5,
        "spoofed-source-ip rose by {spoofed}, expected at least the 5 forged datagrams"
    );
    attacker
        .netns()
        .ip(&["addr", "del", &format!("{victim_ip}/32"), "dev", "eth0"])?;

    // A forged MAC: nothing a/web sends passes until its own MAC is back.
    let real_mac = lab
        .node()
        .endpoints()?
        .into_iter()
        .find(|e| e.ip == attacker.ip())
        .map(|e| e.mac.to_string())
        .ok_or_else(|| Error::Traffic {
            what: "the agent has no endpoint for a/web".into(),
        })?;
    let a_web_to_b_api = || vec![probe(A_WEB, B_API, Tcp(80)), probe(A_WEB, B_API, Udp(80))];
    attacker
        .netns()
        .ip(&["link", "set", "eth0", "address", "02:00:00:00:be:ef"])?;
    let forged_before = drops(&lab, "spoofed-source-mac")?;
    assert_probes(&lab, a_web_to_b_api(), |_| false, "a/web with a forged MAC")?;
    assert!(
        drops(&lab, "spoofed-source-mac")? > forged_before,
        "spoofed-source-mac did not rise while a/web sent with a forged MAC"
    );
    attacker
        .netns()
        .ip(&["link", "set", "eth0", "address", &real_mac])?;
    assert_probes(
        &lab,
        a_web_to_b_api(),
        |_| true,
        "a/web with its own MAC again",
    )?;
    Ok(())
}

/// Outcomes of a probe repeated every [`PROBE_EVERY`]: when each started and whether it passed.
#[derive(Default)]
struct ProbeLog(Mutex<Vec<(Instant, bool)>>);

const PROBE_EVERY: Duration = Duration::from_millis(50);

impl ProbeLog {
    fn push(&self, started: Instant, passed: bool) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((started, passed));
    }

    /// Waits until a probe started after `since` has `passed`; returns when it started.
    fn first_after(&self, since: Instant, passed: bool, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .find(|(at, ok)| *at >= since && *ok == passed)
                .map(|(at, _)| *at);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Outcomes of the probes that started in `from..to`.
    fn between(&self, from: Instant, to: Instant) -> Vec<bool> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, ok)| *ok)
            .collect()
    }
}

/// Runs `body` while a TCP probe from `from` to port 80 of `to` starts every [`PROBE_EVERY`].
fn with_continuous_probe(
    lab: &PolicyLab,
    from: LabPod,
    to: LabPod,
    body: impl FnOnce(&ProbeLog) -> Result<()>,
) -> Result<()> {
    /// Stops the prober also when `body` panics, so that the scope can end.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let log = ProbeLog::default();
    let stop = AtomicBool::new(false);
    let addr = SocketAddr::from((lab.pod(to).ip(), 80));
    thread::scope(|scope| {
        let stopper = StopOnDrop(&stop);
        let prober = scope.spawn(|| {
            lab.pod(from).netns().run(|| {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    // A new connection each time: each one meets the policy as it is now.
                    let passed = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                        .and_then(|mut s| s.write_all(b"probe\n"))
                        .is_ok();
                    log.push(started, passed);
                    thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed()));
                }
            })
        });
        let outcome = body(&log);
        drop(stopper);
        let probed = prober
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        probed.and(outcome)
    })
}

/// Relabels with `leave` (moving `client` out of the policy), then `rejoin`; asserts that
/// probes fail, then pass again, each within a bounded time, that the client's connections
/// opened before are cut, and prints both delays.
fn assert_moves_out_and_back(
    lab: &PolicyLab,
    log: &ProbeLog,
    client: LabPod,
    what: &str,
    leave: impl FnOnce() -> Result<Instant>,
    rejoin: impl FnOnce() -> Result<Instant>,
) -> Result<()> {
    const BOUND: Duration = Duration::from_secs(5);
    let established = Flows::open(lab, client, A_DB)?;
    let (tcp, udp) = established.exchange(TRAFFIC_TIMEOUT);
    assert!(
        tcp.is_ok() && udp.is_ok(),
        "{what}: {client} -> a/db before the relabel: tcp {tcp:?}, udp {udp:?}"
    );
    let left = leave()?;
    let Some(first_failure) = log.first_after(left, false, BOUND) else {
        panic!(
            "{what}: probes still pass {BOUND:?} after the relabel moved the client out\n\
             --- agent log (tail) ---\n{}",
            lab.agent_log_tail(30)
        );
    };
    // Connections opened before the relabel are cut too, at their next packet. Meanwhile
    // more probes run: once out, the client stays out.
    let (tcp, udp) = established.exchange(Duration::from_secs(1));
    assert!(
        tcp.is_err() && udp.is_err(),
        "{what}: {client}'s established connections to a/db still pass after it moved out: \
         tcp {tcp:?}, udp {udp:?}"
    );
    let rejoined = rejoin()?;
    let after_failure = log.between(first_failure, rejoined);
    assert!(
        after_failure.iter().all(|passed| !passed),
        "{what}: probes passed again after the first failure, before the relabel back: \
         {after_failure:?}"
    );
    let Some(first_success) = log.first_after(rejoined, true, BOUND) else {
        panic!(
            "{what}: probes still fail {BOUND:?} after the relabel moved the client back in\n\
             --- agent log (tail) ---\n{}",
            lab.agent_log_tail(30)
        );
    };
    eprintln!(
        "{what}: first failing probe {} ms after the file write; first passing probe {} ms \
         after the write back (probes every {} ms)",
        first_failure.duration_since(left).as_millis(),
        first_success.duration_since(rejoined).as_millis(),
        PROBE_EVERY.as_millis()
    );
    Ok(())
}

#[test]
fn relabelling_a_pod_or_its_namespace_moves_it_in_and_out_of_a_policy_while_traffic_runs()
-> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    lab.apply(
        &policy(
            "a",
            "relabel-db-from-granted",
            "\
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - podSelector: {matchLabels: {access: granted}}
  - namespaceSelector: {matchLabels: {access: granted}}",
        ),
        &[],
    )?;
    let granted = |pod: LabPod| {
        let mut labels = pod.labels();
        labels.push(("access", "granted"));
        labels
    };

    // a/web in, by its own label; then out and back.
    let moved_in = lab.set_pod_labels(A_WEB, &granted(A_WEB))?;
    with_continuous_probe(&lab, A_WEB, A_DB, |log| {
        assert!(
            log.first_after(moved_in, true, APPLY_TIMEOUT).is_some(),
            "a/web does not reach a/db after getting the label the policy allows"
        );
        assert_moves_out_and_back(
            &lab,
            log,
            A_WEB,
            "pod label",
            || lab.set_pod_labels(A_WEB, &A_WEB.labels()),
            || lab.set_pod_labels(A_WEB, &granted(A_WEB)),
        )
    })?;

    // b/web in, by its namespace's label; then out and back.
    let moved_in = lab.set_namespace_labels("b", &[("team", "b"), ("access", "granted")])?;
    with_continuous_probe(&lab, B_WEB, A_DB, |log| {
        assert!(
            log.first_after(moved_in, true, APPLY_TIMEOUT).is_some(),
            "b/web does not reach a/db after its namespace got the label the policy allows"
        );
        assert_moves_out_and_back(
            &lab,
            log,
            B_WEB,
            "namespace label",
            || lab.set_namespace_labels("b", &[("team", "b")]),
            || lab.set_namespace_labels("b", &[("team", "b"), ("access", "granted")]),
        )
    })
}

/// Waits up to `timeout` for an event matching `wanted`; on failure, says what did arrive.
fn await_event(
    events: &mpsc::Receiver<FlowEvent>,
    timeout: Duration,
    wanted: impl Fn(&FlowEvent) -> bool,
) -> std::result::Result<FlowEvent, Vec<FlowEvent>> {
    let deadline = Instant::now() + timeout;
    let mut others = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(e) if wanted(&e) => return Ok(e),
            Ok(e) => others.push(e),
            Err(_) => break,
        }
    }
    Err(others)
}

/// Sends one datagram from `from` to port 80 of `to`; returns the source address it used.
fn send_datagram(lab: &PolicyLab, from: LabPod, to: LabPod) -> Result<SocketAddr> {
    let target = SocketAddr::from((lab.pod(to).ip(), 80));
    let source = lab.pod(from).ip();
    lab.pod(from)
        .netns()
        .run(|| {
            let socket = UdpSocket::bind((source, 0))?;
            socket.send_to(b"event?\n", target)?;
            socket.local_addr()
        })?
        .map_err(Error::io(format!("sending from {from} to {target}")))
}

#[test]
fn drop_and_allowed_events_name_the_flow_the_reason_and_both_identities() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    lab.apply(
        &documents(&[
            policy(
                "a",
                "events-db-from-api",
                "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]",
            ),
            policy(
                "b",
                "events-web-no-egress",
                "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]",
            ),
        ]),
        &[],
    )?;
    let endpoints: BTreeMap<Ipv4Addr, (u32, u32)> = lab
        .node()
        .endpoints()?
        .into_iter()
        .map(|e| (e.ip, (e.id, e.identity)))
        .collect();
    let of = |pod: LabPod| {
        endpoints
            .get(&lab.pod(pod).ip())
            .copied()
            .unwrap_or_default()
    };

    // The stream ends when the agent stops (the lab's node goes at the end of the test) or
    // when nobody receives any more.
    let (tx, events) = mpsc::channel();
    let client = lab.node().client();
    thread::spawn(move || client.events(&FlowFilter::default(), |e| tx.send(e).is_ok()));
    // Denied datagrams until the stream shows one.
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        send_datagram(&lab, B_API, A_DB)?;
        if events.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event arrived within {APPLY_TIMEOUT:?} of opening the stream"
        );
    }

    let db = lab.pod(A_DB).ip();
    let node = lab.node().name().to_string();
    let pod_ref = |p: LabPod| PodRef {
        namespace: p.namespace.into(),
        name: p.app.into(),
    };
    let denied_by = |namespace: &str, name: &str| PolicyCheck::Denied {
        isolated_by: vec![PolicyName {
            namespace: namespace.into(),
            name: name.into(),
        }],
    };
    // The time is the datapath's; everything else is known.
    let untimed = |got: std::result::Result<FlowEvent, Vec<FlowEvent>>| {
        got.map(|e| FlowEvent {
            time: String::new(),
            ..e
        })
    };
    let source = send_datagram(&lab, B_API, A_DB)?;
    let expected = FlowEvent {
        time: String::new(),
        node: node.clone(),
        kind: "drop".into(),
        reason: Some("policy-denied-ingress".into()),
        direction: "ingress".into(),
        point: "from-pod".into(),
        protocol: "udp".into(),
        src: source.to_string(),
        dst: format!("{db}:80"),
        src_name: B_API.to_string(),
        dst_name: A_DB.to_string(),
        src_pod: Some(pod_ref(B_API)),
        dst_pod: Some(pod_ref(A_DB)),
        src_endpoint: of(B_API).0,
        dst_endpoint: of(A_DB).0,
        src_identity: of(B_API).1,
        dst_identity: of(A_DB).1,
        egress: Some(PolicyCheck::NotIsolated),
        ingress: Some(denied_by("a", "events-db-from-api")),
        service: None,
    };
    let got = untimed(await_event(&events, TRAFFIC_TIMEOUT, |e| {
        e.src == expected.src
    }));
    assert_eq!(got.as_ref().ok(), Some(&expected), "events: {got:?}");

    let source = send_datagram(&lab, B_WEB, A_WEB)?;
    let expected = FlowEvent {
        time: String::new(),
        node: node.clone(),
        kind: "drop".into(),
        reason: Some("policy-denied-egress".into()),
        direction: "egress".into(),
        point: "from-pod".into(),
        protocol: "udp".into(),
        src: source.to_string(),
        dst: format!("{}:80", lab.pod(A_WEB).ip()),
        src_name: B_WEB.to_string(),
        dst_name: A_WEB.to_string(),
        src_pod: Some(pod_ref(B_WEB)),
        dst_pod: Some(pod_ref(A_WEB)),
        src_endpoint: of(B_WEB).0,
        dst_endpoint: of(A_WEB).0,
        src_identity: of(B_WEB).1,
        dst_identity: of(A_WEB).1,
        egress: Some(denied_by("b", "events-web-no-egress")),
        ingress: None,
        service: None,
    };
    let got = untimed(await_event(&events, TRAFFIC_TIMEOUT, |e| {
        e.src == expected.src
    }));
    assert_eq!(got.as_ref().ok(), Some(&expected), "events: {got:?}");

    let target = SocketAddr::from((db, 80));
    let stream = lab
        .pod(A_API)
        .netns()
        .run(|| TcpStream::connect_timeout(&target, TRAFFIC_TIMEOUT))?
        .map_err(Error::io("connecting a/api to a/db"))?;
    let source = stream
        .local_addr()
        .map_err(Error::io("reading the connection's address"))?;
    let got = await_event(&events, TRAFFIC_TIMEOUT, |e| {
        e.src == source.to_string() && e.kind == "allowed"
    });
    let allowed = got.unwrap_or_else(|others| {
        panic!("no allowed event for the new connection {source} -> {target}: {others:?}")
    });
    assert_eq!(
        (
            allowed.reason.as_deref(),
            allowed.protocol.as_str(),
            allowed.dst.as_str(),
            (allowed.src_endpoint, allowed.src_identity),
            (allowed.dst_endpoint, allowed.dst_identity),
            allowed.ingress.clone(),
        ),
        (
            None,
            "tcp",
            target.to_string().as_str(),
            of(A_API),
            of(A_DB),
            Some(PolicyCheck::Allowed {
                rules: vec![PolicyRule {
                    namespace: "a".into(),
                    name: "events-db-from-api".into(),
                    direction: "ingress".into(),
                    rule: 0,
                }],
            }),
        ),
        "{allowed:?}"
    );
    Ok(())
}

/// A lab where a/api carries a/web's labels: one identity for two pods whose container port
/// `http` is TCP 80 on a/web and TCP 81 on a/api.
fn lab_with_twins(run: &RunPrefix) -> Result<PolicyLab> {
    let lab = PolicyLab::start(run)?;
    // Written before the policy: once the policy is in force, so is the relabel.
    lab.set_pod_labels(A_API, &A_WEB.labels())?;
    Ok(lab)
}

/// b/web's probes of TCP 80 and 81 on both twins; `http` means 80 on a/web and 81 on a/api.
fn probes_of_twins() -> (Vec<Probe>, fn(&Probe) -> bool) {
    let mut probes = Vec::new();
    for to in [A_WEB, A_API] {
        for port in [80, 81] {
            probes.push(probe(B_WEB, to, Tcp(port)));
        }
    }
    (probes, |p| {
        (p.to.is("a", "web") && p.service == Tcp(80))
            || (p.to.is("a", "api") && p.service == Tcp(81))
    })
}

#[test]
fn an_ingress_named_port_resolves_per_pod_among_pods_sharing_labels() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = lab_with_twins(&run)?;
    lab.apply(
        &policy(
            "a",
            "twins-ingress-http",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- ports: [{port: http}]",
        ),
        &[],
    )?;
    let (probes, expect) = probes_of_twins();
    assert_probes(
        &lab,
        probes,
        expect,
        "ingress to http of pods sharing labels",
    )
}

#[test]
fn an_egress_named_port_resolves_per_destination_pod_among_pods_sharing_labels() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = lab_with_twins(&run)?;
    lab.apply(
        &policy(
            "b",
            "twins-egress-http",
            "podSelector: {}\npolicyTypes: [Egress]\negress:\n- ports: [{port: http}]",
        ),
        &[],
    )?;
    let (probes, expect) = probes_of_twins();
    assert_probes(
        &lab,
        probes,
        expect,
        "egress to http of pods sharing labels",
    )
}

/// `myelinctl policy explain` as an operator runs it: the rule that admits a flow, the
/// policies that isolate a pod a flow cannot reach, hypothetical pods by labels, addresses,
/// and clear refusals of questions it cannot answer.
#[test]
fn policy_explain_names_the_rule_or_the_isolating_policies() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    let yaml = documents(&[
        policy(
            "a",
            "db-from-api",
            "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: web}}}]
  ports: [{port: 81}]
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{port: 80, protocol: TCP}]",
        ),
        policy("a", "deny-all", "podSelector: {}\npolicyTypes: [Ingress]"),
    ]);
    lab.apply(&yaml, &[])?;
    let ctl = |args: &[&str]| lab.node().myelinctl(args);
    let name = |p: LabPod| format!("a/{}", lab.pod(p).name());
    let (api, db, web) = (name(A_API), name(A_DB), name(A_WEB));

    let allowed = ctl(&[
        "policy", "explain", "--from", &api, "--to", &db, "--port", "80/TCP",
    ])?;
    let lines: Vec<&str> = allowed.lines().collect();
    assert_eq!(lines.get(2), Some(&"egress:  not isolated"), "{allowed}");
    assert_eq!(
        lines.get(3),
        Some(&"ingress: allowed by a/db-from-api ingress[1]"),
        "{allowed}"
    );
    assert_eq!(lines.get(4), Some(&"verdict: ALLOWED"), "{allowed}");

    let denied = ctl(&[
        "policy", "explain", "--from", &web, "--to", &db, "--port", "80",
    ])?;
    assert!(
        denied.contains("ingress: default-deny by a/db-from-api, a/deny-all")
            && denied.contains("verdict: DENIED"),
        "{denied}"
    );
    // The datapath agrees.
    let probe = |from, service| lab.probe(&[self::probe(from, A_DB, service)], TRAFFIC_TIMEOUT);
    assert!(probe(A_API, Tcp(80))?[0].is_ok());
    assert!(probe(A_WEB, Tcp(80))?[0].is_err());

    // A pod that does not exist, by its labels, in JSON.
    let json = ctl(&[
        "--json",
        "policy",
        "explain",
        "--from-labels",
        "app=web,tier=front",
        "--from-namespace",
        "a",
        "--to",
        &db,
        "--port",
        "81/udp",
    ])?;
    let answer: serde_json::Value = serde_json::from_str(&json)
        .map_err(Error::json(format!("policy explain --json printed {json}")))?;
    assert_eq!(answer["allowed"], false, "{json}");
    assert_eq!(answer["protocol"], "UDP", "{json}");
    assert_eq!(answer["ingress"]["verdict"], "denied", "{json}");
    assert_eq!(
        answer["ingress"]["isolatedBy"],
        serde_json::json!([
            {"namespace": "a", "name": "db-from-api"},
            {"namespace": "a", "name": "deny-all"}
        ]),
        "{json}"
    );
    let tcp81 = ctl(&[
        "policy",
        "explain",
        "--from-labels",
        "app=web",
        "--from-namespace",
        "a",
        "--to",
        &db,
        "--port",
        "81",
    ])?;
    assert!(
        tcp81.contains("allowed by a/db-from-api ingress[0]"),
        "{tcp81}"
    );
    // The node reaches its own pods whatever the policies say.
    let gateway = lab.node().gateway().to_string();
    let from_node = ctl(&[
        "policy",
        "explain",
        "--from-ip",
        &gateway,
        "--to",
        &db,
        "--port",
        "22",
    ])?;
    assert!(
        from_node.contains("ingress: own node (always allowed)") && from_node.contains("ALLOWED"),
        "{from_node}"
    );

    // Questions it cannot answer are refused, saying why.
    for (args, says) in [
        (
            vec!["--from", "a/nobody", "--to", db.as_str(), "--port", "80"],
            "no pod a/nobody is known",
        ),
        (
            vec![
                "--from",
                api.as_str(),
                "--to",
                db.as_str(),
                "--port",
                "80/ICMP",
            ],
            "unknown protocol",
        ),
        (
            vec!["--from", api.as_str(), "--to", db.as_str(), "--port", "0"],
            "1 to 65535",
        ),
        (
            vec![
                "--from",
                api.as_str(),
                "--from-ip",
                "10.0.0.1",
                "--to",
                db.as_str(),
                "--port",
                "80",
            ],
            "cannot be used with",
        ),
    ] {
        let mut full = vec!["policy", "explain"];
        full.extend(args);
        match ctl(&full) {
            Ok(out) => panic!("myelinctl {full:?} succeeded: {out}"),
            Err(e) => {
                let text = format!("{e:?}");
                assert!(text.contains(says), "myelinctl {full:?}: {text}");
            }
        }
    }
    Ok(())
}
