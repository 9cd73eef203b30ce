//! JSON bodies read as spans of the bytes received: the fast path of the rewriter. A strict
//! RFC 8259 scanner builds a flat table of nodes over byte ranges (no `serde_json::Value` of the
//! whole body, three allocations however large the body); the simple JSONPath a pack uses
//! (names, wildcards, indexes, and filters on one child at a time) is evaluated on it, and what it
//! selects is marked by node, not by path; removals and replacements are spliced into the
//! original bytes, so every byte no rule touched leaves as it came (Go's `\u003c` escapes
//! included). Selectors beyond that subset, and allowlists, use the tree engine in `rewrite`.
//! Pure.

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::ops::Range;

use bytes::Bytes;
use serde_json::Value;
use serde_json_path::JsonPath;

use super::drift::Label;
use super::error::RewriteError;
use super::fold::glob;
use super::keys::{check_key, Names, Step};
use super::selector::{JsonSelector, SimplePath, SimpleSegment};

/// Containers nested deeper than this are refused, as serde_json refuses them.
const MAX_DEPTH: usize = 128;

/// No name, no binding, no removed item: `u32::MAX`.
const NONE: u32 = u32::MAX;

/// A node of the document: its value's bytes, and for a member its key.
pub(crate) type NodeId = u32;

/// A parsed body: the nodes (the root first), what changed, and the names its rules look for.
pub(crate) struct SpanDoc {
    /// The body, checked as UTF-8 once; spans index it.
    src: Bytes,
    nodes: Vec<Node>,
    /// The children of every container, each container's a contiguous run, in document order.
    kids: Vec<NodeId>,
    /// Keys that hold escapes, decoded.
    decoded: Vec<Box<str>>,
    /// Replacement string literals (indexed from `Node::replaced`).
    replaced: Vec<Box<str>>,
    names: Names,
    /// Some member is spelt otherwise than the rules spell the name it binds to.
    respelt: bool,
}

#[derive(Clone, Copy, Eq, PartialEq)]
enum Kind {
    Object,
    Array,
    Scalar,
}

struct Node {
    /// The value's bytes.
    start: u32,
    end: u32,
    kind: Kind,
    removed: bool,
    /// Some descendant was removed or replaced.
    dirty: bool,
    /// Replaced by a string: the index of its literal in `SpanDoc::replaced`, or `NONE`.
    replaced: u32,
    parent: NodeId,
    /// A container's children: `kids[first_kid..first_kid + len]`.
    first_kid: u32,
    len: u32,
    /// An array's lowest position of a removed item (below it, index = position).
    first_removed: u32,
    /// A member's key, between its quotes, and its decoded text when it holds escapes (an
    /// index into `decoded`).
    key_start: u32,
    key_end: u32,
    key_decoded: u32,
    /// The rules' name the key binds to (an index into `Names`), if any.
    bound: u32,
}

impl SpanDoc {
    /// Parse and check `raw` (see `tree::parse_json` for what is refused and why).
    pub(crate) fn parse(raw: &Bytes, names: Names) -> Result<SpanDoc, RewriteError> {
        std::str::from_utf8(raw).map_err(|_| RewriteError::NotJson)?;
        if u32::try_from(raw.len()).is_err() {
            return Err(RewriteError::TooLarge);
        }
        let (nodes, kids, open) = Scratch::take();
        let mut scanner = Scanner {
            s: raw,
            at: 0,
            names: &names,
            respelt: false,
            nodes,
            kids,
            open,
            decoded: Vec::new(),
            hashes: RandomState::new(),
        };
        scanner.ws();
        let read = scanner.value(NONE, NO_KEY, 0);
        scanner.ws();
        let Scanner {
            at,
            respelt,
            nodes,
            kids,
            open,
            decoded,
            ..
        } = scanner;
        if read.is_err() || at != raw.len() {
            Scratch::give(nodes, kids, open);
            return Err(read.err().unwrap_or(RewriteError::NotJson));
        }
        Scratch::give(Vec::new(), Vec::new(), open);
        Ok(SpanDoc {
            src: raw.clone(),
            nodes,
            kids,
            decoded,
            replaced: Vec::new(),
            names,
            respelt,
        })
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    fn kids_of(&self, id: NodeId) -> &[NodeId] {
        let n = self.node(id);
        &self.kids[n.first_kid as usize..(n.first_kid + n.len) as usize]
    }

    /// The live children of a container.
    fn live_kids(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.kids_of(id)
            .iter()
            .copied()
            .filter(|k| !self.node(*k).removed)
    }

    /// A member's key as it decodes.
    fn key(&self, id: NodeId) -> &str {
        // The whole body is UTF-8 and a key's quotes are ASCII: this is never empty by error.
        std::str::from_utf8(key_bytes(self.node(id), &self.src, &self.decoded)).unwrap_or_default()
    }

    /// The live item at index `i` of an array (items removed before it shift it).
    fn nth_live(&self, array: NodeId, i: usize) -> Option<NodeId> {
        let kids = self.kids_of(array);
        if i < self.node(array).first_removed as usize {
            return kids.get(i).copied().filter(|k| !self.node(*k).removed);
        }
        self.live_kids(array).nth(i)
    }

    /// The nodes `sel` selects, in the order the tree engine finds them.
    pub(crate) fn located(&self, sel: &JsonSelector, path: &SimplePath) -> Vec<NodeId> {
        let mut found: Vec<NodeId> = vec![0];
        for segment in &path.segments {
            // What each name of the segment binds to, found once for every node it is read on.
            let bound: Vec<u32> = match segment {
                SimpleSegment::Names(wanted) => wanted
                    .iter()
                    .map(|name| self.names.bind(name).unwrap_or(NONE))
                    .collect(),
                _ => Vec::new(),
            };
            let mut next = Vec::new();
            for node in &found {
                self.select(segment, &bound, *node, &mut next);
            }
            found = next;
        }
        let Some(pattern) = &sel.pattern else {
            return found;
        };
        let mut out = Vec::new();
        for node in found {
            if self.node(node).kind == Kind::Object {
                out.extend(self.live_kids(node).filter(|m| glob(pattern, self.key(*m))));
            }
        }
        out
    }

    /// The children of `node` that `segment` selects; `bound`: what each of its names binds
    /// to (for a segment of names).
    fn select(&self, segment: &SimpleSegment, bound: &[u32], node: NodeId, out: &mut Vec<NodeId>) {
        match (segment, self.node(node).kind) {
            (SimpleSegment::Names(wanted), Kind::Object) => {
                for (name, &bound) in wanted.iter().zip(bound) {
                    // A key binds to a name the rules spell, or is read as it is spelt.
                    let hit = self.live_kids(node).find(|m| {
                        let member = self.node(*m);
                        member.bound == bound && (bound != NONE || self.key(*m) == name)
                    });
                    out.extend(hit);
                }
            }
            (SimpleSegment::Index(i), Kind::Array) => out.extend(self.nth_live(node, *i)),
            (SimpleSegment::Wildcard, _) => out.extend(self.live_kids(node)),
            (SimpleSegment::Filter(f), _) => {
                out.extend(self.live_kids(node).filter(|k| self.passes(f, *k)));
            }
            _ => {}
        }
    }

    /// Whether a filter (`$[?…]`, compiled) selects `child`: the child alone is read into a
    /// value (spelt the rules' way) and the filter runs on a one-item array holding it. A child
    /// serde_json cannot read (the scanner accepted it, so this should not happen) counts as
    /// selected: what a rule cannot look at is removed or replaced, never passed.
    fn passes(&self, filter: &JsonPath, child: NodeId) -> bool {
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

    /// The normalized path of a node in the document as received (names as received, positions
    /// counting items earlier rules removed): the audit names what the client sent.
    pub(crate) fn path_of(&self, mut id: NodeId) -> Vec<Step> {
        let mut steps = Vec::new();
        loop {
            let parent = self.node(id).parent;
            if parent == NONE {
                break;
            }
            steps.push(match self.node(parent).kind {
                Kind::Object => Step::Name(self.key(id).to_string()),
                _ => Step::Index(self.kids_of(parent).partition_point(|k| *k < id)),
            });
            id = parent;
        }
        steps.reverse();
        steps
    }

    /// The members and items no node of `covered` is, is inside or leads to: the topmost of
    /// each unknown branch, in document order.
    pub(crate) fn unknown(&self, covered: &[NodeId]) -> Vec<NodeId> {
        const ON_THE_WAY: u8 = 1;
        const COVERED: u8 = 2;
        let mut known = vec![0u8; self.nodes.len()];
        for &id in covered {
            known[id as usize] = COVERED;
            let mut up = self.node(id).parent;
            while up != NONE && known[up as usize] == 0 {
                known[up as usize] = ON_THE_WAY;
                up = self.node(up).parent;
            }
        }
        let mut out = Vec::new();
        let mut open = vec![0];
        while let Some(id) = open.pop() {
            if known[id as usize] == COVERED || self.node(id).kind == Kind::Scalar {
                continue;
            }
            let kids: Vec<NodeId> = self.live_kids(id).collect();
            for kid in kids.into_iter().rev() {
                match known[kid as usize] {
                    0 => out.push(kid),
                    ON_THE_WAY => open.push(kid),
                    _ => {}
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// The path to a node as the record names it: member names, and array items by the string
    /// `event` they hold.
    pub(crate) fn labels(&self, mut id: NodeId) -> Vec<Label> {
        let mut labels = Vec::new();
        loop {
            let parent = self.node(id).parent;
            if parent == NONE {
                break;
            }
            labels.push(match self.node(parent).kind {
                Kind::Object => Label::Name(self.key(id).to_string()),
                _ => Label::Item(
                    self.live_kids(id)
                        .find(|m| self.node(id).kind == Kind::Object && self.key(*m) == "event")
                        .and_then(|m| self.string(m)),
                ),
            });
            id = parent;
        }
        labels.reverse();
        labels
    }

    /// The event `id` is in: the outermost array item on its way that holds a string `event`
    /// (a batch's message), or `id` itself.
    pub(crate) fn event_of(&self, id: NodeId) -> NodeId {
        let mut event = id;
        let mut at = id;
        loop {
            let parent = self.node(at).parent;
            if parent == NONE {
                return event;
            }
            let names_event = self.node(at).kind == Kind::Object
                && self
                    .live_kids(at)
                    .any(|m| self.key(m) == "event" && self.string(m).is_some());
            if self.node(parent).kind == Kind::Array && names_event {
                event = at;
            }
            at = parent;
        }
    }

    /// Remove a node (not the root); false when it is already gone.
    pub(crate) fn remove(&mut self, id: NodeId) -> bool {
        let parent = self.node(id).parent;
        if parent == NONE || self.node(id).removed {
            return false;
        }
        if self.node(parent).kind == Kind::Array {
            // Children are in document order, which is the order of their ids.
            // Not found (it cannot be) counts as the first: every index is then counted.
            let position = self.kids_of(parent).binary_search(&id).unwrap_or(0);
            let p = &mut self.nodes[parent as usize];
            p.first_removed = p.first_removed.min(u32::try_from(position).unwrap_or(0));
        }
        self.nodes[id as usize].removed = true;
        self.mark_dirty(parent);
        true
    }

    /// A node's value, when it is a string.
    pub(crate) fn string(&self, id: NodeId) -> Option<String> {
        serde_json::from_slice(self.value_bytes(id)).ok()
    }

    /// Replace a node's value with the string `text`; false when it already holds exactly
    /// that string.
    pub(crate) fn replace(&mut self, id: NodeId, text: &str) -> bool {
        if self.string(id).as_deref() == Some(text) {
            return false;
        }
        let literal = serde_json::to_string(text)
            .expect("a string always serializes")
            .into();
        // At most one literal a node, so there are fewer literals than nodes (and node ids fit
        // in a u32): the index always fits.
        match index(self.node(id).replaced) {
            Some(i) => self.replaced[i] = literal,
            None => {
                self.nodes[id as usize].replaced = self.replaced.len() as u32;
                self.replaced.push(literal);
            }
        }
        let parent = self.node(id).parent;
        if parent != NONE {
            self.mark_dirty(parent);
        }
        true
    }

    fn mark_dirty(&mut self, mut id: NodeId) {
        while id != NONE && !self.nodes[id as usize].dirty {
            self.nodes[id as usize].dirty = true;
            id = self.nodes[id as usize].parent;
        }
    }

    fn span(&self, id: NodeId) -> &[u8] {
        let n = self.node(id);
        &self.src[n.start as usize..n.end as usize]
    }

    /// A node's bytes when nothing inside it changed: its replacement, or as received.
    fn value_bytes(&self, id: NodeId) -> &[u8] {
        match index(self.node(id).replaced).and_then(|i| self.replaced.get(i)) {
            Some(literal) => literal.as_bytes(),
            None => self.span(id),
        }
    }

    /// The body as it leaves: the original bytes, with removed members and items cut and
    /// replaced values spliced in. `None` when nothing changed.
    pub(crate) fn finish(&self) -> Option<Bytes> {
        let root = self.node(0);
        if !root.dirty && root.replaced == NONE {
            return None;
        }
        let mut out = Vec::with_capacity(self.src.len());
        self.emit(0, &mut out);
        Some(Bytes::from(out))
    }

    fn bytes_of(&self, id: NodeId) -> Cow<'_, [u8]> {
        let n = self.node(id);
        if !n.dirty || n.replaced != NONE {
            return Cow::Borrowed(self.value_bytes(id));
        }
        let mut out = Vec::new();
        self.emit(id, &mut out);
        Cow::Owned(out)
    }

    fn emit(&self, id: NodeId, out: &mut Vec<u8>) {
        let n = self.node(id);
        if !n.dirty || n.replaced != NONE {
            out.extend_from_slice(self.value_bytes(id));
            return;
        }
        let (open, close) = match n.kind {
            Kind::Object => (b'{', b'}'),
            Kind::Array => (b'[', b']'),
            Kind::Scalar => {
                out.extend_from_slice(self.span(id));
                return;
            }
        };
        out.push(open);
        // Runs of adjacent untouched children are copied as received, with what lies between.
        let mut run: Option<Range<usize>> = None;
        let mut written = false;
        let flush = |run: &mut Option<Range<usize>>, out: &mut Vec<u8>, written: &mut bool| {
            if let Some(r) = run.take() {
                if *written {
                    out.push(b',');
                }
                out.extend_from_slice(&self.src[r]);
                *written = true;
            }
        };
        let mut adjacent = false;
        for &k in self.kids_of(id) {
            let kid = self.node(k);
            if kid.removed {
                adjacent = false;
                continue;
            }
            // A member from its key's opening quote; an item from its value.
            let from = match n.kind {
                Kind::Object => kid.key_start as usize - 1,
                _ => kid.start as usize,
            };
            if !kid.dirty && kid.replaced == NONE {
                match &mut run {
                    Some(r) if adjacent => r.end = kid.end as usize,
                    _ => {
                        flush(&mut run, out, &mut written);
                        run = Some(from..kid.end as usize);
                    }
                }
                adjacent = true;
                continue;
            }
            flush(&mut run, out, &mut written);
            if written {
                out.push(b',');
            }
            out.extend_from_slice(&self.src[from..kid.start as usize]);
            self.emit(k, out);
            written = true;
            adjacent = false;
        }
        flush(&mut run, out, &mut written);
        out.push(close);
    }
}

/// An index stored in a node (`NONE`: none).
fn index(i: u32) -> Option<usize> {
    (i != NONE).then_some(i as usize)
}

/// A member's key as it decodes: its bytes in the body, or its decoded text when it holds
/// escapes.
fn key_bytes<'a>(n: &Node, src: &'a [u8], decoded: &'a [Box<str>]) -> &'a [u8] {
    match index(n.key_decoded).and_then(|i| decoded.get(i)) {
        Some(key) => key.as_bytes(),
        None => src
            .get(n.key_start as usize..n.key_end as usize)
            .unwrap_or_default(),
    }
}

impl Drop for SpanDoc {
    fn drop(&mut self) {
        let (nodes, kids) = (
            std::mem::take(&mut self.nodes),
            std::mem::take(&mut self.kids),
        );
        Scratch::give(nodes, kids, Vec::new());
    }
}

/// The node tables of the last body a thread read, kept for its next one: a large body then
/// costs no fresh allocation (nor the page faults of one), only while the tables are small
/// enough to keep ([`KEPT_NODES`]).
struct Scratch;

/// Tables of up to this many nodes are kept between bodies (about 3 MB a thread).
const KEPT_NODES: usize = 1 << 16;

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<Node>, Vec<NodeId>, Vec<NodeId>)> =
        std::cell::RefCell::default();
}

impl Scratch {
    fn take() -> (Vec<Node>, Vec<NodeId>, Vec<NodeId>) {
        SCRATCH
            .try_with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)))
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Keep what is not too large, empty; an empty vector leaves the kept one in place.
    fn give(nodes: Vec<Node>, kids: Vec<NodeId>, open: Vec<NodeId>) {
        fn keep<T>(slot: &mut Vec<T>, mut v: Vec<T>) {
            if v.capacity() > 0 && v.capacity() <= KEPT_NODES {
                v.clear();
                *slot = v;
            }
        }
        let _ = SCRATCH.try_with(|s| {
            if let Ok(mut kept) = s.try_borrow_mut() {
                keep(&mut kept.0, nodes);
                keep(&mut kept.1, kids);
                keep(&mut kept.2, open);
            }
        });
    }
}

/// A member's key, as the scanner read it.
struct KeyOf {
    start: u32,
    end: u32,
    decoded: u32,
    bound: u32,
}

const NO_KEY: KeyOf = KeyOf {
    start: 0,
    end: 0,
    decoded: NONE,
    bound: NONE,
};

/// Objects with more members than this check keys for duplicates by hash.
const LINEAR_KEYS: usize = 8;

/// A strict RFC 8259 scanner over text already known to be UTF-8, filling the node table.
struct Scanner<'s> {
    s: &'s [u8],
    at: usize,
    names: &'s Names,
    respelt: bool,
    nodes: Vec<Node>,
    kids: Vec<NodeId>,
    /// The children read so far of the containers being read, innermost last.
    open: Vec<NodeId>,
    decoded: Vec<Box<str>>,
    hashes: RandomState,
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

    /// `at` as a node offset (the body's length was checked to fit).
    fn pos(&self) -> u32 {
        u32::try_from(self.at).unwrap_or(NONE)
    }

    fn value(&mut self, parent: NodeId, key: KeyOf, depth: usize) -> Result<NodeId, RewriteError> {
        let id = NodeId::try_from(self.nodes.len()).map_err(|_| RewriteError::TooLarge)?;
        let start = self.pos();
        self.nodes.push(Node {
            start,
            end: start,
            kind: Kind::Scalar,
            removed: false,
            dirty: false,
            replaced: NONE,
            parent,
            first_kid: 0,
            len: 0,
            first_removed: NONE,
            key_start: key.start,
            key_end: key.end,
            key_decoded: key.decoded,
            bound: key.bound,
        });
        let kind = match self.s.get(self.at) {
            Some(b'{') => {
                self.object(id, depth + 1)?;
                Kind::Object
            }
            Some(b'[') => {
                self.array(id, depth + 1)?;
                Kind::Array
            }
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
        let end = self.pos();
        let node = &mut self.nodes[id as usize];
        node.kind = kind;
        node.end = end;
        Ok(id)
    }

    fn literal(&mut self, word: &[u8]) -> Result<Kind, RewriteError> {
        if self.s[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(Kind::Scalar)
        } else {
            Err(RewriteError::NotJson)
        }
    }

    /// The children read since `mark` become the container's.
    fn close(&mut self, id: NodeId, mark: usize) -> Result<(), RewriteError> {
        let first = u32::try_from(self.kids.len()).map_err(|_| RewriteError::TooLarge)?;
        self.kids.extend(self.open.drain(mark..));
        let node = &mut self.nodes[id as usize];
        node.first_kid = first;
        node.len = u32::try_from(self.kids.len()).map_err(|_| RewriteError::TooLarge)? - first;
        Ok(())
    }

    /// The key of a member already read.
    fn key_of(&self, id: NodeId) -> &[u8] {
        key_bytes(&self.nodes[id as usize], self.s, &self.decoded)
    }

    fn object(&mut self, id: NodeId, depth: usize) -> Result<(), RewriteError> {
        if depth > MAX_DEPTH {
            return Err(RewriteError::NotJson);
        }
        self.eat(b'{')?;
        let mark = self.open.len();
        let mut seen: Option<HashSet<u64>> = None;
        // A bit a key (by length and end bytes): a key whose bit is not set is new, uncompared.
        let mut bloom = 0u64;
        self.ws();
        if self.s.get(self.at) == Some(&b'}') {
            self.at += 1;
            return self.close(id, mark);
        }
        loop {
            self.ws();
            let quote = self.at;
            let decoded = self.string()?;
            let (start, end) = (quote + 1, self.at - 1);
            let src = self.s;
            let key: &[u8] = match &decoded {
                None => src.get(start..end).unwrap_or_default(),
                Some(d) => d.as_bytes(),
            };
            // A key as received holds no byte below 0x20 (`string` refused it): below 0x7f
            // throughout, it is ASCII and free of control characters, known in one pass. Any
            // other key is read as text (`None`: a plain key).
            let plain = decoded.is_none() && key.iter().all(|&b| b < 0x7f);
            let text = if plain {
                None
            } else {
                let text = std::str::from_utf8(key).map_err(|_| RewriteError::NotJson)?;
                check_key(text)?;
                Some(text)
            };
            let members = &self.open[mark..];
            // A raw key of another length is another key: most are told apart without a compare.
            let duplicate = |this: &Self| {
                members.iter().any(|m| {
                    let n = &this.nodes[*m as usize];
                    (n.key_decoded != NONE || (n.key_end - n.key_start) as usize == key.len())
                        && this.key_of(*m) == key
                })
            };
            if members.len() < LINEAR_KEYS {
                let (first, last) = (key.first(), key.last());
                let bit = 1u64
                    << ((key.len() as u64)
                        .wrapping_mul(31)
                        .wrapping_add(u64::from(first.copied().unwrap_or(0)))
                        .wrapping_add(u64::from(last.copied().unwrap_or(0)).wrapping_mul(7))
                        % 64);
                if bloom & bit != 0 && duplicate(self) {
                    return Err(RewriteError::DuplicateKey);
                }
                bloom |= bit;
            } else {
                let seen = seen.get_or_insert_with(|| {
                    members
                        .iter()
                        .map(|m| self.hashes.hash_one(self.key_of(*m)))
                        .collect()
                });
                if !seen.insert(self.hashes.hash_one(key)) && duplicate(self) {
                    return Err(RewriteError::DuplicateKey);
                }
            }
            let bound = match text {
                None => self.names.bind_ascii(key),
                Some(text) => self.names.bind(text),
            };
            let bound = match bound {
                Some(b) => {
                    let taken = members.iter().any(|m| self.nodes[*m as usize].bound == b);
                    if self.names.claim(b, key, taken)? {
                        self.respelt = true;
                    }
                    b
                }
                None => NONE,
            };
            let key_decoded = match decoded {
                None => NONE,
                Some(d) => {
                    self.decoded.push(d.into());
                    u32::try_from(self.decoded.len() - 1).map_err(|_| RewriteError::TooLarge)?
                }
            };
            let key = KeyOf {
                start: u32::try_from(start).map_err(|_| RewriteError::TooLarge)?,
                end: u32::try_from(end).map_err(|_| RewriteError::TooLarge)?,
                decoded: key_decoded,
                bound,
            };
            self.ws();
            self.eat(b':')?;
            self.ws();
            let member = self.value(id, key, depth)?;
            self.open.push(member);
            self.ws();
            match self.s.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return self.close(id, mark);
                }
                _ => return Err(RewriteError::NotJson),
            }
        }
    }

    fn array(&mut self, id: NodeId, depth: usize) -> Result<(), RewriteError> {
        if depth > MAX_DEPTH {
            return Err(RewriteError::NotJson);
        }
        self.eat(b'[')?;
        let mark = self.open.len();
        self.ws();
        if self.s.get(self.at) == Some(&b']') {
            self.at += 1;
            return self.close(id, mark);
        }
        loop {
            self.ws();
            let item = self.value(id, NO_KEY, depth)?;
            self.open.push(item);
            self.ws();
            match self.s.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return self.close(id, mark);
                }
                _ => return Err(RewriteError::NotJson),
            }
        }
    }

    /// A string literal: `None` when its text is its bytes (no escape), else the decoded
    /// text. Raw control characters, bad escapes and lone surrogates are refused (as serde_json
    /// refuses them).
    #[inline(always)]
    fn string(&mut self) -> Result<Option<String>, RewriteError> {
        self.eat(b'"')?;
        // Fast path, inline: no escapes.
        let rest = self.s.get(self.at..).unwrap_or_default();
        match string_stop(rest) {
            Some(n) if rest[n] == b'"' => {
                self.at += n + 1;
                Ok(None)
            }
            Some(n) if rest[n] == b'\\' => self.escaped(n).map(Some),
            _ => Err(RewriteError::NotJson),
        }
    }

    /// The rest of a string whose first escape is `n` bytes past its opening quote (`at` is
    /// just past the quote): decoded. Plain runs between escapes are found as the fast path
    /// finds them ([`string_stop`]) and copied whole.
    #[inline(never)]
    fn escaped(&mut self, n: usize) -> Result<String, RewriteError> {
        let mut out: Vec<u8> = Vec::new();
        let mut run = n;
        loop {
            out.extend_from_slice(&self.s[self.at..self.at + run]);
            self.at += run;
            match self.s.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return String::from_utf8(out).map_err(|_| RewriteError::NotJson);
                }
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
                // A raw control character, or the end of the body inside the string.
                _ => return Err(RewriteError::NotJson),
            }
            let rest = self.s.get(self.at..).unwrap_or_default();
            run = string_stop(rest).ok_or(RewriteError::NotJson)?;
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

/// The position of the first byte of `s` that ends a string's plain run: a quote, a backslash
/// or a control character. Eight bytes are tested at once: in a word, the lowest byte flagged
/// by each test is exact (a borrow only runs upwards from a byte that was flagged), so the
/// lowest flag of all three is the first stop.
#[inline(always)]
fn string_stop(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = ONES * b'"' as u64;
    const SLASHES: u64 = ONES * b'\\' as u64;
    const SPACES: u64 = ONES * 0x20;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let mut chunks = s.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let stops = (zero(w ^ QUOTES) | zero(w ^ SLASHES) | (w.wrapping_sub(SPACES) & !w)) & HIGH;
        if stops != 0 {
            return Some(at + (stops.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|n| at + n)
}

#[cfg(test)]
mod tests;
