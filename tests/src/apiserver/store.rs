//! The test API server's storage, as etcd plus the watch cache behave for a client: one global
//! resourceVersion counter, objects per resource, a bounded window of past events that watches
//! resume from (older resourceVersions are `410 Gone`), and snapshots behind paginated lists.

use std::{
    collections::{BTreeMap, VecDeque},
    ops::Bound,
    sync::Arc,
};

use serde_json::{Value, json};

use super::Resource;

/// (namespace, name); the namespace is empty for cluster-scoped resources.
pub(super) type ObjectKey = (String, String);
/// Objects as the JSON they are served as, so lists and watches only copy bytes.
type Objects = BTreeMap<ObjectKey, Arc<str>>;

/// Paginated lists in progress whose continue tokens still work; older ones get `410 Gone`,
/// as continue tokens expire on a real server.
const MAX_LIST_SNAPSHOTS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ListError {
    /// A continue token from a list whose snapshot is gone (compacted or evicted).
    Expired,
    /// Not a token this server issued.
    InvalidContinue,
}

/// A watch asked for (or fell behind to) a resourceVersion whose following events are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

impl TooOld {
    /// The watch `ERROR` event the real API server sends, a `Status` with code 410.
    pub fn event_line(&self) -> String {
        let status = status_object(
            410,
            "Expired",
            &format!(
                "too old resource version: {} ({})",
                self.requested, self.oldest
            ),
        );
        format!("{{\"type\":\"ERROR\",\"object\":{status}}}\n")
    }
}

/// A `meta.k8s.io/v1` Status, the body of every API error.
pub(super) fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

struct HistoryEvent {
    rv: u64,
    resource: Resource,
    /// The watch event, newline-terminated, ready to send.
    line: Arc<str>,
}

struct ListSnapshot {
    resource: Resource,
    rv: u64,
    objects: Arc<Objects>,
}

pub(super) struct Store {
    rv: u64,
    objects: BTreeMap<Resource, Arc<Objects>>,
    uids: BTreeMap<(Resource, ObjectKey), String>,
    next_uid: u64,
    history: VecDeque<HistoryEvent>,
    history_limit: usize,
    /// Watches may resume from this resourceVersion or later: every event after it is kept.
    oldest_watchable: u64,
    snapshots: VecDeque<ListSnapshot>,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 0,
            objects: BTreeMap::new(),
            uids: BTreeMap::new(),
            next_uid: 1,
            history: VecDeque::new(),
            history_limit,
            oldest_watchable: 0,
            snapshots: VecDeque::new(),
        }
    }

    /// Creates or replaces an object (its key is already validated); returns its new
    /// resourceVersion. Like the real server, it sets `metadata.resourceVersion` and keeps the
    /// object's `metadata.uid` across updates.
    pub fn put(&mut self, resource: Resource, key: ObjectKey, mut object: Value) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        let uid_key = (resource, key.clone());
        let uid = match self.uids.get(&uid_key) {
            Some(uid) => uid.clone(),
            None => {
                let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
                self.next_uid += 1;
                self.uids.insert(uid_key, uid.clone());
                uid
            }
        };
        object["metadata"]["resourceVersion"] = Value::from(rv.to_string());
        object["metadata"]["uid"] = Value::from(uid);
        let text: Arc<str> = object.to_string().into();
        let previous =
            Arc::make_mut(self.objects.entry(resource).or_default()).insert(key, Arc::clone(&text));
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(resource, kind, &text);
        rv
    }

    /// Deletes an object; the `DELETED` event carries its last state at the deletion's
    /// resourceVersion, as the real server sends it. `None` when it does not exist.
    pub fn delete(&mut self, resource: Resource, key: &ObjectKey) -> Option<u64> {
        let removed = Arc::make_mut(self.objects.get_mut(&resource)?).remove(key)?;
        self.uids.remove(&(resource, key.clone()));
        self.rv += 1;
        let mut object: Value = serde_json::from_str(&removed).unwrap_or(Value::Null);
        object["metadata"]["resourceVersion"] = Value::from(self.rv.to_string());
        self.record(resource, "DELETED", &object.to_string());
        Some(self.rv)
    }

    pub fn get(&self, resource: Resource, key: &ObjectKey) -> Option<Value> {
        let text = self.objects.get(&resource)?.get(key)?;
        serde_json::from_str(text).ok()
    }

    fn record(&mut self, resource: Resource, kind: &str, object: &str) {
        self.history.push_back(HistoryEvent {
            rv: self.rv,
            resource,
            line: format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n").into(),
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_watchable = dropped.rv;
            }
        }
    }

    /// Forgets every past event and every list snapshot, as an etcd compaction does: watches
    /// from an older resourceVersion and pending continue tokens get `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.snapshots.clear();
        self.oldest_watchable = self.rv;
    }

    /// Moves the resourceVersion on without an event and compacts: resuming from any version
    /// handed out so far is too old, so every client must list again.
    pub fn expire_all(&mut self) {
        self.rv += 1;
        self.compact();
    }

    /// The events of `resource` after `cursor`, and the resourceVersion they bring the watch
    /// to (the current one: nothing of this resource happened after them).
    pub fn events_after(
        &self,
        resource: Resource,
        cursor: u64,
    ) -> Result<(Vec<Arc<str>>, u64), TooOld> {
        if cursor < self.oldest_watchable {
            return Err(TooOld {
                requested: cursor,
                oldest: self.oldest_watchable,
            });
        }
        let start = self.history.partition_point(|e| e.rv <= cursor);
        let lines = self
            .history
            .range(start..)
            .filter(|e| e.resource == resource)
            .map(|e| Arc::clone(&e.line))
            .collect();
        Ok((lines, self.rv))
    }

    /// One page of a list, as the JSON body. Without a continue token it lists the current
    /// objects; pages after the first come from the same snapshot, like etcd's.
    pub fn list(
        &mut self,
        resource: Resource,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<String, ListError> {
        let (rv, objects, after) = match continue_token {
            None => (
                self.rv,
                self.objects.get(&resource).cloned().unwrap_or_default(),
                None,
            ),
            Some(token) => {
                let (rv, after) = decode_continue(token).ok_or(ListError::InvalidContinue)?;
                let snapshot = self
                    .snapshots
                    .iter()
                    .find(|s| s.resource == resource && s.rv == rv)
                    .ok_or(ListError::Expired)?;
                (rv, Arc::clone(&snapshot.objects), Some(after))
            }
        };
        let range = match &after {
            Some(key) => objects.range::<ObjectKey, _>((Bound::Excluded(key), Bound::Unbounded)),
            None => objects.range::<ObjectKey, _>(..),
        };
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = None;
        let mut remaining = 0usize;
        for (key, text) in range {
            if items.len() < limit {
                items.push(Arc::clone(text));
                last = Some(key);
            } else {
                remaining += 1;
            }
        }
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if remaining > 0
            && let Some(last) = last
        {
            metadata["continue"] = Value::from(encode_continue(rv, last));
            metadata["remainingItemCount"] = Value::from(remaining);
            if !self
                .snapshots
                .iter()
                .any(|s| s.resource == resource && s.rv == rv)
            {
                self.snapshots.push_back(ListSnapshot {
                    resource,
                    rv,
                    objects: Arc::clone(&objects),
                });
                if self.snapshots.len() > MAX_LIST_SNAPSHOTS {
                    self.snapshots.pop_front();
                }
            }
        } else {
            // The last page: nobody continues this list, so writes need not copy it any more.
            self.snapshots
                .retain(|s| !(s.resource == resource && s.rv == rv));
        }
        let mut body = format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{metadata},\"items\":[",
            resource.kind(),
            resource.api_version()
        );
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(item);
        }
        body.push_str("]}");
        Ok(body)
    }
}

/// Continue tokens are opaque to clients: hex of `<rv>\0<namespace>\0<name>`.
fn encode_continue(rv: u64, (namespace, name): &ObjectKey) -> String {
    format!("{rv}\0{namespace}\0{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, ObjectKey)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split('\0');
    let rv = parts.next()?.parse().ok()?;
    let namespace = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    parts.next().is_none().then_some((rv, (namespace, name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> (ObjectKey, Value) {
        (
            ("default".into(), name.into()),
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": "default"}}),
        )
    }

    fn put_pod(store: &mut Store, name: &str) -> u64 {
        let (key, object) = pod(name);
        store.put(Resource::Pod, key, object)
    }

    fn page(store: &mut Store, limit: usize, token: Option<&str>) -> Value {
        serde_json::from_str(&store.list(Resource::Pod, Some(limit), token).unwrap()).unwrap()
    }

    fn names(list: &Value) -> Vec<&str> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn writes_get_increasing_resource_versions_and_stable_uids() {
        let mut store = Store::new(100);
        assert_eq!(put_pod(&mut store, "a"), 1);
        let uid = store.get(Resource::Pod, &pod("a").0).unwrap()["metadata"]["uid"].clone();
        assert_eq!(put_pod(&mut store, "a"), 2);
        let stored = store.get(Resource::Pod, &pod("a").0).unwrap();
        assert_eq!(stored["metadata"]["resourceVersion"], "2");
        assert_eq!(stored["metadata"]["uid"], uid);
        assert_eq!(store.delete(Resource::Pod, &pod("a").0), Some(3));
        assert_eq!(store.delete(Resource::Pod, &pod("a").0), None);
        let (lines, rv) = store.events_after(Resource::Pod, 0).unwrap();
        assert_eq!(rv, 3);
        let types: Vec<String> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["type"].to_string())
            .collect();
        assert_eq!(types, ["\"ADDED\"", "\"MODIFIED\"", "\"DELETED\""]);
        let deleted: Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(deleted["object"]["metadata"]["resourceVersion"], "3");
    }

    #[test]
    fn paginated_lists_are_consistent_snapshots() {
        let mut store = Store::new(100);
        for name in ["a", "b", "c"] {
            put_pod(&mut store, name);
        }
        let first = page(&mut store, 2, None);
        assert_eq!(names(&first), ["a", "b"]);
        assert_eq!(first["metadata"]["resourceVersion"], "3");
        assert_eq!(first["metadata"]["remainingItemCount"], 1);
        let token = first["metadata"]["continue"].as_str().unwrap().to_string();
        // Changes after the first page do not show in later pages of the same list.
        put_pod(&mut store, "d");
        store.delete(Resource::Pod, &pod("c").0);
        let second = page(&mut store, 2, Some(&token));
        assert_eq!(names(&second), ["c"]);
        assert_eq!(second["metadata"]["resourceVersion"], "3");
        assert!(second["metadata"].get("continue").is_none());
        assert_eq!(names(&page(&mut store, 10, None)), ["a", "b", "d"]);
        assert_eq!(
            store.list(Resource::Pod, Some(1), Some("nothex")),
            Err(ListError::InvalidContinue)
        );
    }

    #[test]
    fn compaction_expires_old_watches_and_continue_tokens() {
        let mut store = Store::new(100);
        put_pod(&mut store, "a");
        put_pod(&mut store, "b");
        let token = page(&mut store, 1, None)["metadata"]["continue"]
            .as_str()
            .unwrap()
            .to_string();
        store.compact();
        assert_eq!(
            store.events_after(Resource::Pod, 1),
            Err(TooOld {
                requested: 1,
                oldest: 2
            })
        );
        assert_eq!(store.events_after(Resource::Pod, 2), Ok((vec![], 2)));
        store.expire_all();
        assert!(
            store.events_after(Resource::Pod, 2).is_err(),
            "even the newest is too old"
        );
        assert_eq!(store.events_after(Resource::Pod, 3), Ok((vec![], 3)));
        assert_eq!(
            store.list(Resource::Pod, Some(1), Some(&token)),
            Err(ListError::Expired)
        );
        let line = TooOld {
            requested: 1,
            oldest: 2,
        }
        .event_line();
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["type"], "ERROR");
        assert_eq!(event["object"]["code"], 410);
        assert_eq!(event["object"]["reason"], "Expired");
    }

    #[test]
    fn the_history_window_drops_the_oldest_events() {
        let mut store = Store::new(2);
        for name in ["a", "b", "c"] {
            put_pod(&mut store, name);
        }
        assert!(store.events_after(Resource::Pod, 0).is_err());
        let (lines, _) = store.events_after(Resource::Pod, 1).unwrap();
        assert_eq!(lines.len(), 2);
        // Events of other resources are kept but not sent to this watch.
        store.put(
            Resource::Namespace,
            (String::new(), "x".into()),
            json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "x"}}),
        );
        let (lines, rv) = store.events_after(Resource::Pod, 3).unwrap();
        assert!(lines.is_empty());
        assert_eq!(rv, 4);
    }
}
