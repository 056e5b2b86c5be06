//! The multi-document YAML of the directory source: Kubernetes objects in their own schema,
//! several per text separated by `---`, `kind: List` expanded, converted into the slim records
//! of [`crate::objects`]. Kinds the agent does not use are skipped. A document nested deeper
//! than [`MAX_NESTING_DEPTH`], or larger than [`MAX_DOCUMENT_NODES`], is refused before
//! serde_yaml parses it.

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::{Deserialize as _, de::DeserializeOwned};

use crate::{
    objects::{Kind, NamespaceInfo, NodeInfo, Object, PodInfo},
    service::{EndpointSliceInfo, ServiceInfo},
};

/// How deep mappings and sequences may nest in one document. Kubernetes objects stay well below
/// it: a Pod with affinity terms and managedFields reaches about 12 levels, and a CRD's schema
/// (two levels per nested field) about 40 when it embeds a PodSpec. serde_yaml refuses more
/// than 128 anyway. libyaml's scanner does work proportional to the open flow collections
/// (`[`, `{`) for every token, so the limit also bounds what an accepted file costs.
pub const MAX_NESTING_DEPTH: usize = 64;

/// How many nodes (scalars, aliases, mappings, sequences) one document may hold. serde_yaml
/// builds a whole document in memory, at about 100 bytes a node, before anything is converted:
/// this bounds that at about 100 MB, whatever the file's size. A Pod is 50 to 300 nodes, so a
/// `kind: List` of several thousand Pods still fits; larger lists belong in several files.
pub const MAX_DOCUMENT_NODES: usize = 1_000_000;

/// Parses a multi-document YAML text, every kind the agent can use. Errors carry the 1-based
/// document number.
pub fn parse_documents(text: &str) -> Result<(Vec<Object>, Vec<String>), (usize, String)> {
    parse_documents_of(text, &Kind::ALL)
}

/// Parses a multi-document YAML text, converting only objects of `kinds`: the others are
/// skipped unread, like kinds the agent never uses.
pub fn parse_documents_of(
    text: &str,
    kinds: &[Kind],
) -> Result<(Vec<Object>, Vec<String>), (usize, String)> {
    check_nesting(text, MAX_NESTING_DEPTH, MAX_DOCUMENT_NODES)?;
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
            if let Some(object) = convert(&item, kinds, &mut warnings).map_err(|m| (n, m))? {
                objects.push(object);
            }
        }
    }
    Ok((objects, warnings))
}

/// Refuses a text with a document nested deeper than `limit`, looking only at libyaml's events
/// (the parser serde_yaml runs on, so both see the same structure) and stopping at the first
/// collection too deep. serde_yaml cannot do this itself: it collects a whole document's events
/// before its own depth check, and for 200 KB of `{a: ` that collecting alone is quadratic
/// (seconds of CPU). Syntax errors are left to serde_yaml, which reports them with a position.
fn check_nesting(text: &str, limit: usize, max_nodes: usize) -> Result<(), (usize, String)> {
    let events = libyaml::Events::new(text).ok_or((1, "out of memory".to_string()))?;
    let mut document = 0;
    let mut depth = 0usize;
    let mut nodes = 0usize;
    for event in events {
        match event {
            libyaml::Event::DocumentStart => {
                document += 1;
                nodes = 0;
            }
            libyaml::Event::CollectionStart => {
                depth += 1;
                nodes += 1;
                if depth > limit {
                    return Err((document, format!("nesting deeper than {limit} levels")));
                }
            }
            libyaml::Event::CollectionEnd => depth = depth.saturating_sub(1),
            libyaml::Event::Node => nodes += 1,
            libyaml::Event::Other => {}
        }
        if nodes > max_nodes {
            return Err((
                document,
                format!("more than {max_nodes} YAML nodes in one document; split it"),
            ));
        }
    }
    Ok(())
}

/// The little of libyaml's event parser that [`check_nesting`] needs, behind a safe interface.
mod libyaml {
    use std::{marker::PhantomData, mem::MaybeUninit};

    use unsafe_libyaml::{
        YAML_ALIAS_EVENT, YAML_DOCUMENT_START_EVENT, YAML_MAPPING_END_EVENT,
        YAML_MAPPING_START_EVENT, YAML_NO_EVENT, YAML_SCALAR_EVENT, YAML_SEQUENCE_END_EVENT,
        YAML_SEQUENCE_START_EVENT, YAML_STREAM_END_EVENT, YAML_UTF8_ENCODING, yaml_event_delete,
        yaml_event_t, yaml_parser_delete, yaml_parser_initialize, yaml_parser_parse,
        yaml_parser_set_encoding, yaml_parser_set_input_string, yaml_parser_t,
    };

    pub enum Event {
        DocumentStart,
        /// A mapping or a sequence opens.
        CollectionStart,
        CollectionEnd,
        /// A scalar or an alias.
        Node,
        Other,
    }

    /// The events of a text, up to the end of the stream or the first syntax error.
    pub struct Events<'text> {
        /// Boxed because libyaml keeps a pointer to the parser itself (as its read handler's
        /// data): it must not move once the input is set.
        parser: Box<MaybeUninit<yaml_parser_t>>,
        text: PhantomData<&'text str>,
    }

    impl<'text> Events<'text> {
        /// `None` only when libyaml cannot allocate its buffers.
        pub fn new(text: &'text str) -> Option<Self> {
            let mut parser = Box::new(MaybeUninit::<yaml_parser_t>::uninit());
            // SAFETY: `yaml_parser_initialize` initialises the parser in place, where it stays;
            // the input outlives the parser (`'text`) and is only read.
            unsafe {
                if yaml_parser_initialize(parser.as_mut_ptr()).fail {
                    return None;
                }
                yaml_parser_set_encoding(parser.as_mut_ptr(), YAML_UTF8_ENCODING);
                yaml_parser_set_input_string(parser.as_mut_ptr(), text.as_ptr(), text.len() as u64);
            }
            Some(Self {
                parser,
                text: PhantomData,
            })
        }
    }

    impl Iterator for Events<'_> {
        type Item = Event;

        fn next(&mut self) -> Option<Event> {
            let mut event = MaybeUninit::<yaml_event_t>::uninit();
            // SAFETY: the parser was initialised in `new`; a successful `yaml_parser_parse`
            // initialises the event, which is deleted (its anchor, tag and value freed) as soon
            // as its type is read.
            let kind = unsafe {
                if yaml_parser_parse(self.parser.as_mut_ptr(), event.as_mut_ptr()).fail {
                    return None;
                }
                let kind = (*event.as_ptr()).type_;
                yaml_event_delete(event.as_mut_ptr());
                kind
            };
            Some(match kind {
                // libyaml answers every call after the end with an empty event.
                YAML_STREAM_END_EVENT | YAML_NO_EVENT => return None,
                YAML_DOCUMENT_START_EVENT => Event::DocumentStart,
                YAML_MAPPING_START_EVENT | YAML_SEQUENCE_START_EVENT => Event::CollectionStart,
                YAML_MAPPING_END_EVENT | YAML_SEQUENCE_END_EVENT => Event::CollectionEnd,
                YAML_SCALAR_EVENT | YAML_ALIAS_EVENT => Event::Node,
                _ => Event::Other,
            })
        }
    }

    impl Drop for Events<'_> {
        fn drop(&mut self) {
            // SAFETY: the parser was initialised in `new` and is deleted once.
            unsafe { yaml_parser_delete(self.parser.as_mut_ptr()) }
        }
    }
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

/// One object in its slim form; `None` for kinds the agent does not use (or not in `kinds`).
fn convert(
    value: &serde_yaml::Value,
    kinds: &[Kind],
    warnings: &mut Vec<String>,
) -> Result<Option<Object>, String> {
    let Some(kind) = kind_of(value) else {
        return Err("object has no `kind`".to_string());
    };
    if !kinds.iter().any(|k| k.as_str() == kind) {
        return Ok(None);
    }
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
        "Service" => Object::Service(
            ServiceInfo::from_k8s(&typed::<Service>(value, &kind)?).map_err(|e| e.to_string())?,
        ),
        "EndpointSlice" => Object::EndpointSlice(
            EndpointSliceInfo::from_k8s(&typed::<EndpointSlice>(value, &kind)?)
                .map_err(|e| e.to_string())?,
        ),
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

    /// Parses on a thread of its own and fails when that takes more than a few seconds, so that
    /// a regression to slow parsing fails the test instead of stalling it.
    fn parse_promptly(text: String) -> Result<(Vec<Object>, Vec<String>), (usize, String)> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(parse_documents(&text)));
        rx.recv_timeout(std::time::Duration::from_secs(3))
            .expect("parsed within 3 s")
    }

    fn too_deep() -> String {
        format!("nesting deeper than {MAX_NESTING_DEPTH} levels")
    }

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing() {
        // 200 KB each; without the check, `{a: ` costs libyaml quadratic time (9 s in release).
        for opener in ["[", "{", "{a: "] {
            let text = opener.repeat(200_000 / opener.len());
            assert_eq!(parse_promptly(text), Err((1, too_deep())), "{opener}");
        }
    }

    #[test]
    fn deep_block_nesting_is_refused_in_its_document() {
        let mappings: String = (0..=MAX_NESTING_DEPTH)
            .map(|level| format!("{}a:\n", "  ".repeat(level)))
            .collect();
        let sequences = format!("{}x\n", "- ".repeat(100_000));
        for deep in [mappings, sequences] {
            let text = format!("kind: Namespace\nmetadata: {{name: a}}\n---\n{deep}");
            assert_eq!(parse_promptly(text), Err((2, too_deep())));
        }
    }

    #[test]
    fn a_document_of_too_many_nodes_is_refused_and_many_small_documents_are_not() {
        // A flat sequence: the cheapest text per node, the worst memory per byte for serde_yaml.
        let huge = format!(
            "kind: Namespace\nmetadata: {{name: a}}\ndata: [{}]\n",
            "1,".repeat(MAX_DOCUMENT_NODES)
        );
        let (doc, message) = parse_promptly(huge).unwrap_err();
        assert_eq!(doc, 1);
        assert!(message.contains("YAML nodes in one document"), "{message}");
        let many: String = (0..20_000)
            .map(|i| format!("kind: Namespace\nmetadata: {{name: ns{i}}}\n---\n"))
            .collect();
        let (objects, _) = parse_promptly(many).unwrap();
        assert_eq!(objects.len(), 20_000);
    }

    #[test]
    fn aliases_cannot_expand_a_small_text_into_a_huge_document() {
        // "Billion laughs": each level refers to the one before it ten times.
        let mut text = String::from(
            "kind: Namespace\nmetadata: {name: a}\nl0: &l0 [x, x, x, x, x, x, x, x, x, x]\n",
        );
        for level in 1..10 {
            let refs = vec![format!("*l{}", level - 1); 10].join(", ");
            text.push_str(&format!("l{level}: &l{level} [{refs}]\n"));
        }
        assert!(
            parse_promptly(text).is_err(),
            "expanding aliases is refused"
        );
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        // The document's mapping is one level, `data`'s sequences the others.
        let nested = |levels: usize| {
            format!(
                "kind: Namespace\nmetadata: {{name: a}}\ndata: {}{}\n",
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        let (objects, _) = parse_promptly(nested(MAX_NESTING_DEPTH)).unwrap();
        assert_eq!(kinds(&objects), vec![Kind::Namespace]);
        assert_eq!(
            parse_promptly(nested(MAX_NESTING_DEPTH + 1)),
            Err((1, too_deep()))
        );
    }

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.2]
  conditions: {ready: true}
  nodeName: node-1
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

    #[test]
    fn parses_services_and_endpoint_slices() {
        let (objects, warnings) = parse_documents(SERVICES).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let [Object::Service(web), Object::EndpointSlice(slice)] = &objects[..] else {
            panic!("{objects:?}")
        };
        assert_eq!(web.ports[0].node_port, Some(30080));
        assert_eq!(slice.service.as_deref(), Some("web"));
        assert_eq!(slice.ports[0].port, 8080);
    }

    #[test]
    fn services_are_skipped_unread_when_not_used() {
        let broken = format!(
            "{SERVICES}---\nkind: Service\nmetadata: {{name: bad, namespace: demo}}\nspec: {{clusterIP: not-an-ip}}\n"
        );
        let (objects, _) = parse_documents_of(&broken, &Kind::WITHOUT_SERVICES).unwrap();
        assert!(objects.is_empty(), "{objects:?}");
        let (doc, message) = parse_documents(&broken).unwrap_err();
        assert_eq!(doc, 3);
        assert_eq!(
            message,
            "Service demo/bad: spec.clusterIP: \"not-an-ip\" is not an IP address"
        );
    }

    #[test]
    fn a_malformed_service_or_slice_makes_its_file_invalid() {
        for (text, doc, expected) in [
            (
                "kind: Service\nmetadata: {name: s}\n",
                1,
                "Service s has no metadata.namespace",
            ),
            (
                "kind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: http}]}\n",
                1,
                "invalid Service",
            ),
            (
                "kind: Namespace\nmetadata: {name: a}\n---\nkind: EndpointSlice\nmetadata: {name: e, namespace: a}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.256]}]\n",
                2,
                "EndpointSlice a/e: endpoints[0].addresses[0]",
            ),
            (
                "kind: EndpointSlice\nmetadata: {name: e, namespace: a}\nendpoints: []\n",
                1,
                "EndpointSlice a/e: addressType: \"\" is not IPv4",
            ),
        ] {
            let (n, message) = parse_documents(text).unwrap_err();
            assert_eq!(n, doc, "{text}");
            assert!(message.contains(expected), "{text}: {message}");
        }
    }
}
