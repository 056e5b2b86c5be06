//! Per-CPU counters: per endpoint (`counters`) and per drop reason (`drops`).
//!
//! The datapath only increments entries that exist, so the agent owns their lifetime: it creates
//! a zeroed entry with each endpoint and removes it with the endpoint.

use std::collections::BTreeSet;

use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use myelin_common::{DropReason, EndpointCounters, drop::DropCounter, maps};

use super::table::TableError;

pub struct Counters {
    endpoints: PerCpuHashMap<MapData, u32, EndpointCounters>,
    drops: PerCpuArray<MapData, DropCounter>,
    nr_cpus: usize,
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
            endpoints: PerCpuHashMap::try_from(endpoints).map_err(aya_err(maps::COUNTERS))?,
            drops: PerCpuArray::try_from(drops).map_err(aya_err(maps::DROPS))?,
            nr_cpus,
        })
    }

    /// Makes the counter entries exactly the given endpoint ids: new ids start at zero, ids that
    /// are no longer endpoints are removed, existing ones keep counting.
    pub fn sync_endpoints(&mut self, ids: &BTreeSet<u32>) -> Result<(), TableError> {
        let existing: BTreeSet<u32> = self
            .endpoints
            .keys()
            .collect::<Result<_, _>>()
            .map_err(aya_err(maps::COUNTERS))?;
        for stale in existing.difference(ids) {
            match self.endpoints.remove(stale) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(aya_err(maps::COUNTERS)(e)),
            }
        }
        for id in ids.difference(&existing) {
            let zero = PerCpuValues::try_from(vec![EndpointCounters::default(); self.nr_cpus])
                .map_err(|io_error| {
                    aya_err(maps::COUNTERS)(aya::maps::MapError::SyscallError(
                        aya::sys::SyscallError {
                            call: "PerCpuValues",
                            io_error,
                        },
                    ))
                })?;
            self.endpoints
                .insert(id, zero, 0)
                .map_err(aya_err(maps::COUNTERS))?;
        }
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
