//! Cluster state as the agent needs it: a pure in-memory index of the slim records of
//! [`crate::objects`], fed by [`Change`]s from either source.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use crate::{
    identity::IdentityLabels,
    objects::{
        Change, Kind, Labels, NAMESPACE_NAME_LABEL, NamespaceInfo, NodeInfo, Object, PodInfo,
    },
    policy::PolicyInfo,
};

/// The index itself. Every mutation reports whether anything changed, so that callers only
/// recompute the desired datapath state when it can differ.
#[derive(Debug, Default, Clone)]
pub struct ClusterIndex {
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<(String, String), PodInfo>,
    policies: BTreeMap<(String, String), PolicyInfo>,
    label_sets: LabelSets,
}

/// The identity labels of every (non host-network) pod, kept up to date as pods and namespaces
/// change, and interned: pods with the same labels share one allocation. This is what makes a
/// change cost proportional to what it touches rather than to the cluster's size.
#[derive(Debug, Default, Clone)]
struct LabelSets {
    by_pod: HashMap<(String, String), Arc<IdentityLabels>>,
    /// Each distinct set with the number of pods that have it.
    counts: HashMap<Arc<IdentityLabels>, usize>,
    /// Bumped whenever a set appears or disappears (identities must then be renumbered).
    generation: u64,
}

impl LabelSets {
    fn set(&mut self, pod: (String, String), labels: Option<IdentityLabels>) {
        if let Some(old) = self.by_pod.remove(&pod) {
            self.release(&old);
        }
        let Some(labels) = labels else { return };
        let shared = match self.counts.get_key_value(&labels) {
            Some((existing, _)) => Arc::clone(existing),
            None => {
                self.generation += 1;
                Arc::new(labels)
            }
        };
        *self.counts.entry(Arc::clone(&shared)).or_default() += 1;
        self.by_pod.insert(pod, shared);
    }

    fn release(&mut self, labels: &Arc<IdentityLabels>) {
        if let Some(n) = self.counts.get_mut(labels) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(labels);
                self.generation += 1;
            }
        }
    }
}

impl ClusterIndex {
    pub fn apply(&mut self, change: Change) -> bool {
        let touched = match &change {
            Change::Apply(Object::Pod(p)) => Touched::Pod(p.namespace.clone(), p.name.clone()),
            Change::Delete {
                kind: Kind::Pod,
                namespace,
                name,
            } => Touched::Pod(namespace.clone(), name.clone()),
            Change::Apply(Object::Namespace(n)) => Touched::Namespace(n.name.clone()),
            Change::Delete {
                kind: Kind::Namespace,
                name,
                ..
            } => Touched::Namespace(name.clone()),
            Change::Replace {
                kind: Kind::Pod | Kind::Namespace,
                ..
            } => Touched::All,
            _ => Touched::Nothing,
        };
        let changed = self.apply_objects(change);
        if changed {
            self.refresh_label_sets(touched);
        }
        changed
    }

    fn refresh_label_sets(&mut self, touched: Touched) {
        let pods: Vec<(String, String)> = match touched {
            Touched::Nothing => return,
            Touched::Pod(ns, name) => vec![(ns, name)],
            Touched::Namespace(ns) => self
                .pods
                .range((ns.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == ns)
                .map(|(k, _)| k.clone())
                .collect(),
            Touched::All => {
                self.label_sets = LabelSets {
                    generation: self.label_sets.generation + 1,
                    ..LabelSets::default()
                };
                self.pods.keys().cloned().collect()
            }
        };
        for key in pods {
            let labels = self
                .pods
                .get(&key)
                .filter(|p| !p.host_network)
                .map(|p| self.identity_labels(&p.namespace, &p.labels));
            self.label_sets.set(key, labels);
        }
    }

    /// The interned identity labels of a pod in the index (`None` for host-network pods).
    pub fn pod_identity_labels(&self, namespace: &str, name: &str) -> Option<&Arc<IdentityLabels>> {
        self.label_sets
            .by_pod
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// Every distinct label set of the index's pods.
    pub fn label_sets(&self) -> impl Iterator<Item = &Arc<IdentityLabels>> {
        self.label_sets.counts.keys()
    }

    /// Changes whenever a label set appears or disappears.
    pub fn label_sets_generation(&self) -> u64 {
        self.label_sets.generation
    }

    fn apply_objects(&mut self, change: Change) -> bool {
        match change {
            Change::Apply(object) => self.upsert(object),
            Change::Delete {
                kind,
                namespace,
                name,
            } => match kind {
                Kind::Node => self.nodes.remove(&name).is_some(),
                Kind::Namespace => self.namespaces.remove(&name).is_some(),
                Kind::Pod => self.pods.remove(&(namespace, name)).is_some(),
                Kind::NetworkPolicy => self.policies.remove(&(namespace, name)).is_some(),
            },
            Change::Replace { kind, objects } => {
                let of_kind = objects.into_iter().filter(|o| o.kind() == kind);
                match kind {
                    Kind::Node => replace_all(
                        &mut self.nodes,
                        of_kind.filter_map(|o| match o {
                            Object::Node(n) => Some((n.name.clone(), n)),
                            _ => None,
                        }),
                    ),
                    Kind::Namespace => replace_all(
                        &mut self.namespaces,
                        of_kind.filter_map(|o| match o {
                            Object::Namespace(n) => Some((n.name.clone(), n)),
                            _ => None,
                        }),
                    ),
                    Kind::Pod => replace_all(
                        &mut self.pods,
                        of_kind.filter_map(|o| match o {
                            Object::Pod(p) => Some(((p.namespace.clone(), p.name.clone()), p)),
                            _ => None,
                        }),
                    ),
                    Kind::NetworkPolicy => replace_all(
                        &mut self.policies,
                        of_kind.filter_map(|o| match o {
                            Object::NetworkPolicy(p) => {
                                Some(((p.namespace.clone(), p.name.clone()), p))
                            }
                            _ => None,
                        }),
                    ),
                }
            }
        }
    }

    fn upsert(&mut self, object: Object) -> bool {
        match object {
            Object::Node(n) => replace(&mut self.nodes, n.name.clone(), n),
            Object::Namespace(n) => replace(&mut self.namespaces, n.name.clone(), n),
            Object::Pod(p) => replace(&mut self.pods, (p.namespace.clone(), p.name.clone()), p),
            Object::NetworkPolicy(p) => {
                replace(&mut self.policies, (p.namespace.clone(), p.name.clone()), p)
            }
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyInfo> {
        self.policies.values()
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &NamespaceInfo> {
        self.namespaces.values()
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    /// A namespace's labels; a namespace the index has not seen still has its name label.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        match self.namespaces.get(namespace) {
            Some(ns) => ns.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())]),
        }
    }

    /// What a pod's identity is made of.
    pub fn identity_labels(&self, namespace: &str, pod_labels: &Labels) -> IdentityLabels {
        IdentityLabels {
            namespace: namespace.to_string(),
            pod_labels: pod_labels.clone(),
            namespace_labels: self.namespace_labels(namespace),
        }
    }

    /// The identity labels of a pod by name: from its object when the index has it, else (the
    /// CNI ADD came before the watch event) its namespace with no pod labels yet.
    pub fn identity_labels_of_pod(&self, namespace: &str, name: &str) -> Arc<IdentityLabels> {
        match self.pod_identity_labels(namespace, name) {
            Some(l) => Arc::clone(l),
            None => Arc::new(self.identity_labels(namespace, &Labels::new())),
        }
    }
}

/// Which pods' identity labels a change can affect.
enum Touched {
    Nothing,
    Pod(String, String),
    Namespace(String),
    All,
}

fn replace_all<K: Ord, V: PartialEq>(
    map: &mut BTreeMap<K, V>,
    entries: impl Iterator<Item = (K, V)>,
) -> bool {
    let new: BTreeMap<K, V> = entries.collect();
    let changed = *map != new;
    *map = new;
    changed
}

fn replace<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    match map.get(&key) {
        Some(existing) if *existing == value => false,
        _ => {
            map.insert(key, value);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;
    use crate::{builders::*, objects::NamespaceInfo};

    fn apply_pod(index: &mut ClusterIndex, pod: &Pod) -> bool {
        let (info, _) = PodInfo::from_k8s(pod).unwrap();
        index.apply(Change::Apply(Object::Pod(info)))
    }

    #[test]
    fn reapplying_an_unchanged_object_is_not_a_change() {
        let mut index = ClusterIndex::default();
        let p = pod("default", "web", &[("app", "web")], Some("10.0.0.5"));
        assert!(apply_pod(&mut index, &p));
        assert!(!apply_pod(&mut index, &p));
        let relabelled = pod("default", "web", &[("app", "api")], Some("10.0.0.5"));
        assert!(apply_pod(&mut index, &relabelled));
    }

    #[test]
    fn replace_drops_objects_missing_from_the_list() {
        let mut index = ClusterIndex::default();
        apply_pod(&mut index, &pod("default", "a", &[], None));
        apply_pod(&mut index, &pod("default", "b", &[], None));
        let (b, _) = PodInfo::from_k8s(&pod("default", "b", &[], None)).unwrap();
        assert!(index.apply(Change::Replace {
            kind: Kind::Pod,
            objects: vec![Object::Pod(b.clone())],
        }));
        assert!(index.pod("default", "a").is_none());
        assert!(index.pod("default", "b").is_some());
        assert!(!index.apply(Change::Replace {
            kind: Kind::Pod,
            objects: vec![Object::Pod(b)],
        }));
    }

    #[test]
    fn pod_seen_before_its_object_gets_labels_once_the_object_arrives() {
        let mut index = ClusterIndex::default();
        let early = index.identity_labels_of_pod("default", "web");
        assert!(early.pod_labels.is_empty());
        apply_pod(&mut index, &pod("default", "web", &[("app", "web")], None));
        let late = index.identity_labels_of_pod("default", "web");
        assert_eq!(late.pod_labels, labels(&[("app", "web")]));
        assert_ne!(early, late);
    }

    #[test]
    fn label_sets_are_shared_counted_and_follow_namespace_changes() {
        let mut index = ClusterIndex::default();
        apply_pod(&mut index, &pod("team", "a", &[("app", "web")], None));
        apply_pod(&mut index, &pod("team", "b", &[("app", "web")], None));
        apply_pod(&mut index, &pod("other", "c", &[("app", "web")], None));
        assert_eq!(index.label_sets().count(), 2);
        let a = index.pod_identity_labels("team", "a").unwrap();
        let b = index.pod_identity_labels("team", "b").unwrap();
        assert!(Arc::ptr_eq(a, b), "equal label sets share one allocation");

        let generation = index.label_sets_generation();
        apply_pod(
            &mut index,
            &pod("team", "b", &[("app", "web")], Some("10.0.0.9")),
        );
        assert_eq!(
            index.label_sets_generation(),
            generation,
            "no new set: same numbering"
        );

        let ns = NamespaceInfo::from_k8s(&namespace("team", &[("env", "prod")])).unwrap();
        index.apply(Change::Apply(Object::Namespace(ns)));
        assert_eq!(
            index.label_sets().count(),
            2,
            "team's set moved, other's stayed"
        );
        let moved = index.pod_identity_labels("team", "a").unwrap();
        assert_eq!(moved.namespace_labels["env"], "prod");
        assert_ne!(index.label_sets_generation(), generation);

        index.apply(Change::Delete {
            kind: Kind::Pod,
            namespace: "other".into(),
            name: "c".into(),
        });
        assert_eq!(index.label_sets().count(), 1);
    }

    #[test]
    fn namespace_label_change_changes_pod_identity_labels() {
        let mut index = ClusterIndex::default();
        apply_pod(&mut index, &pod("team", "web", &[("app", "web")], None));
        let before = index.identity_labels_of_pod("team", "web");
        let ns = NamespaceInfo::from_k8s(&namespace("team", &[("env", "prod")])).unwrap();
        assert!(index.apply(Change::Apply(Object::Namespace(ns))));
        let after = index.identity_labels_of_pod("team", "web");
        assert_eq!(after.namespace_labels["env"], "prod");
        assert_ne!(before, after);
    }
}
