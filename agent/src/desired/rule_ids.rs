//! The numbers policy entries carry to say which rule wrote them (`PolicyEntry::rule`), so that
//! the datapath's events name the rule that admitted a flow.
//!
//! One number per (namespace, policy, direction, rule index), given the first time the agent
//! sees the rule and kept for as long as the rule exists; a removed rule's number is never
//! given again while the agent runs, so an event emitted just before a change never names
//! another rule. 0 means "none". A restarted agent numbers afresh and rewrites every entry.

use std::collections::{BTreeMap, HashMap};

use myelin_cluster::{ClusterIndex, PolicyInfo, explain::RuleRef};
use myelin_common::Direction;

/// The numbers of one policy's rules, by position.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyRuleIds {
    pub ingress: Vec<u32>,
    pub egress: Vec<u32>,
}

impl PolicyRuleIds {
    /// The number of rule `index` of `direction`, 0 when there is none.
    pub fn get(&self, direction: Direction, index: usize) -> u32 {
        let ids = match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        };
        ids.get(index).copied().unwrap_or(0)
    }
}

#[derive(Debug, Default)]
pub struct RuleIds {
    /// namespace -> policy name -> numbers.
    by_policy: BTreeMap<String, BTreeMap<String, PolicyRuleIds>>,
    by_id: HashMap<u32, RuleRef>,
    last: u32,
}

static NONE: PolicyRuleIds = PolicyRuleIds {
    ingress: Vec::new(),
    egress: Vec::new(),
};

impl RuleIds {
    /// Numbers every rule of the index's policies, keeps the numbers of rules that still exist
    /// and forgets the others. Returns whether anything changed.
    pub fn sync(&mut self, index: &ClusterIndex) -> bool {
        let mut changed = false;
        let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for policy in index.policies() {
            seen.entry(policy.namespace.as_str())
                .or_default()
                .push(policy.name.as_str());
            let counts = (
                policy.ingress.as_ref().map_or(0, Vec::len),
                policy.egress.as_ref().map_or(0, Vec::len),
            );
            let current = self
                .by_policy
                .get(&policy.namespace)
                .and_then(|p| p.get(&policy.name));
            if current.is_some_and(|c| (c.ingress.len(), c.egress.len()) == counts) {
                continue;
            }
            changed = true;
            self.renumber(policy, counts);
        }
        // Policies gone altogether.
        let mut gone = Vec::new();
        for (namespace, policies) in &self.by_policy {
            for name in policies.keys() {
                let still = seen
                    .get(namespace.as_str())
                    .is_some_and(|names| names.contains(&name.as_str()));
                if !still {
                    gone.push((namespace.clone(), name.clone()));
                }
            }
        }
        for (namespace, name) in gone {
            changed = true;
            if let Some(policies) = self.by_policy.get_mut(&namespace) {
                if let Some(ids) = policies.remove(&name) {
                    for id in ids.ingress.iter().chain(&ids.egress) {
                        self.by_id.remove(id);
                    }
                }
                if policies.is_empty() {
                    self.by_policy.remove(&namespace);
                }
            }
        }
        changed
    }

    /// A policy whose number of rules changed: the rules still there keep their numbers.
    fn renumber(&mut self, policy: &PolicyInfo, (ingress, egress): (usize, usize)) {
        let entry = self
            .by_policy
            .entry(policy.namespace.clone())
            .or_default()
            .entry(policy.name.clone())
            .or_default();
        for (direction, ids, len) in [
            (Direction::Ingress, &mut entry.ingress, ingress),
            (Direction::Egress, &mut entry.egress, egress),
        ] {
            for id in ids.drain(len.min(ids.len())..) {
                self.by_id.remove(&id);
            }
            while ids.len() < len {
                self.last += 1;
                ids.push(self.last);
                self.by_id.insert(
                    self.last,
                    RuleRef {
                        namespace: policy.namespace.clone(),
                        name: policy.name.clone(),
                        direction,
                        index: (ids.len() - 1) as u32,
                    },
                );
            }
        }
    }

    /// The numbers of a policy's rules (none for a policy the last sync did not see).
    pub fn of(&self, policy: &PolicyInfo) -> &PolicyRuleIds {
        self.by_policy
            .get(&policy.namespace)
            .and_then(|p| p.get(&policy.name))
            .unwrap_or(&NONE)
    }

    /// The rule a number stands for.
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.by_id.get(&id)
    }

    /// Every number and its rule.
    pub fn all(&self) -> &HashMap<u32, RuleRef> {
        &self.by_id
    }
}

#[cfg(test)]
mod tests {
    use myelin_cluster::{Change, Kind, Object, PolicyInfo, builders::policy};

    use super::*;

    /// A policy of `rules` ingress rules (each from a pod of its namespace) and one egress rule.
    fn apply(index: &mut ClusterIndex, namespace: &str, name: &str, rules: usize) {
        let from = "    - from: [{podSelector: {}}]\n".repeat(rules);
        let yaml = format!(
            "kind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  \
             podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n{from}  egress:\n    - {{}}\n"
        );
        let p = PolicyInfo::from_k8s(&policy(&yaml)).unwrap();
        index.apply(Change::Apply(Object::NetworkPolicy(p)));
    }

    fn rule(id: &RuleIds, n: u32) -> String {
        id.rule(n).map(|r| r.to_string()).unwrap_or_default()
    }

    #[test]
    fn every_rule_gets_a_number_that_names_it() {
        let mut index = ClusterIndex::default();
        apply(&mut index, "demo", "b", 2);
        apply(&mut index, "demo", "a", 1);
        let mut ids = RuleIds::default();
        assert!(ids.sync(&index));
        // Policy order (namespace, name), ingress before egress, rules in order.
        assert_eq!(rule(&ids, 1), "demo/a ingress[0]");
        assert_eq!(rule(&ids, 2), "demo/a egress[0]");
        assert_eq!(rule(&ids, 3), "demo/b ingress[0]");
        assert_eq!(rule(&ids, 4), "demo/b ingress[1]");
        assert_eq!(rule(&ids, 5), "demo/b egress[0]");
        let b = index.policies().find(|p| p.name == "b").unwrap();
        assert_eq!(ids.of(b).get(Direction::Ingress, 1), 4);
        assert_eq!(ids.of(b).get(Direction::Ingress, 2), 0);
        assert!(!ids.sync(&index), "an unchanged index changes nothing");
    }

    #[test]
    fn numbers_stay_while_rules_exist_and_are_never_given_again() {
        let mut index = ClusterIndex::default();
        apply(&mut index, "demo", "a", 2);
        let mut ids = RuleIds::default();
        ids.sync(&index);
        // One rule fewer: the first keeps its number, the second's is gone.
        apply(&mut index, "demo", "a", 1);
        assert!(ids.sync(&index));
        assert_eq!(rule(&ids, 1), "demo/a ingress[0]");
        assert_eq!(ids.rule(2), None);
        assert_eq!(rule(&ids, 3), "demo/a egress[0]");
        // Back to two: the second rule gets a new number.
        apply(&mut index, "demo", "a", 2);
        ids.sync(&index);
        assert_eq!(rule(&ids, 4), "demo/a ingress[1]");
        assert_eq!(ids.rule(2), None);
        // The policy deleted: all its numbers go, and a new policy gets new ones.
        index.apply(Change::Delete {
            kind: Kind::NetworkPolicy,
            namespace: "demo".into(),
            name: "a".into(),
        });
        assert!(ids.sync(&index));
        assert!(ids.all().is_empty());
        apply(&mut index, "demo", "a", 1);
        ids.sync(&index);
        assert_eq!(rule(&ids, 5), "demo/a ingress[0]");
    }
}
