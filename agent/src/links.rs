//! The node's network interfaces as the kernel reports them: listing, removal events, and the
//! alias Myelin writes on every endpoint's host veth.
//!
//! The kernel is the truth the agent's files are checked against: an endpoint whose host veth is
//! gone is released, and a Myelin veth nobody claims is removed (see `Agent::sweep`). The alias
//! names the attachment and the pod, so that a lost `endpoints.json` can be rebuilt from the
//! kernel alone (`myelin <containerid>/<ifname> [<namespace>/<pod>]`, which `ip link` shows).

use futures::{StreamExt as _, TryStreamExt as _};
use myelin_api::{AttachmentId, Mac, PodRef};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::{Handle, LinkUnspec, MulticastGroup};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The most bytes Linux keeps of an interface alias (IFALIASZ - 1).
const ALIAS_MAX: usize = 255;
const ALIAS_TAG: &str = "myelin";

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

/// One interface of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub alias: Option<String>,
}

impl LinkInfo {
    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Self {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            alias: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(bytes) => {
                    link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(Mac);
                }
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias),
                _ => {}
            }
        }
        link
    }
}

/// What an endpoint's alias says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAlias {
    pub attachment: AttachmentId,
    pub pod: Option<PodRef>,
}

impl EndpointAlias {
    /// The alias text, or `None` when even the attachment does not fit (the pod is left out
    /// first). Container ids, interface and Kubernetes names contain no spaces or slashes
    /// beyond the ones written here, so the text parses back unambiguously.
    pub fn encode(&self) -> Option<String> {
        let base = format!(
            "{ALIAS_TAG} {}/{}",
            self.attachment.container_id, self.attachment.ifname
        );
        let full = match &self.pod {
            Some(p) => format!("{base} {}/{}", p.namespace, p.name),
            None => base.clone(),
        };
        [full, base].into_iter().find(|a| a.len() <= ALIAS_MAX)
    }

    pub fn decode(alias: &str) -> Option<Self> {
        let mut words = alias.split(' ');
        if words.next() != Some(ALIAS_TAG) {
            return None;
        }
        let (container_id, ifname) = words.next()?.rsplit_once('/')?;
        if container_id.is_empty() || ifname.is_empty() {
            return None;
        }
        let pod = match words.next() {
            Some(p) => {
                let (namespace, name) = p.split_once('/')?;
                Some(PodRef {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            None => None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(Self {
            attachment: AttachmentId::new(container_id, ifname),
            pod,
        })
    }
}

/// Route-netlink in the agent's network namespace (the node's). The connection runs as a task
/// of the runtime that opened it; the handle can be used from any runtime.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    pub fn open() -> Result<Self, LinksError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinksError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The route-netlink handle, for the node's routing (`crate::routing`).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn list(&self) -> Result<Vec<LinkInfo>, LinksError> {
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await? {
            out.push(LinkInfo::from_message(msg));
        }
        Ok(out)
    }

    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<(), LinksError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).alias(alias).build())
            .execute()
            .await?;
        Ok(())
    }

    /// Deletes an interface; one already gone is not an error.
    pub async fn delete(&self, index: u32) -> Result<(), LinksError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// An interface went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRemoved {
    pub index: u32,
    pub name: String,
}

/// Reports every interface removal in the agent's namespace until the receiver is dropped.
/// Events can be lost (the socket's buffer overflows when thousands of links go at once): the
/// periodic sweep catches up with those.
pub fn watch_removals() -> Result<mpsc::Receiver<LinkRemoved>, LinksError> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(LinksError::Socket)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)) = message.payload
            else {
                continue;
            };
            let link = LinkInfo::from_message(msg);
            debug!(
                ifindex = link.index,
                ifname = link.name,
                "interface removed"
            );
            let removed = LinkRemoved {
                index: link.index,
                name: link.name,
            };
            // A full queue means the owner is behind; the sweep will see the link gone.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(removed) {
                return;
            }
        }
        warn!("the interface removal watch ended; relying on the periodic sweep");
    });
    Ok(rx)
}

/// Says when an IPv4 address was added or removed anywhere in the agent's namespace, until the
/// receiver is dropped: the uplink's subnets decide which nodes are reached without a router.
/// Changes are coalesced (one pending signal stands for any number of them), so a burst of
/// address changes never queues up work.
pub fn watch_address_changes() -> Result<mpsc::Receiver<()>, LinksError> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Ifaddr])
            .map_err(LinksError::Socket)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            if !matches!(
                message.payload,
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_)
                )
            ) {
                continue;
            }
            debug!("an IPv4 address changed");
            // Full: a signal is pending already, and the owner reads every address then.
            if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                return;
            }
        }
        warn!(
            "the address watch ended; the uplink's subnets stay as they are until the agent restarts"
        );
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(c: &str, pod: Option<(&str, &str)>) -> EndpointAlias {
        EndpointAlias {
            attachment: AttachmentId::new(c, "eth0"),
            pod: pod.map(|(namespace, name)| PodRef {
                namespace: namespace.into(),
                name: name.into(),
            }),
        }
    }

    #[test]
    fn an_alias_round_trips_with_and_without_its_pod() {
        for a in [alias("c1", Some(("default", "web"))), alias("c1", None)] {
            let text = a.encode().unwrap();
            assert!(text.starts_with("myelin c1/eth0"), "{text}");
            assert_eq!(EndpointAlias::decode(&text), Some(a));
        }
    }

    #[test]
    fn a_long_pod_name_is_left_out_and_a_too_long_attachment_gives_no_alias() {
        let long_pod = "p".repeat(253);
        let a = alias("c1", Some(("default", &long_pod)));
        assert_eq!(a.encode().as_deref(), Some("myelin c1/eth0"));
        assert_eq!(alias(&"c".repeat(250), None).encode(), None);
    }

    #[test]
    fn foreign_or_malformed_aliases_are_not_endpoints() {
        for text in [
            "",
            "uplink to the rack switch",
            "myelin",
            "myelin c1",
            "myelin /eth0",
            "myelin c1/eth0 default",
            "myelin c1/eth0 default/web extra",
        ] {
            assert_eq!(EndpointAlias::decode(text), None, "{text:?}");
        }
    }
}
