//! Key/value maps as the agent sees them, and the reconciler that keeps one equal to a desired
//! content by writing only the difference.
//!
//! [`MapBackend`] has two implementations: the kernel map (aya) and [`FakeMap`], an in-memory
//! twin that counts writes, so the reconciler's diffing is unit-tested without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::Ipv4Addr,
    sync::Arc,
};

use aya::{
    Pod,
    maps::{
        HashMap as BpfHashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use myelin_common::{
    EndpointInfo, IpcacheEntry, Ipv4Key, PolicyEntry, PolicyKey,
    lb::{LbEntry, LbKey},
    maglev::MaglevTable,
    nat::MasqExclude,
};

use super::maglev::MaglevReconciler;
pub use crate::desired::LpmKey;
use crate::desired::{DesiredState, services::maglev::Tables as MaglevTables};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("map `{map}` is full ({capacity} entries): raise its capacity")]
    Full { map: &'static str, capacity: u32 },
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl TableError {
    /// Wraps an aya error, recognising a full map (the kernel answers E2BIG).
    pub fn from_aya(map: &'static str, capacity: u32, source: aya::maps::MapError) -> Self {
        if let aya::maps::MapError::SyscallError(e) = &source
            && e.io_error.raw_os_error() == Some(libc::E2BIG)
        {
            return Self::Full { map, capacity };
        }
        Self::Map { map, source }
    }
}

/// A BPF map, or its fake.
pub trait MapBackend<K, V> {
    /// Name used in errors and metrics.
    fn name(&self) -> &'static str;
    fn capacity(&self) -> u32;
    fn entries(&self) -> Result<Vec<(K, V)>, TableError>;
    fn insert(&mut self, key: K, value: V) -> Result<(), TableError>;
    fn remove(&mut self, key: &K) -> Result<(), TableError>;
}

/// A kernel hash map.
pub struct KernelHash<K, V> {
    name: &'static str,
    capacity: u32,
    map: BpfHashMap<MapData, K, V>,
}

impl<K: Pod, V: Pod> KernelHash<K, V> {
    pub fn new(name: &'static str, map: aya::maps::Map) -> Result<Self, TableError> {
        let map =
            BpfHashMap::try_from(map).map_err(|source| TableError::Map { map: name, source })?;
        let capacity = map_capacity(name, aya::maps::IterableMap::map(&map))?;
        Ok(Self {
            name,
            capacity,
            map,
        })
    }
}

fn map_capacity(name: &'static str, data: &MapData) -> Result<u32, TableError> {
    data.info()
        .map(|i| i.max_entries())
        .map_err(|source| TableError::Map { map: name, source })
}

impl<K: Pod, V: Pod> MapBackend<K, V> for KernelHash<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn entries(&self) -> Result<Vec<(K, V)>, TableError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| TableError::Map {
                map: self.name,
                source,
            })
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), TableError> {
        self.map
            .insert(key, value, 0)
            .map_err(|e| TableError::from_aya(self.name, self.capacity, e))
    }

    fn remove(&mut self, key: &K) -> Result<(), TableError> {
        match self.map.remove(key) {
            Ok(()) => Ok(()),
            // Already gone is what we wanted.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(TableError::Map {
                map: self.name,
                source,
            }),
        }
    }
}

/// A kernel LPM trie.
pub struct KernelLpm<K, V> {
    name: &'static str,
    capacity: u32,
    map: LpmTrie<MapData, K, V>,
}

impl<K: Pod, V: Pod> KernelLpm<K, V> {
    pub fn new(name: &'static str, map: aya::maps::Map) -> Result<Self, TableError> {
        let map = LpmTrie::try_from(map).map_err(|source| TableError::Map { map: name, source })?;
        let capacity = map_capacity(name, aya::maps::IterableMap::map(&map))?;
        Ok(Self {
            name,
            capacity,
            map,
        })
    }
}

impl<K: Pod, V: Pod> MapBackend<LpmKey<K>, V> for KernelLpm<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn entries(&self) -> Result<Vec<(LpmKey<K>, V)>, TableError> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    (
                        LpmKey {
                            prefix_len: k.prefix_len(),
                            data: k.data(),
                        },
                        v,
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|source| TableError::Map {
                map: self.name,
                source,
            })
    }

    fn insert(&mut self, key: LpmKey<K>, value: V) -> Result<(), TableError> {
        self.map
            .insert(&Key::new(key.prefix_len, key.data), value, 0)
            .map_err(|e| TableError::from_aya(self.name, self.capacity, e))
    }

    fn remove(&mut self, key: &LpmKey<K>) -> Result<(), TableError> {
        match self.map.remove(&Key::new(key.prefix_len, key.data)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(TableError::Map {
                map: self.name,
                source,
            }),
        }
    }
}

/// In-memory twin of a kernel map, counting writes and recording them in order.
#[derive(Debug)]
pub struct FakeMap<K, V> {
    pub name: &'static str,
    pub capacity: u32,
    pub entries: BTreeMap<K, V>,
    pub writes: usize,
    /// Every write, in order: the key and the value written (`None`: removed). What a
    /// program reading the map concurrently could have seen after each.
    pub journal: Vec<(K, Option<V>)>,
}

impl<K, V> FakeMap<K, V> {
    pub fn new(name: &'static str, capacity: u32) -> Self {
        Self {
            name,
            capacity,
            entries: BTreeMap::new(),
            writes: 0,
            journal: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> MapBackend<K, V> for FakeMap<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn entries(&self) -> Result<Vec<(K, V)>, TableError> {
        Ok(self
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), TableError> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity as usize {
            return Err(TableError::Full {
                map: self.name,
                capacity: self.capacity,
            });
        }
        self.writes += 1;
        self.journal.push((key.clone(), Some(value.clone())));
        self.entries.insert(key, value);
        Ok(())
    }

    fn remove(&mut self, key: &K) -> Result<(), TableError> {
        self.writes += 1;
        self.journal.push((key.clone(), None));
        self.entries.remove(key);
        Ok(())
    }
}

/// What one reconciliation changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Diff {
    pub inserted: usize,
    pub updated: usize,
    pub removed: usize,
}

impl std::ops::Add for Diff {
    type Output = Diff;

    fn add(self, o: Diff) -> Diff {
        Diff {
            inserted: self.inserted + o.inserted,
            updated: self.updated + o.updated,
            removed: self.removed + o.removed,
        }
    }
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn writes(&self) -> usize {
        self.inserted + self.updated + self.removed
    }
}

/// Keeps a map equal to a desired content. It remembers what it last wrote, so a reconciliation
/// costs a comparison in memory plus one syscall per entry that actually changed; on creation
/// it reads the map once, which removes whatever an earlier agent left behind.
pub struct Reconciler<K, V, M> {
    map: M,
    current: BTreeMap<K, V>,
}

impl<K, V, M> Reconciler<K, V, M>
where
    K: Ord + Clone + Debug,
    V: PartialEq + Clone,
    M: MapBackend<K, V>,
{
    pub fn new(map: M) -> Result<Self, TableError> {
        let current = map.entries()?.into_iter().collect();
        Ok(Self { map, current })
    }

    pub fn map(&self) -> &M {
        &self.map
    }

    /// The content the map holds, as far as this reconciler wrote or read it.
    pub fn current(&self) -> &BTreeMap<K, V> {
        &self.current
    }

    /// Writes the difference between `desired` and the map. On error, what was written stays
    /// recorded, so the next call retries only the rest. Removals go first so that a full map
    /// makes room before inserts.
    pub fn apply(&mut self, desired: &BTreeMap<K, V>) -> Result<Diff, TableError> {
        let (stale, changed) = differences(&self.current, desired);
        let mut diff = Diff::default();
        for key in stale {
            self.map.remove(&key)?;
            self.current.remove(&key);
            diff.removed += 1;
        }
        let mut first_error = None;
        for (key, value) in changed {
            // Keep going: one full map must not stop unrelated updates.
            if let Err(e) = self.write(key, value, &mut diff) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(diff),
        }
    }

    /// Writes one entry and records it.
    fn write(&mut self, key: &K, value: &V, diff: &mut Diff) -> Result<(), TableError> {
        let is_update = self.current.contains_key(key);
        self.map.insert(key.clone(), value.clone())?;
        self.current.insert(key.clone(), value.clone());
        if is_update {
            diff.updated += 1;
        } else {
            diff.inserted += 1;
        }
        Ok(())
    }

    /// Removes one entry and records it.
    fn erase(&mut self, key: &K, diff: &mut Diff) -> Result<(), TableError> {
        self.map.remove(key)?;
        self.current.remove(key);
        diff.removed += 1;
        Ok(())
    }
}

impl<M: MapBackend<LbKey, LbEntry>> Reconciler<LbKey, LbEntry, M> {
    /// Services' slots, written in the order the datapath relies on: it reads a frontend's
    /// slot 0 (`count`), then one of the slots `1..=count`, which must be there. So:
    ///
    /// 1. frontends that go lose their slot 0 first, and are no longer found, then their other
    ///    slots (a packet that read the count a moment before finds no backend: refused, as
    ///    it would be a moment later);
    /// 2. frontend by frontend, backend slots are written before the slot 0 whose count makes
    ///    them visible (new frontends, new counts, flags and affinity);
    /// 3. last, the slots beyond a count that shrank.
    ///
    /// A frontend that does not fit in the map as a whole is not begun, and one of whose slots
    /// could not be written keeps its slot 0 and its surplus slots as they were, so that it
    /// never counts a slot that is not there; either is reported in [`Unwritten`], and the
    /// other frontends are written all the same (a smaller one after it may fit). Those held
    /// back get a second try once the pass has removed what it removes; later passes retry
    /// them too. `Err` only for a slot that could not be removed.
    pub fn apply_slots(
        &mut self,
        desired: &BTreeMap<LbKey, LbEntry>,
    ) -> Result<(Diff, Option<Unwritten>), TableError> {
        let (stale, changed) = differences(&self.current, desired);
        let mut diff = Diff::default();
        let gone: BTreeSet<_> = stale
            .iter()
            .filter(|k| k.slot == 0 && !desired.contains_key(*k))
            .map(frontend_of)
            .collect();
        for key in stale.iter().filter(|k| k.slot == 0) {
            self.erase(key, &mut diff)?;
        }
        for key in stale.iter().filter(|k| gone.contains(&frontend_of(k))) {
            if k_is_backend(key) {
                self.erase(key, &mut diff)?;
            }
        }
        let mut first_error = None;
        let held = self.write_frontends(&changed, &mut diff, &mut first_error);
        for key in stale.iter().filter(|k| k_is_backend(k)) {
            if !held.contains(&frontend_of(key)) && self.current.contains_key(key) {
                self.erase(key, &mut diff)?;
            }
        }
        let held = if held.is_empty() {
            held
        } else {
            let again: Vec<_> = changed
                .iter()
                .copied()
                .filter(|(k, _)| held.contains(&frontend_of(k)))
                .collect();
            first_error = None;
            self.write_frontends(&again, &mut diff, &mut first_error)
        };
        let unwritten = first_error.map(|error| Unwritten {
            error,
            frontends: held.into_iter().collect(),
        });
        Ok((diff, unwritten))
    }

    /// Writes `changed` (sorted by key: frontend by frontend, slot 0 first) in the order of
    /// [`Self::apply_slots`]; returns the frontends held back.
    fn write_frontends(
        &mut self,
        changed: &[(&LbKey, &LbEntry)],
        diff: &mut Diff,
        first_error: &mut Option<TableError>,
    ) -> BTreeSet<([u8; 4], u16, u8)> {
        let mut held = BTreeSet::new();
        let capacity = self.map.capacity() as usize;
        let mut rest = changed;
        while let Some((first, _)) = rest.first() {
            let end = rest
                .iter()
                .position(|(k, _)| frontend_of(k) != frontend_of(first))
                .unwrap_or(rest.len());
            let (group, after) = rest.split_at(end);
            rest = after;
            let new = group
                .iter()
                .filter(|(k, _)| !self.current.contains_key(*k))
                .count();
            if self.current.len() + new > capacity {
                held.insert(frontend_of(first));
                first_error.get_or_insert(TableError::Full {
                    map: self.map.name(),
                    capacity: capacity as u32,
                });
                continue;
            }
            let (service, backends): (Vec<_>, Vec<_>) =
                group.iter().partition(|(k, _)| k.slot == 0);
            for (key, value) in backends.into_iter().chain(service) {
                if let Err(e) = self.write(key, value, diff) {
                    held.insert(frontend_of(key));
                    first_error.get_or_insert(e);
                    break;
                }
            }
        }
        held
    }
}

/// The frontend a slot belongs to.
fn frontend_of(k: &LbKey) -> ([u8; 4], u16, u8) {
    (k.addr, k.port, k.protocol)
}

fn k_is_backend(k: &LbKey) -> bool {
    k.slot != 0
}

/// Frontends whose slots [`Reconciler::apply_slots`] could not write (as `(address, port in
/// network order, protocol)`), and the first error: a full `lb_services` above all. They are
/// not translated, or still with their earlier backends.
#[derive(Debug)]
pub struct Unwritten {
    pub error: TableError,
    pub frontends: Vec<([u8; 4], u16, u8)>,
}

/// Keys of `current` that `desired` lacks, and the entries of `desired` that `current` lacks or
/// holds with another value: one walk over both maps in key order (an ADD on a node with a
/// large cluster compares tens of thousands of entries to change a handful).
fn differences<'a, K: Ord + Clone, V: PartialEq>(
    current: &BTreeMap<K, V>,
    desired: &'a BTreeMap<K, V>,
) -> (Vec<K>, Vec<(&'a K, &'a V)>) {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let mut stale = Vec::new();
    let mut changed = Vec::new();
    let mut have = current.iter().peekable();
    let mut want = desired.iter().peekable();
    loop {
        match (have.peek(), want.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                stale.push((*k).clone());
                have.next();
            }
            (None, Some(&(k, v))) => {
                changed.push((k, v));
                want.next();
            }
            (Some((hk, hv)), Some(&(wk, wv))) => match (*hk).cmp(wk) {
                Less => {
                    stale.push((*hk).clone());
                    have.next();
                }
                Greater => {
                    changed.push((wk, wv));
                    want.next();
                }
                Equal => {
                    if *hv != wv {
                        changed.push((wk, wv));
                    }
                    have.next();
                    want.next();
                }
            },
        }
    }
    (stale, changed)
}

/// What a datapath does around the reconciled maps when it applies a desired state.
pub trait ApplyHooks {
    /// Before any map is written: endpoint ids that must have a (zeroed) counters slot.
    fn sync_counters(&mut self, ids: &BTreeSet<u32>) -> Result<(), TableError>;
    /// After the maps changed: tracked connections must be checked against policy again.
    fn policy_changed(&mut self) -> Result<(), TableError>;
}

/// The maps the agent reconciles, over the kernel's maps or in-memory fakes: both datapaths
/// apply a desired state through [`Tables::apply`], so the order the programs rely on is
/// written once and unit-tested.
pub struct Tables<E, B, I, P, M, S, G> {
    pub endpoints: Reconciler<Ipv4Key, EndpointInfo, E>,
    pub endpoints_by_if: Reconciler<u32, EndpointInfo, B>,
    pub ipcache: Reconciler<LpmKey<Ipv4Key>, IpcacheEntry, I>,
    pub policy: Reconciler<LpmKey<PolicyKey>, PolicyEntry, P>,
    pub masq_exclude: Reconciler<LpmKey<Ipv4Key>, MasqExclude, M>,
    pub lb_services: Reconciler<LbKey, LbEntry, S>,
    /// The frontends the last pass over `lb_services` could not write.
    pub lb_unwritten: Option<Unwritten>,
    /// The slots `lb_services` holds, all of them written: the same slots again (a state
    /// computed for a pod's change) need no pass over the map.
    lb_applied: Option<Arc<BTreeMap<LbKey, LbEntry>>>,
    /// Maglev's lookup tables (`--lb-algorithm maglev`), written after `lb_services`.
    pub lb_maglev: MaglevReconciler<G>,
    /// The tables the last pass over `lb_maglev` could not write.
    pub lb_maglev_unwritten: Option<Unwritten>,
    /// The tables `lb_maglev` holds, all of them written (as `lb_applied`).
    maglev_applied: Option<Arc<MaglevTables>>,
}

impl<E, B, I, P, M, S, G> Tables<E, B, I, P, M, S, G>
where
    E: MapBackend<Ipv4Key, EndpointInfo>,
    B: MapBackend<u32, EndpointInfo>,
    I: MapBackend<LpmKey<Ipv4Key>, IpcacheEntry>,
    P: MapBackend<LpmKey<PolicyKey>, PolicyEntry>,
    M: MapBackend<LpmKey<Ipv4Key>, MasqExclude>,
    S: MapBackend<LbKey, LbEntry>,
    G: MapBackend<LbKey, MaglevTable>,
{
    /// Reads each map once (see [`Reconciler::new`]).
    pub fn new(
        endpoints: E,
        endpoints_by_if: B,
        ipcache: I,
        policy: P,
        masq_exclude: M,
        lb_services: S,
        lb_maglev: G,
    ) -> Result<Self, TableError> {
        Ok(Self {
            endpoints: Reconciler::new(endpoints)?,
            endpoints_by_if: Reconciler::new(endpoints_by_if)?,
            ipcache: Reconciler::new(ipcache)?,
            policy: Reconciler::new(policy)?,
            masq_exclude: Reconciler::new(masq_exclude)?,
            lb_services: Reconciler::new(lb_services)?,
            lb_unwritten: None,
            lb_applied: None,
            lb_maglev: MaglevReconciler::new(lb_maglev)?,
            lb_maglev_unwritten: None,
            maglev_applied: None,
        })
    }

    /// Whether `slots` (the same `Arc`) were written whole by the last pass: a state computed
    /// for a pod's change hands the slots over again, and nothing about Services changes.
    pub fn lb_services_applied(&self, slots: &Arc<BTreeMap<LbKey, LbEntry>>) -> bool {
        self.lb_applied
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, slots))
    }

    /// Makes the maps hold `desired`, writing only the difference. Counters, addresses and
    /// policy entries go first and endpoints last: a program that finds an endpoint (and its
    /// isolation flags) must find everything they refer to. When anything policy depends on
    /// changed, the policy revision is bumped last, so tracked connections are re-checked
    /// against the new state. `masq_exclude` and `lb_services` follow the cluster state like the
    /// ipcache (kept as they are until it is known); no verdict depends on them: policy sees
    /// a Service's backend, whatever the slots were when it was chosen.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        hooks: &mut impl ApplyHooks,
    ) -> Result<Diff, TableError> {
        hooks.sync_counters(&desired.counter_ids)?;
        let mut diff = Diff::default();
        let mut masq = Diff::default();
        if !desired.keep_policy_state {
            diff = self.ipcache.apply(&desired.ipcache)? + self.policy.apply(&desired.policy)?;
            // Services that do not fit never hold back pods: they are reported, and the rest
            // is written.
            let mut slots = Diff::default();
            if !self.lb_services_applied(&desired.lb_services) {
                self.lb_applied = None;
                let unwritten;
                (slots, unwritten) = self.lb_services.apply_slots(&desired.lb_services)?;
                if unwritten.is_none() {
                    self.lb_applied = Some(Arc::clone(&desired.lb_services));
                }
                self.lb_unwritten = unwritten;
            }
            slots = slots + self.apply_maglev(&desired.lb_maglev)?;
            masq = self.masq_exclude.apply(&desired.masq_exclude)? + slots;
        }
        let diff = diff
            + self.endpoints.apply(&desired.endpoints)?
            + self.endpoints_by_if.apply(&desired.endpoints_by_if)?;
        if !diff.is_empty() {
            hooks.policy_changed()?;
        }
        Ok(diff + masq)
    }

    /// Maglev's tables, once the slots they name are written; a frontend whose slots were held
    /// back keeps its table (see `super::maglev`).
    fn apply_maglev(&mut self, desired: &Arc<MaglevTables>) -> Result<Diff, TableError> {
        let held: BTreeSet<_> = self
            .lb_unwritten
            .iter()
            .flat_map(|u| u.frontends.iter().copied())
            .collect();
        let applied = held.is_empty()
            && self
                .maglev_applied
                .as_ref()
                .is_some_and(|a| Arc::ptr_eq(a, desired));
        if applied {
            return Ok(Diff::default());
        }
        self.maglev_applied = None;
        let (diff, unwritten) = self.lb_maglev.apply(desired, &held)?;
        if unwritten.is_none() && held.is_empty() {
            self.maglev_applied = Some(Arc::clone(desired));
        }
        self.lb_maglev_unwritten = unwritten;
        Ok(diff)
    }

    /// The endpoint entry the maps hold for an address.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<EndpointInfo> {
        self.endpoints
            .current()
            .get(&Ipv4Key { addr: ip.octets() })
            .copied()
    }

    /// Fill of each map: (name, entries, capacity).
    pub fn usage(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (
                self.ipcache.map().name(),
                self.ipcache.current().len(),
                self.ipcache.map().capacity(),
            ),
            (
                self.policy.map().name(),
                self.policy.current().len(),
                self.policy.map().capacity(),
            ),
            (
                self.endpoints.map().name(),
                self.endpoints.current().len(),
                self.endpoints.map().capacity(),
            ),
            (
                self.endpoints_by_if.map().name(),
                self.endpoints_by_if.current().len(),
                self.endpoints_by_if.map().capacity(),
            ),
            (
                self.masq_exclude.map().name(),
                self.masq_exclude.current().len(),
                self.masq_exclude.map().capacity(),
            ),
            (
                self.lb_services.map().name(),
                self.lb_services.current().len(),
                self.lb_services.map().capacity(),
            ),
            (
                self.lb_maglev.map().name(),
                self.lb_maglev.current().len(),
                self.lb_maglev.map().capacity(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(pairs: &[(u32, u32)]) -> BTreeMap<u32, u32> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let mut r = Reconciler::new(FakeMap::new("t", 16)).unwrap();
        let want = desired(&[(1, 10), (2, 20)]);
        assert_eq!(r.apply(&want).unwrap().inserted, 2);
        let writes = r.map().writes;
        assert!(r.apply(&want).unwrap().is_empty());
        assert_eq!(r.map().writes, writes);
    }

    #[test]
    fn writes_only_the_difference() {
        let mut r = Reconciler::new(FakeMap::new("t", 16)).unwrap();
        r.apply(&desired(&[(1, 10), (2, 20), (3, 30)])).unwrap();
        let diff = r.apply(&desired(&[(1, 10), (2, 21), (4, 40)])).unwrap();
        assert_eq!(
            diff,
            Diff {
                inserted: 1,
                updated: 1,
                removed: 1
            }
        );
        assert_eq!(r.map().entries, desired(&[(1, 10), (2, 21), (4, 40)]));
    }

    #[test]
    fn leftovers_of_an_earlier_agent_are_removed() {
        let mut map = FakeMap::new("t", 16);
        map.entries = desired(&[(7, 70), (8, 80)]);
        let mut r = Reconciler::new(map).unwrap();
        let diff = r.apply(&desired(&[(8, 80)])).unwrap();
        assert_eq!(diff.removed, 1);
        assert_eq!(
            diff.inserted, 0,
            "an entry that is already right is not rewritten"
        );
        assert_eq!(r.map().entries, desired(&[(8, 80)]));
    }

    /// Records what the hooks were asked to do.
    #[derive(Default)]
    struct Revisions(u32);

    impl ApplyHooks for Revisions {
        fn sync_counters(&mut self, _: &BTreeSet<u32>) -> Result<(), TableError> {
            Ok(())
        }

        fn policy_changed(&mut self) -> Result<(), TableError> {
            self.0 += 1;
            Ok(())
        }
    }

    #[test]
    fn masq_exclude_is_written_like_the_ipcache_and_never_re_checks_policy() {
        let mut tables = Tables::new(
            FakeMap::new("endpoints", 4),
            FakeMap::new("endpoints_by_if", 4),
            FakeMap::new("ipcache", 4),
            FakeMap::new("policy", 4),
            FakeMap::new("masq_exclude", 4),
            FakeMap::new("lb_services", 4),
            FakeMap::new("lb_maglev", 4),
        )
        .unwrap();
        let key = LpmKey {
            prefix_len: 24,
            data: Ipv4Key {
                addr: [10, 0, 1, 0],
            },
        };
        let mut desired = DesiredState {
            masq_exclude: [(key, MasqExclude { reason: 1 })].into(),
            keep_policy_state: true,
            ..DesiredState::default()
        };
        let mut hooks = Revisions::default();
        assert!(tables.apply(&desired, &mut hooks).unwrap().is_empty());
        assert!(
            tables.masq_exclude.current().is_empty(),
            "kept as it is until the cluster state is known"
        );
        desired.keep_policy_state = false;
        assert_eq!(tables.apply(&desired, &mut hooks).unwrap().inserted, 1);
        assert_eq!(tables.masq_exclude.map().entries.len(), 1);
        assert_eq!(
            hooks.0, 0,
            "no verdict depends on it: flows are not re-checked"
        );
    }

    /// Slots of frontends 10.96.0.10:`port`/TCP, each with backends 10.0.0.`n`:8080.
    fn slots(frontends: &[(u16, &[u8])]) -> BTreeMap<LbKey, LbEntry> {
        let key = |port: u16, slot: u16| LbKey {
            addr: [10, 96, 0, 10],
            port: port.to_be(),
            protocol: 6,
            _pad0: 0,
            slot,
            _pad1: 0,
        };
        let mut out = BTreeMap::new();
        for &(port, backends) in frontends {
            let service = LbEntry {
                count: backends.len() as u16,
                ..LbEntry::default()
            };
            out.insert(key(port, 0), service);
            for (i, &n) in backends.iter().enumerate() {
                let backend = LbEntry {
                    backend: [10, 0, 0, n],
                    backend_port: 8080u16.to_be(),
                    ..LbEntry::default()
                };
                out.insert(key(port, i as u16 + 1), backend);
            }
        }
        out
    }

    /// Replays `journal` over `start` and checks, after every single write, what the datapath
    /// relies on: every slot 0 counts only slots that the map holds.
    fn assert_every_counted_slot_is_there(
        start: &BTreeMap<LbKey, LbEntry>,
        journal: &[(LbKey, Option<LbEntry>)],
    ) {
        let mut map = start.clone();
        for (i, (key, value)) in journal.iter().enumerate() {
            match value {
                Some(v) => map.insert(*key, *v),
                None => map.remove(key),
            };
            for (k, service) in map.iter().filter(|(k, _)| k.slot == 0) {
                for n in 1..=service.count {
                    assert!(
                        map.contains_key(&LbKey { slot: n, ..*k }),
                        "after write {i} ({key:?} -> {value:?}) port {} counts slot {n}, which \
                         is missing",
                        u16::from_be(k.port)
                    );
                }
            }
        }
    }

    fn lb_tables(capacity: u32) -> crate::datapath::fake::FakeTables {
        Tables::new(
            FakeMap::new("endpoints", 4),
            FakeMap::new("endpoints_by_if", 4),
            FakeMap::new("ipcache", 4),
            FakeMap::new("policy", 4),
            FakeMap::new("masq_exclude", 4),
            FakeMap::new("lb_services", capacity),
            FakeMap::new("lb_maglev", capacity),
        )
        .unwrap()
    }

    #[test]
    fn service_slots_are_written_in_the_order_the_datapath_reads_them() {
        let mut tables = lb_tables(64);
        let mut hooks = Revisions::default();
        // Each step: a frontend grows, shrinks, goes while another comes, changes a backend in
        // place, and all go.
        let steps: [&[(u16, &[u8])]; 6] = [
            &[(80, &[1])],
            &[(80, &[1, 2, 3])],
            &[(80, &[2])],
            &[(443, &[4, 5])],
            &[(443, &[6, 5]), (53, &[7, 8, 9])],
            &[],
        ];
        for step in steps {
            let desired = DesiredState {
                lb_services: slots(step).into(),
                ..DesiredState::default()
            };
            let before = tables.lb_services.current().clone();
            tables.lb_services.map.journal.clear();
            let diff = tables.apply(&desired, &mut hooks).unwrap();
            assert_eq!(diff.writes(), tables.lb_services.map().journal.len());
            assert_every_counted_slot_is_there(&before, &tables.lb_services.map().journal);
            assert_eq!(tables.lb_services.map().entries, *desired.lb_services);
            assert!(
                tables.apply(&desired, &mut hooks).unwrap().is_empty(),
                "unchanged slots are not written again"
            );
        }
        assert_eq!(
            hooks.0, 0,
            "Services never re-check policy: it is checked against the backend"
        );
    }

    #[test]
    fn a_frontend_whose_new_slots_do_not_fit_keeps_its_old_count() {
        let mut tables = lb_tables(3);
        let mut hooks = Revisions::default();
        let desired = |step| DesiredState {
            lb_services: slots(step).into(),
            ..DesiredState::default()
        };
        tables.apply(&desired(&[(80, &[1])]), &mut hooks).unwrap();
        let before = tables.lb_services.current().clone();
        tables
            .apply(&desired(&[(80, &[1, 2, 3])]), &mut hooks)
            .unwrap();
        let unwritten = tables.lb_unwritten.as_ref().expect("reported");
        assert!(
            matches!(unwritten.error, TableError::Full { .. }),
            "{}",
            unwritten.error
        );
        assert_eq!(unwritten.frontends, [([10, 96, 0, 10], 80u16.to_be(), 6)]);
        assert_every_counted_slot_is_there(&before, &tables.lb_services.map().journal);
        let service = tables.lb_services.map().entries.values().next().unwrap();
        assert_eq!(service.count, 1, "the count that the map's slots back");
    }

    #[test]
    fn services_that_do_not_fit_never_hold_back_pods_or_services_that_fit() {
        let mut tables = lb_tables(4);
        let mut hooks = Revisions::default();
        let pod = EndpointInfo {
            ifindex: 7,
            id: 1,
            identity: 256,
            flags: 0,
            ip: [10, 0, 0, 5],
            mac: [2, 0, 0, 0, 0, 5],
            host_mac: [2, 0, 0, 0, 1, 5],
        };
        let desired = |frontends| DesiredState {
            lb_services: slots(frontends).into(),
            endpoints: [(Ipv4Key { addr: pod.ip }, pod)].into(),
            ..DesiredState::default()
        };
        // Port 53 (two slots), 80 (three), 443 (two): the map takes four slots, and 80 does
        // not fit once 53 is in.
        let diff = tables
            .apply(
                &desired(&[(53, &[1]), (80, &[2, 3]), (443, &[4])]),
                &mut hooks,
            )
            .expect("a full lb_services is no error for the rest");
        assert!(diff.inserted >= 1);
        assert_eq!(
            tables.endpoints.map().entries.len(),
            1,
            "the pod's endpoint is written"
        );
        let unwritten = tables.lb_unwritten.as_ref().expect("reported");
        assert_eq!(unwritten.frontends, [([10, 96, 0, 10], 80u16.to_be(), 6)]);
        let services = &tables.lb_services.map().entries;
        assert_eq!(
            services.len(),
            4,
            "nothing of port 80 is begun: {services:?}"
        );
        for port in [53u16, 443] {
            let key = LbKey {
                addr: [10, 96, 0, 10],
                port: port.to_be(),
                protocol: 6,
                _pad0: 0,
                slot: 0,
                _pad1: 0,
            };
            assert!(
                services.contains_key(&key),
                "port {port} fits and is written"
            );
        }
        // Once a Service goes, the one that did not fit is written.
        tables
            .apply(&desired(&[(80, &[2, 3])]), &mut hooks)
            .unwrap();
        assert!(tables.lb_unwritten.is_none());
        assert_eq!(tables.lb_services.map().entries, slots(&[(80, &[2, 3])]));
    }

    #[test]
    fn full_map_reports_and_keeps_what_fit() {
        let mut r = Reconciler::new(FakeMap::new("t", 2)).unwrap();
        let err = r.apply(&desired(&[(1, 1), (2, 2), (3, 3)])).unwrap_err();
        assert!(matches!(err, TableError::Full { capacity: 2, .. }), "{err}");
        assert_eq!(r.current().len(), 2);
        // Once room is made, the next pass writes just the missing entry.
        let diff = r.apply(&desired(&[(2, 2), (3, 3)])).unwrap();
        assert_eq!((diff.removed, diff.inserted), (1, 1));
    }
}
