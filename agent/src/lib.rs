//! Myelin's node agent as a library: the binaries (`myelin-agent`, `myelinctl`) are thin
//! wrappers, and tests call the logic directly.

pub mod agent;
pub mod api;
pub mod bpffs;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod desired;
pub mod endpoint;
pub mod events;
pub mod http;
pub mod ipam;
pub mod links;
pub mod lock;
pub mod metrics;
pub mod netconf;
pub mod owner;
pub mod persist;
pub mod priority;
pub mod source;
