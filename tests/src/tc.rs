//! `tc` inside a namespace: what another tool on a node does to a pod's interface, and what is
//! there afterwards as `tc -j` lists it (iproute2's reading, not the agent's own netlink code).

use std::{process::Command, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use serde_json::Value;

use crate::{Error, Result, netns::Netns, process};

/// A tc filter, one of the entries `tc -j filter show` prints. A priority's filter list is an
/// entry of its own, without options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub pref: u64,
    pub kind: String,
    /// What the kind-specific options say, as tc prints them.
    pub options: Value,
}

impl Filter {
    /// Whether this is a `bpf` filter running the program `name`.
    pub fn runs(&self, name: &str) -> bool {
        self.kind == "bpf" && self.options["bpf_name"] == name
    }
}

/// `tc <args>` in `netns`, failing on a non-zero exit.
pub fn tc(netns: &Netns, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("tc");
    cmd.arg("-n").arg(netns.name()).args(args);
    let out = process::run_ok(cmd, Duration::from_secs(10))?;
    Ok(out.stdout_text())
}

fn json(netns: &Netns, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let text = tc(netns, &all)?;
    serde_json::from_str(&text).map_err(Error::json(format!("parsing `tc {}`", all.join(" "))))
}

/// The filters on `hook` (`ingress` or `egress`) of `dev`.
pub fn filters(netns: &Netns, dev: &str, hook: &str) -> Result<Vec<Filter>> {
    Ok(json(netns, &["filter", "show", "dev", dev, hook])?
        .into_iter()
        .map(|f| Filter {
            pref: f["pref"].as_u64().unwrap_or_default(),
            kind: f["kind"].as_str().unwrap_or_default().to_string(),
            options: f["options"].clone(),
        })
        .collect())
}

/// The kinds of the qdiscs on `dev` that tc lists (not the default `noqueue`).
pub fn qdiscs(netns: &Netns, dev: &str) -> Result<Vec<String>> {
    Ok(json(netns, &["qdisc", "show", "dev", dev])?
        .iter()
        .filter_map(|q| q["kind"].as_str())
        .filter(|kind| *kind != "noqueue")
        .map(str::to_string)
        .collect())
}

/// The names of the tcx programs on `hook` (`ingress` or `egress`) of `dev`, in the order they
/// run (the kernel's own list: iproute2's tc does not show tcx).
pub fn tcx_programs(netns: &Netns, dev: &str, hook: &str) -> Result<Vec<String>> {
    let attach_type = match hook {
        "ingress" => TcAttachType::Ingress,
        "egress" => TcAttachType::Egress,
        other => return Err(Error::Cluster(format!("no tc hook {other}"))),
    };
    netns.run(|| {
        let (_, programs) = SchedClassifier::query_tcx(dev, attach_type).map_err(|e| {
            Error::Cluster(format!("listing the tcx programs on {dev} {hook}: {e}"))
        })?;
        Ok(programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or_default().to_string())
            .collect())
    })?
}

/// Whether the program `name` runs on `hook` of `dev`: as a clsact filter or a tcx link.
pub fn runs(netns: &Netns, dev: &str, hook: &str, name: &str) -> Result<bool> {
    Ok(filters(netns, dev, hook)?.iter().any(|f| f.runs(name))
        || tcx_programs(netns, dev, hook)?.iter().any(|p| p == name))
}
