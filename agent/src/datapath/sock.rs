//! Socket-level load balancing's attachments (`--cgroup-root`): the datapath object's four
//! cgroup programs (`lb_connect4`, `lb_sendmsg4`, `lb_recvmsg4`, `lb_getpeername4`; see
//! `ebpf/datapath/src/sock.rs`) attached with BPF links to one cgroup v2, each link pinned at
//! `<bpffs>/myelin/cgroup/<cgroup id>-<program>`.
//!
//! The pins keep the programs attached while the agent is down, so sockets are translated
//! without a gap across restarts and upgrades. A restarted agent swaps its freshly loaded
//! programs into the links it finds pinned for the same cgroup (`BPF_LINK_UPDATE`, atomic: the
//! cgroup never runs neither or both), so restarts never pile up attachments. Links of another
//! cgroup (`--cgroup-root` changed) are unpinned, which detaches them, after the new ones are
//! in place; without `--cgroup-root` every pin goes.
//!
//! The cgroup id in the pin's name is the cgroup directory's inode number (what the kernel
//! reports as the cgroup id): a cgroup removed and made again under the same path is a new
//! cgroup.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use myelin_common::{maps, sock::SockLbConfig};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, fstatfs};
use tracing::{debug, info};

/// The socket programs, in the order they are attached.
pub const PROGRAMS: [&str; 4] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
];

#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    #[error("--cgroup-root {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--cgroup-root {path} is not a cgroup v2 directory (its filesystem is not cgroup2): give \
         the cgroup2 mount (e.g. /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a \
         hybrid one) or a cgroup below it"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("the agent's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    NetnsCookie(#[source] io::Error),
    #[error("the eBPF object has no socket program {0}")]
    Missing(&'static str),
    #[error("socket program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "writing the node's network namespace cookie to {}: {source}",
        maps::SOCK_LB
    )]
    Config {
        #[source]
        source: aya::maps::MapError,
    },
    #[error("socket program {program}, link pinned at {pin}: {source}")]
    Link {
        program: &'static str,
        pin: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing the pinned link {pin}: {source}")]
    Unpin {
        pin: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `--cgroup-root`, opened and checked to be a cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupRoot {
    path: PathBuf,
    dir: File,
    /// The kernel's id of the cgroup (the directory's inode number), as `bpftool cgroup show`
    /// and link info report it.
    id: u64,
}

impl CgroupRoot {
    pub fn open(path: &Path) -> Result<Self, SockLbError> {
        let open = |source| SockLbError::Open {
            path: path.to_path_buf(),
            source,
        };
        let dir = File::open(path).map_err(open)?;
        let meta = dir.metadata().map_err(open)?;
        let fs = fstatfs(&dir).map_err(|e| open(e.into()))?;
        if !meta.is_dir() || fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(SockLbError::NotCgroup2 {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            dir,
            id: meta.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the socket programs are attached, and which programs run there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// (program, kernel program id).
    pub programs: Vec<(&'static str, u32)>,
}

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> Result<u64, SockLbError> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| SockLbError::NetnsCookie(e.into()))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(SockLbError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

fn pin_dir(bpf_pin_dir: &Path) -> PathBuf {
    bpf_pin_dir.join("cgroup")
}

fn pin_path(bpf_pin_dir: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    pin_dir(bpf_pin_dir).join(format!("{cgroup_id}-{program}"))
}

/// Loads the socket programs, tells them the node's network namespace, and attaches them to
/// `root`: into the links pinned for it, else with new pinned links. Then removes the pins of
/// any other cgroup.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    bpf_pin_dir: &Path,
    root: &CgroupRoot,
) -> Result<Attached, SockLbError> {
    let cookie = netns_cookie()?;
    let map = ebpf
        .map_mut(maps::SOCK_LB)
        .ok_or(SockLbError::Missing(maps::SOCK_LB))?;
    let mut config: Array<_, SockLbConfig> =
        Array::try_from(map).map_err(|source| SockLbError::Config { source })?;
    config
        .set(
            0,
            SockLbConfig {
                netns_cookie: cookie,
            },
            0,
        )
        .map_err(|source| SockLbError::Config { source })?;
    let dir = pin_dir(bpf_pin_dir);
    fs::create_dir_all(&dir).map_err(|source| SockLbError::PinDir {
        path: dir.clone(),
        source,
    })?;
    let mut programs = Vec::new();
    for program in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(program)
            .ok_or(SockLbError::Missing(program))?
            .try_into()
            .map_err(|source| SockLbError::Program { program, source })?;
        prog.load()
            .map_err(|source| SockLbError::Program { program, source })?;
        let pin = pin_path(bpf_pin_dir, root.id, program);
        let link_err = |source: Box<dyn std::error::Error + Send + Sync>| SockLbError::Link {
            program,
            pin: pin.clone(),
            source,
        };
        match obj_get(&pin) {
            Ok(link) => {
                let prog_fd = prog
                    .fd()
                    .map_err(|source| SockLbError::Program { program, source })?;
                link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| link_err(e.into()))?;
                debug!(program, pin = %pin.display(), "socket program swapped into its pinned link");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = prog
                    .attach(&root.dir, CgroupAttachMode::Single)
                    .map_err(|e| link_err(e.into()))?;
                let link = prog.take_link(id).map_err(|e| link_err(e.into()))?;
                let link = FdLink::try_from(link).map_err(|e| link_err(e.into()))?;
                link.pin(&pin).map_err(|e| link_err(e.into()))?;
                debug!(program, pin = %pin.display(), "socket program attached");
            }
            Err(e) => return Err(link_err(e.into())),
        }
        let id = prog
            .info()
            .map_err(|source| SockLbError::Program { program, source })?
            .id();
        programs.push((program, id));
    }
    let keep: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|p| pin_path(bpf_pin_dir, root.id, p))
        .collect();
    let removed = unpin_all(bpf_pin_dir, |pin| keep.iter().any(|k| k == pin))?;
    if removed > 0 {
        info!(
            removed,
            "detached the socket programs from the cgroup an earlier agent used"
        );
    }
    info!(cgroup = %root.path.display(), cgroup_id = root.id, "socket-level load balancing attached");
    Ok(Attached {
        cgroup: root.path.clone(),
        cgroup_id: root.id,
        programs,
    })
}

/// Removes every pinned socket program link (which detaches it), and clears the node's
/// network namespace cookie so that a program still attached elsewhere translates nothing.
/// Returns how many links there were.
pub(super) fn detach(ebpf: &mut Ebpf, bpf_pin_dir: &Path) -> Result<usize, SockLbError> {
    if let Some(map) = ebpf.map_mut(maps::SOCK_LB) {
        let mut config: Array<_, SockLbConfig> =
            Array::try_from(map).map_err(|source| SockLbError::Config { source })?;
        config
            .set(0, SockLbConfig::default(), 0)
            .map_err(|source| SockLbError::Config { source })?;
    }
    unpin_all(bpf_pin_dir, |_| false)
}

/// Removes the pins under `<pin dir>/cgroup/` that `keep` does not want.
fn unpin_all(bpf_pin_dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<usize, SockLbError> {
    let dir = pin_dir(bpf_pin_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(SockLbError::Unpin { pin: dir, source }),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let pin = entry.path();
        if keep(&pin) {
            continue;
        }
        // Detached now rather than when the kernel gets round to releasing the unpinned link
        // (a deferred work item): status and `bpftool cgroup show` are right at once.
        if let Ok(link) = obj_get(&pin) {
            let _ = link_detach(link.as_fd());
        }
        match fs::remove_file(&pin) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SockLbError::Unpin { pin, source }),
        }
    }
    Ok(removed)
}

/// `BPF_OBJ_GET`: the object pinned at `path` (aya's `PinnedLink` hides the descriptor that
/// [`link_update`] needs).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // No padding the kernel would find non-zero.
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: the bpf syscall reads `size_of::<ObjGet>()` bytes of `attr`, whose path pointer
    // lives until the call returns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_DETACH`: the link's program leaves its hook now; the link itself lives on,
/// defunct, until its last reference goes.
fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link_fd = link.as_raw_fd() as u32;
    // SAFETY: the bpf syscall reads 4 bytes: `link_detach.link_fd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const link_fd,
            std::mem::size_of::<u32>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_LINK_UPDATE`: `prog` replaces the program of `link`, atomically.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the bpf syscall reads `size_of::<LinkUpdate>()` bytes of `attr`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A UDP backend as `lb_services` lists it: address, port (network byte order).
pub type BackendAddr = ([u8; 4], u16);

/// Every backend some UDP frontend of `pairs` sends to.
pub fn udp_backends(
    pairs: &std::collections::BTreeSet<super::lb::UdpPair>,
) -> std::collections::BTreeSet<BackendAddr> {
    pairs.iter().map(|(_, _, b, port)| (*b, *port)).collect()
}

/// Destroys the connected UDP sockets that the socket programs connected to one of `gone`
/// (backends no frontend sends to any more), in the agent's network namespace and in each of
/// `pods` (the pods' namespaces by cookie, as `DesiredState::sock_netns` has them): the
/// socket's peer is such a backend and its `lb_reverse_sk` entry says the socket programs gave
/// it that backend. Its owner gets `ECONNABORTED` and reconnects through the Service instead of
/// sending into a void (a DNS client, typically). TCP connections are left to drain: a backend
/// leaves the slots as soon as it is terminating while others are ready, and its connections
/// may finish; once it is really gone its stack's reset or the client's timeout ends them.
/// Done the way `ss -K` does it (`SOCK_DESTROY` over sock_diag, which calls the same
/// `diag_destroy` as the `bpf_sock_destroy` kfunc: aya 0.14 cannot load kfunc calls), in each
/// namespace from a thread that entered it (sock_diag sees one namespace's sockets). Sockets
/// connected to a backend directly are left alone. A pod namespace that cannot be entered
/// (its pod went meanwhile) is skipped. Returns how many went.
pub(super) fn destroy_connected(
    ebpf: &Ebpf,
    gone: &std::collections::BTreeSet<BackendAddr>,
    pods: &std::collections::BTreeMap<u64, String>,
) -> io::Result<usize> {
    use myelin_common::{
        proto::IPPROTO_UDP,
        sock::{LbSockFrontend, LbSockKey},
    };
    if gone.is_empty() {
        return Ok(0);
    }
    let Some(map) = ebpf.map(maps::LB_REVERSE_SK) else {
        return Ok(0);
    };
    let reverse: aya::maps::HashMap<_, LbSockKey, LbSockFrontend> =
        aya::maps::HashMap::try_from(map).map_err(io::Error::other)?;
    let in_this_namespace = || -> io::Result<usize> {
        let diag = diag::SockDiag::open()?;
        let mut destroyed = 0;
        for id in diag.dump(IPPROTO_UDP)? {
            let peer: [u8; 4] = id.dst[..4].try_into().expect("4 bytes");
            let port = u16::from_ne_bytes(id.dport);
            if !gone.contains(&(peer, port)) {
                continue;
            }
            let key = LbSockKey {
                cookie: u64::from(id.cookie[0]) | u64::from(id.cookie[1]) << 32,
                backend: peer,
                backend_port: port,
                _pad: 0,
            };
            if reverse.get(&key, 0).is_err() {
                continue;
            }
            match diag.destroy(IPPROTO_UDP, &id) {
                Ok(()) => destroyed += 1,
                // Closed meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(destroyed)
    };
    let mut destroyed = in_this_namespace()?;
    for path in pods.values() {
        let Ok(netns) = File::open(path) else {
            continue;
        };
        let entered = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    in_this_namespace()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the thread panicked")))
        });
        match entered {
            Ok(n) => destroyed += n,
            Err(e) => debug!(
                netns = path,
                "destroying sockets connected to removed backends: {e}"
            ),
        }
    }
    Ok(destroyed)
}

/// The little of sock_diag (`NETLINK_SOCK_DIAG`, `inet_diag`) that finding and destroying
/// IPv4 sockets takes.
mod diag {
    use std::{
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const SOCK_DESTROY: u16 = 21;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const HDR: usize = std::mem::size_of::<NlMsgHdr>();

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct NlMsgHdr {
        len: u32,
        ty: u16,
        flags: u16,
        seq: u32,
        pid: u32,
    }

    /// `struct inet_diag_sockid`: ports and addresses in network byte order.
    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug)]
    pub struct SockId {
        pub sport: [u8; 2],
        pub dport: [u8; 2],
        pub src: [u8; 16],
        pub dst: [u8; 16],
        pub ifindex: u32,
        pub cookie: [u32; 2],
    }

    /// `struct inet_diag_req_v2`.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Request {
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }

    /// The start of `struct inet_diag_msg`.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Msg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: SockId,
    }

    #[repr(C)]
    struct Message {
        hdr: NlMsgHdr,
        req: Request,
    }

    pub struct SockDiag {
        fd: OwnedFd,
    }

    impl SockDiag {
        pub fn open() -> io::Result<Self> {
            // SAFETY: plain syscall; the descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    NETLINK_SOCK_DIAG,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new descriptor nothing else owns.
            Ok(Self {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
            })
        }

        fn send(&self, ty: u16, flags: u16, req: Request) -> io::Result<()> {
            let message = Message {
                hdr: NlMsgHdr {
                    len: std::mem::size_of::<Message>() as u32,
                    ty,
                    flags,
                    seq: 1,
                    pid: 0,
                },
                req,
            };
            // SAFETY: sends the bytes of a plain `repr(C)` struct without padding.
            let sent = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    (&raw const message).cast(),
                    std::mem::size_of::<Message>(),
                    0,
                )
            };
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        /// Receives messages until `done` says the answer is complete; `each` gets every
        /// message's type and payload.
        fn receive(&self, mut each: impl FnMut(u16, &[u8]) -> io::Result<bool>) -> io::Result<()> {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                // SAFETY: receives into a buffer of that length.
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut data = &buf[..n as usize];
                while data.len() >= HDR {
                    // SAFETY: at least a header's bytes; read unaligned.
                    let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                    let len = (hdr.len as usize).clamp(HDR, data.len());
                    if !each(hdr.ty, &data[HDR..len])? {
                        return Ok(());
                    }
                    data = &data[(len + 3) & !3..];
                    if data.len() < HDR {
                        break;
                    }
                }
            }
        }

        /// The IPv4 sockets of `protocol` in this network namespace, in every state.
        pub fn dump(&self, protocol: u8) -> io::Result<Vec<SockId>> {
            self.send(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                Request {
                    family: libc::AF_INET as u8,
                    protocol,
                    states: u32::MAX,
                    ..Request::default()
                },
            )?;
            let mut sockets = Vec::new();
            self.receive(|ty, payload| match ty {
                NLMSG_DONE => Ok(false),
                NLMSG_ERROR => Err(error_of(payload).unwrap_or_else(|| io::Error::other("dump"))),
                _ if payload.len() >= std::mem::size_of::<Msg>() => {
                    // SAFETY: at least a message's bytes; read unaligned.
                    let msg: Msg = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
                    sockets.push(msg.id);
                    Ok(true)
                }
                _ => Ok(true),
            })?;
            Ok(sockets)
        }

        /// `SOCK_DESTROY` of the socket `id` names (its tuple and cookie, as dumped).
        pub fn destroy(&self, protocol: u8, id: &SockId) -> io::Result<()> {
            self.send(
                SOCK_DESTROY,
                NLM_F_REQUEST | NLM_F_ACK,
                Request {
                    family: libc::AF_INET as u8,
                    protocol,
                    states: u32::MAX,
                    id: *id,
                    ..Request::default()
                },
            )?;
            let mut result = Ok(());
            self.receive(|ty, payload| {
                if ty == NLMSG_ERROR {
                    result = error_of(payload).map_or(Ok(()), Err);
                }
                Ok(false)
            })?;
            result
        }
    }

    /// The error an `NLMSG_ERROR` carries; `None` for an acknowledgement (error 0).
    fn error_of(payload: &[u8]) -> Option<io::Error> {
        let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
        (code != 0).then(|| io::Error::from_raw_os_error(-code))
    }
}
