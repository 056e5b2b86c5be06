//! End to end: containerd and runc from Debian start real containers from a locally built
//! busybox image, and `ctr run --cni` (libcni, as in production) calls `myelin`.

use std::{
    thread,
    time::{Duration, Instant},
};

use myelin_api::AttachmentId;
use myelin_tests::{
    Node, NodeSpec, Result,
    cgroup::TestCgroup,
    cluster::{endpoint_slice_object, service_object, slice_endpoint},
    containerd::{CniNetwork, Containerd},
    root_test,
    services::{CLUSTER_IP, lb_flows_from},
};
use serde_json::json;

#[test]
fn containers_get_addresses_from_myelin_and_serve_each_other() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let containerd = Containerd::start(&run, node.netns(), &CniNetwork::myelin(&node)?)?;
    let page = format!("served through myelin, run {}\n", run.as_str());
    let image = containerd.import_busybox(&[("www/index.html", page.as_bytes())])?;

    let server =
        containerd.start_container(&image, "server", &["httpd", "-f", "-p", "80", "-h", "/www"])?;
    let client = containerd.start_container(&image, "client", &["sleep", "600"])?;

    // Both addresses come from Myelin: the agent has an endpoint for each container, with the
    // address the container sees on its eth0.
    for container in [&server, &client] {
        let attachment = AttachmentId::new(Containerd::cni_container_id(container.id()), "eth0");
        let endpoint = node
            .client()
            .endpoint(&attachment)
            .map_err(myelin_tests::Error::api(
                "looking up a container's endpoint",
            ))?;
        let seen_inside = container.ipv4()?;
        assert_eq!(
            endpoint.map(|e| e.ip),
            Some(seen_inside),
            "container {} has {seen_inside}, the agent's endpoint for {attachment} differs",
            container.id()
        );
    }

    let answer = client.http_get(server.ipv4()?, 80, "/index.html")?;
    assert!(
        answer.contains(" 200 OK") && answer.ends_with(&page),
        "unexpected answer: {answer:?}"
    );

    // ctr's teardown calls DEL: nothing of either container stays on the node.
    server.stop()?;
    client.stop()?;
    assert_eq!(node.footprint()?, before);
    Ok(())
}

/// A container stopped while the agent is down (an upgrade, a crash): containerd's teardown
/// calls DEL once and does not retry it. The DEL succeeds without the agent, and once the
/// agent is back nothing of the container is left: no veth, no endpoint, no address.
#[test]
fn a_container_stopped_while_the_agent_is_down_leaves_nothing_once_it_is_back() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let containerd = Containerd::start(&run, node.netns(), &CniNetwork::myelin(&node)?)?;
    let image = containerd.import_busybox(&[])?;
    let container = containerd.start_container(&image, "short", &["sleep", "600"])?;
    let attachment = AttachmentId::new(Containerd::cni_container_id(container.id()), "eth0");
    assert!(node.footprint()?.endpoints.contains_key(&attachment));

    node.stop_agent()?;
    container.stop()?;
    let links = node.links()?;
    assert_eq!(links, before.links, "the veth went with the DEL");

    node.start_agent()?;
    assert_eq!(node.footprint()?, before);
    Ok(())
}

/// Socket-level load balancing for real containers (ids of their own: runc's state directory
/// is the machine's, shared by the containerd of every test running at the same time): runc places one container in a cgroup below
/// the agent's `--cgroup-root` (as kubelet places a pod's containers below the host's cgroup
/// root, which the chart gives the agent); its connections to a ClusterIP reach the backend
/// container translated at `connect()` (no `lb_flows` entry from it), the plugin having handed
/// its network namespace's cookie to the agent at ADD. A container in containerd's default
/// cgroup, outside the agent's, reaches the same Service translated per packet.
#[test]
fn a_container_in_the_cgroup_root_reaches_a_service_translated_at_connect() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let cgroup = TestCgroup::create(&run, "ctr")?;
    let root = cgroup.path().display().to_string();
    let node = Node::start(
        &run,
        NodeSpec::new("node").agent_args(&[
            "--kube-proxy-replacement=true",
            "--cgroup-root",
            &root,
        ]),
    )?;
    let containerd = Containerd::start(&run, node.netns(), &CniNetwork::myelin(&node)?)?;
    let page = format!("through a ClusterIP, run {}\n", run.as_str());
    let image = containerd.import_busybox(&[("www/index.html", page.as_bytes())])?;
    let server = containerd.start_container(
        &image,
        "svc-server",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    )?;
    let server_ip = server.ipv4()?;
    node.cluster().write(
        "web",
        &[
            service_object(
                "default",
                "web",
                json!({
                    "type": "ClusterIP",
                    "clusterIP": CLUSTER_IP.to_string(),
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                }),
            ),
            endpoint_slice_object(
                "default",
                "web-1",
                "web",
                vec![slice_endpoint(
                    &server_ip.to_string(),
                    true,
                    false,
                    node.name(),
                )],
                &[("http", 8080, "TCP")],
            ),
        ],
    )?;

    // `<cgroup root>/<test cgroup>/inside`, as runc names it from the cgroup2 mount.
    let below = format!(
        "/{}/inside",
        cgroup
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    let inside =
        containerd.start_container_in_cgroup(&image, "svc-inside", &below, &["sleep", "600"])?;
    let outside = containerd.start_container(&image, "svc-outside", &["sleep", "600"])?;
    let in_cgroup = inside.exec(&["cat", "/proc/self/cgroup"])?.stdout_text();
    assert!(
        in_cgroup.lines().any(|l| l == format!("0::{below}")),
        "runc placed the container in {below}: {in_cgroup}"
    );

    // Until the Service has reached the agent (the inside container asks first).
    let page_through_the_service = |container: &myelin_tests::containerd::RunningContainer<'_>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = container.http_get(CLUSTER_IP, 80, "/index.html")?;
            if answer.ends_with(&page) || Instant::now() > deadline {
                return Ok::<_, myelin_tests::Error>(answer);
            }
            thread::sleep(Duration::from_millis(100));
        }
    };
    let answer = page_through_the_service(&inside)?;
    assert!(
        answer.contains(" 200 OK") && answer.ends_with(&page),
        "the container in the cgroup reaches the Service: {answer:?}"
    );
    assert_eq!(
        lb_flows_from(&node, inside.ipv4()?, CLUSTER_IP)?,
        0,
        "the container in the cgroup was translated at connect()"
    );
    let answer = page_through_the_service(&outside)?;
    assert!(
        answer.ends_with(&page),
        "the other container too: {answer:?}"
    );
    assert!(
        lb_flows_from(&node, outside.ipv4()?, CLUSTER_IP)? > 0,
        "the container outside the cgroup was translated per packet"
    );

    for container in [server, inside, outside] {
        container.stop()?;
    }
    Ok(())
}
