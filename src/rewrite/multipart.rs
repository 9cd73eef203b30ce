//! `multipart/form-data` bodies as parts named by their `Content-Disposition`: removed, replaced
//! or kept by name, every untouched part keeping its exact bytes. Go's `Request.FormValue` reads
//! these parts together with the query and urlencoded bodies, so `query:` and `form:` rules
//! reach them too. Pure.
//!
//! Read strictly, twice: the parts are cut from the bytes here (a body that is not exactly
//! delimiter, parts and close delimiter, with CRLF line ends and no preamble, padding or
//! epilogue, is refused), and the same body is parsed by `multer`, whose field names must be
//! ours, in order. A part whose name could be read more than one way (`name*=` or other
//! parameters, a repeated or missing `Content-Disposition`, a `Content-Transfer-Encoding` that
//! Go decodes) is refused, never guessed at.

use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use super::error::RewriteError;
use super::fold::fold;

/// A `multipart/form-data` body cut into its parts.
pub(super) struct Multipart {
    boundary: String,
    parts: Vec<Part>,
}

struct Part {
    /// The field name, as `Content-Disposition` gives it.
    name: String,
    /// The header lines and the blank line after them, as received.
    head: Bytes,
    content: Bytes,
}

impl Multipart {
    /// Cut `body` (whose `Content-Type` is `content_type`) into parts, or refuse it.
    pub(super) fn parse(content_type: &str, body: &Bytes) -> Result<Self, RewriteError> {
        let bad = RewriteError::AmbiguousMultipart;
        let boundary = multer::parse_boundary(content_type).map_err(|_| bad.clone())?;
        let parts = cut(&boundary, body).ok_or(bad.clone())?;
        let ours: Vec<&str> = parts.iter().map(|(name, ..)| name.as_str()).collect();
        if names_by_multer(&boundary, body).is_none_or(|theirs| theirs != ours) {
            return Err(bad);
        }
        let parts = parts
            .into_iter()
            .map(|(name, head, content)| Part {
                name,
                head: body.slice_ref(head),
                content: body.slice_ref(content),
            })
            .collect();
        Ok(Multipart { boundary, parts })
    }

    /// The parts' names, as `Content-Disposition` gives them.
    pub(super) fn names(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.name.clone()).collect()
    }

    /// Remove every part a receiver could read as `name` (folded, as for query names).
    pub(super) fn remove(&mut self, name: &str) -> bool {
        let before = self.parts.len();
        let folded = fold(name);
        self.parts.retain(|p| fold(&p.name) != folded);
        self.parts.len() != before
    }

    /// Set the content of every part a receiver could read as `name` to `value`.
    pub(super) fn replace(&mut self, name: &str, value: &str) -> bool {
        let folded = fold(name);
        let mut hit = false;
        for part in self.parts.iter_mut().filter(|p| fold(&p.name) == folded) {
            if part.content != value.as_bytes() {
                part.content = Bytes::copy_from_slice(value.as_bytes());
                hit = true;
            }
        }
        hit
    }

    /// Keep only the parts named exactly as one of `names` (Go's `Form` is keyed by the exact
    /// name); returns how many went.
    pub(super) fn keep_only(&mut self, names: &[&str]) -> usize {
        let before = self.parts.len();
        self.parts.retain(|p| names.contains(&p.name.as_str()));
        before - self.parts.len()
    }

    /// The body again: each part as it came unless changed, then the close delimiter.
    pub(super) fn serialize(&self) -> Bytes {
        let mut out = BytesMut::new();
        for part in &self.parts {
            out.extend_from_slice(b"--");
            out.extend_from_slice(self.boundary.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&part.head);
            out.extend_from_slice(&part.content);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--");
        out.extend_from_slice(self.boundary.as_bytes());
        out.extend_from_slice(b"--\r\n");
        out.freeze()
    }
}

/// A part cut from the body: its name, its head and its content, as slices of the body.
type Cut<'b> = (String, &'b [u8], &'b [u8]);

/// Cut `body` at its delimiters (RFC 2046 §5.1.1, strictly: no preamble, no transport padding,
/// CRLF line ends, nothing after the close delimiter but one CRLF).
fn cut<'b>(boundary: &str, body: &'b [u8]) -> Option<Vec<Cut<'b>>> {
    let delimiter = format!("--{boundary}");
    let next = format!("\r\n--{boundary}");
    let mut rest = body
        .strip_prefix(delimiter.as_bytes())?
        .strip_prefix(b"\r\n")?;
    let mut parts = Vec::new();
    loop {
        let at = find(rest, next.as_bytes())?;
        let (part, after) = (&rest[..at], &rest[at + next.len()..]);
        parts.push(part_of(part)?);
        if let Some(end) = after.strip_prefix(b"--") {
            return (end.is_empty() || end == b"\r\n").then_some(parts);
        }
        rest = after.strip_prefix(b"\r\n")?;
    }
}

/// A part's name, head and content; `None` when its head could be read more than one way.
fn part_of(part: &[u8]) -> Option<Cut<'_>> {
    let split = find(part, b"\r\n\r\n")? + 4;
    let (head, content) = part.split_at(split);
    let text = std::str::from_utf8(&head[..head.len() - 4]).ok()?;
    let mut name = None;
    for line in text.split("\r\n") {
        let (key, value) = line.split_once(':')?;
        if key.is_empty() || key.bytes().any(|b| !b.is_ascii_graphic()) {
            return None;
        }
        if key.eq_ignore_ascii_case("content-transfer-encoding") {
            return None;
        }
        if key.eq_ignore_ascii_case("content-disposition") {
            if name.is_some() {
                return None;
            }
            name = Some(form_name(value.trim())?);
        }
    }
    Some((name?, head, content))
}

/// `form-data; name="NAME"` with at most a `filename="…"` beside it, parameter names in any
/// case: the one form whose name every reader reads alike.
fn form_name(value: &str) -> Option<String> {
    let mut params = value.split(';').map(str::trim);
    if !params.next()?.eq_ignore_ascii_case("form-data") {
        return None;
    }
    let (mut name, mut filename) = (None, None);
    for param in params {
        let (key, quoted) = param.split_once('=')?;
        let text = quoted.strip_prefix('"')?.strip_suffix('"')?;
        if text.contains(['"', '\\']) || text.chars().any(char::is_control) {
            return None;
        }
        let slot = if key.eq_ignore_ascii_case("name") {
            &mut name
        } else if key.eq_ignore_ascii_case("filename") {
            &mut filename
        } else {
            return None;
        };
        if slot.replace(text.to_string()).is_some() {
            return None;
        }
    }
    name.filter(|n| !n.is_empty())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The field names `multer` reads in `body`, in order; `None` when it cannot read it.
fn names_by_multer(boundary: &str, body: &Bytes) -> Option<Vec<String>> {
    let stream =
        futures_util::stream::once(std::future::ready(Ok::<Bytes, Infallible>(body.clone())));
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut cx = Context::from_waker(Waker::noop());
    let mut names = Vec::new();
    loop {
        // The whole body is one ready chunk: the parser never waits.
        match multipart.poll_next_field(&mut cx) {
            Poll::Ready(Ok(Some(field))) => names.push(field.name()?.to_string()),
            Poll::Ready(Ok(None)) => return Some(names),
            Poll::Ready(Err(_)) | Poll::Pending => return None,
        }
    }
}
