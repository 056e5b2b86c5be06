//! Scenario 4c: cross-node traffic. A placeholder until the cross-node issue brings two nodes
//! and a tunnel or native routes: it is listed in the report as not measured, never left out.

use anyhow::Result;

use super::{
    Context,
    report::{ScenarioReport, Status},
};

pub const ID: &str = "cross_node";
pub const TITLE: &str = "4c. Cross-node pod to pod";

pub fn run(_ctx: &Context<'_>, out: &mut ScenarioReport) -> Result<()> {
    out.status = Status::Placeholder(
        "filled in by the cross-node issue (Myelin cannot connect pods on two nodes yet)".into(),
    );
    Ok(())
}
