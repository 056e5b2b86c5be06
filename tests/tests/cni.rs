//! The `myelin` CNI plugin against the real agent, called exactly as a runtime calls it: the
//! result it prints, the versions it speaks, the command sequence of a pod's life, and the
//! error code of every bad input, which must leave nothing behind.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    time::Duration,
};

use ipnet::Ipv4Net;
use myelin_api::{ClientError, pending};
use myelin_tests::{
    Binaries, CniCall, Error, Netns, Node, NodeSpec, Result, as_nobody, result_ip, root_test,
    run_plugin,
    traffic::{Host, ping},
};
use serde_json::{Value, json};

const CNI_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[test]
fn add_returns_interfaces_ips_and_routes() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let pod = node.add_pod("default", "web")?;
    let result = pod.result();
    let sandbox = pod.sandbox();
    let netns_path = sandbox.netns().path().display().to_string();

    assert_eq!(result["cniVersion"], "1.1.0", "{result:#}");
    let interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let pod_if = interfaces
        .iter()
        .position(|i| i["sandbox"] == netns_path.as_str())
        .unwrap_or_else(|| panic!("no interface with sandbox {netns_path}: {result:#}"));
    assert_eq!(interfaces[pod_if]["name"], "eth0");
    let host_if = interfaces
        .iter()
        .find(|i| i.get("sandbox").is_none_or(|s| s.as_str() == Some("")))
        .unwrap_or_else(|| panic!("no host-side interface: {result:#}"));
    let host_name = host_if["name"].as_str().unwrap_or_default();
    assert!(
        host_name.starts_with("lxc") && host_name.len() == 15,
        "host veth name {host_name:?}"
    );

    // The result describes what exists: the MACs are those of the real links.
    assert_eq!(
        interfaces[pod_if]["mac"].as_str(),
        Some(link_mac(sandbox.netns(), "eth0")?.as_str())
    );
    assert_eq!(
        host_if["mac"].as_str(),
        Some(link_mac(node.netns(), host_name)?.as_str())
    );

    let ip = result_ip(result).unwrap_or(Ipv4Addr::UNSPECIFIED);
    assert_eq!(result["ips"][0]["address"], format!("{ip}/32"));
    assert!(
        pod_cidr(&node).contains(&ip),
        "{ip} not in {}",
        node.pod_cidr()
    );
    assert_eq!(result["ips"][0]["gateway"], node.gateway().to_string());
    assert_eq!(result["ips"][0]["interface"], pod_if);
    let routes = result["routes"].as_array().cloned().unwrap_or_default();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == node.gateway().to_string()),
        "no default route via the gateway: {result:#}"
    );
    Ok(())
}

#[test]
fn result_version_follows_the_config_cni_version() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    for version in CNI_VERSIONS {
        let sandbox = node.sandbox("default", &format!("v{}", version.replace('.', "")))?;
        let mut config = node.cni_config();
        config["cniVersion"] = version.into();
        let add = node.cni(&node.cni_call("ADD", &sandbox).config(&config))?;
        assert!(add.success(), "ADD with cniVersion {version}:\n{add}");
        let result = add.json()?;
        assert_eq!(result["cniVersion"], version, "{result:#}");
        assert!(result_ip(&result).is_some(), "{result:#}");
        if version.starts_with("0.") {
            // Before 1.0 every IP config names its family.
            assert_eq!(result["ips"][0]["version"], "4", "{result:#}");
        }
        config["prevResult"] = result;
        let del = node.cni(&node.cni_call("DEL", &sandbox).config(&config))?;
        assert!(del.success(), "DEL with cniVersion {version}:\n{del}");
    }
    assert_eq!(node.footprint()?, before);
    Ok(())
}

#[test]
fn version_lists_every_supported_version() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    // VERSION needs no agent: the plugin runs in a bare namespace.
    let netns = Netns::create(run.name("version"))?;
    let call = CniCall::new("VERSION").config(&json!({ "cniVersion": "1.1.0" }));
    let out = run_plugin(&Binaries::from_env()?, &netns, &call)?;
    assert!(out.success(), "{out}");
    let answer = out.json()?;
    assert_eq!(answer["cniVersion"], "1.1.0", "{answer:#}");
    let supported: Vec<&str> = answer["supportedVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for version in CNI_VERSIONS {
        assert!(
            supported.contains(&version),
            "{version} missing: {answer:#}"
        );
    }
    Ok(())
}

#[test]
fn add_check_del_del_succeed_and_leave_nothing_behind() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let sandbox = node.sandbox("default", "life")?;

    let add = node.cni(&node.cni_call("ADD", &sandbox))?;
    assert!(add.success(), "ADD:\n{add}");
    let mut config = node.cni_config();
    config["prevResult"] = add.json()?;
    let with_prev = |command: &str| node.cni_call(command, &sandbox).config(&config);

    let check = node.cni(&with_prev("CHECK"))?;
    assert!(check.success(), "CHECK right after ADD:\n{check}");
    assert_eq!(
        node.footprint()?.endpoints.len(),
        before.endpoints.len() + 1
    );

    let del = node.cni(&with_prev("DEL"))?;
    assert!(del.success(), "DEL:\n{del}");
    assert_eq!(node.footprint()?, before, "DEL left something behind");

    let again = node.cni(&with_prev("DEL"))?;
    assert!(again.success(), "second DEL must succeed:\n{again}");
    let without_netns = node.cni(&with_prev("DEL").without_env("CNI_NETNS"))?;
    assert!(
        without_netns.success(),
        "DEL without CNI_NETNS:\n{without_netns}"
    );
    assert_eq!(node.footprint()?, before);
    Ok(())
}

#[test]
fn duplicate_add_fails_and_the_first_pod_keeps_working() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let pod = node.add_pod("default", "first")?;
    let after_first = node.footprint()?;

    let again = node.cni(&node.cni_call("ADD", pod.sandbox()))?;
    assert!(
        !again.success(),
        "a second ADD of one attachment must fail:\n{again}"
    );
    assert_eq!(again.error_code(), Some(102), "{again}");

    assert_eq!(
        node.footprint()?,
        after_first,
        "the failed ADD changed the node"
    );
    let endpoint = node
        .client()
        .endpoint(&pod.attachment())
        .map_err(Error::api("looking up the first pod's endpoint"))?;
    assert_eq!(endpoint.map(|e| e.ip), Some(pod.ip()));
    ping(&node, &pod)?;
    ping(&pod, &node)?;
    Ok(())
}

#[test]
fn malformed_config_is_refused_with_code_6() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    let call = node
        .cni_call("ADD", &sandbox)
        .stdin(r#"{"cniVersion": "1.1.0", "name": "#);
    assert_add_refused(&node, &call, 6)
}

#[test]
fn unknown_or_missing_cni_version_is_refused_with_code_1() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    let mut unknown = node.cni_config();
    unknown["cniVersion"] = "9.9.9".into();
    assert_add_refused(&node, &node.cni_call("ADD", &sandbox).config(&unknown), 1)?;
    let mut missing = node.cni_config();
    remove_key(&mut missing, "cniVersion");
    assert_add_refused(&node, &node.cni_call("ADD", &sandbox).config(&missing), 1)
}

#[test]
fn config_without_name_or_type_is_refused_with_code_7() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    for key in ["name", "type"] {
        let mut config = node.cni_config();
        remove_key(&mut config, key);
        assert_add_refused(&node, &node.cni_call("ADD", &sandbox).config(&config), 7)?;
    }
    Ok(())
}

#[test]
fn missing_cni_environment_is_refused_with_code_4() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    for variable in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME"] {
        let call = node.cni_call("ADD", &sandbox).without_env(variable);
        assert_add_refused(&node, &call, 4)?;
    }
    Ok(())
}

#[test]
fn netns_that_is_missing_or_not_a_namespace_is_refused_with_code_4() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    let absent = format!("/run/netns/{}", run.name("absent"));
    let call = node.cni_call("ADD", &sandbox).env("CNI_NETNS", absent);
    assert_add_refused(&node, &call, 4)?;

    let regular_file = node.dir().join("not-a-netns");
    fs::write(&regular_file, b"").map_err(Error::io("writing a plain file"))?;
    let call = node
        .cni_call("ADD", &sandbox)
        .env("CNI_NETNS", regular_file.display().to_string());
    assert_add_refused(&node, &call, 4)
}

#[test]
fn interface_name_of_16_bytes_is_refused_with_code_4() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    let sixteen = "eth0123456789abc";
    assert_eq!(sixteen.len(), 16);
    let call = node.cni_call("ADD", &sandbox).env("CNI_IFNAME", sixteen);
    assert_add_refused(&node, &call, 4)
}

#[test]
fn unknown_command_is_refused_with_code_4() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let sandbox = node.sandbox("default", "bad")?;
    let call = node.cni_call("ADD", &sandbox).env("CNI_COMMAND", "FROB");
    assert_add_refused(&node, &call, 4)
}

/// A DEL must not wait for the agent: the runtime would retry it until the agent returns, and
/// the pod could not finish terminating. The plugin removes the veth, queues the rest, and the
/// agent finishes the job as it starts, before anything else can reuse the address.
#[test]
fn del_while_the_agent_is_down_succeeds_and_the_agent_finishes_it_on_start() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let gone = node.add_pod("default", "gone")?;
    let stays = node.add_pod("default", "stays")?;
    let gone_sandbox = gone.sandbox().netns().name().to_string();
    let with_stays = node.footprint()?;
    node.stop_agent()?;

    let out = node.cni(&node.cni_call("DEL", gone.sandbox()))?;
    assert!(out.success(), "DEL with the agent down: {out}");
    assert!(
        out.elapsed < Duration::from_secs(1),
        "took {:?} to notice the agent is down",
        out.elapsed
    );
    let host_veth = gone.host_ifname();
    let mut expected = with_stays.links.clone();
    assert!(expected.remove(&host_veth), "{host_veth} in {expected:?}");
    let links = node.links()?;
    assert_eq!(links, expected, "the host veth goes at once");
    assert_eq!(
        gone.sandbox().netns().link_names()?,
        vec!["lo".to_string()],
        "{gone_sandbox} keeps no interface"
    );
    let queue = pending::dir_for(&node.socket());
    assert_eq!(
        pending::list(&queue).map_or(0, |records| records.len()),
        1,
        "one DEL queued in {}",
        queue.display()
    );
    // A second DEL (runtimes retry) still succeeds and queues nothing more.
    let again = node.cni(&node.cni_call("DEL", gone.sandbox()))?;
    assert!(again.success(), "{again}");

    node.start_agent()?;
    let after = node.footprint()?;
    assert!(
        !after.endpoints.contains_key(&gone.attachment()),
        "the endpoint is gone: {:?}",
        after.endpoints
    );
    assert_eq!(
        after.free_addresses,
        before.free_addresses - 1,
        "the address is free again"
    );
    assert_eq!(after.endpoints.len(), 1);
    assert!(
        pending::list(&queue).map_or(0, |records| records.len()) == 0,
        "the queue is empty once carried out"
    );
    // Pods come and go as before, and the pod that stayed still talks.
    let next = node.add_pod("default", "next")?;
    ping(&next, &stays)?;
    node.delete_pod(next)?;
    node.delete_pod(stays)?;
    drop(gone);
    assert_eq!(node.footprint()?, before);
    Ok(())
}

#[test]
fn add_fails_fast_with_code_11_while_the_agent_is_down() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let sandbox = node.sandbox("default", "early")?;
    node.stop_agent()?;

    let out = node.cni(&node.cni_call("ADD", &sandbox))?;
    assert_eq!(out.error_code(), Some(11), "{out}");
    assert!(
        out.elapsed < Duration::from_secs(1),
        "took {:?} to notice the agent is down",
        out.elapsed
    );
    let links = node.links()?;
    assert_eq!(links, before.links, "ADD left a link behind");
    assert_eq!(sandbox.netns().link_names()?, vec!["lo".to_string()]);

    node.start_agent()?;
    assert_eq!(node.footprint()?, before);
    Ok(())
}

#[test]
fn exhausted_pod_cidr_is_refused_with_code_101() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node").pod_cidr("10.244.250.0/29"))?;
    let free = node.status()?.free_addresses;
    assert!(
        (1..8).contains(&free),
        "a /29 has 8 addresses, some reserved; the agent reports {free} free"
    );
    let mut pods = Vec::new();
    for n in 0..free {
        pods.push(node.add_pod("default", &format!("fill{n}"))?);
    }
    assert_eq!(node.status()?.free_addresses, 0);

    let sandbox = node.sandbox("default", "one-too-many")?;
    assert_add_refused(&node, &node.cni_call("ADD", &sandbox), 101)?;
    // The pods that got addresses still work.
    ping(&node, &pods[0])?;
    Ok(())
}

#[test]
fn agent_socket_is_root_only() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let meta = fs::metadata(node.socket()).map_err(Error::io("stat of the agent socket"))?;
    assert_eq!(meta.uid(), 0, "socket owner");
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode {:o}", meta.mode());

    let client = node.client();
    let answer = as_nobody(|| client.status())?;
    assert!(
        matches!(&answer, Err(ClientError::Unreachable { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied),
        "a non-root peer must not get through: {answer:?}"
    );
    Ok(())
}

/// Defence in depth: should the socket's mode ever be loosened, the agent still checks who
/// connects (SO_PEERCRED) and refuses everyone but root.
#[test]
fn agent_refuses_non_root_peers_even_through_an_open_socket() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let open = |path: &std::path::Path, mode| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(Error::io(format!("chmod {}", path.display())))
    };
    open(node.dir(), 0o711)?;
    open(&node.socket(), 0o666)?;

    let client = node.client();
    let answer = as_nobody(|| client.status())?;
    match &answer {
        Err(ClientError::Api { status: 403, .. }) => {}
        // Closing the connection without an answer refuses too.
        Err(ClientError::Unreachable { .. } | ClientError::Protocol(_) | ClientError::Io(_)) => {}
        other => panic!("a non-root peer must be refused, got {other:?}"),
    }
    // Root still gets through.
    assert!(node.status()?.ready);
    Ok(())
}

/// Runs `call` (an ADD that must be refused) and checks the CNI error object and that the node
/// is exactly as before: links, endpoints, free addresses, pinned endpoint maps.
fn assert_add_refused(node: &Node, call: &CniCall, code: u64) -> Result<()> {
    let before = node.footprint()?;
    let out = node.cni(call)?;
    assert!(!out.success(), "must fail with code {code}:\n{out}");
    assert_eq!(out.error_code(), Some(code), "{out}");
    let error = out.json()?;
    assert!(
        error["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "the error needs a message: {error:#}"
    );
    assert_eq!(
        node.footprint()?,
        before,
        "a refused ADD left something behind"
    );
    Ok(())
}

fn remove_key(config: &mut Value, key: &str) {
    if let Some(object) = config.as_object_mut() {
        object.remove(key);
    }
}

fn pod_cidr(node: &Node) -> Ipv4Net {
    node.pod_cidr()
        .parse()
        .unwrap_or_else(|e| panic!("pod CIDR {}: {e}", node.pod_cidr()))
}

fn link_mac(netns: &Netns, link: &str) -> Result<String> {
    let out = netns.ip(&["-j", "link", "show", "dev", link])?;
    let links: Value = serde_json::from_slice(&out.stdout)
        .map_err(Error::json(format!("parsing `ip -j link show dev {link}`")))?;
    Ok(links[0]["address"].as_str().unwrap_or_default().to_string())
}
