//! The node side of pod networking, set up once at start in the agent's network namespace:
//! IPv4 forwarding, and a device `myelin_host` holding the gateway address, so that pods can
//! reach their gateway and the node answers on it. `myelin_host` is one end of a veth pair (its
//! peer is `myelin_net`), like Cilium's `cilium_host`: veth is available wherever the pods'
//! own veths are, unlike the dummy driver, which many kernels leave out.

use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use netlink_packet_route::{address::AddressAttribute, link::LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth};
use tracing::info;

/// Name of the device holding the gateway address.
pub const HOST_DEVICE: &str = "myelin_host";
/// Its veth peer.
pub const HOST_DEVICE_PEER: &str = "myelin_net";

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(
        "IPv4 forwarding is off and cannot be turned on ({0}); enable it on the node \
         (sysctl net.ipv4.ip_forward=1) or give the agent a writable /proc/sys"
    )]
    Forwarding(#[source] std::io::Error),
}

fn connect() -> Result<Handle, NetconfError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetconfError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetconfError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        // The kernel answers "no such device" with an error, not an empty list.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Turns IPv4 forwarding on unless it is on already. In a container that is not privileged
/// `/proc/sys` is read-only; Kubernetes nodes normally forward already (kubeadm requires it),
/// and then there is nothing to write.
fn enable_forwarding() -> Result<(), NetconfError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH).map_err(NetconfError::Forwarding)?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(PATH, b"1").map_err(NetconfError::Forwarding)
}

/// Creates (or keeps) `myelin_host` with `gateway/32`, up, and turns on IPv4 forwarding.
pub async fn setup_node(gateway: Ipv4Addr) -> Result<(), NetconfError> {
    enable_forwarding()?;
    let handle = connect()?;
    let link = match link_by_name(&handle, HOST_DEVICE).await? {
        Some(link) => link,
        None => {
            handle
                .link()
                .add(LinkVeth::new(HOST_DEVICE, HOST_DEVICE_PEER).build())
                .execute()
                .await?;
            link_by_name(&handle, HOST_DEVICE)
                .await?
                .ok_or(NetconfError::Netlink(rtnetlink::Error::RequestFailed))?
        }
    };
    let index = link.header.index;
    for name in [HOST_DEVICE_PEER, HOST_DEVICE] {
        handle
            .link()
            .set(LinkUnspec::new_with_name(name).up().build())
            .execute()
            .await?;
    }

    // Keep exactly the gateway address on the device (the pod CIDR may have changed).
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut has_gateway = false;
    while let Some(msg) = addresses.try_next().await? {
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if addr == Some(gateway) && msg.header.prefix_len == 32 {
            has_gateway = true;
        } else {
            handle.address().del(msg).execute().await?;
        }
    }
    if !has_gateway {
        handle
            .address()
            .add(index, gateway.into(), 32)
            .execute()
            .await?;
    }
    info!(device = HOST_DEVICE, %gateway, "node network ready");
    Ok(())
}
