//! The harness itself, checked without the agent or the plugin: namespaces, the traffic
//! helpers over a bare veth pair, and the sweeper. When these fail, the other root tests'
//! failures say nothing about Myelin.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::{fs::MetadataExt, process::ExitStatusExt},
    path::Path,
    path::PathBuf,
    process::Command,
};

use myelin_tests::{
    Error, NOBODY, Netns, REFERENCE_PLUGIN_DIR, Result, as_nobody,
    containerd::{CniNetwork, Containerd},
    root_test, sweep_leftovers,
    traffic::{NetnsHost, ping, tcp_echo, udp_echo},
};

#[test]
fn netns_guard_deletes_its_namespace_on_drop() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let netns = Netns::create(run.name("guard"))?;
    let path = netns.path();
    assert!(path.exists(), "{} was not created", path.display());
    assert_eq!(netns.link_names()?, vec!["lo".to_string()]);
    drop(netns);
    assert!(!path.exists(), "{} survived its guard", path.display());
    Ok(())
}

#[test]
fn threads_and_commands_run_inside_the_namespace() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let netns = Netns::create(run.name("inside"))?;
    let expected = fs::metadata(netns.path()).map(|m| m.ino()).ok();
    let seen_by_thread = netns.run(|| {
        fs::metadata("/proc/thread-self/ns/net")
            .map(|m| m.ino())
            .ok()
    })?;
    assert_eq!(seen_by_thread, expected);
    // The calling thread itself stayed where it was.
    let own = fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .ok();
    assert_ne!(own, expected);

    let out = netns
        .command("readlink")?
        .arg("/proc/self/ns/net")
        .output()
        .map_err(Error::io("running readlink"))?;
    let link = String::from_utf8_lossy(&out.stdout);
    let inode = expected.unwrap_or_default().to_string();
    assert!(
        link.contains(&inode),
        "readlink said {link:?}, namespace inode {inode}"
    );
    Ok(())
}

#[test]
fn traffic_helpers_pass_over_a_veth_pair_and_fail_without_a_route() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let left = Netns::create(run.name("left"))?;
    let right = Netns::create(run.name("right"))?;
    left.ip(&[
        "link",
        "add",
        "veth-l",
        "type",
        "veth",
        "peer",
        "name",
        "veth-r",
        "netns",
        right.name(),
    ])?;
    left.ip(&["addr", "add", "10.250.0.1/30", "dev", "veth-l"])?;
    right.ip(&["addr", "add", "10.250.0.2/30", "dev", "veth-r"])?;
    left.ip(&["link", "set", "veth-l", "up"])?;
    right.ip(&["link", "set", "veth-r", "up"])?;
    let a = NetnsHost {
        netns: &left,
        ip: Ipv4Addr::new(10, 250, 0, 1),
    };
    let b = NetnsHost {
        netns: &right,
        ip: Ipv4Addr::new(10, 250, 0, 2),
    };

    ping(&a, &b)?;
    ping(&b, &a)?;
    tcp_echo(&a, &b, 0)?;
    tcp_echo(&b, &a, 8080)?;
    udp_echo(&a, &b, 0)?;
    udp_echo(&b, &a, 5353)?;

    // An address `left` has no route to: nothing leaves the namespace, every helper fails.
    let unroutable = NetnsHost {
        netns: &right,
        ip: Ipv4Addr::new(10, 250, 9, 9),
    };
    assert!(ping(&a, &unroutable).is_err());
    let tcp = tcp_echo(&a, &unroutable, 0).unwrap_err().to_string();
    assert!(tcp.contains("client"), "{tcp}");
    let udp = udp_echo(&a, &unroutable, 0).unwrap_err().to_string();
    assert!(udp.contains("client"), "{udp}");
    Ok(())
}

#[test]
fn sweeper_removes_what_a_killed_run_left() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    // A pid that existed and is gone: the "killed run".
    let mut gone = Command::new("true")
        .spawn()
        .map_err(Error::io("spawning true"))?;
    let dead_pid = gone.id();
    let _ = gone.wait();
    let leftover = |what: &str| format!("myelin-t{dead_pid}-1-{}-{what}", run.as_str());

    // Its guards never ran: forget them.
    let netns = Netns::create(leftover("node"))?;
    let netns_path = netns.path();
    let dir = std::env::temp_dir().join(leftover("dir"));
    let mount_point = dir.join("bpffs");
    fs::create_dir_all(&mount_point).map_err(Error::io("creating the leftover dir"))?;
    sh(&format!(
        "mount -t tmpfs leftover {}",
        mount_point.display()
    ))?;
    // An "agent" inside the namespace, and a process naming the dir on its command line.
    let mut agent = netns
        .command("sleep")?
        .arg("300")
        .spawn()
        .map_err(Error::io("spawning sleep"))?;
    // `read` rather than `sleep`: sh would exec a lone external command and the dir would
    // leave its command line before the sweep looks (a race that failed under load).
    let mut named = Command::new("sh")
        .args(["-c", "read -r _", &dir.display().to_string()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(Error::io("spawning sh"))?;
    std::mem::forget(netns);

    let report = sweep_leftovers()?;

    assert!(report.namespaces.contains(&leftover("node")), "{report:?}");
    assert!(report.dirs.contains(&dir), "{report:?}");
    assert!(!netns_path.exists(), "namespace survived the sweep");
    assert!(!dir.exists(), "dir survived the sweep");
    assert!(!is_mounted(&mount_point), "mount survived the sweep");
    for child in [&mut agent, &mut named] {
        let status = child.wait().map_err(Error::io("reaping a swept child"))?;
        assert_eq!(status.signal(), Some(9), "{status}");
    }
    Ok(())
}

/// The containerd machinery (image, private containerd, `ctr run --cni`, exec) with Debian's
/// `ptp` + `host-local` instead of Myelin.
#[test]
fn containerd_runs_busybox_containers_with_a_reference_plugin() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let node = Netns::create(run.name("ctr-node"))?;
    let ipam_dir = tempfile::Builder::new()
        .prefix(&format!("{}-", run.name("host-local")))
        .tempdir()
        .map_err(Error::io("creating host-local's data dir"))?;
    let reference = PathBuf::from(REFERENCE_PLUGIN_DIR);
    let network = CniNetwork {
        conflist: serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "ptp",
            "plugins": [{
                "type": "ptp",
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.251.0.0/24",
                    "dataDir": ipam_dir.path(),
                },
            }],
        }),
        plugins: vec![reference.join("ptp"), reference.join("host-local")],
    };
    let containerd = Containerd::start(&run, &node, &network)?;
    let page = format!("page of {}\n", run.as_str());
    let image = containerd.import_busybox(&[("www/index.html", page.as_bytes())])?;
    let server =
        containerd.start_container(&image, "server", &["httpd", "-f", "-p", "80", "-h", "/www"])?;
    let client = containerd.start_container(&image, "client", &["sleep", "600"])?;

    let server_ip = server.ipv4()?;
    assert_eq!(server_ip.octets()[..3], [10, 251, 0]);
    let answer = client.http_get(server_ip, 80, "/index.html")?;
    assert!(
        answer.contains(" 200 OK") && answer.ends_with(&page),
        "unexpected answer: {answer:?}"
    );

    server.stop()?;
    client.stop()?;
    // ctr's teardown ran DEL: host-local keeps one file per reserved address.
    let reserved: Vec<String> = fs::read_dir(ipam_dir.path().join("ptp"))
        .map_err(Error::io("listing host-local's data dir"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(
        reserved.is_empty(),
        "still reserved after DEL: {reserved:?}"
    );
    Ok(())
}

#[test]
fn as_nobody_drops_root_for_one_thread_only() -> Result<()> {
    let Some(run) = root_test()? else {
        return Ok(());
    };
    let secret = std::env::temp_dir().join(run.name("root-only"));
    fs::write(&secret, "x").map_err(Error::io("writing a root-only file"))?;
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(Error::io("chmod"))?;
    let (uid_line, read) =
        as_nobody(|| (thread_uid_line(), fs::read(&secret).map_err(|e| e.kind())))?;
    let _ = fs::remove_file(&secret);
    assert!(uid_line.contains(&NOBODY.to_string()), "{uid_line}");
    assert_eq!(read, Err(std::io::ErrorKind::PermissionDenied));
    assert!(
        thread_uid_line()
            .split_whitespace()
            .skip(1)
            .all(|id| id == "0")
    );
    Ok(())
}

/// `Uid:` of the calling thread: real, effective, saved, filesystem.
fn thread_uid_line() -> String {
    fs::read_to_string("/proc/thread-self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string()
}

fn sh(script: &str) -> Result<()> {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .map_err(Error::io(format!("running {script}")))?;
    assert!(status.success(), "`{script}` failed: {status}");
    Ok(())
}

fn is_mounted(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*path.display().to_string()))
}
