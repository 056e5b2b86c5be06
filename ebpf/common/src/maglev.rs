//! Maglev consistent hashing (`--lb-algorithm maglev`) for the frontends reached from outside
//! the cluster (node ports, external IPs, load balancers' addresses).
//!
//! `lb_maglev` holds one lookup table per such frontend, keyed by its slot 0 in `lb_services`
//! ([`crate::lb::LbKey`] with `slot` 0):
//!
//! ```text
//! {frontend addr, port, proto, slot 0} -> {size M, slots[0..M]: a backend slot 1..=count}
//! ```
//!
//! A new connection's backend slot is `slots[flow_hash % M]`, where [`flow_hash`] covers only
//! what every node sees alike: the client's address and port, the frontend's port and the
//! protocol, never the node's own address. The agents compute the table from the backends
//! alone (Maglev's permutation, from two hashes of each backend's address and port), so every
//! node picks the same backend for the same client connection, which is what a router
//! spreading one flow's packets over several nodes (ECMP) needs; and removing a backend moves
//! (nearly) only the connections that were on it.
//!
//! The datapath trusts an entry only when it lies in `1..=count` of the service slot it read;
//! anything else (a table being replaced, none at all) falls back to a random slot.

use crate::{lb::LbKey, user_pod};

/// The table sizes `--lb-maglev-table-size` accepts: primes (Maglev needs M prime so that
/// every backend's permutation visits every entry), Cilium's list up to the largest one
/// `lb_maglev`'s value holds.
pub const MAGLEV_TABLE_SIZES: [u32; 7] = [251, 509, 1021, 2039, 4093, 8191, 16_381];

/// The largest table: the entries `lb_maglev`'s value has room for.
pub const MAGLEV_MAX_TABLE_SIZE: usize = 16_381;

/// The default table size: the largest, since every value takes room for it anyway; with it
/// each backend gets its share of the flows within 1% up to about 160 backends (Maglev's
/// advice: M > 100 x N).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;

/// `lb_maglev`'s key: the frontend's slot 0.
pub type MaglevKey = LbKey;

/// `lb_maglev`'s value: a frontend's lookup table. 32 KiB, whatever `size` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// M: how many of `slots` are used, one of [`MAGLEV_TABLE_SIZES`].
    pub size: u32,
    /// Entry `flow_hash % size`: the backend slot (`1..=count`) for flows hashing there.
    pub slots: [u16; MAGLEV_MAX_TABLE_SIZE],
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<MaglevTable>() == 32_768);

user_pod!(MaglevTable);

/// Seeds of the three hashes: a flow's, and a backend's offset and skip.
const FLOW_SEED: u32 = 0x6d79_656c;
pub const OFFSET_SEED: u32 = 0x6f66_6673;
pub const SKIP_SEED: u32 = 0x736b_6970;

/// murmur3's mixing of one 32-bit word into `h`.
#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finalisation of a hash over `len` bytes.
#[inline(always)]
const fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// murmur3 (32 bits) over three words, with `seed`: every hash of Maglev's, in the datapath
/// and in the agent. Part of what nodes must agree on: changing it changes every table.
#[inline(always)]
pub const fn hash3(seed: u32, a: u32, b: u32, c: u32) -> u32 {
    finish(mix(mix(mix(seed, a), b), c), 12)
}

/// The hash of a client's connection to a frontend: its address and port, the frontend's port
/// (both ports in network byte order, as packets carry them) and the protocol. The frontend's
/// address is left out: a node port's is each node's own.
#[inline(always)]
pub const fn flow_hash(client: [u8; 4], client_port: u16, frontend_port: u16, protocol: u8) -> u32 {
    hash3(
        FLOW_SEED,
        u32::from_be_bytes(client),
        (u16::from_be(client_port) as u32) << 16 | u16::from_be(frontend_port) as u32,
        protocol as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_hash_does_not_change() {
        // Nodes running different versions must agree: these values are part of the interface.
        // (Checked against an independent implementation.)
        assert_eq!(hash3(0, 0, 0, 0), 0xd941_144b);
        assert_eq!(
            flow_hash([198, 51, 100, 7], 40_000u16.to_be(), 30_080u16.to_be(), 6),
            0xcd0c_5f16
        );
        assert_ne!(
            flow_hash([198, 51, 100, 7], 40_000u16.to_be(), 30_080u16.to_be(), 6),
            flow_hash([198, 51, 100, 7], 40_001u16.to_be(), 30_080u16.to_be(), 6)
        );
    }

    #[test]
    fn every_table_size_is_a_prime_that_fits_the_value() {
        for m in MAGLEV_TABLE_SIZES {
            assert!(m as usize <= MAGLEV_MAX_TABLE_SIZE);
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        }
        assert!(MAGLEV_TABLE_SIZES.contains(&DEFAULT_MAGLEV_TABLE_SIZE));
    }
}
