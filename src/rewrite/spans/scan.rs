//! The span engine's scanner: a strict RFC 8259 reader that fills a [`SpanDoc`]'s node table
//! in one pass over the body (every key checked as the receivers bind it, duplicates that bind
//! to a selected name refused), and the per-thread tables it reuses. Pure.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use bytes::Bytes;

use super::{key_bytes, Kind, Node, NodeId, SpanDoc, MAX_DEPTH, NONE};
use crate::rewrite::error::RewriteError;
use crate::rewrite::keys::{check_key, Names};

impl SpanDoc {
    /// Parse and check `raw` (see `tree::parse_json` for what is refused and why).
    pub(crate) fn parse(raw: &Bytes, names: Arc<Names>) -> Result<SpanDoc, RewriteError> {
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
            found: Vec::new(),
        })
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

    /// A value and its node. A scalar is read here, inlined into the member and item loops; a
    /// container is read by [`Scanner::container`], which recurses.
    #[inline(always)]
    fn value(&mut self, parent: NodeId, key: KeyOf, depth: usize) -> Result<NodeId, RewriteError> {
        let start = self.pos();
        match self.s.get(self.at) {
            Some(b'{' | b'[') => return self.container(parent, key, start, depth),
            Some(b'"') => {
                self.string::<false>()?;
            }
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(b't') => self.literal(b"true")?,
            Some(b'f') => self.literal(b"false")?,
            Some(b'n') => self.literal(b"null")?,
            _ => return Err(RewriteError::NotJson),
        }
        self.push(parent, key, start, Kind::Scalar)
    }

    /// An object or an array starting at `start` (`at`): its node (first, so node ids follow
    /// the document), then what it holds, then its end.
    #[inline(never)]
    fn container(
        &mut self,
        parent: NodeId,
        key: KeyOf,
        start: u32,
        depth: usize,
    ) -> Result<NodeId, RewriteError> {
        let kind = if self.s.get(self.at) == Some(&b'{') {
            Kind::Object
        } else {
            Kind::Array
        };
        let id = self.push(parent, key, start, kind)?;
        if kind == Kind::Object {
            self.object(id, depth + 1)?;
        } else {
            self.array(id, depth + 1)?;
        }
        self.nodes[id as usize].end = self.pos();
        Ok(id)
    }

    /// A node for the value from `start` to `at`.
    #[inline(always)]
    fn push(
        &mut self,
        parent: NodeId,
        key: KeyOf,
        start: u32,
        kind: Kind,
    ) -> Result<NodeId, RewriteError> {
        let id = NodeId::try_from(self.nodes.len()).map_err(|_| RewriteError::TooLarge)?;
        self.nodes.push(Node {
            start,
            end: self.pos(),
            kind,
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
        Ok(id)
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), RewriteError> {
        if self.s[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(RewriteError::NotJson)
        }
    }

    /// The children read since `mark` become the container's.
    fn close(&mut self, id: NodeId, mark: usize) -> Result<(), RewriteError> {
        let first = u32::try_from(self.kids.len()).map_err(|_| RewriteError::TooLarge)?;
        self.kids.extend_from_slice(&self.open[mark..]);
        self.open.truncate(mark);
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
            // A key below 0x7f throughout, without escapes, is ASCII and free of control
            // characters: known in the one pass that finds its end ([`key_stop`]). Any other
            // key is read as a string and then as text (`None`: a plain key).
            self.eat(b'"')?;
            let rest = self.s.get(self.at..).unwrap_or_default();
            let (decoded, plain) = match key_stop(rest) {
                Some(n) if rest[n] == b'"' => {
                    self.at += n + 1;
                    (None, true)
                }
                _ => {
                    self.at = quote;
                    (self.string::<true>()?, false)
                }
            };
            let (start, end) = (quote + 1, self.at - 1);
            let src = self.s;
            let key: &[u8] = match &decoded {
                None => src.get(start..end).unwrap_or_default(),
                Some(d) => d.as_bytes(),
            };
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
    /// text (`DECODE`: a key's; a value's is only checked, and `Some` of nothing). Raw control
    /// characters, bad escapes and lone surrogates are refused (as serde_json refuses them).
    #[inline(always)]
    fn string<const DECODE: bool>(&mut self) -> Result<Option<String>, RewriteError> {
        self.eat(b'"')?;
        // Fast path, inline: no escapes.
        let rest = self.s.get(self.at..).unwrap_or_default();
        match string_stop(rest) {
            Some(n) if rest[n] == b'"' => {
                self.at += n + 1;
                Ok(None)
            }
            Some(n) if rest[n] == b'\\' => self.escaped::<DECODE>(n).map(Some),
            _ => Err(RewriteError::NotJson),
        }
    }

    /// The rest of a string whose first escape is `n` bytes past its opening quote (`at` is
    /// just past the quote): decoded. Plain runs between escapes are found as the fast path
    /// finds them ([`string_stop`]) and copied whole. Without `DECODE` nothing is copied (a
    /// value is only checked: the body's bytes are what leaves).
    #[inline(never)]
    fn escaped<const DECODE: bool>(&mut self, n: usize) -> Result<String, RewriteError> {
        let mut out: Vec<u8> = Vec::new();
        let mut run = n;
        loop {
            if DECODE {
                out.extend_from_slice(&self.s[self.at..self.at + run]);
            }
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
                    if DECODE {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
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
/// or a control character.
#[inline(always)]
pub(super) fn string_stop(s: &[u8]) -> Option<usize> {
    stop::<false>(s)
}

/// [`string_stop`] for a key, which also stops at a byte of 0x7f or above (where a key stops
/// being plain ASCII).
#[inline(always)]
pub(super) fn key_stop(s: &[u8]) -> Option<usize> {
    stop::<true>(s)
}

/// Eight bytes are tested at once: in a word, the lowest byte flagged by each test is exact (a
/// borrow or a carry only runs upwards from a byte that was flagged), so the lowest flag of
/// all is the first stop. `HIGH_TOO`: bytes of 0x7f and above stop too.
#[inline(always)]
fn stop<const HIGH_TOO: bool>(s: &[u8]) -> Option<usize> {
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
        let mut stops = zero(w ^ QUOTES) | zero(w ^ SLASHES) | (w.wrapping_sub(SPACES) & !w);
        if HIGH_TOO {
            // 0x7f + 1 sets the high bit; 0x80 and above have it.
            stops |= w | w.wrapping_add(ONES);
        }
        let stops = stops & HIGH;
        if stops != 0 {
            return Some(at + (stops.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20 || (HIGH_TOO && b >= 0x7f))
        .map(|n| at + n)
}
