//! The root-tier test harness of Myelin, also used by `cargo xtask demo`.
//!
//! Every simulated node and pod is a network namespace created here; nothing is added to the
//! machine's own namespace and traffic only goes to addresses inside those namespaces. Names
//! carry a per-run prefix ([`RunPrefix`], `myelin-t<pid>-<n>`); guards remove everything on
//! success and on panic, and [`sweep_leftovers`] removes what killed runs left.
//!
//! Several nodes on one underlay, with a world namespace for the internet, are a
//! [`multinode::Cluster`].
//!
//! A root test starts with [`root_test`]:
//!
//! ```no_run
//! # fn main() -> myelin_tests::Result<()> {
//! use myelin_tests::{Node, NodeSpec, root_test, traffic::ping};
//! let Some(run) = root_test()? else { return Ok(()) };
//! let node = Node::start(&run, NodeSpec::new("node"))?;
//! let a = node.add_pod("default", "a")?;
//! let b = node.add_pod("default", "b")?;
//! ping(&a, &b)?;
//! # Ok(())
//! # }
//! ```

pub mod apiserver;
pub mod bench;
mod bins;
pub mod cgroup;
pub mod chart;
pub mod cluster;
mod cni;
pub mod containerd;
pub mod demo;
mod error;
pub mod metrics;
pub mod multinode;
mod netns;
mod node;
pub mod oci;
pub mod packet;
pub mod policy_lab;
pub mod probe;
mod process;
pub mod progress;
mod run;
pub mod services;
mod sweep;
pub mod tc;
pub mod traffic;
mod unprivileged;

pub use bins::{BIN_DIR_ENV, Binaries};
pub use cni::{CniCall, CniOutput, Pod, PodSandbox, REFERENCE_PLUGIN_DIR, result_ip, run_plugin};
pub use error::{Error, Result};
pub use netns::Netns;
pub use node::{AGENT_READY_TIMEOUT, AgentSource, Footprint, Node, NodeSpec};
pub use process::{Output, describe};
pub use run::{RunPrefix, SKIP_ROOT_TESTS_ENV, root_test};
pub use sweep::{SweepReport, sweep_leftovers};
pub use unprivileged::{NOBODY, as_nobody};
