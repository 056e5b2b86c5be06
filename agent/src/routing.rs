//! How this node reaches the others, set up in its network namespace:
//!
//! - the uplink: the device holding the node's InternalIP (or `--uplink`), through which
//!   traffic leaves for other nodes and the outside;
//! - tunnel mode: `myelin_vxlan`, a VXLAN device in collect-metadata mode (`external`) on
//!   `--tunnel-port`, with the datapath's tunnel programs; its MTU is the uplink's minus the
//!   VXLAN overhead, so that an encapsulated packet still fits the uplink;
//! - a route for every other node's pod CIDR, tagged with Myelin's route protocol so that
//!   the ones of nodes that left are found and removed: through `myelin_vxlan` (tunnel), or via
//!   the node's InternalIP on the uplink (native, when that address is on the uplink's subnet;
//!   otherwise the underlay routes pod CIDRs and the default route serves). These routes serve
//!   the node's own traffic to remote pods; pods' packets go by the datapath.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope},
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tracing::{error, info, warn};

use crate::{config::RoutingMode, datapath::Routing, desired::nodes::RemoteNode};

/// The tunnel device.
pub const TUNNEL_DEVICE: &str = "myelin_vxlan";
/// What VXLAN adds to a packet: outer IPv4 (20), UDP (8), VXLAN (8) and inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// The protocol number Myelin's routes carry (`ip route show proto 77`): unused by iproute2's
/// list (`/etc/iproute2/rt_protos`), so no other software's routes look like ours.
const ROUTE_PROTOCOL: u8 = 77;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("no device of this node holds its InternalIP {0}; give the uplink with --uplink")]
    NoUplink(Ipv4Addr),
    #[error("--uplink {0}: no such device")]
    UplinkMissing(String),
    #[error("the tunnel device {0} vanished right after it was created")]
    TunnelVanished(&'static str),
}

/// The uplink as found at start; its subnets follow its addresses
/// (`NodeNetwork::refresh_uplink_subnets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// Its IPv4 subnets: which nodes are reachable without a router.
    pub subnets: Vec<Ipv4Net>,
}

impl Uplink {
    /// The subnet holding `ip`, if the uplink has one: native routing sends packets for nodes
    /// in it straight to them (see `Routing::uplink_subnet`).
    pub fn subnet_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.subnets.iter().find(|s| s.contains(&ip)).copied()
    }
}

/// Finds the uplink: `--uplink` by name, else the device holding `node_ip`.
pub async fn find_uplink(
    handle: &Handle,
    by_name: Option<&str>,
    node_ip: Ipv4Addr,
) -> Result<Uplink, RoutingError> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    let addresses = ipv4_addresses(handle).await?;
    let index = match by_name {
        Some(name) => links
            .iter()
            .find(|l| link_name(l) == Some(name))
            .map(|l| l.header.index)
            .ok_or_else(|| RoutingError::UplinkMissing(name.to_string()))?,
        None => addresses
            .iter()
            .find(|(_, net)| net.addr() == node_ip)
            .map(|(index, _)| *index)
            .ok_or(RoutingError::NoUplink(node_ip))?,
    };
    let link = links
        .iter()
        .find(|l| l.header.index == index)
        .ok_or(RoutingError::NoUplink(node_ip))?;
    Ok(Uplink {
        name: link_name(link).unwrap_or_default().to_string(),
        index,
        mtu: link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(1500),
        subnets: subnets_of(&addresses, index),
    })
}

/// The subnets of device `index`'s addresses, each once, in order.
fn subnets_of(addresses: &[(u32, Ipv4Net)], index: u32) -> Vec<Ipv4Net> {
    let mut subnets: Vec<Ipv4Net> = addresses
        .iter()
        .filter(|(i, _)| *i == index)
        .map(|(_, net)| net.trunc())
        .collect();
    subnets.sort();
    subnets.dedup();
    subnets
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn ipv4_addresses(handle: &Handle) -> Result<Vec<(u32, Ipv4Net)>, RoutingError> {
    let messages: Vec<_> = handle.address().get().execute().try_collect().await?;
    Ok(messages
        .into_iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let prefix = m.header.prefix_len;
            let index = m.header.index;
            m.attributes.into_iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => {
                    Ipv4Net::new(ip, prefix).ok().map(|n| (index, n))
                }
                _ => None,
            })
        })
        .collect())
}

/// Makes sure `myelin_vxlan` is there, up, without ARP (its peers are known from the ipcache),
/// with MTU `mtu`, and returns its ifindex.
///
/// The device an earlier agent made is kept when it is what this one would make (collect
/// metadata, no learning, UDP port `port`): deleting it would take its routes and tc filters
/// with it, and every packet into or out of the tunnel would be lost until they are back. Only
/// a device made differently is recreated (a VXLAN device's port cannot be changed in place);
/// its MTU can, and is.
pub async fn ensure_tunnel(handle: &Handle, port: u16, mtu: u32) -> Result<u32, RoutingError> {
    let index = match tunnel_link(handle).await? {
        Some(link) if is_tunnel_for(&link, port) => {
            info!(device = TUNNEL_DEVICE, "keeping the tunnel device");
            link.header.index
        }
        existing => {
            if let Some(link) = existing {
                warn!(
                    device = TUNNEL_DEVICE,
                    port, "recreating the tunnel device: it was made with other settings"
                );
                handle.link().del(link.header.index).execute().await?;
            }
            handle
                .link()
                .add(
                    LinkVxlan::new(TUNNEL_DEVICE, 0)
                        .port(port)
                        .collect_metadata(true)
                        .learning(false)
                        .build(),
                )
                .execute()
                .await?;
            tunnel_link(handle)
                .await?
                .ok_or(RoutingError::TunnelVanished(TUNNEL_DEVICE))?
                .header
                .index
        }
    };
    let mut set = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
    set.header.flags |= LinkFlags::Noarp;
    set.header.change_mask |= LinkFlags::Noarp;
    handle.link().set(set).execute().await?;
    // The tunnel carries IPv4 only; without IPv6 the device sends no neighbour discovery of
    // its own. Best effort: a read-only /proc/sys leaves it on, which is harmless.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{TUNNEL_DEVICE}/disable_ipv6"),
        b"1",
    );
    info!(device = TUNNEL_DEVICE, port, mtu, "tunnel ready");
    Ok(index)
}

/// `myelin_vxlan` as the kernel reports it, if there is one.
async fn tunnel_link(handle: &Handle) -> Result<Option<LinkMessage>, RoutingError> {
    match handle
        .link()
        .get()
        .match_name(TUNNEL_DEVICE.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether `link` is a VXLAN device as [`ensure_tunnel`] makes it for `port`.
fn is_tunnel_for(link: &LinkMessage, port: u16) -> bool {
    let Some(vxlan) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(vxlan)) => Some(vxlan),
            _ => None,
        }),
        _ => None,
    }) else {
        return false;
    };
    let has = |wanted: &InfoVxlan| vxlan.contains(wanted);
    has(&InfoVxlan::CollectMetadata(true))
        && has(&InfoVxlan::Learning(false))
        && has(&InfoVxlan::Port(port))
}

/// A route to another node's pods.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeRoute {
    pub dst: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub dev: u32,
}

/// The routes to `nodes` in `mode`, through the tunnel device `tunnel` or the uplink.
pub fn node_routes(
    mode: RoutingMode,
    nodes: &[RemoteNode],
    tunnel: u32,
    uplink: &Uplink,
) -> Vec<NodeRoute> {
    let mut routes: Vec<NodeRoute> = nodes
        .iter()
        .filter_map(|n| match mode {
            RoutingMode::Tunnel => Some(NodeRoute {
                dst: n.pod_cidr,
                via: None,
                dev: tunnel,
            }),
            RoutingMode::Native => uplink.subnet_of(n.ip).is_some().then_some(NodeRoute {
                dst: n.pod_cidr,
                via: Some(n.ip),
                dev: uplink.index,
            }),
        })
        .collect();
    routes.sort();
    routes
}

/// Makes Myelin's routes exactly `wanted`: adds the missing, replaces the changed, removes
/// the rest; with `refresh`, writes every wanted one again (a new `source`). Node traffic
/// through the tunnel leaves from `source` (the node's InternalIP).
pub async fn sync_routes(
    handle: &Handle,
    wanted: &[NodeRoute],
    source: Ipv4Addr,
    refresh: bool,
) -> Result<(), RoutingError> {
    let current = our_routes(handle).await?;
    for (route, message) in &current {
        if !wanted.contains(route) {
            handle.route().del(message.clone()).execute().await?;
            info!(dst = %route.dst, "route to a node that left removed");
        }
    }
    for route in wanted {
        if !refresh && current.iter().any(|(r, _)| r == route) {
            continue;
        }
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dst.addr(), route.dst.prefix_len())
            .output_interface(route.dev)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .pref_source(source);
        builder = match route.via {
            Some(gw) => builder.gateway(gw),
            None => builder.scope(RouteScope::Link),
        };
        handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await?;
        info!(dst = %route.dst, via = ?route.via, "route to a node's pods");
    }
    Ok(())
}

async fn our_routes(handle: &Handle) -> Result<Vec<(NodeRoute, RouteMessage)>, RoutingError> {
    let messages: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(messages
        .into_iter()
        .filter(|m| {
            m.header.address_family == AddressFamily::Inet
                && m.header.table == RouteHeader::RT_TABLE_MAIN
                && m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
        })
        .filter_map(|m| {
            let mut dst = None;
            let mut via = None;
            let mut dev = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = Some(*ip),
                    RouteAttribute::Oif(i) => dev = Some(*i),
                    _ => {}
                }
            }
            let route = NodeRoute {
                dst: Ipv4Net::new(dst?, m.header.destination_prefix_length).ok()?,
                via,
                dev: dev?,
            };
            Some((route, m))
        })
        .collect())
}

/// Logs nodes that cannot be routed (each time the routed set changes).
fn report_skipped(skipped: &[(String, crate::desired::nodes::Skipped)]) {
    for (name, why) in skipped {
        warn!(node = name, "Node {name} is not routed: {why}");
    }
}

/// This node's part in reaching the others, once set up; kept by the owner, which brings the
/// routes in line with the other nodes whenever they change.
pub struct NodeNetwork {
    handle: Handle,
    mode: RoutingMode,
    /// `--uplink`, when given: the uplink is that device whatever the address.
    uplink_by_name: Option<String>,
    pub uplink: Uplink,
    /// `myelin_vxlan`'s ifindex in tunnel mode, 0 in native mode.
    pub tunnel: u32,
    pub node_ip: Ipv4Addr,
    /// What the datapath's config says of routing, kept so that a new address can be put in.
    pub routing: Routing,
    /// The remote nodes the routes were last made for.
    routed: Option<Vec<RemoteNode>>,
    /// An address this node's object moved to that could not be taken in place, so that it is
    /// said once.
    moved_to: Option<Ipv4Addr>,
}

impl NodeNetwork {
    /// Finds the uplink and, in tunnel mode, sets the tunnel device up.
    pub async fn setup(
        handle: Handle,
        mode: RoutingMode,
        uplink: Option<&str>,
        node_ip: Ipv4Addr,
        tunnel_port: u16,
    ) -> Result<Self, RoutingError> {
        let uplink_by_name = uplink.map(str::to_string);
        let uplink = find_uplink(&handle, uplink, node_ip).await?;
        let tunnel = match mode {
            RoutingMode::Tunnel => {
                ensure_tunnel(&handle, tunnel_port, uplink.mtu - VXLAN_OVERHEAD).await?
            }
            RoutingMode::Native => 0,
        };
        info!(
            uplink = uplink.name, %node_ip, mode = ?mode,
            "routing to other nodes"
        );
        Ok(Self {
            handle,
            mode,
            uplink_by_name,
            uplink,
            tunnel,
            node_ip,
            routing: Routing::default(),
            routed: None,
            moved_to: None,
        })
    }

    /// Follows this node's Node object to a new InternalIP. When the uplink holds the new
    /// address (a DHCP renewal, an address changed on the same device), the routes are made
    /// again with it as their source and the new routing config is returned for the datapath
    /// (masquerading's address). Otherwise (the address is on another device, or on none yet)
    /// nothing can be moved in place: the agent says so and goes on with the old one, and tries
    /// again when an address is added or removed (the Node object may say it before the device
    /// has it); one on another device needs a restart.
    async fn follow_move(&mut self, own_ip: Option<Ipv4Addr>) -> Option<Routing> {
        let Some(ip) = own_ip.filter(|ip| *ip != self.node_ip) else {
            self.moved_to = None;
            return None;
        };
        if self.moved_to == Some(ip) {
            return None;
        }
        match find_uplink(&self.handle, self.uplink_by_name.as_deref(), ip).await {
            Ok(uplink) if uplink.index == self.uplink.index && uplink.subnet_of(ip).is_some() => {
                info!(
                    was = %self.node_ip, now = %ip, uplink = uplink.name,
                    "this node's InternalIP changed; routes and masquerading follow"
                );
                self.node_ip = ip;
                self.uplink = uplink;
                self.routing.node_ip = ip;
                self.routing.uplink_subnet = self.uplink.subnet_of(ip);
                self.moved_to = None;
                // Every route again, with the new source (the kernel flushed those whose
                // source was the old address, if it is gone).
                self.routed = None;
                Some(self.routing)
            }
            found => {
                let why = match found {
                    Ok(other) => format!(
                        "it is on {}, not on the uplink {}",
                        other.name, self.uplink.name
                    ),
                    Err(e) => e.to_string(),
                };
                error!(
                    was = %self.node_ip, now = %ip,
                    "this node's InternalIP changed from {} to {ip}, which cannot be taken in \
                     place ({why}): the routes and masquerading still use {}; it is taken once \
                     the uplink holds it, or restart the agent",
                    self.node_ip, self.node_ip
                );
                self.moved_to = Some(ip);
                None
            }
        }
    }

    /// Takes the uplink's subnets from the kernel again (an address was added or removed
    /// somewhere): the routes to the nodes on them, and native routing's direct next hops,
    /// follow, and a pending move of this node's address is tried again. Returns the routing
    /// config for the datapath when the subnet holding this node's address changed (it went, or
    /// a wider or narrower one took its place).
    pub async fn refresh_uplink_subnets(&mut self) -> Option<Routing> {
        // A move that could not be taken in place (its address was on no device yet) is tried
        // again at the next sync: the address may be what just arrived.
        self.moved_to = None;
        let subnets = match ipv4_addresses(&self.handle).await {
            Ok(addresses) => subnets_of(&addresses, self.uplink.index),
            Err(e) => {
                warn!(error = %e, uplink = self.uplink.name, "reading the uplink's addresses failed");
                return None;
            }
        };
        if subnets == self.uplink.subnets {
            return None;
        }
        info!(
            uplink = self.uplink.name,
            ?subnets,
            "the uplink's subnets changed; the routes to other nodes follow"
        );
        self.uplink.subnets = subnets;
        // Made again at the next sync: nodes may have come onto the uplink's subnets or left.
        self.routed = None;
        let subnet = self.uplink.subnet_of(self.node_ip);
        if subnet == self.routing.uplink_subnet {
            return None;
        }
        self.routing.uplink_subnet = subnet;
        Some(self.routing)
    }

    /// The MTU that fits the path to every other node.
    pub fn pod_mtu(&self) -> u32 {
        match self.mode {
            RoutingMode::Tunnel => self.uplink.mtu - VXLAN_OVERHEAD,
            RoutingMode::Native => self.uplink.mtu,
        }
    }

    /// Routes to `nodes`, when they changed since the last time. Returns the routing config
    /// for the datapath when this node's address moved and was followed.
    pub async fn sync(&mut self, nodes: &crate::desired::Nodes) -> Option<Routing> {
        let moved = self.follow_move(nodes.own_ip).await;
        if self.routed.as_ref() == Some(&nodes.remote) {
            return moved;
        }
        report_skipped(&nodes.skipped);
        let wanted = node_routes(self.mode, &nodes.remote, self.tunnel, &self.uplink);
        let refresh = moved.is_some();
        match sync_routes(&self.handle, &wanted, self.node_ip, refresh).await {
            Ok(()) => self.routed = Some(nodes.remote.clone()),
            Err(e) => warn!(error = %e, "bringing the routes to other nodes in line failed"),
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uplinks_subnet_of_an_address_is_the_one_holding_it() {
        let uplink = Uplink {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            subnets: vec![
                "10.1.0.0/16".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
            ],
        };
        assert_eq!(
            uplink.subnet_of(Ipv4Addr::new(192, 168, 1, 10)),
            Some("192.168.1.0/24".parse().unwrap())
        );
        assert_eq!(
            uplink.subnet_of(Ipv4Addr::new(10, 1, 9, 9)),
            Some("10.1.0.0/16".parse().unwrap())
        );
        assert_eq!(uplink.subnet_of(Ipv4Addr::new(172, 16, 0, 1)), None);
    }

    #[test]
    fn a_devices_subnets_are_its_own_each_once() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let addresses = [
            (2, net("192.168.1.10/24")),
            (3, net("10.9.0.1/16")),
            (2, net("10.77.0.11/24")),
            (2, net("192.168.1.20/24")),
        ];
        assert_eq!(
            subnets_of(&addresses, 2),
            [net("10.77.0.0/24"), net("192.168.1.0/24")]
        );
        assert_eq!(subnets_of(&addresses, 4), []);
    }
}
