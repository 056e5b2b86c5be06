//! Policy decisions (see `myelin_common::policy` for the key layout).

use aya_ebpf::{
    btf_maps::{LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use myelin_common::{
    Direction, DropReason, EndpointInfo, IpcacheEntry, PolicyEntry, PolicyKey,
    endpoint::{
        ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, ENDPOINT_F_POLICY_INCOMPLETE,
    },
    identity,
    maps::DEFAULT_MAX_POLICY,
    policy::{POLICY_F_ALLOW, PREFIX_FULL},
};

use crate::ipcache;

#[btf_map(name = "policy")]
static POLICY: LpmTrie<PolicyKey, PolicyEntry, { DEFAULT_MAX_POLICY as usize }> = LpmTrie::new();

/// The identities of both ends of a flow, as the policy check saw them, and the rules of the
/// entries that admitted it (`PolicyEntry::rule`; 0 where no entry was needed or none matched).
#[derive(Clone, Copy)]
pub struct Peers {
    pub src: IpcacheEntry,
    pub dst: IpcacheEntry,
    pub egress_rule: u32,
    pub ingress_rule: u32,
}

/// Whether the policy of endpoint `endpoint_id` allows traffic with `peer` in `direction`:
/// `Some(rule)` of the entry that does.
#[inline(always)]
fn allows(
    endpoint_id: u32,
    direction: Direction,
    peer: IpcacheEntry,
    protocol: u8,
    dport: u16,
) -> Option<u32> {
    let mut key = Key::new(
        PREFIX_FULL,
        PolicyKey {
            endpoint_id,
            identity: peer.identity,
            direction: direction as u8,
            protocol,
            dport: dport.to_ne_bytes(),
        },
    );
    let hit = |key: &Key<PolicyKey>| {
        POLICY
            .get(key)
            .filter(|e| e.flags & POLICY_F_ALLOW != 0)
            .map(|e| e.rule)
    };
    if let Some(rule) = hit(&key) {
        return Some(rule);
    }
    if peer.cidr_identity != peer.identity {
        key.data.identity = peer.cidr_identity;
        if let Some(rule) = hit(&key) {
            return Some(rule);
        }
    }
    key.data.identity = identity::ANY;
    hit(&key)
}

/// Checks a new flow against the egress policy of its source endpoint and the ingress policy of
/// its destination endpoint (either may be absent: not a local pod). `dport` is in network
/// byte order. `src_identity` overrides the ipcache's identity of the source (the tunnel's VNI
/// says who sent a packet from another node, also before this node's watch has seen the pod).
#[inline(always)]
pub fn evaluate(
    saddr: [u8; 4],
    daddr: [u8; 4],
    protocol: u8,
    dport: u16,
    src: Option<&EndpointInfo>,
    dst: Option<&EndpointInfo>,
    src_identity: Option<u32>,
) -> Result<Peers, (DropReason, Peers)> {
    let mut peers = Peers {
        src: ipcache::lookup(saddr),
        dst: ipcache::lookup(daddr),
        egress_rule: 0,
        ingress_rule: 0,
    };
    if let Some(identity) = src_identity {
        peers.src.identity = identity;
    }
    // Traffic between a pod and its own node is always allowed, both ways: kubelet probes in,
    // node-local agents and DNS caches out (NetworkPolicy's one exception to isolation).
    if let Some(s) = src
        && s.flags & ENDPOINT_F_EGRESS_ISOLATED != 0
        && peers.dst.identity != identity::HOST
    {
        if s.flags & ENDPOINT_F_POLICY_INCOMPLETE != 0 {
            return Err((DropReason::PolicyIncomplete, peers));
        }
        match allows(s.id, Direction::Egress, peers.dst, protocol, dport) {
            Some(rule) => peers.egress_rule = rule,
            None => return Err((DropReason::PolicyDeniedEgress, peers)),
        }
    }
    if let Some(d) = dst
        && d.flags & ENDPOINT_F_INGRESS_ISOLATED != 0
        && peers.src.identity != identity::HOST
    {
        if d.flags & ENDPOINT_F_POLICY_INCOMPLETE != 0 {
            return Err((DropReason::PolicyIncomplete, peers));
        }
        match allows(d.id, Direction::Ingress, peers.src, protocol, dport) {
            Some(rule) => peers.ingress_rule = rule,
            None => return Err((DropReason::PolicyDeniedIngress, peers)),
        }
    }
    Ok(peers)
}
