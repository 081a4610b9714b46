//! The protocol as documented is the protocol as coded: every JSON example of docs/protocol.md
//! parses with the types of `encore::protocol` and writes back to the same JSON, every request
//! and notice type has an example, every error code is in the table; and what the document
//! promises about unknown names holds on a real server.

use std::collections::BTreeSet;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use encore::protocol::{
    Answer, Done, ErrorCode, Joined, Notice, Offered, Published, Reauthed, Request, UpgradeRefusal, parse_request,
};

use super::support::start_server;

/// The lines of every ```json block.
fn json_examples(markdown: &str) -> Vec<Vec<&str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim()) {
            (None, "```json") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap_or_default()),
            (Some(block), text) if !text.is_empty() => block.push(text),
            _ => {}
        }
    }
    assert!(current.is_none(), "an unterminated ```json block");
    blocks
}

/// Parses `value` as `T` and checks that writing it back gives the same JSON: no field of the
/// example is unknown to the type, none of the type's is missing from the example.
fn round_trip<T: DeserializeOwned + Serialize>(what: &str, value: &Value) -> T {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{what}: {e}: {value}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, value, "{what} does not write back as documented");
    typed
}

#[test]
fn every_example_in_the_protocol_document_parses_with_the_protocol_types() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let mut requests = BTreeSet::new();
    let mut notices = BTreeSet::new();
    let mut examples = 0;
    for block in json_examples(&doc) {
        let mut asked: Option<(Value, Request)> = None;
        for line in block {
            examples += 1;
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {e}: {line}"));
            if value.get("error").is_some() && value.get("type").is_none() && value.get("ok").is_none() {
                let _: UpgradeRefusal = round_trip("an upgrade refusal", &value);
            } else if value.get("ok").is_some() {
                let answer: Answer = round_trip("an answer", &value);
                let Some(data) = answer.data.clone() else { continue };
                // The answer's data is the type its request promises.
                let Some((id, request)) = asked.take().filter(|(id, _)| Some(id) == value.get("id")) else {
                    panic!("an answer with data follows its request: {line}")
                };
                let _ = id;
                match request {
                    Request::Join { .. } => drop(round_trip::<Joined>("join's data", &data)),
                    Request::Publish { .. } => drop(round_trip::<Published>("publish's data", &data)),
                    Request::Listen { .. } => drop(round_trip::<Offered>("listen's data", &data)),
                    Request::Reauth { .. } => drop(round_trip::<Reauthed>("reauth's data", &data)),
                    other => drop(round_trip::<Done>(other.kind(), &data)),
                }
            } else if value.get("id").is_some() {
                let (_, request) = parse_request(line).unwrap_or_else(|e| panic!("{}: {line}", e.message));
                let mut back = serde_json::to_value(&request).unwrap();
                back["id"] = value["id"].clone();
                assert_eq!(back, value, "the request does not write back as documented");
                requests.insert(request.kind());
                asked = Some((value["id"].clone(), request));
            } else {
                let notice: Notice = round_trip("a notice", &value);
                notices.insert(notice.kind());
            }
        }
    }
    assert!(examples > 40, "only {examples} examples found");
    let missing: Vec<_> = Request::KINDS.iter().filter(|kind| !requests.contains(*kind)).collect();
    assert!(missing.is_empty(), "requests without an example in docs/protocol.md: {missing:?}");
    let missing: Vec<_> = Notice::KINDS.iter().filter(|kind| !notices.contains(*kind)).collect();
    assert!(missing.is_empty(), "notices without an example in docs/protocol.md: {missing:?}");
    for code in [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::BadRequest,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::TransportFailed,
        ErrorCode::Redirect,
    ] {
        assert!(doc.contains(&format!("| `{code}` |")), "error code {code} is not in the table");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderating_a_peer_that_is_not_there_is_not_found() {
    let server = start_server("protocol-moderation", |_| {}, None).await;
    let mod_ = server.client("mo", "moderator").await;
    mod_.join("mods", "mo").await.unwrap();
    let sam = server.client("sam", "speaker").await;
    sam.join("mods", "sam").await.unwrap();
    for request in [Request::MutePeer { peer: "ghost".into() }, Request::RemovePeer { peer: "ghost".into() }] {
        let refused = mod_.request::<Done>(request).await.unwrap_err();
        assert_eq!(refused.refusal(), Some(ErrorCode::NotFound), "{refused}");
    }
    // A peer that is there is muted, and told so.
    mod_.request::<Done>(Request::MutePeer { peer: "sam".into() }).await.unwrap();
    let told = loop {
        match sam.notification(std::time::Duration::from_secs(5)).await.expect("sam is told") {
            Notice::Muted { by } => break by,
            _ => continue,
        }
    };
    assert_eq!(told, "mo");
    // A listener may not moderate, whoever it names.
    let lea = server.client("lea", "listener").await;
    lea.join("mods", "lea").await.unwrap();
    let refused = lea.request::<Done>(Request::RemovePeer { peer: "ghost".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");
    server.server.shutdown().await;
}
