//! The CNI plugin's stdin, as every command reads it: VERSION echoes `cniVersion`; the others
//! parse the network configuration (any of the four versions), answer errors in the
//! configuration's version, and ADD, CHECK and GC go on with `prevResult` and
//! `cni.dev/valid-attachments`. Only the pure steps: nothing here touches a netns, netlink, the
//! agent or `logFile`.
#![no_main]

use std::{net::Ipv4Addr, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use myelin_cni::{
    config::{self, NetConf},
    error::CniError,
    netlink::Mac,
    result::{self, AddResult, ResultInterface, ResultIp, ResultRoute},
    version::{self, CniVersion},
};
use serde_json::{Value, json};

fuzz_target!(|stdin: &[u8]| {
    version_command(stdin);
    match NetConf::parse(stdin) {
        Ok(conf) => configured_commands(stdin, &conf),
        Err(e) => {
            let err = CniError::from(e);
            assert!(matches!(err.code.number(), 1 | 6 | 7), "{err:?}");
            error_reply(stdin, &err);
        }
    }
});

fn version_command(stdin: &[u8]) {
    let requested = config::requested_version(stdin);
    let answer: Value = serde_json::from_str(&version::version_answer(requested.as_deref()))
        .expect("VERSION answers JSON");
    let echoed = requested.as_deref().unwrap_or(CniVersion::LATEST.as_str());
    assert_eq!(answer["cniVersion"], echoed);
    assert_eq!(
        answer["supportedVersions"].as_array().map(Vec::len),
        Some(4)
    );
}

/// An error is printed in the configuration's version when it names a supported one.
fn error_reply(stdin: &[u8], err: &CniError) {
    let version = config::reply_version(stdin);
    let reply: Value =
        serde_json::from_str(&err.to_json(version.as_str())).expect("errors are JSON");
    assert_eq!(reply["cniVersion"], version.as_str());
    assert_eq!(reply["code"], err.code.number());
}

fn configured_commands(stdin: &[u8], conf: &NetConf) {
    // What validation promises.
    assert!(!conf.name.is_empty() && !conf.plugin_type.is_empty());
    assert!(conf.mtu.is_none_or(|m| (68..=65535).contains(&m)));
    assert!(!conf.prev_result.as_ref().is_some_and(Value::is_null));
    // Errors after parsing (agent down, CHECK mismatch, ...) answer in the same version.
    assert_eq!(config::reply_version(stdin), conf.cni_version);
    // A parsed configuration, written back, parses to itself.
    let again = NetConf::parse(encode(conf).to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{conf:?} re-encoded does not parse: {e}"));
    assert_eq!(&again, conf);

    add(conf);
    if let Some(prev) = &conf.prev_result {
        check(prev);
    }
    for id in conf.valid_attachments.iter().flatten() {
        // GC derives the host veth of every attachment it removes.
        assert_eq!(id.host_ifname().len(), 15);
    }
}

/// ADD's result, chained after `prevResult` in the configuration's version.
fn add(conf: &NetConf) {
    let printed = SAMPLE.to_json(conf.cni_version, conf.prev_result.as_ref());
    let result: Value = serde_json::from_str(&printed).expect("ADD prints JSON");
    assert_eq!(result["cniVersion"], conf.cni_version.as_str());
    let objects = |v: Option<&Value>, key: &str| {
        v.and_then(|v| v.get(key))
            .and_then(Value::as_array)
            .map_or(0, |a| a.iter().filter(|e| e.is_object()).count())
    };
    let prev = conf.prev_result.as_ref();
    for key in ["interfaces", "ips", "routes"] {
        assert_eq!(
            objects(Some(&result), key),
            objects(prev, key) + objects(Some(&SAMPLE_JSON), key),
            "{key} of {printed}"
        );
    }
}

/// CHECK reads what to compare from `prevResult`, for any interface name.
fn check(prev: &Value) {
    let names = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("name")?.as_str());
    for ifname in names.chain(["eth0"]) {
        if let Ok(expected) = result::expected_pod(prev, ifname)
            // CHECK compares the link's MAC with this one.
            && let Ok(mac) = expected.mac.parse::<Mac>()
        {
            assert!(
                mac.to_string().eq_ignore_ascii_case(&expected.mac),
                "{:?} read as {mac}",
                expected.mac
            );
        }
    }
}

/// The configuration's JSON, as a runtime would write it.
fn encode(conf: &NetConf) -> Value {
    let mut json = json!({
        "cniVersion": conf.cni_version.as_str(),
        "name": conf.name,
        "type": conf.plugin_type,
        "agentSocket": conf.agent_socket,
        "dns": conf.dns,
    });
    if let Some(mtu) = conf.mtu {
        json["mtu"] = mtu.into();
    }
    if let Some(log_file) = &conf.log_file {
        json["logFile"] = json!(log_file);
    }
    if let Some(prev) = &conf.prev_result {
        json["prevResult"] = prev.clone();
    }
    if let Some(valid) = &conf.valid_attachments {
        json["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
    }
    json
}

static SAMPLE: LazyLock<AddResult> = LazyLock::new(|| AddResult {
    interfaces: vec![
        ResultInterface {
            name: "lxc0123456789ab".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            sandbox: None,
        },
        ResultInterface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:02".into(),
            mtu: 1500,
            sandbox: Some("/run/netns/pod".into()),
        },
    ],
    ips: vec![ResultIp {
        address: "10.244.0.2/32".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(10, 244, 0, 1)),
        interface: 1,
    }],
    routes: vec![ResultRoute {
        dst: "0.0.0.0/0".parse().unwrap(),
        gw: Some(Ipv4Addr::new(10, 244, 0, 1)),
    }],
    dns: Default::default(),
});

static SAMPLE_JSON: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(&SAMPLE.to_json(CniVersion::LATEST, None)).unwrap());
