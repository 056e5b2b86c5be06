//! Flow events with real traffic through the real agent: the policy attribution of allowed
//! flows (the rule) and of drops (the isolating policies), checked against `policy explain`;
//! the flow log's ring (`myelinctl flows`), its filters and its count of lost events.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use myelin_api::{FlowFilter, FlowsResponse};
use myelin_tests::{
    Error, NodeSpec, Result,
    policy_lab::{
        APPLY_TIMEOUT, LabHost, LabPod, PolicyLab, Probe, check_attribution, filter_of, flows,
        name_of, policy,
    },
    probe::Service::{Tcp, Udp},
    root_test,
    traffic::Host,
};

const A_WEB: LabPod = LabPod::new("a", "web");
const A_API: LabPod = LabPod::new("a", "api");
const A_DB: LabPod = LabPod::new("a", "db");
const B_WEB: LabPod = LabPod::new("b", "web");
const B_API: LabPod = LabPod::new("b", "api");

/// Policies whose truth table has every kind of answer: rules that admit (one of two rules, and
/// the same key from two policies, where the first in order is the one the datapath names),
/// pods isolated by two policies at once, egress isolation, and pods no policy selects.
fn attribution_policies() -> String {
    [
        // a/db: isolated by two policies; api reaches it on TCP 80 (both give that key, and
        // `db-from-api` comes first), web on UDP 81 (the second rule of `db-from-api`).
        policy(
            "a",
            "db-from-api",
            "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{port: 80}]
- from: [{podSelector: {matchLabels: {app: web}}}]
  ports: [{protocol: UDP, port: 81}]",
        ),
        policy(
            "a",
            "db-only-api",
            "\
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{podSelector: {matchLabels: {app: api}}}]
  ports: [{port: 80}]",
        ),
        // b: every pod isolated for ingress, nothing admitted.
        policy("b", "deny-all", "podSelector: {}"),
        // a/web: egress only to namespace b's web on TCP 80.
        policy(
            "a",
            "web-egress",
            "\
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: web}}}]
  ports: [{port: 80}]",
        ),
    ]
    .join("---\n")
}

#[test]
fn flow_events_name_the_rule_that_allowed_and_the_policies_that_denied_as_explain_does()
-> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start(&run)?;
    lab.apply(&attribution_policies(), &[])?;
    let pods = [A_WEB, A_API, A_DB, B_WEB, B_API];
    let mut probes = Vec::new();
    for from in pods {
        for to in pods.into_iter().filter(|to| *to != from) {
            for service in [Tcp(80), Udp(81)] {
                probes.push(Probe {
                    from: LabHost::Pod(from),
                    to: LabHost::Pod(to),
                    service,
                });
            }
        }
    }
    // No monitor runs: the flow log alone has the events.
    let mut failures = Vec::new();
    let mut counts = (0, 0);
    for probe in &probes {
        let explained = lab.explain(probe)?.ok_or_else(|| Error::Traffic {
            what: format!("{probe}: no explanation"),
        })?;
        let outcome = lab.probe(std::slice::from_ref(probe), Duration::from_millis(400))?;
        if outcome[0].is_ok() != explained.allowed {
            failures.push(format!(
                "{probe}: traffic {:?}, explain says allowed={}",
                outcome[0], explained.allowed
            ));
            continue;
        }
        // Events reach the ring within the reader's wake-up.
        let deadline = Instant::now() + Duration::from_secs(2);
        let result = loop {
            let events = flows(
                &lab,
                &filter_of(&lab, probe).expect("pod-to-pod TCP or UDP"),
                50,
            )?
            .flows;
            let result = check_attribution(probe, &explained, &events);
            if result.is_ok() || Instant::now() > deadline {
                break result;
            }
            thread::sleep(Duration::from_millis(50));
        };
        match result {
            Ok(()) if explained.allowed => counts.0 += 1,
            Ok(()) => counts.1 += 1,
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{} probes: {} allowed and {} dropped flows attributed as explain says",
        probes.len(),
        counts.0,
        counts.1
    );
    assert!(
        failures.is_empty(),
        "{} of {} probes:\n{}",
        failures.len(),
        probes.len(),
        failures.join("\n")
    );
    assert!(
        counts.0 >= 4 && counts.1 >= 10,
        "the table must have both kinds"
    );

    // Two specific answers, so that a wrong order of rules cannot pass as "one of them".
    let api_to_db = flows(
        &lab,
        &FlowFilter {
            from: Some(name_of(&lab, A_API)),
            to: Some(name_of(&lab, A_DB)),
            verdict: Some("allowed".into()),
            port: Some(80),
            ..FlowFilter::default()
        },
        1,
    )?;
    let line = api_to_db.flows.first().map(ToString::to_string);
    assert!(
        line.as_deref()
            .is_some_and(|l| l.ends_with("allowed by a/db-from-api ingress[0]")),
        "the first rule in policy order names a key two policies give: {line:?}"
    );
    let web_to_db = flows(
        &lab,
        &FlowFilter {
            from: Some(name_of(&lab, A_WEB)),
            to: Some(name_of(&lab, A_DB)),
            verdict: Some("drop".into()),
            port: Some(80),
            ..FlowFilter::default()
        },
        1,
    )?;
    let line = web_to_db.flows.first().map(ToString::to_string);
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains("default-deny by a/web-egress")),
        "a/web's egress isolation drops it first: {line:?}"
    );

    // The filters, through myelinctl as an operator runs it.
    let json = lab.node().myelinctl(&[
        "flows",
        "--json",
        "--last",
        "1000",
        "--namespace",
        "b",
        "--verdict",
        "drop",
    ])?;
    let got: FlowsResponse =
        serde_json::from_str(&json).map_err(Error::json("myelinctl flows --json"))?;
    assert!(!got.flows.is_empty(), "namespace b dropped flows");
    for e in &got.flows {
        let in_b = [&e.src_pod, &e.dst_pod]
            .iter()
            .any(|p| p.as_ref().is_some_and(|p| p.namespace == "b"));
        assert!(in_b && e.kind == "drop", "{e}");
    }
    let text = lab.node().myelinctl(&[
        "flows",
        "--pod",
        &name_of(&lab, B_API),
        "--port",
        "81",
        "--verdict",
        "drop",
    ])?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("# kept "), "{text}");
    let rest: Vec<&str> = lines.collect();
    assert!(!rest.is_empty(), "{text}");
    for line in rest {
        assert!(
            line.contains(&name_of(&lab, B_API)) && line.contains(":81 ") && line.contains("drop"),
            "{line}"
        );
    }
    let refused = lab
        .node()
        .client()
        .flows(
            &FlowFilter {
                verdict: Some("maybe".into()),
                ..FlowFilter::default()
            },
            10,
        )
        .expect_err("an invalid verdict is refused");
    assert!(refused.to_string().contains("verdict"), "{refused}");
    Ok(())
}

/// Sends one datagram from `from` to UDP 80 of `to` (denied by the test's policy); returns its
/// source port.
fn send_denied(lab: &PolicyLab, from: LabPod, to: LabPod) -> Result<u16> {
    let target = SocketAddr::from((lab.pod(to).ip(), 80));
    let source = lab.pod(from).ip();
    lab.pod(from)
        .netns()
        .run(|| {
            let socket = UdpSocket::bind((source, 0))?;
            socket.send_to(b"flow?\n", target)?;
            Ok::<_, std::io::Error>(socket.local_addr()?.port())
        })?
        .map_err(Error::io(format!("sending from {from} to {target}")))
}

#[test]
fn the_flow_log_keeps_the_latest_events_and_counts_what_the_rate_limit_lost() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let lab = PolicyLab::start_with(
        &run,
        NodeSpec::new("flowlog").agent_args(&["--flow-buffer", "8", "--flow-events-rate", "20"]),
    )?;
    lab.apply(&policy("a", "log-deny-all", "podSelector: {}"), &[])?;

    // Slowly, well within 20 events/s per CPU: every drop is reported, the ring keeps 8.
    let mut ports = Vec::new();
    for _ in 0..12 {
        ports.push(send_denied(&lab, B_WEB, A_DB)?);
        thread::sleep(Duration::from_millis(120));
    }
    let deadline = Instant::now() + APPLY_TIMEOUT;
    let kept = loop {
        let got = flows(&lab, &FlowFilter::default(), 100)?;
        let last_port = got.flows.last().map(|e| e.src.clone());
        if last_port.is_some_and(|src| src.ends_with(&format!(":{}", ports[11])))
            || Instant::now() > deadline
        {
            break got;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let kept_ports: Vec<String> = kept
        .flows
        .iter()
        .map(|e| e.src.rsplit(':').next().unwrap_or_default().to_string())
        .collect();
    let latest: Vec<String> = ports[4..].iter().map(u16::to_string).collect();
    assert_eq!(kept_ports, latest, "the ring keeps the latest 8: {kept:#?}");
    assert_eq!(
        (kept.log.capacity, kept.log.buffered, kept.log.rate_per_cpu),
        (8, 8, 20)
    );
    assert_eq!(kept.log.lost.rate_limited, 0, "{:?}", kept.log);

    // A burst far beyond it: most are not reported, and counted.
    for _ in 0..300 {
        send_denied(&lab, B_WEB, A_DB)?;
    }
    let status = lab.node().status()?;
    let log = status
        .flows
        .ok_or_else(|| Error::Cluster("status has no flow log".into()))?;
    assert!(
        log.lost.rate_limited >= 300 - 2 * 2 * 20,
        "at most 20 per CPU and second are reported: {log:?}"
    );
    let text = lab.node().myelinctl(&["status"])?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("flow log:") && l.contains("rate-limited")),
        "{text}"
    );
    let (_, metrics) = lab.node().metrics_get("/metrics")?;
    let lost = metrics
        .lines()
        .find(|l| l.starts_with(r#"myelin_flow_events_lost_total{cause="rate-limited"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        lost.is_some_and(|n| n >= log.lost.rate_limited),
        "metrics: {metrics}"
    );
    Ok(())
}
