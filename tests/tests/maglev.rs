//! Maglev consistent hashing (`--lb-algorithm maglev`) with real traffic: the world, a
//! namespace outside the cluster, asks a UDP node port from chosen source ports through each
//! node's InternalIP, as a router spreading one client's packets over several nodes (ECMP)
//! would, and the backends say who answered.
//!
//! - The same client connection (address and port) reaches the same backend through either
//!   node; with random choice it would differ (two thirds of the time for three backends).
//! - Removing one backend moves its clients and keeps the other backends' clients where they
//!   were (Maglev's near-minimal disruption: at most one of them may move).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use myelin_tests::{
    Error, Result, RunPrefix, cluster,
    multinode::{Cluster, ClusterSpec, Underlay},
    root_test,
    services::{
        Answer, Backend, BackendServers, CLUSTER_IP, CONVERGE, Protocol, ServicePort, ask_until,
        endpoint_slice,
    },
    traffic::Host,
};
use serde_json::json;

const DNS: ServicePort<'static> = ServicePort {
    name: "dns",
    protocol: Protocol::Udp,
    port: 53,
    target_port: 9090,
};
const NODE_PORT: u16 = 30053;
/// Clients (source ports) per check.
const CLIENTS: u16 = 40;

fn cluster(run: &RunPrefix) -> Result<Cluster> {
    Cluster::start(
        run,
        ClusterSpec::new(
            2,
            Underlay::Router {
                route_pod_cidrs: false,
            },
        )
        .agent_args(&[
            "--routing-mode",
            "tunnel",
            "--kube-proxy-replacement=true",
            "--lb-algorithm",
            "maglev",
            "--lb-maglev-table-size",
            "1021",
        ]),
    )
}

fn web(c: &Cluster, backends: &[Backend]) -> Result<()> {
    let spec = json!({
        "type": "NodePort",
        "clusterIP": CLUSTER_IP.to_string(),
        "clusterIPs": [CLUSTER_IP.to_string()],
        "ports": [{ "name": DNS.name, "protocol": "UDP", "port": DNS.port,
                    "targetPort": DNS.target_port, "nodePort": NODE_PORT }],
    });
    c.apply(
        "web",
        &[
            cluster::service_object("default", "web", spec),
            endpoint_slice("default", "web-1", "web", &[DNS], backends),
        ],
    )
}

/// The world asks `frontend` one UDP question from its source port `sport`: the backend that
/// answered.
fn ask_from(c: &Cluster, frontend: SocketAddrV4, sport: u16) -> Result<SocketAddrV4> {
    let answer = c.world().netns().run(|| -> io::Result<String> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, sport))?;
        socket.connect(frontend)?;
        socket.set_read_timeout(Some(Duration::from_millis(700)))?;
        let mut buf = [0u8; 128];
        for _ in 0..3 {
            socket.send(b"?")?;
            match socket.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"))
    })?;
    let text = answer.map_err(|e| Error::Traffic {
        what: format!("the world asking {frontend} from port {sport}: {e}"),
    })?;
    // `<backend> <client as seen>`.
    text.split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .ok_or_else(|| Error::Traffic {
            what: format!("answer {text:?} from {frontend} names no backend"),
        })
}

/// The backends `ports` reach through node `node`'s node port.
fn backends_of(c: &Cluster, node: usize, ports: &[u16]) -> Result<BTreeMap<u16, SocketAddrV4>> {
    let frontend = SocketAddrV4::new(c.node_ip(node), NODE_PORT);
    ports
        .iter()
        .map(|&p| Ok((p, ask_from(c, frontend, p)?)))
        .collect()
}

/// Until every node's agent lists `count` backends for the node port (then a moment for the
/// maps it writes right after).
fn wait_for_backends(c: &Cluster, count: usize) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    for node in [0, 1] {
        loop {
            let status = c
                .node(node)
                .client()
                .services()
                .map_err(|e| Error::Traffic {
                    what: format!("services of node {node}: {e}"),
                })?;
            let listed = status
                .services
                .iter()
                .flat_map(|s| &s.ports)
                .flat_map(|p| &p.frontends)
                .find(|f| f.port == NODE_PORT)
                .map(|f| f.backends.len());
            if listed == Some(count) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Traffic {
                    what: format!("node {node} lists {listed:?} node-port backends, not {count}"),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    thread::sleep(Duration::from_millis(500));
    Ok(())
}

#[test]
fn with_maglev_a_client_reaches_the_same_backend_through_every_node_and_keeps_it() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run)?;
    let b0 = c.add_pod(0, "default", "web-0", &[("app", "web")])?;
    let b1 = c.add_pod(1, "default", "web-1", &[("app", "web")])?;
    let b2 = c.add_pod(1, "default", "web-2", &[("app", "web")])?;
    for pod in [&b0, &b1, &b2] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    let backends: [&dyn Host; 3] = [&b0, &b1, &b2];
    let _udp = BackendServers::start(&backends, DNS.target_port)?;
    let ready = |pods: &[&myelin_tests::multinode::ClusterPod]| -> Vec<Backend> {
        pods.iter()
            .map(|p| Backend::ready(p.ip(), c.node(p.node()).name()))
            .collect()
    };
    web(&c, &ready(&[&b0, &b1, &b2]))?;
    wait_for_backends(&c, 3)?;
    for node in [0, 1] {
        let frontend = SocketAddrV4::new(c.node_ip(node), NODE_PORT);
        ask_until(c.world(), frontend, Protocol::Udp, CONVERGE, |a| {
            matches!(a, Answer::Backend(_))
        })?;
    }

    // The same client connections through node 0 and through node 1.
    let both: Vec<u16> = (42_000..42_000 + CLIENTS).collect();
    let via0 = backends_of(&c, 0, &both)?;
    let via1 = backends_of(&c, 1, &both)?;
    assert_eq!(
        via0, via1,
        "each client port reaches one backend through either node"
    );
    let used: BTreeSet<_> = via0.values().collect();
    assert_eq!(
        used.len(),
        3,
        "the clients spread over every backend: {via0:?}"
    );

    // Clients of node 0, then backend 1 goes; the same client ports ask node 1 (new
    // connections there): the other backends' clients stay, backend 1's move.
    let clients: Vec<u16> = (41_000..41_000 + CLIENTS).collect();
    let before = backends_of(&c, 0, &clients)?;
    web(&c, &ready(&[&b0, &b2]))?;
    wait_for_backends(&c, 2)?;
    let after = backends_of(&c, 1, &clients)?;
    let gone = SocketAddrV4::new(b1.ip(), DNS.target_port);
    let (mut stayed, mut moved) = (0, 0);
    for port in &clients {
        assert_ne!(
            after[port], gone,
            "port {port}: the removed backend answered"
        );
        if before[port] != gone {
            if before[port] == after[port] {
                stayed += 1;
            } else {
                moved += 1;
            }
        }
    }
    assert!(
        stayed >= 10 && moved <= 1,
        "of the remaining backends' clients {stayed} stayed and {moved} moved: {before:?} -> {after:?}"
    );
    Ok(())
}
