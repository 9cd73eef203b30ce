//! The rewriter's tables: every selector kind, both JSON engines, codings and the receivers' readings.

use http::{HeaderName, HeaderValue};
use serde_json::Value;

use super::keys::render_into;
use super::*;

fn json(s: &str) -> Selector {
    Selector::Json(JsonSelector::parse(s).expect("valid selector"))
}

fn rule(action: Action) -> Action {
    action
}

fn msg(query: Option<&str>, headers: &[(&str, &str)], body: &str) -> Message {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    Message {
        query: query.map(str::to_string),
        headers: map,
        body: Bytes::from(body.to_string()),
    }
}

#[test]
fn query_removal_keeps_other_bytes() {
    let cases = [
        (
            "auc=58&b=10.5.2&id=x&tc=4&uc=212&ut=0",
            vec!["uc", "auc", "tc"],
            Some("b=10.5.2&id=x&ut=0"),
        ),
        ("a%20b=1&c=%2F", vec!["a b"], Some("c=%2F")),
        ("uc=1", vec!["uc"], None),
        ("u%63=1&x", vec!["uc"], Some("x")),
        ("x=1&&y=2", vec!["y"], Some("x=1&")),
        // What a lenient receiver reads as the name: `;` pairs, case, `+`, percent-escapes.
        ("a=1;uc=2;b=3", vec!["uc"], Some("a=1;b=3")),
        ("uc=2;a=1&b=3", vec!["uc"], Some("a=1&b=3")),
        ("UC=1&Uc=2&u%43=3&a=1", vec!["uc"], Some("a=1")),
        ("a+b=1&a%20b=2&c=3", vec!["a b"], Some("c=3")),
        ("uc&uc=&x=1", vec!["uc"], Some("x=1")),
        (
            "sender_name=x&%C5%BFender_name=y&z",
            vec!["sender_name"],
            Some("z"),
        ),
    ];
    for (query, names, want) in cases {
        let r = rule(Action::Remove(
            names
                .iter()
                .map(|n| Selector::Query(n.to_string()))
                .collect(),
        ));
        let mut m = msg(Some(query), &[], "");
        apply(&[&r], &mut m, 1 << 20).expect("applies");
        assert_eq!(m.query.as_deref(), want, "{query}");
    }
}

#[test]
fn queries_that_cannot_be_read_one_way_are_refused() {
    let r = rule(Action::Remove(vec![Selector::Query("uc".into())]));
    for query in [
        "u%6=1", "u%zz=1", "uc%=1", "=1&a=2", "a=1;=uc", "u%00c=1", "u%0Ac=1", "u%FFc=1",
    ] {
        let mut m = msg(Some(query), &[], "");
        assert_eq!(
            apply(&[&r], &mut m, 1 << 20),
            Err(RewriteError::AmbiguousQuery),
            "{query}"
        );
    }
    let mut m = msg(Some("a=%zz&b=1"), &[], "");
    assert!(
        apply(&[&r], &mut m, 1 << 20).is_ok(),
        "a bad value is the receiver's to read"
    );
}

#[test]
fn query_replace_and_keep() {
    let r = rule(Action::Replace(vec![(
        Selector::Query("id".into()),
        "a b&c".into(),
    )]));
    let mut m = msg(Some("id=secret&v=1"), &[], "");
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.query.as_deref(), Some("id=a+b%26c&v=1"));
    assert_eq!(edits.replaced, vec!["query:id"]);

    let r = rule(Action::Keep(vec![Selector::Query("v".into())]));
    let mut m = msg(Some("id=secret&v=1&z=2"), &[], "");
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.query.as_deref(), Some("v=1"));
    assert_eq!(edits.removed, vec!["keep:query(2)"]);
}

#[test]
fn allowlists_keep_only_the_exact_name_go_reads() {
    // `url.Values` is keyed by the exact decoded name: `SID` and `ſid` are other parameters.
    let r = rule(Action::Keep(vec![Selector::Query("sid".into())]));
    let mut m = msg(Some("sid=1&SID=2&%C5%BFid=3&s%69d=4"), &[], "");
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.query.as_deref(), Some("sid=1&s%69d=4"));
    assert_eq!(edits.removed, vec!["keep:query(2)"]);
}

#[test]
fn every_instance_of_a_header_is_replaced_or_removed() {
    let name = || Selector::Header(HeaderName::from_static("x-id"));
    let instances = [("x-id", "a"), ("X-Id", "secret-2"), ("accept", "*/*")];
    let r = rule(Action::Replace(vec![(name(), "none".into())]));
    let mut m = msg(None, &instances, "");
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    let left: Vec<&HeaderValue> = m.headers.get_all("x-id").iter().collect();
    assert_eq!(left, ["none"]);
    assert_eq!(edits.replaced, vec!["header:x-id"]);
    // Already the replacement, once: nothing to record.
    let mut m = msg(None, &[("x-id", "none")], "");
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Ok(Edits::default()));
    let r = rule(Action::Remove(vec![name()]));
    let mut m = msg(None, &instances, "");
    apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert!(m.headers.get("x-id").is_none());
    // A replacement that is no header value is refused, never left as the original.
    let r = rule(Action::Replace(vec![(name(), "a\nb".into())]));
    let mut m = msg(None, &instances, "");
    assert_eq!(
        apply(&[&r], &mut m, 1 << 20),
        Err(RewriteError::BadReplacement)
    );
}

#[test]
fn headers_remove_replace_keep() {
    let r = rule(Action::Remove(vec![Selector::Header(
        HeaderName::from_static("x-install-id"),
    )]));
    let mut m = msg(None, &[("X-Install-Id", "secret"), ("accept", "*/*")], "");
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert!(m.headers.get("x-install-id").is_none());
    assert_eq!(edits.removed, vec!["header:x-install-id"]);

    let r = rule(Action::Keep(vec![Selector::Header(
        HeaderName::from_static("accept"),
    )]));
    let mut m = msg(
        None,
        &[
            ("host", "h"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("accept", "*/*"),
            ("content-length", "0"),
        ],
        "",
    );
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    let left: Vec<&str> = m.headers.keys().map(|k| k.as_str()).collect();
    assert_eq!(left, vec!["host", "content-length", "accept"]);
    assert_eq!(edits.removed, vec!["keep:header(2)"]);
}

#[test]
fn json_batch_items_are_removed_by_filter() {
    let body = r#"{"batch":[{"event":"activity","n":1},{"event":"server"},{"event":"activity"}],"sentAt":"t"}"#;
    let r = rule(Action::Remove(vec![json(
        "$.batch[?@.event == 'activity']",
    )]));
    let mut m = msg(
        None,
        &[("content-length", "99"), ("transfer-encoding", "chunked")],
        body,
    );
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.body, r#"{"batch":[{"event":"server"}],"sentAt":"t"}"#);
    assert_eq!(
        edits.removed,
        vec!["json:$['batch'][0]", "json:$['batch'][2]"]
    );
    assert_eq!(
        m.headers["content-length"],
        m.body.len().to_string().as_str()
    );
    assert!(m.headers.get("transfer-encoding").is_none());
}

#[test]
fn json_replace_keeps_member_order_and_numbers() {
    let body = r#"{"ack_id":"a","message":"secret","badge":3,"big":12345678901234567890,"f":1.50}"#;
    let rules = [
        rule(Action::Replace(vec![(
            json("$.message"),
            "You've received a new message.".into(),
        )])),
        rule(Action::Remove(vec![json("$.channel_name")])),
    ];
    let refs: Vec<&Action> = rules.iter().collect();
    let mut m = msg(None, &[], body);
    let edits = apply(&refs, &mut m, 1 << 20).expect("applies");
    assert_eq!(
        m.body,
        r#"{"ack_id":"a","message":"You've received a new message.","badge":3,"big":12345678901234567890,"f":1.50}"#
    );
    assert_eq!(edits.replaced, vec!["json:$['message']"]);
    assert!(edits.removed.is_empty());
}

#[test]
fn unchanged_json_is_passed_on_as_received() {
    let body = "{\"a\":\"\\u003cb\\u003e\"}";
    let r = rule(Action::Remove(vec![json("$.missing")]));
    let mut m = msg(None, &[], body);
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.body, body);
    assert_eq!(edits, Edits::default());
}

#[test]
fn json_keep_prunes_to_the_allowlist() {
    let body = r#"{"event":"e","version":2,"props":{"a":1,"b":2},"x":[1,2]}"#;
    let r = rule(Action::Keep(vec![json("$.event"), json("$.props.a")]));
    let mut m = msg(None, &[], body);
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.body, r#"{"event":"e","props":{"a":1}}"#);
    assert_eq!(edits.removed, vec!["keep:json(3)"]);
}

#[test]
fn unreadable_bodies_fail_closed() {
    let r = rule(Action::Remove(vec![json("$.a")]));
    for (headers, body, want) in [
        (vec![], "not json", RewriteError::NotJson),
        (vec![], r#"{"a":1} trailing"#, RewriteError::NotJson),
        (vec![], r#"{"a":1,"a":2}"#, RewriteError::DuplicateKey),
        (vec![], r#"{"x":{"a":1,"a":2}}"#, RewriteError::DuplicateKey),
        (
            vec![("content-encoding", "compress")],
            r#"{"a":1}"#,
            RewriteError::Encoded,
        ),
        (
            vec![("content-encoding", "gzip")],
            r#"{"a":1}"#,
            RewriteError::BadEncoding,
        ),
        (
            vec![
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
            ],
            r#"{"a":1}"#,
            RewriteError::BadEncoding,
        ),
    ] {
        let mut m = msg(None, &headers, body);
        assert_eq!(apply(&[&r], &mut m, 1 << 20), Err(want), "{body}");
    }
    // A body a receiver would read as a form, but not one way only.
    let r = rule(Action::Remove(vec![Selector::Form("a".into())]));
    for (content_type, body, want) in [
        (
            "application/x-www-form-urlencoded",
            "a=1&b%zz=2",
            RewriteError::AmbiguousForm,
        ),
        (
            "multipart/form-data",
            "--x\r\n",
            RewriteError::AmbiguousMultipart,
        ),
        (
            "multipart/form-data; boundary=x",
            "--x\nContent-Disposition: form-data; name=\"a\"\n\n1\n--x--",
            RewriteError::AmbiguousMultipart,
        ),
    ] {
        let mut m = msg(None, &[("content-type", content_type)], body);
        assert_eq!(
            apply(&[&r], &mut m, 1 << 20),
            Err(want),
            "{content_type} {body:?}"
        );
    }
    let mut m = msg(
        None,
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("content-type", "text/plain"),
        ],
        "a=1",
    );
    assert_eq!(
        apply(&[&r], &mut m, 1 << 20),
        Err(RewriteError::AmbiguousForm)
    );
    // A body of another type is no form to Go's `ParseForm`: nothing in it is a parameter.
    let mut m = msg(None, &[("content-type", "application/json")], "a=1");
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Ok(Edits::default()));
}

/// A multipart/form-data body as Go's `mime/multipart` writer lays it out.
fn multipart(parts: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in parts {
        out.push_str(&format!(
            "--B0undary\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    out.push_str("--B0undary--\r\n");
    out
}

#[test]
fn query_and_form_are_one_namespace_as_go_reads_them() {
    // `Request.FormValue` reads the query, an urlencoded body and multipart parts together: a
    // `query:` rule reaches the body, a `form:` rule the query.
    let urlencoded = ("content-type", "application/x-www-form-urlencoded");
    let multipart_type = ("content-type", "multipart/form-data; boundary=B0undary");
    for sel in [Selector::Query("uid".into()), Selector::Form("uid".into())] {
        let r = rule(Action::Remove(vec![sel.clone()]));
        let mut m = msg(Some("uid=1&v=2"), &[urlencoded], "a=1&UID=secret");
        let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
        assert_eq!(
            (m.query.as_deref(), &m.body[..]),
            (Some("v=2"), &b"a=1"[..]),
            "{sel}"
        );
        assert_eq!(edits.removed, ["query:uid", "form:uid"], "{sel}");

        let body = multipart(&[("a", "1"), ("uid", "secret"), ("b", "2")]);
        let mut m = msg(None, &[multipart_type], &body);
        let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
        assert_eq!(m.body, multipart(&[("a", "1"), ("b", "2")]), "{sel}");
        assert_eq!(edits.removed, ["form:uid"], "{sel}");
        assert_eq!(m.headers["content-length"], m.body.len().to_string());
    }
    let r = rule(Action::Replace(vec![(
        Selector::Query("uid".into()),
        "x".into(),
    )]));
    let mut m = msg(
        None,
        &[multipart_type],
        &multipart(&[("uid", "secret"), ("b", "2")]),
    );
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.body, multipart(&[("uid", "x"), ("b", "2")]));
    assert_eq!(edits.replaced, ["form:uid"]);
    let r = rule(Action::Keep(vec![Selector::Query("b".into())]));
    let mut m = msg(
        Some("b=1&c=2"),
        &[multipart_type],
        &multipart(&[("uid", "s"), ("b", "2"), ("B", "3")]),
    );
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(
        (m.query.as_deref(), m.body.clone()),
        (Some("b=1"), Bytes::from(multipart(&[("b", "2")])))
    );
    assert_eq!(edits.removed, ["keep:query(1)", "keep:form(2)"]);
    // Untouched, a multipart body leaves byte for byte.
    let body = multipart(&[("a", "1")]);
    let mut m = msg(None, &[multipart_type], &body);
    assert_eq!(
        apply(&[&r], &mut m, 1 << 20).expect("applies").removed,
        ["keep:form(1)"]
    );
    let r = rule(Action::Remove(vec![Selector::Query("zzz".into())]));
    let mut m = msg(None, &[multipart_type], &body);
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Ok(Edits::default()));
    assert_eq!(m.body, body);
}

#[test]
fn multipart_names_read_more_than_one_way_are_refused() {
    let r = rule(Action::Remove(vec![Selector::Form("uid".into())]));
    let ct = ("content-type", "multipart/form-data; boundary=B0undary");
    for body in [
        // RFC 2231 names, extra parameters, unquoted or escaped names, two dispositions.
        "--B0undary\r\nContent-Disposition: form-data; name*=UTF-8''uid\r\n\r\nx\r\n--B0undary--\r\n",
        "--B0undary\r\nContent-Disposition: form-data; name=\"a\"; x=\"y\"\r\n\r\nx\r\n--B0undary--\r\n",
        "--B0undary\r\nContent-Disposition: form-data; name=uid\r\n\r\nx\r\n--B0undary--\r\n",
        "--B0undary\r\nContent-Disposition: form-data; name=\"u\\id\"\r\n\r\nx\r\n--B0undary--\r\n",
        "--B0undary\r\nContent-Disposition: form-data; name=\"a\"\r\nContent-Disposition: form-data; name=\"uid\"\r\n\r\nx\r\n--B0undary--\r\n",
        // Go decodes quoted-printable parts itself.
        "--B0undary\r\nContent-Disposition: form-data; name=\"a\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nx\r\n--B0undary--\r\n",
        // A preamble, transport padding, an epilogue, no close delimiter.
        "junk\r\n--B0undary\r\nContent-Disposition: form-data; name=\"uid\"\r\n\r\nx\r\n--B0undary--\r\n",
        "--B0undary \r\nContent-Disposition: form-data; name=\"uid\"\r\n\r\nx\r\n--B0undary--\r\n",
        "--B0undary\r\nContent-Disposition: form-data; name=\"uid\"\r\n\r\nx\r\n--B0undary--\r\nmore",
        "--B0undary\r\nContent-Disposition: form-data; name=\"uid\"\r\n\r\nx",
    ] {
        let mut m = msg(None, &[ct], body);
        assert_eq!(
            apply(&[&r], &mut m, 1 << 20),
            Err(RewriteError::AmbiguousMultipart),
            "{body:?}"
        );
    }
}

#[test]
fn empty_body_has_nothing_to_strip() {
    let r = rule(Action::Remove(vec![json("$.a")]));
    let mut m = msg(None, &[], "");
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Ok(Edits::default()));
    assert!(m.body.is_empty());
}

#[test]
fn form_fields() {
    let r = rule(Action::Remove(vec![Selector::Form("uid".into())]));
    let mut m = msg(
        None,
        &[(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )],
        "a=1&uid=secret&b=%20",
    );
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.body, "a=1&b=%20");
    assert_eq!(edits.removed, vec!["form:uid"]);
    assert_eq!(m.headers["content-length"], "9");
}

#[test]
fn many_matches_are_recorded_as_the_selector_and_a_count() {
    let items: Vec<String> = (0..20)
        .map(|i| format!("{{\"e\":\"a\",\"i\":{i}}}"))
        .collect();
    let body = format!("{{\"batch\":[{}]}}", items.join(","));
    let r = rule(Action::Remove(vec![json("$.batch[?@.e == 'a'].i")]));
    let mut m = msg(None, &[], &body);
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(
        edits.removed,
        vec!["json:$.batch[?@.e == 'a'].i (20 matches)"]
    );
    assert!(!String::from_utf8_lossy(&m.body).contains("\"i\""));
}

#[test]
fn duplicate_keys_are_found_in_large_objects_and_through_escapes() {
    let keys: Vec<String> = (0..40).map(|i| format!("\"k{i}\":1")).collect();
    let r = rule(Action::Remove(vec![json("$.x")]));
    let mut m = msg(None, &[], &format!("{{{},\"k39\":2}}", keys.join(",")));
    assert_eq!(
        apply(&[&r], &mut m, 1 << 20),
        Err(RewriteError::DuplicateKey)
    );
    let mut m = msg(None, &[], &format!("{{{}}}", keys.join(",")));
    assert!(apply(&[&r], &mut m, 1 << 20).is_ok());
    let mut m = msg(None, &[], r#"{"a":1,"\u0061":2}"#);
    assert_eq!(
        apply(&[&r], &mut m, 1 << 20),
        Err(RewriteError::DuplicateKey)
    );
}

#[test]
fn members_are_matched_as_go_binds_them() {
    let r = rule(Action::Remove(vec![
        json("$.channel_name"),
        json("$.sender_name"),
    ]));
    for (body, want, removed) in [
        (
            r#"{"Channel_Name":"c","a":1}"#,
            r#"{"a":1}"#,
            vec!["json:$['Channel_Name']"],
        ),
        (
            r#"{"CHANNEL_NAME":"c","\u017fender_name":"s","a":1}"#,
            r#"{"a":1}"#,
            vec!["json:$['CHANNEL_NAME']", "json:$['\u{17f}ender_name']"],
        ),
        (
            r#"{"channel_n\u0061me":"c","a":1}"#,
            r#"{"a":1}"#,
            vec!["json:$['channel_name']"],
        ),
        (r#"{"channelname":"c"}"#, r#"{"channelname":"c"}"#, vec![]),
    ] {
        let mut m = msg(None, &[], body);
        let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
        assert_eq!(m.body, want, "{body}");
        assert_eq!(edits.removed, removed, "{body}");
    }
    // In filters too: `@.event` finds `EVENT`.
    let r = rule(Action::Remove(vec![json("$.batch[?@.event == 'license']")]));
    let mut m = msg(
        None,
        &[],
        r#"{"batch":[{"EVENT":"license"},{"event":"server"}]}"#,
    );
    apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(m.body, r#"{"batch":[{"event":"server"}]}"#);
}

#[test]
fn keys_receivers_could_read_otherwise_are_refused() {
    let r = rule(Action::Remove(vec![json("$.message")]));
    for (body, want) in [
        (
            r#"{"message":"a","Message":"b"}"#,
            RewriteError::DuplicateKey,
        ),
        (
            r#"{"x":{"message":1},"MESSAGE":"b","messagE":2}"#,
            RewriteError::DuplicateKey,
        ),
        (r#"{"mess\u0000age":"a"}"#, RewriteError::BadKey),
        (r#"{"a\u001fb":"a"}"#, RewriteError::BadKey),
        (r#"{"a\u007f":"a"}"#, RewriteError::BadKey),
        // The same characters as received, unescaped: DEL, and C1's NEL.
        ("{\"a\u{7f}\":\"a\"}", RewriteError::BadKey),
        ("{\"mess\u{85}age\":\"a\"}", RewriteError::BadKey),
        (r#"{"\ud800message":"a"}"#, RewriteError::NotJson),
        ("{\"a\":1,}", RewriteError::NotJson),
        ("{\"a\":NaN}", RewriteError::NotJson),
        ("\u{feff}{\"a\":1}", RewriteError::NotJson),
    ] {
        let mut m = msg(None, &[], body);
        assert_eq!(apply(&[&r], &mut m, 1 << 20), Err(want), "{body}");
    }
    // Folding elsewhere is the receiver's business: names no rule names may differ in case.
    let mut m = msg(None, &[], r#"{"badge":1,"Badge":2,"message":"m"}"#);
    assert!(apply(&[&r], &mut m, 1 << 20).is_ok());
    let mut m = msg(None, &[], "");
    m.body = Bytes::from_static(b"{\"\xff\":1}");
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Err(RewriteError::NotJson));
}

#[test]
fn member_name_patterns_select_by_name_shape() {
    let r = rule(Action::Remove(vec![json(
        "$.batch[?@.event == 'license'].properties.feature_*",
    )]));
    let body = r#"{"batch":[{"event":"license","properties":{"id":"l","feature_ldap":true,"Feature_Future_X":false,"features":3}},{"event":"x","properties":{"feature_a":1}}]}"#;
    let mut m = msg(None, &[], body);
    let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
    assert_eq!(
        m.body,
        r#"{"batch":[{"event":"license","properties":{"id":"l","features":3}},{"event":"x","properties":{"feature_a":1}}]}"#
    );
    // The names matched are the client's text: the record holds the selector and a count.
    assert_eq!(
        edits.removed,
        ["json:$.batch[?@.event == 'license'].properties.feature_* (2 matches)"]
    );
    // A name that carries a value stays out of the record, however long.
    let secret = format!("feature_{}", "S".repeat(60 << 10));
    for engine in [Engine::Spans, Engine::Tree] {
        let body = format!(r#"{{"batch":[{{"event":"license","properties":{{"{secret}":1}}}}]}}"#);
        let mut m = msg(None, &[], &body);
        let edits = apply_with(&[&r], &mut m, 1 << 20, engine, None).expect("applies");
        assert_eq!(edits.removed.len(), 1);
        assert!(edits.removed[0].len() < 100, "{engine:?}");
        // A wildcard's matches are the client's names too.
        let w = rule(Action::Remove(vec![json("$.batch[*].properties.*")]));
        let mut m = msg(None, &[], &body);
        let edits = apply_with(&[&w], &mut m, 1 << 20, engine, None).expect("applies");
        assert_eq!(
            edits.removed,
            ["json:$.batch[*].properties.* (1 match)"],
            "{engine:?}"
        );
    }
}

#[test]
fn codings_are_undone_and_redone() {
    use super::codec::{self, Coding};
    let r = rule(Action::Remove(vec![json("$.channel_name")]));
    let plain = br#"{"channel_name":"c","a":"\u003cb\u003e"}"#;
    for (header, stack) in [
        ("gzip", vec![Coding::Gzip]),
        ("deflate", vec![Coding::Zlib]),
        ("br", vec![Coding::Brotli]),
        ("zstd", vec![Coding::Zstd]),
        ("gzip, zstd", vec![Coding::Gzip, Coding::Zstd]),
    ] {
        let mut m = msg(None, &[("content-encoding", header)], "");
        m.body = Bytes::from(codec::encode(plain, &stack));
        let edits = apply(&[&r], &mut m, 1 << 20).expect("applies");
        assert_eq!(edits.removed, vec!["json:$['channel_name']"], "{header}");
        assert_eq!(m.headers["content-encoding"], header);
        assert_eq!(
            m.headers["content-length"],
            m.body.len().to_string().as_str()
        );
        let (back, found) = codec::decode(&m.headers, &m.body, 1 << 20).expect("decodes");
        assert_eq!(found, stack);
        // Every byte no rule touched leaves as it came, Go's escapes included.
        assert_eq!(&back[..], br#"{"a":"\u003cb\u003e"}"#, "{header}");
    }
    let mut m = msg(None, &[("content-encoding", "gzip")], "");
    m.body = Bytes::from(codec::encode(&vec![b' '; 4 << 20], &[Coding::Gzip]));
    assert_eq!(apply(&[&r], &mut m, 1 << 20), Err(RewriteError::TooLarge));
}

/// The engines agree on generated batches where a selector matches many times (past the
/// 16 paths a record names), items lack the member or spell it otherwise, filters drop
/// whole items, and replacements meet values that already hold the replacement.
#[test]
fn engines_agree_on_generated_batches() {
    let rules = [
        rule(Action::Remove(vec![
            json("$.events[*].email"),
            json("$.events[*].ip"),
            json("$.events[?@.event == 'drop']"),
        ])),
        rule(Action::Replace(vec![(
            json("$.events[*].user_id"),
            "anon".into(),
        )])),
        rule(Action::Remove(vec![json("$.events[*].props.feature_*")])),
    ];
    let rules: Vec<&Action> = rules.iter().collect();
    assert_eq!(Engine::for_rules(&rules, None), Engine::Spans);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..300 {
        let mut events = Vec::new();
        for i in 0..next(40) {
            let mut members = vec![format!(
                r#""event":"{}""#,
                ["page", "drop", "x"][next(3) as usize]
            )];
            if next(4) > 0 {
                let name = ["email", "EMAIL", "e\\u006dail", "Email"][next(4) as usize];
                members.push(format!(r#""{name}":"u{i}@example.com""#));
            }
            if next(3) > 0 {
                members.push(format!(r#""ip" : "10.0.0.{i}""#));
            }
            let user = if next(5) == 0 { "anon" } else { "u1" };
            members.push(format!(r#""user_id":"{user}""#));
            members.push(format!(
                r#""props":{{"feature_a":{i},"keep":[1,2],"Feature_b":true}}"#
            ));
            let k = next(members.len() as u64) as usize;
            members.rotate_left(k);
            events.push(format!("{{{}}}", members.join(", ")));
        }
        let body = format!(
            r#"{{"batch":{round}, "events":[ {} ],"tail":"\u003c"}}"#,
            events.join(",\n")
        );
        let mut a = msg(None, &[], &body);
        let mut b = msg(None, &[], &body);
        let spans = apply_with(&rules, &mut a, 1 << 20, Engine::Spans, None);
        let tree = apply_with(&rules, &mut b, 1 << 20, Engine::Tree, None);
        assert_eq!(spans, tree, "{body}");
        if spans.is_ok() {
            let va: Value = serde_json::from_slice(&a.body).expect("span output is JSON");
            let vb: Value = serde_json::from_slice(&b.body).expect("tree output is JSON");
            assert_eq!(va, vb, "{body}");
            assert!(
                a.body.ends_with(br#""tail":"\u003c"}"#),
                "untouched bytes stay"
            );
        }
    }
}

/// The span engine and the tree engine agree: same outcome, same edits, same document (the
/// span engine keeping untouched bytes), on every fixture under every withheld category and
/// on thousands of mutated bodies (keys respelt, duplicated, nested, values changed).
#[test]
fn span_and_tree_engines_agree() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/mattermost");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "fixtures missing"
        );
        return;
    };
    let mut bodies: Vec<Vec<u8>> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    assert!(bodies.len() >= 10);
    // Deterministic mutations: respelt keys, duplicates, dropped bytes, wrapped values.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let originals = bodies.clone();
    for round in 0..400 {
        let mut b = originals[round % originals.len()].clone();
        for _ in 0..(1 + next() % 3) {
            let at = (next() as usize) % b.len().max(1);
            match next() % 6 {
                0 => b[at] = b[at].to_ascii_uppercase(),
                1 => {
                    let end = (at + (next() % 40) as usize).min(b.len());
                    let copy = b[at..end].to_vec();
                    b.splice(at..at, copy);
                }
                2 => {
                    b.remove(at);
                }
                3 => b
                    .splice(at..at, br#""M\u0065ssage":1,"#.iter().copied())
                    .for_each(drop),
                4 => b.splice(at..at, b"{\"x\":[".iter().copied()).for_each(drop),
                _ => b
                    .splice(at..at, b"\"channel_name\":\"c\",".iter().copied())
                    .for_each(drop),
            }
        }
        bodies.push(b);
    }
    // Every category push can do without (it requires server_identifier), one at a time
    // and all together.
    let categories: Vec<&str> = crate::config::CATEGORIES
        .into_iter()
        .filter(|c| *c != "server_identifier")
        .collect();
    let mut withheld_sets: Vec<Vec<&str>> = categories.iter().map(|c| vec![*c]).collect();
    withheld_sets.push(categories.clone());
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut compared = 0;
    for withheld in &withheld_sets {
        let text = format!(
            "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"granted\"\npush_notifications = \"granted\"\nwithhold = {withheld:?}\n"
        );
        let policy = crate::config::load_str("t", &text, tmp.path())
            .expect("loads")
            .policy;
        for (host, path) in [
            ("pdat.matterlytics.com", "/v1/batch"),
            ("push.mattermost.com", "/api/v1/send_push"),
        ] {
            let crate::decide::policy::Verdict::Granted { rules, feature, .. } =
                policy.decide(host, path)
            else {
                panic!("granted");
            };
            if rules.is_empty() {
                continue;
            }
            let known = feature.known.as_ref().expect("the pack knows its features");
            assert_eq!(
                Engine::for_rules(&rules, Some(known)),
                Engine::Spans,
                "the pack's rules and known names are in the span subset"
            );
            // Without the drift check, and with it naming or removing what the pack does not
            // know (the span engine then keeps what the check found for the rules).
            let drifts = [
                None,
                Some(Drift {
                    known,
                    remove: false,
                }),
                Some(Drift {
                    known,
                    remove: true,
                }),
            ];
            for (body, drift) in bodies
                .iter()
                .flat_map(|b| drifts.iter().map(move |d| (b, d)))
            {
                let mut a = msg(None, &[], "");
                a.body = Bytes::from(body.clone());
                let mut b = msg(None, &[], "");
                b.body = Bytes::from(body.clone());
                let spans = apply_with(&rules, &mut a, 1 << 20, Engine::Spans, *drift);
                let tree = apply_with(&rules, &mut b, 1 << 20, Engine::Tree, *drift);
                let shown = String::from_utf8_lossy(body);
                assert_eq!(spans, tree, "{withheld:?} {shown}");
                if spans.is_ok() {
                    let va: Value = serde_json::from_slice(&a.body).expect("span output is JSON");
                    let vb: Value = serde_json::from_slice(&b.body).expect("tree output is JSON");
                    assert_eq!(va, vb, "{withheld:?} {shown}");
                    if spans
                        .as_ref()
                        .is_ok_and(|e| e.removed.is_empty() && e.replaced.is_empty())
                    {
                        assert_eq!(a.body, body.as_slice());
                    }
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 500, "only {compared} successful comparisons");
}

#[test]
fn normalized_paths_escape_names() {
    let mut out = String::from("json:");
    render_into(
        &mut out,
        &[
            Step::Name("it's\u{1}"),
            Step::Index(2),
            Step::Index(0),
            Step::Index(1907),
        ],
    );
    assert_eq!(out, "json:$['it\\'s\\u0001'][2][0][1907]");
    // A name that needs no escape is copied whole, borrowed or owned.
    let mut out = String::new();
    render_into(&mut out, &[Step::Name(String::from("a b")), Step::Index(0)]);
    assert_eq!(out, "$['a b'][0]");
}

#[test]
fn removals_are_named_where_the_client_sent_them() {
    // Three rules, each removing items of one batch: the record names the items of the body
    // as sent, not their positions after the rules before.
    let body =
        r#"{"batch":[{"e":"a"},{"e":"b","n":[1,2,3]},{"e":"c"},{"e":"d","n":[4,5]},{"e":"b"}]}"#;
    let rules = [
        rule(Action::Remove(vec![json("$.batch[?@.e == 'b']")])),
        rule(Action::Remove(vec![json("$.batch[1]")])),
        rule(Action::Remove(vec![json("$.batch[?@.e == 'd'].n[0]")])),
        rule(Action::Replace(vec![(json("$.batch[1].e"), "x".into())])),
    ];
    for engine in [Engine::Spans, Engine::Tree] {
        let mut m = msg(None, &[], body);
        let edits = apply_with(&rules, &mut m, 1 << 20, engine, None).expect("applies");
        assert_eq!(
            edits.removed,
            [
                "json:$['batch'][1]",
                "json:$['batch'][4]",
                "json:$['batch'][2]",
                "json:$['batch'][3]['n'][0]",
            ],
            "{engine:?}"
        );
        assert_eq!(edits.replaced, ["json:$['batch'][3]['e']"], "{engine:?}");
        let left: Value = serde_json::from_slice(&m.body).expect("JSON");
        assert_eq!(
            left,
            serde_json::json!({"batch":[{"e":"a"},{"e":"x","n":[5]}]}),
            "{engine:?}"
        );
    }
    // An allowlist's removals count too: what a later rule removes is named as sent.
    let rules = [
        rule(Action::Keep(vec![json("$.batch[1]"), json("$.batch[3]")])),
        rule(Action::Remove(vec![json("$.batch[1]")])),
    ];
    let mut m = msg(None, &[], body);
    let edits = apply_with(&rules, &mut m, 1 << 20, Engine::Tree, None).expect("applies");
    assert_eq!(edits.removed, ["keep:json(3)", "json:$['batch'][3]"]);
}

mod conditions;
mod drift;
mod envelope;
