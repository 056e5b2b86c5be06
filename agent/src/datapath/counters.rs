//! Per-CPU counters: per endpoint (`counters`, indexed by endpoint id) and per drop reason
//! (`drops`, indexed by reason).
//!
//! An endpoint's slot is zeroed when its id is given out and when it is taken back, so that a
//! reused id starts from zero.

use std::collections::BTreeSet;

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use myelin_common::{DropReason, EndpointCounters, drop::DropCounter, maps};

use super::table::TableError;

pub struct Counters {
    endpoints: PerCpuArray<MapData, EndpointCounters>,
    drops: PerCpuArray<MapData, DropCounter>,
    nr_cpus: usize,
    /// Ids whose slots hold live counts; `None` until the first sync, which zeroes every other
    /// slot (an earlier agent may have died between giving an id out and taking it back).
    live: Option<BTreeSet<u32>>,
}

fn aya_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> TableError {
    move |source| TableError::Map { map, source }
}

impl Counters {
    pub fn new(endpoints: aya::maps::Map, drops: aya::maps::Map) -> Result<Self, TableError> {
        let nr_cpus = nr_cpus().map_err(|(call, io_error)| TableError::Map {
            map: maps::COUNTERS,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        })?;
        Ok(Self {
            endpoints: PerCpuArray::try_from(endpoints).map_err(aya_err(maps::COUNTERS))?,
            drops: PerCpuArray::try_from(drops).map_err(aya_err(maps::DROPS))?,
            nr_cpus,
            live: None,
        })
    }

    fn zero(&mut self, id: u32) -> Result<(), TableError> {
        let zero = PerCpuValues::try_from(vec![EndpointCounters::default(); self.nr_cpus])
            .map_err(|io_error| {
                aya_err(maps::COUNTERS)(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "PerCpuValues",
                    io_error,
                }))
            })?;
        self.endpoints
            .set(id, zero, 0)
            .map_err(aya_err(maps::COUNTERS))
    }

    /// Makes the live slots exactly the given endpoint ids: new ids start at zero, ids that are
    /// no longer endpoints are zeroed, existing ones keep counting.
    pub fn sync_endpoints(&mut self, ids: &BTreeSet<u32>) -> Result<(), TableError> {
        let (stale, fresh): (Vec<u32>, Vec<u32>) = match &self.live {
            Some(live) => (
                live.difference(ids).copied().collect(),
                ids.difference(live).copied().collect(),
            ),
            // First sync: keep the slots of endpoints that survived a restart.
            None => (
                (1..self.endpoints.len())
                    .filter(|id| !ids.contains(id))
                    .collect(),
                vec![],
            ),
        };
        for id in stale.into_iter().chain(fresh) {
            self.zero(id)?;
        }
        self.live = Some(ids.clone());
        Ok(())
    }

    /// The endpoint's counters summed over CPUs (zero if it has no entry).
    pub fn endpoint(&self, id: u32) -> EndpointCounters {
        let Ok(per_cpu) = self.endpoints.get(&id, 0) else {
            return EndpointCounters::default();
        };
        per_cpu
            .iter()
            .fold(EndpointCounters::default(), |acc, c| EndpointCounters {
                rx_packets: acc.rx_packets + c.rx_packets,
                rx_bytes: acc.rx_bytes + c.rx_bytes,
                tx_packets: acc.tx_packets + c.tx_packets,
                tx_bytes: acc.tx_bytes + c.tx_bytes,
            })
    }

    /// Drops per reason, summed over CPUs, for every known reason.
    pub fn drops(&self) -> Vec<(DropReason, DropCounter)> {
        DropReason::ALL
            .iter()
            .map(|&reason| {
                let total = self
                    .drops
                    .get(&(reason as u32), 0)
                    .map(|per_cpu| {
                        per_cpu
                            .iter()
                            .fold(DropCounter::default(), |acc, c| DropCounter {
                                packets: acc.packets + c.packets,
                                bytes: acc.bytes + c.bytes,
                            })
                    })
                    .unwrap_or_default();
                (reason, total)
            })
            .collect()
    }
}
