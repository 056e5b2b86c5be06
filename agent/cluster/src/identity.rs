//! Security identities: one number per distinct (namespace, pod labels, namespace labels).
//!
//! Every agent computes the numbers from the same cluster state, with no allocator to talk to:
//! a label set's number is derived from a stable hash of its canonical form, and the rare
//! collisions are resolved by probing in the order of the canonical forms, which every agent
//! sees alike. Numbers below [`FIRST_POD_IDENTITY`] are reserved (see `myelin_common::identity`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::objects::Labels;

/// The reserved identities are defined once, with the datapath.
pub use myelin_common::identity::{ANY, FIRST_POD as FIRST_POD_IDENTITY, HOST, REMOTE_NODE, WORLD};

/// Pod identities stay in 24 bits, far from the CIDR identities (top bit set).
pub const LAST_POD_IDENTITY: u32 = (1 << 24) - 1;

/// What an identity stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdentityLabels {
    pub namespace: String,
    pub pod_labels: Labels,
    pub namespace_labels: Labels,
}

impl IdentityLabels {
    /// Stable text form: `namespace;k=v,..;k=v,..`, keys sorted.
    fn canonical(&self) -> String {
        let join = |labels: &Labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{};{};{}",
            self.namespace,
            join(&self.pod_labels),
            join(&self.namespace_labels)
        )
    }
}

/// FNV-1a, 64 bit: stable across agent versions and architectures, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The numbering of a set of label sets.
#[derive(Debug, Default, Clone)]
pub struct Identities {
    by_labels: HashMap<Arc<IdentityLabels>, u32>,
    by_id: BTreeMap<u32, Arc<IdentityLabels>>,
}

impl Identities {
    /// Numbers every label set in `sets` (duplicates allowed).
    pub fn compute(sets: impl IntoIterator<Item = Arc<IdentityLabels>>) -> Self {
        const SPAN: u64 = (LAST_POD_IDENTITY - FIRST_POD_IDENTITY + 1) as u64;
        let mut ordered: Vec<(u32, String, Arc<IdentityLabels>)> = sets
            .into_iter()
            .map(|l| {
                let canonical = l.canonical();
                let slot = FIRST_POD_IDENTITY + (fnv1a(canonical.as_bytes()) % SPAN) as u32;
                (slot, canonical, l)
            })
            .collect();
        ordered.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        ordered.dedup_by(|a, b| a.1 == b.1);

        let mut out = Identities::default();
        for (slot, _, labels) in ordered {
            let mut id = slot;
            while out.by_id.contains_key(&id) {
                id = if id == LAST_POD_IDENTITY {
                    FIRST_POD_IDENTITY
                } else {
                    id + 1
                };
            }
            out.by_labels.insert(Arc::clone(&labels), id);
            out.by_id.insert(id, labels);
        }
        out
    }

    pub fn get(&self, labels: &IdentityLabels) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    pub fn labels(&self, id: u32) -> Option<&IdentityLabels> {
        self.by_id.get(&id).map(|l| &**l)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &IdentityLabels)> {
        self.by_id.iter().map(|(id, l)| (*id, &**l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ns: &str, pod: &[(&str, &str)]) -> IdentityLabels {
        IdentityLabels {
            namespace: ns.into(),
            pod_labels: pod
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            namespace_labels: Labels::new(),
        }
    }

    #[test]
    fn same_labels_same_identity_regardless_of_order_and_duplicates() {
        let a = labels("default", &[("app", "web"), ("tier", "front")]);
        let b = labels("default", &[("app", "db")]);
        let one = Identities::compute([&a, &b, &a].map(|l| Arc::new(l.clone())));
        let two = Identities::compute([&b, &a].map(|l| Arc::new(l.clone())));
        assert_eq!(one.len(), 2);
        assert_eq!(one.get(&a), two.get(&a));
        assert_eq!(one.get(&b), two.get(&b));
        assert_ne!(one.get(&a), one.get(&b));
    }

    #[test]
    fn namespace_and_its_labels_are_part_of_the_identity() {
        let a = labels("ns1", &[("app", "web")]);
        let b = labels("ns2", &[("app", "web")]);
        let mut c = a.clone();
        c.namespace_labels.insert("team".into(), "x".into());
        let ids = Identities::compute([&a, &b, &c].map(|l| Arc::new(l.clone())));
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn identities_are_in_the_pod_range() {
        let sets: Vec<_> = (0..500)
            .map(|i| labels("ns", &[("i", &i.to_string())]))
            .collect();
        let ids = Identities::compute(sets.iter().cloned().map(Arc::new));
        assert_eq!(ids.len(), 500);
        for (id, l) in ids.iter() {
            assert!((FIRST_POD_IDENTITY..=LAST_POD_IDENTITY).contains(&id));
            assert_eq!(ids.get(l), Some(id));
        }
    }

    #[test]
    fn numbering_is_stable_for_a_given_label_set() {
        // Agents on different nodes must agree: the number depends only on the labels.
        let a = labels("default", &[("app", "web")]);
        let alone = Identities::compute([Arc::new(a.clone())]).get(&a);
        let crowd: Vec<_> = (0..100)
            .map(|i| labels("x", &[("i", &i.to_string())]))
            .collect();
        let with_others =
            Identities::compute(crowd.iter().chain([&a]).cloned().map(Arc::new)).get(&a);
        assert_eq!(alone, with_others);
    }
}
