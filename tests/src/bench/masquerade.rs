//! A pod reaching the world through its node's masquerade: the datapaths Myelin's masquerade
//! figures are compared with, and Myelin itself, built alike so that only the translation (and
//! the pod's own datapath) differ. Every variant is one node namespace plugged into a
//! [`Network`] of one switch ([`Underlay::Switch`], as the cross-node variants use it) as node
//! 0 (192.168.100.10, pods in 10.244.0.0/24), with the world (192.168.100.1) on the same switch.
//! The world has no route to any pod CIDR: only a connection that leaves the node with the
//! node's address is answered. The client is a pod on the node; servers run in the world.
//!
//! - [`Masquerader::PtpIptables`], masquerading as clusters built on iptables do it: the pod
//!   through the reference `ptp` plugin with host-local (a default route via the node), the
//!   node forwarding, and one rule in its nat table,
//!   `-A POSTROUTING -s 10.244.0.0/24 ! -d 10.244.0.0/16 -j MASQUERADE`.
//! - [`Masquerader::MyelinIptables`]: Myelin's pod datapath with `--masquerade=false` (no
//!   programs on the uplink), and the same rule: iptables' translation on Myelin's own path.
//! - [`Masquerader::Myelin`]: Myelin's eBPF SNAT on the uplink (`to_uplink`, `from_uplink`),
//!   no iptables rule, so netfilter tracks nothing in the node.
//!
//! Myelin's agents run with `--routing-mode native`: masquerading is the same in both modes,
//! and native mode gives pods the uplink's MTU (1500), as `ptp` does; the tunnel's would be 50
//! bytes smaller.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
    time::Duration,
};

use super::{
    cni::{BenchPod, link_mtu},
    cpus::flow_cpu,
    cross_node::{CLUSTER_CIDR, PtpNode},
    iptables,
    tcp::{ConnectionRun, EchoServer, tcp_crr_spread},
};
use crate::{
    Binaries, Error, Result, RunPrefix,
    multinode::{Cluster, ClusterPod, ClusterSpec, Underlay, World, pod_cidr},
    netns::Netns,
    traffic::{Host, tcp_source_seen},
};

/// The node's index in the network: its address 192.168.100.10, its pod CIDR 10.244.0.0/24.
const NODE: usize = 0;

/// Myelin's NAT ports by default: those above the node's `ip_local_port_range` (Linux's
/// 32768-60999), 4,536 of them. Pods' own ports lie below them.
pub const MYELIN_NAT_PORTS: RangeInclusive<u16> = 61000..=65535;

/// World ports a connection-rate run spreads its connections over, in turn.
///
/// A masquerading node gives out its ports per remote (address, port, protocol): Myelin from
/// [`MYELIN_NAT_PORTS`], at random, holding each for 10 s after the connection's reset;
/// iptables keeps the pod's port (a conntrack entry lives 10 s after a reset). To one remote, a run at thousands of
/// connections per second would use up Myelin's range within a second and then measure
/// dropped SYNs (tried here: about 4,000 connections, then about 100 a second); spread over
/// these ports, each remote gets at most [`CRR_PER_DESTINATION`] connections. A whole run,
/// at most 32,000 connections, then fills at most half of Myelin's NAT table (131,072
/// entries by default, two per connection), so that its LRU never evicts.
pub const CRR_DESTINATIONS: u16 = 32;
/// Connections a run opens to each of its [`CRR_DESTINATIONS`] at most; a run ends early once
/// every destination had them. At most 22 % of Myelin's 4,536 NAT ports per remote are then
/// taken, so a random pick rarely needs a second try and never runs out, as on a node whose
/// pods talk to many remotes.
pub const CRR_PER_DESTINATION: u64 = 1_000;

/// What translates a pod's traffic to the world (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masquerader {
    PtpIptables,
    MyelinIptables,
    Myelin,
}

/// A pod on a node whose masquerade takes it to the world.
pub struct MasqueradePath {
    masquerader: Masquerader,
    variant: Variant,
}

/// Fields drop in order: the pod before its node, the node before the network.
enum Variant {
    Baseline {
        pod: BenchPod,
        node: PtpNode,
    },
    Myelin {
        pod: ClusterPod,
        cluster: Box<Cluster>,
    },
}

impl MasqueradePath {
    /// A network of its own with one node, masquerading by `masquerader`, and a pod on it.
    /// `binaries`: Myelin's, none for the harness's own ([`Binaries::from_env`]).
    pub fn build(
        run: &RunPrefix,
        masquerader: Masquerader,
        binaries: Option<Binaries>,
    ) -> Result<Self> {
        let variant = match masquerader {
            Masquerader::PtpIptables => Self::ptp_iptables(run),
            Masquerader::MyelinIptables => Self::myelin(run, false, binaries),
            Masquerader::Myelin => Self::myelin(run, true, binaries),
        }?;
        Ok(Self {
            masquerader,
            variant,
        })
    }

    fn ptp_iptables(run: &RunPrefix) -> Result<Variant> {
        let node = PtpNode::build(run, NODE)?;
        let pod = node.add_pod(run, &format!("node{NODE}-client"))?;
        masquerade_with_iptables(node.node.netns())?;
        Ok(Variant::Baseline { pod, node })
    }

    fn myelin(run: &RunPrefix, ebpf: bool, binaries: Option<Binaries>) -> Result<Variant> {
        let masquerade = if ebpf { "true" } else { "false" };
        let mut spec = ClusterSpec::new(1, Underlay::Switch).agent_args(&[
            "--routing-mode",
            "native",
            "--masquerade",
            masquerade,
        ]);
        spec.binaries = binaries;
        // A failed start carries the agent's log in its error; a benchmark prints no more.
        spec.echo_agent_logs_on_drop = false;
        let cluster = Box::new(Cluster::start(run, spec)?);
        if !ebpf {
            masquerade_with_iptables(cluster.node(NODE).netns())?;
        }
        let pod = cluster.add_pod(NODE, "default", "client", &[("app", "client")])?;
        Ok(Variant::Myelin { pod, cluster })
    }

    pub fn masquerader(&self) -> Masquerader {
        self.masquerader
    }

    pub fn pod(&self) -> &dyn Host {
        match &self.variant {
            Variant::Baseline { pod, .. } => pod,
            Variant::Myelin { pod, .. } => pod,
        }
    }

    pub fn world(&self) -> &World {
        match &self.variant {
            Variant::Baseline { node, .. } => node.network.world(),
            Variant::Myelin { cluster, .. } => cluster.world(),
        }
    }

    /// The node's address on the underlay: what the world must see.
    pub fn node_ip(&self) -> Ipv4Addr {
        match &self.variant {
            Variant::Baseline { node, .. } => node.node.ip(),
            Variant::Myelin { cluster, .. } => cluster.node_ip(NODE),
        }
    }

    /// The node's namespace, where the translation happens.
    pub fn node_netns(&self) -> &Netns {
        match &self.variant {
            Variant::Baseline { node, .. } => node.node.netns(),
            Variant::Myelin { cluster, .. } => cluster.node(NODE).netns(),
        }
    }

    /// The MTU of the pod's `eth0`: figures of two variants compare only when these are equal.
    pub fn pod_mtu(&self) -> Result<u32> {
        link_mtu(self.pod().netns(), "eth0")
    }

    /// One TCP exchange from the pod to the world, which must have seen it come from the
    /// node's address, translated by what this variant claims: iptables' rule counted packets
    /// and kept the pod's port (below [`MYELIN_NAT_PORTS`]); Myelin's programs gave a port of
    /// that range. Returns the address and port the world saw. The world has no route to the
    /// pod, so an untranslated connection gets no answer at all: this proves the variant
    /// masquerades, and how, before its figures count.
    pub fn check_translation(&self) -> Result<SocketAddrV4> {
        let seen = tcp_source_seen(self.pod(), self.world(), 0)?;
        let wrong = |what: String| Error::Traffic {
            what: format!(
                "{} reached {} as {seen}: {what}",
                self.pod().label(),
                self.world().label()
            ),
        };
        if *seen.ip() != self.node_ip() {
            return Err(wrong(format!("not as its node {}", self.node_ip())));
        }
        let in_nat_range = MYELIN_NAT_PORTS.contains(&seen.port());
        match self.masquerader {
            Masquerader::Myelin if !in_nat_range => {
                return Err(wrong(
                    "Myelin's translation gives a port of its NAT range".into(),
                ));
            }
            Masquerader::PtpIptables | Masquerader::MyelinIptables => {
                if in_nat_range {
                    return Err(wrong("MASQUERADE keeps the pod's port".into()));
                }
                if iptables::masqueraded_packets(self.node_netns())? == 0 {
                    return Err(wrong("the MASQUERADE rule counted no packet".into()));
                }
            }
            Masquerader::Myelin => {}
        }
        Ok(seen)
    }

    /// New connections from the pod to the world (connect, one byte each way, reset) spread
    /// over [`CRR_DESTINATIONS`] world ports from `first_port` up, for `duration` or until
    /// each had [`CRR_PER_DESTINATION`]. Client and servers share one CPU.
    pub fn connection_rate(&self, first_port: u16, duration: Duration) -> Result<ConnectionRun> {
        let cpu = flow_cpu(0);
        let servers = (0..CRR_DESTINATIONS)
            .map(|i| {
                let port = first_port.checked_add(i).ok_or_else(|| Error::Traffic {
                    what: format!("{CRR_DESTINATIONS} ports do not fit above {first_port}"),
                })?;
                EchoServer::start(self.world(), port, cpu)
            })
            .collect::<Result<Vec<_>>>()?;
        tcp_crr_spread(self.pod(), &servers, duration, CRR_PER_DESTINATION)
    }
}

/// The MASQUERADE rule in `node`, for its pod CIDR.
fn masquerade_with_iptables(node: &Netns) -> Result<()> {
    iptables::restore(
        node,
        &iptables::masquerade_rules(&pod_cidr(NODE), CLUSTER_CIDR),
    )
}

/// Root checks that each variant masquerades the way it claims: otherwise the figures would
/// compare something else.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bench::tcp::tcp_rr, root_test, tc, traffic::ping_within};

    /// Translated as claimed, request/response and new connections carried, the pod's MTU
    /// the uplink's; returns what the world saw and the connection-rate run.
    fn carries_translated_traffic(path: &MasqueradePath) -> Result<(SocketAddrV4, ConnectionRun)> {
        assert_eq!(path.node_ip(), Underlay::Switch.node_ip(NODE)?);
        let seen = path.check_translation()?;
        let rate = tcp_rr(
            path.pod(),
            path.world(),
            11111,
            1,
            Duration::from_millis(300),
        )?;
        assert!(rate > 100.0, "{rate} round trips/s");
        let run = path.connection_rate(7000, Duration::from_millis(300))?;
        assert!(run.rate() > 10.0, "{run:?}");
        assert_eq!(path.pod_mtu()?, 1500);
        Ok((seen, run))
    }

    /// Myelin's programs on the node's uplink (clsact filters or tcx links), by hook.
    fn uplink_programs(path: &MasqueradePath) -> Result<Vec<&'static str>> {
        let mut found = Vec::new();
        for (hook, program) in [("ingress", "from_uplink"), ("egress", "to_uplink")] {
            if tc::runs(path.node_netns(), "eth0", hook, program)? {
                found.push(program);
            }
        }
        Ok(found)
    }

    #[test]
    fn iptables_masquerade_takes_a_ptp_pod_to_the_world_as_its_node() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let path = MasqueradePath::build(&run, Masquerader::PtpIptables, None)?;
        let (_, run) = carries_translated_traffic(&path)?;
        // Every new connection was translated by the rule (it sees their first packets only).
        assert!(iptables::masqueraded_packets(path.node_netns())? > run.connections);
        // Without the rule nothing comes back: the world has no route to the pod.
        iptables::restore(path.node_netns(), "*nat\n-F POSTROUTING\nCOMMIT\n")?;
        let untranslated = ping_within(path.pod(), path.world(), Duration::from_millis(500));
        assert!(untranslated.is_err(), "{untranslated:?}");
        Ok(())
    }

    #[test]
    fn myelin_masquerades_in_ebpf_or_leaves_it_to_iptables() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let ebpf = MasqueradePath::build(&run, Masquerader::Myelin, None)?;
        assert_eq!(uplink_programs(&ebpf)?, ["from_uplink", "to_uplink"]);
        let (seen, _) = carries_translated_traffic(&ebpf)?;
        assert!(MYELIN_NAT_PORTS.contains(&seen.port()), "{seen}");
        // A variant that does not translate as it claims is refused before it is measured.
        let claimed = MasqueradePath {
            masquerader: Masquerader::MyelinIptables,
            ..ebpf
        };
        let err = claimed
            .check_translation()
            .expect_err("Myelin translated, not iptables");
        assert!(err.to_string().contains("keeps the pod's port"), "{err}");
        drop(claimed);

        // Its own prefix: every variant names its network and node alike.
        let by_iptables =
            MasqueradePath::build(&RunPrefix::new(), Masquerader::MyelinIptables, None)?;
        // Native routing keeps from_uplink (it delivers other nodes' packets into pods);
        // nothing translates on the way out.
        assert_eq!(uplink_programs(&by_iptables)?, ["from_uplink"]);
        let (seen, run) = carries_translated_traffic(&by_iptables)?;
        assert!(!MYELIN_NAT_PORTS.contains(&seen.port()), "{seen}");
        assert!(iptables::masqueraded_packets(by_iptables.node_netns())? > run.connections);
        Ok(())
    }
}
