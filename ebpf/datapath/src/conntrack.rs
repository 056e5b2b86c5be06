//! Connection tracking (see `myelin_common::conntrack`).

use aya_ebpf::{
    btf_maps::LruHashMap, helpers::generated::bpf_ktime_get_coarse_ns, macros::btf_map,
};
use myelin_common::{
    conntrack::{
        CT_F_CLOSING, CT_F_DENIED_EGRESS, CT_F_DENIED_INGRESS, CT_F_SEEN_REPLY, CtEntry, CtKey,
        timeout,
    },
    maps::DEFAULT_MAX_CONNTRACK,
    proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::packet::{Flow, Icmp, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple};

#[btf_map(name = "conntrack")]
static CONNTRACK: LruHashMap<CtKey, CtEntry, { DEFAULT_MAX_CONNTRACK as usize }> =
    LruHashMap::new();

/// Where a packet stands relative to the connections already seen.
pub enum State {
    /// First packet of a flow: policy decides.
    New,
    /// A packet in the direction the flow started in.
    Established(*mut CtEntry, CtKey),
    /// A packet in the other direction.
    Reply(*mut CtEntry, CtKey),
    /// An ICMP error about a tracked flow, with that flow's `CT_F_*` flags.
    Related(u32),
}

#[inline(always)]
fn key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, protocol: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The flow's key in the direction of this packet.
#[inline(always)]
fn forward_key(flow: &Flow) -> CtKey {
    key(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
    )
}

/// The clock entries' lifetimes are measured on, read once per packet: CLOCK_MONOTONIC at tick
/// resolution. The coarse clock reads a value the timer tick stored instead of the TSC, which
/// took a tenth of the program's run time (bpf_stats: 271-293 against 305-316 ns a packet
/// with `bpf_ktime_get_ns`); lifetimes are seconds, so a few milliseconds of lag do not matter.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn live(k: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(k)?;
    // SAFETY: pointer from a successful lookup; the program is the only writer of the fields it
    // reads here, and a concurrent rewrite at worst makes an entry look expired.
    if unsafe { (*e).expires_ns } < now {
        return None;
    }
    Some(e)
}

/// Finds the flow's state. An echo request is only ever looked up forward, and an echo reply
/// only reversed, so a request can never pass as a reply.
#[inline(always)]
pub fn lookup(flow: &Flow, now: u64) -> State {
    match flow.icmp {
        Icmp::EchoRequest => {
            let fwd = forward_key(flow);
            match live(&fwd, now) {
                Some(e) => State::Established(e, fwd),
                None => State::New,
            }
        }
        Icmp::EchoReply => {
            // The request was tracked as (requester -> responder, id, 0).
            let request = key(flow.daddr, flow.saddr, flow.sport, 0, flow.protocol);
            match live(&request, now) {
                Some(e) => State::Reply(e, request),
                None => State::New,
            }
        }
        Icmp::Error => match related(&flow.inner, now) {
            Some(flags) => State::Related(flags),
            None => State::New,
        },
        _ => {
            let fwd = forward_key(flow);
            if let Some(e) = live(&fwd, now) {
                // SAFETY: pointer from a successful lookup during this run.
                if reopens(flow.protocol, flow.tcp_flags, unsafe { (*e).flags }) {
                    return State::New;
                }
                return State::Established(e, fwd);
            }
            let rev = key(
                flow.daddr,
                flow.saddr,
                flow.dport,
                flow.sport,
                flow.protocol,
            );
            match live(&rev, now) {
                // SAFETY: as above.
                Some(e) if reopens(flow.protocol, flow.tcp_flags, unsafe { (*e).flags }) => {
                    State::New
                }
                Some(e) => State::Reply(e, rev),
                None => State::New,
            }
        }
    }
}

/// Whether a TCP packet with `tcp_flags` opens a new connection on the tuple of a tracked one
/// in state `flags`: a SYN (without ACK) after that connection closed (FIN or RST seen). A
/// client reuses a port as soon as its side is closed, well within the closing lifetime; the
/// new connection must start afresh (policy checked, a backend chosen, opening and established
/// lifetimes), not inherit the closed one's state and 10 s lifetime.
#[inline(always)]
pub fn reopens(protocol: u8, tcp_flags: u8, flags: u32) -> bool {
    protocol == IPPROTO_TCP
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && flags & CT_F_CLOSING != 0
}

/// Whether the packet belongs to a connection its destination opened (a reply).
#[inline(always)]
pub fn is_reply(flow: &Flow, now: u64) -> bool {
    matches!(lookup(flow, now), State::Reply(..))
}

/// The flags of the tracked flow the packet an ICMP error quotes belongs to, in either
/// direction.
#[inline(always)]
fn related(t: &Tuple, now: u64) -> Option<u32> {
    let (sport, dport) = match t.protocol {
        IPPROTO_ICMP => (t.sport, 0),
        _ => (t.sport, t.dport),
    };
    let e = live(&key(t.saddr, t.daddr, sport, dport, t.protocol), now)
        .or_else(|| live(&key(t.daddr, t.saddr, dport, sport, t.protocol), now))?;
    // SAFETY: pointer from a successful lookup during this run.
    Some(unsafe { (*e).flags })
}

/// How long a flow lives without packets, by its `CT_F_*` state (masquerading's entries live
/// by the same rules).
#[inline(always)]
pub fn lifetime(protocol: u8, flags: u32) -> u64 {
    match protocol {
        IPPROTO_TCP if flags & CT_F_CLOSING != 0 => timeout::TCP_CLOSING,
        IPPROTO_TCP if flags & CT_F_SEEN_REPLY != 0 => timeout::TCP_ESTABLISHED,
        IPPROTO_TCP => timeout::TCP_OPENING,
        IPPROTO_UDP => timeout::UDP,
        _ => timeout::OTHER,
    }
}

/// Starts tracking a flow allowed under `revision`. `Err` if the map refused the entry.
#[inline(always)]
pub fn create(flow: &Flow, revision: u32, flags: u32, now: u64) -> Result<(), ()> {
    let k = forward_key(flow);
    let entry = CtEntry {
        expires_ns: now + lifetime(flow.protocol, flags),
        revision,
        flags,
    };
    CONNTRACK.insert(k, entry, 0).map_err(|_| ())
}

/// A flow's state and lifetime after a packet, by conntrack's rules: `None` when neither moved
/// enough to be written (see `CtEntry`). Masquerading's and Services' tables follow the same
/// rules with this.
#[inline(always)]
pub fn advance(
    flags: u32,
    expires_ns: u64,
    protocol: u8,
    tcp_flags: u8,
    is_reply: bool,
    now: u64,
) -> Option<(u32, u64)> {
    let mut new = flags;
    if reopens(protocol, tcp_flags, flags) {
        new &= !(CT_F_CLOSING | CT_F_SEEN_REPLY);
    }
    if is_reply {
        new |= CT_F_SEEN_REPLY;
    }
    if protocol == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        new |= CT_F_CLOSING;
    }
    let expires = now + lifetime(protocol, new);
    if new == flags && expires <= expires_ns + timeout::REFRESH {
        return None;
    }
    Some((new, expires))
}

/// Extends a tracked flow's life, writing only when something changes by more than
/// [`timeout::REFRESH`] (see `CtEntry`).
///
/// # Safety
/// `e` must come from [`lookup`] during this program run.
#[inline(always)]
pub unsafe fn refresh(e: *mut CtEntry, protocol: u8, tcp_flags: u8, is_reply: bool, now: u64) {
    unsafe {
        if let Some((flags, expires)) = advance(
            (*e).flags,
            (*e).expires_ns,
            protocol,
            tcp_flags,
            is_reply,
            now,
        ) {
            (*e).flags = flags;
            (*e).expires_ns = expires;
        }
    }
}

/// Marks a flow as cut by policy (or allowed again), under the current revision.
///
/// # Safety
/// `e` must come from [`lookup`] during this program run.
#[inline(always)]
pub unsafe fn set_verdict(e: *mut CtEntry, revision: u32, denied: u32) {
    unsafe {
        (*e).flags = ((*e).flags & !(CT_F_DENIED_INGRESS | CT_F_DENIED_EGRESS)) | denied;
        (*e).revision = revision;
    }
}
