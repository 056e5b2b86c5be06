//! ICMP echo round-trip time between two hosts with `ping -f` (iputils), pinned to one CPU (see
//! [`super::cpus`]).
//!
//! A flood ping sends the next request as soon as the reply to the last one is in, so the run's
//! length divided by the number of requests is the mean round trip, with a resolution far finer
//! than the per-packet times ping prints (whole microseconds).

use std::time::Duration;

use super::cpus::flow_cpu;
use crate::{Error, Result, process, traffic::Host};

/// Mean round-trip time, in microseconds, of `count` echo requests from `client` to `server`
/// (flood mode: needs root, which benchmarks have).
pub fn icmp_rtt_us(client: &dyn Host, server: &dyn Host, count: u32) -> Result<f64> {
    let mut cmd = client.netns().command("taskset")?;
    cmd.args(["-c", &flow_cpu(0).to_string(), "ping", "-n", "-q", "-f"])
        .args(["-c", &count.to_string()])
        .args(["-W", "1"])
        .arg(server.ip().to_string());
    // A lost reply costs ping up to 10 ms before it sends the next request.
    let limit = Duration::from_millis(10) * count + Duration::from_secs(10);
    let out = process::run_ok(cmd, limit)?;
    let text = out.stdout_text();
    let summary = parse_ping_summary(&text).ok_or_else(|| Error::Traffic {
        what: format!(
            "ping from {} to {}: no summary in its output:\n{text}",
            client.label(),
            server.label()
        ),
    })?;
    if summary.received < count {
        return Err(Error::Traffic {
            what: format!(
                "ping from {} to {}: {} of {count} answered",
                client.label(),
                server.label(),
                summary.received
            ),
        });
    }
    Ok(summary.time_ms * 1000.0 / f64::from(summary.transmitted))
}

/// The counts line of ping's summary.
#[derive(Debug, PartialEq)]
pub struct PingSummary {
    pub transmitted: u32,
    pub received: u32,
    /// The whole run, as ping reports it (whole milliseconds).
    pub time_ms: f64,
}

/// Parses `N packets transmitted, M received, ..., time Tms`.
pub fn parse_ping_summary(text: &str) -> Option<PingSummary> {
    text.lines().find_map(|line| {
        let (transmitted, rest) = line.split_once(" packets transmitted, ")?;
        let (received, rest) = rest.split_once(' ')?;
        let time = rest.rsplit_once("time ")?.1.strip_suffix("ms")?;
        Some(PingSummary {
            transmitted: transmitted.trim().parse().ok()?,
            received: received.parse().ok()?,
            time_ms: time.parse().ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::{PingSummary, parse_ping_summary};

    #[test]
    fn the_summary_gives_counts_and_run_time() {
        let text = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n\
                    --- 10.0.0.2 ping statistics ---\n\
                    20000 packets transmitted, 19998 received, 0.01% packet loss, time 312ms\n\
                    rtt min/avg/max/mdev = 0.011/0.014/0.210/0.009 ms, ipg/ewma 0.015/0.014 ms\n";
        assert_eq!(
            parse_ping_summary(text),
            Some(PingSummary {
                transmitted: 20000,
                received: 19998,
                time_ms: 312.0
            })
        );
    }

    #[test]
    fn a_run_with_errors_still_has_counts() {
        let text = "--- 10.0.0.2 ping statistics ---\n\
                    5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 4090ms\n";
        let s = parse_ping_summary(text).unwrap();
        assert_eq!((s.transmitted, s.received), (5, 0));
    }

    #[test]
    fn other_text_has_no_summary() {
        assert_eq!(
            parse_ping_summary("ping: connect: Network is unreachable\n"),
            None
        );
    }
}
