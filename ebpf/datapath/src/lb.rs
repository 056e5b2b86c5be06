//! Services in eBPF: a pod's packet to a Service's frontend is translated to one of its backends
//! in `from_container`, before policy and conntrack see it, and the backend's replies are
//! translated back wherever they reach the client's node (see `myelin_common::lb` for the
//! maps' layout).
//!
//! A connection keeps its backend in `lb_flows` (`out`), so it stays there while the slots
//! change; its replies find the frontend in the `in` entry. Both entries live by conntrack's
//! rules, refreshed together as masquerading's pairs are (`crate::nat`). The translated flow's
//! conntrack entry carries `CT_F_SERVICE`: only replies of translated flows look `in` up. Other
//! traffic pays one hash lookup per TCP, UDP or SCTP packet a pod sends (is its destination a
//! frontend?) while `CONFIG_F_SERVICES` is on, and nothing while it is off.
//!
//! Addresses and ports are rewritten by masquerading's `nat::rewrite`, which keeps every
//! checksum right (`CHECKSUM_PARTIAL`, UDP's zero checksum). SCTP keeps its port: its CRC32c
//! covers the ports, so an SCTP frontend whose backend listens on another port is refused.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    btf_maps::{HashMap, LruHashMap},
    helpers::generated::{bpf_get_prandom_u32, bpf_skb_change_tail},
    macros::btf_map,
    programs::TcContext,
};
use myelin_common::{
    DropReason,
    lb::{LB_IN, LB_OUT, LbAffinity, LbAffinityKey, LbEntry, LbFlow, LbFlowKey, LbKey},
    maps::{DEFAULT_MAX_LB_AFFINITY, DEFAULT_MAX_LB_FLOWS, DEFAULT_MAX_LB_SLOTS},
    proto::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    conntrack, maglev,
    nat::{self, End},
    packet::{self, ETH_HLEN, EthHdr, Flow, Icmp, IcmpHdr, Ipv4Hdr, TCP_ACK, TCP_RST, TcpHdr},
};

/// Every frontend's slots. Capacity: `--max-lb-slots`.
#[btf_map(name = "lb_services")]
pub(crate) static LB_SERVICES: HashMap<LbKey, LbEntry, { DEFAULT_MAX_LB_SLOTS as usize }> =
    HashMap::new();

/// Both directions of every translated connection. Capacity: `--max-lb-flows`.
#[btf_map(name = "lb_flows")]
static LB_FLOWS: LruHashMap<LbFlowKey, LbFlow, { DEFAULT_MAX_LB_FLOWS as usize }> =
    LruHashMap::new();

/// `sessionAffinity: ClientIP`: a client's backend per frontend. Capacity: `--max-lb-affinity`.
#[btf_map(name = "lb_affinity")]
static LB_AFFINITY: LruHashMap<LbAffinityKey, LbAffinity, { DEFAULT_MAX_LB_AFFINITY as usize }> =
    LruHashMap::new();

const NS_PER_SECOND: u64 = 1_000_000_000;

/// The source a pod's packet gets when the backend chosen for it is the pod itself (hairpin):
/// with its own address as the source its stack would drop the packet as martian. A reserved
/// link-local address, Cilium's; the backend's replies go to it and get the pod back.
pub const HAIRPIN: [u8; 4] = [169, 254, 42, 1];

/// Where the backend's replies to `client` go: the client, or [`HAIRPIN`] when it is the
/// backend itself.
#[inline(always)]
fn reply_peer(client: [u8; 4], backend: [u8; 4]) -> [u8; 4] {
    if client == backend { HAIRPIN } else { client }
}

/// What [`translate`] did to a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// Not to a frontend: left as it was.
    None,
    /// Translated to a backend; the flow now names it.
    Backend,
    /// Translated to the sending pod itself, from [`HAIRPIN`]; the flow names both.
    Hairpin,
    /// To a frontend without a usable backend: to be refused.
    NoBackend,
}

#[inline(always)]
pub(crate) fn slot(addr: [u8; 4], port: u16, protocol: u8, slot: u16) -> LbKey {
    LbKey {
        addr,
        port,
        protocol,
        _pad0: 0,
        slot,
        _pad1: 0,
    }
}

#[inline(always)]
fn flow_key(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
    protocol: u8,
    direction: u8,
) -> LbFlowKey {
    LbFlowKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        direction,
        _pad: 0,
    }
}

/// Gives the other entry of a pair (`twin`, which must map to `addr`/`port`) `e`'s lifetime and
/// state, or puts it back when the LRU map evicted it. One that maps elsewhere belongs to
/// another connection (a client reusing its port towards another frontend that chose the same
/// backend) and is left alone.
///
/// # Safety
/// `e` must come from a lookup during this program run.
#[inline(always)]
unsafe fn sync_twin(twin: &LbFlowKey, e: *const LbFlow, addr: [u8; 4], port: u16) {
    // SAFETY: the caller's pointer is valid for this run.
    let (expires_ns, flags) = unsafe { ((*e).expires_ns, (*e).flags) };
    match LB_FLOWS.get_ptr_mut(twin) {
        Some(t) => {
            // SAFETY: pointer from the lookup just above.
            unsafe {
                if (*t).addr == addr && (*t).port == port {
                    (*t).expires_ns = expires_ns;
                    (*t).flags = flags;
                }
            }
        }
        None => {
            let entry = LbFlow {
                expires_ns,
                addr,
                port,
                flags,
            };
            let _ = LB_FLOWS.insert(twin, entry, u64::from(BPF_NOEXIST));
        }
    }
}

/// How many slots a client's affine backend is looked for in when it is no longer in the slot
/// it was chosen from (the agent keeps backends in order: one that goes moves those after it).
const AFFINITY_SCAN: u16 = 32;

/// The backend of a live `lb_affinity` entry of the client for the frontend, if the slots still
/// hold it: in the slot it was chosen from (one lookup), else in one of the first
/// [`AFFINITY_SCAN`] slots. Returns its slot too.
#[inline(always)]
fn affine_backend(
    key: &LbAffinityKey,
    frontend: &LbKey,
    service: &LbEntry,
    now: u64,
) -> Option<(u16, [u8; 4], u16)> {
    // SAFETY: copied out at once.
    let a = unsafe { LB_AFFINITY.get(key) }.copied()?;
    if now > a.used_ns + u64::from(service.affinity_timeout_s) * NS_PER_SECOND {
        return None;
    }
    let holds = |n: u16| {
        let k = slot(frontend.addr, frontend.port, frontend.protocol, n);
        // SAFETY: read at once.
        unsafe { LB_SERVICES.get(k) }
            .is_some_and(|b| b.backend == a.backend && b.backend_port == a.backend_port)
    };
    if a.slot != 0 && a.slot <= service.count && holds(a.slot) {
        return Some((a.slot, a.backend, a.backend_port));
    }
    let last = service.count.min(AFFINITY_SCAN);
    (1..=last)
        .find(|&n| n != a.slot && holds(n))
        .map(|n| (n, a.backend, a.backend_port))
}

/// Chooses a backend for a new connection of `client` to `frontend`: the client's affine one,
/// else the slot the frontend's Maglev table gives the connection's `flow_hash`
/// (`crate::maglev`: frontends reached from outside, with `--lb-algorithm maglev`), else a
/// random slot. `None` when the frontend has no usable backend. Also the socket programs'
/// choice (`crate::sock`), without a flow hash: random.
#[inline(always)]
pub(crate) fn choose(
    client: [u8; 4],
    frontend: &LbKey,
    service: &LbEntry,
    now: u64,
    flow_hash: Option<u32>,
) -> Option<([u8; 4], u16)> {
    if service.count == 0 {
        return None;
    }
    let affinity = LbAffinityKey {
        client,
        frontend: frontend.addr,
        port: frontend.port,
        protocol: frontend.protocol,
        _pad: 0,
    };
    let affine = if service.affinity_timeout_s != 0 {
        affine_backend(&affinity, frontend, service, now)
    } else {
        None
    };
    let (n, backend, port) = match affine {
        Some(chosen) => chosen,
        None => {
            let consistent = flow_hash.and_then(|h| maglev::slot(frontend, service, h));
            let n = consistent.unwrap_or_else(|| {
                // SAFETY: plain helper call.
                1 + (unsafe { bpf_get_prandom_u32() } % u32::from(service.count)) as u16
            });
            let key = slot(frontend.addr, frontend.port, frontend.protocol, n);
            // SAFETY: copied out at once. A slot the count promises but the map lacks cannot
            // happen with the agent's write order; treated as no backend rather than trusted.
            let b = unsafe { LB_SERVICES.get(key) }.copied()?;
            (n, b.backend, b.backend_port)
        }
    };
    if service.affinity_timeout_s != 0 {
        let used = LbAffinity {
            used_ns: now,
            backend,
            backend_port: port,
            slot: n,
        };
        let _ = LB_AFFINITY.insert(&affinity, used, u64::from(BPF_ANY));
    }
    Some((backend, port))
}

/// The frontend (slot 0) at `addr`, `port`, `protocol`, if there is one: one lookup. For the
/// uplink's NodePort and external IP frontends (`crate::nodeport`).
#[inline(always)]
pub(crate) fn frontend(addr: [u8; 4], port: u16, protocol: u8) -> Option<LbEntry> {
    // SAFETY: copied out at once.
    unsafe { LB_SERVICES.get(&slot(addr, port, protocol, 0)) }.copied()
}

/// Whether `from_container` must hand the packet to `from_container_lb` ([`translate`]): a
/// TCP, UDP or SCTP packet to a frontend, or an ICMP error about a reply from one. One hash
/// lookup for those protocols, none for the rest.
#[inline(always)]
pub fn wants(flow: &Flow) -> bool {
    let (addr, port, protocol) = if flow.icmp == Icmp::Error {
        let inner = flow.inner;
        if flow.daddr != inner.saddr {
            return false;
        }
        (inner.saddr, inner.sport, inner.protocol)
    } else {
        (flow.daddr, flow.dport, flow.protocol)
    };
    if !matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return false;
    }
    // SAFETY: only whether it is there.
    unsafe { LB_SERVICES.get(&slot(addr, port, protocol, 0)) }.is_some()
}

/// `from_container_lb`: a TCP, UDP or SCTP packet to a frontend is
/// translated to its connection's backend (chosen on its first packet), and `flow` updated so
/// that endpoint lookup, policy, conntrack and forwarding see the backend; so is an ICMP error
/// about a frontend's reply ([`translate_icmp_error`]). Anything else costs at most the
/// frontend lookup and is left alone. `l4`: the transport header's offset.
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    flow: &mut Flow,
    l4: usize,
    later_fragment: bool,
) -> Result<Translation, DropReason> {
    if flow.icmp == Icmp::Error {
        return translate_icmp_error(ctx, flow, l4);
    }
    if !matches!(flow.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok(Translation::None);
    }
    let frontend = slot(flow.daddr, flow.dport, flow.protocol, 0);
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { LB_SERVICES.get(&frontend) }).copied() else {
        return Ok(Translation::None);
    };
    let now = conntrack::now();
    let out = flow_key(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
        LB_OUT,
    );
    let known = match LB_FLOWS.get_ptr_mut(&out) {
        // SAFETY: pointer from the lookup just above. A SYN after the connection on this
        // tuple closed is a new connection: it gets a backend of today's slots.
        Some(e)
            if unsafe { (*e).expires_ns } >= now
                && !conntrack::reopens(flow.protocol, flow.tcp_flags, unsafe {
                    u32::from((*e).flags)
                }) =>
        {
            Some(e)
        }
        _ => None,
    };
    let (backend, port) = match known {
        Some(e) => {
            // SAFETY: as above.
            let (backend, port) = unsafe { ((*e).addr, (*e).port) };
            // SAFETY: as above.
            if unsafe { nat::refresh(e, flow.protocol, flow.tcp_flags, false, now) } {
                let peer = reply_peer(flow.saddr, backend);
                let twin = flow_key(backend, peer, port, flow.sport, flow.protocol, LB_IN);
                // SAFETY: as above.
                unsafe { sync_twin(&twin, e, flow.daddr, flow.dport) };
            }
            (backend, port)
        }
        // A later fragment whose first fragment was not translated: nothing to go by; the
        // node's stack gets it as it is.
        None if later_fragment => return Ok(Translation::None),
        None => {
            let hash = maglev::flow_hash(flow.saddr, flow.sport, flow.dport, flow.protocol);
            let Some((backend, port)) = choose(flow.saddr, &frontend, &service, now, Some(hash))
            else {
                return Ok(Translation::NoBackend);
            };
            if flow.protocol == IPPROTO_SCTP && port != flow.dport {
                return Ok(Translation::NoBackend);
            }
            let expires_ns = now + conntrack::lifetime(flow.protocol, 0);
            let to_backend = LbFlow {
                expires_ns,
                addr: backend,
                port,
                flags: 0,
            };
            let to_frontend = LbFlow {
                addr: flow.daddr,
                port: flow.dport,
                ..to_backend
            };
            let peer = reply_peer(flow.saddr, backend);
            let twin = flow_key(backend, peer, port, flow.sport, flow.protocol, LB_IN);
            // The reply's entry first: a reply can only come once the backend got a packet.
            LB_FLOWS
                .insert(&twin, to_frontend, u64::from(BPF_ANY))
                .map_err(|_| DropReason::ServiceTranslationLost)?;
            LB_FLOWS
                .insert(&out, to_backend, u64::from(BPF_ANY))
                .map_err(|_| DropReason::ServiceTranslationLost)?;
            (backend, port)
        }
    };
    nat::rewrite(
        ctx,
        End::Destination,
        flow.protocol,
        l4,
        later_fragment,
        (flow.daddr, backend),
        (flow.dport, port),
    )?;
    flow.daddr = backend;
    flow.dport = port;
    if flow.saddr != backend {
        return Ok(Translation::Backend);
    }
    nat::rewrite(
        ctx,
        End::Source,
        flow.protocol,
        l4,
        later_fragment,
        (flow.saddr, HAIRPIN),
        (flow.sport, flow.sport),
    )?;
    flow.saddr = HAIRPIN;
    Ok(Translation::Hairpin)
}

/// An ICMP error a client sends about a reply it got from a frontend (its quote's source): it
/// goes to the backend that really sent the reply, about that reply as the backend sent it
/// (the outer destination, the quote's source address and port, every checksum), so that
/// conntrack relates it to the connection and the backend's stack to its socket. Errors about
/// anything else cost nothing beyond the frontend lookup. Hairpin connections' are left alone.
#[inline(always)]
fn translate_icmp_error(
    ctx: &TcContext,
    flow: &mut Flow,
    icmp: usize,
) -> Result<Translation, DropReason> {
    let inner = flow.inner;
    if !matches!(inner.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
        || flow.daddr != inner.saddr
    {
        return Ok(Translation::None);
    }
    let frontend = slot(inner.saddr, inner.sport, inner.protocol, 0);
    // SAFETY: only whether it is there.
    if unsafe { LB_SERVICES.get(&frontend) }.is_none() {
        return Ok(Translation::None);
    }
    let out = flow_key(
        inner.daddr,
        inner.saddr,
        inner.dport,
        inner.sport,
        inner.protocol,
        LB_OUT,
    );
    // SAFETY: copied out at once.
    let Some((backend, port)) = (unsafe { LB_FLOWS.get(&out) }).map(|e| (e.addr, e.port)) else {
        return Ok(Translation::None);
    };
    if backend == flow.saddr {
        return Ok(Translation::None);
    }
    let Some(q) = nat::quote(ctx, icmp) else {
        return Ok(Translation::None);
    };
    nat::translate_icmp_error(ctx, End::Destination, icmp, &q, backend, port, true)?;
    flow.daddr = backend;
    flow.inner.saddr = backend;
    flow.inner.sport = port;
    Ok(Translation::Backend)
}

/// A reply of a translated connection (its conntrack entry carries `CT_F_SERVICE`): its source,
/// the backend, becomes the frontend the client addressed (and a hairpin reply's destination,
/// [`HAIRPIN`], the pod again). `Err(ServiceTranslationLost)` when the `in` entry is gone: the
/// client could not tell the packet for its connection's.
#[inline(always)]
pub fn reverse(
    ctx: &TcContext,
    flow: &mut Flow,
    l4: usize,
    later_fragment: bool,
) -> Result<(), DropReason> {
    let k = flow_key(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
        LB_IN,
    );
    let e = LB_FLOWS
        .get_ptr_mut(&k)
        .ok_or(DropReason::ServiceTranslationLost)?;
    // SAFETY: pointer from the lookup just above.
    let (frontend, port) = unsafe { ((*e).addr, (*e).port) };
    let now = conntrack::now();
    let hairpin = flow.daddr == HAIRPIN;
    let client = if hairpin { flow.saddr } else { flow.daddr };
    // SAFETY: as above.
    if unsafe { nat::refresh(e, flow.protocol, flow.tcp_flags, true, now) } {
        let twin = flow_key(client, frontend, flow.dport, port, flow.protocol, LB_OUT);
        // SAFETY: as above.
        unsafe { sync_twin(&twin, e, flow.saddr, flow.sport) };
    }
    nat::rewrite(
        ctx,
        End::Source,
        flow.protocol,
        l4,
        later_fragment,
        (flow.saddr, frontend),
        (flow.sport, port),
    )?;
    flow.saddr = frontend;
    flow.sport = port;
    if hairpin {
        nat::rewrite(
            ctx,
            End::Destination,
            flow.protocol,
            l4,
            later_fragment,
            (HAIRPIN, client),
            (flow.dport, flow.dport),
        )?;
        flow.daddr = client;
    }
    Ok(())
}

/// An ICMP error about a translated connection, on its way to the client (its quote is the
/// client's packet as the backend got it): the quote's destination, the backend, becomes the
/// frontend the client addressed, so that the client's socket recognises its connection, and
/// so does the outer source when the backend itself sent the error (a router's address on
/// the way stays). Hairpin connections' errors are left as they are.
#[inline(always)]
pub fn reverse_icmp_error(ctx: &TcContext, flow: &mut Flow, icmp: usize) -> Result<(), DropReason> {
    let Some(q) = nat::quote(ctx, icmp) else {
        return Ok(());
    };
    if !matches!(q.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok(());
    }
    let k = flow_key(q.daddr, q.saddr, q.dport, q.sport, q.protocol, LB_IN);
    // SAFETY: copied out at once.
    let Some((frontend, port)) = (unsafe { LB_FLOWS.get(&k) }).map(|e| (e.addr, e.port)) else {
        return Ok(());
    };
    let outer = flow.saddr == q.daddr;
    nat::translate_icmp_error(ctx, End::Source, icmp, &q, frontend, port, outer)?;
    if outer {
        flow.saddr = frontend;
    }
    Ok(())
}

/// Folds a one's complement sum of 16-bit words into a checksum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The sum of an address's two 16-bit words.
#[inline(always)]
fn addr_sum(a: [u8; 4]) -> u32 {
    u32::from(u16::from_be_bytes([a[0], a[1]])) + u32::from(u16::from_be_bytes([a[2], a[3]]))
}

/// Turns the TCP SYN in `ctx` (to a frontend without backends) into the RST|ACK that refuses it,
/// addressed back to its sender from the frontend, as a host with nothing listening answers
/// (RFC 9293 3.10.7.1: no ACK in the SYN, so sequence 0 and acknowledgment SEG.SEQ + SEG.LEN).
/// Its headers are rewritten in place, its options and payload cut off, and both checksums
/// computed afresh. `false` when the SYN's headers are not the plain ones this can rewrite
/// (IP options): the caller drops it.
#[inline(always)]
pub fn into_reset(ctx: &TcContext) -> bool {
    const IP_LEN: usize = 20;
    const TCP_LEN: usize = 20;
    let Some(eth) = packet::ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    let Some(ip) = packet::ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return false;
    };
    let Some(tcp) = packet::ptr_at::<TcpHdr>(ctx, ETH_HLEN + IP_LEN) else {
        return false;
    };
    // SAFETY: all three headers were bounds-checked just above.
    unsafe {
        if (*ip).version_ihl != 0x45 {
            return false;
        }
        let doff = usize::from((*tcp).doff >> 4) * 4;
        let total = usize::from(u16::from_be((*ip).tot_len));
        if doff < TCP_LEN || total < IP_LEN + doff {
            return false;
        }
        // SYN counts as one.
        let ack = u32::from_be_bytes((*tcp).seq)
            .wrapping_add(1)
            .wrapping_add((total - IP_LEN - doff) as u32);
        let (saddr, daddr) = ((*ip).daddr, (*ip).saddr);
        let (sport, dport) = ((*tcp).ports.dport, (*tcp).ports.sport);
        let (src_mac, dst_mac) = ((*eth).dst, (*eth).src);
        packet::set_macs(eth, &dst_mac, &src_mac);

        fresh_ipv4(ip, (IP_LEN + TCP_LEN) as u16, IPPROTO_TCP, saddr, daddr);
        let flags = TCP_RST | TCP_ACK;
        (*tcp).ports.sport = sport;
        (*tcp).ports.dport = dport;
        (*tcp).seq = [0; 4];
        (*tcp).ack_seq = ack.to_be_bytes();
        (*tcp).doff = ((TCP_LEN / 4) as u8) << 4;
        (*tcp).flags = flags;
        (*tcp).window = 0;
        (*tcp).urg_ptr = 0;
        let tcp_sum = addr_sum(saddr)
            + addr_sum(daddr)
            + u32::from(IPPROTO_TCP)
            + TCP_LEN as u32
            + u32::from(u16::from_be(sport))
            + u32::from(u16::from_be(dport))
            + (ack >> 16)
            + (ack & 0xffff)
            + (u32::from((*tcp).doff) << 8 | u32::from(flags));
        (*tcp).check = fold(tcp_sum).to_be();
    }
    // SAFETY: plain helper call; the packet pointers above are not used after it.
    unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IP_LEN + TCP_LEN) as u32, 0) == 0 }
}

/// Fills in a fresh IPv4 header without options (TTL 64, no fragmentation) of a packet of
/// `total` bytes from `saddr` to `daddr`, with its checksum.
///
/// # Safety
/// `ip` must point to a bounds-checked, writable IPv4 header.
#[inline(always)]
unsafe fn fresh_ipv4(ip: *mut Ipv4Hdr, total: u16, protocol: u8, saddr: [u8; 4], daddr: [u8; 4]) {
    const TTL: u8 = 64;
    // SAFETY: the caller guarantees a writable header.
    unsafe {
        (*ip).version_ihl = 0x45;
        (*ip).tos = 0;
        (*ip).tot_len = total.to_be();
        (*ip).id = 0;
        (*ip).frag_off = 0;
        (*ip).ttl = TTL;
        (*ip).protocol = protocol;
        (*ip).saddr = saddr;
        (*ip).daddr = daddr;
        let sum = 0x4500
            + u32::from(total)
            + (u32::from(TTL) << 8 | u32::from(protocol))
            + addr_sum(saddr)
            + addr_sum(daddr);
        (*ip).check = fold(sum).to_be();
    }
}

/// Turns the UDP datagram in `ctx` (to a frontend without backends) into the ICMP port
/// unreachable that refuses it, from the frontend back to its sender, as a host with nothing
/// listening answers: a new IP and ICMP header go in front of the datagram's IP header, and
/// of the datagram only that header and the first 8 bytes stay, the quote RFC 792 asks for
/// (and that the sender's stack matches against its socket). `false` when the datagram's
/// headers are not the plain ones this can quote (IP options, a short datagram): the caller
/// drops it.
#[inline(always)]
pub fn into_port_unreachable(ctx: &TcContext) -> bool {
    const IP_LEN: usize = 20;
    const ICMP_LEN: usize = 8;
    const QUOTE: usize = IP_LEN + 8;
    const TOTAL: usize = IP_LEN + ICMP_LEN + QUOTE;
    const DEST_UNREACH: u8 = 3;
    const PORT_UNREACH: u8 = 3;
    let Some(eth) = packet::ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    let Some(ip) = packet::ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return false;
    };
    if packet::ptr_at::<[u8; QUOTE]>(ctx, ETH_HLEN).is_none() {
        return false;
    }
    // SAFETY: both headers were bounds-checked just above.
    let (client, frontend, pod_mac, gateway_mac) = unsafe {
        if (*ip).version_ihl != 0x45 || usize::from(u16::from_be((*ip).tot_len)) < QUOTE {
            return false;
        }
        ((*ip).saddr, (*ip).daddr, (*eth).src, (*eth).dst)
    };
    if ctx
        .adjust_room((IP_LEN + ICMP_LEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return false;
    }
    // SAFETY: plain helper call; the packet pointers above are not used after it.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + TOTAL) as u32, 0) } != 0 {
        return false;
    }
    let Some(eth) = packet::ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    let Some(ip) = packet::ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return false;
    };
    let Some(icmp) = packet::ptr_at::<IcmpHdr>(ctx, ETH_HLEN + IP_LEN) else {
        return false;
    };
    let Some(quote) = packet::ptr_at::<[u16; QUOTE / 2]>(ctx, ETH_HLEN + IP_LEN + ICMP_LEN) else {
        return false;
    };
    // SAFETY: all four were bounds-checked just above, after the last resize.
    unsafe {
        packet::set_macs(eth, &pod_mac, &gateway_mac);
        fresh_ipv4(ip, TOTAL as u16, IPPROTO_ICMP, frontend, client);
        (*icmp).icmp_type = DEST_UNREACH;
        (*icmp).code = PORT_UNREACH;
        (*icmp).id = 0;
        (*icmp).seq = 0;
        let mut sum = u32::from(DEST_UNREACH) << 8 | u32::from(PORT_UNREACH);
        for word in (*quote).iter() {
            sum += u32::from(u16::from_be(*word));
        }
        (*icmp).check = fold(sum).to_be();
    }
    true
}
