//! The agent process: wires the source, the agent's owner, the datapath, the API socket and the
//! metrics endpoint together, and runs until SIGTERM/SIGINT. This is the process edge, so
//! errors are `anyhow` with context.
//!
//! Start order matters, one phase after the other:
//! 1. [`claim_node`]: one agent per state directory and socket (locks), before touching either.
//! 2. [`start_source`] and [`wait_for_pod_cidr`]: the pod CIDR must be known before IPAM opens.
//! 3. [`open_state`]: IPAM and endpoint files; an unreadable one is moved aside, and the kernel's
//!    state rebuilds it in phase 4.
//! 4. [`start_datapath`]: the node device, the maps and programs, then `Agent::restore` checks the
//!    files against the kernel and the queued DELs are carried out: all before the API accepts
//!    the first CNI ADD, so a restarted agent never answers with stale state.
//! 5. [`serve`]: the owner, the API, metrics, interface watch; until a signal (the conntrack and
//!    NAT collectors started with the datapath).

use std::{path::Path, sync::Arc, time::Instant};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use myelin_cluster::ClusterIndex;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use myelin_cluster::Kind;
use myelin_common::config::{
    CONFIG_F_MASQUERADE, CONFIG_F_NATIVE, CONFIG_F_SERVICES, CONFIG_F_TUNNEL,
};

use crate::{
    agent::{Agent, SystemInterfaces},
    api, bpffs,
    config::{AgentConfig, RoutingMode},
    datapath::{
        Datapath, DatapathOps as _, Routing,
        conntrack::ConntrackTable,
        nat::{self, Masquerade, NatPorts},
        sock,
    },
    endpoint::{EndpointStore, EndpointStoreError},
    events,
    http::ServerLimits,
    ipam::{Ipam, IpamError},
    links::{self, Links},
    lock::AgentLock,
    metrics::{self, Metrics, SnapshotSource},
    netconf,
    owner::{self, Settings, count_event},
    persist::{self, PersistError},
    routing::{self, NodeNetwork},
    source::{
        SourceEvent, SourceSpec,
        dir::DirSource,
        kubernetes::{self, KubernetesSource},
    },
};

/// How often the queue of DELs that found the agent down is looked at again: a DEL that raced
/// the agent's start is queued after the startup pass.
const PENDING_DELETES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long to wait for a pod CIDR before saying so again.
const CIDR_WAIT_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    config.check()?;
    let node_name = config.node_name();
    info!(node = node_name, source = ?config.source, "starting myelin-agent {}", env!("CARGO_PKG_VERSION"));
    let _locks = claim_node(&config)?;
    let metrics = Metrics::default();
    let mut source = start_source(&config).await?;
    let cluster = wait_for_pod_cidr(&config, &node_name, &mut source, &metrics).await?;
    let (ipam, endpoints) = open_state(&config, cluster.pod_cidr)?;
    let started = start_datapath(&config, &node_name, ipam, endpoints, cluster, &metrics).await?;
    serve(&config, node_name, source, metrics, started).await
}

/// Phase 1: the state directory exists and this agent alone uses it and the socket.
fn claim_node(config: &AgentConfig) -> anyhow::Result<[AgentLock; 2]> {
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.state_dir.display()
        )
    })?;
    let state_lock = AgentLock::acquire(&config.state_dir.join("agent.lock"))?;
    let socket_dir = config
        .socket
        .parent()
        .context("--socket has no parent directory")?;
    api::private_dir(socket_dir)
        .with_context(|| format!("creating the socket directory {}", socket_dir.display()))?;
    let mut socket_lock = config.socket.as_os_str().to_owned();
    socket_lock.push(".lock");
    let socket_lock = AgentLock::acquire(Path::new(&socket_lock))?;
    Ok([state_lock, socket_lock])
}

/// Phase 2a: the cluster-state source, feeding a channel.
async fn start_source(config: &AgentConfig) -> anyhow::Result<mpsc::Receiver<SourceEvent>> {
    let (tx, rx) = mpsc::channel::<SourceEvent>(64);
    let kinds = Kind::used(config.kube_proxy_replacement);
    match &config.source {
        SourceSpec::Dir(path) => {
            if !path.is_dir() {
                bail!("--source dir:{}: not a directory", path.display());
            }
            DirSource::new(path.clone(), config.max_object_file_size)
                .reading(kinds)
                .spawn(tx)
                .context("starting the directory source's thread")?;
        }
        SourceSpec::Kubernetes => {
            let client = kubernetes::client(config.kubeconfig.as_deref())
                .await
                .context("configuring the Kubernetes client")?;
            // Its own runtime on a thread of lower priority: decoding a relist of a large
            // cluster must not take the CPU from the owner and the API.
            std::thread::Builder::new()
                .name("kube-source".into())
                .spawn(move || {
                    crate::priority::background_thread();
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(KubernetesSource::new(client, kinds).run(tx)),
                        Err(e) => error!("starting the Kubernetes source's runtime failed: {e}"),
                    }
                })
                .context("starting the Kubernetes source's thread")?;
        }
    }
    Ok(rx)
}

/// What the source has shown by the time the pod CIDR is known.
struct ClusterStart {
    pod_cidr: Ipv4Net,
    index: ClusterIndex,
    synced: bool,
}

/// Phase 2b: takes what the source has until the pod CIDR is known: `--pod-cidr` (directory
/// source), else the Node object's spec.podCIDR, else (Kubernetes, source unavailable) the one
/// a previous run persisted.
async fn wait_for_pod_cidr(
    config: &AgentConfig,
    node_name: &str,
    rx: &mut mpsc::Receiver<SourceEvent>,
    metrics: &Metrics,
) -> anyhow::Result<ClusterStart> {
    let mut index = ClusterIndex::default();
    let mut synced = false;
    let ipam_path = config.state_dir.join("ipam.json");
    // Kubernetes mode: the Node object is authoritative, but a restarted agent that cannot get
    // it (API server down, or hanging) keeps serving its pods with the CIDR it persisted.
    let fallback_cidr = match config.source {
        SourceSpec::Kubernetes => Ipam::persisted_cidr(&ipam_path).unwrap_or_else(|e| {
            warn!("cannot read the persisted pod CIDR: {e}");
            None
        }),
        SourceSpec::Dir(_) => None,
    };
    // The directory source is read whole first (it takes milliseconds): the Node objects
    // there say where this node and the others are.
    let wait_for_sync = matches!(config.source, SourceSpec::Dir(_));
    let pod_cidr = loop {
        if let Some(cidr) = pod_cidr(config, &index, node_name)
            && (synced || !wait_for_sync)
        {
            break cidr;
        }
        if synced && let SourceSpec::Dir(path) = &config.source {
            bail!(
                "no pod CIDR: pass --pod-cidr or give Node {node_name} a spec.podCIDR in {}",
                path.display()
            );
        }
        let unavailable = match tokio::time::timeout(CIDR_WAIT_REPORT, rx.recv()).await {
            Ok(Some(SourceEvent::Changes(changes))) => {
                for change in changes {
                    count_event(metrics, &change);
                    index.apply(change);
                }
                false
            }
            Ok(Some(SourceEvent::Synced)) => {
                synced = true;
                false
            }
            Ok(Some(SourceEvent::Unavailable)) => true,
            Ok(None) => bail!("the cluster-state source stopped before the first sync"),
            Err(_) => {
                warn!(node = node_name, "still waiting for the node's pod CIDR");
                true
            }
        };
        if unavailable && let Some(cidr) = fallback_cidr {
            warn!(
                %cidr,
                "cluster state unavailable: serving with the pod CIDR persisted in {}; Node {node_name}'s spec.podCIDR is checked against it once listed",
                ipam_path.display()
            );
            break cidr;
        }
    };
    info!(%pod_cidr, "pod CIDR");
    Ok(ClusterStart {
        pod_cidr,
        index,
        synced,
    })
}

/// The pod CIDR: `--pod-cidr` (directory source), else the Node object's spec.podCIDR.
fn pod_cidr(config: &AgentConfig, index: &ClusterIndex, node_name: &str) -> Option<Ipv4Net> {
    if let (Some(cidr), SourceSpec::Dir(_)) = (config.pod_cidr, &config.source) {
        return Some(cidr);
    }
    index.node(node_name).and_then(|n| n.pod_cidr)
}

/// Phase 3: IPAM and endpoint files. A file that cannot be decoded is moved aside with an
/// error: the kernel's state (phase 4) rebuilds what it held.
fn open_state(config: &AgentConfig, pod_cidr: Ipv4Net) -> anyhow::Result<(Ipam, EndpointStore)> {
    let ipam_path = config.state_dir.join("ipam.json");
    let ipam = match Ipam::open(ipam_path.clone(), pod_cidr) {
        Err(IpamError::Persist(e @ PersistError::Decode { .. })) => {
            set_aside(&ipam_path, &e)?;
            Ipam::open(ipam_path, pod_cidr)
        }
        other => other,
    }
    .context("opening IPAM state")?;
    let endpoints_path = config.state_dir.join("endpoints.json");
    let endpoints = match EndpointStore::open(endpoints_path.clone(), config.max_endpoints) {
        Err(EndpointStoreError::Persist(e @ PersistError::Decode { .. })) => {
            set_aside(&endpoints_path, &e)?;
            EndpointStore::open(endpoints_path, config.max_endpoints)
        }
        other => other,
    }
    .context("opening endpoint state")?;
    Ok((ipam, endpoints))
}

fn set_aside(path: &Path, e: &PersistError) -> anyhow::Result<()> {
    let aside = persist::quarantine(path)
        .with_context(|| format!("moving the unreadable {} aside", path.display()))?;
    error!(
        "{e}; moved it to {} and rebuilding it from the kernel's state",
        aside.display()
    );
    Ok(())
}

/// What phase 4 hands to phase 5.
struct Started {
    agent: Agent<Datapath>,
    events: events::EventSender,
    flow_log: Arc<events::FlowLog>,
    links: Links,
    network: Option<NodeNetwork>,
    pod_cidr: Ipv4Net,
    pin_dir: std::path::PathBuf,
}

/// Phase 4: the node's network, the datapath, and the agent's state checked against them.
async fn start_datapath(
    config: &AgentConfig,
    node_name: &str,
    ipam: Ipam,
    endpoints: EndpointStore,
    cluster: ClusterStart,
    metrics: &Metrics,
) -> anyhow::Result<Started> {
    netconf::setup_node(ipam.gateway())
        .await
        .context("setting up the node's network")?;
    bpffs::ensure_mounted(&config.bpffs)?;
    let mut datapath = Datapath::load(
        &config.bpffs,
        config.attach_mode,
        config.limits(),
        config.features(),
    )
    .context("loading the eBPF datapath")?;
    let pin_dir = datapath.pin_dir().to_path_buf();
    datapath
        .set_events_rate(config.flow_events_rate)
        .context("setting the events' rate limit")?;
    let flow_log = Arc::new(events::FlowLog::new(
        config.flow_buffer as usize,
        config.flow_events_rate,
        datapath.take_event_budget(),
    ));
    let (events, _) = tokio::sync::broadcast::channel(events::STREAM_BUFFER);
    let ring = datapath.take_events();
    let links = Links::open().context("opening route netlink")?;
    let network = setup_network(
        config,
        node_name,
        &cluster.index,
        cluster.pod_cidr,
        &links,
        &mut datapath,
    )
    .await?;
    let socket_lb = socket_lb(config, &mut datapath)?;
    datapath
        .spawn_collectors(config.conntrack_gc_interval)
        .context("starting the conntrack and NAT collectors")?;
    let listed = links
        .list()
        .await
        .context("listing the node's interfaces")?;
    let removed = datapath.remove_stale_link_pins(&|ifname| {
        listed.iter().any(|l| l.name == ifname) && endpoints.iter().any(|r| r.host_ifname == ifname)
    });
    if removed > 0 {
        info!(
            removed,
            "removed link pins of endpoints deleted while the agent was down"
        );
    }

    let mut agent = Agent::new(
        node_name.to_string(),
        ipam,
        endpoints,
        cluster.index,
        datapath,
        Box::new(SystemInterfaces),
    )
    .with_pending_deletes(myelin_api::pending::dir_for(&config.socket));
    if matches!(config.source, SourceSpec::Kubernetes) {
        agent = agent.expecting_pod_objects();
    }
    // kube-proxy serves the health check node ports when it translates the Services.
    let health_checks = config.kube_proxy_replacement.then(|| {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::default());
        tokio::spawn(crate::health::run(rx));
        tx
    });
    if config.kube_proxy_replacement {
        agent = agent
            .translating_services()
            .with_lb_algorithm(config.lb_algorithm, config.lb_maglev_table_size);
    }
    if let Some(tx) = health_checks {
        agent = agent.with_health_checks(tx);
    }
    agent = agent.with_socket_lb(socket_lb);
    agent = agent.with_non_masquerade_cidrs(config.non_masquerade_cidrs.clone());
    agent = agent.keeping_flows(flow_log.capacity() > 0);
    agent = agent.with_routing(network.as_ref().map(|n| myelin_api::RoutingInfo {
        mode: match config.routing_mode {
            RoutingMode::Tunnel => "tunnel".into(),
            RoutingMode::Native => "native".into(),
        },
        uplink: n.uplink.name.clone(),
        node_ip: n.node_ip,
        pod_mtu: n.pod_mtu(),
        tunnel_port: (n.tunnel != 0).then_some(config.tunnel_port),
        masquerade: config.masquerade,
        direct_subnet: n.routing.direct_subnet().map(|s| s.to_string()),
    }));
    agent
        .restore(&listed, Instant::now())
        .context("restoring endpoints")?;
    // Before the API opens: an ADD must not find an endpoint whose pod is already gone.
    let carried_out = agent.process_pending_deletes();
    if carried_out > 0 {
        info!(
            carried_out,
            "carried out the DELs queued while the agent was down"
        );
    }
    if cluster.synced {
        agent
            .set_synced()
            .context("writing the maps for the synced cluster state")?;
        crate::memory::release_free();
    }
    if let Some(ring) = ring {
        tokio::spawn(events::read(
            ring,
            events::Sinks {
                streams: events.clone(),
                log: Arc::clone(&flow_log),
                names: agent.flow_names(),
                metrics: metrics.flows.clone(),
            },
        ));
    }
    // With the flow log on, events flow from now on; off, only while a stream is open.
    agent
        .set_events(false)
        .context("turning the datapath's events on or off")?;
    Ok(Started {
        agent,
        events,
        flow_log,
        links,
        network,
        pod_cidr: cluster.pod_cidr,
        pin_dir,
    })
}

/// Routing to other nodes, when this node's Node object gives its InternalIP: the uplink, the
/// tunnel in tunnel mode, masquerading on the uplink, and the datapath's routing settings.
/// Without an InternalIP the node works alone (pods reach each other and the node's stack).
async fn setup_network(
    config: &AgentConfig,
    node_name: &str,
    index: &ClusterIndex,
    pod_cidr: Ipv4Net,
    links: &Links,
    datapath: &mut Datapath,
) -> anyhow::Result<Option<NodeNetwork>> {
    let Some(node_ip) = index
        .node(node_name)
        .and_then(|n| n.addresses.first().copied())
    else {
        info!(
            node = node_name,
            "the Node object gives no InternalIP: this node reaches no other node"
        );
        datapath.set_routing(Routing {
            flags: services_flag(config),
            ..Routing::default()
        })?;
        sweep_uplink_programs(datapath, None)?;
        return Ok(None);
    };
    let network = NodeNetwork::setup(
        links.handle().clone(),
        config.routing_mode,
        config.uplink.as_deref(),
        node_ip,
        config.tunnel_port,
    )
    .await
    .context("setting up routing to other nodes")?;
    if network.tunnel != 0 {
        datapath
            .attach_tunnel(routing::TUNNEL_DEVICE)
            .context("attaching the tunnel's programs")?;
    }
    let mut flags = services_flag(config)
        | match config.routing_mode {
            RoutingMode::Tunnel => CONFIG_F_TUNNEL,
            RoutingMode::Native => CONFIG_F_NATIVE,
        };
    let uplink = &network.uplink.name;
    datapath.set_pod_cidr(pod_cidr)?;
    // Node ports' clients whose backend is on another node get this node's address and a
    // port of the NAT range, from masquerading's table: Services need the range too.
    if config.masquerade || config.kube_proxy_replacement {
        let ports = nat_ports(config)?;
        datapath.set_masquerade(Masquerade { pod_cidr, ports })?;
        if config.masquerade {
            flags |= CONFIG_F_MASQUERADE;
            info!(uplink, %ports, "masquerading pod traffic that leaves the cluster");
        }
    }
    // Native routing needs `from_uplink` also without masquerading: it delivers other nodes'
    // packets for this node's pods; so do Services: node ports and external IPs are served
    // there.
    if config.masquerade
        || config.routing_mode == RoutingMode::Native
        || config.kube_proxy_replacement
    {
        datapath
            .attach_uplink(uplink, config.masquerade)
            .with_context(|| format!("attaching the uplink programs to {uplink}"))?;
    } else {
        datapath
            .detach_uplink(uplink)
            .with_context(|| format!("detaching the uplink programs from {uplink}"))?;
    }
    sweep_uplink_programs(datapath, Some(uplink))?;
    let mut network = network;
    network.routing = Routing {
        flags,
        node_ip,
        tunnel_ifindex: network.tunnel,
        uplink_ifindex: network.uplink.index,
        uplink_subnet: network.uplink.subnet_of(node_ip),
    };
    datapath.set_routing(network.routing)?;
    Ok(Some(network))
}

/// Removes the uplink programs an earlier agent left on devices other than `uplink`.
fn sweep_uplink_programs(datapath: &mut Datapath, uplink: Option<&str>) -> anyhow::Result<()> {
    let cleaned = datapath
        .detach_uplink_elsewhere(uplink)
        .context("removing the uplink programs from devices that are no longer the uplink")?;
    for ifname in cleaned {
        info!(
            ifname,
            "removed the uplink programs an earlier agent left on a device that is no longer the uplink"
        );
    }
    Ok(())
}

/// Socket-level load balancing: with `--cgroup-root` and `--kube-proxy-replacement`, the socket
/// programs attached to that cgroup (into the links an earlier agent pinned, so that sockets
/// are translated throughout a restart); otherwise whatever an earlier agent attached is
/// detached.
fn socket_lb(
    config: &AgentConfig,
    datapath: &mut Datapath,
) -> anyhow::Result<Option<myelin_api::SocketLbInfo>> {
    let root = match (&config.cgroup_root, config.kube_proxy_replacement) {
        (Some(path), true) => path,
        (root, _) => {
            if let Some(path) = root {
                warn!(
                    cgroup_root = %path.display(),
                    "--cgroup-root is ignored without --kube-proxy-replacement: no socket-level load balancing"
                );
            }
            let removed = datapath
                .detach_socket_lb()
                .context("detaching the socket programs")?;
            if removed > 0 {
                info!(
                    removed,
                    "detached the socket programs an earlier agent attached"
                );
            }
            return Ok(None);
        }
    };
    let root = sock::CgroupRoot::open(root)?;
    let attached = datapath
        .attach_socket_lb(&root)
        .with_context(|| format!("attaching the socket programs to {}", root.path().display()))?;
    Ok(Some(myelin_api::SocketLbInfo {
        cgroup_root: attached.cgroup.display().to_string(),
        cgroup_id: attached.cgroup_id,
        programs: attached
            .programs
            .into_iter()
            .map(|(name, id)| myelin_api::SocketLbProgram {
                name: name.to_string(),
                id,
            })
            .collect(),
    }))
}

/// `CONFIG_F_SERVICES` with `--kube-proxy-replacement`: the datapath translates Services.
fn services_flag(config: &AgentConfig) -> u32 {
    if config.kube_proxy_replacement {
        CONFIG_F_SERVICES
    } else {
        0
    }
}

/// `--nat-port-range`, or the ports above the node's `ip_local_port_range`.
fn nat_ports(config: &AgentConfig) -> anyhow::Result<NatPorts> {
    if let Some(ports) = config.nat_port_range {
        return Ok(ports);
    }
    let local = NatPorts::local_range(Path::new(nat::LOCAL_PORT_RANGE))
        .context("choosing the NAT port range (or pass --nat-port-range)")?;
    let (ports, warning) = NatPorts::above(local);
    if let Some(warning) = warning {
        warn!("{warning}");
    }
    Ok(ports)
}

/// Phase 5: everything that runs, until SIGTERM or SIGINT.
async fn serve(
    config: &AgentConfig,
    node_name: String,
    source: mpsc::Receiver<SourceEvent>,
    metrics: Metrics,
    started: Started,
) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let link_removals = match links::watch_removals() {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(error = %e, "cannot watch interface removals; relying on the periodic sweep");
            None
        }
    };
    let address_changes = match links::watch_address_changes() {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(
                error = %e,
                "cannot watch address changes; the uplink's subnets are those found at start"
            );
            None
        }
    };
    let (handle, owner_thread) = owner::spawn(
        started.agent,
        owner::Inputs {
            source,
            link_removals,
            address_changes,
            links: Some(started.links),
            network: started.network,
        },
        Settings {
            node_name,
            pod_cidr: started.pod_cidr,
            pending_deletes_interval: PENDING_DELETES_INTERVAL,
            endpoint_gc_interval: config.endpoint_gc_interval,
            metrics: metrics.clone(),
        },
    )
    .context("starting the agent's owner thread")?;
    let conntrack_pin = ConntrackTable::pin_path(&started.pin_dir);

    let listener = api::bind(&config.socket)?;
    let api_task = tokio::spawn(api::serve(
        listener,
        api::router(
            api::ApiState::new(handle.clone(), started.events, conntrack_pin)
                .with_flow_log(Arc::clone(&started.flow_log)),
        ),
        ServerLimits::within_fd_limit(),
    ));
    info!(socket = %config.socket.display(), "API listening");

    let metrics_task = config.metrics_addr.0.map(|addr| {
        let for_snapshot = handle.clone();
        let for_ready = handle.clone();
        let source = SnapshotSource {
            snapshot: Box::new(move || {
                let h = for_snapshot.clone();
                Box::pin(async move { h.snapshot().await })
            }),
            ready: Box::new(move || for_ready.ready()),
            events_lost: {
                let log = Arc::clone(&started.flow_log);
                Box::new(move || log.lost())
            },
        };
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics, source).await {
                error!(%addr, "metrics endpoint failed: {e}");
            }
        })
    });

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    info!("shutting down; pods keep their datapath (programs and maps stay pinned)");
    api_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    // The owner finishes the job at hand and stops once the last handle is gone; connections
    // still open hold handles too, so it is given a moment, not waited for.
    drop(handle);
    let joined = tokio::task::spawn_blocking(move || owner_thread.join());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), joined).await;
    Ok(())
}
