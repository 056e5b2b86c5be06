//! Types shared by the eBPF datapath and the agent.
//!
//! Every type that crosses the kernel boundary is `#[repr(C)]`, `Copy`, has no implicit padding
//! (explicit `_pad` fields instead, so that the bytes the agent writes are the bytes the kernel
//! hashes) and carries a size assertion. With the `user` feature the types implement
//! `aya::Pod` so the agent can read and write them in maps; the kernel side never links aya.
#![no_std]

pub mod config;
pub mod conntrack;
pub mod drop;
pub mod endpoint;
pub mod event;
pub mod ipcache;
pub mod lb;
pub mod maglev;
pub mod maps;
pub mod nat;
pub mod policy;
pub mod proto;
pub mod sock;

pub use drop::DropReason;
pub use endpoint::{EndpointCounters, EndpointInfo, Ipv4Key};
pub use ipcache::{IpcacheEntry, identity};
pub use policy::{Direction, PolicyEntry, PolicyKey};

/// Implements `aya::Pod` for the listed types when built for the agent.
macro_rules! user_pod {
    ($($ty:ty),* $(,)?) => {
        $(
            // SAFETY: `#[repr(C)]`, `Copy`, no implicit padding, every bit pattern valid.
            #[cfg(feature = "user")]
            unsafe impl aya::Pod for $ty {}
        )*
    };
}
pub(crate) use user_pod;
