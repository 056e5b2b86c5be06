//! The network configuration the runtime streams on stdin.

use std::path::PathBuf;

use myelin_api::AttachmentId;
use serde::{Deserialize, Serialize};

use crate::{
    error::{CniError, ErrorCode},
    version::CniVersion,
};

/// Smallest MTU an IPv4 interface may have (RFC 791).
const MIN_MTU: u32 = 68;
/// Largest MTU a veth accepts.
const MAX_MTU: u32 = 65535;

/// The plugin's configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub plugin_type: String,
    pub agent_socket: PathBuf,
    /// `None`: use the MTU of the node's default-route device.
    pub mtu: Option<u32>,
    pub log_file: Option<PathBuf>,
    pub dns: Dns,
    /// The previous result, undecoded: only CHECK needs it, and a DEL must not fail on it.
    pub prev_result: Option<serde_json::Value>,
    /// GC's `cni.dev/valid-attachments`.
    pub valid_attachments: Option<Vec<AttachmentId>>,
}

/// DNS settings, passed through from the configuration to the result unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the network configuration on stdin is not valid JSON")]
    Malformed(#[source] serde_json::Error),
    #[error("the network configuration on stdin is not a JSON object")]
    NotAnObject,
    #[error("the network configuration's cniVersion is not a string")]
    VersionNotAString,
    #[error("the network configuration has a key of the wrong type")]
    WrongType(#[source] serde_json::Error),
    #[error("the network configuration has no {0:?}")]
    Missing(&'static str),
    #[error("the network configuration has no cniVersion; use one of {list}", list = supported_list())]
    MissingVersion,
    #[error("cniVersion {0:?} is not supported; use one of {list}", list = supported_list())]
    UnsupportedVersion(String),
    #[error("mtu {0} is out of range; use {MIN_MTU}..={MAX_MTU} or leave it out")]
    MtuOutOfRange(u32),
    #[error(
        "network name {0:?} is not valid: it must start with a letter or digit and contain \
         only letters, digits, '_', '.' and '-'"
    )]
    InvalidName(String),
}

/// The specification's pattern for network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> Self {
        let code = match e {
            // As the reference skel: what its version decoder cannot read is a decoding failure.
            ConfigError::Malformed(_)
            | ConfigError::NotAnObject
            | ConfigError::VersionNotAString => ErrorCode::DecodingFailure,
            ConfigError::MissingVersion | ConfigError::UnsupportedVersion(_) => {
                ErrorCode::IncompatibleVersion
            }
            ConfigError::WrongType(_)
            | ConfigError::Missing(_)
            | ConfigError::MtuOutOfRange(_)
            | ConfigError::InvalidName(_) => ErrorCode::InvalidConfig,
        };
        let details = match &e {
            ConfigError::Malformed(source) | ConfigError::WrongType(source) => source.to_string(),
            _ => String::new(),
        };
        CniError::new(code, e.to_string()).with_details(details)
    }
}

fn supported_list() -> String {
    let names: Vec<&str> = CniVersion::SUPPORTED.iter().map(|v| v.as_str()).collect();
    names.join(", ")
}

/// The keys Myelin reads; everything else (`runtimeConfig`, `args`, `capabilities`, ...) is
/// accepted and ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    agent_socket: Option<PathBuf>,
    mtu: Option<u32>,
    log_file: Option<PathBuf>,
    // An object, checked before it becomes a `Dns`: serde would also accept an array as a struct.
    dns: Option<serde_json::Map<String, serde_json::Value>>,
    prev_result: Option<serde_json::Value>,
    /// Absent: `None`; `null`: `Some(None)`.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "present"
    )]
    valid_attachments: Option<Option<Vec<ValidAttachment>>>,
}

/// Tells an explicit `null` from an absent key (serde's `Option` reads both as `None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The specification spells it `containerID`, the agent API `containerId`.
#[derive(Deserialize)]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(stdin).map_err(ConfigError::Malformed)?;
        let Some(object) = value.as_object() else {
            return Err(ConfigError::NotAnObject);
        };
        if object
            .get("cniVersion")
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            return Err(ConfigError::VersionNotAString);
        }
        let wire: Wire = serde_json::from_value(value).map_err(ConfigError::WrongType)?;
        let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
        let name = non_empty(wire.name).ok_or(ConfigError::Missing("name"))?;
        if !valid_network_name(&name) {
            return Err(ConfigError::InvalidName(name));
        }
        let plugin_type = non_empty(wire.plugin_type).ok_or(ConfigError::Missing("type"))?;
        // Like the reference skel, a missing version is an incompatible one (it would mean 0.1.0).
        let version_text = wire.cni_version.ok_or(ConfigError::MissingVersion)?;
        let cni_version = CniVersion::parse(&version_text)
            .ok_or(ConfigError::UnsupportedVersion(version_text))?;
        if let Some(mtu) = wire.mtu
            && !(MIN_MTU..=MAX_MTU).contains(&mtu)
        {
            return Err(ConfigError::MtuOutOfRange(mtu));
        }
        let dns = match wire.dns {
            Some(map) => serde_json::from_value(serde_json::Value::Object(map))
                .map_err(ConfigError::WrongType)?,
            None => Dns::default(),
        };
        Ok(Self {
            cni_version,
            name,
            plugin_type,
            agent_socket: wire
                .agent_socket
                .unwrap_or_else(|| PathBuf::from(myelin_api::DEFAULT_SOCKET)),
            mtu: wire.mtu,
            log_file: wire.log_file,
            dns,
            prev_result: wire.prev_result.filter(|v| !v.is_null()),
            valid_attachments: wire.valid_attachments.map(|list| {
                list.unwrap_or_default()
                    .into_iter()
                    .map(|a| AttachmentId::new(a.container_id, a.ifname))
                    .collect()
            }),
        })
    }
}

/// The `cniVersion` string of `stdin`, if it is JSON with one (VERSION echoes it). Read as
/// [`NetConf::parse`] reads it, so that a key given twice means the same here (the last one, as
/// for the runtimes' Go decoder); a derived struct would refuse the duplicate.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(stdin).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_string)
}

/// The version to put into an error object: the configuration's when it names a supported one,
/// else the latest. Looks only at `cniVersion`, so that errors about other keys still answer in
/// the runtime's version.
pub fn reply_version(stdin: &[u8]) -> CniVersion {
    requested_version(stdin)
        .and_then(|v| CniVersion::parse(&v))
        .unwrap_or(CniVersion::LATEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<NetConf, ConfigError> {
        NetConf::parse(json.to_string().as_bytes())
    }

    fn code_of(json: &str) -> u32 {
        let err = NetConf::parse(json.as_bytes()).unwrap_err();
        CniError::from(err).code.number()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let conf =
            parse(serde_json::json!({"cniVersion": "1.1.0", "name": "myelin", "type": "myelin"}))
                .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_1_0);
        assert_eq!(conf.name, "myelin");
        assert_eq!(conf.plugin_type, "myelin");
        assert_eq!(conf.agent_socket, PathBuf::from("/run/myelin/agent.sock"));
        assert_eq!(conf.mtu, None);
        assert_eq!(conf.log_file, None);
        assert_eq!(conf.dns, Dns::default());
        assert!(conf.prev_result.is_none());
        assert!(conf.valid_attachments.is_none());
    }

    #[test]
    fn optional_keys_are_read_and_unknown_keys_ignored() {
        let conf = parse(serde_json::json!({
            "cniVersion": "0.4.0", "name": "net", "type": "myelin",
            "agentSocket": "/tmp/a.sock", "mtu": 1450, "logFile": "/var/log/myelin-cni.log",
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            "runtimeConfig": {"portMappings": []}, "args": {"cni": {"x": 1}},
            "capabilities": {"portMappings": true},
            "prevResult": {"cniVersion": "0.4.0", "ips": []},
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]
        }))
        .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(conf.mtu, Some(1450));
        assert_eq!(
            conf.log_file,
            Some(PathBuf::from("/var/log/myelin-cni.log"))
        );
        assert_eq!(conf.dns.nameservers, vec!["10.96.0.10"]);
        assert_eq!(conf.dns.search, vec!["svc.cluster.local"]);
        assert!(conf.prev_result.is_some());
        assert_eq!(
            conf.valid_attachments,
            Some(vec![AttachmentId::new("c1", "eth0")])
        );
    }

    #[test]
    fn network_names_follow_the_spec_pattern() {
        for name in ["myelin", "k8s-pod-network", "net_1.a", "0net"] {
            let conf =
                parse(serde_json::json!({"cniVersion": "1.0.0", "name": name, "type": "myelin"}));
            assert!(conf.is_ok(), "{name}");
        }
        for name in ["-net", ".net", "my net", "net/x", "net:1", "ünï"] {
            let stdin = serde_json::json!({"cniVersion": "1.0.0", "name": name, "type": "myelin"});
            assert_eq!(code_of(&stdin.to_string()), 7, "{name}");
        }
    }

    #[test]
    fn a_null_list_of_valid_attachments_is_an_empty_one() {
        let conf = parse(serde_json::json!({
            "cniVersion": "1.1.0", "name": "n", "type": "myelin",
            "cni.dev/valid-attachments": null
        }))
        .unwrap();
        assert_eq!(conf.valid_attachments, Some(vec![]));
    }

    #[test]
    fn prev_result_numbers_are_kept_exactly() {
        // Found by fuzzing: prevResult is passed on to the runtime and the next plugin as given,
        // but serde_json's default float parsing reads this number (its shortest spelling, as
        // Go and serde_json print it) one bit off, so the plugin passed on another number.
        let text = "248685792.66666666";
        let stdin = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"myelin","prevResult":{{"x":{text}}}}}"#
        );
        let conf = NetConf::parse(stdin.as_bytes()).unwrap();
        let kept = conf.prev_result.unwrap()["x"].as_f64();
        assert_eq!(kept, Some(text.parse::<f64>().unwrap()));
    }

    #[test]
    fn malformed_json_is_code_6() {
        assert_eq!(code_of("{\"cniVersion\": "), 6);
        assert_eq!(code_of(""), 6);
        assert_eq!(code_of("[1, 2]"), 6);
        assert_eq!(
            code_of(r#"{"cniVersion": 1, "name": "n", "type": "myelin"}"#),
            6
        );
    }

    #[test]
    fn missing_name_or_type_or_wrong_types_are_code_7() {
        assert_eq!(code_of(r#"{"cniVersion":"1.1.0","type":"myelin"}"#), 7);
        assert_eq!(
            code_of(r#"{"cniVersion":"1.1.0","name":"","type":"myelin"}"#),
            7
        );
        assert_eq!(code_of(r#"{"cniVersion":"1.1.0","name":"n"}"#), 7);
        assert_eq!(
            code_of(r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","mtu":"1500"}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","agentSocket":5}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","dns":[]}"#),
            7
        );
        assert_eq!(
            code_of(
                r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","dns":{"nameservers":"x"}}"#
            ),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","mtu":20}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","mtu":70000}"#),
            7
        );
        assert_eq!(
            code_of(
                r#"{"cniVersion":"1.1.0","name":"n","type":"myelin","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#
            ),
            7
        );
    }

    #[test]
    fn missing_or_unknown_version_is_code_1() {
        assert_eq!(code_of(r#"{"name":"n","type":"myelin"}"#), 1);
        assert_eq!(
            code_of(r#"{"cniVersion":"0.2.0","name":"n","type":"myelin"}"#),
            1
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"2.0.0","name":"n","type":"myelin"}"#),
            1
        );
    }

    #[test]
    fn error_messages_name_the_problem() {
        let err = CniError::from(
            NetConf::parse(br#"{"cniVersion":"1.1.0","type":"myelin"}"#).unwrap_err(),
        );
        assert!(err.msg.contains("\"name\""), "{}", err.msg);
        let err = CniError::from(
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"myelin","mtu":"x"}"#)
                .unwrap_err(),
        );
        assert!(err.details.contains("u32"), "{}", err.details);
    }

    #[test]
    fn requested_version_reads_only_a_string_cni_version() {
        assert_eq!(
            requested_version(br#"{"cniVersion":"0.2.0"}"#).as_deref(),
            Some("0.2.0")
        );
        assert_eq!(requested_version(b""), None);
        assert_eq!(requested_version(br#"{"cniVersion":1}"#), None);
        assert_eq!(requested_version(br#"{"name":"n"}"#), None);
    }

    #[test]
    fn a_version_given_twice_is_the_last_one_everywhere() {
        // Found by fuzzing: the configuration said 1.0.0 (its last cniVersion) while errors
        // were answered in 1.1.0, because this reader refused the duplicate key.
        let stdin = br#"{"cniVersion":"0.4.0","name":"n","type":"myelin","cniVersion":"1.0.0"}"#;
        assert_eq!(
            NetConf::parse(stdin).unwrap().cni_version,
            CniVersion::V1_0_0
        );
        assert_eq!(requested_version(stdin).as_deref(), Some("1.0.0"));
        assert_eq!(reply_version(stdin), CniVersion::V1_0_0);
    }

    #[test]
    fn reply_version_uses_a_supported_config_version_only() {
        assert_eq!(
            reply_version(br#"{"cniVersion":"0.3.1"}"#),
            CniVersion::V0_3_1
        );
        assert_eq!(
            reply_version(br#"{"cniVersion":"0.3.1","mtu":"bad"}"#),
            CniVersion::V0_3_1
        );
        assert_eq!(
            reply_version(br#"{"cniVersion":"9.9.9"}"#),
            CniVersion::V1_1_0
        );
        assert_eq!(reply_version(br#"{"cniVersion":3}"#), CniVersion::V1_1_0);
        assert_eq!(reply_version(b"not json"), CniVersion::V1_1_0);
    }
}
