//! Sentry envelopes: read part by part, framed again, refused when a part cannot be read.

use super::*;

/// Split an envelope as Relay reads it: each item's header, and its payload framed by `length`.
fn envelope_items(body: &[u8]) -> (Value, Vec<(Value, Vec<u8>)>) {
    let mut lines = body.splitn(2, |b| *b == b'\n');
    let header = serde_json::from_slice(lines.next().expect("header")).expect("header JSON");
    let mut rest = lines.next().unwrap_or_default();
    let mut items = Vec::new();
    while !rest.is_empty() {
        let nl = rest
            .iter()
            .position(|b| *b == b'\n')
            .expect("item header line");
        let item: Value = serde_json::from_slice(&rest[..nl]).expect("item header JSON");
        let len = item["length"].as_u64().expect("length") as usize;
        let payload = rest[nl + 1..nl + 1 + len].to_vec();
        rest = &rest[nl + 1 + len..];
        rest = rest.strip_prefix(b"\n").unwrap_or(rest);
        items.push((item, payload));
    }
    (header, items)
}

const ENVELOPE: &str = "application/x-sentry-envelope";

#[test]
fn sentry_envelopes_are_read_item_by_item_and_framed_again() {
    let sent = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mattermost/sentry_envelope.txt"
    ))
    .expect("fixture");
    let rules = [rule(Action::Remove(vec![
        json("$.server_name"),
        json("$.request.url"),
        json("$.modules"),
        json("$.trace.release"),
    ]))];
    for engine in [Engine::Spans, Engine::Tree] {
        let mut m = msg(
            None,
            &[("content-type", ENVELOPE)],
            std::str::from_utf8(&sent).expect("utf-8"),
        );
        let edits = apply_with(&rules, &mut m, 1 << 20, engine, None).expect("applies");
        assert_eq!(
            edits.removed,
            [
                "envelope.items[0]:json:$['server_name']",
                "envelope.items[0]:json:$['request']['url']",
                "envelope.items[0]:json:$['modules']",
                "envelope.header:json:$['trace']['release']",
            ],
            "{engine:?}"
        );
        let (header, items) = envelope_items(&m.body);
        assert!(header["trace"].get("release").is_none() && header["dsn"].is_string());
        let (item, payload) = &items[0];
        assert_eq!(item["type"], "event");
        let event: Value = serde_json::from_slice(payload).expect("event JSON");
        for gone in ["server_name", "modules"] {
            assert!(event.get(gone).is_none(), "{gone} ({engine:?})");
        }
        assert_eq!(event["request"], serde_json::json!({"method": "GET"}));
        assert_eq!(event["level"], "fatal");
        assert!(m.body.ends_with(b"}\n"), "the trailing newline is kept");
        assert_eq!(m.headers[CONTENT_LENGTH], m.body.len().to_string().as_str());
    }

    // Nothing to remove: the envelope leaves byte for byte.
    let mut m = msg(
        None,
        &[("content-type", ENVELOPE)],
        std::str::from_utf8(&sent).expect("utf-8"),
    );
    let edits = apply(
        &[rule(Action::Remove(vec![json("$.absent")]))],
        &mut m,
        1 << 20,
    )
    .expect("applies");
    assert!(edits.removed.is_empty());
    assert_eq!(&m.body[..], &sent[..]);
}

#[test]
fn envelopes_the_rules_cannot_read_item_by_item_are_refused() {
    let r = rule(Action::Remove(vec![json("$.server_name")]));
    let head = r#"{"event_id":"e1"}"#;
    let cases = [
        // A payload framed by its newline, without `length`: read, rewritten, still framed.
        (
            format!("{head}\n{{\"type\":\"event\"}}\n{{\"server_name\":\"h\",\"a\":1}}\n"),
            Ok(format!("{head}\n{{\"type\":\"event\"}}\n{{\"a\":1}}\n")),
        ),
        // An attachment is bytes, not JSON: the report is refused whole.
        (
            format!("{head}\n{{\"type\":\"attachment\",\"length\":3}}\nabc\n"),
            Err(RewriteError::EnvelopeItem),
        ),
        // A length past the end, bytes after a framed payload, a repeated `length`.
        (
            format!("{head}\n{{\"type\":\"event\",\"length\":99}}\n{{}}\n"),
            Err(RewriteError::NotEnvelope),
        ),
        (
            format!("{head}\n{{\"type\":\"event\",\"length\":2}}\n{{}}x\n"),
            Err(RewriteError::NotEnvelope),
        ),
        (
            format!("{head}\n{{\"type\":\"event\",\"length\":2,\"length\":3}}\n{{}}\n"),
            Err(RewriteError::NotEnvelope),
        ),
        // An item header with nothing after it.
        (
            format!("{head}\n{{\"type\":\"event\"}}"),
            Err(RewriteError::NotEnvelope),
        ),
        // A payload that is not JSON, or binds `server_name` twice.
        (
            format!("{head}\n{{\"type\":\"event\",\"length\":3}}\nabc\n"),
            Err(RewriteError::NotJson),
        ),
        (
            format!("{head}\n{{\"type\":\"event\"}}\n{{\"server_name\":1,\"Server_Name\":2}}\n"),
            Err(RewriteError::DuplicateKey),
        ),
    ];
    for engine in [Engine::Spans, Engine::Tree] {
        for (body, want) in &cases {
            let mut m = msg(None, &[("content-type", ENVELOPE)], body);
            let got = apply_with(&[&r], &mut m, 1 << 20, engine, None)
                .map(|_| String::from_utf8(m.body.to_vec()).expect("utf-8"));
            assert_eq!(&got, want, "{body:?} ({engine:?})");
        }
    }
    // Without the envelope's Content-Type, the same bytes are not one JSON document: refused.
    let body = format!("{head}\n{{\"type\":\"event\"}}\n{{\"server_name\":\"h\"}}\n");
    let mut m = msg(None, &[], &body);
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Err(RewriteError::NotJson));
}
