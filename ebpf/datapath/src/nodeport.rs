//! NodePort and external IP frontends reached from outside the cluster through the uplink
//! (`from_uplink`, with `CONFIG_F_SERVICES`), or from remote pods through the tunnel.
//!
//! A TCP or UDP packet to the node's address or to another address that is not the node's
//! pods' costs `from_uplink` one `lb_services` lookup: is it a frontend with `LB_F_NODEPORT`,
//! `LB_F_EXTERNAL_IP` or `LB_F_LOAD_BALANCER`? (ClusterIPs are not served from outside, as in
//! Cilium.) A hit jumps ([`jump`], a tail call) into `nodeport_in`, a program of its own; so
//! does a TCP or UDP packet from the tunnel to a node port (a remote pod asking this node's
//! address, which the ipcache puts behind this node), and, from either, whatever may be a reply
//! to a translation ([`may_be_reply`]). There a frontend's packet is translated by `crate::lb`
//! as a pod's packet would be (its connection's backend is kept in `lb_flows`, `out` and `in`
//! entries as for a ClusterIP), then:
//!
//! - a backend on this node: conntrack and the backend's ingress policy against the real
//!   client (`CT_F_SERVICE | CT_F_NODEPORT`), and straight into the pod. Its replies are
//!   translated back in `from_container` and, as `CT_F_NODEPORT` says, leave through the FIB
//!   ([`to_client`]), not the node's stack, which refuses its own address as the source of a
//!   packet it forwards.
//! - a backend elsewhere (only under `externalTrafficPolicy: Cluster`: the agent lists only
//!   this node's backends for `Local`): the source becomes the node's address and a port of the
//!   NAT range, allocated from masquerading's `snat` table ([`to_backend_node`]), so that
//!   masquerading and node ports never hand out the same port, and the backend's replies come
//!   back to this node. The packet goes to the backend's node through the tunnel (the VNI says
//!   `host`, which the receiver takes as `remote-node`) or the FIB. The reply, to the node's
//!   address on a port of the NAT range, arrives through the uplink (native routing) or the
//!   tunnel (the ipcache puts a node's address behind that node), is translated back by
//!   masquerading's `nat::reverse` (to the client) and `lb::reverse` (from the frontend), then
//!   leaves through the FIB ([`reply_to_client`]); so are ICMP errors about the connection.
//! - no backend: under `externalTrafficPolicy: Local` (no backend on this node) the packet is
//!   dropped, as kube-proxy drops it; otherwise a TCP SYN is answered with a RST and a UDP
//!   datagram with an ICMP port unreachable, from the frontend, back out of the uplink
//!   ([`refuse`]). Either way the drop is counted as `no-service-backend`.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::generated::bpf_redirect, programs::TcContext};
use myelin_common::{
    DropReason,
    config::{CONFIG_F_SERVICES, DatapathConfig},
    identity,
    lb::{LB_F_EXTERNAL_IP, LB_F_LOAD_BALANCER, LB_F_NODEPORT},
    proto::{IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    endpoint, events, forward, ipcache, lb, nat,
    packet::{self, EthHdr, Flow, Icmp, Ipv4Hdr},
    tail,
};

/// Hands the packet to `nodeport_in` (a tail call): the node-port path is a program of its own,
/// verified once, so that neither `from_uplink` nor `from_tunnel` carries it (the verifier's
/// walk of `lb::translate`, policy and the refusals) and neither's stack adds to its own.
/// Returns only if the jump failed (the agent has not filled the slot).
#[inline(always)]
pub fn jump(ctx: &TcContext) {
    tail::to_nodeport(ctx);
}

/// The `LB_F_*` flags of the frontend at `daddr`/`dport`/`protocol` when it is one that is
/// served from outside (a node port, an external IP, a load balancer's address); `None`
/// otherwise. One lookup.
#[inline(always)]
pub fn frontend_flags(daddr: [u8; 4], dport: u16, protocol: u8) -> Option<u32> {
    lb::frontend(daddr, dport, protocol)
        .map(|s| s.flags)
        .filter(|f| f & (LB_F_NODEPORT | LB_F_EXTERNAL_IP | LB_F_LOAD_BALANCER) != 0)
}

/// `from_tunnel`, for a packet to no local pod: is it a TCP or UDP packet to a node port (a
/// remote pod asking this node's address)? One lookup, with Services on.
#[inline(always)]
pub fn is_frontend(config: &DatapathConfig, flow: &Flow, ip: *const Ipv4Hdr) -> bool {
    events::services_loaded()
        && config.flags & CONFIG_F_SERVICES != 0
        && matches!(flow.protocol, IPPROTO_TCP | IPPROTO_UDP)
        && !packet::is_fragment(ip)
        && frontend_flags(flow.daddr, flow.dport, flow.protocol).is_some()
}

/// A translated packet whose backend is not on this node: its source becomes this node (SNAT,
/// from the masquerading table's ports), so that the backend answers here, and it goes to the
/// backend's node (or, for a backend outside the pod network, where the FIB says). `l4`: the
/// transport header's offset.
#[inline(always)]
pub fn to_backend_node(
    ctx: &TcContext,
    config: &DatapathConfig,
    flow: &Flow,
    l4: usize,
) -> Result<i32, DropReason> {
    nat::snat(ctx, config, flow, l4, false)?;
    let eth = packet::eth(ctx).ok_or(DropReason::Malformed)?;
    let ip = packet::ipv4(ctx).ok_or(DropReason::Malformed)?;
    Ok(to_client_or_node(ctx, config, eth, ip, flow.daddr))
}

/// Sends a packet the node forwards on its own behalf (its source is the node's address or a
/// frontend) towards `daddr`: a pod on another node through the tunnel or native routing, with
/// the node's identity; anything else through the FIB.
#[inline(always)]
fn to_client_or_node(
    ctx: &TcContext,
    config: &DatapathConfig,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    daddr: [u8; 4],
) -> i32 {
    let node = ipcache::lookup(daddr).node;
    if node != [0; 4] {
        forward::to_node(ctx, config, eth, ip, node, identity::HOST)
    } else {
        forward::fib_redirect(ctx, config, eth, ip)
    }
}

/// A reply of a local backend to a client that reached it through the uplink (its conntrack
/// entry carries `CT_F_NODEPORT`), already translated back to the frontend: out through the
/// FIB. `eth` and `ip` are its bounds-checked headers.
#[inline(always)]
pub fn to_client(
    ctx: &TcContext,
    config: &DatapathConfig,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> i32 {
    forward::fib_redirect(ctx, config, eth, ip)
}

/// `nodeport_in`, after `nat::reverse` turned a packet to the node's address on a port of the
/// NAT range back into one to the flow's client: when that client is not one of this node's
/// pods (masquerading's), the packet is a remote backend's reply to a node port's client, and
/// its source becomes the frontend again (`lb::reverse`) before it leaves through the FIB. An
/// ICMP error about the connection (port unreachable from the backend, a router's
/// fragmentation needed), whose quote `nat::reverse` gave the client back, gets the frontend
/// in its quote, and as its source when the backend sent it (`lb::reverse_icmp_error`).
/// `Ok(None)`: not such a reply, the stack takes it as before.
#[inline(always)]
pub fn reply_to_client(
    ctx: &TcContext,
    config: &DatapathConfig,
) -> Result<Option<i32>, DropReason> {
    let ip = packet::ipv4(ctx).ok_or(DropReason::Malformed)?;
    let Some(mut flow) = packet::flow(ctx, ip) else {
        return Ok(None);
    };
    if flow.daddr == config.node_ip || endpoint::in_pod_cidr(config, flow.daddr) {
        return Ok(None);
    }
    let l4 = packet::l4_offset(ip);
    match flow.icmp {
        Icmp::Error => lb::reverse_icmp_error(ctx, &mut flow, l4)?,
        Icmp::None => lb::reverse(ctx, &mut flow, l4, false)?,
        _ => return Ok(None),
    }
    let eth = packet::eth(ctx).ok_or(DropReason::Malformed)?;
    let ip = packet::ipv4(ctx).ok_or(DropReason::Malformed)?;
    Ok(Some(to_client_or_node(ctx, config, eth, ip, flow.daddr)))
}

/// `from_tunnel`, for a packet to the node's own address: may it be a remote backend's reply
/// to a node port's client? In tunnel mode those come this way (the backend's node sends what
/// is for this node's address through the tunnel), to a port of the NAT range, and so do the
/// backend's ICMP errors about the connection. `nodeport_in` translates them back.
#[inline(always)]
pub fn may_be_reply(config: &DatapathConfig, flow: &Flow, ip: *const Ipv4Hdr) -> bool {
    let candidate = match flow.protocol {
        IPPROTO_TCP | IPPROTO_UDP => nat::may_be_reply(config, flow.dport),
        _ => flow.icmp == Icmp::Error,
    };
    events::services_loaded()
        && config.flags & CONFIG_F_SERVICES != 0
        && flow.daddr == config.node_ip
        && candidate
        && !packet::is_fragment(ip)
}

/// Refuses a new connection to a frontend without backends that came in through the uplink: a
/// TCP SYN becomes a RST, a UDP datagram an ICMP port unreachable, from the frontend, sent back
/// out of the device it came by, to the hop it came from (the MACs are swapped). `false`: it
/// could not be (another packet, IP options), and is to be dropped. `ifindex`: the uplink's,
/// read by the caller before the packet changed.
#[inline(always)]
pub fn refuse(ctx: &TcContext, flow: &Flow, ifindex: u32) -> bool {
    let refused = match flow.protocol {
        IPPROTO_TCP => packet::opens_connection(flow) && lb::into_reset(ctx),
        IPPROTO_UDP => lb::into_port_unreachable(ctx),
        _ => false,
    };
    // SAFETY: plain helper call; from tc ingress, redirecting to the same device's egress.
    refused && unsafe { bpf_redirect(ifindex, 0) } == i64::from(TC_ACT_REDIRECT)
}
