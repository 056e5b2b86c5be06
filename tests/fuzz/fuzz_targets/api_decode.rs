//! The agent's API seen from both ends. The first byte picks the surface ('0'..'5' in the
//! seeds, any byte modulo 6 for the fuzzer):
//!
//! 0. request bodies the agent decodes (`POST /v1/ipam`, `PUT /v1/endpoints`, `POST /v1/gc`);
//! 1. the attachment query string (`?containerId=..&ifname=..`) as the agent decodes it;
//! 2. the client's decoding of an HTTP answer into each answer type;
//! 3. the client's reading of the event stream;
//! 4. the records of the DEL queue (`pending-deletes/*.json`);
//! 5. structured: attachments through the client's query encoding and the DEL queue's records
//!    and names, which must come back as they went in.
#![no_main]

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use myelin_api::{
    AllocateRequest, Allocation, AttachmentId, AttachmentQuery, ClientError, DeleteResponse,
    DropCount, Endpoint, EndpointRequest, GcRequest, GcResponse, Mac, PolicyStatus,
    ReleaseResponse, Status, TrackedFlow, decode_response, pending, read_events,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&surface, rest)) = data.split_first() else {
        return;
    };
    match surface % 6 {
        0 => request_bodies(rest),
        1 => query(rest),
        2 => answers(rest),
        3 => events(rest),
        4 => queue_record(rest),
        _ => {
            let pairs = <[(String, String); 2]>::arbitrary_take_rest(Unstructured::new(rest));
            if let Ok(pairs) = pairs {
                round_trips(
                    &pairs.map(|(container_id, ifname)| AttachmentId::new(container_id, ifname)),
                );
            }
        }
    }
});

/// A body the agent accepts, encoded again, decodes to the same request.
fn request_bodies(body: &[u8]) {
    round_trip::<AllocateRequest>(body);
    round_trip::<GcRequest>(body);
    if round_trip::<EndpointRequest>(body) {
        // MACs are read from their own spelling only (any case).
        let json: Value = serde_json::from_slice(body).expect("decoded once");
        for key in ["mac", "hostMac"] {
            let text = json[key].as_str().expect("a MAC is a string");
            let mac: Mac = text.parse().expect("decoded once");
            assert!(
                mac.to_string().eq_ignore_ascii_case(text),
                "{text:?} read as {mac}"
            );
        }
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<T>(body) else {
        return false;
    };
    let encoded = serde_json::to_vec(&value).expect("API types encode");
    let again: T = serde_json::from_slice(&encoded).expect("what we encode decodes");
    assert_eq!(again, value);
    true
}

/// As the agent's routes read it: axum's `Query` is serde_urlencoded over the raw query.
fn query(raw: &[u8]) {
    let Ok(query) = serde_urlencoded::from_bytes::<AttachmentQuery>(raw) else {
        return;
    };
    let both = query.container_id.is_some() && query.ifname.is_some();
    let neither = query.container_id.is_none() && query.ifname.is_none();
    match query.clone().optional() {
        Ok(Some(id)) => {
            assert!(both);
            // The client's encoding of what the agent read names the same attachment.
            assert_eq!(decode_query(&id.to_query()), Some(id));
        }
        Ok(None) => assert!(neither),
        Err(_) => assert!(!both && !neither),
    }
    assert_eq!(query.required().is_ok(), both);
}

fn decode_query(query: &str) -> Option<AttachmentId> {
    serde_urlencoded::from_str::<AttachmentQuery>(query)
        .expect("the client's queries decode")
        .optional()
        .expect("the client gives both keys")
}

/// Every answer type the client (the plugin, myelinctl) decodes.
fn answers(raw: &[u8]) {
    answer::<Allocation>(raw);
    answer::<ReleaseResponse>(raw);
    answer::<Endpoint>(raw);
    answer::<Vec<Endpoint>>(raw);
    answer::<DeleteResponse>(raw);
    answer::<GcResponse>(raw);
    answer::<Status>(raw);
    answer::<PolicyStatus>(raw);
    answer::<Vec<DropCount>>(raw);
    answer::<Vec<TrackedFlow>>(raw);
}

fn answer<T: DeserializeOwned>(raw: &[u8]) {
    match decode_response::<T>(raw, "/v1/fuzz") {
        Ok(_) | Err(ClientError::Protocol(_)) => {}
        // Only an answer outside 2xx carries the agent's error.
        Err(ClientError::Api { status, .. }) => assert!(!(200..300).contains(&status)),
        Err(other) => panic!("decoding bytes cannot fail with {other:?}"),
    }
}

fn events(raw: &[u8]) {
    let mut seen = 0usize;
    let _ = read_events(raw, |event| {
        // `myelinctl monitor` prints every event.
        let _ = event.to_string();
        seen += 1;
        seen < 1000
    });
}

fn queue_record(record: &[u8]) {
    if let Ok(id) = pending::decode(record) {
        round_trips(&[id.clone(), id]);
    }
}

/// What the client and the plugin write, the agent reads back unchanged; distinct attachments
/// never share a DEL-queue record.
fn round_trips([a, b]: &[AttachmentId; 2]) {
    for id in [a, b] {
        assert_eq!(decode_query(&id.to_query()).as_ref(), Some(id));
        let record = serde_json::to_vec(id).expect("ids encode");
        assert_eq!(pending::decode(&record).as_ref(), Ok(id));
    }
    let dir = Path::new("/run/myelin/pending-deletes");
    let (path_a, path_b) = (pending::path_of(dir, a), pending::path_of(dir, b));
    assert_eq!(path_a.parent(), Some(dir));
    assert_eq!(path_a == path_b, a == b, "{a:?} and {b:?} share {path_a:?}");
}
