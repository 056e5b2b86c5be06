//! Services in eBPF seen from user space: the garbage collection of the tables the datapath
//! fills, `lb_flows` and `lb_affinity` (see `myelin_common::lb`). The agent writes
//! `lb_services` through its reconciler (`super::table`).

use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use myelin_common::{
    lb::{LbAffinity, LbAffinityKey, LbEntry, LbFlow, LbFlowKey, LbKey},
    maps,
};

use super::{
    conntrack::{Expiring, Sweep, collect_expired},
    table::TableError,
};

const NS_PER_SECOND: u64 = 1_000_000_000;

fn open_lru<K: aya::Pod, V: aya::Pod>(
    map: &'static str,
    pin: &Path,
) -> Result<BpfHashMap<MapData, K, V>, TableError> {
    let err = |source| TableError::Map { map, source };
    let data = MapData::from_pin(pin).map_err(err)?;
    BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(err)
}

/// The pinned `lb_flows` map: both directions of every translated connection.
pub struct LbFlowTable {
    map: BpfHashMap<MapData, LbFlowKey, LbFlow>,
}

impl LbFlowTable {
    /// `<bpffs>/myelin/lb_flows`.
    pub fn pin_path(pin_dir: &Path) -> PathBuf {
        pin_dir.join(maps::LB_FLOWS)
    }

    /// The translations the table holds: (key, entry).
    pub fn entries(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, TableError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| TableError::Map {
                map: maps::LB_FLOWS,
                source,
            })
    }
}

impl Expiring for LbFlowTable {
    const MAP: &'static str = maps::LB_FLOWS;

    fn open(pin: &Path) -> Result<Self, TableError> {
        Ok(Self {
            map: open_lru(Self::MAP, pin)?,
        })
    }

    /// Both entries of a connection carry the same expiry (refreshed together, as the NAT
    /// table's), so a sweep removes pairs.
    fn collect_garbage(&mut self) -> Result<Sweep, TableError> {
        collect_expired(&mut self.map, Self::MAP, |_, e| e.expires_ns)
    }
}

/// The pinned `lb_affinity` map, and `lb_services` beside it: an entry lives for its
/// frontend's `affinity_timeout_s` after its last use, and dies with the frontend or its
/// affinity.
pub struct LbAffinityTable {
    map: BpfHashMap<MapData, LbAffinityKey, LbAffinity>,
    services: BpfHashMap<MapData, LbKey, LbEntry>,
}

impl LbAffinityTable {
    /// `<bpffs>/myelin/lb_affinity`.
    pub fn pin_path(pin_dir: &Path) -> PathBuf {
        pin_dir.join(maps::LB_AFFINITY)
    }
}

/// When the affinity entry of `key`, last used at `used_ns`, expires: at once when its frontend
/// went or lost its affinity.
fn affinity_expires_ns(
    services: &BpfHashMap<MapData, LbKey, LbEntry>,
    key: &LbAffinityKey,
    used_ns: u64,
) -> u64 {
    let frontend = LbKey {
        addr: key.frontend,
        port: key.port,
        protocol: key.protocol,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    };
    match services.get(&frontend, 0) {
        Ok(s) if s.affinity_timeout_s != 0 => {
            used_ns.saturating_add(u64::from(s.affinity_timeout_s) * NS_PER_SECOND)
        }
        _ => 0,
    }
}

impl Expiring for LbAffinityTable {
    const MAP: &'static str = maps::LB_AFFINITY;

    fn open(pin: &Path) -> Result<Self, TableError> {
        let services = pin.with_file_name(maps::LB_SERVICES);
        let err = |source| TableError::Map {
            map: maps::LB_SERVICES,
            source,
        };
        let data = MapData::from_pin(&services).map_err(err)?;
        Ok(Self {
            map: open_lru(Self::MAP, pin)?,
            services: BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(err)?,
        })
    }

    fn collect_garbage(&mut self) -> Result<Sweep, TableError> {
        let Self { map, services } = self;
        collect_expired(map, Self::MAP, |k, a| {
            affinity_expires_ns(services, k, a.used_ns)
        })
    }
}
