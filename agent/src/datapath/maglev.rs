//! `lb_maglev` (`--lb-algorithm maglev`): the Maglev lookup tables of the frontends reached
//! from outside, kept equal to the desired ones (`crate::desired::services::maglev`) table by
//! table. One map value is a whole table, replaced in one write: a program reads the old table
//! or the new one, never a mix, and a table that does not fit is not there at all (its frontend
//! chooses at random, as without Maglev).
//!
//! Tables are written after `lb_services` (see `super::table::Tables::apply`): an entry names a
//! backend slot, and the datapath uses it only when it lies within the count it read, so a
//! table never sends a connection to a slot that holds no backend; the new table follows the
//! new slots at once. A frontend whose slots were held back (a full `lb_services`) keeps the
//! table it had, which matches the slots it kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use myelin_common::{
    lb::LbKey,
    maglev::{MAGLEV_MAX_TABLE_SIZE, MaglevTable},
};

use super::table::{Diff, MapBackend, TableError, Unwritten};
use crate::desired::services::maglev::{Lookup, Tables};

/// The frontend (address, port in network byte order, protocol) of a key.
fn frontend_of(k: &LbKey) -> ([u8; 4], u16, u8) {
    (k.addr, k.port, k.protocol)
}

/// Keeps `lb_maglev` equal to the desired tables; remembers the tables it wrote (shared with
/// the desired state, not copied) or found (without their backends, which the map does not
/// hold: compared by their entries).
pub struct MaglevReconciler<M> {
    map: M,
    current: BTreeMap<LbKey, Arc<Lookup>>,
}

impl<M: MapBackend<LbKey, MaglevTable>> MaglevReconciler<M> {
    /// Reads the map once: what an earlier agent wrote is kept where it is still wanted.
    pub fn new(map: M) -> Result<Self, TableError> {
        let current = map
            .entries()?
            .into_iter()
            .map(|(k, t)| {
                let used = (t.size as usize).min(MAGLEV_MAX_TABLE_SIZE);
                let found = Lookup {
                    backends: Vec::new(),
                    entries: t.slots[..used].to_vec(),
                };
                (k, Arc::new(found))
            })
            .collect();
        Ok(Self { map, current })
    }

    pub fn map(&self) -> &M {
        &self.map
    }

    /// The tables the map holds, by frontend.
    pub fn current(&self) -> &BTreeMap<LbKey, Arc<Lookup>> {
        &self.current
    }

    /// Makes the map hold `desired`, except for the frontends in `held` (their slots were not
    /// written: their tables stay as they are). Removals first, so that a full map makes room.
    /// A table that cannot be written is reported in [`Unwritten`], and whatever older table
    /// its frontend had is removed: it chooses at random rather than from a table computed for
    /// other slots. `Err` only for a table that could not be removed.
    pub fn apply(
        &mut self,
        desired: &Tables,
        held: &BTreeSet<([u8; 4], u16, u8)>,
    ) -> Result<(Diff, Option<Unwritten>), TableError> {
        let mut diff = Diff::default();
        let stale: Vec<LbKey> = self
            .current
            .keys()
            .filter(|k| !desired.contains_key(*k) && !held.contains(&frontend_of(k)))
            .copied()
            .collect();
        for key in stale {
            self.map.remove(&key)?;
            self.current.remove(&key);
            diff.removed += 1;
        }
        let capacity = self.map.capacity() as usize;
        let mut first_error = None;
        let mut unwritten = Vec::new();
        for (key, lookup) in desired {
            if held.contains(&frontend_of(key)) {
                continue;
            }
            let known = self.current.get(key);
            if known.is_some_and(|k| Arc::ptr_eq(k, lookup) || k.entries == lookup.entries) {
                continue;
            }
            let result = if known.is_none() && self.current.len() >= capacity {
                Err(TableError::Full {
                    map: self.map.name(),
                    capacity: capacity as u32,
                })
            } else {
                self.map.insert(*key, value_of(&lookup.entries))
            };
            match result {
                Ok(()) => {
                    if known.is_some() {
                        diff.updated += 1;
                    } else {
                        diff.inserted += 1;
                    }
                    self.current.insert(*key, Arc::clone(lookup));
                }
                Err(e) => {
                    if known.is_some() {
                        self.map.remove(key)?;
                        self.current.remove(key);
                        diff.removed += 1;
                    }
                    first_error.get_or_insert(e);
                    unwritten.push(frontend_of(key));
                }
            }
        }
        let unwritten = first_error.map(|error| Unwritten {
            error,
            frontends: unwritten,
        });
        Ok((diff, unwritten))
    }
}

/// The map value of a table's entries (at most [`MAGLEV_MAX_TABLE_SIZE`]; the rest zero).
fn value_of(entries: &[u16]) -> MaglevTable {
    let used = entries.len().min(MAGLEV_MAX_TABLE_SIZE);
    let mut value = MaglevTable {
        // At most MAGLEV_MAX_TABLE_SIZE.
        size: used as u32,
        slots: [0; MAGLEV_MAX_TABLE_SIZE],
        _pad: 0,
    };
    value.slots[..used].copy_from_slice(&entries[..used]);
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{datapath::table::FakeMap, desired::services::maglev::populate};

    fn key(port: u16) -> LbKey {
        LbKey {
            addr: [198, 51, 100, 20],
            port: port.to_be(),
            protocol: 6,
            _pad0: 0,
            slot: 0,
            _pad1: 0,
        }
    }

    fn lookup(n: u8) -> Arc<Lookup> {
        let backends: Vec<_> = (1..=n).map(|i| ([10, 244, 0, i], 80u16.to_be())).collect();
        Arc::new(Lookup {
            entries: populate(&backends, 251),
            backends,
        })
    }

    #[test]
    fn tables_are_written_whole_and_only_when_they_change() {
        let mut r = MaglevReconciler::new(FakeMap::new("lb_maglev", 8)).unwrap();
        let desired = Tables::from([(key(80), lookup(3)), (key(81), lookup(2))]);
        let (diff, unwritten) = r.apply(&desired, &BTreeSet::new()).unwrap();
        assert!(unwritten.is_none());
        assert_eq!(diff.inserted, 2);
        let written = &r.map().entries[&key(80)];
        assert_eq!(written.size, 251);
        assert_eq!(written.slots[..251], lookup(3).entries[..]);
        assert!(written.slots[251..].iter().all(|s| *s == 0));
        let (diff, _) = r.apply(&desired, &BTreeSet::new()).unwrap();
        assert!(diff.is_empty(), "unchanged tables write nothing");
        // One backend fewer: one write replaces the table; a frontend gone loses its table.
        let fewer = Tables::from([(key(80), lookup(2))]);
        r.map.journal.clear();
        let (diff, _) = r.apply(&fewer, &BTreeSet::new()).unwrap();
        assert_eq!((diff.updated, diff.removed), (1, 1));
        assert_eq!(r.map().journal.len(), 2);
        assert_eq!(
            r.map().entries[&key(80)].slots[..251],
            lookup(2).entries[..]
        );
    }

    #[test]
    fn a_held_frontend_keeps_its_table_and_one_that_does_not_fit_has_none() {
        let mut r = MaglevReconciler::new(FakeMap::new("lb_maglev", 1)).unwrap();
        r.apply(&Tables::from([(key(80), lookup(3))]), &BTreeSet::new())
            .unwrap();
        let held = BTreeSet::from([frontend_of(&key(80))]);
        let (diff, unwritten) = r
            .apply(&Tables::from([(key(80), lookup(2))]), &held)
            .unwrap();
        assert!(diff.is_empty() && unwritten.is_none());
        assert_eq!(
            r.map().entries[&key(80)].slots[..251],
            lookup(3).entries[..]
        );

        let both = Tables::from([(key(80), lookup(3)), (key(81), lookup(2))]);
        let (_, unwritten) = r.apply(&both, &BTreeSet::new()).unwrap();
        let unwritten = unwritten.expect("the second table does not fit");
        assert!(matches!(unwritten.error, TableError::Full { .. }));
        assert_eq!(unwritten.frontends, [frontend_of(&key(81))]);
        assert!(!r.map().entries.contains_key(&key(81)), "no table: random");
        assert!(r.map().entries.contains_key(&key(80)));
    }

    #[test]
    fn tables_an_earlier_agent_wrote_are_read_back() {
        let mut map = FakeMap::new("lb_maglev", 4);
        map.entries.insert(key(80), value_of(&lookup(3).entries));
        map.entries.insert(key(99), value_of(&lookup(1).entries));
        let mut r = MaglevReconciler::new(map).unwrap();
        assert_eq!(r.current()[&key(80)].entries.len(), 251);
        let (diff, _) = r
            .apply(&Tables::from([(key(80), lookup(3))]), &BTreeSet::new())
            .unwrap();
        assert_eq!(
            (diff.inserted, diff.updated, diff.removed),
            (0, 0, 1),
            "the same table is not written again; a leftover goes"
        );
    }
}
