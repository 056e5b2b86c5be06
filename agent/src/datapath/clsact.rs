//! tc (clsact) attachment on devices that other programs may use too.
//!
//! Myelin's filters are the `bpf` filters that carry the name of one of its programs
//! (`TCA_BPF_NAME`, set by aya at attach and reported by the kernel in dumps); every other
//! filter on the device is someone else's and is left where it is:
//! - a filter of Myelin's already there (an earlier agent's) is replaced in place, at its
//!   priority and handle: the kernel swaps the program atomically, so the pod keeps its datapath
//!   across agent restarts;
//! - otherwise the filter goes to the lowest priority that no filter on that hook uses (1 on a
//!   device Myelin has to itself), so existing filters keep their priority and their order;
//! - detaching deletes only the filters with Myelin's program names.
//!
//! Filters run in priority order, and a filter that returns a verdict ends the walk: a foreign
//! filter at a lower priority than Myelin's sees the pod's packets first, and unless it lets them
//! continue (`action continue`, `TC_ACT_UNSPEC`), Myelin never sees them.
//!
//! Only a clsact qdisc is attached into. The legacy `ingress` qdisc sits at the same handle
//! (`ffff:`) but has a single filter list for both hooks, so the egress program would run on
//! ingress: a device with another qdisc there is refused, and that qdisc is left alone.
//!
//! aya 0.14 adds the qdisc and deletes filters by name, but keeps its netlink dump private;
//! the two queries here (the qdisc at `ffff:`, the filters on a hook) are plain route-netlink
//! requests on a blocking socket, because attaching runs in the agent's synchronous datapath
//! calls, which must not need an async runtime.

use std::io;

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
};
use aya_obj::generated::{TCA_BPF_ID, TCA_BPF_NAME, TCA_KIND, TCA_OPTIONS};
use netlink_packet_core::{
    NLA_HEADER_SIZE, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_ECHO, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NetlinkBuffer, NetlinkMessage, NlasIterator, parse_string,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcHandle, TcHeader, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The qdisc kind Myelin attaches into.
const CLSACT: &str = "clsact";
/// The filter kind aya attaches.
const BPF: &str = "bpf";
/// Handle of a filter Myelin creates; its priority is its own, so the handle never collides.
const HANDLE: u32 = 1;
/// `struct tcmsg` ahead of a tc message's attributes.
const TCMSG_LEN: usize = size_of::<aya_obj::generated::tcmsg>();

/// aya's errors are boxed: they are large, and every datapath call would carry their size.
#[derive(Debug, thiserror::Error)]
pub enum ClsactError {
    #[error(
        "{ifname} has a qdisc of kind {kind} where the clsact qdisc goes (handle ffff:); Myelin \
         attaches only into clsact and leaves that qdisc alone: delete it \
         (`tc qdisc del dev {ifname} {kind}`) or run the agent with --attach-mode tcx"
    )]
    ForeignQdisc { ifname: String, kind: String },
    #[error("interface {ifname}: {source}")]
    Interface {
        ifname: String,
        #[source]
        source: nix::Error,
    },
    #[error("{operation} on {ifname}: {source}")]
    Netlink {
        ifname: String,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{operation} on {ifname}: {source}")]
    Tc {
        ifname: String,
        operation: &'static str,
        #[source]
        source: Box<TcError>,
    },
    #[error("attaching {program} to {ifname} ({hook}): {source}")]
    Attach {
        program: String,
        ifname: String,
        hook: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
}

/// A filter on one hook of a clsact qdisc, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// 0 for the entry that stands for a priority's filter list itself.
    pub handle: u32,
    pub kind: String,
    /// The program name of a `bpf` filter.
    pub bpf_name: Option<String>,
    /// The id of a `bpf` filter's program: a replaced filter keeps its priority and handle and
    /// gets a new program.
    pub prog_id: Option<u32>,
}

impl Filter {
    /// Whether this is a `bpf` filter running `program` (Myelin's filters are named so).
    pub fn runs(&self, program: &str) -> bool {
        self.kind == BPF && self.bpf_name.as_deref() == Some(program)
    }
}

pub(crate) fn hook_name(hook: TcAttachType) -> &'static str {
    match hook {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// Makes sure `ifname` has a clsact qdisc: adds one where the handle is free, refuses any other
/// qdisc there.
pub fn ensure_qdisc(ifname: &str) -> Result<(), ClsactError> {
    let ifindex = ifindex(ifname)?;
    match qdisc_kind(ifname, ifindex)? {
        Some(kind) if kind == CLSACT => Ok(()),
        Some(kind) => Err(ClsactError::ForeignQdisc {
            ifname: ifname.to_string(),
            kind,
        }),
        None => tc::qdisc_add_clsact(ifname).map_err(|source| ClsactError::Tc {
            ifname: ifname.to_string(),
            operation: "adding the clsact qdisc",
            source: Box::new(source),
        }),
    }
}

/// Attaches `prog` (loaded, named `program`) to `hook` of `ifname`'s clsact qdisc, which
/// [`ensure_qdisc`] made sure of, replacing Myelin's filter there if it has one. The filter
/// outlives the agent.
pub fn attach(
    prog: &mut SchedClassifier,
    program: &str,
    ifname: &str,
    hook: TcAttachType,
) -> Result<(), ClsactError> {
    let failed = |source: ProgramError| ClsactError::Attach {
        program: program.to_string(),
        ifname: ifname.to_string(),
        hook: hook_name(hook),
        source: Box::new(source),
    };
    let filters = filters(ifname, hook)?;
    let id = match filters.iter().find(|f| f.runs(program)) {
        Some(f) => {
            let existing = SchedClassifierLink::attached(
                ifname,
                hook,
                f.priority,
                tc::TcHandle::from(f.handle),
                None,
            )
            .map_err(|e| failed(TcError::IoError(e).into()))?;
            prog.attach_to_link(existing)
        }
        None => prog.attach_with_options(
            ifname,
            hook,
            TcAttachOptions::Netlink(NlOptions {
                priority: free_priority(&filters),
                handle: tc::TcHandle::from(HANDLE),
                ..Default::default()
            }),
        ),
    }
    .map_err(failed)?;
    // A netlink link detaches when dropped; the filter must outlive this process.
    std::mem::forget(prog.take_link(id).map_err(failed)?);
    Ok(())
}

/// Deletes the filters of `program` from `hook` of `ifname`, and nothing else. Succeeds when
/// there are none, or no interface (its filters went with it).
pub fn detach(ifname: &str, hook: TcAttachType, program: &str) -> Result<(), ClsactError> {
    match tc::qdisc_detach_program(ifname, hook, program) {
        Ok(()) => Ok(()),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) if nix::net::if_::if_nametoindex(ifname).is_err() => Ok(()),
        Err(source) => Err(ClsactError::Tc {
            ifname: ifname.to_string(),
            operation: "detaching Myelin's filters",
            source: Box::new(source),
        }),
    }
}

/// The filters on `hook` of `ifname`'s clsact qdisc (none without one).
pub fn filters(ifname: &str, hook: TcAttachType) -> Result<Vec<Filter>, ClsactError> {
    let mut request = TcMessage::with_index(ifindex(ifname)? as i32);
    request.header.parent = TcHandle {
        major: TcHandle::CLSACT.major,
        minor: match hook {
            TcAttachType::Egress => TcHandle::MIN_EGRESS,
            _ => TcHandle::MIN_INGRESS,
        },
    };
    let replies = rtnl(
        RouteNetlinkMessage::GetTrafficFilter(request),
        NLM_F_REQUEST | NLM_F_DUMP,
    )
    .map_err(|source| ClsactError::Netlink {
        ifname: ifname.to_string(),
        operation: "listing tc filters",
        source,
    })?;
    Ok(replies
        .into_iter()
        .filter(|r| r.message_type == libc::RTM_NEWTFILTER)
        .map(|r| {
            let mut filter = Filter {
                priority: (r.header.info >> 16) as u16,
                handle: r.header.handle.into(),
                kind: String::new(),
                bpf_name: None,
                prog_id: None,
            };
            for (kind, value) in attributes(&r.attributes) {
                match kind {
                    k if k == TCA_KIND as u16 => filter.kind = string(value),
                    // Options are kind-specific; TCA_KIND comes first.
                    k if k == TCA_OPTIONS as u16 && filter.kind == BPF => {
                        for (option, value) in attributes(value) {
                            match option {
                                o if o == TCA_BPF_NAME as u16 => {
                                    filter.bpf_name = Some(string(value))
                                }
                                o if o == TCA_BPF_ID as u16 => {
                                    filter.prog_id = value.try_into().ok().map(u32::from_ne_bytes)
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            filter
        })
        .collect())
}

/// The lowest priority no filter in `filters` has; 0 (the kernel picks) if all are taken.
fn free_priority(filters: &[Filter]) -> u16 {
    (1..=u16::MAX)
        .find(|p| filters.iter().all(|f| f.priority != *p))
        .unwrap_or(0)
}

fn ifindex(ifname: &str) -> Result<u32, ClsactError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|source| ClsactError::Interface {
        ifname: ifname.to_string(),
        source,
    })
}

/// The kind of the qdisc at the clsact handle (`ffff:`), if there is one.
fn qdisc_kind(ifname: &str, ifindex: u32) -> Result<Option<String>, ClsactError> {
    let mut request = TcMessage::with_index(ifindex as i32);
    request.header.parent = TcHandle::CLSACT;
    // A get answers only with NLM_F_ECHO (the kernel sends its reply as a notification).
    match rtnl(
        RouteNetlinkMessage::GetQueueDiscipline(request),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO,
    ) {
        Ok(replies) => Ok(replies
            .iter()
            .filter(|r| r.message_type == libc::RTM_NEWQDISC)
            .flat_map(|r| attributes(&r.attributes))
            .find(|(kind, _)| *kind == TCA_KIND as u16)
            .map(|(_, value)| string(value))),
        // Never had one.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(ClsactError::Netlink {
            ifname: ifname.to_string(),
            operation: "looking up the qdisc at ffff:",
            source,
        }),
    }
}

/// A tc message of a route-netlink answer: its header and its undecoded attributes.
struct Reply {
    message_type: u16,
    header: TcHeader,
    attributes: Vec<u8>,
}

/// Sends `message` on a route-netlink socket of its own and collects the answer, up to its
/// acknowledgement or the end of the dump.
fn rtnl(message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<Reply>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::from(message);
    request.header.flags = flags;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let malformed = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut replies = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            let message = NetlinkBuffer::new_checked(rest)
                .map_err(|_| malformed("truncated netlink message"))?;
            let payload = message.payload();
            match message.message_type() {
                // An error, or with code 0 the acknowledgement that ends a request.
                NLMSG_ERROR | NLMSG_DONE => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return match code {
                        0 => Ok(replies),
                        code => Err(io::Error::from_raw_os_error(-code)),
                    };
                }
                message_type => {
                    let header = TcHeader::parse(payload)
                        .map_err(|_| malformed("tc message shorter than struct tcmsg"))?;
                    replies.push(Reply {
                        message_type,
                        header,
                        attributes: payload.get(TCMSG_LEN..).unwrap_or_default().to_vec(),
                    });
                }
            }
            let len = (message.length() as usize).next_multiple_of(4);
            rest = rest.get(len..).unwrap_or_default();
        }
    }
}

/// The (type, value) attributes in `bytes`; a malformed tail ends the walk, as it would in the
/// kernel's own parsers, rather than failing on a foreign filter's options.
fn attributes(bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(bytes).map_while(Result::ok).map(|nla| {
        let (kind, len) = (nla.kind() & NLA_TYPE_MASK, usize::from(nla.length()));
        // The buffer runs from this attribute to the end; its checked length bounds it.
        (kind, &nla.into_inner()[NLA_HEADER_SIZE..len])
    })
}

fn string(value: &[u8]) -> String {
    parse_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(priority: u16) -> Filter {
        Filter {
            priority,
            handle: 1,
            kind: "u32".into(),
            bpf_name: None,
            prog_id: None,
        }
    }

    #[test]
    fn a_new_filter_takes_the_lowest_priority_no_filter_has() {
        assert_eq!(free_priority(&[]), 1);
        assert_eq!(free_priority(&[filter(1)]), 2);
        assert_eq!(free_priority(&[filter(2), filter(1), filter(4)]), 3);
        assert_eq!(free_priority(&[filter(49152)]), 1);
    }

    #[test]
    fn only_bpf_filters_with_the_program_name_are_myelins() {
        let ours = Filter {
            kind: BPF.into(),
            bpf_name: Some("from_container".into()),
            ..filter(1)
        };
        assert!(ours.runs("from_container"));
        assert!(!ours.runs("to_container"));
        let named_alike = Filter {
            kind: "u32".into(),
            ..ours.clone()
        };
        assert!(!named_alike.runs("from_container"));
    }
}
