//! The CNI result: encoding ADD's answer for each version (after what earlier plugins of a
//! chain reported), and decoding `prevResult` for CHECK.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    config::Dns,
    error::{CniError, ErrorCode},
    version::CniVersion,
};

/// What an ADD created, independent of the version it is printed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<ResultInterface>,
    pub ips: Vec<ResultIp>,
    pub routes: Vec<ResultRoute>,
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultInterface {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    /// The netns path for interfaces inside the container; `None` on the host.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultIp {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    pub interface: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultRoute {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

impl AddResult {
    /// The JSON printed on stdout for `version`. When Myelin runs after other plugins in a
    /// chain, `prev` is their result: the spec wants it passed on, so its interfaces, addresses
    /// and routes come first and ours follow.
    pub fn to_json(&self, version: CniVersion, prev: Option<&Value>) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'static str,
            interfaces: Vec<WireInterface<'a>>,
            ips: Vec<WireIp>,
            routes: Vec<WireRoute>,
            dns: &'a Dns,
        }
        #[derive(Serialize)]
        struct WireInterface<'a> {
            name: &'a str,
            mac: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            mtu: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            sandbox: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct WireIp {
            #[serde(skip_serializing_if = "Option::is_none")]
            version: Option<&'static str>,
            address: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            gateway: Option<String>,
            interface: usize,
        }
        #[derive(Serialize)]
        struct WireRoute {
            dst: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            gw: Option<String>,
        }

        let wire = Wire {
            cni_version: version.as_str(),
            interfaces: self
                .interfaces
                .iter()
                .map(|i| WireInterface {
                    name: &i.name,
                    mac: &i.mac,
                    mtu: version.has_interface_mtu().then_some(i.mtu),
                    sandbox: i.sandbox.as_deref(),
                })
                .collect(),
            ips: self
                .ips
                .iter()
                .map(|ip| WireIp {
                    version: version.tags_ip_version().then_some("4"),
                    address: ip.address.to_string(),
                    gateway: ip.gateway.map(|g| g.to_string()),
                    interface: ip.interface,
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| WireRoute {
                    dst: r.dst.to_string(),
                    gw: r.gw.map(|g| g.to_string()),
                })
                .collect(),
            dns: &self.dns,
        };
        // Only strings and integers: serializing cannot fail.
        let ours = serde_json::to_value(&wire).unwrap_or_default();
        match prev {
            Some(prev) => chain(prev, ours, version).to_string(),
            None => ours.to_string(),
        }
    }
}

/// `ours` after `prev`: interfaces, ips and routes concatenated (our `interface` indices shift
/// past the earlier ones), earlier addresses in `version`'s shape, and the earlier DNS settings
/// unless the configuration gives its own. Entries that are not objects are dropped.
fn chain(prev: &Value, mut ours: Value, version: CniVersion) -> Value {
    let list = |v: &Value, key: &str| -> Vec<Value> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter(|e| e.is_object()).cloned().collect())
            .unwrap_or_default()
    };
    let mut interfaces = list(prev, "interfaces");
    let offset = interfaces.len() as u64;
    interfaces.extend(list(&ours, "interfaces"));

    let mut ips: Vec<Value> = list(prev, "ips")
        .into_iter()
        .map(|mut ip| {
            if version.tags_ip_version() {
                let v6 = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .is_some_and(|a| a.contains(':'));
                ip["version"] = json!(if v6 { "6" } else { "4" });
            } else if let Some(fields) = ip.as_object_mut() {
                fields.remove("version");
            }
            ip
        })
        .collect();
    ips.extend(list(&ours, "ips").into_iter().map(|mut ip| {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = json!(i + offset);
        }
        ip
    }));

    let mut routes = list(prev, "routes");
    routes.extend(list(&ours, "routes"));

    let ours_dns_empty = ours
        .get("dns")
        .and_then(Value::as_object)
        .is_none_or(|d| d.is_empty());
    if ours_dns_empty && let Some(dns) = prev.get("dns").filter(|d| d.is_object()) {
        ours["dns"] = dns.clone();
    }
    ours["interfaces"] = Value::Array(interfaces);
    ours["ips"] = Value::Array(ips);
    ours["routes"] = Value::Array(routes);
    ours
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrevResultError {
    #[error("prevResult is not a CNI result: {0}")]
    Malformed(String),
    #[error("prevResult lists no interface {ifname:?} inside a sandbox")]
    NoPodInterface { ifname: String },
    #[error("prevResult has no IPv4 address for interface {ifname:?}")]
    NoAddress { ifname: String },
    #[error("prevResult has no gateway for interface {ifname:?}")]
    NoGateway { ifname: String },
}

impl From<PrevResultError> for CniError {
    fn from(e: PrevResultError) -> Self {
        CniError::new(
            ErrorCode::InvalidConfig,
            "prevResult does not describe an attachment Myelin created; pass the result of the ADD",
        )
        .with_details(e.to_string())
    }
}

/// The parts of a previous result (any supported version) that CHECK compares with reality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedPod {
    pub mac: String,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// Tolerant of every version's shape: `version` tags, `mtu`, and unknown keys are ignored.
#[derive(Deserialize)]
struct WirePrev {
    #[serde(default)]
    interfaces: Vec<WirePrevInterface>,
    #[serde(default)]
    ips: Vec<WirePrevIp>,
    #[serde(default)]
    routes: Vec<WirePrevRoute>,
}

#[derive(Deserialize)]
struct WirePrevInterface {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Deserialize)]
struct WirePrevIp {
    address: IpNet,
    gateway: Option<IpAddr>,
    interface: Option<usize>,
}

#[derive(Deserialize)]
struct WirePrevRoute {
    dst: IpNet,
    gw: Option<IpAddr>,
}

/// What the pod side of `ifname` should look like according to `prev_result`.
pub fn expected_pod(
    prev_result: &serde_json::Value,
    ifname: &str,
) -> Result<ExpectedPod, PrevResultError> {
    let prev = WirePrev::deserialize(prev_result)
        .map_err(|e| PrevResultError::Malformed(e.to_string()))?;
    let (index, interface) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == ifname && !i.sandbox.is_empty())
        .ok_or_else(|| PrevResultError::NoPodInterface {
            ifname: ifname.to_string(),
        })?;
    let (address, ip_gateway) = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(index))
        .find_map(|ip| match ip.address {
            IpNet::V4(v4) => Some((v4, ip.gateway)),
            IpNet::V6(_) => None,
        })
        .ok_or_else(|| PrevResultError::NoAddress {
            ifname: ifname.to_string(),
        })?;
    // The gateway of the IP entry, else the next hop of the IPv4 default route.
    let default_gw = prev.routes.iter().find_map(|r| match (r.dst, r.gw) {
        (IpNet::V4(dst), Some(IpAddr::V4(gw))) if dst.prefix_len() == 0 => Some(gw),
        _ => None,
    });
    let gateway = match ip_gateway {
        Some(IpAddr::V4(gw)) => Some(gw),
        _ => default_gw,
    }
    .ok_or_else(|| PrevResultError::NoGateway {
        ifname: ifname.to_string(),
    })?;
    Ok(ExpectedPod {
        mac: interface.mac.clone(),
        address,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                ResultInterface {
                    name: "lxc0123456789ab".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: 1450,
                    sandbox: None,
                },
                ResultInterface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: 1450,
                    sandbox: Some("/run/netns/pod".into()),
                },
            ],
            ips: vec![ResultIp {
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
                interface: 1,
            }],
            routes: vec![ResultRoute {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(Ipv4Addr::new(10, 244, 1, 1)),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Dns::default()
            },
        }
    }

    fn encoded(version: CniVersion) -> serde_json::Value {
        serde_json::from_str(&sample().to_json(version, None)).unwrap()
    }

    #[test]
    fn result_1_1_0_has_interface_mtu_and_no_ip_version() {
        assert_eq!(
            encoded(CniVersion::V1_1_0),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "lxc0123456789ab", "mac": "02:00:00:00:00:01", "mtu": 1450},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1450, "sandbox": "/run/netns/pod"}
                ],
                "ips": [{"address": "10.244.1.5/32", "gateway": "10.244.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
                "dns": {"nameservers": ["10.96.0.10"]}
            })
        );
    }

    #[test]
    fn a_chained_result_passes_the_earlier_plugins_entries_on() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "net1", "sandbox": "/run/netns/pod"}],
            "ips": [
                {"version": "4", "address": "192.168.5.2/24", "interface": 0},
                {"version": "6", "address": "fd00::2/64", "interface": 0}
            ],
            "routes": [{"dst": "192.168.0.0/16"}],
            "dns": {"nameservers": ["192.168.0.10"]},
            "somethingElse": true
        });
        let mut ours = sample();
        ours.dns = Dns::default();
        let json: serde_json::Value =
            serde_json::from_str(&ours.to_json(CniVersion::V1_0_0, Some(&prev))).unwrap();
        assert_eq!(
            json,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "net1", "sandbox": "/run/netns/pod"},
                    {"name": "lxc0123456789ab", "mac": "02:00:00:00:00:01"},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/pod"}
                ],
                "ips": [
                    {"address": "192.168.5.2/24", "interface": 0},
                    {"address": "fd00::2/64", "interface": 0},
                    {"address": "10.244.1.5/32", "gateway": "10.244.1.1", "interface": 2}
                ],
                "routes": [{"dst": "192.168.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
                "dns": {"nameservers": ["192.168.0.10"]}
            })
        );
        // Printed as 0.4.0, the earlier addresses get their version tags; the configuration's
        // DNS settings win over the earlier ones.
        let json: serde_json::Value =
            serde_json::from_str(&sample().to_json(CniVersion::V0_4_0, Some(&prev))).unwrap();
        assert_eq!(json["ips"][1]["version"], "6");
        assert_eq!(json["ips"][2]["version"], "4");
        assert_eq!(json["dns"], json!({"nameservers": ["10.96.0.10"]}));
    }

    #[test]
    fn result_1_0_0_has_neither_mtu_nor_ip_version() {
        let json = encoded(CniVersion::V1_0_0);
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(
            json["interfaces"][1],
            json!({"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/pod"})
        );
        assert_eq!(
            json["ips"][0],
            json!({"address": "10.244.1.5/32", "gateway": "10.244.1.1", "interface": 1})
        );
    }

    #[test]
    fn results_before_1_0_0_tag_ip_version_4() {
        for version in [CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let json = encoded(version);
            assert_eq!(json["cniVersion"], version.as_str());
            assert_eq!(
                json["ips"][0],
                json!({"version": "4", "address": "10.244.1.5/32", "gateway": "10.244.1.1", "interface": 1})
            );
            assert_eq!(
                json["interfaces"][0],
                json!({"name": "lxc0123456789ab", "mac": "02:00:00:00:00:01"})
            );
            assert_eq!(
                json["routes"],
                json!([{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}])
            );
        }
    }

    #[test]
    fn empty_dns_is_an_empty_object() {
        let mut result = sample();
        result.dns = Dns::default();
        let json: serde_json::Value =
            serde_json::from_str(&result.to_json(CniVersion::V1_0_0, None)).unwrap();
        assert_eq!(json["dns"], json!({}));
    }

    #[test]
    fn every_version_of_our_result_decodes_back() {
        for version in CniVersion::SUPPORTED {
            let expected = expected_pod(&encoded(version), "eth0").unwrap();
            assert_eq!(
                expected,
                ExpectedPod {
                    mac: "02:00:00:00:00:02".into(),
                    address: "10.244.1.5/32".parse().unwrap(),
                    gateway: Ipv4Addr::new(10, 244, 1, 1),
                },
                "{version}"
            );
        }
    }

    #[test]
    fn gateway_falls_back_to_the_default_route() {
        let prev = json!({
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/proc/1/ns/net"}],
            "ips": [
                {"address": "fd00::5/128", "interface": 0},
                {"address": "10.0.0.5/32", "interface": 0}
            ],
            "routes": [{"dst": "::/0", "gw": "fd00::1"}, {"dst": "0.0.0.0/0", "gw": "10.0.0.1"}]
        });
        let expected = expected_pod(&prev, "eth0").unwrap();
        assert_eq!(expected.address, "10.0.0.5/32".parse::<Ipv4Net>().unwrap());
        assert_eq!(expected.gateway, Ipv4Addr::new(10, 0, 0, 1));
    }

    #[test]
    fn unusable_prev_results_are_rejected_with_code_7() {
        let cases = [
            (json!({"interfaces": "x"}), "not a CNI result"),
            (
                json!({"interfaces": [{"name": "eth0", "mac": "m"}], "ips": []}),
                "no interface",
            ),
            (
                json!({"interfaces": [{"name": "eth1", "sandbox": "/n"}]}),
                "no interface",
            ),
            (
                json!({"interfaces": [{"name": "eth0", "sandbox": "/n"}],
                       "ips": [{"address": "10.0.0.5/32", "interface": 1}]}),
                "no IPv4 address",
            ),
            (
                json!({"interfaces": [{"name": "eth0", "sandbox": "/n"}],
                       "ips": [{"address": "10.0.0.5/32", "interface": 0}]}),
                "no gateway",
            ),
            (
                json!({"interfaces": [{"name": "eth0", "sandbox": "/n"}],
                       "ips": [{"address": "10.0.0.5", "interface": 0}]}),
                "not a CNI result",
            ),
        ];
        for (prev, expected) in cases {
            let err = expected_pod(&prev, "eth0").unwrap_err();
            assert!(err.to_string().contains(expected), "{prev}: {err}");
            assert_eq!(CniError::from(err).code.number(), 7);
        }
    }
}
