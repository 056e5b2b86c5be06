//! The Helm chart (manifests/helm/myelin) and manifests/install.yaml: rendered by Helm itself,
//! linted by Helm, every object valid against the Kubernetes schemas, install.yaml never
//! behind the chart, and the DaemonSet and RBAC exactly as the agent needs them.
//!
//! The Helm and schema checks run the Python tools `cargo xtask setup` installs; without them
//! they fail and say so. The structural checks read the committed install.yaml, which the
//! first test proves is what Helm renders from the chart's defaults.

use std::{collections::BTreeSet, fs};

use myelin_tests::{
    Binaries, Result,
    chart::{self, ChartTools},
    oci,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// The objects of a YAML stream, `---`-separated.
fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("install.yaml is YAML"))
        .filter(|object| !object.is_null())
        .collect()
}

fn install_yaml() -> String {
    let path = chart::workspace_root().join(chart::INSTALL_YAML);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut found = objects.iter().filter(|o| o["kind"] == kind);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in install.yaml"));
    assert!(
        found.next().is_none(),
        "more than one {kind} in install.yaml"
    );
    first
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec[list]
        .as_array()
        .and_then(|containers| containers.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry named {name}"))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("{} has no env {name}", container["name"]))
}

/// The DaemonSet's pod spec, from install.yaml.
fn pod_spec() -> Value {
    let objects = objects(&install_yaml());
    object(&objects, "DaemonSet")["spec"]["template"]["spec"].clone()
}

#[test]
fn install_yaml_is_what_helm_renders_from_the_chart() -> Result<()> {
    let rendered = ChartTools::from_current_exe()?.render_install_yaml()?;
    let committed = install_yaml();
    if committed != rendered {
        let first_difference = committed
            .lines()
            .zip(rendered.lines())
            .enumerate()
            .find(|(_, (c, r))| c != r)
            .map(|(i, (c, r))| format!("line {}: committed {c:?}, rendered {r:?}", i + 1))
            .unwrap_or_else(|| "one is a prefix of the other".into());
        panic!(
            "{} is out of date with {} ({first_difference}): run `cargo xtask manifests`",
            chart::INSTALL_YAML,
            chart::CHART_DIR
        );
    }
    Ok(())
}

#[test]
fn helm_lint_finds_no_warnings_or_errors() -> Result<()> {
    let messages = ChartTools::from_current_exe()?.lint()?;
    let failing: Vec<_> = messages.iter().filter(|m| m.fails_strict_lint()).collect();
    assert!(
        failing.is_empty(),
        "helm lint: {failing:?} (helm-sdkpy passes no message text; render the chart with \
         `cargo xtask manifests` to see the template error)"
    );
    Ok(())
}

/// The defaults, the privileged variant and every other value changed at once.
#[test]
fn every_rendered_object_validates_against_the_kubernetes_schemas() -> Result<()> {
    let tools = ChartTools::from_current_exe()?;
    for values in [
        json!({}),
        json!({ "bpffs": { "mount": "agent" } }),
        json!({
            "image": { "repository": "registry.example/myelin", "tag": "dev", "pullPolicy": "Always" },
            "imagePullSecrets": [{ "name": "registry-credentials" }],
            "logLevel": "debug",
            "metrics": { "port": 19962 },
            "cni": { "binDir": "/usr/libexec/cni", "confDir": "/etc/cni/conf.d" },
            "resources": { "requests": { "cpu": "50m" }, "limits": { "memory": "1Gi" } },
            "priorityClassName": "",
            "kubeProxyReplacement": true,
        }),
    ] {
        let rendered = tools.render(&values)?;
        let violations = tools.validate(&rendered)?;
        assert!(
            violations.is_empty(),
            "with values {values}: {violations:#?}"
        );
        assert_eq!(
            objects(&rendered).len(),
            4,
            "ServiceAccount, ClusterRole, ClusterRoleBinding and DaemonSet with values {values}"
        );
    }
    Ok(())
}

#[test]
fn values_outside_the_schema_are_refused() -> Result<()> {
    let tools = ChartTools::from_current_exe()?;
    for values in [
        json!({ "bpffs": { "mount": "sometimes" } }),
        json!({ "metrics": { "port": 70000 } }),
        json!({ "podCIDR": "10.244.0.0/16" }),
        json!({ "routingMode": "bgp" }),
        json!({ "tunnelPort": 0 }),
        json!({ "masquerade": "yes" }),
        json!({ "nonMasqueradeCIDRs": ["10.0.0.0"] }),
        json!({ "natPortRange": "61000" }),
        json!({ "uplink": "eth0/../x" }),
        json!({ "kubeProxyReplacement": "yes" }),
        json!({ "cgroupRoot": "sys/fs/cgroup" }),
        json!({ "k8sServiceHost": "10.0.0.1 evil" }),
        json!({ "k8sServicePort": 70000 }),
        json!({ "lbAlgorithm": "hash" }),
        json!({ "kubeProxyReplacement": true, "lbAlgorithm": "maglev", "maglevTableSize": 1000 }),
        json!({ "lbAlgorithm": "maglev" }),
    ] {
        assert!(
            tools.render(&values).is_err(),
            "values {values} were accepted"
        );
    }
    Ok(())
}

/// The routing, masquerading and Service values become the agent's flags, spelled as the agent
/// parses them (checked against its `--help`, so a renamed flag fails here rather than on a
/// node).
#[test]
fn routing_masquerading_and_service_values_become_the_agents_flags() -> Result<()> {
    let rendered = ChartTools::from_current_exe()?.render(&json!({
        "routingMode": "native",
        "tunnelPort": 4789,
        "uplink": "bond0",
        "masquerade": false,
        "nonMasqueradeCIDRs": ["10.0.0.0/8", "192.168.0.0/16"],
        "natPortRange": "40000-50000",
        "kubeProxyReplacement": true,
        "flowBuffer": 0,
        "flowEventsRate": 500,
    }))?;
    let objects = objects(&rendered);
    let spec = &object(&objects, "DaemonSet")["spec"]["template"]["spec"];
    let args = &container(spec, "containers", "agent")["args"];
    assert_eq!(
        *args,
        json!([
            "--source=kubernetes",
            "--routing-mode=native",
            "--tunnel-port=4789",
            "--uplink=bond0",
            "--masquerade=false",
            "--non-masquerade-cidrs=10.0.0.0/8,192.168.0.0/16",
            "--nat-port-range=40000-50000",
            "--kube-proxy-replacement=true",
            "--flow-buffer=0",
            "--flow-events-rate=500",
            "--cgroup-root=/host/cgroup2",
        ])
    );
    let help = std::process::Command::new(Binaries::from_env()?.agent()?)
        .arg("--help")
        .output()
        .map_err(myelin_tests::Error::io("running myelin-agent --help"))?;
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in args.as_array().into_iter().flatten() {
        let flag = arg.as_str().and_then(|a| a.split('=').next()).unwrap_or("");
        assert!(
            help.contains(&format!("{flag} <")),
            "myelin-agent has no flag {flag}:\n{help}"
        );
    }
    Ok(())
}

/// `lbAlgorithm: maglev` (with kubeProxyReplacement) becomes `--lb-algorithm` and
/// `--lb-maglev-table-size`, spelled as the agent parses them; the default, random, adds no
/// flag.
#[test]
fn maglev_values_become_the_agents_flags() -> Result<()> {
    let tools = ChartTools::from_current_exe()?;
    let args_of = |values: serde_json::Value| -> Result<Vec<String>> {
        let rendered = tools.render(&values)?;
        let objects = objects(&rendered);
        let spec = &object(&objects, "DaemonSet")["spec"]["template"]["spec"];
        Ok(container(spec, "containers", "agent")["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .filter(|a| a.starts_with("--lb-"))
            .map(str::to_string)
            .collect())
    };
    let maglev = args_of(json!({
        "kubeProxyReplacement": true,
        "lbAlgorithm": "maglev",
        "maglevTableSize": 1021,
    }))?;
    assert_eq!(
        maglev,
        ["--lb-algorithm=maglev", "--lb-maglev-table-size=1021"]
    );
    assert_eq!(
        args_of(json!({ "kubeProxyReplacement": true }))?,
        Vec::<String>::new()
    );
    let help = std::process::Command::new(Binaries::from_env()?.agent()?)
        .arg("--help")
        .output()
        .map_err(myelin_tests::Error::io("running myelin-agent --help"))?;
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &maglev {
        let flag = arg.split('=').next().unwrap_or("");
        assert!(
            help.contains(&format!("{flag} <")),
            "myelin-agent has no flag {flag}:\n{help}"
        );
    }
    Ok(())
}

/// `k8sServiceHost`/`k8sServicePort` become the agent's KUBERNETES_SERVICE_HOST/PORT (what its
/// in-cluster configuration reads); unset, the agent has neither and keeps the ones Kubernetes
/// gives every pod.
#[test]
fn the_api_servers_own_address_reaches_the_agent_only_when_given() -> Result<()> {
    let tools = ChartTools::from_current_exe()?;
    let env_of = |values: serde_json::Value| -> Result<Vec<(String, String)>> {
        let rendered = tools.render(&values)?;
        let objects = objects(&rendered);
        let spec = &object(&objects, "DaemonSet")["spec"]["template"]["spec"];
        let agent = container(spec, "containers", "agent");
        Ok(agent["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e["name"].as_str()?;
                let value = e["value"].as_str()?;
                name.starts_with("KUBERNETES_")
                    .then(|| (name.to_string(), value.to_string()))
            })
            .collect())
    };
    assert_eq!(
        env_of(
            json!({ "kubeProxyReplacement": true, "k8sServiceHost": "192.168.1.2", "k8sServicePort": 6443 })
        )?,
        [
            (
                "KUBERNETES_SERVICE_HOST".to_string(),
                "192.168.1.2".to_string()
            ),
            ("KUBERNETES_SERVICE_PORT".to_string(), "6443".to_string()),
        ]
    );
    assert_eq!(env_of(json!({}))?, []);
    Ok(())
}

/// Socket-level load balancing: with kubeProxyReplacement, the host's cgroup2 mount
/// (`cgroupRoot`) is mounted read-only at /host/cgroup2 and given to the agent; without
/// kubeProxyReplacement, or with `cgroupRoot: ""`, neither.
#[test]
fn the_hosts_cgroup2_is_the_agents_cgroup_root_only_with_kube_proxy_replacement() -> Result<()> {
    let tools = ChartTools::from_current_exe()?;
    for (values, host_path) in [
        (
            json!({ "kubeProxyReplacement": true }),
            Some("/sys/fs/cgroup"),
        ),
        (
            json!({ "kubeProxyReplacement": true, "cgroupRoot": "/sys/fs/cgroup/unified" }),
            Some("/sys/fs/cgroup/unified"),
        ),
        (
            json!({ "kubeProxyReplacement": true, "cgroupRoot": "" }),
            None,
        ),
        (json!({}), None),
    ] {
        let rendered = tools.render(&values)?;
        let objects = objects(&rendered);
        let spec = &object(&objects, "DaemonSet")["spec"]["template"]["spec"];
        let agent = container(spec, "containers", "agent");
        let flag = strings(&agent["args"])
            .into_iter()
            .find(|a| a.starts_with("--cgroup-root"));
        let volume = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "cgroup2"));
        let mount = agent["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "cgroup2"));
        match host_path {
            Some(path) => {
                assert_eq!(
                    flag.as_deref(),
                    Some("--cgroup-root=/host/cgroup2"),
                    "{values}"
                );
                let volume = volume.expect("a cgroup2 volume");
                assert_eq!(volume["hostPath"]["path"], path, "{values}");
                assert_eq!(volume["hostPath"]["type"], "Directory");
                let mount = mount.expect("the agent mounts it");
                assert_eq!(mount["mountPath"], "/host/cgroup2");
                assert_eq!(mount["readOnly"], true);
            }
            None => assert!(
                flag.is_none() && volume.is_none() && mount.is_none(),
                "{values}: {flag:?} {volume:?} {mount:?}"
            ),
        }
    }
    Ok(())
}

#[test]
fn agent_mounting_bpffs_itself_runs_privileged_with_bidirectional_propagation() -> Result<()> {
    let rendered =
        ChartTools::from_current_exe()?.render(&json!({ "bpffs": { "mount": "agent" } }))?;
    let objects = objects(&rendered);
    let spec = &object(&objects, "DaemonSet")["spec"]["template"]["spec"];
    let agent = container(spec, "containers", "agent");
    assert_eq!(agent["securityContext"]["privileged"], true);
    let bpffs = agent["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/sys/fs/bpf"))
        .expect("the agent mounts /sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "Bidirectional");
    Ok(())
}

#[test]
fn agent_has_exactly_the_four_bpf_capabilities_and_is_not_privileged() {
    let spec = pod_spec();
    let agent = container(&spec, "containers", "agent");
    let security = &agent["securityContext"];
    assert_eq!(
        strings(&security["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        strings(&security["capabilities"]["drop"]),
        ["ALL".to_string()].into()
    );
    assert!(
        security.get("privileged").is_none_or(|p| p == false),
        "{security}"
    );
    let installer = container(&spec, "initContainers", "install-cni");
    assert!(installer["securityContext"]["capabilities"]["add"].is_null());
    assert_eq!(
        strings(&installer["securityContext"]["capabilities"]["drop"]),
        ["ALL".to_string()].into()
    );
}

#[test]
fn daemonset_uses_the_host_network_and_tolerates_every_taint() {
    let spec = pod_spec();
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["tolerations"], json!([{ "operator": "Exists" }]));
}

#[test]
fn readiness_is_the_agents_readyz_on_the_metrics_port() {
    let spec = pod_spec();
    let agent = container(&spec, "containers", "agent");
    let probe = &agent["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/readyz");
    let port = agent["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == probe["port"]))
        .expect("the probe's port is a named port of the agent");
    assert_eq!(port["containerPort"], 9962);
    assert_eq!(
        env_value(agent, "MYELIN_METRICS_ADDR")["value"],
        "0.0.0.0:9962"
    );
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], probe["port"]);
    assert!(agent["resources"]["requests"]["cpu"].is_string());
    assert!(agent["resources"]["requests"]["memory"].is_string());
}

#[test]
fn host_directories_are_mounted_where_agent_and_installer_use_them() {
    let spec = pod_spec();
    // (host path, container, path inside it)
    let expected = [
        ("/sys/fs/bpf", "agent", "/sys/fs/bpf"),
        ("/run/myelin", "agent", "/run/myelin"),
        ("/var/lib/myelin", "agent", "/var/lib/myelin"),
        ("/opt/cni/bin", "install-cni", "/host/cni/bin"),
        ("/etc/cni/net.d", "install-cni", "/host/cni/net.d"),
    ];
    let volumes = spec["volumes"].as_array().expect("the pod has volumes");
    for (host_path, container_name, mount_path) in expected {
        let volume = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == host_path)
            .unwrap_or_else(|| panic!("no hostPath volume for {host_path}"));
        assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate");
        let list = if container_name == "agent" {
            "containers"
        } else {
            "initContainers"
        };
        let mounted = container(&spec, list, container_name)["volumeMounts"]
            .as_array()
            .is_some_and(|mounts| {
                mounts
                    .iter()
                    .any(|m| m["name"] == volume["name"] && m["mountPath"] == mount_path)
            });
        assert!(
            mounted,
            "{host_path} is not mounted at {mount_path} in {container_name}"
        );
    }
    let agent = container(&spec, "containers", "agent");
    let bpffs = agent["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/sys/fs/bpf"))
        .expect("the agent mounts /sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "HostToContainer");
}

#[test]
fn agent_runs_the_kubernetes_source_named_after_its_node() {
    let spec = pod_spec();
    let agent = container(&spec, "containers", "agent");
    assert_eq!(agent["command"], json!([oci::AGENT_PATH]));
    assert_eq!(
        agent["args"],
        json!([
            "--source=kubernetes",
            "--routing-mode=tunnel",
            "--tunnel-port=8472",
            "--masquerade=true",
            "--kube-proxy-replacement=false",
            "--flow-buffer=4096",
            "--flow-events-rate=1000",
        ])
    );
    assert_eq!(
        env_value(agent, "MYELIN_NODE_NAME")["valueFrom"],
        json!({ "fieldRef": { "fieldPath": "spec.nodeName" } })
    );
    assert_eq!(env_value(agent, "MYELIN_LOG_LEVEL")["value"], "info");
    assert_eq!(agent["image"], oci::default_image_reference());
}

/// The installer copies the plugin from where the image has it and writes the conflist the
/// runtime of the e2e tests accepts; tests/tests/image.rs runs it for real.
#[test]
fn installer_writes_the_conflist_with_cni_version_1_0_0() {
    let spec = pod_spec();
    let installer = container(&spec, "initContainers", "install-cni");
    assert_eq!(installer["image"], oci::default_image_reference());
    assert_eq!(
        env_value(installer, "CNI_CONFLIST")["value"],
        r#"{"cniVersion":"1.0.0","name":"myelin","plugins":[{"type":"myelin"}]}"#
    );
    let script = installer["command"][2].as_str().expect("a shell script");
    assert!(script.contains(oci::PLUGIN_PATH), "{script}");
    assert!(
        script.contains("/host/cni/net.d/05-myelin.conflist"),
        "{script}"
    );
}

/// What a rendered ClusterRole grants: (API group, resource), every rule read only.
fn granted(role: &Value) -> BTreeSet<(String, String)> {
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(
            strings(&rule["verbs"]),
            ["get", "list", "watch"].map(String::from).into(),
            "{rule}"
        );
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                granted.insert((group.clone(), resource));
            }
        }
    }
    granted
}

fn resources(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect()
}

/// The kinds agent/src/source/kubernetes.rs watches without --kube-proxy-replacement.
const WATCHED: [(&str, &str); 4] = [
    ("", "nodes"),
    ("", "namespaces"),
    ("", "pods"),
    ("networking.k8s.io", "networkpolicies"),
];

/// With kubeProxyReplacement (and only then) the agent watches Services and EndpointSlices, and
/// may read them.
#[test]
fn cluster_role_reads_services_and_endpoint_slices_only_with_kube_proxy_replacement() -> Result<()>
{
    let rendered =
        ChartTools::from_current_exe()?.render(&json!({ "kubeProxyReplacement": true }))?;
    let objects = objects(&rendered);
    let mut watched = resources(&WATCHED);
    watched.extend(resources(&[
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
    ]));
    assert_eq!(granted(object(&objects, "ClusterRole")), watched);
    Ok(())
}

#[test]
fn cluster_role_only_reads_what_the_agent_watches() {
    let objects = objects(&install_yaml());
    let role = object(&objects, "ClusterRole");
    assert_eq!(granted(role), resources(&WATCHED));

    let binding = object(&objects, "ClusterRoleBinding");
    let account = object(&objects, "ServiceAccount");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": chart::NAMESPACE,
        }])
    );
    let daemonset = object(&objects, "DaemonSet");
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
    assert_eq!(daemonset["metadata"]["namespace"], chart::NAMESPACE);
}

#[test]
fn chart_version_and_image_follow_the_workspace_version() {
    let path = chart::workspace_root()
        .join(chart::CHART_DIR)
        .join("Chart.yaml");
    let text = fs::read_to_string(&path).expect("Chart.yaml");
    let chart: Value = serde_yaml::from_str(&text).expect("Chart.yaml is YAML");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"], version);
    assert_eq!(chart["appVersion"], version);
    assert_eq!(
        chart["kubeVersion"],
        format!(">={}.0-0", chart::KUBERNETES_VERSIONS[0])
    );
    let values: Value = serde_yaml::from_str(
        &fs::read_to_string(path.with_file_name("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml is YAML");
    assert_eq!(values["image"]["repository"], oci::IMAGE_REPOSITORY);
}

/// manifests/Dockerfile puts the binaries where `cargo xtask image` does, which is where the
/// DaemonSet runs them from.
#[test]
fn dockerfile_installs_the_binaries_at_the_image_paths() {
    let path = chart::workspace_root().join("manifests/Dockerfile");
    let text = fs::read_to_string(&path).expect("manifests/Dockerfile");
    let destinations: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("COPY --from=build "))
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    assert_eq!(
        destinations,
        [oci::AGENT_PATH, oci::CTL_PATH, oci::PLUGIN_PATH]
            .map(String::from)
            .into()
    );
    assert!(
        text.lines()
            .any(|l| l == format!("ENTRYPOINT [\"{}\"]", oci::AGENT_PATH)),
        "the entrypoint is not {}",
        oci::AGENT_PATH
    );
}
