//! The real `myelin` binary on VERSION and on inputs it must reject before touching any network
//! namespace or agent (these need no root).

mod common;

use common::{error_of, run_plugin_here};
use serde_json::json;

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"myelin","type":"myelin","agentSocket":"/nonexistent/myelin-test.sock"}"#;

fn add_env<'a>(overrides: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut vars = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
    ];
    for (key, value) in overrides {
        vars.retain(|(k, _)| k != key);
        if !value.is_empty() {
            vars.push((key, value));
        }
    }
    vars
}

#[test]
fn version_with_empty_stdin_lists_every_supported_version() {
    let out = run_plugin_here(&[("CNI_COMMAND", "VERSION")], "");
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        answer,
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn version_echoes_the_requested_version() {
    let out = run_plugin_here(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.3.1"}"#);
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["cniVersion"], "0.3.1");
}

#[test]
fn missing_or_unknown_command_is_code_4() {
    let err = error_of(&run_plugin_here(&[], CONF));
    assert_eq!(err["code"], 4);
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("CNI_COMMAND"),
        "{err}"
    );
    let err = error_of(&run_plugin_here(&[("CNI_COMMAND", "INIT")], CONF));
    assert_eq!(err["code"], 4);
    // The error answers in the configuration's version.
    assert_eq!(err["cniVersion"], "1.0.0");
}

#[test]
fn invalid_environment_is_code_4_and_names_the_variable() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("CNI_CONTAINERID", "")], "CNI_CONTAINERID"),
        (&[("CNI_CONTAINERID", "-bad")], "CNI_CONTAINERID"),
        (&[("CNI_IFNAME", "this-name-is-too-long")], "CNI_IFNAME"),
        (&[("CNI_IFNAME", "eth/0")], "CNI_IFNAME"),
        (&[("CNI_NETNS", "")], "CNI_NETNS"),
        (&[("CNI_NETNS", "/proc/self/ns/mnt")], "CNI_NETNS"),
    ];
    for (overrides, variable) in cases {
        let err = error_of(&run_plugin_here(&add_env(overrides), CONF));
        assert_eq!(err["code"], 4, "{overrides:?}: {err}");
        assert!(
            err["msg"].as_str().unwrap_or_default().contains(variable),
            "{err}"
        );
    }
}

#[test]
fn malformed_json_is_code_6_in_the_latest_version() {
    let err = error_of(&run_plugin_here(&add_env(&[]), "{not json"));
    assert_eq!(err["code"], 6);
    assert_eq!(err["cniVersion"], "1.1.0");
    assert!(
        !err["details"].as_str().unwrap_or_default().is_empty(),
        "{err}"
    );
}

#[test]
fn invalid_configuration_is_code_7() {
    for conf in [
        r#"{"cniVersion":"1.0.0","type":"myelin"}"#,
        r#"{"cniVersion":"1.0.0","name":"myelin"}"#,
        r#"{"cniVersion":"1.0.0","name":"myelin","type":"myelin","mtu":"big"}"#,
    ] {
        let err = error_of(&run_plugin_here(&add_env(&[]), conf));
        assert_eq!(err["code"], 7, "{conf}: {err}");
    }
}

#[test]
fn missing_or_unsupported_version_is_code_1() {
    for conf in [
        r#"{"name":"myelin","type":"myelin"}"#,
        r#"{"cniVersion":"0.2.0","name":"myelin","type":"myelin"}"#,
    ] {
        let err = error_of(&run_plugin_here(&add_env(&[]), conf));
        assert_eq!(err["code"], 1, "{conf}: {err}");
    }
}

#[test]
fn status_without_an_agent_is_code_50() {
    let conf = CONF.replace("1.0.0", "1.1.0");
    let err = error_of(&run_plugin_here(&[("CNI_COMMAND", "STATUS")], &conf));
    assert_eq!(err["code"], 50);
    assert_eq!(err["cniVersion"], "1.1.0");
}
