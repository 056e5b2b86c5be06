//! The agent's logic against the fake datapath.

use std::{collections::HashMap, time::Duration};

use myelin_api::Mac;
use myelin_common::{Ipv4Key, endpoint::ENDPOINT_F_INGRESS_ISOLATED};

use myelin_cluster::{NodeInfo, Object, PodInfo, builders};

use super::*;
use crate::{
    datapath::{fake::FakeDatapath, table::LpmKey},
    links::{EndpointAlias, LinkInfo},
};

/// An interface of the node as `Links::list` reports it.
fn link(name: &str, index: u32) -> LinkInfo {
    LinkInfo {
        index,
        name: name.into(),
        mac: None,
        alias: None,
    }
}

/// Interfaces that "exist" in the test: name -> ifindex.
struct FakeInterfaces(HashMap<String, u32>);

impl Interfaces for FakeInterfaces {
    fn index_of(&self, ifname: &str) -> Option<u32> {
        self.0.get(ifname).copied()
    }
}

/// A synced agent (cluster state known), as in normal operation.
fn agent_with(interfaces: &[(&str, u32)], cidr: &str) -> Agent<FakeDatapath> {
    let mut agent = unsynced_agent_with(interfaces, cidr);
    agent.set_synced().unwrap();
    agent
}

fn unsynced_agent_with(interfaces: &[(&str, u32)], cidr: &str) -> Agent<FakeDatapath> {
    Agent::new(
        "node-1".into(),
        Ipam::in_memory(cidr.parse().unwrap()).unwrap(),
        EndpointStore::in_memory(16),
        ClusterIndex::default(),
        FakeDatapath::new(16),
        Box::new(FakeInterfaces(
            interfaces
                .iter()
                .map(|(n, i)| (n.to_string(), *i))
                .collect(),
        )),
    )
}

fn agent() -> Agent<FakeDatapath> {
    agent_with(&[("lxca", 10), ("lxcb", 11)], "10.244.0.0/24")
}

fn att(c: &str) -> AttachmentId {
    AttachmentId::new(c, "eth0")
}

fn add(
    agent: &mut Agent<FakeDatapath>,
    c: &str,
    ifname: &str,
    ifindex: u32,
) -> Result<Endpoint, ApiError> {
    let alloc = agent.allocate(&AllocateRequest {
        attachment: att(c),
        pod: None,
    })?;
    agent.put_endpoint(&EndpointRequest {
        attachment: att(c),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: c.into(),
        }),
        netns: format!("/run/netns/{c}"),
        netns_cookie: Some(4096 + u64::from(ifindex)),
        ip: alloc.ip,
        mac: Mac([2, 0, 0, 0, 0, 1]),
        host_ifname: ifname.into(),
        host_ifindex: ifindex,
        host_mac: Mac([2, 0, 0, 0, 0, 2]),
    })
}

#[test]
fn endpoint_is_in_both_maps_and_attached_before_put_returns() {
    let mut a = agent();
    let ep = add(&mut a, "a", "lxca", 10).unwrap();
    let dp = a.datapath();
    assert!(dp.attached.contains("lxca"));
    let by_ip = dp.tables.endpoints.map().entries[&Ipv4Key {
        addr: ep.ip.octets(),
    }];
    assert_eq!(by_ip.ifindex, 10);
    assert_eq!(by_ip.id, ep.id);
    assert_eq!(dp.tables.endpoints_by_if.map().entries[&10], by_ip);
    assert!(dp.state.counter_ids.contains(&ep.id));
    assert_ne!(ep.identity, 0);
}

#[test]
fn delete_removes_everything_and_is_idempotent() {
    let mut a = agent();
    let free = a.status().free_addresses;
    let ep = add(&mut a, "a", "lxca", 10).unwrap();
    let del = a.delete_endpoint(&att("a")).unwrap();
    assert!(del.endpoint);
    assert_eq!(del.released, Some(ep.ip));
    let dp = a.datapath();
    assert!(dp.attached.is_empty());
    assert!(dp.tables.endpoints.map().entries.is_empty());
    assert!(dp.tables.endpoints_by_if.map().entries.is_empty());
    assert!(dp.state.counter_ids.is_empty());
    assert_eq!(a.status().free_addresses, free);
    assert_eq!(
        a.delete_endpoint(&att("a")).unwrap(),
        DeleteResponse::default()
    );
}

#[test]
fn dels_queued_while_the_agent_was_down_are_carried_out_once_and_before_a_new_add() {
    let queue = tempfile::tempdir().unwrap();
    let mut a = agent().with_pending_deletes(queue.path().to_path_buf());
    let free = a.status().free_addresses;
    add(&mut a, "a", "lxca", 10).unwrap();
    add(&mut a, "b", "lxcb", 11).unwrap();
    // Nothing queued: nothing happens.
    assert_eq!(a.process_pending_deletes(), 0);

    // "a" was deleted while the agent was down; a record nobody can read sits beside it.
    pending::enqueue(queue.path(), &att("a")).unwrap();
    std::fs::write(queue.path().join("garbage.json"), "not json").unwrap();
    assert_eq!(a.process_pending_deletes(), 1);
    assert_eq!(a.endpoints(None).len(), 1, "b stays");
    assert_eq!(
        a.status().free_addresses,
        free - 1,
        "a's address is free again"
    );
    assert!(
        pending::list(queue.path()).unwrap().is_empty(),
        "records are gone"
    );
    assert_eq!(a.process_pending_deletes(), 0);

    // A DEL of "b" queued after the agent's pass (it raced the start), then "b" added
    // again before the next pass: the ADD carries the DEL out first (without it, "b"
    // would be refused as existing), and no later pass deletes the new endpoint.
    pending::enqueue(queue.path(), &att("b")).unwrap();
    let again = add(&mut a, "b", "lxcb", 11).unwrap();
    assert!(pending::find(queue.path(), &att("b")).is_none());
    assert_eq!(a.process_pending_deletes(), 0);
    assert_eq!(a.endpoints(Some(&att("b"))), vec![again]);
    assert_eq!(a.status().free_addresses, free - 1, "no address leaked");
    assert!(a.endpoints(Some(&att("a"))).is_empty());
}

#[test]
fn endpoint_needs_a_matching_allocation_and_interface() {
    let mut a = agent();
    let alloc = a
        .allocate(&AllocateRequest {
            attachment: att("a"),
            pod: None,
        })
        .unwrap();
    let mut req = EndpointRequest {
        attachment: att("a"),
        pod: None,
        netns: "/run/netns/a".into(),
        netns_cookie: None,
        ip: Ipv4Addr::new(10, 244, 0, 200),
        mac: Mac([2, 0, 0, 0, 0, 1]),
        host_ifname: "lxca".into(),
        host_ifindex: 10,
        host_mac: Mac([2, 0, 0, 0, 0, 2]),
    };
    assert_eq!(
        a.put_endpoint(&req).unwrap_err().kind,
        ErrorKind::InvalidRequest
    );
    req.ip = alloc.ip;
    req.host_ifindex = 99;
    assert_eq!(
        a.put_endpoint(&req).unwrap_err().kind,
        ErrorKind::InvalidRequest
    );
    req.host_ifindex = 10;
    a.put_endpoint(&req).unwrap();
    assert_eq!(
        a.put_endpoint(&req).unwrap_err().kind,
        ErrorKind::AlreadyExists
    );
}

#[test]
fn failed_attach_leaves_no_endpoint_and_no_map_entry() {
    let mut a = agent();
    a.datapath.fail_attach.insert("lxca".into());
    let err = add(&mut a, "a", "lxca", 10).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Internal);
    assert!(a.endpoints(None).is_empty());
    assert!(a.datapath().tables.endpoints.map().entries.is_empty());
    assert!(a.datapath().state.counter_ids.is_empty());
    // The address stays allocated until the plugin's rollback releases it.
    assert!(a.release(&att("a")).unwrap().released.is_some());
}

#[test]
fn release_is_refused_while_an_endpoint_uses_the_address() {
    let mut a = agent();
    add(&mut a, "a", "lxca", 10).unwrap();
    assert_eq!(
        a.release(&att("a")).unwrap_err().kind,
        ErrorKind::InvalidRequest
    );
}

#[test]
fn exhausted_pool_is_reported_as_such() {
    let mut a = agent_with(&[("lxca", 10), ("lxcb", 11)], "10.0.0.0/30");
    add(&mut a, "a", "lxca", 10).unwrap();
    assert_eq!(
        add(&mut a, "b", "lxcb", 11).unwrap_err().kind,
        ErrorKind::PoolExhausted
    );
}

#[test]
fn gc_releases_everything_not_listed() {
    let mut a = agent();
    add(&mut a, "a", "lxca", 10).unwrap();
    add(&mut a, "b", "lxcb", 11).unwrap();
    a.allocate(&AllocateRequest {
        attachment: att("orphan"),
        pod: None,
    })
    .unwrap();
    let gc = a
        .gc(&GcRequest {
            valid: vec![att("a")],
        })
        .unwrap();
    assert_eq!(gc.removed, vec![att("b"), att("orphan")]);
    assert_eq!(a.endpoints(None).len(), 1);
    assert!(a.datapath().attached.contains("lxca"));
    assert!(!a.datapath().attached.contains("lxcb"));
}

#[test]
fn an_add_awaits_its_pod_only_from_a_synced_source_that_has_objects_for_pods() {
    let web = PodRef {
        namespace: "default".into(),
        name: "web".into(),
    };
    // The directory source, or none: pods need no object.
    assert!(!agent().awaits_pod(&web));
    // Kubernetes before the first sync: what is missing may just not be listed yet, and
    // the API server may be down; the agent serves its pods as they are.
    let mut a = unsynced_agent_with(&[], "10.244.0.0/24").expecting_pod_objects();
    assert!(!a.awaits_pod(&web));
    a.set_synced().unwrap();
    assert!(a.awaits_pod(&web), "synced, and the object has not come");
    let (pod, _) =
        PodInfo::from_k8s(&builders::pod("default", "web", &[("app", "web")], None)).unwrap();
    a.apply_cluster_changes([Change::Apply(Object::Pod(pod))])
        .unwrap();
    assert!(!a.awaits_pod(&web), "the object is in");
}

#[test]
fn label_change_updates_the_endpoint_identity_in_the_maps() {
    let mut a = agent();
    let ep = add(&mut a, "a", "lxca", 10).unwrap();
    let key = Ipv4Key {
        addr: ep.ip.octets(),
    };
    let before = a.datapath().tables.endpoints.map().entries[&key].identity;
    let (pod, _) =
        PodInfo::from_k8s(&builders::pod("default", "a", &[("app", "web")], None)).unwrap();
    let diff = a
        .apply_cluster_changes([Change::Apply(Object::Pod(pod.clone()))])
        .unwrap();
    assert_eq!(
        diff.updated, 3,
        "both endpoint maps and the ipcache carry the identity"
    );
    let after = a.datapath().tables.endpoints.map().entries[&key].identity;
    assert_ne!(before, after);
    // The same event again changes nothing and writes nothing.
    let writes = a.datapath().tables.endpoints.map().writes;
    assert!(
        a.apply_cluster_changes([Change::Apply(Object::Pod(pod))])
            .unwrap()
            .is_empty()
    );
    assert_eq!(a.datapath().tables.endpoints.map().writes, writes);
}

#[test]
fn before_the_first_sync_the_maps_keep_their_policy_state() {
    let mut a = unsynced_agent_with(&[("lxca", 10), ("lxcb", 11)], "10.244.0.0/24");
    // What an earlier agent left: an isolated endpoint with some identity, and policy.
    let ep = add(&mut a, "a", "lxca", 10).unwrap();
    let key = Ipv4Key {
        addr: ep.ip.octets(),
    };
    let mut left = a.datapath().tables.endpoints.current()[&key];
    left.identity = 4242;
    left.flags = ENDPOINT_F_INGRESS_ISOLATED;
    let mut restarted = unsynced_agent_with(&[("lxca", 10), ("lxcb", 11)], "10.244.0.0/24");
    restarted
        .datapath
        .tables
        .endpoints
        .apply(&[(key, left)].into())
        .unwrap();
    let policy_key = LpmKey {
        prefix_len: 72,
        data: myelin_common::PolicyKey {
            endpoint_id: ep.id,
            identity: 7,
            direction: 0,
            protocol: 0,
            dport: [0; 2],
        },
    };
    let allow = myelin_common::PolicyEntry { flags: 1, rule: 0 };
    restarted
        .datapath
        .tables
        .policy
        .apply(&[(policy_key, allow)].into())
        .unwrap();
    restarted.endpoints.insert(crate::endpoint::EndpointRecord {
        id: ep.id,
        attachment: att("a"),
        pod: ep.pod.clone(),
        netns: ep.netns.clone(),
        netns_cookie: None,
        ip: ep.ip,
        mac: ep.mac,
        host_ifname: ep.host_ifname.clone(),
        host_ifindex: ep.host_ifindex,
        host_mac: ep.host_mac,
    });
    restarted.ipam.allocate(&att("a")).unwrap();

    restarted
        .restore(&[link("lxca", 10), link("lxcb", 11)], Instant::now())
        .unwrap();
    let dp = restarted.datapath();
    assert_eq!(
        dp.tables.endpoints.current()[&key].identity,
        4242,
        "identity kept"
    );
    assert_eq!(
        dp.tables.endpoints.current()[&key].flags,
        ENDPOINT_F_INGRESS_ISOLATED
    );
    assert_eq!(dp.tables.policy.current().len(), 1, "policy entries kept");
    assert_eq!(
        restarted.endpoints(None)[0].identity,
        4242,
        "the API reports the kept one"
    );

    restarted.set_synced().unwrap();
    let dp = restarted.datapath();
    assert_ne!(dp.tables.endpoints.current()[&key].identity, 4242);
    assert_eq!(
        dp.tables.endpoints.current()[&key].flags,
        0,
        "no policy selects it"
    );
    assert!(dp.tables.policy.current().is_empty());
}

#[test]
fn restore_reattaches_live_endpoints_and_skips_vanished_ones() {
    let mut store = EndpointStore::in_memory(16);
    store.insert(crate::endpoint::record(1, "a", [10, 244, 0, 2]));
    store.insert(crate::endpoint::record(2, "b", [10, 244, 0, 3]));
    let mut ipam = Ipam::in_memory("10.244.0.0/24".parse().unwrap()).unwrap();
    ipam.allocate(&att("a")).unwrap();
    ipam.allocate(&att("b")).unwrap();
    // Only "a"'s interface still exists, with the recorded ifindex.
    let mut a = Agent::new(
        "n".into(),
        ipam,
        store,
        ClusterIndex::default(),
        FakeDatapath::new(16),
        Box::new(FakeInterfaces([("lxca".to_string(), 101)].into())),
    );
    let report = a.restore(&[link("lxca", 101)], Instant::now()).unwrap();
    assert_eq!((report.live, report.vanished), (1, 1));
    let dp = a.datapath();
    assert_eq!(dp.attached, BTreeSet::from(["lxca".to_string()]));
    assert_eq!(
        dp.tables
            .endpoints_by_if
            .map()
            .entries
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![101]
    );
    // The vanished endpoint keeps its address until DEL or the end of the grace period.
    assert_eq!(a.status().endpoints, 2);
    a.delete_endpoint(&att("b")).unwrap();
    assert_eq!(a.status().endpoints, 1);
}

const GRACE: Duration = Duration::from_secs(60);

/// A node with real-looking veths: `(container, ifindex)` -> an endpoint whose host veth has
/// the name `myelin` derives and its alias, as a live agent leaves them.
fn live_node(pods: &[(&str, u32)]) -> (Agent<FakeDatapath>, Vec<LinkInfo>) {
    let interfaces: Vec<(String, u32)> = pods
        .iter()
        .map(|(c, i)| (att(c).host_ifname(), *i))
        .collect();
    let refs: Vec<(&str, u32)> = interfaces.iter().map(|(n, i)| (n.as_str(), *i)).collect();
    let mut a = agent_with(&refs, "10.244.0.0/24");
    let mut links = Vec::new();
    for (c, index) in pods {
        let ep = add(&mut a, c, &att(c).host_ifname(), *index).unwrap();
        let alias = EndpointAlias {
            attachment: ep.attachment.clone(),
            pod: ep.pod.clone(),
        };
        links.push(LinkInfo {
            index: *index,
            name: ep.host_ifname.clone(),
            mac: Some(ep.host_mac),
            alias: alias.encode(),
        });
    }
    (a, links)
}

/// The same node after a restart with what the state directory still holds.
fn restarted(
    before: &Agent<FakeDatapath>,
    endpoints: EndpointStore,
    ipam: Ipam,
) -> Agent<FakeDatapath> {
    let mut datapath = FakeDatapath::new(16);
    // The pinned maps survive the restart.
    datapath
        .tables
        .endpoints
        .apply(before.datapath().tables.endpoints.current())
        .unwrap();
    datapath
        .tables
        .endpoints_by_if
        .apply(before.datapath().tables.endpoints_by_if.current())
        .unwrap();
    let interfaces = before
        .endpoints
        .iter()
        .map(|r| (r.host_ifname.clone(), r.host_ifindex))
        .collect();
    Agent::new(
        "node-1".into(),
        ipam,
        endpoints,
        ClusterIndex::default(),
        datapath,
        Box::new(FakeInterfaces(interfaces)),
    )
}

#[test]
fn an_emptied_endpoints_file_is_rebuilt_from_the_maps_and_the_veths_aliases() {
    let (before, links) = live_node(&[("a", 10), ("b", 11)]);
    let mut ipam = Ipam::in_memory("10.244.0.0/24".parse().unwrap()).unwrap();
    for r in before.endpoints.iter() {
        ipam.adopt(&r.attachment, r.ip).unwrap();
    }
    let mut a = restarted(&before, EndpointStore::in_memory(16), ipam);
    let report = a.restore(&links, Instant::now()).unwrap();
    a.set_synced().unwrap();
    assert_eq!(report.endpoints_rebuilt, 2);
    assert_eq!(report.live, 2);
    let mut rebuilt = a.endpoints(None);
    let mut original = before.endpoints(None);
    for e in rebuilt.iter_mut().chain(original.iter_mut()) {
        e.netns.clear(); // the one thing the kernel does not keep
    }
    rebuilt.sort_by_key(|e| e.id);
    original.sort_by_key(|e| e.id);
    assert_eq!(
        rebuilt, original,
        "attachment, pod, addresses, ids, interfaces"
    );
    assert_eq!(
        a.datapath().tables.endpoints.current(),
        before.datapath().tables.endpoints.current(),
        "the pods keep their network"
    );
    // A DEL by attachment finds the rebuilt endpoint.
    assert!(a.delete_endpoint(&att("a")).unwrap().endpoint);
}

#[test]
fn a_lost_ipam_file_gives_live_endpoints_their_addresses_back() {
    let (before, links) = live_node(&[("a", 10), ("b", 11)]);
    let mut records = EndpointStore::in_memory(16);
    for r in before.endpoints.iter() {
        records.insert(r.clone());
    }
    let mut a = restarted(
        &before,
        records,
        Ipam::in_memory("10.244.0.0/24".parse().unwrap()).unwrap(),
    );
    let report = a.restore(&links, Instant::now()).unwrap();
    a.set_synced().unwrap();
    assert_eq!(report.addresses_rebuilt, 2);
    let held: BTreeSet<Ipv4Addr> = before.endpoints.iter().map(|r| r.ip).collect();
    // Every new address is one no live pod holds.
    for n in 0..20 {
        let ip = a
            .allocate(&AllocateRequest {
                attachment: att(&format!("new{n}")),
                pod: None,
            })
            .unwrap()
            .ip;
        assert!(!held.contains(&ip), "{ip} handed out twice");
    }
}

#[test]
fn an_endpoint_whose_veth_vanished_leaves_the_maps_at_once_and_is_released_after_the_grace() {
    let (mut a, links) = live_node(&[("a", 10), ("b", 11)]);
    let free = a.status().free_addresses;
    let t0 = Instant::now();
    a.link_removed(10, &links[0].name, t0);
    assert!(
        a.datapath()
            .tables
            .endpoints_by_if
            .current()
            .get(&10)
            .is_none()
    );
    assert_eq!(a.status().endpoints, 2, "not released yet");
    let still = [links[1].clone()];
    assert!(a.sweep(&still, t0 + GRACE / 2, GRACE).is_empty());
    let report = a.sweep(&still, t0 + GRACE, GRACE);
    assert_eq!(report.released_endpoints, vec![att("a")]);
    assert_eq!(a.status().endpoints, 1);
    assert_eq!(a.status().free_addresses, free + 1);
}

#[test]
fn the_sweep_notices_a_veth_gone_without_an_event() {
    let (mut a, links) = live_node(&[("a", 10), ("b", 11)]);
    let t0 = Instant::now();
    // "a"'s index now names something else: its veth is gone.
    let now = [link("eth9", 10), links[1].clone()];
    assert!(a.sweep(&now, t0, GRACE).is_empty());
    assert!(
        a.datapath()
            .tables
            .endpoints_by_if
            .current()
            .get(&10)
            .is_none()
    );
    let report = a.sweep(&now, t0 + GRACE, GRACE);
    assert_eq!(report.released_endpoints, vec![att("a")]);
}

#[test]
fn an_address_without_an_endpoint_is_released_after_the_grace_with_its_veth() {
    let mut a = agent();
    let free = a.status().free_addresses;
    let t0 = Instant::now();
    a.allocate(&AllocateRequest {
        attachment: att("stuck"),
        pod: None,
    })
    .unwrap();
    // The plugin created the veth, then died before asking for the endpoint.
    let veth = link(&att("stuck").host_ifname(), 42);
    assert!(
        a.sweep(std::slice::from_ref(&veth), t0, GRACE).is_empty(),
        "an ADD in progress"
    );
    let report = a.sweep(
        std::slice::from_ref(&veth),
        t0 + GRACE + Duration::from_secs(1),
        GRACE,
    );
    assert_eq!(report.released_addresses, vec![att("stuck")]);
    assert_eq!(report.delete_links, vec![veth]);
    assert_eq!(a.status().free_addresses, free);
}

#[test]
fn a_myelin_veth_no_endpoint_claims_is_removed_after_the_grace_and_others_are_left_alone() {
    let (mut a, links) = live_node(&[("a", 10)]);
    let t0 = Instant::now();
    let orphan = link(&att("gone").host_ifname(), 20);
    let mut all = links.clone();
    all.extend([
        orphan.clone(),
        link("eth0", 2),
        link("myelin_host", 3),
        link("lxcfoo", 4),
    ]);
    assert!(a.sweep(&all, t0, GRACE).delete_links.is_empty());
    assert!(a.sweep(&all, t0 + GRACE / 2, GRACE).delete_links.is_empty());
    let report = a.sweep(&all, t0 + GRACE, GRACE);
    assert_eq!(report.delete_links, vec![orphan]);
    assert!(report.released_endpoints.is_empty());
}

#[test]
fn masq_exclude_follows_the_nodes_once_synced() {
    let prefix = |net: &str| {
        let net: Ipv4Net = net.parse().unwrap();
        LpmKey {
            prefix_len: u32::from(net.prefix_len()),
            data: Ipv4Key {
                addr: net.network().octets(),
            },
        }
    };
    let mut a = unsynced_agent_with(&[], "10.244.0.0/24")
        .with_non_masquerade_cidrs(vec!["172.16.0.0/12".parse().unwrap()]);
    let excluded = |a: &Agent<FakeDatapath>| -> Vec<_> {
        a.datapath()
            .tables
            .masq_exclude
            .current()
            .keys()
            .copied()
            .collect()
    };
    a.apply_cluster_changes([Change::Apply(Object::Node(
        NodeInfo::from_k8s(&builders::node(
            "node-1",
            Some("10.244.0.0/24"),
            "192.168.1.10",
        ))
        .unwrap()
        .0,
    ))])
    .unwrap();
    assert!(excluded(&a).is_empty(), "left as it is until synced");

    a.set_synced().unwrap();
    assert_eq!(
        excluded(&a),
        // In key order: prefix length first.
        [
            prefix("172.16.0.0/12"),
            prefix("10.244.0.0/24"),
            prefix("192.168.1.10/32")
        ]
    );
    a.apply_cluster_changes([Change::Apply(Object::Node(
        NodeInfo::from_k8s(&builders::node(
            "node-2",
            Some("10.244.1.0/24"),
            "192.168.1.11",
        ))
        .unwrap()
        .0,
    ))])
    .unwrap();
    assert!(excluded(&a).contains(&prefix("10.244.1.0/24")));
    assert!(excluded(&a).contains(&prefix("192.168.1.11/32")));
}

/// A Service `default/web` on 10.96.0.10:80 with one ready endpoint, as a source hands it over.
fn web_service_changes() -> Vec<Change> {
    let service = myelin_cluster::ServiceInfo::from_k8s(&builders::service(
        "default",
        "web",
        "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}",
    ))
    .unwrap();
    let slice = myelin_cluster::EndpointSliceInfo::from_k8s(&builders::endpoint_slice(
        "default",
        "web-1",
        Some("web"),
        "addressType: IPv4\nendpoints: [{addresses: [10.244.0.9]}]\nports: [{name: http, port: 8080}]",
    ))
    .unwrap();
    vec![
        Change::Apply(Object::Service(service)),
        Change::Apply(Object::EndpointSlice(slice)),
    ]
}

#[test]
fn a_full_lb_services_map_holds_back_only_the_services_that_do_not_fit() {
    let mut a = Agent::new(
        "node-1".into(),
        Ipam::in_memory("10.244.0.0/24".parse().unwrap()).unwrap(),
        EndpointStore::in_memory(16),
        ClusterIndex::default(),
        FakeDatapath::new(16).with_lb_capacity(3),
        Box::new(FakeInterfaces([("lxca".to_string(), 10)].into())),
    )
    .translating_services();
    a.set_synced().unwrap();
    let big = myelin_cluster::ServiceInfo::from_k8s(&builders::service(
        "default",
        "big",
        "spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}",
    ))
    .unwrap();
    let big_slice = myelin_cluster::EndpointSliceInfo::from_k8s(&builders::endpoint_slice(
        "default",
        "big-1",
        Some("big"),
        "addressType: IPv4\nendpoints: [{addresses: [10.244.0.20]}, {addresses: [10.244.0.21]}, \
         {addresses: [10.244.0.22]}]\nports: [{name: http, port: 8080}]",
    ))
    .unwrap();
    let mut changes = web_service_changes();
    changes.push(Change::Apply(Object::Service(big)));
    changes.push(Change::Apply(Object::EndpointSlice(big_slice)));
    a.apply_cluster_changes(changes)
        .expect("Services that do not fit are no error");
    // web (two slots) fits, big (four) does not.
    let slots = a.datapath().tables.lb_services.current();
    assert_eq!(slots.len(), 2, "{slots:?}");
    assert!(slots.keys().all(|k| k.addr == [10, 96, 0, 10]));
    assert_eq!(a.metrics_snapshot().frontends_unwritten, 1);
    // Pods still get their network.
    add(&mut a, "a", "lxca", 10).expect("an ADD with a full lb_services");
    assert_eq!(a.metrics_snapshot().frontends_unwritten, 1);
}

#[test]
fn without_kube_proxy_replacement_no_service_is_translated() {
    let mut a = agent();
    a.apply_cluster_changes(web_service_changes()).unwrap();
    assert!(a.desired_state().lb_services.is_empty());
    assert_eq!(a.service_status(), myelin_api::ServiceStatus::default());
    assert!(!a.status().kube_proxy_replacement);
}

#[test]
fn with_kube_proxy_replacement_services_are_translated_and_their_addresses_are_no_pods() {
    let mut a = agent().translating_services();
    a.apply_cluster_changes(web_service_changes()).unwrap();
    let desired = a.desired_state();
    let frontend = myelin_common::lb::LbKey {
        addr: [10, 96, 0, 10],
        port: 80u16.to_be(),
        protocol: myelin_common::proto::IPPROTO_TCP,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    };
    assert_eq!(desired.lb_services[&frontend].count, 1);
    assert_eq!(desired.lb_services.len(), 2);
    let in_ipcache = desired
        .ipcache
        .keys()
        .any(|k| k.data.addr == [10, 96, 0, 10]);
    assert!(!in_ipcache, "a ClusterIP is not a pod: no identity");
    assert!(a.status().kube_proxy_replacement);
    let metrics = a.metrics_snapshot();
    assert_eq!(
        (metrics.services, metrics.frontends_without_backend),
        (1, 0)
    );
    let status = a.service_status();
    assert!(status.kube_proxy_replacement);
    let frontend = &status.services[0].ports[0].frontends[0];
    assert_eq!(
        (
            frontend.address.to_string(),
            frontend.backends[0].to_string()
        ),
        ("10.96.0.10".into(), "10.244.0.9:8080".into()),
        "the API shows what the slots hold"
    );
    // The Service goes: so do its slots.
    a.apply_cluster_changes([Change::Delete {
        kind: myelin_cluster::Kind::Service,
        namespace: "default".into(),
        name: "web".into(),
    }])
    .unwrap();
    assert!(a.desired_state().lb_services.is_empty());
}

/// Service `web` with an external IP: a ClusterIP frontend and one reached from outside.
fn web_with_external_ip_changes() -> Vec<Change> {
    let service = myelin_cluster::ServiceInfo::from_k8s(&builders::service(
        "default",
        "web",
        "spec: {clusterIP: 10.96.0.10, externalIPs: [198.51.100.20], ports: [{name: http, port: 80}]}",
    ))
    .unwrap();
    let slice = myelin_cluster::EndpointSliceInfo::from_k8s(&builders::endpoint_slice(
        "default",
        "web-1",
        Some("web"),
        "addressType: IPv4\nendpoints: [{addresses: [10.244.0.9]}, {addresses: [10.244.0.10]}]\n\
         ports: [{name: http, port: 8080}]",
    ))
    .unwrap();
    vec![
        Change::Apply(Object::Service(service)),
        Change::Apply(Object::EndpointSlice(slice)),
    ]
}

fn frontend_key(addr: [u8; 4]) -> myelin_common::lb::LbKey {
    myelin_common::lb::LbKey {
        addr,
        port: 80u16.to_be(),
        protocol: myelin_common::proto::IPPROTO_TCP,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    }
}

#[test]
fn with_maglev_frontends_reached_from_outside_get_a_table_and_cluster_ips_none() {
    let mut a = agent()
        .translating_services()
        .with_lb_algorithm(LbAlgorithm::Maglev, 251);
    a.apply_cluster_changes(web_with_external_ip_changes())
        .unwrap();
    let desired = a.desired_state();
    let tables: Vec<_> = desired.lb_maglev.keys().copied().collect();
    assert_eq!(tables, [frontend_key([198, 51, 100, 20])]);
    let table = &desired.lb_maglev[&frontend_key([198, 51, 100, 20])];
    assert_eq!(table.entries.len(), 251);
    let written = &a.datapath().tables.lb_maglev.map().entries;
    assert_eq!(written[&frontend_key([198, 51, 100, 20])].size, 251);
    // A state computed for a pod's change hands over the same tables.
    assert!(Arc::ptr_eq(
        &a.desired_state().lb_maglev,
        &desired.lb_maglev
    ));
    let status = a.status();
    assert_eq!(
        (status.lb_algorithm.as_deref(), status.maglev_table_size),
        (Some("maglev"), Some(251))
    );
    // The Service goes: so does its table.
    a.apply_cluster_changes([Change::Delete {
        kind: myelin_cluster::Kind::Service,
        namespace: "default".into(),
        name: "web".into(),
    }])
    .unwrap();
    assert!(a.datapath().tables.lb_maglev.map().entries.is_empty());
}

#[test]
fn with_random_no_table_is_written() {
    let mut a = agent().translating_services();
    a.apply_cluster_changes(web_with_external_ip_changes())
        .unwrap();
    assert!(a.desired_state().lb_maglev.is_empty());
    assert!(a.datapath().tables.lb_maglev.map().entries.is_empty());
    assert_eq!(a.status().lb_algorithm.as_deref(), Some("random"));
}

#[test]
fn a_maglev_table_that_does_not_fit_is_reported_and_its_frontend_stays_random() {
    let mut a = Agent::new(
        "node-1".into(),
        Ipam::in_memory("10.244.0.0/24".parse().unwrap()).unwrap(),
        EndpointStore::in_memory(16),
        ClusterIndex::default(),
        FakeDatapath::new(16).with_maglev_capacity(0),
        Box::new(FakeInterfaces([("lxca".to_string(), 10)].into())),
    )
    .translating_services()
    .with_lb_algorithm(LbAlgorithm::Maglev, 251);
    a.set_synced().unwrap();
    a.apply_cluster_changes(web_with_external_ip_changes())
        .expect("a table that does not fit is no error");
    assert!(a.datapath().tables.lb_maglev.map().entries.is_empty());
    assert_eq!(a.metrics_snapshot().maglev_unwritten, 1);
    assert_eq!(
        a.datapath().tables.lb_services.current()[&frontend_key([198, 51, 100, 20])].count,
        2,
        "the frontend itself is translated"
    );
    add(&mut a, "a", "lxca", 10).expect("an ADD with a full lb_maglev");
}
