//! CNI ADD latency while the agent is busy elsewhere: a full conntrack table being collected
//! and a large cluster being relisted, against the same agent idle. What an owner of the
//! agent's state that never makes an ADD wait behind background work should show.
//!
//! One node whose agent watches the test API server, which holds `pods` generated pods;
//! `conntrack` live entries are written into the pinned conntrack map. Each repetition runs
//! both phases, in rotating order, each on a freshly started agent:
//! - idle: conntrack GC every hour (not during the phase), no relist;
//! - loaded: conntrack GC every second (each pass walks every entry), and every
//!   `relist_every` the API server cuts the watches and answers their resumption with 410 Gone,
//!   so that the agent lists every kind again, the way it does after an API server restart or
//!   a compaction.
//!
//! In both, `adds` pods are added and deleted one by one through the plugin, their Pod
//! objects stored before the phase's agent starts (as the scheduler and kubelet store them
//! before the runtime calls CNI; a watch kept cut would otherwise make every ADD wait for its
//! object); only ADDs are timed (spawn to exit of the plugin).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};

use crate::{
    Error, NodeSpec, Result, RunPrefix,
    apiserver::{KubernetesNode, Resource, generated_cluster},
    cluster::{namespace_object, pod_object},
};

/// What one [`measure`] found: ADD times in ms per phase, in order, and what the load did.
#[derive(Debug, Clone, Default)]
pub struct AddUnderLoad {
    pub idle_ms: Vec<Vec<f64>>,
    pub loaded_ms: Vec<Vec<f64>>,
    /// Pod lists the API server answered during the loaded phases (every page counts).
    pub pod_lists: u64,
    /// Entries in the conntrack map at the end.
    pub conntrack_entries: usize,
}

/// The phases of one repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Loaded,
}

pub struct Config {
    pub pods: usize,
    pub namespaces: usize,
    pub conntrack: usize,
    pub adds: usize,
    pub reps: usize,
    pub relist_every: Duration,
    pub binaries: Option<crate::Binaries>,
}

pub fn measure(run: &RunPrefix, config: &Config) -> Result<AddUnderLoad> {
    const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
    let mut spec = NodeSpec::new("load");
    spec.binaries = config.binaries.clone();
    spec.echo_agent_log_on_drop = false;
    let mut knode = KubernetesNode::create(run, spec)?;
    knode
        .server()
        .store_all(generated_cluster(config.pods, config.namespaces))?;
    knode.server().apply(namespace_object("load", &[]))?;
    fill_conntrack(&knode.node().pinned_map("conntrack"), config.conntrack).or_else(|_| {
        // The map exists once an agent has run: start one to create it.
        knode.start_agent()?;
        knode.stop_agent()?;
        fill_conntrack(&knode.node().pinned_map("conntrack"), config.conntrack)
    })?;

    let mut out = AddUnderLoad::default();
    let mut next_pod = 0;
    for rep in 0..config.reps {
        let order = if rep % 2 == 0 {
            [Phase::Idle, Phase::Loaded]
        } else {
            [Phase::Loaded, Phase::Idle]
        };
        for phase in order {
            let gc = match phase {
                Phase::Idle => "1h",
                Phase::Loaded => "1s",
            };
            *knode.node_mut().agent_args_mut() = vec!["--conntrack-gc-interval".into(), gc.into()];
            // The phase's pods exist before the agent starts, so that no ADD waits for its Pod
            // object to come through a watch that the load keeps cutting.
            let names: Vec<String> = (next_pod..next_pod + config.adds)
                .map(|i| format!("p{i}"))
                .collect();
            next_pod += config.adds;
            for name in &names {
                knode.server().apply(pod_object(
                    knode.node().name(),
                    "load",
                    name,
                    &[("app", "load")],
                    &[],
                ))?;
            }
            knode.start_agent()?;
            knode.wait_until_ready(SYNC_TIMEOUT)?;
            let lists_before = knode.server().stats(Resource::Pod).lists;
            let stop = AtomicBool::new(false);
            let samples = thread::scope(|scope| -> Result<Vec<f64>> {
                if phase == Phase::Loaded {
                    let server = knode.server();
                    let stop = &stop;
                    scope.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            server.expire_watches();
                            thread::sleep(config.relist_every);
                        }
                    });
                    // Let the first relist and GC pass begin.
                    thread::sleep(Duration::from_millis(1500));
                }
                let timed = time_adds(&knode, &names);
                stop.store(true, Ordering::Relaxed);
                timed
            })?;
            if phase == Phase::Loaded {
                out.pod_lists += knode.server().stats(Resource::Pod).lists - lists_before;
                out.loaded_ms.push(samples);
            } else {
                out.idle_ms.push(samples);
            }
            knode.stop_agent()?;
            for name in &names {
                knode.server().delete(Resource::Pod, "load", name)?;
            }
        }
    }
    out.conntrack_entries = count_conntrack(&knode.node().pinned_map("conntrack"))?;
    Ok(out)
}

/// ADD then DEL of each pod; the ADD times in ms.
fn time_adds(knode: &KubernetesNode, names: &[String]) -> Result<Vec<f64>> {
    let node = knode.node();
    let mut samples = Vec::with_capacity(names.len());
    for name in names {
        let sandbox = node.sandbox("load", name)?;
        let out = node.cni(&node.cni_call("ADD", &sandbox))?;
        if !out.success() {
            return Err(Error::Cni {
                command: "ADD".into(),
                what: format!("failed for pod {name} under load"),
                output: out.to_string(),
            });
        }
        samples.push(out.elapsed.as_secs_f64() * 1000.0);
        let del = node.cni(&node.cni_call("DEL", &sandbox))?;
        if !del.success() {
            return Err(Error::Cni {
                command: "DEL".into(),
                what: format!("failed for pod {name} under load"),
                output: del.to_string(),
            });
        }
    }
    Ok(samples)
}

fn conntrack_map(pin: &std::path::Path) -> Result<BpfHashMap<MapData, [u8; 16], [u8; 16]>> {
    let data = MapData::from_pin(pin)
        .map_err(|e| Error::Cluster(format!("opening {}: {e}", pin.display())))?;
    BpfHashMap::try_from(Map::LruHashMap(data))
        .map_err(|e| Error::Cluster(format!("the conntrack map: {e}")))
}

/// Writes `n` live flows between made-up addresses (10.200.0.0/16 to 10.201.0.0/16, TCP) into
/// the conntrack map, expiring in six hours, as a busy node's table holds them.
fn fill_conntrack(pin: &std::path::Path, n: usize) -> Result<()> {
    let mut map = conntrack_map(pin)?;
    let expires = monotonic_ns() + 6 * 3600 * 1_000_000_000;
    for i in 0..n as u32 {
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&[10, 200, (i >> 8) as u8, i as u8]);
        key[4..8].copy_from_slice(&[10, 201, (i >> 16) as u8, 1]);
        key[8..10].copy_from_slice(&(40_000u16 + (i % 20_000) as u16).to_be_bytes());
        key[10..12].copy_from_slice(&80u16.to_be_bytes());
        key[12] = 6;
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&expires.to_ne_bytes());
        map.insert(key, value, 0)
            .map_err(|e| Error::Cluster(format!("filling the conntrack map: {e}")))?;
    }
    Ok(())
}

fn count_conntrack(pin: &std::path::Path) -> Result<usize> {
    Ok(conntrack_map(pin)?.keys().filter(|k| k.is_ok()).count())
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::root_test;

    /// The measurement on a small scale: it adds pods through both phases, the load really
    /// relists and the conntrack entries stay (GC keeps live flows).
    #[test]
    fn adds_are_timed_idle_and_under_load() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let config = Config {
            pods: 200,
            namespaces: 20,
            conntrack: 2_000,
            adds: 3,
            reps: 1,
            relist_every: Duration::from_millis(1500),
            binaries: None,
        };
        let started = Instant::now();
        let m = measure(&run, &config)?;
        assert_eq!(m.idle_ms.len(), 1);
        assert_eq!(m.loaded_ms[0].len(), 3);
        assert!(m.idle_ms[0].iter().all(|ms| *ms > 0.0));
        assert!(m.pod_lists >= 2, "the load relisted pods: {m:?}");
        assert_eq!(m.conntrack_entries, 2_000);
        assert!(started.elapsed() < Duration::from_secs(120));
        Ok(())
    }
}
