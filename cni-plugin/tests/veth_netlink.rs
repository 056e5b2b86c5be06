//! Root tests of the netlink layer: the veth pair is created, configured and deleted exactly as
//! specified, with the host side in a "node" namespace and the pod side in a "pod" namespace.

mod common;

use std::net::Ipv4Addr;

use common::{TestNetns, root_tests_enabled};
use myelin_cni::{
    netlink::Netlink,
    veth::{self, PodAddressing, VethError, VethPair},
};

const HOST: &str = "lxctest0000001";
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 9);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 1);

/// Creates and configures a pair from inside `node`, as the plugin does from the node.
fn attach(node: &TestNetns, pod: &TestNetns, host_name: &str, mtu: u32) -> VethPair {
    let pod_ns = pod.open();
    node.open()
        .run(|| -> Result<VethPair, VethError> {
            let nl = Netlink::open()?;
            let pair = veth::create_pair(&nl, host_name, &pod_ns, "eth0", mtu)?;
            let addressing = PodAddressing {
                ip: POD_IP,
                gateway: GATEWAY,
            };
            veth::configure_pod_side(&pod_ns, &pair.pod, addressing, pair.host.mac)?;
            veth::configure_host_side(&nl, &pair.host, POD_IP, pair.pod.mac)?;
            Ok(pair)
        })
        .expect("entering the node namespace")
        .expect("attaching the veth pair")
}

#[test]
fn pair_is_created_and_configured_exactly_as_specified() {
    if !root_tests_enabled("pair_is_created_and_configured_exactly_as_specified") {
        return;
    }
    let node = TestNetns::new("node");
    let pod = TestNetns::new("pod");
    let pair = attach(&node, &pod, HOST, 1400);

    // Interfaces: one per namespace, the right names, MACs, MTU, up.
    assert_eq!(node.link_names(), [HOST.to_string()].into());
    assert_eq!(pod.link_names(), ["eth0".to_string()].into());
    let host_link = node.link(HOST).expect("host veth");
    let pod_link = pod.link("eth0").expect("pod veth");
    assert_eq!(host_link["mtu"], 1400);
    assert_eq!(pod_link["mtu"], 1400);
    assert_eq!(host_link["address"], pair.host.mac.to_string());
    assert_eq!(pod_link["address"], pair.pod.mac.to_string());
    assert_eq!(host_link["ifindex"], pair.host.index);
    assert_eq!(pod_link["ifindex"], pair.pod.index);
    for link in [&host_link, &pod_link] {
        let flags = link["flags"].as_array().expect("flags");
        // Administratively up, with the peer's carrier (operstate follows asynchronously).
        assert!(flags.iter().any(|f| f == "UP"), "{link}");
        assert!(flags.iter().any(|f| f == "LOWER_UP"), "{link}");
    }

    // Pod side: only its /32, a link route to the gateway, the default route, the neighbour.
    assert_eq!(pod.ipv4_addresses("eth0"), vec![(POD_IP.to_string(), 32)]);
    assert_eq!(
        pod.ipv4_routes(),
        vec![
            format!("{GATEWAY}||eth0|link"),
            format!("default|{GATEWAY}|eth0|"),
        ]
    );
    let pod_neighbours = pod.ipv4_neighbours("eth0");
    let (lladdr, states) = pod_neighbours
        .get(&GATEWAY.to_string())
        .expect("gateway neighbour");
    assert_eq!(lladdr, &pair.host.mac.to_string());
    assert_eq!(states, &vec!["PERMANENT".to_string()]);

    // Host side: no address, a link route to the pod, the pod's neighbour entry.
    assert!(node.ipv4_addresses(HOST).is_empty());
    assert_eq!(node.ipv4_routes(), vec![format!("{POD_IP}||{HOST}|link")]);
    let host_neighbours = node.ipv4_neighbours(HOST);
    let (lladdr, states) = host_neighbours
        .get(&POD_IP.to_string())
        .expect("pod neighbour");
    assert_eq!(lladdr, &pair.pod.mac.to_string());
    assert_eq!(states, &vec!["PERMANENT".to_string()]);
}

#[test]
fn deleting_the_host_side_removes_both_ends() {
    if !root_tests_enabled("deleting_the_host_side_removes_both_ends") {
        return;
    }
    let node = TestNetns::new("node");
    let pod = TestNetns::new("pod");
    attach(&node, &pod, HOST, 1500);
    let (first, second) = node
        .open()
        .run(|| {
            let nl = Netlink::open().expect("netlink");
            (
                veth::delete_host_side(&nl, HOST).expect("first delete"),
                veth::delete_host_side(&nl, HOST).expect("second delete"),
            )
        })
        .expect("entering the node namespace");
    assert!(first, "the first delete removes the veth");
    assert!(!second, "the second delete finds nothing and succeeds");
    assert!(node.link_names().is_empty(), "{:?}", node.link_names());
    assert!(pod.link_names().is_empty(), "{:?}", pod.link_names());
    assert!(node.ipv4_routes().is_empty(), "{:?}", node.ipv4_routes());
}

#[test]
fn taken_names_are_reported_and_the_existing_pair_is_left_alone() {
    if !root_tests_enabled("taken_names_are_reported_and_the_existing_pair_is_left_alone") {
        return;
    }
    let node = TestNetns::new("node");
    let pod = TestNetns::new("pod");
    let other_pod = TestNetns::new("pod2");
    let pair = attach(&node, &pod, HOST, 1500);

    let (host_taken, ifname_taken) = {
        let pod_ns = pod.open();
        let other_pod_ns = other_pod.open();
        node.open()
            .run(|| {
                let nl = Netlink::open().expect("netlink");
                (
                    veth::create_pair(&nl, HOST, &other_pod_ns, "eth0", 1500),
                    veth::create_pair(&nl, "lxctest0000002", &pod_ns, "eth0", 1500),
                )
            })
            .expect("entering the node namespace")
    };
    match host_taken {
        Err(VethError::AlreadyExists { name, place }) => {
            assert_eq!(name, HOST);
            assert_eq!(place, "on the node");
        }
        other => panic!("expected the host name to be taken: {other:?}"),
    }
    match ifname_taken {
        Err(VethError::AlreadyExists { name, place }) => {
            assert_eq!(name, "eth0");
            assert!(place.contains(&pod.name), "{place}");
        }
        other => panic!("expected eth0 to be taken in the pod: {other:?}"),
    }
    // Nothing new anywhere, and the first pair untouched.
    assert_eq!(node.link_names(), [HOST.to_string()].into());
    assert!(other_pod.link_names().is_empty());
    assert_eq!(
        pod.link("eth0").expect("pod veth")["address"],
        pair.pod.mac.to_string()
    );
    assert_eq!(pod.ipv4_addresses("eth0"), vec![(POD_IP.to_string(), 32)]);
}

#[test]
fn default_route_mtu_is_read_from_the_default_route_device() {
    if !root_tests_enabled("default_route_mtu_is_read_from_the_default_route_device") {
        return;
    }
    let node = TestNetns::new("node");
    let read_mtu = || {
        node.open()
            .run(|| Netlink::open().and_then(|nl| nl.default_route_mtu()))
            .expect("entering the node namespace")
            .expect("reading the default route")
    };
    assert_eq!(read_mtu(), None, "no default route yet");

    // A veth stands in for the uplink: the test kernel has no dummy driver.
    node.ip(&[
        "link", "add", "uplink0", "mtu", "1420", "type", "veth", "peer", "name", "uplink0p",
    ]);
    node.ip(&["link", "set", "uplink0", "up"]);
    node.ip(&["link", "set", "uplink0p", "up"]);
    node.ip(&["addr", "add", "192.0.2.10/24", "dev", "uplink0"]);
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.0.2.1",
        "dev",
        "uplink0",
    ]);
    assert_eq!(read_mtu(), Some(1420));
}

#[test]
fn inspecting_the_pod_side_sees_link_addresses_and_routes() {
    if !root_tests_enabled("inspecting_the_pod_side_sees_link_addresses_and_routes") {
        return;
    }
    let node = TestNetns::new("node");
    let pod = TestNetns::new("pod");
    let pair = attach(&node, &pod, HOST, 1500);
    let pod_ns = pod.open();
    let seen = veth::inspect_pod_side(&pod_ns, "eth0")
        .expect("inspecting")
        .expect("eth0 exists");
    assert_eq!(seen.link.mac, Some(pair.pod.mac));
    assert_eq!(seen.link.mtu, 1500);
    assert!(seen.link.up);
    assert_eq!(seen.addresses, vec![ipnet::Ipv4Net::from(POD_IP)]);
    assert!(
        seen.routes
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.gateway == Some(GATEWAY)),
        "{:?}",
        seen.routes
    );
    assert!(
        veth::inspect_pod_side(&pod_ns, "eth9")
            .expect("inspecting")
            .is_none()
    );
}
