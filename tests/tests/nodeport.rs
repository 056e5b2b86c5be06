//! Node ports and external IPs reached from outside the cluster (`--kube-proxy-replacement`):
//! the world, a namespace outside the cluster, asks each node's InternalIP on a node port, or
//! an external IP it routes to a node, and the backends say who answered and whom they saw
//! asking.
//!
//! - `externalTrafficPolicy: Cluster`: every backend, local and remote; a local backend sees
//!   the world's address, a remote one the node's (source NAT, so that its answer comes back
//!   through the node that translated).
//! - `externalTrafficPolicy: Local`: only the node's own backends, which see the world's
//!   address; a node without one drops (as kube-proxy does).
//! - A frontend without backends refuses at once; NetworkPolicy on the backend judges the
//!   source it sees: the world's address under `Local`, the node's under `Cluster`.
//! - Pods reach their own node's node ports, other nodes' and external IPs.
//!
//! No kube-proxy runs anywhere: whatever answers on a node port, Myelin translated.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use myelin_tests::{
    Result, RunPrefix, cluster,
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay},
    root_test,
    services::{
        Answer, Backend, BackendServers, CLUSTER_IP, CONVERGE, Protocol, ServicePort, WEB_TCP, ask,
        ask_many, ask_many_seen, ask_until, endpoint_slice, tally,
    },
    traffic::Host,
};
use serde_json::{Value, json};

/// Routed to a node by a route in the world (as a provider's network would).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// A load balancer's address (`status.loadBalancer.ingress`), routed by the world to a node.
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const WEB_UDP: ServicePort<'static> = ServicePort {
    name: "dns",
    protocol: Protocol::Udp,
    port: 53,
    target_port: 9090,
};
/// The node port of each Service port.
fn node_port(port: ServicePort<'_>) -> u16 {
    match port.protocol {
        Protocol::Tcp => 30080,
        Protocol::Udp => 30053,
    }
}
/// Questions per node and port: every one of three backends answers one of them but with a
/// chance of 3 x (2/3)^30, under 2 in 100,000.
const QUESTIONS: usize = 30;

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

/// Service `web` of type NodePort with `ports` (node ports by [`node_port`]) and `spec` merged
/// in (`externalTrafficPolicy`, `externalIPs`), and its EndpointSlice listing `backends`.
fn web(c: &Cluster, ports: &[ServicePort<'_>], spec: Value, backends: &[Backend]) -> Result<()> {
    c.apply("web", &web_objects(ports, spec, backends))
}

fn web_objects(ports: &[ServicePort<'_>], spec: Value, backends: &[Backend]) -> Vec<Value> {
    let mut full = json!({
        "type": "NodePort",
        "clusterIP": CLUSTER_IP.to_string(),
        "clusterIPs": [CLUSTER_IP.to_string()],
        "ports": ports.iter().map(|p| json!({
            "name": p.name,
            "protocol": p.protocol.as_str(),
            "port": p.port,
            "targetPort": p.target_port,
            "nodePort": node_port(*p),
        })).collect::<Vec<_>>(),
    });
    if let (Some(full), Value::Object(extra)) = (full.as_object_mut(), spec) {
        full.extend(extra);
    }
    let mut objects = vec![cluster::service_object("default", "web", full)];
    if !backends.is_empty() {
        objects.push(endpoint_slice("default", "web-1", "web", ports, backends));
    }
    objects
}

fn ready(c: &Cluster, pods: &[&ClusterPod]) -> Vec<Backend> {
    pods.iter()
        .map(|p| Backend::ready(p.ip(), c.node(p.node()).name()))
        .collect()
}

fn at(pod: &ClusterPod, port: ServicePort<'_>) -> SocketAddrV4 {
    SocketAddrV4::new(pod.ip(), port.target_port)
}

/// Node `node`'s InternalIP on `port`'s node port.
fn node_frontend(c: &Cluster, node: usize, port: ServicePort<'_>) -> SocketAddrV4 {
    SocketAddrV4::new(c.node_ip(node), node_port(port))
}

/// Asks `frontend` from the world until a backend answers (the agents have the Service), then
/// [`QUESTIONS`] times more; returns each answering backend with the addresses it saw.
fn backends_seen(
    c: &Cluster,
    frontend: SocketAddrV4,
    protocol: Protocol,
) -> Result<Vec<(SocketAddrV4, BTreeSet<Ipv4Addr>)>> {
    ask_until(c.world(), frontend, protocol, CONVERGE, |a| {
        matches!(a, Answer::Backend(_))
    })?;
    let mut seen: Vec<(SocketAddrV4, BTreeSet<Ipv4Addr>)> = Vec::new();
    for (i, (answer, peer)) in ask_many_seen(c.world(), frontend, protocol, QUESTIONS)?
        .into_iter()
        .enumerate()
    {
        let (Answer::Backend(backend), Some(peer)) = (answer, peer) else {
            panic!("question {i} to {protocol:?} {frontend} got {answer:?}");
        };
        match seen.iter_mut().find(|(b, _)| *b == backend) {
            Some((_, peers)) => {
                peers.insert(*peer.ip());
            }
            None => seen.push((backend, BTreeSet::from([*peer.ip()]))),
        }
    }
    seen.sort();
    Ok(seen)
}

/// `externalTrafficPolicy: Cluster`: the world reaches every backend through either node's
/// node port, TCP and UDP; a backend on the node asked sees the world, one on another node
/// sees the node asked. A remote backend's port unreachable reaches the world as a refusal.
fn cluster_policy_reaches_every_backend(mode: &str, underlay: Underlay) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, mode, underlay)?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    let b2 = c.add_pod(1, "default", "web-2", &[("app", "web")])?;
    for pod in [&b0, &b1, &b2] {
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
    let world = c.world().ip();
    for node in [0, 1] {
        for port in [WEB_TCP, WEB_UDP] {
            let frontend = node_frontend(&c, node, port);
            let seen = backends_seen(&c, frontend, port.protocol)?;
            let mut expected: Vec<(SocketAddrV4, BTreeSet<Ipv4Addr>)> = [&b0, &b1, &b2]
                .iter()
                .map(|b| {
                    let source = if b.node() == node {
                        world
                    } else {
                        c.node_ip(node)
                    };
                    (at(b, port), BTreeSet::from([source]))
                })
                .collect();
            expected.sort();
            assert_eq!(
                seen, expected,
                "{mode}: the world asking {:?} {frontend}: every backend; the local one sees \
                 the world, the remote ones the node",
                port.protocol
            );
        }
    }

    // A backend on node1 where nothing listens: its port unreachable, about the datagram node0
    // forwarded, reaches the world about the datagram it sent (ECONNREFUSED, not silence).
    const QUIET: ServicePort<'static> = ServicePort {
        name: "quiet",
        protocol: Protocol::Udp,
        port: 5353,
        target_port: 9999,
    };
    let quiet = json!({
        "type": "NodePort",
        "clusterIP": "10.96.0.11",
        "clusterIPs": ["10.96.0.11"],
        "ports": [{ "name": QUIET.name, "protocol": "UDP", "port": QUIET.port,
                    "targetPort": QUIET.target_port, "nodePort": 30099 }],
    });
    c.apply(
        "quiet",
        &[
            cluster::service_object("default", "quiet", quiet),
            endpoint_slice("default", "quiet-1", "quiet", &[QUIET], &ready(&c, &[&b1])),
        ],
    )?;
    let frontend = SocketAddrV4::new(c.node_ip(0), 30099);
    ask_until(c.world(), frontend, Protocol::Udp, CONVERGE, |a| {
        a == Answer::Refused
    })?;
    Ok(())
}

#[test]
fn a_node_port_with_cluster_policy_reaches_every_backend_in_tunnel_mode() -> Result<()> {
    cluster_policy_reaches_every_backend(
        "tunnel",
        Underlay::Router {
            route_pod_cidrs: false,
        },
    )
}

#[test]
fn a_node_port_with_cluster_policy_reaches_every_backend_in_native_mode() -> Result<()> {
    cluster_policy_reaches_every_backend("native", Underlay::Switch)
}

/// `externalTrafficPolicy: Local`: each node's node port and an external IP routed to it reach
/// that node's backends only, which see the world's own address; once a node has none, it
/// drops (silence, not a refusal), while the other still serves; with no endpoint anywhere,
/// every node refuses.
#[test]
fn local_policy_keeps_the_client_and_only_local_backends() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "native", Underlay::Switch)?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    for pod in [&b0, &b1] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let backends: [&dyn Host; 2] = [&b0, &b1];
    let _tcp = BackendServers::start(&backends, WEB_TCP.target_port)?;
    let _udp = BackendServers::start(&backends, WEB_UDP.target_port)?;
    let spec = json!({
        "externalTrafficPolicy": "Local",
        "externalIPs": [EXTERNAL_IP.to_string()],
    });
    web(
        &c,
        &[WEB_TCP, WEB_UDP],
        spec.clone(),
        &ready(&c, &[&b0, &b1]),
    )?;
    let world = c.world().ip();
    for (node, local) in [(0, &b0), (1, &b1)] {
        for port in [WEB_TCP, WEB_UDP] {
            let frontend = node_frontend(&c, node, port);
            assert_eq!(
                backends_seen(&c, frontend, port.protocol)?,
                vec![(at(local, port), BTreeSet::from([world]))],
                "the world asking {:?} {frontend}: only the node's backend, seeing the world",
                port.protocol
            );
        }
        // The external IP, routed by the world to this node.
        let world_ns = c.world().netns();
        world_ns.ip(&[
            "route",
            "replace",
            &format!("{EXTERNAL_IP}/32"),
            "via",
            &c.node_ip(node).to_string(),
        ])?;
        let frontend = SocketAddrV4::new(EXTERNAL_IP, WEB_TCP.port);
        assert_eq!(
            backends_seen(&c, frontend, Protocol::Tcp)?,
            vec![(at(local, WEB_TCP), BTreeSet::from([world]))],
            "the external IP through node {node}"
        );
    }

    // node0 has no backend left: it drops; node1 still serves.
    web(&c, &[WEB_TCP, WEB_UDP], spec.clone(), &ready(&c, &[&b1]))?;
    for port in [WEB_TCP, WEB_UDP] {
        ask_until(
            c.world(),
            node_frontend(&c, 0, port),
            port.protocol,
            CONVERGE,
            |a| a == Answer::Silence,
        )?;
        assert_eq!(
            ask(c.world(), node_frontend(&c, 1, port), port.protocol)?,
            Answer::Backend(at(&b1, port))
        );
    }
    // No endpoint anywhere: refused on every node, as kube-proxy rejects it.
    web(&c, &[WEB_TCP, WEB_UDP], spec, &[])?;
    for node in [0, 1] {
        for port in [WEB_TCP, WEB_UDP] {
            ask_until(
                c.world(),
                node_frontend(&c, node, port),
                port.protocol,
                CONVERGE,
                |a| a == Answer::Refused,
            )?;
        }
    }
    Ok(())
}

/// External IPs under `externalTrafficPolicy: Cluster` in tunnel mode: the world's route sends
/// the address to node0, which serves both backends (the remote one sees node0); a load
/// balancer's address (a LoadBalancer Service's status), routed to node1, likewise. A Service
/// without any endpoint refuses at once, on its node port and its external IP, TCP and UDP.
#[test]
fn external_ips_and_load_balancer_addresses_reach_every_backend_and_no_backend_refuses()
-> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    for pod in [&b0, &b1] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let backends: [&dyn Host; 2] = [&b0, &b1];
    let _tcp = BackendServers::start(&backends, WEB_TCP.target_port)?;
    let _udp = BackendServers::start(&backends, WEB_UDP.target_port)?;
    let spec = json!({ "externalIPs": [EXTERNAL_IP.to_string()] });
    web(
        &c,
        &[WEB_TCP, WEB_UDP],
        spec.clone(),
        &ready(&c, &[&b0, &b1]),
    )?;
    c.world().netns().ip(&[
        "route",
        "add",
        &format!("{EXTERNAL_IP}/32"),
        "via",
        &c.node_ip(0).to_string(),
    ])?;
    let world = c.world().ip();
    for port in [WEB_TCP, WEB_UDP] {
        let frontend = SocketAddrV4::new(EXTERNAL_IP, port.port);
        let mut expected = vec![
            (at(&b0, port), BTreeSet::from([world])),
            (at(&b1, port), BTreeSet::from([c.node_ip(0)])),
        ];
        expected.sort();
        assert_eq!(
            backends_seen(&c, frontend, port.protocol)?,
            expected,
            "the world asking {:?} {frontend}",
            port.protocol
        );
    }

    // A LoadBalancer Service: its load balancer's address, which the world routes to node1,
    // is served like an external IP.
    let mut objects = web_objects(
        &[WEB_TCP, WEB_UDP],
        json!({ "type": "LoadBalancer", "externalIPs": [EXTERNAL_IP.to_string()] }),
        &ready(&c, &[&b0, &b1]),
    );
    objects[0]["status"] =
        json!({ "loadBalancer": { "ingress": [{ "ip": LOAD_BALANCER_IP.to_string() }] } });
    c.apply("web", &objects)?;
    c.world().netns().ip(&[
        "route",
        "add",
        &format!("{LOAD_BALANCER_IP}/32"),
        "via",
        &c.node_ip(1).to_string(),
    ])?;
    for port in [WEB_TCP, WEB_UDP] {
        let frontend = SocketAddrV4::new(LOAD_BALANCER_IP, port.port);
        let mut expected = vec![
            (at(&b0, port), BTreeSet::from([c.node_ip(1)])),
            (at(&b1, port), BTreeSet::from([world])),
        ];
        expected.sort();
        assert_eq!(
            backends_seen(&c, frontend, port.protocol)?,
            expected,
            "the world asking {:?} {frontend}",
            port.protocol
        );
    }

    web(&c, &[WEB_TCP, WEB_UDP], spec, &[])?;
    for port in [WEB_TCP, WEB_UDP] {
        for frontend in [
            node_frontend(&c, 0, port),
            SocketAddrV4::new(EXTERNAL_IP, port.port),
        ] {
            ask_until(c.world(), frontend, port.protocol, CONVERGE, |a| {
                a == Answer::Refused
            })?;
        }
    }
    Ok(())
}

fn ingress_from(cidr: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "web" } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{ "ipBlock": { "cidr": cidr } }],
                "ports": [{ "protocol": "TCP", "port": WEB_TCP.target_port }],
            }],
        },
    })
}

/// The backends' ingress policy judges the source they see: under `Local` the world's own
/// address (an `ipBlock` of it admits, another denies); under `Cluster`, for a backend on
/// another node, the node that translated (the world's `ipBlock` does not admit, the node's
/// does), as with kube-proxy.
#[test]
fn network_policy_judges_the_source_the_backend_sees() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "native", Underlay::Switch)?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    c.wait_until_every_node_knows(b1.ip())?;
    let _tcp = BackendServers::start(&[&b1], WEB_TCP.target_port)?;
    let local = json!({ "externalTrafficPolicy": "Local" });
    web(&c, &[WEB_TCP], local, &ready(&c, &[&b1]))?;
    let world = c.world().ip();
    let (through_node0, through_node1) =
        (node_frontend(&c, 0, WEB_TCP), node_frontend(&c, 1, WEB_TCP));
    let answered = Answer::Backend(at(&b1, WEB_TCP));

    c.apply("policy", &[ingress_from(&format!("{world}/32"))])?;
    ask_until(c.world(), through_node1, Protocol::Tcp, CONVERGE, |a| {
        a == answered
    })?;
    c.apply("policy", &[ingress_from("10.99.0.0/16")])?;
    ask_until(c.world(), through_node1, Protocol::Tcp, CONVERGE, |a| {
        a == Answer::Silence
    })?;

    // Cluster: through node0, the backend on node1 sees node0.
    web(&c, &[WEB_TCP], json!({}), &ready(&c, &[&b1]))?;
    c.apply("policy", &[ingress_from(&format!("{world}/32"))])?;
    ask_until(c.world(), through_node1, Protocol::Tcp, CONVERGE, |a| {
        a == answered
    })?;
    for _ in 0..3 {
        assert_eq!(
            ask(c.world(), through_node0, Protocol::Tcp)?,
            Answer::Silence,
            "translated by node0, the question comes from node0, which the world's ipBlock \
             does not cover"
        );
    }
    c.apply("policy", &[ingress_from(&format!("{}/32", c.node_ip(0)))])?;
    ask_until(c.world(), through_node0, Protocol::Tcp, CONVERGE, |a| {
        a == answered
    })?;
    Ok(())
}

/// Pods reach node ports too: their own node's (translated as they send it), another node's
/// (which that node translates; in tunnel mode the question reaches it through the tunnel,
/// since the ipcache puts a node's address behind the node) and an external IP (translated as
/// they send it), TCP and UDP, every backend answering.
#[test]
fn pods_reach_the_node_ports_of_every_node_and_external_ips() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(
        &run,
        "tunnel",
        Underlay::Router {
            route_pod_cidrs: false,
        },
    )?;
    let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    for pod in [&client, &b0, &b1] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let backends: [&dyn Host; 2] = [&b0, &b1];
    let _tcp = BackendServers::start(&backends, WEB_TCP.target_port)?;
    let _udp = BackendServers::start(&backends, WEB_UDP.target_port)?;
    let spec = json!({ "externalIPs": [EXTERNAL_IP.to_string()] });
    web(&c, &[WEB_TCP, WEB_UDP], spec, &ready(&c, &[&b0, &b1]))?;
    for port in [WEB_TCP, WEB_UDP] {
        for frontend in [
            node_frontend(&c, 0, port),
            node_frontend(&c, 1, port),
            SocketAddrV4::new(EXTERNAL_IP, port.port),
        ] {
            ask_until(&client, frontend, port.protocol, CONVERGE, |a| {
                matches!(a, Answer::Backend(_))
            })?;
            let answers = tally(&ask_many(&client, frontend, port.protocol, QUESTIONS)?)?;
            let mut expected = vec![at(&b0, port), at(&b1, port)];
            expected.sort();
            assert_eq!(
                answers.keys().copied().collect::<Vec<_>>(),
                expected,
                "the pod asking {:?} {frontend}: both backends ({answers:?})",
                port.protocol
            );
        }
    }
    Ok(())
}

/// A node's node ports keep serving while its agent is down (the jump into the node-port path
/// is in a pinned map, which keeps its program) and after it came back (the new agent puts its
/// own program there), to local and remote backends.
#[test]
fn node_ports_serve_while_the_agent_is_down_and_after_it_restarted() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut c = cluster(&run, "native", Underlay::Switch)?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    for pod in [&b0, &b1] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let backends: [&dyn Host; 2] = [&b0, &b1];
    let _tcp = BackendServers::start(&backends, WEB_TCP.target_port)?;
    let _udp = BackendServers::start(&backends, WEB_UDP.target_port)?;
    web(&c, &[WEB_TCP, WEB_UDP], json!({}), &ready(&c, &[&b0, &b1]))?;
    let both = |c: &Cluster, when: &str| -> Result<()> {
        for port in [WEB_TCP, WEB_UDP] {
            let frontend = node_frontend(c, 0, port);
            let seen: Vec<SocketAddrV4> = backends_seen(c, frontend, port.protocol)?
                .into_iter()
                .map(|(backend, _)| backend)
                .collect();
            let mut expected = vec![at(&b0, port), at(&b1, port)];
            expected.sort();
            assert_eq!(seen, expected, "{when}: {:?} {frontend}", port.protocol);
        }
        Ok(())
    };
    both(&c, "before")?;
    c.node_mut(0).stop_agent()?;
    both(&c, "node0's agent down")?;
    c.node_mut(0).start_agent()?;
    both(&c, "node0's agent restarted")?;
    Ok(())
}

/// The health check node port of a LoadBalancer Service with `externalTrafficPolicy: Local`.
const HEALTH_CHECK_PORT: u16 = 32100;

/// What node `node`'s health check port answers the world: the HTTP status and the JSON body,
/// `None` while nothing listens (refused).
fn health_check(c: &Cluster, node: usize) -> Result<Option<(u16, Value)>> {
    use std::io::{Read, Write};
    let addr = SocketAddrV4::new(c.node_ip(node), HEALTH_CHECK_PORT);
    let answer = c.world().netns().run(|| {
        let timeout = std::time::Duration::from_secs(2);
        let mut stream = match std::net::TcpStream::connect_timeout(&addr.into(), timeout) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
            Err(e) => return Err(e),
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: lb\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(Some(text))
    })?;
    let text = answer.map_err(|e| myelin_tests::Error::Traffic {
        what: format!("the world asking the health check {addr}: {e}"),
    })?;
    let Some(text) = text else {
        return Ok(None);
    };
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok(Some((status, json)))
}

/// Polls node `node`'s health check until it answers `status` with `local` endpoints (or
/// `None`: nothing listens), within [`CONVERGE`]; the last answer otherwise.
fn await_health(
    c: &Cluster,
    node: usize,
    expected: Option<(u16, usize)>,
) -> Result<Option<(u16, Value)>> {
    let until = std::time::Instant::now() + CONVERGE;
    loop {
        // A connection cut while the port opens counts as no answer yet.
        let answer = match health_check(c, node) {
            Err(e) if std::time::Instant::now() <= until => {
                eprintln!("node{node}'s health check: {e}; asking again");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            answer => answer?,
        };
        let got = answer.as_ref().map(|(status, body)| {
            (
                *status,
                body["localEndpoints"].as_u64().unwrap_or(999) as usize,
            )
        });
        if got == expected || std::time::Instant::now() > until {
            return Ok(answer);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `healthCheckNodePort`, served on every node as kube-proxy serves it: 200 and the number of
/// the Service's ready endpoints on that node where there are some, 503 where there are none
/// (a load balancer then leaves the node out, since `Local` drops there); it follows the
/// endpoints as they move, and closes with the Service.
#[test]
fn the_health_check_node_port_says_which_nodes_have_a_local_endpoint() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, "tunnel", Underlay::Switch)?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b0b = c.add_pod(0, "default", "web-0b", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    for pod in [&b0, &b0b, &b1] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let spec = json!({
        "type": "LoadBalancer",
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": HEALTH_CHECK_PORT,
    });
    web(&c, &[WEB_TCP], spec.clone(), &ready(&c, &[&b0, &b0b]))?;
    let answer = await_health(&c, 0, Some((200, 2)));
    let answer = answer?.expect("node0 serves the health check");
    assert_eq!(answer.0, 200, "node0 has two local endpoints: {answer:?}");
    assert_eq!(
        answer.1,
        json!({
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": true,
        }),
        "kube-proxy's body"
    );
    assert_eq!(
        await_health(&c, 1, Some((503, 0)))?.map(|(s, b)| (s, b["localEndpoints"].clone())),
        Some((503, json!(0))),
        "node1 has none: the load balancer must leave it out"
    );

    // The endpoints move to node1.
    web(&c, &[WEB_TCP], spec, &ready(&c, &[&b1]))?;
    assert_eq!(
        await_health(&c, 1, Some((200, 1)))?.map(|(s, b)| (s, b["localEndpoints"].clone())),
        Some((200, json!(1)))
    );
    assert_eq!(
        await_health(&c, 0, Some((503, 0)))?.map(|(s, b)| (s, b["localEndpoints"].clone())),
        Some((503, json!(0)))
    );

    // Without `Local` there is nothing to ask: the port closes.
    web(
        &c,
        &[WEB_TCP],
        json!({ "type": "LoadBalancer" }),
        &ready(&c, &[&b1]),
    )?;
    for node in [0, 1] {
        assert_eq!(
            await_health(&c, node, None)?,
            None,
            "node{node} closed the port"
        );
    }
    Ok(())
}
