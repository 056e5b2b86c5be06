//! The multi-document YAML of the directory source: Kubernetes objects in their own schema,
//! several per text separated by `---`, `kind: List` expanded, converted into the slim records
//! of [`crate::objects`]. Kinds the agent does not use are skipped.

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use serde::{Deserialize as _, de::DeserializeOwned};

use crate::objects::{NamespaceInfo, NodeInfo, Object, PodInfo};

/// Parses a multi-document YAML text. Errors carry the 1-based document number.
pub fn parse_documents(text: &str) -> Result<(Vec<Object>, Vec<String>), (usize, String)> {
    let mut objects = Vec::new();
    let mut warnings = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| (n, e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let items = match kind_of(&value).as_deref() {
            Some("List") => value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for item in items {
            if let Some(object) = convert(&item, &mut warnings).map_err(|m| (n, m))? {
                objects.push(object);
            }
        }
    }
    Ok((objects, warnings))
}

fn kind_of(value: &serde_yaml::Value) -> Option<String> {
    value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_string)
}

fn typed<T: DeserializeOwned>(value: &serde_yaml::Value, kind: &str) -> Result<T, String> {
    serde_yaml::from_value(value.clone()).map_err(|e| format!("invalid {kind}: {e}"))
}

/// One object in its slim form; `None` for kinds the agent does not use.
fn convert(
    value: &serde_yaml::Value,
    warnings: &mut Vec<String>,
) -> Result<Option<Object>, String> {
    let Some(kind) = kind_of(value) else {
        return Err("object has no `kind`".to_string());
    };
    let object = match kind.as_str() {
        "Node" => {
            let (node, w) =
                NodeInfo::from_k8s(&typed::<Node>(value, &kind)?).map_err(|e| e.to_string())?;
            warnings.extend(w);
            Object::Node(node)
        }
        "Namespace" => Object::Namespace(
            NamespaceInfo::from_k8s(&typed::<Namespace>(value, &kind)?)
                .map_err(|e| e.to_string())?,
        ),
        "Pod" => {
            let (pod, w) =
                PodInfo::from_k8s(&typed::<Pod>(value, &kind)?).map_err(|e| e.to_string())?;
            warnings.extend(w);
            Object::Pod(pod)
        }
        // A policy that cannot be enforced is a rejection, which the index fails closed with
        // (and logs); the file's other objects still apply.
        "NetworkPolicy" => Object::from_network_policy(&typed::<NetworkPolicy>(value, &kind)?)
            .map_err(|e| e.to_string())?,
        _ => return Ok(None),
    };
    Ok(Some(object))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Kind;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDR: 10.244.1.0/24}
---
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {team: a}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  containers:
  - name: c
    image: busybox
    ports: [{name: http, containerPort: 80}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    fn kinds(objects: &[Object]) -> Vec<Kind> {
        objects.iter().map(Object::kind).collect()
    }

    #[test]
    fn parses_several_documents_and_skips_unused_kinds() {
        let (objects, warnings) = parse_documents(CLUSTER).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            kinds(&objects),
            vec![Kind::Node, Kind::Namespace, Kind::Pod]
        );
        let Object::Node(node) = &objects[0] else {
            panic!()
        };
        assert_eq!(node.pod_cidr, Some("10.244.1.0/24".parse().unwrap()));
    }

    #[test]
    fn expands_lists() {
        let text = "kind: List\nitems:\n- {kind: Namespace, metadata: {name: a}}\n- {kind: Namespace, metadata: {name: b}}\n";
        let (objects, _) = parse_documents(text).unwrap();
        assert_eq!(objects.len(), 2);
    }

    #[test]
    fn a_policy_that_cannot_be_enforced_is_a_rejection_not_a_skipped_object() {
        let text = "kind: Namespace\nmetadata: {name: a}\n---\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: 70000}]}]}\n";
        let (objects, warnings) = parse_documents(text).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(
            matches!(&objects[..], [Object::Namespace(_), Object::RejectedNetworkPolicy(r)]
                if r.reason == "spec.ingress[0].ports[0].port: 70000 is outside 1-65535"),
            "{objects:?}"
        );
    }

    #[test]
    fn a_policy_without_a_name_makes_its_file_invalid() {
        // Nothing to key a rejection by: the file keeps its last good objects instead.
        let text = "kind: Namespace\nmetadata: {name: a}\n---\nkind: NetworkPolicy\nmetadata: {namespace: a}\nspec: {podSelector: {}}\n";
        let (doc, message) = parse_documents(text).unwrap_err();
        assert_eq!(doc, 2);
        assert!(message.contains("metadata.name"), "{message}");
    }

    #[test]
    fn reports_the_failing_document() {
        let text = "kind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: p}\n";
        let (doc, message) = parse_documents(text).unwrap_err();
        assert_eq!(doc, 2);
        assert!(message.contains("namespace"), "{message}");
        let (doc, _) = parse_documents("kind: Pod\nspec: [not, a, map\n").unwrap_err();
        assert_eq!(doc, 1);
    }
}
