//! The conntrack table seen from user space: listing and garbage collection. Both walk a map of
//! up to `--max-conntrack` entries one syscall at a time, so they never run on the task that owns
//! the agent's state: each opens the pinned map on its own thread and the owner never waits.
//! The collector paces itself so that a sweep of a full table never holds a CPU for long. The
//! NAT table's collector (`super::nat`) and the Services' (`super::lb`) are the same code over
//! other maps.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData},
};
use myelin_api::TrackedFlow;
use myelin_common::{
    conntrack::{CT_F_DENIED_EGRESS, CT_F_DENIED_INGRESS, CT_F_SEEN_REPLY, CtEntry, CtKey},
    maps,
};
use tracing::{debug, warn};

use super::{monotonic_ns, table::TableError};

/// Entries looked at between two pauses of the collector.
const GC_BATCH: usize = 4096;
/// The pause: with about 2 µs of syscalls per entry, the collector takes at most ~90 % of one
/// CPU while it runs, and a full default table (131,072 entries) takes about a third of a second.
const GC_PAUSE: Duration = Duration::from_millis(1);

/// The pinned conntrack map, opened by its path.
pub struct ConntrackTable {
    map: BpfHashMap<MapData, CtKey, CtEntry>,
}

fn map_err(source: aya::maps::MapError) -> TableError {
    TableError::Map {
        map: maps::CONNTRACK,
        source,
    }
}

impl ConntrackTable {
    /// `<bpffs>/myelin/conntrack`.
    pub fn pin_path(pin_dir: &Path) -> PathBuf {
        pin_dir.join(maps::CONNTRACK)
    }

    pub fn open(pin: &Path) -> Result<Self, TableError> {
        let data = MapData::from_pin(pin).map_err(map_err)?;
        let map = BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err)?;
        Ok(Self { map })
    }

    /// Live flows, in the direction they were opened, at most `limit` of them.
    pub fn flows(&self, limit: usize) -> Result<Vec<TrackedFlow>, TableError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for entry in self.map.iter() {
            let (k, e) = entry.map_err(map_err)?;
            if e.expires_ns <= now {
                continue;
            }
            if out.len() == limit {
                break;
            }
            let protocol = crate::events::protocol_name(k.protocol);
            let endpoint = |addr: [u8; 4], port: u16| {
                crate::events::endpoint(Ipv4Addr::from(addr), u16::from_be(port), k.protocol)
            };
            out.push(TrackedFlow {
                protocol,
                src: endpoint(k.saddr, k.sport),
                dst: endpoint(k.daddr, k.dport),
                expires_in: (e.expires_ns - now) / 1_000_000_000,
                seen_reply: e.flags & CT_F_SEEN_REPLY != 0,
                denied: e.flags & (CT_F_DENIED_INGRESS | CT_F_DENIED_EGRESS) != 0,
            });
        }
        Ok(out)
    }
}

impl Expiring for ConntrackTable {
    const MAP: &'static str = maps::CONNTRACK;

    fn open(pin: &Path) -> Result<Self, TableError> {
        ConntrackTable::open(pin)
    }

    fn collect_garbage(&mut self) -> Result<Sweep, TableError> {
        collect_expired(&mut self.map, Self::MAP, |_, e| e.expires_ns)
    }
}

/// What one collection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub removed: usize,
    /// Entries left: the table's fill.
    pub kept: usize,
}

/// A pinned table whose entries carry their expiry, collected on a thread of its own.
pub trait Expiring: Sized {
    /// The map's name, for logs.
    const MAP: &'static str;
    fn open(pin: &Path) -> Result<Self, TableError>;
    /// Removes the expired entries.
    fn collect_garbage(&mut self) -> Result<Sweep, TableError>;
}

/// Removes the entries of `map` that expired by `expires_ns` (of key and value). The keys are read first
/// (deleting the key a walk stands on makes the kernel restart the walk), then looked up and
/// removed in batches with a pause between them. An entry refreshed meanwhile is looked up
/// again just before its removal, so a live flow is never cut.
pub(super) fn collect_expired<K: Pod, V: Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
    expires_ns: impl Fn(&K, &V) -> u64,
) -> Result<Sweep, TableError> {
    let map_err = |source| TableError::Map { map: name, source };
    let keys: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(map_err)?;
    let mut removed = 0;
    for batch in keys.chunks(GC_BATCH) {
        let now = monotonic_ns();
        for key in batch {
            // Gone already (LRU eviction, or the datapath removed it) is fine.
            if let Ok(entry) = map.get(key, 0)
                && expires_ns(key, &entry) < now
                && map.remove(key).is_ok()
            {
                removed += 1;
            }
        }
        thread::sleep(GC_PAUSE);
    }
    Ok(Sweep {
        removed,
        kept: keys.len() - removed,
    })
}

/// The number of entries a collector left in its table at its last sweep: the table's fill as
/// the metrics show it (counting a table of `--max-conntrack` entries takes too long for a
/// scrape). Zero until the first sweep.
#[derive(Debug, Clone, Default)]
pub struct Fill(Arc<AtomicUsize>);

impl Fill {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Collects the expired entries of the table pinned at `pin` every `interval` on a thread of its
/// own, until the process ends, and records its fill. A map that cannot be opened is retried at
/// the next interval.
pub fn spawn_collector<T: Expiring + 'static>(
    pin: PathBuf,
    interval: Duration,
    fill: Fill,
) -> std::io::Result<()> {
    thread::Builder::new()
        .name(format!("{}-gc", T::MAP))
        .spawn(move || {
            crate::priority::background_thread();
            let mut table = None;
            loop {
                thread::sleep(interval);
                if table.is_none() {
                    table = T::open(&pin)
                        .inspect_err(|e| warn!(map = T::MAP, error = %e, "opening a map for GC"))
                        .ok();
                }
                let Some(t) = table.as_mut() else { continue };
                match t.collect_garbage() {
                    Ok(sweep) => {
                        fill.0.store(sweep.kept, Ordering::Relaxed);
                        if sweep.removed > 0 {
                            debug!(map = T::MAP, removed = sweep.removed, "garbage collected");
                        }
                    }
                    Err(e) => warn!(map = T::MAP, error = %e, "garbage collection failed"),
                }
            }
        })
        .map(drop)
}
