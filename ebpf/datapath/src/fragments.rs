//! IPv4 fragments: only the first fragment carries the transport header, so the ports of a
//! fragmented datagram are remembered from its first fragment and given to the later ones.
//! Without this, the later fragments of a UDP datagram allowed on one port would look portless
//! and be dropped by a port rule. Fragments are short-lived: an unpinned LRU map.

use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};

#[repr(C)]
#[derive(Clone, Copy)]
struct FragmentKey {
    saddr: [u8; 4],
    daddr: [u8; 4],
    /// IP identification, network order.
    id: u16,
    protocol: u8,
    _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FragmentPorts {
    sport: u16,
    dport: u16,
}

#[btf_map(name = "fragments")]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, 8192> = LruHashMap::new();

#[inline(always)]
fn key(saddr: [u8; 4], daddr: [u8; 4], id: u16, protocol: u8) -> FragmentKey {
    FragmentKey {
        saddr,
        daddr,
        id,
        protocol,
        _pad: 0,
    }
}

/// Records the ports of a datagram's first fragment.
#[inline(always)]
pub fn remember(saddr: [u8; 4], daddr: [u8; 4], id: u16, protocol: u8, sport: u16, dport: u16) {
    // A full map evicts the oldest datagram; losing one only drops its later fragments.
    let _ = FRAGMENTS.insert(
        key(saddr, daddr, id, protocol),
        FragmentPorts { sport, dport },
        0,
    );
}

/// The ports of the datagram a later fragment belongs to, if its first fragment was seen.
#[inline(always)]
pub fn ports(saddr: [u8; 4], daddr: [u8; 4], id: u16, protocol: u8) -> Option<(u16, u16)> {
    // SAFETY: the value is copied out at once.
    unsafe { FRAGMENTS.get(key(saddr, daddr, id, protocol)) }.map(|p| (p.sport, p.dport))
}
