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
    /// Node name, pod CIDR, readiness, free addresses.
    Status,
    /// Local endpoints with their identity and packet counters.
    Endpoints,
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
                println!("version:        {}", s.version);
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
    }
    Ok(())
}
