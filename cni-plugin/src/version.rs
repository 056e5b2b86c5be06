//! The CNI specification versions Myelin speaks, and the VERSION answer.

use std::fmt;

use serde::Serialize;

/// A specification version this plugin accepts in `cniVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Oldest first, as VERSION lists them.
    pub const SUPPORTED: [CniVersion; 4] = [Self::V0_3_1, Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];

    /// What the plugin answers with when the runtime did not say.
    pub const LATEST: CniVersion = Self::V1_1_0;

    pub fn parse(text: &str) -> Option<Self> {
        Self::SUPPORTED.into_iter().find(|v| v.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists since 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC exist since 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Results before 1.0.0 tag every IP with `"version": "4"|"6"`.
    pub fn tags_ip_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// Interfaces in results carry `mtu` since 1.1.0.
    pub fn has_interface_mtu(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The VERSION answer. `cni_version` echoes the request (the specification says "the value of
/// `cniVersion` specified on input"), even one this plugin does not support: the list tells the
/// runtime what to pick instead.
pub fn version_answer(requested: Option<&str>) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire<'a> {
        cni_version: &'a str,
        supported_versions: Vec<&'static str>,
    }
    let wire = Wire {
        cni_version: requested.unwrap_or(CniVersion::LATEST.as_str()),
        supported_versions: CniVersion::SUPPORTED.iter().map(|v| v.as_str()).collect(),
    };
    // Serializing strings into a String cannot fail.
    serde_json::to_string(&wire).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly_the_supported_versions() {
        for v in CniVersion::SUPPORTED {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        for bad in ["", "0.1.0", "0.2.0", "0.3.0", "1.0", "1.2.0", " 1.0.0"] {
            assert_eq!(CniVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn features_appear_in_the_right_versions() {
        use CniVersion::*;
        assert!(!V0_3_1.has_check() && V0_4_0.has_check() && V1_1_0.has_check());
        assert!(!V1_0_0.has_status_and_gc() && V1_1_0.has_status_and_gc());
        assert!(V0_3_1.tags_ip_version() && V0_4_0.tags_ip_version() && !V1_0_0.tags_ip_version());
        assert!(!V1_0_0.has_interface_mtu() && V1_1_0.has_interface_mtu());
    }

    #[test]
    fn version_answer_echoes_the_request_and_lists_all() {
        let json: serde_json::Value = serde_json::from_str(&version_answer(Some("0.4.0"))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        let json: serde_json::Value = serde_json::from_str(&version_answer(None)).unwrap();
        assert_eq!(json["cniVersion"], "1.1.0");
    }
}
