//! Masquerading: source NAT of pods' traffic leaving the cluster (see `myelin_common::nat` for
//! the table's layout and life cycle).
//!
//! Checksums: TCP and UDP go through `bpf_l4_csum_replace`, which knows what an offloaded
//! (`CHECKSUM_PARTIAL`) checksum holds and keeps `CHECKSUM_COMPLETE` in step for the
//! pseudo-header; UDP's "no checksum" 0 stays 0 (`BPF_F_MARK_MANGLED_0`). ICMP has no pseudo
//! header, so every change inside an ICMP message is matched by one of its checksum and the
//! message's sum stays what it was: those are updated here (RFC 1624) and written with
//! `bpf_skb_store_bytes`, which also works on packets whose quoted header lies beyond the
//! linear part. SCTP keeps its ports: its CRC32c covers them but not the addresses.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    btf_maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    helpers::generated::bpf_get_prandom_u32,
    macros::btf_map,
    programs::TcContext,
};
use myelin_common::{
    DropReason, Ipv4Key,
    config::{CONFIG_F_MASQUERADE, DatapathConfig},
    maps::{DEFAULT_MAX_IPCACHE, DEFAULT_MAX_NAT},
    nat::{MasqExclude, NAT_IN, NAT_OUT, NAT_RETRIES, NatEntry, NatKey},
    proto::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    conntrack, endpoint,
    packet::{ETH_HLEN, Flow, ICMP_ECHO_REQUEST, Icmp, IcmpHdr, Ipv4Hdr, Ports, TcpHdr, UdpHdr},
};

/// Both directions of every masqueraded flow. Capacity: `--max-nat`.
#[btf_map(name = "snat")]
static SNAT: LruHashMap<NatKey, NatEntry, { DEFAULT_MAX_NAT as usize }> = LruHashMap::new();

/// Destinations pods reach with their own address: every node's pod CIDR and InternalIP, and
/// `--non-masquerade-cidrs`. Sized like the ipcache, which holds the same node entries.
#[btf_map(name = "masq_exclude")]
static MASQ_EXCLUDE: LpmTrie<Ipv4Key, MasqExclude, { DEFAULT_MAX_IPCACHE as usize }> =
    LpmTrie::new();

const IP_CHECK: usize = ETH_HLEN + offset_of!(Ipv4Hdr, check);
const IP_SADDR: usize = offset_of!(Ipv4Hdr, saddr);
const IP_DADDR: usize = offset_of!(Ipv4Hdr, daddr);
const ICMP_HLEN: usize = size_of::<IcmpHdr>();
const SPORT: usize = offset_of!(Ports, sport);
const DPORT: usize = offset_of!(Ports, dport);

/// Which end of a packet a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source (`to_uplink`: the pod becomes the node; a Service's reply: the backend
    /// becomes the frontend).
    Source,
    /// The destination (`from_uplink`: the node becomes the pod; a Service's frontend becomes
    /// the backend).
    Destination,
}

/// Whether masquerading is on and can work: the agent knows the node's address.
#[inline(always)]
pub fn enabled(config: &DatapathConfig) -> bool {
    config.flags & CONFIG_F_MASQUERADE != 0 && config.node_ip != [0; 4]
}

/// Whether a packet leaving through the uplink is masqueraded: it comes from one of this
/// node's pods and goes outside the cluster. A mask compare first, so that the node's own
/// traffic (tunnel packets included) costs no map lookup.
#[inline(always)]
pub fn masquerades(config: &DatapathConfig, saddr: [u8; 4], daddr: [u8; 4]) -> bool {
    endpoint::in_pod_cidr(config, saddr)
        && MASQ_EXCLUDE
            .get(&Key::new(32, Ipv4Key { addr: daddr }))
            .is_none()
}

/// Whether a TCP or UDP packet to the node's address can be a reply to a masqueraded flow:
/// only if it goes to a port of the NAT range. The node's own connections use ports below it
/// (the agent puts the range above `ip_local_port_range`), and so does the tunnel: they pass
/// with no map lookup.
#[inline(always)]
pub fn may_be_reply(config: &DatapathConfig, dport: u16) -> bool {
    (config.nat_port_min..=config.nat_port_max).contains(&u16::from_be(dport))
}

#[inline(always)]
fn key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, protocol: u8, dir: u8) -> NatKey {
    NatKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        direction: dir,
        _pad: 0,
    }
}

/// Extends an entry's life by conntrack's rules, writing only when its state changes or its
/// lifetime moved by more than [`myelin_common::conntrack::timeout::REFRESH`]. Returns whether
/// it wrote: the other entry of the pair must then follow.
///
/// # Safety
/// `e` must come from a lookup during this program run.
#[inline(always)]
pub(crate) unsafe fn refresh(
    e: *mut NatEntry,
    protocol: u8,
    tcp_flags: u8,
    is_reply: bool,
    now: u64,
) -> bool {
    // SAFETY: the caller's pointer is valid for this run.
    unsafe {
        let Some((flags, expires)) = conntrack::advance(
            u32::from((*e).flags),
            (*e).expires_ns,
            protocol,
            tcp_flags,
            is_reply,
            now,
        ) else {
            return false;
        };
        (*e).flags = flags as u16;
        (*e).expires_ns = expires;
        true
    }
}

/// Gives the other entry of `e`'s pair (at `twin`) `e`'s lifetime and state. The twin must map
/// to `addr`/`port`; a missing one is put back. `false` when another flow holds the key: the
/// pair is broken (the LRU map evicted the twin and its port was given out again).
///
/// # Safety
/// `e` must come from a lookup during this program run.
#[inline(always)]
unsafe fn sync_twin(twin: &NatKey, e: *const NatEntry, addr: [u8; 4], port: u16) -> bool {
    // SAFETY: the caller's pointer is valid for this run.
    let (expires_ns, flags) = unsafe { ((*e).expires_ns, (*e).flags) };
    match SNAT.get_ptr_mut(twin) {
        Some(t) => {
            // SAFETY: pointer from the lookup just above.
            unsafe {
                if (*t).addr != addr || (*t).port != port {
                    return false;
                }
                (*t).expires_ns = expires_ns;
                (*t).flags = flags;
            }
            true
        }
        None => {
            let entry = NatEntry {
                expires_ns,
                addr,
                port,
                flags,
            };
            SNAT.insert(twin, entry, u64::from(BPF_NOEXIST)).is_ok()
        }
    }
}

/// A new mapping for the pod's flow `out`: the pod's own port when the range holds it (any
/// port for ICMP and SCTP) and no live flow to the same remote uses it, else random ports of the
/// range, [`NAT_RETRIES`] tries in all. Returns the NAT port.
#[inline(always)]
fn allocate(config: &DatapathConfig, out: &NatKey, now: u64) -> Result<u16, DropReason> {
    let (min, max) = (config.nat_port_min, config.nat_port_max);
    if min == 0 || max < min {
        return Err(DropReason::NatPortExhausted);
    }
    let original = u16::from_be(out.sport);
    let keep = match out.protocol {
        // An ICMP identifier is no socket's port: the node's own pings cannot be told apart by
        // range anyway. SCTP: the checksum covers the ports (see the module's doc).
        IPPROTO_ICMP | IPPROTO_SCTP => true,
        _ => (min..=max).contains(&original),
    };
    let span = u32::from(max - min) + 1;
    let reply = NatEntry {
        expires_ns: now + conntrack::lifetime(out.protocol, 0),
        addr: out.saddr,
        port: out.sport,
        flags: 0,
    };
    for i in 0..NAT_RETRIES {
        let port = if i == 0 && keep {
            original
        } else if out.protocol == IPPROTO_SCTP {
            return Err(DropReason::NatPortExhausted);
        } else {
            // SAFETY: plain helper call.
            min + (unsafe { bpf_get_prandom_u32() } % span) as u16
        }
        .to_be();
        let k = key(
            out.daddr,
            config.node_ip,
            out.dport,
            port,
            out.protocol,
            NAT_IN,
        );
        // The atomic claim of the port: `BPF_NOEXIST` fails when any flow to this remote has it.
        if SNAT.insert(&k, reply, u64::from(BPF_NOEXIST)).is_err() {
            // SAFETY: copied out at once.
            match unsafe { SNAT.get(&k) }.map(|h| (h.addr, h.port, h.expires_ns)) {
                // This flow itself, whose `out` entry was lost: it keeps its port.
                Some((addr, port, _)) if (addr, port) == (out.saddr, out.sport) => {}
                // A flow that expired and waits for the collector: its port is free, as it
                // would be after the next sweep. Should that flow send again, `sync_twin`
                // finds its port taken and moves it to another.
                Some((_, _, expires)) if expires < now => {
                    if SNAT.insert(&k, reply, u64::from(BPF_ANY)).is_err() {
                        continue;
                    }
                }
                _ => continue,
            }
        }
        let mapping = NatEntry {
            addr: config.node_ip,
            port,
            ..reply
        };
        if SNAT.insert(out, mapping, u64::from(BPF_ANY)).is_err() {
            let _ = SNAT.remove(&k);
            return Err(DropReason::NatPortExhausted);
        }
        return Ok(port);
    }
    Err(DropReason::NatPortExhausted)
}

/// `to_uplink`: translates a pod's packet to the node's address. `l4` is the offset of its
/// transport header.
#[inline(always)]
pub fn snat(
    ctx: &TcContext,
    config: &DatapathConfig,
    flow: &Flow,
    l4: usize,
    later_fragment: bool,
) -> Result<(), DropReason> {
    match (flow.protocol, flow.icmp) {
        (IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP, _) | (IPPROTO_ICMP, Icmp::EchoRequest) => {}
        (IPPROTO_ICMP, Icmp::Error) => return icmp_error(ctx, End::Source, l4),
        // Other protocols and ICMP messages carry nothing to tell flows apart by: they leave
        // as they are.
        _ => return Ok(()),
    }
    let now = conntrack::now();
    let out = key(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
        NAT_OUT,
    );
    let port = match SNAT.get_ptr_mut(&out) {
        Some(e) => {
            // SAFETY: pointer from the lookup just above.
            let port = unsafe { (*e).port };
            // SAFETY: as above.
            let written = unsafe { refresh(e, flow.protocol, flow.tcp_flags, false, now) };
            let reply = key(
                flow.daddr,
                config.node_ip,
                flow.dport,
                port,
                flow.protocol,
                NAT_IN,
            );
            // SAFETY: as above.
            if written && !unsafe { sync_twin(&reply, e, flow.saddr, flow.sport) } {
                // Another flow holds the port now: this one moves to a new port rather than
                // send as that flow.
                let _ = SNAT.remove(&out);
                allocate(config, &out, now)?
            } else {
                port
            }
        }
        // A later fragment whose first fragment was not seen: nothing to map it by.
        None if later_fragment => return Ok(()),
        // The pod answers a connection its peer opened to the pod's own address (a route to
        // the pod CIDR outside the cluster): the answer must come from that address.
        None if conntrack::is_reply(flow, now) => return Ok(()),
        None => allocate(config, &out, now)?,
    };
    rewrite(
        ctx,
        End::Source,
        flow.protocol,
        l4,
        later_fragment,
        (flow.saddr, config.node_ip),
        (flow.sport, port),
    )
}

/// `from_uplink`: translates a reply to a masqueraded flow (a packet to the node's address) back
/// to the pod. Packets of no masqueraded flow are left alone.
#[inline(always)]
pub fn reverse(
    ctx: &TcContext,
    flow: &Flow,
    l4: usize,
    later_fragment: bool,
) -> Result<(), DropReason> {
    // (remote port, NAT port) of the reply.
    let (rport, port) = match (flow.protocol, flow.icmp) {
        (IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP, _) => (flow.sport, flow.dport),
        (IPPROTO_ICMP, Icmp::EchoReply) => (0, flow.sport),
        (IPPROTO_ICMP, Icmp::Error) => return icmp_error(ctx, End::Destination, l4),
        _ => return Ok(()),
    };
    let k = key(flow.saddr, flow.daddr, rport, port, flow.protocol, NAT_IN);
    let Some(e) = SNAT.get_ptr_mut(&k) else {
        return Ok(());
    };
    // SAFETY: pointer from the lookup just above.
    let (pod, pod_port) = unsafe { ((*e).addr, (*e).port) };
    let now = conntrack::now();
    // SAFETY: as above.
    if unsafe { refresh(e, flow.protocol, flow.tcp_flags, true, now) } {
        let out = key(pod, flow.saddr, pod_port, rport, flow.protocol, NAT_OUT);
        // A broken pair is mended or dropped on the pod's side (see `snat`); this packet
        // belongs to the pod either way.
        // SAFETY: as above.
        let _ = unsafe { sync_twin(&out, e, flow.daddr, port) };
    }
    rewrite(
        ctx,
        End::Destination,
        flow.protocol,
        l4,
        later_fragment,
        (flow.daddr, pod),
        (port, pod_port),
    )
}

/// Rewrites one end of a packet: its address, and its port (the identifier for ICMP echo),
/// with the checksums that cover them. `addrs` and `ports` are (from, to), as on the wire.
/// Services' translation (`crate::lb`) uses it too.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    end: End,
    protocol: u8,
    l4: usize,
    later_fragment: bool,
    addrs: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
) -> Result<(), DropReason> {
    let malformed = |_| DropReason::Malformed;
    let (from, to) = (
        u64::from(u32::from_ne_bytes(addrs.0)),
        u64::from(u32::from_ne_bytes(addrs.1)),
    );
    // Later fragments carry no transport header: the first one's checksum covers them.
    if !later_fragment {
        let port_at = l4 + if end == End::Source { SPORT } else { DPORT };
        match protocol {
            IPPROTO_TCP | IPPROTO_UDP => {
                let (check, mangled) = if protocol == IPPROTO_TCP {
                    (l4 + offset_of!(TcpHdr, check), 0)
                } else {
                    (
                        l4 + offset_of!(UdpHdr, check),
                        u64::from(BPF_F_MARK_MANGLED_0),
                    )
                };
                let pseudo = u64::from(BPF_F_PSEUDO_HDR);
                ctx.l4_csum_replace(check, from, to, pseudo | mangled | 4)
                    .map_err(malformed)?;
                if ports.0 != ports.1 {
                    let (p0, p1) = (u64::from(ports.0), u64::from(ports.1));
                    ctx.l4_csum_replace(check, p0, p1, mangled | 2)
                        .map_err(malformed)?;
                    ctx.store(port_at, &ports.1, 0).map_err(malformed)?;
                }
            }
            IPPROTO_ICMP if ports.0 != ports.1 => {
                let check_at = l4 + offset_of!(IcmpHdr, check);
                let check: u16 = ctx.load(check_at).map_err(malformed)?;
                let check = csum_replace2(check, ports.0, ports.1);
                ctx.store(check_at, &check, 0).map_err(malformed)?;
                ctx.store(l4 + offset_of!(IcmpHdr, id), &ports.1, 0)
                    .map_err(malformed)?;
            }
            _ => {}
        }
    }
    let addr_at = ETH_HLEN
        + if end == End::Source {
            IP_SADDR
        } else {
            IP_DADDR
        };
    ctx.l3_csum_replace(IP_CHECK, from, to, 4)
        .map_err(malformed)?;
    ctx.store(addr_at, &addrs.1, 0).map_err(malformed)
}

/// The packet an ICMP error quotes: where its headers are and its tuple. Read with
/// `bpf_skb_load_bytes`, which also reaches beyond the linear part.
pub struct Quote {
    ip: usize,
    l4: usize,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// The packet quoted by the ICMP error whose header is at `icmp`.
#[inline(always)]
pub fn quote(ctx: &TcContext, icmp: usize) -> Option<Quote> {
    let ip = icmp + ICMP_HLEN;
    let version_ihl: u8 = ctx.load(ip).ok()?;
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return None;
    }
    let l4 = ip + usize::from(version_ihl & 0x0f) * 4;
    let protocol: u8 = ctx.load(ip + offset_of!(Ipv4Hdr, protocol)).ok()?;
    let (sport, dport) = match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            (ctx.load(l4 + SPORT).ok()?, ctx.load(l4 + DPORT).ok()?)
        }
        // A translated echo request: the identifier is its "source port", as in the table.
        IPPROTO_ICMP => {
            let icmp_type: u8 = ctx.load(l4 + offset_of!(IcmpHdr, icmp_type)).ok()?;
            if icmp_type != ICMP_ECHO_REQUEST {
                return None;
            }
            (ctx.load(l4 + offset_of!(IcmpHdr, id)).ok()?, 0)
        }
        _ => return None,
    };
    Some(Quote {
        ip,
        l4,
        saddr: ctx.load(ip + IP_SADDR).ok()?,
        daddr: ctx.load(ip + IP_DADDR).ok()?,
        sport,
        dport,
        protocol,
    })
}

/// Translates an ICMP error about a masqueraded flow: the outer address (the packet's own end
/// at `end`) and, inside the quote, the other end, which is the same host: the node in what the
/// world sees, the pod in what the pod sees. "Fragmentation needed" above all: without it path
/// MTU discovery breaks for pods. The quote's transport checksum is updated where the quote
/// holds it (UDP and ICMP always, TCP when more than 8 bytes are quoted), as Linux's NAT does.
#[inline(always)]
fn icmp_error(ctx: &TcContext, end: End, icmp: usize) -> Result<(), DropReason> {
    let Some(q) = quote(ctx, icmp) else {
        return Ok(());
    };
    // The quoted packet went the other way: its tuple reversed is its flow's key, `in` for
    // what the node sent (remote, node, remote port, NAT port), `out` for what the pod was sent
    // (pod, remote, pod port, remote port). An echo request's "ports" are (identifier, 0).
    let dir = if end == End::Destination {
        NAT_IN
    } else {
        NAT_OUT
    };
    if q.protocol == IPPROTO_ICMP && end == End::Source {
        return Ok(());
    }
    let k = key(q.daddr, q.saddr, q.dport, q.sport, q.protocol, dir);
    // SAFETY: copied out at once.
    let Some((addr, port)) = (unsafe { SNAT.get(&k) }).map(|e| (e.addr, e.port)) else {
        return Ok(());
    };
    translate_icmp_error(ctx, end, icmp, &q, addr, port, true)
}

/// Rewrites an ICMP error whose quoted packet `q` was translated: inside the quote, its source
/// (`end` Destination: the error goes to the host that sent the quoted packet) or its
/// destination (`end` Source: the error comes from the host the quoted packet went to) becomes
/// `addr`/`port`, and with `outer` the outer header's end at `end` too (the same host as the
/// quote's). Every checksum is kept right. Services' replies use it too (`crate::lb`).
#[inline(always)]
pub fn translate_icmp_error(
    ctx: &TcContext,
    end: End,
    icmp: usize,
    q: &Quote,
    addr: [u8; 4],
    port: u16,
    outer: bool,
) -> Result<(), DropReason> {
    // The quoted end to rewrite: the source of what the node sent, the destination of what
    // the pod was sent.
    let (q_addr_at, q_port_at, old_addr, old_port) = match (end, q.protocol) {
        (End::Destination, IPPROTO_ICMP) => (
            q.ip + IP_SADDR,
            q.l4 + offset_of!(IcmpHdr, id),
            q.saddr,
            q.sport,
        ),
        (End::Destination, _) => (q.ip + IP_SADDR, q.l4 + SPORT, q.saddr, q.sport),
        (End::Source, _) => (q.ip + IP_DADDR, q.l4 + DPORT, q.daddr, q.dport),
    };
    let check = match q.protocol {
        IPPROTO_ICMP => Some(q.l4 + offset_of!(IcmpHdr, check)),
        IPPROTO_TCP => Some(q.l4 + offset_of!(TcpHdr, check)),
        IPPROTO_UDP => Some(q.l4 + offset_of!(UdpHdr, check)),
        _ => None,
    };

    let malformed = |_| DropReason::Malformed;
    let icmp_check_at = icmp + offset_of!(IcmpHdr, check);
    let Ok(mut icmp_check) = ctx.load::<u16>(icmp_check_at) else {
        return Ok(());
    };
    let q_ip_check_at = q.ip + offset_of!(Ipv4Hdr, check);
    let Ok(q_ip_check) = ctx.load::<u16>(q_ip_check_at) else {
        return Ok(());
    };
    let new_q_ip_check = csum_replace4(q_ip_check, old_addr, addr);
    icmp_check = csum_replace4(icmp_check, old_addr, addr);
    icmp_check = csum_replace2(icmp_check, q_ip_check, new_q_ip_check);
    icmp_check = csum_replace2(icmp_check, old_port, port);
    // The quoted transport checksum, if the quote holds it; UDP's 0 means none.
    let l4_check = check
        .and_then(|at| ctx.load::<u16>(at).ok().map(|c| (at, c)))
        .filter(|&(_, c)| !(q.protocol == IPPROTO_UDP && c == 0));
    if let Some((at, c)) = l4_check {
        let mut n = csum_replace2(c, old_port, port);
        if q.protocol != IPPROTO_ICMP {
            n = csum_replace4(n, old_addr, addr);
        }
        if q.protocol == IPPROTO_UDP && n == 0 {
            n = 0xffff;
        }
        icmp_check = csum_replace2(icmp_check, c, n);
        ctx.store(at, &n, 0).map_err(malformed)?;
    }
    ctx.store(q_addr_at, &addr, 0).map_err(malformed)?;
    ctx.store(q_ip_check_at, &new_q_ip_check, 0)
        .map_err(malformed)?;
    ctx.store(q_port_at, &port, 0).map_err(malformed)?;
    ctx.store(icmp_check_at, &icmp_check, 0)
        .map_err(malformed)?;
    if !outer {
        return Ok(());
    }
    // The outer header: the node's address for the pod's, or the other way round.
    let outer_at = ETH_HLEN
        + if end == End::Destination {
            IP_DADDR
        } else {
            IP_SADDR
        };
    ctx.l3_csum_replace(
        IP_CHECK,
        u64::from(u32::from_ne_bytes(old_addr)),
        u64::from(u32::from_ne_bytes(addr)),
        4,
    )
    .map_err(malformed)?;
    ctx.store(outer_at, &addr, 0).map_err(malformed)
}

/// A checksum after a 16-bit word it covers changed from `old` to `new` (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')). Words as they lie in the packet; the sum does not depend on the
/// byte order as long as every word is read the same way.
#[inline(always)]
fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// As [`csum_replace2`], for an address (two words).
#[inline(always)]
fn csum_replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let word = |a: [u8; 4], i: usize| u16::from_ne_bytes([a[i], a[i + 1]]);
    let check = csum_replace2(check, word(old, 0), word(new, 0));
    csum_replace2(check, word(old, 2), word(new, 2))
}
