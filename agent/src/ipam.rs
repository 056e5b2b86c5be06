//! Address management over the node's pod CIDR.
//!
//! The network address, the broadcast address and the gateway (the first host address, held by
//! the node) are never handed out. Allocations are keyed by CNI attachment and persisted after
//! every change, atomically, so that a restarted agent never hands out an address in use.
//! Addresses are handed out round-robin from the last one allocated, like host-local: a freshly
//! released address is the last to be reused, which keeps stale neighbour and conntrack state
//! of a deleted pod away from the next one.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use myelin_api::AttachmentId;
use serde::{Deserialize, Serialize};

use crate::persist::{self, PersistError};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "pod CIDR {0} is too small: it needs room for the gateway and at least one pod (/30 or larger)"
    )]
    CidrTooSmall(Ipv4Net),
    #[error("{attachment} already has address {ip}")]
    AlreadyAllocated {
        attachment: AttachmentId,
        ip: Ipv4Addr,
    },
    #[error("no free address left in pod CIDR {0}")]
    Exhausted(Ipv4Net),
    #[error("{ip} is not a pod address of pod CIDR {cidr}")]
    OutsidePool { ip: Ipv4Addr, cidr: Ipv4Net },
    #[error(
        "the state in {path} was written for pod CIDR {persisted} but the node's pod CIDR is now {configured}; \
         {allocated} address(es) are still allocated: delete those pods first or restore the old CIDR"
    )]
    CidrChanged {
        path: PathBuf,
        persisted: Ipv4Net,
        configured: Ipv4Net,
        allocated: usize,
    },
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// What [`Ipam::adopt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopted {
    /// The attachment held the address already.
    Already,
    /// The address was free and is now the attachment's.
    Added,
    /// The address was another attachment's, which loses it.
    TakenFrom(AttachmentId),
}

#[derive(Debug)]
pub struct Ipam {
    cidr: Ipv4Net,
    /// Host addresses handed out, in address order.
    by_ip: BTreeMap<Ipv4Addr, AttachmentId>,
    by_attachment: HashMap<AttachmentId, Ipv4Addr>,
    /// Last address handed out; the next search starts after it.
    last: Ipv4Addr,
    path: Option<PathBuf>,
}

/// On-disk form (`<state-dir>/ipam.json`).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpamFile {
    pod_cidr: Ipv4Net,
    last: Ipv4Addr,
    allocations: Vec<AllocationRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AllocationRecord {
    ip: Ipv4Addr,
    #[serde(flatten)]
    attachment: AttachmentId,
}

impl Ipam {
    /// An IPAM that lives only in memory (tests).
    pub fn in_memory(cidr: Ipv4Net) -> Result<Self, IpamError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > 30 {
            return Err(IpamError::CidrTooSmall(cidr));
        }
        Ok(Self {
            cidr,
            by_ip: BTreeMap::new(),
            by_attachment: HashMap::new(),
            last: Self::gateway_of(cidr),
            path: None,
        })
    }

    /// Loads the allocations persisted at `path`, or starts empty.
    pub fn open(path: PathBuf, cidr: Ipv4Net) -> Result<Self, IpamError> {
        let mut ipam = Self::in_memory(cidr)?;
        if let Some(file) = persist::load::<IpamFile>(&path)? {
            let persisted = file.pod_cidr.trunc();
            if persisted != ipam.cidr && !file.allocations.is_empty() {
                return Err(IpamError::CidrChanged {
                    path,
                    persisted,
                    configured: ipam.cidr,
                    allocated: file.allocations.len(),
                });
            }
            if persisted == ipam.cidr {
                ipam.last = file.last;
            }
            for a in file.allocations {
                ipam.by_attachment.insert(a.attachment.clone(), a.ip);
                ipam.by_ip.insert(a.ip, a.attachment);
            }
        }
        ipam.path = Some(path);
        Ok(ipam)
    }

    /// The pod CIDR a previous run persisted at `path`, if any: a restarted agent that cannot
    /// reach the API server keeps serving its pods with it.
    pub fn persisted_cidr(path: &Path) -> Result<Option<Ipv4Net>, IpamError> {
        Ok(persist::load::<IpamFile>(path)?.map(|file| file.pod_cidr.trunc()))
    }

    fn gateway_of(cidr: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(cidr.network()) + 1)
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The node-side address pods route through.
    pub fn gateway(&self) -> Ipv4Addr {
        Self::gateway_of(self.cidr)
    }

    /// First and last address that may be handed to a pod.
    fn pool_bounds(&self) -> (u32, u32) {
        (
            u32::from(self.cidr.network()) + 2,
            u32::from(self.cidr.broadcast()) - 1,
        )
    }

    pub fn capacity(&self) -> u64 {
        let (first, last) = self.pool_bounds();
        u64::from(last - first + 1)
    }

    pub fn free(&self) -> u64 {
        self.capacity() - self.by_ip.len() as u64
    }

    pub fn get(&self, attachment: &AttachmentId) -> Option<Ipv4Addr> {
        self.by_attachment.get(attachment).copied()
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&AttachmentId, Ipv4Addr)> {
        self.by_ip.iter().map(|(ip, a)| (a, *ip))
    }

    pub fn allocate(&mut self, attachment: &AttachmentId) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.get(attachment) {
            return Err(IpamError::AlreadyAllocated {
                attachment: attachment.clone(),
                ip,
            });
        }
        let (first, last) = self.pool_bounds();
        let start = u32::from(self.last).clamp(first - 1, last);
        // Search (start, last], then [first, start]: the first free address after the cursor.
        let candidates = (start + 1..=last).chain(first..=start);
        let ip = candidates
            .map(Ipv4Addr::from)
            .find(|ip| !self.by_ip.contains_key(ip))
            .ok_or(IpamError::Exhausted(self.cidr))?;
        self.by_ip.insert(ip, attachment.clone());
        self.by_attachment.insert(attachment.clone(), ip);
        let previous_last = std::mem::replace(&mut self.last, ip);
        if let Err(e) = self.save() {
            self.by_ip.remove(&ip);
            self.by_attachment.remove(attachment);
            self.last = previous_last;
            return Err(e);
        }
        Ok(ip)
    }

    /// Makes `ip` the attachment's address, whatever the allocations say: the kernel has an
    /// endpoint with it (see `Agent::restore`). An address the attachment held before, or
    /// another attachment's hold on `ip`, is dropped.
    pub fn adopt(&mut self, attachment: &AttachmentId, ip: Ipv4Addr) -> Result<Adopted, IpamError> {
        let (first, last) = self.pool_bounds();
        if !(first..=last).contains(&u32::from(ip)) {
            return Err(IpamError::OutsidePool {
                ip,
                cidr: self.cidr,
            });
        }
        if self.get(attachment) == Some(ip) {
            return Ok(Adopted::Already);
        }
        let before = (self.by_ip.clone(), self.by_attachment.clone());
        if let Some(old) = self.by_attachment.remove(attachment) {
            self.by_ip.remove(&old);
        }
        let outcome = match self.by_ip.insert(ip, attachment.clone()) {
            Some(other) => {
                self.by_attachment.remove(&other);
                Adopted::TakenFrom(other)
            }
            None => Adopted::Added,
        };
        self.by_attachment.insert(attachment.clone(), ip);
        if let Err(e) = self.save() {
            (self.by_ip, self.by_attachment) = before;
            return Err(e);
        }
        Ok(outcome)
    }

    /// Releases the attachment's address; `Ok(None)` if it had none.
    pub fn release(&mut self, attachment: &AttachmentId) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(ip) = self.by_attachment.remove(attachment) else {
            return Ok(None);
        };
        self.by_ip.remove(&ip);
        if let Err(e) = self.save() {
            self.by_attachment.insert(attachment.clone(), ip);
            self.by_ip.insert(ip, attachment.clone());
            return Err(e);
        }
        Ok(Some(ip))
    }

    fn save(&self) -> Result<(), IpamError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = IpamFile {
            pod_cidr: self.cidr,
            last: self.last,
            allocations: self
                .by_ip
                .iter()
                .map(|(ip, a)| AllocationRecord {
                    ip: *ip,
                    attachment: a.clone(),
                })
                .collect(),
        };
        persist::store(path, &file)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(n: usize) -> AttachmentId {
        AttachmentId::new(format!("c{n}"), "eth0")
    }

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn never_hands_out_network_gateway_or_broadcast() {
        let mut ipam = Ipam::in_memory(cidr("10.0.0.0/29")).unwrap();
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 0, 0, 1));
        let ips: Vec<_> = (0..5).map(|n| ipam.allocate(&att(n)).unwrap()).collect();
        assert_eq!(
            ips,
            (2..=6)
                .map(|h| Ipv4Addr::new(10, 0, 0, h))
                .collect::<Vec<_>>()
        );
        assert!(matches!(
            ipam.allocate(&att(9)),
            Err(IpamError::Exhausted(_))
        ));
    }

    #[test]
    fn slash_30_has_exactly_one_pod_address() {
        let mut ipam = Ipam::in_memory(cidr("10.0.0.4/30")).unwrap();
        assert_eq!(ipam.capacity(), 1);
        assert_eq!(ipam.allocate(&att(1)).unwrap(), Ipv4Addr::new(10, 0, 0, 6));
        assert!(matches!(
            ipam.allocate(&att(2)),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(ipam.free(), 0);
    }

    #[test]
    fn too_small_cidrs_are_rejected() {
        assert!(matches!(
            Ipam::in_memory(cidr("10.0.0.0/31")),
            Err(IpamError::CidrTooSmall(_))
        ));
    }

    #[test]
    fn host_bits_in_the_cidr_are_ignored() {
        let ipam = Ipam::in_memory(cidr("10.0.0.77/24")).unwrap();
        assert_eq!(ipam.cidr(), cidr("10.0.0.0/24"));
    }

    #[test]
    fn second_allocation_for_an_attachment_is_refused() {
        let mut ipam = Ipam::in_memory(cidr("10.0.0.0/24")).unwrap();
        let ip = ipam.allocate(&att(1)).unwrap();
        match ipam.allocate(&att(1)) {
            Err(IpamError::AlreadyAllocated { ip: existing, .. }) => assert_eq!(existing, ip),
            other => panic!("{other:?}"),
        }
        assert_eq!(ipam.free(), ipam.capacity() - 1);
    }

    #[test]
    fn released_address_is_reused_only_after_the_rest_of_the_pool() {
        let mut ipam = Ipam::in_memory(cidr("10.0.0.0/29")).unwrap();
        let first = ipam.allocate(&att(1)).unwrap();
        assert_eq!(ipam.release(&att(1)).unwrap(), Some(first));
        assert_eq!(ipam.release(&att(1)).unwrap(), None);
        let next: Vec<_> = (2..=6).map(|n| ipam.allocate(&att(n)).unwrap()).collect();
        assert_eq!(*next.last().unwrap(), first, "wrapped around last");
        assert!(!next[..4].contains(&first));
    }

    #[test]
    fn allocations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut ipam = Ipam::open(path.clone(), cidr("10.0.0.0/28")).unwrap();
        let a = ipam.allocate(&att(1)).unwrap();
        let b = ipam.allocate(&att(2)).unwrap();
        ipam.release(&att(1)).unwrap();
        drop(ipam);

        let mut ipam = Ipam::open(path, cidr("10.0.0.0/28")).unwrap();
        assert_eq!(ipam.get(&att(2)), Some(b));
        assert_eq!(ipam.get(&att(1)), None);
        let c = ipam.allocate(&att(3)).unwrap();
        assert_ne!(c, b, "an address in use is never handed out again");
        assert_ne!(c, a, "round-robin continues after the restart");
    }

    #[test]
    fn persisted_cidr_is_read_back_without_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        assert_eq!(Ipam::persisted_cidr(&path).unwrap(), None);
        let mut ipam = Ipam::open(path.clone(), cidr("10.0.0.0/28")).unwrap();
        ipam.allocate(&att(1)).unwrap();
        assert_eq!(
            Ipam::persisted_cidr(&path).unwrap(),
            Some(cidr("10.0.0.0/28"))
        );
    }

    #[test]
    fn changed_cidr_with_live_allocations_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut ipam = Ipam::open(path.clone(), cidr("10.0.0.0/28")).unwrap();
        ipam.allocate(&att(1)).unwrap();
        drop(ipam);
        let err = Ipam::open(path.clone(), cidr("10.1.0.0/28")).unwrap_err();
        assert!(
            matches!(err, IpamError::CidrChanged { allocated: 1, .. }),
            "{err}"
        );

        let mut ipam = Ipam::open(path.clone(), cidr("10.0.0.0/28")).unwrap();
        ipam.release(&att(1)).unwrap();
        drop(ipam);
        let ipam = Ipam::open(path, cidr("10.1.0.0/28")).unwrap();
        assert_eq!(ipam.free(), ipam.capacity());
    }

    #[test]
    fn adopting_an_address_takes_it_from_whoever_held_it() {
        let mut ipam = Ipam::in_memory(cidr("10.0.0.0/29")).unwrap();
        let a = ipam.allocate(&att(1)).unwrap();
        assert_eq!(ipam.adopt(&att(1), a).unwrap(), Adopted::Already);
        assert_eq!(ipam.adopt(&att(2), a).unwrap(), Adopted::TakenFrom(att(1)));
        assert_eq!(ipam.get(&att(1)), None);
        assert_eq!(ipam.get(&att(2)), Some(a));
        let free = Ipv4Addr::new(10, 0, 0, 6);
        assert_eq!(ipam.adopt(&att(2), free).unwrap(), Adopted::Added);
        assert_eq!(
            ipam.get(&att(2)),
            Some(free),
            "its earlier address is dropped"
        );
        assert_eq!(ipam.free(), ipam.capacity() - 1);
        // Never the gateway or an address outside the pool.
        for ip in [ipam.gateway(), Ipv4Addr::new(10, 0, 1, 2)] {
            assert!(matches!(
                ipam.adopt(&att(3), ip),
                Err(IpamError::OutsidePool { .. })
            ));
        }
    }

    #[test]
    fn failed_persist_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be makes every write fail.
        let path = dir.path().join("ipam.json");
        std::fs::create_dir(&path).unwrap();
        let mut ipam = Ipam::in_memory(cidr("10.0.0.0/29")).unwrap();
        ipam.path = Some(path);
        assert!(matches!(ipam.allocate(&att(1)), Err(IpamError::Persist(_))));
        assert_eq!(ipam.free(), ipam.capacity());
        assert_eq!(ipam.get(&att(1)), None);
    }
}
