//! Endpoint lookups and per-endpoint counters.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    macros::btf_map,
};
use myelin_common::{
    EndpointCounters, EndpointInfo, Ipv4Key, config::DatapathConfig, maps::DEFAULT_MAX_ENDPOINTS,
};

const MAX: usize = DEFAULT_MAX_ENDPOINTS as usize;

/// Local pods by IPv4 address. Capacity is set by the agent at load (`--max-endpoints`).
#[btf_map(name = "endpoints")]
static ENDPOINTS: HashMap<Ipv4Key, EndpointInfo, MAX> = HashMap::new();

/// Local pods by the ifindex of their host-side veth.
#[btf_map(name = "endpoints_by_if")]
static ENDPOINTS_BY_IF: HashMap<u32, EndpointInfo, MAX> = HashMap::new();

/// Counters indexed by endpoint id (ids start at 1). An array rather than a hash: the verifier
/// turns an array lookup into a bounds check and an offset, where a hash lookup hashes the key
/// and walks a bucket, twice per packet. The agent zeroes an id's slot when it gives the id out
/// and when it takes it back.
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<EndpointCounters, { MAX + 1 }> = PerCpuArray::new();

// Lookups hand out references into the map rather than copies: an `Option<EndpointInfo>`
// copy leaves undefined padding in registers on the `None` path, which the verifier rejects.
// The agent replaces an endpoint's value only while the endpoint is being created or its
// identity or isolation changes; a program that reads a value mid-update sees the old or the
// new field values, either of which is a valid decision at that instant.

/// The endpoint whose host-side veth is `ifindex`.
#[inline(always)]
pub fn by_ifindex(ifindex: u32) -> Option<&'static EndpointInfo> {
    // SAFETY: see above; the reference does not outlive the program run.
    unsafe { ENDPOINTS_BY_IF.get(ifindex) }
}

/// The local endpoint with address `addr`.
#[inline(always)]
pub fn by_ip(addr: [u8; 4]) -> Option<&'static EndpointInfo> {
    // SAFETY: see above.
    unsafe { ENDPOINTS.get(Ipv4Key { addr }) }
}

/// Whether `addr` lies in this node's pod CIDR (never, while the agent has not said it): a
/// mask compare that spares addresses elsewhere the endpoint lookup.
#[inline(always)]
pub fn in_pod_cidr(config: &DatapathConfig, addr: [u8; 4]) -> bool {
    in_subnet(addr, config.pod_cidr, config.pod_cidr_mask)
}

/// Whether `addr` is in the subnet `net`/`mask`; never with an all-zero (unknown) mask.
#[inline(always)]
pub fn in_subnet(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    let mask = u32::from_ne_bytes(mask);
    mask != 0 && u32::from_ne_bytes(addr) & mask == u32::from_ne_bytes(net)
}

#[inline(always)]
pub fn account_tx(id: u32, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot: only this CPU writes it while the program runs.
        unsafe {
            (*c).tx_packets += 1;
            (*c).tx_bytes += u64::from(len);
        }
    }
}

#[inline(always)]
pub fn account_rx(id: u32, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot: only this CPU writes it while the program runs.
        unsafe {
            (*c).rx_packets += 1;
            (*c).rx_bytes += u64::from(len);
        }
    }
}
