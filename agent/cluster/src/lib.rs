//! Cluster state as Myelin's agent computes with it, free of I/O and of the datapath: the slim
//! records Kubernetes objects are converted into ([`objects`]), NetworkPolicy in validated form
//! ([`policy`]), Services and EndpointSlices ([`service`]), the index both sources feed ([`index`]), security identities ([`identity`]) and
//! the multi-document YAML of the directory source ([`documents`]).
//!
//! A crate of its own so that everything that parses input from outside the agent can be
//! unit-tested and fuzzed without the eBPF object, aya or a runtime.

#[cfg(any(test, feature = "builders"))]
pub mod builders;
pub mod documents;
pub mod explain;
pub mod identity;
pub mod index;
pub mod objects;
pub mod policy;
pub mod service;

pub use identity::{Identities, IdentityLabels};
pub use index::{ChangedServices, ClusterIndex};
pub use objects::{
    Change, ContainerPort, Kind, Labels, NAMESPACE_NAME_LABEL, NamespaceInfo, NodeInfo, Object,
    ObjectError, PodInfo, Warnings,
};
pub use policy::{PolicyInfo, PolicyRejection, Protocol};
pub use service::{EndpointSliceInfo, ServiceInfo};
