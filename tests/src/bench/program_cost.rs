//! What the datapath's programs cost per packet, from the kernel's own accounting.
//!
//! `BPF_ENABLE_STATS` makes the kernel time every BPF program run for as long as the file
//! descriptor it returns is open; closing it (here: on drop, also on an error or a panic) turns
//! the accounting off again, so nothing is left switched on. The timing itself costs two clock
//! reads per run, so a measurement under it must not be one that ratios are taken from.

use std::{collections::HashMap, path::Path};

use aya::{
    maps::MapInfo,
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

use crate::{Error, Result};

/// One program's runs during a measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramCost {
    pub name: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// Runs `traffic` with program statistics on and returns, for each of `names`, the runs and
/// mean run time of the programs of that name that use the map pinned at `map_pin` (one
/// node's datapath, not another's that happens to be loaded). A name that did not run is
/// reported with 0 runs.
pub fn measure<T>(
    map_pin: &Path,
    names: &[&str],
    traffic: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<ProgramCost>)> {
    let map_id = MapInfo::from_pin(map_pin)
        .map_err(Error::bpf(format!("reading map {}", map_pin.display())))?
        .id();
    let _stats = enable_stats(Stats::RunTime).map_err(Error::bpf(
        "turning on BPF run-time statistics (BPF_ENABLE_STATS)",
    ))?;
    let before = snapshot(map_id, names)?;
    let out = traffic()?;
    let after = snapshot(map_id, names)?;
    let costs = names
        .iter()
        .map(|&name| {
            let (mut ns, mut runs) = (0u64, 0u64);
            for ((prog_name, id), (a_ns, a_runs)) in &after {
                if prog_name != name {
                    continue;
                }
                let (b_ns, b_runs) = before
                    .get(&(prog_name.clone(), *id))
                    .copied()
                    .unwrap_or_default();
                ns += a_ns.saturating_sub(b_ns);
                runs += a_runs.saturating_sub(b_runs);
            }
            ProgramCost {
                name: name.to_string(),
                runs,
                ns_per_run: if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                },
            }
        })
        .collect();
    Ok((out, costs))
}

/// (name, program id) -> (run time ns, run count) of the matching programs.
fn snapshot(map_id: u32, names: &[&str]) -> Result<HashMap<(String, u32), (u64, u64)>> {
    let mut found = HashMap::new();
    for info in loaded_programs() {
        let info = info.map_err(Error::bpf("listing loaded BPF programs"))?;
        let Some(name) = info.name_as_str().filter(|n| names.contains(n)) else {
            continue;
        };
        // A program that went away between listing and asking has no map ids: not ours.
        let uses_map = info
            .map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.contains(&map_id));
        if uses_map {
            found.insert(
                (name.to_string(), info.id()),
                (
                    u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    info.run_count(),
                ),
            );
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::{fs, time::Duration};

    use aya::maps::MapInfo;

    use super::{measure, snapshot};
    use crate::{
        Error, Node, NodeSpec, Result,
        bench::{cni::PodPair, tcp::tcp_rr},
        root_test,
    };

    const SWITCH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    #[test]
    fn the_datapath_programs_are_timed_while_traffic_flows_and_only_then() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let node = Node::start(&run, NodeSpec::new("cost"))?;
        let map = node.pinned_map("endpoints");
        let pair = PodPair::myelin(&run, node)?;
        let read_switch =
            || fs::read_to_string(SWITCH).map_err(Error::io(format!("reading {SWITCH}")));
        let before = read_switch()?;
        let run_for = Duration::from_millis(300);
        let (rate, costs) = measure(&map, &["from_container", "no_such_program"], || {
            tcp_rr(&pair.client, &pair.server, 11111, 1, run_for)
        })?;
        assert_eq!(read_switch()?, before, "the sysctl is left alone");

        // Every round trip is a request and an answer, both sent by a pod: at least two runs
        // of from_container (the counted window is shorter than the measure's).
        let from = &costs[0];
        let counted = (rate * run_for.as_secs_f64() * 2.0) as u64;
        assert!(
            from.runs >= counted,
            "{from:?}: fewer runs than the {counted} packets of {rate} round trips/s"
        );
        assert!(
            from.ns_per_run > 1.0 && from.ns_per_run < 100_000.0,
            "{from:?}"
        );
        assert_eq!(costs[1].runs, 0, "{:?}", costs[1]);

        // Closing the descriptor turned the timing off: more traffic adds no runs.
        if before.trim() == "0" {
            let map_id = MapInfo::from_pin(&map)
                .map_err(Error::bpf("map info"))?
                .id();
            let after = snapshot(map_id, &["from_container"])?;
            tcp_rr(
                &pair.client,
                &pair.server,
                11111,
                1,
                Duration::from_millis(100),
            )?;
            assert_eq!(snapshot(map_id, &["from_container"])?, after);
        }
        Ok(())
    }
}
