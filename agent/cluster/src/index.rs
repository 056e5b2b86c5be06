//! Cluster state as the agent needs it: a pure in-memory index of the slim records of
//! [`crate::objects`], fed by [`Change`]s from either source.
//!
//! A NetworkPolicy that cannot be enforced never opens anything: a rejected version of a policy
//! leaves its last good version in force, and a policy with no good version isolates the pods
//! it selects, with no rules. "Last good" is what this index saw since the agent started: after
//! a restart, a policy that is still invalid is enforced as a deny.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Arc,
};

use tracing::{error, info};

use crate::{
    identity::IdentityLabels,
    objects::{
        Change, Kind, Labels, NAMESPACE_NAME_LABEL, NamespaceInfo, NodeInfo, Object, PodInfo,
    },
    policy::{PolicyInfo, PolicyRejection},
    service::{EndpointSliceInfo, ServiceInfo},
};

/// The index itself. Every mutation reports whether anything changed, so that callers only
/// recompute the desired datapath state when it can differ.
#[derive(Debug, Default, Clone)]
pub struct ClusterIndex {
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<(String, String), PodInfo>,
    policies: BTreeMap<(String, String), IndexedPolicy>,
    services: BTreeMap<(String, String), ServiceInfo>,
    endpoint_slices: EndpointSlices,
    /// See [`ClusterIndex::services_generation`].
    services_generation: u64,
    /// See [`ClusterIndex::take_changed_services`].
    changed_services: ChangedServices,
    label_sets: LabelSets,
}

/// The Services whose translation may have changed since it was last taken
/// ([`ClusterIndex::take_changed_services`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedServices {
    /// These (namespace, name): a Service, or the Service an EndpointSlice is (or was)
    /// labelled for, whether or not it exists.
    Some(BTreeSet<(String, String)>),
    /// Any of them: a Node changed (node ports, `Local` traffic policies), or a kind was
    /// listed again.
    All,
}

impl Default for ChangedServices {
    fn default() -> Self {
        Self::Some(BTreeSet::new())
    }
}

/// Every EndpointSlice, and which belong to each Service: a Service's backends are found
/// without looking at the slices of every other Service.
#[derive(Debug, Default, Clone)]
struct EndpointSlices {
    by_name: BTreeMap<(String, String), EndpointSliceInfo>,
    /// (namespace, Service name) -> the names of its slices.
    by_service: BTreeMap<(String, String), BTreeSet<String>>,
}

/// Records `slice` under its Service.
fn link(by_service: &mut BTreeMap<(String, String), BTreeSet<String>>, slice: &EndpointSliceInfo) {
    if let Some(key) = EndpointSlices::service_key(slice) {
        by_service
            .entry(key)
            .or_default()
            .insert(slice.name.clone());
    }
}

impl EndpointSlices {
    fn service_key(slice: &EndpointSliceInfo) -> Option<(String, String)> {
        Some((slice.namespace.clone(), slice.service.clone()?))
    }

    fn unlink(&mut self, slice: &EndpointSliceInfo) {
        let Some(key) = Self::service_key(slice) else {
            return;
        };
        if let Some(names) = self.by_service.get_mut(&key) {
            names.remove(&slice.name);
            if names.is_empty() {
                self.by_service.remove(&key);
            }
        }
    }

    fn link(&mut self, slice: &EndpointSliceInfo) {
        link(&mut self.by_service, slice);
    }

    fn upsert(&mut self, slice: EndpointSliceInfo) -> bool {
        let key = (slice.namespace.clone(), slice.name.clone());
        if self.by_name.get(&key) == Some(&slice) {
            return false;
        }
        if let Some(old) = self.by_name.remove(&key) {
            self.unlink(&old);
        }
        self.link(&slice);
        self.by_name.insert(key, slice);
        true
    }

    fn remove(&mut self, namespace: String, name: String) -> bool {
        match self.by_name.remove(&(namespace, name)) {
            Some(old) => {
                self.unlink(&old);
                true
            }
            None => false,
        }
    }

    fn replace_all(&mut self, slices: impl Iterator<Item = EndpointSliceInfo>) -> bool {
        let changed = replace_all(
            &mut self.by_name,
            slices.map(|s| ((s.namespace.clone(), s.name.clone()), s)),
        );
        if changed {
            self.by_service.clear();
            for slice in self.by_name.values() {
                link(&mut self.by_service, slice);
            }
        }
        changed
    }
}

/// A NetworkPolicy as the index holds it: what is enforced for it, and whether its latest
/// version was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPolicy {
    pub in_force: PolicyInfo,
    pub rejected: Option<Rejected>,
}

/// Why the latest version of a policy was rejected, and what is in force instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The offending field and what is wrong with it.
    pub reason: String,
    pub fallback: Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The last good version stays in force.
    LastGood,
    /// No good version is known: the pods the policy selects are isolated, in the directions
    /// it declares, with no rules.
    Deny,
    /// As `Deny`, but its podSelector is unusable: every pod of its namespace is isolated.
    DenyNamespace,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::LastGood => "last good version in force",
            Fallback::Deny => "selected pods isolated (deny)",
            Fallback::DenyNamespace => "every pod of the namespace isolated (deny)",
        })
    }
}

impl IndexedPolicy {
    /// The entry once `version` (a valid policy or a rejection) follows `previous`.
    fn after(previous: Option<&IndexedPolicy>, version: PolicyVersion) -> Self {
        let rejection = match version {
            Ok(policy) => {
                return Self {
                    in_force: policy,
                    rejected: None,
                };
            }
            Err(rejection) => rejection,
        };
        // A deny in force is no good version: it follows the latest rejection instead.
        let last_good = previous.filter(|p| {
            p.rejected
                .as_ref()
                .is_none_or(|r| r.fallback == Fallback::LastGood)
        });
        let (in_force, fallback) = match last_good {
            Some(p) => (p.in_force.clone(), Fallback::LastGood),
            None if rejection.whole_namespace => (*rejection.deny, Fallback::DenyNamespace),
            None => (*rejection.deny, Fallback::Deny),
        };
        Self {
            in_force,
            rejected: Some(Rejected {
                reason: rejection.reason,
                fallback,
            }),
        }
    }

    /// Logs what changed about the policy's rejection: once per rejection, however often a
    /// source hands the same version again (relists, directory rescans).
    fn report(previous: Option<&IndexedPolicy>, next: &IndexedPolicy) {
        let (namespace, name) = (&next.in_force.namespace, &next.in_force.name);
        let before = previous.and_then(|p| p.rejected.as_ref());
        match &next.rejected {
            Some(r) if before != Some(r) => error!(
                %namespace,
                %name,
                "NetworkPolicy {namespace}/{name} rejected: {}; {}",
                r.reason,
                r.fallback
            ),
            None if before.is_some() => info!(
                %namespace,
                %name,
                "NetworkPolicy {namespace}/{name} is valid again and enforced as written"
            ),
            _ => {}
        }
    }
}

/// A version of a NetworkPolicy object as a source hands it: valid, or rejected.
type PolicyVersion = Result<PolicyInfo, PolicyRejection>;

fn policy_key(version: &PolicyVersion) -> (String, String) {
    let p = version.as_ref().unwrap_or_else(|r| &r.deny);
    (p.namespace.clone(), p.name.clone())
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
        let kind = match &change {
            Change::Apply(object) => object.kind(),
            Change::Delete { kind, .. } | Change::Replace { kind, .. } => *kind,
        };
        let services = self.services_of(&change);
        let changed = self.apply_objects(change);
        if changed {
            self.refresh_label_sets(touched);
            if matches!(kind, Kind::Service | Kind::EndpointSlice | Kind::Node) {
                self.services_generation += 1;
                match (&mut self.changed_services, services) {
                    (ChangedServices::Some(keys), Some(more)) => keys.extend(more),
                    (changed, None) => *changed = ChangedServices::All,
                    (ChangedServices::All, Some(_)) => {}
                }
            }
        }
        changed
    }

    /// The Services whose translation `change` may change, before it is applied (a slice's
    /// old Service too); `None`: any.
    fn services_of(&self, change: &Change) -> Option<Vec<(String, String)>> {
        let slice_service = |namespace: &str, name: &str| {
            self.endpoint_slices
                .by_name
                .get(&(namespace.to_string(), name.to_string()))
                .and_then(EndpointSlices::service_key)
        };
        match change {
            Change::Apply(Object::Service(s)) => Some(vec![(s.namespace.clone(), s.name.clone())]),
            Change::Delete {
                kind: Kind::Service,
                namespace,
                name,
            } => Some(vec![(namespace.clone(), name.clone())]),
            Change::Apply(Object::EndpointSlice(s)) => Some(
                EndpointSlices::service_key(s)
                    .into_iter()
                    .chain(slice_service(&s.namespace, &s.name))
                    .collect(),
            ),
            Change::Delete {
                kind: Kind::EndpointSlice,
                namespace,
                name,
            } => Some(slice_service(namespace, name).into_iter().collect()),
            _ => None,
        }
    }

    /// The Services changed since the last call ([`ChangedServices`]), and starts over: what
    /// translating Services incrementally needs. Without a caller, the set only grows up to
    /// every Service.
    pub fn take_changed_services(&mut self) -> ChangedServices {
        std::mem::take(&mut self.changed_services)
    }

    /// Changes whenever a Service, an EndpointSlice or a Node changes: what translating
    /// Services depends on (a node's address is its node ports' frontend). Pods coming and
    /// going do not change it.
    pub fn services_generation(&self) -> u64 {
        self.services_generation
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

    /// Whether some pod of the index has exactly these identity labels.
    pub fn has_label_set(&self, labels: &IdentityLabels) -> bool {
        self.label_sets.counts.contains_key(labels)
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
                Kind::Service => self.services.remove(&(namespace, name)).is_some(),
                Kind::EndpointSlice => self.endpoint_slices.remove(namespace, name),
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
                    Kind::NetworkPolicy => {
                        // A list is no reason to forget a last good version.
                        let mut listed = BTreeMap::new();
                        for version in of_kind.filter_map(|o| match o {
                            Object::NetworkPolicy(p) => Some(Ok(p)),
                            Object::RejectedNetworkPolicy(r) => Some(Err(r)),
                            _ => None,
                        }) {
                            let key = policy_key(&version);
                            let previous = listed.get(&key).or_else(|| self.policies.get(&key));
                            let next = IndexedPolicy::after(previous, version);
                            listed.insert(key, next);
                        }
                        for (key, next) in &listed {
                            IndexedPolicy::report(self.policies.get(key), next);
                        }
                        replace_all(&mut self.policies, listed.into_iter())
                    }
                    Kind::Service => replace_all(
                        &mut self.services,
                        of_kind.filter_map(|o| match o {
                            Object::Service(s) => Some(((s.namespace.clone(), s.name.clone()), s)),
                            _ => None,
                        }),
                    ),
                    Kind::EndpointSlice => {
                        self.endpoint_slices
                            .replace_all(of_kind.filter_map(|o| match o {
                                Object::EndpointSlice(s) => Some(s),
                                _ => None,
                            }))
                    }
                }
            }
        }
    }

    fn upsert(&mut self, object: Object) -> bool {
        match object {
            Object::Node(n) => replace(&mut self.nodes, n.name.clone(), n),
            Object::Namespace(n) => replace(&mut self.namespaces, n.name.clone(), n),
            Object::Pod(p) => replace(&mut self.pods, (p.namespace.clone(), p.name.clone()), p),
            Object::NetworkPolicy(p) => self.upsert_policy(Ok(p)),
            Object::RejectedNetworkPolicy(r) => self.upsert_policy(Err(r)),
            Object::Service(s) => {
                replace(&mut self.services, (s.namespace.clone(), s.name.clone()), s)
            }
            Object::EndpointSlice(s) => self.endpoint_slices.upsert(s),
        }
    }

    fn upsert_policy(&mut self, version: PolicyVersion) -> bool {
        let key = policy_key(&version);
        let previous = self.policies.get(&key);
        let next = IndexedPolicy::after(previous, version);
        IndexedPolicy::report(previous, &next);
        replace(&mut self.policies, key, next)
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

    /// The policies in force: valid ones as written, rejected ones as their fallback.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyInfo> {
        self.policies.values().map(|p| &p.in_force)
    }

    /// Every policy with its rejection, if its latest version was rejected.
    pub fn indexed_policies(&self) -> impl Iterator<Item = &IndexedPolicy> {
        self.policies.values()
    }

    pub fn rejected_policy_count(&self) -> usize {
        self.policies
            .values()
            .filter(|p| p.rejected.is_some())
            .count()
    }

    /// Every Service, in namespace and name order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// Every EndpointSlice labelled for a Service: (namespace, Service, slice name).
    pub fn endpoint_slices_with_service(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.endpoint_slices
            .by_service
            .iter()
            .flat_map(|((namespace, service), names)| {
                names
                    .iter()
                    .map(move |name| (namespace.as_str(), service.as_str(), name.as_str()))
            })
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The EndpointSlices labelled as `namespace/service`'s, whether or not that Service exists.
    pub fn endpoint_slices_of<'a>(
        &'a self,
        namespace: &str,
        service: &str,
    ) -> impl Iterator<Item = &'a EndpointSliceInfo> + 'a {
        let names = self
            .endpoint_slices
            .by_service
            .get(&(namespace.to_string(), service.to_string()));
        let namespace = namespace.to_string();
        names.into_iter().flatten().filter_map(move |name| {
            self.endpoint_slices
                .by_name
                .get(&(namespace.clone(), name.clone()))
        })
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
    use crate::{
        builders::*,
        objects::NamespaceInfo,
        policy::{PortMatch, Selector},
    };

    fn apply_pod(index: &mut ClusterIndex, pod: &Pod) -> bool {
        let (info, _) = PodInfo::from_k8s(pod).unwrap();
        index.apply(Change::Apply(Object::Pod(info)))
    }

    /// The policy `ns/p` with `spec`, as a source hands it to the index.
    fn policy_object(spec: &str) -> Object {
        let yaml =
            format!("kind: NetworkPolicy\nmetadata: {{name: p, namespace: ns}}\nspec: {spec}");
        Object::from_network_policy(&policy(&yaml)).unwrap()
    }

    /// `ns/p`: app=db pods take TCP 80 from app=api pods.
    const GOOD: &str = "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}]}]}";
    /// The same policy edited to a port that does not exist.
    const BAD_PORT: &str = "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 70000}]}]}";
    const BAD_PORT_REASON: &str = "spec.ingress[0].ports[0].port: 70000 is outside 1-65535";

    fn replace_policies(index: &mut ClusterIndex, objects: Vec<Object>) -> bool {
        index.apply(Change::Replace {
            kind: Kind::NetworkPolicy,
            objects,
        })
    }

    fn the_policy(index: &ClusterIndex) -> &IndexedPolicy {
        let all: Vec<&IndexedPolicy> = index.indexed_policies().collect();
        match all[..] {
            [p] => p,
            _ => panic!("expected one policy, the index has {all:?}"),
        }
    }

    fn allowed_ports(policy: &PolicyInfo) -> Vec<PortMatch> {
        policy
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.ports.iter().flatten())
            .map(|p| p.port.clone())
            .collect()
    }

    fn rejected(reason: &str, fallback: Fallback) -> Option<Rejected> {
        Some(Rejected {
            reason: reason.into(),
            fallback,
        })
    }

    #[test]
    fn a_rejected_edit_keeps_the_last_good_version_in_force() {
        let mut index = ClusterIndex::default();
        assert!(index.apply(Change::Apply(policy_object(GOOD))));
        assert!(index.apply(Change::Apply(policy_object(BAD_PORT))));
        let p = the_policy(&index);
        assert_eq!(
            allowed_ports(&p.in_force),
            [PortMatch::Range { from: 80, to: 80 }]
        );
        assert_eq!(p.rejected, rejected(BAD_PORT_REASON, Fallback::LastGood));
        assert_eq!(index.policies().count(), 1);
        assert_eq!(index.rejected_policy_count(), 1);
        assert!(
            !index.apply(Change::Apply(policy_object(BAD_PORT))),
            "the same rejection again changes nothing"
        );
        // Another invalid edit still leaves the last good version in force.
        index.apply(Change::Apply(policy_object(
            "{podSelector: {}, policyTypes: [Sideways]}",
        )));
        let p = the_policy(&index);
        assert_eq!(
            allowed_ports(&p.in_force),
            [PortMatch::Range { from: 80, to: 80 }]
        );
        assert_eq!(
            p.rejected.as_ref().map(|r| r.fallback),
            Some(Fallback::LastGood)
        );
    }

    #[test]
    fn relists_and_rescans_keep_the_last_good_version_in_force() {
        let mut index = ClusterIndex::default();
        replace_policies(&mut index, vec![policy_object(GOOD)]);
        assert!(replace_policies(&mut index, vec![policy_object(BAD_PORT)]));
        let p = the_policy(&index);
        assert_eq!(
            allowed_ports(&p.in_force),
            [PortMatch::Range { from: 80, to: 80 }]
        );
        assert_eq!(p.rejected, rejected(BAD_PORT_REASON, Fallback::LastGood));
        assert!(!replace_policies(&mut index, vec![policy_object(BAD_PORT)]));
        assert_eq!(
            the_policy(&index).rejected,
            rejected(BAD_PORT_REASON, Fallback::LastGood)
        );
        // A rejection applied between lists, then listed again: still the last good version.
        index.apply(Change::Apply(policy_object(GOOD)));
        index.apply(Change::Apply(policy_object(BAD_PORT)));
        replace_policies(&mut index, vec![policy_object(BAD_PORT)]);
        assert_eq!(
            allowed_ports(&the_policy(&index).in_force),
            [PortMatch::Range { from: 80, to: 80 }]
        );
    }

    #[test]
    fn a_new_invalid_policy_isolates_the_pods_it_selects_in_its_declared_directions() {
        let db = Selector {
            match_labels: labels(&[("app", "db")]),
            requirements: vec![],
        };
        for via_replace in [false, true] {
            let mut index = ClusterIndex::default();
            let object = policy_object(BAD_PORT);
            if via_replace {
                replace_policies(&mut index, vec![object]);
            } else {
                index.apply(Change::Apply(object));
            }
            let p = the_policy(&index);
            assert_eq!(p.rejected, rejected(BAD_PORT_REASON, Fallback::Deny));
            assert_eq!(p.in_force.pod_selector, db);
            assert_eq!(
                p.in_force.ingress,
                Some(vec![]),
                "isolated, nothing allowed"
            );
            assert_eq!(p.in_force.egress, None, "egress is not declared");
        }
        // A deny follows the latest rejected version: it is no good version to keep.
        let mut index = ClusterIndex::default();
        index.apply(Change::Apply(policy_object(BAD_PORT)));
        index.apply(Change::Apply(policy_object(
            "{podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{ports: [{port: 0}]}]}",
        )));
        let p = the_policy(&index);
        assert_eq!(
            p.in_force.pod_selector.match_labels,
            labels(&[("app", "web")])
        );
        assert_eq!(
            (p.in_force.ingress.clone(), p.in_force.egress.clone()),
            (None, Some(vec![]))
        );
        assert_eq!(
            p.rejected.as_ref().map(|r| r.fallback),
            Some(Fallback::Deny)
        );
    }

    #[test]
    fn a_new_policy_with_an_invalid_pod_selector_isolates_its_whole_namespace() {
        let mut index = ClusterIndex::default();
        index.apply(Change::Apply(policy_object(
            "{podSelector: {matchExpressions: [{key: app, operator: Equals, values: [db]}]}}",
        )));
        let p = the_policy(&index);
        assert_eq!(p.in_force.pod_selector, Selector::default());
        assert_eq!(p.in_force.ingress, Some(vec![]));
        assert_eq!(
            p.rejected.as_ref().map(|r| r.fallback),
            Some(Fallback::DenyNamespace)
        );
        assert!(
            p.rejected.as_ref().is_some_and(|r| r
                .reason
                .starts_with("spec.podSelector.matchExpressions[0].operator")),
            "{p:?}"
        );
    }

    #[test]
    fn a_valid_version_replaces_a_rejection_and_a_delete_removes_it() {
        let mut index = ClusterIndex::default();
        index.apply(Change::Apply(policy_object(BAD_PORT)));
        assert!(index.apply(Change::Apply(policy_object(GOOD))));
        let p = the_policy(&index);
        assert_eq!(p.rejected, None);
        assert_eq!(
            allowed_ports(&p.in_force),
            [PortMatch::Range { from: 80, to: 80 }]
        );
        assert_eq!(index.rejected_policy_count(), 0);

        index.apply(Change::Apply(policy_object(BAD_PORT)));
        assert!(index.apply(Change::Delete {
            kind: Kind::NetworkPolicy,
            namespace: "ns".into(),
            name: "p".into(),
        }));
        assert_eq!(index.policies().count(), 0);
        // Gone means gone: a new invalid version is a deny, not the old good one.
        index.apply(Change::Apply(policy_object(BAD_PORT)));
        assert_eq!(
            the_policy(&index).rejected.as_ref().map(|r| r.fallback),
            Some(Fallback::Deny)
        );
        // A list without it removes it too.
        assert!(replace_policies(&mut index, vec![]));
        assert_eq!(index.rejected_policy_count(), 0);
        assert_eq!(index.policies().count(), 0);
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

    fn apply_slice(index: &mut ClusterIndex, name: &str, service: Option<&str>) -> bool {
        let slice = crate::service::EndpointSliceInfo::from_k8s(&endpoint_slice(
            "default",
            name,
            service,
            "addressType: IPv4\nendpoints: [{addresses: [10.0.0.5]}]",
        ))
        .unwrap();
        index.apply(Change::Apply(Object::EndpointSlice(slice)))
    }

    fn slices_of(index: &ClusterIndex, service: &str) -> Vec<String> {
        index
            .endpoint_slices_of("default", service)
            .map(|s| s.name.clone())
            .collect()
    }

    #[test]
    fn endpoint_slices_are_found_by_their_service_label() {
        let mut index = ClusterIndex::default();
        assert!(apply_slice(&mut index, "web-1", Some("web")));
        assert!(apply_slice(&mut index, "web-2", Some("web")));
        assert!(apply_slice(&mut index, "orphan", None));
        assert!(!apply_slice(&mut index, "web-1", Some("web")), "unchanged");
        assert_eq!(slices_of(&index, "web"), ["web-1", "web-2"]);
        assert!(
            index.endpoint_slices_of("other", "web").next().is_none(),
            "a Service's slices are in its namespace"
        );
        // Relabelled to another Service: it moves.
        apply_slice(&mut index, "web-2", Some("api"));
        assert_eq!(slices_of(&index, "web"), ["web-1"]);
        assert_eq!(slices_of(&index, "api"), ["web-2"]);
        assert!(index.apply(Change::Delete {
            kind: Kind::EndpointSlice,
            namespace: "default".into(),
            name: "web-1".into(),
        }));
        assert!(slices_of(&index, "web").is_empty());
        // A list replaces them all, and the lookup follows.
        let listed = crate::service::EndpointSliceInfo::from_k8s(&endpoint_slice(
            "default",
            "web-3",
            Some("web"),
            "addressType: IPv4\nendpoints: []",
        ))
        .unwrap();
        assert!(index.apply(Change::Replace {
            kind: Kind::EndpointSlice,
            objects: vec![Object::EndpointSlice(listed)],
        }));
        assert_eq!(slices_of(&index, "web"), ["web-3"]);
        assert!(slices_of(&index, "api").is_empty());
    }

    #[test]
    fn the_services_generation_follows_services_slices_and_nodes_only() {
        let mut index = ClusterIndex::default();
        let start = index.services_generation();
        apply_pod(&mut index, &pod("default", "web", &[], Some("10.0.0.5")));
        assert_eq!(
            index.services_generation(),
            start,
            "a pod changes no Service"
        );
        apply_slice(&mut index, "web-1", Some("web"));
        let after_slice = index.services_generation();
        assert_ne!(after_slice, start);
        apply_slice(&mut index, "web-1", Some("web"));
        assert_eq!(index.services_generation(), after_slice, "unchanged");
        let (node, _) = NodeInfo::from_k8s(&node("n1", None, "192.168.0.1")).unwrap();
        index.apply(Change::Apply(Object::Node(node)));
        assert_ne!(index.services_generation(), after_slice);
    }

    #[test]
    fn services_are_applied_replaced_and_deleted() {
        let mut index = ClusterIndex::default();
        let web = |ip: &str| {
            Object::Service(
                crate::service::ServiceInfo::from_k8s(&service(
                    "default",
                    "web",
                    &format!("spec: {{clusterIP: {ip}}}"),
                ))
                .unwrap(),
            )
        };
        assert!(index.apply(Change::Apply(web("10.96.0.1"))));
        assert!(!index.apply(Change::Apply(web("10.96.0.1"))));
        assert!(index.apply(Change::Replace {
            kind: Kind::Service,
            objects: vec![web("10.96.0.2")],
        }));
        assert_eq!(index.service_count(), 1);
        assert!(index.apply(Change::Delete {
            kind: Kind::Service,
            namespace: "default".into(),
            name: "web".into(),
        }));
        assert_eq!(index.services().count(), 0);
    }
}
