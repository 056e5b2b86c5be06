//! The iptables baselines: for policy scale, the same rules as the benchmark's NetworkPolicy,
//! as a chain in the FORWARD path of a node whose pods talk through the node's routing (the
//! `ptp` plugin; a bridge would bypass iptables without br_netfilter, which this kernel cannot
//! load); for masquerading, one MASQUERADE rule in the node's POSTROUTING chain.
//!
//! The policy chain is built the way iptables-based policy engines build theirs: packets of
//! tracked connections are accepted first, so only a connection's first packet walks the rules.
//! That makes it stateful like Myelin's datapath (conntrack, then policy for new flows), so the
//! two are compared on equal terms.

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use crate::{Error, Result, netns::Netns, process};

/// The chain holding the policy; the node's FORWARD chain jumps to it for the server's traffic.
pub const CHAIN: &str = "MYELIN-BENCH";
const TIMEOUT: Duration = Duration::from_secs(60);

/// `iptables-restore --noflush` input that replaces [`CHAIN`]'s rules: established traffic,
/// then `rules` rules each accepting `client` on one TCP port from `first_port` up, then one
/// accepting it on each of `allowed_ports`, then a drop. With `rules == 0` the chain is left
/// empty: no policy, everything passes (as with no NetworkPolicy).
pub fn chain_rules(
    client: Ipv4Addr,
    rules: usize,
    first_port: u16,
    allowed_ports: &[u16],
) -> String {
    let mut text = format!("*filter\n:{CHAIN} - [0:0]\n");
    if rules > 0 {
        let _ = writeln!(
            text,
            "-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        );
        let ports = (0..rules)
            .filter_map(|i| u16::try_from(i).ok())
            .filter_map(|i| first_port.checked_add(i))
            .chain(allowed_ports.iter().copied());
        for port in ports {
            let _ = writeln!(
                text,
                "-A {CHAIN} -s {client}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
            );
        }
        let _ = writeln!(text, "-A {CHAIN} -j DROP");
    }
    text.push_str("COMMIT\n");
    text
}

/// Hooks [`CHAIN`] into `node`'s FORWARD chain for traffic to `server` (once).
pub fn hook_forward(node: &Netns, server: Ipv4Addr) -> Result<()> {
    let rules =
        format!("*filter\n:{CHAIN} - [0:0]\n-A FORWARD -d {server}/32 -j {CHAIN}\nCOMMIT\n");
    restore(node, &rules)
}

/// Replaces [`CHAIN`]'s rules in `node` with `rules` (from [`chain_rules`]).
pub fn restore(node: &Netns, rules: &str) -> Result<()> {
    restore_with("iptables-restore", node, rules)
}

/// `program` (`iptables-restore`, `iptables-legacy-restore`) `--noflush` of `rules` in `node`.
pub fn restore_with(program: &str, node: &Netns, rules: &str) -> Result<()> {
    let mut cmd = node.command(program)?;
    cmd.args(["--noflush", "-w"]);
    process::run_ok_with_input(cmd, rules.as_bytes(), TIMEOUT).map(drop)
}

/// Packets the node's FORWARD chain sent to [`CHAIN`]: proof that the measured traffic really
/// passes iptables (it would not on a bridge without br_netfilter).
pub fn packets_through_chain(node: &Netns) -> Result<u64> {
    packets_to(node, "filter", "FORWARD", CHAIN)
}

/// `iptables-restore --noflush` input for masquerading as a node does it with iptables: what
/// `pod_cidr` sends anywhere outside `cluster_cidr` leaves with the node's address. Plain
/// MASQUERADE keeps the pod's source port whenever that leaves the connection unique.
pub fn masquerade_rules(pod_cidr: &str, cluster_cidr: &str) -> String {
    format!("*nat\n-A POSTROUTING -s {pod_cidr} ! -d {cluster_cidr} -j MASQUERADE\nCOMMIT\n")
}

/// Packets the rules of [`masquerade_rules`] translated in `node`: the first packet of each
/// masqueraded connection (the nat table sees no other).
pub fn masqueraded_packets(node: &Netns) -> Result<u64> {
    packets_to(node, "nat", "POSTROUTING", "MASQUERADE")
}

/// Packets that `table`'s `chain` in `node` sent to `target`.
fn packets_to(node: &Netns, table: &str, chain: &str, target: &str) -> Result<u64> {
    let mut cmd = node.command("iptables")?;
    cmd.args(["-w", "-t", table, "-n", "-v", "-x", "-L", chain]);
    let out = process::run_ok(cmd, TIMEOUT)?;
    parse_jump_packets(&out.stdout_text(), target).ok_or_else(|| Error::Traffic {
        what: format!(
            "unexpected `iptables -t {table} -L {chain}` output in {}:\n{}",
            node.name(),
            out.stdout_text()
        ),
    })
}

/// Sums the `pkts` column of the rules jumping to `target` in `iptables -n -v -x -L` output.
fn parse_jump_packets(listing: &str, target: &str) -> Option<u64> {
    let mut lines = listing.lines();
    lines.next()?.starts_with("Chain ").then_some(())?;
    lines
        .next()?
        .trim_start()
        .starts_with("pkts")
        .then_some(())?;
    lines
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let packets = fields.next()?;
            let _bytes = fields.next()?;
            (fields.next()? == target).then(|| packets.parse::<u64>().ok())
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_accepts_established_then_walks_the_rules() {
        let text = chain_rules(Ipv4Addr::new(10, 0, 0, 2), 2, 20_000, &[11111]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                "*filter",
                ":MYELIN-BENCH - [0:0]",
                "-A MYELIN-BENCH -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "-A MYELIN-BENCH -s 10.0.0.2/32 -p tcp -m tcp --dport 20000 -j ACCEPT",
                "-A MYELIN-BENCH -s 10.0.0.2/32 -p tcp -m tcp --dport 20001 -j ACCEPT",
                "-A MYELIN-BENCH -s 10.0.0.2/32 -p tcp -m tcp --dport 11111 -j ACCEPT",
                "-A MYELIN-BENCH -j DROP",
                "COMMIT",
            ]
        );
        assert_eq!(
            chain_rules(Ipv4Addr::new(10, 0, 0, 2), 0, 20_000, &[11111]),
            "*filter\n:MYELIN-BENCH - [0:0]\nCOMMIT\n"
        );
    }

    #[test]
    fn pods_are_masqueraded_outside_the_cluster_only() {
        assert_eq!(
            masquerade_rules("10.244.0.0/24", "10.244.0.0/16"),
            "*nat\n-A POSTROUTING -s 10.244.0.0/24 ! -d 10.244.0.0/16 -j MASQUERADE\nCOMMIT\n"
        );
    }

    #[test]
    fn packets_are_counted_on_the_jumps_to_the_chain() {
        let listing = "Chain FORWARD (policy ACCEPT 0 packets, 0 bytes)\n\
            \x20   pkts      bytes target     prot opt in     out     source               destination\n\
            \x20  98304  5242880 MYELIN-BENCH  0    --  *      *       0.0.0.0/0            10.0.0.3\n\
            \x20      7      420 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0\n";
        assert_eq!(parse_jump_packets(listing, CHAIN), Some(98304));
        let unhooked = "Chain FORWARD (policy ACCEPT 0 packets, 0 bytes)\n\
            \x20   pkts      bytes target     prot opt in     out     source               destination\n";
        assert_eq!(parse_jump_packets(unhooked, CHAIN), Some(0));
        assert_eq!(
            parse_jump_packets("iptables: No chain/target/match by that name.", CHAIN),
            None
        );
    }
}
