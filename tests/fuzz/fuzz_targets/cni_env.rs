//! The `CNI_*` environment as the plugin reads it (`CniEnv::from_lookup`, then the command and,
//! for ADD, DEL and CHECK, the attachment), from structured input: each variable absent, a
//! likely value or arbitrary bytes (not necessarily UTF-8, as an environment can hold).
#![no_main]

use std::{collections::HashMap, ffi::OsString, os::unix::ffi::OsStringExt};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use myelin_cni::{
    env::{CniEnv, Command, EnvError, MAX_IFNAME_LEN, validate_ifname},
    error::CniError,
};

#[derive(Arbitrary, Debug)]
struct Input {
    command: Var<KnownCommand>,
    container_id: Option<Vec<u8>>,
    netns: Option<Vec<u8>>,
    ifname: Var<KnownIfname>,
    args: Args,
    /// Myelin delegates to no plugin: CNI_PATH must change nothing.
    path: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum Var<T> {
    Absent,
    Known(T),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum KnownCommand {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum KnownIfname {
    Eth0,
    Net1,
    Longest,
}

/// `CNI_ARGS`: raw, or `KEY=VALUE` pairs joined with `;` as runtimes write them.
#[derive(Arbitrary, Debug)]
enum Args {
    Absent,
    Raw(Vec<u8>),
    Pairs(Vec<(ArgKey, String)>),
}

#[derive(Arbitrary, Debug)]
enum ArgKey {
    PodNamespace,
    PodName,
    IgnoreUnknown,
    Other(String),
}

impl Input {
    fn vars(&self) -> HashMap<&'static str, Vec<u8>> {
        let mut vars = HashMap::new();
        let command = match &self.command {
            Var::Absent => None,
            Var::Known(c) => Some(format!("{c:?}").to_uppercase().into_bytes()),
            Var::Raw(raw) => Some(raw.clone()),
        };
        let ifname = match &self.ifname {
            Var::Absent => None,
            Var::Known(KnownIfname::Eth0) => Some(b"eth0".to_vec()),
            Var::Known(KnownIfname::Net1) => Some(b"net1".to_vec()),
            Var::Known(KnownIfname::Longest) => Some(b"abcdefghijklmno".to_vec()),
            Var::Raw(raw) => Some(raw.clone()),
        };
        let args = match &self.args {
            Args::Absent => None,
            Args::Raw(raw) => Some(raw.clone()),
            Args::Pairs(pairs) => Some(
                pairs
                    .iter()
                    .map(|(key, value)| {
                        let key = match key {
                            ArgKey::PodNamespace => "K8S_POD_NAMESPACE",
                            ArgKey::PodName => "K8S_POD_NAME",
                            ArgKey::IgnoreUnknown => "IgnoreUnknown",
                            ArgKey::Other(other) => other,
                        };
                        format!("{key}={value}")
                    })
                    .collect::<Vec<_>>()
                    .join(";")
                    .into_bytes(),
            ),
        };
        let given = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns.clone()),
            ("CNI_IFNAME", ifname),
            ("CNI_ARGS", args),
            ("CNI_PATH", self.path.clone()),
        ];
        for (name, value) in given {
            if let Some(value) = value {
                vars.insert(name, value);
            }
        }
        vars
    }
}

fn read(vars: &HashMap<&'static str, Vec<u8>>) -> Result<CniEnv, EnvError> {
    CniEnv::from_lookup(|name| vars.get(name).map(|v| OsString::from_vec(v.clone())))
}

fn text<'a>(vars: &'a HashMap<&'static str, Vec<u8>>, name: &str) -> Option<&'a str> {
    vars.get(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty())
}

fuzz_target!(|input: Input| {
    let mut vars = input.vars();
    let env = read(&vars);
    let path = vars.remove("CNI_PATH");
    assert_eq!(read(&vars), env, "CNI_PATH {path:?} changed the result");
    let env = match env {
        Ok(env) => env,
        Err(e) => {
            assert!(matches!(e, EnvError::NotUtf8(_)), "{e:?}");
            return rejected(e);
        }
    };
    if let Err(e) = env.command() {
        rejected(e);
    }
    // Every attachment command, whatever CNI_COMMAND says: the checks differ by command.
    for command in [Command::Add, Command::Del, Command::Check] {
        let attachment = match env.attachment(command) {
            Ok(attachment) => attachment,
            Err(e) => {
                rejected(e);
                continue;
            }
        };
        let id = &attachment.id;
        assert_eq!(
            Some(id.container_id.as_str()),
            text(&vars, "CNI_CONTAINERID")
        );
        assert_eq!(Some(id.ifname.as_str()), text(&vars, "CNI_IFNAME"));
        assert_eq!(attachment.netns.as_deref(), text(&vars, "CNI_NETNS"));
        if command != Command::Del {
            assert!(attachment.netns.is_some());
        }
        // The specification's pattern, and what Linux takes as an interface name.
        let mut chars = id.container_id.chars();
        assert!(chars.next().is_some_and(|c| c.is_ascii_alphanumeric()));
        assert!(chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')));
        assert!(!id.ifname.is_empty() && id.ifname.len() <= MAX_IFNAME_LEN);
        assert!(!id.ifname.contains(['/', ':']) && !id.ifname.contains(char::is_whitespace));
        assert!(id.ifname != "." && id.ifname != "..");
        // The host side's name is derived from the attachment: always a valid one.
        let host = id.host_ifname();
        assert!(myelin_api::is_host_ifname(&host) && host.len() == MAX_IFNAME_LEN);
        assert_eq!(validate_ifname(&host), Ok(()));
        if let Some(pod) = &attachment.pod {
            assert!(!pod.namespace.is_empty() && !pod.name.is_empty());
            let args = text(&vars, "CNI_ARGS").unwrap_or_default();
            assert!(args.contains(&format!("K8S_POD_NAMESPACE={}", pod.namespace)));
            assert!(args.contains(&format!("K8S_POD_NAME={}", pod.name)));
        }
    }
});

/// Every environment error is the specification's code 4, printable as its error object.
fn rejected(e: EnvError) {
    let err = CniError::from(e);
    assert_eq!(err.code.number(), 4);
    let reply: serde_json::Value =
        serde_json::from_str(&err.to_json("1.1.0")).expect("errors are JSON");
    assert_eq!(reply["code"], 4);
}
