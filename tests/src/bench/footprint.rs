//! The agent's footprint with a large cluster in its index: an agent in Kubernetes mode
//! watching the test API server, which holds generated remote pods shaped like a real
//! cluster's (see [`generated_cluster`]).

use std::{
    thread,
    time::{Duration, Instant},
};

use super::usage::{Usage, agent_pid};
use crate::{
    NodeSpec, Result, RunPrefix,
    apiserver::{KubernetesNode, generated_cluster},
};

/// How long the first sync of a large cluster may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// What [`measure_remote_index`] found.
#[derive(Debug, Clone)]
pub struct IndexFootprint {
    pub pods: usize,
    pub namespaces: usize,
    /// From the agent's start to `ready`: everything listed, indexed and in the maps.
    pub initial_sync: Duration,
    /// CPU time the agent used from its start to `ready` (start-up included).
    pub sync_cpu: Duration,
    /// Once synced and then idle for the idle window.
    pub usage: Usage,
    /// CPU time per wall time over the idle window (1.0 = one core busy).
    pub idle_cpu_share: f64,
}

/// Starts an agent against an API server holding `pods` remote pods in `namespaces`
/// namespaces, waits for its first sync, then lets it idle for `idle` and reads its usage.
pub fn measure_remote_index(
    run: &RunPrefix,
    pods: usize,
    namespaces: usize,
    idle: Duration,
) -> Result<IndexFootprint> {
    let mut spec = NodeSpec::new("index");
    spec.echo_agent_log_on_drop = false;
    let mut knode = KubernetesNode::create(run, spec)?;
    knode
        .server()
        .store_all(generated_cluster(pods, namespaces))?;
    let started = Instant::now();
    knode.start_agent_serving()?;
    knode.wait_until_ready(SYNC_TIMEOUT)?;
    let initial_sync = started.elapsed();
    let pid = agent_pid(&knode.node().socket())?;
    let synced = Usage::of(pid)?;
    let idle_started = Instant::now();
    thread::sleep(idle);
    let usage = Usage::of(pid)?;
    let idle_cpu_share =
        usage.cpu.saturating_sub(synced.cpu).as_secs_f64() / idle_started.elapsed().as_secs_f64();
    Ok(IndexFootprint {
        pods,
        namespaces,
        initial_sync,
        sync_cpu: synced.cpu,
        usage,
        idle_cpu_share,
    })
}
