//! Socket-level load balancing: cgroup `sock_addr` programs on the cgroup `--cgroup-root`
//! names (see `myelin_common::sock` for the maps).
//!
//! - `lb_connect4` (`connect()`, TCP and UDP) and `lb_sendmsg4` (`sendto()`/`sendmsg()` with an
//!   address on an unconnected UDP socket): a destination that is a frontend in `lb_services`
//!   becomes a backend chosen as `from_container` chooses one (`lb::choose`: session affinity,
//!   else a random slot), before the kernel routes anything. The socket's packets then carry
//!   the backend: `from_container` never sees a frontend for them, nothing is written to
//!   `lb_flows`, and policy judges the backend as it does for every packet. A frontend without
//!   backends refuses at once: `connect()` and `sendmsg()` fail with `ECONNREFUSED`, what a TCP
//!   reset or an ICMP port unreachable gives a client of the per-packet path. A new
//!   translation is an event (point `socket`), as the per-packet path's first packet is.
//! - `lb_recvmsg4` (the source address `recvfrom()` reports) and `lb_getpeername4`: a backend
//!   the socket was given becomes the frontend it addressed again (`lb_reverse_sk`).
//!
//! Only sockets of the node's network namespace (`sock_lb`) and of its pods' (`sock_lb_pods`)
//! are translated: the same cgroup may hold processes of other namespaces (another node's
//! pods and agent on a test machine, a namespace Myelin did not make), and their sockets are
//! left as they are. The client a Service's session affinity remembers is the pod's address
//! for a pod's socket and the node's InternalIP for the node's: the address their packets
//! carry.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    btf_maps::{Array, HashMap, LruHashMap},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::btf_map,
    programs::SockAddrContext,
};
use myelin_common::{
    DropReason,
    config::{EVENTS_DROPS, EVENTS_VERDICTS},
    event::{EVENT_ALLOWED, EVENT_DROP, FlowEvent, ObservationPoint},
    maps::{DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_LB_FLOWS},
    policy::Direction,
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    sock::{LbSockFrontend, LbSockKey, SockLbClient, SockLbConfig},
};

use crate::{conntrack, events, ipcache, lb};

/// Per socket and backend, the frontend it stands for. Capacity: `--max-lb-flows`.
#[btf_map(name = "lb_reverse_sk")]
static LB_REVERSE_SK: LruHashMap<LbSockKey, LbSockFrontend, { DEFAULT_MAX_LB_FLOWS as usize }> =
    LruHashMap::new();

/// The node's network namespace.
#[btf_map(name = "sock_lb")]
static SOCK_LB: Array<SockLbConfig, 1> = Array::new();

/// The node's pods' network namespaces. Capacity: `--max-endpoints`.
#[btf_map(name = "sock_lb_pods")]
static SOCK_LB_PODS: HashMap<u64, SockLbClient, { DEFAULT_MAX_ENDPOINTS as usize }> =
    HashMap::new();

/// A cgroup `sock_addr` program's verdict: go on with the call.
pub const PROCEED: i32 = 1;
/// Fail the call (with `EPERM`, or the error set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The client a socket stands for: the node (its InternalIP, no endpoint) for a socket of the
/// node's network namespace, the pod for one of a pod's; `None` for any other namespace.
#[inline(always)]
fn client_of(ctx: &SockAddrContext, node_ip: [u8; 4]) -> Option<SockLbClient> {
    // SAFETY: plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let node = SOCK_LB.get(0).map_or(0, |c| c.netns_cookie);
    if node != 0 && netns == node {
        return Some(SockLbClient {
            ip: node_ip,
            endpoint: 0,
        });
    }
    // SAFETY: copied out at once.
    unsafe { SOCK_LB_PODS.get(&netns) }.copied()
}

/// `lb_connect4` and `lb_sendmsg4`: the destination, when a frontend, becomes a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> i32 {
    let config = events::config();
    let Some(client) = client_of(ctx, config.node_ip) else {
        return PROCEED;
    };
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
    let event = Translation {
        client,
        frontend: &frontend,
    };
    let Some((backend, backend_port)) =
        lb::choose(client.ip, &frontend, &service, conntrack::now(), None)
    else {
        if config.events & EVENTS_DROPS != 0 {
            events::output(
                &config,
                event.event(EVENT_DROP, frontend.addr, frontend.port),
            );
        }
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
    // A socket sending datagram after datagram to a frontend finds its entry written: no write
    // and no event for each.
    // SAFETY: compared at once.
    let known = unsafe { LB_REVERSE_SK.get(&key) }.is_some_and(|f| *f == reverse);
    if !known {
        // Written before the socket can see the backend. Should the insert fail (the LRU map
        // under contention), the connection still works; only `getpeername()` and
        // `recvfrom()` then show the backend.
        let _ = LB_REVERSE_SK.insert(&key, reverse, u64::from(BPF_ANY));
        if config.events & EVENTS_VERDICTS != 0 {
            events::output(&config, event.event(EVENT_ALLOWED, backend, backend_port));
        }
    }
    // SAFETY: user_ip4 and user_port are writable for connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(backend);
        (*sa).user_port = u32::from(backend_port);
    }
    PROCEED
}

/// What an event of the socket programs says: a client's socket addressed a frontend.
struct Translation<'a> {
    client: SockLbClient,
    frontend: &'a myelin_common::lb::LbKey,
}

impl Translation<'_> {
    /// The event for `kind`, to `daddr`/`dport` (network byte order): the backend given, or the
    /// frontend itself when it had none. The source port is not chosen yet.
    #[inline(always)]
    fn event(&self, kind: u8, daddr: [u8; 4], dport: u16) -> FlowEvent {
        FlowEvent {
            timestamp_ns: 0,
            kind,
            reason: if kind == EVENT_DROP {
                DropReason::NoServiceBackend as u8
            } else {
                0
            },
            direction: Direction::Egress as u8,
            protocol: self.frontend.protocol,
            saddr: self.client.ip,
            daddr,
            sport: 0,
            dport: u16::from_be(dport),
            src_endpoint: self.client.endpoint,
            dst_endpoint: 0,
            src_identity: ipcache::lookup(self.client.ip).identity,
            dst_identity: ipcache::lookup(daddr).identity,
            ifindex: 0,
            service_addr: self.frontend.addr,
            service_port: u16::from_be(self.frontend.port),
            point: ObservationPoint::Socket as u8,
            _pad: 0,
            egress_rule: 0,
            ingress_rule: 0,
            _reserved: 0,
        }
    }
}

/// `lb_recvmsg4` and `lb_getpeername4`: a backend the socket programs gave this socket becomes
/// the frontend the application addressed.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    // No namespace check: socket cookies are unique, and only sockets `translate` gave a
    // backend have an entry. One lookup, whatever the socket.
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
