//! Protocol numbers as packets carry them. The datapath parses headers with them, and conntrack
//! keys, policy keys and events store the IP protocol number as the packet had it, so the agent,
//! the CLI and the tests read those fields with the same constants.

/// EtherType of IPv4 (host byte order; frames carry it big-endian).
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;

/// IP protocol numbers (IANA), the IPv4 header's `protocol` field.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
