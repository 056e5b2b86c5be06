//! The Kubernetes source: one `kube` watcher per kind, cluster-wide (remote pods' addresses and
//! labels make up identities), each with the default backoff.
//!
//! Objects are converted into the index's slim records the moment they arrive and the
//! Kubernetes object is dropped, so no full object (managed fields, status conditions, ...) is
//! ever kept; a malformed object is logged and skipped. A NetworkPolicy the API server accepted
//! but Myelin cannot enforce is not malformed: it goes to the index as a rejection, which keeps
//! the policy's last good version in force (or denies). A kind's list (first start, and every
//! relist after `410 Gone`) becomes one [`Change::Replace`], so the index converges on what the
//! API server holds, including objects deleted while the watch was away.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    future,
    path::{Path, PathBuf},
};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::SourceEvent;
use myelin_cluster::{
    Change, EndpointSliceInfo, Kind, NamespaceInfo, NodeInfo, Object, ObjectError, PodInfo,
    ServiceInfo, Warnings,
};

/// Objects per list page. A page is parsed into full Kubernetes objects before they are
/// slimmed; with kube's default (500 pods, about 5 MB parsed) the allocator kept some 30 MB
/// more resident after a 5,000-pod list than with 100 (measured), at the cost of more, smaller
/// requests on a relist, which is rare.
const LIST_PAGE_SIZE: u32 = 100;

/// Most watch events handed to the agent in one [`SourceEvent::Changes`]: whatever is ready at
/// once goes together (a burst after a relist), without ever waiting to fill a batch.
const MAX_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("reading the kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("using the kubeconfig {path}: {source}")]
    UseKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes client configuration (neither in-cluster nor $KUBECONFIG/~/.kube/config; pass --kubeconfig): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, else from the environment (`kube::Config::infer`: $KUBECONFIG
/// or ~/.kube/config, else the in-cluster service account). Nothing is contacted yet: an
/// unreachable API server shows up later as watch errors, which are retried.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                Kubeconfig::read_from(path).map_err(|source| KubernetesError::ReadKubeconfig {
                    path: path.to_owned(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubernetesError::UseKubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(KubernetesError::Infer)?,
    };
    info!(server = %config.cluster_url, "Kubernetes API server");
    Client::try_from(config).map_err(KubernetesError::Client)
}

pub struct KubernetesSource {
    client: Client,
    /// The kinds watched ([`Kind::used`]); the agent is synced once each has been listed.
    kinds: &'static [Kind],
}

impl KubernetesSource {
    pub fn new(client: Client, kinds: &'static [Kind]) -> Self {
        Self { client, kinds }
    }

    /// Watches every kind until the receiver is dropped. Never fails: watch errors are logged
    /// and retried with backoff, and the agent keeps its last state meanwhile.
    pub async fn run(self, tx: mpsc::Sender<SourceEvent>) {
        let watches: Vec<KindWatch> = watches(&self.client)
            .into_iter()
            .filter(|(kind, _)| self.kinds.contains(kind))
            .collect();
        let mut mapper = EventMapper::new(watches.iter().map(|(kind, _)| *kind));
        let mut batches = futures::stream::select_all(watches.into_iter().map(|(_, s)| s))
            .ready_chunks(MAX_BATCH);
        while let Some(batch) = batches.next().await {
            for event in mapper.map_batch(batch) {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One kind's watch, its events already converted.
type KindWatch = (Kind, BoxStream<'static, (Kind, KindEvent)>);

/// Every kind the agent can watch, and how each is converted. One more kind is one more line.
/// Nothing is requested before the stream is polled: kinds left out cost nothing.
fn watches(client: &Client) -> Vec<KindWatch> {
    vec![
        watch(Kind::Node, Api::<Node>::all(client.clone()), |node| {
            NodeInfo::from_k8s(node).map(|(n, w)| (Object::Node(n), w))
        }),
        watch(
            Kind::Namespace,
            Api::<Namespace>::all(client.clone()),
            |ns| NamespaceInfo::from_k8s(ns).map(|n| (Object::Namespace(n), Warnings::new())),
        ),
        watch(Kind::Pod, Api::<Pod>::all(client.clone()), |pod| {
            PodInfo::from_k8s(pod).map(|(p, w)| (Object::Pod(p), w))
        }),
        watch(
            Kind::NetworkPolicy,
            Api::<NetworkPolicy>::all(client.clone()),
            |np| Object::from_network_policy(np).map(|p| (p, Warnings::new())),
        ),
        watch(Kind::Service, Api::<Service>::all(client.clone()), |s| {
            ServiceInfo::from_k8s(s).map(|s| (Object::Service(s), Warnings::new()))
        }),
        watch(
            Kind::EndpointSlice,
            Api::<EndpointSlice>::all(client.clone()),
            |s| EndpointSliceInfo::from_k8s(s).map(|s| (Object::EndpointSlice(s), Warnings::new())),
        ),
    ]
}

/// Turns a Kubernetes object into the index's record, with warnings about unusable fields.
type Converter<K> = fn(&K) -> Result<(Object, Warnings), ObjectError>;

fn watch<K>(kind: Kind, api: Api<K>, convert: Converter<K>) -> KindWatch
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = watcher::Config::default().page_size(LIST_PAGE_SIZE);
    let events = watcher(api, config)
        .default_backoff()
        .filter_map(move |event| future::ready(KindEvent::from_watcher(kind, event, convert)))
        .map(move |event| (kind, event))
        .boxed();
    (kind, events)
}

/// A watcher event with its object already converted (or a failure, already logged).
#[derive(Debug, Clone, PartialEq)]
enum KindEvent {
    /// A (re)list starts.
    Init,
    InitApply(Object),
    /// The list is complete.
    InitDone,
    Apply(Object),
    Delete {
        namespace: String,
        name: String,
    },
    /// Listing or watching failed; the watcher retries after its backoff.
    Failed,
}

impl KindEvent {
    /// `None` for an object that cannot be converted (logged).
    fn from_watcher<K: Resource>(
        kind: Kind,
        event: Result<watcher::Event<K>, watcher::Error>,
        convert: Converter<K>,
    ) -> Option<Self> {
        let converted = |object: &K| match convert(object) {
            Ok((object, warnings)) => {
                for w in warnings {
                    warn!(kind = kind.as_str(), "{w}");
                }
                Some(object)
            }
            Err(e) => {
                warn!(kind = kind.as_str(), "skipping object: {e}");
                None
            }
        };
        match event {
            Ok(watcher::Event::Init) => Some(Self::Init),
            Ok(watcher::Event::InitApply(object)) => converted(&object).map(Self::InitApply),
            Ok(watcher::Event::InitDone) => Some(Self::InitDone),
            // Skipped, not deleted: only an object the API server would never send (no name or
            // namespace) fails to convert. A policy Myelin cannot enforce converts into a
            // rejection, and turning it into a Delete would open what it isolated.
            Ok(watcher::Event::Apply(object)) => converted(&object).map(Self::Apply),
            Ok(watcher::Event::Delete(object)) => Self::delete_of(kind, &object),
            Err(e) => {
                warn!(
                    kind = kind.as_str(),
                    "watching the API server failed (retrying with backoff): {e}"
                );
                Some(Self::Failed)
            }
        }
    }

    fn delete_of<K: Resource>(kind: Kind, object: &K) -> Option<Self> {
        let meta = object.meta();
        match &meta.name {
            Some(name) => Some(Self::Delete {
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: name.clone(),
            }),
            None => {
                warn!(
                    kind = kind.as_str(),
                    "skipping a deletion without metadata.name"
                );
                None
            }
        }
    }
}

/// Turns the watchers' events into what the agent consumes. Pure, so the mapping is tested
/// without a server.
#[derive(Debug)]
struct EventMapper {
    /// Objects listed since a kind's last `Init`; they replace the kind at its `InitDone`.
    listing: BTreeMap<Kind, Vec<Object>>,
    /// Kinds whose first list has not completed; `Synced` goes out when none is left.
    unsynced: BTreeSet<Kind>,
}

impl EventMapper {
    fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        Self {
            listing: BTreeMap::new(),
            unsynced: kinds.into_iter().collect(),
        }
    }

    fn map_batch(&mut self, batch: Vec<(Kind, KindEvent)>) -> Vec<SourceEvent> {
        let was_synced = self.unsynced.is_empty();
        let mut changes = Vec::new();
        let mut failed = false;
        for (kind, event) in batch {
            match event {
                KindEvent::Init => {
                    self.listing.insert(kind, Vec::new());
                }
                KindEvent::InitApply(object) => self.listing.entry(kind).or_default().push(object),
                KindEvent::InitDone => {
                    let objects = self.listing.remove(&kind).unwrap_or_default();
                    changes.push(Change::Replace { kind, objects });
                    self.unsynced.remove(&kind);
                }
                KindEvent::Apply(object) => changes.push(Change::Apply(object)),
                KindEvent::Delete { namespace, name } => changes.push(Change::Delete {
                    kind,
                    namespace,
                    name,
                }),
                KindEvent::Failed => failed = true,
            }
        }
        let mut out = Vec::new();
        // Only a starting agent cares: it may fall back to persisted state instead of waiting.
        if failed && !self.unsynced.is_empty() {
            out.push(SourceEvent::Unavailable);
        }
        if !changes.is_empty() {
            out.push(SourceEvent::Changes(changes));
        }
        if !was_synced && self.unsynced.is_empty() {
            out.push(SourceEvent::Synced);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;
    use myelin_cluster::builders;

    fn pod_converter() -> Converter<Pod> {
        |pod| PodInfo::from_k8s(pod).map(|(p, w)| (Object::Pod(p), w))
    }

    fn pod_object(ns: &str, name: &str, labels: &[(&str, &str)], ip: Option<&str>) -> Object {
        let (info, _) = PodInfo::from_k8s(&builders::pod(ns, name, labels, ip)).unwrap();
        Object::Pod(info)
    }

    fn namespace_object(name: &str) -> Object {
        Object::Namespace(NamespaceInfo::from_k8s(&builders::namespace(name, &[])).unwrap())
    }

    fn from_pod_event(event: Result<watcher::Event<Pod>, watcher::Error>) -> Option<KindEvent> {
        KindEvent::from_watcher(Kind::Pod, event, pod_converter())
    }

    #[test]
    fn watcher_events_are_converted_to_slim_records() {
        let web = builders::pod("default", "web", &[("app", "web")], Some("10.0.0.5"));
        assert_eq!(
            from_pod_event(Ok(watcher::Event::Apply(web.clone()))),
            Some(KindEvent::Apply(pod_object(
                "default",
                "web",
                &[("app", "web")],
                Some("10.0.0.5")
            )))
        );
        assert_eq!(
            from_pod_event(Ok(watcher::Event::Delete(web))),
            Some(KindEvent::Delete {
                namespace: "default".into(),
                name: "web".into()
            })
        );
        assert_eq!(
            from_pod_event(Err(watcher::Error::NoResourceVersion)),
            Some(KindEvent::Failed)
        );
    }

    #[test]
    fn objects_that_cannot_be_converted_are_skipped() {
        let mut nameless = builders::pod("default", "web", &[], None);
        nameless.metadata.name = None;
        assert_eq!(
            from_pod_event(Ok(watcher::Event::InitApply(nameless.clone()))),
            None
        );
        assert_eq!(
            from_pod_event(Ok(watcher::Event::Apply(nameless.clone()))),
            None
        );
        assert_eq!(from_pod_event(Ok(watcher::Event::Delete(nameless))), None);
        // A malformed field is a warning: the pod is still indexed, without the field.
        let bad_ip = builders::pod("default", "web", &[], Some("10.0.0.300"));
        assert_eq!(
            from_pod_event(Ok(watcher::Event::Apply(bad_ip))),
            Some(KindEvent::Apply(pod_object("default", "web", &[], None)))
        );
    }

    #[test]
    fn a_list_becomes_one_replace_and_synced_waits_for_every_kind() {
        let mut mapper = EventMapper::new([Kind::Namespace, Kind::Pod]);
        let a = pod_object("default", "a", &[], None);
        let out = mapper.map_batch(vec![
            (Kind::Pod, KindEvent::Init),
            (Kind::Pod, KindEvent::InitApply(a.clone())),
            (Kind::Pod, KindEvent::InitDone),
        ]);
        assert!(
            matches!(&out[..], [SourceEvent::Changes(c)] if *c == [Change::Replace { kind: Kind::Pod, objects: vec![a.clone()] }]),
            "{out:?}"
        );
        // Namespaces list in two batches; Synced follows their Replace.
        assert!(
            mapper
                .map_batch(vec![
                    (Kind::Namespace, KindEvent::Init),
                    (
                        Kind::Namespace,
                        KindEvent::InitApply(namespace_object("default"))
                    ),
                ])
                .is_empty()
        );
        let out = mapper.map_batch(vec![(Kind::Namespace, KindEvent::InitDone)]);
        assert!(
            matches!(&out[..], [SourceEvent::Changes(c), SourceEvent::Synced]
                if *c == [Change::Replace { kind: Kind::Namespace, objects: vec![namespace_object("default")] }]),
            "{out:?}"
        );
    }

    #[test]
    fn a_relist_replaces_the_kind_and_is_not_a_second_sync() {
        let mut mapper = EventMapper::new([Kind::Pod]);
        let a = pod_object("default", "a", &[], None);
        let b = pod_object("default", "b", &[], None);
        mapper.map_batch(vec![
            (Kind::Pod, KindEvent::Init),
            (Kind::Pod, KindEvent::InitApply(a)),
            (Kind::Pod, KindEvent::InitDone),
        ]);
        // A relist that failed halfway starts over: its partial objects are not kept.
        let out = mapper.map_batch(vec![
            (Kind::Pod, KindEvent::Init),
            (
                Kind::Pod,
                KindEvent::InitApply(pod_object("default", "stale", &[], None)),
            ),
            (Kind::Pod, KindEvent::Failed),
            (Kind::Pod, KindEvent::Init),
            (Kind::Pod, KindEvent::InitApply(b.clone())),
            (Kind::Pod, KindEvent::InitDone),
        ]);
        assert!(
            matches!(&out[..], [SourceEvent::Changes(c)]
                if *c == [Change::Replace { kind: Kind::Pod, objects: vec![b.clone()] }]),
            "{out:?}"
        );
    }

    #[test]
    fn watch_events_map_to_apply_and_delete_in_order() {
        let mut mapper = EventMapper::new([Kind::Pod]);
        let a = pod_object("default", "a", &[("v", "1")], None);
        let a2 = pod_object("default", "a", &[("v", "2")], None);
        let out = mapper.map_batch(vec![
            (Kind::Pod, KindEvent::Apply(a.clone())),
            (Kind::Pod, KindEvent::Apply(a2.clone())),
            (
                Kind::Pod,
                KindEvent::Delete {
                    namespace: "default".into(),
                    name: "a".into(),
                },
            ),
        ]);
        let expected = vec![
            Change::Apply(a),
            Change::Apply(a2),
            Change::Delete {
                kind: Kind::Pod,
                namespace: "default".into(),
                name: "a".into(),
            },
        ];
        assert!(
            matches!(&out[..], [SourceEvent::Changes(c)] if *c == expected),
            "{out:?}"
        );
    }

    #[test]
    fn failures_are_reported_only_until_the_first_sync() {
        let mut mapper = EventMapper::new([Kind::Pod]);
        let out = mapper.map_batch(vec![(Kind::Pod, KindEvent::Failed)]);
        assert!(matches!(&out[..], [SourceEvent::Unavailable]), "{out:?}");
        mapper.map_batch(vec![
            (Kind::Pod, KindEvent::Init),
            (Kind::Pod, KindEvent::InitDone),
        ]);
        assert!(
            mapper
                .map_batch(vec![(Kind::Pod, KindEvent::Failed)])
                .is_empty()
        );
    }
}
