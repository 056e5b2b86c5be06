//! `myelinctl`: inspect a running agent through its API socket.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use myelin_api::Client;

#[derive(Parser)]
#[command(
    name = "myelinctl",
    version,
    about = "Inspect the Myelin agent of this node"
)]
struct Cli {
    /// The agent's API socket.
    #[arg(long, env = "MYELIN_SOCKET", default_value = myelin_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Node name, pod CIDR, readiness, free addresses, how other nodes are reached.
    Status,
    /// The other nodes of the cluster: pod CIDR, InternalIP, routed or why not.
    Nodes,
    /// Local endpoints with their identity and packet counters.
    Endpoints,
    /// NetworkPolicies in force, the local pods each selects, and rejected versions.
    Policies,
    /// Ask about NetworkPolicy without sending a packet.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Services this node translates (--kube-proxy-replacement): frontends, the backends each
    /// sends to, every endpoint's state and node.
    Services,
    /// Packets dropped by the datapath, by reason.
    Drops,
    /// Connections conntrack is tracking.
    Conntrack,
    /// Stream drops and new allowed connections as they happen (Ctrl-C to stop), with the
    /// pods at both ends and the policy rule that allowed each flow, or the policies whose
    /// default deny dropped it. With --json, one event per line.
    Monitor {
        /// Show only drops (the same as --verdict drop).
        #[arg(long)]
        drops: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// The latest events the agent kept (--flow-buffer), oldest first, with what the datapath
    /// could not report; no monitor needs to have been running.
    Flows {
        /// How many of the latest (matching) events.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=myelin_api::MAX_FLOWS_LAST as u64))]
        last: u64,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// Which events to show; the agent applies the filter. All given must match.
#[derive(clap::Args)]
struct FilterArgs {
    /// The source: a pod (`namespace/name`), an address, or `host`, `remote-node`, `world`.
    #[arg(long)]
    from: Option<String>,
    /// The destination, likewise.
    #[arg(long)]
    to: Option<String>,
    /// Either end is a pod of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Either end is this pod, `namespace/name`.
    #[arg(long)]
    pod: Option<String>,
    /// `allowed` or `drop`.
    #[arg(long, value_parser = ["allowed", "drop"])]
    verdict: Option<String>,
    /// The destination port.
    #[arg(long)]
    port: Option<u16>,
}

impl FilterArgs {
    fn filter(self) -> anyhow::Result<myelin_api::FlowFilter> {
        let filter = myelin_api::FlowFilter {
            from: self.from,
            to: self.to,
            namespace: self.namespace,
            pod: self.pod,
            verdict: self.verdict,
            port: self.port,
        };
        filter.validate().map_err(anyhow::Error::msg)?;
        Ok(filter)
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Whether NetworkPolicy allows a flow, and which rules allow it or which policies isolate
    /// an end none of whose rules admits it. Answered from the agent's own view of the
    /// cluster; each end is a pod (`namespace/name`), a pod that need not exist (labels and a
    /// namespace), or an address.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["from", "from_labels", "from_ip"])))]
    #[command(group(clap::ArgGroup::new("destination").required(true).args(["to", "to_labels", "to_ip"])))]
    Explain {
        /// The source pod, `namespace/name`.
        #[arg(long)]
        from: Option<String>,
        /// A hypothetical source pod's labels, `k=v,k2=v2` (with --from-namespace).
        #[arg(long, requires = "from_namespace")]
        from_labels: Option<String>,
        #[arg(long)]
        from_namespace: Option<String>,
        /// A source address: a pod's, a node's, or outside the cluster.
        #[arg(long)]
        from_ip: Option<std::net::Ipv4Addr>,
        /// The destination pod, `namespace/name`.
        #[arg(long)]
        to: Option<String>,
        /// A hypothetical destination pod's labels (with --to-namespace).
        #[arg(long, requires = "to_namespace")]
        to_labels: Option<String>,
        #[arg(long)]
        to_namespace: Option<String>,
        /// A destination address.
        #[arg(long)]
        to_ip: Option<std::net::Ipv4Addr>,
        /// The destination port, `5432/TCP` (TCP when no protocol is given; UDP, SCTP).
        #[arg(long)]
        port: String,
    },
}

/// `namespace/name`.
fn pod_ref(s: &str) -> anyhow::Result<myelin_api::PodRef> {
    match s.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok(myelin_api::PodRef {
                namespace: namespace.into(),
                name: name.into(),
            })
        }
        _ => anyhow::bail!("{s:?} is not namespace/name"),
    }
}

/// `k=v,k2=v2` (empty: no labels).
fn label_map(s: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("{kv:?} is not key=value"),
        })
        .collect()
}

/// `5432/TCP`, `53/udp`, `80`.
fn port_spec(s: &str) -> anyhow::Result<(u16, String)> {
    let (port, protocol) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| anyhow::anyhow!("{s:?}: the port must be 1 to 65535"))?;
    Ok((port, protocol.to_ascii_uppercase()))
}

fn explain_end(
    pod: Option<String>,
    labels: Option<String>,
    namespace: Option<String>,
    ip: Option<std::net::Ipv4Addr>,
) -> anyhow::Result<myelin_api::ExplainEnd> {
    Ok(myelin_api::ExplainEnd {
        pod: pod.as_deref().map(pod_ref).transpose()?,
        labels: labels.as_deref().map(label_map).transpose()?,
        namespace: if labels.is_some() { namespace } else { None },
        ip,
    })
}

/// `myelinctl policy explain`'s answer, as printed.
fn explanation_text(e: &myelin_api::PolicyExplanation) -> String {
    format!(
        "from:    {}\nto:      {} port {}/{}\negress:  {}\ningress: {}\nverdict: {}\n",
        e.from,
        e.to,
        e.port,
        e.protocol,
        e.egress,
        e.ingress,
        if e.allowed { "ALLOWED" } else { "DENIED" }
    )
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Status => {
            let s = client.status().context("asking the agent for its status")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("node:           {}", s.node_name);
                println!("ready:          {}", s.ready);
                println!("pod CIDR:       {} (gateway {})", s.pod_cidr, s.gateway);
                println!("endpoints:      {}", s.endpoints);
                println!("free addresses: {}", s.free_addresses);
                println!("attach mode:    {}", s.attach_mode);
                match &s.routing {
                    Some(r) => {
                        let tunnel = r
                            .tunnel_port
                            .map(|p| format!(", VXLAN port {p}"))
                            .unwrap_or_default();
                        println!("routing:        {}{tunnel}", r.mode);
                        println!("uplink:         {} ({})", r.uplink, r.node_ip);
                        if let Some(subnet) = &r.direct_subnet {
                            println!("direct to:      nodes in {subnet} (others through the FIB)");
                        }
                        println!("pod MTU:        {}", r.pod_mtu);
                        println!("masquerade:     {}", r.masquerade);
                    }
                    None => println!("routing:        none (the Node object gives no InternalIP)"),
                }
                let services = if s.kube_proxy_replacement {
                    "translated in eBPF (kube-proxy replacement)"
                } else {
                    "left to kube-proxy"
                };
                println!("services:       {services}");
                match (&s.lb_algorithm, s.maglev_table_size) {
                    (Some(a), Some(m)) => println!(
                        "lb algorithm:   {a} (table size {m}) for node ports, external IPs and \
                         load balancers; random for ClusterIPs"
                    ),
                    (Some(a), None) => println!("lb algorithm:   {a}"),
                    (None, _) => {}
                }
                match &s.socket_lb {
                    Some(lb) => {
                        let programs: Vec<String> = lb
                            .programs
                            .iter()
                            .map(|p| format!("{} ({})", p.name, p.id))
                            .collect();
                        println!(
                            "socket LB:      attached to {} (cgroup id {}): {}",
                            lb.cgroup_root,
                            lb.cgroup_id,
                            programs.join(", ")
                        );
                    }
                    None => println!("socket LB:      off"),
                }
                if let Some(flows) = &s.flows {
                    println!("flow log:       {}", flow_log_summary(flows));
                }
                println!("version:        {}", s.version);
            }
        }
        Command::Nodes => {
            let nodes = client.nodes().context("listing the other nodes")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!(
                    "{:<24} {:<18} {:<16} STATUS",
                    "NODE", "POD CIDR", "INTERNAL IP"
                );
                for n in nodes {
                    let status = match (n.routed, n.reason) {
                        (true, _) => "routed".to_string(),
                        (false, Some(why)) => format!("not routed: {why}"),
                        (false, None) => "not routed".to_string(),
                    };
                    println!(
                        "{:<24} {:<18} {:<16} {status}",
                        n.name,
                        n.pod_cidr.as_deref().unwrap_or("-"),
                        n.internal_ip.map_or("-".to_string(), |ip| ip.to_string()),
                    );
                }
            }
        }
        Command::Endpoints => {
            let eps = client
                .endpoints()
                .context("listing the agent's endpoints")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&eps)?);
            } else {
                println!(
                    "{:>4}  {:<24} {:<15} {:<16} {:>9} {:>10} {:>10} {:>10} {:>10}",
                    "ID",
                    "POD",
                    "IP",
                    "INTERFACE",
                    "IDENTITY",
                    "TX PKTS",
                    "TX BYTES",
                    "RX PKTS",
                    "RX BYTES"
                );
                for e in eps {
                    let pod = e
                        .pod
                        .map(|p| format!("{}/{}", p.namespace, p.name))
                        .unwrap_or_else(|| e.attachment.container_id.chars().take(24).collect());
                    println!(
                        "{:>4}  {:<24} {:<15} {:<16} {:>9} {:>10} {:>10} {:>10} {:>10}",
                        e.id,
                        pod,
                        e.ip,
                        e.host_ifname,
                        e.identity,
                        e.counters.tx_packets,
                        e.counters.tx_bytes,
                        e.counters.rx_packets,
                        e.counters.rx_bytes
                    );
                }
            }
        }
        Command::Policies => {
            let p = client
                .policies()
                .context("asking the agent for its policies")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
                return Ok(());
            }
            println!("{:<40} {:<8} {:<8} SELECTS", "POLICY", "INGRESS", "EGRESS");
            for policy in &p.policies {
                let selects: Vec<String> = policy.selects.iter().map(|s| s.name.clone()).collect();
                println!(
                    "{:<40} {:<8} {:<8} {}",
                    format!("{}/{}", policy.namespace, policy.name),
                    policy.ingress,
                    policy.egress,
                    selects.join(",")
                );
                if let Some(r) = &policy.rejected {
                    println!("  rejected: {}; {}", r.reason, r.in_force);
                }
            }
            println!("policy map: {} of {} entries", p.entries, p.capacity);
            for pod in &p.incomplete {
                println!(
                    "INCOMPLETE: {}/{} (its entries did not fit; new connections are dropped)",
                    pod.namespace, pod.name
                );
            }
        }
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    from,
                    from_labels,
                    from_namespace,
                    from_ip,
                    to,
                    to_labels,
                    to_namespace,
                    to_ip,
                    port,
                },
        } => {
            let (port, protocol) = port_spec(&port)?;
            let req = myelin_api::ExplainRequest {
                from: explain_end(from, from_labels, from_namespace, from_ip)?,
                to: explain_end(to, to_labels, to_namespace, to_ip)?,
                protocol,
                port,
            };
            let e = client
                .explain(&req)
                .context("asking the agent to explain the flow")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{}", explanation_text(&e));
            }
        }
        Command::Services => {
            let status = client
                .services()
                .context("asking the agent for its Services")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", services_table(&status));
            }
        }
        Command::Drops => {
            let drops = client
                .drops()
                .context("asking the agent for drop counters")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&drops)?);
                return Ok(());
            }
            println!("{:<24} {:>12} {:>14}", "REASON", "PACKETS", "BYTES");
            for d in drops {
                println!("{:<24} {:>12} {:>14}", d.reason, d.packets, d.bytes);
            }
        }
        Command::Conntrack => {
            let flows = client
                .conntrack()
                .context("asking the agent for conntrack")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
                return Ok(());
            }
            println!(
                "{:<6} {:<22} {:<22} {:>8} {:<8} DENIED",
                "PROTO", "SOURCE", "DESTINATION", "EXPIRES", "REPLIED"
            );
            for f in flows {
                println!(
                    "{:<6} {:<22} {:<22} {:>7}s {:<8} {}",
                    f.protocol, f.src, f.dst, f.expires_in, f.seen_reply, f.denied
                );
            }
        }
        Command::Monitor { drops, filter } => {
            let mut filter = filter.filter()?;
            if drops {
                filter.verdict = Some("drop".into());
            }
            client
                .events(&filter, |e| {
                    if cli.json {
                        println!("{}", serde_json::to_string(&e).unwrap_or_default());
                    } else {
                        println!("{e}");
                    }
                    true
                })
                .context("streaming events from the agent")?;
        }
        Command::Flows { last, filter } => {
            let flows = client
                .flows(&filter.filter()?, last as usize)
                .context("asking the agent for its latest flows")?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
                return Ok(());
            }
            println!("# {}", flow_log_summary(&flows.log));
            for e in &flows.flows {
                println!("{e}");
            }
        }
    }
    Ok(())
}

/// `kept 97 of 4096; at most 1000 events/s per CPU; lost 0 (rate-limited 0, ring full 0)`
fn flow_log_summary(log: &myelin_api::FlowLogInfo) -> String {
    let rate = match log.rate_per_cpu {
        0 => "no rate limit".to_string(),
        n => format!("at most {n} events/s per CPU"),
    };
    format!(
        "kept {} of {}; {rate}; lost {} (rate-limited {}, ring full {})",
        log.buffered,
        log.capacity,
        log.lost.rate_limited + log.lost.ring_full,
        log.lost.rate_limited,
        log.lost.ring_full
    )
}

/// `myelinctl services`: per Service, a line for it, one per frontend with the backends it
/// sends to (or that it refuses connections), and one per port with every endpoint's state.
fn services_table(status: &myelin_api::ServiceStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if !status.kube_proxy_replacement {
        out.push_str(
            "kube-proxy replacement is off (--kube-proxy-replacement): Services go through the \
             node's stack and kube-proxy\n",
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<40} {:<13} {:<16} FRONTEND -> BACKENDS",
        "SERVICE", "TYPE", "KIND"
    );
    for s in &status.services {
        let id = format!("{}/{}", s.namespace, s.name);
        if let Some(why) = &s.not_translated {
            let _ = writeln!(out, "{id:<40} {:<13} not translated: {why}", s.type_);
            continue;
        }
        let mut first = true;
        for port in &s.ports {
            for f in &port.frontends {
                let backends = if let Some(holder) = &f.taken_by {
                    format!("NOT TRANSLATED: Service {holder} holds it")
                } else if f.backends.is_empty() {
                    "NO BACKEND (connections refused)".to_string()
                } else {
                    f.backends
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let kind = format!("{}{}", f.kind, if f.local { ",local" } else { "" });
                let (name, type_) = if first {
                    (id.as_str(), s.type_.as_str())
                } else {
                    ("", "")
                };
                first = false;
                let _ = writeln!(
                    out,
                    "{name:<40} {type_:<13} {kind:<16} {}:{}/{} -> {backends}",
                    f.address, f.port, port.protocol
                );
            }
        }
        if first {
            let _ = writeln!(out, "{id:<40} {:<13} no ports", s.type_);
        }
        let affinity = s
            .affinity_timeout_seconds
            .map_or("None".to_string(), |t| format!("ClientIP {t}s"));
        let _ = writeln!(
            out,
            "  sessionAffinity {affinity}, internalTrafficPolicy {}, externalTrafficPolicy {}",
            s.internal_traffic_policy, s.external_traffic_policy
        );
        for port in &s.ports {
            let endpoints: Vec<String> = port
                .endpoints
                .iter()
                .map(|e| {
                    format!(
                        "{}:{} {} {}",
                        e.address,
                        e.port,
                        e.state,
                        e.node.as_deref().unwrap_or("-")
                    )
                })
                .collect();
            let name = if port.name.is_empty() {
                "-"
            } else {
                &port.name
            };
            let listed = if endpoints.is_empty() {
                "none".to_string()
            } else {
                endpoints.join(", ")
            };
            let _ = writeln!(
                out,
                "  port {name} {}/{} endpoints: {listed}",
                port.port, port.protocol
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use myelin_api::{
        BackendState, BackendSummary, FrontendKind, FrontendSummary, ServicePortSummary,
        ServiceStatus, ServiceSummary,
    };

    use super::{label_map, pod_ref, port_spec, services_table};

    #[test]
    fn explain_arguments_are_parsed_or_refused() {
        assert_eq!(port_spec("5432/TCP").unwrap(), (5432, "TCP".to_string()));
        assert_eq!(port_spec("53/udp").unwrap(), (53, "UDP".to_string()));
        assert_eq!(port_spec("80").unwrap(), (80, "TCP".to_string()));
        for bad in ["0", "65536", "x/TCP", "", "/UDP"] {
            assert!(port_spec(bad).is_err(), "{bad:?}");
        }
        let labels = label_map("app=web,tier=").unwrap();
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get("tier").map(String::as_str), Some(""));
        assert!(label_map("").unwrap().is_empty());
        assert!(label_map("app").is_err());
        assert!(label_map("=web").is_err());
        assert_eq!(pod_ref("demo/db").unwrap().name, "db");
        for bad in ["db", "/db", "demo/"] {
            assert!(pod_ref(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_services_table_shows_frontends_backends_and_endpoint_states() {
        let web = ServiceSummary {
            namespace: "default".into(),
            name: "web".into(),
            type_: "NodePort".into(),
            not_translated: None,
            affinity_timeout_seconds: Some(600),
            internal_traffic_policy: "Cluster".into(),
            external_traffic_policy: "Local".into(),
            ports: vec![ServicePortSummary {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
                frontends: vec![
                    FrontendSummary {
                        kind: FrontendKind::ClusterIp,
                        address: Ipv4Addr::new(10, 96, 0, 10),
                        port: 80,
                        local: false,
                        backends: vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 8080)],
                        taken_by: None,
                    },
                    FrontendSummary {
                        kind: FrontendKind::NodePort,
                        address: Ipv4Addr::new(192, 168, 1, 10),
                        port: 30080,
                        local: true,
                        backends: vec![],
                        taken_by: None,
                    },
                ],
                endpoints: vec![BackendSummary {
                    address: Ipv4Addr::new(10, 244, 2, 7),
                    port: 8080,
                    state: BackendState::Ready,
                    node: Some("node-2".into()),
                }],
            }],
        };
        let headless = ServiceSummary {
            name: "db".into(),
            type_: "ClusterIP".into(),
            not_translated: Some("headless (clusterIP: None)".into()),
            ports: vec![],
            ..web.clone()
        };
        let table = services_table(&ServiceStatus {
            kube_proxy_replacement: true,
            services: vec![headless, web],
        });
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("default/db")
                && lines[1].ends_with("not translated: headless (clusterIP: None)"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("default/web")
                && lines[2].ends_with("cluster-ip       10.96.0.10:80/TCP -> 10.244.2.7:8080"),
            "{table}"
        );
        assert!(
            lines[3].ends_with(
                "node-port,local  192.168.1.10:30080/TCP -> NO BACKEND (connections refused)"
            ),
            "{table}"
        );
        assert_eq!(
            lines[4],
            "  sessionAffinity ClientIP 600s, internalTrafficPolicy Cluster, externalTrafficPolicy Local"
        );
        assert_eq!(
            lines[5],
            "  port http 80/TCP endpoints: 10.244.2.7:8080 ready node-2"
        );
        let off = services_table(&ServiceStatus::default());
        assert!(off.starts_with("kube-proxy replacement is off"), "{off}");
    }
}
