//! The multinode harness itself ([`myelin_tests::multinode`]): the underlay in both shapes,
//! the world, pods on their own nodes with their objects everywhere, nodes leaving and
//! joining, the Kubernetes variant, and cleanup after success, a panic and a killed run. Pod
//! traffic between nodes is not checked here: that is the datapath's to test.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use myelin_tests::{
    AgentSource, Error, Node, Result, RunPrefix,
    apiserver::Resource,
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay, ipcache_identity},
    root_test, sweep_leftovers,
    traffic::{Host, ping, ping_within, tcp_echo, tcp_source_seen, udp_source_seen},
};
use serde_json::{Value, json};

/// Every ordered pair of distinct node indexes.
fn node_pairs(cluster: &Cluster) -> Vec<(usize, usize)> {
    let nodes = cluster.node_indexes();
    nodes
        .iter()
        .flat_map(|a| nodes.iter().filter(move |b| *b != a).map(move |b| (*a, *b)))
        .collect()
}

/// Nodes reach each other on their InternalIPs; each reaches the world, which sees the node's
/// address as the source, and is reached by it; the world has no route to any pod.
fn check_underlay_and_world(cluster: &Cluster) -> Result<()> {
    for (a, b) in node_pairs(cluster) {
        ping(&cluster.node_on_underlay(a), &cluster.node_on_underlay(b))?;
    }
    let world = cluster.world();
    for index in cluster.node_indexes() {
        let node = cluster.node_on_underlay(index);
        ping(&node, world)?;
        ping(world, &node)?;
        tcp_echo(world, &node, 0)?;
        assert_eq!(
            *tcp_source_seen(&node, world, 0)?.ip(),
            cluster.node_ip(index)
        );
        assert_eq!(
            *udp_source_seen(&node, world, 0)?.ip(),
            cluster.node_ip(index)
        );
        // Whatever is not in the cluster leaves through the uplink (a lookup: nothing is sent).
        let route = node
            .netns
            .ip(&["route", "get", "198.51.100.7"])?
            .stdout_text();
        assert!(route.contains("dev eth0"), "node{index}: {route}");
    }
    let pod = cluster.add_pod(0, "default", "probe", &[])?;
    assert_world_has_no_route_to(cluster, &pod)?;
    cluster.delete_pod(pod)
}

/// The world's routing table has nothing for `pod`: a ping fails at once, not by timing out.
fn assert_world_has_no_route_to(cluster: &Cluster, pod: &ClusterPod) -> Result<()> {
    let world = cluster.world();
    let lookup = world.netns().ip(&["route", "get", &pod.ip().to_string()]);
    let message = format!("{lookup:?}");
    assert!(
        message.contains("Network is unreachable"),
        "the world has a route to {}: {message}",
        pod.label()
    );
    let started = Instant::now();
    let pinged = ping_within(world, pod, Duration::from_secs(3));
    assert!(pinged.is_err(), "the world reached {}", pod.label());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the ping to {} failed only after {:?}: a timeout, not a missing route",
        pod.label(),
        started.elapsed()
    );
    Ok(())
}

/// The routes of the underlay namespace to pod CIDRs, as `ip route` prints them.
fn pod_routes_of_the_underlay(cluster: &Cluster) -> Result<Vec<String>> {
    Ok(cluster
        .underlay()
        .ip(&["route", "show"])?
        .stdout_text()
        .lines()
        .filter(|l| l.starts_with("10.244."))
        .map(|l| l.trim().to_string())
        .collect())
}

/// Every object of `kind` in a cluster dir's YAML files, by namespace and name.
fn objects_in(dir: &Path, kind: &str) -> Result<BTreeMap<(String, String), Value>> {
    let mut found = BTreeMap::new();
    let entries = fs::read_dir(dir).map_err(Error::io(format!("listing {}", dir.display())))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text =
            fs::read_to_string(&path).map_err(Error::io(format!("reading {}", path.display())))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object: Value =
                serde::Deserialize::deserialize(doc).map_err(|source| Error::Yaml {
                    context: format!("parsing {}", path.display()),
                    source,
                })?;
            if object["kind"] == kind {
                let key = (
                    object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                found.insert(key, object);
            }
        }
    }
    Ok(found)
}

fn pods_in(node: &Node) -> Result<BTreeMap<(String, String), Value>> {
    objects_in(node.cluster().path(), "Pod")
}

fn node_names_in(node: &Node) -> Result<Vec<String>> {
    Ok(objects_in(node.cluster().path(), "Node")?
        .into_keys()
        .map(|(_, name)| name)
        .collect())
}

/// Network namespaces whose names start with `prefix`.
fn namespaces_named(prefix: &str) -> Result<Vec<String>> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "list"]);
    let out = cmd.output().map_err(Error::io("running ip netns list"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Temp dirs whose names start with `prefix`.
fn temp_dirs_named(prefix: &str) -> Result<Vec<String>> {
    let dir = std::env::temp_dir();
    let entries = fs::read_dir(&dir).map_err(Error::io(format!("listing {}", dir.display())))?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// A NetworkPolicy isolating every pod of `namespace` for ingress.
fn isolating_policy(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "podSelector": {}, "policyTypes": ["Ingress"] },
    })
}

/// `<namespace>/<name>` of every policy the agent enforces.
fn policies_of(node: &Node) -> Result<Vec<String>> {
    let status = node
        .client()
        .policies()
        .map_err(Error::api(format!("GET /v1/policies on {}", node.name())))?;
    Ok(status
        .policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect())
}

/// What [`Cluster::apply`] gives reaches every agent; applying the same name again replaces
/// it, and removing it takes it away everywhere.
fn check_applied_objects_reach_every_agent(cluster: &Cluster, namespace: &str) -> Result<()> {
    let enforcing = |expected: Vec<String>| {
        move |node: &Node| -> Result<bool> { Ok(policies_of(node)? == expected) }
    };
    cluster.apply("isolation", &[isolating_policy(namespace, "first")])?;
    cluster.wait_for_every_node(
        "enforcing the first policy",
        enforcing(vec![format!("{namespace}/first")]),
    )?;
    cluster.apply("isolation", &[isolating_policy(namespace, "second")])?;
    cluster.wait_for_every_node(
        "enforcing the second policy in place of the first",
        enforcing(vec![format!("{namespace}/second")]),
    )?;
    cluster.remove_applied("isolation")?;
    cluster.wait_for_every_node("dropping the policies", enforcing(vec![]))
}

fn assert_nothing_left(run: &RunPrefix) -> Result<()> {
    let prefix = format!("{}-", run.as_str());
    assert_eq!(namespaces_named(&prefix)?, Vec::<String>::new());
    assert_eq!(temp_dirs_named(&prefix)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn nodes_reach_each_other_and_the_world_over_a_switch() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cluster = Cluster::start(&run, ClusterSpec::new(3, Underlay::Switch))?;
    assert_eq!(
        cluster.node_ip(2),
        Ipv4Addr::new(192, 168, 100, 12),
        "one subnet"
    );
    check_underlay_and_world(&cluster)?;
    drop(cluster);
    assert_nothing_left(&run)
}

#[test]
fn nodes_reach_each_other_and_the_world_through_a_router() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let underlay = Underlay::Router {
        route_pod_cidrs: true,
    };
    let cluster = Cluster::start(&run, ClusterSpec::new(3, underlay))?;
    // node0 and node2 share a subnet, node1 is on the other: both paths are exercised.
    assert_eq!(cluster.node_ip(1), Ipv4Addr::new(192, 168, 2, 11));
    assert_eq!(cluster.node_ip(2), Ipv4Addr::new(192, 168, 1, 12));
    assert_eq!(
        pod_routes_of_the_underlay(&cluster)?,
        [
            "10.244.0.0/24 via 192.168.1.10 dev subnet1",
            "10.244.1.0/24 via 192.168.2.11 dev subnet2",
            "10.244.2.0/24 via 192.168.1.12 dev subnet1",
        ]
    );
    // Even so, the world has no route to pods: it has none to the router's pod routes.
    check_underlay_and_world(&cluster)?;
    drop(cluster);
    assert_nothing_left(&run)
}

#[test]
fn pods_get_addresses_from_their_own_node_and_every_node_sees_their_objects() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let underlay = Underlay::Router {
        route_pod_cidrs: false,
    };
    let cluster = Cluster::start(&run, ClusterSpec::new(3, underlay))?;
    assert_eq!(pod_routes_of_the_underlay(&cluster)?, Vec::<String>::new());
    let nodes = cluster.node_indexes();
    let pods = nodes
        .iter()
        .map(|&i| cluster.add_pod(i, "shop", &format!("web{i}"), &[("app", "web")]))
        .collect::<Result<Vec<_>>>()?;

    for pod in &pods {
        let node = cluster.node(pod.node());
        let cidr: ipnet::Ipv4Net = node.pod_cidr().parse().map_err(|_| {
            Error::Cluster(format!("node{}'s pod CIDR {}", pod.node(), node.pod_cidr()))
        })?;
        assert!(cidr.contains(&pod.ip()), "{} outside {cidr}", pod.label());
        // Today's single-node datapath: the pod reaches its node, on the gateway and on the
        // node's InternalIP.
        ping(pod, node)?;
        ping(pod, &cluster.node_on_underlay(pod.node()))?;
        tcp_echo(pod, node, 0)?;
        assert_world_has_no_route_to(&cluster, pod)?;
    }

    for &index in &nodes {
        let seen = pods_in(cluster.node(index))?;
        for pod in &pods {
            let key = ("shop".to_string(), pod.name().to_string());
            let object = seen
                .get(&key)
                .unwrap_or_else(|| panic!("node{index} has no object of {}", pod.label()));
            assert_eq!(object["spec"]["nodeName"], format!("node{}", pod.node()));
            assert_eq!(object["metadata"]["labels"]["app"], "web");
            assert_eq!(object["status"]["podIP"], pod.ip().to_string());
            assert_eq!(object["status"]["podIPs"][0]["ip"], pod.ip().to_string());
            assert_eq!(
                object["status"]["hostIP"],
                cluster.node_ip(pod.node()).to_string()
            );
        }
        // One Node object per node, each with its InternalIP.
        assert_eq!(
            node_names_in(cluster.node(index))?,
            ["node0", "node1", "node2"]
        );
    }

    // Every agent learned every pod, with one identity: same namespace, same labels.
    let mut identities = Vec::new();
    for pod in &pods {
        cluster.wait_until_every_node_knows(pod.ip())?;
        for &index in &nodes {
            identities.push(ipcache_identity(cluster.node(index), pod.ip())?);
        }
    }
    identities.dedup();
    assert_eq!(identities.len(), 1, "{identities:?}");
    check_applied_objects_reach_every_agent(&cluster, "shop")?;

    let mut pods = pods.into_iter();
    if let Some(gone) = pods.next() {
        let ip = gone.ip();
        cluster.delete_pod(gone)?;
        cluster.wait_until_no_node_knows(ip)?;
        for &index in &nodes {
            assert!(
                !pods_in(cluster.node(index))?.contains_key(&("shop".into(), "web0".into())),
                "node{index} kept the deleted pod's object"
            );
        }
    }
    for pod in pods {
        cluster.delete_pod(pod)?;
    }
    drop(cluster);
    assert_nothing_left(&run)
}

#[test]
fn a_node_that_leaves_leaves_nothing_behind_and_a_new_one_joins() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let underlay = Underlay::Router {
        route_pod_cidrs: true,
    };
    let mut cluster = Cluster::start(&run, ClusterSpec::new(2, underlay))?;
    let stays = cluster.add_pod(0, "default", "stays", &[("app", "a")])?;
    let leaves = cluster.add_pod(1, "default", "leaves", &[("app", "a")])?;
    let leaving_ip = cluster.node_ip(1);
    cluster.wait_until_every_node_knows(leaves.ip())?;

    cluster.remove_node(1)?;
    assert_eq!(cluster.node_indexes(), [0]);
    // (Its pod's sandbox, `<run>-node1-default-leaves`, is the test's until it drops it.)
    assert!(!namespaces_named(&run.name("node1"))?.contains(&run.name("node1")));
    assert_eq!(
        temp_dirs_named(&format!("{}-", run.name("node1")))?,
        Vec::<String>::new()
    );
    assert!(!cluster.underlay().link_names()?.contains(&"node1".into()));
    assert_eq!(
        pod_routes_of_the_underlay(&cluster)?,
        ["10.244.0.0/24 via 192.168.1.10 dev subnet1"]
    );
    let node0 = cluster.node(0);
    assert_eq!(node_names_in(node0)?, ["node0"]);
    assert!(
        pods_in(node0)?
            .values()
            .all(|p| p["spec"]["nodeName"] == "node0"),
        "the leaving node's pods stayed in the cluster state"
    );
    cluster.wait_until_no_node_knows(leaving_ip)?;
    cluster.wait_until_no_node_knows(leaves.ip())?;
    // Its node has left: the pod's DEL has nowhere to run, the sandbox just goes.
    cluster.delete_pod(leaves)?;

    let joined = cluster.add_node()?;
    assert_eq!(joined, 2, "indexes are not reused");
    assert_eq!(cluster.node_ip(joined), Ipv4Addr::new(192, 168, 1, 12));
    assert_eq!(node_names_in(cluster.node(joined))?, ["node0", "node2"]);
    assert!(pods_in(cluster.node(joined))?.contains_key(&("default".into(), "stays".into())));
    cluster.wait_until_every_node_knows(cluster.node_ip(joined))?;
    cluster.wait_until_every_node_knows(stays.ip())?;
    ping(
        &cluster.node_on_underlay(0),
        &cluster.node_on_underlay(joined),
    )?;
    let newcomer = cluster.add_pod(joined, "default", "newcomer", &[("app", "a")])?;
    ping(&newcomer, cluster.node(joined))?;
    cluster.wait_until_every_node_knows(newcomer.ip())?;

    cluster.delete_pod(stays)?;
    cluster.delete_pod(newcomer)?;
    drop(cluster);
    assert_nothing_left(&run)
}

#[test]
fn nothing_of_a_cluster_remains_after_a_panic_in_the_test() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let body = catch_unwind(AssertUnwindSafe(|| {
        let cluster = Cluster::start(&run, ClusterSpec::new(2, Underlay::Switch))
            .unwrap_or_else(|e| panic!("the cluster did not start: {e:?}"));
        let _pod = cluster.add_pod(1, "default", "a", &[]);
        let made = namespaces_named(&format!("{}-", run.as_str())).unwrap_or_default();
        assert!(made.len() >= 5, "underlay, world, 2 nodes, a pod: {made:?}");
        panic!("the test body fails here");
    }));
    assert!(body.is_err());
    assert_nothing_left(&run)
}

#[test]
fn a_cluster_whose_agents_cannot_start_removes_what_it_made() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let spec = ClusterSpec::new(2, Underlay::Switch).agent_args(&["--no-such-flag"]);
    let Err(e) = Cluster::start(&run, spec) else {
        panic!("agents started with an unknown flag");
    };
    assert!(e.to_string().contains("no-such-flag"), "{e:?}");
    assert_nothing_left(&run)
}

/// Tells the parent test that the child's cluster is up.
const CHILD_READY: &str = "multinode child: cluster up";
/// Set for the child run of [`a_cluster_left_by_a_killed_run`] only.
const CHILD_ENV: &str = "MYELIN_MULTINODE_KILLED_CHILD";

#[test]
fn the_sweeper_removes_what_a_killed_run_left_of_a_cluster() -> Result<()> {
    let Some(_run) = root_test()? else {
        return Ok(());
    };
    let exe = std::env::current_exe().map_err(Error::io("locating the test binary"))?;
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "a_cluster_left_by_a_killed_run",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(Error::io("starting the child test"))?;
    let prefix = format!("myelin-t{}-", child.id());
    let (ready_tx, ready_rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || {
            let up = BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
                .any(|l| l.contains(CHILD_READY));
            let _ = ready_tx.send(up);
        });
    }
    let up = ready_rx.recv_timeout(Duration::from_secs(60));
    // SIGKILL: no guard of the child runs.
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(up, Ok(true), "the child's cluster did not come up");

    let left = namespaces_named(&prefix)?;
    assert!(left.len() >= 5, "underlay, world, 2 nodes, a pod: {left:?}");
    let report = sweep_leftovers()?;
    for name in &left {
        assert!(report.namespaces.contains(name), "{name}: {report:?}");
    }
    assert!(report.processes.len() >= 2, "both agents: {report:?}");
    assert_eq!(namespaces_named(&prefix)?, Vec::<String>::new());
    assert_eq!(temp_dirs_named(&prefix)?, Vec::<String>::new());
    Ok(())
}

/// Run by the test above, which kills it once its cluster is up.
#[test]
#[ignore = "the child of the_sweeper_removes_what_a_killed_run_left_of_a_cluster"]
fn a_cluster_left_by_a_killed_run() -> Result<()> {
    if std::env::var_os(CHILD_ENV).is_none() {
        return Ok(());
    }
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let underlay = Underlay::Router {
        route_pod_cidrs: true,
    };
    let cluster = Cluster::start(
        &run,
        ClusterSpec::new(2, underlay).source(AgentSource::Kubernetes),
    )?;
    let _pod = cluster.add_pod(1, "default", "a", &[])?;
    println!("{CHILD_READY}");
    thread::sleep(Duration::from_secs(120));
    Ok(())
}

fn every_agent_watches_the_one_api_server(underlay: Underlay) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let spec = ClusterSpec::new(3, underlay).source(AgentSource::Kubernetes);
    let cluster = Cluster::start(&run, spec)?;
    let Some(server) = cluster.api_server() else {
        return Err(Error::Cluster(
            "no API server in a Kubernetes cluster".into(),
        ));
    };
    assert!(
        !server.addr().ip().is_loopback(),
        "served on the underlay, not inside one node: {}",
        server.addr()
    );
    for index in cluster.node_indexes() {
        let status = cluster.node(index).status()?;
        assert!(status.ready, "node{index}: {status:?}");
        // From its Node object in the server: no --pod-cidr in this mode.
        assert_eq!(status.pod_cidr, cluster.node(index).pod_cidr());
    }
    assert!(server.stats(Resource::Node).watches >= 3);
    assert!(server.stats(Resource::Pod).watches >= 3);

    let pods = cluster
        .node_indexes()
        .into_iter()
        .map(|i| cluster.add_pod(i, "team", &format!("p{i}"), &[("app", "p")]))
        .collect::<Result<Vec<_>>>()?;
    for pod in &pods {
        cluster.wait_until_every_node_knows(pod.ip())?;
    }
    check_applied_objects_reach_every_agent(&cluster, "team")?;
    for pod in pods {
        let ip = pod.ip();
        cluster.delete_pod(pod)?;
        cluster.wait_until_no_node_knows(ip)?;
    }
    drop(cluster);
    assert_nothing_left(&run)
}

#[test]
fn every_agent_watches_the_one_api_server_on_a_switch() -> Result<()> {
    every_agent_watches_the_one_api_server(Underlay::Switch)
}

#[test]
fn every_agent_watches_the_one_api_server_through_a_router() -> Result<()> {
    every_agent_watches_the_one_api_server(Underlay::Router {
        route_pod_cidrs: false,
    })
}
