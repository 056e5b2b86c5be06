// Throwaway: where an ADD's time goes with a large index (not committed).
use myelin_tests::{
    NodeSpec, RunPrefix,
    apiserver::{KubernetesNode, generated_cluster},
    cluster::{namespace_object, pod_object},
};
use std::time::Duration;
fn main() {
    let run = RunPrefix::new();
    let mut spec = NodeSpec::new("prof");
    spec.echo_agent_log_on_drop = false;
    let mut k = KubernetesNode::create(&run, spec).unwrap();
    k.server().store_all(generated_cluster(5000, 500)).unwrap();
    k.server().apply(namespace_object("load", &[])).unwrap();
    for i in 0..20 {
        k.server()
            .apply(pod_object(
                k.node().name(),
                "load",
                &format!("p{i}"),
                &[("app", "load")],
                &[],
            ))
            .unwrap();
    }
    k.start_agent().unwrap();
    k.wait_until_ready(Duration::from_secs(300)).unwrap();
    let node = k.node();
    let pid = k.agent_pid().unwrap();
    let mut perf = std::process::Command::new("perf")
        .args([
            "record",
            "--call-graph",
            "dwarf,16384",
            "-F",
            "1000",
            "-o",
            "/tmp/perf.data",
            "-p",
            &pid.to_string(),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..20 {
        let sb = node.sandbox("load", &format!("p{i}")).unwrap();
        let out = node.cni(&node.cni_call("ADD", &sb)).unwrap();
        let _ = node.cni(&node.cni_call("DEL", &sb)).unwrap();
        eprintln!("add {:?}", out.elapsed);
    }
    unsafe {
        libc::kill(perf.id() as i32, libc::SIGINT);
    }
    perf.wait().unwrap();
    for l in node
        .agent_log()
        .lines()
        .filter(|l| l.contains("endpoint created") || l.contains("allocated"))
    {
        eprintln!("{l}");
    }
}
