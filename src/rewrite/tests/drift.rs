//! What the pack does not know: named, and removed when asked.

use super::*;

#[test]
fn what_the_pack_does_not_know_is_named_and_removed_on_request() {
    let known_selectors = [
        json("$.batch[*].type"),
        json("$.batch[*].event"),
        json("$.batch[*].userId"),
        json("$.batch[?@.event == 'activity']"),
        json("$.sentAt"),
        Selector::Query("id".into()),
        Selector::Header(HeaderName::from_static("authorization")),
    ];
    let known = Known::new(&known_selectors);
    let body = r#"{"sentAt":"t","batch":[{"type":"identify","userId":"u","integrations":{"All":true}},{"type":"track","event":"activity","userId":"u","properties":{"posts":1}},{"type":"track","event":"foo_bar","userId":"u","properties":{"jane.doe@acme.example":1}}],"writeKey":"k"}"#;
    let headers = [
        ("authorization", "Basic x"),
        ("x-trace", "1"),
        ("user-agent", "go"),
    ];
    let want = [
        "query:nx",
        "query:*",
        "header:x-trace",
        "json:$.batch[*].integrations",
        "json:$.batch[?@.event == 'foo_bar']",
        "json:$.writeKey",
    ];
    for engine in [Engine::Spans, Engine::Tree] {
        // Named, and left as it came.
        let mut m = msg(Some("id=1&nx=2&a%40b.example=3"), &headers, body);
        let drift = Drift {
            known: &known,
            remove: false,
        };
        let edits = apply_with::<Action>(&[], &mut m, 1 << 20, engine, Some(drift)).expect("reads");
        assert_eq!(edits.unclassified, want, "{engine:?}");
        assert!(edits.removed.is_empty());
        assert_eq!(&m.body[..], body.as_bytes());
        assert_eq!(m.query.as_deref(), Some("id=1&nx=2&a%40b.example=3"));

        // Removed: the member, the event the pack does not know, the parameter, the header.
        let mut m = msg(Some("id=1&nx=2&a%40b.example=3"), &headers, body);
        let drift = Drift {
            known: &known,
            remove: true,
        };
        let edits = apply_with::<Action>(&[], &mut m, 1 << 20, engine, Some(drift)).expect("reads");
        assert_eq!(edits.unclassified, want, "{engine:?}");
        assert_eq!(edits.removed, want, "{engine:?}");
        let left: Value = serde_json::from_slice(&m.body).expect("JSON");
        assert_eq!(
            left,
            serde_json::json!({"sentAt":"t","batch":[
                {"type":"identify","userId":"u"},
                {"type":"track","event":"activity","userId":"u","properties":{"posts":1}}
            ]}),
            "{engine:?}"
        );
        assert_eq!(m.query.as_deref(), Some("id=1"));
        assert!(m.headers.get("x-trace").is_none() && m.headers.get("authorization").is_some());
    }
    // A rule's names count as known, and a request with nothing unknown names nothing.
    let rules = [rule(Action::Remove(vec![
        json("$.writeKey"),
        json("$.batch[*].integrations"),
    ]))];
    let known = Known::new(known_selectors.iter().chain(rules[0].selectors()));
    // The names the body is read with are the ones built with what the pack knows.
    assert!(known.names_all(&rules));
    assert!(!Known::new(&known_selectors).names_all(&rules));
    let mut m = msg(Some("id=1"), &headers[..1], body);
    let edits = apply_with_drift(
        &rules,
        &mut m,
        1 << 20,
        Drift {
            known: &known,
            remove: false,
        },
    )
    .expect("reads");
    assert_eq!(edits.unclassified, ["json:$.batch[?@.event == 'foo_bar']"]);
}

#[test]
fn a_thousand_unknown_events_cost_a_count_not_a_thousand_names() {
    let known_selectors = [json("$.batch[*].type"), json("$.batch[*].event")];
    let known = Known::new(&known_selectors);
    let events: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"type":"track","event":"e{}","properties":{{"n":{i}}}}}"#,
                i % 100
            )
        })
        .collect();
    let body = format!(r#"{{"batch":[{}]}}"#, events.join(","));
    for engine in [Engine::Spans, Engine::Tree] {
        for remove in [false, true] {
            let mut m = msg(None, &[], &body);
            let drift = Drift {
                known: &known,
                remove,
            };
            let edits =
                apply_with::<Action>(&[], &mut m, 1 << 20, engine, Some(drift)).expect("reads");
            // 16 names of the first 64 events found, and the count of the others.
            assert_eq!(edits.unclassified.len(), 17, "{engine:?}");
            assert_eq!(edits.unclassified[0], "json:$.batch[?@.event == 'e0']");
            assert_eq!(edits.unclassified[16], "(984 more)", "{engine:?}");
            let left: Value = serde_json::from_slice(&m.body).expect("JSON");
            let n = left["batch"].as_array().expect("batch").len();
            assert_eq!(n, if remove { 0 } else { 1000 }, "{engine:?}");
        }
    }
}

#[test]
fn a_body_the_pack_reads_no_member_of_is_checked_too() {
    // A pack that knows parameters only: the fields of a form are parameters; any other body
    // cannot be told apart, and is unclassified whole.
    let known_selectors = [Selector::Query("id".into())];
    let known = Known::new(&known_selectors);
    let multipart_type = ("content-type", "multipart/form-data; boundary=B0undary");
    let urlencoded = ("content-type", "application/x-www-form-urlencoded");
    let text = ("content-type", "text/plain");
    /// (body, its Content-Type, the names, what is left with `remove`)
    type Case<'a> = (&'a str, (&'a str, &'a str), &'a [&'a str], &'a str);
    let cases: [Case; 3] = [
        (
            &multipart(&[("id", "1"), ("note", "jane.doe@acme.example")]),
            multipart_type,
            &["form:note"],
            &multipart(&[("id", "1")]),
        ),
        ("id=1&note=x", urlencoded, &["form:note"], "id=1"),
        ("jane.doe@acme.example", text, &["body:*"], ""),
    ];
    for (body, content_type, want, left) in cases {
        for remove in [false, true] {
            let mut m = msg(None, &[content_type], body);
            let drift = Drift {
                known: &known,
                remove,
            };
            let edits = apply_with_drift::<Action>(&[], &mut m, 1 << 20, drift).expect("reads");
            assert_eq!(edits.unclassified, want, "{body:?}");
            let expected = if remove { left } else { body };
            assert_eq!(&m.body[..], expected.as_bytes(), "{body:?} remove={remove}");
            if remove {
                assert_eq!(edits.removed, want);
                assert_eq!(
                    m.headers[CONTENT_LENGTH],
                    expected.len().to_string().as_str()
                );
            }
        }
    }
    // An empty body carries nothing.
    let mut m = msg(None, &[text], "");
    let drift = Drift {
        known: &known,
        remove: false,
    };
    let edits = apply_with_drift::<Action>(&[], &mut m, 1 << 20, drift).expect("reads");
    assert!(edits.unclassified.is_empty());
}
