//! The request path as the receivers route on it. Go's `net/url` percent-decodes the whole path
//! into `URL.Path`, and Go's `ServeMux` and gorilla/mux (Mattermost's router) route on that
//! decoded path after `cleanPath` (`path.Clean`, keeping a trailing slash). A prefix compared
//! with the bytes as received would miss `/%61pi/v1/send_push` or `/x/../api/v1/send_push`, so
//! every feature and rule path is compared with [`normalize`]'s result, the audit record names
//! it, and it is what leaves. Pure.

use std::borrow::Cow;

use http::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

/// Why a request path cannot be decided on.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PathError {
    /// `*` (asterisk-form) on a method other than `OPTIONS`, or `OPTIONS *`, which names no
    /// resource and cannot be forwarded as such: refused on every destination.
    Asterisk(&'static str),
    /// The path reads one way to one receiver and another way to another (an encoded `/`, a NUL
    /// or other control character, bytes that are not UTF-8 once decoded, bad percent-encoding,
    /// `;` path parameters): refused where a feature's paths are decided on.
    Ambiguous(&'static str),
}

impl PathError {
    pub fn why(self) -> &'static str {
        match self {
            PathError::Asterisk(why) | PathError::Ambiguous(why) => why,
        }
    }
}

/// A `;` in a path: a path parameter to some receivers (Java's), a plain byte to Go's.
const PARAMETER: &str = "request path has a ; parameter, which receivers read differently";

/// Bytes written percent-encoded when a normalized path leaves: those RFC 3986 does not allow
/// raw in a path, and `%` itself (every `%` of a normalized path is a decoded one). `is_clean`
/// lists the same printable ones.
const PATH_ENCODE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The path of a request-target as the receivers route on it: percent-decoded, dot-segments and
/// repeated slashes removed as `path.Clean` does, a trailing slash kept. Borrows `raw` when it is
/// already in that form (the common case costs no allocation).
pub fn normalize<'a>(method: &Method, raw: &'a str) -> Result<Cow<'a, str>, PathError> {
    if raw == "*" {
        return Err(PathError::Asterisk(if method == Method::OPTIONS {
            "an asterisk-form OPTIONS request names no resource and is not forwarded"
        } else {
            "an asterisk-form target is only for OPTIONS"
        }));
    }
    if !raw.starts_with('/') {
        return Err(PathError::Ambiguous("request path does not start with /"));
    }
    if raw.contains(';') {
        return Err(PathError::Ambiguous(PARAMETER));
    }
    if is_clean(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode(raw)?;
    Ok(Cow::Owned(clean(&decoded)))
}

/// The path as it leaves: `path` (from [`normalize`]) with what a path cannot hold raw
/// percent-encoded. Equal to the received bytes whenever those were already normal.
pub fn encode(path: &str) -> Cow<'_, str> {
    utf8_percent_encode(path, PATH_ENCODE).into()
}

/// Already normal (`raw` starts with `/`): only bytes a path holds raw (nothing encoded, no
/// control character), no empty segment but a last one, no `.` or `..` segment.
fn is_clean(raw: &str) -> bool {
    raw.bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"#%<>?[\\]^`{|}".contains(&b))
        && !raw.contains("//")
        && raw.split('/').all(|seg| seg != "." && seg != "..")
}

/// Percent-decode as Go's `url.PathUnescape` does, refusing what decodes ambiguously.
fn decode(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(PathError::Ambiguous(
                "request path has bad percent-encoding",
            ));
        };
        let byte = (hi * 16 + lo) as u8;
        match byte {
            b'/' => {
                return Err(PathError::Ambiguous(
                    "request path has an encoded /, which receivers read differently",
                ))
            }
            b';' => return Err(PathError::Ambiguous(PARAMETER)),
            _ => out.push(byte),
        }
        i += 3;
    }
    let text = String::from_utf8(out)
        .map_err(|_| PathError::Ambiguous("request path is not UTF-8 once decoded"))?;
    if text.chars().any(char::is_control) {
        return Err(PathError::Ambiguous(
            "request path has a control character once decoded",
        ));
    }
    Ok(text)
}

/// Go's `cleanPath`: `path.Clean` of a rooted path, keeping a trailing slash.
fn clean(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut cleaned = String::with_capacity(path.len());
    for seg in &out {
        cleaned.push('/');
        cleaned.push_str(seg);
    }
    // As Go's `cleanPath`: a trailing slash is kept only when the path ends in one.
    if cleaned.is_empty() || (path.ends_with('/') && !cleaned.ends_with('/')) {
        cleaned.push('/');
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> Result<String, PathError> {
        normalize(&Method::POST, raw).map(Cow::into_owned)
    }

    #[test]
    fn paths_read_as_go_routes_them() {
        for (raw, want) in [
            ("/api/v1/send_push", "/api/v1/send_push"),
            ("/", "/"),
            ("/v1/", "/v1/"),
            ("/%61pi/v1/send%5Fpush", "/api/v1/send_push"),
            ("/x/../api/v1/send_push", "/api/v1/send_push"),
            ("/./api//v1/./send_push", "/api/v1/send_push"),
            ("/../../v1/batch", "/v1/batch"),
            ("/v1/%2E%2E/v1/batch", "/v1/batch"),
            ("/v1/batch/.", "/v1/batch"),
            ("/v1/x/..", "/v1"),
            ("//", "/"),
            ("/a%20b", "/a b"),
            ("/a b", "/a b"),
            ("/caf%C3%A9", "/café"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
        assert!(matches!(
            normalize(&Method::POST, "/v1/batch"),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn ambiguous_paths_and_asterisks_are_refused() {
        for raw in [
            "/\tv1/batch",
            "/api%2Fv1/send_push",
            "/api%2fv1",
            "/v1/batch%00",
            "/v1/%01",
            "/v1/%ff",
            "/v1/%zz",
            "/v1/%6",
            "/api;x/v1/send_push",
            "/api%3Bx/v1",
            "v1/batch",
        ] {
            assert!(
                matches!(norm(raw), Err(PathError::Ambiguous(_))),
                "{raw}: {:?}",
                norm(raw)
            );
        }
        for method in [Method::GET, Method::POST, Method::OPTIONS] {
            assert!(matches!(
                normalize(&method, "*"),
                Err(PathError::Asterisk(_))
            ));
        }
    }

    #[test]
    fn a_normal_path_leaves_as_it_came() {
        for raw in ["/api/v1/send_push", "/api/123/envelope/", "/v1/a-b_c~d.e"] {
            assert_eq!(encode(&norm(raw).expect("normal")), raw);
        }
        assert_eq!(encode("/a b/?#%"), "/a%20b/%3F%23%25");
        assert_eq!(encode("/café"), "/caf%C3%A9");
    }
}
