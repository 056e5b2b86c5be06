//! The veth pair Myelin gives every pod, and how each end is configured.
//!
//! Pod side (inside CNI_NETNS, named CNI_IFNAME): `<ip>/32`, up, `<gateway>/32 dev <ifname>
//! scope link`, `default via <gateway> dev <ifname>`, and a permanent neighbour entry for the
//! gateway with the host side's MAC, so the pod never ARPs for its gateway.
//!
//! Host side (in the plugin's own namespace, the node): up, `<ip>/32 dev <host> scope link` and
//! a permanent neighbour entry for the pod's IP with the pod side's MAC.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{
    netlink::{Link, Mac, Netlink, NetlinkError, Route},
    netns::{NetNs, NetNsError},
};

/// What the pod is given: its address and the gateway it routes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddressing {
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

/// One end of a pair; `index` is only meaningful in the namespace that end lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethEnd {
    pub name: String,
    pub index: u32,
    pub mac: Mac,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPair {
    pub host: VethEnd,
    pub pod: VethEnd,
}

#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error("interface {name} already exists {place}")]
    AlreadyExists { name: String, place: String },
    #[error("netlink request failed")]
    Netlink(#[from] NetlinkError),
    #[error("cannot work inside the pod's network namespace")]
    Netns(#[from] NetNsError),
    #[error("interface {name} is missing right after it was created")]
    Vanished { name: String },
    #[error("interface {name} has no Ethernet address")]
    NoMac { name: String },
}

fn end_of(link: Option<Link>, name: &str) -> Result<VethEnd, VethError> {
    let link = link.ok_or_else(|| VethError::Vanished {
        name: name.to_string(),
    })?;
    let mac = link.mac.ok_or_else(|| VethError::NoMac {
        name: name.to_string(),
    })?;
    Ok(VethEnd {
        name: link.name,
        index: link.index,
        mac,
    })
}

/// Creates the pair, host end `host_name` in the calling thread's namespace and pod end
/// `pod_ifname` directly inside `pod_netns`, both with `mtu`. Fails with
/// [`VethError::AlreadyExists`] and changes nothing if either name is taken.
pub fn create_pair(
    node: &Netlink,
    host_name: &str,
    pod_netns: &NetNs,
    pod_ifname: &str,
    mtu: u32,
) -> Result<VethPair, VethError> {
    if let Err(e) = node.add_veth(host_name, pod_ifname, pod_netns, mtu) {
        if !e.is_already_exists() {
            return Err(e.into());
        }
        // The kernel does not say which of the two names is taken; tell the user which.
        return Err(if node.link_by_name(host_name)?.is_some() {
            VethError::AlreadyExists {
                name: host_name.to_string(),
                place: "on the node".to_string(),
            }
        } else {
            VethError::AlreadyExists {
                name: pod_ifname.to_string(),
                place: format!("in {}", pod_netns.path().display()),
            }
        });
    }
    let host = end_of(node.link_by_name(host_name)?, host_name)?;
    let pod = pod_netns.run(|| {
        let pod_nl = Netlink::open()?;
        end_of(pod_nl.link_by_name(pod_ifname)?, pod_ifname)
    })??;
    Ok(VethPair { host, pod })
}

/// Address, link, routes and gateway neighbour of the pod end, set from inside `pod_netns`.
/// Answers the namespace's cookie, read there too ([`netns_cookie`]; `None` when the kernel
/// cannot tell it).
pub fn configure_pod_side(
    pod_netns: &NetNs,
    pod: &VethEnd,
    addressing: PodAddressing,
    host_mac: Mac,
) -> Result<Option<u64>, VethError> {
    pod_netns.run(|| -> Result<Option<u64>, VethError> {
        let nl = Netlink::open()?;
        nl.add_address(pod.index, Ipv4Net::from(addressing.ip))?;
        // Up first: the kernel refuses routes through a device that is down.
        nl.set_up(pod.index)?;
        nl.add_link_route(pod.index, Ipv4Net::from(addressing.gateway))?;
        nl.add_default_route(pod.index, addressing.gateway)?;
        nl.add_permanent_neighbour(pod.index, addressing.gateway, host_mac)?;
        Ok(netns_cookie().ok())
    })?
}

/// The calling thread's network namespace cookie: `SO_NETNS_COOKIE` of a socket made in it
/// (Linux 5.14+). The kernel's id of the namespace, never reused while it runs: what the
/// socket programs compare (`bpf_get_netns_cookie`).
pub fn netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain syscall; the descriptor is owned right below.
    let fd = unsafe {
        nix::libc::socket(
            nix::libc::AF_INET,
            nix::libc::SOCK_DGRAM | nix::libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Link, route and pod neighbour of the host end, in the calling thread's namespace.
pub fn configure_host_side(
    node: &Netlink,
    host: &VethEnd,
    pod_ip: Ipv4Addr,
    pod_mac: Mac,
) -> Result<(), VethError> {
    node.set_up(host.index)?;
    node.add_link_route(host.index, Ipv4Net::from(pod_ip))?;
    node.add_permanent_neighbour(host.index, pod_ip, pod_mac)?;
    Ok(())
}

/// Deletes the host end (the kernel removes the pod end with it). `Ok(false)`: nothing to delete.
pub fn delete_host_side(node: &Netlink, host_name: &str) -> Result<bool, VethError> {
    let Some(link) = node.link_by_name(host_name)? else {
        return Ok(false);
    };
    match node.delete_link(link.index) {
        Ok(()) => Ok(true),
        // Gone between lookup and delete (a concurrent DEL or the pod namespace vanishing).
        Err(e) if e.errno() == Some(nix::libc::ENODEV) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What CHECK compares with the previous result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSide {
    pub link: Link,
    pub addresses: Vec<Ipv4Net>,
    pub routes: Vec<Route>,
}

/// The pod end's state, `None` if `ifname` does not exist in `pod_netns`.
pub fn inspect_pod_side(pod_netns: &NetNs, ifname: &str) -> Result<Option<PodSide>, VethError> {
    pod_netns.run(|| -> Result<Option<PodSide>, VethError> {
        let nl = Netlink::open()?;
        let Some(link) = nl.link_by_name(ifname)? else {
            return Ok(None);
        };
        let addresses = nl.addresses(link.index)?;
        let routes = nl
            .routes()?
            .into_iter()
            .filter(|r| r.oif == Some(link.index))
            .collect();
        Ok(Some(PodSide {
            link,
            addresses,
            routes,
        }))
    })?
}
