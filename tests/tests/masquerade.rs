//! Masquerading with real traffic: pods of a node reach the world, which has no route to any
//! pod CIDR, as their node; replies and ICMP errors find the pod again, so that path MTU
//! discovery works through a router whose link to the world has a smaller MTU.
//!
//! One node behind the multinode harness's router (`Underlay::Router`): pod -> node -> router
//! (192.168.1.1, forwarding) -> world (203.0.113.10).

use std::{
    thread,
    time::{Duration, Instant},
};

use myelin_tests::{
    Error, Result,
    metrics::samples,
    multinode::{Cluster, ClusterSpec, Underlay},
    root_test, tc,
    traffic::{
        Host, ping, ping_within, tcp_bulk, tcp_echo, tcp_source_seen, udp_echo, udp_source_seen,
    },
};

/// The MTU of the router's link to the world (the rest of the path has 1500).
const WORLD_LINK_MTU: u32 = 1280;
/// How long the agent's collectors wait between sweeps here (the metrics count at each).
const GC_INTERVAL: &str = "1s";

fn one_node_behind_a_router(run: &myelin_tests::RunPrefix, args: &[&str]) -> Result<Cluster> {
    Cluster::start(
        run,
        ClusterSpec::new(
            1,
            Underlay::Router {
                route_pod_cidrs: false,
            },
        )
        .agent_args(&["--conntrack-gc-interval", GC_INTERVAL])
        .agent_args(args),
    )
}

/// The masquerading programs on the node's uplink (`eth0`), by hook.
fn uplink_programs(cluster: &Cluster) -> Result<Vec<(&'static str, &'static str)>> {
    let mut found = Vec::new();
    for (hook, program) in [("ingress", "from_uplink"), ("egress", "to_uplink")] {
        if tc::runs(cluster.node(0).netns(), "eth0", hook, program)? {
            found.push((hook, program));
        }
    }
    Ok(found)
}

#[test]
fn pods_reach_the_world_as_their_node_and_its_replies_find_them() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cluster = one_node_behind_a_router(&run, &[])?;
    assert_eq!(
        uplink_programs(&cluster)?,
        [("ingress", "from_uplink"), ("egress", "to_uplink")]
    );
    let pod = cluster.add_pod(0, "default", "client", &[])?;
    let world = cluster.world();
    // The world has no route to the pod: every answer below comes back through the NAT.
    ping(&pod, world)?;
    tcp_echo(&pod, world, 0)?;
    udp_echo(&pod, world, 0)?;
    let node_ip = cluster.node_ip(0);
    for seen in [
        tcp_source_seen(&pod, world, 0)?,
        udp_source_seen(&pod, world, 0)?,
    ] {
        assert_eq!(*seen.ip(), node_ip, "the world sees the node");
        // The pod's ports come from its own ephemeral range, below the node's NAT range.
        assert!(
            (61000..=65535).contains(&seen.port()),
            "port {} outside the NAT range above ip_local_port_range",
            seen.port()
        );
    }
    // The node itself still talks to the world as itself.
    let node = cluster.node_on_underlay(0);
    assert_eq!(*tcp_source_seen(&node, world, 0)?.ip(), node_ip);

    // The NAT table's fill and its failures are metrics.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = cluster.node(0).metrics_get("/metrics")?;
        assert_eq!(status, 200);
        let samples = samples(&body);
        let value = |name: &str| samples.get(name).copied();
        assert_eq!(value(r#"myelin_map_capacity{map="snat"}"#), Some(131_072.0));
        assert_eq!(
            value(r#"myelin_drops_total{reason="nat-port-exhausted"}"#),
            Some(0.0)
        );
        if value(r#"myelin_map_entries{map="snat"}"#).is_some_and(|n| n >= 2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the collector never counted the NAT table's entries: {:?}",
            value(r#"myelin_map_entries{map="snat"}"#)
        );
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn path_mtu_discovery_works_for_pods_through_a_smaller_link() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cluster = one_node_behind_a_router(&run, &[])?;
    // Two pods: each learns the path MTU on its own.
    let pinger = cluster.add_pod(0, "default", "pinger", &[])?;
    let sender = cluster.add_pod(0, "default", "sender", &[])?;
    let world = cluster.world();
    // Only the router's side of the link is smaller: the world answers with full-size
    // segments of its own, so TCP's MSS does not hide the smaller hop from the pod.
    let mtu = WORLD_LINK_MTU.to_string();
    cluster
        .underlay()
        .ip(&["link", "set", "world", "mtu", &mtu])?;

    // A ping that does not fit, DF set: the router's "fragmentation needed" reaches the pod.
    let mut cmd = pinger.netns().command("ping")?;
    cmd.args(["-n", "-c1", "-W2", "-M", "do", "-s", "1400"])
        .arg(world.ip().to_string());
    let out = cmd.output().map_err(Error::io("running ping in the pod"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("mtu = {WORLD_LINK_MTU}")),
        "no \"fragmentation needed\" reached the pod: {text}"
    );
    let route = pinger
        .netns()
        .ip(&["route", "get", &world.ip().to_string()])?
        .stdout_text();
    assert!(
        route.contains(&format!("mtu {WORLD_LINK_MTU}")),
        "the pod learned no path MTU: {route}"
    );

    // TCP sends full-size segments with DF: they arrive only once the pod learns the path's
    // MTU from the router's translated error.
    tcp_bulk(&sender, world, 0)?;
    Ok(())
}

#[test]
fn without_masquerade_pods_leave_as_themselves_and_the_uplink_has_no_programs() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cluster = one_node_behind_a_router(&run, &["--masquerade", "false"])?;
    assert_eq!(uplink_programs(&cluster)?, []);
    let pod = cluster.add_pod(0, "default", "client", &[])?;
    // The world gets the pod's address, which it has no route back to.
    assert!(ping_within(&pod, cluster.world(), Duration::from_secs(1)).is_err());
    Ok(())
}
