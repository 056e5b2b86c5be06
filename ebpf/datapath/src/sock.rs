//! Socket-level load balancing: cgroup `sock_addr` programs on the cgroup `--cgroup-root`
//! names (see `myelin_common::sock` for the maps).
//!
//! - `lb_connect4` (`connect()`, TCP and UDP) and `lb_sendmsg4` (`sendto()`/`sendmsg()` with an
//!   address on an unconnected UDP socket): a destination that is a frontend in `lb_services`
//!   becomes a backend chosen as `from_container` chooses one (`lb::choose`: session affinity,
//!   else a random slot), before the kernel routes anything. The socket's packets then carry
//!   the backend: `from_container` never sees a frontend for them (the node's own traffic does
//!   not pass it anyway), nothing is written to `lb_flows`, and policy judges the backend as it
//!   does for every packet. A frontend without backends refuses at once: `connect()` and
//!   `sendmsg()` fail with `ECONNREFUSED`, what a TCP reset or an ICMP port unreachable gives
//!   a client of the per-packet path.
//! - `lb_recvmsg4` (the source address `recvfrom()` reports) and `lb_getpeername4`: a backend
//!   the socket was given becomes the frontend it addressed again (`lb_reverse_sk`).
//!
//! Only sockets of the node's network namespace are touched (`sock_lb`'s cookie): the same
//! cgroup may hold processes of other namespaces (pods whose runtime puts them there, another
//! node's agent on a test machine), and their sockets are left as they are. Session affinity
//! takes the node's InternalIP as the client: every socket of the node is one client, the
//! address its packets to pods carry.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    btf_maps::{Array, LruHashMap},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::btf_map,
    programs::SockAddrContext,
};
use myelin_common::{
    maps::DEFAULT_MAX_LB_FLOWS,
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    sock::{LbSockFrontend, LbSockKey, SockLbConfig},
};

use crate::{conntrack, events, lb};

/// Per socket and backend, the frontend it stands for. Capacity: `--max-lb-flows`.
#[btf_map(name = "lb_reverse_sk")]
static LB_REVERSE_SK: LruHashMap<LbSockKey, LbSockFrontend, { DEFAULT_MAX_LB_FLOWS as usize }> =
    LruHashMap::new();

/// The node's network namespace: the only one whose sockets are translated.
#[btf_map(name = "sock_lb")]
static SOCK_LB: Array<SockLbConfig, 1> = Array::new();

/// A cgroup `sock_addr` program's verdict: go on with the call.
pub const PROCEED: i32 = 1;
/// Fail the call (with `EPERM`, or the error set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Whether the socket is one of the node's own network namespace.
#[inline(always)]
fn of_this_node(ctx: &SockAddrContext) -> bool {
    let Some(config) = SOCK_LB.get(0) else {
        return false;
    };
    let node = config.netns_cookie;
    // SAFETY: plain helper call on the program's own context.
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == node
}

/// `lb_connect4` and `lb_sendmsg4`: the destination, when a frontend, becomes a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> i32 {
    if !of_this_node(ctx) {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's context for this program type; these fields are readable.
    let (addr, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let protocol = match protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return PROCEED,
    };
    // Both in network byte order, as the packets carry them (the port in the low 16 bits).
    let frontend = lb::slot(addr.to_ne_bytes(), port as u16, protocol, 0);
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { lb::LB_SERVICES.get(&frontend) }).copied() else {
        return PROCEED;
    };
    let client = events::config().node_ip;
    let Some((backend, backend_port)) =
        lb::choose(client, &frontend, &service, conntrack::now(), None)
    else {
        // SAFETY: plain helper call; available to connect4 and sendmsg4.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    };
    let key = LbSockKey {
        // SAFETY: plain helper call on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend,
        backend_port,
        _pad: 0,
    };
    let reverse = LbSockFrontend {
        frontend: frontend.addr,
        port: frontend.port,
        _pad: 0,
    };
    // Written before the socket can see the backend. Should the insert fail (the LRU map
    // under contention), the connection still works; only `getpeername()` and `recvfrom()`
    // then show the backend.
    let _ = LB_REVERSE_SK.insert(&key, reverse, u64::from(BPF_ANY));
    // SAFETY: user_ip4 and user_port are writable for connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(backend);
        (*sa).user_port = u32::from(backend_port);
    }
    PROCEED
}

/// `lb_recvmsg4` and `lb_getpeername4`: a backend the socket programs gave this socket becomes
/// the frontend the application addressed.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    if !of_this_node(ctx) {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's context for this program type; these fields are readable.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = LbSockKey {
        // SAFETY: plain helper call on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: addr.to_ne_bytes(),
        backend_port: port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(f) = unsafe { LB_REVERSE_SK.get(&key) }.copied() {
        // SAFETY: user_ip4 and user_port are writable for recvmsg4 and getpeername4.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(f.frontend);
            (*sa).user_port = u32::from(f.port);
        }
    }
    PROCEED
}
