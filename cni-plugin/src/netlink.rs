//! Route-netlink operations in one network namespace: typed, blocking wrappers over rtnetlink.
//!
//! A [`Netlink`] talks to the namespace its calling thread was in when it was opened; the
//! socket stays bound there. It owns a current-thread tokio runtime that only drives the socket,
//! so it must be opened on the thread that uses it (the plugin's main thread for the node side,
//! a [`crate::netns::NetNs::run`] thread for the pod side).

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use tokio::runtime::Runtime;

use crate::netns::NetNs;

/// A 48-bit hardware address, printed as CNI results and the agent API expect
/// (`aa:bb:cc:dd:ee:ff`, lower case).
pub use myelin_api::Mac;

/// The state of one interface, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Self {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                LinkAttribute::Address(bytes) => {
                    link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(Mac);
                }
                _ => {}
            }
        }
        link
    }
}

/// One IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Output interface; for a multipath route, the first next hop's.
    pub oif: Option<u32>,
    pub scope: RouteScope,
}

impl Route {
    fn from_message(msg: RouteMessage) -> Option<Self> {
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut gateway = None;
        let mut oif = None;
        for attr in msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = a,
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(a),
                RouteAttribute::Oif(index) => oif = Some(index),
                RouteAttribute::MultiPath(hops) => {
                    oif = oif.or(hops.first().map(|h| h.interface_index));
                }
                _ => {}
            }
        }
        Some(Self {
            dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
            gateway,
            oif,
            scope: msg.header.scope,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot start the netlink runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error("{what} failed")]
    Request {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl NetlinkError {
    fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let what = what.into();
        move |e| Self::Request {
            what,
            source: match e {
                rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
                other => io::Error::other(other),
            },
        }
    }

    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub fn is_already_exists(&self) -> bool {
        self.errno() == Some(nix::libc::EEXIST)
    }

    fn is_no_such_device(&self) -> bool {
        self.errno() == Some(nix::libc::ENODEV)
    }
}

/// A route-netlink connection in the calling thread's network namespace.
pub struct Netlink {
    runtime: Runtime,
    handle: Handle,
}

impl Netlink {
    pub fn open() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Runtime)?;
        // The socket registers with the runtime's IO driver, so it is created inside it.
        let (connection, handle, _) = {
            let _context = runtime.enter();
            rtnetlink::new_connection().map_err(NetlinkError::Socket)?
        };
        runtime.spawn(connection);
        Ok(Self { runtime, handle })
    }

    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let request = self.handle.link().get().match_name(name);
        self.first_link(request, format!("looking up interface {name}"))
    }

    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let request = self.handle.link().get().match_index(index);
        self.first_link(request, format!("looking up interface index {index}"))
    }

    fn first_link(
        &self,
        request: rtnetlink::LinkGetRequest,
        what: String,
    ) -> Result<Option<Link>, NetlinkError> {
        let found = self
            .runtime
            .block_on(async { request.execute().try_next().await })
            .map_err(NetlinkError::request(what));
        match found {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(e) if e.is_no_such_device() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair: `name` here, `peer_name` directly inside `peer_netns` (the peer
    /// message carries the namespace fd, so the peer never exists under its name here and
    /// cannot clash with a node interface). Fails with EEXIST if either name is taken.
    pub fn add_veth(
        &self,
        name: &str,
        peer_name: &str,
        peer_netns: &NetNs,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let peer = LinkUnspec::new_with_name(peer_name)
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_fd().as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(name)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        let request = self.handle.link().add(message);
        self.runtime
            .block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "creating veth {name} with peer {peer_name} in {}",
                peer_netns.path().display()
            )))
    }

    pub fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        let request = self.handle.link().change(message);
        self.runtime
            .block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "setting interface {index} up"
            )))
    }

    pub fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        let request = self.handle.link().del(index);
        self.runtime
            .block_on(request.execute())
            .map_err(NetlinkError::request(format!("deleting interface {index}")))
    }

    pub fn add_address(&self, index: u32, address: Ipv4Net) -> Result<(), NetlinkError> {
        let request =
            self.handle
                .address()
                .add(index, IpAddr::V4(address.addr()), address.prefix_len());
        self.runtime
            .block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "adding address {address} to interface {index}"
            )))
    }

    /// `ip route add <dst> dev <index> scope link`.
    pub fn add_link_route(&self, index: u32, dst: Ipv4Net) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.add_route(
            message,
            format!("adding route {dst} dev {index} scope link"),
        )
    }

    /// `ip route add default via <gateway> dev <index>`.
    pub fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        self.add_route(
            message,
            format!("adding default route via {gateway} dev {index}"),
        )
    }

    fn add_route(&self, message: RouteMessage, what: String) -> Result<(), NetlinkError> {
        let request = self.handle.route().add(message);
        self.runtime
            .block_on(request.execute())
            .map_err(NetlinkError::request(what))
    }

    /// A neighbour entry that never expires and is never probed (`nud permanent`).
    pub fn add_permanent_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: Mac,
    ) -> Result<(), NetlinkError> {
        let request = self
            .handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0);
        self.runtime
            .block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "adding neighbour {ip} lladdr {mac} on interface {index}"
            )))
    }

    /// The IPv4 addresses on interface `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let request = self.handle.address().get().set_link_index_filter(index);
        let messages: Vec<_> = self
            .runtime
            .block_on(request.execute().try_collect())
            .map_err(NetlinkError::request(format!(
                "listing addresses of interface {index}"
            )))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
            .filter_map(|m| {
                let prefix_len = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip))
                    | AddressAttribute::Address(IpAddr::V4(ip)) => {
                        Ipv4Net::new(ip, prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// The IPv4 routes of the main table.
    pub fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let request = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build());
        let messages: Vec<RouteMessage> = self
            .runtime
            .block_on(request.execute().try_collect())
            .map_err(NetlinkError::request("listing IPv4 routes"))?;
        Ok(messages
            .into_iter()
            .filter(|m| {
                m.header.address_family == AddressFamily::Inet
                    && m.header.table == RouteHeader::RT_TABLE_MAIN
            })
            .filter_map(Route::from_message)
            .collect())
    }

    /// The MTU of the interface holding the IPv4 default route, if there is one.
    pub fn default_route_mtu(&self) -> Result<Option<u32>, NetlinkError> {
        let default_oif = self
            .routes()?
            .into_iter()
            .find(|r| r.dst.prefix_len() == 0)
            .and_then(|r| r.oif);
        match default_oif {
            Some(index) => Ok(self.link_by_index(index)?.map(|link| link.mtu)),
            None => Ok(None),
        }
    }
}
