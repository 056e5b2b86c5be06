//! Where the binaries under test are: `$MYELIN_BIN_DIR`, else the cargo target dir this
//! harness was built into.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub const BIN_DIR_ENV: &str = "MYELIN_BIN_DIR";

/// The directory holding `myelin`, `myelin-agent` and `myelinctl`.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$MYELIN_BIN_DIR`, or the profile dir of the running executable (`target/debug` for
    /// both `target/debug/deps/<test>` and `target/debug/xtask`).
    pub fn from_env() -> Result<Self> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return Ok(Self::new(dir));
        }
        let exe = std::env::current_exe().map_err(Error::io("locating the running executable"))?;
        let mut dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        Ok(Self::new(dir))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CNI plugin.
    pub fn plugin(&self) -> Result<PathBuf> {
        self.find("myelin")
    }

    pub fn agent(&self) -> Result<PathBuf> {
        self.find("myelin-agent")
    }

    pub fn ctl(&self) -> Result<PathBuf> {
        self.find("myelinctl")
    }

    fn find(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MissingBinary {
                path,
                hint: format!(
                    "build the binaries first (`cargo build` or `cargo xtask build`), or point \
                     {BIN_DIR_ENV} at the directory that holds them"
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_are_reported_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let err = Binaries::new(dir.path()).agent().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("myelin-agent") && msg.contains(BIN_DIR_ENV),
            "{msg}"
        );
        std::fs::write(dir.path().join("myelin"), b"").unwrap();
        assert_eq!(
            Binaries::new(dir.path()).plugin().unwrap(),
            dir.path().join("myelin")
        );
    }
}
