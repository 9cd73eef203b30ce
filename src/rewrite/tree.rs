//! The tree engine: a JSON body read into a `serde_json::Value`, for selectors beyond the span
//! engine's subset and for allowlists. Re-serialized compactly with member order and number
//! text kept (string escapes may then be normalized). Pure.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json_path::PathElement;

use super::drift::Label;
use super::error::RewriteError;
use super::fold::glob;
use super::keys::{check_key, summarize, Names, Step};
use super::selector::JsonSelector;

/// A JSON body read into a tree, with the names its rules look for.
pub(super) struct TreeDoc {
    value: Value,
    names: Arc<Names>,
    /// Some member is spelt otherwise than the rules spell the name it binds to
    /// (`Channel_Name` for `channel_name`): queries then run on a copy spelt the rules' way.
    respelt: bool,
    /// The items removed so far from each array, as positions in the body as received (each
    /// array by its path as received), so a removal is recorded where the client sent it.
    gone: BTreeMap<Vec<Step>, Vec<usize>>,
}

/// Parse a JSON body, refusing what receivers could read differently from the rules: duplicate
/// object keys (parsers disagree on which one wins, so a rule could remove one copy while the
/// upstream reads the other), two members that bind to one name a rule names (`message` and
/// `Message`), and keys with control characters. Returns the document and whether some member
/// is spelt otherwise than the rules spell it.
pub(super) fn parse_json(raw: &[u8], names: Arc<Names>) -> Result<TreeDoc, RewriteError> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let respelt = Cell::new(false);
    let refused = Cell::new(None);
    let check = Check {
        names: &names,
        respelt: &respelt,
        refused: &refused,
    };
    if check.deserialize(&mut de).and_then(|()| de.end()).is_err() {
        return Err(refused.take().unwrap_or(RewriteError::NotJson));
    }
    let value = serde_json::from_slice(raw).map_err(|_| RewriteError::NotJson)?;
    Ok(TreeDoc {
        value,
        names,
        respelt: respelt.get(),
        gone: BTreeMap::new(),
    })
}

/// A pass over a JSON document that checks every object's keys (see [`parse_json`]); what it
/// refuses is left in `refused` (serde's own errors carry only text).
#[derive(Clone, Copy)]
struct Check<'a> {
    names: &'a Names,
    respelt: &'a Cell<bool>,
    refused: &'a Cell<Option<RewriteError>>,
}

impl Check<'_> {
    fn refuse<E: de::Error>(&self, why: RewriteError) -> E {
        let text = why.to_string();
        self.refused.set(Some(why));
        E::custom(text)
    }
}

impl<'de> de::DeserializeSeed<'de> for Check<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Most objects are small: a linear scan over borrowed keys beats hashing owned ones.
        let mut seen: Vec<Key<'de>> = Vec::new();
        let mut hashed: HashSet<Key<'de>> = HashSet::new();
        let mut bound: Vec<u32> = Vec::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            check_key(&key.0).map_err(|e| self.refuse(e))?;
            if let Some(index) = self.names.bind(&key.0) {
                let respelt = self
                    .names
                    .claim(index, key.0.as_bytes(), bound.contains(&index))
                    .map_err(|e| self.refuse(e))?;
                bound.push(index);
                if respelt {
                    self.respelt.set(true);
                }
            }
            let duplicate = if hashed.is_empty() && seen.len() < 16 {
                let dup = seen.contains(&key);
                seen.push(key);
                if seen.len() == 16 {
                    hashed.extend(seen.drain(..));
                }
                dup
            } else {
                !hashed.insert(key)
            };
            if duplicate {
                return Err(self.refuse(RewriteError::DuplicateKey));
            }
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// An object key, borrowed from the body unless it holds escapes.
#[derive(Eq, Hash, PartialEq)]
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(std::borrow::Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key(std::borrow::Cow::Owned(v.to_string())))
    }
}

impl TreeDoc {
    /// The document as it leaves: compact, member order and number text as received.
    pub(super) fn serialize(&self) -> bytes::Bytes {
        bytes::Bytes::from(
            serde_json::to_vec(&self.value).expect("a serde_json::Value always serializes"),
        )
    }

    /// Remove everything neither kept nor on the way to something kept; returns the count.
    pub(super) fn prune(&mut self, kept: &BTreeSet<Vec<Step>>) -> usize {
        let mut items = Vec::new();
        let n = prune(&mut self.value, &mut Vec::new(), kept, &mut items);
        // Every path prune saw is a position from before it removed anything.
        let items: Vec<Vec<Step>> = items.iter().map(|p| self.as_sent(p)).collect();
        for path in items {
            self.note_gone(path);
        }
        n
    }

    /// `path` (positions in the document as it is now) as positions in the body as received.
    fn as_sent(&self, path: &[Step]) -> Vec<Step> {
        let mut out = Vec::with_capacity(path.len());
        for step in path {
            let step = match step {
                Step::Index(i) => {
                    let mut at = *i;
                    for g in self.gone.get(&out).into_iter().flatten() {
                        if *g <= at {
                            at += 1;
                        }
                    }
                    Step::Index(at)
                }
                name => name.clone(),
            };
            out.push(step);
        }
        out
    }

    /// Note that the array item at `path` (as received) is gone.
    fn note_gone(&mut self, mut path: Vec<Step>) {
        if let Some(Step::Index(i)) = path.pop() {
            let gone = self.gone.entry(path).or_default();
            let at = gone.partition_point(|g| *g < i);
            gone.insert(at, i);
        }
    }

    /// Where `sel` matches, as normalized paths into the document as received.
    pub(super) fn located(&self, sel: &JsonSelector) -> Vec<Vec<Step>> {
        let respelt = self.respelt.then(|| self.names.respell(&self.value));
        let queried = respelt.as_ref().unwrap_or(&self.value);
        let found: Vec<Vec<Step>> = sel
            .path
            .query_located(queried)
            .locations()
            .map(|loc| {
                loc.iter()
                    .map(|el| match el {
                        PathElement::Name(n) => Step::Name(n.to_string()),
                        PathElement::Index(i) => Step::Index(*i),
                    })
                    .collect()
            })
            .collect();
        let paths: Vec<Vec<Step>> = if self.respelt {
            found
                .into_iter()
                .filter_map(|p| self.as_received(p))
                .collect()
        } else {
            found
        };
        let Some(pattern) = &sel.pattern else {
            return paths;
        };
        let mut members = Vec::new();
        for path in paths {
            if let Some(Value::Object(map)) = node(&self.value, &path) {
                for key in map.keys().filter(|k| glob(pattern, k)) {
                    let mut p = path.clone();
                    p.push(Step::Name(key.clone()));
                    members.push(p);
                }
            }
        }
        members
    }

    /// The strings held where `sel` matches (a condition's path of names: positions as received
    /// are positions now).
    pub(super) fn strings(&self, sel: &JsonSelector) -> Vec<String> {
        self.located(sel)
            .iter()
            .filter_map(|path| node(&self.value, path)?.as_str().map(str::to_string))
            .collect()
    }

    /// The members and items no path of `covered` is, is inside or leads to, in document order
    /// (paths as received: nothing removed yet): the topmost of each unknown branch, or the
    /// event it is in (the outermost array item on its way that holds a string `event`), once.
    pub(super) fn unknown(&self, covered: &[Vec<Step>]) -> Vec<Vec<Step>> {
        let covered: BTreeSet<&[Step]> = covered.iter().map(Vec::as_slice).collect();
        let on_the_way: BTreeSet<&[Step]> = covered
            .iter()
            .flat_map(|p| (0..p.len()).map(move |n| &p[..n]))
            .collect();
        let mut out = Vec::new();
        let mut path = Vec::new();
        unknown_in(
            &self.value,
            &mut path,
            None,
            &covered,
            &on_the_way,
            &mut out,
        );
        out
    }

    /// The path as the record names it: member names, and array items by the string `event`
    /// they hold.
    pub(super) fn labels<'a>(&'a self, path: &'a [Step]) -> Vec<Label<'a>> {
        let mut at = &self.value;
        let mut labels = Vec::with_capacity(path.len());
        for step in path {
            let next = match (at, step) {
                (Value::Object(map), Step::Name(n)) => map.get(n),
                (Value::Array(items), Step::Index(i)) => items.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            labels.push(match step {
                Step::Name(n) => Label::Name(n),
                Step::Index(_) => {
                    Label::Item(next.get("event").and_then(Value::as_str).map(Cow::Borrowed))
                }
            });
            at = next;
        }
        labels
    }

    /// Remove every member or item `sel` selects; what was removed, for the record.
    pub(super) fn remove_all(&mut self, sel: &JsonSelector) -> Vec<String> {
        let paths: Vec<Vec<Step>> = self.located(sel);
        let removed = self.remove_paths(paths);
        summarize(sel, &removed)
    }

    /// Remove the members and items at `paths` (in the document as it is); returns where the
    /// client sent those removed, in document order.
    pub(super) fn remove_paths(&mut self, paths: Vec<Vec<Step>>) -> Vec<Vec<Step>> {
        let mut paths: Vec<Vec<Step>> = paths.into_iter().filter(|p| !p.is_empty()).collect();
        // Deepest and highest index first, so earlier removals never shift a later path.
        paths.sort();
        paths.dedup();
        paths.reverse();
        let mut removed = Vec::new();
        for path in paths {
            let Some((last, parent)) = path.split_last() else {
                continue;
            };
            // Where the client sent it, before this removal changes what `gone` counts.
            let sent = self.as_sent(&path);
            let hit = match (node_mut(&mut self.value, parent), last) {
                (Some(Value::Object(map)), Step::Name(n)) => map.shift_remove(n).is_some(),
                (Some(Value::Array(items)), Step::Index(i)) if *i < items.len() => {
                    items.remove(*i);
                    self.note_gone(sent.clone());
                    true
                }
                _ => false,
            };
            if hit {
                removed.push(sent);
            }
        }
        removed.reverse();
        removed
    }

    /// Set every node `sel` selects to the string `text`; what changed, for the record.
    pub(super) fn replace_all(&mut self, sel: &JsonSelector, text: &str) -> Vec<String> {
        let mut changed = Vec::new();
        for path in self.located(sel) {
            if let Some(node) =
                node_mut(&mut self.value, &path).filter(|n| n.as_str() != Some(text))
            {
                *node = Value::String(text.to_string());
                changed.push(self.as_sent(&path));
            }
        }
        summarize(sel, &changed)
    }

    /// A path found in the respelt copy, with each member named as received.
    fn as_received(&self, path: Vec<Step>) -> Option<Vec<Step>> {
        let mut at = &self.value;
        let mut out = Vec::with_capacity(path.len());
        for step in path {
            let (next, step) = match (at, step) {
                (Value::Object(map), Step::Name(n)) => map
                    .iter()
                    .find(|(k, _)| self.names.read_as(k) == n)
                    .map(|(k, v)| (v, Step::Name(k.clone())))?,
                (Value::Array(items), Step::Index(i)) => (items.get(i)?, Step::Index(i)),
                _ => return None,
            };
            at = next;
            out.push(step);
        }
        Some(out)
    }
}

/// The walk of [`TreeDoc::unknown`] below `value`, at `path`, inside the event at `event`.
fn unknown_in(
    value: &Value,
    path: &mut Vec<Step>,
    event: Option<usize>,
    covered: &BTreeSet<&[Step]>,
    on_the_way: &BTreeSet<&[Step]>,
    out: &mut Vec<Vec<Step>>,
) {
    let array = value.is_array();
    let children: Box<dyn Iterator<Item = (Step, &Value)>> = match value {
        Value::Object(map) => Box::new(map.iter().map(|(k, v)| (Step::Name(k.clone()), v))),
        Value::Array(items) => Box::new(items.iter().enumerate().map(|(i, v)| (Step::Index(i), v))),
        _ => return,
    };
    for (step, child) in children {
        path.push(step);
        // An event is the array item that holds a string `event`, outermost; its depth.
        let event = event.or_else(|| {
            (array && child.get("event").is_some_and(Value::is_string)).then_some(path.len())
        });
        if covered.contains(path.as_slice()) {
        } else if on_the_way.contains(path.as_slice()) {
            unknown_in(child, path, event, covered, on_the_way, out);
        } else {
            let at = event.map_or(path.clone(), |depth| path[..depth].to_vec());
            if out.last() != Some(&at) {
                out.push(at);
            }
        }
        path.pop();
    }
}

/// Remove everything that is neither kept nor on the way to something kept; returns the count.
/// Array items it removes are listed in `items` (positions from before the pruning).
fn prune(
    node: &mut Value,
    at: &mut Vec<Step>,
    kept: &BTreeSet<Vec<Step>>,
    items: &mut Vec<Vec<Step>>,
) -> usize {
    let verdict = |at: &Vec<Step>| -> Option<bool> {
        if kept.contains(at) {
            Some(true)
        } else if kept.iter().any(|k| k.starts_with(at)) {
            None
        } else {
            Some(false)
        }
    };
    let mut removed = 0;
    match node {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                at.push(Step::Name(key.clone()));
                match verdict(at) {
                    Some(true) => {}
                    Some(false) => {
                        map.shift_remove(&key);
                        removed += 1;
                    }
                    None => {
                        if let Some(child) = map.get_mut(&key) {
                            removed += prune(child, at, kept, items);
                        }
                    }
                }
                at.pop();
            }
        }
        Value::Array(list) => {
            for i in (0..list.len()).rev() {
                at.push(Step::Index(i));
                match verdict(at) {
                    Some(true) => {}
                    Some(false) => {
                        list.remove(i);
                        items.push(at.clone());
                        removed += 1;
                    }
                    None => removed += prune(&mut list[i], at, kept, items),
                }
                at.pop();
            }
        }
        _ => {}
    }
    removed
}

fn node<'v>(mut node: &'v Value, path: &[Step]) -> Option<&'v Value> {
    for step in path {
        node = match (node, step) {
            (Value::Object(map), Step::Name(n)) => map.get(n)?,
            (Value::Array(items), Step::Index(i)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

fn node_mut<'v>(mut node: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    for step in path {
        node = match (node, step) {
            (Value::Object(map), Step::Name(n)) => map.get_mut(n)?,
            (Value::Array(items), Step::Index(i)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}
