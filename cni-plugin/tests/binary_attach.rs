//! The real `myelin` binary, run inside a "node" namespace exactly as a runtime runs it,
//! against a fake agent: ADD, CHECK, DEL, GC and STATUS, and the rollback of a failed ADD.

mod common;

use std::{
    os::unix::net::UnixListener,
    process::Output,
    time::{Duration, Instant},
};

use common::{
    FakeAgent, GATEWAY, TestNetns, error_of, netconf, root_tests_enabled, run_plugin, success_of,
};
use myelin_api::{AttachmentId, pending};
use serde_json::{Value, json};

/// One pod of a test: its namespace and CNI parameters.
struct Pod {
    netns: TestNetns,
    container_id: String,
}

impl Pod {
    fn new(container_id: &str) -> Self {
        Self {
            netns: TestNetns::new("pod"),
            container_id: container_id.to_string(),
        }
    }

    fn attachment(&self) -> AttachmentId {
        AttachmentId::new(&self.container_id, "eth0")
    }

    fn host_veth(&self) -> String {
        self.attachment().host_ifname()
    }

    fn invoke(&self, node: &TestNetns, command: &str, conf: &str) -> Output {
        let netns = self.netns.path().display().to_string();
        run_plugin(
            node,
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &self.container_id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0",
                ),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            conf,
        )
    }
}

/// The configuration with a `prevResult`.
fn with_prev(conf: &str, prev: &Value) -> String {
    let mut conf: Value = serde_json::from_str(conf).expect("conf");
    conf["prevResult"] = prev.clone();
    conf.to_string()
}

#[test]
fn add_check_del_round_trip() {
    if !root_tests_enabled("add_check_del_round_trip") {
        return;
    }
    let node = TestNetns::new("node");
    // The node's uplink sets the MTU the plugin uses when the configuration gives none.
    // A veth stands in for the uplink: the test kernel has no dummy driver.
    node.ip(&[
        "link", "add", "uplink0", "mtu", "1450", "type", "veth", "peer", "name", "uplink0p",
    ]);
    node.ip(&["link", "set", "uplink0", "up"]);
    node.ip(&["link", "set", "uplink0p", "up"]);
    node.ip(&["addr", "add", "192.0.2.10/24", "dev", "uplink0"]);
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.0.2.1",
        "dev",
        "uplink0",
    ]);
    let agent = FakeAgent::start();
    let pod = Pod::new("roundtrip1");
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log_file = log_dir.path().join("myelin-cni.log");
    let conf = netconf(
        "1.1.0",
        &agent.socket_str(),
        json!({
            "dns": {"nameservers": ["10.96.0.10"], "search": ["shop.svc.cluster.local"]},
            "logFile": log_file,
        }),
    );

    let result = success_of(&pod.invoke(&node, "ADD", &conf));
    let host = node.link(&pod.host_veth()).expect("host veth");
    let eth0 = pod.netns.link("eth0").expect("pod eth0");
    let sandbox = pod.netns.path().display().to_string();
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": pod.host_veth(), "mac": host["address"], "mtu": 1450},
                {"name": "eth0", "mac": eth0["address"], "mtu": 1450, "sandbox": sandbox}
            ],
            "ips": [{"address": "10.244.1.2/32", "gateway": GATEWAY, "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["shop.svc.cluster.local"]}
        })
    );
    assert_eq!(host["mtu"], 1450);
    assert_eq!(eth0["mtu"], 1450);
    assert_eq!(
        pod.netns.ipv4_addresses("eth0"),
        vec![("10.244.1.2".to_string(), 32)]
    );

    // The agent was told exactly what was created.
    let put = agent.with_state(|s| s.put_requests.clone());
    assert_eq!(put.len(), 1);
    assert_eq!(put[0].attachment, pod.attachment());
    assert_eq!(put[0].host_ifname, pod.host_veth());
    assert_eq!(
        put[0].host_ifindex,
        host["ifindex"].as_u64().expect("ifindex") as u32
    );
    assert_eq!(
        put[0].host_mac.to_string(),
        host["address"].as_str().expect("mac")
    );
    assert_eq!(
        put[0].mac.to_string(),
        eth0["address"].as_str().expect("mac")
    );
    assert_eq!(put[0].netns, sandbox);
    let pod_ref = put[0].pod.as_ref().expect("pod from CNI_ARGS");
    assert_eq!(
        (pod_ref.namespace.as_str(), pod_ref.name.as_str()),
        ("shop", "cart-0")
    );

    let check = pod.invoke(&node, "CHECK", &with_prev(&conf, &result));
    assert!(check.status.success(), "{check:?}");
    assert!(check.stdout.is_empty(), "CHECK prints nothing on success");

    success_or_silent(&pod.invoke(&node, "DEL", &with_prev(&conf, &result)));
    assert!(
        node.link(&pod.host_veth()).is_none(),
        "host veth left behind"
    );
    assert!(pod.netns.link("eth0").is_none(), "pod eth0 left behind");
    assert!(agent.with_state(|s| s.endpoints.is_empty() && s.allocations.is_empty()));
    assert!(agent.requests().contains(&format!(
        "DELETE /v1/endpoints?containerId={}&ifname=eth0",
        pod.container_id
    )));

    // DEL again, without prevResult: nothing left, still a success.
    success_or_silent(&pod.invoke(&node, "DEL", &conf));

    // Logs went to the log file (stdout carried only the protocol, as checked above).
    let log = std::fs::read_to_string(&log_file).expect("log file");
    let attachment = format!("{}/eth0", pod.container_id);
    for line in [
        format!("ADD {attachment}: allocated 10.244.1.2"),
        format!("CHECK {attachment}: succeeded"),
        format!("DEL {attachment}: succeeded"),
    ] {
        assert!(log.contains(&line), "{line:?} not in:\n{log}");
    }
}

fn success_or_silent(out: &Output) {
    assert!(
        out.status.success(),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn results_follow_the_configured_version() {
    if !root_tests_enabled("results_follow_the_configured_version") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    for (n, version) in ["0.3.1", "0.4.0", "1.0.0"].into_iter().enumerate() {
        let pod = Pod::new(&format!("version{n}"));
        let conf = netconf(version, &agent.socket_str(), json!({"mtu": 1400}));
        let result = success_of(&pod.invoke(&node, "ADD", &conf));
        assert_eq!(result["cniVersion"], version);
        assert_eq!(
            result["ips"][0]["address"],
            format!("10.244.1.{}/32", n + 2)
        );
        let tagged = version != "1.0.0";
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            tagged,
            "{result}"
        );
        assert!(result["interfaces"][1].get("mtu").is_none(), "{result}");
        assert_eq!(pod.netns.link("eth0").expect("eth0")["mtu"], 1400);
        success_or_silent(&pod.invoke(&node, "DEL", &conf));
    }
}

#[test]
fn failed_endpoint_creation_rolls_everything_back() {
    if !root_tests_enabled("failed_endpoint_creation_rolls_everything_back") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    agent.with_state(|s| s.fail_put_endpoint = true);
    let pod = Pod::new("rollback1");
    let conf = netconf("1.0.0", &agent.socket_str(), json!({}));

    let err = error_of(&pod.invoke(&node, "ADD", &conf));
    assert_eq!(err["code"], 100, "{err}");
    assert!(
        err["details"]
            .as_str()
            .unwrap_or_default()
            .contains("attaching programs failed"),
        "{err}"
    );
    assert!(
        node.link_names().is_empty(),
        "veth left on the node: {:?}",
        node.link_names()
    );
    assert!(pod.netns.link_names().is_empty(), "veth left in the pod");
    assert!(node.ipv4_routes().is_empty(), "{:?}", node.ipv4_routes());
    let requests = agent.requests();
    assert!(
        requests.contains(&format!(
            "DELETE /v1/endpoints?containerId={}&ifname=eth0",
            pod.container_id
        )),
        "{requests:?}"
    );
    assert!(
        agent.with_state(|s| s.allocations.is_empty()),
        "address not released"
    );
}

#[test]
fn unreachable_agent_fails_fast_with_code_11_and_leaves_nothing() {
    if !root_tests_enabled("unreachable_agent_fails_fast_with_code_11_and_leaves_nothing") {
        return;
    }
    let node = TestNetns::new("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let absent = dir.path().join("absent.sock");
    // A socket file nobody listens on any more, as an agent that died leaves it.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("binding"));
    for (n, socket) in [absent, stale].iter().enumerate() {
        let pod = Pod::new(&format!("noagent{n}"));
        let conf = netconf("1.1.0", &socket.display().to_string(), json!({}));
        let started = Instant::now();
        let err = error_of(&pod.invoke(&node, "ADD", &conf));
        let elapsed = started.elapsed();
        assert_eq!(err["code"], 11, "{err}");
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        assert!(node.link_names().is_empty());
        assert!(pod.netns.link_names().is_empty());
    }
}

#[test]
fn second_add_fails_and_keeps_what_the_first_created() {
    if !root_tests_enabled("second_add_fails_and_keeps_what_the_first_created") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    let pod = Pod::new("twice1");
    let conf = netconf("1.1.0", &agent.socket_str(), json!({}));
    success_of(&pod.invoke(&node, "ADD", &conf));
    let requests_before = agent.requests().len();

    let err = error_of(&pod.invoke(&node, "ADD", &conf));
    assert_eq!(err["code"], 102, "{err}");
    // Only the refused allocation was asked for; nothing was released or deleted.
    assert_eq!(
        agent.requests()[requests_before..],
        ["POST /v1/ipam".to_string()]
    );
    assert!(node.link(&pod.host_veth()).is_some());
    assert_eq!(
        pod.netns.ipv4_addresses("eth0"),
        vec![("10.244.1.2".to_string(), 32)]
    );
    assert_eq!(agent.with_state(|s| s.endpoints.len()), 1);
}

#[test]
fn taken_interface_name_in_the_pod_releases_only_the_new_address() {
    if !root_tests_enabled("taken_interface_name_in_the_pod_releases_only_the_new_address") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    let pod = Pod::new("taken1");
    pod.netns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
    ]);
    let existing = pod.netns.link("eth0").expect("existing eth0");
    let conf = netconf("1.1.0", &agent.socket_str(), json!({}));

    let err = error_of(&pod.invoke(&node, "ADD", &conf));
    assert_eq!(err["code"], 102, "{err}");
    assert!(
        err["msg"].as_str().unwrap_or_default().contains("eth0"),
        "{err}"
    );
    let after = pod.netns.link("eth0").expect("the existing eth0 stays");
    assert_eq!(after["ifindex"], existing["ifindex"]);
    assert_eq!(after["address"], existing["address"]);
    assert!(node.link_names().is_empty(), "{:?}", node.link_names());
    assert!(
        agent.requests().contains(&format!(
            "DELETE /v1/ipam?containerId={}&ifname=eth0",
            pod.container_id
        )),
        "{:?}",
        agent.requests()
    );
    assert!(agent.with_state(|s| s.allocations.is_empty()));
}

#[test]
fn del_without_agent_removes_the_veth_and_queues_the_rest_for_the_agent() {
    if !root_tests_enabled("del_without_agent_removes_the_veth_and_queues_the_rest_for_the_agent") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    let queued = Pod::new("delnoagent1");
    let unqueued = Pod::new("delnoagent2");
    for pod in [&queued, &unqueued] {
        success_of(&pod.invoke(
            &node,
            "ADD",
            &netconf("1.1.0", &agent.socket_str(), json!({})),
        ));
    }
    let del = |pod: &Pod, socket: &str| {
        // DEL also works without CNI_NETNS (the runtime may have removed the namespace).
        run_plugin(
            &node,
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", &pod.container_id),
                ("CNI_IFNAME", "eth0"),
            ],
            &netconf("1.1.0", socket, json!({})),
        )
    };

    // Nothing listens: the veth goes, the DEL is queued beside the socket, and it succeeds.
    let absent = format!("{}.absent", agent.socket_str());
    let out = del(&queued, &absent);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        node.link(&queued.host_veth()).is_none(),
        "veth must go even without the agent"
    );
    assert!(queued.netns.link("eth0").is_none());
    let queue = pending::dir_for(std::path::Path::new(&absent));
    let records: Vec<AttachmentId> = pending::list(&queue)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            pending::Entry::Delete { id, .. } => Some(id),
            pending::Entry::Unreadable { .. } => None,
        })
        .collect();
    assert_eq!(
        records,
        vec![AttachmentId::new(queued.container_id.clone(), "eth0")]
    );

    // Nowhere to queue it (the socket's directory is a file): the veth still goes, and the
    // runtime is told to try again.
    let nowhere = "/proc/version/agent.sock";
    let err = error_of(&del(&unqueued, nowhere));
    assert_eq!(err["code"], 11, "{err}");
    assert!(node.link(&unqueued.host_veth()).is_none());
}

#[test]
fn check_reports_what_differs() {
    if !root_tests_enabled("check_reports_what_differs") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    let pod = Pod::new("check1");
    let conf = netconf("0.4.0", &agent.socket_str(), json!({}));
    let result = success_of(&pod.invoke(&node, "ADD", &conf));

    pod.netns
        .ip(&["addr", "del", "10.244.1.2/32", "dev", "eth0"]);
    let err = error_of(&pod.invoke(&node, "CHECK", &with_prev(&conf, &result)));
    assert_eq!(err["code"], 104, "{err}");
    let msg = err["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("lacks address 10.244.1.2/32"), "{msg}");

    // Without the agent's endpoint, CHECK says so too.
    agent.with_state(|s| s.endpoints.clear());
    let err = error_of(&pod.invoke(&node, "CHECK", &with_prev(&conf, &result)));
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("no endpoint"),
        "{err}"
    );

    // CHECK does not exist in 0.3.1; and it needs prevResult.
    let old = netconf("0.3.1", &agent.socket_str(), json!({}));
    assert_eq!(
        error_of(&pod.invoke(&node, "CHECK", &with_prev(&old, &result)))["code"],
        1
    );
    assert_eq!(error_of(&pod.invoke(&node, "CHECK", &conf))["code"], 7);
}

#[test]
fn gc_deletes_the_veths_of_attachments_the_agent_removed() {
    if !root_tests_enabled("gc_deletes_the_veths_of_attachments_the_agent_removed") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    let keep = Pod::new("gckeep1");
    let stale = Pod::new("gcstale1");
    let conf = netconf("1.1.0", &agent.socket_str(), json!({}));
    success_of(&keep.invoke(&node, "ADD", &conf));
    success_of(&stale.invoke(&node, "ADD", &conf));

    let gc_conf = netconf(
        "1.1.0",
        &agent.socket_str(),
        json!({"cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]}),
    );
    let out = run_plugin(
        &node,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &gc_conf,
    );
    success_or_silent(&out);
    assert!(
        node.link(&keep.host_veth()).is_some(),
        "valid attachment's veth removed"
    );
    assert!(node.link(&stale.host_veth()).is_none(), "stale veth kept");
    assert!(stale.netns.link("eth0").is_none());
    assert!(keep.netns.link("eth0").is_some());
}

#[test]
fn status_reflects_agent_readiness_and_free_addresses() {
    if !root_tests_enabled("status_reflects_agent_readiness_and_free_addresses") {
        return;
    }
    let node = TestNetns::new("node");
    let agent = FakeAgent::start();
    let conf = netconf("1.1.0", &agent.socket_str(), json!({}));
    let status = || run_plugin(&node, &[("CNI_COMMAND", "STATUS")], &conf);

    success_or_silent(&status());
    agent.with_state(|s| s.ready = false);
    let err = error_of(&status());
    assert_eq!(err["code"], 50);
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("not synced"),
        "{err}"
    );
    agent.with_state(|s| {
        s.ready = true;
        s.free_addresses = 0;
    });
    let err = error_of(&status());
    assert_eq!(err["code"], 50);
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("no free address"),
        "{err}"
    );
}
