//! Services with `--kube-proxy-replacement`: Service and EndpointSlice objects, from the
//! directory source and from the test API server, reach the agent's translation, which
//! `myelinctl services` (`GET /v1/services`) shows: frontends, the backends each sends to, and
//! every endpoint's state. Without the flag the agent neither reads nor lists them.
//!
//! The datapath's use of the translation (packets to a ClusterIP reaching a backend) is tested
//! with the eBPF programs, in tests of their own.

use std::{
    thread,
    time::{Duration, Instant},
};

use myelin_api::{BackendState, FrontendKind, ServiceStatus, ServiceSummary};
use myelin_common::config::CONFIG_F_SERVICES;
use myelin_tests::{
    Error, Node, NodeSpec, Result,
    apiserver::{KubernetesNode, Resource},
    cluster::{endpoint_slice_object, service_object, slice_endpoint},
    metrics::samples,
    root_test,
};
use serde_json::{Value, json};

/// A change reaches the agent in milliseconds (the directory source debounces 100 ms); the
/// margin is for a loaded machine.
const PROMPT: Duration = Duration::from_secs(10);

fn web_service() -> Value {
    service_object(
        "default",
        "web",
        json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.10",
            "ports": [
                { "name": "http", "port": 80, "targetPort": "http", "nodePort": 30080 },
                { "name": "dns", "port": 53, "protocol": "UDP" },
            ],
            "sessionAffinity": "ClientIP",
        }),
    )
}

fn web_slice(node: &str, endpoints: &[(&str, bool, bool)]) -> Value {
    let endpoints = endpoints
        .iter()
        .map(|(a, ready, terminating)| slice_endpoint(a, *ready, *terminating, node))
        .collect();
    endpoint_slice_object("default", "web-abc12", "web", endpoints, &[("http", 8080)])
}

/// The `CONFIG_F_*` flags of the node's pinned datapath config.
fn datapath_flags(node: &Node) -> Result<u64> {
    node.dump_map("config")?
        .iter()
        // bpftool puts the BTF-decoded entry under "formatted" when it also prints raw bytes.
        .map(|e| e.get("formatted").unwrap_or(e))
        .find_map(|e| e["value"]["flags"].as_u64())
        .ok_or_else(|| Error::Cluster("the config map has no flags".into()))
}

fn services(node: &Node) -> Result<ServiceStatus> {
    let json = node.myelinctl(&["services", "--json"])?;
    serde_json::from_str(&json).map_err(Error::json("myelinctl services --json"))
}

/// Polls `myelinctl services --json` until `done` holds for Service default/web.
fn wait_for_web(
    node: &Node,
    what: &str,
    done: impl Fn(&ServiceSummary) -> bool,
) -> Result<ServiceSummary> {
    let deadline = Instant::now() + PROMPT;
    loop {
        let status = services(node)?;
        let web = status
            .services
            .iter()
            .find(|s| s.namespace == "default" && s.name == "web");
        if let Some(web) = web
            && done(web)
        {
            return Ok(web.clone());
        }
        if Instant::now() >= deadline {
            return Err(Error::Cluster(format!(
                "{what}: not shown within {PROMPT:?}; myelinctl services: {status:#?}"
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The backends of frontend `kind` of port `port`, as `address:port`.
fn backends_of(web: &ServiceSummary, port: u16, kind: FrontendKind) -> Option<Vec<String>> {
    web.ports
        .iter()
        .find(|p| p.port == port)?
        .frontends
        .iter()
        .find(|f| f.kind == kind)
        .map(|f| f.backends.iter().map(ToString::to_string).collect())
}

#[test]
fn services_in_the_directory_reach_myelinctl_services_with_their_backends() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(
        &run,
        NodeSpec::new("svcdir").agent_args(&["--kube-proxy-replacement", "true"]),
    )?;
    let backend = |last: u8| {
        let prefix = node.pod_cidr().rsplit_once('.').map_or("", |(p, _)| p);
        format!("{prefix}.{last}")
    };
    let (a, b) = (backend(5), backend(6));
    node.cluster().write(
        "web",
        &[
            web_service(),
            web_slice(node.name(), &[(&a, true, false), (&b, false, true)]),
        ],
    )?;
    let web = wait_for_web(&node, "web with its ready backend", |web| {
        backends_of(web, 80, FrontendKind::ClusterIp) == Some(vec![format!("{a}:8080")])
    })?;
    assert!(node.status()?.kube_proxy_replacement);
    assert_ne!(
        datapath_flags(&node)? & u64::from(CONFIG_F_SERVICES),
        0,
        "the datapath is told to translate"
    );
    assert_eq!(web.type_, "NodePort");
    assert_eq!(web.affinity_timeout_seconds, Some(10_800));
    let http = &web.ports[0];
    let states: Vec<(String, BackendState)> = http
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.state))
        .collect();
    assert_eq!(
        states,
        [
            (a.clone(), BackendState::Ready),
            (b.clone(), BackendState::ServingTerminating),
        ]
    );
    assert_eq!(
        backends_of(&web, 53, FrontendKind::ClusterIp),
        Some(vec![]),
        "UDP 53 has no slice port: a frontend without backends"
    );

    // The ready endpoint goes: the terminating one serves.
    node.cluster().write(
        "web",
        &[web_service(), web_slice(node.name(), &[(&b, false, true)])],
    )?;
    wait_for_web(&node, "the terminating endpoint as the fallback", |web| {
        backends_of(web, 80, FrontendKind::ClusterIp) == Some(vec![format!("{b}:8080")])
    })?;
    let table = node.myelinctl(&["services"])?;
    assert!(
        table.contains("default/web") && table.contains("10.96.0.10:53/UDP -> NO BACKEND"),
        "{table}"
    );
    let (_, body) = node.metrics_get("/metrics")?;
    let metrics = samples(&body);
    assert_eq!(metrics.get("myelin_services"), Some(&1.0), "{body}");
    assert_eq!(
        metrics.get("myelin_service_frontends_without_backend"),
        Some(&1.0),
        "UDP 53: {body}"
    );

    // A malformed edit is refused; the last good state stays.
    node.cluster().write_yaml(
        "web",
        "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.300}\n",
    )?;
    thread::sleep(Duration::from_millis(500));
    assert!(
        backends_of(
            &wait_for_web(&node, "web", |_| true)?,
            80,
            FrontendKind::ClusterIp
        )
        .is_some_and(|backends| backends == [format!("{b}:8080")]),
        "the last good version stays"
    );
    node.cluster().remove("web")?;
    let deadline = Instant::now() + PROMPT;
    while !services(&node)?.services.is_empty() {
        assert!(Instant::now() < deadline, "web removed within {PROMPT:?}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn without_kube_proxy_replacement_services_are_not_read() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("svcoff"))?;
    node.cluster().write(
        "web",
        &[
            web_service(),
            web_slice(node.name(), &[("10.244.0.5", true, false)]),
        ],
    )?;
    thread::sleep(Duration::from_millis(500));
    assert_eq!(services(&node)?, ServiceStatus::default());
    assert!(!node.status()?.kube_proxy_replacement);
    assert_eq!(datapath_flags(&node)? & u64::from(CONFIG_F_SERVICES), 0);
    let table = node.myelinctl(&["services"])?;
    assert!(
        table.starts_with("kube-proxy replacement is off"),
        "{table}"
    );
    Ok(())
}

#[test]
fn services_from_the_api_server_reach_the_agent_in_either_order() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut knode = KubernetesNode::create(
        &run,
        NodeSpec::new("svckube").agent_args(&["--kube-proxy-replacement", "true"]),
    )?;
    let node_name = knode.node().name().to_string();
    // Listed at start: a slice whose Service comes later.
    knode
        .server()
        .apply(web_slice(&node_name, &[("10.244.9.5", true, false)]))?;
    knode.start_agent()?;
    let (node, server) = (knode.node(), knode.server());
    assert!(services(node)?.services.is_empty(), "no Service yet");
    server.apply(web_service())?;
    wait_for_web(node, "web once its Service arrives", |web| {
        backends_of(web, 80, FrontendKind::ClusterIp) == Some(vec!["10.244.9.5:8080".into()])
    })?;
    server.apply(web_slice(
        &node_name,
        &[("10.244.9.5", true, false), ("10.244.9.6", true, false)],
    ))?;
    wait_for_web(node, "a second backend", |web| {
        backends_of(web, 80, FrontendKind::ClusterIp).is_some_and(|b| b.len() == 2)
    })?;
    server.delete(Resource::Service, "default", "web")?;
    let deadline = Instant::now() + PROMPT;
    while !services(node)?.services.is_empty() {
        assert!(Instant::now() < deadline, "web deleted within {PROMPT:?}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
