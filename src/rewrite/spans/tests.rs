//! The span scanner read against serde_json, byte for byte.

use super::scan::{key_stop, string_stop};
use super::*;
use crate::rewrite::selector::JsonSelector;

/// Strings holding escapes are read as serde_json reads them: the same refusals (a raw
/// control character or the body's end after an escape, a lone surrogate) and the same
/// decoded text, with plain runs of any length between the escapes.
#[test]
fn escaped_strings_read_as_serde_json_reads_them() {
    for body in [
        r#"{"a\u0062c\"x\"\\\/\ud83d\ude00z":1}"#,
        r#"{"v":["a\nb\t\u0001 c\r\f\b", "\u003c"]}"#,
        r#"{"\u003cscript\u003e and a run longer than a word\/!":1}"#,
        r#"{"\\":1,"x\\y":2}"#,
        "{\"a\\nb\u{1}\":1}",
        r#"{"a\nb"#,
        r#"{"x\u00":1}"#,
        r#"{"\udc00":1}"#,
        r#"{"\ud800\u0041":1}"#,
        r#"{"\q":1}"#,
        // Values are checked without being decoded: the same refusals.
        r#"{"v":"ok \u003c\"\\ end \ud83d\ude00"}"#,
        r#"{"v":"\udc00"}"#,
        r#"{"v":"\ud800\u0041"}"#,
        r#"{"v":"x\u00"}"#,
        r#"{"v":"\q"}"#,
        "{\"v\":\"a\\nb\u{1}\"}",
    ] {
        let ours = SpanDoc::parse(&Bytes::from(body), Arc::default());
        let theirs = serde_json::from_str::<serde_json::Map<String, Value>>(body);
        assert_eq!(ours.is_ok(), theirs.is_ok(), "{body}");
        if let (Ok(doc), Ok(map)) = (ours, theirs) {
            let keys: Vec<&str> = doc.live_kids(0).map(|m| doc.key(m)).collect();
            let want: Vec<&str> = map.keys().map(String::as_str).collect();
            assert_eq!(keys, want, "{body}");
        }
    }
}

/// The word-at-a-time search finds what a byte-by-byte one finds, wherever the stop falls
/// in a word, with every byte value before it (high bytes included: a borrow or a high bit
/// must not make a stop of a byte that is none).
#[test]
fn string_stop_agrees_with_a_byte_search() {
    let naive = |s: &[u8]| s.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
    let naive_key = |s: &[u8]| {
        s.iter()
            .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b))
    };
    for filler in 0u8..=255 {
        for len in 0..24 {
            for stop in [
                None,
                Some(b'"'),
                Some(b'\\'),
                Some(0x00),
                Some(0x1f),
                Some(0x7f),
                Some(0x80),
                Some(0xff),
            ] {
                for at in 0..=len {
                    let mut s = vec![filler; len];
                    if let (Some(b), true) = (stop, at < len) {
                        s[at] = b;
                    }
                    assert_eq!(string_stop(&s), naive(&s), "{s:?}");
                    assert_eq!(key_stop(&s), naive_key(&s), "{s:?}");
                }
            }
        }
    }
    // Mixed bytes, stops among them, from a fixed pseudo-random sequence.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20_000 {
        let s: Vec<u8> = (0..(x % 40))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert_eq!(string_stop(&s), naive(&s), "{s:?}");
        assert_eq!(key_stop(&s), naive_key(&s), "{s:?}");
        x = x.wrapping_add(1);
    }
}

/// What a selector selected is kept only while the body is unchanged: after a removal or a
/// replacement it is looked for again (an index then names the next item; a filter sees the
/// new value).
#[test]
fn what_a_selector_found_is_forgotten_when_the_body_changes() {
    let sel = |s: &str| JsonSelector::parse(s).expect("a selector");
    let keep = |doc: &mut SpanDoc, sel: &JsonSelector| doc.locate_and_keep(sel).to_vec();
    let take = |doc: &mut SpanDoc, sel: &JsonSelector| doc.take_located(sel);
    let mut doc = SpanDoc::parse(&Bytes::from(r#"{"a":["x","y"]}"#), Arc::default()).expect("JSON");
    let (first, x) = (sel("$.a[0]"), sel("$.a[?@ == 'x']"));
    let found = keep(&mut doc, &first);
    assert_eq!(keep(&mut doc, &x), found);
    assert_eq!(keep(&mut doc, &first), found, "kept once");
    assert_eq!(take(&mut doc, &first), found, "taken");
    assert!(doc.remove(found[0]));
    assert!(take(&mut doc, &x).is_empty(), "the filter's item is gone");
    let next = keep(&mut doc, &first);
    assert_eq!(
        doc.string(next[0]).as_deref(),
        Some("y"),
        "looked for again"
    );
    assert_eq!(keep(&mut doc, &x), Vec::<NodeId>::new());
    assert!(doc.replace(next[0], "x"));
    assert_eq!(take(&mut doc, &x), next, "the filter sees the new value");
    assert_eq!(keep(&mut doc, &x), next);
    assert!(doc.replace(next[0], "z"));
    assert!(take(&mut doc, &x).is_empty());
}
