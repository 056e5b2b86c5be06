//! Crafted packets for the programs' tests (run through `BPF_PROG_TEST_RUN`, or sent from raw
//! sockets).

use std::net::Ipv4Addr;

use myelin_common::proto::ETH_P_IP;

/// The Internet checksum (RFC 1071).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 (valid header checksum, TTL 64) around `l4`.
pub fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(34 + l4.len());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(l4);
    p
}

#[cfg(test)]
mod tests {
    use myelin_common::proto::IPPROTO_TCP;

    use super::*;

    #[test]
    fn a_frame_carries_a_valid_ipv4_header() {
        let f = frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            IPPROTO_TCP,
            &[0x03, 0xe8, 0, 80],
        );
        assert_eq!(f.len(), 14 + 20 + 4);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        // A header with its checksum in place sums to zero.
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(f[14 + 9], IPPROTO_TCP);
        assert_eq!(&f[34..36], &1000u16.to_be_bytes());
    }
}
