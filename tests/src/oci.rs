//! Container images built locally as OCI image layout tars, so that nothing is ever pulled from
//! a registry: one uncompressed layer, a config, a manifest and an index naming the image.
//!
//! Two images are built here: the busybox image of the e2e tests, and Myelin's own image
//! (`cargo xtask image`), which holds the release binaries, the shared libraries they link and
//! busybox for the init container's shell.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Binaries, Error, Result, process};

/// Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked into /bin: what the e2e tests run, and what the DaemonSet's init container
/// needs to install the CNI plugin (`sh`, `cp`, `chmod`, `mv`). `wget` is left out on purpose:
/// it crashes in a bare static image (no NSS files); `nc` does its job.
const APPLETS: &[&str] = &[
    "cat", "chmod", "cp", "echo", "httpd", "ip", "ls", "mv", "nc", "printf", "rm", "sh", "sleep",
];

/// Where Myelin's image has its binaries. The chart's DaemonSet and manifests/Dockerfile use
/// the same paths.
pub const AGENT_PATH: &str = "/usr/bin/myelin-agent";
pub const CTL_PATH: &str = "/usr/bin/myelinctl";
/// The CNI plugin is kept out of /opt/cni/bin in the image: the DaemonSet mounts the host's
/// /opt/cni/bin, and its init container copies the plugin there from this path.
pub const PLUGIN_PATH: &str = "/usr/lib/myelin/myelin";

/// The repository of Myelin's image; the chart's default `image.repository`.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/myelin-cni/myelin";

/// `<repository>:<workspace version>`: the name `cargo xtask image` gives the image by default,
/// and the image the chart's default values run.
pub fn default_image_reference() -> String {
    format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

const LDD_TIMEOUT: Duration = Duration::from_secs(30);

/// What a container of the image runs unless told otherwise.
#[derive(Debug, Clone, Default)]
struct ImageConfig {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
}

/// The files of one image layer, written as a tar in memory. Parent directories are added
/// before their contents, once each: tar extraction in the snapshotter does not invent them.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for Layer {
    fn default() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }
}

impl Layer {
    /// A directory (and its parents), mode 0755.
    fn dir(&mut self, path: &str) -> std::io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        append_dir(&mut self.tar, path)?;
        self.dirs.insert(path.to_string());
        Ok(())
    }

    /// A regular file at `path` (absolute or relative to the image root).
    fn file(&mut self, path: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let path = path.trim_start_matches('/');
        self.parent_dirs(path)?;
        append_file(&mut self.tar, path, contents, mode)
    }

    /// A symbolic link at `path` pointing to `target`.
    fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        let path = path.trim_start_matches('/');
        self.parent_dirs(path)?;
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_mtime(0);
        self.tar.append_link(&mut header, path, target)
    }

    fn parent_dirs(&mut self, path: &str) -> std::io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        self.tar.into_inner()
    }
}

/// A layer with Debian's static busybox as /bin/busybox, its applet links and the directories
/// a container runtime mounts over.
fn busybox_layer() -> Result<Layer> {
    let busybox = fs::read(BUSYBOX).map_err(Error::io(format!(
        "reading {BUSYBOX} (Debian package busybox-static)"
    )))?;
    busybox_layer_from(&busybox).map_err(Error::io("building the busybox layer"))
}

fn busybox_layer_from(busybox: &[u8]) -> std::io::Result<Layer> {
    let mut layer = Layer::default();
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
        layer.dir(dir)?;
    }
    layer.file("bin/busybox", busybox, 0o755)?;
    for applet in APPLETS {
        layer.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    Ok(layer)
}

/// Builds the e2e tests' busybox image at `out`, named `reference` (the index's
/// `org.opencontainers.image.ref.name`, which `ctr images import` takes as the image name),
/// with `files` (path inside the image, contents) added to the layer.
pub fn write_busybox_image(out: &Path, reference: &str, files: &[(&str, &[u8])]) -> Result<()> {
    let mut layer = busybox_layer()?;
    for (path, contents) in files {
        layer
            .file(path, contents, 0o644)
            .map_err(Error::io(format!("adding {path} to the image layer")))?;
    }
    let config = ImageConfig {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
        ..ImageConfig::default()
    };
    write_image(out, reference, layer, &config)
}

/// Builds Myelin's image at `out`, named `reference`, from the binaries in `binaries`:
/// myelin-agent and myelinctl in /usr/bin, the CNI plugin at [`PLUGIN_PATH`], the shared
/// libraries `ldd` says they load (glibc, libgcc_s: Rust links them dynamically) at the paths
/// `ldd` names, and busybox for the init container's shell.
pub fn write_myelin_image(out: &Path, reference: &str, binaries: &Binaries) -> Result<()> {
    let agent = binaries.agent()?;
    // myelinctl is a binary of the agent's crate, so it is built next to myelin-agent.
    let ctl = agent.with_file_name("myelinctl");
    if !ctl.is_file() {
        return Err(Error::MissingBinary {
            path: ctl,
            hint: "it is built with myelin-agent (`cargo build -p myelin-agent`)".into(),
        });
    }
    let sources = [
        (AGENT_PATH, agent),
        (CTL_PATH, ctl),
        (PLUGIN_PATH, binaries.plugin()?),
    ];
    let mut libraries = BTreeSet::new();
    for (_, binary) in &sources {
        libraries.extend(shared_libraries(binary)?);
    }

    let mut layer = busybox_layer()?;
    for (path, source) in &sources {
        let contents =
            fs::read(source).map_err(Error::io(format!("reading {}", source.display())))?;
        layer
            .file(path, &contents, 0o755)
            .map_err(Error::io(format!("adding {path} to the image layer")))?;
    }
    for library in &libraries {
        // Read through symlinks: the image gets the file itself at the path the loader asks
        // for, so it needs neither Debian's merged-/usr links nor an ld.so.cache.
        let contents =
            fs::read(library).map_err(Error::io(format!("reading {}", library.display())))?;
        let path = library.display().to_string();
        layer
            .file(&path, &contents, 0o755)
            .map_err(Error::io(format!("adding {path} to the image layer")))?;
    }
    let config = ImageConfig {
        entrypoint: vec![AGENT_PATH.into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        ..ImageConfig::default()
    };
    write_image(out, reference, layer, &config)
}

/// The shared libraries (and the dynamic loader) `binary` loads, as `ldd` resolves them on
/// this machine; empty for a static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = Command::new("ldd");
    cmd.arg(binary);
    let command = process::describe(&cmd);
    let out = process::run(cmd, &[], LDD_TIMEOUT)?;
    let text = out.stdout_text();
    if !out.status.success() {
        // glibc's ldd exits 1 for static binaries, saying so on stderr.
        let said = format!("{text}{}", out.stderr_text());
        if said.contains("not a dynamic executable") || said.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(Error::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: out.stderr_text().trim().to_string(),
        });
    }
    parse_ldd(&text).map_err(|missing| Error::MissingBinary {
        path: PathBuf::from(missing),
        hint: format!("{} needs it and ldd cannot find it", binary.display()),
    })
}

/// The paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and the loader's
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the kernel's vDSO has no file. A library ldd
/// cannot find is the error.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim) {
        let resolved = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err(name.trim().to_string());
                }
                target
            }
            None => line,
        };
        let path = resolved.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// Writes the OCI image layout tar: `oci-layout`, `index.json` naming the image `reference`,
/// and the blobs (layer, config, manifest) under their sha256.
fn write_image(out: &Path, reference: &str, layer: Layer, config: &ImageConfig) -> Result<()> {
    let layer = layer
        .into_bytes()
        .map_err(Error::io("building the image layer"))?;
    let layer_digest = digest(&layer);

    let mut container_config = json!({ "Env": config.env, "WorkingDir": "/" });
    if !config.entrypoint.is_empty() {
        container_config["Entrypoint"] = json!(config.entrypoint);
    }
    if !config.cmd.is_empty() {
        container_config["Cmd"] = json!(config.cmd);
    }
    let config = json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": container_config,
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let config = json_bytes(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let manifest = json_bytes(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": reference },
        }],
    });

    let file = fs::File::create(out).map_err(Error::io(format!("creating {}", out.display())))?;
    let mut tar = tar::Builder::new(file);
    let layout = json_bytes(&json!({ "imageLayoutVersion": "1.0.0" }));
    let blobs = [&layer, &config, &manifest];
    let result = (|| {
        append_file(&mut tar, "oci-layout", &layout, 0o644)?;
        append_file(&mut tar, "index.json", &json_bytes(&index), 0o644)?;
        append_dir(&mut tar, "blobs")?;
        append_dir(&mut tar, "blobs/sha256")?;
        for blob in blobs {
            let hex = hex_sha256(blob);
            append_file(&mut tar, &format!("blobs/sha256/{hex}"), blob, 0o644)?;
        }
        tar.into_inner().map(drop)
    })();
    result.map_err(Error::io(format!("writing {}", out.display())))
}

fn append_file<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    contents: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(contents.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    tar.append_data(&mut header, path, contents)
}

fn append_dir<W: std::io::Write>(tar: &mut tar::Builder<W>, path: &str) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_mode(0o755);
    header.set_mtime(0);
    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
}

fn json_bytes(value: &Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `sha256:<hex>`, the OCI digest form.
fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex_sha256(data))
}

/// The image platform is named as Go names architectures.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read};

    use super::*;

    fn entries(tar_bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut out = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.insert(path, data);
        }
        out
    }

    #[test]
    fn digests_are_sha256_of_the_content() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Every reference in the layout resolves to a blob whose sha256 and size match.
    #[test]
    fn layout_references_resolve_to_matching_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("image.tar");
        let busybox = b"stand-in for the busybox binary";
        let mut layer = busybox_layer_from(busybox).unwrap();
        layer.file("www/index.html", b"hi", 0o644).unwrap();
        let config = ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            ..ImageConfig::default()
        };
        write_image(&out, "docker.io/myelin/busybox:test", layer, &config).unwrap();
        let files = entries(&fs::read(&out).unwrap());
        let blob = |d: &Value| -> Vec<u8> {
            let hex = d["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap();
            let data = files[&format!("blobs/sha256/{hex}")].clone();
            assert_eq!(hex_sha256(&data), hex);
            assert_eq!(d["size"].as_u64().unwrap(), data.len() as u64);
            data
        };
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            "docker.io/myelin/busybox:test"
        );
        let manifest: Value = serde_json::from_slice(&blob(desc)).unwrap();
        let config: Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/sh"]));
        assert!(config["config"].get("Cmd").is_none());
        let layer = blob(&manifest["layers"][0]);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );

        let layer_files = entries(&layer);
        assert_eq!(layer_files["www/index.html"], b"hi");
        assert_eq!(layer_files["bin/busybox"], busybox);
        assert!(layer_files.contains_key("bin/httpd"));
        assert!(layer_files.contains_key("www/"));
    }

    #[test]
    fn parent_directories_come_first_and_once() {
        let mut layer = Layer::default();
        layer.file("/usr/lib/myelin/myelin", b"a", 0o755).unwrap();
        layer.file("/usr/bin/myelinctl", b"b", 0o755).unwrap();
        let bytes = layer.into_bytes().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let order: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            order,
            [
                "usr/",
                "usr/lib/",
                "usr/lib/myelin/",
                "usr/lib/myelin/myelin",
                "usr/bin/",
                "usr/bin/myelinctl"
            ]
        );
    }

    #[test]
    fn ldd_output_yields_libraries_and_loader_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2e)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2e)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f2e)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "libfoo.so.1"
        );
    }

    /// The release and debug binaries are dynamically linked against glibc; what ldd reports
    /// for a real binary of this machine must include the loader and libc.
    #[test]
    fn a_dynamic_binary_of_this_machine_needs_the_loader_and_libc() {
        let libraries = shared_libraries(Path::new("/bin/ls")).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
        assert!(
            libraries.iter().any(|l| l.ends_with("libc.so.6")),
            "{libraries:?}"
        );
        assert!(
            shared_libraries(Path::new(BUSYBOX)).unwrap().is_empty(),
            "{BUSYBOX} is static"
        );
    }
}
