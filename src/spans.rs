//! JSON bodies read as spans of the bytes received: the fast path of the rewriter. A strict
//! RFC 8259 scanner builds a light tree of byte ranges (no `serde_json::Value` of the whole
//! body); the simple JSONPath a pack uses (names, wildcards, indexes, and filters on one child at
//! a time) is evaluated on it; removals and replacements are spliced into the original bytes, so
//! every byte no rule touched leaves as it came (Go's `\u003c` escapes included). Selectors
//! beyond that subset, and allowlists, use the tree engine in `rewrite`. Pure.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde_json::Value;
use serde_json_path::JsonPath;

use crate::fold::glob;
use crate::policy::{JsonSelector, SimplePath, SimpleSegment};
use crate::rewrite::{Names, RewriteError, Step};

/// Containers nested deeper than this are refused, as serde_json refuses them.
const MAX_DEPTH: usize = 128;

/// A parsed body: the tree of spans, what changed, and the names its rules look for.
pub(crate) struct SpanDoc {
    /// The body, checked as UTF-8 once; spans index it.
    src: String,
    root: Node,
    names: Names,
    /// Some member is spelt otherwise than the rules spell the name it binds to.
    respelt: bool,
}

struct Node {
    span: Range<usize>,
    kind: Kind,
    removed: bool,
    /// A JSON string literal standing in for the value.
    replaced: Option<String>,
    /// Some descendant was removed or replaced.
    dirty: bool,
}

enum Kind {
    Object(Vec<Member>),
    /// The items, and the lowest position of a removed one (below it, index = position).
    Array(Vec<Node>, usize),
    Scalar,
}

struct Member {
    /// The key as it decodes.
    key: Key,
    /// From the key's opening quote up to the value.
    key_span: Range<usize>,
    value: Node,
}

/// A member's key: its bytes in the body when it holds no escape, or its decoded text.
enum Key {
    Raw(Range<usize>),
    Decoded(String),
}

impl Member {
    fn key<'s>(&'s self, src: &'s str) -> &'s str {
        match &self.key {
            // Ranges lie between a key's quotes (ASCII), so on character boundaries.
            Key::Raw(r) => src.get(r.clone()).unwrap_or_default(),
            Key::Decoded(k) => k,
        }
    }
}

/// The live item at index `i` of an array (items removed before it shift it).
fn nth_live(items: &[Node], first_removed: usize, i: usize) -> Option<&Node> {
    if i < first_removed {
        return items.get(i).filter(|n| !n.removed);
    }
    items.iter().filter(|n| !n.removed).nth(i)
}

impl SpanDoc {
    /// Parse and check `src` (see `rewrite::parse_json` for what is refused and why).
    pub(crate) fn parse(raw: &[u8], names: Names) -> Result<SpanDoc, RewriteError> {
        let src = String::from_utf8(raw.to_vec()).map_err(|_| RewriteError::NotJson)?;
        let mut scanner = Scanner {
            text: &src,
            s: src.as_bytes(),
            at: 0,
            names: &names,
            respelt: false,
        };
        scanner.ws();
        let root = scanner.value(0)?;
        scanner.ws();
        if scanner.at != scanner.s.len() {
            return Err(RewriteError::NotJson);
        }
        let respelt = scanner.respelt;
        Ok(SpanDoc {
            src,
            root,
            names,
            respelt,
        })
    }

    /// Where `sel` matches, as normalized paths (names as received, current indexes).
    pub(crate) fn located(&self, sel: &JsonSelector, path: &SimplePath) -> Vec<Vec<Step>> {
        let mut found: Vec<(Vec<Step>, &Node)> = vec![(Vec::new(), &self.root)];
        for segment in &path.segments {
            let mut next = Vec::new();
            for (at, node) in &found {
                self.select(segment, at, node, &mut next);
            }
            found = next;
        }
        match &sel.pattern {
            None => found.into_iter().map(|(p, _)| p).collect(),
            Some(pattern) => {
                let mut out = Vec::new();
                for (at, node) in found {
                    if let Kind::Object(members) = &node.kind {
                        for m in members.iter().filter(|m| !m.value.removed) {
                            let key = m.key(&self.src);
                            if glob(pattern, key) {
                                let mut p = at.clone();
                                p.push(Step::Name(key.to_string()));
                                out.push(p);
                            }
                        }
                    }
                }
                out
            }
        }
    }

    fn select<'n>(
        &self,
        segment: &SimpleSegment,
        at: &[Step],
        node: &'n Node,
        out: &mut Vec<(Vec<Step>, &'n Node)>,
    ) {
        let push = |out: &mut Vec<(Vec<Step>, &'n Node)>, step: Step, child: &'n Node| {
            let mut p = at.to_vec();
            p.push(step);
            out.push((p, child));
        };
        match (segment, &node.kind) {
            (SimpleSegment::Names(wanted), Kind::Object(members)) => {
                for name in wanted {
                    if let Some(m) = members
                        .iter()
                        .filter(|m| !m.value.removed)
                        .find(|m| self.read_as(m.key(&self.src)) == name)
                    {
                        push(out, Step::Name(m.key(&self.src).to_string()), &m.value);
                    }
                }
            }
            (SimpleSegment::Index(i), Kind::Array(items, first_removed)) => {
                if let Some(item) = nth_live(items, *first_removed, *i) {
                    push(out, Step::Index(*i), item);
                }
            }
            (SimpleSegment::Wildcard, _) | (SimpleSegment::Filter(_), _) => {
                let filter = match segment {
                    SimpleSegment::Filter(f) => Some(f),
                    _ => None,
                };
                for (step, child) in self.children(node) {
                    if filter.is_none_or(|f| self.passes(f, child)) {
                        push(out, step, child);
                    }
                }
            }
            _ => {}
        }
    }

    /// The children of a container that are still there, with their steps.
    fn children<'n>(&self, node: &'n Node) -> Vec<(Step, &'n Node)> {
        match &node.kind {
            Kind::Object(members) => members
                .iter()
                .filter(|m| !m.value.removed)
                .map(|m| (Step::Name(m.key(&self.src).to_string()), &m.value))
                .collect(),
            Kind::Array(items, _) => items
                .iter()
                .filter(|n| !n.removed)
                .enumerate()
                .map(|(i, n)| (Step::Index(i), n))
                .collect(),
            Kind::Scalar => Vec::new(),
        }
    }

    /// Whether a filter (`$[?…]`, compiled) selects `child`: the child alone is read into a
    /// value (spelt the rules' way) and the filter runs on a one-item array holding it. A child
    /// serde_json cannot read (the scanner accepted it, so this should not happen) counts as
    /// selected: what a rule cannot look at is removed or replaced, never passed.
    fn passes(&self, filter: &JsonPath, child: &Node) -> bool {
        let Ok(value) = serde_json::from_slice::<Value>(&self.bytes_of(child)) else {
            return true;
        };
        let value = if self.respelt {
            self.names.respell(&value)
        } else {
            value
        };
        !filter.query(&Value::Array(vec![value])).is_empty()
    }

    fn read_as<'k>(&'k self, key: &'k str) -> &'k str {
        if self.respelt {
            self.names.read_as(key)
        } else {
            key
        }
    }

    /// Remove the node at `path`; false when it is not there.
    pub(crate) fn remove(&mut self, path: &[Step]) -> bool {
        edit(&self.src, &mut self.root, path, |n| {
            n.removed = true;
            true
        })
    }

    /// Replace the node at `path` with the string `text`; false when it is not there or
    /// already holds exactly that string.
    pub(crate) fn replace(&mut self, path: &[Step], text: &str) -> bool {
        let literal = serde_json::to_string(text).expect("a string always serializes");
        let src = &self.src;
        edit(src, &mut self.root, path, |n| {
            let current: Option<String> = match &n.replaced {
                Some(r) => serde_json::from_str(r).ok(),
                None => src
                    .get(n.span.clone())
                    .and_then(|t| serde_json::from_str(t).ok()),
            };
            if current.as_deref() == Some(text) {
                return false;
            }
            n.replaced = Some(literal.clone());
            true
        })
    }

    /// The body as it leaves: the original bytes, with removed members and items cut and
    /// replaced values spliced in. `None` when nothing changed.
    pub(crate) fn finish(&self) -> Option<Bytes> {
        if !self.root.dirty && self.root.replaced.is_none() {
            return None;
        }
        let mut out = Vec::with_capacity(self.src.len());
        self.emit(&self.root, &mut out);
        Some(Bytes::from(out))
    }

    fn bytes_of(&self, node: &Node) -> Cow<'_, [u8]> {
        if !node.dirty && node.replaced.is_none() {
            return Cow::Borrowed(&self.src.as_bytes()[node.span.clone()]);
        }
        let mut out = Vec::new();
        self.emit(node, &mut out);
        Cow::Owned(out)
    }

    fn emit(&self, node: &Node, out: &mut Vec<u8>) {
        if let Some(r) = &node.replaced {
            out.extend_from_slice(r.as_bytes());
            return;
        }
        if !node.dirty {
            out.extend_from_slice(&self.src.as_bytes()[node.span.clone()]);
            return;
        }
        match &node.kind {
            Kind::Object(members) => {
                out.push(b'{');
                for (i, m) in members.iter().filter(|m| !m.value.removed).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&self.src.as_bytes()[m.key_span.clone()]);
                    self.emit(&m.value, out);
                }
                out.push(b'}');
            }
            Kind::Array(items, _) => {
                out.push(b'[');
                for (i, item) in items.iter().filter(|n| !n.removed).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.emit(item, out);
                }
                out.push(b']');
            }
            Kind::Scalar => out.extend_from_slice(&self.src.as_bytes()[node.span.clone()]),
        }
    }
}

/// Apply `f` to the node at `path` under `root`, marking its ancestors dirty when it changed
/// something; false when the node is not there.
fn edit(src: &str, root: &mut Node, path: &[Step], f: impl FnOnce(&mut Node) -> bool) -> bool {
    fn walk(src: &str, node: &mut Node, path: &[Step], f: impl FnOnce(&mut Node) -> bool) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return f(node);
        };
        let changed = match (&mut node.kind, first) {
            (Kind::Object(members), Step::Name(name)) => members
                .iter_mut()
                .filter(|m| !m.value.removed)
                .find(|m| m.key(src) == name)
                .is_some_and(|m| walk(src, &mut m.value, rest, f)),
            (Kind::Array(items, first_removed), Step::Index(i)) => {
                let position = if *i < *first_removed && items.get(*i).is_some_and(|n| !n.removed) {
                    Some(*i)
                } else {
                    items
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| !n.removed)
                        .nth(*i)
                        .map(|(p, _)| p)
                };
                match position {
                    Some(p) => {
                        let changed = walk(src, &mut items[p], rest, f);
                        if changed && items[p].removed {
                            *first_removed = (*first_removed).min(p);
                        }
                        changed
                    }
                    None => false,
                }
            }
            _ => false,
        };
        node.dirty |= changed;
        changed
    }
    walk(src, root, path, f)
}

/// A strict RFC 8259 scanner over text already known to be UTF-8.
struct Scanner<'s> {
    text: &'s str,
    s: &'s [u8],
    at: usize,
    names: &'s Names,
    respelt: bool,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.at) {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Result<(), RewriteError> {
        if self.s.get(self.at) == Some(&b) {
            self.at += 1;
            Ok(())
        } else {
            Err(RewriteError::NotJson)
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, RewriteError> {
        let start = self.at;
        let kind = match self.s.get(self.at) {
            Some(b'{') => self.object(depth + 1)?,
            Some(b'[') => self.array(depth + 1)?,
            Some(b'"') => {
                self.string()?;
                Kind::Scalar
            }
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Kind::Scalar
            }
            Some(b't') => self.literal(b"true")?,
            Some(b'f') => self.literal(b"false")?,
            Some(b'n') => self.literal(b"null")?,
            _ => return Err(RewriteError::NotJson),
        };
        Ok(Node {
            span: start..self.at,
            kind,
            removed: false,
            replaced: None,
            dirty: false,
        })
    }

    fn literal(&mut self, word: &[u8]) -> Result<Kind, RewriteError> {
        if self.s[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(Kind::Scalar)
        } else {
            Err(RewriteError::NotJson)
        }
    }

    fn object(&mut self, depth: usize) -> Result<Kind, RewriteError> {
        if depth > MAX_DEPTH {
            return Err(RewriteError::NotJson);
        }
        self.eat(b'{')?;
        let mut members: Vec<Member> = Vec::new();
        let mut bound: Vec<&str> = Vec::new();
        self.ws();
        if self.s.get(self.at) == Some(&b'}') {
            self.at += 1;
            return Ok(Kind::Object(members));
        }
        loop {
            self.ws();
            let key_start = self.at;
            let key = match self.string()? {
                None => Key::Raw(key_start + 1..self.at - 1),
                Some(decoded) => Key::Decoded(decoded),
            };
            let text = match &key {
                Key::Raw(r) => self.text.get(r.clone()).ok_or(RewriteError::NotJson)?,
                Key::Decoded(k) => k.as_str(),
            };
            if text.chars().any(char::is_control) {
                return Err(RewriteError::BadKey);
            }
            if members.iter().any(|m| m.key(self.text) == text) {
                return Err(RewriteError::DuplicateKey);
            }
            let names = self.names;
            if let Some(spelling) = names.spelling_of(text) {
                if bound.contains(&spelling) {
                    return Err(RewriteError::DuplicateKey);
                }
                bound.push(spelling);
                if spelling != text {
                    self.respelt = true;
                }
            }
            self.ws();
            self.eat(b':')?;
            self.ws();
            let key_span = key_start..self.at;
            let value = self.value(depth)?;
            members.push(Member {
                key,
                key_span,
                value,
            });
            self.ws();
            match self.s.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Kind::Object(members));
                }
                _ => return Err(RewriteError::NotJson),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Kind, RewriteError> {
        if depth > MAX_DEPTH {
            return Err(RewriteError::NotJson);
        }
        self.eat(b'[')?;
        let mut items = Vec::new();
        self.ws();
        if self.s.get(self.at) == Some(&b']') {
            self.at += 1;
            return Ok(Kind::Array(items, usize::MAX));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.s.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Kind::Array(items, usize::MAX));
                }
                _ => return Err(RewriteError::NotJson),
            }
        }
    }

    /// A string literal: `None` when its text is its bytes (no escape), else the decoded
    /// text. Raw control characters, bad escapes and lone surrogates are refused (as serde_json
    /// refuses them).
    fn string(&mut self) -> Result<Option<String>, RewriteError> {
        self.eat(b'"')?;
        let start = self.at;
        // Fast path: no escapes.
        while let Some(&b) = self.s.get(self.at) {
            match b {
                b'"' => {
                    self.at += 1;
                    return Ok(None);
                }
                b'\\' => break,
                0..=0x1f => return Err(RewriteError::NotJson),
                _ => self.at += 1,
            }
        }
        let mut out: Vec<u8> = self.s[start..self.at].to_vec();
        loop {
            match self.s.get(self.at) {
                None => return Err(RewriteError::NotJson),
                Some(b'"') => {
                    self.at += 1;
                    return String::from_utf8(out)
                        .map(Some)
                        .map_err(|_| RewriteError::NotJson);
                }
                Some(0..=0x1f) => return Err(RewriteError::NotJson),
                Some(b'\\') => {
                    self.at += 1;
                    let c = match self.s.get(self.at) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            let hi = self.hex4()?;
                            match hi {
                                0xd800..=0xdbff => {
                                    if self.s.get(self.at + 1) != Some(&b'\\')
                                        || self.s.get(self.at + 2) != Some(&b'u')
                                    {
                                        return Err(RewriteError::NotJson);
                                    }
                                    self.at += 2;
                                    let lo = self.hex4()?;
                                    if !(0xdc00..=0xdfff).contains(&lo) {
                                        return Err(RewriteError::NotJson);
                                    }
                                    let code = 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00);
                                    char::from_u32(code).ok_or(RewriteError::NotJson)?
                                }
                                0xdc00..=0xdfff => return Err(RewriteError::NotJson),
                                _ => char::from_u32(hi).ok_or(RewriteError::NotJson)?,
                            }
                        }
                        _ => return Err(RewriteError::NotJson),
                    };
                    self.at += 1;
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                Some(&b) => {
                    out.push(b);
                    self.at += 1;
                }
            }
        }
    }

    /// Four hex digits after `\u`, leaving `at` on the last one.
    fn hex4(&mut self) -> Result<u32, RewriteError> {
        let digits = self
            .s
            .get(self.at + 1..self.at + 5)
            .ok_or(RewriteError::NotJson)?;
        let text = std::str::from_utf8(digits).map_err(|_| RewriteError::NotJson)?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RewriteError::NotJson);
        }
        self.at += 4;
        u32::from_str_radix(text, 16).map_err(|_| RewriteError::NotJson)
    }

    fn number(&mut self) -> Result<(), RewriteError> {
        let digits = |sc: &mut Self| {
            let start = sc.at;
            while sc.s.get(sc.at).is_some_and(u8::is_ascii_digit) {
                sc.at += 1;
            }
            sc.at > start
        };
        if self.s.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.s.get(self.at) {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(RewriteError::NotJson),
        }
        if self.s.get(self.at) == Some(&b'.') {
            self.at += 1;
            if !digits(self) {
                return Err(RewriteError::NotJson);
            }
        }
        if let Some(b'e' | b'E') = self.s.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.s.get(self.at) {
                self.at += 1;
            }
            if !digits(self) {
                return Err(RewriteError::NotJson);
            }
        }
        Ok(())
    }
}
