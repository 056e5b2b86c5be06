//! Connection tracking (see `myelin_common::conntrack`).

use aya_ebpf::{btf_maps::LruHashMap, helpers::generated::bpf_ktime_get_ns, macros::btf_map};
use myelin_common::{
    conntrack::{CT_F_CLOSING, CT_F_SEEN_REPLY, CtEntry, CtKey, timeout},
    maps::DEFAULT_MAX_CONNTRACK,
};

use crate::packet::{Flow, IPPROTO_TCP, IPPROTO_UDP, Icmp, TCP_FIN, TCP_RST, Tuple};

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
    /// An ICMP error about a tracked flow.
    Related,
}

#[inline(always)]
fn key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, protocol: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn live(k: &CtKey) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(k)?;
    // SAFETY: pointer from a successful lookup; the program is the only writer of the fields it
    // reads here, and a concurrent rewrite at worst makes an entry look expired.
    if unsafe { (*e).expires_ns } < now() {
        return None;
    }
    Some(e)
}

/// Finds the flow's state. An echo request is only ever looked up forward, and an echo reply
/// only reversed, so a request can never pass as a reply.
#[inline(always)]
pub fn lookup(flow: &Flow) -> State {
    let fwd = key(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
    );
    let rev = key(
        flow.daddr,
        flow.saddr,
        flow.dport,
        flow.sport,
        flow.protocol,
    );
    match flow.icmp {
        Icmp::EchoRequest => match live(&fwd) {
            Some(e) => State::Established(e, fwd),
            None => State::New,
        },
        Icmp::EchoReply => {
            // The request was tracked as (requester -> responder, id, 0).
            let request = key(flow.daddr, flow.saddr, flow.sport, 0, flow.protocol);
            match live(&request) {
                Some(e) => State::Reply(e, request),
                None => State::New,
            }
        }
        Icmp::Error if related(&flow.inner) => State::Related,
        Icmp::Error => State::New,
        _ => {
            if let Some(e) = live(&fwd) {
                State::Established(e, fwd)
            } else if let Some(e) = live(&rev) {
                State::Reply(e, rev)
            } else {
                State::New
            }
        }
    }
}

/// Whether the packet an ICMP error quotes belongs to a tracked flow, in either direction.
#[inline(always)]
fn related(t: &Tuple) -> bool {
    let (sport, dport) = match t.protocol {
        crate::packet::IPPROTO_ICMP => (t.sport, 0),
        _ => (t.sport, t.dport),
    };
    live(&key(t.saddr, t.daddr, sport, dport, t.protocol)).is_some()
        || live(&key(t.daddr, t.saddr, dport, sport, t.protocol)).is_some()
}

#[inline(always)]
fn lifetime(protocol: u8, flags: u32) -> u64 {
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
pub fn create(flow: &Flow, revision: u32, flags: u32, len: u32) -> Result<(), ()> {
    let k = key(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
    );
    let entry = CtEntry {
        expires_ns: now() + lifetime(flow.protocol, flags),
        revision,
        flags,
        packets: 1,
        bytes: u64::from(len),
    };
    CONNTRACK.insert(k, entry, 0).map_err(|_| ())
}

/// Accounts a packet of a tracked flow and extends its life.
///
/// # Safety
/// `e` must come from [`lookup`] during this program run.
#[inline(always)]
pub unsafe fn refresh(e: *mut CtEntry, protocol: u8, tcp_flags: u8, is_reply: bool, len: u32) {
    unsafe {
        let mut flags = (*e).flags;
        if is_reply {
            flags |= CT_F_SEEN_REPLY;
        }
        if protocol == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags |= CT_F_CLOSING;
        }
        (*e).flags = flags;
        (*e).expires_ns = now() + lifetime(protocol, flags);
        (*e).packets += 1;
        (*e).bytes += u64::from(len);
    }
}

/// Forgets a flow that policy no longer allows.
#[inline(always)]
pub fn remove(k: &CtKey) {
    let _ = CONNTRACK.remove(k);
}
