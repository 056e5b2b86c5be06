//! Packets for pods on other nodes: into the tunnel, or out of the uplink unencapsulated.
//!
//! - Tunnel (`CONFIG_F_TUNNEL`): the packet gets a tunnel key (the remote node's InternalIP,
//!   and the sender's security identity as the VNI) and goes to `myelin_vxlan`, a VXLAN device
//!   in collect-metadata mode, which encapsulates it. The receiving node takes the sender's
//!   identity from the VNI: its policy holds even before its watch has seen the remote pod.
//!   The outer UDP checksum is left zero (`BPF_F_ZERO_CSUM_TX`): VXLAN's inner packet carries
//!   its own checksums, and no offload bug can corrupt a checksum that is not there.
//! - Native (`CONFIG_F_NATIVE`): a node on the uplink's subnet is the next hop of the route the
//!   agent installs to its pods, so the packet goes to it with `bpf_redirect_neigh` and the node
//!   as next hop: the kernel's neighbour output fills in the MACs (and resolves the neighbour
//!   if need be), and the FIB is not asked (its lookup was a fifth of the programs' time on the
//!   path). For a node behind a router, a FIB lookup gives the next hop through the uplink; the
//!   packet goes there with its MACs rewritten, or through `bpf_redirect_neigh` when the
//!   neighbour is not resolved yet. Anything the FIB cannot answer goes to the node's stack.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::{
        BPF_F_ZERO_CSUM_TX, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
        TC_ACT_REDIRECT, bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
        bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_get_tunnel_key,
        bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use myelin_common::{
    config::{
        CONFIG_F_MASQUERADE, CONFIG_F_NATIVE, CONFIG_F_TUNNEL, DatapathConfig, MARK_ROUTED_TO_NODE,
    },
    identity,
};

use crate::{
    endpoint,
    packet::{self, EthHdr, Ipv4Hdr},
};

const AF_INET: u8 = 2;
/// The outer IPv4 TTL of tunnel packets.
const TUNNEL_TTL: u8 = 64;

/// Zeroes `value` in place, as 32-bit words, and hands it out. `mem::zeroed` of a helper's
/// argument struct (`bpf_fib_lookup`, 64 bytes; `bpf_tunnel_key`, 44) becomes a call to
/// `memset`, which the BPF target builds as a subprogram storing one byte per loop iteration:
/// 64 iterations on every packet to another node. Volatile stores are not merged back into that
/// call. In place, not returned by value: a returned copy takes a second stack slot, and
/// `nodeport_in`'s stack has no room for it.
///
/// # Safety
/// `T` must be a plain C struct for which all-zero bytes are a valid value, its size a
/// multiple of 4.
#[inline(always)]
unsafe fn zero_by_words<T>(value: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>() % 4 == 0) };
    let words = value.as_mut_ptr().cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: `i` words stay within the value; a stack slot of `T`, aligned for its
        // fields, is aligned for `u32` (both structs hold `u32`s).
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written, and all-zero is a valid `T` (the caller's promise).
    unsafe { value.assume_init_mut() }
}

/// The VNI a node's own traffic carries, and what a receiver makes of it: the node is the
/// receiver's remote node (its own `HOST` would exempt it from policy).
#[inline(always)]
pub fn identity_from_vni(vni: u32) -> u32 {
    if vni == identity::HOST {
        identity::REMOTE_NODE
    } else {
        vni
    }
}

/// The address at the other end of the tunnel. The key holds it in host byte order.
#[inline(always)]
pub fn remote_addr(key: &bpf_tunnel_key) -> [u8; 4] {
    // SAFETY: the union's IPv4 member; IPv6 keys are never asked for here.
    unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes()
}

/// The tunnel key of a packet: set on a packet about to be encapsulated, or read from one
/// that was decapsulated. `None` without one.
#[inline(always)]
pub fn tunnel_key(ctx: &TcContext) -> Option<bpf_tunnel_key> {
    let mut key = MaybeUninit::<bpf_tunnel_key>::uninit();
    // SAFETY: an all-zero bpf_tunnel_key is a valid value of that plain C struct.
    let key = unsafe { zero_by_words(&mut key) };
    // SAFETY: the helper writes at most `size` bytes into `key`.
    let ret =
        unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, key, size_of::<bpf_tunnel_key>() as u32, 0) };
    (ret == 0).then_some(*key)
}

/// Gives the packet the tunnel key towards `node`, carrying `identity`.
#[inline(always)]
pub fn set_tunnel_key(ctx: &TcContext, node: [u8; 4], identity: u32) -> bool {
    let mut key = MaybeUninit::<bpf_tunnel_key>::uninit();
    // SAFETY: as above.
    let key = unsafe { zero_by_words(&mut key) };
    key.tunnel_id = identity;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: the helper reads `size` bytes of `key`.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            key,
            size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    ret == 0
}

/// Sends a pod's packet to the pod on the node at `node`, by the routing mode. `eth` and `ip`
/// are the packet's bounds-checked headers. Like a router, the node decrements the TTL of what
/// it forwards itself; without a routing mode (a single node), or when the FIB has no answer,
/// the node's stack gets the packet as it came (and forwards it, decrementing the TTL).
#[inline(always)]
pub fn to_node(
    ctx: &TcContext,
    config: &DatapathConfig,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    node: [u8; 4],
    src_identity: u32,
) -> i32 {
    if config.flags & CONFIG_F_TUNNEL != 0 && config.tunnel_ifindex != 0 {
        if !set_tunnel_key(ctx, node, src_identity) {
            return TC_ACT_OK as i32;
        }
        // SAFETY: `ip` was bounds-checked by the caller and nothing resized the packet.
        unsafe { packet::decrement_ttl(ip) };
        // SAFETY: plain helper call; the tunnel device's egress encapsulates.
        return unsafe { bpf_redirect(config.tunnel_ifindex, 0) } as i32;
    }
    if config.flags & CONFIG_F_NATIVE != 0 {
        if on_uplink_subnet(config, node) {
            return neigh_redirect(ctx, config, ip, node);
        }
        return fib_redirect(ctx, config, eth, ip);
    }
    TC_ACT_OK as i32
}

/// Whether `node` is on the uplink's subnet (see `DatapathConfig::uplink_net`).
#[inline(always)]
fn on_uplink_subnet(config: &DatapathConfig, node: [u8; 4]) -> bool {
    config.uplink_ifindex != 0 && endpoint::in_subnet(node, config.uplink_net, config.uplink_mask)
}

/// Native routing to a node on the uplink's subnet: out of the uplink with the node as next
/// hop, as the agent's route to its pods says. Marked [`MARK_ROUTED_TO_NODE`] with
/// masquerading on (see [`fib_redirect`]). `ip` is the packet's bounds-checked header.
#[inline(always)]
fn neigh_redirect(
    ctx: &TcContext,
    config: &DatapathConfig,
    ip: *mut Ipv4Hdr,
    node: [u8; 4],
) -> i32 {
    let mut next_hop = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(node),
        },
    };
    // SAFETY: `ip` was bounds-checked by the caller and nothing resized the packet.
    unsafe { packet::decrement_ttl(ip) };
    // SAFETY: the helper reads `next_hop`, of the size given.
    let ret = unsafe {
        bpf_redirect_neigh(
            config.uplink_ifindex,
            &mut next_hop,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return TC_ACT_OK as i32;
    }
    if config.flags & CONFIG_F_MASQUERADE != 0 {
        ctx.set_mark(MARK_ROUTED_TO_NODE);
    }
    TC_ACT_REDIRECT as i32
}

/// Native routing: the FIB's next hop for the packet's destination, and a redirect there.
/// Through the uplink with masquerading on, the packet is marked [`MARK_ROUTED_TO_NODE`]: it
/// goes to a pod of the cluster, and `to_uplink` can let it pass without its lookup.
#[inline(always)]
pub fn fib_redirect(
    ctx: &TcContext,
    config: &DatapathConfig,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> i32 {
    // SAFETY: `ip` was bounds-checked by the caller.
    let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
    let mut params = MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: an all-zero bpf_fib_lookup is a valid value of that plain C struct.
    let params = unsafe { zero_by_words(&mut params) };
    params.family = AF_INET;
    params.ifindex = packet::ifindex(ctx);
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    // SAFETY: the helper reads and writes `params`, of the size given.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let redirected = if ret == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // SAFETY: `eth` and `ip` were bounds-checked by the caller and nothing resized the
        // packet.
        unsafe {
            packet::decrement_ttl(ip);
            packet::set_macs(eth, &params.dmac, &params.smac);
        }
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(params.ifindex, 0) }
    } else if ret == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // The kernel resolves the neighbour (and routes) itself.
        // SAFETY: as above.
        unsafe { packet::decrement_ttl(ip) };
        // SAFETY: no parameters: the helper looks the next hop up.
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) }
    } else {
        return TC_ACT_OK as i32;
    };
    if redirected != i64::from(TC_ACT_REDIRECT) {
        return TC_ACT_OK as i32;
    }
    if config.flags & CONFIG_F_MASQUERADE != 0 && params.ifindex == config.uplink_ifindex {
        ctx.set_mark(MARK_ROUTED_TO_NODE);
    }
    TC_ACT_REDIRECT as i32
}
