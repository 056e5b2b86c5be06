//! Myelin's node agent as a library: the binaries (`myelin-agent`, `myelinctl`) are thin
//! wrappers, and tests call the logic directly.

pub(crate) mod agent;
pub(crate) mod api;
pub mod bpffs;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod desired;
pub(crate) mod endpoint;
pub(crate) mod events;
pub mod health;
pub(crate) mod http;
pub(crate) mod ipam;
pub(crate) mod links;
pub(crate) mod lock;
pub(crate) mod memory;
pub(crate) mod metrics;
pub(crate) mod netconf;
pub(crate) mod owner;
pub(crate) mod persist;
pub(crate) mod priority;
pub(crate) mod routing;
pub mod source;
