//! The agent with `--source kubernetes --kubeconfig` against the test API server, which listens
//! inside the node's namespace: pods added through the real `myelin` plugin get identities from
//! the pod and namespace objects the server holds, follow their label changes, and keep their
//! connectivity while the API server is down.

use std::{thread, time::Duration, time::Instant};

use myelin_tests::{
    Error, Node, NodeSpec, Pod, Result,
    apiserver::{
        KubernetesNode, Resource, endpoint_map_identity, measure_watch_latency_and_memory,
    },
    cluster::{namespace_object, pod_object},
    root_test,
    traffic::{ping, tcp_echo},
};

/// A label change reaches the agent in milliseconds; the margin is for a loaded machine.
const PROMPT: Duration = Duration::from_secs(10);
/// Reconnecting waits on the watcher's backoff (0.8 s doubling, with jitter, up to 30 s).
const RECOVERY: Duration = Duration::from_secs(60);

fn identity(node: &Node, pod: &Pod) -> Result<u32> {
    node.endpoints()?
        .into_iter()
        .find(|e| e.attachment == pod.attachment())
        .map(|e| e.identity)
        .ok_or_else(|| Error::Cluster(format!("no endpoint for pod {}", pod.name())))
}

/// Polls the agent until `pod`'s identity differs from `old`; returns the new one.
fn changed_identity(node: &Node, pod: &Pod, old: u32, what: &str) -> Result<u32> {
    let deadline = Instant::now() + PROMPT;
    loop {
        let now = identity(node, pod)?;
        if now != old {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(Error::Cluster(format!(
                "{what}: pod {}'s identity stayed {old} for {PROMPT:?}",
                pod.name()
            )));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn identities_follow_pod_and_namespace_labels_from_the_api_server() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut knode = KubernetesNode::create(&run, NodeSpec::new("kube"))?;
    let server = knode.server();
    let node_name = knode.node().name().to_string();
    server.apply(namespace_object("team", &[("env", "dev")]))?;
    server.apply(pod_object(
        &node_name,
        "team",
        "a",
        &[("app", "web")],
        &[80],
    ))?;
    knode.start_agent()?;
    let (node, server) = (knode.node(), knode.server());

    let a = node.add_pod("team", "a")?;
    let a_web = identity(node, &a)?;

    // The runtime can be faster than the watch: `b`'s ADD comes before its object. The ADD
    // waits for it, so that b starts with its labels (policies selecting it apply from its
    // first packet).
    let b = thread::scope(|scope| -> Result<Pod> {
        let adding = scope.spawn(|| node.add_pod("team", "b"));
        thread::sleep(Duration::from_millis(300));
        server.apply(pod_object(
            &node_name,
            "team",
            "b",
            &[("app", "web")],
            &[80],
        ))?;
        adding.join().expect("the ADD thread panicked")
    })?;
    let b_web = identity(node, &b)?;
    assert_eq!(
        b_web, a_web,
        "b started with its labels: same identity as a"
    );

    // An object that does not come within the wait: the pod gets its network without labels,
    // and its identity when the object arrives.
    let started = Instant::now();
    let c = node.add_pod("team", "c")?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "c's ADD waited {:?} for its object",
        started.elapsed()
    );
    let c_unlabelled = identity(node, &c)?;
    assert_ne!(c_unlabelled, a_web, "c has no labels yet");
    server.apply(pod_object(
        &node_name,
        "team",
        "c",
        &[("app", "web")],
        &[80],
    ))?;
    let c_web = changed_identity(node, &c, c_unlabelled, "c's object arrived")?;
    assert_eq!(c_web, a_web, "same namespace and labels: same identity");
    node.delete_pod(c)?;

    server.set_labels(Resource::Pod, "team", "a", &[("app", "api")])?;
    let a_api = changed_identity(node, &a, a_web, "a's labels changed")?;
    assert_ne!(a_api, b_web);
    assert_eq!(identity(node, &b)?, b_web, "b's labels did not change");

    server.set_labels(Resource::Namespace, "", "team", &[("env", "prod")])?;
    let a_prod = changed_identity(node, &a, a_api, "the namespace's labels changed")?;
    let b_prod = changed_identity(node, &b, b_web, "the namespace's labels changed")?;
    assert_ne!(a_prod, b_prod);

    // What the API reports is what the datapath uses.
    assert_eq!(endpoint_map_identity(node, &a)?, Some(a_prod));
    assert_eq!(endpoint_map_identity(node, &b)?, Some(b_prod));
    node.delete_pod(a)?;
    node.delete_pod(b)?;
    Ok(())
}

#[test]
fn an_agent_restarted_while_the_api_server_is_down_keeps_its_pods_connected() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut knode = KubernetesNode::start(&run, NodeSpec::new("kube"))?;
    let a = knode.node().add_pod("default", "a")?;
    let b = knode.node().add_pod("default", "b")?;
    let c = knode.node().add_pod("default", "c")?;
    ping(&a, &b)?;

    knode.stop_server();
    knode.stop_agent()?;
    let status = knode.start_agent_serving()?;
    assert!(!status.ready, "not ready before the first sync: {status:?}");
    assert_eq!(
        status.pod_cidr,
        knode.node().pod_cidr(),
        "the persisted pod CIDR"
    );
    ping(&a, &b)?;
    ping(&b, &a)?;
    tcp_echo(&a, &b, 8080)?;
    knode.node().delete_pod(c)?;

    knode.restart_server()?;
    let status = knode.wait_until_ready(RECOVERY)?;
    assert!(status.ready);
    ping(&a, &b)?;
    knode.node().delete_pod(a)?;
    knode.node().delete_pod(b)?;
    Ok(())
}

/// The figures for the report: API event to endpoint map update over 1,000 label changes, and
/// the agent's memory with 5,000 pods in 500 namespaces. Slow; run on purpose:
/// `cargo test -p myelin-tests --test kubernetes -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn measure_event_latency_and_agent_memory_at_5000_pods() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let figures = measure_watch_latency_and_memory(&run, 5000, 500, 1000)?;
    eprintln!("{figures}");
    Ok(())
}
