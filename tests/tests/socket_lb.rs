//! Socket-level load balancing (`--cgroup-root`, with `--kube-proxy-replacement`): processes of
//! a node's network namespace in the cgroup the agent attached its socket programs to reach a
//! Service's backends through its ClusterIP, translated at `connect()`/`sendmsg()`, and see the
//! ClusterIP in `getpeername()` and `recvfrom()`; everything else (pods, processes outside the
//! cgroup, processes of other namespaces in it) is left to the per-packet path or to nothing.
//!
//! Every test makes its own cgroup under the cgroup2 mount (`myelin_tests::cgroup`) and gives
//! it to the agents; its clients are Python processes moved into it (a thread of the harness
//! cannot be). Nothing is attached to the machine's root cgroup. The clusters are
//! `myelin_tests::multinode` with the directory source, as in `services.rs`; both nodes' agents
//! attach to the same cgroup, each translating only its own namespace's sockets.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use myelin_tests::{
    Node, NodeSpec, Result, RunPrefix,
    cgroup::TestCgroup,
    metrics,
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay},
    root_test,
    services::{
        Answer, Backend, BackendServers, CLUSTER_IP, CONVERGE, HeldUdpClient, Protocol,
        ServicePort, SocketAnswer, SocketQuestion, WEB_TCP, WEB_UDP, ask_from_process, ask_many,
        ask_until, cluster_ip_service, endpoint_slice, lb_flows_from, tally,
    },
    traffic::Host,
};
use serde_json::json;

/// The socket programs in the order the agent attaches them, with their attach types as
/// `bpftool cgroup show` names them.
const HOOKS: [(&str, &str); 4] = [
    ("cgroup_inet4_connect", "lb_connect4"),
    ("cgroup_udp4_sendmsg", "lb_sendmsg4"),
    ("cgroup_udp4_recvmsg", "lb_recvmsg4"),
    ("cgroup_inet4_getpeername", "lb_getpeername4"),
];

fn cluster(run: &RunPrefix, cgroup: Option<&TestCgroup>) -> Result<Cluster> {
    let mut args = vec![
        "--routing-mode".to_string(),
        "tunnel".to_string(),
        "--kube-proxy-replacement=true".to_string(),
    ];
    if let Some(cgroup) = cgroup {
        args.push("--cgroup-root".to_string());
        args.push(cgroup.path().display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Cluster::start(
        run,
        ClusterSpec::new(
            2,
            Underlay::Router {
                route_pod_cidrs: false,
            },
        )
        .agent_args(&args),
    )
}

fn frontend(port: ServicePort<'_>) -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, port.port)
}

fn backend_at(pod: &ClusterPod, port: ServicePort<'_>) -> SocketAddrV4 {
    SocketAddrV4::new(pod.ip(), port.target_port)
}

fn web(c: &Cluster, ports: &[ServicePort<'_>], backends: &[Backend]) -> Result<()> {
    c.apply(
        "web",
        &[
            cluster_ip_service("default", "web", CLUSTER_IP, ports, json!({})),
            endpoint_slice("default", "web-1", "web", ports, backends),
        ],
    )
}

fn ready(c: &Cluster, pods: &[&ClusterPod]) -> Vec<Backend> {
    pods.iter()
        .map(|p| Backend::ready(p.ip(), c.node(p.node()).name()))
        .collect()
}

/// A cluster with a Service of three backends (one on node 0, two on node 1) on TCP and UDP
/// port 80, a client pod on node 0, the servers running; the Service has reached the agents.
struct Web {
    c: Cluster,
    client: ClusterPod,
    backends: [ClusterPod; 3],
    _tcp: BackendServers,
    _udp: BackendServers,
}

impl Web {
    fn start(run: &RunPrefix, cgroup: Option<&TestCgroup>) -> Result<Self> {
        let c = cluster(run, cgroup)?;
        let client = c.add_pod(0, "default", "client", &[("app", "client")])?;
        let backends = [
            c.add_pod(0, "default", "web-0", &[("app", "web")])?,
            c.add_pod(1, "default", "web-1", &[("app", "web")])?,
            c.add_pod(1, "default", "web-2", &[("app", "web")])?,
        ];
        for pod in [&client, &backends[0], &backends[1], &backends[2]] {
            c.wait_until_every_node_knows(pod.ip())?;
        }
        let hosts: Vec<&dyn Host> = backends.iter().map(|b| b as &dyn Host).collect();
        let tcp = BackendServers::start(&hosts, WEB_TCP.target_port)?;
        let udp = BackendServers::start(&hosts, WEB_UDP.target_port)?;
        web(
            &c,
            &[WEB_TCP, WEB_UDP],
            &ready(&c, &backends.iter().collect::<Vec<_>>()),
        )?;
        ask_until(&client, frontend(WEB_TCP), Protocol::Tcp, CONVERGE, |a| {
            matches!(a, Answer::Backend(_))
        })?;
        Ok(Self {
            c,
            client,
            backends,
            _tcp: tcp,
            _udp: udp,
        })
    }

    fn expected(&self, port: ServicePort<'_>) -> BTreeSet<SocketAddrV4> {
        self.backends.iter().map(|b| backend_at(b, port)).collect()
    }

    /// Connections `lb_flows` of node `node` holds from `client` to the ClusterIP: translated
    /// per packet by `from_container`.
    fn per_packet_flows_from(&self, node: usize, client: Ipv4Addr) -> Result<usize> {
        lb_flows_from(self.c.node(node), client, CLUSTER_IP)
    }

    /// Asks from processes of `from` in `cgroup` over TCP, connected and unconnected UDP: every
    /// backend answers, and `getpeername()` (TCP, connected UDP) and `recvfrom()` (UDP) show
    /// the ClusterIP and the Service port.
    fn every_backend_through_the_cluster_ip(
        &self,
        what: &str,
        from: &dyn Host,
        cgroup: &TestCgroup,
    ) -> Result<()> {
        for question in [
            SocketQuestion::Tcp,
            SocketQuestion::ConnectedUdp,
            SocketQuestion::UnconnectedUdp,
        ] {
            let port = if question == SocketQuestion::Tcp {
                WEB_TCP
            } else {
                WEB_UDP
            };
            let answers = ask_from_process(from, Some(cgroup), question, frontend(port), 40)?;
            assert_eq!(
                answered(&format!("{question:?} {what}"), &answers),
                self.expected(port),
                "{question:?}: every backend, on both nodes"
            );
            for a in &answers {
                if question != SocketQuestion::Tcp {
                    assert_eq!(a.source, Some(frontend(port)), "recvfrom: {answers:?}");
                }
                if question != SocketQuestion::UnconnectedUdp {
                    assert_eq!(a.peer, Some(frontend(port)), "getpeername: {answers:?}");
                }
            }
        }
        Ok(())
    }
}

/// The answers as a set of backends; any question without an answer fails with its error.
fn answered(what: &str, answers: &[SocketAnswer]) -> BTreeSet<SocketAddrV4> {
    answers
        .iter()
        .map(|a| {
            a.answer
                .unwrap_or_else(|| panic!("{what}: a question got no answer: {answers:?}"))
        })
        .collect()
}

/// A node's processes in the cgroup reach every backend, on both nodes, through the ClusterIP,
/// over TCP, connected UDP and unconnected UDP; `getpeername()` and `recvfrom()` show the
/// ClusterIP and the Service port, never a backend; and the per-packet path translated none of
/// it (no `lb_flows` entry from the node).
#[test]
fn node_processes_in_the_cgroup_reach_every_backend_and_see_the_cluster_ip() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "sock")?;
    let w = Web::start(&run, Some(&cgroup))?;
    let node = w.c.node(0);
    w.every_backend_through_the_cluster_ip("from the node", node, &cgroup)?;
    let node_ip = w.c.node_ip(0);
    assert_eq!(
        w.per_packet_flows_from(0, node_ip)?,
        0,
        "translated at the socket, not per packet"
    );
    let status = node.status()?;
    let socket_lb = status.socket_lb.expect("status shows the socket programs");
    assert_eq!(socket_lb.cgroup_root, cgroup.path().display().to_string());
    let (_, body) = node.metrics_get("/metrics")?;
    assert_eq!(
        metrics::samples(&body).get("myelin_socket_lb_attached"),
        Some(&1.0)
    );
    Ok(())
}

/// A frontend without backends refuses `connect()` and `sendto()` at once with ECONNREFUSED.
#[test]
fn a_frontend_without_backends_is_refused_at_connect() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "sock")?;
    let w = Web::start(&run, Some(&cgroup))?;
    let unready: Vec<Backend> = w
        .backends
        .iter()
        .map(|b| Backend::unready(b.ip(), w.c.node(b.node()).name()))
        .collect();
    web(&w.c, &[WEB_TCP, WEB_UDP], &unready)?;
    ask_until(&w.client, frontend(WEB_TCP), Protocol::Tcp, CONVERGE, |a| {
        a == Answer::Refused
    })?;
    let node = w.c.node(0);
    for (question, port) in [
        (SocketQuestion::Tcp, WEB_TCP),
        (SocketQuestion::ConnectedUdp, WEB_UDP),
        (SocketQuestion::UnconnectedUdp, WEB_UDP),
    ] {
        let answers = ask_from_process(node, Some(&cgroup), question, frontend(port), 3)?;
        for a in &answers {
            assert_eq!(
                a.error.as_deref(),
                Some("ECONNREFUSED"),
                "{question:?}: {answers:?}"
            );
            assert!(a.millis < 500, "{question:?}: refused at once: {answers:?}");
        }
    }
    Ok(())
}

/// A pod's processes in the cgroup are translated at the socket too, by their own node's agent
/// (the pod's network namespace cookie, which the plugin reported, is in its `sock_lb_pods`):
/// every backend over TCP, connected and unconnected UDP, the ClusterIP in `getpeername()` and
/// `recvfrom()`, no per-packet translation, and an event at point `socket` naming the Service.
/// What the programs must leave alone: the same cgroup's sockets of another node's pod (its own
/// agent translates them: nothing lands in node 0's `lb_reverse_sk`), a pod outside the cgroup
/// (translated per packet as before) and a node process outside the cgroup (no translation).
#[test]
fn pods_processes_in_the_cgroup_are_translated_at_the_socket_by_their_own_node() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "sock")?;
    let w = Web::start(&run, Some(&cgroup))?;

    let from_pod = tally(&ask_many(&w.client, frontend(WEB_TCP), Protocol::Tcp, 30)?)?;
    assert_eq!(
        from_pod.keys().copied().collect::<BTreeSet<_>>(),
        w.expected(WEB_TCP),
        "a pod still reaches every backend"
    );
    let before = w.per_packet_flows_from(0, w.client.ip())?;
    assert!(
        before > 0,
        "the connections of a pod outside the cgroup were translated per packet"
    );

    // A client pod on node 0 whose processes are in the cgroup.
    let local =
        w.c.add_pod(0, "default", "in-cgroup", &[("app", "client")])?;
    // One on node 1, in the same cgroup (both agents attach to it).
    let remote =
        w.c.add_pod(1, "default", "remote-in-cgroup", &[("app", "client")])?;
    for pod in [&local, &remote] {
        w.c.wait_until_every_node_knows(pod.ip())?;
    }
    w.every_backend_through_the_cluster_ip("from a pod in the cgroup", &local, &cgroup)?;
    assert_eq!(
        w.per_packet_flows_from(0, local.ip())?,
        0,
        "a pod's sockets in the cgroup are translated at the socket, not per packet"
    );
    let events =
        w.c.node(0)
            .client()
            .flows(
                &myelin_api::FlowFilter {
                    from: Some(format!("default/{}", local.name())),
                    port: Some(WEB_TCP.target_port),
                    ..Default::default()
                },
                500,
            )
            .map_err(myelin_tests::Error::api("GET /v1/flows"))?
            .flows;
    let at_socket: Vec<_> = events.iter().filter(|e| e.point == "socket").collect();
    assert!(
        !at_socket.is_empty()
            && at_socket.iter().all(|e| e.kind == "allowed"
                && e.service.as_deref() == Some(frontend(WEB_TCP).to_string().as_str())),
        "the socket programs' translations are events naming the Service: {events:#?}"
    );

    let reverse_on_node_0 = w.c.node(0).dump_map("lb_reverse_sk")?.len();
    let reverse_on_node_1 = w.c.node(1).dump_map("lb_reverse_sk")?.len();
    let tcp = ask_from_process(
        &remote,
        Some(&cgroup),
        SocketQuestion::Tcp,
        frontend(WEB_TCP),
        10,
    )?;
    assert!(
        answered("TCP from node 1's pod in the cgroup", &tcp).len() > 1,
        "{tcp:?}"
    );
    assert_eq!(
        w.per_packet_flows_from(1, remote.ip())?,
        0,
        "node 1's agent translated its pod's sockets: {tcp:?}"
    );
    assert!(w.c.node(1).dump_map("lb_reverse_sk")?.len() >= reverse_on_node_1 + 10);
    assert_eq!(
        w.c.node(0).dump_map("lb_reverse_sk")?.len(),
        reverse_on_node_0,
        "node 0's programs left the sockets of node 1's pod alone"
    );

    let outside = ask_from_process(w.c.node(0), None, SocketQuestion::Tcp, frontend(WEB_TCP), 2)?;
    for a in &outside {
        assert_eq!(
            a.answer, None,
            "a node process outside the cgroup is not translated: {outside:?}"
        );
    }

    // One entry per pod of the node (client, web-0, in-cgroup), and none left by a deleted pod.
    let pods_known =
        |node: usize| -> Result<usize> { Ok(w.c.node(node).dump_map("sock_lb_pods")?.len()) };
    assert_eq!((pods_known(0)?, pods_known(1)?), (3, 3));
    w.c.delete_pod(local)?;
    assert_eq!(
        pods_known(0)?,
        2,
        "the deleted pod's namespace left sock_lb_pods"
    );
    Ok(())
}

/// Connected UDP sockets the socket programs gave a backend that is then removed from the
/// Service are destroyed (their owners get ECONNABORTED and can reconnect), the node's and a
/// pod's alike (the agent finds the pod's in its network namespace); those on the backends
/// that stay are left alone.
#[test]
fn sockets_connected_to_a_removed_backend_are_destroyed() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "sock")?;
    let w = Web::start(&run, Some(&cgroup))?;
    // A pod's first, so that the removed backend has a pod's socket on it; then the node's.
    let hosts: [&dyn Host; 2] = [&w.client, w.c.node(0)];
    let clients = hosts
        .iter()
        .flat_map(|host| {
            (0..4).map(|_| HeldUdpClient::start(*host, Some(&cgroup), frontend(WEB_UDP)))
        })
        .collect::<Result<Vec<_>>>()?;
    let removed = clients[0].backend;
    let kept: Vec<&ClusterPod> = w
        .backends
        .iter()
        .filter(|b| backend_at(b, WEB_UDP) != removed)
        .collect();
    web(&w.c, &[WEB_TCP, WEB_UDP], &ready(&w.c, &kept))?;
    for client in clients {
        let backend = client.backend;
        let outcome = client.outcome()?;
        if backend == removed {
            assert_eq!(outcome, "ECONNABORTED", "a socket on the removed {backend}");
        } else {
            assert_eq!(outcome, "timeout", "a socket on {backend}, which stays");
        }
    }
    Ok(())
}

/// How many programs of each hook the cgroup has.
fn per_hook(programs: &[(String, String, u64)]) -> Vec<usize> {
    HOOKS
        .iter()
        .map(|(hook, _)| programs.iter().filter(|(t, _, _)| t == hook).count())
        .collect()
}

/// Across a restart of its agent (and while it is down) node 0 keeps translating; the new
/// agent swaps its programs into the pinned links, so the cgroup holds exactly one program per
/// hook and node, the new ones; restarted without `--cgroup-root`, the agent detaches its own
/// and leaves node 1's.
#[test]
fn agent_restart_keeps_translating_without_duplicate_attachments() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "sock")?;
    let mut w = Web::start(&run, Some(&cgroup))?;
    let before = cgroup.attached_programs()?;
    assert_eq!(
        per_hook(&before),
        vec![2; 4],
        "one per hook and node: {before:?}"
    );
    for (hook, name) in HOOKS {
        assert!(
            before.iter().any(|(t, n, _)| t == hook && n == name),
            "{hook}: {name} attached: {before:?}"
        );
    }
    let old_ids: BTreeSet<u64> =
        w.c.node(0)
            .status()?
            .socket_lb
            .expect("attached")
            .programs
            .iter()
            .map(|p| u64::from(p.id))
            .collect();

    let ask = |w: &Web, what: &str| -> Result<()> {
        let answers = ask_from_process(
            w.c.node(0),
            Some(&cgroup),
            SocketQuestion::Tcp,
            frontend(WEB_TCP),
            10,
        )?;
        assert!(!answered(what, &answers).is_empty());
        for a in &answers {
            assert_eq!(a.peer, Some(frontend(WEB_TCP)), "{what}: {answers:?}");
        }
        Ok(())
    };
    w.c.node_mut(0).stop_agent()?;
    ask(&w, "while the agent is down")?;
    w.c.node_mut(0).start_agent()?;
    ask(&w, "after the restart")?;
    let after = cgroup.attached_programs()?;
    assert_eq!(per_hook(&after), vec![2; 4], "no duplicates: {after:?}");
    let new_ids: BTreeSet<u64> =
        w.c.node(0)
            .status()?
            .socket_lb
            .expect("attached")
            .programs
            .iter()
            .map(|p| u64::from(p.id))
            .collect();
    assert!(
        old_ids.is_disjoint(&new_ids),
        "new programs: {old_ids:?} {new_ids:?}"
    );
    let listed: BTreeSet<u64> = after.iter().map(|(_, _, id)| *id).collect();
    assert!(
        new_ids.is_subset(&listed),
        "the new programs run there: {after:?}"
    );
    assert!(
        listed.is_disjoint(&old_ids),
        "the old programs are gone: {after:?}"
    );

    // The flag removed: node 0's programs go, node 1's stay.
    let node = w.c.node_mut(0);
    node.stop_agent()?;
    let args = node.agent_args_mut();
    let at = args
        .iter()
        .position(|a| a == "--cgroup-root")
        .expect("the cluster passed --cgroup-root");
    args.drain(at..at + 2);
    node.start_agent()?;
    assert_eq!(node.status()?.socket_lb, None);
    let left = cgroup.attached_programs()?;
    assert_eq!(per_hook(&left), vec![1; 4], "node 1's only: {left:?}");
    assert!(
        left.iter().all(|(_, _, id)| !new_ids.contains(id)),
        "node 0's detached: {left:?}"
    );
    Ok(())
}

/// Without `--cgroup-root`, or with it but without `--kube-proxy-replacement`, nothing is
/// attached; a `--cgroup-root` that is not a cgroup v2 directory stops the agent with an error
/// that says so.
#[test]
fn without_the_flag_nothing_is_attached_and_a_bad_cgroup_root_is_refused() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "sock")?;
    let root = cgroup.path().display().to_string();

    let node = Node::start(
        &run,
        NodeSpec::new("plain").agent_args(&["--kube-proxy-replacement=true"]),
    )?;
    assert_eq!(node.status()?.socket_lb, None);
    drop(node);
    let node = Node::start(
        &run,
        NodeSpec::new("no-kpr").agent_args(&["--cgroup-root", &root]),
    )?;
    assert_eq!(node.status()?.socket_lb, None);
    assert!(
        node.agent_log().contains("--cgroup-root is ignored"),
        "{}",
        node.agent_log()
    );
    assert_eq!(cgroup.attached_programs()?, vec![], "nothing attached");
    drop(node);

    let not_cgroup = tempfile::tempdir().expect("temp dir");
    let mut node = Node::create(
        &run,
        NodeSpec::new("bad-root").agent_args(&[
            "--kube-proxy-replacement=true",
            "--cgroup-root",
            &not_cgroup.path().display().to_string(),
        ]),
    )?;
    let err = node
        .start_agent()
        .expect_err("the agent refuses a directory that is no cgroup");
    assert!(
        err.to_string().contains("is not a cgroup v2 directory"),
        "{err}"
    );
    Ok(())
}
