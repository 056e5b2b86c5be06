//! Per-run names and the gate every root test passes through.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

use crate::{Error, Result, sweep};

/// Every name this harness creates (network namespaces, temp dirs, container ids) starts with
/// this, so that the sweeper can recognise leftovers: `myelin-t<pid>-<n>-...`.
pub const NAME_PREFIX: &str = "myelin-t";

/// Opt-out for machines without root. Honoured only when not root, so a root machine (CI) can
/// never skip the root tier by accident.
pub const SKIP_ROOT_TESTS_ENV: &str = "MYELIN_SKIP_ROOT_TESTS";

/// A unique prefix for one test (or one demo run): `myelin-t<pid>-<n>`. Tests run as threads of
/// one process, so the counter keeps their names apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPrefix(String);

impl RunPrefix {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(format!("{NAME_PREFIX}{}-{n}", std::process::id()))
    }

    /// `<prefix>-<what>`.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RunPrefix {
    fn default() -> Self {
        Self::new()
    }
}

/// The start of every root test:
/// - not root and [`SKIP_ROOT_TESTS_ENV`]`=1`: says the test is skipped and returns `None`;
/// - not root otherwise: fails with the reason (no silent skips);
/// - root: sweeps leftovers of earlier runs (once per process) and returns a fresh prefix.
pub fn root_test() -> Result<Option<RunPrefix>> {
    let test = thread::current().name().unwrap_or("this test").to_string();
    if !nix::unistd::geteuid().is_root() {
        if std::env::var(SKIP_ROOT_TESTS_ENV).as_deref() == Ok("1") {
            eprintln!("skipped {test}: not root and {SKIP_ROOT_TESTS_ENV}=1");
            return Ok(None);
        }
        return Err(Error::NotRoot);
    }
    sweep_once()?;
    let run = RunPrefix::new();
    eprintln!("{test}: resources named {}-*", run.as_str());
    Ok(Some(run))
}

/// Sweeping is process-wide and only touches what dead processes left, so once is enough; a
/// failed sweep fails every test, because leftovers could make them fail in confusing ways.
fn sweep_once() -> Result<()> {
    static SWEPT: OnceLock<Result<(), String>> = OnceLock::new();
    SWEPT
        .get_or_init(|| {
            sweep::sweep_leftovers()
                .map(|report| report.print_if_any())
                .map_err(|e| format!("{e:?}"))
        })
        .clone()
        .map_err(Error::Sweep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_carry_the_pid() {
        let a = RunPrefix::new();
        let b = RunPrefix::new();
        assert_ne!(a, b);
        let own = format!("{NAME_PREFIX}{}-", std::process::id());
        assert!(a.as_str().starts_with(&own), "{a:?}");
        assert_eq!(sweep::owner_pid(&a.name("node")), Some(std::process::id()));
    }
}
