//! The error a rejected NetworkPolicy is logged with, captured from `tracing`.
//!
//! A test binary of its own: tracing caches per call site whether anyone listens, and a
//! subscriber scoped to one test can miss events when other tests, on other threads, reach the
//! same call site first.

use std::{
    io,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use myelin_cluster::{Change, ClusterIndex, Kind, Object};

/// The policy `ns/p`: app=db pods take TCP `port` from app=api pods.
fn db_policy(port: u32) -> Object {
    let yaml = format!(
        "kind: NetworkPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: api}}}}}}], ports: [{{port: {port}}}]}}]"
    );
    let np: NetworkPolicy = serde_yaml::from_str(&yaml).unwrap();
    Object::from_network_policy(&np).unwrap()
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_rejection_is_logged_once_as_an_error_naming_the_policy_and_the_field() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut index = ClusterIndex::default();
        index.apply(Change::Apply(db_policy(80)));
        // Rejected, then handed again: by the watch, a relist, a directory rescan.
        index.apply(Change::Apply(db_policy(70000)));
        index.apply(Change::Apply(db_policy(70000)));
        index.apply(Change::Replace {
            kind: Kind::NetworkPolicy,
            objects: vec![db_policy(70000)],
        });
        index.apply(Change::Apply(db_policy(80)));
    });
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains(
            "NetworkPolicy ns/p rejected: spec.ingress[0].ports[0].port: 70000 is outside \
             1-65535; last good version in force"
        ),
        "{log}"
    );
    assert!(log.contains("NetworkPolicy ns/p is valid again"), "{log}");
}
