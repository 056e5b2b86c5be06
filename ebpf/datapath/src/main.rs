//! Myelin's datapath: two TC programs on the host side of every pod's veth pair.
//!
//! - `from_container` (tc ingress of the host veth) sees every packet a pod sends. It checks the
//!   source against the endpoint (anti-spoofing), runs conntrack and policy, and delivers
//!   pod-to-pod traffic on this node straight into the destination pod with
//!   `bpf_redirect_peer`: no bridge, no routing table. Everything else goes to the node's stack.
//! - `to_container` (tc egress of the host veth) sees what the node's stack delivers to a pod,
//!   and enforces that pod's ingress policy on it.
//! - With Services in eBPF on, `from_container` first translates a packet to a Service's
//!   frontend into one for its backend (see `lb`), so that everything after it sees the
//!   backend; replies of translated connections get the frontend back wherever they reach the
//!   client's node (`from_container`, `to_container`, `from_tunnel`, `deliver_from_uplink`).
//!
//! - `to_uplink` and `from_uplink` (tc egress and ingress of the uplink, the device holding the
//!   node's InternalIP) masquerade pods' traffic leaving the cluster (see `nat`). In native
//!   routing, `from_uplink` also delivers other nodes' packets for this node's pods straight
//!   into them (`deliver_from_uplink`).
//! - With Services in eBPF on, `from_uplink` (and `from_tunnel`, for remote pods) jump into
//!   `nodeport_in` with packets to node ports, external IPs and load balancer addresses, and
//!   with replies to the node's address (see `nodeport`).
//!
//! - `lb_connect4`, `lb_sendmsg4`, `lb_recvmsg4` and `lb_getpeername4` (cgroup `sock_addr`
//!   hooks of `--cgroup-root`) translate Services for the node's own sockets at `connect()` and
//!   `sendmsg()`, and show the frontend again to `getpeername()` and `recvfrom()` (see `sock`).
//!
//! Pod-to-pod traffic on one node never reaches the destination's `to_container` (the redirect
//! skips it), so `from_container` checks both the sender's egress and the receiver's ingress
//! policy. Every drop is counted under a [`DropReason`] and can be reported as an event.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod drop;
#[cfg(target_arch = "bpf")]
mod endpoint;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod fragments;
#[cfg(target_arch = "bpf")]
mod ipcache;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maglev;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod nodeport;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tail;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
        helpers::generated::bpf_redirect_peer,
        macros::classifier,
        programs::TcContext,
    };
    use myelin_common::{
        Direction, DropReason, EndpointInfo, IpcacheEntry,
        config::{
            CONFIG_F_MASQUERADE, CONFIG_F_NATIVE, CONFIG_F_SERVICES, DatapathConfig,
            MARK_ROUTED_TO_NODE,
        },
        conntrack::{
            CT_F_DENIED_EGRESS, CT_F_DENIED_INGRESS, CT_F_FROM_STACK, CT_F_NODEPORT, CT_F_SERVICE,
            CtKey,
        },
        event::ObservationPoint,
        identity,
        lb::LB_F_LOCAL,
        proto::{ETH_P_ARP, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP},
    };

    use crate::{
        conntrack::{self, State},
        drop::drop,
        endpoint,
        events::{self, Verdict},
        forward, ipcache,
        lb::{self, Translation},
        nat, nodeport,
        packet::{self, EthHdr, Flow, Icmp, Ipv4Hdr},
        policy::{self, Peers},
        tail,
    };

    const PASS: i32 = TC_ACT_OK as i32;
    /// `skb->pkt_type` of a packet addressed to this host.
    const PACKET_HOST: u32 = 0;

    fn unknown_peers() -> Peers {
        let unknown = IpcacheEntry {
            identity: identity::ANY,
            cidr_identity: identity::ANY,
            ..IpcacheEntry::WORLD
        };
        Peers {
            src: unknown,
            dst: unknown,
            egress_rule: 0,
            ingress_rule: 0,
        }
    }

    /// Counts a drop, reports it if drop events are on, and returns the TC verdict.
    #[inline(always)]
    fn drop_flow(
        ctx: &TcContext,
        config: &DatapathConfig,
        reason: DropReason,
        flow: &Flow,
        verdict: &mut Verdict,
    ) -> i32 {
        verdict.reason = reason as u8;
        events::drop_event(config, flow, verdict);
        drop(ctx, reason)
    }

    /// Conntrack, then policy for new flows. `Ok(flags)`: the conntrack entry's `CT_F_*` flags
    /// when the packet is a reply, else 0; `CT_F_FROM_STACK` says that it must go back through
    /// the node's stack (its flow entered the pod from there), `CT_F_SERVICE` that its source
    /// is to be turned back into a Service's frontend. Read from the entry conntrack found
    /// anyway: other flows pay no lookup for either. `src_identity`: the sender's identity when
    /// the packet says it (the tunnel's VNI), else the ipcache's.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn admit(
        ctx: &TcContext,
        config: &DatapathConfig,
        flow: &Flow,
        src: Option<&EndpointInfo>,
        dst: Option<&EndpointInfo>,
        verdict: &mut Verdict,
        create_flags: u32,
        src_identity: Option<u32>,
    ) -> Result<u32, i32> {
        let now = conntrack::now();
        let state = conntrack::lookup(flow, now);
        admit_tracked(
            ctx,
            config,
            flow,
            src,
            dst,
            verdict,
            create_flags,
            src_identity,
            now,
            state,
        )
    }

    /// [`admit`] for a packet whose conntrack state the caller looked up already (at `now`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn admit_tracked(
        ctx: &TcContext,
        config: &DatapathConfig,
        flow: &Flow,
        src: Option<&EndpointInfo>,
        dst: Option<&EndpointInfo>,
        verdict: &mut Verdict,
        create_flags: u32,
        src_identity: Option<u32>,
        now: u64,
        state: State,
    ) -> Result<u32, i32> {
        let (entry, key, is_reply) = match state {
            // Only the Service's flag: an ICMP error about a translated flow is translated too.
            State::Related(flags) => return Ok(flags & CT_F_SERVICE),
            State::New => {
                return match policy::evaluate(
                    flow.saddr,
                    flow.daddr,
                    flow.protocol,
                    flow.dport,
                    src,
                    dst,
                    src_identity,
                ) {
                    Ok(peers) => {
                        verdict.peers = peers;
                        if conntrack::create(flow, config.policy_revision, create_flags, now)
                            .is_err()
                        {
                            return Err(drop_flow(
                                ctx,
                                config,
                                DropReason::ConntrackFull,
                                flow,
                                verdict,
                            ));
                        }
                        events::allowed_event(config, flow, verdict);
                        Ok(0)
                    }
                    Err((reason, peers)) => {
                        verdict.peers = peers;
                        verdict.direction = direction_of(reason);
                        Err(drop_flow(ctx, config, reason, flow, verdict))
                    }
                };
            }
            State::Established(e, k) => (e, k, false),
            State::Reply(e, k) => (e, k, true),
        };
        // SAFETY: `entry` comes from this run's lookup.
        let (revision, mut flags) = unsafe { ((*entry).revision, (*entry).flags) };
        if revision != config.policy_revision {
            let denied = match recheck(&key) {
                Ok(_) => 0,
                Err((DropReason::PolicyDeniedIngress, _)) => CT_F_DENIED_INGRESS,
                Err(_) => CT_F_DENIED_EGRESS,
            };
            // SAFETY: as above.
            unsafe { conntrack::set_verdict(entry, config.policy_revision, denied) };
            flags = (flags & !(CT_F_DENIED_INGRESS | CT_F_DENIED_EGRESS)) | denied;
        }
        if flags & (CT_F_DENIED_INGRESS | CT_F_DENIED_EGRESS) != 0 {
            let (reason, direction) = if flags & CT_F_DENIED_INGRESS != 0 {
                (DropReason::PolicyDeniedIngress, Direction::Ingress)
            } else {
                (DropReason::PolicyDeniedEgress, Direction::Egress)
            };
            verdict.direction = direction as u8;
            // SAFETY: as above. Packets of a cut flow keep its entry alive, so that the flow
            // stays cut in both directions for as long as its ends keep trying.
            unsafe { conntrack::refresh(entry, flow.protocol, flow.tcp_flags, false, now) };
            return Err(drop_flow(ctx, config, reason, flow, verdict));
        }
        // SAFETY: as above.
        unsafe { conntrack::refresh(entry, flow.protocol, flow.tcp_flags, is_reply, now) };
        Ok(if is_reply { flags } else { 0 })
    }

    /// A reply of a Service's connection (`CT_F_SERVICE` in `reply_flags`, from [`admit`]), or
    /// an ICMP error about one, leaves with the frontend as its source. `Ok(true)` when it was
    /// translated, which moved the packet's data: the caller's header pointers must be fetched
    /// again.
    #[inline(always)]
    fn untranslate_reply(
        ctx: &TcContext,
        config: &DatapathConfig,
        reply_flags: u32,
        ip: *const Ipv4Hdr,
        flow: &mut Flow,
        verdict: &mut Verdict,
    ) -> Result<bool, i32> {
        if !events::services_loaded() || reply_flags & CT_F_SERVICE == 0 {
            return Ok(false);
        }
        let (l4, later_fragment) = (packet::l4_offset(ip), packet::later_fragment(ip));
        if flow.icmp == Icmp::Error {
            lb::reverse_icmp_error(ctx, flow, l4)
        } else {
            lb::reverse(ctx, flow, l4, later_fragment)
        }
        .map_err(|reason| drop_flow(ctx, config, reason, flow, verdict))?;
        Ok(true)
    }

    /// A new connection to a frontend without backends is refused at once rather than left to
    /// time out, and counted as a drop: a TCP SYN gets a RST back into the pod, a UDP datagram
    /// an ICMP port unreachable; anything else is dropped.
    #[inline(always)]
    fn refuse(
        ctx: &TcContext,
        config: &DatapathConfig,
        src: &EndpointInfo,
        flow: &Flow,
        verdict: &mut Verdict,
    ) -> i32 {
        let shot = drop_flow(ctx, config, DropReason::NoServiceBackend, flow, verdict);
        let refused = match flow.protocol {
            IPPROTO_TCP => packet::opens_connection(flow) && lb::into_reset(ctx),
            IPPROTO_UDP => lb::into_port_unreachable(ctx),
            _ => false,
        };
        if !refused {
            return shot;
        }
        endpoint::account_rx(src.id, ctx.len());
        // SAFETY: plain helper call; from tc ingress of the pod's host veth, redirecting to that
        // same veth's peer delivers into the pod that sent the packet.
        let ret = unsafe { bpf_redirect_peer(src.ifindex, 0) };
        if ret == i64::from(TC_ACT_REDIRECT) {
            TC_ACT_REDIRECT as i32
        } else {
            shot
        }
    }

    /// Re-checks a tracked flow, in the direction it started, after a policy change.
    #[inline(always)]
    fn recheck(k: &CtKey) -> Result<Peers, (DropReason, Peers)> {
        // A pod reaching itself through a Service (see `from_container`).
        if k.saddr == lb::HAIRPIN {
            return Ok(unknown_peers());
        }
        let src = endpoint::by_ip(k.saddr);
        let dst = endpoint::by_ip(k.daddr);
        policy::evaluate(k.saddr, k.daddr, k.protocol, k.dport, src, dst, None)
    }

    fn direction_of(reason: DropReason) -> u8 {
        match reason {
            DropReason::PolicyDeniedIngress => Direction::Ingress as u8,
            _ => Direction::Egress as u8,
        }
    }

    /// The local pod at `addr`. This node's pods are in its pod CIDR: an address outside it
    /// needs no lookup.
    #[inline(always)]
    fn local_endpoint(config: &DatapathConfig, addr: [u8; 4]) -> Option<&'static EndpointInfo> {
        if config.pod_cidr_mask != [0; 4] && !endpoint::in_pod_cidr(config, addr) {
            None
        } else {
            endpoint::by_ip(addr)
        }
    }

    /// Into pod `dst` (its veth's peer) with `bpf_redirect_peer`; to the stack if the peer
    /// vanished between lookup and redirect (a pod being deleted), like any unknown destination.
    #[inline(always)]
    fn into_pod(dst: &EndpointInfo) -> i32 {
        // SAFETY: plain helper call; redirect_peer is valid from tc ingress, where we run.
        let ret = unsafe { bpf_redirect_peer(dst.ifindex, 0) };
        if ret == i64::from(TC_ACT_REDIRECT) {
            TC_ACT_REDIRECT as i32
        } else {
            PASS
        }
    }

    /// The Ethernet and IPv4 headers again, after a helper rewrote the packet (which ends the
    /// verifier's trust in earlier pointers).
    #[inline(always)]
    fn headers(ctx: &TcContext) -> Result<(*mut EthHdr, *mut Ipv4Hdr), i32> {
        let eth = packet::eth(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let ip = packet::ipv4(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        Ok((eth, ip))
    }

    #[classifier]
    pub fn from_container(ctx: TcContext) -> i32 {
        match try_from_container(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    fn try_from_container(ctx: &TcContext) -> Result<i32, i32> {
        let ifindex = packet::ifindex(ctx);
        // A packet back from `from_container_lb`, translated (see `tail`): counted already.
        let handoff = if events::services_loaded() {
            tail::take_handoff(ifindex)
        } else {
            None
        };
        let src = endpoint::by_ifindex(ifindex);
        if let Some(s) = &src
            && handoff.is_none()
        {
            endpoint::account_tx(s.id, ctx.len());
        }
        let eth = packet::eth(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        // SAFETY: `eth` was bounds-checked by `packet::eth`.
        let (eth_src, ether_type) = unsafe { ((*eth).src, (*eth).ether_type) };
        match u16::from_be(ether_type) {
            ETH_P_IP => {}
            ETH_P_ARP => {
                let src = src.ok_or_else(|| drop(ctx, DropReason::NoEndpoint))?;
                let sender =
                    packet::arp_sender_ip(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
                if eth_src != src.mac {
                    return Err(drop(ctx, DropReason::SpoofedSourceMac));
                }
                if sender != src.ip {
                    return Err(drop(ctx, DropReason::SpoofedSourceIp));
                }
                return Ok(PASS);
            }
            // IPv6 and the rest: the node's stack decides (Myelin is IPv4-only for now).
            _ => return Ok(PASS),
        }

        let ip = packet::ipv4(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        // SAFETY: bounds-checked by `packet::ipv4`.
        let ttl = unsafe { (*ip).ttl };
        let mut flow = packet::flow(ctx, ip).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let config = events::config();
        let mut dst = local_endpoint(&config, flow.daddr);
        let mut verdict = Verdict {
            reason: 0,
            direction: Direction::Egress as u8,
            src_endpoint: src.map_or(0, |s| s.id),
            dst_endpoint: dst.map_or(0, |d| d.id),
            peers: unknown_peers(),
            ifindex,
            point: ObservationPoint::FromPod as u8,
            service: ([0; 4], 0),
        };
        let Some(src) = src else {
            return Err(drop_flow(
                ctx,
                &config,
                DropReason::NoEndpoint,
                &flow,
                &mut verdict,
            ));
        };
        if eth_src != src.mac {
            return Err(drop_flow(
                ctx,
                &config,
                DropReason::SpoofedSourceMac,
                &flow,
                &mut verdict,
            ));
        }
        let hairpin = handoff.is_some_and(|h| h.flags & tail::HANDOFF_HAIRPIN != 0);
        // A hairpin connection's packets carry `lb::HAIRPIN` as their source.
        if flow.saddr != src.ip && !(hairpin && flow.saddr == lb::HAIRPIN) {
            return Err(drop_flow(
                ctx,
                &config,
                DropReason::SpoofedSourceIp,
                &flow,
                &mut verdict,
            ));
        }

        // Services: the frontend becomes a backend before anything else looks at the packet, so
        // that policy, conntrack and forwarding see the backend (as upstream specifies). The
        // translation is `from_container_lb`'s, which hands the packet back here.
        let mut create_flags = 0;
        if let Some(h) = handoff {
            if h.flags & tail::HANDOFF_TRANSLATED != 0 {
                create_flags = CT_F_SERVICE;
                verdict.service = (h.frontend, h.frontend_port);
            }
        } else if events::services_loaded()
            && config.flags & CONFIG_F_SERVICES != 0
            && lb::wants(&flow)
        {
            tail::to_translator(ctx);
            // Only when the translator is not there: fail closed.
            return Err(drop_flow(
                ctx,
                &config,
                DropReason::ServiceTranslationLost,
                &flow,
                &mut verdict,
            ));
        }
        // A pod reaching itself through a Service is not subject to its policies, as it is
        // not when it reaches itself directly.
        let policy_src = if hairpin { None } else { Some(src) };
        let (mut eth, mut ip) = (eth, ip);

        let reply = admit(
            ctx,
            &config,
            &flow,
            policy_src,
            if policy_src.is_some() { dst } else { None },
            &mut verdict,
            create_flags,
            None,
        )?;
        if untranslate_reply(ctx, &config, reply, ip, &mut flow, &mut verdict)? {
            (eth, ip) = headers(ctx)?;
            // A hairpin reply was addressed to `lb::HAIRPIN`: now to the pod.
            if dst.is_none() {
                dst = local_endpoint(&config, flow.daddr);
            }
        }
        let via_stack = reply & CT_F_FROM_STACK != 0;
        let Some(dst) = dst else {
            if via_stack || ttl <= 1 {
                return Ok(PASS);
            }
            // A pod on another node: into the tunnel or out of the uplink. Anything else (the
            // node, the world) is the stack's.
            let peer = ipcache::lookup(flow.daddr);
            if peer.node == [0; 4] {
                // A client outside that reached a local backend through the uplink (a node
                // port, an external IP): back out through the FIB.
                if events::services_loaded() && reply & CT_F_NODEPORT != 0 {
                    return Ok(nodeport::to_client(ctx, &config, eth, ip));
                }
                return Ok(PASS);
            }
            return Ok(forward::to_node(
                ctx,
                &config,
                eth,
                ip,
                peer.node,
                src.identity,
            ));
        };
        // Replies of flows that came through the stack go back through it (reverse NAT), and
        // an expiring TTL goes to the stack, which answers with ICMP time exceeded.
        if via_stack || ttl <= 1 {
            return Ok(PASS);
        }
        // SAFETY: `eth` and `ip` are within bounds: checked after the last change to the packet.
        unsafe {
            packet::decrement_ttl(ip);
            packet::set_macs(eth, &dst.mac, &dst.host_mac);
        }
        endpoint::account_rx(dst.id, ctx.len());
        Ok(into_pod(dst))
    }

    /// Tail-called by `from_container` for a pod's packet to a Service's frontend (see
    /// `tail`): translates it to its connection's backend and hands it back to
    /// `from_container`, which then treats it as the backend's; refuses it when the frontend
    /// has no backend. Never attached to a device.
    #[classifier]
    pub fn from_container_lb(ctx: TcContext) -> i32 {
        match try_from_container_lb(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    fn try_from_container_lb(ctx: &TcContext) -> Result<i32, i32> {
        let ifindex = packet::ifindex(ctx);
        let src = endpoint::by_ifindex(ifindex).ok_or_else(|| drop(ctx, DropReason::NoEndpoint))?;
        let ip = packet::ipv4(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let mut flow = packet::flow(ctx, ip).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let config = events::config();
        let mut verdict = Verdict {
            reason: 0,
            direction: Direction::Egress as u8,
            src_endpoint: src.id,
            dst_endpoint: 0,
            peers: unknown_peers(),
            ifindex,
            point: ObservationPoint::FromPod as u8,
            service: ([0; 4], 0),
        };
        let (l4, later_fragment) = (packet::l4_offset(ip), packet::later_fragment(ip));
        let frontend = (flow.daddr, flow.dport);
        verdict.service = frontend;
        let flags = match lb::translate(ctx, &mut flow, l4, later_fragment) {
            // No longer a frontend (removed a moment ago): the packet is what it says.
            Ok(Translation::None) => 0,
            Ok(Translation::Backend) => tail::HANDOFF_TRANSLATED,
            Ok(Translation::Hairpin) => tail::HANDOFF_TRANSLATED | tail::HANDOFF_HAIRPIN,
            Ok(Translation::NoBackend) => {
                return Ok(refuse(ctx, &config, src, &flow, &mut verdict));
            }
            Err(reason) => return Err(drop_flow(ctx, &config, reason, &flow, &mut verdict)),
        };
        tail::hand_back(ctx, ifindex, flags, frontend);
        Err(drop_flow(
            ctx,
            &config,
            DropReason::ServiceTranslationLost,
            &flow,
            &mut verdict,
        ))
    }

    #[classifier]
    pub fn to_container(ctx: TcContext) -> i32 {
        match try_to_container(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    fn try_to_container(ctx: &TcContext) -> Result<i32, i32> {
        let ifindex = packet::ifindex(ctx);
        let dst = endpoint::by_ifindex(ifindex).ok_or_else(|| drop(ctx, DropReason::NoEndpoint))?;
        endpoint::account_rx(dst.id, ctx.len());
        let eth = packet::eth(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        // SAFETY: bounds-checked by `packet::eth`.
        if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
            return Ok(PASS);
        }
        let ip = packet::ipv4(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let mut flow = packet::flow(ctx, ip).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let config = events::config();
        // A local pod's packet reaches another local pod through the stack only after a
        // translation (a Service): its egress policy is checked here, against the real backend.
        let src = endpoint::by_ip(flow.saddr);
        let mut verdict = Verdict {
            reason: 0,
            direction: Direction::Ingress as u8,
            src_endpoint: src.map_or(0, |s| s.id),
            dst_endpoint: dst.id,
            peers: unknown_peers(),
            ifindex,
            point: ObservationPoint::ToPod as u8,
            service: ([0; 4], 0),
        };
        let reply = admit(
            ctx,
            &config,
            &flow,
            src,
            Some(dst),
            &mut verdict,
            CT_F_FROM_STACK,
            None,
        )?;
        // The answer of a Service's backend that is the node itself or outside the cluster
        // comes through the stack.
        untranslate_reply(ctx, &config, reply, ip, &mut flow, &mut verdict)?;
        Ok(PASS)
    }

    /// tc ingress of `myelin_vxlan`: what other nodes send through the tunnel, decapsulated.
    /// The sender's identity is the VNI; a packet for a local pod is checked against its
    /// ingress policy (and tracked, so that the pod's replies pass) and delivered straight into
    /// it; one for the node itself goes up its stack.
    #[classifier]
    pub fn from_tunnel(ctx: TcContext) -> i32 {
        match try_from_tunnel(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    // Inlined into the program: a tail call is refused in a function that returns no int.
    #[inline(always)]
    fn try_from_tunnel(ctx: &TcContext) -> Result<i32, i32> {
        let key =
            forward::tunnel_key(ctx).ok_or_else(|| drop(ctx, DropReason::TunnelPeerUnknown))?;
        // Only nodes of the cluster may speak for an identity.
        let outer = forward::remote_addr(&key);
        if ipcache::lookup(outer).identity != identity::REMOTE_NODE {
            return Err(drop(ctx, DropReason::TunnelPeerUnknown));
        }
        let eth = packet::eth(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        // SAFETY: bounds-checked by `packet::eth`.
        if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
            return Err(drop(ctx, DropReason::Malformed));
        }
        let ip = packet::ipv4(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let mut flow = packet::flow(ctx, ip).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let config = events::config();
        let Some(dst) = endpoint::by_ip(flow.daddr) else {
            // A remote pod asking one of this node's node ports, or a remote backend answering
            // a node port's client: the ipcache puts a node's address behind that node, so
            // both come through the tunnel. `nodeport_in` serves them.
            if nodeport::is_frontend(&config, &flow, ip)
                || nodeport::may_be_reply(&config, &flow, ip)
            {
                nodeport::jump(ctx);
            }
            // For the node itself (a remote pod reaching one of its addresses).
            let _ = ctx.change_type(PACKET_HOST);
            return Ok(PASS);
        };
        endpoint::account_rx(dst.id, ctx.len());
        let mut verdict = Verdict {
            reason: 0,
            direction: Direction::Ingress as u8,
            src_endpoint: 0,
            dst_endpoint: dst.id,
            peers: unknown_peers(),
            ifindex: packet::ifindex(ctx),
            point: ObservationPoint::FromTunnel as u8,
            service: ([0; 4], 0),
        };
        let src_identity = forward::identity_from_vni(key.tunnel_id);
        let reply = admit(
            ctx,
            &config,
            &flow,
            None,
            Some(dst),
            &mut verdict,
            0,
            Some(src_identity),
        )?;
        // A Service's backend on another node answering this node's pod.
        let eth = if untranslate_reply(ctx, &config, reply, ip, &mut flow, &mut verdict)? {
            headers(ctx)?.0
        } else {
            eth
        };
        // SAFETY: `eth` is within bounds: checked after the last change to the packet.
        unsafe { packet::set_macs(eth, &dst.mac, &dst.host_mac) };
        Ok(into_pod(dst))
    }

    /// tc egress of `myelin_vxlan`: packets the node's stack routed into the tunnel (the
    /// node's own traffic to remote pods, or traffic it forwards) get their tunnel key from the
    /// ipcache. Pods' packets arrive here with one already (`from_container`).
    #[classifier]
    pub fn to_tunnel(ctx: TcContext) -> i32 {
        match try_to_tunnel(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    fn try_to_tunnel(ctx: &TcContext) -> Result<i32, i32> {
        if forward::tunnel_key(ctx).is_some() {
            return Ok(PASS);
        }
        let eth = packet::eth(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        // SAFETY: bounds-checked by `packet::eth`.
        if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
            // Not for the tunnel (the device's own IPv6 neighbour discovery): without a key
            // the VXLAN driver discards it.
            return Ok(PASS);
        }
        let ip = packet::ipv4(ctx).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        // SAFETY: bounds-checked by `packet::ipv4`.
        let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
        let node = ipcache::lookup(daddr).node;
        if node == [0; 4] {
            return Err(drop(ctx, DropReason::TunnelNoNode));
        }
        let identity = ipcache::lookup(saddr).identity;
        if !forward::set_tunnel_key(ctx, node, identity) {
            return Err(drop(ctx, DropReason::TunnelNoNode));
        }
        Ok(PASS)
    }

    /// A masquerading drop, counted and reported like the others.
    #[inline(always)]
    fn drop_nat(
        ctx: &TcContext,
        config: &DatapathConfig,
        reason: DropReason,
        flow: &Flow,
        direction: Direction,
    ) -> i32 {
        let ifindex = packet::ifindex(ctx);
        let point = match direction {
            Direction::Egress => ObservationPoint::ToUplink,
            // `nodeport_in` serves the tunnel too.
            Direction::Ingress
                if config.tunnel_ifindex != 0 && ifindex == config.tunnel_ifindex =>
            {
                ObservationPoint::FromTunnel
            }
            Direction::Ingress => ObservationPoint::FromUplink,
        } as u8;
        let mut verdict = Verdict {
            reason: 0,
            direction: direction as u8,
            src_endpoint: endpoint::by_ip(flow.saddr).map_or(0, |s| s.id),
            dst_endpoint: 0,
            peers: unknown_peers(),
            ifindex,
            point,
            service: ([0; 4], 0),
        };
        drop_flow(ctx, config, reason, flow, &mut verdict)
    }

    /// tc egress of the uplink: a pod's packet to a destination outside the cluster leaves with
    /// the node's address. The cheap tests come first: the node's own packets (tunnel packets
    /// too) pass after the config lookup and a mask compare, pods' packets within the cluster
    /// after one LPM lookup more.
    #[classifier]
    pub fn to_uplink(ctx: TcContext) -> i32 {
        match try_to_uplink(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    fn try_to_uplink(ctx: &TcContext) -> Result<i32, i32> {
        // A pod's packet that `from_container` routed here for a pod on another node: never
        // masqueraded. The mark is this program's to clear (see `MARK_ROUTED_TO_NODE`).
        // SAFETY: `skb` is the context pointer the kernel passed in; reading it is allowed.
        if unsafe { (*ctx.skb.skb).mark } == MARK_ROUTED_TO_NODE {
            ctx.set_mark(0);
            return Ok(PASS);
        }
        let config = events::config();
        if !nat::enabled(&config) {
            return Ok(PASS);
        }
        let Some(eth) = packet::eth(ctx) else {
            return Ok(PASS);
        };
        // SAFETY: bounds-checked by `packet::eth`.
        if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
            return Ok(PASS);
        }
        let Some(ip) = packet::ipv4(ctx) else {
            return Ok(PASS);
        };
        // SAFETY: bounds-checked by `packet::ipv4`.
        let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
        if !nat::masquerades(&config, saddr, daddr) {
            return Ok(PASS);
        }
        // A pod's packet: `from_container` parsed it already, so it can only fail here if
        // something in between truncated it.
        let flow = packet::flow(ctx, ip).ok_or_else(|| drop(ctx, DropReason::Malformed))?;
        let (l4, later_fragment) = (packet::l4_offset(ip), packet::later_fragment(ip));
        nat::snat(ctx, &config, &flow, l4, later_fragment)
            .map_err(|reason| drop_nat(ctx, &config, reason, &flow, Direction::Egress))?;
        Ok(PASS)
    }

    /// tc ingress of the uplink: replies to masqueraded flows, and ICMP errors about them, go
    /// back to the pod. Only packets to the node's address can be such replies, and of TCP and
    /// UDP only those to a port of the NAT range: everything else passes without a map lookup.
    /// In native routing, packets for this node's pods go straight into them
    /// (`deliver_from_uplink`); a mask compare sorts them out. With Services in eBPF, the
    /// other TCP and UDP packets cost one lookup more: those to a node port or an external IP
    /// go to `nodeport_in`, and so do the replies to the node's address, which it translates
    /// back (masquerading's, and a remote backend's to a node port's client).
    #[classifier]
    pub fn from_uplink(ctx: TcContext) -> i32 {
        match try_from_uplink(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    // Inlined into the program: a tail call is refused in a function that returns no int.
    #[inline(always)]
    fn try_from_uplink(ctx: &TcContext) -> Result<i32, i32> {
        let config = events::config();
        if config.flags & (CONFIG_F_MASQUERADE | CONFIG_F_NATIVE | CONFIG_F_SERVICES) == 0 {
            return Ok(PASS);
        }
        let Some(eth) = packet::eth(ctx) else {
            return Ok(PASS);
        };
        // SAFETY: bounds-checked by `packet::eth`.
        if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
            return Ok(PASS);
        }
        let Some(ip) = packet::ipv4(ctx) else {
            return Ok(PASS);
        };
        // SAFETY: bounds-checked by `packet::ipv4`.
        let (daddr, protocol) = unsafe { ((*ip).daddr, (*ip).protocol) };
        if config.flags & CONFIG_F_NATIVE != 0 && endpoint::in_pod_cidr(&config, daddr) {
            return deliver_from_uplink(ctx, &config, eth, ip);
        }
        let services = events::services_loaded()
            && config.flags & CONFIG_F_SERVICES != 0
            && config.node_ip != [0; 4];
        let (l4, later_fragment) = (packet::l4_offset(ip), packet::later_fragment(ip));
        if matches!(protocol, IPPROTO_TCP | IPPROTO_UDP) && !later_fragment {
            let Some(ports) = packet::ptr_at::<packet::Ports>(ctx, l4) else {
                return Ok(PASS);
            };
            // SAFETY: bounds-checked by `ptr_at`.
            let dport = unsafe { (*ports).dport };
            let reply = daddr == config.node_ip
                && (services || nat::enabled(&config))
                && nat::may_be_reply(&config, dport);
            if !reply {
                if services && nodeport::frontend_flags(daddr, dport, protocol).is_some() {
                    // Returns only if `nodeport_in` is not there: the stack gets the packet.
                    nodeport::jump(ctx);
                }
                return Ok(PASS);
            }
        } else if !(services || nat::enabled(&config)) || daddr != config.node_ip {
            return Ok(PASS);
        }
        // A masqueraded flow's reply, or a remote backend's answer to a node port's client
        // (or an ICMP error about either): with Services, `nodeport_in` translates both back.
        if services && !later_fragment {
            nodeport::jump(ctx);
        }
        // Not the pods' packet yet: what the node cannot parse, its stack decides about.
        let Some(flow) = packet::flow(ctx, ip) else {
            return Ok(PASS);
        };
        nat::reverse(ctx, &flow, l4, later_fragment)
            .map_err(|reason| drop_nat(ctx, &config, reason, &flow, Direction::Ingress))?;
        Ok(PASS)
    }

    /// Not attached to any device: `from_uplink` and `from_tunnel` jump here
    /// (`nodeport::jump`) with a TCP or UDP packet to a node port or an external IP. It is
    /// translated to a backend, then goes into a local backend pod past the node's stack
    /// (conntrack and its ingress policy, against the real client), or on to the backend's node
    /// with this node's address as its source (see `nodeport`). They also jump here with what
    /// may be a reply to the node's address (on a port of the NAT range, or an ICMP error):
    /// masquerading's `nat::reverse` gives it its client back, and a node port's client gets it
    /// from the frontend, through the FIB; a pod's goes up the stack as before. A program of
    /// its own, verified once for both callers, with a stack of its own.
    #[classifier]
    pub fn nodeport_in(ctx: TcContext) -> i32 {
        match try_nodeport_in(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    fn try_nodeport_in(ctx: &TcContext) -> Result<i32, i32> {
        let config = events::config();
        let (_, ip) = headers(ctx)?;
        // SAFETY: bounds-checked by `packet::ipv4`.
        let ttl = unsafe { (*ip).ttl };
        let l4 = packet::l4_offset(ip);
        let Some(mut flow) = packet::flow(ctx, ip) else {
            return Ok(PASS);
        };
        let ifindex = packet::ifindex(ctx);
        let from_tunnel = config.tunnel_ifindex != 0 && ifindex == config.tunnel_ifindex;
        // A reply comes to the node's address on a port of the NAT range, where no node port
        // is, or is ICMP: no frontend lookup for it.
        let reply = flow.daddr == config.node_ip
            && match flow.protocol {
                IPPROTO_TCP | IPPROTO_UDP => nat::may_be_reply(&config, flow.dport),
                _ => true,
            };
        // A frontend is looked up again: the caller's answer does not cross the jump.
        let flags = if reply {
            None
        } else {
            nodeport::frontend_flags(flow.daddr, flow.dport, flow.protocol)
        };
        let Some(flags) = flags else {
            return reply_to_node(ctx, &config, &flow, l4, from_tunnel);
        };
        // Frames for another host's MAC (promiscuous mode) are not the node's to serve.
        // SAFETY: `skb` is the context pointer the kernel passed in; reading it is allowed.
        if !from_tunnel && unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
            return Ok(PASS);
        }
        let mut verdict = Verdict {
            reason: 0,
            direction: Direction::Ingress as u8,
            src_endpoint: 0,
            dst_endpoint: 0,
            peers: unknown_peers(),
            ifindex,
            point: if from_tunnel {
                ObservationPoint::FromTunnel
            } else {
                ObservationPoint::FromUplink
            } as u8,
            service: (flow.daddr, flow.dport),
        };
        match lb::translate(ctx, &mut flow, l4, false) {
            Ok(Translation::Backend | Translation::Hairpin) => {}
            Ok(Translation::None) => return Ok(PASS),
            Ok(Translation::NoBackend) => {
                let shot = drop_flow(
                    ctx,
                    &config,
                    DropReason::NoServiceBackend,
                    &flow,
                    &mut verdict,
                );
                // `externalTrafficPolicy: Local` without a backend here: dropped, as kube-proxy
                // does (the client's load balancer is to send it to another node). A refusal
                // goes back out of the uplink; from the tunnel it would need a tunnel key.
                if flags & LB_F_LOCAL == 0 && !from_tunnel && nodeport::refuse(ctx, &flow, ifindex)
                {
                    return Ok(TC_ACT_REDIRECT as i32);
                }
                return Err(shot);
            }
            Err(reason) => return Err(drop_flow(ctx, &config, reason, &flow, &mut verdict)),
        }
        let Some(dst) = local_endpoint(&config, flow.daddr) else {
            return nodeport::to_backend_node(ctx, &config, &flow, l4)
                .map_err(|reason| drop_flow(ctx, &config, reason, &flow, &mut verdict));
        };
        verdict.dst_endpoint = dst.id;
        endpoint::account_rx(dst.id, ctx.len());
        admit(
            ctx,
            &config,
            &flow,
            None,
            Some(dst),
            &mut verdict,
            CT_F_SERVICE | CT_F_NODEPORT,
            None,
        )?;
        let (eth, ip) = headers(ctx)?;
        // An expiring TTL: the stack answers with ICMP time exceeded.
        if ttl <= 1 {
            return Ok(PASS);
        }
        // SAFETY: `eth` and `ip` are within bounds: checked after the last change to the packet.
        unsafe {
            packet::decrement_ttl(ip);
            packet::set_macs(eth, &dst.mac, &dst.host_mac);
        }
        Ok(into_pod(dst))
    }

    /// `nodeport_in`, for a packet to the node's address that is no frontend's: a reply of a
    /// masqueraded flow or of a node port's connection to a remote backend, or an ICMP error
    /// about one (the callers sent nothing else). Whatever is not a node port's goes up the
    /// stack, as the callers would have let it.
    #[inline(always)]
    fn reply_to_node(
        ctx: &TcContext,
        config: &DatapathConfig,
        flow: &Flow,
        l4: usize,
        from_tunnel: bool,
    ) -> Result<i32, i32> {
        let to_stack = || {
            if from_tunnel {
                // As `from_tunnel` passes what is for the node itself.
                let _ = ctx.change_type(PACKET_HOST);
            }
            Ok(PASS)
        };
        if flow.daddr != config.node_ip {
            return to_stack();
        }
        nat::reverse(ctx, flow, l4, false)
            .map_err(|reason| drop_nat(ctx, config, reason, flow, Direction::Ingress))?;
        match nodeport::reply_to_client(ctx, config) {
            Ok(Some(action)) => Ok(action),
            Ok(None) => to_stack(),
            Err(reason) => Err(drop_nat(ctx, config, reason, flow, Direction::Ingress)),
        }
    }

    /// Native routing: a packet from another node for one of this node's pods goes straight
    /// into the pod, as `from_tunnel` delivers in tunnel mode, instead of up the node's stack,
    /// through its routing table and `to_container`. The checks are `to_container`'s (the
    /// destination's ingress policy against the sender's ipcache identity), the TTL drops by
    /// one as in the stack's forwarding, and the flow is tracked as not having come through the
    /// stack, so that the pod's replies leave through the FIB as well (`from_container`).
    ///
    /// Only what the stack could not have had a say in goes past it: packets of flows the
    /// datapath tracks, and the first packet of a connection (a TCP SYN, an echo request).
    /// Anything else that conntrack does not know may be the answer to a connection this node
    /// translated (a local pod's connection to a Service, DNATed by kube-proxy to a pod on
    /// another node, is tracked under the Service's address, and its backend's answer must go
    /// through the stack to be translated back): the stack and `to_container` get it, as before.
    #[inline(always)]
    fn deliver_from_uplink(
        ctx: &TcContext,
        config: &DatapathConfig,
        eth: *mut EthHdr,
        ip: *mut Ipv4Hdr,
    ) -> Result<i32, i32> {
        // Frames for another host's MAC reach the uplink only in promiscuous mode; the stack
        // discards them, and so must a shortcut past it.
        // SAFETY: `skb` is the context pointer the kernel passed in; reading it is allowed.
        if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
            return Ok(PASS);
        }
        // SAFETY: bounds-checked by `packet::ipv4`.
        let (ttl, saddr) = unsafe { ((*ip).ttl, (*ip).saddr) };
        // An expiring TTL: the stack answers with ICMP time exceeded.
        if ttl <= 1 {
            return Ok(PASS);
        }
        // One of this node's own pods cannot be the sender of what arrives from outside: the
        // stack (its reverse path filter) decides about such a packet, as before, and no
        // ipcache lookup lends it a local pod's identity.
        if endpoint::in_pod_cidr(config, saddr) {
            return Ok(PASS);
        }
        // A fragmented datagram takes one way, the stack's: it may be reassembling (when
        // netfilter's conntrack is in use) and would wait in vain for fragments that went past
        // it, and later fragments carry no TCP flags or ICMP type to go by.
        if packet::is_fragment(ip) {
            return Ok(PASS);
        }
        let Some(mut flow) = packet::flow(ctx, ip) else {
            return Ok(PASS);
        };
        let Some(dst) = endpoint::by_ip(flow.daddr) else {
            return Ok(PASS);
        };
        let now = conntrack::now();
        let state = conntrack::lookup(&flow, now);
        if matches!(state, State::New) && !packet::opens_connection(&flow) {
            return Ok(PASS);
        }
        endpoint::account_rx(dst.id, ctx.len());
        let mut verdict = Verdict {
            reason: 0,
            direction: Direction::Ingress as u8,
            src_endpoint: 0,
            dst_endpoint: dst.id,
            peers: unknown_peers(),
            ifindex: packet::ifindex(ctx),
            point: ObservationPoint::FromUplink as u8,
            service: ([0; 4], 0),
        };
        let reply = admit_tracked(
            ctx,
            config,
            &flow,
            None,
            Some(dst),
            &mut verdict,
            0,
            None,
            now,
            state,
        )?;
        // A Service's backend on another node answering this node's pod.
        let (eth, ip) = if untranslate_reply(ctx, config, reply, ip, &mut flow, &mut verdict)? {
            headers(ctx)?
        } else {
            (eth, ip)
        };
        // SAFETY: `eth` and `ip` are within bounds: checked after the last change to the packet.
        unsafe {
            packet::decrement_ttl(ip);
            packet::set_macs(eth, &dst.mac, &dst.host_mac);
        }
        Ok(into_pod(dst))
    }
}

/// Socket-level load balancing (see `sock`): cgroup programs the agent attaches to
/// `--cgroup-root`, in the same object so that they share `lb_services` and `lb_affinity` with
/// the TC programs.
#[cfg(target_arch = "bpf")]
mod socket_programs {
    use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

    use crate::sock;

    #[cgroup_sock_addr(connect4)]
    pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
        sock::translate(&ctx)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
        sock::translate(&ctx)
    }

    #[cgroup_sock_addr(recvmsg4)]
    pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx)
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx)
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The crate only has meaning for the BPF target; on the host it builds to an empty binary so
/// that workspace-wide commands (`cargo clippy --workspace`) work.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
