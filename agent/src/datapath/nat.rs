//! Masquerading seen from user space: the settings the datapath translates with, and the NAT
//! table's garbage collection (see `myelin_common::nat` for the table).
//!
//! The ports: the kernel gives the node's own connections source ports from
//! `net.ipv4.ip_local_port_range` and knows nothing of the datapath's table, so a NAT port in
//! that range could be handed to a node socket talking to the same remote address and port, and
//! that socket's replies would go to a pod. NAT ports are therefore taken above the range
//! (61000-65535 with Linux's default of 32768-60999): the node never picks them for a connect,
//! and a reply to anything below them passes the uplink without a lookup. Only a node service
//! that binds one of them explicitly can still collide. Where the range leaves fewer than
//! [`MIN_AUTO_PORTS`] ports above it, Cilium's range (32768-65535) is taken instead, and the
//! agent says so: `--nat-port-range` picks another.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use ipnet::Ipv4Net;
use myelin_common::{
    maps,
    nat::{NatEntry, NatKey},
};

use super::{
    conntrack::{Expiring, Sweep, collect_expired},
    table::TableError,
};

/// The fewest ports an automatic range may have: with fewer, a busy destination (a pod's DNS
/// resolver outside the cluster, say) runs out of ports.
pub const MIN_AUTO_PORTS: u16 = 1024;

/// Where Linux keeps the node's ephemeral port range.
pub const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Ports masquerading hands out, inclusive. Each remote (address, port, protocol) has the whole
/// range: it bounds the masqueraded flows from this node to one destination, not in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPorts {
    pub min: u16,
    pub max: u16,
}

impl NatPorts {
    /// The ports above the node's ephemeral range `local` (`ip_local_port_range`), or Cilium's
    /// range with a warning when fewer than [`MIN_AUTO_PORTS`] are left above it.
    pub fn above(local: NatPorts) -> (NatPorts, Option<String>) {
        if u32::from(u16::MAX - local.max) >= u32::from(MIN_AUTO_PORTS) {
            let ports = NatPorts {
                min: local.max + 1,
                max: u16::MAX,
            };
            return (ports, None);
        }
        let fallback = NatPorts {
            min: 32768,
            max: u16::MAX,
        };
        let warning = format!(
            "ip_local_port_range {local} leaves fewer than {MIN_AUTO_PORTS} ports above it: \
             masquerading uses {fallback}, where the node's own connections may pick a port a \
             pod's flow to the same destination holds (its replies would then go to the pod); \
             narrow ip_local_port_range or pass --nat-port-range"
        );
        (fallback, Some(warning))
    }

    /// `ip_local_port_range` as the node has it (two numbers, tab-separated).
    pub fn local_range(path: &Path) -> Result<NatPorts, NatPortsError> {
        let text = std::fs::read_to_string(path).map_err(|source| NatPortsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut numbers = text.split_whitespace().map(str::parse::<u16>);
        match (numbers.next(), numbers.next(), numbers.next()) {
            (Some(Ok(min)), Some(Ok(max)), None) if min <= max => Ok(NatPorts { min, max }),
            _ => Err(NatPortsError::Parse {
                path: path.to_path_buf(),
                text: text.trim().to_string(),
            }),
        }
    }
}

impl fmt::Display for NatPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// `--nat-port-range`: `MIN-MAX`.
impl FromStr for NatPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port range: use MIN-MAX, e.g. 61000-65535");
        let (min, max) = s.split_once('-').ok_or_else(bad)?;
        let (min, max): (u16, u16) = (
            min.parse().map_err(|_| bad())?,
            max.parse().map_err(|_| bad())?,
        );
        if min == 0 || max < min {
            return Err(format!(
                "{s:?}: the range must start at 1 or above and not end before it starts"
            ));
        }
        Ok(Self { min, max })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatPortsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {text:?}, not two port numbers")]
    Parse { path: PathBuf, text: String },
}

/// What masquerading needs besides the routing settings (`CONFIG_F_MASQUERADE` and the node's
/// address): whose packets it translates, and the ports it hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masquerade {
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Net,
    pub ports: NatPorts,
}

impl Masquerade {
    /// The CIDR's network address and mask, as the datapath compares them.
    pub(super) fn pod_cidr_words(&self) -> ([u8; 4], [u8; 4]) {
        (
            self.pod_cidr.network().octets(),
            self.pod_cidr.netmask().octets(),
        )
    }
}

/// The pinned `snat` map, opened by its path (by its collector's thread).
pub struct NatTable {
    map: BpfHashMap<MapData, NatKey, NatEntry>,
}

impl NatTable {
    /// `<bpffs>/myelin/snat`.
    pub fn pin_path(pin_dir: &Path) -> PathBuf {
        pin_dir.join(maps::SNAT)
    }

    /// The translations the table holds: (key, entry).
    pub fn entries(&self) -> Result<Vec<(NatKey, NatEntry)>, TableError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| TableError::Map {
                map: maps::SNAT,
                source,
            })
    }
}

impl Expiring for NatTable {
    const MAP: &'static str = maps::SNAT;

    fn open(pin: &Path) -> Result<Self, TableError> {
        let err = |source| TableError::Map {
            map: maps::SNAT,
            source,
        };
        let data = MapData::from_pin(pin).map_err(err)?;
        let map = BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(err)?;
        Ok(Self { map })
    }

    /// Both entries of a flow carry the same expiry (the datapath refreshes them together), so
    /// a sweep removes pairs; one it finds alone is put back, or the port given out again, by
    /// the datapath on the flow's next packet.
    fn collect_garbage(&mut self) -> Result<Sweep, TableError> {
        collect_expired(&mut self.map, Self::MAP, |_, e| e.expires_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_ports_lie_above_the_nodes_ephemeral_range() {
        let linux_default = NatPorts {
            min: 32768,
            max: 60999,
        };
        assert_eq!(
            NatPorts::above(linux_default),
            (
                NatPorts {
                    min: 61000,
                    max: 65535
                },
                None
            )
        );
    }

    #[test]
    fn a_range_up_to_the_top_falls_back_to_ciliums_with_a_warning() {
        let (ports, warning) = NatPorts::above(NatPorts {
            min: 1024,
            max: 65000,
        });
        assert_eq!(
            ports,
            NatPorts {
                min: 32768,
                max: 65535
            }
        );
        assert!(warning.unwrap().contains("--nat-port-range"));
    }

    #[test]
    fn the_flag_takes_min_dash_max() {
        assert_eq!(
            "61000-65535".parse::<NatPorts>(),
            Ok(NatPorts {
                min: 61000,
                max: 65535
            })
        );
        for bad in ["", "61000", "0-10", "10-9", "a-b", "1-70000", "1 - 2"] {
            assert!(bad.parse::<NatPorts>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_local_range_is_read_as_linux_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ip_local_port_range");
        std::fs::write(&path, "32768\t60999\n").unwrap();
        assert_eq!(
            NatPorts::local_range(&path).unwrap(),
            NatPorts {
                min: 32768,
                max: 60999
            }
        );
        std::fs::write(&path, "60999 32768\n").unwrap();
        assert!(NatPorts::local_range(&path).is_err());
    }
}
