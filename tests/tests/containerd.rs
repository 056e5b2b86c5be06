//! End to end: containerd and runc from Debian start real containers from a locally built
//! busybox image, and `ctr run --cni` (libcni, as in production) calls `myelin`.

use myelin_api::AttachmentId;
use myelin_tests::{
    Node, NodeSpec, Result,
    containerd::{CniNetwork, Containerd},
    root_test,
};

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
