//! A private containerd (Debian's, with runc) running inside a node's network namespace, with
//! its own root, state, socket and config under a temp dir, and `ctr run --cni` wired to
//! Myelin: the runtime path of production, without Kubernetes.

use std::{
    fs::{self, OpenOptions},
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::json;
use tempfile::TempDir;

use crate::{
    Error, Result,
    cni::REFERENCE_PLUGIN_DIR,
    netns::Netns,
    node::Node,
    oci,
    process::{self, Output, wait_with_deadline},
    run::RunPrefix,
    sweep,
};

/// The containerd namespace (not a network namespace) the tests use.
pub const NAMESPACE: &str = "myelin";

/// The name of the locally built busybox image.
const BUSYBOX_IMAGE: &str = "docker.io/myelin/busybox:local";

/// Where libcni, inside ctr, looks for network configs and plugins. ctr 1.6 has no flags for
/// them, so each `ctr run --cni` gets a private mount namespace with our dirs bound over these.
const CNI_CONF_MOUNT: &str = "/etc/cni/net.d";
const CNI_BIN_MOUNT: &str = "/opt/cni/bin";

const START_TIMEOUT: Duration = Duration::from_secs(20);
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`RunningContainer::exec`] runs a command whose output `ctr` lost.
const EXEC_ATTEMPTS: usize = 3;
/// The marker [`EXEC_WRAPPER`] writes after the command's output.
const EXEC_END: &str = "\n--myelin-exec-end--\n";
/// Runs `"$@"` and then writes [`EXEC_END`], keeping the command's exit status.
const EXEC_WRAPPER: &str = "\"$@\"; status=$?; printf '\\n--myelin-exec-end--\\n'; exit $status";

/// The length of `stdout` before the end marker, `None` when the marker is missing (the
/// output was cut).
fn strip_end_marker(stdout: &[u8]) -> Option<usize> {
    stdout
        .ends_with(EXEC_END.as_bytes())
        .then(|| stdout.len() - EXEC_END.len())
}

/// What `ctr run --cni` sets up containers with: the conflist (its first network) and the
/// plugin binaries it names. The reference `loopback` is always added.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    pub conflist: serde_json::Value,
    pub plugins: Vec<PathBuf>,
}

impl CniNetwork {
    /// Myelin, talking to `node`'s agent. The conflist says 1.0.0: the libcni inside Debian's
    /// ctr 1.6 refuses results of version 1.1.0 ("unsupported CNI result version").
    pub fn myelin(node: &Node) -> Result<Self> {
        Ok(Self {
            conflist: json!({
                "cniVersion": "1.0.0",
                "name": "myelin",
                "plugins": [{ "type": "myelin", "agentSocket": node.socket() }],
            }),
            plugins: vec![node.binaries().plugin()?],
        })
    }
}

pub struct Containerd {
    node_netns: PathBuf,
    socket: PathBuf,
    daemon: Option<Child>,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd inside `node_netns` (a node's namespace); `ctr run --cni` will set up
    /// containers with `network`.
    pub fn start(run: &RunPrefix, node_netns: &Netns, network: &CniNetwork) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", run.name("containerd")))
            .tempdir()
            .map_err(Error::io("creating containerd's temp dir"))?;
        let path = dir.path().to_path_buf();
        for sub in ["root", "state", "opt", "fifo", "cni/net.d", "cni/bin"] {
            let p = path.join(sub);
            fs::create_dir_all(&p).map_err(Error::io(format!("creating {}", p.display())))?;
        }
        // Mount points for the bind mounts; on a machine without them we create them empty.
        // Nothing is ever written into them.
        for mount_point in [CNI_CONF_MOUNT, CNI_BIN_MOUNT] {
            fs::create_dir_all(mount_point)
                .map_err(Error::io(format!("creating mount point {mount_point}")))?;
        }

        let name = network.conflist["name"].as_str().unwrap_or("network");
        write(
            &path.join(format!("cni/net.d/10-{name}.conflist")),
            network.conflist.to_string(),
        )?;
        let loopback = Path::new(REFERENCE_PLUGIN_DIR).join("loopback");
        for plugin in network.plugins.iter().chain([&loopback]) {
            let file_name = plugin.file_name().unwrap_or(plugin.as_os_str());
            copy(plugin, &path.join("cni/bin").join(file_name))?;
        }

        let socket = path.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# ctr drives containers directly; the CRI plugin would watch the machine's CNI dirs.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = path.join("root").display(),
            state = path.join("state").display(),
            socket = socket.display(),
            opt = path.join("opt").display(),
        );
        let config_path = path.join("config.toml");
        write(&config_path, config)?;

        let log_path = path.join("containerd.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(Error::io("duplicating a file handle"))?;
        let mut cmd = node_netns.command("containerd")?;
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let command = process::describe(&cmd);
        let daemon = cmd
            .spawn()
            .map_err(|source| Error::Spawn { command, source })?;

        let mut containerd = Self {
            node_netns: node_netns.path(),
            socket,
            daemon: Some(daemon),
            dir,
        };
        containerd.wait_until_serving()?;
        Ok(containerd)
    }

    fn wait_until_serving(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(daemon) = self.daemon.as_mut()
                && let Ok(Some(status)) = daemon.try_wait()
            {
                self.daemon = None;
                return Err(Error::Containerd(format!(
                    "exited ({status}) while starting\n{}",
                    self.log()
                )));
            }
            let mut version = self.ctr();
            version.arg("version");
            if process::run_ok(version, Duration::from_secs(5)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Containerd(format!(
                    "not serving on {} within {START_TIMEOUT:?}\n{}",
                    self.socket.display(),
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        let path = self.dir.path().join("containerd.log");
        format!(
            "--- containerd log ---\n{}--- end of containerd log ---",
            fs::read_to_string(path).unwrap_or_default()
        )
    }

    /// `ctr` talking to this containerd, for everything that does not need CNI.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.socket).args(["-n", NAMESPACE]);
        cmd
    }

    /// `ctr` in a private mount namespace with our CNI dirs bound over libcni's defaults, and
    /// inside the node's network namespace, where the runtime runs and so the plugins do.
    fn ctr_with_cni(&self) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "mount --bind \"$1\" {CNI_CONF_MOUNT} && mount --bind \"$2\" {CNI_BIN_MOUNT} \
                 && netns=\"$3\" && shift 3 && exec nsenter --net=\"$netns\" -- \"$@\""
            ))
            .arg("myelin-ctr")
            .arg(self.dir.path().join("cni/net.d"))
            .arg(self.dir.path().join("cni/bin"))
            .arg(&self.node_netns)
            .arg("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", NAMESPACE]);
        cmd
    }

    /// Builds the busybox image with `files` added, imports it and returns its name.
    pub fn import_busybox(&self, files: &[(&str, &[u8])]) -> Result<String> {
        let tar = self.dir.path().join("busybox-oci.tar");
        oci::write_busybox_image(&tar, BUSYBOX_IMAGE, files)?;
        let mut import = self.ctr();
        import.args(["images", "import"]).arg(&tar);
        process::run_ok(import, CTR_TIMEOUT)?;
        Ok(BUSYBOX_IMAGE.to_string())
    }

    /// `ctr run --rm --cni <image> <id> <argv>` left running: ctr sets up the network (CNI
    /// ADD) before the task starts and tears it down (DEL) and removes the container once the
    /// task ends.
    pub fn start_container(
        &self,
        image: &str,
        id: &str,
        argv: &[&str],
    ) -> Result<RunningContainer<'_>> {
        self.run_container(image, id, None, argv)
    }

    /// [`Self::start_container`] with runc placing the container in the cgroup `cgroup` (a path
    /// from the cgroup root, `ctr run --cgroup`), as kubelet places a pod's containers under
    /// its pod's cgroup.
    pub fn start_container_in_cgroup(
        &self,
        image: &str,
        id: &str,
        cgroup: &str,
        argv: &[&str],
    ) -> Result<RunningContainer<'_>> {
        self.run_container(image, id, Some(cgroup), argv)
    }

    fn run_container(
        &self,
        image: &str,
        id: &str,
        cgroup: Option<&str>,
        argv: &[&str],
    ) -> Result<RunningContainer<'_>> {
        let log_path = self.dir.path().join(format!("ctr-run-{id}.log"));
        let log = fs::File::create(&log_path)
            .map_err(Error::io(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(Error::io("duplicating a file handle"))?;
        let mut cmd = self.ctr_with_cni();
        cmd.args(["run", "--rm", "--cni", "--fifo-dir"])
            .arg(self.dir.path().join("fifo"));
        if let Some(cgroup) = cgroup {
            cmd.args(["--cgroup", cgroup]);
        }
        cmd.args([image, id])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let command = process::describe(&cmd);
        let ctr_run = cmd
            .spawn()
            .map_err(|source| Error::Spawn { command, source })?;
        let mut container = RunningContainer {
            containerd: self,
            id: id.to_string(),
            ctr_run: Some(ctr_run),
            log_path,
        };
        container.wait_until_running()?;
        Ok(container)
    }

    /// `ctr run -d --cni <image> <id> <argv>`: ctr sets up the network (CNI ADD), starts the
    /// task and exits. Nothing calls DEL for such a container later: ctr only tears down the
    /// network of the containers it waits for.
    pub fn start_detached(&self, image: &str, id: &str, argv: &[&str]) -> Result<()> {
        let mut cmd = self.ctr_with_cni();
        cmd.args(["run", "-d", "--cni", "--fifo-dir"])
            .arg(self.dir.path().join("fifo"))
            .args([image, id])
            .args(argv);
        process::run_ok(cmd, CTR_TIMEOUT).map(drop)
    }

    /// Kills a container's task and removes the task and the container, as an operator
    /// cleaning up with `ctr` does; no CNI DEL is made.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        for (args, must) in [
            (&["tasks", "kill", "-s", "SIGKILL", id][..], true),
            (&["tasks", "delete", "-f", id][..], false),
            (&["containers", "delete", id][..], true),
        ] {
            let mut cmd = self.ctr();
            cmd.args(args);
            if must {
                process::run_ok(cmd, CTR_TIMEOUT)?;
            } else {
                let _ = process::run(cmd, &[], CTR_TIMEOUT);
            }
        }
        Ok(())
    }

    /// The container id ctr passes to CNI (`CNI_CONTAINERID`): `<namespace>-<id>`.
    pub fn cni_container_id(id: &str) -> String {
        format!("{NAMESPACE}-{id}")
    }

    fn remove_all_containers(&self) {
        let mut list = self.ctr();
        list.args(["containers", "list", "-q"]);
        let Ok(out) = process::run_ok(list, CTR_TIMEOUT) else {
            return;
        };
        for id in out.stdout_text().split_whitespace() {
            // Best effort, in order: each step may find its object already gone.
            for args in [
                &["tasks", "kill", "-s", "SIGKILL", id][..],
                &["tasks", "delete", "-f", id][..],
                &["containers", "delete", id][..],
            ] {
                let mut cmd = self.ctr();
                cmd.args(args);
                let _ = process::run(cmd, &[], CTR_TIMEOUT);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_containers();
        if let Some(mut daemon) = self.daemon.take() {
            let _ = kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            if !matches!(wait_with_deadline(&mut daemon, deadline), Ok(Some(_))) {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
        eprintln!("{}", self.log());
        // Shims and containers that outlived their tasks, then their mounts (rootfs
        // snapshots); the dir goes when the field drops.
        if let Err(e) = sweep::kill_processes_using(&Default::default(), &[self.dir.path().into()])
            .and_then(|_| sweep::unmount_all_under(self.dir.path()))
        {
            eprintln!("cleanup of containerd: {e}");
        }
    }
}

/// A container started by [`Containerd::start_container`], stopped on drop.
pub struct RunningContainer<'a> {
    containerd: &'a Containerd,
    id: String,
    ctr_run: Option<Child>,
    log_path: PathBuf,
}

impl RunningContainer<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What `ctr run` printed so far (the container's output and ctr's errors).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether `ctr run` is still running, i.e. the container has not ended or failed to start.
    fn is_running(&mut self) -> bool {
        self.ctr_run
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until the task runs; by then ctr has set up its network.
    fn wait_until_running(&mut self) -> Result<()> {
        let deadline = Instant::now() + CTR_TIMEOUT;
        loop {
            if !self.is_running() {
                return Err(Error::Containerd(format!(
                    "`ctr run` of {} ended before its task ran\n{}",
                    self.id,
                    self.log()
                )));
            }
            let mut list = self.containerd.ctr();
            list.args(["tasks", "list"]);
            let listed = process::run_ok(list, CTR_TIMEOUT)?.stdout_text();
            let running = listed.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.first() == Some(&self.id.as_str()) && fields.last() == Some(&"RUNNING")
            });
            if running {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Containerd(format!(
                    "task {} not running within {CTR_TIMEOUT:?}\n{}",
                    self.id,
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The IPv4 address of the container's `eth0`, as seen inside it.
    pub fn ipv4(&self) -> Result<Ipv4Addr> {
        let out = self.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        let text = out.stdout_text();
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| {
                Error::Containerd(format!("no IPv4 address on eth0 of {}: {text}", self.id))
            })
    }

    /// An HTTP/1.0 GET from inside the container with busybox `nc`; returns the raw answer.
    pub fn http_get(&self, ip: Ipv4Addr, port: u16, path: &str) -> Result<String> {
        let script = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port}");
        Ok(self.exec(&["sh", "-c", &script])?.stdout_text())
    }

    /// `ctr tasks exec` of `argv` in the running container; fails on a non-zero exit.
    ///
    /// `ctr` can lose the output of a process that exits right after writing it (containerd's
    /// copying from the exec's fifos races the exit; seen here under load: a GET through a
    /// Service came back as "", with not even a trailing `echo` of the same shell, about once
    /// in 300 execs on two busy CPUs). So the command runs under `sh`, which writes an end
    /// marker after it: output without the marker was cut, and the command (which must be
    /// harmless to repeat) runs again, up to [`EXEC_ATTEMPTS`] times.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let mut lost = Vec::new();
        for _ in 0..EXEC_ATTEMPTS {
            let exec_id = format!("exec-{}", NEXT.fetch_add(1, Ordering::Relaxed));
            let mut cmd = self.containerd.ctr();
            cmd.args(["tasks", "exec", "--exec-id", &exec_id, "--fifo-dir"])
                .arg(self.containerd.dir.path().join("fifo"))
                .arg(&self.id)
                .args(["sh", "-c", EXEC_WRAPPER, "sh"])
                .args(argv);
            let mut out = process::run_ok(cmd, CTR_TIMEOUT)?;
            match strip_end_marker(&out.stdout) {
                Some(len) => {
                    out.stdout.truncate(len);
                    return Ok(out);
                }
                None => {
                    let came = out.stdout_text();
                    eprintln!(
                        "ctr lost the output of {argv:?} in {} ({came:?} came through); again",
                        self.id
                    );
                    lost.push(came);
                }
            }
        }
        Err(Error::Containerd(format!(
            "`ctr tasks exec` of {argv:?} in {} lost its output {EXEC_ATTEMPTS} times: {lost:?}",
            self.id
        )))
    }

    /// Kills the task and waits for `ctr run` to finish its teardown (CNI DEL, container
    /// removal).
    pub fn stop(mut self) -> Result<()> {
        self.kill_and_wait()
    }

    fn kill_and_wait(&mut self) -> Result<()> {
        let Some(mut ctr_run) = self.ctr_run.take() else {
            return Ok(());
        };
        let mut kill_task = self.containerd.ctr();
        kill_task.args(["tasks", "kill", "-s", "SIGKILL", &self.id]);
        // The task may be gone already (it ended, or never started): ctr run then ends anyway.
        let _ = process::run(kill_task, &[], CTR_TIMEOUT);
        let deadline = Instant::now() + CTR_TIMEOUT;
        match wait_with_deadline(&mut ctr_run, deadline) {
            Ok(Some(_)) => Ok(()),
            _ => {
                let _ = ctr_run.kill();
                let _ = ctr_run.wait();
                Err(Error::Containerd(format!(
                    "`ctr run` of {} did not end within {CTR_TIMEOUT:?} of killing its task\n{}",
                    self.id,
                    self.log()
                )))
            }
        }
    }
}

impl Drop for RunningContainer<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_wait() {
            eprintln!("cleanup of container {}: {e}", self.id);
        }
    }
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    fs::write(path, contents).map_err(Error::io(format!("writing {}", path.display())))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).map(drop).map_err(Error::io(format!(
        "copying {} to {}",
        from.display(),
        to.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_without_the_end_marker_counts_as_cut() {
        assert_eq!(strip_end_marker(b"page\n\n--myelin-exec-end--\n"), Some(5));
        assert_eq!(strip_end_marker(b"\n--myelin-exec-end--\n"), Some(0));
        assert_eq!(strip_end_marker(b""), None);
        assert_eq!(strip_end_marker(b"page\n\n--myelin-exec-end"), None);
    }

    #[test]
    fn the_wrapper_writes_the_marker_after_the_command_and_keeps_its_status() {
        let run = |argv: &[&str]| {
            Command::new("sh")
                .args(["-c", EXEC_WRAPPER, "sh"])
                .args(argv)
                .output()
                .expect("sh runs")
        };
        let out = run(&["printf", "a b"]);
        assert_eq!(strip_end_marker(&out.stdout), Some(3));
        assert_eq!(&out.stdout[..3], b"a b");
        assert!(out.status.success());
        let out = run(&["sh", "-c", "echo x; exit 3"]);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(strip_end_marker(&out.stdout), Some(2));
    }
}
