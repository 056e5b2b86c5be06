//! The `CNI_*` environment variables: which command, for which attachment.

use std::ffi::OsString;

use myelin_api::{AttachmentId, PodRef};

use crate::error::{CniError, ErrorCode};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// The raw variables, empty ones treated as absent (as the reference skel does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("required environment variables missing: {}", .0.join(", "))]
    Missing(Vec<&'static str>),
    #[error("CNI_COMMAND {0:?} is unknown; use ADD, DEL, CHECK, STATUS, GC or VERSION")]
    UnknownCommand(String),
    #[error(
        "CNI_CONTAINERID {0:?} is invalid: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
    )]
    InvalidContainerId(String),
    #[error("CNI_IFNAME {name:?} is invalid: {reason}")]
    InvalidIfname { name: String, reason: &'static str },
    #[error("CNI_ARGS is invalid: {0:?} is not KEY=VALUE")]
    InvalidArgs(String),
}

impl From<EnvError> for CniError {
    fn from(e: EnvError) -> Self {
        CniError::new(ErrorCode::InvalidEnvironment, e.to_string())
    }
}

/// `CNI_PATH` is not read: Myelin delegates to no other plugin.
const VARS: [&str; 5] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
];

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads the variables through `lookup` (the process environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, EnvError> {
        let mut values: [Option<String>; 5] = Default::default();
        for (slot, name) in values.iter_mut().zip(VARS) {
            *slot = match lookup(name) {
                None => None,
                Some(raw) => {
                    let text = raw.into_string().map_err(|_| EnvError::NotUtf8(name))?;
                    Some(text).filter(|t| !t.is_empty())
                }
            };
        }
        let [command, container_id, netns, ifname, args] = values;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    pub fn command(&self) -> Result<Command, EnvError> {
        let text = self
            .command
            .as_deref()
            .ok_or_else(|| EnvError::Missing(vec!["CNI_COMMAND"]))?;
        Command::parse(text).ok_or_else(|| EnvError::UnknownCommand(text.to_string()))
    }

    /// The parameters of an attachment command (ADD, DEL, CHECK), validated. `CNI_NETNS` is
    /// required for ADD and CHECK; DEL works without it (the namespace may be gone already).
    pub fn attachment(&self, command: Command) -> Result<AttachmentEnv, EnvError> {
        let netns_required = matches!(command, Command::Add | Command::Check);
        let mut missing = Vec::new();
        if self.container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if netns_required && self.netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if self.ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        let (Some(container_id), Some(ifname)) = (&self.container_id, &self.ifname) else {
            return Err(EnvError::Missing(missing));
        };
        if !missing.is_empty() {
            return Err(EnvError::Missing(missing));
        }
        validate_container_id(container_id)?;
        validate_ifname(ifname)?;
        let pod = parse_pod_ref(self.args.as_deref().unwrap_or_default())?;
        Ok(AttachmentEnv {
            id: AttachmentId::new(container_id.clone(), ifname.clone()),
            netns: self.netns.clone(),
            pod,
        })
    }
}

/// What ADD, DEL and CHECK act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentEnv {
    pub id: AttachmentId,
    /// `CNI_NETNS` as given (always present for ADD and CHECK).
    pub netns: Option<String>,
    pub pod: Option<PodRef>,
}

/// The specification's rule: an alphanumeric first character, then alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let mut chars = id.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(EnvError::InvalidContainerId(id.to_string()))
    }
}

/// The specification's (and Linux's) rules for the interface name inside the container.
pub fn validate_ifname(name: &str) -> Result<(), EnvError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it must not be \".\" or \"..\"")
    } else if name.contains(['/', ':']) {
        Some("it must not contain '/' or ':'")
    } else if name.chars().any(char::is_whitespace) {
        Some("it must not contain whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EnvError::InvalidIfname {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The pod from `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..`, other keys ignored), when
/// both keys are there: runtimes outside Kubernetes send neither.
pub fn parse_pod_ref(cni_args: &str) -> Result<Option<PodRef>, EnvError> {
    let mut namespace = None;
    let mut name = None;
    for pair in cni_args.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| EnvError::InvalidArgs(pair.to_string()))?;
        match key {
            "K8S_POD_NAMESPACE" => namespace = Some(value.to_string()),
            "K8S_POD_NAME" => name = Some(value.to_string()),
            _ => {}
        }
    }
    Ok(match (namespace, name) {
        (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
            Some(PodRef { namespace, name })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> CniEnv {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        CniEnv::from_lookup(|name| map.get(name).cloned()).unwrap()
    }

    #[test]
    fn commands_parse_and_unknown_or_missing_are_rejected() {
        for c in ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"] {
            assert_eq!(env(&[("CNI_COMMAND", c)]).command().unwrap().as_str(), c);
        }
        assert_eq!(
            env(&[("CNI_COMMAND", "add")]).command(),
            Err(EnvError::UnknownCommand("add".into()))
        );
        assert_eq!(
            env(&[]).command(),
            Err(EnvError::Missing(vec!["CNI_COMMAND"]))
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "")]).command(),
            Err(EnvError::Missing(vec!["CNI_COMMAND"]))
        );
    }

    #[test]
    fn non_utf8_variables_are_rejected() {
        use std::os::unix::ffi::OsStringExt;
        let err = CniEnv::from_lookup(|name| {
            (name == "CNI_IFNAME").then(|| OsString::from_vec(vec![0x65, 0xff]))
        })
        .unwrap_err();
        assert_eq!(err, EnvError::NotUtf8("CNI_IFNAME"));
    }

    #[test]
    fn add_needs_container_id_netns_and_ifname() {
        let err = env(&[("CNI_COMMAND", "ADD")])
            .attachment(Command::Add)
            .unwrap_err();
        assert_eq!(
            err,
            EnvError::Missing(vec!["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
        );
        let err = env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")])
            .attachment(Command::Check)
            .unwrap_err();
        assert_eq!(err, EnvError::Missing(vec!["CNI_NETNS"]));
        assert!(err.to_string().contains("CNI_NETNS"));
    }

    #[test]
    fn del_works_without_netns() {
        let a = env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")])
            .attachment(Command::Del)
            .unwrap();
        assert_eq!(a.id, AttachmentId::new("c1", "eth0"));
        assert_eq!(a.netns, None);
        assert_eq!(a.pod, None);
    }

    #[test]
    fn attachment_reads_pod_from_cni_args() {
        let a = env(&[
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc"),
        ])
        .attachment(Command::Add)
        .unwrap();
        assert_eq!(a.netns.as_deref(), Some("/run/netns/x"));
        assert_eq!(
            a.pod,
            Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into()
            })
        );
    }

    #[test]
    fn container_id_rules() {
        for good in ["a", "0", "abc-DEF_1.2", "f3a9c2d1e4b5"] {
            assert!(validate_container_id(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "_a", ".a", "a/b", "a b", "a:b", "é"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ifname_rules() {
        for good in ["eth0", "a", "net1", "123456789012345", "eth-0.1_x"] {
            assert!(validate_ifname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "1234567890123456",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\nb",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cni_args_parsing() {
        assert_eq!(parse_pod_ref("").unwrap(), None);
        assert_eq!(
            parse_pod_ref("K8S_POD_NAME=web").unwrap(),
            None,
            "namespace missing"
        );
        assert_eq!(
            parse_pod_ref("K8S_POD_NAMESPACE=;K8S_POD_NAME=web").unwrap(),
            None
        );
        assert_eq!(
            parse_pod_ref("K8S_POD_NAME=web;K8S_POD_NAMESPACE=ns;").unwrap(),
            Some(PodRef {
                namespace: "ns".into(),
                name: "web".into()
            })
        );
        assert_eq!(
            parse_pod_ref("K8S_POD_NAMESPACE=ns;oops").unwrap_err(),
            EnvError::InvalidArgs("oops".into())
        );
        // A value may itself contain '='.
        assert_eq!(
            parse_pod_ref("K8S_POD_NAMESPACE=a=b;K8S_POD_NAME=c")
                .unwrap()
                .unwrap()
                .namespace,
            "a=b"
        );
    }

    #[test]
    fn env_errors_are_code_4() {
        let err = CniError::from(EnvError::InvalidArgs("x".into()));
        assert_eq!(err.code.number(), 4);
    }
}
