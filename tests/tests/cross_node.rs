//! Pods on different nodes, in both routing modes and over both underlays: the scenarios of
//! Cilium's connectivity test that need no Services, NetworkPolicy across nodes, the MTU, nodes
//! leaving and joining, and an agent restart under a running cross-node flow.
//!
//! Every cluster here is `myelin_tests::multinode`: nodes are namespaces joined by an underlay
//! namespace (a switch, or a router between two subnets), and each agent learns the other
//! nodes and their pods from the same cluster state.

use std::{net::Ipv4Addr, thread, time::Duration};

use myelin_common::identity::REMOTE_NODE;
use myelin_tests::{
    AgentSource, Result, RunPrefix,
    bench::tcp::{EchoServer, time_until_flow_stops},
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay, ipcache_identity},
    root_test,
    traffic::{Host, ping, ping_within, tcp_bulk, tcp_echo, tcp_source_seen, udp_echo},
};
use serde_json::json;

/// Two subnets joined by a router that routes no pod CIDR (the world's view of a cloud
/// network): only the tunnel, or masquerading, gets pods' packets across.
const THROUGH_A_ROUTER: Underlay = Underlay::Router {
    route_pod_cidrs: false,
};

/// A cluster of `nodes` in `mode` over `underlay`.
fn cluster(run: &RunPrefix, nodes: usize, mode: &str, underlay: Underlay) -> Result<Cluster> {
    Cluster::start(
        run,
        ClusterSpec::new(nodes, underlay).agent_args(&["--routing-mode", mode]),
    )
}

/// Ping, TCP and UDP from `from` to `to`.
fn talk(from: &dyn Host, to: &dyn Host) -> Result<()> {
    ping(from, to)?;
    tcp_echo(from, to, 0)?;
    udp_echo(from, to, 0)?;
    Ok(())
}

/// Every pair that Cilium's connectivity test checks without Services, in one cluster of three
/// nodes: pods on one node, pods on two, a pod and another node, a node (and any process in its
/// namespace, such as a host-network pod) and a pod on another node.
fn connectivity(mode: &str, underlay: Underlay) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, 3, mode, underlay)?;
    let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
    let b = c.add_pod(0, "default", "b", &[("app", "b")])?;
    let d = c.add_pod(1, "default", "d", &[("app", "d")])?;
    let e = c.add_pod(2, "default", "e", &[("app", "e")])?;
    for pod in [&a, &b, &d, &e] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    talk(&a, &b)?;
    for (from, to) in [(&a, &d), (&d, &a), (&d, &e), (&e, &b)] {
        talk(from, to)?;
    }
    // A pod and the other nodes, both ways.
    talk(&a, &c.node_on_underlay(1))?;
    talk(&c.node_on_underlay(2), &a)?;
    talk(&e, &c.node_on_underlay(0))?;
    // The node a pod is on, by its InternalIP and by the gateway address (the node's side of
    // the pod's route; UDP is left out there: the node's answer leaves from the address the
    // route to the pod picks, which is its InternalIP once it has one, and a server that does
    // not answer from the address it was asked on fails that check on any CNI).
    talk(&a, &c.node_on_underlay(0))?;
    ping(&a, c.node(0))?;
    tcp_echo(&a, c.node(0), 0)?;
    Ok(())
}

#[test]
fn tunnel_mode_connects_everything_through_a_router() -> Result<()> {
    connectivity("tunnel", THROUGH_A_ROUTER)
}

#[test]
fn tunnel_mode_connects_everything_over_a_switch() -> Result<()> {
    connectivity("tunnel", Underlay::Switch)
}

#[test]
fn native_mode_connects_everything_over_a_switch() -> Result<()> {
    connectivity("native", Underlay::Switch)
}

#[test]
fn native_mode_connects_everything_through_a_router_that_routes_pod_cidrs() -> Result<()> {
    connectivity(
        "native",
        Underlay::Router {
            route_pod_cidrs: true,
        },
    )
}

/// Native routing takes other nodes' connections into the pods past the node's stack: with
/// the FORWARD policy of both nodes' netfilter at DROP, pings and TCP connections still cross,
/// both ways (the pods' own packets left through the FIB already). A first UDP datagram is
/// nothing the datapath can tell from an answer to a translated flow, so it still goes through
/// the stack, and is dropped there: the proof that the DROP policy was in force.
#[test]
fn native_mode_delivers_connections_into_pods_past_the_nodes_forwarding() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, 2, "native", Underlay::Switch)?;
    let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
    let d = c.add_pod(1, "default", "d", &[("app", "d")])?;
    for pod in [&a, &d] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    talk(&a, &d)?;
    for node in 0..2 {
        let status = c
            .node(node)
            .netns()
            .command("iptables")?
            .args(["-w", "-P", "FORWARD", "DROP"])
            .status()
            .expect("iptables");
        assert!(status.success(), "iptables -P FORWARD DROP on node {node}");
    }
    for (from, to) in [(&a, &d), (&d, &a)] {
        ping(from, to)?;
        tcp_echo(from, to, 0)?;
    }
    assert!(
        udp_echo(&a, &d, 0).is_err(),
        "a first UDP datagram goes through the stack, whose FORWARD policy drops it"
    );
    Ok(())
}

/// `ping -M do -s <size>` from `from` to `to`: whether it was answered, and what ping said.
fn ping_unfragmented(from: &dyn Host, to: &dyn Host, size: u32) -> Result<(bool, String)> {
    let mut cmd = from.netns().command("ping")?;
    cmd.args(["-n", "-c1", "-W1", "-M", "do", "-s"])
        .arg(size.to_string())
        .arg(to.ip().to_string());
    let out = cmd
        .output()
        .map_err(myelin_tests::Error::io("running ping"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Pods send packets that fit the path: in tunnel mode the uplink's MTU less VXLAN's 50 bytes.
/// The largest unfragmented ping crosses; one byte more is refused with the MTU, not lost; and
/// a megabyte of TCP crosses in full-size segments.
#[test]
fn packets_fit_the_tunnel_and_a_megabyte_crosses() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, 2, "tunnel", THROUGH_A_ROUTER)?;
    let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
    let b = c.add_pod(1, "default", "b", &[("app", "b")])?;
    c.wait_until_every_node_knows(b.ip())?;
    let mtu = 1500 - 50;
    let (answered, said) = ping_unfragmented(&a, &b, mtu - 28)?;
    assert!(answered, "the largest packet that fits: {said}");
    let (answered, said) = ping_unfragmented(&a, &b, mtu - 27)?;
    assert!(!answered);
    assert!(
        said.contains(&format!("mtu={mtu}")),
        "refused with the MTU: {said}"
    );
    tcp_bulk(&a, &b, 0)?;
    tcp_bulk(&b, &a, 0)?;
    Ok(())
}

fn policy(name: &str, selected_app: &str, from: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "podSelector": { "matchLabels": { "app": selected_app } },
            "policyTypes": ["Ingress"],
            "ingress": [{ "from": from }],
        },
    })
}

/// Whether `from` reaches `to` by ping, within a short wait (denied traffic is dropped, so a
/// denial shows as silence).
fn reaches(from: &dyn Host, to: &dyn Host) -> bool {
    ping_within(from, to, Duration::from_millis(500)).is_ok()
}

/// Waits until `from` reaching `to` is `expected` (a policy change takes a moment to reach
/// every agent), failing after a few seconds.
fn eventually(from: &dyn Host, to: &dyn Host, expected: bool) {
    for _ in 0..20 {
        if reaches(from, to) == expected {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{} -> {}: expected {}",
        from.label(),
        to.label(),
        if expected { "allowed" } else { "denied" }
    );
}

/// NetworkPolicy selects peers on other nodes exactly as on its own: by pod labels, by
/// namespace labels, by an ipBlock holding a remote node's pod CIDR, and a remote pod whose
/// labels change is judged by its new labels.
fn policy_across_nodes(mode: &str) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(
        &run,
        3,
        mode,
        Underlay::Router {
            route_pod_cidrs: true,
        },
    )?;
    c.add_namespace("other", &[("team", "blue")])?;
    let db = c.add_pod(2, "default", "db", &[("app", "db")])?;
    let api = c.add_pod(0, "default", "api", &[("app", "api")])?;
    let web = c.add_pod(1, "default", "web", &[("app", "web")])?;
    let blue = c.add_pod(1, "other", "blue", &[("app", "x")])?;
    for pod in [&db, &api, &web, &blue] {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    for pod in [&api, &web, &blue] {
        assert!(reaches(pod, &db), "open before any policy");
    }

    c.apply(
        "db",
        &[policy(
            "db",
            "db",
            json!([{ "podSelector": { "matchLabels": { "app": "api" } } }]),
        )],
    )?;
    eventually(&web, &db, false);
    assert!(reaches(&api, &db));
    assert!(!reaches(&blue, &db));
    tcp_echo(&api, &db, 0)?;

    c.apply(
        "db",
        &[policy(
            "db",
            "db",
            json!([{ "namespaceSelector": { "matchLabels": { "team": "blue" } } }]),
        )],
    )?;
    eventually(&blue, &db, true);
    eventually(&api, &db, false);

    // node1's pod CIDR: web and blue.
    c.apply(
        "db",
        &[policy(
            "db",
            "db",
            json!([{ "ipBlock": { "cidr": c.node(1).pod_cidr() } }]),
        )],
    )?;
    eventually(&web, &db, true);
    assert!(reaches(&blue, &db));
    assert!(!reaches(&api, &db));

    // By labels again; api is relabelled away from what the policy allows.
    c.apply(
        "db",
        &[policy(
            "db",
            "db",
            json!([{ "podSelector": { "matchLabels": { "app": "api" } } }]),
        )],
    )?;
    eventually(&api, &db, true);
    c.set_pod_labels(&api, &[("app", "retired")])?;
    eventually(&api, &db, false);
    Ok(())
}

#[test]
fn policy_applies_to_peers_on_other_nodes_in_tunnel_mode() -> Result<()> {
    policy_across_nodes("tunnel")
}

#[test]
fn policy_applies_to_peers_on_other_nodes_in_native_mode() -> Result<()> {
    policy_across_nodes("native")
}

/// In tunnel mode the sender's identity travels in the VNI: a new replica whose Pod object has
/// not reached the receiving node yet is already let in by a policy that admits its labels.
/// (In native mode its address would be unknown there, and so denied until the object comes.)
#[test]
fn the_vni_carries_the_identity_before_the_remote_pods_object_arrives() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, 2, "tunnel", THROUGH_A_ROUTER)?;
    let db = c.add_pod(1, "default", "db", &[("app", "db")])?;
    let first = c.add_pod(0, "default", "api-1", &[("app", "api")])?;
    c.wait_until_every_node_knows(first.ip())?;
    c.apply(
        "db",
        &[policy(
            "db",
            "db",
            json!([{ "podSelector": { "matchLabels": { "app": "api" } } }]),
        )],
    )?;
    eventually(&first, &db, true);

    let second = c.add_pod(0, "default", "api-2", &[("app", "api")])?;
    c.forget_pod_on(1, &second)?;
    assert_eq!(
        ipcache_identity(c.node(1), second.ip())?,
        None,
        "node 1 does not know the new replica"
    );
    assert!(reaches(&second, &db), "admitted by the identity in the VNI");
    tcp_echo(&second, &db, 0)?;
    Ok(())
}

/// A node that leaves takes its routes and ipcache entries with it on every other node; one
/// that joins is reached within a second.
#[test]
fn nodes_leave_and_join() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut c = cluster(&run, 3, "tunnel", THROUGH_A_ROUTER)?;
    let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
    let gone = c.add_pod(2, "default", "gone", &[("app", "gone")])?;
    c.wait_until_every_node_knows(gone.ip())?;
    talk(&a, &gone)?;
    let cidr = c.node(2).pod_cidr().to_string();
    drop(gone);
    c.remove_node(2)?;
    c.wait_for_every_node("node 2's routes and ipcache entries gone", |node| {
        let routes = node.netns().ip(&["-4", "route", "show", "proto", "77"])?;
        let cache = node.dump_map_text("ipcache")?;
        Ok(!routes.stdout_text().contains(&cidr) && !cache.contains(&ipcache_key_text(&cidr)))
    })?;

    let joined = c.add_node()?;
    let b = c.add_pod(joined, "default", "b", &[("app", "b")])?;
    c.wait_until_every_node_knows(b.ip())?;
    talk(&a, &b)?;
    talk(&b, &a)?;
    Ok(())
}

/// How bpftool prints the first address bytes of a prefix key, to find it in a dump.
fn ipcache_key_text(cidr: &str) -> String {
    let addr: Ipv4Addr = cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let [a, b, c, _] = addr.octets();
    format!("{a}, {b}, {c}, 0")
}

/// Restarting the agent of one node leaves established cross-node TCP flows running, in both
/// modes: the programs, the tunnel device, the routes and the maps stay while it is away, and
/// the new agent changes none of them before it has the cluster's state.
#[test]
fn an_agent_restart_keeps_cross_node_flows_alive() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    // Native routing over a switch: the routes through the uplink are what carries the flow.
    for (mode, underlay) in [("tunnel", THROUGH_A_ROUTER), ("native", Underlay::Switch)] {
        let mut c = cluster(&run, 2, mode, underlay)?;
        let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
        let b = c.add_pod(1, "default", "b", &[("app", "b")])?;
        c.wait_until_every_node_knows(b.ip())?;
        let server = EchoServer::start(&b, 7000, 0)?;
        let tunnel = c.node(0).netns().link_index("myelin_vxlan")?;
        assert_eq!(
            tunnel.is_some(),
            mode == "tunnel",
            "{mode}: node 0's tunnel device"
        );
        let stopped = time_until_flow_stops(&a, &server, Duration::from_secs(3), || {
            c.node_mut(0).stop_agent()?;
            c.node_mut(0).start_agent()
        })?;
        assert_eq!(
            stopped, None,
            "{mode}: the flow kept running through the restart"
        );
        // Kept, not deleted and made again: while it is gone, so are its routes and filters,
        // and every packet into or out of the tunnel is lost (a stall the flow above survives
        // only when the new agent is quick).
        assert_eq!(
            c.node(0).netns().link_index("myelin_vxlan")?,
            tunnel,
            "{mode}: the restarted agent kept node 0's tunnel device"
        );
        let log = c.node(0).agent_log();
        assert!(
            !log.contains("route to a node that left removed"),
            "{mode}: the restarted agent removed no route to a node that is still there:\n{log}"
        );
        talk(&a, &b)?;
    }
    Ok(())
}

/// The same cluster with every agent watching one test API server (Node and Pod objects with
/// their addresses, as kubelet and the controller manager write them).
#[test]
fn both_modes_work_with_the_kubernetes_source() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    for mode in ["tunnel", "native"] {
        let c = Cluster::start(
            &run,
            ClusterSpec::new(2, Underlay::Switch)
                .agent_args(&["--routing-mode", mode])
                .source(AgentSource::Kubernetes),
        )?;
        let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
        let b = c.add_pod(1, "default", "b", &[("app", "b")])?;
        c.wait_until_every_node_knows(b.ip())?;
        c.wait_until_every_node_knows(a.ip())?;
        talk(&a, &b)?;
        talk(&b, &c.node_on_underlay(0))?;
    }
    Ok(())
}

/// Nodes that cannot be routed (no pod CIDR, no InternalIP, a pod CIDR that overlaps another
/// node's) are left out with the reason `myelinctl nodes` shows; of two overlapping nodes
/// neither is routed, so no pod's packet goes to the wrong one; once the overlap is gone the
/// other node is routed again.
#[test]
fn nodes_that_cannot_be_routed_are_shown_with_why_and_never_routed_wrongly() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let c = cluster(&run, 2, "tunnel", Underlay::Switch)?;
    let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
    let b = c.add_pod(1, "default", "b", &[("app", "b")])?;
    c.wait_until_every_node_knows(b.ip())?;
    talk(&a, &b)?;
    let node1_cidr = c.node(1).pod_cidr().to_string();
    let node = |name: &str, spec: serde_json::Value, addresses: serde_json::Value| {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name },
            "spec": spec,
            "status": { "addresses": addresses },
        })
    };
    let internal = |ip: &str| json!([{ "type": "InternalIP", "address": ip }]);
    // Inside node 1's CIDR: both claim 10.244.<1>.0/25.
    let overlapping = node1_cidr.replace("/24", "/25");
    c.apply(
        "unroutable",
        &[
            node("nocidr", json!({}), internal("192.168.100.60")),
            node(
                "noip",
                json!({ "podCIDR": "10.244.50.0/24" }),
                json!([{ "type": "Hostname", "address": "noip" }]),
            ),
            node(
                "overlap",
                json!({ "podCIDR": overlapping }),
                internal("192.168.100.61"),
            ),
        ],
    )?;
    let reasons = |node: &myelin_tests::Node| -> Result<Vec<(String, bool, String)>> {
        let listed: serde_json::Value =
            serde_json::from_str(&node.myelinctl(&["nodes", "--json"])?)
                .map_err(myelin_tests::Error::json("myelinctl nodes --json"))?;
        Ok(listed
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or_default().to_string(),
                    n["routed"].as_bool().unwrap_or(true),
                    n["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    };
    c.wait_for_every_node("the unroutable nodes listed with why", |node| {
        let listed = reasons(node)?;
        let why = |name: &str| {
            listed
                .iter()
                .find(|(n, routed, _)| n == name && !routed)
                .map(|(_, _, why)| why.clone())
        };
        Ok(why("nocidr").is_some_and(|w| w.contains("podCIDR"))
            && why("noip").is_some_and(|w| w.contains("InternalIP"))
            && why("overlap").is_some_and(|w| w.contains("overlaps")))
    })?;
    let listed = reasons(c.node(0))?;
    let node1 = listed
        .iter()
        .find(|(n, _, _)| n == c.node(1).name())
        .expect("node 0 lists node 1");
    assert!(!node1.1, "node 1 overlaps and is not routed: {listed:?}");
    assert!(
        node1.2.contains("overlap"),
        "and says with whom: {listed:?}"
    );
    let routes = c
        .node(0)
        .netns()
        .ip(&["-4", "route", "show", "proto", "77"])?
        .stdout_text();
    let prefix = node1_cidr.rsplit_once('.').map_or("", |(p, _)| p);
    assert!(
        !routes.contains(prefix),
        "no route to either overlapping CIDR: {routes}"
    );
    assert!(
        !reaches(&a, &b),
        "no packet goes to a node that may be wrong"
    );

    c.remove_applied("unroutable")?;
    c.wait_for_every_node("node 1 routed again", |node| {
        Ok(node.name() == c.node(1).name()
            || reasons(node)?
                .iter()
                .any(|(n, routed, _)| n == c.node(1).name() && *routed))
    })?;
    eventually(&a, &b, true);
    Ok(())
}

/// An InternalIP that no device of the node holds, or an `--uplink` that does not exist, stops
/// the agent at start with an error that names it.
#[test]
fn an_uplink_that_cannot_be_found_stops_the_agent_naming_it() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = myelin_tests::Node::create(&run, myelin_tests::NodeSpec::new("lost"))?;
    node.cluster().write(
        "node",
        &[myelin_tests::cluster::node_object_at(
            node.name(),
            node.pod_cidr(),
            Ipv4Addr::new(192, 0, 2, 99),
        )],
    )?;
    let out = node.run_second_agent(Duration::from_secs(20))?;
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the agent stopped: {said}");
    assert!(said.contains("192.0.2.99"), "naming the address: {said}");

    let mut node = node;
    node.agent_args_mut()
        .extend(["--uplink".to_string(), "nosuch0".to_string()]);
    let out = node.run_second_agent(Duration::from_secs(20))?;
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the agent stopped: {said}");
    assert!(said.contains("nosuch0"), "naming the device: {said}");
    Ok(())
}

/// A node that changes its address (on the same uplink) is reached at the new one within a
/// second, in both modes: the other nodes' routes and ipcache follow its Node object, and a
/// flow between two other nodes goes on untouched. Its own agent follows too, without a
/// restart: its routes get the new source, and its pods and its own stack reach the others.
#[test]
fn a_node_that_changes_its_address_is_followed_without_disturbing_other_flows() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    for mode in ["tunnel", "native"] {
        let mut c = cluster(&run, 3, mode, Underlay::Switch)?;
        let [a, b, far] = a_pod_on_each_of_three_nodes(&c)?;
        talk(&a, &b)?;
        let moved = Ipv4Addr::new(192, 168, 100, 61);
        let server = EchoServer::start(&far, 7000, 0)?;
        let stopped = time_until_flow_stops(&a, &server, Duration::from_secs(2), || {
            c.readdress_node(1, moved)?;
            c.wait_for_every_node("node 1's new address taken in", |node| {
                Ok(if node.name() == c.node(1).name() {
                    node.status()?.routing.is_some_and(|r| r.node_ip == moved)
                } else {
                    ipcache_identity(node, moved)? == Some(REMOTE_NODE)
                })
            })
        })?;
        assert_eq!(stopped, None, "{mode}: the flow to node 2 kept running");
        // Native routing sends straight to the nodes of the uplink's subnet; the tunnel has
        // no such subnet.
        let direct = c.node(1).status()?.routing.and_then(|r| r.direct_subnet);
        let expected = (mode == "native").then(|| "192.168.100.0/24".to_string());
        assert_eq!(direct, expected, "{mode}: node 1's status");
        ping_within(&a, &b, Duration::from_secs(1))?;
        talk(&a, &b)?;
        talk(&b, &a)?;
        talk(c.node(1), &a)?;
        talk(c.node(0), &b)?;
        assert_eq!(
            *tcp_source_seen(&b, c.world(), 0)?.ip(),
            moved,
            "{mode}: the world sees node 1's new address"
        );
    }
    Ok(())
}

/// Pods `a`, `b` and `far` on nodes 0, 1 and 2, each known to every node.
fn a_pod_on_each_of_three_nodes(c: &Cluster) -> Result<[ClusterPod; 3]> {
    let pods = [
        c.add_pod(0, "default", "a", &[("app", "a")])?,
        c.add_pod(1, "default", "b", &[("app", "b")])?,
        c.add_pod(2, "default", "far", &[("app", "far")])?,
    ];
    for pod in &pods {
        c.wait_until_every_node_knows(pod.ip())?;
    }
    Ok(pods)
}

/// A second subnet put on every node's uplink while the agents run (a wire carrying two
/// subnets, as during a renumbering), and nodes whose InternalIP moves into it: every agent
/// takes the uplink's new subnet from the kernel (routes to the nodes now on it), and a moved
/// node takes it for native routing's direct next hops, in the kernel's copy of its
/// configuration: nodes in the new subnet are sent to straight, the one left in the old subnet
/// through the FIB. Pods on every node reach each other both ways.
#[test]
fn nodes_follow_a_new_subnet_on_their_uplink_and_a_node_moving_into_it() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut c = cluster(&run, 3, "native", Underlay::Switch)?;
    let [a, b, far] = a_pod_on_each_of_three_nodes(&c)?;
    talk(&b, &a)?;
    talk(&b, &far)?;
    // Node 1's direct-next-hop subnet in the kernel's copy of its config, and in its status.
    let direct_is = |c: &Cluster, subnet: &str, why: &str| -> Result<()> {
        let node = c.node(1);
        let expected = Some(subnet.to_string());
        assert_eq!(direct_next_hop_subnet(node)?, expected, "{why}");
        let shown = node.status()?.routing.and_then(|r| r.direct_subnet);
        assert_eq!(shown, expected, "{why}: status shows it");
        Ok(())
    };
    direct_is(
        &c,
        "192.168.100.0/24",
        "node 1 sends straight into the switch's subnet",
    )?;

    // A second subnet on the same wire: every node gets an address in it, node 1 last.
    let second = |index: u8| Ipv4Addr::new(10, 77, 0, 10 + index);
    let add_second = |c: &Cluster, index: u8| {
        let at = format!("{}/24", second(index));
        c.node(usize::from(index))
            .netns()
            .ip(&["addr", "add", &at, "dev", "eth0"])
    };
    add_second(&c, 0)?;
    add_second(&c, 2)?;
    // Nodes 1 and 2 move into it; node 0 stays in the first. Node 1's object gives its new
    // address before its uplink holds it: its agent keeps the old one until it does.
    let first = c.node_ip(1);
    c.announce_internal_ip(1, second(1))?;
    c.announce_internal_ip(2, second(2))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !c
        .node(1)
        .agent_log()
        .contains("which cannot be taken in place")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node 1's agent did not say that its new address is not there yet"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.node(1).status()?.routing.map(|r| r.node_ip),
        Some(first),
        "node 1 keeps its old address until the uplink holds the new one"
    );
    add_second(&c, 1)?;
    c.wait_for_every_node("nodes 1 and 2 at their new addresses", |node| {
        let own = |index: usize, ip: Ipv4Addr| {
            Ok::<_, myelin_tests::Error>(if node.name() == c.node(index).name() {
                node.status()?.routing.is_some_and(|r| r.node_ip == ip)
            } else {
                ipcache_identity(node, ip)? == Some(REMOTE_NODE)
            })
        };
        Ok(own(1, second(1))? && own(2, second(2))?)
    })?;
    direct_is(
        &c,
        "10.77.0.0/24",
        "node 1 sends straight into its new subnet",
    )?;
    // Node 2 straight, node 0 through the FIB, from node 1; and back.
    ping_within(&b, &far, Duration::from_secs(1))?;
    talk(&b, &far)?;
    talk(&far, &b)?;
    talk(&b, &a)?;
    talk(&a, &b)?;
    talk(c.node(1), &far)?;
    talk(c.node(0), &b)?;
    Ok(())
}

/// The subnet native routing sends straight into (`DatapathConfig::uplink_net` / `uplink_mask`
/// in the node's `config` map, as the programs read it); `None` when every node goes through
/// the FIB.
fn direct_next_hop_subnet(node: &myelin_tests::Node) -> Result<Option<String>> {
    let entries = node.dump_map("config")?;
    let value = entries
        .iter()
        .map(|e| e.get("formatted").unwrap_or(e))
        .find(|e| e["key"] == 0)
        .map(|e| e["value"].clone())
        .expect("the config map has its one entry");
    let octets = |field: &str| -> [u8; 4] {
        let mut out = [0u8; 4];
        for (at, byte) in out.iter_mut().enumerate() {
            *byte = value[field][at]
                .as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .unwrap_or_else(|| panic!("{field} in {value}"));
        }
        out
    };
    let mask = u32::from_be_bytes(octets("uplink_mask"));
    Ok((mask != 0).then(|| {
        format!(
            "{}/{}",
            Ipv4Addr::from(octets("uplink_net")),
            mask.count_ones()
        )
    }))
}

/// A device that stops being the uplink between two runs of the agent (`--uplink` changed,
/// the InternalIP moved to another device) keeps none of Myelin's uplink programs: they would
/// go on delivering, translating and masquerading there. The new uplink gets them, and traffic
/// between the nodes flows.
#[test]
fn a_device_that_is_no_longer_the_uplink_keeps_none_of_the_uplink_programs() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut c = cluster(&run, 2, "native", Underlay::Switch)?;
    let netns = c.node(0).netns();
    netns.ip(&[
        "link", "add", "spare0", "type", "veth", "peer", "name", "spare1",
    ])?;
    netns.ip(&["link", "set", "spare0", "up"])?;
    let uplink = c
        .node(0)
        .status()?
        .routing
        .map(|r| r.uplink)
        .expect("node0 routes");
    // As they settle: the kernel detaches a tcx link whose pin is removed a moment later.
    let ours = |c: &Cluster, dev: &str, want: &[&str]| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let now = uplink_programs(c.node(0).netns(), dev)?;
            if now == want || std::time::Instant::now() > deadline {
                return Ok::<_, myelin_tests::Error>(now);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let both = ["from_uplink", "to_uplink"];
    assert_eq!(ours(&c, &uplink, &both)?, both);

    let node = c.node_mut(0);
    node.stop_agent()?;
    node.agent_args_mut()
        .extend(["--uplink".to_string(), "spare0".to_string()]);
    node.start_agent_serving()?;
    assert_eq!(ours(&c, "spare0", &both)?, both, "spare0 is the uplink");
    let left = ours(&c, &uplink, &[])?;
    assert!(
        left.is_empty(),
        "{uplink} is no longer the uplink: {left:?}"
    );

    let node = c.node_mut(0);
    node.stop_agent()?;
    let args = node.agent_args_mut();
    let at = args.iter().position(|a| a == "--uplink").expect("the flag");
    args.drain(at..at + 2);
    node.start_agent_serving()?;
    let left = ours(&c, "spare0", &[])?;
    assert!(left.is_empty(), "spare0 is no longer the uplink: {left:?}");
    assert_eq!(ours(&c, &uplink, &both)?, both);
    let a = c.add_pod(0, "default", "a", &[("app", "a")])?;
    let b = c.add_pod(1, "default", "b", &[("app", "b")])?;
    c.wait_until_every_node_knows(a.ip())?;
    c.wait_until_every_node_knows(b.ip())?;
    talk(&a, &b)?;
    Ok(())
}

/// Which of the uplink programs run on `dev`'s hooks.
fn uplink_programs(netns: &myelin_tests::Netns, dev: &str) -> Result<Vec<String>> {
    let mut programs = Vec::new();
    for (hook, program) in [("ingress", "from_uplink"), ("egress", "to_uplink")] {
        if myelin_tests::tc::runs(netns, dev, hook, program)? {
            programs.push(program.to_string());
        }
    }
    Ok(programs)
}
