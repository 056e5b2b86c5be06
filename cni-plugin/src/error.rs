//! The CNI error result and the codes Myelin answers with.
//!
//! Every failure ends as one [`CniError`], printed on stdout as the specification's error object
//! `{"cniVersion", "code", "msg", "details"}` with a non-zero exit status.
//!
//! | code | meaning | when |
//! |---|---|---|
//! | 1 | incompatible CNI version | `cniVersion` missing or not one of 0.3.1, 0.4.0, 1.0.0, 1.1.0; CHECK below 0.4.0; STATUS or GC below 1.1.0 |
//! | 4 | invalid environment | `CNI_COMMAND` missing or unknown; `CNI_CONTAINERID`, `CNI_IFNAME` or `CNI_ARGS` missing or malformed; `CNI_NETNS` missing (ADD, CHECK), absent, not a network namespace, or the plugin's own |
//! | 5 | I/O failure | stdin could not be read |
//! | 6 | failed to decode | stdin is not JSON |
//! | 7 | invalid network configuration | no `name` or `type`, a key of the wrong type, an MTU out of range, a `prevResult` CHECK cannot use, GC without `cni.dev/valid-attachments` |
//! | 11 | try again later | the agent socket is absent, refuses connections or the agent did not answer in time; the agent is not ready yet. DEL only when the agent did not answer in time, or its queue could not be written: an absent agent's DELs are queued for it (`myelin_api::pending`) |
//! | 50 | plugin not available | STATUS: agent unreachable, not ready, or no free address |
//! | 100 | agent error | the agent failed or rejected a request for another reason |
//! | 101 | pod CIDR exhausted | the agent has no free address |
//! | 102 | attachment already exists | ADD for a (container id, ifname) that has an endpoint, a host veth or an interface of that name in the pod |
//! | 103 | interface setup failed | a netlink operation failed |
//! | 104 | CHECK mismatch | the pod's interface, address, routes, host veth or agent endpoint differ from the previous result |

use serde::Serialize;

/// A CNI error code (see the table in the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    IncompatibleVersion,
    InvalidEnvironment,
    IoFailure,
    DecodingFailure,
    InvalidConfig,
    TryAgainLater,
    PluginNotAvailable,
    AgentFailed,
    PodCidrExhausted,
    AttachmentExists,
    InterfaceSetup,
    CheckMismatch,
}

impl ErrorCode {
    pub fn number(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::InvalidEnvironment => 4,
            Self::IoFailure => 5,
            Self::DecodingFailure => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::PluginNotAvailable => 50,
            Self::AgentFailed => 100,
            Self::PodCidrExhausted => 101,
            Self::AttachmentExists => 102,
            Self::InterfaceSetup => 103,
            Self::CheckMismatch => 104,
        }
    }
}

/// One failed invocation: `msg` says what to do about it, `details` carries the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Keeps `cause` and its whole source chain in `details`.
    pub fn caused_by(mut self, cause: &(dyn std::error::Error + 'static)) -> Self {
        self.details = error_chain(cause);
        self
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The specification's error object for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code.number(),
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing strings and integers into a String cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }
}

/// `error: source: source ...`, so that `details` shows the root cause (errno, agent message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // thiserror messages often embed their source already; do not repeat it.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_numbers() {
        let table = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::IoFailure, 5),
            (ErrorCode::DecodingFailure, 6),
            (ErrorCode::InvalidConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::AgentFailed, 100),
            (ErrorCode::PodCidrExhausted, 101),
            (ErrorCode::AttachmentExists, 102),
            (ErrorCode::InterfaceSetup, 103),
            (ErrorCode::CheckMismatch, 104),
        ];
        for (code, number) in table {
            assert_eq!(code.number(), number, "{code:?}");
        }
    }

    #[test]
    fn error_object_has_the_spec_keys() {
        let err =
            CniError::new(ErrorCode::TryAgainLater, "the agent is down").with_details("ENOENT");
        let json: serde_json::Value = serde_json::from_str(&err.to_json("0.4.0")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "0.4.0", "code": 11, "msg": "the agent is down", "details": "ENOENT"})
        );
    }

    #[test]
    fn details_follow_the_source_chain_without_repeating() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("root cause"));
        assert_eq!(error_chain(&err), "outer: root cause");

        #[derive(Debug, thiserror::Error)]
        #[error("wrapped: {0}")]
        struct Embedding(#[source] std::io::Error);
        let err = Embedding(std::io::Error::other("root"));
        assert_eq!(error_chain(&err), "wrapped: root");
    }
}
