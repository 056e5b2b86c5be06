//! Socket-level load balancing (`--cgroup-root`): cgroup programs translate a Service's frontend
//! to a backend when a socket of the node's network namespace, or of one of its pods', connects
//! to it (`connect4`) or sends a datagram to it (`sendmsg4`), so the packets carry the backend
//! from the start and no program translates them again. `recvmsg4` and `getpeername4` turn the
//! backend back into the frontend the application addressed.
//!
//! `lb_reverse_sk` (LRU) remembers, per socket and backend, the frontend it stands for
//! (Cilium's `lb4_reverse_sk`):
//!
//! ```text
//! {socket cookie, backend, backend port} -> {frontend, frontend port}
//! ```
//!
//! Keyed by the backend too, because one unconnected UDP socket may be sent to several
//! frontends, and each datagram to a frontend may go to another backend. Socket cookies are
//! never reused while the kernel runs, so an entry of a closed socket is harmless until the LRU
//! evicts it.
//!
//! `sock_lb` holds the node's network namespace cookie and `sock_lb_pods` those of the node's
//! pods: the programs run for every socket of the cgroup they are attached to, but translate
//! only those of these namespaces (the node's, with its host-network pods, and each of its
//! pods'). A socket of any other namespace (another node's pods, a namespace Myelin did not
//! make) is left as it is, to the per-packet translation or to nothing. Zero in `sock_lb` (the
//! agent has not written it yet): the node's own sockets are not translated.
//!
//! ```text
//! sock_lb_pods: {netns cookie} -> {pod address, endpoint id}
//! ```
//!
//! The pod's address is the client a Service's session affinity remembers (what the per-packet
//! path takes from the packet), and the endpoint the events name. Network namespace cookies are
//! never reused while the kernel runs.

use crate::user_pod;

/// `lb_reverse_sk`'s key: a socket and the backend the socket programs gave it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbSockKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub backend: [u8; 4],
    /// Network byte order.
    pub backend_port: u16,
    pub _pad: u16,
}

/// `lb_reverse_sk`'s value: the frontend the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSockFrontend {
    pub frontend: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// `sock_lb`'s one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbConfig {
    /// The network namespace whose sockets are translated (`SO_NETNS_COOKIE` of the agent's
    /// own); 0: none.
    pub netns_cookie: u64,
}

/// `sock_lb_pods`' value: the pod whose network namespace it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbClient {
    /// The pod's address.
    pub ip: [u8; 4],
    /// Its endpoint id.
    pub endpoint: u32,
}

const _: () = assert!(core::mem::size_of::<LbSockKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockLbClient>() == 8);
const _: () = assert!(core::mem::size_of::<LbSockFrontend>() == 8);
const _: () = assert!(core::mem::size_of::<SockLbConfig>() == 8);

user_pod!(LbSockKey, LbSockFrontend, SockLbConfig, SockLbClient);
