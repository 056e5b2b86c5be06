//! Myelin's container image, as `cargo xtask image` writes it (here from the binaries under
//! test): imported into a private containerd, its binaries run, and the DaemonSet's init
//! container installs the CNI plugin and conflist from it.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

use myelin_tests::{
    Binaries, Error, Netns, Result, RunPrefix,
    chart::{self, INSTALL_YAML},
    containerd::{CniNetwork, Containerd},
    oci, root_test,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Seconds any one `ctr` call may take.
const CTR_TIMEOUT_SECS: &str = "120";

/// A private containerd with Myelin's image imported, and a dir for ctr's FIFOs.
struct ImageRuntime {
    containerd: Containerd,
    image: String,
    fifo_dir: tempfile::TempDir,
    // Dropped last: containerd runs inside it.
    _node: Netns,
}

impl ImageRuntime {
    fn start(run: &RunPrefix) -> Result<Self> {
        let work = tempdir(run, "image")?;
        let tar = work.path().join("myelin.tar");
        let image = oci::default_image_reference();
        oci::write_myelin_image(&tar, &image, &Binaries::from_env()?)?;

        let node = Netns::create(run.name("node"))?;
        // Containers here never get a network: ctr runs them without --cni.
        let no_network = CniNetwork {
            conflist: json!({ "cniVersion": "1.0.0", "name": "unused", "plugins": [{ "type": "loopback" }] }),
            plugins: Vec::new(),
        };
        let containerd = Containerd::start(run, &node, &no_network)?;
        let mut import = containerd.ctr();
        import.args(["images", "import"]).arg(&tar);
        checked(import)?;
        Ok(Self {
            containerd,
            image,
            fifo_dir: tempdir(run, "fifo")?,
            _node: node,
        })
    }

    /// `ctr run --rm` of `argv` in the image to completion; `extra` goes before the image
    /// (mounts, env). Returns stdout.
    fn run(&self, id: &str, extra: &[String], argv: &[&str]) -> Result<String> {
        let mut cmd = self.containerd.ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(self.fifo_dir.path())
            .args(extra)
            .args([self.image.as_str(), id])
            .args(argv);
        checked(cmd)
    }
}

/// Runs `cmd` under coreutils' `timeout`, failing on a non-zero exit with its stderr.
fn checked(cmd: Command) -> Result<String> {
    let mut timed = Command::new("timeout");
    timed
        .args(["--kill-after=10", CTR_TIMEOUT_SECS])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let command = myelin_tests::describe(&timed);
    let out = timed.output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempdir(run: &RunPrefix, what: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{}-", run.name(what)))
        .tempdir()
        .map_err(Error::io("creating a temp dir"))
}

#[test]
fn binaries_in_the_image_run_and_print_their_version() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let runtime = ImageRuntime::start(&run)?;
    let version = env!("CARGO_PKG_VERSION");
    for (path, name) in [
        (oci::AGENT_PATH, "myelin-agent"),
        (oci::CTL_PATH, "myelinctl"),
    ] {
        let id = run.name(&format!("{name}-version"));
        let printed = runtime.run(&id, &[], &[path, "--version"])?;
        assert_eq!(printed.trim(), format!("{name} {version}"));
    }
    // The CNI plugin answers VERSION with the versions it supports. Its stdin comes from
    // /dev/null: ctr keeps a container's stdin open after its own has ended.
    let id = run.name("plugin-version");
    let script = format!("CNI_COMMAND=VERSION {} </dev/null", oci::PLUGIN_PATH);
    let printed = runtime.run(&id, &[], &["/bin/sh", "-c", &script])?;
    let answer: Value = serde_json::from_str(&printed).map_err(Error::json(format!(
        "parsing the plugin's VERSION answer {printed:?}"
    )))?;
    assert!(
        answer["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.0.0"))),
        "{answer}"
    );
    Ok(())
}

/// The init container of install.yaml, run in the image with temp dirs as the host's CNI
/// dirs: it installs a byte-identical plugin (mode 0755) and the conflist, leaves no temp
/// files, and does the same over an existing installation (an upgrade).
#[test]
fn init_container_installs_the_plugin_and_conflist_from_the_image() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let runtime = ImageRuntime::start(&run)?;
    let installer = installer_from_install_yaml();
    let script = installer["command"]
        .as_array()
        .expect("the installer has a command")
        .iter()
        .map(|a| a.as_str().expect("command arguments are strings"))
        .collect::<Vec<_>>();
    let conflist = installer["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "CNI_CONFLIST"))
        .and_then(|e| e["value"].as_str())
        .expect("the installer gets CNI_CONFLIST");

    let host = tempdir(&run, "host")?;
    let bin_dir = host.path().join("opt-cni-bin");
    let conf_dir = host.path().join("etc-cni-net.d");
    for dir in [&bin_dir, &conf_dir] {
        fs::create_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    let mut extra = Vec::new();
    for (host_dir, mount) in [(&bin_dir, "/host/cni/bin"), (&conf_dir, "/host/cni/net.d")] {
        assert!(
            installer["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["mountPath"] == mount)),
            "the installer does not mount {mount}"
        );
        extra.push("--mount".to_string());
        extra.push(format!(
            "type=bind,src={},dst={mount},options=rbind:rw",
            host_dir.display()
        ));
    }
    extra.push("--env".to_string());
    extra.push(format!("CNI_CONFLIST={conflist}"));

    let plugin = fs::read(Binaries::from_env()?.plugin()?)
        .map_err(Error::io("reading the plugin under test"))?;
    for round in ["install", "upgrade"] {
        runtime.run(&run.name(&format!("install-cni-{round}")), &extra, &script)?;
        assert_eq!(listing(&bin_dir)?, ["myelin"], "after {round}");
        assert_eq!(listing(&conf_dir)?, ["05-myelin.conflist"], "after {round}");
        let installed = bin_dir.join("myelin");
        assert!(
            read(&installed)? == plugin,
            "the installed plugin differs from the binary under test"
        );
        let mode = fs::metadata(&installed)
            .map_err(Error::io("reading the plugin's mode"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            String::from_utf8_lossy(&read(&conf_dir.join("05-myelin.conflist"))?),
            format!("{conflist}\n")
        );
    }
    Ok(())
}

fn installer_from_install_yaml() -> Value {
    let path = chart::workspace_root().join(INSTALL_YAML);
    let text = fs::read_to_string(&path).expect("reading install.yaml");
    let daemonset = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("install.yaml is YAML"))
        .find(|o| o["kind"] == "DaemonSet")
        .expect("install.yaml has a DaemonSet");
    daemonset["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "install-cni"))
        .cloned()
        .expect("the DaemonSet has the install-cni init container")
}

fn listing(dir: &Path) -> Result<Vec<String>> {
    let mut names = fs::read_dir(dir)
        .map_err(Error::io(format!("listing {}", dir.display())))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::io(format!("listing {}", dir.display())))?;
    names.sort();
    Ok(names)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(Error::io(format!("reading {}", path.display())))
}
