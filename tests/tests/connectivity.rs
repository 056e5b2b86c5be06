//! Real traffic through Myelin's datapath between pods of one node and between pods and their
//! node; the per-endpoint counters; cleanup after DEL; and an agent restart under live pods.

use std::collections::{BTreeMap, BTreeSet};

use myelin_api::EndpointCounters;
use myelin_tests::{
    Netns, Node, NodeSpec, Pod, Result,
    cluster::{namespace_object, pod_object},
    root_test,
    tc::{self, tc},
    traffic::{Host, ping, tcp_echo, udp_echo},
};

/// Three pods as a cluster would have them: objects in the cluster dir first (the agent learns
/// their labels), then ADD for each.
fn three_pods(node: &Node) -> Result<Vec<Pod>> {
    let pods = [
        ("frontend", "web", 80),
        ("backend", "api", 8080),
        ("db", "data", 5432),
    ];
    let mut objects = vec![namespace_object("shop", &[("team", "shop")])];
    for (name, tier, port) in pods {
        objects.push(pod_object(
            node.name(),
            "shop",
            name,
            &[("app", name), ("tier", tier)],
            &[port],
        ));
    }
    node.cluster().write("shop", &objects)?;
    pods.iter()
        .map(|(name, ..)| node.add_pod("shop", name))
        .collect()
}

/// Every ordered pair of distinct pods.
fn pairs(pods: &[Pod]) -> impl Iterator<Item = (&Pod, &Pod)> {
    pods.iter().flat_map(move |a| {
        pods.iter()
            .filter(move |b| b.ip() != a.ip())
            .map(move |b| (a, b))
    })
}

#[test]
fn pods_on_one_node_reach_each_other_with_ping_tcp_and_udp() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let pods = three_pods(&node)?;
    let ips: BTreeSet<_> = pods.iter().map(|p| p.ip()).collect();
    assert_eq!(ips.len(), pods.len(), "pods share an address");
    for (from, to) in pairs(&pods) {
        ping(from, to)?;
        tcp_echo(from, to, 0)?;
        udp_echo(from, to, 0)?;
    }
    Ok(())
}

#[test]
fn node_and_pods_reach_each_other() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let pods = three_pods(&node)?;
    for pod in &pods {
        ping(pod, &node)?;
        tcp_echo(pod, &node, 0)?;
        udp_echo(pod, &node, 0)?;
        ping(&node, pod)?;
        tcp_echo(&node, pod, 0)?;
        udp_echo(&node, pod, 0)?;
    }
    Ok(())
}

#[test]
fn endpoint_counters_count_what_pods_send_and_receive() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sender = node.add_pod("default", "sender")?;
    let receiver = node.add_pod("default", "receiver")?;
    let bystander = node.add_pod("default", "bystander")?;

    let before = counters(&node)?;
    for pod in [&sender, &receiver, &bystander] {
        assert!(
            before.contains_key(&pod.ip()),
            "no endpoint for {}",
            pod.label()
        );
    }
    const PINGS: u64 = 10;
    for _ in 0..PINGS {
        ping(&sender, &receiver)?;
    }
    tcp_echo(&sender, &receiver, 0)?;
    udp_echo(&sender, &receiver, 0)?;
    let after = counters(&node)?;

    // Counters that went backwards show up as 0 and fail the checks below.
    let delta = |pod: &Pod| {
        let b = before.get(&pod.ip()).copied().unwrap_or_default();
        let a = after.get(&pod.ip()).copied().unwrap_or_default();
        (
            a.tx_packets.saturating_sub(b.tx_packets),
            a.tx_bytes.saturating_sub(b.tx_bytes),
            a.rx_packets.saturating_sub(b.rx_packets),
            a.rx_bytes.saturating_sub(b.rx_bytes),
        )
    };
    let (tx_packets, tx_bytes, _, _) = delta(&sender);
    let (_, _, rx_packets, rx_bytes) = delta(&receiver);
    // The echo requests, the TCP handshake, data and teardown, at least one UDP datagram.
    let least = PINGS + 4;
    assert!(
        tx_packets >= least && tx_bytes > 0,
        "sender tx: {:?}",
        delta(&sender)
    );
    assert!(
        rx_packets >= least && rx_bytes > 0,
        "receiver rx: {:?}",
        delta(&receiver)
    );
    // Replies went the other way.
    assert!(
        delta(&receiver).0 >= PINGS,
        "receiver tx: {:?}",
        delta(&receiver)
    );
    assert!(delta(&sender).2 >= PINGS, "sender rx: {:?}", delta(&sender));
    // Counters are per endpoint: a pod that took no part saw none of it. Its own IPv6
    // housekeeping (router and multicast listener messages) may count a few packets.
    let (by_tx, _, by_rx, _) = delta(&bystander);
    assert!(
        by_tx < PINGS / 2 && by_rx < PINGS / 2,
        "bystander counted the others' traffic: {:?}",
        delta(&bystander)
    );
    Ok(())
}

fn counters(node: &Node) -> Result<BTreeMap<std::net::Ipv4Addr, EndpointCounters>> {
    Ok(node
        .endpoints()?
        .into_iter()
        .map(|e| (e.ip, e.counters))
        .collect())
}

#[test]
fn deleting_every_pod_leaves_the_node_as_it_started() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let pods = three_pods(&node)?;
    let during = node.footprint()?;
    assert_eq!(during.endpoints.len(), before.endpoints.len() + 3);
    assert_eq!(during.endpoints_map.len(), before.endpoints_map.len() + 3);
    assert_eq!(during.free_addresses, before.free_addresses - 3);
    for (from, to) in pairs(&pods) {
        ping(from, to)?;
    }
    for pod in pods {
        node.delete_pod(pod)?;
    }
    assert_eq!(node.footprint()?, before);
    Ok(())
}

#[test]
fn pods_keep_connectivity_while_the_agent_restarts() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let a = node.add_pod("default", "a")?;
    let b = node.add_pod("default", "b")?;
    let talk = |node: &Node| -> Result<()> {
        for (from, to) in [(&a, &b), (&b, &a)] {
            ping(from, to)?;
            tcp_echo(from, to, 0)?;
        }
        ping(&a, node)?;
        ping(node, &b)?;
        Ok(())
    };
    talk(&node)?;
    let endpoints_before = node.footprint()?.endpoints;

    node.stop_agent()?;
    talk(&node)?;

    node.start_agent()?;
    talk(&node)?;
    assert_eq!(
        node.footprint()?.endpoints,
        endpoints_before,
        "endpoints did not survive the restart"
    );

    let c = node.add_pod("default", "c")?;
    assert!(
        c.ip() != a.ip() && c.ip() != b.ip(),
        "the agent handed out {} again after its restart",
        c.ip()
    );
    ping(&c, &a)?;
    tcp_echo(&a, &c, 0)?;
    Ok(())
}

/// The default attaches with a clsact qdisc (every other test here runs that way); tcx links,
/// pinned so that they outlive the agent, are the alternative on Linux 6.6+.
#[test]
fn tcx_links_carry_traffic_survive_a_restart_and_go_with_the_pod() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(
        &run,
        NodeSpec::new("node").agent_args(&["--attach-mode", "tcx"]),
    )?;
    assert_eq!(node.status()?.attach_mode, "tcx");
    let a = node.add_pod("default", "a")?;
    let b = node.add_pod("default", "b")?;
    let pins = |node: &Node| -> Result<BTreeSet<String>> {
        let dir = node.bpffs().join("myelin/links");
        Ok(std::fs::read_dir(&dir)
            .map_err(myelin_tests::Error::io(format!(
                "listing {}",
                dir.display()
            )))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    };
    let expected: BTreeSet<String> = [&a, &b]
        .iter()
        .flat_map(|p| ["ingress", "egress"].map(|d| format!("{}-{d}", p.host_ifname())))
        .collect();
    assert_eq!(
        pins(&node)?,
        expected,
        "one pinned link per pod and direction"
    );
    for (from, to) in [(&a, &b), (&b, &a)] {
        ping(from, to)?;
        tcp_echo(from, to, 0)?;
    }
    node.stop_agent()?;
    ping(&a, &b)?;
    node.start_agent()?;
    ping(&a, &b)?;
    tcp_echo(&b, &a, 0)?;
    assert_eq!(
        pins(&node)?,
        expected,
        "the restarted agent swapped its programs in place"
    );
    node.delete_pod(a)?;
    node.delete_pod(b)?;
    assert!(pins(&node)?.is_empty(), "DEL left link pins behind");
    Ok(())
}

/// The hooks of a pod's host veth and the program Myelin runs on each.
const HOOKS: [(&str, &str); 2] = [("ingress", "from_container"), ("egress", "to_container")];

/// Another tool's filter on a pod's veth: u32 on IPv4 to a TEST-NET address. None of the pods'
/// packets match it, so they go on to the next filter, Myelin's.
fn add_foreign_filter(netns: &Netns, dev: &str, hook: &str, pref: &str) -> Result<()> {
    tc(
        netns,
        &[
            "filter",
            "add",
            "dev",
            dev,
            hook,
            "pref",
            pref,
            "protocol",
            "ip",
            "u32",
            "match",
            "ip",
            "dst",
            "192.0.2.1/32",
        ],
    )?;
    Ok(())
}

fn foreign_filters(node: &Node, veth: &str, hook: &str) -> Result<Vec<tc::Filter>> {
    Ok(tc::filters(node.netns(), veth, hook)?
        .into_iter()
        .filter(|f| f.kind == "u32")
        .collect())
}

/// Other programs may filter on a pod's veth too. While the agent is down, a tool clears a's
/// veth, as tools that reset a device do, and takes priority 1 there, where Myelin's filters
/// were; on b's it adds a filter next to Myelin's. The restarted agent attaches again around
/// both, and the pods talk through Myelin's programs.
#[test]
fn foreign_tc_filters_on_pod_veths_survive_an_agent_restart() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let a = node.add_pod("default", "a")?;
    let b = node.add_pod("default", "b")?;
    let (veth_a, veth_b) = (a.host_ifname(), b.host_ifname());

    node.stop_agent()?;
    let netns = node.netns();
    tc(netns, &["qdisc", "del", "dev", &veth_a, "clsact"])?;
    tc(netns, &["qdisc", "add", "dev", &veth_a, "clsact"])?;
    for (hook, _) in HOOKS {
        add_foreign_filter(netns, &veth_a, hook, "1")?;
        add_foreign_filter(netns, &veth_b, hook, "2")?;
    }
    let mut before = Vec::new();
    for veth in [&veth_a, &veth_b] {
        for (hook, _) in HOOKS {
            before.push(foreign_filters(&node, veth, hook)?);
        }
    }

    node.start_agent()?;
    let mut after = Vec::new();
    for veth in [&veth_a, &veth_b] {
        for (hook, program) in HOOKS {
            after.push(foreign_filters(&node, veth, hook)?);
            let ours = tc::filters(node.netns(), veth, hook)?
                .into_iter()
                .filter(|f| f.runs(program))
                .count();
            assert_eq!(ours, 1, "{program} on {veth} {hook}, attached once");
        }
    }
    assert_eq!(after, before, "the foreign filters are untouched");

    let tx = |node: &Node| -> Result<Vec<u64>> {
        let counters = counters(node)?;
        Ok([&a, &b]
            .iter()
            .map(|p| counters.get(&p.ip()).map_or(0, |c| c.tx_packets))
            .collect())
    };
    let sent_before = tx(&node)?;
    for (from, to) in [(&a, &b), (&b, &a)] {
        ping(from, to)?;
        tcp_echo(from, to, 0)?;
    }
    let sent_after = tx(&node)?;
    for (pod, (before, after)) in [&a, &b].iter().zip(sent_before.iter().zip(&sent_after)) {
        // A ping and a TCP exchange each way, counted by from_container behind the foreign
        // filter.
        assert!(
            after - before >= 4,
            "{}: Myelin saw {} packets",
            pod.label(),
            after - before
        );
    }
    Ok(())
}

/// The legacy ingress qdisc sits where clsact goes but has one filter list for both hooks: the
/// egress program would run on ingress. The agent says which device, and leaves it alone.
#[test]
fn a_pod_veth_with_another_qdisc_than_clsact_is_refused_by_name() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let a = node.add_pod("default", "a")?;
    let veth = a.host_ifname();
    node.stop_agent()?;
    tc(node.netns(), &["qdisc", "del", "dev", &veth, "clsact"])?;
    tc(node.netns(), &["qdisc", "add", "dev", &veth, "ingress"])?;

    // Whether the agent then starts without the pod's datapath or refuses to start is the
    // agent's policy; the error must be there, naming the device.
    let started = node.start_agent();
    let expected = format!("{veth} has a qdisc of kind ingress");
    assert!(
        node.agent_log().contains(&expected),
        "no `{expected}` in the agent log (start: {started:?})"
    );
    assert_eq!(tc::qdiscs(node.netns(), &veth)?, ["ingress"]);
    let filters = tc::filters(node.netns(), &veth, "ingress")?;
    assert!(
        filters.is_empty(),
        "attached into the ingress qdisc: {filters:?}"
    );
    Ok(())
}
