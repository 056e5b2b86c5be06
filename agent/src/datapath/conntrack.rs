//! The conntrack table seen from user space: listing and garbage collection. Both walk a map of
//! up to `--max-conntrack` entries one syscall at a time, so they never run on the task that owns
//! the agent's state: each opens the pinned map on its own thread and the owner never waits.
//! The collector paces itself so that a sweep of a full table never holds a CPU for long.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
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

    /// Removes expired entries; returns how many. The keys are read first (deleting the key a
    /// walk stands on makes the kernel restart the walk), then looked up and removed in
    /// batches with a pause between them. An entry refreshed meanwhile is looked up again
    /// just before its removal, so a live flow is never cut.
    pub fn collect_garbage(&mut self) -> Result<usize, TableError> {
        let keys: Vec<CtKey> = self.map.keys().collect::<Result<_, _>>().map_err(map_err)?;
        let mut removed = 0;
        for batch in keys.chunks(GC_BATCH) {
            let now = monotonic_ns();
            for key in batch {
                // Gone already (LRU eviction, or the datapath removed it) is fine.
                if let Ok(entry) = self.map.get(key, 0)
                    && entry.expires_ns < now
                    && self.map.remove(key).is_ok()
                {
                    removed += 1;
                }
            }
            thread::sleep(GC_PAUSE);
        }
        Ok(removed)
    }
}

/// Collects expired conntrack entries every `interval` on a thread of its own, until the process
/// ends. A map that cannot be opened is retried at the next interval.
pub fn spawn_collector(pin: PathBuf, interval: Duration) -> std::io::Result<()> {
    thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            crate::priority::background_thread();
            let mut table = None;
            loop {
                thread::sleep(interval);
                if table.is_none() {
                    table = ConntrackTable::open(&pin)
                        .inspect_err(|e| warn!(error = %e, "opening the conntrack map for GC"))
                        .ok();
                }
                let Some(t) = table.as_mut() else { continue };
                match t.collect_garbage() {
                    Ok(0) => {}
                    Ok(n) => debug!(removed = n, "conntrack garbage collected"),
                    Err(e) => warn!(error = %e, "conntrack garbage collection failed"),
                }
            }
        })
        .map(drop)
}
