//! The agent's files checked against the kernel, which is the truth: at start ([`Agent::restore`])
//! and while running ([`Agent::sweep`], [`Agent::link_removed`]).
//!
//! - An endpoint the pinned maps hold, whose host veth is still there, is kept even when
//!   `endpoints.json` lost it: the record is rebuilt from the maps and the veth's alias.
//! - Every endpoint holds its address, even when `ipam.json` lost it.
//! - An endpoint whose veth is gone leaves the maps at once (its ifindex may be reused) and is
//!   released after the grace period; so is an address allocated without an endpoint (an ADD
//!   whose plugin died or gave up), and a veth with a Myelin name that no endpoint claims.
//!
//! The grace period (`--endpoint-gc-interval`) leaves ADDs in progress alone: between the
//! plugin's two calls an address has no endpoint and a veth has no endpoint yet.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use myelin_api::{AttachmentId, Mac, is_host_ifname};
use tracing::{error, info, warn};

use super::Agent;
use crate::{
    datapath::{DatapathError, DatapathOps},
    endpoint::{EndpointRecord, EndpointStoreError},
    ipam::Adopted,
    links::{EndpointAlias, LinkInfo},
};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Store(#[from] EndpointStoreError),
}

/// What [`Agent::restore`] found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Endpoints rebuilt from the kernel because `endpoints.json` did not have them.
    pub endpoints_rebuilt: usize,
    /// Addresses given back to their endpoints because `ipam.json` did not have them (or had
    /// them under another attachment).
    pub addresses_rebuilt: usize,
    /// Endpoints whose veth is gone: released after the grace period.
    pub vanished: usize,
    /// Endpoints whose programs were attached again.
    pub live: usize,
}

/// What one [`Agent::sweep`] released, and the orphan veths the caller should delete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub released_endpoints: Vec<AttachmentId>,
    pub released_addresses: Vec<AttachmentId>,
    pub delete_links: Vec<LinkInfo>,
}

impl SweepReport {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.released_endpoints.is_empty()
            && self.released_addresses.is_empty()
            && self.delete_links.is_empty()
    }
}

impl<D: DatapathOps> Agent<D> {
    /// After a (re)start, before anything is served: reconciles `endpoints.json` and
    /// `ipam.json` with the pinned maps and the node's interfaces (`links`), re-attaches the
    /// programs of every endpoint whose veth still exists, and writes the endpoints' map
    /// entries. Until the cluster state has synced, the identities, isolation flags, ipcache and
    /// policy entries an earlier agent left in the maps stay as they are: an agent restarted
    /// while the API server is down must not forget the policies it enforced.
    pub fn restore(
        &mut self,
        links: &[LinkInfo],
        now: Instant,
    ) -> Result<RestoreReport, RestoreError> {
        let mut report = RestoreReport::default();
        let by_index: HashMap<u32, &LinkInfo> = links.iter().map(|l| (l.index, l)).collect();

        // Endpoints the maps hold and the file lost.
        for info in self.datapath.endpoints_in_maps() {
            let ip = Ipv4Addr::from(info.ip);
            if self
                .endpoints
                .iter()
                .any(|r| r.host_ifindex == info.ifindex || r.ip == ip)
            {
                continue;
            }
            // Gone while the agent was down, or the index now names another device: nothing
            // to keep (the maps drop the entry below).
            let Some(link) = by_index
                .get(&info.ifindex)
                .filter(|l| is_host_ifname(&l.name) && l.mac == Some(Mac(info.host_mac)))
            else {
                continue;
            };
            let alias = link.alias.as_deref().and_then(EndpointAlias::decode);
            let (attachment, pod) = match alias {
                Some(a) => (a.attachment, a.pod),
                // A veth of a version that wrote no alias: the runtime's DEL cannot name it,
                // but it keeps its network; once the runtime removes the veth, the endpoint
                // is released like any whose veth vanished.
                None => (AttachmentId::new(link.name.clone(), "unknown"), None),
            };
            if self.endpoints.get(&attachment).is_some() {
                warn!(
                    %attachment, ifname = link.name,
                    "the maps hold an endpoint for an attachment that has another one; leaving it out"
                );
                continue;
            }
            let id = if self.endpoints.iter().any(|r| r.id == info.id) {
                self.endpoints.free_id()?
            } else {
                info.id
            };
            error!(
                %attachment, %ip, ifname = link.name,
                "endpoints.json does not have this endpoint, but the kernel does (its veth and \
                 map entries exist): rebuilt it from the kernel; the state directory was \
                 changed behind the agent's back"
            );
            self.endpoints.insert(EndpointRecord {
                id,
                attachment,
                pod,
                // Not kept by the kernel; only shown by the API.
                netns: String::new(),
                netns_cookie: self.datapath.sock_client_cookie(info.ip, info.id),
                ip,
                mac: Mac(info.mac),
                host_ifname: link.name.clone(),
                host_ifindex: info.ifindex,
                host_mac: Mac(info.host_mac),
            });
            report.endpoints_rebuilt += 1;
        }

        // Every endpoint holds its address.
        let records: Vec<EndpointRecord> = self.endpoints.iter().cloned().collect();
        for r in &records {
            match self.ipam.adopt(&r.attachment, r.ip) {
                Ok(Adopted::Already) => {}
                Ok(Adopted::Added) => {
                    error!(
                        attachment = %r.attachment, ip = %r.ip,
                        "ipam.json does not hold the address of a live endpoint: rebuilt the \
                         allocation from the endpoint"
                    );
                    report.addresses_rebuilt += 1;
                }
                Ok(Adopted::TakenFrom(other)) => {
                    error!(
                        attachment = %r.attachment, ip = %r.ip, held_by = %other,
                        "ipam.json gives a live endpoint's address to another attachment: the \
                         endpoint keeps it, the other allocation is dropped"
                    );
                    self.unclaimed.remove(&other);
                    report.addresses_rebuilt += 1;
                }
                Err(e) => warn!(
                    attachment = %r.attachment, ip = %r.ip, error = %e,
                    "cannot reserve the address of an endpoint"
                ),
            }
        }

        // Live endpoints get their programs again; the others are released after the grace.
        for r in &records {
            let live = by_index
                .get(&r.host_ifindex)
                .is_some_and(|l| l.name == r.host_ifname);
            if live {
                self.datapath.attach(&r.host_ifname)?;
                report.live += 1;
            } else {
                warn!(
                    attachment = %r.attachment, ifname = r.host_ifname,
                    "the veth of this endpoint vanished while the agent was down; it is \
                     released after the grace period unless DEL comes first"
                );
                self.vanished.insert(r.attachment.clone(), now);
                report.vanished += 1;
            }
        }
        let claimed: BTreeSet<&AttachmentId> = records.iter().map(|r| &r.attachment).collect();
        for (attachment, _) in self.ipam.allocations() {
            if !claimed.contains(attachment) {
                self.unclaimed.insert(attachment.clone(), now);
            }
        }
        if report.endpoints_rebuilt > 0 {
            self.endpoints.save()?;
        }

        self.recompute_identities();
        let diff = self.sync_datapath()?;
        info!(
            endpoints = self.endpoints.len(),
            live = report.live,
            vanished = report.vanished,
            rebuilt = report.endpoints_rebuilt,
            addresses_rebuilt = report.addresses_rebuilt,
            written = diff.writes(),
            "state restored"
        );
        Ok(report)
    }

    /// An interface went away (netlink event): if it was an endpoint's veth, the endpoint
    /// leaves the maps now and is released after the grace period.
    pub fn link_removed(&mut self, index: u32, name: &str, now: Instant) {
        self.orphan_links.remove(&index);
        let Some(r) = self
            .endpoints
            .iter()
            .find(|r| r.host_ifindex == index && r.host_ifname == name)
        else {
            return;
        };
        let attachment = r.attachment.clone();
        if self.vanished.contains_key(&attachment) {
            return;
        }
        info!(
            %attachment, ifname = name,
            "the veth of an endpoint was removed without a CNI DEL; it is released after the grace period"
        );
        self.vanished.insert(attachment, now);
        if let Err(e) = self.sync_datapath() {
            warn!(error = %e, "removing a vanished endpoint from the maps failed");
        }
    }

    /// Periodic check against the node's interfaces (`links`, listed just before): endpoints
    /// whose veth is gone (a missed removal event), then everything past `grace`: vanished
    /// endpoints and unclaimed addresses are released, and orphan Myelin veths are returned for
    /// the caller to delete (with the veth of each released unclaimed address).
    pub fn sweep(&mut self, links: &[LinkInfo], now: Instant, grace: Duration) -> SweepReport {
        let by_index: HashMap<u32, &LinkInfo> = links.iter().map(|l| (l.index, l)).collect();
        let gone: Vec<(u32, String)> = self
            .endpoints
            .iter()
            .filter(|r| !self.vanished.contains_key(&r.attachment))
            .filter(|r| {
                by_index
                    .get(&r.host_ifindex)
                    .is_none_or(|l| l.name != r.host_ifname)
            })
            .map(|r| (r.host_ifindex, r.host_ifname.clone()))
            .collect();
        for (index, name) in gone {
            self.link_removed(index, &name, now);
        }

        let mut report = SweepReport::default();
        let expired = |since: &Instant| now.saturating_duration_since(*since) >= grace;
        let vanished: Vec<AttachmentId> = self
            .vanished
            .iter()
            .filter(|(_, since)| expired(since))
            .map(|(a, _)| a.clone())
            .collect();
        for attachment in vanished {
            match self.delete_endpoint(&attachment) {
                Ok(deleted) => {
                    info!(
                        %attachment, released = ?deleted.released,
                        "released an endpoint whose veth vanished"
                    );
                    report.released_endpoints.push(attachment);
                }
                Err(e) => warn!(%attachment, error = %e, "releasing a vanished endpoint failed"),
            }
        }

        let unclaimed: Vec<AttachmentId> = self
            .unclaimed
            .iter()
            .filter(|(a, since)| expired(since) && self.endpoints.get(a).is_none())
            .map(|(a, _)| a.clone())
            .collect();
        for attachment in unclaimed {
            match self.ipam.release(&attachment) {
                Ok(released) => {
                    self.unclaimed.remove(&attachment);
                    info!(
                        %attachment, ?released,
                        "released an address no endpoint claimed within the grace period"
                    );
                    let veth = attachment.host_ifname();
                    if let Some(link) = links.iter().find(|l| l.name == veth) {
                        report.delete_links.push(link.clone());
                    }
                    report.released_addresses.push(attachment);
                }
                Err(e) => warn!(%attachment, error = %e, "releasing an unclaimed address failed"),
            }
        }

        // Myelin veths nobody claims: neither an endpoint, nor an ADD in progress.
        let claimed: BTreeSet<String> = self
            .endpoints
            .iter()
            .map(|r| r.host_ifname.clone())
            .chain(self.unclaimed.keys().map(AttachmentId::host_ifname))
            .collect();
        let mut orphans = HashMap::new();
        for link in links {
            if !is_host_ifname(&link.name)
                || claimed.contains(&link.name)
                || report.delete_links.iter().any(|l| l.index == link.index)
            {
                continue;
            }
            let since = match self.orphan_links.get(&link.index) {
                Some((name, since)) if *name == link.name => *since,
                _ => now,
            };
            if expired(&since) {
                warn!(
                    ifname = link.name,
                    "removing a Myelin veth that no endpoint has claimed within the grace period"
                );
                report.delete_links.push(link.clone());
            } else {
                orphans.insert(link.index, (link.name.clone(), since));
            }
        }
        self.orphan_links = orphans;
        report
    }
}
