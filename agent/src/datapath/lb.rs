//! Services in eBPF seen from user space: the garbage collection of the tables the datapath
//! fills, `lb_flows` and `lb_affinity` (see `myelin_common::lb`). The agent writes
//! `lb_services` through its reconciler (`super::table`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use myelin_common::{
    lb::{LB_IN, LB_OUT, LbAffinity, LbAffinityKey, LbEntry, LbFlow, LbFlowKey, LbKey},
    maps,
    proto::IPPROTO_UDP,
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

/// The pinned `lb_flows` map: both directions of every translated connection; and
/// `lb_services` beside it, which [`LbFlowTable::forget_udp_flows`] checks a flow against.
pub struct LbFlowTable {
    map: BpfHashMap<MapData, LbFlowKey, LbFlow>,
    services: BpfHashMap<MapData, LbKey, LbEntry>,
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

/// A UDP frontend and one of its backends, as the maps hold them: (frontend, frontend port,
/// backend, backend port), ports in network byte order.
pub type UdpPair = ([u8; 4], u16, [u8; 4], u16);

/// Every UDP (frontend, backend) pair of the `lb_services` slots.
pub fn udp_pairs(slots: &BTreeMap<LbKey, LbEntry>) -> BTreeSet<UdpPair> {
    slots
        .iter()
        .filter(|(k, _)| k.slot != 0 && k.protocol == IPPROTO_UDP)
        .map(|(k, e)| (k.addr, k.port, e.backend, e.backend_port))
        .collect()
}

/// The (frontend, backend) pair the entry `e` of `key` translates between, when it is a UDP
/// flow's: the client's entry (`out`: frontend -> backend) or the backend's (`in`: backend ->
/// frontend).
fn udp_pair(key: &LbFlowKey, e: &LbFlow) -> Option<UdpPair> {
    if key.protocol != IPPROTO_UDP {
        return None;
    }
    match key.direction {
        LB_OUT => Some((key.daddr, key.dport, e.addr, e.port)),
        LB_IN => Some((e.addr, e.port, key.saddr, key.sport)),
        _ => None,
    }
}

/// Whether `lb_services` holds `pair` now: its frontend, and its backend in one of the slots
/// `1..=count` the datapath picks from. A failed lookup counts as not held (the flow then
/// gets a backend of today's slots with its next datagram).
fn serves(services: &BpfHashMap<MapData, LbKey, LbEntry>, pair: &UdpPair) -> bool {
    let &(addr, port, backend, backend_port) = pair;
    let frontend = LbKey {
        addr,
        port,
        protocol: IPPROTO_UDP,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    };
    let Ok(service) = services.get(&frontend, 0) else {
        return false;
    };
    (1..=service.count).any(|slot| {
        services
            .get(&LbKey { slot, ..frontend }, 0)
            .is_ok_and(|e| e.backend == backend && e.backend_port == backend_port)
    })
}

/// The pinned `lb_services` map beside the table pinned at `pin`.
fn open_services(pin: &Path) -> Result<BpfHashMap<MapData, LbKey, LbEntry>, TableError> {
    let err = |source| TableError::Map {
        map: maps::LB_SERVICES,
        source,
    };
    let data = MapData::from_pin(pin.with_file_name(maps::LB_SERVICES)).map_err(err)?;
    BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(err)
}

/// The UDP flows [`LbFlowTable::forget_udp_flows`] removes.
#[derive(Debug)]
pub enum StaleUdpFlows {
    /// Those between these pairs (the ones a reconciliation took out of `lb_services`).
    To(BTreeSet<UdpPair>),
    /// Those between any other pairs than these (all `lb_services` holds: after a restart,
    /// whatever went while the agent was down).
    NotTo(BTreeSet<UdpPair>),
}

impl StaleUdpFlows {
    fn covers(&self, pair: &UdpPair) -> bool {
        match self {
            Self::To(pairs) => pairs.contains(pair),
            Self::NotTo(pairs) => !pairs.contains(pair),
        }
    }
}

impl LbFlowTable {
    /// Removes both entries of every `stale` UDP flow: one a frontend no longer sends to its
    /// backend, so that the flow's next datagram gets a backend of today's slots instead of
    /// going on to one that left (kube-proxy deletes the conntrack entries of such flows for
    /// the same reason: a DNS client's socket keeps its tuple, and its flow never expires while
    /// it sends). TCP flows are left to drain. Returns how many entries went.
    ///
    /// `stale` was decided when the agent changed the slots; this runs later, on a thread of
    /// its own, while the datapath goes on making flows. So a flow goes only if `lb_services`
    /// does not hold its pair now either: a pair taken out and put back in between, or one a
    /// later change added (a first sync's `NotTo` covers every pair it did not know), keeps
    /// its flows.
    pub fn forget_udp_flows(&mut self, stale: &StaleUdpFlows) -> Result<usize, TableError> {
        let map_err = |source| TableError::Map {
            map: maps::LB_FLOWS,
            source,
        };
        let keys: Vec<LbFlowKey> = self.map.keys().collect::<Result<_, _>>().map_err(map_err)?;
        let mut removed = 0;
        for key in keys.iter().filter(|k| k.protocol == IPPROTO_UDP) {
            // Gone already (expired, evicted) is fine.
            if let Ok(e) = self.map.get(key, 0)
                && udp_pair(key, &e)
                    .is_some_and(|pair| stale.covers(&pair) && !serves(&self.services, &pair))
                && self.map.remove(key).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Expiring for LbFlowTable {
    const MAP: &'static str = maps::LB_FLOWS;

    fn open(pin: &Path) -> Result<Self, TableError> {
        Ok(Self {
            map: open_lru(Self::MAP, pin)?,
            services: open_services(pin)?,
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
        Ok(Self {
            map: open_lru(Self::MAP, pin)?,
            services: open_services(pin)?,
        })
    }

    fn collect_garbage(&mut self) -> Result<Sweep, TableError> {
        let Self { map, services } = self;
        collect_expired(map, Self::MAP, |k, a| {
            affinity_expires_ns(services, k, a.used_ns)
        })
    }
}

#[cfg(test)]
mod tests {
    use myelin_common::proto::IPPROTO_TCP;

    use super::*;

    const FRONTEND: [u8; 4] = [10, 96, 0, 10];
    const GONE: [u8; 4] = [10, 244, 1, 7];
    const STAYS: [u8; 4] = [10, 244, 1, 8];
    const CLIENT: [u8; 4] = [10, 244, 0, 5];
    const PORT: u16 = 53u16.to_be();
    const TARGET: u16 = 5353u16.to_be();
    const CLIENT_PORT: u16 = 40000u16.to_be();

    fn slot(protocol: u8, slot: u16, backend: [u8; 4]) -> (LbKey, LbEntry) {
        let key = LbKey {
            addr: FRONTEND,
            port: PORT,
            protocol,
            _pad0: 0,
            slot,
            _pad1: 0,
        };
        let entry = LbEntry {
            backend,
            backend_port: TARGET,
            count: if slot == 0 { 2 } else { 0 },
            ..LbEntry::default()
        };
        (key, entry)
    }

    /// The entries of a flow from `CLIENT` through the frontend to `backend`.
    fn flow(protocol: u8, backend: [u8; 4]) -> [(LbFlowKey, LbFlow); 2] {
        let entry = |addr, port| LbFlow {
            expires_ns: 1,
            addr,
            port,
            flags: 0,
        };
        let out = LbFlowKey {
            saddr: CLIENT,
            daddr: FRONTEND,
            sport: CLIENT_PORT,
            dport: PORT,
            protocol,
            direction: LB_OUT,
            _pad: 0,
        };
        let back = LbFlowKey {
            saddr: backend,
            daddr: CLIENT,
            sport: TARGET,
            dport: CLIENT_PORT,
            protocol,
            direction: LB_IN,
            _pad: 0,
        };
        [(out, entry(backend, TARGET)), (back, entry(FRONTEND, PORT))]
    }

    #[test]
    fn only_udp_flows_to_a_pair_that_went_are_forgotten() {
        let slots: BTreeMap<LbKey, LbEntry> = [
            slot(IPPROTO_UDP, 0, [0; 4]),
            slot(IPPROTO_UDP, 1, GONE),
            slot(IPPROTO_UDP, 2, STAYS),
            slot(IPPROTO_TCP, 0, [0; 4]),
            slot(IPPROTO_TCP, 1, GONE),
        ]
        .into_iter()
        .collect();
        let before = udp_pairs(&slots);
        assert_eq!(
            before,
            [
                (FRONTEND, PORT, GONE, TARGET),
                (FRONTEND, PORT, STAYS, TARGET)
            ]
            .into(),
            "UDP backend slots only, not slot 0, not TCP"
        );
        let after: BTreeSet<UdpPair> = [(FRONTEND, PORT, STAYS, TARGET)].into();
        let gone: BTreeSet<UdpPair> = before.difference(&after).copied().collect();

        let to = StaleUdpFlows::To(gone);
        let not_to = StaleUdpFlows::NotTo(after);
        for (key, entry) in flow(IPPROTO_UDP, GONE) {
            let pair = udp_pair(&key, &entry).expect("a UDP flow");
            assert!(to.covers(&pair) && not_to.covers(&pair), "{key:?}");
        }
        for (key, entry) in flow(IPPROTO_UDP, STAYS) {
            let pair = udp_pair(&key, &entry).expect("a UDP flow");
            assert!(!to.covers(&pair) && !not_to.covers(&pair), "{key:?}");
        }
        for (key, entry) in flow(IPPROTO_TCP, GONE) {
            assert_eq!(udp_pair(&key, &entry), None, "TCP flows drain");
        }
    }
}
