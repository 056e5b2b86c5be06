//! The Kubernetes source against the test API server (`myelin_tests::apiserver`), through a
//! real `kube::Client` built from a kubeconfig, as the agent builds it. No namespaces: the
//! server listens on 127.0.0.1 of the test's own network namespace.
//!
//! Every test feeds what the source sends into a `ClusterIndex`, the agent's own, and checks
//! that the index converges on what the server holds.

use std::time::Duration;

use myelin_agent::source::{
    SourceEvent,
    kubernetes::{self, KubernetesSource},
};
use myelin_cluster::{Change, ClusterIndex, Kind, index::Fallback, policy::PortMatch};
use myelin_tests::{
    apiserver::{ApiServer, Fault, Resource, generated_cluster},
    cluster::{
        endpoint_slice_object, namespace_object, node_object, pod_object, service_object,
        slice_endpoint,
    },
};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

/// Recovery waits on the watcher's backoff (0.8 s doubling, with jitter, up to 30 s).
const RECOVERY: Duration = Duration::from_secs(40);
/// A change on a healthy watch arrives in milliseconds; the margin is for a loaded machine.
const PROMPT: Duration = Duration::from_secs(10);

fn pod(name: &str, labels: &[(&str, &str)], ip: Option<&str>) -> Value {
    let mut pod = pod_object("node-1", "default", name, labels, &[8080]);
    if let Some(ip) = ip {
        pod["status"] = json!({ "podIP": ip });
    }
    pod
}

fn small_cluster(server: &ApiServer) {
    for object in [
        node_object("node-1", "10.244.1.0/24"),
        namespace_object("default", &[("team", "a")]),
        pod("a", &[("app", "a")], Some("10.244.1.2")),
        pod("b", &[("app", "b")], Some("10.244.1.3")),
    ] {
        server.apply(object).unwrap();
    }
}

/// The source under test, running against `server`, and what it sent so far.
struct Watched {
    rx: mpsc::Receiver<SourceEvent>,
    task: JoinHandle<()>,
    index: ClusterIndex,
    /// Every event received, in order.
    seen: Vec<SourceEvent>,
    _dir: tempfile::TempDir,
}

impl Watched {
    /// The kinds an agent without `--kube-proxy-replacement` watches.
    async fn start(server: &ApiServer) -> Self {
        Self::start_with(server, Kind::used(false)).await
    }

    async fn start_with(server: &ApiServer, kinds: &'static [Kind]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        let client = kubernetes::client(Some(&kubeconfig)).await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(KubernetesSource::new(client, kinds).run(tx));
        Self {
            rx,
            task,
            index: ClusterIndex::default(),
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// Receives until `done` holds for the index and the events seen; panics after `within`.
    async fn until(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&ClusterIndex, &[SourceEvent]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !done(&self.index, &self.seen) {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {within:?}; seen: {:#?}", self.seen))
                .expect("the source stopped");
            if let SourceEvent::Changes(changes) = &event {
                for change in changes {
                    self.index.apply(change.clone());
                }
            }
            self.seen.push(event);
        }
    }

    async fn synced(&mut self) {
        self.until(PROMPT, "sync", |_, seen| {
            seen.iter().any(|e| matches!(e, SourceEvent::Synced))
        })
        .await;
    }

    /// Forgets what was seen, so that later assertions look only at what comes next.
    fn mark(&mut self) {
        self.seen.clear();
    }

    fn changes(&self) -> impl Iterator<Item = &Change> {
        self.seen.iter().flat_map(|e| match e {
            SourceEvent::Changes(changes) => changes.as_slice(),
            _ => &[],
        })
    }

    fn replaced(&self, kind: Kind) -> usize {
        self.changes()
            .filter(|c| matches!(c, Change::Replace { kind: k, .. } if *k == kind))
            .count()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn pod_labels(index: &ClusterIndex, name: &str) -> Option<Vec<(String, String)>> {
    index
        .pod("default", name)
        .map(|p| p.labels.clone().into_iter().collect())
}

fn labels(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[tokio::test]
async fn the_initial_list_is_one_replace_per_kind_then_synced() {
    let server = ApiServer::start().unwrap();
    small_cluster(&server);
    // More pods than kube's page size (500): the list takes several pages.
    server.store_all(generated_cluster(1200, 3)).unwrap();
    let mut watched = Watched::start(&server).await;
    watched.synced().await;

    for kind in [Kind::Node, Kind::Namespace, Kind::Pod] {
        assert_eq!(watched.replaced(kind), 1, "{kind:?}");
    }
    assert!(
        matches!(watched.seen.last(), Some(SourceEvent::Synced)),
        "Synced comes after every kind's list: {:?}",
        watched.seen.last()
    );
    assert!(server.stats(Resource::Pod).lists >= 3, "paginated");
    let index = &watched.index;
    assert_eq!(index.pod_count(), 1202);
    assert_eq!(index.namespace_count(), 4);
    let a = index.pod("default", "a").unwrap();
    assert_eq!(a.ip, Some("10.244.1.2".parse().unwrap()));
    assert_eq!(
        index.node("node-1").unwrap().pod_cidr,
        Some("10.244.1.0/24".parse().unwrap())
    );
    assert_eq!(
        index.namespace_labels("default")["team"],
        "a",
        "namespace labels are indexed"
    );
}

#[tokio::test]
async fn added_modified_and_deleted_objects_flow_into_changes() {
    let server = ApiServer::start().unwrap();
    small_cluster(&server);
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    watched.mark();

    server
        .apply(pod("c", &[("app", "c")], Some("10.244.1.4")))
        .unwrap();
    watched
        .until(PROMPT, "ADDED", |index, _| {
            index.pod("default", "c").is_some()
        })
        .await;
    server
        .set_labels(Resource::Pod, "default", "c", &[("app", "c2")])
        .unwrap();
    watched
        .until(PROMPT, "MODIFIED", |index, _| {
            pod_labels(index, "c") == labels(&[("app", "c2")])
        })
        .await;
    server
        .set_labels(Resource::Namespace, "", "default", &[("team", "b")])
        .unwrap();
    watched
        .until(PROMPT, "namespace MODIFIED", |index, _| {
            index
                .namespace_labels("default")
                .get("team")
                .map(String::as_str)
                == Some("b")
        })
        .await;
    server.delete(Resource::Pod, "default", "a").unwrap();
    watched
        .until(PROMPT, "DELETED", |index, _| {
            index.pod("default", "a").is_none()
        })
        .await;

    assert!(
        watched
            .changes()
            .any(|c| matches!(c, Change::Delete { kind: Kind::Pod, name, .. } if name == "a")),
        "a deletion is a Delete: {:?}",
        watched.seen
    );
    for kind in [Kind::Node, Kind::Namespace, Kind::Pod] {
        assert_eq!(watched.replaced(kind), 0, "no relist on a healthy watch");
    }
}

/// Makes the Node watch quiet while the resourceVersion moves on (through pods), compacts
/// the history and cuts the watches: whether the Node watch resumes depends on bookmarks.
async fn quiet_node_watch_then_compaction(server: &ApiServer, watched: &mut Watched) {
    for i in 0..5 {
        server
            .set_labels(Resource::Pod, "default", "a", &[("rev", &i.to_string())])
            .unwrap();
    }
    watched
        .until(PROMPT, "pod changes", |index, _| {
            pod_labels(index, "a") == labels(&[("rev", "4")])
        })
        .await;
    let bookmarks = server.stats(Resource::Node).bookmarks;
    // A bookmark sent from now on carries the resourceVersion after the pod changes.
    let deadline = Instant::now() + PROMPT;
    while server.stats(Resource::Node).bookmarks < bookmarks + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.compact();
    server.drop_watches();
    watched.mark();
    let mut node = node_object("node-1", "10.244.1.0/24");
    node["status"] = json!({ "addresses": [{ "type": "InternalIP", "address": "192.168.0.9" }] });
    server.apply(node).unwrap();
    watched
        .until(RECOVERY, "the node change", |index, _| {
            index.node("node-1").map(|n| n.addresses.clone())
                == Some(vec!["192.168.0.9".parse().unwrap()])
        })
        .await;
}

#[tokio::test]
async fn bookmarks_let_a_quiet_watch_resume_after_compaction() {
    let server = ApiServer::start().unwrap();
    server.set_bookmark_interval(Some(Duration::from_millis(100)));
    small_cluster(&server);
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    quiet_node_watch_then_compaction(&server, &mut watched).await;

    assert_eq!(server.stats(Resource::Node).expired, 0);
    assert_eq!(
        watched.replaced(Kind::Node),
        0,
        "resumed from the bookmark, not relisted: {:?}",
        watched.seen
    );
}

#[tokio::test]
async fn without_bookmarks_a_quiet_watch_expires_and_relists() {
    let server = ApiServer::start().unwrap();
    server.set_bookmark_interval(None);
    small_cluster(&server);
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    quiet_node_watch_then_compaction(&server, &mut watched).await;

    assert!(server.stats(Resource::Node).expired >= 1);
    assert!(watched.replaced(Kind::Node) >= 1, "{:?}", watched.seen);
}

#[tokio::test]
async fn an_expired_watch_relists_and_forgets_what_was_deleted_meanwhile() {
    let mut server = ApiServer::start().unwrap();
    small_cluster(&server);
    let mut watched = Watched::start(&server).await;
    watched.synced().await;

    // While the watches are away, `a` goes and `c` comes, and the history of it is compacted:
    // no DELETED event for `a` can ever reach the source.
    server.stop();
    server.delete(Resource::Pod, "default", "a").unwrap();
    server
        .apply(pod("c", &[("app", "c")], Some("10.244.1.4")))
        .unwrap();
    server.compact();
    watched.mark();
    server.restart().unwrap();
    watched
        .until(RECOVERY, "convergence after 410", |index, _| {
            index.pod("default", "a").is_none() && index.pod("default", "c").is_some()
        })
        .await;

    assert!(
        server.stats(Resource::Pod).expired >= 1,
        "the watch got 410"
    );
    assert!(watched.replaced(Kind::Pod) >= 1);
    assert!(
        !watched
            .changes()
            .any(|c| matches!(c, Change::Delete { .. })),
        "the deletion was learnt from the relist: {:?}",
        watched.seen
    );
    assert!(watched.index.pod("default", "b").is_some());
}

#[tokio::test]
async fn dropped_watches_resume_from_their_last_version_without_relisting() {
    let server = ApiServer::start().unwrap();
    small_cluster(&server);
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    let lists = server.stats(Resource::Pod).lists;
    let watches = server.stats(Resource::Pod).watches;
    watched.mark();

    server.drop_watches();
    // Most likely made while the watch is reconnecting: it must come from the history.
    server
        .set_labels(Resource::Pod, "default", "b", &[("app", "b2")])
        .unwrap();
    watched
        .until(RECOVERY, "the change made across the drop", |index, _| {
            pod_labels(index, "b") == labels(&[("app", "b2")])
        })
        .await;

    assert_eq!(server.stats(Resource::Pod).lists, lists, "no relist");
    assert!(server.stats(Resource::Pod).watches > watches, "re-watched");
    assert_eq!(watched.replaced(Kind::Pod), 0);
}

#[tokio::test]
async fn a_server_down_at_start_is_retried_until_it_comes_up() {
    let mut server = ApiServer::start().unwrap();
    small_cluster(&server);
    server.stop();
    let mut watched = Watched::start(&server).await;

    watched
        .until(PROMPT, "Unavailable", |_, seen| {
            seen.iter().any(|e| matches!(e, SourceEvent::Unavailable))
        })
        .await;
    assert!(
        !watched
            .seen
            .iter()
            .any(|e| matches!(e, SourceEvent::Synced))
    );
    // Several failed attempts, spaced by the backoff, then the server comes up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().unwrap();
    watched
        .until(RECOVERY, "sync once the server is up", |_, seen| {
            seen.iter().any(|e| matches!(e, SourceEvent::Synced))
        })
        .await;
    assert_eq!(watched.index.pod_count(), 2);
}

#[tokio::test]
async fn http_errors_and_garbage_are_retried_with_backoff() {
    let server = ApiServer::start().unwrap();
    small_cluster(&server);
    server.inject(Fault::Status(500), 2);
    server.inject(Fault::Garbage, 2);
    server.inject(Fault::Status(403), 2);
    let mut watched = Watched::start(&server).await;
    watched
        .until(RECOVERY, "sync after the faults", |_, seen| {
            seen.iter().any(|e| matches!(e, SourceEvent::Synced))
        })
        .await;
    assert_eq!(server.pending_faults(), 0);
    assert!(
        watched
            .seen
            .iter()
            .any(|e| matches!(e, SourceEvent::Unavailable)),
        "the failures before the sync were reported"
    );
    assert_eq!(watched.index.pod_count(), 2);

    // Garbage on the watches of a synced source: they fail, back off and resume.
    watched.mark();
    server.inject(Fault::Garbage, 3);
    server.drop_watches();
    server
        .set_labels(Resource::Pod, "default", "a", &[("app", "a2")])
        .unwrap();
    watched
        .until(RECOVERY, "the change after garbage watches", |index, _| {
            pod_labels(index, "a") == labels(&[("app", "a2")])
        })
        .await;
    assert_eq!(server.pending_faults(), 0);
}

#[tokio::test]
async fn malformed_objects_are_logged_and_skipped_without_a_crash() {
    let server = ApiServer::start().unwrap();
    for object in [
        node_object("no-cidr", "10.244.9.0/24"),
        node_object("bad-cidr", "10.244.300.0/24"),
        namespace_object("default", &[]),
        pod("no-ip", &[], None),
        pod("bad-ip", &[], Some("10.0.0.999")),
        pod("good", &[], Some("10.244.1.7")),
    ] {
        server.apply(object).unwrap();
    }
    server
        .update(Resource::Node, "", "no-cidr", |node| {
            node["spec"] = json!({})
        })
        .unwrap();
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    let index = &watched.index;
    assert_eq!(index.node("no-cidr").unwrap().pod_cidr, None);
    assert_eq!(index.node("bad-cidr").unwrap().pod_cidr, None);
    assert_eq!(index.pod("default", "no-ip").unwrap().ip, None);
    assert_eq!(index.pod("default", "bad-ip").unwrap().ip, None);
    assert_eq!(
        index.pod("default", "good").unwrap().ip,
        Some("10.244.1.7".parse().unwrap())
    );

    // A watch event whose object does not even parse as a Pod is skipped; the watch goes on.
    server
        .update(Resource::Pod, "default", "good", |pod| {
            pod["spec"] = json!("not a pod spec")
        })
        .unwrap();
    server.apply(pod("after", &[], Some("10.244.1.8"))).unwrap();
    watched
        .until(RECOVERY, "the pod after the unparsable one", |index, _| {
            index.pod("default", "after").is_some()
        })
        .await;
    assert_eq!(
        watched.index.pod("default", "good").unwrap().ip,
        Some("10.244.1.7".parse().unwrap()),
        "the unparsable version was skipped"
    );
}

/// NetworkPolicy `default/<name>`: pods with `app: <selects>` take TCP `port` from app=a pods.
fn policy(name: &str, selects: &str, port: i64) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "podSelector": { "matchLabels": { "app": selects } },
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": { "app": "a" } } }],
                "ports": [{ "port": port }],
            }],
        },
    })
}

/// `(name, ports the policy in force allows, its fallback if rejected)` of every policy.
fn policy_states(index: &ClusterIndex) -> Vec<(String, Vec<PortMatch>, Option<Fallback>)> {
    index
        .indexed_policies()
        .map(|p| {
            let ports = p
                .in_force
                .ingress
                .iter()
                .flatten()
                .flat_map(|r| r.ports.iter().flatten())
                .map(|s| s.port.clone())
                .collect();
            let fallback = p.rejected.as_ref().map(|r| r.fallback);
            (p.in_force.name.clone(), ports, fallback)
        })
        .collect()
}

#[tokio::test]
async fn a_policy_the_api_server_accepts_but_myelin_cannot_enforce_is_rejected_not_deleted() {
    let mut server = ApiServer::start().unwrap();
    small_cluster(&server);
    server.apply(policy("b-from-a", "b", 80)).unwrap();
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    let port_80 = vec![PortMatch::Range { from: 80, to: 80 }];
    assert_eq!(
        policy_states(&watched.index),
        [("b-from-a".to_string(), port_80.clone(), None)]
    );

    // Edited into a version Myelin rejects: the last good version stays in force.
    watched.mark();
    server.apply(policy("b-from-a", "b", 70000)).unwrap();
    watched
        .until(PROMPT, "the rejected edit", |index, _| {
            index.rejected_policy_count() == 1
        })
        .await;
    assert_eq!(
        policy_states(&watched.index),
        [(
            "b-from-a".to_string(),
            port_80.clone(),
            Some(Fallback::LastGood)
        )]
    );
    let rejected = watched
        .index
        .indexed_policies()
        .find_map(|p| p.rejected.clone());
    assert_eq!(
        rejected.map(|r| r.reason),
        Some("spec.ingress[0].ports[0].port: 70000 is outside 1-65535".to_string())
    );
    assert!(
        !watched
            .changes()
            .any(|c| matches!(c, Change::Delete { .. })),
        "a rejection is not a deletion: {:?}",
        watched.seen
    );

    // A relist hands both again, with a new invalid policy: the edited one keeps its last
    // good version, the new one denies what it selects.
    server.stop();
    server.apply(policy("a-from-a", "a", 0)).unwrap();
    server.compact();
    watched.mark();
    server.restart().unwrap();
    watched
        .until(RECOVERY, "the relist", |index, _| {
            index.rejected_policy_count() == 2
        })
        .await;
    assert!(
        watched.replaced(Kind::NetworkPolicy) >= 1,
        "{:?}",
        watched.seen
    );
    assert_eq!(
        policy_states(&watched.index),
        [
            ("a-from-a".to_string(), vec![], Some(Fallback::Deny)),
            ("b-from-a".to_string(), port_80, Some(Fallback::LastGood)),
        ]
    );
}

fn service(name: &str, cluster_ip: &str) -> Value {
    service_object(
        "default",
        name,
        json!({
            "clusterIP": cluster_ip,
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        }),
    )
}

fn endpoint_slice(name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints = addresses
        .iter()
        .map(|a| slice_endpoint(a, true, false, "node-1"))
        .collect();
    endpoint_slice_object(
        "default",
        name,
        service,
        endpoints,
        &[("http", 8080, "TCP")],
    )
}

fn slice_addresses(index: &ClusterIndex, service: &str) -> Vec<String> {
    index
        .endpoint_slices_of("default", service)
        .flat_map(|s| s.endpoints.iter().map(|e| e.address.to_string()))
        .collect()
}

#[tokio::test]
async fn services_and_endpoint_slices_are_listed_and_watched_with_kube_proxy_replacement() {
    let server = ApiServer::start().unwrap();
    small_cluster(&server);
    server.apply(service("web", "10.96.0.10")).unwrap();
    server
        .apply(endpoint_slice("web-1", "web", &["10.244.1.2"]))
        .unwrap();
    let mut watched = Watched::start_with(&server, Kind::used(true)).await;
    watched.synced().await;
    for kind in [Kind::Service, Kind::EndpointSlice] {
        assert_eq!(watched.replaced(kind), 1, "{kind:?} listed before Synced");
    }
    let web = watched.index.service("default", "web").unwrap();
    assert_eq!(
        web.cluster_ips,
        ["10.96.0.10".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(slice_addresses(&watched.index, "web"), ["10.244.1.2"]);

    // A slice of a Service not created yet, then the Service; then a deletion.
    server
        .apply(endpoint_slice("api-1", "api", &["10.244.1.3"]))
        .unwrap();
    server.apply(service("api", "10.96.0.11")).unwrap();
    watched
        .until(PROMPT, "the api Service and its slice", |index, _| {
            index.service("default", "api").is_some()
                && slice_addresses(index, "api") == ["10.244.1.3"]
        })
        .await;
    server
        .apply(endpoint_slice(
            "web-1",
            "web",
            &["10.244.1.2", "10.244.1.3"],
        ))
        .unwrap();
    server.delete(Resource::Service, "default", "api").unwrap();
    watched
        .until(
            PROMPT,
            "the slice MODIFIED and the Service DELETED",
            |index, _| {
                index.service("default", "api").is_none()
                    && slice_addresses(index, "web").len() == 2
            },
        )
        .await;

    // A malformed Service (the real API server would refuse it) is skipped: the last good
    // version stays.
    server.apply(service("web", "10.96.0.300")).unwrap();
    server.apply(service("marker", "10.96.0.12")).unwrap();
    watched
        .until(PROMPT, "the Service after the malformed one", |index, _| {
            index.service("default", "marker").is_some()
        })
        .await;
    assert_eq!(
        watched.index.service("default", "web").unwrap().cluster_ips,
        ["10.96.0.10".parse::<std::net::Ipv4Addr>().unwrap()]
    );
}

#[tokio::test]
async fn without_kube_proxy_replacement_services_are_never_requested() {
    let server = ApiServer::start().unwrap();
    small_cluster(&server);
    server.apply(service("web", "10.96.0.10")).unwrap();
    let mut watched = Watched::start(&server).await;
    watched.synced().await;
    assert_eq!(watched.index.service_count(), 0);
    for resource in [Resource::Service, Resource::EndpointSlice] {
        let stats = server.stats(resource);
        assert_eq!((stats.lists, stats.watches), (0, 0), "{resource:?}");
    }
}
