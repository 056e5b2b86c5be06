//! Datapath tier: the real programs, loaded into the kernel with their maps, run on crafted
//! packets with `BPF_PROG_TEST_RUN`, and their verdicts, rewritten packets, counters and events
//! are checked. This is how cases that real traffic cannot produce here are covered (SCTP: the
//! kernel has no SCTP support; forged ICMP errors; a pod reusing an ICMP id).
//!
//! The tc tests attach the programs for real, in the default mode (clsact), next to other
//! programs' filters. The masquerading tests at the end run `to_uplink` and `from_uplink` on
//! what a pod sends to the world and what comes back, and check every checksum by recomputing
//! it.
//!
//! Needs root. Each test runs on a thread with a network namespace of its own (`unshare`), so
//! nothing touches the machine's namespace and nothing outlives the test; the maps live in a
//! private bpffs mounted in a temporary directory. `MYELIN_SKIP_ROOT_TESTS=1` skips them on
//! machines without root (CI never sets it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
};

use aya::programs::{SchedClassifier, TcAttachType};
use myelin_agent::{
    bpffs,
    datapath::{
        AttachMode, Datapath, DatapathError, DatapathOps, Features, Limits, Program, Routing,
        clsact::{self, ClsactError, Filter},
        conntrack::{ConntrackTable, Expiring as _},
        kernel_has_tcx,
        lb::{LbAffinityTable, LbFlowTable, StaleUdpFlows},
        nat::{Masquerade, NatPorts, NatTable},
    },
    desired::{DesiredState, LpmKey, port_blocks},
};
use myelin_common::{
    Direction, DropReason, EndpointInfo, IpcacheEntry, Ipv4Key, PolicyEntry, PolicyKey,
    config::{
        CONFIG_F_MASQUERADE, CONFIG_F_NATIVE, CONFIG_F_SERVICES, CONFIG_F_TUNNEL, EVENTS_DROPS,
        EVENTS_VERDICTS, MARK_ROUTED_TO_NODE,
    },
    conntrack::CT_F_CLOSING,
    endpoint::{
        ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, ENDPOINT_F_POLICY_INCOMPLETE,
    },
    event::{EVENT_ALLOWED, EVENT_DROP, FlowEvent, ObservationPoint},
    identity,
    lb::{
        LB_F_EXTERNAL_IP, LB_F_LOCAL, LB_F_NODEPORT, LB_IN, LB_OUT, LbEntry, LbFlow, LbFlowKey,
        LbKey,
    },
    nat::{MASQ_EXCLUDE_CONFIGURED, MASQ_EXCLUDE_NODE, MASQ_EXCLUDE_POD_CIDR, MasqExclude, NAT_IN},
    policy::{POLICY_F_ALLOW, PREFIX_ANY_PROTOCOL, PREFIX_FULL},
    proto::{IPPROTO_ICMP as ICMP, IPPROTO_SCTP as SCTP, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP},
};
use myelin_tests::packet::{checksum, frame};
use nix::{
    mount::{MntFlags, umount2},
    sched::{CloneFlags, unshare},
};

// TC verdicts (linux/pkt_cls.h) as `BPF_PROG_TEST_RUN` returns them; the programs themselves
// use aya_ebpf::bindings, and nothing else on this side needs them.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn root_tests_enabled() -> bool {
    if std::env::var_os("MYELIN_SKIP_ROOT_TESTS").is_some_and(|v| v == "1") {
        eprintln!("MYELIN_SKIP_ROOT_TESTS=1: skipping a datapath test that needs root");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "datapath tests load BPF programs and need root (set MYELIN_SKIP_ROOT_TESTS=1 to skip)"
    );
    true
}

/// A private bpffs in a temporary directory, unmounted on drop.
struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        bpffs::ensure_mounted(dir.path()).expect("mount bpffs");
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

#[derive(Clone, Copy)]
struct Pod {
    ip: Ipv4Addr,
    mac: [u8; 6],
    host_mac: [u8; 6],
    ifindex: u32,
    id: u32,
    identity: u32,
}

impl Pod {
    fn info(&self, flags: u32) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            id: self.id,
            identity: self.identity,
            flags,
            ip: self.ip.octets(),
            mac: self.mac,
            host_mac: self.host_mac,
        }
    }
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// Two pods on "host veths" of a throwaway namespace, and the loaded datapath.
struct Fixture {
    dp: Datapath,
    a: Pod,
    b: Pod,
    flags: BTreeMap<u32, u32>,
    policy: BTreeMap<LpmKey<PolicyKey>, PolicyEntry>,
    /// Addresses on other nodes (ipcache entries besides the pods' and the gateway's).
    remote: BTreeMap<LpmKey<Ipv4Key>, IpcacheEntry>,
    masq_exclude: BTreeMap<LpmKey<Ipv4Key>, MasqExclude>,
    lb_services: BTreeMap<LbKey, LbEntry>,
    lb_maglev: myelin_agent::desired::services::maglev::Tables,
    bpffs: PrivateBpffs,
}

/// Runs `body` on a thread inside a fresh network namespace, with the datapath loaded.
fn with_datapath(body: impl FnOnce(&mut Fixture) + Send + 'static) {
    if !root_tests_enabled() {
        return;
    }
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        for (host, peer) in [("lxca", "eth-a"), ("lxcb", "eth-b")] {
            let status = Command::new("ip")
                .args(["link", "add", host, "type", "veth", "peer", "name", peer])
                .status()
                .expect("ip link add");
            assert!(status.success());
        }
        let index = |name: &str| nix::net::if_::if_nametoindex(name).expect("ifindex");
        let bpffs = PrivateBpffs::new();
        let dp = Datapath::load(
            &bpffs.path(),
            AttachMode::Tc,
            Limits::default(),
            Features::default(),
        )
        .expect("load");
        let pod = |n: u8, ifname: &str, identity: u32| Pod {
            ip: Ipv4Addr::new(10, 0, 0, n),
            mac: [2, 0, 0, 0, 0, n],
            host_mac: [2, 0, 0, 0, 1, n],
            ifindex: index(ifname),
            id: u32::from(n),
            identity,
        };
        let mut f = Fixture {
            dp,
            a: pod(2, "lxca", 300),
            b: pod(3, "lxcb", 301),
            flags: BTreeMap::new(),
            policy: BTreeMap::new(),
            remote: BTreeMap::new(),
            masq_exclude: BTreeMap::new(),
            lb_services: BTreeMap::new(),
            lb_maglev: BTreeMap::new(),
            bpffs,
        };
        f.sync();
        body(&mut f);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

impl Fixture {
    fn sync(&mut self) {
        let mut desired = DesiredState::default();
        for p in [self.a, self.b] {
            let info = p.info(self.flags.get(&p.id).copied().unwrap_or(0));
            desired.endpoints.insert(
                Ipv4Key {
                    addr: p.ip.octets(),
                },
                info,
            );
            desired.endpoints_by_if.insert(p.ifindex, info);
            desired.counter_ids.insert(p.id);
            desired.ipcache.insert(
                LpmKey {
                    prefix_len: 32,
                    data: Ipv4Key {
                        addr: p.ip.octets(),
                    },
                },
                IpcacheEntry {
                    identity: p.identity,
                    cidr_identity: p.identity,
                    ..IpcacheEntry::WORLD
                },
            );
        }
        desired.ipcache.insert(
            LpmKey {
                prefix_len: 32,
                data: Ipv4Key {
                    addr: GATEWAY.octets(),
                },
            },
            IpcacheEntry {
                identity: identity::HOST,
                cidr_identity: identity::HOST,
                ..IpcacheEntry::WORLD
            },
        );
        desired.ipcache.extend(self.remote.clone());
        desired.policy = self.policy.clone();
        desired.masq_exclude = self.masq_exclude.clone();
        desired.lb_services = self.lb_services.clone().into();
        desired.lb_maglev = self.lb_maglev.clone().into();
        self.dp.apply(&desired).expect("apply");
    }

    fn isolate(&mut self, pod: Pod, flags: u32) {
        *self.flags.entry(pod.id).or_default() |= flags;
        self.sync();
    }

    /// Allows `pod` to talk with `peer` (an identity) on `protocol`/`port` in `direction`;
    /// port 0 with protocol 0 means everything.
    fn allow(&mut self, pod: Pod, direction: Direction, peer: u32, protocol: u8, port: u16) {
        let prefix_len = if protocol == 0 {
            PREFIX_ANY_PROTOCOL
        } else {
            PREFIX_FULL
        };
        self.policy.insert(
            LpmKey {
                prefix_len,
                data: PolicyKey {
                    endpoint_id: pod.id,
                    identity: peer,
                    direction: direction as u8,
                    protocol,
                    dport: port.to_be_bytes(),
                },
            },
            PolicyEntry {
                flags: POLICY_F_ALLOW,
                rule: 0,
            },
        );
        self.sync();
    }

    fn send(&mut self, from: Pod, packet: &[u8]) -> (i32, Vec<u8>) {
        self.dp
            .test_run(Program::FromContainer, packet, from.ifindex)
            .expect("test run")
    }

    /// `prefix` is behind the node at `node`, with `identity`.
    fn behind(&mut self, prefix: &str, node: Ipv4Addr, identity: u32) {
        let net: ipnet::Ipv4Net = prefix.parse().expect("prefix");
        self.remote.insert(
            LpmKey {
                prefix_len: u32::from(net.prefix_len()),
                data: Ipv4Key {
                    addr: net.network().octets(),
                },
            },
            IpcacheEntry {
                identity,
                cidr_identity: identity,
                node: node.octets(),
                _pad: 0,
            },
        );
        self.sync();
    }

    /// Runs `program` as if the packet arrived on (or left by) interface `ifindex`.
    fn run(&mut self, program: Program, packet: &[u8], ifindex: u32) -> (i32, Vec<u8>) {
        self.dp
            .test_run(program, packet, ifindex)
            .expect("test run")
    }

    fn deliver(&mut self, to: Pod, packet: &[u8]) -> i32 {
        self.dp
            .test_run(Program::ToContainer, packet, to.ifindex)
            .expect("test run")
            .0
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.dp
            .drops()
            .into_iter()
            .find(|(r, _, _)| *r == reason)
            .map_or(0, |(_, p, _)| p)
    }
}

// ---- packet crafting -------------------------------------------------------------------

/// Turns a frame into a fragment: IP id, more-fragments flag, offset in 8-byte units.
fn set_fragment(p: &mut [u8], id: u16, more: bool, offset: u16) {
    p[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    let flags = offset | if more { 0x2000 } else { 0 };
    p[14 + 6..14 + 8].copy_from_slice(&flags.to_be_bytes());
    p[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&p[14..34]);
    p[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
}

fn ports(sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut l4 = vec![0u8; len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4
}

fn tcp(from: Pod, to: Pod, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = ports(sport, dport, 20);
    l4[12] = 0x50;
    l4[13] = flags;
    frame(from.mac, from.host_mac, from.ip, to.ip, TCP, &l4)
}

fn udp(from: Pod, to: Pod, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = ports(sport, dport, 12);
    l4[4..6].copy_from_slice(&12u16.to_be_bytes());
    frame(from.mac, from.host_mac, from.ip, to.ip, UDP, &l4)
}

fn sctp(from: Pod, to: Pod, sport: u16, dport: u16) -> Vec<u8> {
    frame(
        from.mac,
        from.host_mac,
        from.ip,
        to.ip,
        SCTP,
        &ports(sport, dport, 16),
    )
}

fn icmp_echo(from: Pod, to: Pod, icmp_type: u8, id: u16) -> Vec<u8> {
    let mut l4 = vec![icmp_type, 0, 0, 0, 0, 0, 0, 1];
    l4[4..6].copy_from_slice(&id.to_be_bytes());
    frame(from.mac, from.host_mac, from.ip, to.ip, ICMP, &l4)
}

/// An ICMP "port unreachable" from `from` to `to` quoting `quoted` (a frame; its IP header and
/// first 8 bytes of payload are quoted).
fn icmp_unreachable(from: Pod, to: Pod, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&quoted[14..14 + 28]);
    frame(from.mac, from.host_mac, from.ip, to.ip, ICMP, &l4)
}

// ---- tests -----------------------------------------------------------------------------

/// A pod on another node, as the ipcache knows it.
fn remote_pod(n: u8, identity: u32) -> Pod {
    Pod {
        ip: Ipv4Addr::new(10, 9, 0, n),
        mac: [2, 0, 0, 0, 9, n],
        host_mac: [2, 0, 0, 0, 8, n],
        ifindex: 0,
        id: 0,
        identity,
    }
}

const REMOTE_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 2);

/// A VXLAN device in collect-metadata mode in the test's namespace, as the agent makes it.
fn tunnel_device() -> u32 {
    let status = Command::new("ip")
        .args([
            "link", "add", "tun0", "type", "vxlan", "external", "dstport", "8472",
        ])
        .status()
        .expect("ip link add vxlan");
    assert!(status.success());
    nix::net::if_::if_nametoindex("tun0").expect("ifindex")
}

#[test]
fn a_pod_on_another_node_is_sent_into_the_tunnel_and_without_routing_to_the_stack() {
    with_datapath(|f| {
        let a = f.a;
        let far = remote_pod(7, 400);
        f.behind("10.9.0.0/24", REMOTE_NODE_IP, identity::WORLD);
        f.behind("10.9.0.7/32", REMOTE_NODE_IP, far.identity);
        let packet = tcp(a, far, 40000, 80, SYN);

        // One node (no routing configured): the stack decides, the packet is left as it is.
        let (verdict, out) = f.send(a, &packet);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, packet);

        let tunnel = tunnel_device();
        f.dp.set_routing(Routing {
            flags: CONFIG_F_TUNNEL,
            node_ip: Ipv4Addr::new(192, 168, 7, 1),
            tunnel_ifindex: tunnel,
            uplink_ifindex: 0,
            uplink_subnet: None,
        })
        .unwrap();
        let (verdict, out) = f.send(a, &tcp(a, far, 40001, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel device");
        assert_eq!(out[14 + 8], 63, "TTL decremented: the node routed it");
        assert_eq!(checksum(&out[14..34]), 0, "IP checksum still valid");
        // Egress policy applies to the remote pod's identity, before the tunnel.
        f.isolate(a, ENDPOINT_F_EGRESS_ISOLATED);
        let (verdict, _) = f.send(a, &tcp(a, far, 40002, 80, SYN));
        assert_eq!(verdict, TC_ACT_SHOT);
        f.allow(a, Direction::Egress, far.identity, TCP, 80);
        let (verdict, _) = f.send(a, &tcp(a, far, 40003, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT);
    });
}

/// A new connection's event says where it goes: to a pod of this node (`from-pod`, its
/// sender's veth), into the tunnel or out of the uplink to a pod on another node, or to the
/// node's stack; a drop says where it happened.
#[test]
fn a_new_connections_event_says_where_it_goes() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let far = remote_pod(7, 400);
        f.behind("10.9.0.0/24", REMOTE_NODE_IP, identity::WORLD);
        f.behind("10.9.0.7/32", REMOTE_NODE_IP, far.identity);
        let tunnel = tunnel_device();
        f.dp.set_routing(Routing {
            flags: CONFIG_F_TUNNEL,
            node_ip: Ipv4Addr::new(192, 168, 7, 1),
            tunnel_ifindex: tunnel,
            uplink_ifindex: 0,
            uplink_subnet: None,
        })
        .unwrap();
        let mut ring = f.dp.take_events().expect("ring buffer");
        f.dp.set_event_mask(EVENTS_DROPS | EVENTS_VERDICTS).unwrap();
        let mut point = || {
            let item = ring.next().expect("an event");
            // SAFETY: the ring holds FlowEvent records written by the datapath.
            let e = unsafe { std::ptr::read_unaligned::<FlowEvent>(item.as_ptr().cast()) };
            (e.kind, ObservationPoint::from_u8(e.point))
        };
        f.send(a, &tcp(a, b, 40000, 80, SYN));
        assert_eq!(point(), (EVENT_ALLOWED, Some(ObservationPoint::FromPod)));
        f.send(a, &tcp(a, far, 40001, 80, SYN));
        assert_eq!(point(), (EVENT_ALLOWED, Some(ObservationPoint::ToTunnel)));
        f.send(a, &tcp(a, outside(WORLD), 40002, 80, SYN));
        assert_eq!(point(), (EVENT_ALLOWED, Some(ObservationPoint::ToStack)));
        f.isolate(a, ENDPOINT_F_EGRESS_ISOLATED);
        f.send(a, &tcp(a, far, 40003, 80, SYN));
        assert_eq!(point(), (EVENT_DROP, Some(ObservationPoint::FromPod)));
    });
}

#[test]
fn the_tunnel_takes_nothing_that_has_no_tunnel_key_or_no_node() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let tunnel = tunnel_device();
        let before = f.drops(DropReason::TunnelPeerUnknown);
        // BPF_PROG_TEST_RUN packets carry no tunnel metadata: as if forged onto the device.
        let (verdict, _) = f.run(Program::FromTunnel, &tcp(a, b, 40000, 80, SYN), tunnel);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::TunnelPeerUnknown), before + 1);

        // What the stack routes into the tunnel needs a node to go to.
        let nowhere = remote_pod(8, 400);
        let before = f.drops(DropReason::TunnelNoNode);
        let (verdict, _) = f.run(Program::ToTunnel, &tcp(a, nowhere, 40000, 80, SYN), tunnel);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::TunnelNoNode), before + 1);
        f.behind("10.9.0.0/24", REMOTE_NODE_IP, identity::WORLD);
        let (verdict, _) = f.run(Program::ToTunnel, &tcp(a, nowhere, 40000, 80, SYN), tunnel);
        assert_eq!(
            verdict, TC_ACT_OK,
            "keyed for the node and passed to the driver"
        );
        // Not IPv4 (the device's own neighbour discovery): left to the driver.
        let mut ipv6 = tcp(a, nowhere, 40000, 80, SYN);
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        let (verdict, _) = f.run(Program::ToTunnel, &ipv6, tunnel);
        assert_eq!(verdict, TC_ACT_OK);
    });
}

#[test]
fn same_node_traffic_is_redirected_into_the_peer_with_rewritten_headers() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let (verdict, out) = f.send(a, &tcp(a, b, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[0..6], &b.mac, "destination MAC is the peer pod's");
        assert_eq!(&out[6..12], &b.host_mac, "source MAC is the peer's gateway");
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        assert_eq!(checksum(&out[14..34]), 0, "IP checksum still valid");
        let ca = f.dp.endpoint_counters(a.id);
        let cb = f.dp.endpoint_counters(b.id);
        assert_eq!((ca.tx_packets, cb.rx_packets), (1, 1));
    });
}

#[test]
fn traffic_to_other_destinations_goes_to_the_stack() {
    with_datapath(|f| {
        let a = f.a;
        let outside = Pod {
            ip: Ipv4Addr::new(192, 168, 7, 7),
            ..f.b
        };
        let (verdict, _) = f.send(a, &udp(a, outside, 5000, 53));
        assert_eq!(verdict, TC_ACT_OK);
    });
}

#[test]
fn a_pod_forging_its_source_address_or_mac_is_dropped() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let forged_ip = Pod {
            ip: Ipv4Addr::new(10, 0, 0, 99),
            ..a
        };
        assert_eq!(f.send(a, &tcp(forged_ip, b, 1, 80, SYN)).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::SpoofedSourceIp), 1);
        let forged_mac = Pod {
            mac: [2, 9, 9, 9, 9, 9],
            ..a
        };
        assert_eq!(f.send(a, &tcp(forged_mac, b, 1, 80, SYN)).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::SpoofedSourceMac), 1);
        // b's own address sent from a's interface is spoofing too.
        let as_b = Pod {
            mac: a.mac,
            host_mac: a.host_mac,
            ..b
        };
        assert_eq!(f.send(a, &tcp(as_b, a, 1, 80, SYN)).0, TC_ACT_SHOT);
    });
}

#[test]
fn truncated_headers_are_dropped_as_malformed() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let mut p = tcp(a, b, 1, 80, SYN);
        p.truncate(14 + 20 + 2);
        assert_eq!(f.send(a, &p).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::Malformed), 1);
    });
}

#[test]
fn sctp_is_allowed_only_on_the_allowed_port_and_never_by_a_tcp_rule() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        f.allow(b, Direction::Ingress, a.identity, SCTP, 80);
        f.allow(b, Direction::Ingress, a.identity, TCP, 81);
        assert_eq!(f.send(a, &sctp(a, b, 5000, 80)).0, TC_ACT_REDIRECT);
        assert_eq!(
            f.send(a, &sctp(a, b, 5001, 81)).0,
            TC_ACT_SHOT,
            "SCTP 81: only TCP 81 allowed"
        );
        assert_eq!(
            f.send(a, &tcp(a, b, 5002, 80, SYN)).0,
            TC_ACT_SHOT,
            "TCP 80: only SCTP 80 allowed"
        );
        assert_eq!(f.send(a, &tcp(a, b, 5003, 81, SYN)).0, TC_ACT_REDIRECT);
        assert_eq!(f.drops(DropReason::PolicyDeniedIngress), 2);
    });
}

#[test]
fn sctp_port_ranges_match_by_prefix() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        for (base, bits) in port_blocks(3000, 3999) {
            f.policy.insert(
                LpmKey {
                    prefix_len: 80 + bits,
                    data: PolicyKey {
                        endpoint_id: b.id,
                        identity: a.identity,
                        direction: Direction::Ingress as u8,
                        protocol: SCTP,
                        dport: base.to_be_bytes(),
                    },
                },
                PolicyEntry {
                    flags: POLICY_F_ALLOW,
                    rule: 0,
                },
            );
        }
        f.sync();
        for (port, expected) in [
            (2999, TC_ACT_SHOT),
            (3000, TC_ACT_REDIRECT),
            (3500, TC_ACT_REDIRECT),
            (3999, TC_ACT_REDIRECT),
            (4000, TC_ACT_SHOT),
        ] {
            assert_eq!(
                f.send(a, &sctp(a, b, 7000, port)).0,
                expected,
                "port {port}"
            );
        }
    });
}

#[test]
fn replies_to_allowed_connections_pass_through_conntrack() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        // b may start nothing, a may start anything.
        f.isolate(b, ENDPOINT_F_EGRESS_ISOLATED);
        assert_eq!(
            f.send(b, &tcp(b, a, 80, 40000, SYN)).0,
            TC_ACT_SHOT,
            "b cannot open"
        );
        assert_eq!(f.send(a, &tcp(a, b, 40000, 80, SYN)).0, TC_ACT_REDIRECT);
        assert_eq!(
            f.send(b, &tcp(b, a, 80, 40000, SYN | ACK)).0,
            TC_ACT_REDIRECT,
            "the reply passes"
        );
        assert_eq!(
            f.send(b, &tcp(b, a, 80, 40001, SYN | ACK)).0,
            TC_ACT_SHOT,
            "not a reply to anything"
        );
    });
}

#[test]
fn an_icmp_echo_request_is_never_taken_for_a_reply() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(a, ENDPOINT_F_INGRESS_ISOLATED);
        // a pings b with id 7: tracked.
        assert_eq!(f.send(a, &icmp_echo(a, b, 8, 7)).0, TC_ACT_REDIRECT);
        // b's echo reply with that id is a reply.
        assert_eq!(f.send(b, &icmp_echo(b, a, 0, 7)).0, TC_ACT_REDIRECT);
        // b's echo *request* with the same id is a new flow into isolated a.
        assert_eq!(f.send(b, &icmp_echo(b, a, 8, 7)).0, TC_ACT_SHOT);
        // A reply nobody asked for is new too.
        assert_eq!(f.send(b, &icmp_echo(b, a, 0, 8)).0, TC_ACT_SHOT);
    });
}

#[test]
fn icmp_errors_about_an_allowed_flow_pass_and_others_do_not() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(a, ENDPOINT_F_INGRESS_ISOLATED);
        let query = udp(a, b, 5353, 9999);
        assert_eq!(f.send(a, &query).0, TC_ACT_REDIRECT);
        assert_eq!(
            f.send(b, &icmp_unreachable(b, a, &query)).0,
            TC_ACT_REDIRECT,
            "related"
        );
        let untracked = udp(a, b, 5354, 9999);
        assert_eq!(
            f.send(b, &icmp_unreachable(b, a, &untracked)).0,
            TC_ACT_SHOT
        );
    });
}

#[test]
fn a_policy_change_cuts_established_flows_it_no_longer_allows() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        f.allow(b, Direction::Ingress, a.identity, UDP, 53);
        assert_eq!(f.send(a, &udp(a, b, 1000, 53)).0, TC_ACT_REDIRECT);
        assert_eq!(
            f.send(a, &udp(a, b, 1000, 53)).0,
            TC_ACT_REDIRECT,
            "established"
        );
        f.policy.clear();
        f.sync();
        assert_eq!(
            f.send(a, &udp(a, b, 1000, 53)).0,
            TC_ACT_SHOT,
            "re-checked and cut"
        );
        assert_eq!(f.drops(DropReason::PolicyDeniedIngress), 1);
    });
}

/// Found by the benchmark: when a cut flow's entry was simply forgotten, the server's next
/// packet (a retransmission) opened the flow again in the other direction, and the client's
/// packets then passed as its replies.
#[test]
fn a_cut_flow_stays_cut_in_both_directions_until_policy_allows_it_again() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        f.allow(b, Direction::Ingress, a.identity, TCP, 7100);
        assert_eq!(f.send(a, &tcp(a, b, 40000, 7100, SYN)).0, TC_ACT_REDIRECT);
        assert_eq!(
            f.send(b, &tcp(b, a, 7100, 40000, SYN | ACK)).0,
            TC_ACT_REDIRECT
        );
        f.policy.clear();
        f.sync();
        // The server speaks first after the change: its packet is the flow's, and cut.
        assert_eq!(f.send(b, &tcp(b, a, 7100, 40000, ACK)).0, TC_ACT_SHOT);
        assert_eq!(f.send(a, &tcp(a, b, 40000, 7100, ACK)).0, TC_ACT_SHOT);
        assert_eq!(f.send(b, &tcp(b, a, 7100, 40000, ACK)).0, TC_ACT_SHOT);
        let flows = ConntrackTable::open(&ConntrackTable::pin_path(f.dp.pin_dir()))
            .unwrap()
            .flows(usize::MAX)
            .unwrap();
        assert_eq!(flows.len(), 1, "no flow opened the other way: {flows:?}");
        assert_eq!(
            flows[0].src,
            format!("{}:40000", a.ip),
            "the entry is still the client's"
        );
        // Allowed again: the same connection goes on.
        f.allow(b, Direction::Ingress, a.identity, TCP, 7100);
        assert_eq!(f.send(a, &tcp(a, b, 40000, 7100, ACK)).0, TC_ACT_REDIRECT);
        assert_eq!(f.send(b, &tcp(b, a, 7100, 40000, ACK)).0, TC_ACT_REDIRECT);
    });
}

#[test]
fn later_fragments_of_an_allowed_datagram_pass_and_stray_ones_do_not() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        f.allow(b, Direction::Ingress, a.identity, UDP, 53);
        let mut first = udp(a, b, 5000, 53);
        set_fragment(&mut first, 77, true, 0);
        assert_eq!(f.send(a, &first).0, TC_ACT_REDIRECT);
        // A later fragment has no UDP header: the ports come from the first one.
        let mut later = frame(a.mac, a.host_mac, a.ip, b.ip, UDP, &[0xab; 16]);
        set_fragment(&mut later, 77, false, 185);
        assert_eq!(f.send(a, &later).0, TC_ACT_REDIRECT);
        let mut stray = later.clone();
        set_fragment(&mut stray, 78, false, 185);
        assert_eq!(
            f.send(a, &stray).0,
            TC_ACT_SHOT,
            "no first fragment: portless, denied"
        );
    });
}

#[test]
fn the_node_and_its_pods_reach_each_other_and_other_peers_need_a_rule() {
    with_datapath(|f| {
        let b = f.b;
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED | ENDPOINT_F_EGRESS_ISOLATED);
        let node = Pod { ip: GATEWAY, ..f.a };
        assert_eq!(
            f.deliver(b, &tcp(node, b, 50000, 8080, SYN)),
            TC_ACT_OK,
            "kubelet probe"
        );
        assert_eq!(
            f.send(b, &tcp(b, node, 40000, 53, SYN)).0,
            TC_ACT_OK,
            "a node-local service"
        );
        let outside = Pod {
            ip: Ipv4Addr::new(198, 51, 100, 7),
            ..f.a
        };
        assert_eq!(f.send(b, &tcp(b, outside, 40001, 53, SYN)).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::PolicyDeniedEgress), 1);
        let world = Pod {
            ip: Ipv4Addr::new(203, 0, 113, 5),
            ..f.a
        };
        assert_eq!(f.deliver(b, &tcp(world, b, 50000, 8080, SYN)), TC_ACT_SHOT);
        f.allow(b, Direction::Ingress, identity::WORLD, TCP, 8080);
        assert_eq!(f.deliver(b, &tcp(world, b, 50001, 8080, SYN)), TC_ACT_OK);
    });
}

#[test]
fn a_pod_whose_policy_did_not_fit_drops_new_connections() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.isolate(
            b,
            ENDPOINT_F_INGRESS_ISOLATED | ENDPOINT_F_POLICY_INCOMPLETE,
        );
        f.allow(b, Direction::Ingress, identity::ANY, 0, 0);
        assert_eq!(f.send(a, &tcp(a, b, 1, 80, SYN)).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::PolicyIncomplete), 1);
    });
}

#[test]
fn packets_on_an_interface_without_endpoint_are_dropped() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let stray = nix::net::if_::if_nametoindex("eth-a").expect("ifindex");
        let verdict =
            f.dp.test_run(Program::FromContainer, &tcp(a, b, 1, 80, SYN), stray)
                .unwrap()
                .0;
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::NoEndpoint), 1);
    });
}

#[test]
fn drops_are_reported_on_the_ring_buffer_with_the_flow() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let mut ring = f.dp.take_events().expect("ring buffer");
        f.dp.set_event_mask(EVENTS_DROPS).unwrap();
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        assert_eq!(f.send(a, &tcp(a, b, 41000, 443, SYN)).0, TC_ACT_SHOT);
        let item = ring.next().expect("an event");
        assert_eq!(item.len(), std::mem::size_of::<FlowEvent>());
        // SAFETY: the ring holds FlowEvent records written by the datapath.
        let e: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        assert_eq!(e.kind, EVENT_DROP);
        assert_eq!(e.reason, DropReason::PolicyDeniedIngress as u8);
        assert_eq!((e.saddr, e.daddr), (a.ip.octets(), b.ip.octets()));
        assert_eq!((e.sport, e.dport, e.protocol), (41000, 443, TCP));
        assert_eq!((e.src_endpoint, e.dst_endpoint), (a.id, b.id));
        assert_eq!((e.src_identity, e.dst_identity), (a.identity, b.identity));
        drop(item);
        assert!(ring.next().is_none(), "one drop, one event");
    });
}

// ---- tc (clsact) attachment --------------------------------------------------------------

const HOOKS: [(TcAttachType, &str, &str); 2] = [
    (TcAttachType::Ingress, "ingress", "from_container"),
    (TcAttachType::Egress, "egress", "to_container"),
];

fn tc(args: &[&str]) -> String {
    let out = Command::new("tc").args(args).output().expect("tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Another program's filter, as a monitoring or shaping tool would add one: u32 on IPv4 to a
/// TEST-NET address. None of a pod's packets match it, so they go on to the next filter.
fn add_foreign_filter(dev: &str, hook: &str, pref: &str) {
    tc(&[
        "filter",
        "add",
        "dev",
        dev,
        hook,
        "pref",
        pref,
        "protocol",
        "ip",
        "u32",
        "match",
        "ip",
        "dst",
        "192.0.2.1/32",
    ]);
}

fn filters(dev: &str, hook: TcAttachType) -> Vec<Filter> {
    clsact::filters(dev, hook).expect("listing filters")
}

/// The filters running `program`, and those at other priorities (a priority's list is listed
/// as an entry of its own, with handle 0).
fn split(filters: Vec<Filter>, program: &str) -> (Vec<Filter>, Vec<Filter>) {
    let (ours, rest): (Vec<Filter>, Vec<Filter>) = filters
        .into_iter()
        .partition(|f| f.bpf_name.as_deref() == Some(program));
    let others = rest
        .into_iter()
        .filter(|f| ours.iter().all(|o| o.priority != f.priority))
        .collect();
    (ours, others)
}

#[test]
fn tc_attach_on_a_device_of_its_own_adds_clsact_and_takes_priority_1() {
    with_datapath(|f| {
        f.dp.attach("lxca").expect("attach");
        assert!(tc(&["qdisc", "show", "dev", "lxca"]).contains("qdisc clsact ffff:"));
        for (hook, name, program) in HOOKS {
            let (ours, others) = split(filters("lxca", hook), program);
            assert_eq!(ours.len(), 1, "{name}: {ours:?}");
            assert_eq!((ours[0].priority, ours[0].handle), (1, 1), "{name}");
            assert_eq!(others, [], "{name}");
        }
        f.dp.detach("lxca").expect("detach");
        for (hook, name, _) in HOOKS {
            assert_eq!(filters("lxca", hook), [], "{name}");
        }
        f.dp.detach("gone0")
            .expect("no interface: nothing to detach");
    });
}

#[test]
fn tc_attach_leaves_foreign_filters_alone_and_replaces_its_own_in_place() {
    with_datapath(|f| {
        tc(&["qdisc", "add", "dev", "lxca", "clsact"]);
        for (_, name, _) in HOOKS {
            add_foreign_filter("lxca", name, "1");
        }
        let foreign: Vec<Vec<Filter>> = HOOKS.iter().map(|h| filters("lxca", h.0)).collect();

        f.dp.attach("lxca").expect("attach");
        let mut attached = Vec::new();
        for ((hook, name, program), foreign) in HOOKS.into_iter().zip(&foreign) {
            let (ours, others) = split(filters("lxca", hook), program);
            assert_eq!(&others, foreign, "{name}: the foreign filter is untouched");
            assert_eq!(ours.len(), 1, "{name}: {ours:?}");
            assert_eq!(
                ours[0].priority, 2,
                "{name}: the first priority no other filter has"
            );
            attached.push(ours[0].clone());
        }

        // What a restarted agent does: fresh programs, swapped into the same filters.
        let mut restarted = Datapath::load(
            &f.bpffs.path(),
            AttachMode::Tc,
            Limits::default(),
            Features::default(),
        )
        .expect("load");
        restarted.attach("lxca").expect("attach again");
        for (((hook, name, program), foreign), before) in
            HOOKS.into_iter().zip(&foreign).zip(&attached)
        {
            let (ours, others) = split(filters("lxca", hook), program);
            assert_eq!(&others, foreign, "{name}: the foreign filter is untouched");
            assert_eq!(ours.len(), 1, "{name}: still one filter: {ours:?}");
            assert_eq!(
                (ours[0].priority, ours[0].handle),
                (before.priority, before.handle),
                "{name}: replaced in place"
            );
            assert_ne!(
                ours[0].prog_id, before.prog_id,
                "{name}: the new program runs"
            );
        }

        // The pod goes: Myelin's filters go, the foreign ones stay.
        restarted.detach("lxca").expect("detach");
        for ((hook, name, _), foreign) in HOOKS.into_iter().zip(&foreign) {
            assert_eq!(&filters("lxca", hook), foreign, "{name}");
        }
    });
}

/// The legacy ingress qdisc sits where clsact goes but has one filter list for both hooks: the
/// egress program would run on ingress.
#[test]
fn tc_attach_refuses_a_device_with_another_qdisc_at_the_clsact_handle() {
    with_datapath(|f| {
        tc(&["qdisc", "add", "dev", "lxca", "ingress"]);
        let err =
            f.dp.attach("lxca")
                .expect_err("attached into an ingress qdisc");
        assert!(
            matches!(
                &err,
                DatapathError::Clsact(ClsactError::ForeignQdisc { ifname, kind })
                    if ifname == "lxca" && kind == "ingress"
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("lxca has a qdisc of kind ingress"),
            "{err}"
        );
        assert!(tc(&["qdisc", "show", "dev", "lxca"]).contains("qdisc ingress ffff:"));
        assert_eq!(
            filters("lxca", TcAttachType::Ingress),
            [],
            "nothing attached into it"
        );
    });
}

// ---- masquerading ------------------------------------------------------------------------

/// This node's address on its uplink, the world, and a router on the way there.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const WORLD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The default NAT range with Linux's default ip_local_port_range.
const NAT_PORTS: NatPorts = NatPorts {
    min: 61000,
    max: 65535,
};
/// The destinations of the cluster: another node's pod CIDR and address, and a configured CIDR.
const OTHER_PODS: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
const CONFIGURED: Ipv4Addr = Ipv4Addr::new(172, 16, 3, 4);

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;

impl Fixture {
    /// Masquerading on, as the agent sets it up: this node at NODE_IP with the pods'
    /// 10.0.0.0/24, `ports`, and the cluster's destinations excluded.
    fn masquerade(&mut self, ports: NatPorts) {
        self.routing(CONFIG_F_MASQUERADE);
        self.dp
            .set_masquerade(Masquerade {
                pod_cidr: "10.0.0.0/24".parse().unwrap(),
                ports,
            })
            .expect("set_masquerade");
        for (net, reason) in [
            ("10.0.0.0/24", MASQ_EXCLUDE_POD_CIDR),
            ("10.0.1.0/24", MASQ_EXCLUDE_POD_CIDR),
            ("192.168.1.10/32", MASQ_EXCLUDE_NODE),
            ("192.168.1.11/32", MASQ_EXCLUDE_NODE),
            ("172.16.0.0/12", MASQ_EXCLUDE_CONFIGURED),
        ] {
            let net: ipnet::Ipv4Net = net.parse().unwrap();
            self.masq_exclude.insert(
                LpmKey {
                    prefix_len: u32::from(net.prefix_len()),
                    data: Ipv4Key {
                        addr: net.network().octets(),
                    },
                },
                MasqExclude { reason },
            );
        }
        self.sync();
    }

    fn routing(&mut self, flags: u32) {
        self.dp
            .set_routing(Routing {
                flags,
                node_ip: NODE_IP,
                tunnel_ifindex: 0,
                uplink_ifindex: 1,
                uplink_subnet: None,
            })
            .expect("set_routing");
    }

    /// A packet leaving through the uplink (`to_uplink`).
    fn leave(&mut self, packet: &[u8]) -> (i32, Vec<u8>) {
        self.dp
            .test_run(Program::ToUplink, packet, 1)
            .expect("test run")
    }

    /// A packet arriving on the uplink (`from_uplink`).
    fn arrive(&mut self, packet: &[u8]) -> (i32, Vec<u8>) {
        self.dp
            .test_run(Program::FromUplink, packet, 1)
            .expect("test run")
    }

    /// A pod's packet on its way out: its veth first, as on a node, then the uplink. Returns
    /// what leaves.
    fn pod_sends(&mut self, pod: Pod, packet: &[u8]) -> Vec<u8> {
        assert_eq!(self.send(pod, packet).0, TC_ACT_OK, "from_container");
        let (verdict, out) = self.leave(packet);
        assert_eq!(verdict, TC_ACT_OK, "to_uplink");
        out
    }

    /// A packet from the world on its way in: returns what goes up the node's stack.
    fn world_sends(&mut self, packet: &[u8]) -> Vec<u8> {
        let (verdict, back) = self.arrive(packet);
        assert_eq!(verdict, TC_ACT_OK, "from_uplink");
        back
    }

    fn nat_entries(&self) -> usize {
        NatTable::open(&NatTable::pin_path(self.dp.pin_dir()))
            .expect("open snat")
            .entries()
            .expect("snat entries")
            .len()
    }
}

/// Someone outside the pods' CIDR, as a packet source or destination.
fn outside(ip: Ipv4Addr) -> Pod {
    Pod {
        ip,
        mac: [2, 0, 0, 0, 2, 1],
        host_mac: [2, 0, 0, 0, 2, 2],
        ifindex: 1,
        id: 0,
        identity: identity::WORLD,
    }
}

fn ihl(p: &[u8]) -> usize {
    usize::from(p[14] & 0x0f) * 4
}

fn l4(p: &[u8]) -> usize {
    14 + ihl(p)
}

/// Where a protocol's checksum lies in its header.
fn checksum_offset(protocol: u8) -> Option<usize> {
    match protocol {
        TCP => Some(16),
        UDP => Some(6),
        ICMP => Some(2),
        _ => None,
    }
}

/// The sum a transport checksum covers (with the pseudo-header for TCP and UDP), of the IPv4
/// packet `ip` (no Ethernet header).
fn transport_sum(ip: &[u8]) -> u16 {
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let (protocol, segment) = (ip[9], &ip[hl..total.min(ip.len())]);
    let mut covered = Vec::new();
    if protocol != ICMP {
        covered.extend_from_slice(&ip[12..20]);
        covered.extend_from_slice(&[0, protocol]);
        covered.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    }
    covered.extend_from_slice(segment);
    checksum(&covered)
}

/// Fills in the IP header checksum and the transport checksum (of the whole frame).
fn checksummed(mut p: Vec<u8>) -> Vec<u8> {
    p[24..26].copy_from_slice(&[0, 0]);
    let ip_sum = checksum(&p[14..14 + ihl(&p)]);
    p[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    if let Some(at) = checksum_offset(p[23]).map(|o| l4(&p) + o) {
        p[at..at + 2].copy_from_slice(&[0, 0]);
        let mut sum = transport_sum(&p[14..]);
        if p[23] == UDP && sum == 0 {
            sum = 0xffff;
        }
        p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// Every checksum of the frame holds: the IP header's and the transport's (for an ICMP error,
/// also the quoted packet's, where the quote holds its whole transport segment).
fn assert_checksums(p: &[u8]) {
    assert_eq!(checksum(&p[14..14 + ihl(p)]), 0, "IP header checksum");
    assert_eq!(transport_sum(&p[14..]), 0, "transport checksum");
    if p[23] == ICMP && [ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED].contains(&p[l4(p)]) {
        let quote = &p[l4(p) + 8..];
        let quote_ihl = usize::from(quote[0] & 0x0f) * 4;
        assert_eq!(
            checksum(&quote[..quote_ihl]),
            0,
            "quoted IP header checksum"
        );
        assert_eq!(transport_sum(quote), 0, "quoted transport checksum");
    }
}

/// (source address, source port), the port being the identifier for ICMP echo.
fn source(p: &[u8]) -> (Ipv4Addr, u16) {
    let at = l4(p) + if p[23] == ICMP { 4 } else { 0 };
    (
        Ipv4Addr::new(p[26], p[27], p[28], p[29]),
        u16::from_be_bytes([p[at], p[at + 1]]),
    )
}

/// (destination address, destination port), the port being the identifier for ICMP echo.
fn destination(p: &[u8]) -> (Ipv4Addr, u16) {
    let at = l4(p) + if p[23] == ICMP { 4 } else { 2 };
    (
        Ipv4Addr::new(p[30], p[31], p[32], p[33]),
        u16::from_be_bytes([p[at], p[at + 1]]),
    )
}

/// The answer to `p`: addresses and ports swapped (an echo reply for an echo request, a
/// SYN-ACK for TCP), with valid checksums.
fn reply_to(p: &[u8]) -> Vec<u8> {
    let mut r = p.to_vec();
    r[26..30].copy_from_slice(&p[30..34]);
    r[30..34].copy_from_slice(&p[26..30]);
    let at = l4(p);
    match p[23] {
        ICMP => r[at] = ICMP_ECHO_REPLY,
        protocol => {
            r[at..at + 2].copy_from_slice(&p[at + 2..at + 4]);
            r[at + 2..at + 4].copy_from_slice(&p[at..at + 2]);
            if protocol == TCP {
                r[at + 13] = SYN | ACK;
            }
        }
    }
    checksummed(r)
}

/// An ICMP error from `from` to `to` quoting the whole of `quoted` (a frame), as Linux does
/// for packets shorter than 548 bytes. "Fragmentation needed" carries the next hop's MTU.
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    if (icmp_type, code) == (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) {
        l4[6..8].copy_from_slice(&1280u16.to_be_bytes());
    }
    l4.extend_from_slice(&quoted[14..]);
    let (from, to) = (outside(from), outside(to));
    checksummed(frame(from.mac, from.host_mac, from.ip, to.ip, ICMP, &l4))
}

/// The packet an ICMP error quotes, as a frame (its Ethernet header made up).
fn quoted(error: &[u8]) -> Vec<u8> {
    let mut q = error[..14].to_vec();
    q.extend_from_slice(&error[l4(error) + 8..]);
    q
}

#[test]
fn masquerade_keeps_a_pods_free_port_and_replies_find_the_pod_again() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, world) = (f.a, outside(WORLD));
        for packet in [
            tcp(a, world, 61000, 443, SYN),
            udp(a, world, 61001, 53),
            // An identifier is kept whatever its value: it is no socket's port.
            icmp_echo(a, world, ICMP_ECHO_REQUEST, 7),
        ] {
            let packet = checksummed(packet);
            let what = format!("protocol {}", packet[23]);
            let out = f.pod_sends(a, &packet);
            assert_eq!(source(&out), (NODE_IP, source(&packet).1), "{what}");
            assert_eq!(destination(&out), destination(&packet), "{what}");
            assert_checksums(&out);

            let back = f.world_sends(&reply_to(&out));
            assert_eq!(destination(&back), source(&packet), "{what}");
            assert_eq!(source(&back), destination(&packet), "{what}");
            assert_checksums(&back);
            assert_eq!(
                f.deliver(a, &back),
                TC_ACT_OK,
                "{what}: a reply the pod takes"
            );
        }
        assert_eq!(f.nat_entries(), 6, "two entries per flow");
    });
}

#[test]
fn a_second_flow_from_the_same_port_to_the_same_destination_gets_another_port() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, b, world) = (f.a, f.b, outside(WORLD));
        for (packet_a, packet_b) in [
            (
                tcp(a, world, 61000, 443, SYN),
                tcp(b, world, 61000, 443, SYN),
            ),
            (udp(a, world, 61000, 53), udp(b, world, 61000, 53)),
            (
                icmp_echo(a, world, ICMP_ECHO_REQUEST, 9),
                icmp_echo(b, world, ICMP_ECHO_REQUEST, 9),
            ),
        ] {
            let (packet_a, packet_b) = (checksummed(packet_a), checksummed(packet_b));
            let what = format!("protocol {}", packet_a[23]);
            let out_a = f.pod_sends(a, &packet_a);
            let out_b = f.pod_sends(b, &packet_b);
            assert_eq!(source(&out_a), (NODE_IP, source(&packet_a).1), "{what}");
            let (addr_b, port_b) = source(&out_b);
            assert_eq!(addr_b, NODE_IP, "{what}");
            assert_ne!(port_b, source(&packet_a).1, "{what}: b collides with a");
            if packet_b[23] != ICMP {
                assert!(
                    (NAT_PORTS.min..=NAT_PORTS.max).contains(&port_b),
                    "{what}: {port_b} is outside the NAT range"
                );
            }
            assert_checksums(&out_b);
            // Later packets keep their translation.
            assert_eq!(source(&f.pod_sends(b, &packet_b)), (NODE_IP, port_b));

            for (out, packet, pod) in [(&out_a, &packet_a, a), (&out_b, &packet_b, b)] {
                let back = f.world_sends(&reply_to(out));
                assert_eq!(destination(&back), source(packet), "{what}");
                assert_eq!(destination(&back).0, pod.ip);
                assert_checksums(&back);
            }
        }
    });
}

#[test]
fn an_icmp_error_about_a_masqueraded_packet_reaches_the_pod_with_both_headers_translated() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, world) = (f.a, outside(WORLD));
        for (packet, icmp_type, code) in [
            // Path MTU discovery: a router on the way cannot forward a packet with DF set.
            (
                tcp(a, world, 40000, 443, ACK),
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
            ),
            (
                udp(a, world, 40001, 53),
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
            ),
            // traceroute, and a ping whose TTL runs out.
            (
                icmp_echo(a, world, ICMP_ECHO_REQUEST, 4242),
                ICMP_TIME_EXCEEDED,
                0,
            ),
        ] {
            let packet = checksummed(packet);
            let what = format!("protocol {}", packet[23]);
            let out = f.pod_sends(a, &packet);
            if packet[23] != ICMP {
                assert_ne!(
                    source(&out).1,
                    source(&packet).1,
                    "{what}: a port of the range"
                );
            }
            let error = icmp_error(ROUTER, NODE_IP, icmp_type, code, &out);
            assert_checksums(&error);
            let back = f.world_sends(&error);
            assert_eq!(source(&back).0, ROUTER, "{what}");
            assert_eq!(
                destination(&back).0,
                a.ip,
                "{what}: the error goes to the pod"
            );
            let (at, was) = (l4(&back), l4(&error));
            assert_eq!(
                (&back[at..at + 2], &back[at + 4..at + 8]),
                (&error[was..was + 2], &error[was + 4..was + 8]),
                "{what}: type, code and MTU as sent"
            );
            assert_eq!(
                quoted(&back)[14..],
                packet[14..],
                "{what}: the pod sees its own packet quoted, checksums and all"
            );
            assert_checksums(&back);
            assert_eq!(
                f.deliver(a, &back),
                TC_ACT_OK,
                "{what}: related to the pod's flow"
            );
        }
        // An error about nothing this node translated goes up the stack as it came.
        let stray = checksummed(udp(outside(NODE_IP), world, 61234, 53));
        let error = icmp_error(ROUTER, NODE_IP, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, &stray);
        assert_eq!(f.world_sends(&error), error);
    });
}

#[test]
fn a_pods_icmp_error_about_a_translated_reply_leaves_with_the_nodes_address() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, world) = (f.a, outside(WORLD));
        let query = checksummed(udp(a, world, 40002, 53));
        let out = f.pod_sends(a, &query);
        let back = f.world_sends(&reply_to(&out));
        // The pod's socket is gone: it says so to the world.
        let error = icmp_error(a.ip, WORLD, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &back);
        let (verdict, sent) = f.leave(&error);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(source(&sent).0, NODE_IP);
        assert_eq!(
            quoted(&sent)[14..],
            reply_to(&out)[14..],
            "the world sees its own reply quoted"
        );
        assert_checksums(&sent);
    });
}

#[test]
fn cluster_destinations_and_the_nodes_own_traffic_are_never_translated() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let a = f.a;
        for to in [OTHER_PODS, OTHER_NODE, CONFIGURED] {
            for packet in [
                tcp(a, outside(to), 61000, 443, SYN),
                icmp_echo(a, outside(to), ICMP_ECHO_REQUEST, 1),
            ] {
                let packet = checksummed(packet);
                assert_eq!(f.leave(&packet), (TC_ACT_OK, packet.clone()), "to {to}");
            }
        }
        // The node's own connection, and what answers it.
        let node = outside(NODE_IP);
        let own = checksummed(tcp(node, outside(WORLD), 40000, 443, SYN));
        assert_eq!(f.leave(&own), (TC_ACT_OK, own.clone()));
        let answer = reply_to(&own);
        assert_eq!(f.arrive(&answer), (TC_ACT_OK, answer.clone()));
        // Nothing is known for a port of the range either.
        let unknown = checksummed(udp(outside(WORLD), node, 53, 62000));
        assert_eq!(f.arrive(&unknown), (TC_ACT_OK, unknown.clone()));
        assert_eq!(f.nat_entries(), 0);
    });
}

#[test]
fn without_masquerade_the_uplink_programs_change_nothing() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        f.routing(0);
        let (a, world) = (f.a, outside(WORLD));
        let packet = checksummed(tcp(a, world, 61000, 443, SYN));
        assert_eq!(f.leave(&packet), (TC_ACT_OK, packet.clone()));
        let answer = checksummed(tcp(world, outside(NODE_IP), 443, 61000, SYN | ACK));
        assert_eq!(f.arrive(&answer), (TC_ACT_OK, answer.clone()));
        assert_eq!(f.nat_entries(), 0);
    });
}

/// Port exhaustion is Cilium's most reported masquerading failure: here it must cost new flows
/// only, never one that has its port.
#[test]
fn when_the_range_is_used_up_new_flows_drop_and_the_existing_one_goes_on() {
    with_datapath(|f| {
        let one_port = NatPorts {
            min: 61000,
            max: 61000,
        };
        f.masquerade(one_port);
        let (a, b, world) = (f.a, f.b, outside(WORLD));
        let first = checksummed(tcp(a, world, 50000, 443, SYN));
        let out = f.pod_sends(a, &first);
        assert_eq!(source(&out), (NODE_IP, 61000));

        for (sport, what) in [(50000, "the same port"), (61000, "the range's only port")] {
            let second = checksummed(tcp(b, world, sport, 443, SYN));
            assert_eq!(f.send(b, &second).0, TC_ACT_OK);
            assert_eq!(f.leave(&second).0, TC_ACT_SHOT, "{what}");
        }
        assert_eq!(f.drops(DropReason::NatPortExhausted), 2);

        // The flow that has the port keeps it, both ways.
        let next = checksummed(tcp(a, world, 50000, 443, ACK));
        assert_eq!(source(&f.pod_sends(a, &next)), (NODE_IP, 61000));
        let back = f.world_sends(&reply_to(&out));
        assert_eq!(destination(&back), (a.ip, 50000));
        // A port is per destination: another one still has it free.
        let elsewhere = checksummed(tcp(b, outside(ROUTER), 50000, 443, SYN));
        assert_eq!(source(&f.pod_sends(b, &elsewhere)), (NODE_IP, 61000));
        assert_eq!(f.drops(DropReason::NatPortExhausted), 2);
    });
}

/// SCTP's checksum is a CRC32c over the packet, ports included but not the addresses: a flow
/// keeps its port or is dropped, and is never renumbered with a checksum left wrong.
#[test]
fn sctp_keeps_its_port_or_drops_rather_than_leave_a_wrong_checksum() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, b, world) = (f.a, f.b, outside(WORLD));
        let mut packet = sctp(a, world, 5000, 3868);
        let crc = l4(&packet) + 8;
        packet[crc..crc + 4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let out = f.pod_sends(a, &packet);
        assert_eq!(
            source(&out),
            (NODE_IP, 5000),
            "kept, even outside the range"
        );
        assert_eq!(checksum(&out[14..34]), 0);
        assert_eq!(
            &out[l4(&out)..],
            &packet[l4(&packet)..],
            "the SCTP packet, CRC32c included, is untouched"
        );
        let back = f.world_sends(&reply_to(&out));
        assert_eq!(destination(&back), (a.ip, 5000));

        assert_eq!(f.send(b, &sctp(b, world, 5000, 3868)).0, TC_ACT_OK);
        assert_eq!(f.leave(&sctp(b, world, 5000, 3868)).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::NatPortExhausted), 1);
    });
}

#[test]
fn a_pod_answering_a_connection_to_its_own_address_keeps_it() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, world) = (f.a, outside(WORLD));
        // Someone outside routes to the pod CIDR and connects to the pod directly.
        let syn = checksummed(tcp(world, a, 40000, 8080, SYN));
        assert_eq!(f.deliver(a, &syn), TC_ACT_OK);
        let answer = checksummed(tcp(a, world, 8080, 40000, SYN | ACK));
        assert_eq!(f.pod_sends(a, &answer), answer);
        assert_eq!(f.nat_entries(), 0);
    });
}

/// The LRU map may evict one entry of a pair; the flow's next refresh mends the pair, or, when
/// another flow took the port meanwhile, moves the flow to a new port rather than send as that
/// flow. Needs the refresh interval (1 s) to pass.
#[test]
fn a_flow_whose_reply_entry_went_gets_it_back_or_moves_to_another_port() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, b, world) = (f.a, f.b, outside(WORLD));
        let packet = checksummed(udp(a, world, 61000, 53));
        f.pod_sends(a, &packet);
        let pin = NatTable::pin_path(f.dp.pin_dir());
        let map = |pin: &std::path::Path| {
            aya::maps::HashMap::<_, myelin_common::nat::NatKey, myelin_common::nat::NatEntry>::try_from(
                aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(pin).unwrap()),
            )
            .unwrap()
        };
        let reply_key = |port: u16| myelin_common::nat::NatKey {
            saddr: WORLD.octets(),
            daddr: NODE_IP.octets(),
            sport: 53u16.to_be(),
            dport: port.to_be(),
            protocol: UDP,
            direction: NAT_IN,
            _pad: 0,
        };
        // Evicted: put back by the next packet once the refresh interval passed.
        map(&pin).remove(&reply_key(61000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1200));
        assert_eq!(source(&f.pod_sends(a, &packet)), (NODE_IP, 61000));
        let out = f.pod_sends(a, &packet);
        let back = f.world_sends(&reply_to(&out));
        assert_eq!(destination(&back), (a.ip, 61000));

        // Evicted, and the port given to b's flow meanwhile: a moves on, b keeps it.
        map(&pin).remove(&reply_key(61000)).unwrap();
        let b_packet = checksummed(udp(b, world, 61000, 53));
        assert_eq!(source(&f.pod_sends(b, &b_packet)), (NODE_IP, 61000));
        std::thread::sleep(std::time::Duration::from_millis(1200));
        let moved = source(&f.pod_sends(a, &packet));
        assert_eq!(moved.0, NODE_IP);
        assert_ne!(moved.1, 61000, "a still sends as b's flow");
        let to_b = checksummed(udp(world, outside(NODE_IP), 53, 61000));
        assert_eq!(destination(&f.world_sends(&to_b)), (b.ip, 61000));
        let to_a = checksummed(udp(world, outside(NODE_IP), 53, moved.1));
        assert_eq!(destination(&f.world_sends(&to_a)), (a.ip, 61000));
    });
}

#[test]
fn expired_translations_are_collected_in_pairs_and_free_their_port() {
    with_datapath(|f| {
        f.masquerade(NatPorts {
            min: 61000,
            max: 61000,
        });
        let (a, b, world) = (f.a, f.b, outside(WORLD));
        f.pod_sends(a, &checksummed(tcp(a, world, 50000, 443, SYN)));
        let b_syn = checksummed(tcp(b, world, 50000, 443, SYN));
        assert_eq!(f.leave(&b_syn).0, TC_ACT_SHOT, "the only port is a's");

        let pin = NatTable::pin_path(f.dp.pin_dir());
        let mut table = NatTable::open(&pin).unwrap();
        let live = table.collect_garbage().unwrap();
        assert_eq!(
            (live.removed, live.kept),
            (0, 2),
            "a's flow has not expired"
        );
        // A TCP flow that never saw a reply lives 60 s: age both entries past that.
        let mut map = aya::maps::HashMap::<
            _,
            myelin_common::nat::NatKey,
            myelin_common::nat::NatEntry,
        >::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(&pin).unwrap(),
        ))
        .unwrap();
        for (k, mut e) in table.entries().unwrap() {
            e.expires_ns = 1;
            map.insert(k, e, 0).unwrap();
        }
        let swept = table.collect_garbage().unwrap();
        assert_eq!((swept.removed, swept.kept), (2, 0));
        assert_eq!(source(&f.pod_sends(b, &b_syn)), (NODE_IP, 61000));
    });
}

/// A flow that expired frees its port at once, not only when the agent's collector next runs
/// (every 30 s): a new flow to the same remote takes it over, and the expired flow, should it
/// send again, does not send as the new one.
#[test]
fn an_expired_flows_port_is_free_before_it_is_collected() {
    with_datapath(|f| {
        f.masquerade(NatPorts {
            min: 61000,
            max: 61000,
        });
        let (a, b, world) = (f.a, f.b, outside(WORLD));
        let a_syn = checksummed(tcp(a, world, 50000, 443, SYN));
        f.pod_sends(a, &a_syn);
        let b_syn = checksummed(tcp(b, world, 50000, 443, SYN));
        assert_eq!(f.leave(&b_syn).0, TC_ACT_SHOT, "the only port is a's");

        let pin = NatTable::pin_path(f.dp.pin_dir());
        let mut map = aya::maps::HashMap::<
            _,
            myelin_common::nat::NatKey,
            myelin_common::nat::NatEntry,
        >::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(&pin).unwrap(),
        ))
        .unwrap();
        let table = NatTable::open(&pin).unwrap();
        for (k, mut e) in table.entries().unwrap() {
            e.expires_ns = 1;
            map.insert(k, e, 0).unwrap();
        }
        // No collection: the port is free all the same.
        let out_b = f.pod_sends(b, &b_syn);
        assert_eq!(source(&out_b), (NODE_IP, 61000));
        let back = f.world_sends(&reply_to(&out_b));
        assert_eq!(destination(&back), (b.ip, 50000), "the reply is b's");
        // a's flow comes back to life: the port is b's now, and the only one.
        assert_eq!(f.leave(&a_syn).0, TC_ACT_SHOT, "a must not send as b");
        assert_eq!(f.drops(DropReason::NatPortExhausted), 2);
        assert_eq!(
            destination(&f.world_sends(&reply_to(&out_b))),
            (b.ip, 50000),
            "b keeps its port"
        );
    });
}

/// Policy decides on the pod's own packet, against the real destination, before anything is
/// translated: a denied packet never reaches the uplink.
#[test]
fn egress_policy_is_checked_against_the_original_destination_before_masquerading() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        let (a, world) = (f.a, outside(WORLD));
        f.isolate(a, ENDPOINT_F_EGRESS_ISOLATED);
        f.allow(a, Direction::Egress, identity::WORLD, TCP, 443);
        let allowed = checksummed(tcp(a, world, 40000, 443, SYN));
        assert_eq!(source(&f.pod_sends(a, &allowed)).0, NODE_IP);
        let denied = checksummed(tcp(a, world, 40001, 80, SYN));
        assert_eq!(f.send(a, &denied).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::PolicyDeniedEgress), 1);
        assert_eq!(f.nat_entries(), 2, "only the allowed flow was translated");
    });
}

/// The tcx programs on `hook` of `dev`, by name, in the order they run.
fn tcx_programs(dev: &str, hook: TcAttachType) -> Vec<String> {
    let (_, programs) = SchedClassifier::query_tcx(dev, hook).expect("listing tcx programs");
    programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect()
}

/// Where the uplink's programs run on `dev`: (tcx programs, clsact filters of Myelin's), by
/// hook, ingress first.
fn uplink_attachments(dev: &str) -> [(Vec<String>, Vec<Filter>); 2] {
    [
        (TcAttachType::Ingress, "from_uplink"),
        (TcAttachType::Egress, "to_uplink"),
    ]
    .map(|(hook, program)| {
        let (ours, _) = split(filters(dev, hook), program);
        (tcx_programs(dev, hook), ours)
    })
}

/// `read()` once it equals `want`, or as it is after two seconds: the kernel detaches a tcx link
/// whose last pin is removed from a work queue, a moment later.
fn settled<T: PartialEq>(want: T, read: impl Fn() -> T) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let now = read();
        if now == want || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What `--masquerade` true and false do to the uplink: its two programs, tcx links on a kernel
/// that has them (clsact filters otherwise), whatever `--attach-mode`, and gone again, also from
/// a device that never had them.
#[test]
fn the_uplink_gets_the_masquerading_programs_and_loses_them_again() {
    with_datapath(|f| {
        let tcx = kernel_has_tcx();
        let attached = |program: &str| -> (Vec<String>, usize) {
            if tcx {
                (vec![program.to_string()], 0)
            } else {
                (vec![], 1)
            }
        };
        let shape = |dev: &str| uplink_attachments(dev).map(|(t, c)| (t, c.len()));
        f.dp.detach_uplink("eth-a")
            .expect("nothing attached: nothing to detach");
        f.dp.attach_uplink("eth-a", true).expect("attach");
        assert_eq!(
            shape("eth-a"),
            [attached("from_uplink"), attached("to_uplink")]
        );
        // Native routing without masquerading: only the ingress program stays.
        f.dp.attach_uplink("eth-a", false).expect("attach");
        let native = [attached("from_uplink"), (vec![], 0)];
        assert_eq!(settled(native.clone(), || shape("eth-a")), native);
        // Attaching again (an agent's restart) replaces the program in place.
        f.dp.attach_uplink("eth-a", false).expect("attach again");
        assert_eq!(shape("eth-a"), native);
        f.dp.detach_uplink("eth-a").expect("detach");
        let none = [(vec![], 0), (vec![], 0)];
        assert_eq!(settled(none.clone(), || shape("eth-a")), none);
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            assert_eq!(filters("eth-a", hook), []);
        }
    });
}

/// A hook of the uplink that carries another program's clsact filter keeps Myelin's program as
/// a clsact filter beside it (a tcx program would run before it and end the hook with its
/// verdict); the other hook gets a tcx link. Once the other filter is gone, the next attach
/// moves the program to tcx and removes its filter: it never runs twice on a packet.
#[test]
fn an_uplink_hook_with_another_programs_filter_keeps_myelins_as_a_filter_beside_it() {
    if !kernel_has_tcx() {
        return;
    }
    with_datapath(|f| {
        tc(&["qdisc", "add", "dev", "eth-a", "clsact"]);
        add_foreign_filter("eth-a", "ingress", "1");
        f.dp.attach_uplink("eth-a", true).expect("attach");
        let [(ingress_tcx, ingress_ours), (egress_tcx, egress_ours)] = uplink_attachments("eth-a");
        assert_eq!(ingress_tcx, Vec::<String>::new());
        assert_eq!(ingress_ours.len(), 1, "{ingress_ours:?}");
        assert_ne!(
            ingress_ours[0].priority, 1,
            "the other filter keeps its place"
        );
        assert_eq!(
            (egress_tcx, egress_ours),
            (vec!["to_uplink".to_string()], vec![])
        );

        tc(&["filter", "del", "dev", "eth-a", "ingress", "pref", "1"]);
        f.dp.attach_uplink("eth-a", true).expect("attach again");
        assert_eq!(
            uplink_attachments("eth-a"),
            [
                (vec!["from_uplink".to_string()], vec![]),
                (vec!["to_uplink".to_string()], vec![]),
            ]
        );
        f.dp.detach_uplink("eth-a").expect("detach");
        let none = [(vec![], vec![]), (vec![], vec![])];
        assert_eq!(settled(none.clone(), || uplink_attachments("eth-a")), none);
    });
}

/// The uplink's tcx links are pinned: they outlive the agent (pods reach other nodes while it
/// restarts), and a device that is no longer the uplink loses them.
#[test]
fn the_uplinks_tcx_links_outlive_the_agent_until_another_device_is_the_uplink() {
    if !kernel_has_tcx() {
        return;
    }
    with_datapath(|f| {
        f.dp.attach_uplink("eth-a", true).expect("attach");
        let before = f.dp.detach_uplink_elsewhere(Some("eth-a")).expect("sweep");
        assert_eq!(before, Vec::<String>::new(), "eth-a is the uplink");
        assert_eq!(
            tcx_programs("eth-a", TcAttachType::Ingress),
            ["from_uplink"],
            "kept by its pin"
        );
        let cleaned = f.dp.detach_uplink_elsewhere(Some("eth-b")).expect("sweep");
        assert_eq!(cleaned, ["eth-a"]);
        let none = [(vec![], vec![]), (vec![], vec![])];
        assert_eq!(settled(none.clone(), || uplink_attachments("eth-a")), none);
    });
}

// ---- Services in eBPF ----------------------------------------------------------------------

/// A Service's ClusterIP, and an address of the pod CIDR that no pod holds (a backend the node's
/// stack takes care of, as for a pod being deleted).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NO_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
const RST: u8 = 0x04;

fn lb_key(frontend: Ipv4Addr, port: u16, protocol: u8, slot: u16) -> LbKey {
    LbKey {
        addr: frontend.octets(),
        port: port.to_be(),
        protocol,
        _pad0: 0,
        slot,
        _pad1: 0,
    }
}

impl Fixture {
    /// Services translated in eBPF (`CONFIG_F_SERVICES`), besides the routing `flags`.
    fn services_on(&mut self, flags: u32, tunnel_ifindex: u32) {
        self.dp
            .set_routing(Routing {
                flags: CONFIG_F_SERVICES | flags,
                node_ip: NODE_IP,
                tunnel_ifindex,
                uplink_ifindex: 0,
                uplink_subnet: None,
            })
            .expect("set_routing");
    }

    /// The frontend CLUSTER_IP:`port`/`protocol` with `backends`, as the agent writes it
    /// (replacing the frontend's earlier slots).
    fn service(&mut self, port: u16, protocol: u8, backends: &[(Ipv4Addr, u16)], affinity_s: u32) {
        self.lb_services.retain(|k, _| {
            (k.addr, k.port, k.protocol) != (CLUSTER_IP.octets(), port.to_be(), protocol)
        });
        let service = LbEntry {
            count: backends.len() as u16,
            affinity_timeout_s: affinity_s,
            ..LbEntry::default()
        };
        self.slots(CLUSTER_IP, port, protocol, service, backends);
    }

    /// Slot 0 of `addr`:`port`/`protocol` is `service`, slots 1.. are `backends`; written.
    fn slots(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        protocol: u8,
        service: LbEntry,
        backends: &[(Ipv4Addr, u16)],
    ) {
        self.lb_services
            .insert(lb_key(addr, port, protocol, 0), service);
        for (i, (backend, target)) in backends.iter().enumerate() {
            self.lb_services.insert(
                lb_key(addr, port, protocol, i as u16 + 1),
                LbEntry {
                    backend: backend.octets(),
                    backend_port: target.to_be(),
                    ..LbEntry::default()
                },
            );
        }
        self.sync();
    }
}

/// A TCP packet from `from` to CLUSTER_IP:`dport`, with valid checksums.
fn to_cluster_ip(from: Pod, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    checksummed(tcp(from, outside(CLUSTER_IP), sport, dport, flags))
}

/// A frame whose payload grew: its IP total length and UDP length follow.
fn fix_lengths(mut p: Vec<u8>) -> Vec<u8> {
    let total = (p.len() - 14) as u16;
    p[16..18].copy_from_slice(&total.to_be_bytes());
    if p[23] == UDP {
        let at = l4(&p);
        let len = (p.len() - at) as u16;
        p[at + 4..at + 6].copy_from_slice(&len.to_be_bytes());
    }
    p
}

/// `p` as the pod `from` sends it: its MACs.
fn sent_by(from: Pod, mut p: Vec<u8>) -> Vec<u8> {
    p[0..6].copy_from_slice(&from.host_mac);
    p[6..12].copy_from_slice(&from.mac);
    p
}

#[test]
fn a_syn_to_a_cluster_ip_is_translated_to_a_local_backend_and_redirected_into_it() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let syn = to_cluster_ip(a, 40000, 80, SYN);
        let (verdict, out) = f.send(a, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the backend pod");
        assert_eq!(
            destination(&out),
            (b.ip, 8080),
            "the backend and its target port"
        );
        assert_eq!(source(&out), (a.ip, 40000), "the client stays the source");
        assert_eq!(&out[0..6], &b.mac, "destination MAC is the backend's");
        assert_checksums(&out);
        assert_eq!(f.dp.endpoint_counters(b.id).rx_packets, 1);
    });
}

#[test]
fn the_backends_reply_is_translated_back_to_the_frontend() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let (_, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        let (verdict, back) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the client");
        assert_eq!(
            source(&back),
            (CLUSTER_IP, 80),
            "from the frontend it addressed"
        );
        assert_eq!(destination(&back), (a.ip, 40000));
        assert_eq!(&back[0..6], &a.mac);
        assert_checksums(&back);
        // The rest of the connection goes the same ways.
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 80, ACK));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 8080))
        );
        let (verdict, back) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(
            (verdict, source(&back)),
            (TC_ACT_REDIRECT, (CLUSTER_IP, 80))
        );
    });
}

#[test]
fn events_of_a_translated_connection_name_its_service() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        f.service(81, TCP, &[], 0);
        let mut ring = f.dp.take_events().expect("ring buffer");
        f.dp.set_event_mask(EVENTS_DROPS | EVENTS_VERDICTS).unwrap();
        let mut next = || {
            let item = ring.next().expect("an event");
            // SAFETY: the ring holds FlowEvent records written by the datapath.
            unsafe { std::ptr::read_unaligned::<FlowEvent>(item.as_ptr().cast()) }
        };
        let (verdict, _) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let e = next();
        assert_eq!(e.kind, EVENT_ALLOWED, "the new connection");
        assert_eq!((e.daddr, e.dport), (b.ip.octets(), 8080), "to the backend");
        assert_eq!(
            (e.service_addr, e.service_port),
            (CLUSTER_IP.octets(), 80),
            "addressed to the frontend"
        );
        // A frontend without backends: the refusal's drop names it too.
        f.send(a, &to_cluster_ip(a, 40001, 81, SYN));
        let e = next();
        assert_eq!(
            (e.kind, e.reason),
            (EVENT_DROP, DropReason::NoServiceBackend as u8)
        );
        assert_eq!((e.service_addr, e.service_port), (CLUSTER_IP.octets(), 81));
        // A connection to a pod's own address is no Service's.
        f.send(a, &tcp(a, b, 40002, 8080, SYN));
        let e = next();
        assert_eq!((e.kind, e.service_addr), (EVENT_ALLOWED, [0; 4]));
    });
}

#[test]
fn an_established_connection_keeps_its_backend_after_the_slots_change() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let (_, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(destination(&out), (b.ip, 8080));
        f.service(80, TCP, &[(NO_POD, 9090)], 0);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 80, ACK));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "still into the backend it started with"
        );
        assert_eq!(destination(&out), (b.ip, 8080));
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40001, 80, SYN));
        assert_eq!(
            verdict, TC_ACT_OK,
            "a new connection: the new backend, through the stack"
        );
        assert_eq!(destination(&out), (NO_POD, 9090));
        assert_checksums(&out);
    });
}

/// A client reuses a port as soon as its side of a connection is closed, well within the
/// closed connection's 10 s: the new connection gets a backend of today's slots, not the
/// closed one's (a removed backend, possibly), and lives as a new connection.
#[test]
fn a_syn_on_the_port_of_a_closed_service_connection_gets_a_backend_of_todays_slots() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let (_, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(destination(&out), (b.ip, 8080));
        f.service(80, TCP, &[(NO_POD, 9090)], 0);
        let (_, out) = f.send(a, &to_cluster_ip(a, 40000, 80, FIN | ACK));
        assert_eq!(
            destination(&out),
            (b.ip, 8080),
            "the closing connection stays on its backend"
        );
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_OK, (NO_POD, 9090)),
            "a new connection on the same port: today's backend"
        );
        let flows = LbFlowTable::open(&LbFlowTable::pin_path(f.dp.pin_dir())).unwrap();
        let to_backend = flows
            .entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.saddr == a.ip.octets() && k.direction == LB_OUT)
            .map(|(_, e)| e)
            .expect("the client's translation");
        assert_eq!(to_backend.addr, NO_POD.octets());
        assert_eq!(
            u32::from(to_backend.flags) & CT_F_CLOSING,
            0,
            "not closing: it would expire after 10 s idle"
        );
    });
}

/// Conntrack's side of the same: a SYN on the tuple of a closed connection opens a new one,
/// with an opening lifetime, not the closed one's 10 s.
#[test]
fn a_syn_on_the_tuple_of_a_closed_connection_starts_a_new_one() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        let table = ConntrackTable::open(&ConntrackTable::pin_path(f.dp.pin_dir())).unwrap();
        let client = format!("{}:40000", a.ip);
        let expires_in = || {
            table
                .flows(16)
                .unwrap()
                .into_iter()
                .find(|t| t.src == client)
                .map(|t| t.expires_in)
        };
        assert_eq!(f.send(a, &tcp(a, b, 40000, 80, SYN)).0, TC_ACT_REDIRECT);
        f.send(b, &tcp(b, a, 80, 40000, SYN | ACK));
        f.send(a, &tcp(a, b, 40000, 80, FIN | ACK));
        assert!(expires_in().is_some_and(|s| s <= 10), "closing");
        assert_eq!(f.send(a, &tcp(a, b, 40000, 80, SYN)).0, TC_ACT_REDIRECT);
        let after = expires_in();
        assert!(
            after.is_some_and(|s| s > 50),
            "a new connection lives as one: {after:?} s left"
        );
    });
}

#[test]
fn tcp_and_udp_on_the_same_port_are_separate_frontends() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(53, TCP, &[(b.ip, 5353)], 0);
        f.service(53, UDP, &[(NO_POD, 5354)], 0);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 53, SYN));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 5353))
        );
        let query = checksummed(udp(a, outside(CLUSTER_IP), 40000, 53));
        let (verdict, out) = f.send(a, &query);
        assert_eq!((verdict, destination(&out)), (TC_ACT_OK, (NO_POD, 5354)));
        assert_checksums(&out);
        // Another port of the same address is no frontend: left alone.
        let other = to_cluster_ip(a, 40000, 443, SYN);
        let (verdict, out) = f.send(a, &other);
        assert_eq!((verdict, out), (TC_ACT_OK, other));
    });
}

#[test]
fn a_frontend_without_backends_answers_a_syn_with_a_reset_and_udp_with_port_unreachable() {
    with_datapath(|f| {
        let a = f.a;
        f.services_on(0, 0);
        f.service(80, TCP, &[], 0);
        f.service(80, UDP, &[], 0);
        let mut syn = tcp(a, outside(CLUSTER_IP), 40000, 80, SYN);
        let seq_at = l4(&syn) + 4;
        syn[seq_at..seq_at + 4].copy_from_slice(&1000u32.to_be_bytes());
        let syn = checksummed(syn);
        let before = f.drops(DropReason::NoServiceBackend);
        let (verdict, rst) = f.send(a, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT, "back into the pod that sent it");
        assert_eq!(rst.len(), 14 + 20 + 20, "headers only");
        assert_eq!(&rst[0..6], &a.mac, "to the pod");
        assert_eq!(&rst[6..12], &a.host_mac, "from its gateway");
        assert_eq!(
            source(&rst),
            (CLUSTER_IP, 80),
            "from the frontend it addressed"
        );
        assert_eq!(destination(&rst), (a.ip, 40000));
        let tcp_at = l4(&rst);
        assert_eq!(rst[tcp_at + 13], RST | ACK, "RST|ACK");
        assert_eq!(
            &rst[tcp_at + 4..tcp_at + 8],
            &[0; 4],
            "sequence 0: the SYN had no ACK"
        );
        assert_eq!(
            u32::from_be_bytes(rst[tcp_at + 8..tcp_at + 12].try_into().unwrap()),
            1001,
            "acknowledges the SYN"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([rst[16], rst[17]])),
            40,
            "IP total length"
        );
        assert_checksums(&rst);
        assert_eq!(f.drops(DropReason::NoServiceBackend), before + 1);

        // UDP: an ICMP port unreachable quoting the datagram as the pod sent it.
        let mut query = udp(a, outside(CLUSTER_IP), 40000, 80);
        query.extend_from_slice(&[7; 100]);
        let query = checksummed(fix_lengths(query));
        let (verdict, error) = f.send(a, &query);
        assert_eq!(verdict, TC_ACT_REDIRECT, "back into the pod that sent it");
        assert_eq!(
            error.len(),
            14 + 20 + 8 + 20 + 8,
            "the IP header and 8 bytes quoted"
        );
        assert_eq!((&error[0..6], &error[6..12]), (&a.mac[..], &a.host_mac[..]));
        assert_eq!(error[23], ICMP);
        assert_eq!(
            (source(&error).0, destination(&error).0),
            (CLUSTER_IP, a.ip)
        );
        let icmp_at = l4(&error);
        assert_eq!(
            (error[icmp_at], error[icmp_at + 1]),
            (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
        );
        assert_eq!(&error[icmp_at + 8..], &query[14..14 + 28], "the quote");
        assert_eq!(checksum(&error[14..34]), 0, "IP header checksum");
        assert_eq!(transport_sum(&error[14..]), 0, "ICMP checksum");
        assert_eq!(f.drops(DropReason::NoServiceBackend), before + 2);
    });
}

/// The refusals as a pod's own sockets see them: pod a's end of its veth moved into a
/// namespace of its own (addresses, MACs and routes as the plugin sets them), `from_container`
/// attached to its host end for real.
#[test]
fn a_pods_socket_is_refused_at_once_by_a_frontend_without_backends() {
    with_datapath(|f| {
        let a = f.a;
        f.services_on(0, 0);
        f.service(80, TCP, &[], 0);
        f.service(53, UDP, &[], 0);
        let pod = pod_namespace(a, "lxca", "eth-a");
        f.dp.attach("lxca").expect("attach");
        let before = f.drops(DropReason::NoServiceBackend);
        let (tcp, udp) = pod
            .run(|| {
                let frontend = std::net::SocketAddr::from((CLUSTER_IP, 80));
                let tcp = std::net::TcpStream::connect_timeout(
                    &frontend,
                    std::time::Duration::from_secs(3),
                )
                .map(drop)
                .map_err(|e| e.kind());
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                socket
                    .set_read_timeout(Some(std::time::Duration::from_secs(3)))
                    .unwrap();
                socket.connect((CLUSTER_IP, 53)).expect("connect");
                socket.send(b"query").expect("send");
                let udp = socket.recv(&mut [0; 64]).map(drop).map_err(|e| e.kind());
                (tcp, udp)
            })
            .expect("in the pod");
        assert_eq!(
            tcp,
            Err(std::io::ErrorKind::ConnectionRefused),
            "TCP: the RST"
        );
        assert_eq!(
            udp,
            Err(std::io::ErrorKind::ConnectionRefused),
            "UDP: port unreachable"
        );
        assert_eq!(f.drops(DropReason::NoServiceBackend), before + 2);
    });
}

#[test]
fn expired_service_connections_and_affinities_are_collected() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 3600);
        f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        let pin = LbFlowTable::pin_path(f.dp.pin_dir());
        let mut flows = LbFlowTable::open(&pin).unwrap();
        let mut affinity =
            LbAffinityTable::open(&LbAffinityTable::pin_path(f.dp.pin_dir())).unwrap();
        let live = flows.collect_garbage().unwrap();
        assert_eq!(
            (live.removed, live.kept),
            (0, 2),
            "both ways of the live connection"
        );
        let live = affinity.collect_garbage().unwrap();
        assert_eq!(
            (live.removed, live.kept),
            (0, 1),
            "used just now, kept for an hour"
        );

        // A connection that never saw a reply lives 60 s: age both entries past that.
        let mut map = aya::maps::HashMap::<_, LbFlowKey, LbFlow>::try_from(
            aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(&pin).unwrap()),
        )
        .unwrap();
        for (k, mut e) in flows.entries().unwrap() {
            e.expires_ns = 1;
            map.insert(k, e, 0).unwrap();
        }
        let swept = flows.collect_garbage().unwrap();
        assert_eq!((swept.removed, swept.kept), (2, 0));
        // The frontend goes: its clients' affinities go with it.
        f.lb_services.clear();
        f.sync();
        let swept = affinity.collect_garbage().unwrap();
        assert_eq!((swept.removed, swept.kept), (1, 0));
    });
}

/// Pod `pod`'s end of its veth (`peer`, host end `host`) moved into a namespace of its own,
/// with its address, MAC and routes as the plugin sets them.
fn pod_namespace(pod: Pod, host: &str, peer: &str) -> myelin_tests::Netns {
    // Tests run in parallel: each namespace gets a number of its own.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let netns = myelin_tests::Netns::create(format!("myelin-t{}-pod{n}", std::process::id()))
        .expect("pod namespace");
    let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    ip(&format!("link set {host} address {} up", mac(pod.host_mac)));
    ip(&format!(
        "link set {peer} address {} netns {}",
        mac(pod.mac),
        netns.name()
    ));
    for args in [
        format!("link set {peer} up"),
        format!("addr add {}/32 dev {peer}", pod.ip),
        format!(
            "neigh replace {GATEWAY} lladdr {} dev {peer} nud permanent",
            mac(pod.host_mac)
        ),
        format!("route add {GATEWAY} dev {peer} scope link"),
        format!("route add default via {GATEWAY} dev {peer}"),
    ] {
        netns
            .ip(&args.split_whitespace().collect::<Vec<_>>())
            .expect("pod setup");
    }
    netns
}

#[test]
fn a_pods_socket_reaches_the_backend_pod_through_the_cluster_ip() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let (client, server) = (
            pod_namespace(a, "lxca", "eth-a"),
            pod_namespace(b, "lxcb", "eth-b"),
        );
        f.dp.attach("lxca").expect("attach");
        f.dp.attach("lxcb").expect("attach");
        let listener = server
            .run(|| std::net::TcpListener::bind((b.ip, 8080)).expect("listen"))
            .expect("in the backend pod");
        let serve = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut conn, peer) = listener.accept().expect("accept");
            let mut buf = [0; 5];
            conn.read_exact(&mut buf).expect("read");
            conn.write_all(&buf).expect("write");
            peer
        });
        let echoed = client
            .run(|| {
                use std::io::{Read as _, Write as _};
                let frontend = std::net::SocketAddr::from((CLUSTER_IP, 80));
                let mut conn = std::net::TcpStream::connect_timeout(
                    &frontend,
                    std::time::Duration::from_secs(3),
                )
                .expect("connected through the ClusterIP");
                conn.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                    .unwrap();
                conn.write_all(b"hello").expect("write");
                let mut buf = [0; 5];
                conn.read_exact(&mut buf).expect("the backend's answer");
                (buf, conn.peer_addr().unwrap())
            })
            .expect("in the client pod");
        assert_eq!(
            echoed,
            (*b"hello", std::net::SocketAddr::from((CLUSTER_IP, 80)))
        );
        let peer = serve.join().unwrap();
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(a.ip),
            "the backend sees the client"
        );
    });
}

#[test]
fn egress_policy_is_checked_against_the_backend_and_its_port_not_the_service_port() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        f.isolate(a, ENDPOINT_F_EGRESS_ISOLATED);
        f.allow(a, Direction::Egress, b.identity, TCP, 80);
        let before = f.drops(DropReason::PolicyDeniedEgress);
        assert_eq!(f.send(a, &to_cluster_ip(a, 40000, 80, SYN)).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::PolicyDeniedEgress), before + 1);
        f.allow(a, Direction::Egress, b.identity, TCP, 8080);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40001, 80, SYN));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 8080))
        );
    });
}

#[test]
fn session_affinity_returns_the_same_backend() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        let backends = [(b.ip, 8080), (NO_POD, 8080)];
        let chosen = |f: &mut Fixture, sports: std::ops::Range<u16>| {
            sports
                .map(|sport| destination(&f.send(a, &to_cluster_ip(a, sport, 80, SYN)).1).0)
                .collect::<std::collections::BTreeSet<_>>()
        };
        // Without affinity, connections spread over both (all 64 on one: p = 2^-63).
        f.service(80, TCP, &backends, 0);
        assert_eq!(chosen(f, 40000..40064).len(), 2, "spread over the backends");
        f.service(80, TCP, &backends, 3600);
        let once = chosen(f, 41000..41032);
        assert_eq!(once.len(), 1, "one backend for the client");
        // Other backends come before it: the client keeps it in its new slot (each round a
        // random choice would hit it at 1 in 3 to 1 in 6).
        let mine = *once.first().unwrap();
        for extra in 1..=4u8 {
            let mut moved: Vec<_> = (0..extra)
                .map(|i| (Ipv4Addr::new(10, 0, 0, 20 + i), 8080))
                .collect();
            moved.extend(backends);
            f.service(80, TCP, &moved, 3600);
            let sport = 43000 + 100 * u16::from(extra);
            let kept = chosen(f, sport..sport + 4);
            assert_eq!(
                kept.into_iter().collect::<Vec<_>>(),
                vec![mine],
                "{extra} ahead"
            );
        }
        f.service(80, TCP, &backends, 3600);
        // That backend goes: the client gets one that is still there.
        let gone = *once.first().unwrap();
        let left: Vec<_> = backends
            .iter()
            .copied()
            .filter(|(ip, _)| *ip != gone)
            .collect();
        f.service(80, TCP, &left, 3600);
        let now = chosen(f, 42000..42008);
        assert_eq!(now.into_iter().collect::<Vec<_>>(), vec![left[0].0]);
    });
}

/// The agent forgets UDP flows to pairs its slots lost on a thread of its own, a while after it
/// decided which: a flow the datapath made in between, to a pair the map holds by then, stays.
/// (The first sync's check, made before any Service was there, took every UDP flow of a test
/// that was quick enough to make one before that thread ran.)
#[test]
fn udp_flows_are_forgotten_only_when_the_map_no_longer_holds_their_pair() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(53, UDP, &[(b.ip, 5353)], 0);
        let (verdict, out) = f.send(a, &udp(a, outside(CLUSTER_IP), 40000, 53));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 5353))
        );
        let pin = LbFlowTable::pin_path(f.dp.pin_dir());
        let mut flows = LbFlowTable::open(&pin).unwrap();
        assert_eq!(flows.entries().unwrap().len(), 2, "the flow, both ways");
        let pair = (
            CLUSTER_IP.octets(),
            53u16.to_be(),
            b.ip.octets(),
            5353u16.to_be(),
        );
        // Decided before the Service came (a first sync knows no pair), or when the pair left
        // before it came back: the map holds the pair now, the flow stays.
        for stale in [
            StaleUdpFlows::NotTo(BTreeSet::new()),
            StaleUdpFlows::To([pair].into()),
        ] {
            assert_eq!(flows.forget_udp_flows(&stale).unwrap(), 0, "{stale:?}");
        }
        assert_eq!(flows.entries().unwrap().len(), 2);
        // The backend leaves the slots: the agent's own thread forgets the flow.
        f.service(53, UDP, &[(NO_POD, 5353)], 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !flows.entries().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the flow to the backend that left is still there: {:?}",
                flows.entries().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (verdict, out) = f.send(a, &udp(a, outside(CLUSTER_IP), 40000, 53));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_OK, (NO_POD, 5353)),
            "its next datagram gets today's backend"
        );
    });
}

#[test]
fn later_fragments_of_a_translated_datagram_follow_their_first_fragment() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(53, UDP, &[(b.ip, 5353)], 0);
        let mut first = udp(a, outside(CLUSTER_IP), 40000, 53);
        set_fragment(&mut first, 77, true, 0);
        let (verdict, out) = f.send(a, &first);
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 5353))
        );
        let mut later = tcp(a, outside(CLUSTER_IP), 0, 0, 0);
        later[23] = UDP;
        set_fragment(&mut later, 77, false, 3);
        let (verdict, out) = f.send(a, &later);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the same backend");
        assert_eq!(Ipv4Addr::new(out[30], out[31], out[32], out[33]), b.ip);
        assert_eq!(checksum(&out[14..34]), 0, "IP header checksum");
    });
}

#[test]
fn a_backend_on_another_node_goes_into_the_tunnel_with_the_backend_as_inner_destination() {
    with_datapath(|f| {
        let a = f.a;
        let far = remote_pod(7, 400);
        f.behind("10.9.0.0/24", REMOTE_NODE_IP, identity::WORLD);
        f.behind("10.9.0.7/32", REMOTE_NODE_IP, far.identity);
        let tunnel = tunnel_device();
        f.services_on(CONFIG_F_TUNNEL, tunnel);
        f.service(80, TCP, &[(far.ip, 8080)], 0);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel device");
        assert_eq!(destination(&out), (far.ip, 8080));
        assert_eq!(out[14 + 8], 63, "TTL decremented: the node routed it");
        assert_checksums(&out);
    });
}

#[test]
fn without_the_services_flag_nothing_is_translated() {
    with_datapath(|f| {
        let b = f.b;
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let syn = to_cluster_ip(f.a, 40000, 80, SYN);
        let (verdict, out) = f.send(f.a, &syn);
        assert_eq!((verdict, out), (TC_ACT_OK, syn), "the stack's, untouched");
    });
}

#[test]
fn a_reply_whose_translation_was_evicted_is_dropped_as_service_translation_lost() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let (_, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        let pin = LbFlowTable::pin_path(f.dp.pin_dir());
        let data = aya::maps::MapData::from_pin(&pin).expect("lb_flows pin");
        let mut flows: aya::maps::HashMap<_, LbFlowKey, LbFlow> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("lb_flows");
        let reply_key = LbFlowKey {
            saddr: b.ip.octets(),
            daddr: a.ip.octets(),
            sport: 8080u16.to_be(),
            dport: 40000u16.to_be(),
            protocol: TCP,
            direction: LB_IN,
            _pad: 0,
        };
        flows
            .remove(&reply_key)
            .expect("the reply's translation was there");
        let before = f.drops(DropReason::ServiceTranslationLost);
        let (verdict, _) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "the client could not tell it for its own"
        );
        assert_eq!(f.drops(DropReason::ServiceTranslationLost), before + 1);
    });
}

#[test]
fn an_icmp_error_from_the_backend_reaches_the_client_about_the_frontend() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(53, UDP, &[(b.ip, 5353)], 0);
        let query = checksummed(udp(a, outside(CLUSTER_IP), 40000, 53));
        let (_, out) = f.send(a, &query);
        assert_eq!(destination(&out), (b.ip, 5353));
        // Nothing listens on the backend's port: it answers with port unreachable.
        let error = sent_by(
            b,
            icmp_error(b.ip, a.ip, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &out),
        );
        let (verdict, back) = f.send(b, &error);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the client");
        assert_eq!(source(&back).0, CLUSTER_IP, "from the frontend");
        assert_eq!(
            destination(&quoted(&back)),
            (CLUSTER_IP, 53),
            "about the packet the client sent"
        );
        assert_eq!(source(&quoted(&back)), (a.ip, 40000));
        assert_checksums(&back);

        // A router on the way (through the node's stack): its own address stays.
        let error = icmp_error(ROUTER, a.ip, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, &out);
        let (verdict, back) = f.run(Program::ToContainer, &error, a.ifindex);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(source(&back).0, ROUTER);
        assert_eq!(destination(&quoted(&back)), (CLUSTER_IP, 53));
        assert_checksums(&back);
    });
}

#[test]
fn a_clients_icmp_error_about_a_backends_reply_reaches_the_backend_about_its_own_packet() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        f.services_on(0, 0);
        f.service(53, UDP, &[(b.ip, 5353)], 0);
        let query = checksummed(udp(a, outside(CLUSTER_IP), 40000, 53));
        let (_, out) = f.send(a, &query);
        let (_, answer) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(source(&answer), (CLUSTER_IP, 53));
        // The client's socket is gone: port unreachable, about the answer as the client got it.
        let error = sent_by(
            a,
            icmp_error(
                a.ip,
                CLUSTER_IP,
                ICMP_DEST_UNREACH,
                ICMP_PORT_UNREACH,
                &answer,
            ),
        );
        let (verdict, to_backend) = f.send(a, &error);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the backend");
        assert_eq!(destination(&to_backend).0, b.ip);
        assert_eq!(
            source(&quoted(&to_backend)),
            (b.ip, 5353),
            "about what it sent"
        );
        assert_eq!(destination(&quoted(&to_backend)), (a.ip, 40000));
        assert_checksums(&to_backend);
    });
}

#[test]
fn a_pod_reaching_itself_through_a_service_gets_the_hairpin_address_as_source() {
    with_datapath(|f| {
        let a = f.a;
        let hairpin = Ipv4Addr::new(169, 254, 42, 1);
        f.services_on(0, 0);
        f.service(80, TCP, &[(a.ip, 8080)], 0);
        // Its policies do not apply, as to a pod reaching itself directly.
        f.isolate(a, ENDPOINT_F_INGRESS_ISOLATED | ENDPOINT_F_EGRESS_ISOLATED);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT, "back into the pod");
        assert_eq!(destination(&out), (a.ip, 8080));
        assert_eq!(
            source(&out),
            (hairpin, 40000),
            "not its own address: its stack would drop that as martian"
        );
        assert_eq!(&out[0..6], &a.mac);
        assert_checksums(&out);
        let (verdict, back) = f.send(a, &sent_by(a, reply_to(&out)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the pod, as the client");
        assert_eq!(source(&back), (CLUSTER_IP, 80));
        assert_eq!(destination(&back), (a.ip, 40000));
        assert_eq!(&back[0..6], &a.mac);
        assert_checksums(&back);
        // A policy change re-checks the flow: still the pod's own.
        f.allow(a, Direction::Egress, identity::WORLD, UDP, 53);
        let (verdict, _) = f.send(a, &to_cluster_ip(a, 40000, 80, ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
    });
}

#[test]
fn a_backend_outside_the_pods_is_left_to_the_stack_and_its_reply_translated_in_to_container() {
    with_datapath(|f| {
        let a = f.a;
        f.services_on(0, 0);
        f.service(443, TCP, &[(WORLD, 8443)], 0);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 443, SYN));
        assert_eq!(
            verdict, TC_ACT_OK,
            "the stack routes it (and masquerading translates it)"
        );
        assert_eq!(destination(&out), (WORLD, 8443));
        assert_checksums(&out);
        // The answer comes back through the stack, into the client's veth.
        let (verdict, back) = f.run(Program::ToContainer, &reply_to(&out), a.ifindex);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            source(&back),
            (CLUSTER_IP, 443),
            "from the frontend it addressed"
        );
        assert_checksums(&back);
    });
}

// ---- native routing: other nodes' packets straight into the pods ------------------------

/// The MAC of the uplink in the native routing tests, and of the next hop behind it.
const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 7, 1];
const NEXT_HOP_MAC: [u8; 6] = [2, 0, 0, 0, 7, 2];

fn ip(args: &str) {
    let status = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("ip");
    assert!(status.success(), "ip {args}");
}

impl Fixture {
    /// Native routing as the agent sets it up: an uplink `up0` (192.168.7.1/24, UPLINK_MAC)
    /// with a route to the other node's pods (10.9.0.0/24, identity 400) through a resolved
    /// neighbour, forwarding on, this node's pods in 10.0.0.0/24. Returns the uplink's ifindex.
    fn native_uplink(&mut self) -> u32 {
        ip("link add up0 address 02:00:00:00:07:01 type veth peer name up0p");
        for dev in ["up0", "up0p", "lxca", "eth-a", "lxcb", "eth-b"] {
            ip(&format!("link set {dev} up"));
        }
        ip("addr add 192.168.7.1/24 dev up0");
        ip("neigh replace 192.168.7.2 lladdr 02:00:00:00:07:02 dev up0 nud permanent");
        ip("route add 10.9.0.0/24 via 192.168.7.2 dev up0");
        // The test's own namespace: /proc/sys/net is the calling thread's.
        for dev in ["all", "lxca", "lxcb", "up0"] {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), "1")
                .expect("forwarding");
        }
        let uplink = nix::net::if_::if_nametoindex("up0").expect("ifindex");
        self.dp
            .set_pod_cidr("10.0.0.0/24".parse().unwrap())
            .expect("set_pod_cidr");
        self.dp
            .set_routing(Routing {
                flags: CONFIG_F_NATIVE,
                node_ip: Ipv4Addr::new(192, 168, 7, 1),
                tunnel_ifindex: 0,
                uplink_ifindex: uplink,
                uplink_subnet: Some("192.168.7.0/24".parse().unwrap()),
            })
            .expect("set_routing");
        self.behind("10.9.0.0/24", REMOTE_NODE_IP, 400);
        uplink
    }
}

/// `pod` as the sender of a frame arriving on the uplink: from the next hop, to the uplink.
fn from_node(pod: Pod) -> Pod {
    Pod {
        mac: NEXT_HOP_MAC,
        host_mac: UPLINK_MAC,
        ..pod
    }
}

#[test]
fn native_routing_delivers_a_remote_pods_connection_straight_into_the_pod_and_back() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        let far = from_node(remote_pod(7, 400));
        let (verdict, out) = f.run(Program::FromUplink, &tcp(far, a, 40000, 80, SYN), uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the pod");
        assert_eq!(&out[0..6], &a.mac, "destination MAC is the pod's");
        assert_eq!(&out[6..12], &a.host_mac, "source MAC is the pod's gateway");
        assert_eq!(out[14 + 8], 63, "TTL decremented: the node routed it");
        assert_eq!(checksum(&out[14..34]), 0, "IP checksum still valid");

        // The pod's answer leaves out of the uplink, not through the stack: the flow is not
        // the stack's. The node is on the uplink's subnet: the kernel's neighbour output
        // writes the MACs once the redirect is done (test runs stop before), no FIB lookup.
        let answer = tcp(a, far, 80, 40000, SYN | ACK);
        let (verdict, out) = f.send(a, &answer);
        assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
        assert_eq!(
            &out[0..12],
            &answer[0..12],
            "MACs left to the neighbour output"
        );
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        assert_eq!(checksum(&out[14..34]), 0, "IP checksum still valid");

        // The rest of the flow, and a ping, take the same way in.
        let (verdict, _) = f.run(Program::FromUplink, &tcp(far, a, 40000, 80, ACK), uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "an established flow");
        let ping = icmp_echo(far, a, ICMP_ECHO_REQUEST, 9);
        assert_eq!(f.run(Program::FromUplink, &ping, uplink).0, TC_ACT_REDIRECT);
        let pong = icmp_echo(a, far, ICMP_ECHO_REPLY, 9);
        assert_eq!(
            f.send(a, &pong).0,
            TC_ACT_REDIRECT,
            "the echo reply leaves too"
        );

        // Counted once each way: nothing went through to_container as well.
        let c = f.dp.endpoint_counters(a.id);
        assert_eq!((c.rx_packets, c.tx_packets), (3, 2));
    });
}

/// A node that is not on the uplink's subnet is reached through a router: the FIB gives the
/// next hop, and the packet leaves with the router's MAC as destination.
#[test]
fn native_routing_asks_the_fib_for_a_node_behind_a_router() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        ip("neigh replace 192.168.7.254 lladdr 02:00:00:00:07:fe dev up0 nud permanent");
        ip("route add 10.8.0.0/24 via 192.168.7.254 dev up0");
        f.behind("10.8.0.0/24", Ipv4Addr::new(172, 16, 9, 2), 401);
        let far = Pod {
            ip: Ipv4Addr::new(10, 8, 0, 7),
            ..remote_pod(7, 401)
        };
        let (verdict, out) = f.send(a, &tcp(a, far, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 7, 0xfe], "to the router");
        assert_eq!(&out[6..12], &UPLINK_MAC, "from the uplink");
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        assert_eq!(checksum(&out[14..34]), 0, "IP checksum still valid");
        // Without the uplink's subnet (an uplink named by --uplink that does not hold the
        // node's address), a node on the same wire goes through the FIB too.
        f.dp.set_routing(Routing {
            flags: CONFIG_F_NATIVE,
            node_ip: Ipv4Addr::new(192, 168, 7, 1),
            tunnel_ifindex: 0,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .expect("set_routing");
        let near = remote_pod(7, 400);
        let (verdict, out) = f.send(a, &tcp(a, near, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[0..6], &NEXT_HOP_MAC, "to the node, by the FIB");
        assert_eq!(&out[6..12], &UPLINK_MAC);
    });
}

#[test]
fn native_routing_delivers_the_answers_to_a_pods_own_connection() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        let far = from_node(remote_pod(7, 400));
        assert_eq!(f.send(a, &tcp(a, far, 40000, 80, SYN)).0, TC_ACT_REDIRECT);
        let answer = tcp(far, a, 80, 40000, SYN | ACK);
        assert_eq!(
            f.run(Program::FromUplink, &answer, uplink).0,
            TC_ACT_REDIRECT
        );
        let ping = icmp_echo(a, far, ICMP_ECHO_REQUEST, 5);
        assert_eq!(f.send(a, &ping).0, TC_ACT_REDIRECT);
        let pong = icmp_echo(far, a, ICMP_ECHO_REPLY, 5);
        assert_eq!(f.run(Program::FromUplink, &pong, uplink).0, TC_ACT_REDIRECT);
    });
}

#[test]
fn native_routing_leaves_to_the_stack_what_it_cannot_tell_is_its_own() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        let far = from_node(remote_pod(7, 400));
        let mut passes = vec![
            // Untracked and not opening anything: perhaps the answer to a connection the
            // node translated (a Service), which the stack must translate back.
            ("an untracked ACK", tcp(far, a, 40000, 80, ACK)),
            ("an untracked SYN-ACK", tcp(far, a, 80, 40001, SYN | ACK)),
            ("untracked UDP", udp(far, a, 5353, 53)),
            (
                "an untracked echo reply",
                icmp_echo(far, a, ICMP_ECHO_REPLY, 3),
            ),
            // No endpoint at an address of the pod CIDR: the stack decides, as before.
            (
                "no endpoint",
                tcp(far, outside(Ipv4Addr::new(10, 0, 0, 99)), 40000, 80, SYN),
            ),
            // A source among this node's own pods cannot come from another node.
            (
                "a local pod's source",
                tcp(from_node(f.b), a, 40000, 80, SYN),
            ),
        ];
        let mut other_host = tcp(far, a, 40000, 80, SYN);
        other_host[0..6].copy_from_slice(&[2, 0, 0, 0, 7, 9]);
        passes.push(("a frame for another host", other_host));
        passes.push(("TTL 1", {
            let mut p = tcp(far, a, 40000, 80, SYN);
            p[14 + 8] = 1;
            p[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
            let sum = checksum(&p[14..34]);
            p[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
            p
        }));
        passes.push(("a first fragment", {
            let mut p = tcp(far, a, 40000, 80, SYN);
            set_fragment(&mut p, 77, true, 0);
            p
        }));
        let taken: Vec<&str> = passes
            .iter()
            .filter(|(_, packet)| {
                f.run(Program::FromUplink, packet, uplink) != (TC_ACT_OK, packet.clone())
            })
            .map(|(what, _)| *what)
            .collect();
        assert_eq!(taken, [] as [&str; 0], "to the stack, untouched");
        // A tracked flow's fragments go to the stack too, where to_container lets them in.
        assert_eq!(f.send(a, &udp(a, far, 40000, 53)).0, TC_ACT_REDIRECT);
        let mut fragment = udp(far, a, 53, 40000);
        set_fragment(&mut fragment, 78, true, 0);
        assert_eq!(f.run(Program::FromUplink, &fragment, uplink).0, TC_ACT_OK);
        assert_eq!(f.deliver(a, &fragment), TC_ACT_OK);
        let c = f.dp.endpoint_counters(a.id);
        assert_eq!(c.rx_packets, 1, "counted by to_container only");
    });
}

#[test]
fn native_routing_checks_the_pods_ingress_policy_against_the_senders_identity() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        let far = from_node(remote_pod(7, 400));
        let mut ring = f.dp.take_events().expect("ring buffer");
        f.dp.set_event_mask(EVENTS_DROPS).unwrap();
        f.isolate(a, ENDPOINT_F_INGRESS_ISOLATED);
        let before = f.drops(DropReason::PolicyDeniedIngress);
        let syn = tcp(far, a, 40000, 80, SYN);
        assert_eq!(f.run(Program::FromUplink, &syn, uplink).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::PolicyDeniedIngress), before + 1);
        let item = ring.next().expect("an event");
        // SAFETY: the ring holds FlowEvent records written by the datapath.
        let e: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        assert_eq!(e.kind, EVENT_DROP);
        assert_eq!(e.reason, DropReason::PolicyDeniedIngress as u8);
        assert_eq!(e.direction, Direction::Ingress as u8);
        assert_eq!((e.saddr, e.daddr), (far.ip.octets(), a.ip.octets()));
        assert_eq!((e.sport, e.dport, e.protocol), (40000, 80, TCP));
        assert_eq!((e.src_endpoint, e.dst_endpoint), (0, a.id));
        assert_eq!((e.src_identity, e.dst_identity), (far.identity, a.identity));
        drop(item);
        assert!(ring.next().is_none(), "one drop, one event");

        // A rule for the sender's identity on the port lets that port in, and no other.
        f.allow(a, Direction::Ingress, far.identity, TCP, 80);
        assert_eq!(f.run(Program::FromUplink, &syn, uplink).0, TC_ACT_REDIRECT);
        let other_port = tcp(far, a, 40001, 81, SYN);
        assert_eq!(
            f.run(Program::FromUplink, &other_port, uplink).0,
            TC_ACT_SHOT
        );
        let ping = icmp_echo(far, a, ICMP_ECHO_REQUEST, 4);
        assert_eq!(f.run(Program::FromUplink, &ping, uplink).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::PolicyDeniedIngress), before + 3);
    });
}

#[test]
fn without_native_routing_the_uplink_delivers_nothing_to_pods() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        let far = from_node(remote_pod(7, 400));
        let syn = tcp(far, a, 40000, 80, SYN);
        for flags in [0, CONFIG_F_TUNNEL, CONFIG_F_MASQUERADE] {
            f.dp.set_routing(Routing {
                flags,
                node_ip: Ipv4Addr::new(192, 168, 7, 1),
                tunnel_ifindex: 0,
                uplink_ifindex: uplink,
                uplink_subnet: None,
            })
            .unwrap();
            assert_eq!(
                f.run(Program::FromUplink, &syn, uplink),
                (TC_ACT_OK, syn.clone()),
                "flags {flags:#x}: up the stack, untouched"
            );
        }
        let c = f.dp.endpoint_counters(a.id);
        assert_eq!(c.rx_packets, 0);
    });
}

#[test]
fn native_routing_keeps_the_masquerading_reverse_path() {
    with_datapath(|f| {
        f.masquerade(NAT_PORTS);
        f.routing(CONFIG_F_MASQUERADE | CONFIG_F_NATIVE);
        let (a, world) = (f.a, outside(WORLD));
        let packet = checksummed(tcp(a, world, 61000, 443, SYN));
        let out = f.pod_sends(a, &packet);
        assert_eq!(source(&out), (NODE_IP, 61000));
        let back = f.world_sends(&reply_to(&out));
        assert_eq!(
            destination(&back),
            source(&packet),
            "translated back to the pod"
        );
        assert_eq!(source(&back), destination(&packet));
        assert_checksums(&back);
        assert_eq!(f.deliver(a, &back), TC_ACT_OK, "a reply the pod takes");
    });
}

#[test]
fn a_pods_packet_routed_to_another_node_passes_the_masquerading_uplink_without_a_lookup() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        let far = remote_pod(7, 400);
        let run = |f: &mut Fixture, program, packet: &[u8], ifindex, mark| {
            f.dp.test_run_marked(program, packet, ifindex, mark)
                .expect("test run")
        };
        // Without masquerading there is no to_uplink to clear a mark: none is set.
        let (verdict, _, mark) = run(
            f,
            Program::FromContainer,
            &tcp(a, far, 40000, 80, SYN),
            a.ifindex,
            0,
        );
        assert_eq!((verdict, mark), (TC_ACT_REDIRECT, 0));

        f.dp.set_routing(Routing {
            flags: CONFIG_F_NATIVE | CONFIG_F_MASQUERADE,
            node_ip: Ipv4Addr::new(192, 168, 7, 1),
            tunnel_ifindex: 0,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .unwrap();
        f.dp.set_masquerade(Masquerade {
            pod_cidr: "10.0.0.0/24".parse().unwrap(),
            ports: NAT_PORTS,
        })
        .unwrap();
        let (verdict, out, mark) = run(
            f,
            Program::FromContainer,
            &tcp(a, far, 40000, 80, ACK),
            a.ifindex,
            0,
        );
        assert_eq!((verdict, mark), (TC_ACT_REDIRECT, MARK_ROUTED_TO_NODE));
        let (verdict, left, mark) = run(f, Program::ToUplink, &out, uplink, MARK_ROUTED_TO_NODE);
        assert_eq!(
            (verdict, mark),
            (TC_ACT_OK, 0),
            "passed, and the mark cleared"
        );
        assert_eq!(left, out, "untranslated");

        // What goes to the stack is never marked, and is masqueraded on the uplink.
        let world = outside(WORLD);
        let packet = checksummed(tcp(a, world, 40001, 443, SYN));
        let (verdict, _, mark) = run(f, Program::FromContainer, &packet, a.ifindex, 0);
        assert_eq!((verdict, mark), (TC_ACT_OK, 0));
        let (verdict, left, _) = run(f, Program::ToUplink, &packet, uplink, 0);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            source(&left).0,
            Ipv4Addr::new(192, 168, 7, 1),
            "masqueraded"
        );
        // Someone else's mark is left alone, and means nothing to masquerading.
        let packet = checksummed(tcp(a, world, 40002, 443, SYN));
        let (verdict, left, mark) = run(f, Program::ToUplink, &packet, uplink, 0x4000);
        assert_eq!((verdict, mark), (TC_ACT_OK, 0x4000));
        assert_eq!(
            source(&left).0,
            Ipv4Addr::new(192, 168, 7, 1),
            "masqueraded"
        );
        assert_eq!(
            f.nat_entries(),
            4,
            "two flows translated, the routed one not"
        );
    });
}

#[test]
fn native_routing_turns_a_remote_backends_reply_back_into_the_frontend() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.native_uplink();
        f.services_on(CONFIG_F_NATIVE, 0);
        let far = from_node(remote_pod(7, 400));
        f.service(80, TCP, &[(far.ip, 8080)], 0);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
        assert_eq!(destination(&out), (far.ip, 8080));
        let mut answer = reply_to(&out);
        answer[0..6].copy_from_slice(&UPLINK_MAC);
        answer[6..12].copy_from_slice(&NEXT_HOP_MAC);
        let (verdict, back) = f.run(Program::FromUplink, &answer, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "straight into the client");
        assert_eq!(source(&back), (CLUSTER_IP, 80));
        assert_eq!(&back[0..6], &a.mac);
        assert_eq!(back[14 + 8], answer[14 + 8] - 1, "TTL decremented");
        assert_checksums(&back);
    });
}

// ---- cost per packet ---------------------------------------------------------------------

/// Median over many runs of `program` on `packet`, as the kernel timed them. One run per
/// call: with a repeat count the kernel runs the packet the previous run left, and a program
/// that rewrites it (MACs, TTL) would measure something else from the second run on (
/// `from_container` a drop for a spoofed source MAC). Each figure includes the timer's own
/// cost: compare with the baseline printed first.
fn ns_per_run(f: &mut Fixture, program: Program, packet: &[u8], ifindex: u32) -> f64 {
    let mut samples: Vec<f64> = (0..20_000)
        .map(|_| {
            f.dp.time_run(program, packet, ifindex, 1)
                .expect("timed run")
                .as_nanos() as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn cost_per_packet_on_established_flows() {
    with_datapath(|f| {
        let (a, b) = (f.a, f.b);
        assert_eq!(f.send(a, &tcp(a, b, 40000, 80, SYN)).0, TC_ACT_REDIRECT);
        assert_eq!(
            f.send(b, &tcp(b, a, 80, 40000, SYN | ACK)).0,
            TC_ACT_REDIRECT
        );
        // Baseline: a program that does nothing but read the config (from_uplink without a
        // routing mode) - the timer's cost and the run's.
        let idle = tcp(a, b, 40000, 80, ACK);
        let r = ns_per_run(f, Program::FromUplink, &idle, 1);
        println!("baseline (from_uplink, idle):       {r:.1} ns");
        let fwd = tcp(a, b, 40000, 80, ACK);
        let rev = tcp(b, a, 80, 40000, ACK);
        let r = ns_per_run(f, Program::FromContainer, &fwd, a.ifindex);
        println!("from_container, same node, forward: {r:.1} ns");
        let r = ns_per_run(f, Program::FromContainer, &rev, b.ifindex);
        println!("from_container, same node, reply:   {r:.1} ns");
        let r = ns_per_run(f, Program::ToContainer, &fwd, b.ifindex);
        println!("to_container, forward:              {r:.1} ns");

        // Services on: the same flow pays the frontend lookup; a Service's connection its
        // translation both ways.
        f.services_on(0, 0);
        let r = ns_per_run(f, Program::FromContainer, &fwd, a.ifindex);
        println!("from_container, services on, fwd:   {r:.1} ns");
        f.service(80, TCP, &[(b.ip, 8080)], 0);
        let (verdict, out) = f.send(a, &to_cluster_ip(a, 40001, 80, SYN));
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 8080))
        );
        let (verdict, _) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let to_service = to_cluster_ip(a, 40001, 80, ACK);
        let r = ns_per_run(f, Program::FromContainer, &to_service, a.ifindex);
        println!("from_container, to a ClusterIP:     {r:.1} ns");
        let (_, out) = f.send(a, &to_service);
        let from_backend = sent_by(b, reply_to(&out));
        let r = ns_per_run(f, Program::FromContainer, &from_backend, b.ifindex);
        println!("from_container, backend's reply:    {r:.1} ns");
        f.dp.set_routing(Routing::default()).unwrap();

        // Native routing: an uplink with a route to the remote pod CIDR through a resolved
        // neighbour, so that the FIB answers.
        let uplink = f.native_uplink();
        let far = remote_pod(7, 400);
        let (verdict, _) = f.send(a, &tcp(a, far, 40000, 80, SYN));
        assert_eq!(verdict, TC_ACT_REDIRECT, "routed through the FIB");
        let out = tcp(a, far, 40000, 80, ACK);
        let (verdict, o) = f.send(a, &out);
        assert_eq!(verdict, TC_ACT_REDIRECT, "routed through the FIB");
        assert_eq!(&o[0..6], &[2, 0, 0, 0, 7, 2], "to the next hop");
        let r = ns_per_run(f, Program::FromContainer, &out, a.ifindex);
        println!("from_container, native:             {r:.1} ns");
        let into = tcp(from_node(far), a, 80, 40000, ACK);
        let r = ns_per_run(f, Program::FromUplink, &into, uplink);
        println!("from_uplink, native, into the pod:  {r:.1} ns");

        let tunnel = tunnel_device();
        ip("link set tun0 up");
        f.dp.set_routing(Routing {
            flags: CONFIG_F_TUNNEL,
            node_ip: Ipv4Addr::new(192, 168, 7, 1),
            tunnel_ifindex: tunnel,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .unwrap();
        let r = ns_per_run(f, Program::FromContainer, &out, a.ifindex);
        println!("from_container, tunnel:             {r:.1} ns");
        let back = tcp(far, a, 80, 40000, ACK);
        let r = ns_per_run(f, Program::ToContainer, &back, a.ifindex);
        println!("to_container, from another node:    {r:.1} ns");
    });
}

// ---- node ports and external IPs from outside, through the uplink --------------------------

/// The node's address on `up0` (see `native_uplink`), a node port on it, and an external IP.
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 1);
const NODE_PORT: u16 = 30080;
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

impl Fixture {
    /// Services on a node in native routing (`native_uplink`), with a default route through
    /// the next hop (where the world is) and masquerading's port range, which node ports'
    /// source NAT takes its ports from. Returns the uplink's ifindex.
    fn services_on_uplink(&mut self) -> u32 {
        let uplink = self.native_uplink();
        ip("route add default via 192.168.7.2 dev up0");
        self.dp
            .set_masquerade(Masquerade {
                pod_cidr: "10.0.0.0/24".parse().unwrap(),
                ports: NAT_PORTS,
            })
            .expect("set_masquerade");
        self.dp
            .set_routing(Routing {
                flags: CONFIG_F_NATIVE | CONFIG_F_SERVICES,
                node_ip: UPLINK_IP,
                tunnel_ifindex: 0,
                uplink_ifindex: uplink,
                uplink_subnet: None,
            })
            .expect("set_routing");
        uplink
    }

    /// The frontend `addr`:`port`/`protocol` with `flags` (`LB_F_*`) and `backends`.
    fn frontend(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        protocol: u8,
        flags: u32,
        backends: &[(Ipv4Addr, u16)],
    ) {
        let service = LbEntry {
            count: backends.len() as u16,
            flags,
            ..LbEntry::default()
        };
        self.slots(addr, port, protocol, service, backends);
    }
}

/// A packet from the world (through the next hop) to `to`:`dport`, with valid checksums.
fn from_world(protocol: u8, to: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let (world, to) = (from_node(outside(WORLD)), outside(to));
    checksummed(match protocol {
        TCP => tcp(world, to, sport, dport, flags),
        _ => udp(world, to, sport, dport),
    })
}

/// `p` as the next hop hands it to the uplink.
fn via_next_hop(mut p: Vec<u8>) -> Vec<u8> {
    p[0..6].copy_from_slice(&UPLINK_MAC);
    p[6..12].copy_from_slice(&NEXT_HOP_MAC);
    p
}

#[test]
fn a_node_port_goes_straight_into_a_local_backend_and_its_reply_out_of_the_uplink() {
    with_datapath(|f| {
        let b = f.b;
        let uplink = f.services_on_uplink();
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT, &[(b.ip, 8080)]);
        let syn = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, SYN);
        let (verdict, out) = f.run(Program::FromUplink, &syn, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the backend pod");
        assert_eq!(
            destination(&out),
            (b.ip, 8080),
            "the backend, its target port"
        );
        assert_eq!(
            source(&out),
            (WORLD, 40000),
            "a local backend sees the client"
        );
        assert_eq!(&out[0..6], &b.mac);
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        assert_checksums(&out);

        // The answer leaves from the node port, through the FIB, not the stack (which would
        // refuse its own address as the source of what it forwards).
        let (verdict, back) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
        assert_eq!(source(&back), (UPLINK_IP, NODE_PORT));
        assert_eq!(destination(&back), (WORLD, 40000));
        assert_eq!(&back[0..6], &NEXT_HOP_MAC, "to the next hop");
        assert_checksums(&back);

        // The rest of the connection.
        let ack = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, ACK);
        let (verdict, out) = f.run(Program::FromUplink, &ack, uplink);
        assert_eq!(
            (verdict, destination(&out)),
            (TC_ACT_REDIRECT, (b.ip, 8080))
        );
    });
}

impl Fixture {
    /// Maglev's tables of `size` entries for the frontends now in the slots, as the agent
    /// computes them with `--lb-algorithm maglev`.
    fn maglev(&mut self, size: u32) {
        self.lb_maglev = myelin_agent::desired::services::maglev::tables(
            &self.lb_services,
            size,
            &BTreeMap::new(),
        );
        self.sync();
    }
}

/// Where the node-port frontend at `frontend` sends a new TCP connection from the world's port
/// `sport` (a SYN through the uplink), and the client's next packet.
fn node_port_backend(f: &mut Fixture, uplink: u32, frontend: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let syn = from_world(TCP, frontend, sport, NODE_PORT, SYN);
    let (verdict, out) = f.run(Program::FromUplink, &syn, uplink);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{frontend} from port {sport}");
    destination(&out).0
}

/// The backend the Maglev table of `frontend` in `tables` gives the world's connection from
/// `sport`.
fn table_backend(
    tables: &myelin_agent::desired::services::maglev::Tables,
    frontend: Ipv4Addr,
    sport: u16,
    backends: &[Ipv4Addr],
) -> Ipv4Addr {
    let table = &tables[&lb_key(frontend, NODE_PORT, TCP, 0)];
    let hash =
        myelin_common::maglev::flow_hash(WORLD.octets(), sport.to_be(), NODE_PORT.to_be(), TCP);
    let slot = table.entries[(hash % table.entries.len() as u32) as usize];
    backends[usize::from(slot) - 1]
}

/// `--lb-algorithm maglev`: a node port's new connection goes to the backend its flow hashes to
/// in the table, whichever node's address it asked (`EXTERNAL_IP` stands for another node's:
/// the datapath goes by the frontend's flags); removing a backend moves its clients' new
/// connections and (almost) no one else's, while established connections keep their backend,
/// the removed one's included.
#[test]
fn with_maglev_a_client_connection_gets_the_same_backend_through_every_node() {
    with_datapath(|f| {
        let uplink = f.services_on_uplink();
        let backends: Vec<Ipv4Addr> = (7..10).map(|n| remote_pod(n, 400).ip).collect();
        let with_port: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (*b, 8080)).collect();
        for node in [UPLINK_IP, EXTERNAL_IP] {
            f.frontend(node, NODE_PORT, TCP, LB_F_NODEPORT, &with_port);
        }
        f.maglev(251);
        let clients: Vec<u16> = (41_000..41_060).collect();
        let mut before = BTreeMap::new();
        for &sport in &clients {
            let expected = table_backend(&f.lb_maglev, UPLINK_IP, sport, &backends);
            for node in [UPLINK_IP, EXTERNAL_IP] {
                assert_eq!(
                    node_port_backend(f, uplink, node, sport),
                    expected,
                    "the world's port {sport} through {node}: the table's backend"
                );
            }
            before.insert(sport, expected);
        }
        let used: std::collections::BTreeSet<_> = before.values().collect();
        assert_eq!(used.len(), 3, "the clients spread over every backend");

        // Backend 2 goes: the slots and tables change together, as the agent writes them.
        let (gone, rest) = (backends[1], [backends[0], backends[2]]);
        let old = f.lb_maglev.clone();
        for node in [UPLINK_IP, EXTERNAL_IP] {
            f.lb_services.retain(|k, _| k.addr != node.octets());
            f.frontend(
                node,
                NODE_PORT,
                TCP,
                LB_F_NODEPORT,
                &[(rest[0], 8080), (rest[1], 8080)],
            );
        }
        f.maglev(251);
        // New connections (new ports: the earlier ones are established).
        let (mut moved, mut stayed) = (0, 0);
        for sport in clients.iter().map(|p| p + 1000) {
            let expected = table_backend(&f.lb_maglev, UPLINK_IP, sport, &rest);
            assert_eq!(node_port_backend(f, uplink, EXTERNAL_IP, sport), expected);
            let was = table_backend(&old, UPLINK_IP, sport, &backends);
            if was != gone {
                if was == expected {
                    stayed += 1;
                } else {
                    moved += 1;
                }
            }
        }
        assert!(
            stayed > 20 && moved <= 1,
            "of the remaining backends' clients {stayed} stayed and {moved} moved"
        );
        // Established connections keep theirs, the removed backend's too (they drain).
        for (&sport, &backend) in &before {
            let ack = from_world(TCP, UPLINK_IP, sport, NODE_PORT, ACK);
            let (_, out) = f.run(Program::FromUplink, &ack, uplink);
            assert_eq!(destination(&out).0, backend, "port {sport}'s connection");
        }

        // An entry beyond the count (a table of other slots) is not trusted: a random backend.
        let frontend = lb_key(UPLINK_IP, NODE_PORT, TCP, 0);
        f.lb_maglev.insert(
            frontend,
            std::sync::Arc::new(myelin_agent::desired::services::maglev::Lookup {
                backends: Vec::new(),
                entries: vec![3; 251],
            }),
        );
        f.sync();
        for sport in 43_000..43_020 {
            let b = node_port_backend(f, uplink, UPLINK_IP, sport);
            assert!(rest.contains(&b), "port {sport}: {b} is no backend");
        }
    });
}

#[test]
fn a_node_ports_remote_backend_gets_the_nodes_address_and_its_reply_goes_back_to_the_client() {
    with_datapath(|f| {
        let uplink = f.services_on_uplink();
        let far = remote_pod(7, 400);
        for protocol in [TCP, UDP] {
            f.frontend(
                UPLINK_IP,
                NODE_PORT,
                protocol,
                LB_F_NODEPORT,
                &[(far.ip, 8080)],
            );
            let what = format!("protocol {protocol}");
            let first = from_world(protocol, UPLINK_IP, 40000, NODE_PORT, SYN);
            let (verdict, out) = f.run(Program::FromUplink, &first, uplink);
            assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: on to the backend's node");
            assert_eq!(destination(&out), (far.ip, 8080), "{what}");
            let (snat, port) = source(&out);
            assert_eq!(snat, UPLINK_IP, "{what}: the backend sees the node");
            assert!(
                (NAT_PORTS.min..=NAT_PORTS.max).contains(&port),
                "{what}: a port of the NAT range, not {port}"
            );
            assert_eq!(&out[0..6], &NEXT_HOP_MAC, "{what}");
            assert_checksums(&out);

            let (verdict, back) = f.run(Program::FromUplink, &via_next_hop(reply_to(&out)), uplink);
            assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: out to the client");
            assert_eq!(source(&back), (UPLINK_IP, NODE_PORT), "{what}");
            assert_eq!(destination(&back), (WORLD, 40000), "{what}");
            assert_eq!(&back[0..6], &NEXT_HOP_MAC, "{what}");
            assert_checksums(&back);

            // The client's next packet takes the same port.
            let again = from_world(protocol, UPLINK_IP, 40000, NODE_PORT, ACK);
            let (_, out) = f.run(Program::FromUplink, &again, uplink);
            assert_eq!(source(&out), (UPLINK_IP, port), "{what}");
        }
    });
}

#[test]
fn an_external_ip_is_served_from_the_uplink_and_a_cluster_ip_is_not() {
    with_datapath(|f| {
        let b = f.b;
        let uplink = f.services_on_uplink();
        f.frontend(EXTERNAL_IP, 80, UDP, LB_F_EXTERNAL_IP, &[(b.ip, 8080)]);
        f.frontend(CLUSTER_IP, 80, UDP, 0, &[(b.ip, 8080)]);
        let query = from_world(UDP, EXTERNAL_IP, 40000, 80, 0);
        let (verdict, out) = f.run(Program::FromUplink, &query, uplink);
        assert_eq!(
            (verdict, destination(&out), source(&out)),
            (TC_ACT_REDIRECT, (b.ip, 8080), (WORLD, 40000))
        );
        assert_checksums(&out);
        let (verdict, back) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
        assert_eq!(source(&back), (EXTERNAL_IP, 80));
        assert_checksums(&back);

        let to_cluster_ip = from_world(UDP, CLUSTER_IP, 40000, 80, 0);
        assert_eq!(
            f.run(Program::FromUplink, &to_cluster_ip, uplink),
            (TC_ACT_OK, to_cluster_ip),
            "a ClusterIP is not served from outside"
        );
    });
}

#[test]
fn a_node_port_without_backends_refuses_from_the_uplink_unless_its_policy_is_local() {
    with_datapath(|f| {
        let uplink = f.services_on_uplink();
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT, &[]);
        f.frontend(UPLINK_IP, NODE_PORT, UDP, LB_F_NODEPORT, &[]);
        let before = f.drops(DropReason::NoServiceBackend);
        let syn = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, SYN);
        let (verdict, rst) = f.run(Program::FromUplink, &syn, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "back out of the uplink");
        assert_eq!(source(&rst), (UPLINK_IP, NODE_PORT));
        assert_eq!(destination(&rst), (WORLD, 40000));
        assert_eq!(&rst[0..6], &NEXT_HOP_MAC, "to the hop it came from");
        assert_eq!(rst[l4(&rst) + 13], RST | ACK);
        assert_checksums(&rst);
        let mut query = from_world(UDP, UPLINK_IP, 40000, NODE_PORT, 0);
        query.extend_from_slice(&[7; 40]);
        let query = checksummed(fix_lengths(query));
        let (verdict, error) = f.run(Program::FromUplink, &query, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            (source(&error).0, destination(&error).0),
            (UPLINK_IP, WORLD)
        );
        assert_eq!(
            (error[l4(&error)], error[l4(&error) + 1]),
            (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
        );
        assert_eq!(transport_sum(&error[14..]), 0, "ICMP checksum");
        assert_eq!(f.drops(DropReason::NoServiceBackend), before + 2);

        // externalTrafficPolicy: Local on a node without a local backend: dropped, as
        // kube-proxy does.
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT | LB_F_LOCAL, &[]);
        assert_eq!(f.run(Program::FromUplink, &syn, uplink).0, TC_ACT_SHOT);
        assert_eq!(f.drops(DropReason::NoServiceBackend), before + 3);
    });
}

#[test]
fn a_local_backends_ingress_policy_judges_the_node_ports_client() {
    with_datapath(|f| {
        let b = f.b;
        let uplink = f.services_on_uplink();
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT, &[(b.ip, 8080)]);
        f.isolate(b, ENDPOINT_F_INGRESS_ISOLATED);
        let syn = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, SYN);
        assert_eq!(f.run(Program::FromUplink, &syn, uplink).0, TC_ACT_SHOT);
        f.allow(b, Direction::Ingress, identity::WORLD, TCP, 8080);
        let syn = from_world(TCP, UPLINK_IP, 40001, NODE_PORT, SYN);
        assert_eq!(
            f.run(Program::FromUplink, &syn, uplink).0,
            TC_ACT_REDIRECT,
            "allowed from the world on the target port"
        );
    });
}

#[test]
fn in_tunnel_mode_a_node_ports_remote_backend_is_reached_through_the_tunnel() {
    with_datapath(|f| {
        let uplink = f.services_on_uplink();
        let tunnel = tunnel_device();
        ip("link set tun0 up");
        f.dp.set_routing(Routing {
            flags: CONFIG_F_TUNNEL | CONFIG_F_SERVICES,
            node_ip: UPLINK_IP,
            tunnel_ifindex: tunnel,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .expect("set_routing");
        let far = remote_pod(7, 400);
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT, &[(far.ip, 8080)]);
        let syn = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, SYN);
        let (verdict, out) = f.run(Program::FromUplink, &syn, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel");
        assert_eq!(destination(&out), (far.ip, 8080));
        assert_eq!(source(&out).0, UPLINK_IP, "the backend sees the node");
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        assert_checksums(&out);
    });
}

#[test]
fn masquerading_and_node_ports_share_the_uplink_and_the_nat_range() {
    with_datapath(|f| {
        let a = f.a;
        let uplink = f.services_on_uplink();
        f.dp.set_routing(Routing {
            flags: CONFIG_F_NATIVE | CONFIG_F_SERVICES | CONFIG_F_MASQUERADE,
            node_ip: UPLINK_IP,
            tunnel_ifindex: 0,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .expect("set_routing");
        let far = remote_pod(7, 400);
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT, &[(far.ip, 8080)]);
        // A pod's connection to the world, masqueraded, and a node port's client forwarded to
        // a remote backend, both from port 40000 to the same remote port.
        let world = from_node(outside(WORLD));
        let (verdict, masqueraded) = f.leave(&checksummed(tcp(a, world, 40000, 443, SYN)));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(source(&masqueraded).0, UPLINK_IP);
        let syn = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, SYN);
        let (_, forwarded) = f.run(Program::FromUplink, &syn, uplink);
        assert_eq!(source(&forwarded).0, UPLINK_IP);
        assert_ne!(
            source(&forwarded).1,
            source(&masqueraded).1,
            "two flows, two ports of the one range"
        );
        // Each reply finds its own: the pod's goes up the stack to the pod, the backend's out
        // to the node port's client.
        let (verdict, back) = f.run(
            Program::FromUplink,
            &via_next_hop(reply_to(&masqueraded)),
            uplink,
        );
        assert_eq!(verdict, TC_ACT_OK, "the pod's reply: up the stack");
        assert_eq!(destination(&back), (a.ip, 40000));
        assert_eq!(source(&back), (WORLD, 443));
        assert_checksums(&back);
        let (verdict, back) = f.run(
            Program::FromUplink,
            &via_next_hop(reply_to(&forwarded)),
            uplink,
        );
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "the backend's reply: to the client"
        );
        assert_eq!(destination(&back), (WORLD, 40000));
        assert_eq!(source(&back), (UPLINK_IP, NODE_PORT));
        assert_checksums(&back);
    });
}

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn cost_per_packet_of_node_ports() {
    with_datapath(|f| {
        let b = f.b;
        let uplink = f.services_on_uplink();
        let far = remote_pod(7, 400);
        // What every other TCP packet to the node pays: the frontend lookup that misses.
        let other = from_world(TCP, UPLINK_IP, 40000, 22, ACK);
        let r = ns_per_run(f, Program::FromUplink, &other, uplink);
        println!("from_uplink, to the node, services on:  {r:.1} ns");
        f.dp.set_routing(Routing {
            flags: CONFIG_F_NATIVE,
            node_ip: UPLINK_IP,
            tunnel_ifindex: 0,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .unwrap();
        let r = ns_per_run(f, Program::FromUplink, &other, uplink);
        println!("from_uplink, to the node, services off: {r:.1} ns");
        f.dp.set_routing(Routing {
            flags: CONFIG_F_NATIVE | CONFIG_F_SERVICES,
            node_ip: UPLINK_IP,
            tunnel_ifindex: 0,
            uplink_ifindex: uplink,
            uplink_subnet: None,
        })
        .unwrap();

        // A local backend: the client's packets in, the backend's replies out.
        f.frontend(UPLINK_IP, NODE_PORT, TCP, LB_F_NODEPORT, &[(b.ip, 8080)]);
        let syn = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, SYN);
        let (_, out) = f.run(Program::FromUplink, &syn, uplink);
        let (verdict, _) = f.send(b, &sent_by(b, reply_to(&out)));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let ack = from_world(TCP, UPLINK_IP, 40000, NODE_PORT, ACK);
        let r = ns_per_run(f, Program::FromUplink, &ack, uplink);
        println!("node port, local backend, in:           {r:.1} ns");
        let (_, out) = f.run(Program::FromUplink, &ack, uplink);
        let mut reply = sent_by(b, reply_to(&out));
        reply[14 + 20 + 13] = ACK;
        let reply = checksummed(reply);
        let r = ns_per_run(f, Program::FromContainer, &reply, b.ifindex);
        println!("node port, local backend, reply out:    {r:.1} ns");

        // A remote backend: source NAT both ways.
        f.frontend(
            UPLINK_IP,
            NODE_PORT + 1,
            TCP,
            LB_F_NODEPORT,
            &[(far.ip, 8080)],
        );
        let syn = from_world(TCP, UPLINK_IP, 40001, NODE_PORT + 1, SYN);
        let (verdict, out) = f.run(Program::FromUplink, &syn, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (verdict, _) = f.run(Program::FromUplink, &via_next_hop(reply_to(&out)), uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let ack = from_world(TCP, UPLINK_IP, 40001, NODE_PORT + 1, ACK);
        let r = ns_per_run(f, Program::FromUplink, &ack, uplink);
        println!("node port, remote backend, in:          {r:.1} ns");
        let (_, out) = f.run(Program::FromUplink, &ack, uplink);
        let mut reply = via_next_hop(reply_to(&out));
        reply[14 + 20 + 13] = ACK;
        let reply = checksummed(reply);
        let r = ns_per_run(f, Program::FromUplink, &reply, uplink);
        println!("node port, remote backend, reply:       {r:.1} ns");

        // A masqueraded flow's reply: with Services on it takes the jump too.
        let a = f.a;
        let masquerading = |f: &mut Fixture, services: u32| {
            f.dp.set_routing(Routing {
                flags: CONFIG_F_NATIVE | CONFIG_F_MASQUERADE | services,
                node_ip: UPLINK_IP,
                tunnel_ifindex: 0,
                uplink_ifindex: uplink,
                uplink_subnet: None,
            })
            .unwrap();
        };
        masquerading(f, CONFIG_F_SERVICES);
        let world = from_node(outside(WORLD));
        let (_, out) = f.leave(&checksummed(tcp(a, world, 40000, 443, ACK)));
        let reply = via_next_hop(reply_to(&out));
        let r = ns_per_run(f, Program::FromUplink, &reply, uplink);
        println!("masqueraded reply, services on:         {r:.1} ns");
        masquerading(f, 0);
        let r = ns_per_run(f, Program::FromUplink, &reply, uplink);
        println!("masqueraded reply, services off:        {r:.1} ns");
    });
}

#[test]
fn a_remote_backends_port_unreachable_reaches_the_node_ports_client_about_the_frontend() {
    with_datapath(|f| {
        let uplink = f.services_on_uplink();
        let far = remote_pod(7, 400);
        f.frontend(UPLINK_IP, NODE_PORT, UDP, LB_F_NODEPORT, &[(far.ip, 8080)]);
        let query = from_world(UDP, UPLINK_IP, 40000, NODE_PORT, 0);
        let (verdict, forwarded) = f.run(Program::FromUplink, &query, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        // Nothing listens on the backend: its node answers with a port unreachable.
        let error = via_next_hop(icmp_error(
            far.ip,
            UPLINK_IP,
            ICMP_DEST_UNREACH,
            ICMP_PORT_UNREACH,
            &forwarded,
        ));
        let (verdict, back) = f.run(Program::FromUplink, &error, uplink);
        assert_eq!(verdict, TC_ACT_REDIRECT, "out to the client");
        assert_eq!(
            source(&back).0,
            UPLINK_IP,
            "from the frontend, not the backend"
        );
        assert_eq!(destination(&back).0, WORLD);
        let quote = quoted(&back);
        assert_eq!(
            source(&quote),
            (WORLD, 40000),
            "about the client's datagram"
        );
        assert_eq!(
            destination(&quote),
            (UPLINK_IP, NODE_PORT),
            "as the client sent it"
        );
        assert_checksums(&back);
    });
}
