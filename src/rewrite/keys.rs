//! Member names as the receivers bind them, shared by both JSON engines: the names a request's
//! rules look for ([`Names`], folded as Go's `encoding/json` folds), the one check every object
//! key passes ([`check_key`]), and normalized paths for the record ([`Step`], [`summarize`]).
//! Pure.

use std::collections::HashMap;

use serde_json::Value;

use super::error::RewriteError;
use super::fold::fold;
use super::selector::{Guarded, JsonSelector, Selector};

/// The member names a request's rules name, by folded form: how a member spelt another way
/// (`Channel_Name`, `meſſage`) is found, as a Go receiver would bind it.
#[derive(Debug, Default)]
pub(super) struct Names {
    /// Folded form → index into `spellings`.
    by_fold: HashMap<String, u32>,
    /// The rules' spelling of each name.
    spellings: Vec<String>,
    /// The folded names that are ASCII (upper case), with their indexes: an ASCII key folds to
    /// its upper case, so it is compared with these alone, without hashing or allocating.
    ascii: Vec<(Box<[u8]>, u32)>,
    /// The [`ascii_filter`] bits of the ASCII folded names: most ASCII keys are told they name
    /// nothing by one test.
    filter: u64,
}

impl Names {
    pub(super) fn of<A: Guarded>(rules: &[A]) -> Self {
        let mut names = Names::default();
        for rule in rules {
            let selected = rule.action().selectors().filter_map(|sel| match sel {
                Selector::Json(j) => Some(j),
                _ => None,
            });
            let conditions = rule.conditions().iter().map(|c| &c.selector);
            for sel in selected.chain(conditions) {
                names.add(sel);
            }
        }
        names
    }

    /// Add the names `sel` names.
    pub(super) fn add(&mut self, sel: &JsonSelector) {
        for name in &sel.names {
            let folded = fold(name).into_owned();
            if !self.by_fold.contains_key(&folded) {
                let index = u32::try_from(self.spellings.len()).unwrap_or(u32::MAX);
                if folded.is_ascii() {
                    self.filter |= ascii_filter(folded.as_bytes());
                    self.ascii.push((folded.as_bytes().into(), index));
                }
                self.by_fold.insert(folded, index);
                self.spellings.push(name.clone());
            }
        }
    }

    /// The name `key` binds to (an index for [`Names::spelling`]), if the rules name it.
    pub(super) fn bind(&self, key: &str) -> Option<u32> {
        if self.by_fold.is_empty() {
            return None;
        }
        if key.is_ascii() {
            return self.bind_ascii(key.as_bytes());
        }
        self.by_fold.get(&*fold(key)).copied()
    }

    /// [`Names::bind`] for a key known to be ASCII: it folds to its upper case, so it is
    /// compared with the ASCII names alone, without hashing or allocating.
    #[inline]
    pub(super) fn bind_ascii(&self, key: &[u8]) -> Option<u32> {
        if self.filter & ascii_filter(key) == 0 {
            return None;
        }
        self.ascii
            .iter()
            .find(|(folded, _)| folded.len() == key.len() && folded.eq_ignore_ascii_case(key))
            .map(|(_, index)| *index)
    }

    /// The rules' spelling of a name [`Names::bind`] returned.
    pub(super) fn spelling(&self, index: u32) -> &str {
        self.spellings
            .get(index as usize)
            .map_or("", String::as_str)
    }

    /// The rules' spelling of the name `key` binds to, if they name it.
    pub(super) fn spelling_of(&self, key: &str) -> Option<&str> {
        self.bind(key).map(|i| self.spelling(i))
    }

    /// The one rule for members that bind to a name the rules name, whichever engine reads
    /// them: one member of an object at most (with `message` and `Message` both there, which one
    /// the receiver reads is not ours to guess). `taken`: another member of the object binds to
    /// `index` already. Returns whether `key` is spelt otherwise than the rules spell it.
    pub(super) fn claim(&self, index: u32, key: &[u8], taken: bool) -> Result<bool, RewriteError> {
        if taken {
            return Err(RewriteError::DuplicateKey);
        }
        Ok(self.spelling(index).as_bytes() != key)
    }

    /// `key` as the rules read it.
    pub(super) fn read_as<'k>(&'k self, key: &'k str) -> &'k str {
        self.spelling_of(key).unwrap_or(key)
    }

    /// A copy of `value` with every member spelt the rules' way.
    pub(super) fn respell(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (self.read_as(k).to_string(), self.respell(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.respell(v)).collect()),
            other => other.clone(),
        }
    }
}

/// The one rule for a key's characters, whichever engine reads it: no control character (a
/// receiver may drop, keep or choke on one, so the rules and the receiver could read two names).
pub(super) fn check_key(text: &str) -> Result<(), RewriteError> {
    let control = if text.is_ascii() {
        text.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        text.chars().any(char::is_control)
    };
    if control {
        Err(RewriteError::BadKey)
    } else {
        Ok(())
    }
}

/// One bit of 64 for an ASCII name, the same for every spelling of it that differs only in
/// case: from its length and its last byte.
fn ascii_filter(name: &[u8]) -> u64 {
    let last = name.last().map_or(0, |b| usize::from(b | 0x20));
    1 << ((name.len().wrapping_mul(7).wrapping_add(last)) % 64)
}

/// One step of a normalized JSONPath. Names are owned by default, so the document can be
/// changed after the query; the span engine's borrow the body (`Step<&str>`), whose keys no
/// change moves.
#[derive(Clone, Debug, Eq, Ord, PartialEq, PartialOrd)]
pub(super) enum Step<N = String> {
    Name(N),
    Index(usize),
}

impl Step<&str> {
    pub(super) fn owned(&self) -> Step {
        match self {
            Step::Name(n) => Step::Name((*n).to_string()),
            Step::Index(i) => Step::Index(*i),
        }
    }
}

/// At most this many normalized paths are recorded per selector; beyond, the selector and its
/// count stand for them (an audit record must stay small when a filter matches a whole array).
pub(super) const MAX_PATHS: usize = 16;

/// The record of what `sel` changed: each normalized path, or the selector and a count when
/// there are more than [`MAX_PATHS`] or a path holds a member name the selector does not spell
/// (a pattern's or a wildcard's match): such a name is the client's text, and may carry a value.
pub(super) fn summarize<N: AsRef<str>>(sel: &JsonSelector, paths: &[Vec<Step<N>>]) -> Vec<String> {
    // ASCII names fold to their upper case: compared without folding (or allocating).
    let spelt = |name: &str| {
        sel.names.iter().any(|n| {
            if n.is_ascii() && name.is_ascii() {
                n.eq_ignore_ascii_case(name)
            } else {
                fold(n) == fold(name)
            }
        })
    };
    let foreign = || {
        paths
            .iter()
            .flatten()
            .any(|step| matches!(step, Step::Name(n) if !spelt(n.as_ref())))
    };
    if paths.len() > MAX_PATHS || foreign() {
        summarize_count(sel, paths.len())
    } else {
        paths
            .iter()
            .map(|p| {
                let mut out = String::with_capacity("json:".len() + rendered_len(p));
                out.push_str("json:");
                render_into(&mut out, p);
                out
            })
            .collect()
    }
}

pub(super) fn summarize_count(sel: &JsonSelector, n: usize) -> Vec<String> {
    let noun = if n == 1 { "match" } else { "matches" };
    vec![format!("json:{} ({n} {noun})", sel.source)]
}

/// Room for `path` rendered, so that a record's name is one allocation: enough when its names
/// need no escape and its indexes are below 10,000.
fn rendered_len<N: AsRef<str>>(path: &[Step<N>]) -> usize {
    1 + path
        .iter()
        .map(|s| match s {
            Step::Index(_) => 6,
            Step::Name(n) => n.as_ref().len() + 4,
        })
        .sum::<usize>()
}

/// Append the RFC 9535 normalized path of `path` to `out`, which the caller sized
/// ([`rendered_len`]): `$['batch'][3]`. (Written by hand, not with `write!`: a request's audit
/// record names up to 16 paths a selector.)
pub(super) fn render_into<N: AsRef<str>>(out: &mut String, path: &[Step<N>]) {
    use std::fmt::Write;
    out.push('$');
    for step in path {
        match step {
            Step::Index(i) => {
                out.push('[');
                out.push_str(itoa::Buffer::new().format(*i));
                out.push(']');
            }
            // Most names need no escape: copied whole.
            Step::Name(n)
                if !n
                    .as_ref()
                    .bytes()
                    .any(|b| b == b'\'' || b == b'\\' || b < 0x20) =>
            {
                out.push_str("['");
                out.push_str(n.as_ref());
                out.push_str("']");
            }
            Step::Name(n) => {
                out.push_str("['");
                for c in n.as_ref().chars() {
                    match c {
                        '\'' => out.push_str("\\'"),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push_str("']");
            }
        }
    }
}
