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
    /// Packets dropped by the datapath, by reason.
    Drops,
    /// Connections conntrack is tracking.
    Conntrack,
    /// Stream drops and new allowed connections as they happen (Ctrl-C to stop).
    Monitor {
        /// Show only drops.
        #[arg(long)]
        drops: bool,
    },
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
                        println!("pod MTU:        {}", r.pod_mtu);
                        println!("masquerade:     {}", r.masquerade);
                    }
                    None => println!("routing:        none (the Node object gives no InternalIP)"),
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
        Command::Monitor { drops } => {
            client
                .events(|e| {
                    if drops && e.kind != "drop" {
                        return true;
                    }
                    if cli.json {
                        println!("{}", serde_json::to_string(&e).unwrap_or_default());
                    } else {
                        println!("{e}");
                    }
                    true
                })
                .context("streaming events from the agent")?;
        }
    }
    Ok(())
}
