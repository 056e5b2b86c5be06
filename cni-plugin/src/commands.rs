//! ADD, DEL, CHECK, STATUS, GC and VERSION: validation, then the steps of each command.

use std::path::Path;

use myelin_api::{
    AllocateRequest, AttachmentId, Client, ClientError, EndpointRequest, ErrorKind, GcRequest,
    pending,
};

use crate::{
    config::{self, NetConf},
    env::{AttachmentEnv, CniEnv, Command},
    error::{CniError, ErrorCode, error_chain},
    log::Log,
    netlink::{Mac, Netlink},
    netns::{NetNs, NetNsError},
    result::{self, AddResult, ResultInterface, ResultIp, ResultRoute},
    version::{self, CniVersion},
    veth::{self, PodAddressing, VethError},
};

/// MTU when the configuration sets none and the node has no IPv4 default route.
pub const FALLBACK_MTU: u32 = 1500;

/// A validated request: the command with the parameters it needs.
enum Task {
    Add(AttachmentEnv),
    Del(AttachmentEnv),
    Check(AttachmentEnv),
    Status,
    Gc,
}

/// Runs one invocation. `Ok(Some(json))` is printed on stdout; `Ok(None)` prints nothing.
/// The environment is checked before the configuration, as the reference skel does.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let command = env.command()?;
    let task = match command {
        Command::Version => {
            return Ok(Some(version::version_answer(
                config::requested_version(stdin).as_deref(),
            )));
        }
        Command::Add => Task::Add(env.attachment(command)?),
        Command::Del => Task::Del(env.attachment(command)?),
        Command::Check => Task::Check(env.attachment(command)?),
        Command::Status => Task::Status,
        Command::Gc => Task::Gc,
    };
    let conf = NetConf::parse(stdin)?;
    let context = match &task {
        Task::Add(a) | Task::Del(a) | Task::Check(a) => format!("{} {}", command.as_str(), a.id),
        Task::Status | Task::Gc => command.as_str().to_string(),
    };
    let log = Log::open(conf.log_file.as_deref(), context);
    let outcome = match &task {
        Task::Add(a) => add(&conf, a, &log).map(Some),
        Task::Del(a) => del(&conf, a, &log).map(|()| None),
        Task::Check(a) => check(&conf, a, &log).map(|()| None),
        Task::Status => status(&conf).map(|()| None),
        Task::Gc => gc(&conf, &log).map(|()| None),
    };
    match &outcome {
        Ok(_) => log.line("succeeded"),
        Err(e) => log.line(format_args!(
            "failed with code {}: {} ({})",
            e.code.number(),
            e.msg,
            e.details
        )),
    }
    outcome
}

fn open_pod_netns(attachment: &AttachmentEnv) -> Result<NetNs, CniError> {
    let Some(path) = attachment.netns.as_deref() else {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "required environment variables missing: CNI_NETNS",
        ));
    };
    NetNs::open(path).map_err(|e| {
        let msg = match &e {
            NetNsError::PluginsOwn { .. } => {
                "CNI_NETNS is the plugin's own network namespace; pass the pod's".to_string()
            }
            _ => format!("CNI_NETNS {path} is not an existing network namespace"),
        };
        CniError::new(ErrorCode::InvalidEnvironment, msg).caused_by(&e)
    })
}

fn setup_failed(what: &str, e: &(dyn std::error::Error + 'static)) -> CniError {
    CniError::new(
        ErrorCode::InterfaceSetup,
        format!("{what} failed; the details name the netlink operation and the kernel's error"),
    )
    .caused_by(e)
}

fn open_node_netlink() -> Result<Netlink, CniError> {
    Netlink::open().map_err(|e| setup_failed("opening netlink on the node", &e))
}

fn veth_failed(what: &str, e: VethError) -> CniError {
    match e {
        VethError::AlreadyExists { .. } => CniError::new(
            ErrorCode::AttachmentExists,
            format!("{e}; DEL the attachment before adding it again"),
        ),
        other => setup_failed(what, &other),
    }
}

/// Maps an agent failure to the code the runtime can act on.
fn agent_failed(what: &str, socket: &Path, e: &ClientError) -> CniError {
    let (code, msg) = if e.is_unavailable() {
        (
            ErrorCode::TryAgainLater,
            format!(
                "the myelin agent is not reachable at {} to {what}; check that it runs on this node",
                socket.display()
            ),
        )
    } else {
        match e.api_error().map(|a| a.kind) {
            Some(ErrorKind::PoolExhausted) => (
                ErrorCode::PodCidrExhausted,
                format!("cannot {what}: the node's pod CIDR has no free address"),
            ),
            Some(ErrorKind::AlreadyExists) => (
                ErrorCode::AttachmentExists,
                format!(
                    "cannot {what}: the attachment already exists; DEL it before adding it again"
                ),
            ),
            Some(ErrorKind::NotReady) => (
                ErrorCode::TryAgainLater,
                format!("cannot {what}: the myelin agent is not ready yet"),
            ),
            // The agent got to the request only after we had given up on it: it did nothing.
            Some(ErrorKind::DeadlineExceeded) => (
                ErrorCode::TryAgainLater,
                format!("cannot {what}: the myelin agent answered too late"),
            ),
            _ => (
                ErrorCode::AgentFailed,
                format!("the myelin agent failed to {what}; see its log"),
            ),
        }
    };
    CniError::new(code, msg).caused_by(e)
}

/// Undoes whatever an ADD has done so far unless disarmed: runs on error returns and on panics,
/// so a failed ADD leaves no veth, no endpoint and no address behind. It only ever undoes what
/// this invocation created, never what an earlier ADD of the same attachment left.
struct AddRollback<'a> {
    client: &'a Client,
    node: &'a Netlink,
    log: &'a Log,
    attachment: &'a AttachmentId,
    allocated: bool,
    endpoint_requested: bool,
    host_veth: Option<String>,
}

impl AddRollback<'_> {
    fn disarm(mut self) {
        self.allocated = false;
        self.endpoint_requested = false;
        self.host_veth = None;
    }
}

impl Drop for AddRollback<'_> {
    fn drop(&mut self) {
        if self.endpoint_requested {
            // Releases the endpoint and its address, whatever part of it the agent created.
            match self.client.delete_endpoint(self.attachment) {
                Ok(_) => self.log.line("rollback: endpoint and address released"),
                Err(e) => self.log.line(format_args!(
                    "rollback: deleting the endpoint failed: {}",
                    error_chain(&e)
                )),
            }
        } else if self.allocated {
            match self.client.release(self.attachment) {
                Ok(_) => self.log.line("rollback: address released"),
                Err(e) => self.log.line(format_args!(
                    "rollback: releasing the address failed: {}",
                    error_chain(&e)
                )),
            }
        }
        if let Some(name) = &self.host_veth {
            match veth::delete_host_side(self.node, name) {
                Ok(_) => self.log.line(format_args!("rollback: veth {name} deleted")),
                Err(e) => self.log.line(format_args!(
                    "rollback: deleting veth {name} failed: {}",
                    error_chain(&e)
                )),
            }
        }
    }
}

fn add(conf: &NetConf, attachment: &AttachmentEnv, log: &Log) -> Result<String, CniError> {
    // 1. Validation, without side effects.
    let pod_netns = open_pod_netns(attachment)?;
    let node = open_node_netlink()?;
    let host_name = attachment.id.host_ifname();
    let ifname = attachment.id.ifname.as_str();
    let client = Client::new(&conf.agent_socket);
    let mut rollback = AddRollback {
        client: &client,
        node: &node,
        log,
        attachment: &attachment.id,
        allocated: false,
        endpoint_requested: false,
        host_veth: None,
    };

    // 2. An address.
    let allocation = client
        .allocate(&AllocateRequest {
            attachment: attachment.id.clone(),
            pod: attachment.pod.clone(),
        })
        .map_err(|e| agent_failed("allocate an address", &conf.agent_socket, &e))?;
    rollback.allocated = true;
    log.line(format_args!(
        "allocated {} (gateway {}, pod CIDR {})",
        allocation.ip, allocation.gateway, allocation.pod_cidr
    ));

    let mtu = match conf.mtu.or(allocation.mtu) {
        Some(mtu) => mtu,
        None => node
            .default_route_mtu()
            .map_err(|e| setup_failed("reading the MTU of the node's default route", &e))?
            .unwrap_or(FALLBACK_MTU),
    };

    // 3. The veth pair.
    let pair = veth::create_pair(&node, &host_name, &pod_netns, ifname, mtu)
        .map_err(|e| veth_failed("creating the veth pair", e))?;
    rollback.host_veth = Some(host_name.clone());
    log.line(format_args!(
        "created veth {} ({}) <-> {ifname} ({}) mtu {mtu}",
        pair.host.name, pair.host.mac, pair.pod.mac
    ));

    // 4. and 5. Both ends.
    let addressing = PodAddressing {
        ip: allocation.ip,
        gateway: allocation.gateway,
    };
    let netns_cookie = veth::configure_pod_side(&pod_netns, &pair.pod, addressing, pair.host.mac)
        .map_err(|e| veth_failed("configuring the pod's interface", e))?;
    veth::configure_host_side(&node, &pair.host, allocation.ip, pair.pod.mac)
        .map_err(|e| veth_failed("configuring the host's veth", e))?;

    // 6. The endpoint: the agent attaches the datapath before it answers.
    rollback.endpoint_requested = true;
    let endpoint = client
        .put_endpoint(&EndpointRequest {
            attachment: attachment.id.clone(),
            pod: attachment.pod.clone(),
            netns: pod_netns.path().display().to_string(),
            netns_cookie,
            ip: allocation.ip,
            mac: pair.pod.mac,
            host_ifname: pair.host.name.clone(),
            host_ifindex: pair.host.index,
            host_mac: pair.host.mac,
        })
        .map_err(|e| agent_failed("create the endpoint", &conf.agent_socket, &e))?;
    rollback.disarm();
    log.line(format_args!(
        "endpoint {} live with identity {}",
        endpoint.id, endpoint.identity
    ));

    // 7. The result.
    let result = AddResult {
        interfaces: vec![
            ResultInterface {
                name: pair.host.name,
                mac: pair.host.mac.to_string(),
                mtu,
                sandbox: None,
            },
            ResultInterface {
                name: pair.pod.name,
                mac: pair.pod.mac.to_string(),
                mtu,
                sandbox: Some(pod_netns.path().display().to_string()),
            },
        ],
        ips: vec![ResultIp {
            address: allocation.ip.into(),
            gateway: Some(allocation.gateway),
            interface: 1,
        }],
        routes: vec![ResultRoute {
            dst: ipnet::Ipv4Net::default(),
            gw: Some(allocation.gateway),
        }],
        dns: conf.dns.clone(),
    };
    Ok(result.to_json(conf.cni_version, conf.prev_result.as_ref()))
}

/// Releases everything, and succeeds when nothing is left. Needs neither CNI_NETNS nor
/// prevResult: the host veth's name derives from the attachment, and deleting it removes the
/// pod end wherever it is.
fn del(conf: &NetConf, attachment: &AttachmentEnv, log: &Log) -> Result<(), CniError> {
    // The veth first: deleting the device takes its programs with it in one go, where
    // detaching them from a live device would wait for an RCU grace period per program. It goes
    // even when the agent is down: the runtime retries DEL, and a leftover veth would keep the
    // pod's old address routed.
    let host_name = attachment.id.host_ifname();
    let veth = open_node_netlink().and_then(|node| {
        veth::delete_host_side(&node, &host_name)
            .map_err(|e| veth_failed("deleting the host's veth", e))
    });
    if let Ok(deleted) = &veth {
        log.line(format_args!("veth {host_name} deleted: {deleted}"));
    }
    let client = Client::new(&conf.agent_socket);
    let agent = client.delete_endpoint(&attachment.id);
    match &agent {
        Ok(released) => log.line(format_args!(
            "agent: endpoint removed: {}, address released: {:?}",
            released.endpoint, released.released
        )),
        Err(e) => log.line(format_args!(
            "agent: deleting the endpoint failed: {}",
            error_chain(e)
        )),
    }
    match agent {
        Ok(_) => {}
        // Nothing listens: the agent is down. With the veth gone the pod is off the network;
        // the endpoint and the address wait in the queue for the agent (see `pending`), so
        // that the pod can finish terminating instead of waiting for the agent to return.
        Err(ClientError::Unreachable { .. }) if veth.is_ok() => {
            let queue = pending::dir_for(&conf.agent_socket);
            let record = pending::enqueue(&queue, &attachment.id).map_err(|e| {
                CniError::new(
                    ErrorCode::TryAgainLater,
                    format!(
                        "the myelin agent is not reachable at {} and the DEL could not be \
                         queued for it in {}: {e}",
                        conf.agent_socket.display(),
                        queue.display()
                    ),
                )
            })?;
            log.line(format_args!(
                "agent down: DEL queued for it in {}",
                record.display()
            ));
        }
        Err(e) => return Err(agent_failed("delete the endpoint", &conf.agent_socket, &e)),
    }
    veth.map(|_| ())
}

fn check(conf: &NetConf, attachment: &AttachmentEnv, log: &Log) -> Result<(), CniError> {
    if !conf.cni_version.has_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "CHECK needs cniVersion 0.4.0 or later; the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult, the result of the ADD",
        )
    })?;
    let ifname = attachment.id.ifname.as_str();
    let expected = result::expected_pod(prev, ifname)?;
    let pod_netns = open_pod_netns(attachment)?;
    let pod = veth::inspect_pod_side(&pod_netns, ifname)
        .map_err(|e| setup_failed("inspecting the pod's interface", &e))?;
    let node = open_node_netlink()?;
    let host_name = attachment.id.host_ifname();
    let host = node
        .link_by_name(&host_name)
        .map_err(|e| setup_failed("inspecting the host's veth", &e))?;
    let endpoint = Client::new(&conf.agent_socket)
        .endpoint(&attachment.id)
        .map_err(|e| agent_failed("look up the endpoint", &conf.agent_socket, &e))?;

    let mut differences = Vec::new();
    match &pod {
        None => differences.push(format!(
            "interface {ifname} does not exist in {}",
            pod_netns.path().display()
        )),
        Some(pod) => {
            let expected_mac = expected.mac.parse::<Mac>().ok();
            if pod.link.mac.is_none() || pod.link.mac != expected_mac {
                differences.push(format!(
                    "{ifname} has MAC {}, prevResult says {:?}",
                    pod.link.mac.map(|m| m.to_string()).unwrap_or_default(),
                    expected.mac
                ));
            }
            if !pod.addresses.contains(&expected.address) {
                differences.push(format!(
                    "{ifname} lacks address {} (has {:?})",
                    expected.address,
                    pod.addresses
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                ));
            }
            let has_default = pod
                .routes
                .iter()
                .any(|r| r.dst.prefix_len() == 0 && r.gateway == Some(expected.gateway));
            if !has_default {
                differences.push(format!(
                    "{ifname} has no default route via {}",
                    expected.gateway
                ));
            }
        }
    }
    if host.is_none() {
        differences.push(format!("host veth {host_name} does not exist"));
    }
    match &endpoint {
        None => differences.push(format!("the agent has no endpoint for {}", attachment.id)),
        Some(endpoint) => {
            if endpoint.ip != expected.address.addr() {
                differences.push(format!(
                    "the agent's endpoint has IP {}, prevResult says {}",
                    endpoint.ip,
                    expected.address.addr()
                ));
            }
            if let Some(host) = &host
                && endpoint.host_ifindex != host.index
            {
                differences.push(format!(
                    "the agent's endpoint is on interface index {}, {host_name} has index {}",
                    endpoint.host_ifindex, host.index
                ));
            }
        }
    }
    if differences.is_empty() {
        log.line("attachment matches prevResult and the agent's endpoint");
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::CheckMismatch,
        format!(
            "the attachment differs from its ADD result: {}",
            differences.join("; ")
        ),
    ))
}

fn require_1_1(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if conf.cni_version.has_status_and_gc() {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::IncompatibleVersion,
        format!(
            "{command} needs cniVersion {}; the configuration says {}",
            CniVersion::V1_1_0,
            conf.cni_version
        ),
    ))
}

/// Ready when the agent answers, has synced the cluster state and has a free address.
fn status(conf: &NetConf) -> Result<(), CniError> {
    require_1_1(conf, "STATUS")?;
    let not_available = |msg: String| CniError::new(ErrorCode::PluginNotAvailable, msg);
    match Client::new(&conf.agent_socket).status() {
        Ok(status) if !status.ready => Err(not_available(format!(
            "the myelin agent on {} has not synced the cluster state yet",
            status.node_name
        ))),
        Ok(status) if status.free_addresses == 0 => Err(not_available(format!(
            "the pod CIDR {} of node {} has no free address",
            status.pod_cidr, status.node_name
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(not_available(format!(
            "the myelin agent at {} cannot be asked for its status",
            conf.agent_socket.display()
        ))
        .caused_by(&e)),
    }
}

/// Everything not in `cni.dev/valid-attachments` goes: the agent releases endpoints and
/// addresses and says which attachments it removed; their host veths are deleted here.
fn gc(conf: &NetConf, log: &Log) -> Result<(), CniError> {
    require_1_1(conf, "GC")?;
    // A missing list must not read as "nothing is valid": that would remove every pod. An
    // explicit null is an empty list (libcni sends a nil Go slice that way).
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs cni.dev/valid-attachments, the list of attachments to keep",
        )
    })?;
    let answer = Client::new(&conf.agent_socket)
        .gc(&GcRequest { valid })
        .map_err(|e| agent_failed("collect garbage", &conf.agent_socket, &e))?;
    let node = open_node_netlink()?;
    let mut failures: Vec<String> = answer
        .failed
        .iter()
        .map(|f| format!("{} (agent): {}", f.attachment, f.error))
        .collect();
    for removed in &answer.removed {
        let name = removed.host_ifname();
        match veth::delete_host_side(&node, &name) {
            Ok(deleted) => log.line(format_args!(
                "removed {removed}; veth {name} deleted: {deleted}"
            )),
            Err(e) => failures.push(format!("{name} ({removed}): {}", error_chain(&e))),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::InterfaceSetup,
        format!(
            "removed {} attachments; {} could not be removed",
            answer.removed.len(),
            failures.len()
        ),
    )
    .with_details(failures.join("; ")))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, ffi::OsString, time::Instant};

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> CniEnv {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        CniEnv::from_lookup(|name| map.get(name).map(OsString::from)).unwrap()
    }

    fn conf(version: &str, extra: serde_json::Value) -> Vec<u8> {
        let mut json = serde_json::json!({"cniVersion": version, "name": "myelin", "type": "myelin",
            "agentSocket": "/nonexistent/myelin-test/agent.sock"});
        if let (Some(obj), Some(extra)) = (json.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        json.to_string().into_bytes()
    }

    fn code(env: &CniEnv, stdin: &[u8]) -> u32 {
        run(env, stdin).unwrap_err().code.number()
    }

    #[test]
    fn version_works_without_stdin_and_echoes_the_request() {
        let version = env(&[("CNI_COMMAND", "VERSION")]);
        let answer: serde_json::Value =
            serde_json::from_str(&run(&version, b"").unwrap().unwrap()).unwrap();
        assert_eq!(answer["cniVersion"], "1.1.0");
        assert_eq!(
            answer["supportedVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let answer = run(&version, br#"{"cniVersion":"0.4.0"}"#)
            .unwrap()
            .unwrap();
        assert!(answer.contains(r#""cniVersion":"0.4.0""#), "{answer}");
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        assert_eq!(code(&env(&[]), &conf("1.1.0", serde_json::json!({}))), 4);
        assert_eq!(
            code(
                &env(&[("CNI_COMMAND", "FROB")]),
                &conf("1.1.0", serde_json::json!({}))
            ),
            4
        );
    }

    #[test]
    fn environment_is_checked_before_the_configuration() {
        let add = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(code(&add, b"not json"), 4);
    }

    #[test]
    fn bad_configuration_codes() {
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(code(&del, b"{"), 6);
        assert_eq!(code(&del, br#"{"cniVersion":"1.1.0","type":"myelin"}"#), 7);
        assert_eq!(code(&del, br#"{"name":"n","type":"myelin"}"#), 1);
    }

    #[test]
    fn add_rejects_a_netns_that_is_absent_or_not_a_netns_or_the_plugins_own() {
        for netns in [
            "/nonexistent/netns",
            "/proc/self/ns/mnt",
            "/proc/thread-self/ns/net",
        ] {
            let add = env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns),
            ]);
            let err = run(&add, &conf("1.1.0", serde_json::json!({}))).unwrap_err();
            assert_eq!(err.code.number(), 4, "{netns}: {err:?}");
            assert!(err.msg.contains("CNI_NETNS"), "{}", err.msg);
        }
    }

    #[test]
    fn check_needs_0_4_0_and_a_prev_result() {
        let check = env(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/netns"),
        ]);
        assert_eq!(code(&check, &conf("0.3.1", serde_json::json!({}))), 1);
        assert_eq!(code(&check, &conf("1.0.0", serde_json::json!({}))), 7);
        let unusable = serde_json::json!({"prevResult": {"interfaces": [], "ips": []}});
        assert_eq!(code(&check, &conf("1.0.0", unusable)), 7);
    }

    #[test]
    fn status_and_gc_need_1_1_0() {
        for command in ["STATUS", "GC"] {
            let e = env(&[("CNI_COMMAND", command)]);
            let err = run(&e, &conf("1.0.0", serde_json::json!({}))).unwrap_err();
            assert_eq!(err.code.number(), 1, "{command}");
            assert!(err.msg.contains(command), "{}", err.msg);
        }
    }

    #[test]
    fn status_without_agent_is_code_50() {
        let err = run(
            &env(&[("CNI_COMMAND", "STATUS")]),
            &conf("1.1.0", serde_json::json!({})),
        )
        .unwrap_err();
        assert_eq!(err.code.number(), 50);
        assert!(err.details.contains("not reachable"), "{}", err.details);
    }

    #[test]
    fn gc_without_valid_attachments_is_refused_before_asking_the_agent() {
        assert_eq!(
            code(
                &env(&[("CNI_COMMAND", "GC")]),
                &conf("1.1.0", serde_json::json!({}))
            ),
            7
        );
    }

    #[test]
    fn gc_without_agent_is_code_11_at_once() {
        let started = Instant::now();
        let stdin = conf(
            "1.1.0",
            serde_json::json!({"cni.dev/valid-attachments": []}),
        );
        assert_eq!(code(&env(&[("CNI_COMMAND", "GC")]), &stdin), 11);
        assert!(started.elapsed().as_secs() < 1);
    }

    #[test]
    fn agent_errors_map_to_their_codes() {
        use myelin_api::ApiError;
        let socket = Path::new("/run/myelin/agent.sock");
        let api = |kind, status| ClientError::Api {
            status,
            error: ApiError::new(kind, "from the agent"),
        };
        let cases = [
            (api(ErrorKind::PoolExhausted, 507), 101),
            (api(ErrorKind::AlreadyExists, 409), 102),
            (api(ErrorKind::NotReady, 503), 11),
            (api(ErrorKind::DeadlineExceeded, 504), 11),
            (api(ErrorKind::Internal, 500), 100),
            (api(ErrorKind::InvalidRequest, 400), 100),
            (ClientError::Timeout(std::time::Duration::from_secs(1)), 11),
            (ClientError::Protocol("garbage".into()), 100),
        ];
        for (error, expected) in cases {
            let err = agent_failed("allocate an address", socket, &error);
            assert_eq!(err.code.number(), expected, "{error:?}");
            assert!(!err.details.is_empty());
        }
    }
}
