//! Pieces of `cargo xtask bench`: the datapaths Myelin is compared with (on one node, across
//! nodes in [`cross_node`], masquerading to the world in [`masquerade`]), one CNI driver for
//! every plugin, traffic from iperf3 and from one-byte TCP loops of our own, the iptables
//! baselines for policy and masquerading, and what the agent costs. The scenarios themselves
//! are composed in xtask; everything here follows the harness's rules (namespaces only,
//! per-run names, guards).

pub mod add_under_load;
pub mod cni;
pub mod cpus;
pub mod cross_node;
pub mod footprint;
pub mod iperf3;
pub mod iptables;
pub mod masquerade;
pub mod ping;
pub mod policy;
pub mod program_cost;
pub mod services;
pub mod stats;
pub mod tcp;
pub mod usage;

/// Root checks of the pieces themselves, over a bare veth pair and the reference plugins: when
/// these fail, a benchmark's figures would mean nothing.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{
        cni::{PodPair, ReferencePlugin},
        cpus::flow_cpu,
        iperf3, iptables, tcp,
    };
    use crate::{Result, root_test, traffic::Host};

    #[test]
    fn traffic_is_measured_over_a_bare_veth_pair() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let pair = PodPair::bare_veth(&run)?;
        let second = Duration::from_secs(1);
        let one = tcp::tcp_rr(&pair.client, &pair.server, 11111, 1, second)?;
        assert!(one > 100.0, "{one} round trips/s");
        let two = tcp::tcp_rr(&pair.client, &pair.server, 11111, 2, second)?;
        assert!(two > 100.0, "{two} round trips/s");
        let bits = iperf3::tcp_stream(&pair.client, &pair.server, 5201, 1)?;
        assert!(bits > 1e6, "{bits} bit/s");
        let server = tcp::EchoServer::start(&pair.server, 7000, flow_cpu(0))?;
        let crr = tcp::tcp_crr(&pair.client, &server, Duration::from_millis(300))?;
        assert!(crr > 10.0, "{crr} connections/s");
        // Spread over servers, a run ends once each had its share, however long it may run.
        let other = tcp::EchoServer::start(&pair.server, 7001, flow_cpu(0))?;
        let spread =
            tcp::tcp_crr_spread(&pair.client, &[server, other], Duration::from_secs(60), 5)?;
        assert_eq!(spread.connections, 10, "{spread:?}");
        assert!(spread.elapsed < Duration::from_secs(10), "{spread:?}");
        Ok(())
    }

    /// The server answers connections in place, yet one left open (busy or idle) never keeps
    /// a second client waiting.
    #[test]
    fn the_echo_server_serves_concurrent_connections() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let pair = PodPair::bare_veth(&run)?;
        let _server = tcp::EchoServer::start(&pair.server, 7000, flow_cpu(0))?;
        let addr = std::net::SocketAddr::from((pair.server.ip(), 7000));
        let served = pair.client.netns().run(|| -> std::io::Result<()> {
            use std::io::{Read as _, Write as _};
            let round_trip = |stream: &mut std::net::TcpStream| -> std::io::Result<()> {
                stream.write_all(&[7])?;
                let mut byte = [0u8];
                stream.read_exact(&mut byte)?;
                assert_eq!(byte, [7]);
                Ok(())
            };
            let timeout = Some(Duration::from_secs(2));
            let mut idle = std::net::TcpStream::connect(addr)?;
            idle.set_read_timeout(timeout)?;
            round_trip(&mut idle)?;
            let mut busy = std::net::TcpStream::connect(addr)?;
            busy.set_read_timeout(timeout)?;
            // Answered although the first connection is still open ...
            for _ in 0..200 {
                round_trip(&mut busy)?;
            }
            // ... and a third is answered while the second keeps going.
            let mut third = std::net::TcpStream::connect(addr)?;
            third.set_read_timeout(timeout)?;
            round_trip(&mut third)?;
            round_trip(&mut busy)?;
            round_trip(&mut idle)
        })?;
        served.map_err(|e| crate::Error::Traffic {
            what: format!("concurrent connections to one echo server: {e}"),
        })
    }

    #[test]
    fn blocked_traffic_is_noticed_within_moments_of_the_change() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let pair = PodPair::bare_veth(&run)?;
        let server = tcp::EchoServer::start(&pair.server, 7000, flow_cpu(0))?;
        let wait = Duration::from_secs(2);
        let nothing = tcp::time_until_flow_stops(&pair.client, &server, wait, || Ok(()))?;
        assert_eq!(nothing, None, "an unchanged flow keeps running");

        // A drop of new connections leaves the running flow alone (it is tracked) ...
        let new_only =
            "*filter\n-A INPUT -p tcp --dport 7000 -m conntrack --ctstate NEW -j DROP\nCOMMIT\n";
        let flow = tcp::time_until_flow_stops(&pair.client, &server, wait, || {
            iptables::restore(pair.server.netns(), new_only)
        })?;
        assert_eq!(flow, None);
        iptables::restore(pair.server.netns(), "*filter\n-F INPUT\nCOMMIT\n")?;
        // ... and stops new connections at once.
        let refused = tcp::time_until_connections_fail(&pair.client, &server, wait, || {
            iptables::restore(pair.server.netns(), new_only)
        })?;
        assert!(
            refused.is_some_and(|t| t < Duration::from_millis(100)),
            "{refused:?}"
        );
        iptables::restore(pair.server.netns(), "*filter\n-F INPUT\nCOMMIT\n")?;

        let all = "*filter\n-A INPUT -p tcp --dport 7000 -j DROP\nCOMMIT\n";
        let stopped = tcp::time_until_flow_stops(&pair.client, &server, wait, || {
            iptables::restore(pair.server.netns(), all)
        })?;
        assert!(
            stopped.is_some_and(|t| t < Duration::from_millis(100)),
            "{stopped:?}"
        );
        // Nothing answers any more: the measurement now fails before any change.
        let err = tcp::time_until_flow_stops(&pair.client, &server, wait, || Ok(()))
            .expect_err("a dropped port cannot carry a flow");
        assert!(err.to_string().contains("traffic from"), "{err}");
        Ok(())
    }

    #[test]
    fn reference_plugins_connect_two_pods_and_ptp_routes_through_forward() -> Result<()> {
        let Some(run) = root_test()? else {
            return Ok(());
        };
        let bridge = PodPair::reference(&run, ReferencePlugin::Bridge, "10.245.1.0/24")?;
        crate::traffic::ping(&bridge.client, &bridge.server)?;
        assert_eq!(bridge.mtus()?, (1500, 1500));

        let ptp = PodPair::reference(&run, ReferencePlugin::Ptp, "10.245.2.0/24")?;
        let node = ptp.node_netns().expect("a ptp pair has a node");
        iptables::hook_forward(node, ptp.server.ip())?;
        iptables::restore(
            node,
            &iptables::chain_rules(ptp.client.ip(), 3, 20_000, &[11111]),
        )?;
        let rate = tcp::tcp_rr(&ptp.client, &ptp.server, 11111, 1, Duration::from_secs(1))?;
        assert!(rate > 100.0, "{rate}");
        assert!(iptables::packets_through_chain(node)? > 0);
        // The chain's drop is real: a port no rule allows is closed to the client.
        let closed = tcp::EchoServer::start(&ptp.server, 12000, flow_cpu(0))?;
        let blocked = tcp::tcp_crr(&ptp.client, &closed, Duration::from_millis(100));
        assert!(blocked.is_err(), "{blocked:?}");
        Ok(())
    }
}
