//! Services translated by Myelin (`--kube-proxy-replacement`), seen by pods: a ClusterIP
//! spreads new connections over its backends on every node, in both routing modes; TCP and UDP
//! on the same port are two frontends; a frontend without backends refuses at once;
//! terminating backends serve only while none is ready; NetworkPolicy sees the backend, not the
//! Service; backends change under load without a failed request; UDP flows to a removed backend
//! move to one that remains; session affinity and `internalTrafficPolicy: Local` hold.
//!
//! No kube-proxy runs anywhere here: whatever answers on a ClusterIP, Myelin translated. The
//! clusters are `myelin_tests::multinode` with the directory source; Service and EndpointSlice
//! objects are written as the API server and the endpointslice controller would hold them.

use std::{
    io,
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use myelin_tests::{
    Result, RunPrefix,
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay},
    root_test,
    services::{
        Answer, Backend, BackendServers, CLUSTER_IP, CONVERGE, Protocol, ServicePort, WEB_TCP,
        WEB_UDP, ask, ask_connected_udp, ask_many, ask_until, cluster_ip_service, connected_udp,
        endpoint_slice, tally,
    },
    traffic::Host,
};
use serde_json::{Value, json};

fn cluster(run: &RunPrefix, mode: &str, underlay: Underlay) -> Result<Cluster> {
    Cluster::start(
        run,
        ClusterSpec::new(2, underlay).agent_args(&[
            "--routing-mode",
            mode,
            "--kube-proxy-replacement=true",
        ]),
    )
}

fn frontend(port: ServicePort<'_>) -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, port.port)
}

fn backend_at(pod: &ClusterPod, port: ServicePort<'_>) -> SocketAddrV4 {
    SocketAddrV4::new(pod.ip(), port.target_port)
}

/// Service `web` with `ports` and `spec`, and its EndpointSlice listing `backends`.
fn web(c: &Cluster, ports: &[ServicePort<'_>], spec: Value, backends: &[Backend]) -> Result<()> {
    c.apply(
        "web",
        &[
            cluster_ip_service("default", "web", CLUSTER_IP, ports, spec),
            endpoint_slice("default", "web-1", "web", ports, backends),
        ],
    )
}

fn ready(c: &Cluster, pods: &[&ClusterPod]) -> Vec<Backend> {
    pods.iter()
        .map(|p| Backend::ready(p.ip(), c.node(p.node()).name()))
        .collect()
}

/// Waits until `client` gets an answer from the frontend (the Service reached the agents).
fn wait_for_service(client: &ClusterPod, port: ServicePort<'_>) -> Result<()> {
    ask_until(client, frontend(port), port.protocol, CONVERGE, |a| {
        matches!(a, Answer::Backend(_))
    })?;
    Ok(())
}

/// Pods on both nodes reach a ClusterIP, and its new connections go to every backend, local
/// and remote; TCP port 80 and UDP port 80 are separate frontends with their own target ports.
fn spreads_over_backends_on_every_node(mode: &str, underlay: Underlay) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, mode, underlay)?;
    let near = c.add_pod(0, "default", "client-0", &[("app", "client")])?;
    let far = c.add_pod(1, "default", "client-1", &[("app", "client")])?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    let b2 = c.add_pod(1, "default", "web-2", &[("app", "web")])?;
    for pod in [&near, &far, &b0, &b1, &b2] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let backends: [&dyn Host; 3] = [&b0, &b1, &b2];
    let _tcp = BackendServers::start(&backends, WEB_TCP.target_port)?;
    let _udp = BackendServers::start(&backends, WEB_UDP.target_port)?;
    web(
        &c,
        &[WEB_TCP, WEB_UDP],
        json!({}),
        &ready(&c, &[&b0, &b1, &b2]),
    )?;
    for client in [&near, &far] {
        wait_for_service(client, WEB_TCP)?;
        for port in [WEB_TCP, WEB_UDP] {
            let answers = tally(&ask_many(client, frontend(port), port.protocol, 40)?)?;
            let mut expected: Vec<SocketAddrV4> = [&b0, &b1, &b2]
                .iter()
                .map(|b| backend_at(b, port))
                .collect();
            expected.sort();
            assert_eq!(
                answers.keys().copied().collect::<Vec<_>>(),
                expected,
                "{mode}: {} asking {:?} {}: every backend, on the target port, and nothing else \
                 ({answers:?})",
                client.label(),
                port.protocol,
                frontend(port),
            );
        }
    }
    Ok(())
}

#[test]
fn a_cluster_ip_spreads_connections_over_backends_on_every_node_in_tunnel_mode() -> Result<()> {
    spreads_over_backends_on_every_node(
        "tunnel",
        Underlay::Router {
            route_pod_cidrs: false,
        },
    )
}

#[test]
fn a_cluster_ip_spreads_connections_over_backends_on_every_node_in_native_mode() -> Result<()> {
    spreads_over_backends_on_every_node("native", Underlay::Switch)
}

/// A Service whose backends are all unready, or that has no EndpointSlice at all, refuses a
/// new TCP connection at once (a reset, not silence until the client gives up).
#[test]
fn a_frontend_without_backends_refuses_at_once() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
    let b0 = c.add_pod(1, "default", "web-0", &[("app", "web")])?;
    c.wait_until_every_node_knows(b0.ip())?;
    let _servers = BackendServers::start(&[&b0], WEB_TCP.target_port)?;
    web(&c, &[WEB_TCP], json!({}), &ready(&c, &[&b0]))?;
    wait_for_service(&client, WEB_TCP)?;

    let unready = [Backend::unready(b0.ip(), c.node(1).name())];
    web(&c, &[WEB_TCP], json!({}), &unready)?;
    ask_until(&client, frontend(WEB_TCP), Protocol::Tcp, CONVERGE, |a| {
        a == Answer::Refused
    })?;

    // No slice at all.
    c.apply(
        "web",
        &[cluster_ip_service(
            "default",
            "web",
            CLUSTER_IP,
            &[WEB_TCP],
            json!({}),
        )],
    )?;
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ask(&client, frontend(WEB_TCP), Protocol::Tcp)?,
        Answer::Refused
    );
    Ok(())
}

/// Terminating backends that still serve take connections only while no backend is ready
/// (graceful termination, as kube-proxy does).
#[test]
fn terminating_backends_serve_only_while_none_is_ready() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
    let live = c.add_pod(1, "default", "web-0", &[("app", "web")])?;
    let leaving = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    c.wait_until_every_node_knows(leaving.ip())?;
    let _servers = BackendServers::start(&[&live, &leaving], WEB_TCP.target_port)?;
    let node1 = c.node(1).name().to_string();
    web(
        &c,
        &[WEB_TCP],
        json!({}),
        &[
            Backend::ready(live.ip(), &node1),
            Backend::terminating(leaving.ip(), &node1),
        ],
    )?;
    wait_for_service(&client, WEB_TCP)?;
    let answers = tally(&ask_many(&client, frontend(WEB_TCP), Protocol::Tcp, 20)?)?;
    assert_eq!(
        answers.keys().copied().collect::<Vec<_>>(),
        vec![backend_at(&live, WEB_TCP)],
        "only the ready backend while there is one"
    );

    web(
        &c,
        &[WEB_TCP],
        json!({}),
        &[Backend::terminating(leaving.ip(), &node1)],
    )?;
    let terminating = Answer::Backend(backend_at(&leaving, WEB_TCP));
    ask_until(&client, frontend(WEB_TCP), Protocol::Tcp, CONVERGE, |a| {
        a == terminating
    })?;
    let answers = tally(&ask_many(&client, frontend(WEB_TCP), Protocol::Tcp, 10)?)?;
    assert_eq!(
        answers.keys().copied().collect::<Vec<_>>(),
        vec![backend_at(&leaving, WEB_TCP)]
    );
    Ok(())
}

fn egress_policy(name: &str, client_app: &str, port: u16) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "podSelector": { "matchLabels": { "app": client_app } },
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{ "podSelector": { "matchLabels": { "app": "web" } } }],
                "ports": [{ "protocol": "TCP", "port": port }],
            }],
        },
    })
}

/// NetworkPolicy is checked after translation, as upstream specifies: an egress rule to the
/// backend pods on the target port admits connections through the ClusterIP (no ipBlock for
/// the Service needed); a rule for the Service's port does not; the backends' ingress policy
/// judges the client pod.
#[test]
fn network_policy_sees_the_backend_not_the_service() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let by_target = c.add_pod(0, "default", "by-target", &[("app", "by-target")])?;
    let by_service_port = c.add_pod(0, "default", "by-port", &[("app", "by-port")])?;
    let stranger = c.add_pod(0, "default", "stranger", &[("app", "stranger")])?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    for pod in [&by_target, &by_service_port, &stranger, &b0, &b1] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let _servers = BackendServers::start(&[&b0, &b1], WEB_TCP.target_port)?;
    web(&c, &[WEB_TCP], json!({}), &ready(&c, &[&b0, &b1]))?;
    wait_for_service(&stranger, WEB_TCP)?;

    c.apply(
        "policies",
        &[
            egress_policy("by-target", "by-target", WEB_TCP.target_port),
            egress_policy("by-port", "by-port", WEB_TCP.port),
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": { "name": "web", "namespace": "default" },
                "spec": {
                    "podSelector": { "matchLabels": { "app": "web" } },
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [
                            { "podSelector": { "matchLabels": { "app": "by-target" } } },
                            { "podSelector": { "matchLabels": { "app": "by-port" } } },
                        ],
                        "ports": [{ "protocol": "TCP", "port": WEB_TCP.target_port }],
                    }],
                },
            }),
        ],
    )?;
    ask_until(&stranger, frontend(WEB_TCP), Protocol::Tcp, CONVERGE, |a| {
        a == Answer::Silence
    })?;
    ask_until(
        &by_service_port,
        frontend(WEB_TCP),
        Protocol::Tcp,
        CONVERGE,
        |a| a == Answer::Silence,
    )?;
    let answers = tally(&ask_many(&by_target, frontend(WEB_TCP), Protocol::Tcp, 20)?)?;
    assert_eq!(
        answers.len(),
        2,
        "both backends admit the client through the ClusterIP: {answers:?}"
    );
    for _ in 0..5 {
        assert_eq!(
            ask(&by_service_port, frontend(WEB_TCP), Protocol::Tcp)?,
            Answer::Silence,
            "an egress rule for the Service's port is not one for the backend's"
        );
        assert_eq!(
            ask(&stranger, frontend(WEB_TCP), Protocol::Tcp)?,
            Answer::Silence,
            "the backends' ingress policy does not admit the stranger"
        );
    }
    Ok(())
}

/// Backends replaced one by one while a client keeps opening connections: every connection is
/// answered, and once the change has reached the agents only the current backends answer.
#[test]
fn backends_change_under_load_without_a_failed_connection() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
    let old = c.add_pod(1, "default", "web-old", &[("app", "web")])?;
    let kept = c.add_pod(0, "default", "web-kept", &[("app", "web")])?;
    let new = c.add_pod(1, "default", "web-new", &[("app", "web")])?;
    for pod in [&old, &kept, &new] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let _servers = BackendServers::start(&[&old, &kept, &new], WEB_TCP.target_port)?;
    web(&c, &[WEB_TCP], json!({}), &ready(&c, &[&old, &kept]))?;
    wait_for_service(&client, WEB_TCP)?;

    let stop = AtomicBool::new(false);
    let answers = thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut all = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                all.extend(ask_many(&client, frontend(WEB_TCP), Protocol::Tcp, 10)?);
            }
            Ok::<_, myelin_tests::Error>(all)
        });
        let changed = (|| {
            thread::sleep(Duration::from_millis(500));
            web(&c, &[WEB_TCP], json!({}), &ready(&c, &[&old, &kept, &new]))?;
            thread::sleep(Duration::from_secs(2));
            web(&c, &[WEB_TCP], json!({}), &ready(&c, &[&kept, &new]))?;
            thread::sleep(Duration::from_secs(2));
            Ok::<_, myelin_tests::Error>(())
        })();
        stop.store(true, Ordering::Relaxed);
        let answers = load.join().expect("the load thread panicked");
        changed.and(answers)
    })?;
    let seen = tally(&answers)?;
    assert!(
        answers.len() > 50,
        "the load ran: {} connections",
        answers.len()
    );
    assert!(
        seen.contains_key(&backend_at(&new, WEB_TCP)),
        "the new backend took connections: {seen:?}"
    );
    let after = tally(&ask_many(&client, frontend(WEB_TCP), Protocol::Tcp, 30)?)?;
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        {
            let mut v = vec![backend_at(&kept, WEB_TCP), backend_at(&new, WEB_TCP)];
            v.sort();
            v
        },
        "the removed backend takes no new connection"
    );
    Ok(())
}

/// A pod's connected UDP sockets (the per-packet path: no socket programs) whose backend leaves
/// the Service move to a backend that remains at their next datagram, as kube-proxy's conntrack
/// cleanup makes them, although the removed backend still answers; sockets on the backends that
/// remain keep theirs. Before, a flow that kept sending kept its translation, and its removed
/// backend, for good.
#[test]
fn udp_flows_to_a_removed_backend_move_to_one_that_remains() -> Result<()> {
    udp_flows_move_off_a_removed_backend(false)
}

/// The same when the backend goes while the client's node has no agent: the restarted agent
/// checks the translations it finds against the Services once it has synced.
#[test]
fn udp_flows_to_a_backend_removed_while_the_agent_was_down_move_once_it_is_back() -> Result<()> {
    udp_flows_move_off_a_removed_backend(true)
}

fn udp_flows_move_off_a_removed_backend(agent_down: bool) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut c = cluster(&run, "tunnel", Underlay::Switch)?;
    let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
    let pods = [
        c.add_pod(0, "default", "web-0", &[("app", "web")])?,
        c.add_pod(1, "default", "web-1", &[("app", "web")])?,
        c.add_pod(1, "default", "web-2", &[("app", "web")])?,
    ];
    for pod in pods.iter().chain([&client]) {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let hosts: Vec<&dyn Host> = pods.iter().map(|p| p as &dyn Host).collect();
    let _servers = BackendServers::start(&hosts, WEB_UDP.target_port)?;
    web(
        &c,
        &[WEB_UDP],
        json!({}),
        &ready(&c, &pods.iter().collect::<Vec<_>>()),
    )?;
    wait_for_service(&client, WEB_UDP)?;

    let sockets = client
        .netns()
        .run(|| {
            (0..12)
                .map(|_| connected_udp(frontend(WEB_UDP)))
                .collect::<io::Result<Vec<_>>>()
        })?
        .map_err(|e| traffic(format!("UDP sockets in the client: {e}")))?;
    let ask_all = || -> Result<Vec<Answer>> {
        sockets
            .iter()
            .map(|s| ask_connected_udp(s).map_err(|e| traffic(format!("asking on a socket: {e}"))))
            .collect()
    };
    let first = ask_all()?;
    let Answer::Backend(removed) = first[0] else {
        panic!("the first socket got no backend: {first:?}");
    };
    assert!(
        first.iter().any(|a| *a != Answer::Backend(removed)),
        "12 sockets on one backend of three: {first:?}"
    );
    let kept: Vec<&ClusterPod> = pods
        .iter()
        .filter(|p| backend_at(p, WEB_UDP) != removed)
        .collect();
    if agent_down {
        c.node_mut(0).stop_agent()?;
        web(&c, &[WEB_UDP], json!({}), &ready(&c, &kept))?;
        // Node 1 has the change; node 0's datapath keeps its translations meanwhile.
        thread::sleep(CONVERGE);
        assert_eq!(ask_all()?, first, "without an agent nothing changes");
        c.node_mut(0).start_agent()?;
    } else {
        web(&c, &[WEB_UDP], json!({}), &ready(&c, &kept))?;
    }

    let deadline = Instant::now() + CONVERGE;
    loop {
        let now = ask_all()?;
        for (was, is) in first.iter().zip(&now) {
            if *was != Answer::Backend(removed) {
                assert_eq!(is, was, "a flow on a backend that remains keeps it");
            }
        }
        if now
            .iter()
            .all(|a| matches!(a, Answer::Backend(b) if *b != removed))
        {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "UDP flows still on the removed {removed} {CONVERGE:?} after it left: {now:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn traffic(what: String) -> myelin_tests::Error {
    myelin_tests::Error::Traffic { what }
}

/// `sessionAffinity: ClientIP`: every connection of a client goes to the backend it was first
/// given.
#[test]
fn session_affinity_keeps_a_client_on_its_backend() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
    let pods = [
        c.add_pod(0, "default", "web-0", &[("app", "web")])?,
        c.add_pod(1, "default", "web-1", &[("app", "web")])?,
        c.add_pod(1, "default", "web-2", &[("app", "web")])?,
    ];
    for pod in &pods {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let hosts: Vec<&dyn Host> = pods.iter().map(|p| p as &dyn Host).collect();
    let _servers = BackendServers::start(&hosts, WEB_TCP.target_port)?;
    let backends = ready(&c, &pods.iter().collect::<Vec<_>>());
    web(
        &c,
        &[WEB_TCP, WEB_UDP],
        json!({
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } },
        }),
        &backends,
    )?;
    wait_for_service(&client, WEB_TCP)?;
    let answers = tally(&ask_many(&client, frontend(WEB_TCP), Protocol::Tcp, 20)?)?;
    assert_eq!(answers.len(), 1, "one backend for the client: {answers:?}");
    Ok(())
}

/// `internalTrafficPolicy: Local`: a client's connections go to the backends on its own node.
#[test]
fn internal_traffic_policy_local_keeps_connections_on_the_clients_node() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let near = c.add_pod(0, "default", "client-0", &[("app", "client")])?;
    let far = c.add_pod(1, "default", "client-1", &[("app", "client")])?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    let b2 = c.add_pod(1, "default", "web-2", &[("app", "web")])?;
    for pod in [&near, &far, &b0, &b1, &b2] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let _servers = BackendServers::start(&[&b0, &b1, &b2], WEB_TCP.target_port)?;
    web(
        &c,
        &[WEB_TCP],
        json!({ "internalTrafficPolicy": "Local" }),
        &ready(&c, &[&b0, &b1, &b2]),
    )?;
    wait_for_service(&near, WEB_TCP)?;
    wait_for_service(&far, WEB_TCP)?;
    let near_answers = tally(&ask_many(&near, frontend(WEB_TCP), Protocol::Tcp, 20)?)?;
    assert_eq!(
        near_answers.keys().copied().collect::<Vec<_>>(),
        vec![backend_at(&b0, WEB_TCP)]
    );
    let far_answers = tally(&ask_many(&far, frontend(WEB_TCP), Protocol::Tcp, 30)?)?;
    let mut expected = vec![backend_at(&b1, WEB_TCP), backend_at(&b2, WEB_TCP)];
    expected.sort();
    assert_eq!(far_answers.keys().copied().collect::<Vec<_>>(), expected);
    Ok(())
}
