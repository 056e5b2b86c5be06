//! A busybox container image built locally as an OCI image layout tar, so that the e2e tests
//! never pull from a registry: one uncompressed layer with Debian's static busybox and the
//! applet links the tests use, a config, a manifest and an index naming the image.

use std::{fs, path::Path};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked into /bin. `wget` is left out on purpose: it crashes in a bare static image
/// (no NSS files); `nc` does its job.
const APPLETS: &[&str] = &[
    "cat", "echo", "httpd", "ip", "ls", "nc", "printf", "sh", "sleep",
];

/// Builds the image layout tar at `out`, named `reference` (the index's
/// `org.opencontainers.image.ref.name`, which `ctr images import` takes as the image name),
/// with `files` (path inside the image, contents) added to the layer.
pub fn write_busybox_image(out: &Path, reference: &str, files: &[(&str, &[u8])]) -> Result<()> {
    let busybox = fs::read(BUSYBOX).map_err(Error::io(format!(
        "reading {BUSYBOX} (Debian package busybox-static)"
    )))?;
    write_image(out, reference, &busybox, files)
}

fn write_image(out: &Path, reference: &str, busybox: &[u8], files: &[(&str, &[u8])]) -> Result<()> {
    let layer = layer_tar(busybox, files).map_err(Error::io("building the image layer"))?;
    let layer_digest = digest(&layer);

    let config = json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/" },
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

fn layer_tar(busybox: &[u8], files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
        append_dir(&mut tar, dir)?;
    }
    append_file(&mut tar, "bin/busybox", busybox, 0o755)?;
    for applet in APPLETS {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_mtime(0);
        tar.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
    }
    for (path, contents) in files {
        // Parent dirs first: tar extraction in the snapshotter does not invent them.
        let mut parent = Path::new(path).parent();
        let mut parents = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            parents.push(p.to_path_buf());
            parent = p.parent();
        }
        for dir in parents.iter().rev() {
            append_dir(&mut tar, &dir.display().to_string())?;
        }
        append_file(&mut tar, path, contents, 0o644)?;
    }
    tar.into_inner()
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
        write_image(
            &out,
            "docker.io/myelin/busybox:test",
            busybox,
            &[("www/index.html", b"hi")],
        )
        .unwrap();
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
}
