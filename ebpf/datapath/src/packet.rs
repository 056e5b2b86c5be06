//! Header layouts, bounds-checked direct packet access, and the flow a packet belongs to.
//!
//! Direct access (`data`..`data_end`) instead of `bpf_skb_load_bytes` keeps the per-packet cost
//! at a few instructions; the verifier rejects any access that is not checked against
//! `data_end` first, which `ptr_at` does.

use core::mem::{offset_of, size_of};

use aya_ebpf::programs::TcContext;
use myelin_common::proto::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::fragments;

/// Where the IPv4 (or ARP) header starts.
pub const ETH_HLEN: usize = size_of::<EthHdr>();

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// IPv4 flags and fragment offset (host order): more fragments follow; offset mask.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// ARP for Ethernet/IPv4: everything up to the sender's protocol address.
#[repr(C)]
struct ArpSenderPrefix {
    hw_type: u16,
    proto_type: u16,
    hw_len: u8,
    proto_len: u8,
    op: u16,
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
}

/// The first 8 bytes of an ICMP message.
#[repr(C)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: u16,
    /// Echo: identifier (network order).
    pub id: u16,
    pub seq: u16,
}

/// Source and destination port: the first 4 bytes of TCP, UDP and SCTP headers alike.
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

/// The TCP header without options. Only the flags are read through it (by offset, so that a
/// packet needs no more than the flags byte to be read).
#[repr(C)]
pub struct TcpHdr {
    pub ports: Ports,
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// Data offset (high nibble) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub ports: Ports,
    pub len: u16,
    /// 0: the sender computed no checksum.
    pub check: u16,
}

// The wire sizes and offsets (RFC 791, 792, 793, 826, IEEE 802.3): the structs above must match
// them byte for byte, since packets are read through them.
const _: () = assert!(ETH_HLEN == 14);
const _: () = assert!(size_of::<Ipv4Hdr>() == 20);
const _: () = assert!(size_of::<ArpSenderPrefix>() == 18);
const _: () = assert!(size_of::<IcmpHdr>() == 8);
const _: () = assert!(size_of::<TcpHdr>() == 20);
const _: () = assert!(offset_of!(TcpHdr, flags) == 13);
const _: () = assert!(offset_of!(TcpHdr, check) == 16);
const _: () = assert!(size_of::<UdpHdr>() == 8);

/// What conntrack needs to know about an ICMP message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Icmp {
    /// Not ICMP.
    None,
    EchoRequest,
    EchoReply,
    /// An error about an earlier packet, whose tuple is `inner`.
    Error,
    Other,
}

/// A packet's flow: the conntrack and policy view of it.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network byte order. ICMP echo: the identifier; 0 for other ICMP.
    pub sport: u16,
    /// Network byte order. 0 for ICMP and for non-first fragments.
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub icmp: Icmp,
    /// For ICMP errors (`icmp == Icmp::Error`): the tuple of the packet the error is about,
    /// as that packet was sent; all zero when it could not be read. Not an `Option`: a `None`
    /// leaves undefined bytes that the verifier refuses to see copied.
    pub inner: Tuple,
}

#[derive(Clone, Copy, Default)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// A pointer to a `T` at `offset`, if the whole `T` lies within the packet's linear data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The interface the program runs on: the host-side veth, at ingress and at egress.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed in; reading its fields is allowed.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
pub fn eth(ctx: &TcContext) -> Option<*mut EthHdr> {
    ptr_at(ctx, 0)
}

#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Option<*mut Ipv4Hdr> {
    ipv4_at(ctx, ETH_HLEN)
}

#[inline(always)]
fn ipv4_at(ctx: &TcContext, offset: usize) -> Option<*mut Ipv4Hdr> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let version_ihl = unsafe { (*ip).version_ihl };
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return None;
    }
    Some(ip)
}

/// Header length in bytes (20..=60), from a validated header.
#[inline(always)]
fn ihl(ip: *const Ipv4Hdr) -> usize {
    // SAFETY: the caller validated the header.
    usize::from(unsafe { (*ip).version_ihl } & 0x0f) * 4
}

/// Where the transport header of the packet whose (validated) IPv4 header is `ip` starts.
#[inline(always)]
pub fn l4_offset(ip: *const Ipv4Hdr) -> usize {
    ETH_HLEN + ihl(ip)
}

/// Whether the packet is a fragment of a datagram, the first one included.
#[inline(always)]
pub fn is_fragment(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: the caller validated the header.
    u16::from_be(unsafe { (*ip).frag_off }) & (IP_MF | IP_OFFSET) != 0
}

/// Whether the packet is a fragment other than the first: it carries no transport header.
#[inline(always)]
pub fn later_fragment(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: the caller validated the header.
    u16::from_be(unsafe { (*ip).frag_off }) & IP_OFFSET != 0
}

#[inline(always)]
pub fn arp_sender_ip(ctx: &TcContext) -> Option<[u8; 4]> {
    let arp: *const ArpSenderPrefix = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        if (*arp).hw_len != 6 || (*arp).proto_len != 4 {
            return None;
        }
        Some((*arp).sender_ip)
    }
}

/// The flow of the IPv4 packet whose header is `ip`. `None` if the transport header it
/// announces is truncated.
#[inline(always)]
pub fn flow(ctx: &TcContext, ip: *const Ipv4Hdr) -> Option<Flow> {
    // SAFETY: `ip` was validated by `ipv4`.
    let (saddr, daddr, protocol, frag_off, id) = unsafe {
        (
            (*ip).saddr,
            (*ip).daddr,
            (*ip).protocol,
            (*ip).frag_off,
            (*ip).id,
        )
    };
    let mut flow = Flow {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        protocol,
        tcp_flags: 0,
        icmp: Icmp::None,
        inner: Tuple::default(),
    };
    let frag_off = u16::from_be(frag_off);
    // Later fragments carry no transport header: they take their datagram's ports from its
    // first fragment, or match port-less rules only when that was not seen.
    if frag_off & IP_OFFSET != 0 {
        if let Some((sport, dport)) = fragments::ports(saddr, daddr, id, protocol) {
            flow.sport = sport;
            flow.dport = dport;
        }
        return Some(flow);
    }
    let l4 = ETH_HLEN + ihl(ip);
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: *const Ports = ptr_at(ctx, l4)?;
            // SAFETY: bounds-checked by `ptr_at`.
            unsafe {
                flow.sport = (*ports).sport;
                flow.dport = (*ports).dport;
            }
            if protocol == IPPROTO_TCP {
                let flags: *const u8 = ptr_at(ctx, l4 + offset_of!(TcpHdr, flags))?;
                // SAFETY: bounds-checked by `ptr_at`.
                flow.tcp_flags = unsafe { *flags };
            }
            if frag_off & IP_MF != 0 {
                fragments::remember(saddr, daddr, id, protocol, flow.sport, flow.dport);
            }
        }
        IPPROTO_ICMP => {
            let icmp: *const IcmpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds-checked by `ptr_at`.
            let (icmp_type, id) = unsafe { ((*icmp).icmp_type, (*icmp).id) };
            flow.icmp = match icmp_type {
                ICMP_ECHO_REQUEST => Icmp::EchoRequest,
                ICMP_ECHO_REPLY => Icmp::EchoReply,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => Icmp::Error,
                _ => Icmp::Other,
            };
            match flow.icmp {
                Icmp::EchoRequest | Icmp::EchoReply => flow.sport = id,
                // The quoted packet follows the ICMP header.
                Icmp::Error => {
                    flow.inner = inner_tuple(ctx, l4 + size_of::<IcmpHdr>()).unwrap_or_default()
                }
                _ => {}
            }
        }
        _ => {}
    }
    Some(flow)
}

/// Whether the packet can only be the first of a connection: a TCP SYN without ACK, or an
/// ICMP echo request. Never an answer to anything.
#[inline(always)]
pub fn opens_connection(flow: &Flow) -> bool {
    match flow.protocol {
        IPPROTO_TCP => flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        _ => flow.icmp == Icmp::EchoRequest,
    }
}

/// The tuple of the packet quoted in an ICMP error (its IP header and first 8 bytes).
///
/// Read with `bpf_skb_load_bytes` rather than through the packet pointers: the quote may lie
/// beyond the linear part of the buffer (a driver that puts only the headers there), where
/// direct access cannot reach, and an ICMP error whose quote could not be read would lose its
/// flow (a "fragmentation needed" dropped as unrelated breaks path MTU discovery). ICMP errors
/// are rare; the copy costs nothing on other packets.
#[inline(always)]
fn inner_tuple(ctx: &TcContext, offset: usize) -> Option<Tuple> {
    let ip: Ipv4Hdr = ctx.load(offset).ok()?;
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 {
        return None;
    }
    let mut tuple = Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        protocol: ip.protocol,
    };
    let l4 = offset + usize::from(ip.version_ihl & 0x0f) * 4;
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: Ports = ctx.load(l4).ok()?;
            tuple.sport = ports.sport;
            tuple.dport = ports.dport;
        }
        IPPROTO_ICMP => {
            let icmp: IcmpHdr = ctx.load(l4).ok()?;
            if icmp.icmp_type == ICMP_ECHO_REQUEST {
                tuple.sport = icmp.id;
            }
        }
        _ => {}
    }
    Some(tuple)
}

/// Sets the destination and source MAC with four plain stores: assigning `[u8; 6]` fields
/// makes the BPF backend call a memmove subprogram on every packet.
///
/// # Safety
/// `eth` must point to a bounds-checked, writable Ethernet header.
#[inline(always)]
pub unsafe fn set_macs(eth: *mut EthHdr, dst: &[u8; 6], src: &[u8; 6]) {
    const HEAD: usize = size_of::<u32>();
    const DST: usize = offset_of!(EthHdr, dst);
    const SRC: usize = offset_of!(EthHdr, src);
    let head = |m: &[u8; 6]| u32::from_ne_bytes([m[0], m[1], m[2], m[3]]);
    let tail = |m: &[u8; 6]| u16::from_ne_bytes([m[4], m[5]]);
    let p = eth.cast::<u8>();
    // SAFETY: the caller guarantees a writable Ethernet header; both MACs lie within it.
    unsafe {
        p.add(DST).cast::<u32>().write_unaligned(head(dst));
        p.add(DST + HEAD).cast::<u16>().write_unaligned(tail(dst));
        p.add(SRC).cast::<u32>().write_unaligned(head(src));
        p.add(SRC + HEAD).cast::<u16>().write_unaligned(tail(src));
    }
}

/// Decrements the TTL and patches the header checksum incrementally (RFC 1624), as the kernel's
/// `ip_decrease_ttl` does: the TTL is the high byte of its 16-bit word, so the sum moves by
/// 0x0100 in network order.
///
/// # Safety
/// `ip` must point to a bounds-checked, writable IPv4 header.
#[inline(always)]
pub unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    // SAFETY: the caller guarantees a writable IPv4 header.
    unsafe {
        let mut check = u32::from((*ip).check);
        check += u32::from(0x0100u16.to_be());
        (*ip).check = (check + u32::from(check >= 0xffff)) as u16;
        (*ip).ttl -= 1;
    }
}
