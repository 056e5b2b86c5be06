//! TCP stream throughput between two hosts with Debian's `iperf3`, client and server on one
//! CPU (see [`super::cpus`]).

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::cpus::flow_cpu;
use crate::{Error, Result, describe, process, traffic::Host};

/// How long a server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Margin over a client's run time before it counts as hung.
const CLIENT_MARGIN: Duration = Duration::from_secs(20);

/// TCP stream throughput from `client` to `server` in bits per second (iperf3, `seconds`).
pub fn tcp_stream(client: &dyn Host, server: &dyn Host, port: u16, seconds: u32) -> Result<f64> {
    let ip = server.ip().to_string();
    let cpu = flow_cpu(0);
    let _server = IperfServer::start(server, cpu, port)?;
    let cmd = iperf3(
        client,
        cpu,
        &[
            "-c",
            &ip,
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    // iperf3 -J reports its own errors inside the JSON, with exit status 1: parse either way.
    let out = process::run(
        cmd,
        &[],
        Duration::from_secs(seconds.into()) + CLIENT_MARGIN,
    )?;
    let text = out.stdout_text();
    parse_iperf3_bits_per_second(&text).ok_or_else(|| Error::Traffic {
        what: format!(
            "iperf3 from {} to {} ({}): no end.sum_received.bits_per_second in its output:\n\
             {text}{}",
            client.label(),
            server.label(),
            out.status,
            out.stderr_text()
        ),
    })
}

/// `taskset -c <cpu> iperf3 <args>` inside `host`'s namespace.
fn iperf3(host: &dyn Host, cpu: usize, args: &[&str]) -> Result<Command> {
    let mut cmd = host.netns().command("taskset")?;
    cmd.args(["-c", &cpu.to_string(), "iperf3"]).args(args);
    Ok(cmd)
}

/// An iperf3 server for one test (`-1`, so nothing outlives the measurement); killed on drop.
struct IperfServer {
    child: Child,
    command: String,
    stderr: Option<thread::JoinHandle<Vec<u8>>>,
}

impl IperfServer {
    /// Starts it on `host`'s address and waits until it listens on `port`.
    fn start(host: &dyn Host, cpu: usize, port: u16) -> Result<Self> {
        let ip = host.ip().to_string();
        let mut cmd = iperf3(host, cpu, &["-s", "-1", "-B", &ip, "-p", &port.to_string()])?;
        let command = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                command: command.clone(),
                source,
            })?;
        let stderr = Some(process::drain(child.stderr.take()));
        let mut server = Self {
            child,
            command,
            stderr,
        };
        server.wait_until_listening(host, port)?;
        Ok(server)
    }

    fn wait_until_listening(&mut self, host: &dyn Host, port: u16) -> Result<()> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let stderr = self
                    .stderr
                    .take()
                    .and_then(|t| t.join().ok())
                    .unwrap_or_default();
                return Err(Error::CommandFailed {
                    command: self.command.clone(),
                    status: format!("{status} before listening"),
                    stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
                });
            }
            if is_listening(host, port)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    command: format!("{} (listening on port {port})", self.command),
                    timeout: LISTEN_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        // Errors mean it already exited (after its one test it does); it is reaped either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a TCP socket listens on `port` in `host`'s namespace (`ss`).
fn is_listening(host: &dyn Host, port: u16) -> Result<bool> {
    let mut cmd = host.netns().command("ss")?;
    cmd.args(["-Htln", "sport", "=", &format!(":{port}")]);
    let out = process::run_ok(cmd, Duration::from_secs(5))?;
    Ok(!out.stdout_text().trim().is_empty())
}

/// `end.sum_received.bits_per_second` of `iperf3 -J`; `None` when iperf3 reported an error
/// or the output is not its JSON.
pub fn parse_iperf3_bits_per_second(output: &str) -> Option<f64> {
    let report: Value = serde_json::from_str(output).ok()?;
    if report.get("error").is_some() {
        return None;
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .filter(|bps| *bps > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_throughput_is_what_the_receiver_got() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":10.5e9},
            "sum_received":{"bits_per_second":10.1e9}}}"#;
        assert_eq!(parse_iperf3_bits_per_second(json), Some(10.1e9));
        let failed =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert_eq!(parse_iperf3_bits_per_second(failed), None);
        assert_eq!(parse_iperf3_bits_per_second("iperf3: error"), None);
    }
}
