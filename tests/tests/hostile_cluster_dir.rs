//! Whoever can write into a node's cluster directory (`--source dir:`) must not be able to
//! stall or exhaust its agent: a FIFO, a symlink to /dev/zero and a deeply nested YAML file are
//! each refused with an error naming them, while the API, CNI ADD and /metrics go on answering.

use std::{
    fs,
    os::unix::fs::symlink,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use myelin_tests::{
    Error, Node, NodeSpec, Result, bench::usage::Usage, metrics::samples, root_test, traffic::ping,
};
use nix::{sys::stat::Mode, unistd::mkfifo};

/// What an API call, a scrape or a CNI ADD may take with the hostile files in place. An idle
/// agent answers in milliseconds; the margin is for a loaded 2-CPU machine.
const PROMPT: Duration = Duration::from_secs(1);
const PROMPT_ADD: Duration = Duration::from_secs(5);

/// The agent's peak resident memory (VmHWM) may not pass this: a debug agent with two pods
/// stays far below it, and /dev/zero read to the end would pass it within a second.
const MAX_PEAK_RSS_KIB: u64 = 200 * 1024;

/// Runs `f` and fails unless it finishes within `limit`.
fn promptly<T>(what: &str, limit: Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let value = f()?;
    let took = started.elapsed();
    assert!(took < limit, "{what} took {took:?} (limit {limit:?})");
    Ok(value)
}

/// Waits until the agent's log has an error line naming each file with its reason.
fn wait_for_rejections(node: &Node, expected: &[(&Path, &str)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = node.agent_log();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(path, reason)| {
                !log.lines().any(|line| {
                    line.contains("ERROR")
                        && line.contains(&path.display().to_string())
                        && line.contains(reason)
                })
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "after 15 s the agent's log still has no error for {missing:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostile_files_in_the_cluster_dir_stall_nothing() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let cluster = node.cluster();
    let dir = cluster.path();
    let fifo = dir.join("x.yaml");
    let zero = dir.join("z.yaml");
    let nested = dir.join("nested.yaml");
    mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| Error::Io {
        context: format!("mkfifo {}", fifo.display()),
        source: e.into(),
    })?;
    symlink("/dev/zero", &zero).map_err(Error::io(format!("linking {}", zero.display())))?;
    fs::write(&nested, "[".repeat(200 * 1024))
        .map_err(Error::io(format!("writing {}", nested.display())))?;

    // The scans these changes trigger run meanwhile: the API keeps answering throughout.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        promptly("GET /v1/status", PROMPT, || node.status())?;
        thread::sleep(Duration::from_millis(100));
    }
    wait_for_rejections(
        &node,
        &[
            (&fifo, "not a regular file but a FIFO"),
            (&zero, "not a regular file but a character device"),
            (&nested, "nesting deeper than 64 levels"),
        ],
    )?;

    // With them still there: CNI ADD through the real plugin, traffic, a scrape.
    let a = promptly("CNI ADD of pod a", PROMPT_ADD, || {
        node.add_pod("default", "a")
    })?;
    let b = promptly("CNI ADD of pod b", PROMPT_ADD, || {
        node.add_pod("default", "b")
    })?;
    ping(&a, &b)?;
    let (status, body) = promptly("GET /metrics", PROMPT, || node.metrics_get("/metrics"))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(samples(&body).get("myelin_endpoints"), Some(&2.0), "{body}");
    promptly("GET /v1/status", PROMPT, || node.status())?;

    let usage = Usage::of(node.agent_pid().expect("the agent runs"))?;
    assert!(
        usage.peak_rss_kib < MAX_PEAK_RSS_KIB,
        "the agent's peak RSS is {} KiB",
        usage.peak_rss_kib
    );

    node.delete_pod(a)?;
    node.delete_pod(b)?;
    // With the FIFO still in place, the agent stops on SIGTERM (no thread is stuck in it) and
    // the node's dir goes with the guard.
    node.stop_agent()
}
