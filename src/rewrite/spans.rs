//! JSON bodies read as spans of the bytes received: the fast path of the rewriter. A strict
//! RFC 8259 scanner builds a flat table of nodes over byte ranges (no `serde_json::Value` of the
//! whole body, three allocations however large the body); the simple JSONPath a pack uses
//! (names, wildcards, indexes, and filters on one child at a time) is evaluated on it, and what it
//! selects is marked by node, not by path; removals and replacements are spliced into the
//! original bytes, so every byte no rule touched leaves as it came (Go's `\u003c` escapes
//! included). Selectors beyond that subset, and allowlists, use the tree engine in `rewrite`.
//! Pure.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use serde_json_path::JsonPath;

use super::drift::Label;
use super::fold::glob;
use super::keys::{Names, Step};
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
    names: Arc<Names>,
    /// Some member is spelt otherwise than the rules spell the name it binds to.
    respelt: bool,
    /// What [`SpanDoc::locate_and_keep`] found for each selector (by its text) since the body
    /// last changed.
    found: Vec<(Arc<str>, Vec<NodeId>)>,
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
    pub(crate) fn located(&self, sel: &JsonSelector) -> Vec<NodeId> {
        let path = simple_path(sel);
        // Two buffers, filled in turn: a segment reads one and fills the other.
        let mut found: Vec<NodeId> = Vec::with_capacity(8);
        found.push(0);
        let mut next = Vec::with_capacity(8);
        for segment in &path.segments {
            // What each name of the segment binds to, found once for every node it is read on
            // (on the stack for the few names a segment has, as a rule).
            let bind = |name: &String| self.names.bind(name).unwrap_or(NONE);
            let mut few = [NONE; 4];
            let many: Vec<u32>;
            let bound: &[u32] = match segment {
                SimpleSegment::Names(wanted) if wanted.len() <= few.len() => {
                    for (slot, name) in few.iter_mut().zip(wanted) {
                        *slot = bind(name);
                    }
                    &few[..wanted.len()]
                }
                SimpleSegment::Names(wanted) => {
                    many = wanted.iter().map(bind).collect();
                    &many
                }
                _ => &[],
            };
            next.clear();
            for node in &found {
                self.select(segment, bound, *node, &mut next);
            }
            std::mem::swap(&mut found, &mut next);
        }
        let Some(pattern) = &sel.pattern else {
            return found;
        };
        next.clear();
        for node in found {
            if self.node(node).kind == Kind::Object {
                next.extend(self.live_kids(node).filter(|m| glob(pattern, self.key(*m))));
            }
        }
        next
    }

    /// [`SpanDoc::located`], kept by the selector's text until the body changes, for
    /// [`SpanDoc::take_located`] (the drift check looks first for what the rules then look for).
    pub(crate) fn locate_and_keep(&mut self, sel: &JsonSelector) -> &[NodeId] {
        let i = match self.found.iter().position(|(s, _)| *s == sel.source) {
            Some(i) => i,
            None => {
                let found = self.located(sel);
                self.found.push((sel.source.clone(), found));
                self.found.len() - 1
            }
        };
        &self.found[i].1
    }

    /// What [`SpanDoc::locate_and_keep`] kept for `sel`, if the body has not changed since;
    /// else [`SpanDoc::located`].
    pub(crate) fn take_located(&mut self, sel: &JsonSelector) -> Vec<NodeId> {
        match self.found.iter().position(|(s, _)| *s == sel.source) {
            Some(i) => self.found.swap_remove(i).1,
            None => self.located(sel),
        }
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
            (SimpleSegment::Wildcard, _) => {
                out.reserve(self.node(node).len as usize);
                out.extend(self.live_kids(node));
            }
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
    pub(crate) fn path_of(&self, mut id: NodeId) -> Vec<Step<&str>> {
        let mut steps = Vec::new();
        loop {
            let parent = self.node(id).parent;
            if parent == NONE {
                break;
            }
            steps.push(match self.node(parent).kind {
                Kind::Object => Step::Name(self.key(id)),
                _ => Step::Index(self.kids_of(parent).partition_point(|k| *k < id)),
            });
            id = parent;
        }
        steps.reverse();
        steps
    }

    /// The members and items no node of `covered` is, is inside or leads to, in document order:
    /// the topmost of each unknown branch, or the event it is in (the outermost array item on
    /// its way that holds a string `event`), once.
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
        // An event named whole: nothing more in it to name.
        const NAMED: u8 = 3;
        let mut out: Vec<NodeId> = Vec::new();
        // (container, the event it is in); the root's children are not in one.
        let mut open = vec![(0, NONE)];
        while let Some((id, event)) = open.pop() {
            if event != NONE && known[event as usize] == NAMED {
                continue;
            }
            let array = self.node(id).kind == Kind::Array;
            for &kid in self.kids_of(id).iter().rev() {
                if self.node(kid).removed {
                    continue;
                }
                let in_event = if event == NONE && array && self.event_member(kid).is_some() {
                    kid
                } else {
                    event
                };
                match known[kid as usize] {
                    0 if in_event == NONE => out.push(kid),
                    0 => {
                        out.push(in_event);
                        known[in_event as usize] = NAMED;
                        if in_event == event {
                            break;
                        }
                    }
                    ON_THE_WAY if self.node(kid).kind != Kind::Scalar => {
                        open.push((kid, in_event));
                    }
                    _ => {}
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// The string member `event` of an object node, if it holds one.
    fn event_member(&self, id: NodeId) -> Option<NodeId> {
        if self.node(id).kind != Kind::Object {
            return None;
        }
        self.live_kids(id).find(|m| {
            key_bytes(self.node(*m), &self.src, &self.decoded) == b"event"
                && self.value_bytes(*m).first() == Some(&b'"')
        })
    }

    /// The path to a node as the record names it: member names, and array items by the string
    /// `event` they hold.
    /// (Into `labels`, emptied first: one buffer serves every name a body's record holds.)
    pub(crate) fn labels<'d>(&'d self, mut id: NodeId, labels: &mut Vec<Label<'d>>) {
        labels.clear();
        loop {
            let parent = self.node(id).parent;
            if parent == NONE {
                break;
            }
            labels.push(match self.node(parent).kind {
                Kind::Object => Label::Name(self.key(id)),
                _ => Label::Item(self.event_member(id).and_then(|m| self.text(m))),
            });
            id = parent;
        }
        labels.reverse();
    }

    /// A node's value, when it is a string: borrowed from the body when it holds no escape.
    fn text(&self, id: NodeId) -> Option<Cow<'_, str>> {
        let bytes = self.value_bytes(id);
        match bytes {
            [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => {
                std::str::from_utf8(inner).ok().map(Cow::Borrowed)
            }
            _ => self.string(id).map(Cow::Owned),
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
        self.found.clear();
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
        self.found.clear();
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

/// The span engine's path of a selector (the engine is chosen only when every selector has one:
/// `Engine::for_rules`).
fn simple_path(sel: &JsonSelector) -> &SimplePath {
    match &sel.simple {
        Some(simple) => simple,
        None => unreachable!("the span engine is used only for simple paths"),
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

mod scan;

#[cfg(test)]
mod tests;
