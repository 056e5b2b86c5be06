//! A file of the directory source: multi-document YAML (`parse_documents`), then its objects
//! into the index as the source hands them over (one `Replace` per kind) and, separately, one
//! by one as watch events would bring them, then the identities of the label sets.
#![no_main]

use std::{collections::BTreeMap, sync::Arc};

use libfuzzer_sys::fuzz_target;
use myelin_cluster::{
    Change, ClusterIndex, Identities, IdentityLabels, Kind, Object,
    documents::parse_documents,
    identity::{FIRST_POD_IDENTITY, LAST_POD_IDENTITY},
};
use myelin_fuzz::check_accepted_policy;

/// The largest object file the directory source reads (`--max-object-file-size`'s default);
/// `cargo xtask fuzz` gives libFuzzer the same `-max_len`.
const MAX_FILE_SIZE: usize = 16 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FILE_SIZE {
        return;
    }
    // The source reads files as UTF-8 text; anything else is an unreadable file.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((objects, _warnings)) = parse_documents(text) else {
        return;
    };
    for object in &objects {
        if let Object::NetworkPolicy(policy) = object {
            check_accepted_policy(policy);
        }
    }

    let mut by_kind: BTreeMap<Kind, Vec<Object>> =
        Kind::ALL.into_iter().map(|k| (k, Vec::new())).collect();
    for object in &objects {
        by_kind
            .entry(object.kind())
            .or_default()
            .push(object.clone());
    }
    let scan: Vec<Change> = by_kind
        .into_iter()
        .map(|(kind, objects)| Change::Replace { kind, objects })
        .collect();
    let mut scanned = ClusterIndex::default();
    for change in scan.clone() {
        scanned.apply(change);
    }
    // A rescan of an unchanged file changes nothing.
    for change in scan {
        assert!(
            !scanned.apply(change),
            "an unchanged rescan changed the index"
        );
    }

    // The same objects as events, in file order: the index keeps its label sets up to date
    // incrementally, and must end where the full rebuild of a Replace ends.
    let mut watched = ClusterIndex::default();
    for object in objects {
        watched.apply(Change::Apply(object));
    }
    assert_eq!(label_sets(&watched), label_sets(&scanned));
    for pod in scanned.pods() {
        let labels = scanned.pod_identity_labels(&pod.namespace, &pod.name);
        assert_eq!(labels.is_none(), pod.host_network, "{pod:?}");
        assert_eq!(watched.pod(&pod.namespace, &pod.name), Some(pod));
    }
    assert_eq!(watched.pod_count(), scanned.pod_count());
    // Services and EndpointSlices, and which slices each Service has, end the same both ways.
    assert_eq!(
        watched.services().collect::<Vec<_>>(),
        scanned.services().collect::<Vec<_>>()
    );
    assert_eq!(slices(&watched), slices(&scanned));
    for service in scanned.services() {
        check_accepted_service(service);
    }

    identities(&scanned);

    let pods: Vec<(String, String)> = scanned
        .pods()
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    for (namespace, name) in pods {
        scanned.apply(Change::Delete {
            kind: Kind::Pod,
            namespace,
            name,
        });
    }
    assert_eq!(
        scanned.label_sets().count(),
        0,
        "label sets outlive their pods"
    );
    let listed: Vec<(String, String)> = slices(&scanned)
        .into_iter()
        .map(|(namespace, _, name)| (namespace, name))
        .collect();
    for (namespace, name) in listed {
        scanned.apply(Change::Delete {
            kind: Kind::EndpointSlice,
            namespace,
            name,
        });
    }
    assert!(
        scanned.endpoint_slices_with_service().next().is_none(),
        "a Service's slices outlive them"
    );
});

/// (namespace, Service, slice) of every EndpointSlice labelled for a Service.
fn slices(index: &ClusterIndex) -> Vec<(String, String, String)> {
    index
        .endpoint_slices_with_service()
        .map(|(ns, service, name)| (ns.to_string(), service.to_string(), name.to_string()))
        .collect()
}

/// What validation promises of an accepted Service.
fn check_accepted_service(service: &myelin_cluster::ServiceInfo) {
    assert!(service.ports.len() <= myelin_cluster::service::MAX_PORTS);
    for (i, port) in service.ports.iter().enumerate() {
        assert_ne!(port.port, 0);
        assert_ne!(port.node_port, Some(0));
        for other in &service.ports[..i] {
            assert!(other.name != port.name, "{service:?}");
            assert!(
                (other.port, other.protocol) != (port.port, port.protocol),
                "{service:?}"
            );
        }
    }
    if let Some(timeout) = service.affinity_timeout_s {
        assert!((1..=myelin_cluster::service::MAX_AFFINITY_TIMEOUT_S).contains(&timeout));
    }
    assert!(!service.headless || service.cluster_ips.is_empty());
}

fn label_sets(index: &ClusterIndex) -> Vec<Arc<IdentityLabels>> {
    let mut sets: Vec<_> = index.label_sets().cloned().collect();
    sets.sort();
    sets
}

/// One number per label set, in the pods' range, the same whatever order an agent sees them in.
fn identities(index: &ClusterIndex) {
    let sets = label_sets(index);
    let ids = Identities::compute(sets.iter().cloned());
    assert_eq!(ids.len(), sets.len());
    let reversed = Identities::compute(sets.iter().rev().cloned());
    for labels in &sets {
        let id = ids.get(labels).expect("every label set is numbered");
        assert!((FIRST_POD_IDENTITY..=LAST_POD_IDENTITY).contains(&id));
        assert_eq!(ids.labels(id), Some(&**labels));
        assert_eq!(reversed.get(labels), Some(id));
    }
}
