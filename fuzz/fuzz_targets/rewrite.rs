//! The rewriter against the Mattermost pack: arbitrary paths, queries, headers, codings and
//! bodies (JSON, urlencoded and multipart/form-data among them) on every feature host, under
//! arbitrary withheld categories. No panic; a path that normalizes is in normal form and
//! normalizes to itself once encoded; and when a rewrite reports success, no forbidden selector
//! survives it: applying the same rules to what would leave finds nothing more to remove or
//! replace, and no query pair a lenient receiver reads is one a rule removes.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

use consent_proxy::config::CATEGORIES;
use consent_proxy::decide::path::{self, PathError};
use consent_proxy::decide::policy::{Policy, Verdict};
use consent_proxy::rewrite::codec::{self, Coding};
use consent_proxy::rewrite::fold::fold;
use consent_proxy::rewrite::selector::{Action, Selector};
use consent_proxy::rewrite::{self, Message};


const TARGETS: [(&str, &str); 4] = [
    ("securityupdatecheck.mattermost.com", "/security"),
    ("pdat.matterlytics.com", "/v1/batch"),
    ("push.mattermost.com", "/api/v1/send_push"),
    ("push.mattermost.com", "/api/v1/ack"),
];

#[derive(Arbitrary, Debug)]
struct Input {
    target: u8,
    /// The request path instead of the target's (its method: `OPTIONS` when odd, else `POST`).
    path: Option<String>,
    method: u8,
    withheld: u16,
    query: Option<String>,
    headers: Vec<(String, String)>,
    codings: Vec<u8>,
    /// A real request body to start from (or none: `body` alone), and edits to it, so the
    /// fuzzer works near valid JSON instead of rediscovering its grammar.
    base: u8,
    edits: Vec<(u16, bool, Vec<u8>)>,
    body: Vec<u8>,
}

/// The `Content-Type` of the bases that are forms (the rest are JSON, sent without one).
const FORM_TYPES: [(usize, &str); 2] = [
    (4, "multipart/form-data; boundary=B0undary"),
    (5, "application/x-www-form-urlencoded"),
];

/// Bodies of the Mattermost fixtures, key spellings Go would bind to the pack's names, and the
/// security check's parameters as a multipart and an urlencoded form.
const BASES: [&[u8]; 6] = [
    include_bytes!("../../../shared/fixtures/mattermost/push_full.json"),
    include_bytes!("../../../shared/fixtures/mattermost/push_generic_no_channel.json"),
    br#"{"batch":[{"event":"license","userId":"u","properties":{"feature_ldap":true,"Feature_X":1}},{"EVENT":"activity","anonymousId":"a"},{"event":"server","properties":{}}],"sentAt":"t"}"#,
    br#"{"Message":"m","CHANNEL_NAME":"c","\u017fender_name":"s","override_username":"o","server_id":"s","ack_id":"a"}"#,
    b"--B0undary\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\nx\r\n--B0undary\r\nContent-Disposition: form-data; name=\"UC\"\r\n\r\n3\r\n--B0undary\r\nContent-Disposition: form-data; name=\"tc\"; filename=\"t\"\r\nContent-Type: text/plain\r\n\r\n9\r\n--B0undary--\r\n",
    b"id=x&uc=1;auc=2&t%63=3&b=1",
];

/// The body to send: a base with the edits (insert, or overwrite, at a position), or `body`.
fn body_of(input: &Input) -> Vec<u8> {
    let Some(base) = BASES.get(usize::from(input.base)) else {
        return input.body.clone();
    };
    let mut body = base.to_vec();
    for (at, overwrite, bytes) in input.edits.iter().take(8) {
        let at = usize::from(*at) % (body.len() + 1);
        if *overwrite {
            let end = (at + bytes.len()).min(body.len());
            body.splice(at..end, bytes.iter().copied());
        } else {
            body.splice(at..at, bytes.iter().copied());
        }
    }
    body
}

fn policies() -> &'static Vec<Policy> {
    static POLICIES: OnceLock<Vec<Policy>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        // Every feature granted, under a spread of withheld subsets: none, every category but
        // server_identifier (push needs it), and every 7th subset between (those withholding
        // server_identifier do not load while push is granted).
        let dir = std::env::temp_dir();
        let all_but_id = (1u16 << CATEGORIES.len()) - 2;
        (0..1u16 << CATEGORIES.len())
            .step_by(7)
            .chain([0, all_but_id])
            .filter_map(|bits| {
                let withheld: Vec<String> = CATEGORIES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, c)| format!("{c:?}"))
                    .collect();
                let text = format!(
                    "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"granted\"\npush_notifications = \"granted\"\nwithhold = [{}]\n",
                    withheld.join(", ")
                );
                consent_proxy::config::load_str("fuzz", &text, &dir)
                    .map(|c| c.policy)
                    .ok()
            })
            .collect()
    })
}

fuzz_target!(|input: Input| {
    let all = policies();
    let policy = &all[usize::from(input.withheld) % all.len()];
    let (host, target_path) = TARGETS[usize::from(input.target) % TARGETS.len()];
    let method = if input.method % 2 == 1 {
        http::Method::OPTIONS
    } else {
        http::Method::POST
    };
    let raw_path = input.path.as_deref().unwrap_or(target_path);
    let normalized = match path::normalize(&method, raw_path) {
        Ok(p) => p,
        Err(PathError::Asterisk(_)) => {
            assert_eq!(raw_path, "*");
            return;
        }
        Err(PathError::Ambiguous(_)) => return,
    };
    // Normal form: rooted, no empty, `.` or `..` segment (but a trailing slash), no `;`; and
    // what leaves, read again, is the same path.
    assert!(normalized.starts_with('/'), "{normalized:?}");
    let segments: Vec<&str> = normalized[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        assert!(!matches!(*seg, "." | ".."), "{normalized:?}");
        assert!(!seg.is_empty() || i + 1 == segments.len(), "{normalized:?}");
    }
    let encoded = path::encode(&normalized);
    assert_eq!(
        path::normalize(&method, &encoded).as_deref(),
        Ok(&*normalized),
        "{raw_path:?} leaves as {encoded:?}"
    );
    let Verdict::Granted { rules, .. } = policy.decide(host, &normalized) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &input.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            headers.append(k, v);
        }
    }
    // Encode the body with the chosen codings, as a client would send it.
    let codings: Vec<Coding> = input
        .codings
        .iter()
        .take(3)
        .map(|c| match c % 5 {
            0 => Coding::Gzip,
            1 => Coding::Zlib,
            2 => Coding::RawDeflate,
            3 => Coding::Brotli,
            _ => Coding::Zstd,
        })
        .collect();
    if let Some((_, form)) = FORM_TYPES.iter().find(|(i, _)| *i == usize::from(input.base)) {
        if !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(form));
        }
    }
    let mut body = body_of(&input);
    if !codings.is_empty() && input.target % 2 == 1 {
        body = codec::encode(&body, &codings);
        let names: Vec<&str> = codings
            .iter()
            .map(|c| match c {
                Coding::Gzip => "gzip",
                Coding::Zlib | Coding::RawDeflate => "deflate",
                Coding::Brotli => "br",
                Coding::Zstd => "zstd",
            })
            .collect();
        headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_str(&names.join(", ")).expect("coding names are tokens"),
        );
    }
    let mut msg = Message {
        query: input.query.clone(),
        headers,
        body: Bytes::from(body),
    };
    let max = 1 << 20;
    if rewrite::apply(&rules, &mut msg, max).is_err() {
        return;
    }
    // Nothing left for the rules to do.
    let mut again = Message {
        query: msg.query.clone(),
        headers: msg.headers.clone(),
        body: msg.body.clone(),
    };
    let edits = rewrite::apply(&rules, &mut again, max).expect("what left is readable");
    assert!(
        edits.removed.is_empty() && edits.replaced.is_empty(),
        "a second pass still found {edits:?}"
    );
    // No pair of what leaves is, as a lenient receiver reads it, a name a rule removes.
    let removed: Vec<String> = rules
        .iter()
        .flat_map(|r| match &r.action {
            Action::Remove(s) => s.iter().collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .filter_map(|s| match s {
            Selector::Query(n) => Some(fold(n).into_owned()),
            _ => None,
        })
        .collect();
    if let Some(q) = &msg.query {
        for pair in q.split(['&', ';']) {
            let name = pair.split('=').next().unwrap_or_default().replace('+', " ");
            let decoded: Vec<u8> = percent_decode(name.as_bytes());
            let name = String::from_utf8_lossy(&decoded);
            assert!(
                !removed.contains(&fold(&name).into_owned()),
                "{name:?} left in {q:?}"
            );
        }
    }
});

fn percent_decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}
