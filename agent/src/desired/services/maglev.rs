//! Maglev lookup tables (`--lb-algorithm maglev`, see `myelin_common::maglev`): for every
//! frontend reached from outside the cluster (a node port, an external IP, a load balancer's
//! address) with backends, the table that maps a flow's hash to one of its backend slots.
//!
//! A table is a pure function of the frontend's backends in slot order (address and port):
//! nodes with the same backends compute the same table, whatever their own address, which is
//! what lets a router spread one client connection's packets over several nodes. Maglev's
//! populate (Eisenbud et al., NSDI 2016, section 3.4): each backend's preference list is a
//! permutation of the M entries (an offset and a skip from two hashes of its address and port;
//! M prime), and the backends take turns claiming their next free preferred entry until the
//! table is full. Every backend gets M/N entries, give or take one, and removing a backend
//! hands its entries to the others while moving very few of theirs (Maglev's "minimal
//! disruption" is nearly, not strictly, minimal: the unit tests bound it).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use myelin_common::{
    lb::{LB_F_EXTERNAL_IP, LB_F_LOAD_BALANCER, LB_F_NODEPORT, LbEntry, LbKey},
    maglev::{OFFSET_SEED, SKIP_SEED, hash3},
};

/// How the datapath chooses a new connection's backend (`--lb-algorithm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// A random backend slot, on every frontend.
    #[default]
    Random,
    /// Frontends reached from outside: Maglev consistent hashing of the client's connection;
    /// ClusterIPs stay random.
    Maglev,
}

impl LbAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
        }
    }
}

/// A backend as `lb_services` holds it: address, port in network byte order.
pub type SlotBackend = ([u8; 4], u16);

/// A frontend's lookup table and the backends it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The backends, in slot order.
    pub backends: Vec<SlotBackend>,
    /// M entries: entry `i` is the slot (`1..=backends.len()`) of the backend of the flows whose
    /// hash is `i` modulo M.
    pub entries: Vec<u16>,
}

/// Every outside frontend's table, by its slot 0 key.
pub type Tables = BTreeMap<LbKey, Arc<Lookup>>;

/// The `LB_F_*` flags of frontends reached from outside the cluster.
const OUTSIDE: u32 = LB_F_NODEPORT | LB_F_EXTERNAL_IP | LB_F_LOAD_BALANCER;

/// Maglev's table of `size` entries (a prime) for `backends` in slot order: entry `i` holds a
/// slot number, `1..=backends.len()`. Empty without backends.
pub fn populate(backends: &[SlotBackend], size: u32) -> Vec<u16> {
    let m = u64::from(size);
    if backends.is_empty() || m < 2 {
        return Vec::new();
    }
    // (offset, skip) of each backend's preference list: entry (offset + j * skip) mod M is its
    // j-th choice; with M prime and 0 < skip < M, a permutation of every entry.
    let lists: Vec<(u64, u64)> = backends
        .iter()
        .map(|(addr, port)| {
            let (a, p) = (u32::from_be_bytes(*addr), u32::from(u16::from_be(*port)));
            let offset = u64::from(hash3(OFFSET_SEED, a, p, 0)) % m;
            let skip = u64::from(hash3(SKIP_SEED, a, p, 0)) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; lists.len()];
    let mut entries = vec![0u16; size as usize];
    let mut filled = 0;
    loop {
        for (i, &(offset, skip)) in lists.iter().enumerate() {
            let mut c = ((offset + next[i] * skip) % m) as usize;
            while entries[c] != 0 {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m) as usize;
            }
            // At most MAX_BACKENDS_PER_FRONTEND slots, far below u16::MAX.
            entries[c] = (i + 1) as u16;
            next[i] += 1;
            filled += 1;
            if filled == entries.len() {
                return entries;
            }
        }
    }
}

/// The tables of every frontend of `slots` reached from outside that has backends, of `size`
/// entries. A table of `previous` whose backends are unchanged is kept as it is (no
/// computation, and the reconciler sees the same table); frontends with the same backends (a
/// Service port's node port and external IPs) share one.
pub fn tables(slots: &BTreeMap<LbKey, LbEntry>, size: u32, previous: &Tables) -> Tables {
    let mut out = Tables::new();
    let mut computed: HashMap<Vec<SlotBackend>, Arc<Lookup>> = HashMap::new();
    let outside = slots
        .iter()
        .filter(|(k, s)| k.slot == 0 && s.flags & OUTSIDE != 0 && s.count > 0);
    for (key, service) in outside {
        let backends: Vec<SlotBackend> = (1..=service.count)
            .filter_map(|slot| slots.get(&LbKey { slot, ..*key }))
            .map(|b| (b.backend, b.backend_port))
            .collect();
        if backends.len() != usize::from(service.count) {
            continue;
        }
        let kept = previous
            .get(key)
            .filter(|l| l.backends == backends && l.entries.len() == size as usize);
        let lookup = match kept.or_else(|| computed.get(&backends)) {
            Some(l) => Arc::clone(l),
            None => Arc::new(Lookup {
                entries: populate(&backends, size),
                backends: backends.clone(),
            }),
        };
        computed
            .entry(backends)
            .or_insert_with(|| Arc::clone(&lookup));
        out.insert(*key, lookup);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use myelin_common::maglev::{DEFAULT_MAGLEV_TABLE_SIZE, MAGLEV_TABLE_SIZES, flow_hash};

    use super::*;

    fn backends(n: u8) -> Vec<SlotBackend> {
        (1..=n)
            .map(|i| ([10, 244, i % 3, i], 8080u16.to_be()))
            .collect()
    }

    fn shares(entries: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n + 1];
        for e in entries {
            counts[usize::from(*e)] += 1;
        }
        counts
    }

    #[test]
    fn every_entry_names_a_backend_and_each_gets_its_share() {
        for size in MAGLEV_TABLE_SIZES {
            for n in [1u8, 2, 3, 7, 10, 50] {
                let entries = populate(&backends(n), size);
                assert_eq!(entries.len(), size as usize);
                let counts = shares(&entries, usize::from(n));
                assert_eq!(counts[0], 0, "M={size} N={n}: every entry filled");
                let share = size as usize / usize::from(n);
                for (slot, count) in counts.iter().enumerate().skip(1) {
                    assert!(
                        count.abs_diff(share) <= 1,
                        "M={size} N={n}: slot {slot} has {count} entries, not {share} +-1"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_backends_give_the_same_table() {
        let a = populate(&backends(5), DEFAULT_MAGLEV_TABLE_SIZE);
        assert!(a == populate(&backends(5), DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(a != populate(&backends(6), DEFAULT_MAGLEV_TABLE_SIZE));
        // Part of what nodes of different versions must agree on (checked against an
        // independent implementation).
        assert_eq!(
            &populate(&backends(3), 251)[..12],
            &[3, 1, 1, 2, 2, 1, 1, 1, 3, 3, 3, 2]
        );
    }

    /// Removing one backend of N: its entries go to the others, and of the others' entries
    /// only a small fraction moves (Maglev bounds it, it does not make it zero).
    #[test]
    fn removing_a_backend_moves_its_flows_and_hardly_any_other() {
        let size = DEFAULT_MAGLEV_TABLE_SIZE;
        for n in [3u8, 5, 10, 30] {
            let all = backends(n);
            let before = populate(&all, size);
            for gone in [0, usize::from(n) / 2, usize::from(n) - 1] {
                let rest: Vec<SlotBackend> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != gone)
                    .map(|(_, b)| *b)
                    .collect();
                let after = populate(&rest, size);
                let backend =
                    |table: &[u16], list: &[SlotBackend], i: usize| list[usize::from(table[i]) - 1];
                let mut moved = 0;
                for i in 0..size as usize {
                    let was = backend(&before, &all, i);
                    let is = backend(&after, &rest, i);
                    assert_ne!(is, all[gone], "entry {i} still names the removed backend");
                    if was != all[gone] && was != is {
                        moved += 1;
                    }
                }
                assert!(
                    moved * 100 <= size as usize * 2,
                    "N={n}, backend {gone} removed: {moved} of {size} entries of the others moved"
                );
            }
        }
    }

    fn slots_of(frontends: &[(LbKey, u32, &[SlotBackend])]) -> BTreeMap<LbKey, LbEntry> {
        let mut slots = BTreeMap::new();
        for (key, flags, backends) in frontends {
            slots.insert(
                *key,
                LbEntry {
                    count: backends.len() as u16,
                    flags: *flags,
                    ..LbEntry::default()
                },
            );
            for (slot, (addr, port)) in (1u16..).zip(backends.iter()) {
                slots.insert(
                    LbKey { slot, ..*key },
                    LbEntry {
                        backend: *addr,
                        backend_port: *port,
                        ..LbEntry::default()
                    },
                );
            }
        }
        slots
    }

    fn frontend(addr: [u8; 4], port: u16) -> LbKey {
        LbKey {
            addr,
            port: port.to_be(),
            protocol: 6,
            _pad0: 0,
            slot: 0,
            _pad1: 0,
        }
    }

    #[test]
    fn only_outside_frontends_with_backends_get_a_table_and_nodes_agree() {
        let three = backends(3);
        let node_port = |node: [u8; 4]| frontend(node, 30080);
        let cluster_ip = frontend([10, 96, 0, 10], 80);
        let external = frontend([198, 51, 100, 20], 80);
        let empty = frontend([198, 51, 100, 21], 80);
        let node = |addr| {
            slots_of(&[
                (cluster_ip, 0, &three),
                (node_port(addr), LB_F_NODEPORT, &three),
                (external, LB_F_EXTERNAL_IP, &three),
                (empty, LB_F_LOAD_BALANCER, &[]),
            ])
        };
        let one = tables(&node([192, 168, 0, 1]), 1021, &Tables::new());
        let two = tables(&node([192, 168, 0, 2]), 1021, &Tables::new());
        assert_eq!(
            one.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([node_port([192, 168, 0, 1]), external])
        );
        assert_eq!(
            one[&node_port([192, 168, 0, 1])],
            two[&node_port([192, 168, 0, 2])],
            "a node port's table is the same on every node"
        );
        assert!(
            Arc::ptr_eq(&one[&node_port([192, 168, 0, 1])], &one[&external]),
            "computed once for the same backends"
        );
        // Unchanged backends keep their table; a changed set gets a new one.
        let again = tables(&node([192, 168, 0, 1]), 1021, &one);
        assert!(Arc::ptr_eq(&again[&external], &one[&external]));
        let fewer = slots_of(&[(external, LB_F_EXTERNAL_IP, &three[..2])]);
        let changed = tables(&fewer, 1021, &one);
        assert_eq!(changed[&external].backends, three[..2]);
        assert_eq!(changed[&external].entries, populate(&three[..2], 1021));
        // Another size: computed again.
        assert_eq!(
            tables(&node([192, 168, 0, 1]), 251, &one)[&external]
                .entries
                .len(),
            251
        );
    }

    #[test]
    fn a_flow_lands_on_the_same_backend_on_every_node() {
        let entries = populate(&backends(3), 1021);
        let pick = |port: u16| {
            entries
                [(flow_hash([198, 51, 100, 7], port.to_be(), 30080u16.to_be(), 6) % 1021) as usize]
        };
        let picks: BTreeSet<u16> = (40_000..40_100).map(pick).collect();
        assert_eq!(picks, BTreeSet::from([1, 2, 3]), "clients spread over all");
    }
}
