//! What the agent promises under faults, each found by running Myelin as a user or an attacker
//! would: a stopped agent, state files lost or emptied behind its back, file descriptors
//! running out, idle and half-sent connections, a second agent on the same node, and a
//! container removed without a CNI DEL. Every test would fail on an agent without the
//! corresponding defence.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    thread,
    time::{Duration, Instant},
};

use myelin_api::AttachmentId;
use myelin_tests::{
    Node, NodeSpec, Result,
    containerd::{CniNetwork, Containerd},
    root_test,
    traffic::{Host, ping},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Sends SIGCONT to the agent when dropped, so a failing test never leaves it stopped.
struct Stopped(Pid);

impl Stopped {
    fn agent(node: &Node) -> Self {
        let pid = Pid::from_raw(node.agent_pid().expect("the agent runs") as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The agent was stopped while a runtime ran ADD; the plugin gave up (code 11) before the
/// agent continued. The agent then finds the request past its deadline and does nothing: no
/// address is kept, and the runtime's retry is not refused as "already exists".
#[test]
fn an_add_the_runtime_gave_up_on_while_the_agent_was_stopped_keeps_nothing() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let before = node.footprint()?;
    let sandbox = node.sandbox("default", "late")?;
    let stopped = Stopped::agent(&node);
    let out = node.cni(&node.cni_call("ADD", &sandbox))?;
    drop(stopped);
    assert_eq!(out.error_code(), Some(11), "{out}");

    // Once continued, the agent answers again, having skipped the stale allocation.
    assert_eq!(node.footprint()?, before);
    let pod = node.add(sandbox)?;
    assert_eq!(node.endpoints()?.len(), 1);
    node.delete_pod(pod)?;
    assert_eq!(node.footprint()?, before);
    Ok(())
}

/// Three pods, then the agent restarts with `file` of its state dir removed (or emptied).
fn restart_without(file: &str, emptied_to: Option<&str>) -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let empty = node.footprint()?;
    let pods: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| node.add_pod("default", name))
        .collect::<Result<_>>()?;
    let endpoints = node.endpoints()?;

    node.stop_agent()?;
    let path = node.dir().join("state").join(file);
    match emptied_to {
        Some(content) => fs::write(&path, content).expect("emptying the file"),
        None => fs::remove_file(&path).expect("deleting the file"),
    }
    node.start_agent()?;

    assert!(
        node.agent_log().contains(file),
        "a loud warning names {file}:\n{}",
        node.agent_log()
    );
    // The kernel is the truth: the pods keep their endpoints, addresses and network.
    let mut restored = node.endpoints()?;
    let mut expected = endpoints.clone();
    for e in restored.iter_mut().chain(expected.iter_mut()) {
        e.counters = Default::default();
        e.netns.clear();
    }
    restored.sort_by_key(|e| e.id);
    expected.sort_by_key(|e| e.id);
    assert_eq!(restored, expected);
    assert_eq!(
        node.dump_map("sock_lb_pods")?.len(),
        pods.len(),
        "each pod's network namespace cookie, which the kernel keeps, is kept"
    );
    ping(&pods[0], &pods[1])?;
    ping(&pods[2], &pods[0])?;
    // New pods get addresses no running pod holds.
    let newcomers: Vec<_> = ["d", "e", "f"]
        .iter()
        .map(|name| node.add_pod("default", name))
        .collect::<Result<_>>()?;
    for new in &newcomers {
        assert!(
            pods.iter().all(|p| p.ip() != new.ip()),
            "{} given twice",
            new.ip()
        );
        ping(new, &pods[0])?;
    }
    // And everything goes with the runtime's DELs.
    for pod in pods.into_iter().chain(newcomers) {
        node.delete_pod(pod)?;
    }
    assert_eq!(node.footprint()?, empty);
    Ok(())
}

#[test]
fn a_deleted_ipam_file_is_rebuilt_from_the_kernel_and_no_address_is_given_twice() -> Result<()> {
    restart_without("ipam.json", None)
}

#[test]
fn an_emptied_endpoints_file_is_rebuilt_from_the_kernel_and_pods_keep_their_network() -> Result<()>
{
    restart_without("endpoints.json", Some("[]"))
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    field(11) + field(12)
}

/// An agent limited to 256 open files, and 300 clients that connect and say nothing: the agent
/// neither spins nor floods its log, and a pod's ADD goes through at normal speed.
#[test]
fn idle_connections_beyond_the_fd_limit_neither_spin_the_agent_nor_lock_an_add_out() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node").agent_fd_limit(256))?;
    let pid = node.agent_pid().expect("the agent runs");
    let mut idle = Vec::new();
    for _ in 0..300 {
        // Beyond the kernel's accept queue a connect may be refused; the rest stay open.
        if let Ok(conn) = UnixStream::connect(node.socket()) {
            idle.push(conn);
        }
    }
    assert!(idle.len() >= 200, "only {} connections", idle.len());
    let log_before = node.agent_log().len();
    let ticks = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - ticks;
    // 100 ticks a second: a spinning accept loop would use about 200.
    assert!(used < 60, "the agent used {used} ticks of CPU in 2 s");

    let started = Instant::now();
    let pod = node.add_pod("default", "web")?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "ADD took {took:?}");
    let logged = node.agent_log().len() - log_before;
    assert!(
        logged < 20_000,
        "{logged} bytes of log for idle connections"
    );
    drop(idle);
    node.delete_pod(pod)
}

/// A client that never finishes its headers, and one that says nothing, are disconnected
/// within the header timeout instead of being kept for minutes.
#[test]
fn connections_that_never_finish_a_request_are_closed() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    for greeting in [&b"GET /v1/status HTTP/1.1\r\nHost:"[..], b""] {
        let mut conn = UnixStream::connect(node.socket()).expect("connect");
        conn.write_all(greeting).expect("write");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        let held = started.elapsed();
        assert!(
            held < Duration::from_secs(15),
            "a connection sending {greeting:?} was held {held:?}"
        );
    }
    Ok(())
}

/// A second agent started on the same state directory and socket exits with an error naming
/// the first, and leaves the socket alone: the first agent keeps serving.
#[test]
fn a_second_agent_on_the_same_node_exits_and_leaves_the_first_one_serving() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(&run, NodeSpec::new("node"))?;
    let first = node.agent_pid().expect("the agent runs");
    let second = node.run_second_agent(Duration::from_secs(20))?;
    assert!(!second.status.success(), "the second agent ran");
    assert!(second.status.code().is_some(), "it exited by itself");
    let said = second.stderr_text();
    assert!(
        said.contains(&format!("another myelin-agent (pid {first}) holds")),
        "{said}"
    );
    assert!(node.socket().exists());
    let pod = node.add_pod("default", "web")?;
    node.delete_pod(pod)
}

/// `ctr run -d --cni`, then the task killed and the container removed with `ctr`: no CNI DEL
/// ever comes. The veth goes with the container's network namespace; the agent notices and
/// releases the endpoint and its address after the grace period.
#[test]
fn a_container_removed_without_a_del_is_released_after_the_grace_period() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Node::start(
        &run,
        NodeSpec::new("node").agent_args(&["--endpoint-gc-interval", "2s"]),
    )?;
    let before = node.footprint()?;
    let containerd = Containerd::start(&run, node.netns(), &CniNetwork::myelin(&node)?)?;
    let image = containerd.import_busybox(&[])?;
    containerd.start_detached(&image, "detached", &["sleep", "600"])?;
    let attachment = AttachmentId::new(Containerd::cni_container_id("detached"), "eth0");
    assert!(node.footprint()?.endpoints.contains_key(&attachment));

    containerd.remove_container("detached")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = node.footprint()?;
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there 20 s after the container went: {now:?}\n{}",
            node.agent_log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*), seeded per run and printed, so that a failing
/// chaos run can be replayed with `MYELIN_CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("MYELIN_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        eprintln!("chaos seed: MYELIN_CHAOS_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// `ping -i 0.01` from `from` to `to` until stopped; the counts ping prints at the end.
struct Flow(std::process::Child);

impl Flow {
    fn start(from: &dyn Host, to: &dyn Host) -> Result<Self> {
        let mut cmd = from.netns().command("ping")?;
        cmd.args(["-n", "-q", "-i", "0.01", &to.ip().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        Ok(Self(cmd.spawn().expect("spawning ping")))
    }

    /// (transmitted, received).
    fn stop(self) -> (u64, u64) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGINT);
        let out = self
            .0
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let summary = out
            .lines()
            .find(|l| l.contains("transmitted"))
            .unwrap_or_default();
        let count = |word: &str| -> u64 {
            summary
                .split(',')
                .find(|part| part.contains(word))
                .and_then(|part| part.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (count("transmitted"), count("received"))
    }
}

/// Chaos: rounds of parallel ADDs and DELs through the real plugin while the agent is killed
/// with SIGKILL at a random moment and restarted, with a flow running between two pods
/// throughout. After every round: no address is held twice, every ADD that succeeded has its
/// endpoint, and once the runtime's DELs are done (a failed ADD is followed by a DEL, as CRI
/// does) nothing is left of them. The flow loses nothing.
#[test]
fn chaos_parallel_adds_and_dels_with_the_agent_killed_at_random_points() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    const ROUNDS: usize = 10;
    const WORKERS: usize = 4;
    const PODS_PER_WORKER: usize = 4;
    let mut rng = Rng::seeded();
    let mut node = Node::start(&run, NodeSpec::new("node"))?;
    let a = node.add_pod("default", "flow-a")?;
    let b = node.add_pod("default", "flow-b")?;
    let baseline = node.footprint()?;
    let flow = Flow::start(&a, &b)?;

    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(rng.below(300));
        let agent = Pid::from_raw(node.agent_pid().expect("the agent runs") as i32);
        let node_ref = &node;
        let added = thread::scope(|scope| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|w| {
                    scope.spawn(move || {
                        let mut added = Vec::new();
                        for p in 0..PODS_PER_WORKER {
                            let name = format!("r{round}-w{w}-p{p}");
                            let Ok(sandbox) = node_ref.sandbox("chaos", &name) else {
                                continue;
                            };
                            let out = node_ref.cni(&node_ref.cni_call("ADD", &sandbox));
                            match out {
                                // Every other pod goes again at once: DELs run alongside ADDs.
                                Ok(out) if out.success() && p % 2 == 1 => {
                                    let del = node_ref.cni(&node_ref.cni_call("DEL", &sandbox));
                                    if !del.is_ok_and(|d| d.success()) {
                                        added.push((sandbox, None));
                                    }
                                }
                                Ok(out) if out.success() => {
                                    let ip =
                                        out.json().ok().and_then(|r| myelin_tests::result_ip(&r));
                                    added.push((sandbox, ip));
                                }
                                // The runtime cleans a failed ADD up with a DEL.
                                _ => {
                                    let _ = node_ref.cni(&node_ref.cni_call("DEL", &sandbox));
                                }
                            }
                        }
                        added
                    })
                })
                .collect();
            // The kill lands somewhere among the workers' calls.
            thread::sleep(kill_after);
            let _ = kill(agent, Signal::SIGKILL);
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("worker panicked"))
                .collect::<Vec<_>>()
        });
        node.kill_agent()?;
        eprintln!(
            "round {round}: killed after {kill_after:?}; {} pods left for the final DELs",
            added.len()
        );
        node.start_agent()?;

        let footprint = node.footprint()?;
        let ips: Vec<_> = footprint.endpoints.values().collect();
        let unique: std::collections::BTreeSet<_> = ips.iter().collect();
        assert_eq!(
            unique.len(),
            ips.len(),
            "round {round}: an address twice: {footprint:?}"
        );
        for (sandbox, ip) in added.iter().filter(|(_, ip)| ip.is_some()) {
            let attachment = AttachmentId::new(sandbox.container_id(), sandbox.ifname());
            assert_eq!(
                footprint.endpoints.get(&attachment),
                ip.as_ref(),
                "round {round}: a successful ADD lost its endpoint"
            );
        }
        for (sandbox, _) in added {
            let out = node.cni(&node.cni_call("DEL", &sandbox))?;
            assert!(out.success(), "round {round}: DEL failed: {out}");
        }
        assert_eq!(
            node.footprint()?,
            baseline,
            "round {round}: something was left after the DELs\n{}",
            node.agent_log()
        );
    }
    let (sent, received) = flow.stop();
    assert!(sent > 100, "the flow ran: {sent} sent");
    assert!(
        sent - received <= 1,
        "the flow lost {} of {sent}",
        sent - received
    );
    node.delete_pod(a)?;
    node.delete_pod(b)?;
    Ok(())
}
